"""`ullme serve` (docs/guide.md "ullme serve", design.md §11): a real server in a subprocess on a free loopback port, driven by real clients
(OpenAI's own Python client, httpx, a raw socket), against `ullme encode` and `ullme search`."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from conftest import RESOURCES, demo_texts, run_cli, write_corpus

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
KEY = "test-key-1234"
TRECQA = RESOURCES / "trecqa-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`ullme serve ...` on a free loopback port; ready once /health answers."""

    def __init__(self, *args, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen([sys.executable, "-m", "ullme_cli", "serve", *map(str, args), "--port", str(self.port), "-q"],
                                        env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"server exited {self.process.returncode}: {self.process.stderr.read().decode()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.2)
        self.stop()
        raise AssertionError("server did not start")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.wait()


@pytest.fixture(scope="module")
def served(tiny_llama, tmp_path_factory):
    """A served tiny model with an API key, small limits, and an index over the TREC QA test corpus."""
    root = tmp_path_factory.mktemp("serve")
    common = ["-m", tiny_llama, "--dtype", "float32", "-q"]
    assert run_cli("encode", TRECQA / "corpus.jsonl", "-o", root / "corpus.npy", *common).returncode == 0
    assert run_cli("index", root / "corpus.npy", "-o", root / "index", "-q").returncode == 0
    server = Server(tiny_llama, "--dtype", "float32", "--index", root / "index", "--api-key-env", "ULLME_TEST_KEY", "--max-inputs", "16",
                    env={"ULLME_TEST_KEY": KEY})  # fmt: skip
    yield server, root, tiny_llama
    assert server.stop() == 0


def cosine(a, b):
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_openai_client_gets_ullme_encode_vectors_for_both_sides(served):
    from openai import OpenAI

    server, root, model = served
    texts = demo_texts(12)
    client = OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
    name = client.models.list().data[0].id
    for kind, input_type in (("passage", "document"), ("query", "query")):
        path = write_corpus(root / f"{kind}.jsonl", texts)
        assert run_cli("encode", path, "-o", root / f"{kind}.npy", "-m", model, "--kind", kind, "--dtype", "float32", "-q").returncode == 0
        expected = np.load(root / f"{kind}.npy")
        response = client.embeddings.create(model=name, input=texts, encoding_format="float", extra_body={"input_type": input_type})
        served_vectors = np.array([d.embedding for d in response.data], dtype=np.float32)
        assert cosine(served_vectors, expected).min() >= 0.9999, kind
        assert response.usage.prompt_tokens > len(texts) and response.usage.total_tokens == response.usage.prompt_tokens
        raw = httpx.post(f"{server.url}/v1/embeddings", headers={"Authorization": f"Bearer {KEY}"},
                         json={"model": name, "input": texts, "encoding_format": "base64", "input_type": input_type}).json()  # fmt: skip
        decoded = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in raw["data"]])
        np.testing.assert_allclose(decoded, served_vectors, atol=1e-6)
    short = client.embeddings.create(model=name, input=texts[0], dimensions=16, encoding_format="float")
    cut = np.array(short.data[0].embedding)
    first = expected_document = np.load(root / "passage.npy")[0, :16]
    np.testing.assert_allclose(cut, first / np.linalg.norm(expected_document), atol=1e-5)
    assert len(cut) == 16 and abs(np.linalg.norm(cut) - 1) < 1e-5


def test_search_equals_ullme_search_on_trec_qa(served):
    server, root, model = served
    cli = run_cli("search", root / "index", TRECQA / "queries.jsonl", "-k", "5", "-o", "-", "-q")
    assert cli.returncode == 0, cli.stderr.decode()
    expected = [json.loads(line) for line in cli.stdout.decode().splitlines()]
    queries = [json.loads(line)["text"] for line in (TRECQA / "queries.jsonl").read_text().splitlines()]
    answer = httpx.post(f"{server.url}/v1/search", headers={"Authorization": f"Bearer {KEY}"}, json={"query": queries[:16], "k": 5}, timeout=60)
    assert answer.status_code == 200, answer.text
    for mine, theirs in zip(answer.json()["data"], expected[:16]):
        assert [h["id"] for h in mine["hits"]] == [h["id"] for h in theirs["hits"]]
        np.testing.assert_allclose([h["score"] for h in mine["hits"]], [h["score"] for h in theirs["hits"]], atol=1e-5)


