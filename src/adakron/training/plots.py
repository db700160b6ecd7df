"""curves.png: train loss and dev metric per evaluation."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt


def plot_curves(records: list[dict], main_key: str, path: Path, title: str) -> None:
    epochs = [r["epoch"] for r in records]
    fig, (loss_ax, metric_ax) = plt.subplots(1, 2, figsize=(9, 3.5), constrained_layout=True)
    losses = [(e, r["train_loss"]) for e, r in zip(epochs, records) if r["train_loss"] is not None]
    if losses:
        loss_ax.plot(*zip(*losses), marker="o")
    loss_ax.set(xlabel="epoch", ylabel="train loss", title="training loss")
    for key in records[0]["dev"]:
        metric_ax.plot(epochs, [r["dev"][key] for r in records], marker="o", label=key,
                       linewidth=2.5 if key == main_key else 1)
    metric_ax.set(xlabel="epoch", ylabel="dev metric", title="dev metrics")
    metric_ax.legend(fontsize="small")
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)
