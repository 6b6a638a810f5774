"""The evaluation stage: generate toy-world prompts with the trained cascade, score every video with the
toy-world scorer, and log the result to MLflow against the issue's quality bar.

The same calls' earlier video stages (Dt's base clip, F's, SR_l's) are read too, upsampled to the final
size (`stage_trace`, `aggregate.stage_reading`): where along the cascade a figure is lost, at no extra
sampling. CLIPSIM uses the cascade's own CLIP; FVD is relative (`references`). `evaluate` is the body of
the Prefect flow `pipelines.flows.evaluate.evaluate_flow`.
"""
from __future__ import annotations

import csv
import json
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from tqdm.auto import tqdm

from model.cascade import CascadeOutput, to_uint8
from model.cascade_uses import text_to_video
from model.feature_extractors import RandomVideoExtractor
from model.layers import resize
from model.metrics import clipsim, fvd
from pipelines.config import PipelineConfig, load_config
from pipelines.defaults import DEFAULT_FPS, STAGES
from pipelines.evaluation.aggregate import aggregate, format_table, score_videos, stage_reading, summary_metrics
from pipelines.evaluation.prompts import PromptSpec, evaluation_prompts
from pipelines.evaluation.references import FVD_FEATURES, load_reference_videos, output_shape
from pipelines.evaluation.scorer import EvalConfig
from pipelines.evaluation.tracking import experiment_of, log_evaluation, run_tags, weights_used
from pipelines.generate import load_cascade, tracking_uri_of
from pipelines.outputs import write_gif
from pipelines.watermark import WatermarkConfig, apply_watermark
from training.lineage import video_lineage
from training.tracker import DEFAULT_ALIAS
from training.tracking import MlflowTracker, tracked_run

SAMPLE_MIN_SIDE = 128  # evaluation GIFs are enlarged to at least this side before the watermark goes on


def stage_trace(result: CascadeOutput) -> dict[str, np.ndarray]:
    """The video stages a cascade call ran before its last one, each bilinearly upsampled to the last
    stage's side (what a residual SR stage adds its difference to): {stage: (B, F, H, W, 3) uint8}. Read
    by the evaluator beside the final videos, they show at which stage a prompt's figures change."""
    last = result[result.last_stage]
    side = last.shape[-1]
    return {stage: to_uint8(resize(result[stage].float(), side).clamp(-1, 1)).numpy()
            for stage in STAGES[1:] if stage in result.outputs and stage != result.last_stage}


def generate_samples(cascade: Any, prompts: Sequence[PromptSpec], samples: int, seed: int, stop_at: str | None,
                     fps: float, batch_size: int
                     ) -> tuple[np.ndarray, list[PromptSpec], list[dict], float, dict[str, np.ndarray]]:
    """(videos (N, F, H, W, 3) uint8, their prompts, per-video sample info, output fps, `stage_trace`: the
    earlier video stages' outputs of the same calls). Sample s of batch k uses seed + 1000 * s + k, so a
    video depends only on its prompt, batch and sample."""
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