@pytest.mark.parametrize("case, body, headers, status, code", [
    ("malformed-json", b'{"input": ["a"', None, 400, "invalid_json"),
    ("wrong-type", {"input": 5}, None, 400, "invalid_value"),
    ("token-arrays", {"input": [[1, 2, 3]]}, None, 400, "invalid_value"),
    ("empty-list", {"input": []}, None, 400, None),
    ("too-many-inputs", {"input": ["a"] * 17}, None, 413, "too_many_inputs"),
    ("over-long-input", {"input": ["word " * 5000]}, None, 413, "input_too_long"),
    ("wrong-key", {"input": "a"}, {"Authorization": "Bearer nope"}, 401, "invalid_api_key"),
    ("missing-key", {"input": "a"}, {}, 401, "invalid_api_key"),
    ("unknown-input-type", {"input": "a", "input_type": "passage-ish"}, None, 400, "invalid_value"),
    ("dimensions-above-the-model", {"input": "a", "dimensions": 100000}, None, 400, "invalid_value"),
    ("dimensions-zero", {"input": "a", "dimensions": 0}, None, 400, "invalid_value"),
    ("unknown-model", {"input": "a", "model": "gpt-nothing"}, None, 404, "model_not_found"),
    ("lone-surrogate", b'{"input": ["ok", "\\ud800"]}', None, 400, "invalid_value"),
])  # fmt: skip
def test_bad_requests_get_a_4xx_with_openais_error_shape(served, case, body, headers, status, code):
    server = served[0]
    headers = {"Authorization": f"Bearer {KEY}"} if headers is None else headers
    if isinstance(body, bytes):
        answer = httpx.post(f"{server.url}/v1/embeddings", content=body, headers={**headers, "Content-Type": "application/json"})
    else:
        answer = httpx.post(f"{server.url}/v1/embeddings", json=body, headers=headers)
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert set(error) >= {"message", "type", "code"} and error["message"] and "Traceback" not in answer.text
    if code:
        assert error["code"] == code, error
    if case == "wrong-type":
        assert "input" in error["message"]
    if case == "lone-surrogate":
        assert "'input'[1]" in error["message"] and "U+D800" in error["message"]


