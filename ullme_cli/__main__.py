from ullme_cli.cli import main

main()
