"""The HTTP server, talked to over loopback HTTP: a real uvicorn on a free 127.0.0.1 port, a tiny random
BERT, a tiny WordPiece tokenizer and three adapters whose heads differ in width."""

from __future__ import annotations

import json
import os
import queue
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch
import transformers
import uvicorn
from conftest import tiny_model

import adakron
from adakron import AdaKronConfig
from adakron.adapters.inject import task_heads
from adakron.serving import create_app, main

# name: (num_labels, text columns)
ADAPTERS = {"rte": (2, ["sentence1", "sentence2"]), "stsb": (1, ["sentence1", "sentence2"]),
            "sst3": (3, ["sentence"])}
MAX_LENGTH = 24
MAX_ROWS = 8
MAX_CHARS = 200
LOAD_SECONDS = float(os.environ.get("ADAKRON_SERVE_LOAD_SECONDS", "10"))
WORDS = ["the", "a", "cat", "dog", "man", "woman", "child", "bird", "sat", "ran", "slept", "ate", "is", "was", "not", "on", "in", "under", "over", "mat", "park", "house", "tree", "happy", "sad", "big", "small", "red", "blue", "quickly", "slowly", "today", "and", "but"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghijklmnopqrstuvwxyz.,!?", *WORDS, "##s", "##ed",
         "##ing", "##ly"]
assert len(VOCAB) <= 99  # the tiny model's vocabulary


# One torch thread for these tiny models, set for the module and restored after it.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))


def _inputs(name: str, count: int, seed: int) -> list:
    rng = random.Random(seed)
    pair = len(ADAPTERS[name][1]) == 2
    return [[_sentence(rng), _sentence(rng)] if pair else _sentence(rng) for _ in range(count)]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Tokenizer, model directory and adapter directories (adapters under <root>/adapters)."""
    base = tmp_path_factory.mktemp("serve")
    tokenizer_dir = base / "tokenizer"
    tokenizer_dir.mkdir()
    (tokenizer_dir / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    tokenizer = transformers.BertTokenizerFast.from_pretrained(str(tokenizer_dir))
    root = base / "adapters"
    model = tiny_model(seed=0)
    for seed, (name, (labels, columns)) in enumerate(ADAPTERS.items()):
        torch.manual_seed(seed)
        adakron.add_adapter(model, AdaKronConfig(num_labels=labels, init="reference", initializer_range=0.3), name=name)
        with torch.no_grad():  # a decisive head, so labels are not near-ties
            for p in task_heads(model)[0].heads[name].parameters():
                p.normal_(0.0, 1.0)
        adakron.save_adapter(model, root / name, name=name)
        (root / name / "task.json").write_text(json.dumps(
            {"task": name, "text_columns": columns, "max_length": MAX_LENGTH, "base_model": ""}))
    # The same model on disk, for the subprocess and main() tests.
    model_dir = base / "model"
    tiny_model(seed=0).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return {"base": base, "root": root, "tokenizer": tokenizer, "model_dir": model_dir,
            "dirs": {name: root / name for name in ADAPTERS}}


@pytest.fixture(scope="module")
def reference(work):
    """The library's answers: the same adapters loaded on another copy of the model, one adapter at a time."""
    model = tiny_model(seed=0)
    for name, directory in work["dirs"].items():
        adakron.load_adapter(model, directory, name=name)

    @torch.no_grad()
    def expected(name: str, inputs: list) -> list[torch.Tensor]:
        rows = [[r] if isinstance(r, str) else r for r in inputs]
        first = [r[0] for r in rows]
        second = [r[1] for r in rows] if len(rows[0]) == 2 else None
        batch = work["tokenizer"](first, second, truncation=True, max_length=MAX_LENGTH, padding=True,
                                  return_tensors="pt")
        with adakron.use_adapter(model, name):
            return list(model(**batch).logits)

    return expected


class LiveServer:
    """uvicorn serving ``app`` from a background thread, on a port the OS picked."""

    def __init__(self, app):
        self.app = app
        # IPPROTO_TCP, so asyncio turns Nagle off on the connections (as uvicorn's own sockets have).
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, name="test-uvicorn")

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)
        self.sock.close()
        assert not self.thread.is_alive(), "the server did not stop"


def _app(work, **kwargs):
    settings = dict(adapter_root=work["root"], allow_admin=True, max_rows=MAX_ROWS, max_chars=MAX_CHARS)
    return create_app(tiny_model(seed=0), work["tokenizer"], dict(work["dirs"]), **{**settings, **kwargs})


