"""The server under hostile traffic: slow and half-open clients do not block others, 200 concurrent clients get
200 answers, adapters loaded and unloaded while predictions are in flight never give one adapter's answer to
another's request, and SIGTERM lets the requests in flight finish."""

from __future__ import annotations

import random
import signal
import socket
import threading
import time

import httpx
from test_serve import (ADAPTERS, _alive, _check, _inputs, _serve_process, _version, client, reference,  # noqa: F401
                        server, work)


def test_slow_and_half_open_clients_do_not_block_other_clients(server, client):  # noqa: F811
    host, port = server.url.removeprefix("http://").split(":")
    idle = []
    for _ in range(5):  # connections that send half a request and then nothing
        s = socket.create_connection((host, int(port)))
        s.sendall(b"POST /v1/predict HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                  b"content-length: 1000\r\n\r\n{\"adapter\": \"sst3\", ")
        idle.append(s)
    trickle = socket.create_connection((host, int(port)))
    trickle.sendall(b"POST /v1/predict HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n")
    try:
        started = time.monotonic()
        for _ in range(5):
            trickle.sendall(b" ")  # a byte now and then, never the whole body
            _alive(client)
        assert time.monotonic() - started < 10
    finally:
        for s in [*idle, trickle]:
            s.close()


def test_two_hundred_concurrent_clients_all_get_their_answer(work, reference, server):  # noqa: F811
    inputs = {name: _inputs(name, 4, 300 + i) for i, name in enumerate(ADAPTERS)}
    expected = {name: reference(name, rows) for name, rows in inputs.items()}
    versions = {name: _version(work, name) for name in ADAPTERS}
    problems, lock, barrier = [], threading.Lock(), threading.Barrier(200)

    def one(i: int) -> None:
        name = list(ADAPTERS)[i % len(ADAPTERS)]
        with httpx.Client(base_url=server.url, timeout=120) as c:
            barrier.wait()
            try:
                wrong = _check(c.post("/v1/predict", json={"adapter": name, "inputs": inputs[name]}), name,
                               expected[name], versions[name], atol=1e-4)
            except httpx.HTTPError as e:
                wrong = [repr(e)]
        with lock:
            problems.extend(wrong)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(200)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert not any(t.is_alive() for t in threads) and problems == []


def test_loading_and_unloading_during_traffic_never_answers_with_another_adapter(work, reference, server):  # noqa: F811
    """One client keeps predicting with 'swap' while the admin endpoint loads it as rte, unloads it, loads it as
    sst3 (another head width), and so on: each answer is rte's or sst3's, matching its version, or a 404."""
    answers = {"rte": (reference("rte", _inputs("rte", 2, 9)), _version(work, "rte")),
               "sst3": (reference("sst3", _inputs("sst3", 2, 9)), _version(work, "sst3"))}
    rows = {"rte": _inputs("rte", 2, 9), "sst3": _inputs("sst3", 2, 9)}
    stop, problems, seen = threading.Event(), [], {"ok": 0, "refused": 0}
    by_version = {version: name for name, (_, version) in answers.items()}

    def predict() -> None:
        rng = random.Random(0)
        try:
            with httpx.Client(base_url=server.url, timeout=60) as c:
                while not stop.is_set():
                    kind = rng.choice(["rte", "sst3"])
                    response = c.post("/v1/predict", json={"adapter": "swap", "inputs": rows[kind]})
                    if response.status_code in (404, 409, 422):  # not loaded now, replaced, or the other row shape
                        seen["refused"] += 1
                        continue
                    if response.status_code != 200:
                        problems.append(f"status {response.status_code}: {response.text[:200]}")
                        continue
                    source = by_version.get(response.json()["version"])
                    if source != kind:  # rows of one shape answered by the other adapter, or by unknown weights
                        problems.append(f"{kind} rows answered by {source or 'unknown weights'}")
                        continue
                    problems.extend(_check_as(response, source, answers, rows))
                    seen["ok"] += 1
        except Exception as e:  # noqa: BLE001 - a dying client must fail the test, not vanish
            problems.append(repr(e))

    workers = [threading.Thread(target=predict) for _ in range(3)]
    for t in workers:
        t.start()
    with httpx.Client(base_url=server.url, timeout=60) as admin:
        for i in range(8):
            path = "rte" if i % 2 == 0 else "sst3"
            assert admin.post("/v1/adapters", json={"name": "swap", "path": path}).status_code == 201
            time.sleep(0.3)
            assert admin.delete("/v1/adapters/swap").status_code == 200
    stop.set()
    for t in workers:
        t.join(timeout=60)
    assert problems == [] and seen["ok"] > 0 and seen["refused"] > 0, (problems[:3], seen)


def _check_as(response, source: str, answers, rows) -> list[str]:
    """Problems with an answer that claims to come from ``source``'s weights (served under the name 'swap')."""
    import torch

    body = response.json()
    expected, version = answers[source]
    problems = []
    for row, logits in zip(body["predictions"], expected):
        if row["version"] != version:
            problems.append(f"row version {row['version']} != {version}")
        probs = torch.softmax(logits, -1)
        got = torch.tensor(list(row["scores"].values()))
        if got.shape != probs.shape or not torch.allclose(got, probs, atol=1e-4, rtol=0):
            problems.append(f"{source}: {row['scores']} != {probs.tolist()}")
    return problems


def test_sigterm_lets_the_requests_in_flight_finish(work):  # noqa: F811
    process, url, lines, reader = _serve_process(work, "--adapter", f"rte={work['dirs']['rte']}",
                                                 "--max-wait-ms", "200")
    results, started = [], threading.Barrier(9)

    def ask() -> None:
        with httpx.Client(base_url=url, timeout=60) as c:
            started.wait()
            try:
                results.append(c.post("/v1/predict", json={"adapter": "rte", "inputs": _inputs("rte", 4, 1)})
                               .status_code)
            except httpx.HTTPError as e:
                results.append(repr(e))

    try:
        threads = [threading.Thread(target=ask) for _ in range(8)]
        for t in threads:
            t.start()
        started.wait()
        time.sleep(0.05)  # the requests are in, waiting in the micro-batcher's 200 ms window
        process.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(timeout=60)
        assert process.wait(timeout=30) in (0, -signal.SIGTERM)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert results == [200] * 8, results


def test_sigint_then_sigterm_while_draining_still_exits_130(work):  # noqa: F811
    process, url, lines, reader = _serve_process(work, "--adapter", f"rte={work['dirs']['rte']}")
    try:
        with httpx.Client(base_url=url, timeout=30) as c:
            assert c.get("/healthz").status_code == 200
        process.send_signal(signal.SIGINT)
        process.send_signal(signal.SIGTERM)  # a supervisor's follow-up must not turn the exit code into 0
        assert process.wait(timeout=30) == 130
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
