"""The server's body limit (declared or chunked, counted as bytes arrive, answered with JSON under plain
clients), per-request validation that keeps one client's bad text from failing others, and startup settings
refused in one line (issue 16, items 5-9)."""

from __future__ import annotations

import http.client
import json
import threading
import urllib.error
import urllib.request

import pytest
import torch
from test_serve import (  # noqa: F401  # noqa: F401  (module fixtures)
    ADAPTERS,
    MAX_CHARS,
    MAX_ROWS,
    LiveServer,
    _alive,
    _app,
    _bad_start,
    _inputs,
    client,
    reference,
    server,
    traps,
    work,
)

from adakron.serving.app import Limits


def _post_chunked(url: str, chunks, path: str = "/v1/predict") -> tuple[int, dict]:
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    connection.putrequest("POST", path)
    connection.putheader("content-type", "application/json")
    connection.putheader("transfer-encoding", "chunked")
    connection.endheaders()
    try:
        for chunk in chunks:
            connection.send(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
        connection.send(b"0\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server may answer and close before the client has sent everything
    response = connection.getresponse()
    body = json.loads(response.read())
    connection.close()
    return response.status, body


def test_a_chunked_body_over_the_limit_is_cut_off_with_a_413(server, client):  # noqa: F811
    limit = Limits(MAX_ROWS, MAX_CHARS).max_body_bytes
    status, body = _post_chunked(server.url, [b'{"adapter": "sst3", "inputs": ["' + b"a" * 65536] * 64)
    assert 64 * 65536 > limit
    assert status == 413 and body["error"]["type"] == "body_too_large"
    _alive(client)


def test_a_chunked_body_within_the_limit_is_served(server, client):  # noqa: F811
    payload = json.dumps({"adapter": "sst3", "inputs": ["the cat sat", "a dog ran"]}).encode()
    status, body = _post_chunked(server.url, [payload[:10], payload[10:]])
    assert status == 200 and len(body["predictions"]) == 2


def test_an_oversized_body_under_urllib_gets_the_json_413_not_a_reset(server, client):  # noqa: F811
    huge = json.dumps({"adapter": "sst3", "inputs": ["a" * 1_000_000] * 10}).encode()  # about 10 MB
    request = urllib.request.Request(server.url + "/v1/predict", data=huge,
                                     headers={"content-type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=60)
    assert caught.value.code == 413
    assert json.loads(caught.value.read())["error"]["type"] == "body_too_large"
    _alive(client)


def test_a_request_at_the_row_and_character_limits_is_never_too_large(server, client):  # noqa: F811
    # Every character outside the Basic Multilingual Plane: 12 bytes each once escaped, as json.dumps writes it.
    text = "\U0001F600" * MAX_CHARS
    body = json.dumps({"adapter": "rte", "inputs": [[text, text]] * MAX_ROWS}, indent=4)
    response = client.post("/v1/predict", content=body.encode(), headers={"content-type": "application/json"})
    assert response.status_code == 200, response.text


def test_a_lone_surrogate_fails_only_its_own_request(server, reference, work):  # noqa: F811
    """Two clients at once: one sends invalid Unicode, the other a valid request for another adapter."""
    import httpx

    results = {}

    def send(key, body):
        with httpx.Client(base_url=server.url, timeout=30) as c:
            results[key] = c.post("/v1/predict", content=body.encode(), headers={"content-type": "application/json"})

    bad = '{"adapter": "sst3", "inputs": ["fine", "bad \\ud800 text"]}'
    good = json.dumps({"adapter": "rte", "inputs": _inputs("rte", 3, seed=5)})
    threads = [threading.Thread(target=send, args=(k, b)) for k, b in (("bad", bad), ("good", good))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results["bad"].status_code == 422 and results["bad"].json()["error"]["type"] == "invalid_text"
    assert results["good"].status_code == 200
    expected = reference("rte", _inputs("rte", 3, seed=5))
    probs = [torch.softmax(e, -1)[1].item() for e in expected]
    got = [p["scores"]["LABEL_1"] for p in results["good"].json()["predictions"]]
    assert got == pytest.approx(probs, abs=1e-5)


def test_a_failure_inside_a_shared_batch_fails_only_the_request_that_caused_it(work, monkeypatch):  # noqa: F811
    from adakron.serving.engine import Pending

    app = _app(work)
    engine = app.state.engine
    real = engine._tokenize

    def fragile(entries, adapters):
        if any("poison" in row[0] for _, item in entries for row in item.rows):
            raise RuntimeError("tokenizer broke")
        return real(entries, adapters)

    monkeypatch.setattr(engine, "_tokenize", fragile)
    items = [Pending("sst3", [("the cat sat", None)], None, 0.0), Pending("sst3", [("poison", None)], None, 0.0),
             Pending("rte", [("a man", "a dog")], None, 0.0)]
    results = engine.run(items)
    assert results[1].status == 500
    assert isinstance(results[0], tuple) and isinstance(results[2], tuple)


@pytest.mark.parametrize("value", ["inf", "nan", "-1"])
def test_a_non_finite_or_negative_max_wait_is_refused_in_one_line(work, capsys, value):  # noqa: F811
    assert "--max-wait-ms" in _bad_start(work, capsys, "--adapter", f"rte={work['dirs']['rte']}",
                                         "--max-wait-ms", value)


def test_a_cuda_device_on_a_cpu_only_torch_is_one_line_and_exit_2(work, capsys):  # noqa: F811
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert "--device cuda" in _bad_start(work, capsys, "--adapter", f"rte={work['dirs']['rte']}", "--device", "cuda")


def test_an_unmerged_madakron_adapter_is_served_merged(work, tmp_path):  # noqa: F811
    import adakron
    from adakron import AdaKronConfig
    from conftest import tiny_model

    model = tiny_model(seed=0)
    adakron.add_adapter(model, AdaKronConfig(num_labels=3, num_experts=4, init="reference", initializer_range=0.3), name="moe")
    adakron.save_adapter(model, tmp_path / "moe", name="moe")
    (tmp_path / "moe" / "task.json").write_text(json.dumps({"task": "moe", "text_columns": ["sentence"],
                                                           "max_length": 24, "base_model": ""}))
    app = _app(work)
    served = app.state.engine.load("moe", tmp_path / "moe")
    plain = tiny_model(seed=0)
    adakron.add_adapter(plain, AdaKronConfig(num_labels=3), name="moe")
    assert served.parameters == adakron.adapter_parameters(plain, "moe")
    assert app.state.engine.model.adakron_state.configs["moe"].num_experts == 1
