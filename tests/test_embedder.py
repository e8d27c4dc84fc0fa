import json

import numpy as np
import pytest
import torch
from conftest import demo_texts

from ullme_cli.errors import UllmeError
from ullme_cli.models import generation
from ullme_cli.models.embedder import Embedder, plan_batches

TEXTS = demo_texts(12)


def load(folder, **overrides):
    return Embedder.load(str(folder), dtype="float32", device="cpu", **overrides)


def test_encode_returns_unit_vectors_in_input_order(tiny_llama):
    embedder = load(tiny_llama)
    vectors = embedder.encode(TEXTS, token_budget=64)  # several batches, reordered by length
    assert vectors.shape == (len(TEXTS), 32)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    singles = np.stack([embedder.encode([t])[0] for t in TEXTS[:4]])
    np.testing.assert_allclose(vectors[:4], singles, atol=1e-5)


@pytest.mark.parametrize("pooling", ["mean", "weighted-mean", "last-token", "cls", "latent-attention"])
def test_left_and_right_padding_give_the_same_vectors(tiny_llama, pooling):
    right = load(tiny_llama, pooling=pooling)
    left = load(tiny_llama, pooling=pooling, padding_side="left")
    if pooling == "latent-attention":
        left.pooler.load_state_dict(right.pooler.state_dict())
    np.testing.assert_allclose(right.encode(TEXTS), left.encode(TEXTS), atol=1e-4)


def test_last_token_pooling_appends_eos_once(tiny_llama):
    embedder = load(tiny_llama, pooling="last-token")
    ids = embedder.tokenize(["a short text"])[0].ids
    assert ids[-1] == embedder.tokenizer.eos_token_id and ids[-2] != embedder.tokenizer.eos_token_id
    assert embedder.tokenizer("a short text")["input_ids"][-1] != embedder.tokenizer.eos_token_id


def test_instruction_tokens_are_counted_and_excluded(tiny_llama):
    embedder = load(tiny_llama, query_instruction="Given a question, find the answer")
    plain = embedder.tokenize(["Who wrote it ?"], kind="passage")[0]
    instructed = embedder.tokenize(["Who wrote it ?"], kind="query")[0]
    assert plain.instruction_tokens == 0
    assert instructed.instruction_tokens > 0
    # The content tokens are the text's own tokens (the instruction only steers their states).
    content = instructed.ids[instructed.instruction_tokens :]
    decoded = embedder.tokenizer.decode(content)
    assert decoded.strip() == "Who wrote it ?"
    assert not np.allclose(embedder.encode(["Who wrote it ?"], "query"), embedder.encode(["Who wrote it ?"], "passage"))


def test_default_token_budget_follows_the_device(tiny_llama):
    from ullme_cli.models.embedder import CPU_TOKEN_BUDGET, GPU_TOKEN_BUDGET

    embedder = load(tiny_llama)
    assert embedder.default_token_budget == CPU_TOKEN_BUDGET == 1536  # measured fastest on CPU
    embedder.device = torch.device("cuda")  # only read, never used, here
    assert embedder.default_token_budget == GPU_TOKEN_BUDGET


def test_plan_batches_respects_the_token_budget():
    lengths = [5, 50, 7, 50, 3, 9]
    batches = plan_batches(lengths, token_budget=100)
    assert sorted(i for b in batches for i in b) == list(range(6))
    assert all(len(b) * max(lengths[i] for i in b) <= 100 for b in batches)


def test_save_load_round_trip_plain(tiny_llama, tmp_path):
    embedder = load(tiny_llama, pooling="weighted-mean", query_instruction="find it")
    embedder.save(tmp_path / "saved")
    again = load(tmp_path / "saved")
    assert again.setup.replace(model="x", fingerprint="") == embedder.setup.replace(model="x", fingerprint="")
    np.testing.assert_allclose(again.encode(TEXTS, "query"), embedder.encode(TEXTS, "query"), atol=1e-6)


def test_save_load_round_trip_latent_attention(tiny_llama, tmp_path):
    embedder = load(tiny_llama, pooling="latent-attention")
    with torch.no_grad():
        embedder.pooler.latent.latents.add_(1.0)  # a state that differs from a fresh head
    embedder.save(tmp_path / "saved")
    again = load(tmp_path / "saved")
    np.testing.assert_allclose(again.encode(TEXTS), embedder.encode(TEXTS), atol=1e-5)


