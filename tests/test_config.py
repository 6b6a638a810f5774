"""The config tree: presets, YAML round trip, overrides, and errors that name the field."""
from __future__ import annotations

import pytest
import yaml

from pipelines.config import ConfigError, dump_config, load_config, preset_config
from training.config import STAGES


@pytest.mark.parametrize("preset", ["tiny", "toy", "paper", "paper-cpu"])
def test_presets_cover_every_part(preset):
    cfg = preset_config(preset)
    assert cfg.preset == preset
    for stage in STAGES:
        assert cfg.train.stage(stage).steps >= 1
    assert cfg.cascade.decoder.net.temporal is False
    assert cfg.cascade.temporal.net.temporal is True
    assert cfg.cascade.interpolation.net.extra_in_channels == 4
    assert cfg.world.n_images >= 1


def test_paper_arithmetic_on_config():
    shape = preset_config("paper").cascade.shape
    assert (shape.frames, shape.base_size) == (16, 64)
    assert shape.interpolated_frames == 76 == (16 - 1) * 5 + 1
    assert (shape.sr_low_size, shape.sr_high_size) == (256, 768)


def test_yaml_round_trip(tmp_path):
    cfg = load_config("tiny", overrides=["world.seed=7", "train.decoder.lr=0.002"])
    path = tmp_path / "run.yaml"
    dump_config(cfg, path)
    assert yaml.safe_load(path.read_text())["world"]["seed"] == 7
    assert load_config(path=path) == cfg


def test_partial_file_overrides_preset(tmp_path):
    path = tmp_path / "partial.yaml"
    path.write_text("preset: tiny\ntrain:\n  prior:\n    steps: 9\n")
    cfg = load_config(path=path)
    assert cfg.train.prior.steps == 9
    assert cfg.train.decoder == preset_config("tiny").train.decoder


@pytest.mark.parametrize("override, field", [
    ("train.decoder.lr=-1", "train.decoder.lr"),
    ("data.images.filters.pwatermark_max=3", "data.images.filters.pwatermark_max"),
    ("cascade.shape.frames=zero", "cascade.shape.frames"),
    ("world.motions=[spin]", "world.motions"),
])
def test_bad_value_names_the_field(override, field):
    with pytest.raises(ConfigError) as err:
        load_config("tiny", overrides=[override])
    assert field in str(err.value)


def test_unknown_field_and_preset_are_named():
    with pytest.raises(ConfigError, match="train.decoder.learning_rate"):
        load_config("tiny", overrides=["train.decoder.learning_rate=1"])
    with pytest.raises(ConfigError, match="huge"):
        load_config("huge")
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config("tiny", overrides=["world.seed"])


def test_paper_data_keeps_the_largest_size_a_stage_reads():
    cfg = preset_config("paper")
    assert cfg.data.images.image_size == cfg.cascade.shape.sr_high_size == 768
    assert cfg.data.videos.clip_size == cfg.cascade.shape.sr_low_size == 256
    assert cfg.train.temporal.video_datasets == cfg.train.sr_low.video_datasets == ("webvid",)
    assert cfg.train.interpolation.video_datasets == ("webvid", "hdvila")
    with pytest.raises(ConfigError, match="train.temporal.video_datasets"):
        load_config("tiny", overrides=["train.temporal.video_datasets=[youtube]"])
