"""The forked `ullme` processes of run_cli (tests/cli_zygote.py) behave as a new interpreter does: the same
stdout bytes from stdin, the same exit status and one-line error, in the call's own working directory."""

import subprocess
import sys

from conftest import DEMO_CORPUS, run_cli


def fresh(*args, input=None, cwd=None, env=None):
    return subprocess.run([sys.executable, "-m", "ullme_cli", *map(str, args)], input=input, capture_output=True, cwd=cwd, env=env, timeout=300)


def test_forked_call_equals_a_fresh_interpreter(tiny_llama, tmp_path):
    corpus = b"".join(DEMO_CORPUS.read_bytes().splitlines(keepends=True)[:4])
    args = ("encode", "-", "--model", tiny_llama, "-o", "-", "-q")
    forked, new = run_cli(*args, input=corpus), fresh(*args, input=corpus)
    assert forked.returncode == new.returncode == 0 and forked.stdout == new.stdout and len(forked.stdout) > 1000

    (tmp_path / "bad.jsonl").write_text('{"id": "a", "text": "fine"}\n{"id": "b"}\n')
    bad = ("encode", "bad.jsonl", "--model", tiny_llama, "-o", "out.npy")
    forked, new = run_cli(*bad, cwd=tmp_path), fresh(*bad, cwd=tmp_path)  # a relative path: the call's own directory
    assert forked.returncode == new.returncode == 2 and forked.stderr == new.stderr and b"bad.jsonl" in forked.stderr
    assert not (tmp_path / "out.npy").exists()


def test_a_call_past_its_timeout_is_killed_and_the_next_call_works(tiny_llama, tmp_path):
    import pytest

    with pytest.raises(subprocess.TimeoutExpired):
        run_cli("encode", DEMO_CORPUS, "--model", tiny_llama, "-o", tmp_path / "slow.npy", "-q", "--token-budget", "16", timeout=0.5)
    assert not (tmp_path / "slow.npy").exists()  # killed before it finished: no half-written output either
    assert run_cli("--help").returncode == 0