def test_health_models_and_metrics(served):
    server = served[0]
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"  # open, for load balancers
    assert httpx.get(f"{server.url}/v1/models").status_code == 401
    models = httpx.get(f"{server.url}/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert models["object"] == "list" and models["data"][0]["object"] == "model"
    metrics = httpx.get(f"{server.url}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    for name in ("ullme_requests_total{", "ullme_queue_texts", "ullme_batch_texts_bucket", "ullme_batch_tokens_bucket", "ullme_request_seconds_bucket"):
        assert name in metrics, name
    assert 'status="401"' in metrics and 'status="200"' in metrics


def test_a_client_killed_mid_request_leaves_the_server_healthy(served):
    server = served[0]
    body = json.dumps({"input": demo_texts(16)}).encode()
    for _ in range(3):  # send a request, then vanish before the answer
        with socket.create_connection(("127.0.0.1", server.port)) as s:
            s.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)  # fmt: skip
    answer = httpx.post(f"{server.url}/v1/embeddings", json={"input": ["still here"]}, headers={"Authorization": f"Bearer {KEY}"})
    assert answer.status_code == 200 and len(answer.json()["data"]) == 1
    assert server.process.poll() is None


def test_the_server_binds_loopback_unless_told_and_keyed(tiny_llama):
    refused = run_cli("serve", tiny_llama, "--host", "0.0.0.0", "--port", "1")
    assert refused.returncode != 0 and "--insecure-public" in refused.stderr.decode() and "Traceback" not in refused.stderr.decode()
    missing = run_cli("serve", tiny_llama, "--api-key-env", "ULLME_NO_SUCH_VARIABLE", "--port", "1")
    assert missing.returncode != 0 and "ULLME_NO_SUCH_VARIABLE" in missing.stderr.decode()


@pytest.mark.slow
def test_overload_answers_503_and_sigterm_finishes_every_accepted_request(tiny_llama):
    """A 3-second batch wait keeps requests in flight: a client that leaves has its texts withdrawn at once,
    and SIGTERM arriving while requests wait lets all of them complete."""
    server = Server(tiny_llama, "--dtype", "float32", "--max-queue", "8", "--max-wait-ms", "3000")
    try:
        overload = httpx.post(f"{server.url}/v1/embeddings", json={"input": ["a"] * 9})
        assert overload.status_code == 503 and overload.headers["Retry-After"] == "1" and overload.json()["error"]["code"] == "overloaded"
        body = json.dumps({"input": ["w"] * 4}).encode()
        with socket.create_connection(("127.0.0.1", server.port)) as s:
            s.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)  # fmt: skip
            deadline = time.monotonic() + 2
            while httpx.get(f"{server.url}/health").json()["queue"] != 4 and time.monotonic() < deadline:
                time.sleep(0.02)
        left = time.monotonic()
        while httpx.get(f"{server.url}/health").json()["queue"] and time.monotonic() - left < 2.5:
            time.sleep(0.02)
        assert httpx.get(f"{server.url}/health").json()["queue"] == 0 and time.monotonic() - left < 2.5, "the texts of a client that left stayed queued"
        assert httpx.post(f"{server.url}/v1/embeddings", json={"input": ["after"]}, timeout=30).status_code == 200
        results, threads = [], []

        def call(i):
            try:
                results.append(httpx.post(f"{server.url}/v1/embeddings", json={"input": [f"text {i}"]}, timeout=30).status_code)
            except httpx.ConnectError:
                results.append("not accepted")
            except httpx.TransportError as e:  # accepted, then dropped: what must not happen
                results.append(f"dropped: {type(e).__name__}")

        for i in range(6):
            threads.append(threading.Thread(target=call, args=(i,)))
            threads[-1].start()
        time.sleep(0.25)
        server.process.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(60)
        assert results.count(200) == 6, results
        assert server.process.wait(60) == 0
    finally:
        server.stop()


def rss_bytes(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


MEMORY_BOUND = 1536 * 2**20  # the server's resident memory under the flood below (it idles at ~0.45 GB with a tiny model)


@pytest.mark.slow
def test_no_request_takes_the_server_past_its_memory_bound_and_health_stays_fast(tiny_llama):
    """design.md §11: a chunked body far past the 8 MB limit, then 24 maximal requests (8 MB, 2048 inputs) from
    12 concurrent clients. The server's RSS stays under MEMORY_BOUND, /health answers within 1 s throughout,
    and the server keeps serving. It runs under RLIMIT_AS of 4 GB, so a bound that fails cannot take the
    machine down; every loop here is bounded in count and time, and talks only to loopback."""
    import resource

    def limited():
        resource.setrlimit(resource.RLIMIT_AS, (4 * 2**30, 4 * 2**30))

    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "ullme_cli", "serve", str(tiny_llama), "--port", str(port), "-q", "--dtype", "float32",
                                "--truncate"], preexec_fn=limited, stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    peak, slowest, stop = [0], [0.0], threading.Event()
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)

        def watch():
            while not stop.is_set() and process.poll() is None:
                peak[0] = max(peak[0], rss_bytes(process.pid))
                started = time.monotonic()
                try:
                    httpx.get(f"{url}/health", timeout=5)
                except httpx.TransportError:
                    pass
                slowest[0] = max(slowest[0], time.monotonic() - started)
                time.sleep(0.05)

        watcher = threading.Thread(target=watch)
        watcher.start()
        # 1. A chunked body with no Content-Length: 64 MB offered in 1 MB chunks; the server stops it at 8 MB.
        status = None
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
            chunk = b'{"input": ["' + b"x" * (2**20 - 12)
            try:
                for _ in range(64):
                    s.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                    chunk = b"y" * 2**20
            except OSError:
                pass  # the server answered and closed: what a bound looks like from here
            try:
                status = s.recv(64).split(b" ")[1]
            except (OSError, IndexError):
                pass
        assert status in (None, b"413"), status
        # 2. A flood of maximal requests from concurrent clients: each one 413, 503 or answered, none crashes the server.
        body = json.dumps({"input": ["w " * 1900] * 2048}).encode()
        assert len(body) < 8 * 2**20
        answers = []

        def flood():
            for _ in range(2):
                try:
                    answers.append(httpx.post(f"{url}/v1/embeddings", content=body, headers={"Content-Type": "application/json"}, timeout=120).status_code)
                except httpx.TransportError as e:
                    answers.append(type(e).__name__)

        clients = [threading.Thread(target=flood) for _ in range(12)]
        for c in clients:
            c.start()
        for c in clients:
            c.join(180)
        stop.set()
        watcher.join(10)
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        assert set(answers) <= {200, 503}, answers  # under load every body may be refused mid-stream (503): the bound, not a fault
        assert peak[0] < MEMORY_BOUND, f"server RSS reached {peak[0] / 2**20:.0f} MiB"
        assert slowest[0] < 1.0, f"/health took {slowest[0]:.2f} s under load"
        assert httpx.post(f"{url}/v1/embeddings", json={"input": ["after"]}, timeout=30).status_code == 200
    finally:
        stop.set()
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()


