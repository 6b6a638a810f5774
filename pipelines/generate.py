"""Generation from trained stages: load the cascade (the MLflow registry or a checkpoint folder), run one
of the paper's four uses, and write every output watermarked, as mp4 + GIF + a frame grid, with a JSON
sidecar saying exactly how it was made (seeds, samplers, weights versions, config hash, timings).

The sampling itself is `model.cascade`; this module only does the I/O around it. `add_generate_commands`
registers `mav generate | animate | interpolate | vary` on the CLI's subparsers.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import subprocess
import time
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
from PIL import Image

from pipelines.config import ConfigError
from pipelines.watermark import WatermarkConfig, apply_watermark
from training.tracking import DEFAULT_ALIAS, config_hash, file_sha256, registered_name

if TYPE_CHECKING:  # torch and the cascade load when generating, not when the CLI registers its commands
    import torch

    from model.cascade import Cascade, CascadeOutput
    from model.config import CascadeConfig, ClipConfig, PriorConfig, UNetConfig

FFMPEG = "/usr/bin/ffmpeg" if Path("/usr/bin/ffmpeg").is_file() else (shutil.which("ffmpeg") or "ffmpeg")
STAGES = ("prior", "temporal", "interpolation", "sr_low", "sr_high")  # = model.cascade.STAGE_ORDER (tested)
USE_NAMES = {"text": "text_to_video", "animate": "animate_image", "interpolate": "interpolate_images",
             "vary": "vary_video"}


class MissingWeightsError(FileNotFoundError):
    """A stage the cascade needs has no weights where we looked; the message names both."""


# --- loading ------------------------------------------------------------------------------------------

def resolve_tracking_uri(cfg: Any = None, tracking_uri: str | None = None) -> str:
    """--tracking-uri, else the config's train.tracking_uri, else $MLFLOW_TRACKING_URI, else the sqlite
    store training writes by default (training.jobs: run_root "runs")."""
    from training.tracking import resolve_tracking_uri as resolve

    return resolve(tracking_uri, getattr(getattr(cfg, "train", None), "tracking_uri", None), "runs")


def _check_store(tracking_uri: str) -> None:
    """MLflow would create an empty sqlite store at a mistyped path; refuse instead."""
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri[len("sqlite:///"):])
        if not db.is_file():
            raise MissingWeightsError(f"no MLflow store at {db}: train the stages first, or pass "
                                      "--tracking-uri or --checkpoints DIR")


def _stage_file(stage: str, weights: str, tracking_uri: str, alias: str) -> str:
    """Local safetensors path of a stage: `<dir>/<stage>.safetensors`, or the registry's `alias` version."""
    from training.registry import resolve_weights

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
    from model.checkpoint import CONFIG_KEY
    from model.config import ClipConfig

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
    import torch

    from model.cascade import build_cascade, stages_needed
    from model.checkpoint import load_weights
    from model.networks import STAGES as NETWORKS
    from training.registry import stage_versions

    cascade_cfg: CascadeConfig = getattr(cfg, "cascade", cfg)
    stages = list(stages_needed(use, stop_at, cascade_cfg))
    unknown = sorted(set(extra) - set(NETWORKS))
    if unknown:
        raise ValueError(f"extra networks must be among {list(NETWORKS)}, got {unknown}")
    stages += [s for s in extra if s not in stages]
    if cascade_cfg.clip.weights_path is None:
        stages.insert(0, "clip")
    uri = resolve_tracking_uri(cfg, tracking_uri) if weights == "mlflow" else None
    if uri is not None:
        _check_store(uri)
    state_dicts, sources = {}, {}
    for stage in stages:
        path = _stage_file(stage, weights, uri or "", alias)
        state_dicts[stage], metadata = load_weights(path)
        cascade_cfg = _with_saved(cascade_cfg, stage, _saved_net(stage, metadata, cascade_cfg))
        sources[stage] = {"source": f"models:/{registered_name(stage)}@{alias}" if uri else path,
                          "sha256": file_sha256(path)}
    if uri is not None:
        versions = stage_versions(uri, alias)
        for stage in stages:
            sources[stage].update({k: versions.get(stage, {}).get(k) for k in ("version", "run_id")})
    if cascade_cfg.clip.weights_path is not None:
        clip_file = cascade_cfg.clip.weights_path
        sources["clip"] = {"source": clip_file, "sha256": file_sha256(clip_file)}
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cascade = build_cascade(cascade_cfg, state_dicts, stages=[s for s in stages if s != "clip"], device=device,
                            sr_high_chunk=sr_high_chunk)
    cascade.sources = sources
    return cascade


