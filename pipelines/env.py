"""Keep every tool's state inside the project's state folder, and quiet their noise.

Ray, Prefect, MLflow and the dataset tools write to the home directory and /tmp by default; a run
of this project keeps its state in one folder (`MAV_STATE_DIR`, default `./.state`) so that a fresh
clone, CI and a user's machine behave the same. Values already set by the user win.
"""
from __future__ import annotations

import os
from pathlib import Path

QUIET_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "NO_ALBUMENTATIONS_UPDATE": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
}


def state_dir() -> Path:
    return Path(os.environ.get("MAV_STATE_DIR", ".state")).resolve()


def configure_environment() -> Path:
    """Set the defaults (without overriding the user's) and return the state folder."""
    root = state_dir()
    root.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MAV_STATE_DIR", str(root))
    os.environ.setdefault("PREFECT_HOME", str(root / "prefect"))
    for key, value in QUIET_DEFAULTS.items():
        os.environ.setdefault(key, value)
    return root
