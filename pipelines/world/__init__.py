"""The toy world: captioned images and unlabeled videos of simple shapes, in the LAION, WebVid and
HD-VILA formats, with known bad rows and a ground truth, served over loopback HTTP."""
from pipelines.world.config import WORLD_PRESETS, WorldConfig, world_preset
from pipelines.world.generate import WorldSummary, generate_world
from pipelines.world.server import WorldServer, rebase_urls, rebase_world, serve_world

__all__ = ["WORLD_PRESETS", "WorldConfig", "WorldServer", "WorldSummary", "generate_world", "rebase_urls",
           "rebase_world", "serve_world", "world_preset"]
