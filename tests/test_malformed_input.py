"""Malformed input found by a review (issue 12/13 session): each ends in one line and exit code 2 (UsageError in
the library), never a traceback: damaged files, out-of-range numbers, and flags that cannot work together."""

import json
import shutil

import pytest
from conftest import fails_in_one_line as _fails
from conftest import sentiment_rows, wider_copy, write_rows

from adakron.cli import main
from adakron.errors import UsageError
from adakron.training.data import infer_label_space, read_file
from adakron.training.generate import Sampling
from adakron.training.recipes import OWN_DATA_RECIPE, TrainArgs, with_recipe
from adakron.training.tasks import get_task, read_split


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    train = write_rows(folder / "train.csv", ["text", "label"], sentiment_rows(32, seed=0))
    dev = write_rows(folder / "dev.csv", ["text", "label"], sentiment_rows(16, seed=1))
    return folder, train, dev


def _train(model_dir, data, out, *extra):
    _, train, dev = data
    assert main(["train", "--model", model_dir, "--train-file", train, "--validation-file", dev, "--text-columns",
                 "text", "--output-dir", str(out), "--epochs", "1", "--batch-size", "8", "--max-length", "16",
                 "--no-plot", *extra]) == 0
    return out


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, data):
    return _train(tiny_model_dir, data, data[0] / "run")


@pytest.mark.parametrize("content", [b"{", b"\xff\xfe", b"[1, 2]"])
def test_a_damaged_adapter_config_is_one_line(run_dir, data, tmp_path, capsys, content):
    bad = tmp_path / "bad"
    shutil.copytree(run_dir, bad)
    (bad / "adapter_config.json").write_bytes(content)
    _fails(capsys, ["eval", "--adapter", str(bad), "--validation-file", data[2]], "adapter_config.json")


@pytest.mark.parametrize("value", ["0", "-63"])
def test_eval_refuses_a_max_eval_samples_below_one(run_dir, data, capsys, value):
    _fails(capsys, ["eval", "--adapter", str(run_dir), "--validation-file", data[2], "--max-eval-samples", value],
           "--max-eval-samples")


def test_a_lora_run_on_another_backbone_is_one_line(tiny_model_dir, data, tmp_path, capsys):
    out = _train(tiny_model_dir, data, tmp_path / "lora", "--method", "lora")
    other = wider_copy(tiny_model_dir, tmp_path / "wider")
    _fails(capsys, ["eval", "--adapter", str(out), "--validation-file", data[2], "--model", other],
           "does not fit the base model")


def test_a_model_folder_whose_config_has_no_model_type_is_one_line(tmp_path, capsys):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    _fails(capsys, ["params", "--model", str(tmp_path / "m")], "cannot load")


def test_params_refuses_zero_labels(tiny_model_dir, capsys):
    _fails(capsys, ["params", "--model", tiny_model_dir, "--num-labels", "0"], "--num-labels")


@pytest.mark.parametrize("seed", [2**70, -(2**63) - 1, 1.5])
def test_a_sampling_seed_torch_cannot_take_is_refused_before_any_model_loads(seed):
    with pytest.raises(UsageError, match="--seed"):
        Sampling(seed=seed)
    assert Sampling(seed=2**64 - 1).seed == 2**64 - 1


def test_an_empty_glue_file_is_named(tmp_path):
    (tmp_path / "dev.tsv").write_text("")
    with pytest.raises(UsageError, match="is empty"):
        read_split(get_task("rte"), tmp_path / "dev.tsv")


def test_integer_labels_of_any_length_sort_numerically():
    huge = "9" * 5000  # int() refuses strings of more than 4300 digits
    assert infer_label_space([huge, "-3", "10", "2", "-20"]).names == ("-20", "-3", "2", "10", huge)


def test_json_nested_too_deeply_is_one_line(tmp_path):
    path = tmp_path / "deep.jsonl"
    path.write_text(json.dumps({"text": "a"})[:-1] + ', "label": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    with pytest.raises(UsageError, match="nested too deeply"):
        read_file(path, ["text"], "label")


def test_the_consistency_loss_is_refused_under_ddp_before_any_work(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UsageError, match="without torchrun"):
        with_recipe(TrainArgs(num_experts=4, consistency_weight=1.0), OWN_DATA_RECIPE)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert with_recipe(TrainArgs(num_experts=4, consistency_weight=1.0), OWN_DATA_RECIPE).consistency_weight == 1.0


@pytest.mark.parametrize("method", ["lora", "full"])
def test_experts_are_refused_for_methods_that_have_none(method):
    with pytest.raises(UsageError, match="--num-experts is for"):
        with_recipe(TrainArgs(method=method, num_experts=4), OWN_DATA_RECIPE)


def test_a_library_error_is_reported_by_its_first_line_or_by_its_type_when_it_has_no_message():
    from adakron.errors import first_line

    assert first_line(ValueError("  size mismatch for weight\n  copying a param of shape ...\n")) == \
        "size mismatch for weight"
    assert first_line(KeyError()) == "KeyError"


@pytest.mark.parametrize("content", [b'"q\n",\n"', b'"q\n",label\nx\n'])
def test_a_column_name_with_a_line_break_is_shown_escaped_so_the_message_stays_one_line(tmp_path, content):
    """Found by test_fuzz_data: a quoted CSV header may hold a newline, which a message must not print raw."""
    path = tmp_path / "dev.csv"
    path.write_bytes(content)
    with pytest.raises(UsageError) as error:
        read_file(path, ["text"], "label")
    assert "\n" not in str(error.value) and "'q\\n'" in str(error.value)
