"""An ullme model folder is also a sentence-transformers folder, with the same vectors.

Two routes, chosen per model when the folder is written (docs/guide.md "Outside ullme"):

- **stock** (no code of ours): `config.json` says `is_causal: false` for a bidirectional setup, which
  transformers honours for the families the probe below accepts, and `modules.json` names
  sentence-transformers' own `Transformer`, `Pooling` (with `include_prompt: false`, so instruction tokens
  are not pooled) and `Normalize`, in the legacy layout that sentence-transformers 3-6 and
  text-embeddings-inference read. `SentenceTransformer(folder)` loads it without `trust_remote_code`.
  An adapter-only LoRA folder is stock too when its base's config keeps `is_causal: false`: peft's files at
  its root name the base, and `sentence_bert_config.json` passes `is_causal: false` to the base's config.
  transformers drops that keyword for a config that does not define it (every plain Hub or
  `save_pretrained` base), and the model would then attend causally; such a folder keeps ullme's module.
- **ullme module**: what stock parts cannot express (a latent-attention head, an adapter kept beside a
  full copy of its base weights,
  weighted-mean pooling under an instruction, a tokenizer whose instruction tokens merge with the text's
  first token, a family whose config switch is not honoured) keeps `ullme_st.UllmeSentenceModule`, a
  short import shim of the installed ullme package, and needs `trust_remote_code=True`.

`stock_blocker` says why a setup cannot take the stock route (None: it can). The round-trip tables of
tests/test_stock_folders.py check that the rule is right: every setup it accepts gives ullme's vectors.
"""

from __future__ import annotations

import json
from pathlib import Path

from ullme_cli.constants import KINDS

SHIM_FILE = "ullme_st.py"
SHIM = '''"""sentence-transformers entry point of an ullme model: the code is the installed ullme package's."""
import importlib

try:
    UllmeSentenceModule = importlib.import_module("ullme_cli.models.st_module").UllmeSentenceModule
except ImportError as e:
    raise ImportError("this is an ullme model; it needs the ullme package: pip install ullme") from e
'''
# ullme pooling -> sentence-transformers' legacy Pooling flag
ST_POOLING = {"mean": "pooling_mode_mean_tokens", "cls": "pooling_mode_cls_token", "last-token": "pooling_mode_lasttoken",
              "weighted-mean": "pooling_mode_weightedmean_tokens"}  # fmt: skip
POOLING_FLAGS = ("pooling_mode_cls_token", "pooling_mode_mean_tokens", "pooling_mode_max_tokens", "pooling_mode_mean_sqrt_len_tokens",
                 "pooling_mode_weightedmean_tokens", "pooling_mode_lasttoken")  # fmt: skip
# Texts whose first character a byte-level BPE would merge with a preceding space, and others.
PROBE_TEXTS = ("Who wrote Hamlet?", "hamlet", "3 apples and 4 pears", "Ünïcödé, naïve café", "x")
STOCK, MODULE = "stock", "ullme-module"
# text-embeddings-inference reads its own bidirectional switch for these families, beside transformers'
# `is_causal` (docs/design.md §2 cites the lines). Written only where transformers leaves the key alone:
# gemma's families read it too, with another meaning (a half-window on sliding layers).
TEI_BIDIRECTIONAL_KEY = "use_bidirectional_attention"
TEI_BIDIRECTIONAL_FAMILIES = ("llama", "mistral", "qwen3")


