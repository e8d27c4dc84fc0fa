"""`ullme export --format gguf`: the model as one GGUF file for llama.cpp, with ullme's attention and pooling.

llama.cpp's own converter writes no pooling type for llama-family models (llama.cpp then pools its own
default way) and attends causally unless the config says otherwise: an ullme model converted there gives
other vectors in silence. This writer uses the `gguf` package (llama.cpp's gguf-py: its writer, its tensor
name map, its quantizers) and writes what ullme's vectors need:

- the weights, the adapter merged: `f16` (default), `f32` or `q8_0` for the matrices, norms and biases in f32;
- llama.cpp's architecture for the family: `llama` (llama, mistral; q and k rows permuted to llama.cpp's
  rotary layout), `qwen2`, `qwen3`, `gemma`, `gemma2` (norm weights + 1; gemma2's softcaps and window);
- the tokenizer (byte-level BPE: tokens, types, merges, special ids, whether BOS/EOS are added), with the
  pre-tokenizer llama.cpp must use: the first of PRE_TOKENIZERS under which llama.cpp tokenizes probe
  texts as the model's own tokenizer does (checked where llama-cpp-python is installed);
- `{arch}.attention.causal` (false for bidirectional) and `{arch}.pooling_type` from ullme's pooling;
- `ullme.query_instruction`, `ullme.passage_instruction` and the setup record, also in the description.

Refused, with the reason: a pooling llama.cpp lacks (weighted-mean, latent attention); mean pooling under an
instruction (llama.cpp pools every token, the instruction's too, where ullme leaves them out); vectors that
are not normalised (llama-cpp-python and llama-server normalise); a family outside ARCHITECTURES; a
tokenizer that is not a byte-level BPE.

The export checks itself with the real runtime where llama-cpp-python is installed (`ullme[gguf]`):
llama.cpp's embeddings of probe queries and documents against the torch model's, cosine >= 0.999 for f16
and f32 on every probe, >= 0.99 on average for q8_0 (FLOORS); otherwise the file is not written. Without llama-cpp-python the file is written
unchecked, and the log says so.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from ullme_cli.constants import GGUF_QUANTS as QUANTS, KINDS
from ullme_cli.errors import UllmeError
from ullme_cli.io.outputs import atomic_path, guarded
from ullme_cli.model_setup import Runtime, resolve_setup
from ullme_cli.models.embedder import Embedder, load_embedder
from ullme_cli.models.export_check import PROBES, agreement, require_floor
from ullme_cli.models.loading import model_inputs

log = logging.getLogger(__name__)

# The check's floor per weight type, on the min (f32, f16) or the mean (q8_0) cosine over the probes: llama.cpp
# quantizes the activations too for q8_0 matrices, and a text with outlier activations falls further (smollm2-135m:
# mean 0.998, min 0.933 over 48 demo texts).
FLOORS = {"f32": ("min", 0.999), "f16": ("min", 0.999), "q8_0": ("mean", 0.99)}
# ullme family -> (llama.cpp architecture, q/k rows permuted to llama.cpp's rotary layout)
ARCHITECTURES = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False), "qwen3": ("qwen3", False),
                 "gemma": ("gemma", False), "gemma2": ("gemma2", False)}  # fmt: skip
# Gemma's RMSNorm scales by (1 + w); llama.cpp's by w, so the file holds w + 1.
NORM_OFFSET_FAMILIES = ("gemma", "gemma2")
POOLINGS = {"mean": "MEAN", "cls": "CLS", "last-token": "LAST"}
PRE_TOKENIZERS = ("gpt-2", "smollm", "qwen2", "llama-bpe", "default")


def gguf_blocker(embedder: Embedder) -> str | None:
    """Why llama.cpp cannot give this embedder's vectors from a GGUF file (None: it can)."""
    setup = embedder.setup
    model_type = embedder.model.config.model_type
    if model_type not in ARCHITECTURES:
        return f"ullme writes GGUF for {', '.join(ARCHITECTURES)} models; this one is '{model_type}'"
    if setup.pooling not in POOLINGS:
        return f"llama.cpp has no pooling for '{setup.pooling}' (it has {', '.join(POOLINGS)})"
    if setup.pooling == "mean" and any(embedder.instruction_prefix(kind) for kind in KINDS):
        return "mean pooling under an instruction: llama.cpp pools every token, the instruction's too, where ullme leaves them out"
    if setup.pooling == "cls" and any(embedder.instruction_prefix(kind) for kind in KINDS):
        return "cls pooling under an instruction: llama.cpp takes the first token, which is the instruction's"
    if not setup.normalize:
        return "llama.cpp's embedding routes normalise the vectors, and this setup does not"
    if embedder.tokenizer.backend_tokenizer.model.__class__.__name__ != "BPE" or "ByteLevel" not in json.dumps(json.loads(embedder.tokenizer.backend_tokenizer.to_str()).get("pre_tokenizer")):
        return "ullme writes GGUF tokenizers for byte-level BPE only (GPT-2, Llama 3, Qwen, SmolLM style)"
    return None