# ---------------------------------------------------------------- the batcher alone (no model, no HTTP)
def test_batcher_packs_under_the_budget_withdraws_cancelled_texts_and_drains_on_close():
    import asyncio

    from ullme_cli.models.embedder import Tokenized
    from ullme_cli.serving.batcher import Batcher, Overloaded

    batches, release = [], threading.Event()

    def encode(model, items):  # each vector is its text's length; the first batch waits until released
        if not batches:
            release.wait(10)
        batches.append([len(t.ids) for t in items])
        return np.array([[float(len(t.ids))] for t in items])

    text = lambda n: Tokenized(list(range(n)), 0)  # noqa: E731
    batcher = Batcher(encode, token_budget=64, max_queue=12, max_wait=0.05, max_batch=8)

    async def scenario():
        first = asyncio.ensure_future(batcher.embed([text(4)]))  # occupies the worker until released
        await asyncio.sleep(0.2)
        waiting = asyncio.ensure_future(batcher.embed([text(30), text(2), text(31), text(3)]))
        gone = asyncio.ensure_future(batcher.embed([text(5)] * 4))
        await asyncio.sleep(0.05)
        assert batcher.depth == 8
        with pytest.raises(Overloaded):
            await batcher.embed([text(1)] * 5)  # 8 waiting + 5 > 12
        gone.cancel()
        await asyncio.sleep(0.05)
        assert batcher.depth == 4, "a cancelled request's texts leave the queue"
        release.set()
        assert (await first)[:, 0].tolist() == [4]
        assert (await waiting)[:, 0].tolist() == [30, 2, 31, 3], "vectors come back in the request's order"

    asyncio.run(scenario())
    batcher.close(10)
    assert batches[0] == [4]
    assert sorted(x for b in batches[1:] for x in b) == [2, 3, 30, 31], batches
    assert all(sum(b) <= 64 for b in batches), batches  # the budget holds real tokens; groups keep padding low
    assert {30, 31} <= set(batches[1]), "the oldest waiting text goes first, with the one closest to its length"


def test_padding_groups_sort_by_length_and_keep_padding_low():
    from ullme_cli.serving.batcher import padding_groups

    lengths = [30, 5, 31, 6, 100, 29, 7, 99]
    groups = padding_groups(lengths, min_tokens=10, max_waste=0.2)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for group in groups:
        padded = max(lengths[i] for i in group) * len(group)
        assert len(group) == 1 or 1 - sum(lengths[i] for i in group) / padded <= 0.2 or sum(lengths[i] for i in group[:-1]) < 10
    assert padding_groups([8] * 40, min_tokens=128) == [list(range(40))], "equal lengths never split"


# ---------------------------------------------------------------- many adapters on one base; batch invariance
def make_adapter(base, folder, seed: int, **setup):
    """An adapter-only folder trained (here: randomised) on `base`, as finetune writes it by default."""
    import torch

    from ullme_cli.models.embedder import Embedder

    torch.manual_seed(seed)
    embedder = Embedder.load(str(base), dtype="float32", device="cpu", **setup).add_lora(r=4, alpha=8, dropout=0.0)
    with torch.no_grad():
        for name, p in embedder.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    return embedder.save(folder, reference_base=True)


def embeddings(url: str, texts, model: str | None = None, input_type: str = "document") -> np.ndarray:
    body = {"input": texts, "input_type": input_type, **({"model": model} if model else {})}
    response = httpx.post(f"{url}/v1/embeddings", json=body, timeout=120)
    assert response.status_code == 200, response.text
    assert response.json()["model"] == (model or response.json()["model"])
    return np.array([d["embedding"] for d in response.json()["data"]], dtype=np.float32)


@pytest.fixture(scope="module")
def adapters_served(tiny_llama, tmp_path_factory):
    """The tiny base served with two adapters on it: `a` in the base's setup, `b` with a query instruction."""
    root = tmp_path_factory.mktemp("adapters")
    folders = {"a": make_adapter(tiny_llama, root / "a", 1),
               "b": make_adapter(tiny_llama, root / "b", 2, query_instruction="Given a question, retrieve passages that answer it")}  # fmt: skip
    server = Server(tiny_llama, "--dtype", "float32", "--served-model-name", "base", *[f"--adapter={n}={f}" for n, f in folders.items()])
    yield server, root, folders
    assert server.stop() == 0


