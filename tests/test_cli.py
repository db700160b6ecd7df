"""`adakron train | eval | predict | params | targets` on a tiny saved BERT and small CSV/TSV/JSONL files."""

import json

import pytest
import torch
from conftest import fails_in_one_line as _fails
from conftest import sentiment_rows, wider_copy, write_rows
from safetensors.torch import load_file

from adakron.cli import main


@pytest.fixture
def csv_data(tmp_path):
    train = write_rows(tmp_path / "train.csv", ["text", "label"], sentiment_rows(32, seed=0))
    dev = write_rows(tmp_path / "dev.csv", ["text", "label"], sentiment_rows(16, seed=1))
    return train, dev


def train_args(model_dir, train, dev, out, *extra):
    return ["train", "--model", model_dir, "--train-file", train, "--validation-file", dev, "--text-columns", "text",
            "--output-dir", str(out), "--epochs", "2", "--batch-size", "8", "--lr", "5e-3", "--max-length", "16",
            *extra]


def test_train_writes_adapter_metrics_results_and_plot(tiny_model_dir, csv_data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(tiny_model_dir, *csv_data, out)) == 0
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                     "curves.png", "metrics.jsonl", "results.json", "task.json"]
    epochs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in epochs] == [1.0, 2.0]
    assert all(e["train_loss"] > 0 and 0 <= e["dev"]["dev_accuracy"] <= 1 and e["seconds"] > 0 for e in epochs)
    results = json.loads((out / "results.json").read_text())
    assert results["method"] == "adakron" and results["task"] == "train"
    assert results["best"]["dev_accuracy"] == max(e["dev"]["dev_accuracy"] for e in epochs)
    assert results["last"]["epoch"] == 2.0
    assert results["trainable_params"] == 2 * (32 * 8 + 8 + 16 * 32 + 32) + (32 * 32 + 32) + (32 * 2 + 2)
    assert results["hyperparameters"]["lr"] == 5e-3 and results["hyperparameters"]["rank"] == 16
    assert {"torch", "transformers", "adakron"} <= set(results["versions"]) and results["wall_seconds"] > 0
    stdout = capsys.readouterr().out
    assert "epoch 1.00/2" in stdout and "dev_accuracy" in stdout
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_same_seed_gives_the_same_result_twice(tiny_model_dir, csv_data, tmp_path):
    for name in ("a", "b"):
        assert main(train_args(tiny_model_dir, *csv_data, tmp_path / name, "--seed", "7")) == 0
    a, b = (load_file(tmp_path / n / "adapter_model.safetensors") for n in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = (json.loads((tmp_path / n / "results.json").read_text()) for n in ("a", "b"))
    assert ra["best"] == rb["best"] and ra["last"] == rb["last"]


def test_predict_and_eval_use_the_users_label_names(tiny_model_dir, csv_data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(tiny_model_dir, *csv_data, out)) == 0
    predictions = tmp_path / "pred.jsonl"
    assert main(["predict", "--adapter", str(out), "--input", csv_data[1], "--output", str(predictions)]) == 0
    rows = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert len(rows) == 16 and {r["prediction"] for r in rows} <= {"negative", "positive"}
    assert all(0.5 <= r["score"] <= 1 for r in rows)
    capsys.readouterr()
    assert main(["eval", "--adapter", str(out), "--validation-file", csv_data[1]]) == 0
    evaluated = json.loads(capsys.readouterr().out)["dev"]["accuracy"]
    results = json.loads((out / "results.json").read_text())
    assert evaluated == pytest.approx(results["best"]["dev_accuracy"])
    expected = sum(r["prediction"] == gold for r, (_, gold) in zip(rows, sentiment_rows(16, seed=1))) / 16
    assert evaluated == pytest.approx(expected)


def test_regression_is_inferred_from_float_labels(tiny_model_dir, tmp_path):
    rows = [[text, f"{0.5 + (label == 'positive') * 3.25:.2f}"] for text, label in sentiment_rows(24)]
    train = write_rows(tmp_path / "t.tsv", ["text", "score"], rows, sep="\t")
    out = tmp_path / "run"
    assert main(train_args(tiny_model_dir, train, train, out, "--label-column", "score", "--lr", "1e-3")) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["main_metric"] == "dev_pearson" and "dev_spearman" in results["best"]
    assert -1 <= results["best"]["dev_pearson"] <= 1
    assert json.loads((out / "adapter_config.json").read_text())["problem_type"] == "regression"


def test_jsonl_with_integer_labels_and_two_text_columns(tiny_model_dir, tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"premise": t, "hypothesis": "the movie", "label": int(lab == "positive")})
                            + "\n" for t, lab in sentiment_rows(16)))
    out = tmp_path / "run"
    assert main(train_args(tiny_model_dir, str(path), str(path), out, "--text-columns", "premise,hypothesis")) == 0
    assert json.loads((out / "adapter_config.json").read_text())["label_names"] == ["0", "1"]


