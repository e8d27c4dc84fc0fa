"""The model card: README.md with Hugging Face Hub front matter, written into every ullme model folder.

The front matter (library_name, pipeline_tag, base_model, license, tags, datasets) is built with
huggingface_hub's ModelCardData, so the folder uploads as it is with `huggingface_hub.upload_folder`.
The body holds the setup, the recipe, the training data and the last evaluation metrics (when finetune
made the model), and usage in ullme, sentence-transformers and mteb.

What finetune knew is kept in `training.json` beside the weights, so `ullme export` writes the same card.
"""

from __future__ import annotations

import json
from pathlib import Path

from ullme_cli.io.rows import read_json_object
from ullme_cli.models.bundled import BUNDLED

TRAINING_FILE = "training.json"
CARD_FILE = "README.md"


def read_front_matter_license(readme: Path | None) -> str | None:
    if not readme or not Path(readme).is_file():
        return None
    from huggingface_hub import ModelCard

    try:
        return ModelCard.load(readme).data.to_dict().get("license")
    except Exception:  # noqa: BLE001 - a base model's README that does not parse only loses its license
        return None


def describe_base(name: str, source: str) -> dict:
    """The base model's hub id and licence, where they can be known offline.

    A bundled name maps to the model its gguf was made from; a hub id is its own base, with the licence of
    the README in the Hugging Face cache; an ullme folder made by finetune carries both in training.json.
    """
    if name in BUNDLED:
        return {"base_model": BUNDLED[name].hub_id, "license": BUNDLED[name].license.lower()}
    folder = Path(source)
    record = read_training(folder)
    if record is not None:
        return {"base_model": record.get("base_model"), "license": record.get("license")}
    if folder.is_dir():
        return {"base_model": None, "license": read_front_matter_license(folder / CARD_FILE)}
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(name, CARD_FILE)
    return {"base_model": name, "license": read_front_matter_license(Path(cached) if isinstance(cached, str) else None)}


def read_training(folder: Path) -> dict | None:
    """What finetune recorded about a model (training.json), or None where it recorded nothing."""
    path = Path(folder) / TRAINING_FILE
    return read_json_object(path) if path.is_file() else None


def _front_matter(embedder, origin: dict, training: dict | None):
    from huggingface_hub import ModelCardData

    model_type = getattr(getattr(embedder.model, "config", None), "model_type", None)
    train_source = (training or {}).get("data", {}).get("train", "")
    return ModelCardData(
        library_name="sentence-transformers",  # what the Hub's widgets and code snippets load it with
        pipeline_tag="sentence-similarity",
        base_model=origin.get("base_model") or None,
        license=origin.get("license") or None,
        datasets=[train_source[3:].split(":")[0]] if train_source.startswith("hf:") else None,
        tags=[t for t in ("ullme", "sentence-transformers", "feature-extraction", "text-embeddings", model_type) if t],
    )