def test_each_adapter_gives_ullme_encode_vectors_with_that_adapter(adapters_served, tiny_llama):
    server, root, folders = adapters_served
    listed = httpx.get(f"{server.url}/v1/models", timeout=10).json()["data"]
    assert [m["id"] for m in listed] == ["base", "a", "b"] and [m.get("parent") for m in listed] == [None, "base", "base"]
    texts = demo_texts(12)
    corpus = write_corpus(root / "c.jsonl", texts)
    for model, folder in {"base": tiny_llama, **folders}.items():
        for kind, input_type in (("passage", "document"), ("query", "query")):
            out = root / f"{model}-{kind}.npy"
            result = run_cli("encode", corpus, "-o", out, "-m", folder, "--kind", kind, "--dtype", "float32", "-q")
            assert result.returncode == 0, result.stderr.decode()
            assert cosine(embeddings(server.url, texts, model, input_type), np.load(out)).min() >= 0.9999, (model, kind)
    differ = cosine(np.load(root / "a-query.npy"), np.load(root / "b-query.npy")).max()
    assert differ < 0.999, "the adapters must give other vectors, or this test proves nothing"
    missing = httpx.post(f"{server.url}/v1/embeddings", json={"input": "x", "model": "c"}, timeout=10)
    assert missing.status_code == 404 and "'base', 'a', 'b'" in missing.json()["error"]["message"]


def test_a_text_gets_the_same_vector_alone_and_in_concurrent_mixed_batches(adapters_served):
    """One text alone, then inside requests of 32 mixed-length texts from concurrent clients, some of them
    for other adapters (batches never mix adapters): cosine >= 0.99999 in float32."""
    import random
    from concurrent.futures import ThreadPoolExecutor

    server, _, _ = adapters_served
    pool = demo_texts(60)
    probes = pool[:8]
    alone = {(model, t): embeddings(server.url, [t], model)[0] for model in ("base", "a") for t in probes}

    def client(seed: int):
        rng = random.Random(seed)
        model = ("base", "a", "b", "base", "a", "base")[seed]
        texts = rng.sample(pool[8:], 28) + probes[:4] if seed % 2 else probes[4:] + rng.sample(pool[8:], 28)
        rng.shuffle(texts)
        return model, texts, embeddings(server.url, texts, model)

    with ThreadPoolExecutor(6) as threads:
        results = list(threads.map(client, range(6)))
    checked = 0
    for model, texts, matrix in results:
        for text, vector in zip(texts, matrix):
            if (model, text) in alone:
                reference = alone[(model, text)]
                assert float(vector @ reference / np.linalg.norm(vector) / np.linalg.norm(reference)) >= 0.99999, (model, text[:40])
                checked += 1
    assert checked >= 16


def test_serve_refuses_an_adapter_trained_on_another_base(tiny_llama, tmp_path):
    from tiny_models import save_tiny

    other = save_tiny(tmp_path / "other", "llama", demo_texts(), seed=7)
    foreign = make_adapter(other, tmp_path / "foreign", 3)
    result = run_cli("serve", tiny_llama, "--adapter", f"x={foreign}", "--port", str(free_port()))
    assert result.returncode == 2 and b"--adapter x=" in result.stderr and b"weights fingerprint" in result.stderr
    assert len(result.stderr.decode().strip().splitlines()) == 1
    bad = run_cli("serve", tiny_llama, "--adapter", "nameonly", "--port", str(free_port()))
    assert bad.returncode == 2 and b"expected NAME=PATH" in bad.stderr
    full = run_cli("serve", tiny_llama, "--adapter", f"x={tiny_llama}", "--port", str(free_port()))
    assert full.returncode == 2 and b"not an adapter-only folder" in full.stderr


def test_the_batcher_never_mixes_models_in_a_batch():
    import asyncio

    from ullme_cli.models.embedder import Tokenized
    from ullme_cli.serving.batcher import Batcher

    seen = []

    def encode(model, items):
        seen.append((model, len(items)))
        return np.array([[float(len(t.ids)), ord(model)] for t in items])

    batcher = Batcher(encode, token_budget=10_000, max_queue=100, max_wait=0.1, max_batch=64)
    text = lambda n: Tokenized(list(range(n)), 0)  # noqa: E731

    async def scenario():
        jobs = [batcher.embed([text(3), text(4)], model) for model in "abab"]
        return await asyncio.gather(*jobs)

    results = asyncio.run(scenario())
    batcher.close(10)
    assert [r[:, 1].tolist() for r in results] == [[97, 97], [98, 98], [97, 97], [98, 98]]
    assert sorted(seen) == [("a", 4), ("b", 4)], "texts for one model wait together; no batch holds two"
