"""The evaluation stage: generate toy-world prompts with the trained cascade, score every video with the
toy-world evaluator, and log the result to MLflow against the issue's quality bar.

Prompts (`prompt_set`) are phrased as the world's video captions, and include held-out combinations:
shape/colour/background triples that no LAION row of the world contains, so the text side never saw them
(the paper's claim is that the cascade composes what it learned from images and from video). Per video
the scores are `pipelines.evaluate.evaluate_video`'s; `aggregate` takes their means overall, for held-out
and for seen prompts, and the share of clips that move, and `quality_bar` checks the issue's bar. The same
calls' earlier video stages (Dt's base clip, F's, SR_l's) are read too, upsampled to the final size
(`stage_trace`, `stage_reading`): where along the cascade a figure is lost, at no extra sampling.

FVD here uses `model.metrics.RandomVideoExtractor`: a relative, in-project figure (smaller is closer to the
world's own videos) that compares runs with each other, never with published I3D FVDs. CLIPSIM uses the
cascade's own CLIP. torch (and, from this module, Prefect) load when evaluating, not when the CLI
registers `mav evaluate`.
"""
from __future__ import annotations

import argparse
import csv
import json
import time
from dataclasses import asdict, dataclass
from functools import cache, partial
from pathlib import Path
from typing import Any, Callable, Collection, Sequence

import numpy as np

from pipelines.evaluate import EvalConfig, evaluate_video, parse_prompt
from pipelines.generate import STAGES, resolve_tracking_uri, write_gif
from pipelines.world.config import POSITIONS, WorldConfig
from pipelines.world.generate import VIDEO_TEMPLATES, WHERE, _english, renderable_triples
from pipelines.world.videos import caption_directions

Triple = tuple[str, str, str]  # (shape, colour, background)
QUALITY_BAR = {"prompt_faithfulness": 0.8, "motion_share": 0.8, "temporal_consistency": 0.9}
SCORES = ("prompt_faithfulness", "temporal_consistency", "frame_quality", "shape_accuracy", "colour_accuracy",
          "background_accuracy", "detected", "motion_smoothness")
FVD_FEATURES = "RandomVideoExtractor(seed=0): relative, in-project; not comparable with I3D FVD"


# --- prompts ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PromptSpec:
    """One evaluation prompt and what it asks for; `held_out`: its triple is in no training image."""

    text: str
    shape: str | None
    colour: str | None
    background: str | None
    motion: str | None = None
    held_out: bool = False

    @classmethod
    def from_text(cls, text: str, held_out: bool = False) -> "PromptSpec":
        p = parse_prompt(text)
        return cls(text, p.shape, p.colour, p.background, p.motion, held_out)


def world_config(world_dir: str | Path) -> WorldConfig:
    """The config a generated world was made with (its world.json), so prompts use its vocabulary. Its
    dicts come back in sorted key order (world.json is written sorted), which changes the world's random
    plan: take the folder's rows from `seen_combinations(cfg, world_dir)`, never a re-plan of this config."""
    meta = Path(world_dir) / "world.json"
    if not meta.is_file():
        raise FileNotFoundError(f"not a generated toy world: {meta} not found")
    return WorldConfig.model_validate(json.loads(meta.read_text())["config"])


def seen_combinations(world: WorldConfig, world_dir: str | Path | None = None) -> set[Triple]:
    """Triples of the world's LAION rows (every row, filtered ones too: stricter than 'trained on'),
    read from `<world_dir>/ground_truth.parquet`, else from the world's plan for this config (the same
    config writes the same rows, so no folder is needed)."""
    if world_dir is None:
        from pipelines.world.generate import _plan_images

        rows = _plan_images(np.random.default_rng([world.seed, 0]), world)
        return {(r["shape"], r["colour"], r["background"]) for r in rows}
    import pyarrow.parquet as pq

    path = Path(world_dir) / "ground_truth.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"not a generated toy world: {path} not found")
    table = pq.read_table(path, columns=["source", "shape", "colour", "background"]).to_pylist()
    return {(r["shape"], r["colour"], r["background"]) for r in table if r["source"] == "laion"}


