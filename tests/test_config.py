"""The run configuration: YAML in and out, strict keys, readable errors, command-line overrides."""

from __future__ import annotations

import typing
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from cytofuse.config import (
    CVSettings,
    DataSettings,
    ModelSettings,
    RunConfig,
    SweepSettings,
    dump_config,
    load_config,
    validate_config,
)
from cytofuse.errors import ConfigError, InputError
from cytofuse.preprocess.patches import PatchSettings
from cytofuse.training.fit import TrainSettings


def _yaml(path: Path, content: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(content))
    return path


def _config_error(tmp_path: Path, content: dict, **kw) -> str:
    path = _yaml(tmp_path / "run.yaml", content)
    with pytest.raises(ConfigError) as excinfo:
        load_config(path, **kw)
    return str(excinfo.value)


def test_defaults_load_from_a_minimal_file(tmp_path):
    cfg = load_config(_yaml(tmp_path / "run.yaml", {"data": {"images": "imgs"}}))
    assert cfg.data.images == (tmp_path / "imgs").resolve()
    assert cfg.data.manifest is None
    assert cfg.data.label_column == "label" and cfg.data.group_column == "group"
    assert cfg.patches == PatchSettings()
    assert cfg.patches.size == 64 and cfg.patches.rule == "mean" and cfg.patches.min_ratio == 0.05
    assert cfg.models == [ModelSettings()]
    assert cfg.models[0].fusion == "intermediate" and cfg.models[0].display_name == "intermediate"
    assert cfg.cv == CVSettings()
    assert cfg.cv.n_folds == 5 and cfg.cv.val_fraction == 0.2
    assert cfg.sweep is None
    assert cfg.workers == 1
    assert cfg.train_settings == TrainSettings()
    assert cfg.train == {}  # defaults stay implicit until resolved, so the patch stage needs no torch
    assert cfg.resolved().train["lr"] == 1e-3 and cfg.resolved().train["batch_size"] == 32


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match=f"config file {tmp_path / 'none.yaml'} does not exist"):
        load_config(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match=f"config file {bad} is not valid YAML"):
        load_config(bad)
    listed = tmp_path / "list.yaml"
    listed.write_text("- data\n")
    with pytest.raises(ConfigError, match="must hold a mapping at top level, got list"):
        load_config(listed)


def test_data_needs_exactly_one_source(tmp_path):
    assert "data: Field required" in _config_error(tmp_path, {"patches": {"size": 32}})
    msg = _config_error(tmp_path, {"data": {"images": "a", "manifest": "b.csv"}})
    assert "give exactly one of data.images (folder per class) or data.manifest (CSV)" in msg


def test_unknown_top_level_key_is_named(tmp_path):
    msg = _config_error(tmp_path, {"data": {"images": "x"}, "epochs": 10})
    assert msg.startswith(f"invalid config {tmp_path / 'run.yaml'}:")
    assert "epochs: unknown key (got 10)" in msg


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ({"data": {"images": "x", "colour": "red"}}, "data.colour: unknown key (got 'red')"),
        ({"data": {"images": "x"}, "patches": {"sise": 32}}, "patches.sise: unknown key (got 32)"),
        ({"data": {"images": "x"}, "cv": {"folds": 3}}, "cv.folds: unknown key (got 3)"),
        ({"data": {"images": "x"}, "models": [{"fusion": "late", "backbone": "vgg"}]}, "models.0.backbone: unknown key (got 'vgg')"),
        ({"data": {"images": "x"}, "train": {"epochs": 3}}, "train.epochs: unknown key (got 3)"),
        ({"data": {"images": "x"}, "train": {"augment": {"blur": True}}}, "train.augment.blur: unknown key (got True)"),
    ],
)
def test_unknown_key_inside_a_section_is_named(tmp_path, content, expected):
    assert expected in _config_error(tmp_path, content)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ({"patches": {"size": -3}}, "patches.size: Input should be greater than 0 (got -3)"),
        ({"patches": {"rule": "most"}}, "patches.rule: Input should be 'any', 'all' or 'mean' (got 'most')"),
        ({"models": [{"fusion": "middle"}]}, "models.0.fusion: Value error, fusion must be one of ['early', 'intermediate', 'late', 'single'], got 'middle'"),
        ({"cv": {"n_folds": "many"}}, "(got 'many')"),
        ({"cv": {"val_fraction": 1.5}}, "cv.val_fraction: Input should be less than 1 (got 1.5)"),
        ({"train": {"lr": "fast"}}, "train.lr: Input should be a valid number"),
        ({"train": {"batch_size": 0}}, "train.batch_size: Input should be greater than or equal to 1 (got 0)"),
        ({"workers": 0}, "workers: Input should be greater than or equal to 1 (got 0)"),
    ],
)
def test_bad_value_names_key_and_value(tmp_path, content, expected):
    assert expected in _config_error(tmp_path, {"data": {"images": "x"}, **content})


def test_all_bad_values_are_listed_together(tmp_path):
    msg = _config_error(tmp_path, {"data": {"images": "x"}, "patches": {"size": 0, "min_ratio": 2}, "cv": {"seed": "a"}})
    assert "patches.size:" in msg and "patches.min_ratio:" in msg and "cv.seed:" in msg


