"""HTTP inference server: one frozen backbone, many AdaKron adapters, mixed-adapter micro-batches.

Requests for different adapters that arrive within ``max_wait_ms`` of each other run as ONE forward
pass (:func:`adakron.predict` routes each row to its own adapter and head). The forward runs in a
single worker thread, so the event loop keeps accepting and validating requests meanwhile.

Run it with ``adakron serve --adapter rte=runs/rte ...`` or ``python -m adakron.serve ...``; build an
app around a model already in memory with :func:`create_app`.
"""

from .app import create_app
from .cli import main
from .schemas import ServeError

__all__ = ["ServeError", "create_app", "main"]
