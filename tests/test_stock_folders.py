"""An ullme model is a plain Hugging Face folder where stock parts can express its setup (docs/design.md §2).

`SentenceTransformer(folder)` without `trust_remote_code` must give ullme's vectors (cosine >= 0.9999) for
queries and documents, padded or alone; where stock parts cannot, the folder keeps ullme's module and says
why. The route is decided per model at save time by `st_export.stock_blocker`; these tables check the rule.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import demo_texts
from ullme_cli.models.bidirectional import TESTED_MODEL_TYPES as FAMILIES
from tiny_models import EXTRA, tiny_model, tiny_tokenizer

from ullme_cli.model_setup import ModelSetup
from ullme_cli.models.embedder import Embedder

# A template whose last character is a newline: byte-level BPE keeps "\n" apart from the next word, so the
# instruction is the same tokens alone and before a text, as sentence-transformers counts it.
TEMPLATE = "Instruct: {instruction}\nQuery:\n"
INSTRUCTION = "Given a question, retrieve passages that answer it"
TEXTS = demo_texts(12)


def build(folder, family="llama", pooling="mean", query_instruction=INSTRUCTION, template=TEMPLATE, eos=False, lora=None, dtype=torch.float32,
          tokenizer_texts=None, **config):
    """An Embedder over a tiny random model of `family`, saved as an ullme folder; returns (embedder, folder).
    Sliding windows are widened past the longest sequence ullme feeds (as Mistral-7B's 4096 against a
    max_length of 512), unless `config` sets one. The tokenizer is trained on `tokenizer_texts` (default:
    the demo texts)."""
    if "sliding_window" in EXTRA.get(family, {}) and "sliding_window" not in config:
        config["sliding_window"] = 1024
    model = tiny_model(family, **config).to(dtype)
    tokenizer = tiny_tokenizer(tokenizer_texts or demo_texts())
    if eos:  # a tokenizer that ends every text with EOS itself (as e5-mistral's and Qwen's do)
        from tokenizers import processors

        tokenizer._tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 2)])
    setup = ModelSetup(model=str(folder), pooling=pooling, query_instruction=query_instruction, instruction_template=template)
    embedder = Embedder(model, tokenizer, setup, torch.device("cpu"))
    if lora:
        embedder.add_lora(r=4, alpha=8, dropout=0.0)
        with torch.no_grad():
            for name, p in embedder.model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.2)
    embedder.model.eval()
    embedder.save(folder, merge_lora=lora == "merged")
    return Embedder.load(str(folder), dtype=str(dtype).replace("torch.", ""), device="cpu"), folder


def stock_load(folder, dtype=torch.float32):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(folder), device="cpu", model_kwargs={"dtype": dtype})  # no trust_remote_code


def route(folder) -> str:
    modules = json.loads((folder / "modules.json").read_text())
    return "stock" if modules[0]["type"] == "sentence_transformers.models.Transformer" else "ullme-module"


def assert_same_vectors(embedder, st, floor=0.9999, padded_check=True):
    for kind, prompt in (("query", "query"), ("passage", "document")):
        ours = embedder.encode(TEXTS, kind=kind)
        batched = st.encode(TEXTS, prompt_name=prompt, batch_size=len(TEXTS), convert_to_numpy=True).astype(np.float32)
        cosine = lambda a, b: (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)  # noqa: E731
        assert cosine(ours, batched).min() >= floor, (kind, cosine(ours, batched).min())
        if padded_check:
            alone = np.stack([st.encode([t], prompt_name=prompt, convert_to_numpy=True)[0] for t in TEXTS[:4]]).astype(np.float32)
            assert cosine(batched[:4], alone).min() >= floor, (kind, "padded batch against each text alone")


# Checked on transformers 5.24 (docs/design.md §2): these switch by config; stablelm ignores the flag.
CONFIG_SWITCHED = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo2", "granite", "starcoder2", "cohere"}


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_the_probe_marks_stock_loads_without_trust_remote_code(family, tmp_path):
    embedder, folder = build(tmp_path / "m", family)
    card = (folder / "README.md").read_text()
    if family in CONFIG_SWITCHED:
        assert route(folder) == "stock", card
    if family == "stablelm":
        assert route(folder) == "ullme-module" and "does not attend as ullme's bidirectional switch on 'stablelm'" in card
    if route(folder) == "ullme-module":  # the probe said why; the card says it too
        assert "It keeps ullme's module because" in card
        pytest.skip(f"{family}: {card.split('It keeps ullme' + chr(39) + 's module because')[1].split(chr(10))[0]}")
    assert json.loads((folder / "config.json").read_text())["is_causal"] is False
    assert 'SentenceTransformer("THIS_FOLDER_OR_ID")' in card and "trust_remote_code=True" not in card
    assert_same_vectors(embedder, stock_load(folder), padded_check=family == "llama")


def test_a_sliding_window_shorter_than_the_texts_keeps_ullmes_module(tmp_path):
    """transformers' bidirectional mask still clips at a sliding window; ullme's switch does not."""
    embedder, folder = build(tmp_path / "m", "mistral", sliding_window=4)
    assert route(folder) == "ullme-module"
    assert "sliding window 4" in (folder / "README.md").read_text()


@pytest.mark.parametrize("pooling, eos, instruction", [
    ("mean", False, INSTRUCTION), ("cls", False, ""), ("last-token", True, INSTRUCTION), ("weighted-mean", False, ""),
])  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("lora", [None, "merged"])
def test_poolings_dtypes_and_merged_adapters_round_trip(tmp_path, pooling, eos, instruction, dtype, lora):
    embedder, folder = build(tmp_path / "m", pooling=pooling, eos=eos, query_instruction=instruction, lora=lora, dtype=dtype)
    assert route(folder) == "stock", (folder / "README.md").read_text()
    st = stock_load(folder, dtype)
    assert next(st.parameters()).dtype == dtype
    assert_same_vectors(embedder, st)


@pytest.mark.parametrize("case, kwargs, reason", [
    ("latent-head", dict(pooling="latent-attention"), "no Pooling mode for 'latent-attention'"),
    ("unmerged-adapter", dict(lora="unmerged"), "the LoRA adapter is kept unmerged"),
    ("weighted-mean-instruction", dict(pooling="weighted-mean"), "weighted-mean under an instruction"),
    ("cls-instruction", dict(pooling="cls"), "cls under an instruction"),
    ("last-token-without-eos", dict(pooling="last-token"), "ullme appends EOS"),
    ("instruction-merges-with-text", dict(template="Instruct: {instruction}\nQuery: "), "instruction's last token merges with the first token of a text such as"),
])  # fmt: skip
def test_what_stock_parts_cannot_express_keeps_ullmes_module_and_says_why(tmp_path, case, kwargs, reason):
    from sentence_transformers import SentenceTransformer

    embedder, folder = build(tmp_path / "m", **kwargs)
    assert route(folder) == "ullme-module"
    assert reason in (folder / "README.md").read_text()
    assert "is_causal" not in json.loads((folder / "config.json").read_text())
    assert_same_vectors(embedder, SentenceTransformer(str(folder), device="cpu", trust_remote_code=True, model_kwargs={"dtype": torch.float32}))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_both_routes_honour_an_explicit_dtype(tmp_path, dtype):
    """Seen: the trust_remote_code route ran bf16 on a bf16 CPU although model_kwargs asked for float32."""
    from sentence_transformers import SentenceTransformer

    _, stock = build(tmp_path / "stock")
    _, module = build(tmp_path / "module", pooling="latent-attention")
    assert next(stock_load(stock, dtype).parameters()).dtype == dtype
    ours = SentenceTransformer(str(module), device="cpu", trust_remote_code=True, model_kwargs={"dtype": dtype})
    assert next(ours.parameters()).dtype == dtype
    assert next(Embedder.load(str(module), dtype=str(dtype).replace("torch.", ""), device="cpu").model.parameters()).dtype == dtype


def test_ullme_keeps_causal_generation_on_a_stock_folder(tmp_path):
    """The config says `is_causal: false` for other tools; inside ullme, GRL still scores causally."""
    from ullme_cli.models.bidirectional import hidden_states

    original, folder = build(tmp_path / "m")
    assert json.loads((folder / "config.json").read_text())["is_causal"] is False
    ids = torch.tensor([[1, 5, 6, 7]])
    other = ids.clone()
    other[0, -1] = 9
    mask = torch.ones_like(ids)
    first = [hidden_states(original.model, x, mask, "causal")[0, 0] for x in (ids, other)]
    assert torch.allclose(*first), "causal mode saw the future after loading a stock folder"
    both = [hidden_states(original.model, x, mask, "bidirectional")[0, 0] for x in (ids, other)]
    assert not torch.allclose(*both)


# ---------------------------------------------------------------- a LoRA run references its base (part 4)
def test_a_lora_folder_references_its_base_and_refuses_a_changed_one(tmp_path):
    from conftest import run_cli
    from safetensors.torch import load_file, save_file

    from ullme_cli.errors import UllmeError

    _, base = build(tmp_path / "base", query_instruction="")
    trained = Embedder.load(str(base), dtype="float32", device="cpu").add_lora(r=4, alpha=8, dropout=0.0)
    with torch.no_grad():
        for name, p in trained.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    trained.save(tmp_path / "adapter-only", reference_base=True)
    trained.save(tmp_path / "copy")
    small, copy = tmp_path / "adapter-only", tmp_path / "copy"
    size = lambda folder: sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())  # noqa: E731
    assert [p.name for p in small.glob("*.safetensors")] == ["adapter_model.safetensors"] and not (small / "adapter").exists()
    assert size(small) < size(copy) / 3, (size(small), size(copy))
    record = json.loads((small / "ullme.json").read_text())["base"]
    assert record["model"] == str(base.resolve()) and len(record["fingerprint"]) == 64

    loaded, full = Embedder.load(str(small), dtype="float32", device="cpu"), Embedder.load(str(copy), dtype="float32", device="cpu")
    np.testing.assert_allclose(loaded.encode(TEXTS), full.encode(TEXTS), atol=1e-6)
    assert loaded.setup.fingerprint != Embedder.load(str(base), dtype="float32", device="cpu").setup.fingerprint
    # peft's own layout at the root: sentence-transformers loads base + adapter with no code of ours
    assert route(small) == "stock" and json.loads((small / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base.resolve())
    assert_same_vectors(loaded, stock_load(small))
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"id": str(i), "text": t}) + "\n" for i, t in enumerate(TEXTS)))
    encoded = run_cli("encode", tmp_path / "c.jsonl", "-o", tmp_path / "e.npy", "-m", small, "-q", "--dtype", "float32")
    assert encoded.returncode == 0, encoded.stderr.decode()
    assert run_cli("export", small, "-o", tmp_path / "exported").returncode == 0  # self-contained again
    assert run_cli("export", small, "-o", tmp_path / "merged", "--merge").returncode == 0
    assert "base" not in json.loads((tmp_path / "exported" / "ullme.json").read_text()) and (tmp_path / "exported" / "model.safetensors").exists()
    assert route(tmp_path / "merged") == "stock"

    weights = load_file(base / "model.safetensors")  # the base's files change under the same path
    save_file({k: v + 0.01 for k, v in weights.items()}, base / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UllmeError, match=rf"its adapter was trained on {base.resolve()} with weights fingerprint {record['fingerprint'][:12]}, but those files now have fingerprint"):
        Embedder.load(str(small), dtype="float32", device="cpu")
    refused = run_cli("encode", tmp_path / "c.jsonl", "-o", tmp_path / "e2.npy", "-m", small, "-q")
    assert refused.returncode == 2 and b"now have fingerprint" in refused.stderr
    assert Embedder.load(str(tmp_path / "exported"), dtype="float32", device="cpu").encode(TEXTS).shape == (len(TEXTS), 32)


def loads_right_or_refuses(folder, embedder, texts=TEXTS):
    """The rule for every folder ullme writes: stock sentence-transformers (no trust_remote_code) either gives
    ullme's vectors or refuses to load; it never loads and gives others. Returns whether it loaded."""
    from sentence_transformers import SentenceTransformer

    try:
        st = stock_load(folder)
    except ValueError as e:
        assert "trust_remote_code=True" in str(e), e
        card = (folder / "README.md").read_text()
        assert "It keeps ullme's module because" in card and "trust_remote_code=True" in card
        st = SentenceTransformer(str(folder), device="cpu", trust_remote_code=True, model_kwargs={"dtype": torch.float32})
        loaded = False
    else:
        loaded = True
    cosine = lambda a, b: (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)  # noqa: E731
    for kind, prompt in (("query", "query"), ("passage", "document")):
        ours, theirs = embedder.encode(texts, kind=kind), st.encode(texts, prompt_name=prompt, batch_size=64, convert_to_numpy=True)
        worst = int(np.argmin(cosine(ours, theirs)))
        assert cosine(ours, theirs)[worst] >= 0.9999, (kind, texts[worst], cosine(ours, theirs)[worst], "stock" if loaded else "module")
    return loaded


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2"])
def test_an_adapter_only_folder_over_a_plain_base_never_loads_causally_in_stock_sentence_transformers(family, tmp_path):
    """A base saved by plain transformers (as every Hub model) has no `is_causal` in its config, and
    transformers drops the `is_causal: false` that sentence-transformers passes for it: that folder loaded
    stock and attended causally (cosine 0.07-0.89). It now keeps ullme's module, whose card points to
    `export --merge`, and the merged export is stock with ullme's vectors."""
    from conftest import run_cli
    from tiny_models import save_tiny

    window = {"sliding_window": 1024} if "sliding_window" in EXTRA.get(family, {}) else {}
    base = save_tiny(tmp_path / "base", family, demo_texts(), **window)
    assert "is_causal" not in json.loads((base / "config.json").read_text())
    trained = Embedder.load(str(base), dtype="float32", device="cpu", query_instruction=INSTRUCTION, instruction_template=TEMPLATE)
    assert trained.setup.attention == "bidirectional"
    trained.add_lora(r=4, alpha=8, dropout=0.0)
    with torch.no_grad():
        for name, p in trained.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    folder = trained.save(tmp_path / "adapter-only", reference_base=True)
    assert [p.name for p in folder.glob("*.safetensors")] == ["adapter_model.safetensors"]
    loaded = Embedder.load(str(folder), dtype="float32", device="cpu")
    assert not loads_right_or_refuses(folder, loaded)
    assert "`ullme export --merge` writes a folder that stock sentence-transformers loads" in (folder / "README.md").read_text()
    merged = tmp_path / "merged"
    assert run_cli("export", folder, "-o", merged, "--merge").returncode == 0
    assert route(merged) == "stock" and loads_right_or_refuses(merged, loaded)


