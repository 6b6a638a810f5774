"""Metadata filters for LAION-style text-image tables, before anything is downloaded.

Every input row leaves with exactly one outcome: `status` "kept" or "filtered", and for a filtered
row ONE `reason`, the first that applies in this order (`REASONS`):

1. `no_text`         TEXT null, empty or only whitespace: nothing to train the prior on.
2. `nsfw`            punsafe > punsafe_max.
3. `watermark`       pwatermark > pwatermark_max (the paper removes pwatermark > 0.5).
4. `toxic`           a listed word appears in TEXT as a whole word, case-insensitive.
5. `too_small`       WIDTH < min_width or HEIGHT < min_height.
6. `low_similarity`  similarity < min_similarity (only when min_similarity > 0).
7. `null_punsafe`    punsafe null/NaN and on_null_punsafe == "drop".
8. `null_pwatermark` pwatermark null/NaN and on_null_pwatermark == "drop".

Known problems come before unknown scores, so a row with a toxic caption and no punsafe is
recorded as "toxic", not as a policy drop. Safety reasons come before quality reasons.

Columns: URL and TEXT are required. A missing score column counts as all null and follows its
null policy (img2dataset's test_1000.parquet has only URL and TEXT: with "keep" every row with text
is kept, with "drop" every row is dropped as null_punsafe). WIDTH, HEIGHT and similarity that are
missing or null never filter a row: the size is unknown until download, where img2dataset's own
min_image_size applies. Extra columns pass through unchanged.

Everything is vectorised with pyarrow.compute; `filter_batch` runs as is in
`ray.data.Dataset.map_batches(filter_batch, fn_kwargs={"cfg": cfg}, batch_format="pyarrow")`.
"""
from __future__ import annotations

import functools
import importlib.resources
import re
from pathlib import Path
from typing import Literal

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, field_validator

from model.config import ConfigBase

REASONS: tuple[str, ...] = (
    "no_text", "nsfw", "watermark", "toxic", "too_small", "low_similarity", "null_punsafe", "null_pwatermark",
)
KEPT, FILTERED = "kept", "filtered"
REQUIRED_COLUMNS = ("URL", "TEXT")
_OUTPUT_COLUMNS = ("status", "reason")
# RE2 (pyarrow's regex engine) metacharacters; whitespace inside an entry becomes \s+.
_RE2_SPECIAL = re.compile(r"([\\.^$|?*+()\[\]{}])")
_WORD_EDGES = re.compile(r"^\w(.*\w)?$", re.DOTALL)


class ImageFilterConfig(ConfigBase):
    """Thresholds and policies of the metadata filter. Defaults follow the paper where it says."""

    punsafe_max: float = Field(0.5, ge=0.0, le=1.0, description="punsafe above this: nsfw")
    pwatermark_max: float = Field(0.5, ge=0.0, le=1.0, description="pwatermark above this: watermark")
    toxic_words_path: str | None = Field(None, description="word list file; None: the packaged list")
    extra_toxic_words: list[str] = Field(default_factory=list, description="added to the list")
    min_width: int = Field(32, ge=0)
    min_height: int = Field(32, ge=0)
    min_similarity: float = Field(0.0, ge=0.0, le=1.0, description="0 turns it off; LAION used 0.28")
    on_null_punsafe: Literal["keep", "drop"] = "keep"
    on_null_pwatermark: Literal["keep", "drop"] = "keep"

    @field_validator("extra_toxic_words")
    @classmethod
    def _whole_words(cls, words: list[str]) -> list[str]:
        for word in words:
            _check_word(word, "extra_toxic_words")
        return words


def _check_word(word: str, source: str) -> None:
    if not _WORD_EDGES.match(word.strip()):
        raise ValueError(f"{source}: {word!r} must start and end with a letter or digit")


def load_toxic_words(path: str | None = None) -> list[str]:
    """Read a word list (one per line, # comments); None reads the packaged list."""
    if path is None:
        text = importlib.resources.files("pipelines").joinpath("resources/toxic_words.txt").read_text("utf-8")
        source = "packaged toxic_words.txt"
    else:
        text = Path(path).read_text("utf-8")
        source = path
    words = [line.strip() for line in text.splitlines()]
    words = [w for w in words if w and not w.startswith("#")]
    for word in words:
        _check_word(word, source)
    return words


def _escape(word: str) -> str:
    return r"\s+".join(_RE2_SPECIAL.sub(r"\\\1", part) for part in word.split())


@functools.lru_cache(maxsize=16)
def _pattern(words: frozenset[str]) -> str | None:
    """One RE2 alternation with word boundaries, longest words first."""
    if not words:
        return None
    return r"\b(?:" + "|".join(_escape(w) for w in sorted(words, key=lambda w: (-len(w), w))) + r")\b"


def toxic_pattern(cfg: ImageFilterConfig) -> str | None:
    """The regex the `toxic` reason uses, or None when the word list is empty. The list is re-read
    on every call (a small file) so an edited list is never served stale from a cache."""
    words = [*load_toxic_words(cfg.toxic_words_path), *cfg.extra_toxic_words]
    return _pattern(frozenset(w.strip().lower() for w in words))


def _numeric(table: pa.Table, name: str) -> pa.ChunkedArray | pa.Array:
    """The column as float64; a missing column is all null."""
    if name not in table.column_names:
        return pa.nulls(table.num_rows, pa.float64())
    column = table.column(name)
    try:
        return pc.cast(column, pa.float64())
    except pa.ArrowException as err:  # invalid values or a type with no cast to float
        raise ValueError(f"column {name}: cannot read {column.type} as a number") from err


