"""Runs that are killed and resumed, and runs on two processes (DDP over gloo), against plain runs."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import torch
from conftest import sentiment_rows, write_rows
from safetensors.torch import load_file

from adakron.cli import main

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def _data(tmp_path, rows=64):
    train = write_rows(tmp_path / "train.csv", ["text", "label"], sentiment_rows(rows, seed=0))
    dev = write_rows(tmp_path / "dev.csv", ["text", "label"], sentiment_rows(16, seed=1))
    return train, dev


def _args(model_dir, train, dev, out, batch_size=8, epochs=3):
    return ["train", "--model", model_dir, "--train-file", train, "--validation-file", dev, "--text-columns", "text",
            "--output-dir", str(out), "--epochs", str(epochs), "--batch-size", str(batch_size), "--lr", "3e-3",
            "--max-length", "16", "--seed", "3"]


def test_run_killed_mid_epoch_resumes_to_the_same_results(tiny_model_dir, tmp_path):
    train, dev = _data(tmp_path)
    assert main(_args(tiny_model_dir, train, dev, tmp_path / "plain")) == 0

    killed = tmp_path / "killed"
    steps_per_epoch = 64 // 8
    script = textwrap.dedent(f"""
        import os, signal, sys
        from transformers import TrainerCallback
        from adakron.cli import build_parser, train_args
        from adakron.training.trainer import fit

        class KillMidEpoch(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step == {steps_per_epoch + 3}:  # three steps into the second epoch
                    os.kill(os.getpid(), signal.SIGKILL)

        ns = build_parser().parse_args(sys.argv[1:])
        fit(train_args(ns), callbacks=[KillMidEpoch()])
    """)
    proc = subprocess.run([sys.executable, "-c", script, *_args(tiny_model_dir, train, dev, killed)], env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not (killed / "results.json").exists()
    assert [p.name for p in (killed / "checkpoints").iterdir() if p.name.startswith("checkpoint-")] == [
        f"checkpoint-{steps_per_epoch}"]

    assert main([*_args(tiny_model_dir, train, dev, killed), "--resume"]) == 0
    plain, resumed = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("plain", "killed"))
    assert resumed["best"] == plain["best"] and resumed["last"] == plain["last"]
    metrics = [(tmp_path / d / "metrics.jsonl").read_text().splitlines() for d in ("plain", "killed")]
    strip = [[{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in m] for m in metrics]
    assert strip[0] == strip[1] and len(strip[0]) == 3
    a, b = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("plain", "killed"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_two_process_ddp_matches_one_process_with_the_same_global_batch(tiny_model_dir, tmp_path):
    train, dev = _data(tmp_path)
    assert main(_args(tiny_model_dir, train, dev, tmp_path / "single", batch_size=8, epochs=2)) == 0
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "adakron.cli", *_args(tiny_model_dir, train, dev, tmp_path / "ddp", batch_size=4, epochs=2)]
    proc = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single, ddp = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("single", "ddp"))
    assert set(single) == set(ddp)
    for key in single:
        torch.testing.assert_close(ddp[key], single[key], atol=1e-5, rtol=0)