@pytest.mark.parametrize("method", ["adapter", "lora", "full"])
def test_other_methods_train_and_predict(tiny_model_dir, csv_data, tmp_path, method):
    out = tmp_path / method
    extra = ["--lora-r", "4"] if method == "lora" else []
    assert main(train_args(tiny_model_dir, *csv_data, out, "--method", method, "--epochs", "1", *extra)) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["method"] == method
    if method == "full":
        assert results["trainable_params"] == results["total_params"]
    assert main(["predict", "--adapter", str(out), "--input", csv_data[1], "--output", str(tmp_path / "p.csv")]) == 0
    assert (tmp_path / "p.csv").read_text().count("\n") == 17


def test_bad_input_gives_one_line_and_exit_2_with_nothing_written(tiny_model_dir, csv_data, tmp_path, capsys):
    out = tmp_path / "never"
    base = ["train", "--model", tiny_model_dir, "--output-dir", str(out)]
    train, dev = csv_data
    _fails(capsys, [*base, "--task", "squad"], "unknown task 'squad'", out)
    _fails(capsys, [*base, "--task", "rte", "--data-dir", str(tmp_path / "nope")], "does not exist", out)
    _fails(capsys, [*base, "--train-file", str(tmp_path / "x.csv"), "--validation-file", dev, "--text-columns", "text"],
           "x.csv does not exist", out)
    _fails(capsys, [*base, "--train-file", train, "--validation-file", dev, "--text-columns", "review"],
           "no column 'review'; columns present: text, label", out)
    bad = tmp_path / "bad.csv"
    bad.write_text("text,label\ngood movie,positive\nbad,movie,negative\n")
    _fails(capsys, [*base, "--train-file", str(bad), "--validation-file", dev, "--text-columns", "text"],
           "bad.csv:3: expected 2 fields", out)
    unseen = write_rows(tmp_path / "unseen.csv", ["text", "label"], [["a movie", "neutral"], ["b", "positive"]])
    _fails(capsys, [*base, "--train-file", train, "--validation-file", unseen, "--text-columns", "text"],
           "labels not seen in training: neutral", out)
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    _fails(capsys, [*base, "--train-file", str(empty), "--validation-file", dev, "--text-columns", "text"],
           "empty.csv holds no examples", out)
    _fails(capsys, ["train", "--rank", "ten"], "invalid int value", None)
    _fails(capsys, [*base, "--train-file", train, "--validation-file", dev, "--text-columns", "text", "--rank", "10"],
           "`rank` (10) must be divisible by `kron_factor` (4)", out)
    own = [*base, "--train-file", train, "--validation-file", dev, "--text-columns", "text"]
    # A flag the method would ignore is refused: LoRA at --rank 16 would otherwise train at its own rank, 8.
    _fails(capsys, [*own, "--method", "lora", "--rank", "16"], "--rank is for --method adakron or adapter", out)
    _fails(capsys, [*own, "--method", "adapter", "--kron-factor", "2"], "--kron-factor is for --method adakron", out)
    _fails(capsys, [*own, "--lora-r", "4"], "--lora-r is for --method lora; --method adakron would ignore it", out)
    _fails(capsys, [*own, "--experts", "both"], "--experts both places experts, but --num-experts is 1", out)
    _fails(capsys, [*own, "--kron-factor", "1", "--outer-lr-ratio", "0.1"],
           "--outer-lr-ratio is for AdaKron's outer factor u, which --kron-factor 1", out)
    _fails(capsys, [*own, "--kron-factor", "1", "--outer-lr-max", "1e-3"],
           "--outer-lr-max is for AdaKron's outer factor u, which --kron-factor 1", out)
    _fails(capsys, [*own, "--method", "lora", "--down-lr-max", "1e-3"], "--down-lr-max is for --method adakron", out)
    _fails(capsys, [*own, "--method", "lora", "--outer-lr-max", "1e-3"], "--outer-lr-max is for --method adakron", out)
    _fails(capsys, [*own, "--down-lr-max", "0"], "--down-lr-max must be a finite positive number, got 0.0", out)


