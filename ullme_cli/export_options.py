"""What one `ullme export` writes (models/st_export.py, onnx_export.py and gguf_export.py write it). Each option is
declared once, here, and `ullme export`'s flags are derived from the fields (cli.py). Light on purpose: `ullme
--help` imports it."""

from __future__ import annotations

from dataclasses import dataclass

from ullme_cli.constants import EXPORT_FORMATS, GGUF_QUANTS
from ullme_cli.errors import UllmeError
from ullme_cli.options import check_choices, option


@dataclass(frozen=True)
class ExportOptions:
    format: str = option("folder", "What to write (folder: a model folder for sentence-transformers and transformers; onnx: a graph with "
                                   "pooling and normalisation inside, for ONNX Runtime; gguf: one file with ullme's attention and pooling, "
                                   "for llama.cpp; onnx and gguf merge the adapter)", EXPORT_FORMATS)  # fmt: skip
    merge: bool = option(False, "Merge the LoRA adapter into the weights (a self-contained folder).")
    quantize: str | None = option(None, "With --format onnx: int8 (ONNX Runtime's dynamic quantization of the projections).")
    quant: str = option("f16", "With --format gguf: the weight matrices' type", GGUF_QUANTS)

    def validate(self) -> "ExportOptions":
        check_choices(self)  # --format and --quant
        if self.quantize is not None and self.format != "onnx":
            raise UllmeError("--quantize applies to --format onnx only")
        if self.quant != ExportOptions.quant and self.format != "gguf":
            raise UllmeError("--quant applies to --format gguf only")
        return self
