import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import save_tiny  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RESOURCES = REPO / "ullme_cli" / "resources"
DEMO_CORPUS = RESOURCES / "demo" / "corpus.jsonl"
SHARED_DATA = REPO.parent / "shared" / "data"


def demo_texts(n: int | None = None) -> list[str]:
    lines = DEMO_CORPUS.read_text().splitlines()[:n]
    return [json.loads(line)["text"] for line in lines]


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A tiny random Llama + trained BPE tokenizer, saved like any local model folder."""
    return save_tiny(tmp_path_factory.mktemp("tiny") / "llama", "llama", demo_texts())


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ULLME_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def run_cli(*args: str, input: bytes | None = None, cwd=None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the real `ullme` entry point in a subprocess, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "ullme_cli", *map(str, args)],
        input=input, capture_output=True, cwd=cwd, timeout=timeout,
    )  # fmt: skip


# The longest tests, started first, then the other slow ones, so that the two workers of scripts/test.sh
# finish together rather than one waiting on a long test picked up last.
LONGEST_FIRST = ("test_multitask_study", "test_study_script", "test_tiny_cpu_recipe", "test_fsdp_kill_then_resume", "test_two_process_encode_killed",
                 "test_bfloat16_stays_close", "test_cli_output_matches_python")  # fmt: skip


def pytest_collection_modifyitems(items):
    def start_order(item) -> int:
        named = next((n for n, name in enumerate(LONGEST_FIRST) if item.name.startswith(name)), None)
        return named if named is not None else len(LONGEST_FIRST) + (0 if item.get_closest_marker("slow") else 1)

    items.sort(key=start_order)