def test_overrides_change_int_list_and_nested_values(tmp_path):
    path = _yaml(tmp_path / "run.yaml", {"data": {"images": "x"}, "patches": {"size": 32}})
    cfg = load_config(
        path,
        overrides=[
            "patches.size=48",
            "patches.channels=[mito, 2]",
            "train.augment.flip=false",
            "train.lr=0.01",
            "cv.n_folds=loo",
            "workers=2",
            "models=[{fusion: early}, {fusion: single, channel: er}]",
        ],
    )
    assert cfg.patches.size == 48
    assert cfg.patches.channels == ["mito", 2]
    assert cfg.train_settings.augment.flip is False
    assert cfg.train_settings.augment.rot90 is True
    assert cfg.train["lr"] == 0.01
    assert cfg.cv.n_folds == "loo"
    assert cfg.workers == 2
    assert [m.display_name for m in cfg.models] == ["early", "single:er"]
    # the file itself is not changed by overrides
    assert yaml.safe_load(path.read_text()) == {"data": {"images": "x"}, "patches": {"size": 32}}


def test_override_errors_name_the_override(tmp_path):
    path = _yaml(tmp_path / "run.yaml", {"data": {"images": "x"}, "workers": 2})
    with pytest.raises(ConfigError, match=r"override must look like section.field=value, got 'patches.size'"):
        load_config(path, overrides=["patches.size"])
    with pytest.raises(ConfigError, match=r"override 'workers.count=3': 'workers' is not a section"):
        load_config(path, overrides=["workers.count=3"])
    with pytest.raises(ConfigError, match=r"patches.sise: unknown key \(got 48\)"):
        load_config(path, overrides=["patches.sise=48"])
    with pytest.raises(ConfigError, match=r"patches.size: Input should be greater than 0 \(got -1\)"):
        load_config(path, overrides=["patches.size=-1"])


def test_data_paths_resolve_relative_to_the_config_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = _yaml(tmp_path / "project" / "conf" / "run.yaml", {"data": {"manifest": "../data/labels.csv"}})
    cfg = load_config(Path("project/conf/run.yaml"))
    assert cfg.data.manifest == (tmp_path / "project" / "data" / "labels.csv").resolve()
    assert cfg.data.manifest.is_absolute()
    absolute = (tmp_path / "elsewhere" / "imgs").resolve()
    _yaml(path, {"data": {"images": str(absolute)}})
    assert load_config(path).data.images == absolute


def test_dump_then_load_round_trips(tmp_path):
    path = _yaml(
        tmp_path / "run.yaml",
        {
            "data": {"manifest": "labels.csv", "label_column": "cell_line"},
            "patches": {"size": 32, "exclude_channels": ["nucleus"], "percentiles": [2, 98]},
            "models": [{"fusion": "late", "late_weights": "equal"}, {"fusion": "single", "channel": 1}],
            "train": {"max_epochs": 7, "augment": {"rotate_deg": 0.0}},
            "cv": {"n_folds": 3, "test_fraction": 0.1},
            "sweep": {"parameter": "patches.size", "values": [32, 64]},
            "workers": 2,
        },
    )
    cfg = load_config(path)
    (tmp_path / "out").mkdir()
    out = dump_config(cfg, tmp_path / "out" / "config.yaml")
    assert out == tmp_path / "out" / "config.yaml"
    assert not list((tmp_path / "out").glob(".*partial"))
    again = load_config(out)
    assert again == cfg
    assert again.patches.percentiles == (2.0, 98.0)
    assert again.sweep == SweepSettings(parameter="patches.size", values=[32, 64])
    assert again.data.manifest == (tmp_path / "labels.csv").resolve()


def test_validate_config_names_its_source():
    with pytest.raises(ConfigError, match=r"^invalid config command-line flags:\n  workers"):
        validate_config({"data": {"images": "x"}, "workers": -1}, source="command-line flags")
    assert issubclass(ConfigError, InputError) and issubclass(ConfigError, ValueError)


def _models_below(model: type[BaseModel], seen: set) -> None:
    """``model`` and every pydantic model its fields refer to."""
    if model in seen:
        return
    seen.add(model)
    for info in model.model_fields.values():
        stack = [info.annotation]
        while stack:
            tp = stack.pop()
            if isinstance(tp, type) and issubclass(tp, BaseModel):
                _models_below(tp, seen)
            stack.extend(typing.get_args(tp))


def test_every_settings_field_has_a_description():
    seen: set = set()
    for model in (RunConfig, DataSettings, ModelSettings, CVSettings, SweepSettings, PatchSettings, TrainSettings):
        _models_below(model, seen)
    assert {m.__name__ for m in seen} >= {
        "RunConfig", "DataSettings", "ModelSettings", "CVSettings", "SweepSettings", "PatchSettings", "TrainSettings", "Augment",
    }
    undocumented = [
        f"{m.__name__}.{name}" for m in seen for name, info in m.model_fields.items() if not (info.description or "").strip()
    ]
    assert undocumented == []
    assert DataSettings.__doc__


def test_every_optional_field_has_a_default_that_validates():
    for model in (DataSettings, ModelSettings, CVSettings, PatchSettings, TrainSettings):
        required = [name for name, info in model.model_fields.items() if info.is_required()]
        assert required == []
    assert [n for n, i in SweepSettings.model_fields.items() if i.is_required()] == ["parameter", "values"]
    assert PatchSettings.model_validate(PatchSettings().model_dump()) == PatchSettings()
    assert TrainSettings.model_validate(TrainSettings().model_dump()) == TrainSettings()
