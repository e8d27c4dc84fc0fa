"""ullme: decoder LLMs as text-embedding models, from fine-tuning to retrieval.

    import ullme_cli as ullme
    model = ullme.load("smollm2-135m", query_instruction="Given a question, retrieve passages that answer it")
    q = model.encode_query(["Who wrote The Iron Lady ?"])
    p = model.encode_document(["Hugo Young wrote the biography of Margaret Thatcher ."])
"""

from ullme_cli.constants import DEFAULT_MODEL, __version__  # noqa: F401 - __version__: the package's version, where users look for it


def load(source: str = DEFAULT_MODEL, *, dtype: str = "auto", device: str = "auto", trust_remote_code: bool = False,
         verify: bool = True, compile: bool | None = None, backend: str = "auto", **setup):  # fmt: skip
    """An Embedder from an ullme folder, a model folder, an ONNX export, a .gguf file, a bundled name or a hub id.

    The parameters are `Embedder.load`'s. `setup` sets ModelSetup fields (pooling, attention,
    query_instruction, max_length, ...); see model_setup.py.
    """
    from ullme_cli.models.embedder import Embedder  # torch and transformers load only when a model does

    return Embedder.load(source, dtype=dtype, device=device, trust_remote_code=trust_remote_code, verify=verify, compile=compile, backend=backend, **setup)
