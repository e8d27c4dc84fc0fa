"""The `ullme` command line: parses arguments and calls the core. Nothing else lives here.

Heavy libraries (torch, transformers, faiss, mteb) are imported inside the commands, so `--help` is fast.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from typer.exceptions import TyperException

from ullme_cli.constants import __version__
from ullme_cli.encode_options import EncodeOptions  # a light dataclass: its fields declare encode's flags
from ullme_cli.errors import UllmeError
from ullme_cli.export_options import ExportOptions  # light: its fields declare export's flags
from ullme_cli.mine_options import MiningOptions  # a light dataclass: its fields declare mine's flags
from ullme_cli.model_setup import ModelSetup, Runtime, resolve_setup  # light: their fields declare the setup flags
from ullme_cli.options import field_of, flag_of
from ullme_cli.retrieval_options import IndexOptions, SearchOptions  # light: their fields declare index's and search's flags
from ullme_cli.serving.limits import Limits  # a dataclass only: its defaults are the serve flags' defaults

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    help="Decoder LLMs as text-embedding models: finetune, encode, index, search, serve, evaluate.",
)

def field_help(section, name: str) -> str:
    """A field's help, with its choices where it declares them."""
    field = field_of(section, name)
    choices = field.metadata.get("choices")
    return field.metadata["help"].rstrip(".") + (f": {', '.join(choices)}." if choices else ".")


def field_option(section, name: str, *short: str, keeps_the_models: bool = False):
    """The Typer option of a dataclass field declared with `options.option`: its default, flag and help (with its
    choices), so the flag is declared once, in the field. `keeps_the_models`: a setup field that a model folder
    may set itself; the flag's default None keeps the folder's value (else the field's default)."""
    field = field_of(section, name)
    if keeps_the_models:
        return typer.Option(None, flag_of(field), *short, help=f"{field_help(section, name).rstrip('.')} (default: the model's, else {field.default}).")
    return typer.Option(field.default, flag_of(field), *short, help=field_help(section, name))


# The setup flags: every command that loads a model by name offers all of these, declared in ModelSetup and
# Runtime (model_setup.SETUP_FLAGS); `search` takes the runtime ones (its setup is the index's).
ModelOption = field_option(ModelSetup, "model", "-m")
PoolingOption = field_option(ModelSetup, "pooling", keeps_the_models=True)
AttentionOption = field_option(ModelSetup, "attention", keeps_the_models=True)
MaxLengthOption = field_option(ModelSetup, "max_length", keeps_the_models=True)
DtypeOption = field_option(Runtime, "dtype")
DeviceOption = field_option(Runtime, "device")
TrustOption = field_option(Runtime, "trust_remote_code")
CompileOption = field_option(Runtime, "compile")
BackendOption = field_option(Runtime, "backend")
# --input-format is always the format of what a command reads, --format always the format of what it writes.
InputFormatOption = field_option(EncodeOptions, "input_format")  # every command that reads texts takes it
QuietOption = typer.Option(False, "--quiet", "-q", help="Warnings and errors only: no progress bar, no summary.")
VerboseOption = typer.Option(False, "--verbose", "-v", help="Debug messages too.")
OverwriteOption = typer.Option(False, "--overwrite", help="Replace an existing output (never an input).")


log = logging.getLogger("ullme_cli.cli")


def _err(message: str) -> None:
    typer.echo(message, err=True)


