"""What the image benchmarks share: a toy world of captioned images served on 127.0.0.1, the egress policy
that lets the downloaders reach it, and how a result is written."""
from __future__ import annotations

import json
from pathlib import Path

from pipelines.config import LOOPBACK_HOST_RATE
from pipelines.safety import UrlPolicy
from pipelines.world import WorldConfig, world_preset

# The world's server is on the loopback, which the egress policy refuses unless allow-listed.
# The limiter stays on; its per-host rate is raised as the toy world is one loopback host standing in for many.
LOOPBACK_POLICY = UrlPolicy(allow_public=False, allow_networks=["127.0.0.1/32"], timeout_s=4.0,
                            host_rate=LOOPBACK_HOST_RATE)


def image_world(n_images: int) -> WorldConfig:
    """The toy preset's world with `n_images` LAION rows, few videos, and no slow rows (a timeout would
    measure the world's sleep, not the code under test)."""
    base = world_preset("toy")
    return WorldConfig.model_validate({**base.model_dump(), "n_images": n_images, "n_videos": 8,
                                       "n_hdvila_videos": 3, "slow_rows": 0})


def write_result(out: Path, result: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
