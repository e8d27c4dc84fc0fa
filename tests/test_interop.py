"""An ullme folder outside ullme: sentence-transformers gives the same vectors; the public Python API."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import DEMO_CORPUS, demo_texts, run_cli

import ullme_cli as ullme
from ullme_cli.artifacts import load_embeddings

INSTRUCTION = "Given a question, retrieve sentences that answer it"


@pytest.fixture(scope="module")
def fine_tuned(tiny_llama, tmp_path_factory):
    """An ullme folder as finetune leaves it: a LoRA adapter that changes the vectors, a query instruction."""
    embedder = ullme.load(str(tiny_llama), dtype="float32", query_instruction=INSTRUCTION).add_lora(r=4, alpha=8, dropout=0.0)
    with torch.no_grad():
        for name, p in embedder.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    folder = tmp_path_factory.mktemp("ft") / "model"
    embedder.save(folder)
    return folder


def cli_vectors(model, kind, folder):
    out = folder / f"{kind}.npy"
    result = run_cli("encode", DEMO_CORPUS, "-o", out, "--model", model, "--kind", kind, "--dtype", "float32", "-q")
    assert result.returncode == 0, result.stderr.decode()
    return load_embeddings(str(out))[0]


def test_sentence_transformers_gives_ullme_encodes_vectors(fine_tuned, tmp_path):
    from sentence_transformers import SentenceTransformer

    # float32 on both sides: on a CPU with fast bf16 the default dtype is bf16 (cosine 0.9992, not 0.9999).
    st = SentenceTransformer(str(fine_tuned), trust_remote_code=True, device="cpu", model_kwargs={"dtype": "float32"})
    texts = demo_texts()
    for kind, prompt in (("query", "query"), ("passage", "document")):
        expected = cli_vectors(fine_tuned, kind, tmp_path)
        got = st.encode(texts, prompt_name=prompt, batch_size=64)
        assert (got * expected).sum(1).min() >= 0.9999, kind
    assert st.get_embedding_dimension() == 32


def test_a_sentence_transformer_holding_ullmes_module_saves_and_loads_again(fine_tuned, tmp_path):
    """`SentenceTransformer.save` writes each module through its own `save`: ullme's module writes the whole
    folder (it raised a TypeError before), and what it wrote loads again, in sentence-transformers and in ullme,
    with ullme's vectors."""
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(fine_tuned), trust_remote_code=True, device="cpu", model_kwargs={"dtype": "float32"})
    st.save(str(tmp_path / "saved"))
    again = SentenceTransformer(str(tmp_path / "saved"), trust_remote_code=True, device="cpu", model_kwargs={"dtype": "float32"})
    texts = demo_texts(16)
    expected = ullme.load(str(fine_tuned), dtype="float32").encode(texts, kind="query")
    assert (again.encode(texts, prompt_name="query") * expected).sum(1).min() >= 0.9999
    assert (ullme.load(str(tmp_path / "saved"), dtype="float32").encode(texts, kind="query") * expected).sum(1).min() >= 0.9999


def test_sentence_transformers_refuses_rather_than_loading_other_vectors(fine_tuned):
    from sentence_transformers import SentenceTransformer

    with pytest.raises(ValueError, match="trust_remote_code"):
        SentenceTransformer(str(fine_tuned), device="cpu")
    hidden = ("import sys; sys.modules['ullme_cli'] = None\n"
              "from sentence_transformers import SentenceTransformer\n"
              f"SentenceTransformer({str(fine_tuned)!r}, trust_remote_code=True, device='cpu')\n")  # fmt: skip
    result = subprocess.run([sys.executable, "-c", hidden], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "pip install ullme" in result.stderr, result.stderr[-2000:]


def test_export_merge_writes_a_self_contained_folder_with_the_same_vectors(fine_tuned, tmp_path):
    result = run_cli("export", fine_tuned, "-o", tmp_path / "merged", "--merge")
    assert result.returncode == 0, result.stderr.decode()
    assert not (tmp_path / "merged" / "adapter").exists() and (tmp_path / "merged" / "modules.json").exists()
    (tmp_path / "a").mkdir()
    a = cli_vectors(fine_tuned, "query", tmp_path / "a")
    b = cli_vectors(tmp_path / "merged", "query", tmp_path)
    assert (a * b).sum(1).min() >= 0.9999
    again = run_cli("export", fine_tuned, "-o", tmp_path / "merged")
    assert again.returncode == 2 and b"exists already" in again.stderr


def test_public_api_in_the_shape_sentence_transformers_users_know(tiny_llama):
    model = ullme.load(str(tiny_llama), dtype="float32", query_instruction=INSTRUCTION)
    one = model.encode_query("Who wrote it ?")
    many = model.encode_query(["Who wrote it ?", "Why ?"], batch_size=1, convert_to_tensor=True)
    docs = model.encode_document(["Hugo Young wrote it ."])
    assert one.shape == (32,) and isinstance(many, torch.Tensor) and many.shape == (2, 32)
    np.testing.assert_allclose(many[0].numpy(), one, atol=1e-6)
    np.testing.assert_allclose(model.encode(["Who wrote it ?"], kind="query")[0], one, atol=1e-6)
    assert docs.shape == (1, 32) and abs(np.linalg.norm(docs[0]) - 1) < 1e-5


def test_version():
    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout.decode().strip() == f"ullme {ullme.__version__}"


def test_mteb_get_model_refuses_a_local_folder_rather_than_loading_other_vectors(fine_tuned):
    import mteb

    with pytest.raises(NotImplementedError):
        mteb.get_model(str(fine_tuned))
