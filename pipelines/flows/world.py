"""The toy world as a Prefect flow, so a deployment can (re)build it on a schedule or on demand."""
from __future__ import annotations

from prefect import flow, get_run_logger, task

from pipelines.config import load_config
from pipelines.world import generate_world


@task(name="generate-world", retries=1)
def generate_world_task(out: str, preset: str, seed: int | None) -> str:
    cfg = load_config(preset).world
    if seed is not None:
        cfg = cfg.model_copy(update={"seed": seed})
    return str(generate_world(out, cfg))


@flow(name="toy-world", log_prints=True)
def toy_world(out: str = "runs/world", preset: str = "toy", seed: int | None = None) -> str:
    """Generate the built-in toy world (LAION parquet, WebVid CSV, HD-VILA JSONL, files, ground truth)."""
    summary = generate_world_task(out, preset, seed)
    get_run_logger().info("toy world written to %s", out)
    return summary
