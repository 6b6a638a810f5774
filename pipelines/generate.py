"""Generation from trained stages: load the cascade (the MLflow registry or a checkpoint folder), run one
of the paper's four uses, and write every output watermarked (`pipelines.outputs`), with a JSON sidecar
saying exactly how it was made (seeds, samplers, weights versions, config hash, timings).

The sampling itself is `model.cascade`; this module only does the I/O around it.
"""
from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

import decord
import numpy as np
import torch
import torch.nn.functional as Fn
from PIL import Image

from model.cascade import STAGE_ORDER, Cascade, CascadeOutput, build_cascade, stage_network, stages_needed, to_uint8
from model.cascade_uses import animate_image, interpolate_images, text_to_video, vary_video
from model.checkpoint import CONFIG_KEY, load_weights
from model.config import CascadeConfig, ClipConfig, PriorConfig, UNetConfig
from model.networks import STAGES as NETWORKS
from pipelines.defaults import DEFAULT_FPS
from pipelines.outputs import write_outputs
from pipelines.watermark import WatermarkConfig
from training.registry import resolve_weights, stage_versions
from training.storage import sha256_file
from training.tracker import DEFAULT_ALIAS
from training.tracking import config_hash, registered_name, resolve_tracking_uri

USE_NAMES = {"text": "text_to_video", "animate": "animate_image", "interpolate": "interpolate_images",
             "vary": "vary_video"}
RUN_ROOT = "runs"  # training.jobs' default run root, where its sqlite store lies


class MissingWeightsError(FileNotFoundError):
    """A stage the cascade needs has no weights where we looked; the message names both."""


# --- loading ------------------------------------------------------------------------------------------

def tracking_uri_of(cfg: Any, tracking_uri: str | None = None) -> str:
    """`training.tracking.resolve_tracking_uri` for a pipeline config (a bare cascade config names no store):
    --tracking-uri, else train.tracking_uri, else $MLFLOW_TRACKING_URI, else the sqlite store of `RUN_ROOT`."""
    return resolve_tracking_uri(tracking_uri, getattr(getattr(cfg, "train", None), "tracking_uri", None), RUN_ROOT)


def _check_store(tracking_uri: str) -> None:
    """MLflow would create an empty sqlite store at a mistyped path; refuse instead."""
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri[len("sqlite:///"):])
        if not db.is_file():
            raise MissingWeightsError(f"no MLflow store at {db}: train the stages first, or pass "
                                      "--tracking-uri or --checkpoints DIR")


def _stage_file(stage: str, weights: str, tracking_uri: str, alias: str) -> str:
    """Local safetensors path of a stage: `<dir>/<stage>.safetensors`, or the registry's `alias` version."""
    if weights != "mlflow":
        path = Path(weights).expanduser() / f"{stage}.safetensors"
        if not path.is_file():
            raise MissingWeightsError(f"no weights for stage {stage!r}: {path} not found")
        return str(path)
    try:
        return resolve_weights(stage, f"models:/{registered_name(stage)}@{alias}", tracking_uri)
    except (LookupError, FileNotFoundError) as err:
        raise MissingWeightsError(str(err)) from None


def _saved_net(stage: str, metadata: dict, cfg: CascadeConfig) -> UNetConfig | PriorConfig | ClipConfig:
    """The config a stage's file was trained with (its metadata), so the file rebuilds its own network."""
    saved = metadata.get(CONFIG_KEY)
    tree = saved.get("cascade", {}) if isinstance(saved, dict) else {}
    if stage == "clip":
        return ClipConfig.model_validate(tree["clip"]) if "clip" in tree else cfg.clip
    net = tree.get(stage, {}).get("net")
    current = getattr(cfg, stage).net
    return type(current).model_validate(net) if net else current


def _with_saved(cfg: CascadeConfig, stage: str, saved: UNetConfig | PriorConfig | ClipConfig) -> CascadeConfig:
    if stage == "clip":
        return cfg.model_copy(update={"clip": saved})
    return cfg.model_copy(update={stage: getattr(cfg, stage).model_copy(update={"net": saved})})