def test_an_instruction_that_merges_with_some_first_word_is_found_whatever_the_sample_texts(tmp_path):
    """Under this tokenizer " the" is one token but no probe text's first word merges with the space that
    ends "Query: ": the probe of sample texts passed, and stock sentence-transformers pooled other tokens for
    queries starting "the" (cosine 0.9987 on a real model). The decision now tries every vocabulary entry,
    and the rule holds over many first words."""
    corpus = ["the cat sat on the mat and the dog ate the food of the day"] * 40 + ["Instruct: Given a question, retrieve passages that answer it\nQuery: "] * 5
    embedder, folder = build(tmp_path / "m", template="Instruct: {instruction}\nQuery: ", tokenizer_texts=corpus)
    tokenizer = embedder.tokenizer
    assert len(tokenizer("Query: the")["input_ids"]) == len(tokenizer("Query: ")["input_ids"])  # " the" straddles the end
    words = sorted({w for w in tokenizer.batch_decode([[i] for i in range(len(tokenizer))]) if w.strip() and "\ufffd" not in w})
    texts = [f"{w.strip()} sat on the mat" for w in words] + TEXTS
    assert len(texts) > 100
    assert not loads_right_or_refuses(folder, embedder, texts)
    assert "merges with the first token of a text such as" in (folder / "README.md").read_text()
    _, newline = build(tmp_path / "newline", tokenizer_texts=corpus)  # a template ending in a newline merges with nothing here
    assert loads_right_or_refuses(newline, Embedder.load(str(newline), dtype="float32", device="cpu"), texts)


