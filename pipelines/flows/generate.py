"""Generation as a Prefect flow: text to watermarked video with the stages registered in MLflow."""
from __future__ import annotations

from prefect import flow

from pipelines.config import load_config
from pipelines.defaults import DEFAULT_FPS
from pipelines.generate import generate


@flow(name="generate-videos", log_prints=True)
def generate_videos(prompts: list[str], out: str = "runs/videos", preset: str = "toy", weights: str = "mlflow",
                    tracking_uri: str | None = None, stop_at: str | None = None, seed: int = 0,
                    fps: float = DEFAULT_FPS, config: str | None = None,
                    overrides: list[str] | None = None) -> list[dict]:
    """Run the cascade for each prompt; mp4, GIF, frame grid and a JSON sidecar per output, watermarked."""
    cfg = load_config(preset, config, overrides or [])
    records = generate(cfg, prompts, out, weights=weights, tracking_uri=tracking_uri, stop_at=stop_at, seed=seed,
                       fps=fps)
    return [{"name": r["name"], "files": {k: str(v) for k, v in r["files"].items()}} for r in records]