def _report_error(message: str) -> None:
    """`ullme: error: MESSAGE` on stderr, once per launch and machine when torchrun or accelerate started N
    processes that all reach the same refusal (they share their parent, the launcher's agent). A message
    that only some ranks reach is still printed by them. What the launcher prints after that (torchrun's
    ChildFailedError summary) is its own."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        import hashlib  # --help: only a multi-process launch reaches this
        import tempfile  # --help: likewise

        launch = f"{os.getppid()}:{os.environ.get('TORCHELASTIC_RUN_ID', '')}:{os.environ.get('MASTER_PORT', '')}"
        marker = Path(tempfile.gettempdir()) / f"ullme-error-{hashlib.sha256(f'{launch}:{message}'.encode()).hexdigest()[:20]}"
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        except FileExistsError:
            return  # another process of this launch printed this line
        except OSError:
            pass  # an unwritable temp folder: every process prints
    _err(f"ullme: error: {message}")


def _output(quiet: bool, verbose: bool) -> bool:
    """Set the log level for this command; True when progress bars should show."""
    from ullme_cli.progress import configure_logging  # --help: rich's progress bars and tables wait for a command

    configure_logging(quiet, verbose)
    return not quiet


def _version(value: bool) -> None:
    if value:
        typer.echo(f"ullme {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """Decoder LLMs as text-embedding models: finetune, encode, index, search, evaluate."""


@app.command()
def finetune(
    recipe: str = typer.Argument(..., help="Recipe YAML (see recipes/)."),
    set_values: list[str] = typer.Option([], "--set", help="Override a recipe value: section.key=value (repeatable)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest checkpoint in output_dir."),
    print_recipe: bool = typer.Option(False, "--print-recipe", help="Print the resolved recipe and exit."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Read the data and the model's config (no weights), trace one step on fake tensors, print rows per source, tokens, FLOPs and memory per process, and exit."),
    processes: int = typer.Option(1, "--processes", min=1, help="With --dry-run: the process count to budget for (GPUs in all)."),
    quiet: bool = QuietOption,
    verbose: bool = VerboseOption,
) -> None:
    """Fine-tune an embedder (LoRA or full) with contrastive, SimCSE, MNTP, SFT, DPO, GRL or distillation losses."""
    show_progress = _output(quiet, verbose)
    from ullme_cli.recipes import dump_recipe, load_recipe

    resolved = load_recipe(recipe, set_values)
    if print_recipe:
        typer.echo(dump_recipe(resolved), nl=False)
        return
    if dry_run:
        from ullme_cli.training.dry_run import dry_run as budget_of, report

        typer.echo(report(budget_of(resolved, processes), resolved, processes))
        return
    from ullme_cli.training.trainer import finetune as run_finetune

    summary = run_finetune(resolved, resume=resume, show_progress=show_progress)
    log.info(f"trained {summary['steps']} steps; model in {summary['output']}")


@app.command()
def encode(
    input: str = typer.Argument(..., help="Corpus: .jsonl/.csv/.parquet/datasets folder/hf:NAME (id, text, title?), .tsv (id, text), text (one per line), or - for stdin."),
    output: str = typer.Option(..., "--output", "-o", help="emb.npy (plus emb.ids.jsonl, emb.meta.json), or - for an npz stream on stdout."),
    model: str = ModelOption,
    kind: str = field_option(EncodeOptions, "kind"),
    pooling: Optional[str] = PoolingOption,
    attention: Optional[str] = AttentionOption,
    instruction: Optional[str] = field_option(EncodeOptions, "instruction"),
    query_instruction: Optional[str] = typer.Option(None, "--query-instruction", help="Instruction that queries against these passages use; recorded for `ullme search`."),
    max_length: Optional[int] = MaxLengthOption,
    dtype: str = DtypeOption,
    out_dtype: str = field_option(EncodeOptions, "out_dtype"),
    truncate_dim: Optional[int] = field_option(EncodeOptions, "truncate_dim"),
    shard: Optional[str] = typer.Option(None, "--shard", help="i/N: encode only shard i of N (join them with `ullme join`)."),
    token_budget: Optional[int] = field_option(EncodeOptions, "token_budget"),
    input_format: str = field_option(EncodeOptions, "input_format"),
    on_long: str = field_option(EncodeOptions, "on_long"),
    chunk_tokens: Optional[int] = field_option(EncodeOptions, "chunk_tokens"),
    chunk_overlap: int = field_option(EncodeOptions, "chunk_overlap"),
    chunk_pool: str = field_option(EncodeOptions, "chunk_pool"),
    device: str = DeviceOption,
    trust_remote_code: bool = TrustOption,
    compile: Optional[bool] = CompileOption,
    backend: str = BackendOption,
    overwrite: bool = OverwriteOption,
    quiet: bool = QuietOption,
    verbose: bool = VerboseOption,
) -> None:
    """Embed a corpus. Resumes after an interruption; writes nothing until it is complete.

    Under `torchrun --nproc_per_node N -m ullme_cli encode ...` (or `accelerate launch`) the N processes
    share the corpus and rank 0 writes the joined files."""
    show_progress = _output(quiet, verbose)
    from ullme_cli.encoding import Launch, encode_corpus, encode_launched

    options = EncodeOptions(kind=kind, instruction=instruction, out_dtype=out_dtype, truncate_dim=truncate_dim,
                            token_budget=token_budget, input_format=input_format, on_long=on_long, chunk_tokens=chunk_tokens,
                            chunk_overlap=chunk_overlap, chunk_pool=chunk_pool).validate()  # fmt: skip
    setup = resolve_setup(model, pooling=pooling, attention=attention, query_instruction=query_instruction, max_length=max_length)
    runtime = Runtime(dtype, device, trust_remote_code, compile, backend)
    launch = Launch.from_env()
    if launch.world > 1:
        if shard:
            raise UllmeError("--shard and a multi-process launch do not mix: the launch shards by rank")
        meta = encode_launched(input, output, setup, runtime, options, overwrite, show_progress=show_progress)
        if launch.rank != 0:
            return
    else:
        meta = encode_corpus(input, output, setup, runtime, options, shard, overwrite, show_progress=show_progress)
    if output != "-":
        log.info(f"wrote {meta['count']} x {meta['dim']} {meta['dtype']} embeddings to {output}")


@app.command()
def serve(
    model: str = typer.Argument(ModelSetup.model, help=field_help(ModelSetup, "model")),
    index: list[str] = typer.Option([], "--index", help="Index folder(s) built with this model, for POST /v1/search (repeatable; merged as `search` merges them)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (loopback by default; any other needs --api-key-env or --insecure-public)."),
    port: int = typer.Option(8000, "--port", help="TCP port."),
    api_key_env: Optional[str] = typer.Option(None, "--api-key-env", help="Environment variable holding the bearer key every request but /health must send."),
    insecure_public: bool = typer.Option(False, "--insecure-public", help="Bind a non-loopback host without a key."),
    served_name: Optional[str] = typer.Option(None, "--served-model-name", help="The model id in answers and /v1/models (default: MODEL as given)."),
    adapter: list[str] = typer.Option([], "--adapter", help="NAME=PATH: also serve the adapter-only folder PATH, trained on MODEL, as model NAME (repeatable; the base weights are loaded once)."),
    pooling: Optional[str] = PoolingOption,
    attention: Optional[str] = AttentionOption,
    query_instruction: Optional[str] = typer.Option(None, "--query-instruction", help="Instruction for input_type=query (default: the model's)."),
    max_length: Optional[int] = MaxLengthOption,
    dtype: str = DtypeOption,
    device: str = DeviceOption,
    trust_remote_code: bool = TrustOption,
    compile: Optional[bool] = CompileOption,
    backend: str = BackendOption,
    token_budget: Optional[int] = typer.Option(None, "--token-budget", help="Padded tokens per batch (default 1536 on CPU, 16384 on GPU)."),
    max_inputs: int = field_option(Limits, "max_inputs"),
    on_long: str = field_option(Limits, "on_long"),
    truncate: bool = typer.Option(False, "--truncate", help="The same as --on-long truncate."),
    max_queue: int = field_option(Limits, "max_queue"),
    max_wait_ms: float = typer.Option(Limits.max_wait * 1000, "--max-wait-ms", help="How long the first text of a batch waits for others to join."),
    timeout: float = field_option(Limits, "timeout"),
    max_request_mb: float = typer.Option(Limits.max_request_bytes / 2**20, "--max-request-mb", help="Largest request body; more is a 413."),
    quiet: bool = QuietOption,
    verbose: bool = VerboseOption,
) -> None:
    """Serve embeddings (OpenAI-compatible /v1/embeddings) and search (/v1/search) over HTTP until SIGTERM."""
    _output(quiet, verbose)
    from ullme_cli.serving.server import serve as run_server

    limits = Limits.from_flags(max_inputs, max_request_mb, on_long, truncate, timeout, max_queue, max_wait_ms)
    adapters = {}
    for given in adapter:
        adapter_name, _, path = given.partition("=")
        if not adapter_name.strip() or not path.strip():
            raise UllmeError(f"--adapter {given}: expected NAME=PATH")
        adapters[adapter_name.strip()] = path.strip()
    setup = resolve_setup(model, pooling=pooling, attention=attention, query_instruction=query_instruction, max_length=max_length)
    run_server(setup, Runtime(dtype, device, trust_remote_code, compile, backend), index, host, port, api_key_env, insecure_public, limits,
               served_name or model, token_budget, access_log=verbose, adapters=adapters)  # fmt: skip


@app.command()
def export(
    model: str = typer.Argument(..., help="An ullme model folder (the output of finetune or Embedder.save)."),
    output: str = typer.Option(..., "--output", "-o", help="The folder to write (a .gguf file with --format gguf)."),
    merge: bool = field_option(ExportOptions, "merge"),
    format: str = field_option(ExportOptions, "format"),
    quantize: Optional[str] = field_option(ExportOptions, "quantize"),
    quant: str = field_option(ExportOptions, "quant"),
    overwrite: bool = OverwriteOption,
    quiet: bool = QuietOption,
    verbose: bool = VerboseOption,
) -> None:
    """Write a model folder for sentence-transformers (adapter merged with --merge), an ONNX graph, or a GGUF file."""
    _output(quiet, verbose)
    ExportOptions(format, merge, quantize, quant).validate()
    if format == "gguf":
        from ullme_cli.models.gguf_export import export_gguf

        check = export_gguf(model, output, quant, overwrite)
        measured = f"; cosine to the torch model: mean {check['mean_cosine']:.6f}, min {check['min_cosine']:.6f} on {check['texts']} probe texts" if check.get("checked") else ""
        log.info(f"exported {model} to {output} as GGUF ({quant}{measured})")
        return
    if format == "onnx":
        from ullme_cli.models.onnx_export import export_onnx

        check = export_onnx(model, output, quantize, overwrite)
        log.info(f"exported {model} to {output} as ONNX ({quantize or 'float32'}; cosine to the torch model: mean {check['mean_cosine']:.6f}, "
                 f"min {check['min_cosine']:.6f} on {check['texts']} probe texts)")  # fmt: skip
        return
    from ullme_cli.models.embedder import export_model

    export_model(model, output, merge, overwrite)
    log.info(f"exported {model} to {output}{' (adapter merged)' if merge else ''}")


@app.command()
def join(
    shards: list[str] = typer.Argument(..., help="The emb files written by `ullme encode --shard i/N`, in any order."),
    output: str = typer.Option(..., "--output", "-o", help="Joined emb.npy, or - for stdout."),
    overwrite: bool = OverwriteOption,
    quiet: bool = QuietOption,
    verbose: bool = VerboseOption,
) -> None:
    """Join the shards of one corpus into one embeddings file, in corpus order."""
    _output(quiet, verbose)
    from ullme_cli.encoding import join_shards

    meta = join_shards(shards, output, overwrite)
    if output != "-":
        log.info(f"joined {len(shards)} shards: {meta['count']} embeddings in {output}")


@app.command()
def index(
    embeddings: str = typer.Argument(..., help="emb.npy (with its .ids.jsonl and .meta.json), an .npz, or - for an npz stream."),
    output: str = typer.Option(..., "--output", "-o", help="Index folder: index.faiss, ids.jsonl, manifest.json."),
    factory: str = field_option(IndexOptions, "factory"),
    metric: Optional[str] = field_option(IndexOptions, "metric"),
    add: bool = field_option(IndexOptions, "add"),
    keep_vectors: bool = field_option(IndexOptions, "keep_vectors"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing index folder (one that holds only ullme's index files)."),
    trained_from: Optional[str] = field_option(IndexOptions, "trained_from"),
    quiet: bool = QuietOption,
    verbose: bool = VerboseOption,
) -> None:
    """Build a FAISS index (or --add to one) from embeddings."""
    _output(quiet, verbose)
    from ullme_cli.retrieval.index import build_index

    options = IndexOptions(factory, metric, add, keep_vectors, trained_from).validate()
    manifest, note = build_index(embeddings, output, options, overwrite)
    if note:
        log.info(f"factory {'auto -> ' if factory == 'auto' and not trained_from else ''}{manifest['factory']} ({note})")
    log.info(f"index {output}: {manifest['count']} vectors, {manifest['factory']}, metric {manifest['metric']}")


@app.command()
def search(
    indexes: list[str] = typer.Argument(..., help="Index folder(s), then QUERIES (.jsonl/.tsv/text/-) last unless --embeddings is given."),
    embeddings: Optional[str] = typer.Option(None, "--embeddings", help="Query embeddings made already (q.npy or .npz); no QUERIES then."),
    k: int = field_option(SearchOptions, "k", "-k"),
    output: str = typer.Option("-", "--output", "-o", help="Results file, or - for stdout."),
    fmt: str = field_option(SearchOptions, "format"),
    nprobe: Optional[int] = field_option(SearchOptions, "nprobe"),
    ef_search: Optional[int] = field_option(SearchOptions, "ef_search"),
    instruction: Optional[str] = field_option(SearchOptions, "instruction"),
    rerank_exact: bool = field_option(SearchOptions, "rerank_exact"),
    mmap: bool = field_option(SearchOptions, "mmap"),
    aggregate: str = field_option(SearchOptions, "aggregate"),
    chunks: bool = typer.Option(False, "--chunks", help="Over chunk vectors: return the chunks themselves, not documents."),
    chunk_depth: int = field_option(SearchOptions, "chunk_depth"),
    input_format: str = InputFormatOption,
    dtype: str = DtypeOption,
    device: str = DeviceOption,
    trust_remote_code: bool = TrustOption,
    compile: Optional[bool] = CompileOption,
    backend: str = BackendOption,
    overwrite: bool = OverwriteOption,
    quiet: bool = QuietOption,
    verbose: bool = VerboseOption,
) -> None:
    """Search index folders; several folders (shards) are merged into one top-k. Over an index of chunk
    vectors, documents are ranked by their chunks, each hit with its best chunk's id and span."""
    show_progress = _output(quiet, verbose)
    from ullme_cli.retrieval.search import search as run_search
    from ullme_cli.retrieval.search import search_inputs, write_results

    folders, queries = (indexes, None) if embeddings else (indexes[:-1], indexes[-1])
    if not folders:
        raise UllmeError("search: give at least one index folder before QUERIES")
    options = SearchOptions(k, nprobe, ef_search, instruction, rerank_exact, mmap, None if chunks else aggregate, chunk_depth, fmt).validate()
    runtime = Runtime(dtype, device, trust_remote_code, compile, backend)
    inputs = search_inputs(folders, queries, embeddings)
    results = run_search(folders, queries, embeddings, options, runtime, input_format, show_progress)
    count = write_results(results, output, fmt, inputs, overwrite)
    if output != "-":
        log.info(f"wrote {count} queries' hits to {output}")