# --- writing ------------------------------------------------------------------------------------------

def write_mp4(frames: np.ndarray, path: Path, fps: float) -> Path:
    """H.264 (libx264, yuv420p) through ffmpeg; odd sizes are padded to even, as yuv420p needs."""
    f, h, w, _ = frames.shape
    cmd = [FFMPEG, "-hide_banner", "-loglevel", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24",
           "-s", f"{w}x{h}", "-r", f"{fps:.6g}", "-i", "-", "-vf", "pad=ceil(iw/2)*2:ceil(ih/2)*2",
           "-c:v", "libx264", "-pix_fmt", "yuv420p", "-crf", "17", "-movflags", "+faststart", str(path)]
    done = subprocess.run(cmd, input=np.ascontiguousarray(frames).tobytes(), capture_output=True)
    if done.returncode != 0:
        raise RuntimeError(f"ffmpeg failed writing {path}: {done.stderr.decode(errors='replace').strip()}")
    return path


def write_gif(frames: np.ndarray, path: Path, fps: float) -> Path:
    images = [Image.fromarray(frame) for frame in frames]
    duration = max(20, round(1000 / fps))  # viewers slow frames shorter than 20 ms down to 100 ms
    images[0].save(path, save_all=True, append_images=images[1:], duration=duration, loop=0)
    return path


def write_grid(frames: np.ndarray, path: Path, columns: int = 8) -> Path:
    """All frames tiled row by row, `columns` per row."""
    f, h, w, c = frames.shape
    cols = min(columns, f)
    rows = math.ceil(f / cols)
    grid = np.zeros((rows * h, cols * w, c), dtype=np.uint8)
    for i, frame in enumerate(frames):
        r, col = divmod(i, cols)
        grid[r * h:(r + 1) * h, col * w:(col + 1) * w] = frame
    Image.fromarray(grid).save(path)
    return path


def write_outputs(video: np.ndarray | torch.Tensor, out_dir: str | Path, name: str, fps: float,
                  watermark_cfg: WatermarkConfig | None, sidecar: dict) -> dict[str, Path]:
    """video (F, H, W, 3) uint8 -> <name>.mp4, .gif, .grid.png and .json in out_dir, watermarked unless
    `watermark_cfg` is None or disabled. The sidecar gets the file names and the watermark settings."""
    frames = video.numpy() if hasattr(video, "numpy") else np.asarray(video)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"video must be (F, H, W, 3) uint8, got {frames.shape} {frames.dtype}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    mark = watermark_cfg or WatermarkConfig(enabled=False)
    frames = apply_watermark(frames, mark)
    paths = {"mp4": write_mp4(frames, out / f"{name}.mp4", fps), "gif": write_gif(frames, out / f"{name}.gif", fps),
             "grid": write_grid(frames, out / f"{name}.grid.png")}
    meta = {**sidecar, "files": {k: p.name for k, p in paths.items()},
            "watermark": mark.model_dump(mode="json") if mark.enabled else {"enabled": False}}
    paths["json"] = out / f"{name}.json"
    paths["json"].write_text(json.dumps(meta, indent=2, default=str))
    return paths


# --- the four uses ------------------------------------------------------------------------------------

def _stage_info(cascade: Cascade, use: str, result: CascadeOutput, row: int) -> dict[str, dict]:
    """Per stage reached: the network, its sampler settings, frames, size, fps and seconds."""
    from model.cascade import stage_network

    info = {}
    for stage in STAGES:
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
    from model.cascade import to_uint8

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
             tracking_uri: str | None = None, stop_at: str | None = None, seed: int = 0, fps: float = 8.0,
             target_frames: int | None = None, batch_size: int = 1, watermark: WatermarkConfig | None = None,
             device: str | None = None, cascade: Cascade | None = None, progress: bool = True) -> list[dict]:
    """Text to video for each prompt, `batch_size` prompts per cascade call; batch k uses seed + k, so
    with batch_size 1 a prompt's video depends only on (prompt, seed + its index). Returns one record
    per output (name, files, sidecar). `watermark=None` is the default visible mark; pass
    WatermarkConfig(enabled=False) to leave frames unmarked. `cascade` skips loading (tests, benchmarks)."""
    from model.cascade import text_to_video

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
    import torch

    pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)  # (H, W, 3)
    return torch.from_numpy(pixels).permute(2, 0, 1)[None] / 127.5 - 1