def test_existing_output_dir_is_kept_without_overwrite(tiny_model_dir, csv_data, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "precious.txt").write_text("mine")
    _fails(capsys, train_args(tiny_model_dir, *csv_data, out), "pass --overwrite to replace it")
    assert (out / "precious.txt").read_text() == "mine"
    _fails(capsys, train_args(tiny_model_dir, *csv_data, out, "--overwrite"), "also holds precious.txt")
    assert (out / "precious.txt").read_text() == "mine"


def test_adapter_that_does_not_match_the_base_model_is_refused(tiny_model_dir, csv_data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(tiny_model_dir, *csv_data, out, "--epochs", "1")) == 0
    capsys.readouterr()
    other = wider_copy(tiny_model_dir, tmp_path / "wider")
    _fails(capsys, ["eval", "--adapter", str(out), "--validation-file", csv_data[1], "--model", other],
           "does not fit this model")


def test_params_reports_every_method(tiny_model_dir, capsys):
    assert main(["params", "--model", tiny_model_dir]) == 0
    lines = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[1:]}
    assert set(lines) == {"adakron", "adapter", "lora", "full"}
    assert int(lines["adakron"][1].replace(",", "")) == 2 * (32 * 8 + 8 + 16 * 32 + 32) + (32 * 32 + 32) + 66


def test_targets_marks_the_default_sites(tiny_model_dir, capsys):
    assert main(["targets", "--model", tiny_model_dir]) == 0
    out = capsys.readouterr().out
    assert "*  bert.encoder.layer.0.output.dense" in out
    assert "*  bert.encoder.layer.0.attention.output.dense" not in out
    assert "head  bert.pooler.dense" in out and "head  classifier" in out


def test_a_task_with_two_dev_splits_reports_both_every_epoch(tiny_model_dir, tmp_path):
    folder = tmp_path / "glue" / "MNLI"
    folder.mkdir(parents=True)
    header = "\t".join(["index", "promptID", "pairID", "genre", "a", "b", "c", "d", "sentence1", "sentence2",
                        "label1", "gold_label"])
    labels = ["entailment", "neutral", "contradiction"]
    rows = [["0"] * 8 + [text, "the movie", labels[i % 3], labels[i % 3]]
            for i, (text, _) in enumerate(sentiment_rows(24))]
    for name in ("train.tsv", "dev_matched.tsv", "dev_mismatched.tsv"):
        (folder / name).write_text("\n".join([header] + ["\t".join(r) for r in rows]) + "\n")
    out = tmp_path / "run"
    assert main(["train", "--model", tiny_model_dir, "--task", "mnli", "--data-dir", str(tmp_path / "glue"),
                 "--output-dir", str(out), "--epochs", "2", "--batch-size", "8", "--max-length", "16"]) == 0
    epochs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [sorted(e["dev"]) for e in epochs] == [["dev_matched_accuracy", "dev_mismatched_accuracy"]] * 2
    results = json.loads((out / "results.json").read_text())
    assert results["main_metric"] == "dev_matched_accuracy" and "dev_mismatched_accuracy" in results["best"]
    assert results["hyperparameters"]["output_dir"] == str(out)