def write_sentence_transformers_files(folder: Path, embedder, adapter_layout: str | None = None) -> tuple[str, str]:
    """The sentence-transformers files beside ullme.json; returns (route, why) for the model card.

    An adapter-only folder has no config.json of its own: sentence-transformers reads the base's config
    (through the adapter config), so the `is_causal: false` it needs goes into `config_kwargs`.
    `adapter_layout`: None for a folder with its own base weights; for an adapter-only folder "stock" or
    "module", as `portable_adapter_config` could write its targets for the body sentence-transformers loads."""
    adapter_only = adapter_layout is not None
    if embedder.matryoshka_dims and not adapter_only:
        add_config_keys(folder, matryoshka_keys(embedder))
    blocker = stock_blocker(embedder, adapter_layout)
    prompts = {"query": embedder.instruction_prefix("query"), "document": embedder.instruction_prefix("passage")}
    config = {"prompts": prompts, "default_prompt_name": None, "similarity_fn_name": "cosine", "model_type": "SentenceTransformer"}
    (folder / "config_sentence_transformers.json").write_text(json.dumps(config, indent=2) + "\n")
    if blocker is not None:
        (folder / SHIM_FILE).write_text(SHIM)
        modules = [{"idx": 0, "name": "0", "path": "", "type": "ullme_st.UllmeSentenceModule"}]
        (folder / "modules.json").write_text(json.dumps(modules, indent=2) + "\n")
        return MODULE, blocker
    setup = embedder.setup
    transformer_config = {"max_seq_length": setup.max_length, "do_lower_case": False}
    if setup.attention == "bidirectional" and adapter_only:
        transformer_config["config_kwargs"] = {"is_causal": False}
    elif setup.attention == "bidirectional":
        add_config_keys(folder, bidirectional_keys(embedder.model.config.model_type))
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]  # fmt: skip
    if setup.normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        (folder / "2_Normalize").mkdir(exist_ok=True)
    (folder / "modules.json").write_text(json.dumps(modules, indent=2) + "\n")
    (folder / "1_Pooling").mkdir(exist_ok=True)
    pooling = {"word_embedding_dimension": embedder.dim, **{flag: flag == ST_POOLING[setup.pooling] for flag in POOLING_FLAGS},
               "include_prompt": False}  # fmt: skip
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling, indent=2) + "\n")
    (folder / "sentence_bert_config.json").write_text(json.dumps(transformer_config, indent=2) + "\n")
    where = "the `config_kwargs` of sentence_bert_config.json" if adapter_only else "config.json"
    how = f"bidirectional through `is_causal: false` in {where}" if setup.attention == "bidirectional" else "causal"
    adapter = ", the LoRA adapter in peft's layout on the base its adapter config names" if adapter_only else ""
    return STOCK, f"stock transformers and sentence-transformers parts express this setup ({how}, {setup.pooling} pooling{adapter})"


def add_config_keys(folder: Path, keys: dict) -> None:
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **keys}, indent=2) + "\n")


def bidirectional_keys(model_type: str | None) -> dict:
    """What engines read to attend bidirectionally: transformers' `is_causal` (vLLM and text-embeddings-inference
    read it for some families too), and text-embeddings-inference's own switch where it reads that instead."""
    return {"is_causal": False, **({TEI_BIDIRECTIONAL_KEY: True} if model_type in TEI_BIDIRECTIONAL_FAMILIES else {})}


def matryoshka_keys(embedder) -> dict:
    """The sizes a Matryoshka run trained, where vLLM looks before it accepts `dimensions` in a request
    (ModelConfig.is_matryoshka / matryoshka_dimensions read the model's config)."""
    return {"matryoshka_dimensions": sorted({d or embedder.dim for d in embedder.matryoshka_dims}), "is_matryoshka": True}


def stock_blocker(embedder, adapter_layout: str | None = None) -> str | None:
    """Why stock parts cannot give this embedder's vectors, or None when they can. An adapter kept at the
    root of an adapter-only folder is peft's own layout, which sentence-transformers loads."""
    setup = embedder.setup
    if setup.pooling not in ST_POOLING:
        return f"sentence-transformers has no Pooling mode for '{setup.pooling}'"
    if embedder.has_adapter and adapter_layout == "module":
        return "the adapter's target names do not map onto the model body that sentence-transformers loads"
    if embedder.has_adapter and adapter_layout is None:
        return "the LoRA adapter is kept unmerged beside the base weights (`ullme export --merge` writes a stock folder)"
    if adapter_layout == "stock" and setup.attention == "bidirectional" and (why := base_config_drops_is_causal(embedder.base_record["model"])):
        return why
    if setup.padding_side != "right":
        return "ullme pads on the left for this setup; sentence-transformers keeps the tokenizer's padding, and positions would shift"
    prefixes = {kind: embedder.instruction_prefix(kind) for kind in KINDS}
    if setup.pooling == "weighted-mean" and any(prefixes.values()):
        return "weighted-mean under an instruction: ullme weighs from the first text token, sentence-transformers from the first token"
    if setup.pooling == "cls" and any(prefixes.values()):
        return "cls under an instruction: ullme takes the first token, sentence-transformers the first token after the instruction"
    tokenizer = embedder.tokenizer
    for kind, prefix in prefixes.items():
        for text in PROBE_TEXTS:
            ours = embedder.tokenize_prefixed([text], prefix)[0]
            theirs = tokenizer(prefix + text, add_special_tokens=True, truncation=True, max_length=setup.max_length)["input_ids"]
            if list(ours.ids) != list(theirs):
                return f"ullme's {kind} tokens differ from the tokenizer's own (ullme appends EOS for last-token pooling where the tokenizer does not)"
        if prefix and setup.pooling in ("mean", "weighted-mean") and (first := merging_start(embedder, prefix)) is not None:
            return (f"the {kind} instruction's last token merges with the first token of a text such as {first!r} under this "
                    "tokenizer, so sentence-transformers (which counts the instruction tokenized alone) would pool other tokens; "
                    "an instruction template that ends in a newline usually does not merge")  # fmt: skip
    if setup.attention == "bidirectional":
        return config_switch_blocker(embedder.model, setup.max_length)
    return None


