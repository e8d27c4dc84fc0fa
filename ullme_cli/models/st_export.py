"""An ullme model folder is also a sentence-transformers folder, with the same vectors.

`modules.json` names one module, `ullme_st.UllmeSentenceModule`: a short file in the folder that imports
`UllmeSentenceModule` (st_module.py) from the installed ullme package, or fails with "pip install ullme".
The module runs the Embedder itself: bidirectional attention, the adapter, pooling with the instruction
left out, and normalization. `config_sentence_transformers.json` carries the query and document prompts,
which are the instruction prefixes ullme puts before queries and passages.

sentence-transformers 6 runs a module class from outside its own package only with
`trust_remote_code=True`, for local folders too; without it, it refuses with its own error (it never
loads other vectors). With it, the only code taken from the folder is the import shim.
"""

from __future__ import annotations

import json
from pathlib import Path

SHIM_FILE = "ullme_st.py"
SHIM = '''"""sentence-transformers entry point of an ullme model: the code is the installed ullme package's."""
import importlib

try:
    UllmeSentenceModule = importlib.import_module("ullme_cli.models.st_module").UllmeSentenceModule
except ImportError as e:
    raise ImportError("this is an ullme model; it needs the ullme package: pip install ullme") from e
'''


def write_sentence_transformers_files(folder: Path, embedder) -> None:
    """modules.json, config_sentence_transformers.json and the import shim, beside ullme.json."""
    (folder / SHIM_FILE).write_text(SHIM)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "ullme_st.UllmeSentenceModule"}]
    (folder / "modules.json").write_text(json.dumps(modules, indent=2) + "\n")
    prompts = {"query": embedder.instruction_prefix("query"), "document": embedder.instruction_prefix("passage")}
    config = {"prompts": prompts, "default_prompt_name": None, "similarity_fn_name": "cosine"}
    (folder / "config_sentence_transformers.json").write_text(json.dumps(config, indent=2) + "\n")