def held_out_combinations(world: WorldConfig, world_dir: str | Path | None = None) -> set[Triple]:
    """Renderable triples that no LAION row of the world contains."""
    return set(renderable_triples(world)) - seen_combinations(world, world_dir)


def _draw(rng: np.random.Generator, pool: Sequence[Triple], n: int) -> list[Triple]:
    """n triples, without repeats while the pool lasts."""
    order: list[int] = []
    while len(order) < n:
        order += rng.permutation(len(pool)).tolist()
    return [pool[i] for i in order[:n]]


def _caption(rng: np.random.Generator, world: WorldConfig, triple: Triple, motion: str) -> str:
    """The world's own video caption template for this motion, with a direction the evaluator checks."""
    shape, colour, background = triple
    sizes = sorted(world.sizes, key=world.sizes.get)
    size = sizes[0] if motion == "grow" else sizes[int(rng.integers(len(sizes)))]
    directions = caption_directions(motion)
    position = list(POSITIONS)[int(rng.integers(len(POSITIONS)))]
    return _english(VIDEO_TEMPLATES[motion].format(
        shape=shape, colour=colour, background=background, size=size, where=WHERE[position],
        direction=directions[int(rng.integers(len(directions)))]))


def prompt_set(world: WorldConfig, n_prompts: int = 8, seed: int = 0, held_out: Collection[Triple] | None = None,
               held_out_share: float = 0.5) -> list[PromptSpec]:
    """A fixed set of video prompts for `world`: the same arguments give the same list. About
    `held_out_share` of them use held-out triples (`held_out`, default: `held_out_combinations(world)`),
    as many as there are; motions cycle through the world's motions."""
    if n_prompts < 1:
        raise ValueError(f"n_prompts must be >= 1, got {n_prompts}")
    scenes = renderable_triples(world)
    held = sorted(held_out_combinations(world) if held_out is None else {tuple(t) for t in held_out})
    unknown = [t for t in held if t[0] not in world.shapes or t[1] not in world.colours
               or t[2] not in world.backgrounds]
    if unknown:
        raise ValueError(f"held-out triples outside the world's vocabulary: {unknown[:3]}")
    seen = [t for t in scenes if t not in set(held)]
    n_held = n_prompts if not seen else min(len(held), round(n_prompts * held_out_share))
    rng = np.random.default_rng(seed)
    picks = [(t, True) for t in _draw(rng, held, n_held)] + [(t, False) for t in _draw(rng, seen, n_prompts - n_held)]
    specs = []
    for i, (triple, flag) in enumerate(picks):
        motion = world.motions[i % len(world.motions)]
        specs.append(PromptSpec(_caption(rng, world, triple, motion), *triple, motion=motion, held_out=flag))
    return specs


# --- scoring ------------------------------------------------------------------------------------------

def score_videos(videos: Sequence, prompts: Sequence[PromptSpec | str], cfg: EvalConfig | None = None) -> list[dict]:
    """One row per video: its prompt's fields and the evaluator's scalar scores."""
    if len(videos) != len(prompts):
        raise ValueError(f"{len(videos)} videos but {len(prompts)} prompts")
    rows = []
    for video, prompt in zip(videos, prompts):
        spec = PromptSpec.from_text(prompt) if isinstance(prompt, str) else prompt
        scores = {k: v for k, v in evaluate_video(video, spec.text, cfg).items() if k not in ("prompt", "parsed")}
        rows.append({"prompt": spec.text, **{k: v for k, v in asdict(spec).items() if k != "text"}, **scores})
    return rows


