import json
import logging

import pytest

from adakron import AdaKronConfig


def test_defaults_are_the_paper_setting():
    config = AdaKronConfig()
    assert (config.rank, config.kron_factor, config.activation, config.placement) == (16, 4, "gelu", "ffn")


def test_rank_not_divisible_by_kron_factor_names_field_value_and_fix():
    with pytest.raises(ValueError, match=r"`rank` \(10\) must be divisible by `kron_factor` \(4\); try rank=8"):
        AdaKronConfig(rank=10, kron_factor=4)


@pytest.mark.parametrize("field", ["rank", "kron_factor"])
@pytest.mark.parametrize("value", [0, -4, 2.5])
def test_non_positive_or_fractional_sizes_are_rejected(field, value):
    with pytest.raises(ValueError, match=rf"`{field}` \({value!r}\) must be a positive integer"):
        AdaKronConfig(**{field: value})


def test_unknown_activation_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"`activation` \('swishy'\) is not a known activation; use one of: .*gelu"):
        AdaKronConfig(activation="swishy")


def test_unknown_placement_and_init_are_rejected():
    with pytest.raises(ValueError, match="placement"):
        AdaKronConfig(placement="everywhere")
    with pytest.raises(ValueError, match="init"):
        AdaKronConfig(init="zeros")


def test_json_round_trip_is_exact():
    config = AdaKronConfig(rank=48, kron_factor=8, target_modules=["a.b", "c"], label_names=("no", "yes"),
                           num_labels=2, init="identity")
    again = AdaKronConfig.from_json(config.to_json())
    assert again == config
    assert json.loads(config.to_json())["target_modules"] == ["a.b", "c"]


def test_unknown_keys_are_warned_about_and_ignored(caplog):
    with caplog.at_level(logging.WARNING):
        config = AdaKronConfig.from_dict({"rank": 8, "from_the_future": 1})
    assert config.rank == 8
    assert "from_the_future" in caplog.text


def test_config_is_frozen():
    with pytest.raises(AttributeError):
        AdaKronConfig().rank = 8


def test_closed_form_parameter_count():
    # d*(r/f + f) + r/f + f + r*d + d, per adapted sub-layer
    assert AdaKronConfig(rank=16, kron_factor=4).adapter_parameters(384) == 384 * 8 + 8 + 16 * 384 + 384
    assert AdaKronConfig(rank=16, kron_factor=1).adapter_parameters(384) == 384 * 16 + 16 + 16 * 384 + 384