def test_an_adapter_whose_targets_do_not_map_onto_the_body_keeps_ullmes_module(tmp_path):
    """One layer's q_proj only: its last name part would also select the other layer's, so the stock route
    could put the adapter on modules it was not trained on; the folder keeps ullme's module instead."""
    from sentence_transformers import SentenceTransformer

    _, base = build(tmp_path / "base", query_instruction="")
    trained = Embedder.load(str(base), dtype="float32", device="cpu").add_lora(r=2, alpha=4, dropout=0.0, target_modules=["model.layers.0.self_attn.q_proj"])
    with torch.no_grad():
        for name, p in trained.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    folder = trained.save(tmp_path / "one-layer", reference_base=True)
    assert json.loads((folder / "adapter_config.json").read_text())["target_modules"] == ["model.layers.0.self_attn.q_proj"]
    assert route(folder) == "ullme-module" and "do not map onto the model body" in (folder / "README.md").read_text()
    loaded = Embedder.load(str(folder), dtype="float32", device="cpu")
    np.testing.assert_allclose(loaded.encode(TEXTS[:4]), trained.encode(TEXTS[:4]), atol=1e-6)
    assert_same_vectors(loaded, SentenceTransformer(str(folder), device="cpu", trust_remote_code=True, model_kwargs={"dtype": torch.float32}), padded_check=False)


