"""`adakron serve`: flags, startup checks with one-line errors, and the uvicorn server. A classifier gets the
adakron API; a causal LM (``models.is_causal_lm``) the OpenAI-compatible one."""

from __future__ import annotations

import argparse
import gc
import math
import signal
import socket
import sys
from pathlib import Path

import torch

from ..adapters.checkpoint import AdapterLoadError
from ..errors import Parser, UsageError, first_line, positive_int
from .app import DEFAULT_MAX_CHARS, DEFAULT_MAX_ROWS, DEFAULT_MAX_TOKENS, DEFAULT_MAX_WAIT_MS, create_app
from .engine import ADAPTER_NAME, DEFAULT_MAX_BATCH
from .schemas import ServeError


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number >= 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="adakron serve", description="Serve AdaKron adapters over HTTP (FastAPI): a classifier on "
                                                 "/v1/predict, a causal LM on the OpenAI-compatible /v1/completions "
                                                 "and /v1/chat/completions.")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="Serve the adapter saved in DIR as NAME (repeat for more). For a causal LM, NAME is the "
                        "`model` a request names.")
    p.add_argument("--model", default=None, help="Base model path or hub id (default: the embedded all-MiniLM-L6-v2; "
                                                 "smollm2: the embedded SmolLM2-135M-Instruct, a causal LM).")
    p.add_argument("--served-model-name", default=None,
                   help="Causal LM: the `model` name that selects the base model, no adapter (default: --model).")
    p.add_argument("--max-tokens", type=positive_int, default=DEFAULT_MAX_TOKENS,
                   help="Causal LM: the most tokens one request may generate (400 above).")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port.")
    p.add_argument("--adapter-root", default=None, help="The only directory POST /v1/adapters may load from.")
    p.add_argument("--allow-admin", action="store_true", help="Enable POST/DELETE /v1/adapters.")
    p.add_argument("--max-rows", type=positive_int, default=DEFAULT_MAX_ROWS,
                   help="Rows per request (413 above); for a causal LM, prompts per /v1/completions request.")
    p.add_argument("--max-chars", type=positive_int, default=DEFAULT_MAX_CHARS,
                   help="Characters per text (413 above).")
    p.add_argument("--max-wait-ms", type=_non_negative_float, default=DEFAULT_MAX_WAIT_MS,
                   help="How long a request may wait for others to share its forward pass (0: no wait; a pass "
                        "still takes every request that queued during the previous one).")
    p.add_argument("--max-batch", type=positive_int, default=DEFAULT_MAX_BATCH,
                   help="Rows per forward pass; for a causal LM, rows decoded together.")
    p.add_argument("--device", default="cpu", help="torch device for the model, e.g. cpu or cuda.")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's).")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return p


