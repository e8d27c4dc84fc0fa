"""The model card: README.md with Hub front matter in every model folder; finetune's recipe, data and metrics."""

import json

import yaml
from conftest import RESOURCES, run_cli
from huggingface_hub import ModelCard, metadata_load

import ullme_cli as ullme

TRAIN = RESOURCES / "trecqa-train" / "train.jsonl"
TRECQA = RESOURCES / "trecqa-test"


def test_a_saved_model_has_a_card_the_hub_client_reads(tiny_llama, tmp_path):
    base = tmp_path / "base"
    embedder = ullme.load(str(tiny_llama), dtype="float32", query_instruction="Find the answer")
    embedder.save(base)
    meta = metadata_load(base / "README.md")
    assert meta["library_name"] == "sentence-transformers" and meta["pipeline_tag"] == "sentence-similarity"
    assert {"ullme", "sentence-transformers", "llama"} <= set(meta["tags"])
    assert "base_model" not in meta and "license" not in meta  # a local random model: neither is known
    text = ModelCard.load(base / "README.md").text
    assert 'prompt_name="query"' in text and "mteb.evaluate(ullme.load(" in text and "Find the answer" in text
    # A base folder whose own card names a licence passes it on.
    (base / "README.md").write_text("---\nlicense: mit\n---\n# base\n")
    ullme.load(str(base), dtype="float32").save(tmp_path / "again")
    assert metadata_load(tmp_path / "again" / "README.md")["license"] == "mit"


def test_finetune_and_export_write_the_recipe_data_and_last_metrics(tiny_llama, tmp_path):
    """Also: the same run reports to TensorBoard and draws curves.png (the same numbers as metrics.jsonl)."""
    recipe = {
        "output_dir": str(tmp_path / "run"), "model": {"name": str(tiny_llama), "max_length": 64},
        "lora": {"enabled": True, "r": 4, "alpha": 8}, "data": {"train": str(TRAIN), "negatives_per_query": 1},
        "loss": {"strategy": "contrastive"}, "train": {"steps": 2, "batch_size": 4, "warmup_steps": 0, "report_to": "tensorboard"},
        "eval": {"task_dir": str(TRECQA), "every": 0},
    }  # fmt: skip
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    result = run_cli("finetune", tmp_path / "r.yaml", "-q")
    assert result.returncode == 0, result.stderr.decode()
    last = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-1]
    rows = len(TRAIN.read_text().splitlines())
    exported = run_cli("export", tmp_path / "run" / "model", "-o", tmp_path / "merged", "--merge")
    assert exported.returncode == 0, exported.stderr.decode()
    for folder in (tmp_path / "run" / "model", tmp_path / "merged"):
        card = ModelCard.load(folder / "README.md")
        assert card.data.pipeline_tag == "sentence-similarity"
        assert f"for 2 steps on `{TRAIN}` ({rows} rows)" in card.text
        assert f"| ndcg_at_10 | {last['eval_ndcg_at_10']:.4f} |" in card.text and "Last evaluation (step 2" in card.text
        assert "strategy: contrastive" in card.text

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = (tmp_path / "run" / "tensorboard" / "finetune").glob("events.out.tfevents.*")  # the hparams go in a subfolder
    board = EventAccumulator(str(events)).Reload()
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(e.step, round(e.value, 5)) for e in board.Scalars("loss")] == [(r["step"], round(r["loss"], 5)) for r in logged]
    assert [e.step for e in board.Scalars("eval_ndcg_at_10")] == [2]
    assert (tmp_path / "run" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_bundled_default_names_its_hub_base_and_licence():
    from ullme_cli.models.model_card import describe_base

    assert describe_base("smollm2-135m", "unused") == {"base_model": "HuggingFaceTB/SmolLM2-135M-Instruct", "license": "apache-2.0"}

