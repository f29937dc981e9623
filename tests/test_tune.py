"""`cytofuse tune`: the tune section's checks, the nested search, its honesty (no outer test group in any
trial), resumption and pruning."""

from __future__ import annotations

import pytest

from cytofuse.config import validate_config
from cytofuse.errors import ConfigError

BASE = {"data": {"manifest": "labels.csv"}}


def _tune(space, **extra) -> dict:
    return {**BASE, "tune": {"space": space, **extra}}


@pytest.mark.parametrize("space, expected", [
    ({}, r"tune\.space: .*empty: name at least one setting"),
    ({"train.lr": {"low": 0.1, "high": 0.01}}, r"tune\.space\.train\.lr: .*low \(0\.1\) is above high \(0\.01\)"),
    ({"train.lrate": {"low": 0.1, "high": 0.2}}, r"unknown parameter 'train\.lrate'; did you mean train\.lr"),
    ({"models.dropout": {"low": 0.1, "high": 1.5}}, r"tune\.space\.models\.dropout: value 1\.5 is not a valid models\.dropout"),
    ({"models.encoder": {"choices": ["smallcnn", "vgg99"]}}, r"tune\.space\.models\.encoder: value 'vgg99'.*encoder must be one of"),
    ({"train.max_epochs": {"low": 1.5, "high": 4}}, r"tune\.space\.train\.max_epochs: value 1\.5.*valid integer"),
    ({"train.lr": {"low": 0, "high": 0.1, "log": True}}, r"tune\.space\.train\.lr: .*log range needs low > 0, got low=0"),
    ({"train.lr": {"low": 0.1}}, r"tune\.space\.train\.lr: .*needs both low and high \(got low=0\.1, high=None\)"),
    ({"models.encoder": {"choices": []}}, r"tune\.space\.models\.encoder: .*choices is empty"),
    ({"patches.size": {"choices": [32, 48]}}, r"'patches\.size' changes the patch cache"),
    ({"train.lr": {"low": 0.001, "high": 0.01, "spread": 2}}, r"tune\.space\.train\.lr\.spread: unknown key"),
])
def test_bad_tune_sections_name_the_key_and_the_value(space, expected):
    with pytest.raises(ConfigError, match=expected):
        validate_config(_tune(space))


def test_unknown_tune_key_and_settings_out_of_range():
    with pytest.raises(ConfigError, match=r"tune\.budget: unknown key"):
        validate_config(_tune({"train.lr": {"low": 0.001, "high": 0.01}}, budget=3))
    with pytest.raises(ConfigError, match=r"tune\.trials: Input should be greater than or equal to 1 \(got 0\)"):
        validate_config(_tune({"train.lr": {"low": 0.001, "high": 0.01}}, trials=0))
    with pytest.raises(ConfigError, match=r"tune searches the settings of one model; the config has 2"):
        validate_config({**_tune({"train.lr": {"low": 0.001, "high": 0.01}}),
                         "models": [{"fusion": "early"}, {"fusion": "late"}]})


def test_a_valid_space_and_with_parameters():
    from cytofuse.config import with_parameters

    cfg = validate_config(_tune({"train.lr": {"low": 1e-4, "high": 1e-2, "log": True},
                                 "train.batch_size": {"low": 8, "high": 32, "step": 8},
                                 "train.augment.gain": {"low": 0.0, "high": 0.2},
                                 "models.dropout": {"low": 0.0, "high": 0.5},
                                 "models.encoder": {"choices": ["smallcnn", "resnet18"]}}))
    assert cfg.tune.space["train.batch_size"].integer and not cfg.tune.space["train.lr"].integer
    tuned = with_parameters(cfg, {"train.lr": 0.003, "train.augment.gain": 0.1, "models.dropout": 0.2,
                                  "models.encoder": "resnet18", "train.batch_size": 16})
    assert tuned.tune is None
    assert tuned.train_settings.lr == 0.003 and tuned.train_settings.augment.gain == 0.1
    assert tuned.train_settings.batch_size == 16
    assert tuned.models[0].dropout == 0.2 and tuned.models[0].encoder == "resnet18"
