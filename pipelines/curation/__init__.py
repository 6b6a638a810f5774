"""Video curation scorers: scene cuts, motion, static overlays and near-duplicates.

Pure functions of a clip's decoded frames (or of a set of CLIP embeddings), cheap enough for a Ray
worker's CPU and needing no downloaded weights; `CurationConfig` holds the thresholds that turn their
scores into decisions.
"""
from pipelines.curation.config import CurationConfig
from pipelines.curation.cuts import Part, cut_times, split_at_cuts
from pipelines.curation.duplicates import Verdict, find_duplicates, thumbnail_embedding
from pipelines.curation.frames import decode_span
from pipelines.curation.motion import is_still, motion_score
from pipelines.curation.overlay import Overlay, has_overlay, overlay_score

__all__ = ["CurationConfig", "Overlay", "Part", "Verdict", "cut_times", "decode_span", "find_duplicates",
           "has_overlay", "is_still", "motion_score", "overlay_score", "split_at_cuts", "thumbnail_embedding"]