def load_cascade(cfg: Any, weights: str = "mlflow", tracking_uri: str | None = None, *, use: str = "text",
                 stop_at: str | None = None, device: str | torch.device | None = None,
                 alias: str = DEFAULT_ALIAS, sr_high_chunk: int = 8, extra: Sequence[str] = ()) -> Cascade:
    """Every network `use` runs up to `stop_at` and the `extra` ones named (e.g. "decoder" for a diagnosis
    that draws with D alone), plus CLIP unless `clip.weights_path` names a pretrained file, from the MLflow
    registry (`weights="mlflow"`: models:/mav-<stage>@<alias>) or from a checkpoint folder of
    `<stage>.safetensors` files. A missing stage raises MissingWeightsError naming it and where it looked.
    Networks are rebuilt from the config saved in their file; sampling settings and sizes stay those of `cfg`.
    `cascade.sources` records each file's registry version or sha256."""
    cascade_cfg: CascadeConfig = getattr(cfg, "cascade", cfg)
    stages = list(stages_needed(use, stop_at, cascade_cfg))
    unknown = sorted(set(extra) - set(NETWORKS))
    if unknown:
        raise ValueError(f"extra networks must be among {list(NETWORKS)}, got {unknown}")
    stages += [s for s in extra if s not in stages]
    if cascade_cfg.clip.weights_path is None:
        stages.insert(0, "clip")
    uri = tracking_uri_of(cfg, tracking_uri) if weights == "mlflow" else None
    if uri is not None:
        _check_store(uri)
    state_dicts, sources = {}, {}
    for stage in stages:
        path = _stage_file(stage, weights, uri or "", alias)
        state_dicts[stage], metadata = load_weights(path)
        cascade_cfg = _with_saved(cascade_cfg, stage, _saved_net(stage, metadata, cascade_cfg))
        sources[stage] = {"source": f"models:/{registered_name(stage)}@{alias}" if uri else path,
                          "sha256": sha256_file(path)}
    if uri is not None:
        versions = stage_versions(uri, alias)
        for stage in stages:
            sources[stage].update({k: versions.get(stage, {}).get(k) for k in ("version", "run_id")})
    if cascade_cfg.clip.weights_path is not None:
        clip_file = cascade_cfg.clip.weights_path
        sources["clip"] = {"source": clip_file, "sha256": sha256_file(clip_file)}
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cascade = build_cascade(cascade_cfg, state_dicts, stages=[s for s in stages if s != "clip"], device=device,
                            sr_high_chunk=sr_high_chunk)
    cascade.sources = sources
    return cascade


# --- the four uses ------------------------------------------------------------------------------------

def _stage_info(cascade: Cascade, use: str, result: CascadeOutput, row: int) -> dict[str, dict]:
    """Per stage reached: the network, its sampler settings, frames, size, fps and seconds."""
    info = {}
    for stage in STAGE_ORDER:
        if stage not in result:
            continue
        net = stage_network(use, stage)
        entry: dict[str, Any] = {"network": net, "seconds": round(result.timings_s.get(stage, 0.0), 4)}
        if net != "clip":
            sampler = getattr(cascade.cfg, net).sampler.model_dump(mode="json")
            entry.update(sampler=sampler.pop("name"), **sampler)
            entry["seed"] = result.seeds.get(stage)
        if net in ("prior", "temporal"):
            entry["candidates"] = getattr(cascade.cfg, net).candidates  # re-ranked samples per row
        if net == "temporal":
            entry["jump_penalty"] = cascade.cfg.temporal.jump_penalty  # its weight in the re-ranking
            entry["keyframe_draws"] = cascade.cfg.temporal.keyframe_draws  # D's key frames per candidate
        out = result[stage][row]
        if out.dim() == 4:  # (C, F, H, W)
            entry.update(frames=out.shape[1], height=out.shape[2], width=out.shape[3], fps=result.fps.get(stage))
        info[stage] = entry
    return info


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "video"


