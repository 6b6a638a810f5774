"""One stage's training job as every worker sees it, rebuilt from the JSON-able dict the driver passes
(`training.jobs.job_config` writes that dict; `training.loop.run` trains it)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from model.config import CascadeConfig
from training.config import StageTrainConfig
from training.faults import fail_at_step
from training.registry import load_stage_weights


@dataclass
class Job:
    """One stage's training job: its networks, training config, data, run folder and MLflow run."""

    stage: str
    cascade: CascadeConfig
    train: StageTrainConfig
    data: str
    run_root: str
    extra_data: str | None = None  # a second folder the stage reads (training.routing), else None
    tracking_uri: str | None = None
    experiment: str = "make-a-video"
    run_id: str | None = None
    sources: dict[str, str] = field(default_factory=dict)
    split: str = "auto"  # training.data.choose_split; from_config takes the job's, else train.data_split
    fail_at_step: int | None = None

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "Job":
        return cls(stage=config["stage"], cascade=CascadeConfig.model_validate(config["cascade"]),
                   train=StageTrainConfig.model_validate(config["train"]), data=config["data"],
                   run_root=config["run_root"], extra_data=config.get("extra_data"),
                   tracking_uri=config.get("tracking_uri"),
                   experiment=config.get("experiment", "make-a-video"), run_id=config.get("run_id"),
                   sources=dict(config.get("sources", {})),
                   split=config.get("split") or config["train"].get("data_split", "auto"),
                   fail_at_step=fail_at_step(config))

    def resolved(self) -> dict[str, Any]:
        """The resolved config saved with every checkpoint and logged as params."""
        return {"stage": self.stage, "cascade": self.cascade.model_dump(mode="json"),
                "train": self.train.model_dump(mode="json"), "data": self.data, "extra_data": self.extra_data,
                "split": self.split,
                "sources": self.sources}

    def load(self, stage: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Registered weights of an upstream stage (the registry, or a local file)."""
        return load_stage_weights(stage, self.sources.get(stage, "mlflow"), self.tracking_uri)