# ---------------------------------------------------------------- the keys other engines read
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen3", "qwen2", "gemma3_text"])
def test_a_stock_folder_carries_the_bidirectional_key_each_engine_reads(family, tmp_path):
    """transformers (and vLLM, text-embeddings-inference for qwen2) read `is_causal`; text-embeddings-inference
    reads `use_bidirectional_attention` for llama, mistral and qwen3 (docs/design.md §2). That key is written
    only where transformers' own config for the family does not define it, so it changes nothing there;
    gemma3's transformers and TEI read it as a half-window on sliding layers, which is not ullme's attention."""
    from transformers import AutoConfig

    from ullme_cli.models.st_export import TEI_BIDIRECTIONAL_FAMILIES, TEI_BIDIRECTIONAL_KEY

    embedder, folder = build(tmp_path / "m", family)
    config = json.loads((folder / "config.json").read_text())
    assert route(folder) == "stock" and config["is_causal"] is False
    if family in TEI_BIDIRECTIONAL_FAMILIES:
        assert config[TEI_BIDIRECTIONAL_KEY] is True and TEI_BIDIRECTIONAL_KEY not in AutoConfig.for_model(family).to_dict()
    else:
        assert not config.get(TEI_BIDIRECTIONAL_KEY)  # gemma3's config defines it (False), and ullme leaves it so
    assert_same_vectors(embedder, stock_load(folder), padded_check=False)  # the key changed nothing in transformers


def test_a_matryoshka_run_writes_its_sizes_where_vllm_reads_them(tmp_path):
    """vLLM refuses a request's `dimensions` unless the config has `matryoshka_dimensions` or `is_matryoshka`."""
    from transformers import AutoConfig

    model = tiny_model("llama")
    setup = ModelSetup(model="x", pooling="mean", query_instruction=INSTRUCTION, instruction_template=TEMPLATE)
    embedder = Embedder(model, tiny_tokenizer(demo_texts()), setup, torch.device("cpu"))
    embedder.matryoshka_dims = [16, 8, None]
    folder = embedder.save(tmp_path / "m")
    config = AutoConfig.from_pretrained(folder)
    assert config.matryoshka_dimensions == [8, 16, 32] and config.is_matryoshka is True
    assert Embedder.load(str(folder), dtype="float32", device="cpu").matryoshka_dims == [16, 8, None]
    _, plain = build(tmp_path / "plain")
    assert "matryoshka_dimensions" not in json.loads((plain / "config.json").read_text())
