"""benchmarks/gpu_check.py, the one command a lent GPU machine runs: a step that fails or overruns must not stop
the others, and what was measured must reach the summary and $OUT; the speed.py paths it adds (a causal LM,
torch.compile per layer, memory measured in process) must work on CPU; and on CUDA every method must train in bf16.
"""

import json
import sys
import tarfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu_check
import speed
from speed_memory import MeasuredBuild
from speed_methods import Trainee, random_batch


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_a_failing_or_overrunning_step_does_not_stop_the_others(tmp_path):
    results, out = tmp_path / "gpu", tmp_path / "OUT"
    steps = [
        gpu_check.Step("first", "prints", _python("print('hello')"), 20),
        gpu_check.Step("fails", "exits 3", _python("import sys; print('broken'); sys.exit(3)"), 20),
        gpu_check.Step("hangs", "sleeps past its budget", _python("import time; time.sleep(60)"), 1),
        gpu_check.Step("missing", "a program that is not there", ["no-such-program-here"], 20),
        gpu_check.Step("last", "still runs", _python("print('done')"), 20),
    ]
    summary = gpu_check.run_all(steps, results, deadline_s=60, out_dir=out, mode="cpu-smoke")
    status = {r["name"]: r["status"] for r in summary["steps"]}
    assert status == {"first": "ok", "fails": "failed", "hangs": "timeout", "missing": "skipped", "last": "ok"}
    assert summary["steps"][1]["rc"] == 3 and summary["steps"][1]["note"] == "broken"
    assert summary["elapsed_s"] < 30  # the hanging step was ended at its budget, not at its end
    assert json.loads((out / "summary.json").read_text())["steps"][-1]["name"] == "last"
    assert "| hangs | timeout |" in (out / "summary.md").read_text()
    with tarfile.open(out / "gpu_results.tar.gz") as tar:
        assert {"gpu/summary.json", "gpu/logs/first.log", "gpu/logs/fails.log"} <= set(tar.getnames())
    assert sorted(p.name for p in out.iterdir()) == ["gpu_results.tar.gz", "summary.json", "summary.md"]


def test_a_step_past_the_deadline_is_skipped_and_said_so(tmp_path):
    steps = [gpu_check.Step("one", "", _python("pass"), 20), gpu_check.Step("two", "", _python("pass"), 20)]
    summary = gpu_check.run_all(steps, tmp_path, deadline_s=12, out_dir=None, mode="cpu-smoke")
    assert summary["steps"][1]["status"] == "skipped" and "deadline" in summary["steps"][1]["note"]


def test_the_smoke_run_mirrors_the_gpu_run_step_for_step(tmp_path):
    gpu, smoke = gpu_check.plan("gpu", tmp_path), gpu_check.plan("cpu-smoke", tmp_path)
    rename = dict(zip(gpu_check.MODELS["gpu"], gpu_check.MODELS["cpu-smoke"]))
    expected = [s.name for s in gpu]
    for big, small in rename.items():
        expected = [name.replace(big, small) for name in expected]
    assert [s.name for s in smoke] == expected
    speed_steps = [s for s in gpu if s.name.startswith("speed-")]
    assert len(speed_steps) == 4 and all("--bf16" in s.argv and "cuda" in s.argv for s in speed_steps)
    assert sum("--compile" in s.argv for s in speed_steps) == 2


@pytest.fixture
def torch_state():
    """speed.main sets torch's thread count and compiles: give later tests the process as it was."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
    torch._dynamo.reset()


def test_speed_trains_a_compiled_causal_lm_and_measures_memory_in_process(tmp_path, torch_state):
    out = tmp_path / "speed.json"
    speed.main(["--models", "tiny-llama", "--methods", "gate,adakron", "--threads", "1", "--batch-size", "2",
                "--seq-len", "8", "--steps", "1", "--warmup", "1", "--memory-steps", "1", "--infer-reps", "1",
                "--infer-warmup", "1", "--infer-extra", "", "--compile", "layers", "--compile-backend", "aot_eager",
                "--memory-in-process", "--out", str(out)])
    section = json.loads(out.read_text())["models"]["tiny-llama"]
    assert section["settings"]["loss"].startswith("causal LM") and section["settings"]["memory"] == "in-process"
    assert section["step"]["compile"]["unique_graphs"] >= 1 and section["step"]["compile"]["graph_breaks"] == 0
    assert set(section["memory"]["methods"]) == {"gate", "adakron"}
    assert section["inference"]["adakron_x_bare"] > 0
    assert "torch.compile per layer" in out.with_suffix(".md").read_text()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("model_name", ["tiny", "tiny-llama"])
def test_every_method_trains_in_bf16_on_cuda_and_its_memory_is_counted(model_name):
    args = SimpleNamespace(device="cuda", bf16=True, seed=0, compile=None, compile_backend="inductor",
                           batch_size=4, seq_len=16, warmup=1, memory_steps=2)
    build = MeasuredBuild(model_name, args)
    for method in ("gate", "adakron", "lora", "full"):
        trainee = build(method)
        assert all(p.is_cuda for p in trainee.model.parameters())
        batch = random_batch(trainee.model, 4, 16, "cuda")
        assert torch.isfinite(torch.tensor(trainee.step(batch)))
    rows = build.section()["methods"]
    assert all(r["increase_bytes"] > 0 and r["before_bytes"] > 0 for r in rows.values())
    assert rows["full"]["grad_bytes"] > rows["adakron"]["grad_bytes"] > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_adakron_compiled_per_layer_with_inductor_matches_eager_on_cuda():
    args = SimpleNamespace(device="cuda", bf16=True, seed=0, compile=None, compile_backend="inductor")
    eager = Trainee("tiny", "adakron", args)
    compiled = Trainee("tiny", "adakron", SimpleNamespace(**{**vars(args), "compile": "layers"}))
    for t in (eager, compiled):
        t.model.eval()  # no dropout, so both compute the same function
    batch = random_batch(eager.model, 4, 16, "cuda")
    with torch.no_grad(), eager.autocast():
        torch.testing.assert_close(compiled.model(**batch).logits, eager.model(**batch).logits, atol=2e-2, rtol=2e-2)


def test_speed_times_a_merged_madakron_beside_adakron_at_inference(tmp_path, torch_state):
    out = tmp_path / "speed.json"
    speed.main(["--models", "tiny", "--methods", "adakron,madakron", "--threads", "1", "--batch-size", "2",
                "--seq-len", "8", "--steps", "1", "--warmup", "1", "--memory-steps", "1", "--infer-reps", "2",
                "--infer-warmup", "1", "--infer-extra", "", "--memory-in-process", "--out", str(out)])
    inference = json.loads(out.read_text())["models"]["tiny"]["inference"]
    assert set(inference["shapes"]["2x8"]["variants"]) == {"bare", "adakron", "madakron merged"}
    assert inference["madakron_x_adakron"] > 0
    report = out.with_suffix(".md").read_text()
    assert "MAdaKron as served" in report and "merged madakron inference latency <= 1.01 x adakron" in report