def _group(rows: Sequence[dict]) -> dict[str, float]:
    out = {k: float(np.mean([r[k] for r in rows])) for k in SCORES}
    out["motion_share"] = float(np.mean([r["moving"] for r in rows]))
    out["smooth_motion_share"] = float(np.mean([r["motion_ok"] for r in rows]))
    matches = [r["motion_match"] for r in rows if r["motion_match"] is not None]
    if matches:
        out["motion_match"] = float(np.mean(matches))
    out["videos"] = float(len(rows))
    return out


def quality_bar(metrics: dict[str, float], lineage: dict | None = None) -> dict:
    """The issue's bar: {"passed", "checks": {name: {"value", "min", "passed"}}}. Given the trained stages'
    `lineage` (training.lineage.video_lineage), also "video_text_samples": {"value", "max": 0, "passed"} -
    passed only when the video data were verified and none of it carried text."""
    checks = {k: {"value": metrics[k], "min": v, "passed": bool(metrics[k] >= v)} for k, v in QUALITY_BAR.items()}
    if lineage is not None:
        checks["video_text_samples"] = {"value": lineage["text_samples"], "max": 0, "passed": lineage["text_free"]}
    return {"passed": all(c["passed"] for c in checks.values()), "checks": checks}


def aggregate(rows: Sequence[dict], lineage: dict | None = None) -> dict:
    """{"all": means, "held_out"/"seen": means of those rows (when any), "quality_bar": on "all" (and the
    `lineage`, kept under "lineage", when given)}."""
    if not rows:
        raise ValueError("no videos to aggregate")
    summary = {"all": _group(rows)}
    for name, flag in (("held_out", True), ("seen", False)):
        group = [r for r in rows if r["held_out"] is flag]
        if group:
            summary[name] = _group(group)
    if lineage is not None:
        summary["lineage"] = lineage
    summary["quality_bar"] = quality_bar(summary["all"], lineage)
    return summary


def summary_metrics(summary: dict) -> dict[str, float]:
    """Flat MLflow metrics: eval/<score> for all videos, eval/held_out/<score>, eval/seen/<score>, and
    eval/quality_bar (1 passed, 0 failed); eval/fvd, eval/clipsim and eval/stages/<stage>/<score>
    (`stage_reading`) when present."""
    out = {f"eval/{k}": v for k, v in summary["all"].items()}
    for name in ("held_out", "seen"):
        out.update({f"eval/{name}/{k}": v for k, v in summary.get(name, {}).items()})
    out.update({f"eval/{k}": summary[k] for k in ("fvd", "clipsim") if summary.get(k) is not None})
    for stage, scores in summary.get("stages", {}).items():
        out.update({f"eval/stages/{stage}/{k}": v for k, v in scores.items()})
    if "lineage" in summary:
        out["eval/video_text_samples"] = float(summary["lineage"]["text_samples"])
    out["eval/quality_bar"] = float(summary["quality_bar"]["passed"])
    return out


def _line(label: str, held: str, g: dict[str, float]) -> str:
    return (f"  {label[:62]:<62} {held:>4} {g['prompt_faithfulness']:>8.2f} {g['temporal_consistency']:>8.2f} "
            f"{g['motion_share']:>6.2f} {g['frame_quality']:>7.2f}")


