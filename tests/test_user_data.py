"""Promises about the user's own files (issue 16's review): `predict` copies every field byte for byte and never
replaces a column, `train --overwrite` removes only what a run wrote, `eval` scores the file it is given, and
bad text or bad bytes end in one line with exit code 2."""

import csv
import json

import pytest
from conftest import fails_in_one_line as _fails
from conftest import sentiment_rows, write_rows

from adakron.cli import main


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, tmp_path_factory):
    """One adapter trained on single texts (labels negative/positive), shared by the tests below."""
    folder = tmp_path_factory.mktemp("data")
    train = write_rows(folder / "train.csv", ["text", "label"], sentiment_rows(32, seed=0))
    dev = write_rows(folder / "dev.csv", ["text", "label"], sentiment_rows(16, seed=1))
    out = folder / "run"
    assert main(["train", "--model", tiny_model_dir, "--train-file", train, "--validation-file", dev,
                 "--text-columns", "text", "--output-dir", str(out), "--epochs", "1", "--batch-size", "8",
                 "--max-length", "16", "--no-plot"]) == 0
    return out


TRICKY = ['say "hi"', "back\\slash", 'a "quoted" \\ mix', "plain", "'single'", "trailing\\", '"', "é ü ✓"]


def _tsv(path, rows):
    path.write_text("id\ttext\n" + "".join(f"{i}\t{t}\n" for i, t in enumerate(rows)), encoding="utf-8")
    return path


def test_predict_to_tsv_keeps_every_field_byte_for_byte(run_dir, tmp_path):
    source = _tsv(tmp_path / "in.tsv", TRICKY)
    out = tmp_path / "out.tsv"
    assert main(["predict", "--adapter", str(run_dir), "--input", str(source), "--output", str(out)]) == 0
    lines = out.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "id\ttext\tprediction\tscore"
    assert [line.split("\t")[:2] for line in lines[1:]] == [[str(i), t] for i, t in enumerate(TRICKY)]


def test_predicting_again_on_the_output_gives_the_same_predictions(run_dir, tmp_path):
    source = _tsv(tmp_path / "in.tsv", TRICKY)
    first, second = tmp_path / "first.tsv", tmp_path / "second.csv"
    assert main(["predict", "--adapter", str(run_dir), "--input", str(source), "--output", str(first)]) == 0
    assert main(["predict", "--adapter", str(run_dir), "--input", str(first), "--output", str(second),
                 "--prediction-column", "again", "--score-column", "again_score"]) == 0
    with open(second, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [r["text"] for r in rows] == TRICKY
    assert [r["again"] for r in rows] == [r["prediction"] for r in rows]
    assert [r["again_score"] for r in rows] == [r["score"] for r in rows]


def test_predict_to_csv_round_trips_quotes_commas_and_line_breaks(run_dir, tmp_path):
    texts = [*TRICKY, "a, b", "two\nlines"]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    out = tmp_path / "out.csv"
    assert main(["predict", "--adapter", str(run_dir), "--input", str(source), "--output", str(out)]) == 0
    with open(out, newline="", encoding="utf-8") as f:
        assert [r["text"] for r in csv.DictReader(f)] == texts


def test_a_field_tsv_cannot_hold_is_refused_before_anything_is_written(run_dir, tmp_path, capsys):
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"text": "a\tb"}) + "\n", encoding="utf-8")
    out = tmp_path / "out.tsv"
    _fails(capsys, ["predict", "--adapter", str(run_dir), "--input", str(source), "--output", str(out)],
           "tab or line break")
    assert list(tmp_path.iterdir()) == [source]


@pytest.mark.parametrize("column", ["prediction", "score"])
def test_predict_never_overwrites_an_input_column(run_dir, tmp_path, capsys, column):
    source = write_rows(tmp_path / "in.csv", ["text", column], [["good film", "keep me"]])
    out = tmp_path / "out.csv"
    _fails(capsys, ["predict", "--adapter", str(run_dir), "--input", source, "--output", str(out)],
           f"already has a column {column!r}")
    assert not out.exists()
    flag = "--prediction-column" if column == "prediction" else "--score-column"
    assert main(["predict", "--adapter", str(run_dir), "--input", source, "--output", str(out), flag, "mine"]) == 0
    with open(out, newline="") as f:
        row = next(csv.DictReader(f))
    assert row[column] == "keep me" and "mine" in row


