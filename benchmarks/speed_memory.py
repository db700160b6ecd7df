"""Peak training memory of one method: a few training steps in a fresh process per method, so one method's
allocations and allocator slack never count towards another's (see speed.py's docstring for how on CPU and CUDA),
and an allocator-independent tally of what one step keeps alive.

``--memory-in-process`` measures instead in the process that times the steps, as each method is built (MeasuredBuild):
on CUDA that is exact, since torch counts every tensor it allocates, and it saves a process start, a model build
and a compilation per method, which a short GPU lease cannot spare; on CPU it is approximate (RSS is the process's,
and the allocator reuses what other methods freed)."""

from __future__ import annotations

import gc
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import torch
from speed_methods import Trainee, log, random_batch

SPEED = Path(__file__).resolve().with_name("speed.py")  # the memory child is speed.py's hidden --_memory-child


def status_kib(field: str) -> int:
    """A field of /proc/self/status (Linux), e.g. VmRSS or VmHWM, in KiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> bool:
    """Resets VmHWM to the current RSS (Linux), so a peak read next is of what ran since; False where refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_over_steps(trainee: Trainee, batch: dict, steps: int, cuda: bool) -> tuple[int, str]:
    """The peak memory (bytes) while ``steps`` training steps run, and the counter read: "cuda" (exact),
    "VmHWM" (the peak RSS since it was reset) or "ru_maxrss" (where the reset is refused: the process's peak)."""
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        counter = "cuda"
    else:
        counter = "VmHWM" if reset_peak_rss() else "ru_maxrss"
    for _ in range(steps):
        trainee.step(batch)
    if cuda:
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated(), counter
    if counter == "VmHWM":
        return status_kib("VmHWM") * 1024, counter
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, counter


def memory_child(args) -> dict:
    """Runs in its own process: the peak memory of a few training steps of one method on one model."""
    model_name, method = args.models[0], args.methods[0]
    import peft  # noqa: F401  every method's process imports the same modules, so the baselines compare

    import adakron.training.trainer  # noqa: F401

    rss_start = status_kib("VmRSS") * 1024
    trainee = Trainee(model_name, method, args)
    batch = random_batch(trainee.model, args.batch_size, args.seq_len, args.device, args.seed)
    gc.collect()
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
    else:
        before = status_kib("VmRSS") * 1024
    peak, counter = peak_over_steps(trainee, batch, args.memory_steps, cuda)
    how = {"cuda": "torch.cuda.max_memory_allocated after reset_peak_memory_stats; before = memory_allocated",
           "VmHWM": "VmHWM after writing 5 to /proc/self/clear_refs; before = VmRSS",
           "ru_maxrss": "ru_maxrss (peak RSS reset refused: includes the model-loading peak); before = VmRSS"}[counter]
    return {"method": method, "model": model_name, "rss_at_start_bytes": rss_start, "before_bytes": before,
            "peak_bytes": peak, "increase_bytes": peak - before, "steps": args.memory_steps, "how": how,
            "trainable_params": trainee.trainable, **accounted_bytes(trainee, batch)}


def accounted_bytes(trainee: Trainee, batch: dict) -> dict:
    """Allocator-independent tally of one more step: the distinct storages autograd saves for backward
    (parameters excluded), the gradients, and the optimizer's state tensors."""
    params = {p.untyped_storage().data_ptr() for p in trainee.model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params and storage.nbytes():
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    trainee.optimizer.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), trainee.autocast():
        loss = trainee.model(**batch).loss
    loss.backward()
    trainee.optimizer.step()
    grads = sum(p.grad.nbytes for p in trainee.params if p.grad is not None)
    state = sum(v.nbytes for st in trainee.optimizer.state.values() for v in st.values()
                if torch.is_tensor(v) and v.dim() > 0)
    return {"saved_activation_bytes": sum(saved.values()), "grad_bytes": grads, "optimizer_state_bytes": state,
            "accounted_bytes": sum(saved.values()) + grads + state}