def format_table(rows: Sequence[dict], summary: dict) -> str:
    """One line per prompt (means over its samples), then totals, FVD/CLIPSIM and the bar."""
    lines = [f"  {'prompt':<62} {'held':>4} {'faithful':>8} {'consist':>8} {'motion':>6} {'quality':>7}"]
    by_prompt: dict[str, list[dict]] = {}
    for r in rows:
        by_prompt.setdefault(r["prompt"], []).append(r)
    lines += [_line(p, "yes" if g[0]["held_out"] else "no", _group(g)) for p, g in by_prompt.items()]
    lines += [_line(f"{name.replace('_', '-')} ({int(summary[name]['videos'])} videos)", "", summary[name])
              for name in ("all", "held_out", "seen") if name in summary]
    extra = [f"FVD {summary['fvd']:.2f} (random features, relative)"] if "fvd" in summary else []
    extra += [f"CLIPSIM {summary['clipsim']:.4f}"] if "clipsim" in summary else []
    if extra:
        lines.append("  " + "   ".join(extra))
    if len(summary.get("stages", {})) > 1:
        lines.append("  by stage (faithful / consist / shape; earlier stages read after a bilinear upsample): "
                     + ", ".join(f"{stage} {g['prompt_faithfulness']:.2f} / {g['temporal_consistency']:.2f} / "
                                 f"{g['shape_accuracy']:.2f}" for stage, g in summary["stages"].items()))
    bar = summary["quality_bar"]
    checks = ", ".join(f"{k} {c['value']:.2f} {'>=' if c['passed'] else '<'} {c['min']}"
                       for k, c in bar["checks"].items() if "min" in c)
    lines.append(f"  quality bar: {'PASS' if bar['passed'] else 'FAIL'} ({checks})")
    if "lineage" in summary:
        from training.lineage import describe  # torch-free imports for `mav --help`: see the module doc

        lines.append(f"  lineage: {describe(summary['lineage'])}")
    return "\n".join(lines)


# --- reference videos ---------------------------------------------------------------------------------

def output_shape(cascade_cfg: Any, stop_at: str | None) -> tuple[int, int]:
    """(frames, side) of the videos `text_to_video` returns when it stops after `stop_at`."""
    s = getattr(cascade_cfg, "cascade", cascade_cfg).shape
    stage = stop_at or STAGES[-1]
    if stage not in STAGES[1:]:
        raise ValueError(f"stop_at must be one of {list(STAGES[1:])} to give videos, got {stop_at!r}")
    frames = s.frames if stage == "temporal" else s.interpolated_frames
    side = {"temporal": s.base_size, "interpolation": s.base_size, "sr_low": s.sr_low_size}.get(stage, s.sr_high_size)
    return frames, side


def load_reference_videos(world_dir: str | Path, frames: int, side: int, seconds: float,
                          limit: int | None = None) -> list[np.ndarray]:
    """The world's own decodable videos as (frames, side, side, 3) uint8: `frames` frames evenly over
    the first `seconds` (the generated clips' duration), resized to the generated side."""
    import cv2
    import decord
    import pyarrow.parquet as pq

    root = Path(world_dir)
    table = pq.read_table(root / "ground_truth.parquet", columns=["source", "sample_id", "expected"]).to_pylist()
    ids = sorted({r["sample_id"] for r in table if r["source"] != "laion" and r["expected"] not in ("corrupt", "html")})
    videos = []
    for sample_id in ids[:limit]:
        path = root / "files" / "videos" / f"{sample_id}.mp4"
        if not path.is_file():
            continue  # http_404 rows have no file
        reader = decord.VideoReader(str(path))
        last = min(len(reader) - 1, round(seconds * reader.get_avg_fps()))
        idx = np.linspace(0, last, frames).round().astype(int).tolist()
        video = reader.get_batch(idx).asnumpy()  # (F, H, W, 3)
        videos.append(np.stack([cv2.resize(f, (side, side), interpolation=cv2.INTER_AREA) for f in video]))
    if not videos:
        raise FileNotFoundError(f"no decodable videos in {root / 'files' / 'videos'}")
    return videos


# --- the stage ----------------------------------------------------------------------------------------