def export_gguf(source: str, output: str, quant: str = "f16", overwrite: bool = False) -> dict:
    """Write `output` (a .gguf file); returns what the check measured."""
    if quant not in QUANTS:
        raise UllmeError(f"--quant must be one of {', '.join(QUANTS)}, got '{quant}'")
    with guarded([output], model_inputs(source), overwrite):
        embedder = load_embedder(resolve_setup(source), Runtime(dtype="float32", device="cpu", compile=False))
        if embedder.has_adapter:  # a GGUF file holds plain weights
            embedder.model = embedder.model.merge_and_unload()
        if why := gguf_blocker(embedder):
            raise UllmeError(f"{source}: cannot be written as GGUF: {why}")
        references = {kind: embedder.encode(list(PROBES), kind=kind) for kind in KINDS}
        runtime = _llama_cpp()
        with atomic_path(output) as staging:
            for pre in PRE_TOKENIZERS if runtime else PRE_TOKENIZERS[:1]:
                write_gguf(embedder, Path(staging), quant, pre)
                if runtime is None:
                    log.warning(f"{output}: written without the llama.cpp check (pip install 'ullme[gguf]' to run it)")
                    return {"checked": False}
                check = _check(runtime, Path(staging), embedder, references, quant)
                if check["tokens_match"]:
                    break
            else:
                raise UllmeError(f"{source}: llama.cpp tokenizes this model's texts differently under every pre-tokenizer it knows "
                                 f"({', '.join(PRE_TOKENIZERS)}); not written")  # fmt: skip
            require_floor(check, *FLOORS[quant], f"{source}: llama.cpp's vectors ({quant})")
    return check