def peak_memory(model_name: str, args) -> dict:
    rows = {}
    for method in args.methods:
        command = [sys.executable, str(SPEED), "--_memory-child", "--models", model_name,
                   "--methods", method, "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
                   "--threads", str(args.threads), "--device", args.device, "--memory-steps", str(args.memory_steps),
                   "--seed", str(args.seed)]
        if args.bf16:
            command.append("--bf16")
        if getattr(args, "compile", None):
            command += ["--compile", args.compile, "--compile-backend", args.compile_backend]
        log(f"[{model_name}] memory: {method} in a subprocess")
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if done.returncode != 0:
            raise SystemExit(f"memory subprocess for {method} failed:\n{done.stderr[-3000:]}")
        rows[method] = json.loads(done.stdout.strip().splitlines()[-1])
    return with_ratios(rows)


def with_ratios(rows: dict) -> dict:
    """The memory section: each method's row, with its figures as ratios to gate's and full's."""
    for ref in ("gate", "full"):
        if ref in rows:
            for m in rows:
                for key in ("increase", "peak", "accounted"):
                    # No ratio to 0 (in-process RSS on a CPU that saw no growth) or to a missing tally (compiled).
                    if rows[ref].get(f"{key}_bytes"):
                        rows[m][f"{key}_x_{ref}"] = rows[m][f"{key}_bytes"] / rows[ref][f"{key}_bytes"]
    return {"methods": rows, "how": next(iter(rows.values()))["how"]}




class MeasuredBuild:
    """Builds each method's Trainee for speed_measure.step_times and measures its training memory at once, in this
    process, while the methods built before it stay alive: their memory is in the counter before and after, and is
    subtracted (the counter's value just before this method's model was built).

    Warm-up steps run first (torch.compile, cuBLAS handles and workspaces), then the gradients and optimizer state
    are freed, so ``before`` is the loaded model and ``increase`` what training adds, as in a fresh process."""

    def __init__(self, model_name: str, args):
        self.model_name, self.args, self.rows = model_name, args, {}
        self.cuda = args.device.startswith("cuda")

    def _now(self) -> int:
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.memory_allocated()
        return status_kib("VmRSS") * 1024

    def __call__(self, method: str) -> Trainee:
        args = self.args
        base = self._now()
        trainee = Trainee(self.model_name, method, args)
        batch = random_batch(trainee.model, args.batch_size, args.seq_len, args.device, args.seed)
        log(f"[{self.model_name}] memory: {method}, in process")
        for _ in range(max(1, args.warmup)):
            trainee.step(batch)
        trainee.optimizer.zero_grad(set_to_none=True)
        trainee.optimizer.state.clear()  # AdamW builds it again at the next step, as at the first
        before = self._now()
        peak, counter = peak_over_steps(trainee, batch, args.memory_steps, self.cuda)
        how = {"cuda": "torch.cuda.max_memory_allocated after reset_peak_memory_stats, in the timing process after "
                       "warm-up, gradients and optimizer state freed; other methods' memory subtracted",
               "VmHWM": "in-process VmHWM after clear_refs, approximate: other methods' RSS subtracted, "
                        "not their frees",
               "ru_maxrss": "in-process ru_maxrss (peak RSS reset refused): every earlier method's peak, "
                            "not comparable"}[counter]
        self.rows[method] = {
            "method": method, "model": self.model_name, "rss_at_start_bytes": base, "before_bytes": before - base,
            "peak_bytes": peak - base, "increase_bytes": peak - before, "steps": args.memory_steps, "how": how,
            "trainable_params": trainee.trainable,
            # The tally's extra step runs under saved_tensors_hooks, which torch.compile may answer by compiling
            # every method again; CUDA's counter is exact without it.
            **({} if getattr(args, "compile", None) else accounted_bytes(trainee, batch))}
        return trainee

    def section(self) -> dict:
        return with_ratios(self.rows)
