"""Start `ullme serve`: check where it may bind, load the model (and indexes), and run uvicorn.

uvicorn owns the signals: on SIGTERM or Ctrl-C it stops accepting connections, lets the requests in
flight finish (up to the request timeout), then runs the app's shutdown, which drains the batcher; the
command then returns, and the process exits 0.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import signal

from ullme_cli.errors import UllmeError
from ullme_cli.model_setup import ModelSetup, Runtime
from ullme_cli.retrieval.search import in_index_dtype, open_indexes, require_query_agreement
from ullme_cli.serving.limits import Limits

log = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def read_api_key(variable: str | None) -> str | None:
    """The bearer key from the environment variable the user named (a key on the command line would show in
    `ps` and in shell history)."""
    if variable is None:
        return None
    key = os.environ.get(variable, "")
    if not key.strip():
        raise UllmeError(f"--api-key-env {variable}: that environment variable is not set or empty")
    return key.strip()


def check_binding(host: str, port: int, api_key: str | None, insecure_public: bool) -> None:
    if not 0 < port < 65536:
        raise UllmeError(f"--port must be between 1 and 65535, got {port}")
    if not is_loopback(host) and api_key is None and not insecure_public:
        raise UllmeError(f"--host {host}: serving beyond this machine needs a key (--api-key-env VAR); "
                         "or pass --insecure-public to serve without one")  # fmt: skip


def serve(
    setup: ModelSetup,
    runtime: Runtime,
    index_folders: list[str],
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key_env: str | None = None,
    insecure_public: bool = False,
    limits: Limits = Limits(),
    name: str | None = None,
    token_budget: int | None = None,
    access_log: bool = False,
    adapters: dict[str, str] | None = None,
) -> None:
    """Serve one model, and the LoRA adapters in `adapters` (name -> adapter-only folder) on its weights, and
    optionally search over indexes built with it, until SIGTERM or Ctrl-C."""
    api_key = read_api_key(api_key_env)
    check_binding(host, port, api_key, insecure_public)
    from ullme_cli.serving.app import build_app

    try:
        import uvicorn
    except ImportError:
        raise UllmeError("ullme serve needs its extra: pip install 'ullme[serve]'") from None
    from ullme_cli.models.adapters import load_adapters
    from ullme_cli.models.embedder import load_embedder

    opened = open_indexes(index_folders) if index_folders else []
    if opened:  # queries in the dtype the passages were encoded in, as `ullme search`
        runtime = in_index_dtype(runtime, opened[0].manifest)
    embedder = load_embedder(setup, runtime)
    if opened:
        require_query_agreement(embedder, opened[0].manifest, f"the served model ({setup.model})")
    name = name or setup.model
    served = load_adapters(name, embedder, adapters or {})
    app = build_app(served, opened, limits, api_key, token_budget)
    timeout = limits.timeout
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=access_log, lifespan="on",
                            timeout_graceful_shutdown=int(timeout) + 5, server_header=False,
                            limit_concurrency=limits.max_connections)  # fmt: skip
    log.info(f"serving {', '.join(served.names)} on http://{host}:{port} (POST /v1/embeddings{', /v1/search' if opened else ''}; GET /health, /v1/models, /metrics)")
    # uvicorn raises the signal again once its graceful shutdown is over, through the handler that was in
    # place before it: for SIGTERM that is this one, so a server stopped cleanly exits 0, not -15.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: log.info("stopped by SIGTERM after finishing the requests in flight"))
    try:
        uvicorn.Server(config).run()
    finally:
        signal.signal(signal.SIGTERM, previous)
