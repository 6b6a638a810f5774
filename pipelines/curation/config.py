"""Thresholds of the video curation scorers (pipelines/curation/), one config for all of them."""
from __future__ import annotations

from pydantic import Field

from model.config import ConfigBase


class CurationConfig(ConfigBase):
    """What each curation scorer calls a defect. The defaults are tuned on the toy world's `defects` preset
    (benchmarks/bench_curation.py, seed 1) and reported on another seed."""

    work_size: int = Field(64, ge=16, description="frames are scored with their long side at most this, px")
    cut_threshold: float = Field(27.0, gt=0, description="PySceneDetect ContentDetector threshold")
    min_part_s: float = Field(0.5, ge=0, description="cuts closer than this to each other or an end are ignored")
    motion_pairs: int = Field(8, ge=1, description="frame pairs the motion score averages over")
    motion_gap_s: float = Field(0.25, gt=0, description="time between the two frames of a pair")
    motion_floor: float = Field(0.001, ge=0, description=(
        "a clip whose motion score (fraction of the side per second) is below this is still"))
    overlay_frames: int = Field(16, ge=3, description="frames the overlay detector compares")
    overlay_persistence: float = Field(0.9, gt=0.5, le=1.0, description=(
        "share of the frames an edge must be in at a pixel to count as persistent"))
    overlay_edge: float = Field(40.0, gt=0, description="a persistent edge is a Sobel response above this")
    overlay_min_score: float = Field(0.01, gt=0, description=(
        "a clip carries an overlay when persistent edges of both orientations cover this share of it"))
    duplicate_similarity: float = Field(0.86, gt=0, le=1.0, description=(
        "cosine similarity of embeddings (CLIP, or the weight-free thumbnails) at or above which two rows "
        "are near-duplicates"))
    duplicate_block: int = Field(1024, ge=1, description="rows compared at once (memory ~ block x kept)")
