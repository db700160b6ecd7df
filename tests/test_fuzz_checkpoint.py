"""Fuzzed checkpoints: whatever was done to adapter_model.safetensors or adapter_config.json (bytes flipped, cut
short, header edited, wrong types, extra keys, absurd sizes), `load_adapter` raises AdapterLoadError and leaves
the model as it was, or it loads exactly the weights that were saved. Nothing in the folder is ever executed or
unpickled."""

import json
import pickle
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import adakron
from adakron.adapters.checkpoint import CONFIG_NAME, WEIGHTS_NAME, AdapterLoadError, adapter_state_dict

SETTINGS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = tiny_model("bert")
    adakron.add_adapter(model, adakron.AdaKronConfig(rank=8, init="reference", initializer_range=0.3), name="a")
    folder = tmp_path_factory.mktemp("ckpt") / "a"
    adakron.save_adapter(model, folder, name="a")
    return folder, {k: v.clone() for k, v in adapter_state_dict(model, "a").items()}


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, hasattr(model, "adakron_state")


def _load_or_refuse(folder: Path, weights: dict):
    model = tiny_model("bert")
    before = _snapshot(model)
    try:
        name = adakron.load_adapter(model, folder)
    except AdapterLoadError as e:
        assert str(e) and "\n" not in str(e)
        after = _snapshot(model)
        assert after[1] == before[1] and after[0].keys() == before[0].keys()
        assert all(torch.equal(after[0][k], before[0][k]) for k in before[0])
        return "refused"
    loaded = adapter_state_dict(model, name)
    assert loaded.keys() == weights.keys() and all(torch.equal(loaded[k], weights[k]) for k in weights)
    return "loaded"


def _copy(folder: Path, tmp_path: Path) -> Path:
    target = Path(tempfile.mkdtemp(dir=tmp_path)) / "a"
    shutil.copytree(folder, target)
    return target


@SETTINGS
@given(flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)), min_size=1, max_size=4),
       cut=st.one_of(st.none(), st.floats(0, 1, exclude_max=True)))
def test_flipped_or_truncated_weights_are_refused_or_load_unchanged(saved, tmp_path, flips, cut):
    folder = _copy(saved[0], tmp_path)
    data = bytearray((folder / WEIGHTS_NAME).read_bytes())
    for where, mask in flips:
        data[int(where * len(data))] ^= mask
    if cut is not None:
        data = data[: int(cut * len(data))]
    (folder / WEIGHTS_NAME).write_bytes(bytes(data))
    _load_or_refuse(folder, saved[1])


@SETTINGS
@given(edit=st.dictionaries(st.sampled_from(["dtype", "shape", "data_offsets", "__metadata__"]),
                            st.one_of(st.integers(-5, 10**12), st.text(max_size=5), st.lists(st.integers(0, 10**9),
                                                                                             max_size=3))))
def test_an_edited_safetensors_header_is_refused_or_loads_unchanged(saved, tmp_path, edit):
    folder = _copy(saved[0], tmp_path)
    data = (folder / WEIGHTS_NAME).read_bytes()
    size = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + size])
    key = sorted(k for k in header if k != "__metadata__")[0]
    header[key].update({k: v for k, v in edit.items() if k != "__metadata__"})
    raw = json.dumps(header).encode()
    (folder / WEIGHTS_NAME).write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + size:])
    config = json.loads((folder / CONFIG_NAME).read_text())
    config.pop("weights_sha256")  # so the edited header itself is what the loader must cope with
    (folder / CONFIG_NAME).write_text(json.dumps(config))
    _load_or_refuse(folder, saved[1])


CONFIG_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-3, 10**9), st.floats(allow_nan=True),
                          st.text(max_size=6), st.lists(st.integers(), max_size=2), st.just({"x": 1}),
                          st.sampled_from(["gelu", "relu", "identity", "both", "outer", "houlsby", ".*"]))


@SETTINGS
@given(edits=st.dictionaries(st.sampled_from(["rank", "kron_factor", "activation", "placement", "target_modules",
                                              "init", "outer_bias", "num_experts", "experts", "initializer_range",
                                              "head_modules", "num_labels", "label_names", "problem_type",
                                              "format_version", "adapter_name", "model_type", "extra_key"]),
                             CONFIG_VALUES, min_size=1, max_size=3))
def test_an_edited_config_is_refused_or_loads_the_saved_weights(saved, tmp_path, edits):
    folder = _copy(saved[0], tmp_path)
    config = json.loads((folder / CONFIG_NAME).read_text())
    (folder / CONFIG_NAME).write_text(json.dumps({**config, **edits}))
    _load_or_refuse(folder, saved[1])


def test_a_config_claiming_absurd_sizes_is_refused_before_anything_is_allocated(saved, tmp_path):
    for edit in ({"rank": 2**30, "kron_factor": 2**10}, {"num_experts": 10**7}, {"num_labels": 10**9, "label_names": None}):
        folder = _copy(saved[0], tmp_path)
        config = json.loads((folder / CONFIG_NAME).read_text())
        (folder / CONFIG_NAME).write_text(json.dumps({**config, **edit}))
        assert _load_or_refuse(folder, saved[1]) == "refused"


def test_a_pickle_beside_the_adapter_is_never_opened(saved, tmp_path, monkeypatch):
    folder = _copy(saved[0], tmp_path)
    (folder / "adapter_model.bin").write_bytes(pickle.dumps({"x": 1}))
    (folder / "pytorch_model.bin").write_bytes(b"not even a pickle")
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: pytest.fail("unpickled"))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called"))
    assert _load_or_refuse(folder, saved[1]) == "loaded"