def write_gguf(embedder: Embedder, path: Path, quant: str, pre: str) -> None:
    import gguf

    model, setup = embedder.model, embedder.setup
    config = model.config
    arch_name, permute = ARCHITECTURES[config.model_type]
    arch = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == arch_name)
    writer = gguf.GGUFWriter(str(path), arch_name)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_name(Path(embedder.source or setup.model).name)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[quant])
    if config.model_type == "gemma2":
        writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
        writer.add_final_logit_softcapping(config.final_logit_softcapping)
        writer.add_sliding_window(config.sliding_window)
    writer.add_causal_attention(setup.attention == "causal")
    writer.add_pooling_type(getattr(gguf.PoolingType, POOLINGS[setup.pooling]))
    instructions = {kind: embedder.instruction_prefix(kind) for kind in KINDS}
    writer.add_string("ullme.query_instruction", instructions["query"])
    writer.add_string("ullme.passage_instruction", instructions["passage"])
    writer.add_string("ullme.setup", json.dumps({k: v for k, v in setup.record().items() if k not in ("model", "fingerprint")}, sort_keys=True))
    writer.add_description(f"ullme embedding model: {setup.attention} attention, {setup.pooling} pooling; prefix queries with "
                           f"{instructions['query']!r} and documents with {instructions['passage']!r}")  # fmt: skip
    _write_tokenizer(writer, embedder, pre)
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and getattr(config, "tie_word_embeddings", False):
            continue
        data = tensor.detach().float()
        if permute and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config.num_attention_heads if "q_proj" in name else config.num_key_value_heads
            data = data.reshape(heads, 2, data.shape[0] // heads // 2, *data.shape[1:]).swapaxes(1, 2).reshape(data.shape)
        if config.model_type in NORM_OFFSET_FAMILIES and name.endswith("norm.weight"):
            data = data + 1
        mapped = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if mapped is None and name == "lm_head.weight":  # gemma's llama.cpp graph ties the output to the embeddings; vectors never read it
            continue
        if mapped is None:
            raise UllmeError(f"no GGUF name for the tensor {name} of this '{config.model_type}' model")
        array = data.numpy()
        if array.ndim == 1 or quant == "f32":
            writer.add_tensor(mapped, array.astype(np.float32))
        elif quant == "q8_0" and array.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
            quantized = gguf.quants.quantize(array.astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(mapped, quantized, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(mapped, array.astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _write_tokenizer(writer, embedder: Embedder, pre: str) -> None:
    """The byte-level BPE as llama.cpp's `gpt2` tokenizer model: every id's token (padded to the model's
    vocabulary), its type, the merges, the special ids, and whether BOS and EOS are added."""
    import gguf

    tokenizer = embedder.tokenizer
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    vocabulary = {**state["model"]["vocab"], **{t["content"]: t["id"] for t in state.get("added_tokens", [])}}
    by_id = {i: token for token, i in vocabulary.items()}
    special = set(tokenizer.all_special_ids)
    # The model's embedding rows bound the vocabulary: a tokenizer may name a special token past them
    # (Qwen2's tokenizer class adds <|endoftext|> to a smaller vocabulary), which no text can use.
    size = embedder.model.config.vocab_size
    tokens, types = [], []
    for i in range(size):
        if i in by_id:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    merges = state["model"].get("merges", [])
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    for role in ("bos", "eos", "pad", "unk"):
        if (token_id := getattr(tokenizer, f"{role}_token_id", None)) is not None and token_id < size:
            getattr(writer, f"add_{role}_token_id")(token_id)
    probe = tokenizer("x", add_special_tokens=True)["input_ids"]
    plain = tokenizer("x", add_special_tokens=False)["input_ids"]
    writer.add_add_bos_token(len(probe) > len(plain) and probe[0] == tokenizer.bos_token_id)
    # ullme ends every text with EOS for last-token pooling (embedder.tokenize_prefixed); so must llama.cpp.
    writer.add_add_eos_token(embedder.setup.pooling == "last-token" or (len(probe) > len(plain) and probe[-1] == tokenizer.eos_token_id))


def _llama_cpp():
    """llama-cpp-python, silenced, or None where it is not installed."""
    if _llama_cpp_module is None:
        return None
    # llama.cpp logs every load to stderr from C; the export says what it measured in one line instead.
    _llama_cpp_module.llama_log_set(_QUIET, None)
    return _llama_cpp_module


def _quiet_log(level, text, user_data) -> None:
    pass


try:
    import llama_cpp as _llama_cpp_module

    _QUIET = _llama_cpp_module.llama_log_callback(_quiet_log)  # kept alive for the C side
except ImportError:
    _llama_cpp_module = _QUIET = None


def open_in_llama_cpp(path, n_ctx: int, llama_cpp=None):
    """llama.cpp's embedding model of the GGUF file `path` (pooling and attention as the file says), one
    sequence of up to `n_ctx` tokens per batch, as a bidirectional model needs. Without llama.cpp's extra
    buffer types (its weight repacking): on an Intel Xeon with AMX, the AMX repacking of q8_0 weights crashed
    the embedding pass (a segfault in decode, llama-cpp-python 0.3.36); llama-server's `--no-repack` is the
    same switch, and the vectors do not depend on it."""
    llama_cpp = llama_cpp or _llama_cpp()
    inner, default = llama_cpp.llama_cpp, llama_cpp.llama_cpp.llama_model_default_params

    def without_repacking():
        params = default()
        params.use_extra_bufts = False
        return params

    inner.llama_model_default_params = without_repacking
    try:
        return llama_cpp.Llama(str(path), embedding=True, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, verbose=False, n_threads=torch.get_num_threads())
    finally:
        inner.llama_model_default_params = default


def _check(llama_cpp, path: Path, embedder: Embedder, references: dict, quant: str) -> dict:
    """llama.cpp's tokens and vectors of the probes (each text with its instruction) against ullme's."""
    length = min(embedder.setup.max_length, embedder.model.config.max_position_embeddings)
    llm = open_in_llama_cpp(path, length, llama_cpp)
    try:
        tokens_match, theirs = True, []
        for kind in KINDS:
            prefix = embedder.instruction_prefix(kind)
            for text, item in zip(PROBES, embedder.tokenize(list(PROBES), kind)):
                tokens_match &= list(llm.tokenize((prefix + text).encode(), add_bos=True, special=False)) == list(item.ids)
            theirs.append(np.asarray(llm.embed([prefix + text for text in PROBES], normalize=True), dtype=np.float32))
    finally:
        llm.close()
    ours = np.concatenate([references[kind] for kind in KINDS])
    return {"checked": True, "tokens_match": bool(tokens_match), **agreement(ours, np.concatenate(theirs)), "quant": quant}