def _generate(cascade: Any, prompts: Sequence[PromptSpec], samples: int, seed: int, stop_at: str | None,
              fps: float, batch_size: int
              ) -> tuple[np.ndarray, list[PromptSpec], list[dict], float, dict[str, np.ndarray]]:
    """(videos (N, F, H, W, 3) uint8, their prompts, per-video sample info, output fps, `stage_trace`: the
    earlier video stages' outputs of the same calls). Sample s of batch k uses seed + 1000 * s + k, so a
    video depends only on its prompt, batch and sample."""
    from tqdm.auto import tqdm

    from model.cascade import text_to_video, to_uint8

    videos, specs, info, out_fps, trace = [], [], [], fps, {}
    # One bar over the whole stage (the demo's is ~30 min on a 2-core CPU); the cascade's own bars stay off.
    with tqdm(total=samples * len(prompts), desc="evaluation videos", unit="video") as bar:
        for s in range(samples):
            for k, start in enumerate(range(0, len(prompts), batch_size)):
                batch = list(prompts[start:start + batch_size])
                call_seed = seed + 1000 * s + k
                result = text_to_video(cascade, [p.text for p in batch], fps, call_seed, stop_at, progress=False)
                videos.append(to_uint8(result[result.last_stage]).numpy())
                for stage, video in stage_trace(result).items():
                    trace.setdefault(stage, []).append(video)
                out_fps = result.fps[result.last_stage]
                specs += batch
                info += [{"sample": s, "seed": call_seed, "stage": result.last_stage} for _ in batch]
                bar.update(len(batch))
    return np.concatenate(videos), specs, info, out_fps, {k: np.concatenate(v) for k, v in trace.items()}


def stage_trace(result: Any) -> dict[str, np.ndarray]:
    """The video stages a cascade call ran before its last one, each bilinearly upsampled to the last
    stage's side (what a residual SR stage adds its difference to): {stage: (B, F, H, W, 3) uint8}. Read
    by the evaluator beside the final videos, they show at which stage a prompt's figures change."""
    from model.cascade import to_uint8
    from model.layers import resize

    last = result[result.last_stage]
    side = last.shape[-1]
    return {stage: to_uint8(resize(result[stage].float(), side).clamp(-1, 1)).numpy()
            for stage in STAGES[1:] if stage in result.outputs and stage != result.last_stage}


STAGE_SCORES = ("prompt_faithfulness", "temporal_consistency", "shape_accuracy", "colour_accuracy")


def stage_reading(trace: dict[str, np.ndarray], specs: Sequence[PromptSpec], rows: Sequence[dict],
                  last_stage: str, cfg: EvalConfig | None = None) -> dict[str, dict[str, float]]:
    """Per video stage, in cascade order, the means of `STAGE_SCORES` over all videos: the earlier stages
    from their `stage_trace` (upsampled), the last from the scored `rows`."""
    out = {}
    for stage, videos in trace.items():
        scored = score_videos(videos, specs, cfg)
        out[stage] = {k: float(np.mean([r[k] for r in scored])) for k in STAGE_SCORES}
    out[last_stage] = {k: float(np.mean([r[k] for r in rows])) for k in STAGE_SCORES}
    return {stage: out[stage] for stage in STAGES if stage in out}


SAMPLE_MIN_SIDE = 128  # evaluation GIFs are enlarged to at least this side before the watermark goes on