@pytest.fixture(scope="module")
def server(work):
    with LiveServer(_app(work)) as live:
        yield live


@pytest.fixture()
def client(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


def _check(response, name: str, expected: list[torch.Tensor], version: str, atol: float = 1e-5) -> list[str]:
    """What is wrong with a /v1/predict answer (empty: nothing)."""
    problems = []
    body = response.json()
    if response.status_code != 200:
        return [f"status {response.status_code}: {body}"]
    if body["adapter"] != name or body["version"] != version or len(body["predictions"]) != len(expected):
        return [f"wrong envelope {body}"]
    labels, problem = _labels(name)
    for row, logits in zip(body["predictions"], expected):
        if row["version"] != version:
            problems.append(f"row version {row['version']}")
        if problem == "regression":
            want = float(logits[0])
            if abs(row["scores"] - want) > atol or row["label"] != row["scores"]:
                problems.append(f"{name}: {row} != {want}")
            continue
        probs = torch.softmax(logits, -1)
        got = torch.tensor([row["scores"][label] for label in labels])
        if not torch.allclose(got, probs, atol=atol, rtol=0) or row["label"] != labels[int(probs.argmax())]:
            problems.append(f"{name}: {row} != {probs.tolist()}")
    return problems


def _labels(name: str) -> tuple[list[str], str]:
    labels = ADAPTERS[name][0]
    return [f"LABEL_{i}" for i in range(labels)], "regression" if labels == 1 else "classification"


def _version(work, name: str) -> str:
    return adakron.read_adapter(work["dirs"][name])[1]["weights_sha256"]


def _alive(client) -> None:
    assert client.get("/healthz").json()["status"] == "ok"
    response = client.post("/v1/predict", json={"adapter": "sst3", "inputs": ["the cat sat"]})
    assert response.status_code == 200 and response.json()["predictions"][0]["label"].startswith("LABEL_")


# ------------------------------------------------------------------------------------------- answers

def test_predictions_equal_the_library_with_use_adapter(work, reference, client):
    for seed, name in enumerate(ADAPTERS):
        inputs = _inputs(name, 6, seed)
        if name == "sst3":
            inputs[1] = [inputs[1]]  # ["text"] is a single-text row too
        response = client.post("/v1/predict", json={"adapter": name, "inputs": inputs})
        assert _check(response, name, reference(name, inputs), _version(work, name)) == []
    # Longer than max_length: truncated exactly as the library's tokenizer call does.
    long = [" ".join(["happy"] * 30)] * 2  # 30 tokens each, MAX_CHARS allows it
    response = client.post("/v1/predict", json={"adapter": "rte", "inputs": [long]})
    assert _check(response, "rte", reference("rte", [long]), _version(work, "rte")) == []


def test_lists_adapters_and_health(work, client):
    listed = {a["name"]: a for a in client.get("/v1/adapters").json()["adapters"]}
    assert set(listed) == set(ADAPTERS)
    for name, (labels, columns) in ADAPTERS.items():
        entry = listed[name]
        assert entry["labels"] == _labels(name)[0] and entry["num_texts"] == len(columns)
        assert entry["task"] == name and entry["hash"] == _version(work, name) and entry["max_length"] == MAX_LENGTH
        assert entry["problem_type"] == ("regression" if labels == 1 else "single_label_classification")
        assert entry["parameters"] > 0 and entry["head_parameters"] > 0
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["adapters"] == 3
    schema = client.get("/openapi.json").json()
    assert {"/v1/predict", "/v1/adapters", "/v1/adapters/{name}", "/healthz"} <= set(schema["paths"])
    assert "PredictRequest" in schema["components"]["schemas"]


def test_fifty_concurrent_clients_mixing_adapters_get_only_right_answers(work, reference, server):
    pools = {name: _inputs(name, 12, 100 + i) for i, name in enumerate(ADAPTERS)}
    expected = {name: reference(name, rows) for name, rows in pools.items()}
    versions = {name: _version(work, name) for name in ADAPTERS}
    counts = {"requests": 0, "errors": 0, "wrong": 0}
    problems: list[str] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + LOAD_SECONDS
    before = httpx.get(f"{server.url}/healthz").json()["stats"]

    def client_loop(seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(base_url=server.url, timeout=60) as c:
            while time.monotonic() < stop_at:
                name = rng.choice(list(ADAPTERS))
                picks = rng.sample(range(12), rng.randint(1, 3))
                try:
                    response = c.post("/v1/predict", json={"adapter": name, "inputs": [pools[name][i] for i in picks]})
                    wrong = _check(response, name, [expected[name][i] for i in picks], versions[name], atol=1e-4)
                    failed = response.status_code != 200
                except httpx.HTTPError as e:
                    wrong, failed = [repr(e)], True
                with lock:
                    counts["requests"] += 1
                    counts["errors"] += failed
                    counts["wrong"] += bool(wrong) and not failed
                    problems.extend(wrong[:1])

    threads = [threading.Thread(target=client_loop, args=(seed,)) for seed in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=LOAD_SECONDS + 120)
    assert not any(t.is_alive() for t in threads)
    assert counts["errors"] == 0 and counts["wrong"] == 0, (counts, problems[:5])
    assert counts["requests"] >= 50, counts
    after = httpx.get(f"{server.url}/healthz").json()["stats"]
    assert after["requests"] - before["requests"] == counts["requests"]
    # Under load, requests share forward passes, and adapters share them too.
    assert after["forward_passes"] - before["forward_passes"] < counts["requests"]
    assert after["mixed_forward_passes"] > before["mixed_forward_passes"]


def test_concurrent_requests_to_different_adapters_share_forward_passes(work, reference):
    # A long wait window makes the batching certain; 12 requests, 4 per adapter, leave together.
    jobs = [(name, _inputs(name, 2, 200 + i)) for i in range(4) for name in ADAPTERS]
    results: list = [None] * len(jobs)
    with LiveServer(_app(work, max_wait_ms=500, allow_admin=False)) as live:
        start = threading.Barrier(len(jobs))

        def send(i: int) -> None:
            with httpx.Client(base_url=live.url, timeout=30) as c:
                c.get("/healthz")  # connect first
                start.wait()
                results[i] = c.post("/v1/predict", json={"adapter": jobs[i][0], "inputs": jobs[i][1]})

        threads = [threading.Thread(target=send, args=(i,)) for i in range(len(jobs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        stats = httpx.get(f"{live.url}/healthz").json()["stats"]
    for (name, inputs), response in zip(jobs, results):
        assert _check(response, name, reference(name, inputs), _version(work, name)) == []
    assert stats["requests"] == len(jobs) and stats["rows"] == 2 * len(jobs)
    assert stats["forward_passes"] < len(jobs) / 2, stats
    assert stats["mixed_forward_passes"] >= 1 and stats["max_adapters_per_pass"] == 3, stats


# ---------------------------------------------------------------------------------------- bad input

BAD_REQUESTS = [
    ("unknown adapter", {"adapter": "nope", "inputs": ["x"]}, 404, "unknown_adapter"),
    ("pair for a single-text adapter", {"adapter": "sst3", "inputs": [["the cat", "a dog"]]}, 422,
     "wrong_input_shape"),
    ("one text for a pair adapter", {"adapter": "rte", "inputs": ["the cat"]}, 422, "wrong_input_shape"),
    ("three texts", {"adapter": "rte", "inputs": [["a", "b", "c"]]}, 422, "wrong_input_shape"),
    ("empty row", {"adapter": "sst3", "inputs": [[]]}, 422, "wrong_input_shape"),
    ("empty inputs", {"adapter": "sst3", "inputs": []}, 422, "invalid_request"),
    ("no inputs", {"adapter": "sst3"}, 422, "invalid_request"),
    ("number as text", {"adapter": "sst3", "inputs": [7]}, 422, "invalid_request"),
    ("unknown field", {"adapter": "sst3", "inputs": ["x"], "top_k": 2}, 422, "invalid_request"),
    ("not an object", ["sst3", "x"], 422, "invalid_request"),
    ("too many rows", {"adapter": "sst3", "inputs": ["cat"] * (MAX_ROWS + 1)}, 413, "too_many_rows"),
    ("text too long", {"adapter": "rte", "inputs": [["cat", "c" * (MAX_CHARS + 1)]]}, 413, "text_too_long"),
]


@pytest.mark.parametrize("body,status,kind", [c[1:] for c in BAD_REQUESTS], ids=[c[0] for c in BAD_REQUESTS])
def test_bad_requests_get_a_json_4xx_and_the_server_keeps_serving(client, body, status, kind):
    response = client.post("/v1/predict", json=body)
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["status"] == status and error["type"] == kind and error["message"]
    _alive(client)


def test_malformed_json_oversized_bodies_and_unknown_routes_get_json_errors(server, client):
    response = client.post("/v1/predict", content=b'{"adapter": "sst3", "inputs": [',
                           headers={"content-type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["type"] == "malformed_json"
    huge = json.dumps({"adapter": "sst3", "inputs": ["a" * 10_000] * 2000}).encode()
    response = client.post("/v1/predict", content=huge, headers={"content-type": "application/json"})
    assert response.status_code == 413 and response.json()["error"]["type"] == "body_too_large"
    assert client.get("/v1/nothing").json()["error"]["status"] == 404
    response = client.get("/v1/predict")
    assert response.status_code == 405 and response.json()["error"]["status"] == 405
    _alive(client)


# -------------------------------------------------------------------------------------------- admin

def _listed(client) -> dict[str, str]:
    return {a["name"]: a["hash"] for a in client.get("/v1/adapters").json()["adapters"]}


def test_admin_loads_serves_and_unloads_an_adapter_under_the_root(work, reference, client):
    before = _listed(client)
    response = client.post("/v1/adapters", json={"name": "rte_copy", "path": "rte"})
    assert response.status_code == 201, response.text
    assert response.json()["hash"] == _version(work, "rte")
    inputs = _inputs("rte", 3, 7)
    answer = client.post("/v1/predict", json={"adapter": "rte_copy", "inputs": inputs}).json()
    assert [row["scores"] for row in answer["predictions"]] == [
        row["scores"] for row in client.post("/v1/predict", json={"adapter": "rte", "inputs": inputs}).json()[
            "predictions"]]
    assert client.delete("/v1/adapters/rte_copy").json() == {"removed": "rte_copy"}
    assert client.post("/v1/predict", json={"adapter": "rte_copy", "inputs": inputs}).status_code == 404
    assert client.delete("/v1/adapters/rte_copy").status_code == 404
    assert _listed(client) == before


@pytest.fixture(scope="module")
def traps(work):
    """Adapter directories the server must refuse: outside the root (reached by '..', an absolute path,
    a symlinked directory or a symlinked file), and inside it but unloadable."""
    base, root = work["base"], work["root"]
    outside = base / "outside"
    model = tiny_model(seed=0)
    adakron.add_adapter(model, AdaKronConfig(num_labels=2), name="evil")
    adakron.save_adapter(model, outside / "evil", name="evil")
    (root / "link").symlink_to(outside / "evil", target_is_directory=True)
    (root / "halflink").mkdir()
    (root / "halflink" / "adapter_config.json").write_text((outside / "evil" / "adapter_config.json").read_text())
    (root / "halflink" / "adapter_model.safetensors").symlink_to(outside / "evil" / "adapter_model.safetensors")
    (root / "corrupt").mkdir()
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        data = (root / "rte" / f).read_bytes()
        (root / "corrupt" / f).write_bytes(data if f.endswith("json") else data[: len(data) // 2])
    wide = transformers.AutoModelForSequenceClassification.from_config(transformers.BertConfig(
        hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, vocab_size=99))
    adakron.add_adapter(wide, AdaKronConfig(num_labels=2), name="wide")
    adakron.save_adapter(wide, root / "wide", name="wide")
    (root / "badtask").mkdir()
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        (root / "badtask" / f).write_bytes((root / "rte" / f).read_bytes())
    (root / "badtask" / "task.json").write_text('{"text_columns": ["a", "b", "c"]}')
    (root / "lora").mkdir()  # a run of another method: not an AdaKron adapter
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        (root / "lora" / f).write_bytes((root / "rte" / f).read_bytes())
    (root / "lora" / "task.json").write_text('{"method": "lora", "text_columns": ["a"]}')
    return {"outside": outside, "wide": root / "wide"}


def test_admin_refuses_paths_outside_the_root_and_failing_loads_change_nothing(traps, server, client):
    outside = traps["outside"]
    before = _listed(client)
    model = server.app.state.engine.model
    names_before = adakron.adapter_names(model)
    cases = [
        ({"name": "x", "path": "../outside/evil"}, 403),
        ({"name": "x", "path": str(outside / "evil")}, 403),
        ({"name": "x", "path": "rte/../../outside/evil"}, 403),
        ({"name": "x", "path": "link"}, 403),
        ({"name": "x", "path": "halflink"}, 403),
        ({"name": "x", "path": "/etc"}, 403),
        ({"name": "x", "path": "missing"}, 404),
        ({"name": "x", "path": "corrupt"}, 422),
        ({"name": "x", "path": "wide"}, 422),
        ({"name": "x", "path": "badtask"}, 422),
        ({"name": "x", "path": "lora"}, 422),
        ({"name": "rte", "path": "stsb"}, 409),
        ({"name": "bad name!", "path": "rte"}, 422),
        ({"name": "x"}, 422),
    ]
    for body, status in cases:
        response = client.post("/v1/adapters", json=body)
        assert response.status_code == status, (body, response.text)
        assert response.json()["error"]["status"] == status
        assert _listed(client) == before, body
        assert adakron.adapter_names(model) == names_before, body
    _alive(client)


def test_admin_endpoints_are_forbidden_without_allow_admin(work):
    with LiveServer(_app(work, allow_admin=False)) as live, httpx.Client(base_url=live.url, timeout=30) as c:
        assert c.post("/v1/adapters", json={"name": "x", "path": "rte"}).status_code == 403
        response = c.delete("/v1/adapters/rte")
        assert response.status_code == 403 and response.json()["error"]["type"] == "admin_disabled"
        assert set(_listed(c)) == set(ADAPTERS)
        _alive(c)


# ------------------------------------------------------------------------------------ start and stop

def test_stopping_the_server_leaves_no_thread_behind(work):
    before = set(threading.enumerate())
    with LiveServer(_app(work)) as live, httpx.Client(base_url=live.url, timeout=30) as c:
        _alive(c)
        assert any(t.name.startswith("adakron-forward") for t in threading.enumerate())
    time.sleep(0.1)
    assert set(threading.enumerate()) - before == set()


def _serve_process(work, *args: str, ignore_sigint: bool = False
                   ) -> tuple[subprocess.Popen, str, queue.Queue, threading.Thread]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "adakron.serving", "--model", str(work["model_dir"]), "--port", "0",
               "--threads", "1", *args]
    # A shell starts background jobs with SIGINT ignored (the child inherits that); the server must still
    # stop on it, exiting 130.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if ignore_sigint else None
    try:
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    finally:
        if ignore_sigint:
            signal.signal(signal.SIGINT, previous)
    lines: queue.Queue = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True)
    reader.start()
    deadline = time.monotonic() + 60
    seen = []
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            assert process.poll() is None, "".join(seen)
            continue
        seen.append(line)
        match = re.search(r"Uvicorn running on (http://127\.0\.0\.1:\d+)", line)
        if match:
            return process, match.group(1), lines, reader
    process.kill()
    raise AssertionError("the server did not start:\n" + "".join(seen))


@pytest.mark.parametrize("sig,codes,ignore_sigint", [(signal.SIGTERM, (0, -signal.SIGTERM), False),
                                                    (signal.SIGINT, (130,), False), (signal.SIGINT, (130,), True)],
                         ids=["SIGTERM", "SIGINT", "SIGINT-ignored-by-the-parent"])
def test_the_command_serves_and_shuts_down_cleanly_on_a_signal(work, sig, codes, ignore_sigint):
    process, url, lines, reader = _serve_process(work, "--adapter", f"rte={work['dirs']['rte']}",
                                                 "--adapter", f"sst3={work['dirs']['sst3']}", "--log-level", "info",
                                                 ignore_sigint=ignore_sigint)
    try:
        with httpx.Client(base_url=url, timeout=30) as c:
            _alive(c)
        process.send_signal(sig)
        assert process.wait(timeout=30) in codes
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    reader.join(timeout=10)
    output = "".join(lines.get() for _ in range(lines.qsize()))
    assert "Application shutdown complete" in output and "Traceback" not in output, output


def _bad_start(work, capsys, *argv: str) -> str:
    assert main(["--model", str(work["model_dir"]), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    return err


def test_bad_startup_input_is_one_line_on_stderr_and_exit_code_2(work, traps, capsys):
    root = work["root"]
    assert "no such directory" in _bad_start(work, capsys, "--adapter", f"rte={work['base'] / 'nowhere'}")
    assert "NAME=DIR" in _bad_start(work, capsys, "--adapter", str(root / "rte"))
    assert "nothing to serve" in _bad_start(work, capsys)
    assert "--adapter-root" in _bad_start(work, capsys, "--allow-admin")
    assert "does not fit" in _bad_start(work, capsys, "--adapter", f"w={traps['wide']}")
    assert "cannot load model" in _bad_start(work, capsys, "--adapter", f"rte={root / 'rte'}", "--model",
                                             str(work["base"] / "nowhere"))
