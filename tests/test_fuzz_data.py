"""Fuzzed data files: whatever bytes a user's CSV, TSV or JSON-lines file holds, reading it for `adakron train`
or `adakron predict` ends in examples or in one UsageError (one line, exit code 2), never another exception,
and nothing is written before the data is known to be good."""

import json
import string
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from adakron.cli import main
from adakron.errors import UsageError
from adakron.training.recipes import TrainArgs
from adakron.training.trainer import prepare

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
NASTY = ['"', "'", ",", "\t", "\n", "\r", "\x00", "\ufeff", "\\", "é", "\U0001F600", " ", "label", "text"]
ENCODINGS = ["utf-8", "utf-8-sig", "latin-1", "utf-16", "utf-32"]

field = st.one_of(st.lists(st.sampled_from(NASTY + list(string.ascii_letters)), max_size=8).map("".join),
                  st.sampled_from(["nan", "inf", "-inf", "1", "0", "2.5", "", "x" * 200_000]))


@st.composite
def table_file(draw):
    """(suffix, bytes): a header and ragged-or-not rows of nasty fields, in some encoding."""
    suffix = draw(st.sampled_from([".csv", ".tsv"]))
    sep = "\t" if suffix == ".tsv" else ","
    header = draw(st.lists(st.sampled_from(["text", "label", "text", "b", "", '"q']), min_size=0, max_size=4))
    rows = draw(st.lists(st.lists(field, min_size=0, max_size=5), max_size=6))
    body = "\n".join(sep.join(r) for r in [header, *rows])
    encoding = draw(st.sampled_from(ENCODINGS))
    return suffix, body.encode(encoding, errors="replace")


@st.composite
def jsonl_file(draw):
    values = st.one_of(field, st.integers(-3, 3), st.floats(allow_nan=True, allow_infinity=True), st.none(),
                       st.booleans(), st.lists(st.integers(), max_size=2), st.just({"k": 1}))
    records = draw(st.lists(st.one_of(st.dictionaries(st.sampled_from(["text", "label", "extra"]), values),
                                      values), max_size=6))
    lines = [json.dumps(r) for r in records]
    if draw(st.booleans()):
        lines.append(draw(st.sampled_from(['{"text": "a", ', '{"text": "\\ud800", "label": "a"}', "[1, 2]", "\x00"])))
    return ".jsonl", "\n".join(lines).encode()


@st.composite
def nearly_valid_file(draw):
    """A well-formed text,label table or JSON-lines file whose texts and labels are nasty: most of these read."""
    labels = draw(st.sampled_from([["pos", "neg"], ["0", "1", "2"], ["1.5", "2", "nan"], ["a", ""], ["0.5", "1e3"]]))
    rows = draw(st.lists(st.tuples(field.filter(lambda t: not any(c in t for c in "\t\n\r\",")),
                                   st.sampled_from(labels)), min_size=1, max_size=8))
    kind = draw(st.sampled_from([".csv", ".tsv", ".jsonl"]))
    if kind == ".jsonl":
        return kind, "\n".join(json.dumps({"text": t, "label": y}) for t, y in rows).encode()
    sep = "\t" if kind == ".tsv" else ","
    return kind, "\n".join(sep.join(r) for r in [("text", "label"), *rows]).encode(draw(st.sampled_from(
        ["utf-8", "utf-8-sig"])))


any_file = st.one_of(nearly_valid_file(), nearly_valid_file(), table_file(), jsonl_file(), st.tuples(st.sampled_from([".csv", ".tsv", ".jsonl"]),
                                                             st.binary(max_size=300)))


def _outcome(args: TrainArgs):
    try:
        prepared = prepare(args)
    except UsageError as e:
        message = str(e)
        assert message and "\n" not in message.strip(), message
        return None
    return prepared


@SETTINGS
@given(train=any_file, dev=any_file)
def test_reading_training_files_gives_examples_or_one_usage_error(tmp_path, train, dev):
    import tempfile

    folder = Path(tempfile.mkdtemp(dir=tmp_path))
    train_path, dev_path = folder / f"train{train[0]}", folder / f"dev{dev[0]}"
    train_path.write_bytes(train[1])
    dev_path.write_bytes(dev[1])
    out = folder / "out"
    prepared = _outcome(TrainArgs(train_file=str(train_path), validation_file=str(dev_path), text_columns=["text"],
                                  output_dir=str(out)))
    assert not out.exists()  # preparing writes nothing, whatever the outcome
    event("read" if prepared is not None else "refused")
    if prepared is not None:
        assert len(prepared.train) > 0 and len(prepared.devs["dev"]) > 0
        if prepared.labels.regression:
            assert all(isinstance(y, float) and y == y and abs(y) != float("inf") for y in prepared.train.labels)
        else:
            assert set(prepared.train.labels) <= set(range(prepared.labels.num_labels))
            assert set(prepared.devs["dev"].labels) <= set(range(prepared.labels.num_labels))
        assert all(isinstance(t, str) for texts in prepared.train.texts for t in texts)


@pytest.fixture(scope="module")
def adapter_run(tiny_model_dir, tmp_path_factory):
    from conftest import sentiment_rows, write_rows

    folder = tmp_path_factory.mktemp("fuzz-run")
    train = write_rows(folder / "train.csv", ["text", "label"], sentiment_rows(16, seed=0))
    out = folder / "run"
    assert main(["train", "--model", tiny_model_dir, "--train-file", train, "--validation-file", train,
                 "--text-columns", "text", "--output-dir", str(out), "--epochs", "1", "--max-length", "16",
                 "--no-plot"]) == 0
    return out


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(source=any_file)
def test_predict_on_any_input_file_writes_predictions_or_one_line_and_exit_2(adapter_run, tmp_path, capsys,
                                                                             source):
    import tempfile

    folder = Path(tempfile.mkdtemp(dir=tmp_path))
    path = folder / f"input{source[0]}"
    path.write_bytes(source[1])
    out = folder / "out.jsonl"
    capsys.readouterr()
    code = main(["predict", "--adapter", str(adapter_run), "--input", str(path), "--output", str(out)])
    err = capsys.readouterr().err.strip()
    event(f"exit {code}")
    if code == 0:
        assert len(Path(out).read_text().splitlines()) > 0
    else:
        assert code == 2 and "Traceback" not in err and err.count("\n") == 0 and err, err
        assert not out.exists() and not any(p.name.endswith(".tmp") for p in folder.iterdir())