@app.command()
def mine(
    training: str = typer.Argument(..., help="Training jsonl: query, positive, negative?, instruction?."),
    corpus: str = typer.Option(..., "--corpus", help="Passages to draw negatives from (.jsonl/.tsv/text)."),
    output: str = typer.Option(..., "--output", "-o", help="Training jsonl with 'negative' filled in."),
    model: str = ModelOption,
    corpus_embeddings: Optional[str] = typer.Option(None, "--corpus-embeddings", help="Reuse these corpus embeddings (default: cached beside --output)."),
    negatives: int = field_option(MiningOptions, "negatives"),
    rank_range: str = typer.Option("10:", "--range", help="A:B: take candidates from ranks A to B-1 (0-based; the top ranks are often unlabelled positives). A: has no upper bound."),
    sample: bool = field_option(MiningOptions, "sample"),
    margin: Optional[float] = field_option(MiningOptions, "margin"),
    relative_margin: Optional[float] = field_option(MiningOptions, "relative_margin"),
    max_score: Optional[float] = field_option(MiningOptions, "max_score"),
    seed: int = field_option(MiningOptions, "seed"),
    keep_existing: bool = field_option(MiningOptions, "keep_existing"),
    teacher: Optional[str] = field_option(MiningOptions, "teacher"),
    chunk_tokens: Optional[int] = field_option(MiningOptions, "chunk_tokens"),
    chunk_overlap: int = field_option(MiningOptions, "chunk_overlap"),
    pooling: Optional[str] = PoolingOption,
    attention: Optional[str] = AttentionOption,
    max_length: Optional[int] = MaxLengthOption,
    dtype: str = DtypeOption,
    device: str = DeviceOption,
    trust_remote_code: bool = TrustOption,
    compile: Optional[bool] = CompileOption,
    backend: str = BackendOption,
    overwrite: bool = OverwriteOption,
    quiet: bool = QuietOption,
    verbose: bool = VerboseOption,
) -> None:
    """Mine hard negatives for training data by searching a corpus."""
    show_progress = _output(quiet, verbose)
    from ullme_cli.retrieval.mine import mine_negatives

    start, stop = MiningOptions.parse_range(rank_range)
    options = MiningOptions(negatives, start, stop, sample, margin, relative_margin, max_score, seed, keep_existing, teacher, chunk_tokens, chunk_overlap).validate()
    setup = resolve_setup(model, pooling=pooling, attention=attention, max_length=max_length)
    runtime = Runtime(dtype, device, trust_remote_code, compile, backend)
    stats = mine_negatives(training, corpus, output, setup, runtime, corpus_embeddings, options, overwrite, show_progress)
    log.info(f"mined {stats['examples']} rows against {stats['corpus']} passages -> {output} ({stats['short']} rows got fewer than {negatives})")