def viewing_size(video: np.ndarray, min_side: int = SAMPLE_MIN_SIDE) -> np.ndarray:
    """(F, H, W, 3) enlarged by the smallest whole factor that brings its shorter side to `min_side`, each
    pixel a block (nearest neighbour: what the evaluator scored, not a smoothed version). At the toy base
    size (32 px) the watermark would otherwise cover half the frame and hide the object."""
    factor = max(1, -(-min_side // min(video.shape[1:3])))
    return video if factor == 1 else video.repeat(factor, axis=1).repeat(factor, axis=2)


def write_evaluation(out: Path, rows: list[dict], summary: dict, videos: np.ndarray, fps: float,
                     n_gifs: int) -> None:
    """evaluation.json, videos.csv and watermarked GIFs of the first sample of `n_gifs` prompts, enlarged
    to a viewable size first (`viewing_size`)."""
    (out / "samples").mkdir(parents=True, exist_ok=True)
    (out / "evaluation.json").write_text(json.dumps({"summary": summary, "videos": rows}, indent=2, default=str))
    with open(out / "videos.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    for i in [i for i, r in enumerate(rows) if r["sample"] == 0][:n_gifs]:
        write_gif(apply_watermark(viewing_size(videos[i]), WatermarkConfig()), out / "samples" / f"{i:03d}.gif", fps)


def evaluate_cascade(cfg: Any, *, weights: str = "mlflow", tracking_uri: str | None = None, out_dir: str | Path,
                     prompts: Sequence[PromptSpec | str], samples_per_prompt: int = 2, seed: int = 0,
                     stop_at: str | None = None, fps: float = DEFAULT_FPS, reference_videos: Sequence | None = None,
                     parent_run_id: str | None = None, batch_size: int = 8, n_gifs: int = 4,
                     device: str | None = None, eval_cfg: EvalConfig | None = None,
                     lineage: dict | None = None, alias: str = DEFAULT_ALIAS) -> dict:
    """Generate `samples_per_prompt` videos per prompt with the trained cascade (up to `stop_at`),
    score them, compute CLIPSIM (the cascade's CLIP) and, given reference videos, FVD; log it all to an
    MLflow run "evaluate" (a child of `parent_run_id`); print the table. `lineage`: the video stages'
    `video_lineage` when the caller has it already; else it is read here (MLflow weights only). `alias`:
    the registry alias read with weights="mlflow" (`challenger` to judge new weights). Returns run_id,
    summary, metrics, rows, table."""
    if samples_per_prompt < 1 or batch_size < 1 or not prompts:
        raise ValueError("need at least one prompt, samples_per_prompt >= 1 and batch_size >= 1")
    output_shape(cfg, stop_at)  # a stop_at without videos fails here, before any loading
    specs = [PromptSpec.from_text(p) if isinstance(p, str) else p for p in prompts]
    uri = tracking_uri_of(cfg, tracking_uri)
    started = time.perf_counter()
    cascade = load_cascade(cfg, weights, uri, stop_at=stop_at, device=device, alias=alias)
    videos, specs, info, out_fps, trace = generate_samples(cascade, specs, samples_per_prompt, seed, stop_at, fps,
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
    write_evaluation(out, rows, summary, videos, out_fps, n_gifs)
    table = format_table(rows, summary)
    print(f"evaluate: {len(specs) // samples_per_prompt} prompts x {samples_per_prompt} samples, stage "
          f"{info[0]['stage']} ({videos.shape[1]} frames, {videos.shape[3]}x{videos.shape[2]}), "
          f"{time.perf_counter() - started:.1f} s\n{table}")
    settings = {"prompts": len(specs) // samples_per_prompt, "samples_per_prompt": samples_per_prompt, "seed": seed,
                "stop_at": stop_at or STAGES[-1], "fps": fps, "weights": weights, "alias": alias,
                "reference_videos": len(reference_videos or []), "fvd_features": FVD_FEATURES}
    used = weights_used(cascade, weights, uri, alias)
    with tracked_run(MlflowTracker(uri, experiment_of(cfg)), "evaluate", parent_run_id=parent_run_id,
                     tags=run_tags(used, summary)) as tracker:
        log_evaluation(tracker, cfg, settings, used, summary, rows, out)
    return {"run_id": tracker.run_id, "summary": summary, "metrics": summary_metrics(summary), "rows": rows,
            "table": table, "out": str(out)}


def evaluate(out: str, preset: str = "toy", weights: str = "mlflow", tracking_uri: str | None = None,
             world: str | None = None, n_prompts: int = 8, samples_per_prompt: int = 2, seed: int = 0,
             config: str | dict | None = None, overrides: list[str] | None = None, stop_at: str | None = None,
             fps: float = DEFAULT_FPS, parent_run_id: str | None = None, lineage: dict | None = None,
             alias: str = DEFAULT_ALIAS) -> dict:
    """The body of `evaluate_flow`. `config`: a YAML path (with `overrides`) or a resolved config tree;
    `world`: a generated world folder, whose LAION rows define the held-out triples and whose videos
    are the FVD reference; without it the held-out triples come from the config's world plan. `lineage`:
    see `evaluate_cascade`."""
    if isinstance(config, dict):
        if overrides:
            raise ValueError("overrides apply to a preset or a YAML file, not to a resolved config tree")
        cfg = PipelineConfig.model_validate(config)
    else:
        cfg = load_config(preset, config, overrides or [])
    _, prompts = evaluation_prompts(cfg, world, n_prompts, seed)
    reference = None
    if world:
        frames, side = output_shape(cfg, stop_at)
        reference = load_reference_videos(world, frames, side, (cfg.cascade.shape.frames - 1) / fps)
    result = evaluate_cascade(cfg, weights=weights, tracking_uri=tracking_uri, out_dir=out, prompts=prompts,
                              samples_per_prompt=samples_per_prompt, seed=seed, stop_at=stop_at, fps=fps,
                              reference_videos=reference, parent_run_id=parent_run_id, lineage=lineage,
                              alias=alias)
    return {k: result[k] for k in ("run_id", "summary", "metrics", "out")}