@pytest.mark.parametrize("merge", [False, True])
def test_save_load_round_trip_lora(tiny_llama, tmp_path, merge):
    embedder = load(tiny_llama).add_lora(r=4, alpha=8, dropout=0.0)
    with torch.no_grad():
        for name, p in embedder.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # LoRA B starts at zero; move it so the adapter matters
    embedder.model.eval()
    before = embedder.encode(TEXTS)
    assert not np.allclose(before, load(tiny_llama).encode(TEXTS), atol=1e-4)
    embedder.save(tmp_path / "saved", merge_lora=merge)
    assert (tmp_path / "saved" / "adapter").exists() is (not merge)
    np.testing.assert_allclose(load(tmp_path / "saved").encode(TEXTS), before, atol=1e-4)


def test_lora_add_and_load_raise_no_deprecation_noise(tiny_llama, tmp_path):
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load(tiny_llama).add_lora(r=4, alpha=8, dropout=0.0).save(tmp_path / "saved")
        load(tmp_path / "saved")
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)]


def test_generation_logprobs_match_full_logits(tiny_llama):
    embedder = load(tiny_llama)
    prompts, continuations = ["Who wrote it ?", "Why"], ["Hugo Young wrote it .", "because"]
    scores = generation.generation_logprobs(embedder, prompts, continuations)
    for row, (p, c) in enumerate(zip(prompts, continuations)):
        p_ids = embedder.tokenizer(p)["input_ids"]
        c_ids = embedder.tokenizer(c, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([p_ids + c_ids])
        with torch.no_grad():
            logprobs = embedder.model(input_ids=ids).logits.log_softmax(-1)[0]
        expected = sum(logprobs[len(p_ids) + j - 1, t].item() for j, t in enumerate(c_ids))
        assert scores["sum"][row].item() == pytest.approx(expected, abs=1e-4)
        assert scores["mean"][row].item() == pytest.approx(expected / len(c_ids), abs=1e-4)
        assert scores["tokens"][row].item() == len(c_ids)


def test_generation_logprobs_carry_gradients_when_asked(tiny_llama):
    embedder = load(tiny_llama)
    scores = generation.generation_logprobs(embedder, ["q"], ["an answer"], grad=True)
    scores["mean"].sum().backward()
    assert embedder.model.lm_head.weight.grad is not None


def test_model_folder_without_safetensors_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(UllmeError, match="no weights"):
        Embedder.load(str(tmp_path))


def test_remote_code_stays_off_unless_asked(tiny_llama, monkeypatch):
    import transformers

    seen = []
    real = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.append(kwargs.get("trust_remote_code"))
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    load(tiny_llama)
    assert seen == [False]


def test_out_of_memory_halves_the_batch_and_carries_on(tiny_llama, monkeypatch, caplog):
    """The GPU fallback's logic, on CPU: an out-of-memory error above 3 rows is what a small GPU would raise."""
    embedder = load(tiny_llama)
    texts = demo_texts(20)
    expected = embedder.encode(texts)
    real = Embedder.encode_tokenized
    attempts = []

    def small_gpu(self, items):
        attempts.append(len(items))
        if len(items) > 3:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(self, items)

    monkeypatch.setattr(Embedder, "encode_tokenized", small_gpu)
    got = embedder.encode(texts, token_budget=1 << 16)  # one batch of all 20
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert embedder.row_cap is not None and embedder.row_cap <= 3 and max(a for a in attempts if a <= 3) <= 3
    assert "out of GPU memory on a batch of 20 texts" in caplog.text
    # Once the cap is learnt, later batches go straight to the size that fits.
    attempts.clear()
    embedder.encode(texts, token_budget=1 << 16)
    assert max(attempts) <= embedder.row_cap

    monkeypatch.setattr(Embedder, "encode_tokenized", lambda self, items: (_ for _ in ()).throw(torch.OutOfMemoryError("oom")))
    with pytest.raises(UllmeError, match="out of GPU memory on a single text"):
        embedder.encode(texts[:1])


def test_save_never_deletes_a_folder_of_other_files(tiny_llama, tmp_path):
    from ullme_cli.errors import UllmeError

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("my own file")
    embedder = load(tiny_llama)
    with pytest.raises(UllmeError, match="holds files that ullme did not write \\(notes.txt\\); not replaced"):
        embedder.save(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "my own file"
    embedder.save(tmp_path / "model")
    embedder.save(tmp_path / "model")  # an ullme model folder is replaced by a new save of one
    assert (tmp_path / "model" / "ullme.json").exists()
