"""Metadata filters: every reason, their precedence, null policies, whole-word matching, real data, Ray."""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from pipelines.images.filters import (
    REASONS,
    ImageFilterConfig,
    filter_batch,
    filter_metadata,
    load_toxic_words,
    reason_counts,
    split_kept,
)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CLEAN = {"URL": "http://127.0.0.1/x.jpg", "TEXT": "a red circle on a blue background", "WIDTH": 64, "HEIGHT": 64,
         "similarity": 0.3, "hash": 1, "punsafe": 0.1, "pwatermark": 0.1, "extra": "passes through"}
SCHEMA = pa.schema([("URL", pa.string()), ("TEXT", pa.string()), ("WIDTH", pa.int64()), ("HEIGHT", pa.int64()),
                    ("similarity", pa.float64()), ("hash", pa.int64()), ("punsafe", pa.float32()),
                    ("pwatermark", pa.float32()), ("extra", pa.string())])


def table(*changes: dict) -> pa.Table:
    """One row per dict: a clean row with those fields changed."""
    return pa.Table.from_pylist([{**CLEAN, **change} for change in changes], schema=SCHEMA)


def reasons(t: pa.Table, cfg: ImageFilterConfig | None = None) -> list[str | None]:
    return filter_metadata(t, cfg or ImageFilterConfig()).column("reason").to_pylist()


def test_every_reason_on_a_hand_built_table():
    t = table({}, {"TEXT": None}, {"TEXT": "  "}, {"punsafe": 0.9}, {"pwatermark": 0.51},
              {"TEXT": "xxx circle"}, {"WIDTH": 16}, {"HEIGHT": 8}, {"similarity": 0.1},
              {"punsafe": None}, {"pwatermark": None})
    cfg = ImageFilterConfig(min_similarity=0.28, on_null_punsafe="drop", on_null_pwatermark="drop")
    out = filter_metadata(t, cfg)
    assert out.column("reason").to_pylist() == [None, "no_text", "no_text", "nsfw", "watermark", "toxic",
                                               "too_small", "too_small", "low_similarity", "null_punsafe",
                                               "null_pwatermark"]
    assert out.column("status").to_pylist() == ["kept"] + ["filtered"] * 10
    assert out.column("row_id").to_pylist() == list(range(11))
    assert out.column("extra").to_pylist() == ["passes through"] * 11
    assert out.column_names[:9] == SCHEMA.names
    counts = reason_counts(out)
    assert counts == {"kept": 1, "no_text": 2, "nsfw": 1, "watermark": 1, "toxic": 1, "too_small": 2,
                      "low_similarity": 1, "null_punsafe": 1, "null_pwatermark": 1}
    assert list(counts) == ["kept", *[r for r in REASONS if r in counts]]


def test_thresholds_are_strictly_greater_and_paper_defaults():
    t = table({"punsafe": 0.5, "pwatermark": 0.5}, {"WIDTH": 32, "HEIGHT": 32}, {"similarity": 0.0})
    assert reasons(t) == [None, None, None]
    assert reasons(table({"punsafe": 0.3}), ImageFilterConfig(punsafe_max=0.2)) == ["nsfw"]


def test_precedence_first_reason_wins():
    everything = {"TEXT": "nsfw", "punsafe": 0.9, "pwatermark": 0.9, "WIDTH": 1, "similarity": 0.0}
    cfg = ImageFilterConfig(min_similarity=0.28, on_null_punsafe="drop", on_null_pwatermark="drop")
    t = table({**everything, "TEXT": ""}, everything, {**everything, "punsafe": 0.0},
              {**everything, "punsafe": 0.0, "pwatermark": 0.0}, {"WIDTH": 1, "similarity": 0.0, "punsafe": None},
              {"similarity": 0.0, "punsafe": None, "pwatermark": None}, {"punsafe": None, "pwatermark": None},
              {"TEXT": "porn", "punsafe": None})
    assert reasons(t, cfg) == ["no_text", "nsfw", "watermark", "toxic", "too_small", "low_similarity",
                               "null_punsafe", "toxic"]


@pytest.mark.parametrize("policy", ["keep", "drop"])
def test_null_scores_follow_their_policy(policy):
    t = table({"punsafe": None}, {"punsafe": float("nan")}, {"pwatermark": None})
    got = reasons(t, ImageFilterConfig(on_null_punsafe=policy, on_null_pwatermark=policy))
    assert got == ([None] * 3 if policy == "keep" else ["null_punsafe", "null_punsafe", "null_pwatermark"])


@pytest.mark.parametrize("policy", ["keep", "drop"])
def test_missing_columns_count_as_null(policy):
    t = pa.table({"URL": ["http://a/1.jpg", "http://a/2.jpg"], "TEXT": ["a red square", None]})
    got = reasons(t, ImageFilterConfig(on_null_punsafe=policy, min_similarity=0.28))
    # Size and similarity unknown before download never filter; no_text outranks the null policy.
    assert got == ([None, "no_text"] if policy == "keep" else ["null_punsafe", "no_text"])