def merging_start(embedder, prefix: str) -> str | None:
    """A text start whose first token would straddle the end of `prefix` (None: no text's can).

    sentence-transformers leaves out of pooling as many tokens as the prompt has alone; ullme leaves out the
    tokens that end inside the prefix. They differ exactly when a token of `prefix + text` straddles the
    boundary ("Query: " + "the" -> ... ":", " the"). Such a token is a vocabulary entry that begins with the
    end of the prefix, so every entry is tried as a text start: its surface string, that string without
    leading spaces, and whatever follows the part of it that the prefix ends with. The decision so holds for
    every text, not for sample texts only."""
    tokenizer = embedder.tokenizer
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    alone = tokenizer(prefix, add_special_tokens=True)["input_ids"]
    prompt_length = len(alone) - (1 if alone and alone[-1] in special else 0)
    surfaces = tokenizer.batch_decode([[i] for i in range(len(tokenizer)) if i not in special])
    starts = set(PROBE_TEXTS)
    for surface in surfaces:
        starts.update((surface, surface.lstrip()))
        starts.update(surface[k:] for k in range(1, min(len(surface), len(prefix)) + 1) if surface[:k] == prefix[-k:])
    starts = sorted(s for s in starts if s and "\ufffd" not in s)
    for begin in range(0, len(starts), 4096):
        chunk = starts[begin : begin + 4096]
        for text, tokens in zip(chunk, embedder.tokenize_prefixed(chunk, prefix)):
            if tokens.instruction_tokens != prompt_length:
                return text
    return None


def base_config_drops_is_causal(base: str) -> str | None:
    """Why sentence-transformers would load an adapter-only folder's base causally (None: it would not).

    It reads the base's config as `AutoConfig.from_pretrained(base, is_causal=False)`, and transformers sets
    a keyword only where the config already defines it, so the same call is asked here."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(base, is_causal=False, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - a base transformers cannot read here cannot be checked
        return f"transformers could not read the base's config ({base}) to check that it keeps `is_causal: false` ({type(e).__name__})"
    if getattr(config, "is_causal", True) is not False:
        return ("the base's config.json does not define `is_causal`, so transformers drops the `is_causal: false` that "
                "sentence-transformers passes for an adapter-only folder and the model would attend causally; "
                "`ullme export --merge` writes a folder that stock sentence-transformers loads")  # fmt: skip
    return None


def config_switch_blocker(model, max_length: int) -> str | None:
    """Does stock transformers, told `is_causal: false`, attend as ullme's bidirectional switch does?

    A two-layer random clone of this family (the real dimensions, so every code path is the real one)
    runs one sequence both ways: ullme's switch, and the plain forward with the config flag. The sequence
    is longer than a sliding window where the model has one (and no longer than max_length, all that
    sentence-transformers will feed it), so a window that still clips is caught. They must agree to 1e-5."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from ullme_cli.models.bidirectional import decoder_of, hidden_states

    config = decoder_of(model).config.to_dict()
    model_type = config.get("model_type", "?")
    small = {**config, "num_hidden_layers": 2}
    if isinstance(small.get("layer_types"), list):
        small["layer_types"] = small["layer_types"][:2]
    for key in ("architectures", "_name_or_path", "torch_dtype", "dtype", "quantization_config", "is_causal"):
        small.pop(key, None)
    window = small.get("sliding_window") or 0
    length = max(2, min(max_length, window + 8 if window else 16, small.get("max_position_embeddings") or 16))
    try:
        torch.manual_seed(0)
        cfg = AutoConfig.for_model(**small)
        try:
            clone = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
        except ValueError:  # families without SDPA (ullme's loader falls back the same way)
            clone = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
        ids = torch.randint(3, max(4, small.get("vocab_size", 4)), (1, length))
        mask = torch.ones_like(ids)
        with torch.no_grad():
            ours = hidden_states(clone, ids, mask, "bidirectional", route="mask").float()
            for c in {id(c): c for c in (clone.config, decoder_of(clone).config)}.values():
                c.is_causal = False
            theirs = decoder_of(clone)(input_ids=ids, attention_mask=mask).last_hidden_state.float()
    except Exception as e:  # noqa: BLE001 - a family transformers cannot build or run this way keeps ullme's module
        return f"transformers could not run a '{model_type}' model from its config to test `is_causal: false` ({type(e).__name__})"
    if not torch.allclose(ours, theirs, atol=1e-5, rtol=1e-4):
        gap = (ours - theirs).abs().max().item()
        return (f"transformers with `is_causal: false` does not attend as ullme's bidirectional switch on '{model_type}' "
                f"({length} tokens{f', sliding window {window}' if window else ''}: states differ by {gap:.2g})")  # fmt: skip
    return None