def read_video(path: str | Path, frames: int) -> torch.Tensor:
    """`frames` frames spread over a video file (decord) -> (1, 3, F, H, W) in [-1, 1]."""
    import decord
    import torch

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


def animate(cfg: Any, image: str | Path | torch.Tensor, out_dir: str | Path, *, seed: int = 0, fps: float = 8.0,
            stop_at: str | None = None, target_frames: int | None = None, watermark: WatermarkConfig | None = None,
            weights: str = "mlflow", tracking_uri: str | None = None, device: str | None = None,
            cascade: Cascade | None = None, progress: bool = True) -> list[dict]:
    """Image animation: the image (file or (1, 3, H, W) in [-1, 1]) becomes frame 0 of a video."""
    from model.cascade import animate_image

    pixels = _as_tensor(image, read_image)
    fn = lambda c: animate_image(c, pixels, fps, seed, stop_at, target_frames, progress)  # noqa: E731
    name = f"animate-{_slug(Path(str(image)).stem) if not _is_tensor(image) else 'image'}"
    return _run_one(cfg, "animate", fn, name, {"image": _label(image)},
                    out_dir, seed, fps, watermark, cascade=cascade, weights=weights, tracking_uri=tracking_uri,
                    stop_at=stop_at, device=device)


def interpolate(cfg: Any, image_a: str | Path | torch.Tensor, image_b: str | Path | torch.Tensor,
                out_dir: str | Path, *, seed: int = 0, fps: float = 8.0, stop_at: str | None = None,
                target_frames: int | None = None, watermark: WatermarkConfig | None = None, weights: str = "mlflow",
                tracking_uri: str | None = None, device: str | None = None, cascade: Cascade | None = None,
                progress: bool = True) -> list[dict]:
    """Image interpolation: image_a and image_b are the first and last frames (b is resized to a)."""
    import torch.nn.functional as Fn

    from model.cascade import interpolate_images

    a, b = _as_tensor(image_a, read_image), _as_tensor(image_b, read_image)
    if a.shape[-2:] != b.shape[-2:]:
        b = Fn.interpolate(b, size=a.shape[-2:], mode="bilinear", antialias=True, align_corners=False)
    fn = lambda c: interpolate_images(c, a, b, fps, seed, stop_at, target_frames, progress)  # noqa: E731
    inputs = {"image_a": _label(image_a), "image_b": _label(image_b)}
    return _run_one(cfg, "interpolate", fn, "interpolate", inputs, out_dir, seed, fps, watermark, cascade=cascade,
                    weights=weights, tracking_uri=tracking_uri, stop_at=stop_at, device=device)


def vary(cfg: Any, video: str | Path | torch.Tensor, out_dir: str | Path, *, count: int = 1, seed: int = 0,
         fps: float = 8.0, stop_at: str | None = None, target_frames: int | None = None,
         watermark: WatermarkConfig | None = None, weights: str = "mlflow", tracking_uri: str | None = None,
         device: str | None = None, cascade: Cascade | None = None, progress: bool = True) -> list[dict]:
    """Video variation: `count` new videos conditioned on the mean CLIP embedding of the video's frames
    (a file, `shape.frames` frames read evenly over it, or (1, 3, F, H, W) in [-1, 1])."""
    from model.cascade import vary_video

    pixels = _as_tensor(video, partial(read_video, frames=getattr(cfg, "cascade", cfg).shape.frames))
    batch = pixels.expand(count, *pixels.shape[1:])
    fn = lambda c: vary_video(c, batch, fps, seed, stop_at, target_frames, progress)  # noqa: E731
    inputs = {"video": _label(video)}
    return _run_one(cfg, "vary", fn, "vary", inputs, out_dir, seed, fps, watermark, rows=count, cascade=cascade,
                    weights=weights, tracking_uri=tracking_uri, stop_at=stop_at, device=device)


def print_summary(records: Sequence[dict], seconds: float) -> None:
    print(f"\n{len(records)} output(s) in {seconds:.1f} s:")
    for r in records:
        size = f"{r['frames']} frames {r['size'][1]}x{r['size'][0]}" if "frames" in r else "embedding only"
        print(f"  {r['name']:<40} {r['stage']:<13} {size:<24} {r['files'][next(iter(r['files']))]}")


# --- CLI ----------------------------------------------------------------------------------------------