def _write_result(cascade: Cascade, use: str, result: CascadeOutput, names: Sequence[str], out_dir: Path,
                  watermark: WatermarkConfig | None, base: dict, extra: Sequence[dict]) -> list[dict]:
    """One output per batch row: the last stage's video written with its sidecar; a run stopped at the
    prior writes the embedding into the sidecar alone."""
    records = []
    stage = result.last_stage
    frames = to_uint8(result[stage]) if stage != "prior" else None  # (B, F, H, W, C)
    for row, name in enumerate(names):
        sidecar = {**base, **extra[row], "use": USE_NAMES[use], "stages": _stage_info(cascade, use, result, row),
                   "stage_seeds": result.seeds, "weights": cascade.sources, "device": str(cascade.device),
                   "precision": cascade.precision, "config_hash": config_hash(cascade.cfg.model_dump(mode="json")),
                   "timings_s": {**{k: round(v, 4) for k, v in result.timings_s.items()},
                                 "total": round(sum(result.timings_s.values()), 4)},
                   "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        if frames is None:
            out_dir.mkdir(parents=True, exist_ok=True)
            path = out_dir / f"{name}.json"
            path.write_text(json.dumps({**sidecar, "embedding": result["prior"][row].tolist()}, indent=2))
            records.append({"name": name, "stage": stage, "files": {"json": path}, "sidecar": sidecar})
            continue
        fps = result.fps[stage]
        sidecar["fps"] = fps
        paths = write_outputs(frames[row], out_dir, name, fps, watermark, sidecar)
        records.append({"name": name, "stage": stage, "files": paths, "sidecar": sidecar,
                        "frames": frames.shape[1], "size": tuple(frames.shape[2:4])})
    return records


def _cascade_for(cfg: Any, use: str, cascade: Cascade | None, weights: str, tracking_uri: str | None,
                 stop_at: str | None, device: str | None) -> Cascade:
    return cascade if cascade is not None else load_cascade(cfg, weights, tracking_uri, use=use, stop_at=stop_at,
                                                            device=device)


def generate(cfg: Any, prompts: Sequence[str], out_dir: str | Path, *, weights: str = "mlflow",
             tracking_uri: str | None = None, stop_at: str | None = None, seed: int = 0, fps: float = DEFAULT_FPS,
             target_frames: int | None = None, batch_size: int = 1, watermark: WatermarkConfig | None = None,
             device: str | None = None, cascade: Cascade | None = None, progress: bool = True) -> list[dict]:
    """Text to video for each prompt, `batch_size` prompts per cascade call; batch k uses seed + k, so
    with batch_size 1 a prompt's video depends only on (prompt, seed + its index). Returns one record
    per output (name, files, sidecar). `watermark=None` is the default visible mark; pass
    WatermarkConfig(enabled=False) to leave frames unmarked. `cascade` skips loading (tests, benchmarks)."""
    if isinstance(prompts, str) or not prompts:
        raise ValueError("prompts must be a non-empty list of strings")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    cascade = _cascade_for(cfg, "text", cascade, weights, tracking_uri, stop_at, device)
    watermark = WatermarkConfig() if watermark is None else watermark
    records = []
    for k, start in enumerate(range(0, len(prompts), batch_size)):
        batch = list(prompts[start:start + batch_size])
        result = text_to_video(cascade, batch, fps, seed + k, stop_at, target_frames, progress)
        names = [f"{start + j:03d}-{_slug(p)}" for j, p in enumerate(batch)]
        extra = [{"prompt": p, "batch": {"index": k, "position": j, "prompts": batch}} for j, p in enumerate(batch)]
        records += _write_result(cascade, "text", result, names, Path(out_dir), watermark,
                                 {"seed": seed + k, "requested_fps": fps}, extra)
    return records


def read_image(path: str | Path) -> torch.Tensor:
    """An image file -> (1, 3, H, W) in [-1, 1]."""
    pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)  # (H, W, 3)
    return torch.from_numpy(pixels).permute(2, 0, 1)[None] / 127.5 - 1


def read_video(path: str | Path, frames: int) -> torch.Tensor:
    """`frames` frames spread over a video file (decord) -> (1, 3, F, H, W) in [-1, 1]."""
    reader = decord.VideoReader(str(path))
    idx = np.linspace(0, len(reader) - 1, frames).round().astype(int).tolist()
    pixels = torch.from_numpy(reader.get_batch(idx).asnumpy()).float()  # (F, H, W, 3)
    return pixels.permute(3, 0, 1, 2)[None] / 127.5 - 1


def _is_tensor(value: object) -> bool:
    return hasattr(value, "dim") and hasattr(value, "numpy")


def _as_tensor(value: str | Path | torch.Tensor, reader: Callable[[str | Path], torch.Tensor]) -> torch.Tensor:
    return value if _is_tensor(value) else reader(value)


def _label(value: object) -> str | None:
    """An input as the sidecar records it: its path, or None for a tensor passed in."""
    return None if _is_tensor(value) else str(value)


