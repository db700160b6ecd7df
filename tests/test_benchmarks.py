"""The GLUE grid's run claims, which let several background workers share one resumable grid."""

import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from glue import claim


def test_a_free_run_is_claimed_once(tmp_path):
    lock = tmp_path / "rte-adakron16-s42-lr0.001.lock"
    assert claim(lock)
    assert lock.read_text() == str(os.getpid())
    assert not claim(lock)  # held by a live process (this one)


def test_a_lock_left_by_a_dead_worker_is_taken_over(tmp_path):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock = tmp_path / "run.lock"
    lock.write_text(finished.stdout.strip())
    assert claim(lock)
    assert lock.read_text() == str(os.getpid())
