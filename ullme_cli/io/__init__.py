"""Trust at every boundary, in one place each (docs/design.md §10):

- `rows`: the one reader. Every input format (jsonl, tsv, csv, text, parquet, a `save_to_disk` folder,
  `hf:NAME`, stdin) becomes rows of fields by one path, ids exactly as written.
- `outputs`: the one output guard, the atomic writes and the locks that every writer goes through.
- `agreement`: the one check wherever two sets of vectors, or vectors and a model, meet.

Nothing here imports torch or the rest of ullme, so every command and reader may use it.
"""
