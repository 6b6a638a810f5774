"""Shared fixtures. Every tool's state goes to a per-session temp folder; nothing leaves 127.0.0.0/8."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from _shared import SHARED_DATA


def pytest_configure(config: pytest.Config) -> None:
    # Before any test imports Ray/Prefect/MLflow: keep their state out of the home directory.
    state = Path(os.environ.get("MAV_TEST_STATE", "/tmp/mav-test-state")) / str(os.getpid())
    state.mkdir(parents=True, exist_ok=True)
    os.environ["MAV_STATE_DIR"] = str(state)
    os.environ["PREFECT_HOME"] = str(state / "prefect")
    for key, value in {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_DISABLE_TELEMETRY": "true",
                       "NO_ALBUMENTATIONS_UPDATE": "1", "RAY_USAGE_STATS_ENABLED": "0",
                       "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}.items():
        os.environ.setdefault(key, value)
    # Tiny networks run several times faster on one thread than on two contended ones.
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real third-party files in ../shared/data (never copied into the repo)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test files not found at {SHARED_DATA} (the project's shared/data folder)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray cluster for the whole session: starting Ray costs seconds, so tests share it."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def served_world(tmp_path_factory):
    """The tiny toy world, served on a free 127.0.0.1 port (slow rows wait 3 s) with its metadata
    rebased to that port: (root, server)."""
    from pipelines.world import generate_world, rebase_world, serve_world, world_preset

    root = tmp_path_factory.mktemp("world")
    generate_world(root, world_preset("tiny"))
    with serve_world(root, port=0, slow_seconds=3.0) as server:
        rebase_world(root, server.url)
        yield root, server