def render_card(embedder, origin: dict, training: dict | None, folder_name: str, route: tuple[str, str] = ("ullme-module", "")) -> str:
    from huggingface_hub import ModelCard

    setup = embedder.setup
    query = setup.query_instruction or ""
    lines = [
        f"# {folder_name}",
        "",
        f"A text-embedding model made with [ullme](https://pypi.org/project/ullme/) from "
        f"{origin.get('base_model') or 'a decoder language model'}: {setup.attention} attention, {setup.pooling} pooling, "
        f"{embedder.dim} dimensions{', normalized' if setup.normalize else ''}, up to {setup.max_length} tokens"
        + (f"; trained with Matryoshka at {', '.join('full' if d is None else str(d) for d in embedder.matryoshka_dims)} dimensions "
           "(cut with `ullme encode --truncate-dim D` or `SentenceTransformer(folder, truncate_dim=D)`)" if embedder.matryoshka_dims else "") + ".",
        "",
        "| setup | value |", "| --- | --- |",
        *(f"| {k} | `{json.dumps(v)}` |" for k, v in setup.record().items() if k not in ("model", "fingerprint")),
        "",
        "## Usage",
        "",
        *(["This folder is a stock Hugging Face model: sentence-transformers loads it with its own parts, without "
           f"ullme and without `trust_remote_code` ({route[1]}). Every route below gives the same vectors.", ""]
          if route[0] == "stock" else
          ["Every route below runs ullme's own code, so all of them give the same vectors and need `pip install ullme`. "
           f"It keeps ullme's module because {route[1]}.", ""]),
        "ullme command line:", "", "```bash",
        "ullme encode corpus.jsonl -o emb.npy --model THIS_FOLDER_OR_ID",
        "ullme index emb.npy -o index/ && ullme search index/ queries.jsonl",
        "```", "",
        "Python:", "", "```python",
        "import ullme_cli as ullme", "", 'model = ullme.load("THIS_FOLDER_OR_ID")',
        'queries = model.encode_query(["how do I bake bread?"])', 'documents = model.encode_document(["Knead the dough, let it rise, bake at 220 C."])',
        "scores = model.similarity(queries, documents)", "```", "",
        *(["sentence-transformers (stock parts: Transformer, Pooling, Normalize):", "", "```python",
           "from sentence_transformers import SentenceTransformer", "", 'model = SentenceTransformer("THIS_FOLDER_OR_ID")']
          if route[0] == "stock" else
          ["sentence-transformers (its version 6 runs a module from outside its own package only with trust_remote_code; "
           "the only code in this folder is a two-line import of the installed ullme package):", "", "```python",
           "from sentence_transformers import SentenceTransformer", "",
           'model = SentenceTransformer("THIS_FOLDER_OR_ID", trust_remote_code=True)']),
        'queries = model.encode(["how do I bake bread?"], prompt_name="query")',
        'documents = model.encode(["Knead the dough, let it rise, bake at 220 C."], prompt_name="document")',
        "```", "",
        "mteb:", "", "```python", "import mteb", "import ullme_cli as ullme", "",
        'results = mteb.evaluate(ullme.load("THIS_FOLDER_OR_ID"), mteb.get_tasks(tasks=["SciFact"]))',
        "```", "",
    ]  # fmt: skip
    if query:
        lines += [f"Queries take the instruction `{query}`; documents take none unless the setup says otherwise.", ""]
    if training:
        data = training.get("data", {})
        lines += ["## Training", "", f"Fine-tuned by `ullme finetune` for {training.get('steps')} steps on "
                  f"`{data.get('train')}` ({data.get('rows')} rows).", ""]  # fmt: skip
        metrics = training.get("eval") or {}
        if metrics:
            lines += [f"Last evaluation (step {metrics.get('step')}, on `{training.get('eval_task')}`):", "",
                      "| metric | value |", "| --- | --- |",
                      *(f"| {k} | {v:.4f} |" for k, v in metrics.items() if k != "step" and isinstance(v, float)), ""]  # fmt: skip
        if training.get("recipe"):
            lines += ["The recipe:", "", "```yaml", training["recipe"].rstrip(), "```", ""]
    content = "---\n" + _front_matter(embedder, origin, training).to_yaml() + "\n---\n\n" + "\n".join(lines)
    return str(ModelCard(content))


def write_model_card(folder: Path, embedder, name: str, route: tuple[str, str] = ("ullme-module", "")) -> None:
    """README.md (and training.json when the model was fine-tuned) into a model folder being written.

    Read here, not when the model loads, so that loading (every encode) pays nothing for the card."""
    source = embedder.source
    origin = describe_base(embedder.setup.model, source) if source else {}
    training = embedder.training if embedder.training is not None else (read_training(Path(source)) if source else None)
    if training:
        (folder / TRAINING_FILE).write_text(json.dumps({**origin, **training}, indent=2) + "\n")
    (folder / CARD_FILE).write_text(render_card(embedder, origin, training, name, route))