def _stage_overrides(args: argparse.Namespace) -> list[str]:
    """--steps/--sampler/--guidance "VALUE" (every stage) or "STAGE=VALUE" -> config --set overrides."""
    out = []
    for flag, field in (("steps", "steps"), ("sampler", "name"), ("guidance", "guidance_scale")):
        for item in getattr(args, flag) or []:
            stage, _, value = item.rpartition("=")
            if stage and stage not in STAGES:
                raise ConfigError(f"--{flag} {item}: unknown stage {stage!r}; choose one of {list(STAGES)}")
            out += [f"cascade.{s}.sampler.{field}={value}" for s in ([stage] if stage else STAGES)]
    return out


def _watermark(args: argparse.Namespace) -> WatermarkConfig:
    if args.no_watermark:
        return WatermarkConfig(enabled=False)
    return WatermarkConfig(text=args.watermark_text, logo_path=args.watermark_logo)


def _cmd(use: str, load_config: Callable[[argparse.Namespace], Any], args: argparse.Namespace) -> int:
    args.overrides = list(getattr(args, "overrides", []) or []) + _stage_overrides(args)
    cfg = load_config(args)
    common = {"out_dir": args.out, "seed": args.seed, "fps": args.fps, "stop_at": args.stop_at,
              "target_frames": args.target_frames, "watermark": _watermark(args), "device": args.device,
              "weights": str(args.checkpoints) if args.checkpoints else args.weights,
              "tracking_uri": args.tracking_uri}
    started = time.perf_counter()
    if use == "text":
        records = generate(cfg, args.prompts, batch_size=args.batch_size, **common)
    elif use == "animate":
        records = animate(cfg, args.image, **common)
    elif use == "interpolate":
        records = interpolate(cfg, args.image_a, args.image_b, **common)
    else:
        records = vary(cfg, args.video, count=args.count, **common)
    print_summary(records, time.perf_counter() - started)
    return 0


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, required=True, help="output folder")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--weights", default="mlflow", metavar="SOURCE",
                     help="'mlflow' (models:/mav-<stage>@current in the tracking store) or a checkpoint folder")
    src.add_argument("--checkpoints", type=Path, metavar="DIR", help="a folder of <stage>.safetensors files")
    p.add_argument("--tracking-uri", help="MLflow store (default: train.tracking_uri, $MLFLOW_TRACKING_URI, "
                                          "sqlite runs/mlflow.db)")
    p.add_argument("--stop-at", choices=STAGES, help="last stage to run (default: sr_high)")
    for flag, what in (("steps", "sampler steps"), ("sampler", "sampler (ddpm|ddim|dpmpp_2m)"),
                       ("guidance", "guidance scale")):
        p.add_argument(f"--{flag}", action="append", metavar="[STAGE=]VALUE",
                       help=f"{what} for every stage, or STAGE=VALUE for one; repeatable")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fps", type=float, default=8.0, help="frame rate of the base clip (default: %(default)s)")
    p.add_argument("--frames", "--target-frames", dest="target_frames", type=int,
                   help="length after interpolation (default: (frames-1)*frame_skip+1)")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--no-watermark", action="store_true", help="leave the frames unmarked")
    p.add_argument("--watermark-text", default=WatermarkConfig().text)
    p.add_argument("--watermark-logo", help="an image drawn as the watermark instead of the text")


def add_generate_commands(subparsers: Any, add_config_args: Callable[[argparse.ArgumentParser], None],
                          load_config: Callable[[argparse.Namespace], Any]) -> None:
    """Register `mav generate | animate | interpolate | vary` on the CLI's subparsers."""
    specs = [("generate", "text", "text to video with the trained cascade",
              [("prompts", {"nargs": "+", "metavar": "PROMPT"})]),
             ("animate", "animate", "animate an image (it becomes frame 0)", [("image", {"type": Path})]),
             ("interpolate", "interpolate", "generate the frames between two images",
              [("image_a", {"type": Path}), ("image_b", {"type": Path})]),
             ("vary", "vary", "variations of a video (its frames' mean CLIP embedding)", [("video", {"type": Path})])]
    for command, use, help_text, positionals in specs:
        p = subparsers.add_parser(command, help=help_text, description=f"{help_text[0].upper()}{help_text[1:]}; "
                                  "writes mp4, GIF, a frame grid and a JSON sidecar per output, watermarked.")
        add_config_args(p)
        for name, kwargs in positionals:
            p.add_argument(name, **kwargs)
        _add_common(p)
        if use == "text":
            p.add_argument("--batch-size", type=int, default=1, help="prompts per cascade call")
        if use == "vary":
            p.add_argument("--count", type=int, default=1, help="variations to make")
        p.set_defaults(func=partial(_cmd, use, load_config))
