"""Latency and throughput of `adakron serve` under N concurrent clients mixing adapters.

Starts the server as a subprocess (``python -m adakron.serving``) on a free loopback port with K adapters
(random AdaKron weights: the numbers are about speed, not accuracy), then N asyncio clients send
``/v1/predict`` requests for ``--duration`` seconds, each request to the next adapter in turn. Reports
p50/p90/p99 latency, requests/s and rows/s, and the server's forward-pass counters; prints a table and
writes benchmarks/results/serve.json.

    python benchmarks/serve.py                       # embedded all-MiniLM-L6-v2, 32 clients, 3 adapters, 10 s
    python benchmarks/serve.py --tiny --clients 50   # a tiny random BERT: measures the server's own overhead
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import queue
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch
import transformers
from mixed_batch import _cpu

import adakron
from adakron import AdaKronConfig

RESULTS = Path(__file__).resolve().parent / "results"
WORDS = ["the", "a", "man", "woman", "child", "dog", "cat", "bird", "car", "house", "park", "city", "river", "tree", "food", "film", "book", "song", "game", "team", "is", "was", "not", "very", "quite", "really", "runs", "sleeps", "eats", "reads", "plays", "loves", "hates", "sees", "finds", "makes", "good", "bad", "happy", "sad", "big", "small", "old", "new", "red", "blue", "quickly", "slowly", "today", "yesterday", "and", "but", "because", "with", "without"]
# (head width, text columns): a pair task, a regression pair task, a 3-way single-sentence task, ...
KINDS = [(2, ["sentence1", "sentence2"]), (1, ["sentence1", "sentence2"]), (3, ["sentence"]), (2, ["sentence"])]


def _tiny(directory: Path) -> None:
    """A tiny random BERT and a WordPiece tokenizer over WORDS, saved like a hub model."""
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghijklmnopqrstuvwxyz", *WORDS]
    directory.mkdir(parents=True)
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = transformers.BertTokenizerFast.from_pretrained(str(directory))
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                                     vocab_size=len(vocab), num_labels=2)
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def prepare(args, work: Path) -> tuple[str | None, dict[str, Path]]:
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    model_arg = None
    if args.tiny:
        model_arg = str(work / "model")
        _tiny(work / "model")
    from adakron.models import load_classifier

    model = load_classifier(model_arg, num_labels=2)
    adapters = {}
    for i in range(args.adapters):
        width, columns = KINDS[i % len(KINDS)]
        name = f"task{i}"
        torch.manual_seed(i)
        adakron.add_adapter(model, AdaKronConfig(num_labels=width), name=name)
        adakron.save_adapter(model, work / name, name=name)
        (work / name / "task.json").write_text(json.dumps(
            {"task": None, "method": "adakron", "text_columns": columns, "max_length": args.max_length,
             "base_model": model_arg or "all-MiniLM-L6-v2"}))
        adapters[name] = work / name
    return model_arg, adapters


def start_server(args, model_arg: str | None, adapters: dict[str, Path]) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "adakron.serving", "--port", "0", "--log-level", "warning",
               "--threads", str(args.threads), "--max-wait-ms", str(args.max_wait_ms),
               "--max-batch", str(args.max_batch), "--max-rows", str(max(64, args.rows))]
    if model_arg:
        command += ["--model", model_arg]
    for name, directory in adapters.items():
        command += ["--adapter", f"{name}={directory}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(args.threads)}
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()
    deadline = time.monotonic() + 180
    seen = []
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            if process.poll() is not None:
                break
            continue
        seen.append(line)
        match = re.search(r"Uvicorn running on (http://\S+)", line)
        if match:
            return process, match.group(1)
    process.kill()
    raise SystemExit("the server did not start:\n" + "".join(seen))


def _row(rng: random.Random, columns: list[str]) -> list[str]:
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 20))) for _ in columns]


class RawConnection:
    """A keep-alive HTTP/1.1 connection on asyncio streams. httpx.AsyncClient costs ~4 ms of CPU per
    request at 50 connections, enough to make the client, not the server, the bottleneck on a small box."""

    def __init__(self, url: str):
        match = re.fullmatch(r"http://([^/:]+|\[[^]]+\]):(\d+)", url)
        self.host, self.port = match.group(1).strip("[]"), int(match.group(2))
        self.reader = self.writer = None

    async def post(self, path: str, body: dict) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        payload = json.dumps(body).encode()
        self.writer.write(f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
                          f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = dict(line.split(":", 1) for line in lines[1:] if ":" in line)
        length = int({k.lower(): v for k, v in headers.items()}.get("content-length", "0"))
        return status, await self.reader.readexactly(length)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            await self.writer.wait_closed()


async def load(args, url: str, adapters: dict[str, Path]) -> tuple[list[float], int, int, float]:
    columns = {name: KINDS[i % len(KINDS)][1] for i, name in enumerate(adapters)}
    names = list(adapters)
    latencies: list[float] = []
    errors = 0
    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        for name in names:  # warm-up: every adapter once
            body = {"adapter": name, "inputs": [_row(random.Random(0), columns[name])]}
            (await client.post("/v1/predict", json=body)).raise_for_status()
        started = time.perf_counter()
        stop_at = started + args.duration

        async def one_client(k: int) -> None:
            nonlocal errors
            rng = random.Random(k)
            raw = RawConnection(url) if args.client == "raw" else None
            i = k
            try:
                while time.perf_counter() < stop_at:
                    name = names[i % len(names)]
                    i += 1
                    body = {"adapter": name, "inputs": [_row(rng, columns[name]) for _ in range(args.rows)]}
                    t = time.perf_counter()
                    try:
                        if raw is not None:
                            status, data = await raw.post("/v1/predict", body)
                        else:
                            response = await client.post("/v1/predict", json=body)
                            status, data = response.status_code, response.content
                        ok = status == 200 and len(json.loads(data)["predictions"]) == args.rows
                    except (httpx.HTTPError, OSError, asyncio.IncompleteReadError, ValueError, KeyError):
                        ok = False
                        if raw is not None:
                            await raw.close()
                            raw = RawConnection(url)
                    if ok:
                        latencies.append(time.perf_counter() - t)
                    else:
                        errors += 1
            finally:
                if raw is not None:
                    await raw.close()

        await asyncio.gather(*(one_client(k) for k in range(args.clients)))
        elapsed = time.perf_counter() - started
    return latencies, errors, len(latencies) + errors, elapsed


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="A tiny random BERT instead of the embedded MiniLM.")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--duration", type=float, default=10.0, help="Seconds of load.")
    p.add_argument("--adapters", type=int, default=3)
    p.add_argument("--rows", type=int, default=1, help="Rows per request.")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--max-wait-ms", type=float, default=10.0)
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="The server's torch threads.")
    p.add_argument("--client", choices=["raw", "httpx"], default="raw",
                   help="raw: minimal HTTP/1.1 over asyncio streams (cheap); httpx: httpx.AsyncClient.")
    p.add_argument("--out", default=str(RESULTS / "serve.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory(prefix="adakron-serve-bench-") as tmp:
        model_arg, adapters = prepare(args, Path(tmp))
        process, url = start_server(args, model_arg, adapters)
        try:
            before = httpx.get(f"{url}/healthz").json()["stats"]
            server_cpu, client_cpu = _cpu_seconds(process.pid), time.process_time()
            latencies, errors, requests, elapsed = asyncio.run(load(args, url, adapters))
            server_cpu, client_cpu = _cpu_seconds(process.pid) - server_cpu, time.process_time() - client_cpu
            after = httpx.get(f"{url}/healthz").json()["stats"]
        finally:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    if not latencies:
        raise SystemExit(f"no request succeeded ({errors} errors)")
    passes = after["forward_passes"] - before["forward_passes"]
    rows = after["rows"] - before["rows"]
    ms = [1000 * v for v in latencies]
    result = {
        "benchmark": "serve",
        "command": "python benchmarks/" + Path(__file__).name + (" " + " ".join(argv if argv is not None
                                                                               else sys.argv[1:])).rstrip(),
        "model": "tiny random BERT (hidden 32, 2 layers)" if args.tiny else "all-MiniLM-L6-v2 (embedded)",
        "clients": args.clients, "duration_s": round(elapsed, 2), "adapters": args.adapters,
        "rows_per_request": args.rows, "max_length": args.max_length, "max_wait_ms": args.max_wait_ms,
        "max_batch": args.max_batch, "server_threads": args.threads, "client": args.client,
        "requests": requests, "errors": errors,
        "requests_per_s": len(latencies) / elapsed, "rows_per_s": len(latencies) * args.rows / elapsed,
        "latency_ms": {"p50": _percentile(ms, 50), "p90": _percentile(ms, 90), "p99": _percentile(ms, 99),
                       "mean": statistics.fmean(ms), "max": max(ms)},
        "server": {"forward_passes": passes, "rows_per_forward_pass": rows / passes if passes else None,
                   "mixed_forward_passes": after["mixed_forward_passes"] - before["mixed_forward_passes"],
                   "max_rows_per_pass": after["max_rows_per_pass"],
                   "max_adapters_per_pass": after["max_adapters_per_pass"]},
        "cpu_seconds": {"server": round(server_cpu, 2), "client": round(client_cpu, 2)},
        "machine": {"cpu": _cpu(), "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                    else os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__},
        "note": "client and server share the machine's cores; latency is measured at the client.",
    }
    lat = result["latency_ms"]
    print(f"\n{result['model']}, {args.clients} clients, {args.adapters} adapters, {args.rows} row(s)/request, "
          f"{elapsed:.1f} s")
    print(f"{'requests':>9}{'errors':>8}{'req/s':>9}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'passes':>8}"
          f"{'rows/pass':>10}{'mixed':>7}")
    rpp = result["server"]["rows_per_forward_pass"]
    print(f"{requests:>9}{errors:>8}{result['requests_per_s']:>9.1f}{lat['p50']:>9.1f}{lat['p90']:>9.1f}"
          f"{lat['p99']:>9.1f}{passes:>8}{(rpp or 0):>10.1f}{result['server']['mixed_forward_passes']:>7}")
    print(f"CPU seconds during the load: server {server_cpu:.1f}, client {client_cpu:.1f} "
          f"(of {elapsed * result['machine']['cores']:.1f} available)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0 if errors == 0 else 1


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` (Linux /proc; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


if __name__ == "__main__":
    sys.exit(main())
