"""From per-video scores to the evaluation's figures: one row per video, means overall / held-out / seen,
the issue's quality bar, flat MLflow metrics and the printed table.

Per video the scores are `pipelines.evaluation.scorer.evaluate_video`'s; `aggregate` takes their means
overall, for held-out and for seen prompts, and the share of clips that move, and `quality_bar` checks the
issue's bar. `stage_reading` does the same for the earlier video stages of the same cascade calls: where
along the cascade a figure is lost.
"""
from __future__ import annotations

from dataclasses import asdict
from typing import Sequence

import numpy as np

from pipelines.defaults import STAGES
from pipelines.evaluation.prompts import PromptSpec
from pipelines.evaluation.scorer import EvalConfig, evaluate_video
from training.lineage import describe

QUALITY_BAR = {"prompt_faithfulness": 0.8, "motion_share": 0.8, "temporal_consistency": 0.9}
SCORES = ("prompt_faithfulness", "temporal_consistency", "frame_quality", "shape_accuracy", "colour_accuracy",
          "background_accuracy", "detected", "motion_smoothness")
STAGE_SCORES = ("prompt_faithfulness", "temporal_consistency", "shape_accuracy", "colour_accuracy")


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
        lines.append(f"  lineage: {describe(summary['lineage'])}")
    return "\n".join(lines)
