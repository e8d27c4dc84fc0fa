"""Every dtype name ullme knows, declared once: what a model computes in, what training keeps weights in, what
a recipe's autocast is called, what an embeddings file stores, and the bytes an element takes. The compute,
training and storage names are torch's and numpy's (`bfloat16`, never `bf16`); the one exception is
`train.mixed_precision`, whose recipe values (`bf16`, `fp16`) are accelerate's and map here to compute names."""

from __future__ import annotations

COMPUTE_DTYPES = ("float32", "bfloat16", "float16")  # what a forward pass runs in
COMPUTE_CHOICES = ("auto", *COMPUTE_DTYPES)  # --dtype; auto: bf16 where the CPU or GPU runs it fast
TRAINING_DTYPES = ("float32", "bfloat16")  # model.dtype and train.fsdp_param_dtype: the weights a recipe trains
AUTOCAST = {"no": None, "bf16": "bfloat16", "fp16": "float16"}  # train.mixed_precision -> the autocast's compute dtype
OUT_DTYPES = ("float32", "float16", "int8", "binary")  # --out-dtype: what an embeddings file stores
BYTES_PER_ELEMENT = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1}
