"""What an evaluation records in MLflow: the weights it read (registry versions or file hashes), tags a
run list can be filtered by, and its settings, metrics and files."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from pipelines.evaluation.aggregate import summary_metrics
from training.registry import stage_versions
from training.tracker import DEFAULT_ALIAS
from training.tracker import Tracker


def experiment_of(cfg: Any) -> str:
    """The MLflow experiment of a pipeline config (a bare cascade config names none)."""
    return getattr(getattr(cfg, "train", None), "experiment", "make-a-video")


def weights_used(cascade: Any, weights: str, uri: str, alias: str = DEFAULT_ALIAS) -> dict[str, dict]:
    """Per stage the cascade loaded: registry version (of `alias`), run, sha256 and source (None values
    dropped)."""
    versions = stage_versions(uri, alias) if weights == "mlflow" else {}
    return {stage: {k: v for k, v in {**src, **versions.get(stage, {})}.items() if v is not None}
            for stage, src in cascade.sources.items()}


def run_tags(used: dict[str, dict], summary: dict) -> dict[str, str]:
    """mav.weights.<stage>: "mav-<stage>/<version>" (registry) or "sha256:<prefix>" (a file); the bar."""
    tags = {"mav.stage": "evaluate", "mav.quality_bar": "pass" if summary["quality_bar"]["passed"] else "fail"}
    for stage, info in used.items():
        tags[f"mav.weights.{stage}"] = (f"{info['name']}/{info['version']}" if "version" in info
                                        else f"sha256:{info['sha256'][:12]}")
    return tags


def log_evaluation(tracker: Tracker, cfg: Any, settings: dict, used: dict, summary: dict, rows: list[dict],
                   out: Path) -> None:
    """Settings and weights as params, the summary as metrics, the config, the rows and the sample GIFs."""
    tracker.log_params({"eval": settings, "weights": used})
    tracker.log_metrics(summary_metrics(summary), step=0)
    tracker.log_dict(cfg.model_dump(mode="json"), "config.json")
    tracker.log_dict({"summary": summary, "videos": rows}, "evaluation/videos.json")
    tracker.log_artifact(str(out / "videos.csv"), "evaluation")
    tracker.log_artifact(str(out / "samples"), "evaluation/samples")