def test_overwrite_with_bad_settings_keeps_the_old_run(tiny_model_dir, csv_data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(tiny_model_dir, *csv_data, out, "--epochs", "1")) == 0
    before = (out / "results.json").read_text()
    run_files = [p.name for p in out.iterdir()]
    _fails(capsys, train_args(tiny_model_dir, *csv_data, out, "--overwrite", "--warmup-ratio", "-0.1"),
           "--warmup-ratio must be in [0, 1)")
    _fails(capsys, train_args(tiny_model_dir, *csv_data, out, "--overwrite", "--epochs", "0"),
           "--epochs must be a finite positive number, got 0")
    # Infinite numbers pass a `> 0` check and train to NaN weights, or fail only once the optimizer is built.
    for flag in ("--lr", "--up-lr-ratio", "--down-lr-ratio", "--outer-lr-ratio"):
        _fails(capsys, train_args(tiny_model_dir, *csv_data, out, "--overwrite", flag, "inf"),
               f"{flag} must be a finite positive number, got inf")
    _fails(capsys, train_args(tiny_model_dir, *csv_data, out, "--overwrite", "--weight-decay", "nan"),
           "--weight-decay must be a finite number >= 0, got nan")
    _fails(capsys, train_args(tiny_model_dir, *csv_data, out, "--overwrite", "--seed", "-1"),
           "--seed must be an integer from 0 to 2**32 - 1, got -1")
    assert (out / "results.json").read_text() == before
    assert sorted(p.name for p in out.iterdir()) == sorted(run_files)


def test_resume_from_damaged_run_settings_is_refused_in_one_line(tiny_model_dir, csv_data, tmp_path, capsys):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    from adakron.training.trainer import RUN_ARGS

    (out / "checkpoints" / RUN_ARGS).write_text('{"lr": 0.1, trunc')
    _fails(capsys, [*train_args(tiny_model_dir, *csv_data, out, "--epochs", "1"), "--resume"],
           "is damaged")


def test_an_output_dir_under_a_file_is_refused_before_training(tiny_model_dir, csv_data, tmp_path, capsys):
    (tmp_path / "afile").write_text("mine")
    _fails(capsys, train_args(tiny_model_dir, *csv_data, tmp_path / "afile" / "sub", "--epochs", "1"),
           "afile is a file, not a folder")
    assert (tmp_path / "afile").read_text() == "mine"


def test_a_missing_model_folder_is_named_as_a_folder_not_a_bad_hub_id(tmp_path, capsys, csv_data):
    _fails(capsys, train_args(str(tmp_path / "nomodel"), *csv_data, tmp_path / "run", "--epochs", "1"),
           "model folder")


def test_resume_refuses_a_finished_run(tiny_model_dir, csv_data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(tiny_model_dir, *csv_data, out, "--epochs", "1")) == 0
    _fails(capsys, [*train_args(tiny_model_dir, *csv_data, out, "--epochs", "1"), "--resume"],
           "that run has finished")


def _checkpointed_by_an_older_adakron(argv: list[str], without: tuple[str, ...] = (), **recorded) -> None:
    """Leaves the run folder of `adakron ARGV` as an older adakron left a run it was killed in: the settings file
    of its checkpoints, as that version wrote it (``recorded``: other values; ``without``: settings it had no
    flag for)."""
    from adakron.cli import build_parser
    from adakron.cli import train_args as parse
    from adakron.training.rundir import CHECKPOINTS, RUN_ARGS, comparable
    from adakron.training.trainer import prepare

    prepared = prepare(parse(build_parser().parse_args(argv)))
    settings = {k: v for k, v in {**comparable(prepared.args), **recorded}.items() if k not in without}
    (prepared.output_dir / CHECKPOINTS).mkdir(parents=True)
    (prepared.output_dir / CHECKPOINTS / RUN_ARGS).write_text(json.dumps(settings))


def test_resume_names_each_changed_setting_with_the_runs_value_and_the_new_one(tiny_model_dir, csv_data, tmp_path,
                                                                                capsys):
    out = tmp_path / "run"
    _checkpointed_by_an_older_adakron(train_args(tiny_model_dir, *csv_data, out), lr=0.001)
    _fails(capsys, [*train_args(tiny_model_dir, *csv_data, out), "--resume"],
           "these differ: lr (run: 0.001, now: 0.005)")


def test_a_lora_run_resumes_whatever_the_adapter_recipe_it_ignores_was_then(tiny_model_dir, csv_data, tmp_path):
    """A LoRA run records the adapter rates of the default recipe of its day, which it never read: a new
    default (or u's rate, added since) must not stop it from resuming."""
    out = tmp_path / "run"
    argv = train_args(tiny_model_dir, *csv_data, out, "--method", "lora")
    _checkpointed_by_an_older_adakron(argv, ("outer_lr_ratio",), down_lr_ratio=0.25, up_lr_ratio=0.5)
    assert main([*argv, "--resume"]) == 0
    assert json.loads((out / "results.json").read_text())["hyperparameters"]["method"] == "lora"


