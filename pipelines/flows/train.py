"""Training the cascade as a Prefect flow: the stage jobs of training/ in order, with the pipeline's
CLIP embedding step where it belongs (after the clip stage, before the stages that read embeddings)."""
from __future__ import annotations

from pathlib import Path

from prefect import flow

from pipelines.config import ConfigError, PipelineConfig, load_config
from pipelines.embed import embed_image_dataset
from pipelines.embed_videos import embed_video_dataset
from pipelines.evaluation.promotion import promote_trained
from training.jobs import StageResult, check_pretrained_clip, location, resolve_all, stages_for, train_all
from training.registry import PromotionPolicy
from training.tracker import DEFAULT_ALIAS
from training.tracking import resolve_tracking_uri


def train_cascade(stages: list[str], cfg: PipelineConfig, images: str | None = None, videos: str | None = None,
                  run_root: str = "runs", *, force: bool = False, tracking_uri: str | None = None,
                  parent_run_id: str | None = None, in_process: bool = False, promotion: str = "none",
                  evaluation: dict | None = None) -> dict[str, StageResult]:
    """Train `stages` (or ["all"]) and embed the image shards and video frames with the CLIP they end up using;
    `in_process`: without Ray (training.jobs.run_stage). Each stage reads its part of the data as its
    training config says (`video_datasets`), and plans its memory when `gpu_memory` is set.

    `promotion` (`PromotionPolicy.parse`): "none" makes every new version `current` at once; otherwise the
    new versions are challengers (a stage's first version is current anyway), the challenger cascade is
    evaluated afterwards (`evaluation`: that protocol's keyword arguments) and each stage's `current`
    moves only when it meets the bar or beats the current (`pipelines.evaluation.promotion`)."""
    clip = cfg.cascade.clip
    filters = cfg.data.images.pixel_filters
    order = stages_for(stages, cfg.cascade)
    try:  # before the embeddings and any stage: a bad policy, a missing CLIP file, a stage that cannot fit its GPUs
        policy = PromotionPolicy.parse(promotion)
        check_pretrained_clip(cfg.cascade, cfg.train, order)
        resolved = resolve_all(order, cfg)
    except ValueError as err:
        raise ConfigError(str(err)) from None

    def embed(weights: str | None) -> None:
        if images is not None:
            embed_image_dataset(images, clip, weights, filters=filters if filters.enabled else None)
        if videos is not None:  # the video stages' condition: frame embeddings, read by the loader
            embed_video_dataset(videos, clip, weights)

    if "clip" not in order and clip.weights_path is not None:
        embed(None)  # pretrained CLIP: embeddings first, from clip.weights_path

    def after(stage: str, result: StageResult) -> None:
        if stage == "clip":
            embed(str(result.weights_path))

    results = train_all(order, cfg, images=images, videos=videos, run_root=run_root, tracking_uri=tracking_uri,
                        parent_run_id=parent_run_id, force=force, in_process=in_process, after_stage=after,
                        resolved=resolved, alias=None if policy.metric else DEFAULT_ALIAS)
    if policy.metric:
        uri = resolve_tracking_uri(tracking_uri, cfg.train.tracking_uri, location(run_root))
        promote_trained(cfg, {s: r.version for s, r in results.items()}, policy, uri,
                        Path(run_root) / "promotion", evaluation)
    return results


@flow(name="train-cascade", log_prints=True)
def train_cascade_flow(images: str, videos: str, out: str = "runs/train", preset: str = "toy",
                       stages: list[str] | None = None, config: str | None = None,
                       overrides: list[str] | None = None, force: bool = False, promotion: str = "none",
                       evaluation: dict | None = None) -> dict[str, dict]:
    """Train the cascade's stages in order on Ray Train, tracked and registered in MLflow; `promotion` and
    `evaluation`: when new versions become `current` (see `train_cascade`)."""
    cfg = load_config(preset, config, overrides or [])
    results = train_cascade(stages or ["all"], cfg, images, videos, str(Path(out)), force=force,
                            promotion=promotion, evaluation=evaluation)
    return {stage: {"weights": str(r.weights_path), "version": r.version, "run_id": r.run_id, "steps": r.steps}
            for stage, r in results.items()}
