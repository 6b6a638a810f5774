"""The whole config tree: world, data, every network of the cascade, training, and sampling.

Each layer owns its part (model/config.py, training/config.py, pipelines/world, pipelines/images);
this module composes them, loads and dumps YAML, and applies `key.path=value` overrides. A bad
value fails with a message that names the field, e.g. `train.decoder.lr: Input should be greater than 0`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import fsspec
import yaml
from pydantic import Field, ValidationError, field_validator

from model.config import CascadeConfig, ConfigBase, cascade_preset
from pipelines.images.filters import ImageFilterConfig, PixelFilterConfig
from pipelines.safety import UrlPolicy
from pipelines.world.config import WorldConfig, world_preset
from training.config import TrainConfig, train_preset

PRESETS = ("tiny", "toy", "paper", "paper-cpu")


class ConfigError(ValueError):
    """A config that does not validate; the message lists every bad field by its dotted path."""


class ImageDataConfig(ConfigBase):
    filters: ImageFilterConfig = ImageFilterConfig()
    pixel_filters: PixelFilterConfig = Field(
        PixelFilterConfig(), description="NSFW/watermark heads on CLIP embeddings; on when weights are set")
    image_size: int = Field(64, ge=8, description="img2dataset resizes (center crop) to this side")
    samples_per_shard: int = Field(1000, ge=1)
    processes: int = Field(2, ge=1)
    threads: int = Field(8, ge=1)
    retries: int = Field(1, ge=0, description="img2dataset retries per URL")
    distributor: Literal["auto", "multiprocessing", "ray"] = Field(
        "auto", description="auto: ray when RAY_ADDRESS is set, else multiprocessing")
    # Metadata columns by name, as img2dataset's url_col/caption_col (LAION's names by default;
    # a name that is absent matches a column spelled with other case, e.g. `url`).
    url_col: str = Field("URL", min_length=1, description="the column holding each row's image URL")
    caption_col: str = Field("TEXT", min_length=1, description="the column holding each row's caption")
    punsafe_col: str = Field("punsafe", min_length=1, description="NSFW probability (missing: all null)")
    pwatermark_col: str = Field("pwatermark", min_length=1, description="watermark probability")
    width_col: str = Field("WIDTH", min_length=1)
    height_col: str = Field("HEIGHT", min_length=1)
    similarity_col: str = Field("similarity", min_length=1, description="CLIP text-image similarity")
    batch_rows: int = Field(65536, ge=1, description="metadata rows read, filtered and decided at a time")
    resolve_workers: int = Field(32, ge=1, description="host names resolved concurrently")
    host_cache: int = Field(65536, ge=1, description="host answers and URL-origin decisions kept per run")
    deferred_rounds: int = Field(3, ge=0, description="later rounds for rows a host deferred (rate_limited)")
    deferred_wait_s: float = Field(2.0, ge=0, description="pause before each such round")


class VideoDataConfig(ConfigBase):
    clip_size: int = Field(64, ge=8, description="clips are cut and scaled to this side (even: H.264 yuv420p)")
    samples_per_shard: int = Field(100, ge=1)
    processes: int = Field(2, ge=1)
    threads: int = Field(4, ge=1, description="downloads in flight per process")
    retries: int = Field(1, ge=0)
    distributor: Literal["auto", "local", "multiprocessing", "ray"] = Field(
        "auto", description="auto: ray when RAY_ADDRESS is set, a process pool for several shards, else in-process")

    @field_validator("clip_size")
    @classmethod
    def _even(cls, v: int) -> int:
        if v % 2:
            raise ValueError(f"must be even (H.264 yuv420p), got {v}")
        return v


class DataConfig(ConfigBase):
    images: ImageDataConfig = ImageDataConfig()
    videos: VideoDataConfig = VideoDataConfig()
    network: UrlPolicy = UrlPolicy()


class PipelineConfig(ConfigBase):
    preset: str = "toy"
    world: WorldConfig
    data: DataConfig
    cascade: CascadeConfig
    train: TrainConfig


LOOPBACK_HOST_RATE = 5000.0  # requests/s to the one loopback host of the toy world, through one gate


def _loopback_only() -> UrlPolicy:
    # The toy world is served on 127.0.0.1; nothing else may be reached from tests or the demo. It stands in for
    # the many hosts of real metadata, so one host's politeness limit is not the web's (tests/test_gates.py has it).
    return UrlPolicy(allow_public=False, allow_networks=["127.0.0.1/32"], timeout_s=4.0, max_bytes=20 * 2**20,
                     host_rate=LOOPBACK_HOST_RATE, host_concurrency=64)


def preset_config(name: str) -> PipelineConfig:
    if name not in PRESETS:
        raise ConfigError(f"preset: unknown {name!r}; choose one of {list(PRESETS)}")
    cascade = cascade_preset(name)
    shape = cascade.shape
    # Datasets keep the largest size a stage reads (images: sr_high, clips: sr_low); each stage resizes on load.
    if name == "paper":
        data = DataConfig(images=ImageDataConfig(image_size=shape.sr_high_size, processes=16, threads=32),
                          videos=VideoDataConfig(clip_size=shape.sr_low_size, processes=16))
    else:  # the toy world's presets: paper-cpu reads the tiny world
        small = name in ("tiny", "paper-cpu")
        data = DataConfig(
            images=ImageDataConfig(image_size=shape.sr_high_size, samples_per_shard=64 if small else 1000),
            videos=VideoDataConfig(clip_size=shape.sr_low_size, samples_per_shard=8 if small else 100),
            network=_loopback_only(),
        )
    return PipelineConfig(preset=name, world=world_preset(name), data=data, cascade=cascade,
                          train=train_preset(name))


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for i, key in enumerate(keys[:-1]):
        if not isinstance(node.get(key), dict):
            raise ConfigError(f"{'.'.join(keys[: i + 1])}: no such config section (from --set {dotted}=...)")
        node = node[key]
    if keys[-1] not in node:
        raise ConfigError(f"{dotted}: no such config field")
    node[keys[-1]] = value


def _validate(tree: dict) -> PipelineConfig:
    try:
        return PipelineConfig.model_validate(tree)
    except ValidationError as err:
        lines = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors()]
        raise ConfigError("invalid config:\n  " + "\n  ".join(lines)) from None


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_config(preset: str | None = "toy", path: str | Path | None = None,
                overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """Preset defaults, then a YAML file (full or partial tree, its `preset` wins), then `a.b=c` overrides."""
    from_file: dict = {}
    if path is not None:
        with fsspec.open(str(path), "r") as fh:
            from_file = yaml.safe_load(fh) or {}
        if not isinstance(from_file, dict):
            raise ConfigError(f"{path}: a config file must hold a mapping at the top")
    name = from_file.get("preset", preset or "toy")
    tree = _merge(preset_config(name).model_dump(mode="json"), from_file)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. train.decoder.lr=2e-4")
        key, raw = item.split("=", 1)
        _set_path(tree, key.strip(), yaml.safe_load(raw))
    return _validate(tree)


def dump_config(cfg: ConfigBase, path: str | Path | None = None) -> str:
    """YAML of the resolved tree; written to `path` (any fsspec URL) when given."""
    text = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
    if path is not None:
        with fsspec.open(str(path), "w") as fh:
            fh.write(text)
    return text
