"""Injected faults in training: a run killed at any moment (mid-step, mid-evaluation, mid-save, or at a random
time) or stopped by a full disk continues with --resume to the same final results as a run never interrupted;
no checkpoint it could resume from is ever lost, none is used half-written."""

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import sentiment_rows, write_rows
from safetensors.torch import load_file

from adakron.cli import main

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
STEPS_PER_EPOCH = 6  # 48 rows, batch 8


@pytest.fixture(scope="module")
def plain(tiny_model_dir, tmp_path_factory):
    """The data, and the results of the same run never interrupted."""
    folder = tmp_path_factory.mktemp("faults")
    train = write_rows(folder / "train.csv", ["text", "label"], sentiment_rows(48, seed=0))
    dev = write_rows(folder / "dev.csv", ["text", "label"], sentiment_rows(16, seed=1))
    assert main(_args(tiny_model_dir, train, dev, folder / "plain")) == 0
    return train, dev, _results(folder / "plain")


def _args(model_dir, train, dev, out):
    return ["train", "--model", model_dir, "--train-file", train, "--validation-file", dev, "--text-columns", "text",
            "--output-dir", str(out), "--epochs", "3", "--batch-size", "8", "--lr", "3e-3", "--max-length", "16",
            "--seed", "3", "--no-plot"]


def _results(out: Path) -> tuple:
    results = json.loads((out / "results.json").read_text())
    metrics = [{k: v for k, v in json.loads(line).items() if k != "seconds"}
               for line in (out / "metrics.jsonl").read_text().splitlines()]
    weights = load_file(out / "adapter_model.safetensors")
    return results["best"], results["last"], metrics, {k: v.tolist() for k, v in sorted(weights.items())}


def _child(argv, before: str = "") -> subprocess.CompletedProcess:
    """`adakron train` in a subprocess, after ``before`` (code that arranges a fault) has run in it."""
    script = textwrap.dedent(before) + "\nimport sys\nfrom adakron.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    return subprocess.run([sys.executable, "-c", script, *argv], env=ENV, capture_output=True, text=True,
                          timeout=300)


KILL = "import os, signal\ndef die(*a, **k):\n    os.kill(os.getpid(), signal.SIGKILL)\n"


@pytest.mark.parametrize("where", ["mid-evaluation", "mid-save"])
def test_a_run_killed_mid_evaluation_or_mid_save_resumes_to_the_same_results(plain, tiny_model_dir, tmp_path, where):
    train, dev, expected = plain
    out = tmp_path / "run"
    if where == "mid-evaluation":  # the second epoch's evaluation: its checkpoint is not written yet
        fault = KILL + textwrap.dedent("""
            import transformers
            real = transformers.Trainer.prediction_step
            def step(self, *a, **k):
                if self.state.global_step == 12:
                    die()
                return real(self, *a, **k)
            transformers.Trainer.prediction_step = step
        """)
    else:  # the second epoch's checkpoint: model written, optimizer and state not
        fault = KILL + textwrap.dedent("""
            import transformers
            real = transformers.Trainer._save_optimizer_and_scheduler
            def save(self, output_dir):
                if self.state.global_step == 12:
                    die()
                return real(self, output_dir)
            transformers.Trainer._save_optimizer_and_scheduler = save
        """)
    proc = _child(_args(tiny_model_dir, train, dev, out), fault)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert (out / "checkpoints" / "checkpoint-6" / "trainer_state.json").is_file()  # the first epoch's, whole
    assert main([*_args(tiny_model_dir, train, dev, out), "--resume"]) == 0
    assert _results(out) == expected


def test_a_run_killed_at_random_moments_resumes_to_the_same_results(plain, tiny_model_dir, tmp_path):
    """Killed twice, each time at a random step and in a random phase of it (inside the training step, the
    evaluation or the checkpoint save), resumed each time: the same results as the run never interrupted."""
    train, dev, expected = plain
    out = tmp_path / "run"
    rng = random.Random(int(os.environ.get("ADAKRON_FAULT_SEED", "0")))
    argv = _args(tiny_model_dir, train, dev, out)
    first, second = sorted(rng.sample(range(1, 3 * STEPS_PER_EPOCH), 2))
    phases = {"step": "training_step", "evaluation": "prediction_step", "save": "_save_optimizer_and_scheduler"}
    for attempt, step in enumerate((first, second)):
        phase = rng.choice(list(phases)) if step % STEPS_PER_EPOCH == 0 else "step"  # eval and save end epochs
        fault = KILL + textwrap.dedent(f"""
            import transformers
            real = transformers.Trainer.{phases[phase]}
            def hooked(self, *a, **k):
                if self.state.global_step == {step if phase != "step" else step - 1}:
                    die()
                return real(self, *a, **k)
            transformers.Trainer.{phases[phase]} = hooked
        """)
        proc = _child([*argv, *(["--resume"] if attempt else [])], fault)
        assert proc.returncode == -signal.SIGKILL, (step, phase, proc.stderr[-2000:])
    assert main([*argv, "--resume"]) == 0
    assert _results(out) == expected


def _mount_tmpfs(folder: Path, size: str) -> bool:
    folder.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    return done.returncode == 0


def test_a_full_disk_stops_the_run_in_one_line_and_resume_finishes_it_the_same(plain, tiny_model_dir, tmp_path):
    train, dev, expected = plain
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "300k"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        out = disk / "run"
        proc = _child(_args(tiny_model_dir, train, dev, out))
        assert proc.returncode == 1, proc.stderr[-2000:]
        errors = [line for line in proc.stderr.replace("\r", "\n").splitlines() if "adakron train: error:" in line]
        assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert len(errors) == 1 and "No space left on device" in errors[0] and "--resume" in errors[0], errors
        subprocess.run(["mount", "-o", "remount,size=50m", str(disk)], check=True)
        assert main([*_args(tiny_model_dir, train, dev, out), "--resume"]) == 0
        assert _results(out) == expected
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_a_checkpoint_with_damaged_weights_is_not_resumed_from(tmp_path):
    """A checkpoint whose safetensors file is cut short (a disk error, a copy stopped half-way) counts as
    incomplete: resuming skips it for the newest whole one instead of failing in the safetensors reader."""
    import json

    import torch
    from safetensors.torch import save_file

    from adakron.training.rundir import latest_complete_checkpoint

    for step in (6, 12):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        save_file({"w": torch.zeros(64)}, folder / "model.safetensors")
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        (folder / "optimizer.pt").write_bytes(b"x")
        (folder / "scheduler.pt").write_bytes(b"x")
    weights = tmp_path / "checkpoint-12" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])
    assert latest_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-6"
    assert not (tmp_path / "checkpoint-12").exists()
