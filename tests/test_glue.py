"""GLUE loading (all nine tasks, from the standard TSV layout) and metrics against scikit-learn/scipy."""

from pathlib import Path

import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from adakron.training.data import UsageError
from adakron.training.metrics import compute
from adakron.training.tasks import TASKS, get_task, load_glue

SHARED_GLUE = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"

# Two rows per task, in each task's own GLUE TSV layout (header or none, column order, label spelling).
LAYOUTS = {
    "CoLA": (None, [["gj04", "1", "", "The dog runs ."], ["gj04", "0", "*", "Dog the runs ."]]),
    "SST-2": (["sentence", "label"], [["a great movie", "1"], ["a bad movie", "0"]]),
    "MRPC": (["\ufeffQuality", "#1 ID", "#2 ID", "#1 String", "#2 String"],
             [["1", "1", "2", "He said \" hi .", "He said hello ."], ["0", "3", "4", "A .", "B ."]]),
    "QQP": (["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
            [["0", "1", "2", "Why?", "How?", "0"], ["1", "3", "4", "What?", "What?", "1"]]),
    "STS-B": (["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2",
               "score"], [["0", "g", "f", "y", "0", "n", "n", "A man.", "A man.", "5.000"],
                          ["1", "g", "f", "y", "1", "n", "n", "A cat.", "A car.", "0.500"]]),
    "MNLI": (["index", "promptID", "pairID", "genre", "s1b", "s2b", "s1p", "s2p", "sentence1", "sentence2",
              "label1", "gold_label"], [["0"] * 8 + ["P.", "H.", "neutral", "neutral"],
                                        ["1"] * 8 + ["P2.", "H2.", "contradiction", "contradiction"]]),
    "QNLI": (["index", "question", "sentence", "label"],
             [["0", "Q?", "S.", "entailment"], ["1", "Q2?", "\" S2.", "not_entailment"]]),
    "RTE": (["index", "sentence1", "sentence2", "label"],
            [["0", "P.", "H.", "not_entailment"], ["1", "P2.", "H2.", "entailment"]]),
    "WNLI": (["index", "sentence1", "sentence2", "label"], [["0", "P.", "H.", "1"], ["1", "P2.", "H2.", "0"]]),
}
EXPECTED_LABELS = {"cola": [1, 0], "sst2": [1, 0], "mrpc": [1, 0], "qqp": [0, 1], "stsb": [5.0, 0.5],
                   "mnli": [1, 2], "qnli": [0, 1], "rte": [1, 0], "wnli": [1, 0]}


@pytest.fixture
def glue_dir(tmp_path):
    for folder, (header, rows) in LAYOUTS.items():
        task = next(t for t in TASKS.values() if t.folder == folder)
        (tmp_path / folder).mkdir()
        lines = (["\t".join(header)] if header else []) + ["\t".join(r) for r in rows]
        for name in ("train.tsv", *task.dev_files):
            (tmp_path / folder / name).write_text("\n".join(lines), encoding="utf-8")
    return tmp_path


@pytest.mark.parametrize("name", sorted(TASKS))
def test_every_glue_task_loads_from_the_standard_layout(glue_dir, name):
    task = get_task(name)
    train, devs = load_glue(task, str(glue_dir))
    assert train.labels == EXPECTED_LABELS[name]
    assert len(train.texts[0]) == len(task.text_columns)
    assert list(devs) == [f[:-4] for f in task.dev_files]


def test_mnli_evaluates_on_matched_and_mismatched(glue_dir):
    _, devs = load_glue(get_task("mnli"), str(glue_dir))
    assert list(devs) == ["dev_matched", "dev_mismatched"]


def test_quotes_in_glue_text_are_kept_verbatim(glue_dir):
    train, _ = load_glue(get_task("qnli"), str(glue_dir))
    assert train.texts[1] == ("Q2?", "\" S2.")


def test_task_names_accept_glue_spellings():
    assert get_task("SST-2").name == "sst2" and get_task("STS-B").name == "stsb" and get_task("CoLA").name == "cola"


def test_unknown_task_lists_the_tasks():
    with pytest.raises(UsageError, match="unknown task 'squad'; GLUE tasks: cola, sst2"):
        get_task("squad")


def test_glue_dir_comes_from_the_environment(glue_dir, monkeypatch):
    monkeypatch.setenv("GLUE_DIR", str(glue_dir))
    train, _ = load_glue(get_task("rte"), None)
    assert len(train) == 2


def test_without_data_dir_or_network_the_error_says_what_to_pass(monkeypatch):
    monkeypatch.delenv("GLUE_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(UsageError, match=r"pass --data-dir DIR \(a folder holding RTE/train.tsv and RTE/dev.tsv"):
        load_glue(get_task("rte"), None)


def test_malformed_row_names_file_and_line(glue_dir):
    path = glue_dir / "RTE" / "train.tsv"
    path.write_text(path.read_text() + "\n2\tonly two")
    with pytest.raises(UsageError, match=r"RTE/train.tsv:4: expected 4 tab-separated fields, found 2"):
        load_glue(get_task("rte"), str(glue_dir))


def test_unknown_label_names_file_and_line(glue_dir):
    path = glue_dir / "RTE" / "dev.tsv"
    path.write_text(path.read_text() + "\n2\tP\tH\tmaybe")
    with pytest.raises(UsageError, match=r"RTE/dev.tsv:4: label 'maybe' is not one of entailment, not_entailment"):
        load_glue(get_task("rte"), str(glue_dir))


@pytest.mark.skipif(not (SHARED_GLUE / "RTE").is_dir(), reason="shared GLUE data not present")
@pytest.mark.parametrize("name,rows", [("cola", 8551), ("sst2", 67349), ("mrpc", 3668), ("stsb", 5749),
                                       ("rte", 2490), ("wnli", 635)])
def test_real_glue_train_sets_load_with_official_row_counts(name, rows):
    train, devs = load_glue(get_task(name), str(SHARED_GLUE))
    assert len(train) == rows
    assert all(len(d) > 0 for d in devs.values())


PREDICTIONS = np.array([1, 0, 1, 1, 0, 1, 0, 0, 1, 1])
REFERENCES = np.array([1, 0, 0, 1, 0, 1, 1, 0, 1, 0])


def test_accuracy_matches_scikit_learn():
    assert compute("accuracy", PREDICTIONS, REFERENCES) == {"accuracy": accuracy_score(REFERENCES, PREDICTIONS)}


def test_f1_and_accuracy_match_scikit_learn():
    result = compute("f1", PREDICTIONS, REFERENCES)
    assert result["f1"] == pytest.approx(f1_score(REFERENCES, PREDICTIONS))
    assert result["accuracy"] == pytest.approx(0.7)


def test_matthews_matches_scikit_learn():
    result = compute("matthews", PREDICTIONS, REFERENCES)
    assert result["matthews_correlation"] == pytest.approx(matthews_corrcoef(REFERENCES, PREDICTIONS))


def test_pearson_and_spearman_match_scipy():
    scores = np.array([0.1, 2.5, 3.3, 4.9, 1.0])
    gold = np.array([0.0, 3.0, 3.0, 5.0, 2.0])
    result = compute("correlation", scores, gold)
    assert result["pearson"] == pytest.approx(pearsonr(scores, gold)[0])
    assert result["spearman"] == pytest.approx(spearmanr(scores, gold)[0])



def test_hub_path_reads_nyu_mll_glue_columns(monkeypatch):
    from datasets import Dataset, DatasetDict

    calls = []

    def fake_load_dataset(path, name):
        calls.append((path, name))
        split = Dataset.from_dict({"premise": ["P."], "hypothesis": ["H."], "label": [2], "idx": [0]})
        return DatasetDict({"train": split, "validation_matched": split, "validation_mismatched": split})

    monkeypatch.setattr("datasets.load_dataset", fake_load_dataset)
    monkeypatch.setattr("adakron.training.tasks._hub_reachable", lambda timeout=3.0: True)
    monkeypatch.delenv("GLUE_DIR", raising=False)
    train, devs = load_glue(get_task("mnli"), None)
    assert calls == [("nyu-mll/glue", "mnli")]
    assert train.texts == [("P.", "H.")] and train.labels == [2]
    assert list(devs) == ["dev_matched", "dev_mismatched"]  # named as the local GLUE files are