def _text(table: pa.Table) -> pa.ChunkedArray:
    column = table.column("TEXT")
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type) or pa.types.is_null(column.type)):
        raise ValueError(f"column TEXT: expected strings, got {column.type}")
    return pc.cast(column, pa.string())


def _false_if_null(mask: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray | pa.Array:
    return pc.fill_null(mask, False)


def _all(table: pa.Table, value: bool) -> pa.Array:
    return pc.fill_null(pa.nulls(table.num_rows, pa.bool_()), value)


def reason_masks(table: pa.Table, cfg: ImageFilterConfig) -> dict[str, pa.Array | pa.ChunkedArray]:
    """One boolean mask per reason, each judged on its own (precedence is applied later)."""
    text = _text(table)
    punsafe, pwatermark = _numeric(table, "punsafe"), _numeric(table, "pwatermark")
    width, height = _numeric(table, "WIDTH"), _numeric(table, "HEIGHT")
    similarity = _numeric(table, "similarity")
    pattern = toxic_pattern(cfg)
    no_text = pc.or_kleene(pc.is_null(text), pc.equal(pc.utf8_trim_whitespace(text), ""))
    toxic = pc.match_substring_regex(text, pattern, ignore_case=True) if pattern else _all(table, False)
    too_small = pc.or_(_false_if_null(pc.less(width, cfg.min_width)), _false_if_null(pc.less(height, cfg.min_height)))
    low_similarity = pc.less(similarity, cfg.min_similarity) if cfg.min_similarity > 0 else _all(table, False)
    masks = {
        "no_text": no_text,
        "nsfw": pc.greater(punsafe, cfg.punsafe_max),
        "watermark": pc.greater(pwatermark, cfg.pwatermark_max),
        "toxic": toxic,
        "too_small": too_small,
        "low_similarity": low_similarity,
        "null_punsafe": _null_policy(punsafe, cfg.on_null_punsafe, table),
        "null_pwatermark": _null_policy(pwatermark, cfg.on_null_pwatermark, table),
    }
    return {name: _false_if_null(mask) for name, mask in masks.items()}


def _null_policy(score: pa.Array | pa.ChunkedArray, policy: str, table: pa.Table) -> pa.Array | pa.ChunkedArray:
    return pc.is_null(score, nan_is_null=True) if policy == "drop" else _all(table, False)


def filter_batch(batch: pa.Table, cfg: ImageFilterConfig) -> pa.Table:
    """The batch with `status` and `reason` appended. A batch does not know its place in the whole
    table, so `row_id` passes through if present and is not invented here (see filter_metadata)."""
    missing = [c for c in REQUIRED_COLUMNS if c not in batch.column_names]
    if missing:
        raise ValueError(f"metadata table lacks required column(s) {missing}; has {batch.column_names}")
    clash = [c for c in _OUTPUT_COLUMNS if c in batch.column_names]
    if clash:
        raise ValueError(f"metadata table already has output column(s) {clash}; filter each table once")
    masks = reason_masks(batch, cfg)
    conditions = pc.make_struct(*[masks[r] for r in REASONS], field_names=list(REASONS))
    reason = pc.case_when(conditions, *[pa.scalar(r) for r in REASONS])
    status = pc.if_else(pc.is_null(reason), KEPT, FILTERED)
    return batch.append_column("status", status).append_column("reason", reason)


def add_row_ids(table: pa.Table) -> pa.Table:
    """Append `row_id` 0..n-1 (input order) unless the table already has one."""
    if "row_id" in table.column_names:
        return table
    return table.append_column("row_id", pa.array(range(table.num_rows), pa.int64()))


def filter_metadata(table: pa.Table, cfg: ImageFilterConfig) -> pa.Table:
    """Every input row, in order, with `row_id`, `status` and `reason` (null when kept)."""
    return filter_batch(add_row_ids(table), cfg)


def split_kept(table: pa.Table) -> tuple[pa.Table, pa.Table]:
    """(kept rows, filtered rows) of a filtered table, each in input order."""
    kept = pc.equal(table.column("status"), KEPT)
    return table.filter(kept), table.filter(pc.invert(kept))


def reason_counts(table: pa.Table) -> dict[str, int]:
    """Rows per outcome: "kept" and each reason that occurs, in REASONS order. Sums to num_rows."""
    outcome = pc.fill_null(table.column("reason"), KEPT)
    counts = {row["values"]: row["counts"] for row in pc.value_counts(outcome).to_pylist()}
    order = [KEPT, *REASONS]
    return {name: counts[name] for name in sorted(counts, key=lambda n: order.index(n) if n in order else len(order))}


class PixelFilterConfig(ConfigBase):
    """Which heads run and where samples are cut. A head without weights is off."""

    nsfw_weights: str | None = Field(None, description="local safetensors/.pt file of the NSFW head")
    watermark_weights: str | None = Field(None, description="local safetensors/.pt file of the watermark head")
    nsfw_max: float = Field(0.5, ge=0.0, le=1.0, description="samples scoring above are not kept")
    watermark_max: float = Field(0.5, ge=0.0, le=1.0, description="samples scoring above are not kept")

    @property
    def enabled(self) -> bool:
        return self.nsfw_weights is not None or self.watermark_weights is not None

    def weights(self) -> dict[str, str]:
        """{head name: weights path} of the configured heads."""
        paths = {"nsfw": self.nsfw_weights, "watermark": self.watermark_weights}
        return {name: path for name, path in paths.items() if path is not None}

    def threshold(self, head: str) -> float:
        return {"nsfw": self.nsfw_max, "watermark": self.watermark_max}[head]
