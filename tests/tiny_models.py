"""Tiny random decoders of every supported family, built from their configs (about 50k parameters each)."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

VOCAB = 384
COMMON = dict(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, head_dim=8, pad_token_id=0, bos_token_id=1,
    eos_token_id=2, tie_word_embeddings=False,
)  # fmt: skip
# A window of 4 tokens: the switch test uses longer sequences, so a clipping window would be caught.
SLIDING = dict(sliding_window=4, use_sliding_window=True)
EXTRA = {
    "mistral": SLIDING,
    "mixtral": dict(SLIDING, num_local_experts=2, num_experts_per_tok=1),
    "qwen2": dict(SLIDING, max_window_layers=0, layer_types=["sliding_attention", "sliding_attention"]),
    "qwen2_moe": dict(num_experts=2, num_experts_per_tok=1, moe_intermediate_size=16, shared_expert_intermediate_size=16),
    "qwen3": dict(SLIDING, max_window_layers=0, layer_types=["sliding_attention", "full_attention"]),
    "qwen3_moe": dict(num_experts=2, num_experts_per_tok=1, moe_intermediate_size=16),
    "gemma2": dict(SLIDING, layer_types=["sliding_attention", "full_attention"]),
    "gemma3_text": dict(SLIDING, layer_types=["sliding_attention", "full_attention"]),
    "cohere2": dict(SLIDING, layer_types=["sliding_attention", "full_attention"]),
    "ministral": dict(SLIDING, layer_types=["sliding_attention", "full_attention"]),
    "exaone4": dict(SLIDING, layer_types=["sliding_attention", "full_attention"]),
    "smollm3": dict(SLIDING, layer_types=["sliding_attention", "full_attention"]),
    "olmo3": dict(SLIDING, layer_types=["sliding_attention", "full_attention"]),
    "starcoder2": dict(SLIDING),
    "phi3": dict(SLIDING),
}


def tiny_config(model_type: str, **overrides):
    kwargs = {**COMMON, **EXTRA.get(model_type, {}), **overrides}  # overrides win over the family's extras
    return AutoConfig.for_model(model_type, **kwargs)


def tiny_model(model_type: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    config = tiny_config(model_type, **overrides)
    try:
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    except ValueError:  # gemma2 has no SDPA path; ullme's loader falls back to eager the same way
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    return model.eval()


def tiny_tokenizer(texts: list[str]):
    """A byte-level BPE with VOCAB tokens trained on `texts` (well under a second), BOS added like Llama."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(texts, trainer)
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def save_tiny(folder, model_type: str = "llama", texts: list[str] | None = None, seed: int = 0, **overrides):
    """Save a tiny model and tokenizer as a plain model folder, loadable by Embedder.load(folder).
    `overrides` change the config (a larger random model for memory benchmarks)."""
    model = tiny_model(model_type, seed, **overrides)
    model.save_pretrained(folder, safe_serialization=True)
    tiny_tokenizer(texts or ["hello world"]).save_pretrained(folder)
    return folder