def _run_one(cfg: Any, use: str, fn: Callable[[Cascade], CascadeOutput], name: str, inputs: dict,
             out_dir: str | Path, seed: int, fps: float, watermark: WatermarkConfig | None,
             rows: int = 1, **load: Any) -> list[dict]:
    cascade = _cascade_for(cfg, use, load.pop("cascade", None), **load)
    result = fn(cascade)
    names = [name if rows == 1 else f"{name}-{i:02d}" for i in range(rows)]
    base = {"seed": seed, "requested_fps": fps, "inputs": inputs}
    return _write_result(cascade, use, result, names, Path(out_dir),
                         WatermarkConfig() if watermark is None else watermark, base, [{}] * rows)


def animate(cfg: Any, image: str | Path | torch.Tensor, out_dir: str | Path, *, seed: int = 0, fps: float = DEFAULT_FPS,
            stop_at: str | None = None, target_frames: int | None = None, watermark: WatermarkConfig | None = None,
            weights: str = "mlflow", tracking_uri: str | None = None, device: str | None = None,
            cascade: Cascade | None = None, progress: bool = True) -> list[dict]:
    """Image animation: the image (file or (1, 3, H, W) in [-1, 1]) becomes frame 0 of a video."""
    pixels = _as_tensor(image, read_image)
    fn = lambda c: animate_image(c, pixels, fps, seed, stop_at, target_frames, progress)  # noqa: E731
    name = f"animate-{_slug(Path(str(image)).stem) if not _is_tensor(image) else 'image'}"
    return _run_one(cfg, "animate", fn, name, {"image": _label(image)},
                    out_dir, seed, fps, watermark, cascade=cascade, weights=weights, tracking_uri=tracking_uri,
                    stop_at=stop_at, device=device)


def interpolate(cfg: Any, image_a: str | Path | torch.Tensor, image_b: str | Path | torch.Tensor,
                out_dir: str | Path, *, seed: int = 0, fps: float = DEFAULT_FPS, stop_at: str | None = None,
                target_frames: int | None = None, watermark: WatermarkConfig | None = None, weights: str = "mlflow",
                tracking_uri: str | None = None, device: str | None = None, cascade: Cascade | None = None,
                progress: bool = True) -> list[dict]:
    """Image interpolation: image_a and image_b are the first and last frames (b is resized to a)."""
    a, b = _as_tensor(image_a, read_image), _as_tensor(image_b, read_image)
    if a.shape[-2:] != b.shape[-2:]:
        b = Fn.interpolate(b, size=a.shape[-2:], mode="bilinear", antialias=True, align_corners=False)
    fn = lambda c: interpolate_images(c, a, b, fps, seed, stop_at, target_frames, progress)  # noqa: E731
    inputs = {"image_a": _label(image_a), "image_b": _label(image_b)}
    return _run_one(cfg, "interpolate", fn, "interpolate", inputs, out_dir, seed, fps, watermark, cascade=cascade,
                    weights=weights, tracking_uri=tracking_uri, stop_at=stop_at, device=device)


def vary(cfg: Any, video: str | Path | torch.Tensor, out_dir: str | Path, *, count: int = 1, seed: int = 0,
         fps: float = DEFAULT_FPS, stop_at: str | None = None, target_frames: int | None = None,
         watermark: WatermarkConfig | None = None, weights: str = "mlflow", tracking_uri: str | None = None,
         device: str | None = None, cascade: Cascade | None = None, progress: bool = True) -> list[dict]:
    """Video variation: `count` new videos conditioned on the mean CLIP embedding of the video's frames
    (a file, `shape.frames` frames read evenly over it, or (1, 3, F, H, W) in [-1, 1])."""
    pixels = _as_tensor(video, partial(read_video, frames=getattr(cfg, "cascade", cfg).shape.frames))
    batch = pixels.expand(count, *pixels.shape[1:])
    fn = lambda c: vary_video(c, batch, fps, seed, stop_at, target_frames, progress)  # noqa: E731
    inputs = {"video": _label(video)}
    return _run_one(cfg, "vary", fn, "vary", inputs, out_dir, seed, fps, watermark, rows=count, cascade=cascade,
                    weights=weights, tracking_uri=tracking_uri, stop_at=stop_at, device=device)