def test_an_adakron_run_checkpointed_before_u_and_v_were_split_is_refused_and_kept(tiny_model_dir, csv_data,
                                                                                   tmp_path, capsys):
    """Its optimizer state holds u and v as one matrix, which fits none of today's parameters: one line saying so
    and what to do, instead of a traceback from inside the Trainer; the folder is left as it was."""
    out = tmp_path / "run"
    argv = train_args(tiny_model_dir, *csv_data, out, "--down-lr-ratio", "0.25", "--up-lr-ratio", "0.5")
    _checkpointed_by_an_older_adakron(argv, ("outer_lr_ratio",))
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    _fails(capsys, [*argv, "--resume"], "its checkpoints are from before AdaKron's u and v were parameters")
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    # MAdaKron's experts were apart before, so such a run resumes when u still trains at v's rate; the message
    # names the rate u had then, and flags left out are a changed setting, not a run that can never resume.
    experts = train_args(tiny_model_dir, *csv_data, tmp_path / "experts", "--num-experts", "2",
                         "--down-lr-ratio", "0.25")
    _checkpointed_by_an_older_adakron(experts, ("outer_lr_ratio",))
    _fails(capsys, [*experts, "--outer-lr-ratio", "0.125", "--resume"],
           "these differ: outer_lr_ratio (run: 0.25, v's, now: 0.125)")
    _fails(capsys, [*experts[:-4], "--resume"], "these differ: down_lr_ratio (run: 0.25, now: 0.5), num_experts")
    assert main([*experts, "--resume"]) == 0


def test_a_one_factor_adakron_run_resumes_with_the_u_rate_it_recorded_but_never_read(tiny_model_dir, csv_data,
                                                                                       tmp_path):
    """Before --outer-lr-ratio was refused at --kron-factor 1 a run could record one; it had no u to use it on."""
    argv = train_args(tiny_model_dir, *csv_data, tmp_path / "run", "--kron-factor", "1")
    _checkpointed_by_an_older_adakron(argv, outer_lr_ratio=0.25)
    assert main([*argv, "--resume"]) == 0


def test_a_run_checkpointed_before_the_rate_caps_existed_resumes_and_one_with_a_cap_keeps_it(tiny_model_dir,
                                                                                             csv_data, tmp_path,
                                                                                             capsys):
    argv = train_args(tiny_model_dir, *csv_data, tmp_path / "run")
    _checkpointed_by_an_older_adakron(argv, ("down_lr_max", "outer_lr_max"))
    assert main([*argv, "--resume"]) == 0
    capped = train_args(tiny_model_dir, *csv_data, tmp_path / "capped", "--recipe", "capped")
    _checkpointed_by_an_older_adakron(capped)
    _fails(capsys, [*capped[:-2], "--resume"], "these differ: down_lr_max (run: 0.002, now: None)")
    assert main([*capped, "--resume"]) == 0


def test_eval_refuses_a_task_with_other_labels(tiny_model_dir, csv_data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(tiny_model_dir, *csv_data, out, "--epochs", "1")) == 0
    _fails(capsys, ["eval", "--adapter", str(out), "--task", "rte", "--data-dir", str(tmp_path)],
           "evaluate it on the task it was trained for")


def test_predict_passes_every_input_column_through(tiny_model_dir, csv_data, tmp_path):
    out = tmp_path / "run"
    assert main(train_args(tiny_model_dir, *csv_data, out, "--epochs", "1")) == 0
    rows = [[str(i), text] for i, (text, _) in enumerate(sentiment_rows(5))]
    source = write_rows(tmp_path / "new.tsv", ["idx", "text"], rows, sep="\t")
    target = tmp_path / "pred.tsv"
    assert main(["predict", "--adapter", str(out), "--input", source, "--output", str(target)]) == 0
    lines = target.read_text().splitlines()
    assert lines[0] == "idx\ttext\tprediction\tscore" and lines[3].startswith("2\t")


def test_params_and_targets_turn_bad_input_into_one_line(tiny_model_dir, tmp_path, capsys):
    _fails(capsys, ["params", "--model", tiny_model_dir, "--rank", "10"], "`rank` (10) must be divisible")
    _fails(capsys, ["targets", "--model", str(tmp_path / "missing")], "model folder")
