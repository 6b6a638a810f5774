"""Near-duplicates by CLIP-embedding cosine similarity, one kept per group.

Rows are taken in order; a row whose embedding is at least `duplicate_similarity` from a row kept
before it is a duplicate of the most similar such row, otherwise it is kept. Rows arrive and are
compared a block at a time, so memory is one block of similarities against the kept rows (plus the
kept embeddings themselves), never all pairs. An embedding may come in parts (a tuple of vectors):
the similarity is then the product of the parts' cosines.

CLIP embeddings need trained weights to tell scenes apart: a from-scratch CLIP (the flows' model when
no weights are given) maps every toy-world frame to nearly the same direction. `thumbnail_embedding`
is the weight-free stand-in, in two parts whose cosines multiply (the cosine of their outer product,
never formed): the layout (small colour thumbnails of a few frames spread over the clip, each channel of each
frame made zero-mean, so that it compares what is drawn where rather than the background's colour) and
the palette (the square root of a coarse colour histogram: a shift or a re-encode keeps it, another
background or shape colour does not). The layout tolerates shifts of a third of a thumbnail cell or
so (2 px of a 96 px frame: 16 cells of 6 px); larger shifts and crops need a CLIP with weights.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import NamedTuple

import cv2
import numpy as np

from pipelines.curation.config import CurationConfig
from pipelines.curation.frames import spread

THUMB_SIDE = 16  # px of each thumbnail's side
# Gaussian blur before thumbnailing, sigma in thumbnail cells: a clip's fine moving texture (a panned
# lattice) shifts with a copy and is blurred away; an image's layout is all it has and is kept sharp.
CLIP_BLUR, IMAGE_BLUR = 0.5, 0.0
HIST_BINS = 3  # per channel, of the colour histogram
THUMB_FRAMES = 4  # frames of a clip in its thumbnail embedding


class Verdict(NamedTuple):
    """A row's outcome: kept (`duplicate_of` None) or a duplicate of the kept row `duplicate_of`."""

    key: str
    duplicate_of: str | None
    similarity: float  # to the nearest kept row before it (0.0 for the first)


def thumbnail_embedding(frames: np.ndarray, side: int = THUMB_SIDE,
                        n_frames: int = THUMB_FRAMES) -> tuple[np.ndarray, np.ndarray]:
    """(F, H, W, 3) uint8 frames (an image: F = 1) -> (layout float32 (n_frames * side * side * 3,),
    palette float32 (HIST_BINS ** 3,)) of `n_frames` frames spread over the clip (an image's repeated)."""
    picked = frames[spread(len(frames), n_frames)].astype(np.float32)
    picked = picked[np.minimum(np.arange(n_frames), len(picked) - 1)]
    f, h, w, c = picked.shape
    side = min(side, h, w)
    hs, ws = h // side, w // side
    blur = CLIP_BLUR if len(frames) > 1 else IMAGE_BLUR
    if blur:
        picked = np.stack([cv2.GaussianBlur(x, (0, 0), blur * max(hs, ws)) for x in picked])
    thumbs = picked[:, :hs * side, :ws * side].reshape(f, side, hs, side, ws, c).mean((2, 4))
    layout = (thumbs - thumbs.mean((1, 2), keepdims=True)).reshape(-1)  # each frame's colour cast removed
    bins = (picked.reshape(-1, c) * HIST_BINS / 256).astype(int) @ (HIST_BINS ** np.arange(c))
    palette = np.sqrt(np.bincount(bins, minlength=HIST_BINS ** c).astype(np.float32))
    return layout.astype(np.float32), palette


Embedding = np.ndarray | tuple[np.ndarray, ...]


def _parts(rows: list[Embedding]) -> list[np.ndarray]:
    """Per part: the rows' unit vectors (n, D_part)."""
    split = [r if isinstance(r, tuple) else (r,) for r in rows]
    out = []
    for k in range(len(split[0])):
        x = np.asarray([r[k] for r in split], dtype=np.float32).reshape(len(rows), -1)
        out.append(x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12))
    return out


def _similarity(a: list[np.ndarray], b: list[np.ndarray]) -> np.ndarray:
    sims = np.ones((len(a[0]), len(b[0])), np.float32)
    for pa, pb in zip(a, b):
        sims *= pa @ pb.T
    return sims


def _blocks(rows: Iterable[tuple[str, Embedding]], size: int) -> Iterator[list[tuple[str, Embedding]]]:
    block: list[tuple[str, Embedding]] = []
    for row in rows:
        block.append(row)
        if len(block) == size:
            yield block
            block = []
    if block:
        yield block


def find_duplicates(rows: Iterable[tuple[str, Embedding]],
                    config: CurationConfig = CurationConfig()) -> Iterator[Verdict]:
    """One Verdict per (key, embedding) row, in order."""
    kept_keys: list[str] = []
    kept: list[np.ndarray] | None = None
    for block in _blocks(rows, config.duplicate_block):
        emb = _parts([e for _, e in block])
        sims = _similarity(emb, kept) if kept is not None else np.zeros((len(block), 0), np.float32)
        within = _similarity(emb, emb)
        new: list[int] = []
        for i, (key, _) in enumerate(block):
            candidates = np.concatenate([sims[i], within[i, new]])
            best = int(np.argmax(candidates)) if len(candidates) else -1
            similarity = float(candidates[best]) if best >= 0 else 0.0
            if best >= 0 and similarity >= config.duplicate_similarity:
                of = kept_keys[best] if best < len(kept_keys) else block[new[best - len(kept_keys)]][0]
                yield Verdict(key, of, similarity)
            else:
                new.append(i)
                yield Verdict(key, None, similarity)
        kept_keys += [block[i][0] for i in new]
        kept = [p[new] for p in emb] if kept is None else [np.concatenate([k, p[new]]) for k, p in zip(kept, emb)]