def viewing_size(video: np.ndarray, min_side: int = SAMPLE_MIN_SIDE) -> np.ndarray:
    """(F, H, W, 3) enlarged by the smallest whole factor that brings its shorter side to `min_side`, each
    pixel a block (nearest neighbour: what the evaluator scored, not a smoothed version). At the toy base
    size (32 px) the watermark would otherwise cover half the frame and hide the object."""
    factor = max(1, -(-min_side // min(video.shape[1:3])))
    return video if factor == 1 else video.repeat(factor, axis=1).repeat(factor, axis=2)


def _write_outputs(out: Path, rows: list[dict], summary: dict, videos: np.ndarray, fps: float, n_gifs: int) -> None:
    """evaluation.json, videos.csv and watermarked GIFs of the first sample of `n_gifs` prompts, enlarged
    to a viewable size first (`viewing_size`)."""
    from pipelines.watermark import WatermarkConfig, apply_watermark

    (out / "samples").mkdir(parents=True, exist_ok=True)
    (out / "evaluation.json").write_text(json.dumps({"summary": summary, "videos": rows}, indent=2, default=str))
    with open(out / "videos.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    for i in [i for i, r in enumerate(rows) if r["sample"] == 0][:n_gifs]:
        write_gif(apply_watermark(viewing_size(videos[i]), WatermarkConfig()), out / "samples" / f"{i:03d}.gif", fps)


def weights_used(cascade: Any, weights: str, uri: str) -> dict[str, dict]:
    """Per stage the cascade loaded: registry version, run, sha256 and source (None values dropped)."""
    from training.registry import stage_versions

    versions = stage_versions(uri) if weights == "mlflow" else {}
    return {stage: {k: v for k, v in {**src, **versions.get(stage, {})}.items() if v is not None}
            for stage, src in cascade.sources.items()}


def _run_tags(used: dict[str, dict], summary: dict) -> dict[str, str]:
    """mav.weights.<stage>: "mav-<stage>/<version>" (registry) or "sha256:<prefix>" (a file); the bar."""
    tags = {"mav.stage": "evaluate", "mav.quality_bar": "pass" if summary["quality_bar"]["passed"] else "fail"}
    for stage, info in used.items():
        tags[f"mav.weights.{stage}"] = (f"{info['name']}/{info['version']}" if "version" in info
                                        else f"sha256:{info['sha256'][:12]}")
    return tags


def _log(tracker: Any, cfg: Any, settings: dict, used: dict, summary: dict, rows: list[dict], out: Path) -> None:
    tracker.log_params({"eval": settings, "weights": used})
    tracker.log_metrics(summary_metrics(summary), step=0)
    tracker.log_dict(cfg.model_dump(mode="json"), "config.json")
    tracker.log_dict({"summary": summary, "videos": rows}, "evaluation/videos.json")
    tracker.log_artifact(str(out / "videos.csv"), "evaluation")
    tracker.log_artifact(str(out / "samples"), "evaluation/samples")


def evaluate_cascade(cfg: Any, *, weights: str = "mlflow", tracking_uri: str | None = None, out_dir: str | Path,
                     prompts: Sequence[PromptSpec | str], samples_per_prompt: int = 2, seed: int = 0,
                     stop_at: str | None = None, fps: float = 8.0, reference_videos: Sequence | None = None,
                     parent_run_id: str | None = None, batch_size: int = 8, n_gifs: int = 4,
                     device: str | None = None, eval_cfg: EvalConfig | None = None,
                     lineage: dict | None = None) -> dict:
    """Generate `samples_per_prompt` videos per prompt with the trained cascade (up to `stop_at`),
    score them, compute CLIPSIM (the cascade's CLIP) and, given reference videos, FVD; log it all to an
    MLflow run "evaluate" (a child of `parent_run_id`); print the table. `lineage`: the video stages'
    `video_lineage` when the caller has it already; else it is read here (MLflow weights only). Returns
    run_id, summary, metrics, rows, table."""
    from model.metrics import RandomVideoExtractor, clipsim, fvd
    from pipelines.generate import load_cascade
    from training.lineage import video_lineage
    from training.tracking import MlflowTracker, tracked_run

    if samples_per_prompt < 1 or batch_size < 1 or not prompts:
        raise ValueError("need at least one prompt, samples_per_prompt >= 1 and batch_size >= 1")
    output_shape(cfg, stop_at)  # a stop_at without videos fails here, before any loading
    specs = [PromptSpec.from_text(p) if isinstance(p, str) else p for p in prompts]
    uri = resolve_tracking_uri(cfg, tracking_uri)
    started = time.perf_counter()
    cascade = load_cascade(cfg, weights, uri, stop_at=stop_at, device=device)
    videos, specs, info, out_fps, trace = _generate(cascade, specs, samples_per_prompt, seed, stop_at, fps,
                                                    batch_size)
    rows = [{**r, **i} for r, i in zip(score_videos(videos, specs, eval_cfg), info)]
    # The bar's premise, read off the runs behind the weights: the video stages' data carried no text.
    if lineage is None and weights == "mlflow":
        lineage = video_lineage(uri)
    summary = aggregate(rows, lineage)
    summary["stages"] = stage_reading(trace, specs, rows, info[0]["stage"], eval_cfg)
    summary["clipsim"] = clipsim(cascade.clip, cascade.tokenizer, videos, [s.text for s in specs])
    if reference_videos is not None and len(reference_videos) >= 2 and len(videos) >= 2:
        summary["fvd"] = fvd(np.stack(reference_videos), videos, RandomVideoExtractor())
    out = Path(out_dir)
    _write_outputs(out, rows, summary, videos, out_fps, n_gifs)
    table = format_table(rows, summary)
    print(f"evaluate: {len(specs) // samples_per_prompt} prompts x {samples_per_prompt} samples, stage "
          f"{info[0]['stage']} ({videos.shape[1]} frames, {videos.shape[3]}x{videos.shape[2]}), "
          f"{time.perf_counter() - started:.1f} s\n{table}")
    settings = {"prompts": len(specs) // samples_per_prompt, "samples_per_prompt": samples_per_prompt, "seed": seed,
                "stop_at": stop_at or STAGES[-1], "fps": fps, "weights": weights,
                "reference_videos": len(reference_videos or []), "fvd_features": FVD_FEATURES}
    experiment = getattr(getattr(cfg, "train", None), "experiment", "make-a-video")
    used = weights_used(cascade, weights, uri)
    with tracked_run(MlflowTracker(uri, experiment), "evaluate", parent_run_id=parent_run_id,
                     tags=_run_tags(used, summary)) as tracker:
        _log(tracker, cfg, settings, used, summary, rows, out)
    return {"run_id": tracker.run_id, "summary": summary, "metrics": summary_metrics(summary), "rows": rows,
            "table": table, "out": str(out)}


# --- Prefect flow and CLI -----------------------------------------------------------------------------

def evaluation_prompts(cfg: Any, world: str | None, n_prompts: int,
                       seed: int) -> tuple[WorldConfig, list[PromptSpec]]:
    """The world's config and its prompt set: from a generated world folder (its LAION rows define the
    held-out triples) or, without one, from the config's world plan."""
    world_cfg = world_config(world) if world else cfg.world
    held = held_out_combinations(world_cfg, world) if world else None
    return world_cfg, prompt_set(world_cfg, n_prompts, seed, held_out=held)


def evaluate(out: str, preset: str = "toy", weights: str = "mlflow", tracking_uri: str | None = None,
             world: str | None = None, n_prompts: int = 8, samples_per_prompt: int = 2, seed: int = 0,
             config: str | dict | None = None, overrides: list[str] | None = None, stop_at: str | None = None,
             fps: float = 8.0, parent_run_id: str | None = None, lineage: dict | None = None) -> dict:
    """The body of `evaluate_flow`. `config`: a YAML path (with `overrides`) or a resolved config tree;
    `world`: a generated world folder, whose LAION rows define the held-out triples and whose videos
    are the FVD reference; without it the held-out triples come from the config's world plan. `lineage`:
    see `evaluate_cascade`."""
    from pipelines.config import PipelineConfig, load_config

    if isinstance(config, dict):
        if overrides:
            raise ValueError("overrides apply to a preset or a YAML file, not to a resolved config tree")
        cfg = PipelineConfig.model_validate(config)
    else:
        cfg = load_config(preset, config, overrides or [])
    world_cfg, prompts = evaluation_prompts(cfg, world, n_prompts, seed)
    reference = None
    if world:
        frames, side = output_shape(cfg, stop_at)
        reference = load_reference_videos(world, frames, side, (cfg.cascade.shape.frames - 1) / fps)
    result = evaluate_cascade(cfg, weights=weights, tracking_uri=tracking_uri, out_dir=out, prompts=prompts,
                              samples_per_prompt=samples_per_prompt, seed=seed, stop_at=stop_at, fps=fps,
                              reference_videos=reference, parent_run_id=parent_run_id, lineage=lineage)
    return {k: result[k] for k in ("run_id", "summary", "metrics", "out")}


@cache
def _evaluate_flow() -> Any:
    from prefect import flow

    return flow(name="evaluate-cascade", log_prints=True)(evaluate)


def __getattr__(name: str) -> Any:
    """`evaluate_flow` is built on first access, so registering `mav evaluate` (which `mav --help` does)
    never needs Prefect from this module; importing Prefect costs over a second."""
    if name == "evaluate_flow":
        return _evaluate_flow()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _cmd(load_config: Callable[[argparse.Namespace], Any], runner: Callable[..., dict] | None,
         args: argparse.Namespace) -> int:
    cfg = load_config(args)  # config errors surface here, before Prefect or torch start
    if args.links is not None:
        from pipelines.links import evaluate_links

        world = str(args.world) if args.world else None
        world_cfg, prompts = evaluation_prompts(cfg, world, args.prompts, args.seed)
        evaluate_links(cfg, world=world_cfg, prompts=prompts, out_dir=args.out, weights=args.weights,
                       tracking_uri=args.tracking_uri, draws=args.links, seed=args.seed)
        return 0
    run = runner or _evaluate_flow()
    run(out=str(args.out), preset=cfg.preset, weights=args.weights, tracking_uri=args.tracking_uri,
        world=str(args.world) if args.world else None, n_prompts=args.prompts, samples_per_prompt=args.samples,
        seed=args.seed, config=cfg.model_dump(mode="json"), stop_at=args.stop_at, fps=args.fps)
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_evaluate_commands(subparsers: Any, add_config_args: Callable[[argparse.ArgumentParser], None],
                          load_config: Callable[[argparse.Namespace], Any],
                          runner: Callable[..., dict] | None = None) -> None:
    """Register `mav evaluate`. `runner` replaces the Prefect flow (same keyword arguments), e.g. its
    plain body `evaluate` in tests."""
    p = subparsers.add_parser("evaluate", help="score the trained cascade on toy-world prompts (quality bar)",
                              description="Generate toy-world prompts (held-out combinations included) with the "
                                          "trained cascade, score every video (prompt faithfulness, temporal "
                                          "consistency, motion, frame quality), compute CLIPSIM and, with "
                                          "--world, a relative FVD; log it all to MLflow and print a table.")
    add_config_args(p)
    p.add_argument("--out", type=Path, required=True, help="folder for evaluation.json, videos.csv and GIFs")
    p.add_argument("--weights", default="mlflow", metavar="SOURCE",
                   help="'mlflow' (models:/mav-<stage>@current) or a folder of <stage>.safetensors")
    p.add_argument("--tracking-uri", help="MLflow store (default: train.tracking_uri, $MLFLOW_TRACKING_URI, "
                                          "sqlite runs/mlflow.db)")
    p.add_argument("--world", type=Path, help="a generated toy world: held-out triples and FVD reference videos")
    p.add_argument("--prompts", type=int, default=8, metavar="N", help="prompts (default: %(default)s)")
    p.add_argument("--samples", type=int, default=2, metavar="N", help="samples per prompt (default: %(default)s)")
    p.add_argument("--stop-at", choices=STAGES[1:], help="last stage to run (default: sr_high)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fps", type=float, default=8.0, help="frame rate of the base clip (default: %(default)s)")
    p.add_argument("--links", type=_positive, metavar="DRAWS",
                   help="instead of videos, read where each prompt is lost before the video stages: CLIP's "
                        "text embedding, DRAWS prior embeddings, D from the true embedding of world renders and "
                        "D from the prior's (the key frame); links.json in --out and an MLflow run "
                        "'evaluate-links' (seconds on a CPU)")
    p.set_defaults(func=partial(_cmd, load_config, runner))
