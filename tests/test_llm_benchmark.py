"""benchmarks/llm.py --quick end to end on made-up SST-2 and Alpaca files (a tiny random LLaMA): every part
writes its result with the commands that made it and rerun it, the markdown shows every part, a second pass
reuses every result, and missing data or an interrupted run leave nothing behind."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import llm
import llm_models
from llm_report import markdown_path, section

REVIEWS = [("a gorgeous , witty , seductive movie .", 1), ("contains no wit , only labored gags", 0),
           ("the acting is \"superb\" and the story moving", 1), ("a dull , plodding mess", 0),
           ("one of the best films of the year", 1), ("i walked out after an hour", 0)]
# Every run of --quick but full fine-tuning's memory process: each memory process costs seconds of start-up, and
# the test must stay under half a minute on a busy 2-core machine; test_full_fine_tuning_trains_every_weight
# covers what that process does differently.
METHODS = "base,adakron,adapter,lora"
EXPECTED = {"sst2-base", "sst2-adakron-3x4-lr{lr}", "sst2-adapter-3x4-lr{lr}", "sst2-lora-3x4-lr{lr}",
            "alpaca-base", "alpaca-adakron-3x4-lr{lr}", "alpaca-lora-3x4-lr{lr}", "throughput",
            "memory-adakron", "memory-lora"}


def write_data(root: Path) -> tuple[Path, Path]:
    """An SST-2 folder (unquoted TSVs, a stray quote included) and an Alpaca file, in the real layouts."""
    glue = root / "glue" / "SST-2"
    glue.mkdir(parents=True)
    for name, copies in (("train.tsv", 4), ("dev.tsv", 3)):
        rows = [f"{text} \t{label}" for text, label in REVIEWS * copies]
        (glue / name).write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
    records = [{"instruction": f"Name {n} colours.", "input": "" if n % 2 else "Be brief.",
                "output": ", ".join(["red", "green", "blue", "cyan"][:n % 4 + 1])} for n in range(24)]
    alpaca = root / "alpaca.json"
    alpaca.write_text(json.dumps(records))
    return root / "glue", alpaca


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    root = tmp_path_factory.mktemp("llm")
    glue, alpaca = write_data(root)
    out = root / "llm-quick"
    argv = ["--quick", "--out", str(out), "--glue-dir", str(glue), "--alpaca-file", str(alpaca), "--methods", METHODS]
    assert llm.main(argv) == 0
    return out, argv


def results(out: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in out.glob("*.json")}


def test_every_part_writes_one_result_per_run_with_its_commands(quick):
    out, _ = quick
    lr = llm_models.library_recipe()["lr"]
    found = results(out)
    assert set(found) == {name.format(lr=f"{lr:g}") for name in EXPECTED}
    for name, r in found.items():
        assert r["command"].startswith("python benchmarks/llm.py --quick") and "--quick" in r["rerun"], name
        assert r["wall_seconds"] > 0 and r["model"] == "tiny random LLaMA (--quick)"
    assert not list(out.glob("*.lock")) and not list(out.glob("*.tmp"))


def test_the_sst2_runs_share_data_and_recipe_and_score_every_dev_row_of_the_subset(quick):
    out, _ = quick
    runs = {r["method"]: r for r in results(out).values() if r["part"] == "sst2"}
    assert {r["dev_rows"] for r in runs.values()} == {llm.QUICK.dev_rows}
    assert all(sum(r["predicted_share"].values()) == pytest.approx(1) for r in runs.values())
    assert runs["base"]["trainable_params"] == 0
    trained = [runs[m] for m in ("adakron", "adapter", "lora")]
    assert all(len(r["losses"]) == llm.QUICK.steps for r in trained)
    # The same first batch for all: the adapters start near the base model, so their first losses are close.
    assert max(r["losses"][0] for r in trained) - min(r["losses"][0] for r in trained) < 0.5
    assert len({json.dumps({k: v for k, v in r["recipe"].items()}, sort_keys=True) for r in trained}) == 1
    default = llm_models.library_recipe()["adapter_recipe"]
    assert runs["adakron"]["recipe"]["adapter_recipe"] == default
    assert runs["adakron"]["adapter_config"]["head_modules"] == [] and runs["adapter"]["adapter_config"][
        "kron_factor"] == 1
    assert runs["lora"]["lora"]["target_modules"] == ["q_proj", "v_proj"]


def test_alpaca_runs_score_the_same_held_out_split_and_generate_for_the_same_prompts(quick):
    out, _ = quick
    runs = [r for r in results(out).values() if r["part"] == "alpaca"]
    assert len({r["held_out_tokens"] for r in runs}) == 1 and all(r["held_out_loss"] > 0 for r in runs)
    prompts = {tuple(s["prompt"] for s in r["samples"]) for r in runs}
    assert len(prompts) == 1 and len(next(iter(prompts))) == llm.QUICK.samples


def test_throughput_and_memory_measure_every_setting_and_method(quick):
    out, _ = quick
    found = results(out)
    speed = found["throughput"]
    assert set(speed["settings"]) == {"bare", "one", "one_routed", "mixed"}
    assert all(s["tokens_per_second"] > 0 for s in speed["settings"].values())
    assert speed["ratios"]["mixed_vs_one"] > 0
    memory = {m: found[f"memory-{m}"] for m in ("adakron", "lora")}
    assert all(r["peak_bytes"] >= r["before_bytes"] > 0 and r["steps"] == llm.QUICK.memory_steps
               for r in memory.values())
    trained = {r["method"]: r for r in found.values() if r["part"] == "sst2"}
    assert all(memory[m]["trainable_params"] == trained[m]["trainable_params"] for m in memory)  # the same methods


def test_full_fine_tuning_trains_every_weight_and_the_untrained_model_none():
    model, _ = llm_models.load(quick=True)
    full = llm_models.parameters(llm_models.with_method(model, "full", seed=0))
    assert full["trainable_params"] == full["total_params"] > 0
    model, _ = llm_models.load(quick=True)
    assert llm_models.parameters(llm_models.with_method(model, "base", seed=0))["trainable_params"] == 0


def test_the_markdown_shows_every_part_and_is_rebuilt_from_the_files_alone(quick):
    out, argv = quick
    md = markdown_path(out)
    text = md.read_text()
    for heading in ("### SST-2 as generation", "### Alpaca", "### Generation throughput", "### Peak training memory"):
        assert heading in text
    assert "Not run yet" not in text and f"{len(EXPECTED)} of 11 planned runs" in text
    assert "| AdaKron r=16 f=4 |" in text and "| LoRA r=8 q,v (peft) |" in text and "**Prompt 1.**" in text
    md.unlink()
    assert llm.main([*argv, "--render"]) == 0
    assert md.read_text() == text == "\n".join(section(out)).rstrip() + "\n"


def test_a_second_pass_reuses_every_result(quick, capsys):
    out, argv = quick
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.json")}
    assert llm.main(argv) == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.json")} == before
    assert capsys.readouterr().out.count("done before") == len(before)


def test_missing_data_is_skipped_with_a_message(tmp_path, capsys):
    out = tmp_path / "llm-quick"
    assert llm.main(["--quick", "--parts", "sst2,alpaca", "--out", str(out), "--glue-dir", str(tmp_path / "none"),
                     "--alpaca-file", str(tmp_path / "none.json")]) == 0
    printed = capsys.readouterr().out
    assert "sst2: no SST-2 data" in printed and "alpaca:" in printed and "Skipped" in printed
    assert not list(out.glob("*.json")) and "Not run yet" in markdown_path(out).read_text()


def test_an_interrupted_run_leaves_no_result_and_no_lock(tmp_path):
    args = llm.parse(["--quick", "--out", str(tmp_path)])
    args.lr, args.library_digest = 1e-3, "test"

    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        llm.run_one("memory", "full", args, interrupted)
    assert list(tmp_path.iterdir()) == []