def _parse_adapters(values: list[str]) -> dict[str, str]:
    adapters: dict[str, str] = {}
    for value in values:
        name, sep, directory = value.partition("=")
        if not sep or not ADAPTER_NAME.fullmatch(name) or not directory:
            raise ServeError(400, "invalid_setting", f"--adapter {value!r}: expected NAME=DIR with NAME made of "
                                                     "letters, digits, '_' or '-', e.g. --adapter rte=runs/rte.")
        if name in adapters:
            raise ServeError(400, "invalid_setting", f"--adapter {name!r} is given twice.")
        if not Path(directory).is_dir():
            raise ServeError(400, "invalid_setting", f"--adapter {name}={directory}: no such directory.")
        adapters[name] = directory
    return adapters


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto must say TCP: asyncio sets TCP_NODELAY only on such sockets, and without it every response
    # waits ~40 ms for a delayed ACK (Nagle).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
        sock.set_inheritable(True)
    except BaseException:
        sock.close()
        raise
    return sock


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, or a malformed flag (argparse has printed why)
        return int(e.code or 0)

    def fail(message: str) -> int:
        print(f"adakron serve: error: {message}", file=sys.stderr)
        return 2

    import transformers
    import uvicorn
    from transformers import AutoModelForSequenceClassification

    from ..models import check_device, is_causal_lm, load_causal_lm, load_tokenizer, resolve_model

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        adapters = _parse_adapters(args.adapter)
        if args.adapter_root is not None and not Path(args.adapter_root).is_dir():
            return fail(f"--adapter-root {args.adapter_root}: no such directory.")
        if args.allow_admin and args.adapter_root is None:
            return fail("--allow-admin needs --adapter-root DIR: the only place adapters may be loaded from.")
        if not 0 <= args.port <= 65535:
            return fail(f"--port {args.port} is not a port number.")
        check_device(args.device)
        causal = is_causal_lm(args.model)  # a causal LM may serve its base model alone
        if causal and args.allow_admin:
            return fail("--allow-admin (loading adapters at run time) is not supported for causal LMs; pass them "
                        "with --adapter NAME=DIR.")
        if not adapters and not args.allow_admin and not causal:
            return fail("nothing to serve: pass --adapter NAME=DIR (or --allow-admin to load adapters at run time).")
        model_path = resolve_model(args.model)
        try:
            if causal:
                model, tokenizer = load_causal_lm(args.model)
            else:
                tokenizer = load_tokenizer(args.model)
                model = AutoModelForSequenceClassification.from_pretrained(model_path)
            model = model.to(args.device).eval()
        except (OSError, ValueError, RuntimeError) as e:
            first = first_line(e)
            return fail(f"cannot load model {args.model or model_path!r}: {first}")
        app = create_app(model, tokenizer, adapters, adapter_root=args.adapter_root, allow_admin=args.allow_admin,
                         max_rows=args.max_rows, max_chars=args.max_chars, max_wait_ms=args.max_wait_ms,
                         max_batch=args.max_batch, model_name=args.served_model_name or args.model,
                         max_tokens=args.max_tokens)
    except (ServeError, AdapterLoadError, UsageError) as e:
        return fail(str(e).splitlines()[0])
    try:
        sock = _bind(args.host, args.port)
    except OSError as e:
        return fail(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}")
    port = sock.getsockname()[1]
    url = f"http://[{args.host}]:{port}" if ":" in args.host else f"http://{args.host}:{port}"

    class Server(uvicorn.Server):
        def __init__(self, config) -> None:
            super().__init__(config)
            self.signals: list[int] = []

        def handle_exit(self, sig, frame) -> None:
            # uvicorn re-raises the signal after shutting down, but a SIGINT inherited as ignored (a job started
            # in the background by a shell) is then lost: remember every signal, so that a SIGINT means 130
            # whatever came after it (a SIGTERM sent by an impatient supervisor while requests drain would
            # otherwise decide the exit code, the likely cause of the one exit 0 seen under load).
            self.signals.append(sig)
            if sig != signal.SIGINT and signal.SIGINT in self.signals:
                # Already stopping for a SIGINT: uvicorn would re-raise this signal too, last in first out,
                # and its default action would end the process before the SIGINT (exit 130) does.
                self.should_exit = True
                return
            super().handle_exit(sig, frame)

        async def startup(self, sockets=None) -> None:
            await super().startup(sockets=sockets)
            if self.started:  # uvicorn does not log the address of a socket it was handed
                print(f"adakron serve: {len(adapters)} adapter(s) on {args.model or 'all-MiniLM-L6-v2'}; "
                      f"Uvicorn running on {url} (Ctrl+C to stop)", file=sys.stderr, flush=True)

    config = uvicorn.Config(app, host=args.host, port=port, log_level=args.log_level, lifespan="on",
                            timeout_graceful_shutdown=10)
    server = Server(config)
    # torch + transformers leave millions of long-lived objects; each full garbage collection walked them
    # all, stalling every request for ~200 ms every second or two under load. Exempt them from collection.
    gc.collect()
    gc.freeze()
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # the re-raised SIGINT
        return 130
    finally:
        sock.close()
    if signal.SIGINT in server.signals:
        return 130
    return 0 if server.started else 1

