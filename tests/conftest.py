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


def write_corpus(path: Path, texts: list[str], prefix: str = "d") -> Path:
    """A jsonl corpus of `texts`, with ids PREFIX0, PREFIX1, ..."""
    path.write_text("".join(json.dumps({"id": f"{prefix}{i}", "text": t}) + "\n" for i, t in enumerate(texts)))
    return path


def demo_texts(n: int | None = None) -> list[str]:
    lines = DEMO_CORPUS.read_text().splitlines()[:n]
    return [json.loads(line)["text"] for line in lines]


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A tiny random Llama + trained BPE tokenizer, saved like any local model folder."""
    return save_tiny(tmp_path_factory.mktemp("tiny") / "llama", "llama", demo_texts())


@pytest.fixture(scope="session")
def artefacts(tmp_path_factory) -> Path:
    """Valid artefacts that the CLI tests point at, built once per test process: a tiny model (model/), corpora
    (corpus.jsonl: 40 demo texts; other.jsonl: 10 with other ids; queries.jsonl: 5), training rows (train.jsonl),
    a datasets folder (ds/), embeddings (emb.npy, emb2.npy of other.jsonl, shards s0.npy and s1.npy), an index
    (idx/), an adapter-only folder (adapter/) and a run's metrics (run/). Tests read them and never write here."""
    root = tmp_path_factory.mktemp("artefacts")
    save_tiny(root / "model", "llama", demo_texts())
    texts = demo_texts(40)
    write_corpus(root / "corpus.jsonl", texts)
    write_corpus(root / "other.jsonl", texts[:10], "e")
    write_corpus(root / "queries.jsonl", texts[:5], "q")
    (root / "train.jsonl").write_text("".join(json.dumps({"query": texts[i], "positive": texts[i + 1]}) + "\n" for i in range(0, 10, 2)))
    from datasets import Dataset

    Dataset.from_list([{"id": f"d{i}", "text": t} for i, t in enumerate(texts[:8])]).save_to_disk(str(root / "ds"))
    for corpus, out, extra in (("corpus.jsonl", "emb.npy", []), ("other.jsonl", "emb2.npy", []), ("corpus.jsonl", "s0.npy", ["--shard", "0/2"]),
                               ("corpus.jsonl", "s1.npy", ["--shard", "1/2"])):  # fmt: skip
        result = run_cli("encode", root / corpus, "-o", root / out, "--model", root / "model", "-q", *extra)
        assert result.returncode == 0, result.stderr.decode()
    assert run_cli("index", root / "emb.npy", "-o", root / "idx").returncode == 0
    from ullme_cli.models.embedder import Embedder

    Embedder.load(str(root / "model"), dtype="float32", device="cpu").add_lora(r=2, alpha=4).save(root / "adapter", reference_base=True)
    (root / "run").mkdir()
    (root / "run" / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 4)))
    return root