@app.command()
def plot(
    runs: list[str] = typer.Argument(..., help="finetune output_dirs (or their metrics.jsonl files)."),
    output: str = typer.Option(..., "--output", "-o", help="The PNG to write, or - for stdout."),
    by_source: bool = typer.Option(False, "--by-source", help="One line per run and data source (runs of a mixture record each step's source)."),
    overwrite: bool = OverwriteOption,
    quiet: bool = QuietOption,
    verbose: bool = VerboseOption,
) -> None:
    """Draw loss components and eval metrics over steps for one or several runs, one line per run."""
    _output(quiet, verbose)
    from ullme_cli.training.curves import write_plot  # --help: the output guard waits for a command

    panels = write_plot(runs, output, overwrite, by_source)
    if output != "-":
        log.info(f"drew {', '.join(panels)} for {len(runs)} run(s) into {output}")


@app.command()
def evaluate(
    model: str = ModelOption,
    tasks: Optional[str] = typer.Option(None, "--tasks", help="Comma-separated MTEB task or benchmark names, e.g. 'SciFact,MTEB(eng, v2)'."),
    task_dir: list[str] = typer.Option([], "--task-dir", help="Local retrieval set in BEIR layout (corpus.jsonl, queries.jsonl, qrels/test.tsv). Repeatable."),
    sts: list[str] = typer.Option([], "--sts", help="Local STS tsv (score, sentence1, sentence2). Repeatable."),
    pairs: list[str] = typer.Option([], "--pairs", help="Local pair-classification tsv (label 0/1, sentence1, sentence2); scored by cosine AP. Repeatable."),
    output_dir: str = typer.Option("results", "--output-dir", help="mteb's JSON per task; finished tasks are reused on a rerun."),
    instructions: Optional[str] = typer.Option(None, "--instructions", help="YAML overriding the shipped per-task instructions."),
    run: Optional[str] = typer.Option(None, "--run", help="Score this TREC run (with --qrels) instead of a model."),
    qrels: Optional[str] = typer.Option(None, "--qrels", help="Judgements for --run: BEIR tsv or TREC qrels."),
    prefetch: bool = typer.Option(False, "--prefetch", help="Only download the --tasks' data into the HF cache (needs a network)."),
    pooling: Optional[str] = PoolingOption,
    attention: Optional[str] = AttentionOption,
    max_length: Optional[int] = MaxLengthOption,
    dtype: str = DtypeOption,
    device: str = DeviceOption,
    trust_remote_code: bool = TrustOption,
    compile: Optional[bool] = CompileOption,
    backend: str = BackendOption,
    quiet: bool = QuietOption,
    verbose: bool = VerboseOption,
) -> None:
    """Evaluate a model on MTEB tasks and local sets, or score a search run. JSON summary on stdout."""
    show_progress = _output(quiet, verbose)
    import json  # --help: only evaluate writes JSON here

    from ullme_cli.evaluation import runner

    names = [n.strip() for n in _split_task_names(tasks)] if tasks else []  # 'MTEB(eng, v2)' has a comma
    if run or qrels:
        if not (run and qrels):
            raise UllmeError("--run and --qrels go together")
        typer.echo(json.dumps({"run": run, "scores": runner.score_run(run, qrels)}, indent=2))
        return
    if prefetch:
        log.info(f"cached: {', '.join(runner.prefetch(names))}")
        return
    runtime = Runtime(dtype, device, trust_remote_code, compile, backend)
    results = runner.evaluate(model, names, task_dir, sts, output_dir, instructions, runtime, show_progress, pooling=pooling,
                              attention=attention, max_length=max_length, pair_files=pairs)  # fmt: skip
    summary, table = runner.report(results, model)
    if show_progress:
        from ullme_cli.progress import stderr_console  # --help: as in _output

        stderr_console.print(table)
    typer.echo(json.dumps(summary, indent=2))


