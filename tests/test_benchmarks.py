"""The GLUE grid's run claims, which let several background workers share one resumable grid, and its guard
against a worker that outlived an edit of the library."""

import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import glue
import recipe


def test_a_run_is_claimed_by_one_worker_at_a_time(tmp_path):
    lock = tmp_path / "rte-adakron16-s42-lr0.001.lock"
    with glue.claimed(lock) as first:
        assert first
        with glue.claimed(lock) as second:  # another open file description: as another worker would hold
            assert not second
    assert not lock.exists()
    with glue.claimed(lock) as again:
        assert again


def test_the_lock_of_a_worker_that_died_is_free(tmp_path):
    lock = tmp_path / "run.lock"
    dies_holding_it = (f"import fcntl, os; fd = os.open({str(lock)!r}, os.O_CREAT | os.O_RDWR); "
                       "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, b'1'); os._exit(0)")
    subprocess.run([sys.executable, "-c", dies_holding_it], check=True)
    assert lock.exists()
    with glue.claimed(lock) as mine:
        assert mine


def test_a_worker_stops_before_training_when_the_library_changed_under_it(tmp_path, monkeypatch):
    started_with = SimpleNamespace(library_digest=glue.library_digest())
    monkeypatch.setattr(glue, "library_digest", lambda: "edited since")
    monkeypatch.setattr(glue, "_train", lambda *a: pytest.fail("trained with a stale library"))
    with pytest.raises(SystemExit, match="restart"):
        glue.run_one("mrpc", glue.METHODS["adakron16"], 42, 1e-3, started_with, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_result_trained_for_other_epochs_is_not_reused(tmp_path):
    method = glue.METHODS["adakron16"]
    path = tmp_path / f"{glue.run_id('cola', method, 42, 2e-3)}.json"
    path.write_text(json.dumps({"hyperparameters": {"epochs": glue.EPOCHS["cola"] - 1}}))
    with pytest.raises(SystemExit, match="move it out"):
        glue.run_one("cola", method, 42, 2e-3, SimpleNamespace(quick=False), tmp_path)


def test_until_a_methods_lr_is_chosen_the_grid_plans_only_its_mrpc_scan(tmp_path):
    runs = list(glue.planned_runs(tmp_path))
    assert runs == [("mrpc", m, 42, lr) for m in glue.METHODS.values() for lr in m.lr_grid]


def test_the_grid_runs_each_task_at_the_chosen_lr_with_three_seeds_only_where_multi_seed_says(tmp_path):
    method = glue.METHODS["lora"]
    for lr, f1 in zip(method.lr_grid, (0.80, 0.85, 0.82, 0.81)):  # the second lr wins
        (tmp_path / f"{glue.run_id('mrpc', method, 42, lr)}.json").write_text(json.dumps({"best": {"dev_f1": f1}}))
    after_scan = [(t, s, lr) for t, _, s, lr in glue.planned_runs(tmp_path, [method])][len(method.lr_grid):]
    chosen = method.lr_grid[1]
    assert {lr for *_, lr in after_scan} == {chosen}
    assert sorted((t, s) for t, s, _ in after_scan) == sorted(
        [(t, 42) for t in glue.TASKS] + [(t, s) for t in ("rte", "mrpc", "cola") for s in glue.SEEDS[1:]])


def test_a_worker_waits_for_another_workers_lr_scan_and_then_runs_the_tasks(tmp_path, monkeypatch):
    """Two workers share a method's MRPC scan; the one that finishes first must not stop before the lr is chosen."""
    method = glue.METHODS["lora"]
    scan = [tmp_path / "glue" / f"{glue.run_id('mrpc', method, 42, lr)}.json" for lr in method.lr_grid]
    trained = []

    def run_one(task, method, seed, lr, args, folder):
        path = folder / f"{glue.run_id(task, method, seed, lr)}.json"
        if path == scan[-1] and not path.exists():  # the other worker holds this one
            return None
        if not path.exists():
            path.write_text(json.dumps({"best": {"dev_f1": 0.9 if lr == method.lr_grid[1] else 0.8}}))
            trained.append((task, seed, lr))

    def sleep(seconds):  # meanwhile, the other worker finishes its share of the scan
        scan[-1].write_text(json.dumps({"best": {"dev_f1": 0.7}}))

    (tmp_path / "glue").mkdir()
    monkeypatch.setattr(glue, "RESULTS", tmp_path)
    monkeypatch.setattr(glue, "run_one", run_one)
    monkeypatch.setattr(glue.time, "sleep", sleep)
    glue.run_grid(SimpleNamespace(quick=False, methods=["lora"], tasks=list(glue.TASKS), seeds=list(glue.SEEDS),
                                  ablations=False))
    assert {(t, s) for t, s, lr in trained if lr == method.lr_grid[1]} >= {(t, 42) for t in glue.TASKS if t != "mrpc"}


def test_the_results_count_each_planned_run_once_whether_or_not_lrs_are_chosen(tmp_path):
    import render

    per_method = {m.key: len(m.lr_grid) - 1 + sum(len(glue.SEEDS) if (t, m.key) in glue.MULTI_SEED else 1
                                                   for t in glue.TASKS) for m in glue.METHODS.values()}
    assert render._planned_done(tmp_path) == (0, sum(per_method.values()) + len(glue.ABLATIONS))


def test_time_to_accuracy_curves_by_step_give_each_method_one_column_whatever_its_sittings():
    import render

    def run(method, accuracies):
        return {"method": method, "lr": 0.002, "seed": 42, "curve": [{"step": 100 * (i + 1), "accuracy": a}
                                                                      for i, a in enumerate(accuracies)]}

    lines = render._curves_by_step([run("lora", [0.80, 0.86]), run("lora", [0.80, 0.86]),
                                    run("adakron", [0.81, 0.84, 0.851])])
    assert lines[2] == "| step | lora (lr 0.002) | adakron (lr 0.002) |"
    assert lines[4:7] == ["| 100 | 80.0 | 81.0 |", "| 200 | 86.0 | 84.0 |", "| 300 |  | 85.1 |"]


def test_time_to_accuracy_steps_by_seed_give_a_column_per_seed_and_a_mean_only_over_every_seed():
    import render

    def run(method, seed, step):
        return {"method": method, "lr": 0.002, "seed": seed, "reached": step and {"step": step}}

    lines = render._steps_by_seed([run("lora", 42, 1000), run("lora", 42, 1000), run("lora", 43, 600),
                                   run("adakron", 42, 1200), run("adakron", 43, None), run("paper", 42, 1400)])
    assert lines[2] == "| method | seed 42 | seed 43 | mean |"
    assert lines[4:7] == ["| lora (lr 0.002) | 1000 | 600 | 800 |", "| adakron (lr 0.002) | 1200 | not reached |  |",
                          "| paper (lr 0.002) | 1400 |  |  |"]
    assert render._steps_by_seed([run("lora", 42, 1000)]) == []  # one seed: the curves table says it all


def test_the_recipe_screen_runs_every_task_candidate_and_lr_once_with_the_top_lr_first():
    order = recipe.screen_order(list(recipe.CANDIDATES))
    assert len(order) == len(set(order)) == len(recipe.TASKS) * len(recipe.CANDIDATES) * len(recipe.LRS)
    assert {lr for _, _, lr in order[:len(recipe.TASKS) * len(recipe.CANDIDATES)]} == {max(recipe.LRS)}


def test_the_recipe_study_reuses_the_glue_grids_run_of_the_same_settings(tmp_path, monkeypatch):
    monkeypatch.setattr(recipe, "GLUE_FOLDER", tmp_path / "glue")
    monkeypatch.setattr(recipe, "FOLDER", tmp_path / "recipe")
    (tmp_path / "glue").mkdir()
    (tmp_path / "glue" / "cola-adakron16-s42-lr0.002.json").write_text(json.dumps({"from": "grid"}))
    assert recipe.result("cola", recipe.CANDIDATES["paper"], 42, 2e-3) == {"from": "grid"}
    assert recipe.result("cola", recipe.CANDIDATES["id-down8"], 42, 2e-3) is None  # no grid twin: run it


def test_the_papers_recipe_in_the_grid_and_the_study_is_the_same_training():
    from dataclasses import asdict

    ours, grid = asdict(recipe.CANDIDATES["paper"]), asdict(glue.METHODS["adakron16"])
    assert {k: v for k, v in ours.items() if k != "key"} == {k: v for k, v in grid.items() if k != "key"}


def test_the_recipe_screen_can_run_a_chosen_task_and_lr_order_first():
    order = recipe.screen_order(["id-bias1-down8"], ["mrpc"], [4e-3, 5e-4])
    assert order == [("mrpc", "id-bias1-down8", 4e-3), ("mrpc", "id-bias1-down8", 5e-4)]


def _resolved(task, method):
    from adakron.training.recipes import RECIPES, with_recipe

    args = glue.train_args(task, method, 42, 2e-3, SimpleNamespace(data_dir="d", quick=False, max_train_samples=None,
                                                                   max_eval_samples=None), Path("out"))
    return {k: v for k, v in asdict(with_recipe(args, RECIPES[task])).items() if k != "recipe"}


def _study_method(folder, key):
    import madakron

    if folder in madakron.STUDIES:
        return madakron.study_methods(folder)[key]
    return {"glue": glue.METHODS, "recipe": recipe.CANDIDATES}[folder][key]


def test_a_grid_adopts_only_twins_that_train_exactly_as_its_own_method_would():
    for (folder, key), (twin_folder, twin_key) in glue.twin_pairs():
        assert _resolved("mrpc", _study_method(folder, key)) == _resolved("mrpc", _study_method(twin_folder, twin_key))


@pytest.mark.parametrize("pair", glue.twin_pairs())
def test_a_twin_run_is_adopted_under_the_grids_key_and_says_where_it_came_from(tmp_path, monkeypatch, pair):
    monkeypatch.setattr(glue, "RESULTS", tmp_path)
    (folder, key), (twin_folder, twin_key) = pair
    (tmp_path / twin_folder).mkdir()
    stored = tmp_path / twin_folder / f"mrpc-{twin_key}-s42-lr0.002.json"
    stored.write_text(json.dumps({"method_key": twin_key, "hyperparameters": {"epochs": glue.EPOCHS["mrpc"]}}))
    (tmp_path / folder).mkdir()
    method = _study_method(folder, key)
    result = glue.run_one("mrpc", method, 42, 2e-3, SimpleNamespace(quick=False), tmp_path / folder)
    assert result["method_key"] == key and result["reused_from"] == f"{twin_folder}/{stored.name}"
    assert json.loads((tmp_path / folder / f"mrpc-{key}-s42-lr0.002.json").read_text()) == result


def test_measuring_time_to_accuracy_again_files_a_new_result_beside_the_stored_one(tmp_path, monkeypatch):
    import time_to_accuracy

    monkeypatch.setattr(time_to_accuracy, "OUT", tmp_path)
    args = SimpleNamespace(target=0.85, seed=42, again=False)
    first = time_to_accuracy.result_path("adakron", 2e-3, args)
    first.write_text("{}")
    assert time_to_accuracy.result_path("adakron", 2e-3, args) == first  # stored: skipped
    args.again = True
    second = time_to_accuracy.result_path("adakron", 2e-3, args)
    assert second.name == "sst2-adakron-lr0.002-target0.85-s42-2.json"
    second.write_text("{}")
    assert time_to_accuracy.result_path("adakron", 2e-3, args).name.endswith("-3.json")


def test_a_time_to_accuracy_result_says_when_it_ran_and_how_loaded_the_machine_was(tmp_path, monkeypatch):
    import time_to_accuracy

    import adakron.training.trainer as trainer

    monkeypatch.setattr(time_to_accuracy, "HERE", tmp_path / "benchmarks")
    monkeypatch.setattr(trainer, "fit", lambda args, callbacks: {"trainable_params": 1, "hyperparameters": {}})
    result = time_to_accuracy.run("adakron", 4e-3, SimpleNamespace(data_dir="d", seed=42, eval_steps=100,
                                                                    target=0.85))
    assert result["started"] <= result["finished"] and result["started"].endswith("Z")  # ISO 8601, UTC
    assert len(result["load_average"]) == 2 and all(load >= 0 for load in result["load_average"])
    assert result["reached"] is None and result["curve"] == []  # the fake run evaluated nothing


def test_time_to_accuracy_trains_each_method_with_its_grid_rows_adapter():
    import time_to_accuracy

    from adakron.training.recipes import RECIPES, with_recipe

    knobs = ("method", "rank", "kron_factor", "init", "outer_bias", "down_lr_ratio", "up_lr_ratio", "lr")
    for method, key in time_to_accuracy.GRID_KEYS.items():
        args = SimpleNamespace(data_dir="d", seed=42, eval_steps=100)
        timed = with_recipe(time_to_accuracy.train_args(method, 2e-3, args, Path("out")), RECIPES["sst2"])
        grid = SimpleNamespace(data_dir="d", quick=False, max_train_samples=None, max_eval_samples=None)
        row = with_recipe(glue.train_args("sst2", glue.METHODS[key], 42, 2e-3, grid, Path("out")), RECIPES["sst2"])
        assert {k: getattr(timed, k) for k in knobs} == {k: getattr(row, k) for k in knobs}, method
    assert time_to_accuracy.train_args("adakron-down8", 1e-3, args, Path("o")).down_lr_ratio == 0.125


def test_the_study_and_the_grid_share_their_runs_of_the_default_recipe_both_ways():
    for (folder, key), (twin_folder, twin_key) in glue.twin_pairs():
        if twin_folder == "recipe":
            assert recipe.GLUE_KEYS[twin_key] == key
    for candidate, grid_key in recipe.GLUE_KEYS.items():  # and the study reads only grid runs that train alike
        for task in ("mrpc", "cola", "rte"):
            assert _resolved(task, recipe.CANDIDATES[candidate]) == _resolved(task, glue.METHODS[grid_key]), candidate


def test_every_recipe_candidate_is_described_in_the_results():
    assert set(recipe.DESCRIPTIONS) == set(recipe.CANDIDATES)


def test_each_methods_default_lr_is_the_one_the_glue_grid_chose_for_it_on_mrpc():
    from adakron.training.recipes import CAPPED_LR, METHOD_LR, PAPER_LR

    rows = {"adakron": "adakron16-half", "adapter": "adapter", "lora": "lora"}
    for method, key in rows.items():
        assert METHOD_LR[method] == glue.chosen_lr(glue.METHODS[key], glue.RESULTS / "glue"), method
    assert PAPER_LR == glue.chosen_lr(glue.METHODS["adakron16"], glue.RESULTS / "glue")
    assert CAPPED_LR == glue.chosen_lr(glue.METHODS["adakron16-cap"], glue.RESULTS / "glue")


def test_screen_runs_on_other_seeds_are_shown_where_the_confirmation_table_would_not(tmp_path, monkeypatch):
    monkeypatch.setattr(recipe, "FOLDER", tmp_path)
    monkeypatch.setattr(recipe, "GLUE_FOLDER", tmp_path / "none")
    method = recipe.CANDIDATES["id-bias1-u8-down2"]
    run = {"best": {"dev_matthews_correlation": 0.2}, "epochs": [{"train_loss": 0.5}]}
    (tmp_path / f"{glue.run_id('cola', method, 43, 4e-3)}.json").write_text(json.dumps(run))
    assert recipe._other_seeds_table()[-2] == "| `id-bias1-u8-down2` | CoLA | 0.004 | 20.0 (0.500) | – |"


def test_a_capped_recipe_trains_each_factor_at_its_cap_or_the_head_lr_and_is_the_default_at_the_top(tmp_path,
                                                                                                   monkeypatch):
    capped = recipe.CANDIDATES["id-bias1-capped"]
    at_low, at_top = glue.at_lr(capped, 5e-4), glue.at_lr(capped, 4e-3)
    assert (at_low.outer_lr_ratio, at_low.down_lr_ratio, at_low.up_lr_ratio) == (1.0, 1.0, 1.0)
    assert (glue.at_lr(capped, 2e-3).outer_lr_ratio, glue.at_lr(capped, 2e-3).down_lr_ratio) == (0.25, 1.0)
    assert (at_top.outer_lr_ratio, at_top.down_lr_ratio) == (0.125, 0.5)
    # At the top of the grid it trains as the default does, so the default's run stands for it; below, it runs.
    assert recipe.same_run(capped, 4e-3) == "id-bias1-u8-down2"
    assert recipe.same_run(capped, 5e-4) is None
    monkeypatch.setattr(recipe, "FOLDER", tmp_path)
    monkeypatch.setattr(recipe, "GLUE_FOLDER", tmp_path / "none")
    (tmp_path / "rte-id-bias1-u8-down2-s42-lr0.004.json").write_text('{"from": "default"}')
    assert recipe.result("rte", capped, 42, 4e-3) == {"from": "default"}
    assert recipe.result("rte", capped, 42, 5e-4) is None


def test_the_grids_capped_row_trains_each_lr_as_resolved_and_adopts_the_defaults_run_where_they_agree(tmp_path,
                                                                                                   monkeypatch):
    from argparse import Namespace

    grid = Namespace(data_dir=Path("glue"), quick=False, max_train_samples=None, max_eval_samples=None)
    capped = glue.METHODS["adakron16-cap"]
    low = glue.train_args("rte", capped, 42, 1e-3, grid, Path("out"))
    assert (low.outer_lr_ratio, low.down_lr_ratio, low.up_lr_ratio) == (0.5, 1.0, 1.0)
    assert glue.same_training(capped, 4e-3, glue.METHODS) == "adakron16-u8"
    assert glue.same_training(capped, 2e-3, glue.METHODS) is None
    monkeypatch.setattr(glue, "RESULTS", tmp_path)
    (tmp_path / "glue").mkdir()
    (tmp_path / "glue" / "mrpc-adakron16-u8-s42-lr0.004.json").write_text('{"best": {}}')
    assert glue.adopt_twin(tmp_path / "glue" / "mrpc-adakron16-cap-s42-lr0.004.json", "mrpc", capped, 42, 4e-3)
    assert not glue.adopt_twin(tmp_path / "glue" / "mrpc-adakron16-cap-s42-lr0.002.json", "mrpc", capped, 42, 2e-3)
    adopted = json.loads((tmp_path / "glue" / "mrpc-adakron16-cap-s42-lr0.004.json").read_text())
    assert adopted["reused_from"] == "glue/mrpc-adakron16-u8-s42-lr0.004.json"


def test_the_grids_capped_row_trains_at_every_lr_of_its_grid_as_adakron_train_recipe_capped_does():
    from argparse import Namespace

    from adakron.adapters.optim import parameter_groups
    from adakron.training.recipes import RECIPES, TrainArgs, adakron_config, with_recipe
    from conftest import tiny_model

    import adakron

    grid = Namespace(data_dir=Path("glue"), quick=False, max_train_samples=None, max_eval_samples=None)
    model = tiny_model("bert")
    adakron.add_adapter(model, adakron.AdaKronConfig(rank=16))

    def rates(run):
        return [(g["name"], g["lr"]) for g in parameter_groups(model, run.lr, 0.1, run.down_lr_ratio, run.up_lr_ratio,
                                                                  run.outer_lr_ratio, run.down_lr_max,
                                                                  run.outer_lr_max)]

    for lr in glue.METHODS["adakron16-cap"].lr_grid:
        row = with_recipe(glue.train_args("rte", glue.METHODS["adakron16-cap"], 42, lr, grid, Path("out")),
                          RECIPES["rte"])
        flag = with_recipe(TrainArgs(task="rte", recipe="capped", lr=lr), RECIPES["rte"])
        assert rates(row) == rates(flag), lr
        assert adakron_config(row) == adakron_config(flag)


def test_the_madakron_study_runs_on_the_librarys_default_recipe_and_adopts_the_grids_adakron_row():
    import madakron

    from adakron.adapters.optim import DOWN_LR_RATIO, OUTER_LR_RATIO, UP_LR_RATIO

    current = madakron.study_methods(madakron.CURRENT)
    assert madakron.STUDIES[madakron.CURRENT].rates == dict(down_lr_ratio=DOWN_LR_RATIO, up_lr_ratio=UP_LR_RATIO,
                                                          outer_lr_ratio=OUTER_LR_RATIO)
    assert _resolved("rte", current["adakron16"]) == _resolved("rte", glue.METHODS["adakron16-u8"])
    assert ((madakron.CURRENT, "adakron16"), ("glue", "adakron16-u8")) in glue.twin_pairs()


def test_a_madakron_pass_runs_adakron_then_the_chosen_methods_and_seeds_and_the_consistency_loss_on_mrpc_alone(
        tmp_path, monkeypatch):
    import madakron

    calls = []
    monkeypatch.setattr(madakron, "RESULTS", tmp_path)
    monkeypatch.setattr(madakron, "run_one", lambda task, method, seed, lr, args, folder: calls.append(
        (task, method.key, seed, lr, folder.name)))
    monkeypatch.setattr(madakron, "chosen_lr", lambda method, folder: 2e-3)
    args = SimpleNamespace(study=madakron.CURRENT, methods=["madakron16-partial", "madakron16-partial-cw1"],
                           seeds=[42])
    madakron.run(args)
    assert [c[1] for c in calls[:4]] == ["adakron16"] * 4 and [c[3] for c in calls[:4]] == [5e-4, 1e-3, 2e-3, 4e-3]
    assert [c[1] for c in calls[4:8]] == ["madakron16-partial"] * 4
    assert {c[4] for c in calls} == {"madakron-u8"} and {c[2] for c in calls} == {42}
    assert {c[0] for c in calls if c[1] == "madakron16-partial-cw1"} == {"mrpc"}
    assert (tmp_path / madakron.CURRENT).is_dir()  # where a first pass files its results
    assert {(c[0], c[1]) for c in calls[8:]} == {(t, k) for t in madakron.TASKS
                                                 for k in ("adakron16", "madakron16-partial")} | {
        ("mrpc", "madakron16-partial-cw1")}