def lora_step_gradients(model_folder: Path, weights: dict, chunk: int = 0, packing: bool = False) -> tuple[float, dict, dict, int]:
    """One StepLoss backward on 6 TREC QA rows (2 negatives each) with LoRA adapters that matter (random
    lora_B, so a DPO reference differs from the policy): (loss, its parts, each trainable parameter's
    gradient, how many decoder passes ran)."""
    import torch

    from ullme_cli.data import read_training_examples
    from ullme_cli.models.bidirectional import decoder_of
    from ullme_cli.models.embedder import Embedder
    from ullme_cli.recipes import LossSection
    from ullme_cli.training.step import StepLoss
    from ullme_cli.training.trainer import trainable_parameters

    torch.manual_seed(0)
    embedder = Embedder.load(str(model_folder), dtype="float32", max_length=48, generation_instruction="Answer: ")
    embedder.add_lora(r=4, alpha=8, dropout=0.0)
    with torch.no_grad():
        for name, p in embedder.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    embedder.packing = packing
    examples, _ = read_training_examples(str(RESOURCES / "trecqa-train" / "train.jsonl"))
    passes = []
    hook = decoder_of(embedder.model).register_forward_hook(lambda *_: passes.append(1))
    try:
        step = StepLoss(embedder, LossSection(weights=weights), negatives_per_query=2, chunk_size=chunk)
        loss, parts = step.backward(examples[:6], torch.Generator().manual_seed(0))
    finally:
        hook.remove()
    grads = {n: p.grad.clone() for n, p in trainable_parameters(embedder).items() if p.grad is not None}
    return loss, parts, grads, len(passes)


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ULLME_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def run_cli(*args: str, input: bytes | None = None, cwd=None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the real `ullme` entry point in its own process, as a user would.

    The process is forked from tests/cli_zygote.py, which has imported torch, transformers, peft and mteb once
    per test worker; ULLME_TEST_ZYGOTE=0 starts a new interpreter per call instead."""
    argv = [*map(str, args)]
    if os.environ.get("ULLME_TEST_ZYGOTE", "1") == "0":
        return subprocess.run([sys.executable, "-m", "ullme_cli", *argv], input=input, capture_output=True, cwd=cwd, timeout=timeout)
    return Zygote.shared().run(argv, input=input, cwd=cwd, timeout=timeout)


class Zygote:
    """The test worker's end of tests/cli_zygote.py: one request at a time, a timeout kills the child's group."""

    _shared: "Zygote | None" = None

    @classmethod
    def shared(cls) -> "Zygote":
        if cls._shared is None or cls._shared.process.poll() is not None:
            cls._shared = cls()
        return cls._shared

    def __init__(self):
        self.process = subprocess.Popen([sys.executable, str(Path(__file__).parent / "cli_zygote.py")],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)  # fmt: skip

    def answer(self, timeout: float | None) -> dict:
        import select

        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        line = self.process.stdout.readline() if ready else ""
        if not line:
            raise TimeoutError
        return json.loads(line)

    def run(self, argv: list[str], input: bytes | None, cwd, timeout: float) -> subprocess.CompletedProcess:
        import signal
        import tempfile
        import time

        with tempfile.TemporaryDirectory(prefix="ullme-call-") as folder:
            streams = {name: Path(folder) / name for name in ("stdin", "stdout", "stderr")}
            streams["stdin"].write_bytes(input or b"")
            streams["stdout"].touch()
            streams["stderr"].touch()
            request = {"argv": argv, "env": dict(os.environ), "cwd": str(cwd or os.getcwd()), **{k: str(v) for k, v in streams.items()}}
            self.process.stdin.write(json.dumps(request) + "\n")
            started = time.monotonic()
            pid = self.answer(60)["pid"]
            try:
                status = self.answer(timeout - (time.monotonic() - started))["status"]
            except TimeoutError:
                os.killpg(pid, signal.SIGKILL)
                self.answer(60)
                raise subprocess.TimeoutExpired(["ullme", *argv], timeout) from None
            return subprocess.CompletedProcess(["ullme", *argv], status, streams["stdout"].read_bytes(), streams["stderr"].read_bytes())


# The longest tests, started first, then the other slow ones, so that the two workers of scripts/test.sh
# finish together rather than one waiting on a long test picked up last.
LONGEST_FIRST = ("test_multitask_study", "test_study_script", "test_tiny_cpu_recipe", "test_fsdp_kill_then_resume", "test_two_process_encode_killed",
                 "test_bfloat16_stays_close", "test_cli_output_matches_python")  # fmt: skip


def pytest_collection_modifyitems(items):
    def start_order(item) -> int:
        named = next((n for n, name in enumerate(LONGEST_FIRST) if item.name.startswith(name)), None)
        return named if named is not None else len(LONGEST_FIRST) + (0 if item.get_closest_marker("slow") else 1)

    items.sort(key=start_order)