def _split_task_names(text: str) -> list[str]:
    """Split on commas outside parentheses."""
    names, depth, current = [], 0, ""
    for ch in text:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            names.append(current)
            current = ""
        else:
            current += ch
    return [n for n in names + [current] if n.strip()]


# Commands that keep finished work when interrupted, so that the same command continues it.
RESUMABLE = {"encode": "", "finetune": " with --resume"}


def _interrupted() -> None:
    command = next((a for a in sys.argv[1:] if not a.startswith("-")), "")
    if command in RESUMABLE:
        _err(f"ullme: interrupted; run the same command again{RESUMABLE[command]} to resume")
    else:
        _err("ullme: interrupted; no output was written")
    sys.exit(130)


def main() -> None:
    try:
        # Not standalone: click would print usage errors over several lines, and turns Ctrl-C into a
        # silent exit code 130, which it returns here (commands themselves return None).
        code = app(standalone_mode=False)
    except UllmeError as e:
        _report_error(str(e))
        sys.exit(2)
    except (KeyboardInterrupt, typer.Abort):
        _interrupted()
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except TyperException as e:  # usage errors: one line, with click's exit status (2)
        if type(e).__name__ == "NoArgsIsHelpError":
            e.show()
        else:
            _err(f"ullme: error: {e.format_message()} (see ullme {' '.join(a for a in sys.argv[1:2])} --help)")
        sys.exit(getattr(e, "exit_code", 2))
    except BrokenPipeError:
        sys.exit(1)
    except OSError as e:  # an unwritable or vanished path: the user's to fix, so one line, not a traceback
        where = e.filename or ""
        _err(f"ullme: error: {where}{': ' if where else ''}{e.strerror or e}")
        sys.exit(2)
    if code == 130:
        _interrupted()
    if isinstance(code, int):
        sys.exit(code)


if __name__ == "__main__":
    main()