def test_null_size_and_similarity_do_not_filter():
    t = table({"WIDTH": None, "HEIGHT": None, "similarity": None})
    assert reasons(t, ImageFilterConfig(min_similarity=0.28)) == [None]


@pytest.mark.parametrize(("text", "toxic"), [
    ("NSFW!", True), ("a Nude figure", True), ("xxx-rated", True), ("PORN", True), ("(porn)", True),
    ("XXXL shirt", False), ("nsfwish", False), ("pornography", True), ("porny", False), ("nudes", True),
    ("canudeo", False), ("a field of rape in spring", False), ("summa cum laude", False),
])
def test_toxic_match_is_whole_word_case_insensitive(text, toxic):
    assert reasons(table({"TEXT": text})) == (["toxic"] if toxic else [None])


def test_packaged_list_has_the_toy_world_tokens_and_extra_words_work():
    words = load_toxic_words()
    assert {"xxx", "nsfw", "porn", "nude"} <= set(words)
    assert all(not w.startswith("#") and w == w.strip() for w in words)
    cfg = ImageFilterConfig(extra_toxic_words=["Grumpy Cat"])
    assert reasons(table({"TEXT": "a grumpy   cat"}, {"TEXT": "grumpy cats"}), cfg) == ["toxic", None]


def test_custom_word_list_replaces_the_packaged_one(tmp_path):
    path = tmp_path / "words.txt"
    path.write_text("# mine\nsquare\n\n")
    assert reasons(table({"TEXT": "a red square"}, {"TEXT": "nsfw"}), ImageFilterConfig(toxic_words_path=str(path))) \
        == ["toxic", None]
    path.write_text("f*ck\n")  # regex characters inside an entry are literal
    assert reasons(table({"TEXT": "F*CK this"}, {"TEXT": "fuck"}), ImageFilterConfig(toxic_words_path=str(path))) \
        == ["toxic", None]
    path.write_text("f***\n")
    with pytest.raises(ValueError, match="start and end with a letter"):
        reasons(table({}), ImageFilterConfig(toxic_words_path=str(path)))


def test_bad_input_fails_with_a_short_message():
    with pytest.raises(ValueError, match="required column"):
        filter_metadata(pa.table({"URL": ["u"]}), ImageFilterConfig())
    with pytest.raises(ValueError, match="column WIDTH"):
        filter_metadata(pa.table({"URL": ["u"], "TEXT": ["t"], "WIDTH": ["wide"]}), ImageFilterConfig())
    with pytest.raises(ValueError, match="already has output"):
        filter_metadata(filter_metadata(table({}), ImageFilterConfig()), ImageFilterConfig())
    with pytest.raises(ValidationError):
        ImageFilterConfig(on_null_punsafe="maybe")
    with pytest.raises(ValidationError):
        ImageFilterConfig(extra_toxic_words=["*bad"])


def test_row_id_is_kept_when_present_and_split_keeps_order():
    t = table({}, {"punsafe": 0.9}, {}).append_column("row_id", pa.array([10, 11, 12], pa.int64()))
    out = filter_metadata(t, ImageFilterConfig())
    kept, dropped = split_kept(out)
    assert kept.column("row_id").to_pylist() == [10, 12]
    assert dropped.column("row_id").to_pylist() == [11]
    assert dropped.column("reason").to_pylist() == ["nsfw"]


def test_real_laion_sample_every_row_has_one_outcome():
    path = SHARED_DATA / "test_1000.parquet"
    if not path.exists():
        pytest.skip(f"real sample {path} absent (img2dataset's tests/test_files/test_1000.parquet)")
    t = pq.read_table(path)
    for cfg in (ImageFilterConfig(), ImageFilterConfig(on_null_punsafe="drop")):
        out = filter_metadata(t, cfg)
        assert out.num_rows == t.num_rows
        assert out.column("row_id").to_pylist() == list(range(t.num_rows))
        status = out.column("status").to_pylist()
        reason = out.column("reason").to_pylist()
        assert all((s == "kept") == (r is None) and s in ("kept", "filtered") for s, r in zip(status, reason))
        assert sum(reason_counts(out).values()) == t.num_rows
        kept, dropped = split_kept(out)
        assert kept.num_rows + dropped.num_rows == t.num_rows
    assert reason_counts(filter_metadata(t, ImageFilterConfig())).get("toxic", 0) >= 1


@pytest.mark.slow
def test_filter_batch_in_ray_data_map_batches(ray_session):
    t = filter_metadata(table({}, {"punsafe": 0.9}, {"TEXT": "nsfw"}, {}), ImageFilterConfig())
    source = t.drop_columns(["status", "reason"])
    ds = ray_session.data.from_arrow(source).map_batches(
        filter_batch, fn_kwargs={"cfg": ImageFilterConfig()}, batch_format="pyarrow", batch_size=2)
    rows = sorted(ds.take_all(), key=lambda r: r["row_id"])
    assert [(r["row_id"], r["status"], r["reason"]) for r in rows] == \
        list(zip(*[t.column(c).to_pylist() for c in ("row_id", "status", "reason")]))