def test_jsonl_rows_with_different_keys_all_reach_the_csv(run_dir, tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in [{"text": "good"}, {"text": "bad", "id": 7},
                                                              {"note": "x", "text": "fine"}]))
    out = tmp_path / "out.csv"
    assert main(["predict", "--adapter", str(run_dir), "--input", str(source), "--output", str(out)]) == 0
    with open(out, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == ["text", "id", "note", "prediction", "score"]
    assert [(r["id"], r["note"]) for r in rows] == [("", ""), ("7", ""), ("", "x")]


def test_a_lone_surrogate_in_predict_input_is_one_line_not_a_traceback(run_dir, tmp_path, capsys):
    source = tmp_path / "in.jsonl"
    source.write_text('{"text": "fine"}\n{"text": "bad \\ud800 text"}\n')
    _fails(capsys, ["predict", "--adapter", str(run_dir), "--input", str(source), "--output",
                    str(tmp_path / "o.jsonl")], "in.jsonl:2: column 'text' is not valid Unicode")


@pytest.mark.parametrize("content", [b"text,label\ncaf\xe9,positive\n", "text,label\nbien,positive\n".encode("utf-16")])
def test_a_file_that_is_not_utf8_text_is_one_line_with_exit_2(tiny_model_dir, tmp_path, capsys, content):
    bad = tmp_path / "bad.csv"
    bad.write_bytes(content)
    out = tmp_path / "run"
    _fails(capsys, ["train", "--model", tiny_model_dir, "--train-file", str(bad), "--validation-file", str(bad),
                    "--text-columns", "text", "--output-dir", str(out)], "bad.csv")
    assert not out.exists()


def test_overwrite_replaces_a_finished_run_but_nothing_else(run_dir, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "again"
    train = write_rows(tmp_path / "train.csv", ["text", "label"], sentiment_rows(16, seed=2))
    base = ["train", "--model", tiny_model_dir, "--train-file", train, "--validation-file", train,
            "--text-columns", "text", "--output-dir", str(out), "--epochs", "1", "--max-length", "16", "--no-plot"]
    assert main(base) == 0
    (out / "curves.png").write_bytes(b"a stale plot of an earlier run")  # a run's own file: replaced
    assert main([*base, "--overwrite", "--seed", "3"]) == 0
    assert json.loads((out / "results.json").read_text())["seed"] == 3 and not (out / "curves.png").exists()
    (out / "notes.txt").write_text("mine")  # not a run's file: the folder is refused, the file kept
    _fails(capsys, [*base, "--overwrite"], "also holds notes.txt")
    assert (out / "notes.txt").read_text() == "mine" and (out / "results.json").exists()


@pytest.mark.parametrize("folder", ["checkpoints", "experts"])
def test_overwrite_keeps_a_user_file_inside_a_run_folder(run_dir, tiny_model_dir, tmp_path, capsys, folder):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(run_dir, out)
    (out / folder).mkdir(exist_ok=True)
    (out / folder / "mine.txt").write_text("mine")
    train = write_rows(tmp_path / "train.csv", ["text", "label"], sentiment_rows(16, seed=2))
    _fails(capsys, ["train", "--model", tiny_model_dir, "--train-file", train, "--validation-file", train,
                    "--text-columns", "text", "--output-dir", str(out), "--epochs", "1", "--overwrite"],
           f"also holds {folder}/mine.txt")
    assert (out / folder / "mine.txt").read_text() == "mine" and (out / "results.json").exists()


def test_bad_batch_sizes_and_impossible_outputs_are_refused_in_one_line(run_dir, tmp_path, capsys):
    source = _tsv(tmp_path / "in.tsv", TRICKY)
    predict = ["predict", "--adapter", str(run_dir), "--input", str(source)]
    _fails(capsys, [*predict, "--output", str(tmp_path / "o.csv"), "--batch-size", "0"],
           "--batch-size must be a positive integer, got 0")
    dev = write_rows(tmp_path / "dev.csv", ["text", "label"], sentiment_rows(16, seed=1))
    _fails(capsys, ["eval", "--adapter", str(run_dir), "--validation-file", dev, "--batch-size", "-3"],
           "--batch-size must be a positive integer, got -3")
    (tmp_path / "outd.csv").mkdir()
    _fails(capsys, [*predict, "--output", str(tmp_path / "outd.csv"), "--overwrite"], "outd.csv is a folder")
    (tmp_path / "afile").write_text("mine")
    _fails(capsys, [*predict, "--output", str(tmp_path / "afile" / "x.csv")], "afile is a file, not a folder")
    _fails(capsys, ["eval", "--adapter", str(tmp_path / "afile"), "--validation-file", dev], "afile is a file")
    assert (tmp_path / "afile").read_text() == "mine"


def test_overwrite_refuses_a_folder_holding_the_training_data(tiny_model_dir, tmp_path, capsys, monkeypatch):
    write_rows(tmp_path / "train.csv", ["text", "label"], sentiment_rows(16, seed=2))
    monkeypatch.chdir(tmp_path)
    _fails(capsys, ["train", "--model", tiny_model_dir, "--train-file", "train.csv", "--validation-file",
                    "train.csv", "--text-columns", "text", "--output-dir", ".", "--overwrite"], "holds this run's input")
    assert (tmp_path / "train.csv").read_text().startswith("text,label")


def test_eval_scores_the_validation_file_it_is_given(run_dir, tmp_path, capsys):
    dev = write_rows(tmp_path / "dev.csv", ["text", "label"], sentiment_rows(16, seed=1))
    capsys.readouterr()
    assert main(["eval", "--adapter", str(run_dir), "--validation-file", dev]) == 0
    assert 0 <= json.loads(capsys.readouterr().out)["dev"]["accuracy"] <= 1
    _fails(capsys, ["eval", "--adapter", str(run_dir), "--validation-file", str(tmp_path / "missing.csv")],
           "missing.csv does not exist")


def test_three_text_columns_are_refused_by_eval_and_predict(run_dir, tmp_path, capsys):
    source = write_rows(tmp_path / "in.csv", ["a", "b", "c", "label"], [["x", "y", "z", "positive"]])
    _fails(capsys, ["eval", "--adapter", str(run_dir), "--validation-file", source, "--text-columns", "a,b,c"],
           "one or two columns")
    _fails(capsys, ["predict", "--adapter", str(run_dir), "--input", source, "--output", str(tmp_path / "o.csv"),
                    "--text-columns", "a,b,c"], "one or two columns")


def test_a_pair_given_to_a_single_text_adapter_is_refused(run_dir, tmp_path, capsys):
    source = write_rows(tmp_path / "in.csv", ["a", "b"], [["x", "y"]])
    _fails(capsys, ["predict", "--adapter", str(run_dir), "--input", source, "--output", str(tmp_path / "o.csv"),
                    "--text-columns", "a,b"], "trained on single texts")


@pytest.fixture(scope="module")
def glue_run(tiny_model_dir, tmp_path_factory):
    """An adapter trained with --task sst2 on a tiny GLUE folder (labels 0/1 in the TSV, names in the adapter),
    and an STS-B one (regression)."""
    folder = tmp_path_factory.mktemp("glue")
    (folder / "SST-2").mkdir()
    for name, seed in (("train.tsv", 0), ("dev.tsv", 1)):
        rows = [[text, str(["negative", "positive"].index(label))] for text, label in sentiment_rows(24, seed=seed)]
        write_rows(folder / "SST-2" / name, ["sentence", "label"], rows, sep="\t")
    (folder / "STS-B").mkdir()
    header = ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2",
              "score"]
    for name, seed in (("train.tsv", 0), ("dev.tsv", 1)):
        rows = [[str(i), "g", "f", "y", str(i), "n", "n", a, b, f"{(i % 6):.1f}"]
                for i, ((a, _), (b, _)) in enumerate(zip(sentiment_rows(12, seed), sentiment_rows(12, seed + 5)))]
        write_rows(folder / "STS-B" / name, header, rows, sep="\t")
    runs = {}
    for task in ("sst2", "stsb"):
        runs[task] = folder / f"run-{task}"
        assert main(["train", "--model", tiny_model_dir, "--task", task, "--data-dir", str(folder), "--output-dir",
                     str(runs[task]), "--epochs", "1", "--batch-size", "8", "--max-length", "16", "--no-plot"]) == 0
    return folder, runs


def _eval(capsys, *argv):
    capsys.readouterr()
    assert main(["eval", *argv]) == 0
    return json.loads(capsys.readouterr().out)


def test_a_glue_adapter_evaluates_its_own_dev_file_given_as_validation_file(glue_run, capsys):
    folder, runs = glue_run
    by_task = _eval(capsys, "--adapter", str(runs["sst2"]), "--task", "sst2", "--data-dir", str(folder))
    by_file = _eval(capsys, "--adapter", str(runs["sst2"]), "--validation-file", str(folder / "SST-2" / "dev.tsv"))
    assert by_file["dev"] == by_task["dev"]


def test_task_and_validation_file_together_score_the_file(glue_run, tmp_path, capsys):
    folder, runs = glue_run
    half = tmp_path / "half.tsv"
    lines = (folder / "SST-2" / "dev.tsv").read_text().splitlines()
    half.write_text("\n".join(lines[:9]) + "\n")
    whole = _eval(capsys, "--adapter", str(runs["sst2"]), "--task", "sst2", "--data-dir", str(folder))
    part = _eval(capsys, "--adapter", str(runs["sst2"]), "--task", "sst2", "--validation-file", str(half))
    one = _eval(capsys, "--adapter", str(runs["sst2"]), "--task", "sst2", "--data-dir", str(folder),
                "--max-eval-samples", "8")
    assert part["dev"] == one["dev"] and set(whole["dev"]) == set(part["dev"])
    _fails(capsys, ["eval", "--adapter", str(runs["sst2"]), "--task", "sst2", "--validation-file",
                    str(tmp_path / "missing.tsv")], "missing.tsv does not exist")


def test_class_ids_are_accepted_where_the_adapters_names_came_from_ids(glue_run, tmp_path, capsys):
    _, runs = glue_run
    source = write_rows(tmp_path / "ids.csv", ["sentence", "label"], [["good film", "1"], ["awful film", "0"]])
    names = write_rows(tmp_path / "names.csv", ["sentence", "label"],
                       [["good film", "positive"], ["awful film", "negative"]])
    assert _eval(capsys, "--adapter", str(runs["sst2"]), "--validation-file", source) == \
        _eval(capsys, "--adapter", str(runs["sst2"]), "--validation-file", names)


def test_a_regression_dev_set_of_one_example_reports_what_is_defined(glue_run, capsys):
    folder, runs = glue_run
    result = _eval(capsys, "--adapter", str(runs["stsb"]), "--task", "stsb", "--data-dir", str(folder),
                   "--max-eval-samples", "1")
    assert result["dev"]["pearson"] is None and result["dev"]["spearman"] is None
    assert result["dev"]["mse"] >= 0 and "at least 2 examples" in result["note"]


def test_max_length_beyond_the_models_positions_is_capped_not_a_crash(run_dir, tiny_model_dir, tmp_path):
    long_text = " ".join(["good"] * 200)  # far more tokens than the tiny model's 64 positions
    train = write_rows(tmp_path / "train.csv", ["text", "label"], [[long_text, "positive"], ["bad", "negative"]] * 4)
    out = tmp_path / "run"
    assert main(["train", "--model", tiny_model_dir, "--train-file", train, "--validation-file", train,
                 "--text-columns", "text", "--output-dir", str(out), "--epochs", "1", "--max-length", "1024",
                 "--no-plot"]) == 0
    assert json.loads((out / "results.json").read_text())["hyperparameters"]["max_length"] == 64
    source = write_rows(tmp_path / "in.csv", ["text"], [[long_text]])
    assert main(["predict", "--adapter", str(out), "--input", source, "--output", str(tmp_path / "o.csv")]) == 0


@pytest.mark.parametrize("edit,match", [({"target_modules": 5}, "target_modules"),
                                        ({"head_modules": [1]}, "head_modules"),
                                        ({"initializer_range": "big"}, "initializer_range")])
def test_a_hand_edited_adapter_config_with_wrong_types_is_one_line(run_dir, tmp_path, capsys, edit, match):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(run_dir, bad)
    config = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**config, **edit}))
    _fails(capsys, ["predict", "--adapter", str(bad), "--input", str(_tsv(tmp_path / "in.tsv", ["x"])),
                    "--output", str(tmp_path / "o.tsv")], match)


@pytest.mark.parametrize("edit,match", [({"base_model": 5}, "base_model"), ({"text_columns": 5}, "text_columns"),
                                        ({"max_length": 2}, "max_length"), ({"label_names": "ab"}, "label_names")])
def test_a_hand_edited_task_file_with_wrong_types_is_one_line(run_dir, tmp_path, capsys, edit, match):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(run_dir, bad)
    task = json.loads((bad / "task.json").read_text())
    (bad / "task.json").write_text(json.dumps({**task, **edit}))
    _fails(capsys, ["predict", "--adapter", str(bad), "--input", str(_tsv(tmp_path / "in.tsv", ["x"])),
                    "--output", str(tmp_path / "o.tsv")], match)


def test_task_json_names_a_local_base_model_by_absolute_path(tiny_model_dir, tmp_path, monkeypatch):
    from pathlib import Path

    train = write_rows(tmp_path / "train.csv", ["text", "label"], sentiment_rows(16, seed=2))
    monkeypatch.chdir(Path(tiny_model_dir).parent)
    out = tmp_path / "run"
    assert main(["train", "--model", Path(tiny_model_dir).name, "--train-file", train, "--validation-file", train,
                 "--text-columns", "text", "--output-dir", str(out), "--epochs", "1", "--no-plot"]) == 0
    assert json.loads((out / "task.json").read_text())["base_model"] == str(Path(tiny_model_dir).resolve())
    monkeypatch.chdir(tmp_path)  # used from elsewhere, the run still finds its base model
    assert main(["predict", "--adapter", str(out), "--input", train, "--output", "o.csv"]) == 0


def test_a_max_length_too_short_for_a_pair_is_refused(tiny_model_dir, tmp_path, capsys):
    train = write_rows(tmp_path / "train.csv", ["text", "label"], sentiment_rows(16, seed=2))
    _fails(capsys, ["train", "--model", tiny_model_dir, "--train-file", train, "--validation-file", train,
                    "--text-columns", "text", "--output-dir", str(tmp_path / "run"), "--max-length", "2"],
           "--max-length must be at least 8")
