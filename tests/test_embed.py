"""Embedding steps of the image and video flows, run for real: webdataset tars built here, Ray actors, tiny CLIP."""
from __future__ import annotations

import io
import json
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import webdataset as wds
from PIL import Image

from model.checkpoint import save_weights
from model.clip import build_clip, encode_images, encode_text
from model.config import cascade_preset
from pipelines.embed import clip_identity, embed_image_dataset, embed_shards, pending_shards, write_identity
from pipelines.embed_videos import embed_video_dataset
from pipelines.manifest import ManifestError, sha256_file
from pipelines.pixel_filters import EmbeddingHead, PixelFilterConfig, keep_mask, load_head, score
from test_training import video_dataset
from training.data import has_video_embeddings
from training.jobs import stage_data
from training.storage import hash_settings, unfinished_embeddings

TINY = cascade_preset("tiny").clip
COLORS = {"red": (220, 30, 30), "blue": (30, 30, 220)}
SHARDS = {"shards/00000.tar": 12, "shards/00001.tar": 3}


def _picture(color: str, rng: np.random.Generator, size: tuple[int, int] = (24, 24)) -> np.ndarray:
    """A noisy square of one colour: (H, W, 3) uint8."""
    noise = rng.integers(-25, 25, size=(*size, 3))
    return np.clip(np.array(COLORS[color]) + noise, 0, 255).astype(np.uint8)


def _jpeg(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _write_dataset(root: Path, samples: dict[str, int] = SHARDS, manifest_samples: dict[str, int] | None = None,
                   ) -> dict[str, str]:
    """Shards of red/blue squares with captions, as img2dataset writes them; returns {key: colour}."""
    rng = np.random.default_rng(0)
    colours: dict[str, str] = {}
    (root / "shards").mkdir(parents=True)
    n = 0
    for name, count in samples.items():
        with wds.TarWriter(str(root / name)) as sink:
            for _ in range(count):
                key, colour = f"{n:09d}", ("red", "blue")[n % 2]
                size = (40, 28) if n == 5 else (24, 24)  # one odd-sized image: resized on its own
                sink.write({"__key__": key, "jpg": _jpeg(_picture(colour, rng, size)),
                            "txt": f"a {colour} square", "json": json.dumps({"key": key}).encode()})
                colours[key] = colour
                n += 1
    counts = manifest_samples or samples
    manifest = {"kind": "images", "shards": [{"name": k, "samples": v} for k, v in counts.items()]}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return colours


def _tar_samples(path: Path) -> dict[str, dict[str, bytes]]:
    """{key: {ext: bytes}} straight from the tar, without the code under test."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def _save_clip(path: Path, seed: int) -> str:
    torch.manual_seed(seed)
    model, _, _ = build_clip(TINY)
    return str(save_weights(model, path))


@pytest.fixture(scope="module")
def clip_weights(tmp_path_factory) -> tuple[str, str]:
    folder = tmp_path_factory.mktemp("clip")
    return _save_clip(folder / "a.safetensors", 1), _save_clip(folder / "b.safetensors", 2)


@pytest.fixture
def dataset(tmp_path) -> tuple[Path, dict[str, str]]:
    root = tmp_path / "images"
    return root, _write_dataset(root)


def _pixels(jpg: bytes) -> torch.Tensor:
    return torch.from_numpy(np.asarray(Image.open(io.BytesIO(jpg)).convert("RGB")).copy()).permute(2, 0, 1)


def _column(table: pa.Table, name: str) -> torch.Tensor:
    return torch.tensor(np.stack(table[name].to_numpy(zero_copy_only=False)))


def _markers(root: Path) -> dict[str, tuple[int, dict]]:
    """{shard name: (rows, identity)} from the per-shard markers, whose identity hash must match."""
    out = {}
    for path in sorted((root / "embeddings").glob("*.done.json")):
        marker = json.loads(path.read_text())
        assert marker["identity_sha256"] == hash_settings(marker["identity"])
        out[marker["shard"]] = (marker["rows"], marker["identity"])
    return out


def test_one_row_per_sample_like_encode_images_then_resume(dataset, clip_weights, ray_session):
    root, _ = dataset
    out = embed_image_dataset(f"file://{root}", TINY, clip_weights[0], batch_size=5, use_gpu="auto")
    assert out["computed"] == list(SHARDS) and out["skipped"] == []

    model, _, tokenizer = build_clip(TINY.model_copy(update={"weights_path": clip_weights[0]}))
    for name in SHARDS:
        samples = _tar_samples(root / name)
        table = pq.read_table(root / "embeddings" / (Path(name).stem + ".parquet"))
        assert table.column_names == ["key", "image_emb", "text_emb"]
        emb_type = table.schema.field("image_emb").type
        assert pa.types.is_fixed_size_list(emb_type) and emb_type.list_size == 32
        assert emb_type.value_type == pa.float32() and table.schema.field("text_emb").type == emb_type
        keys = sorted(samples)
        assert table["key"].to_pylist() == keys  # exactly one row per sample of the tar
        with torch.no_grad():  # one image at a time: the odd-sized one is resized on its own
            want_img = torch.cat([encode_images(model, _pixels(samples[k]["jpg"])[None]) for k in keys])
            want_txt = encode_text(model, tokenizer, [samples[k]["txt"].decode() for k in keys])
        torch.testing.assert_close(_column(table, "image_emb"), want_img, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(_column(table, "text_emb"), want_txt, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(_column(table, "image_emb").norm(dim=-1), torch.ones(len(table)))
    identity = json.loads((root / "embeddings/embeddings.json").read_text())
    assert identity["clip"]["weights"] == sha256_file(clip_weights[0])
    assert identity["clip"]["model_name"] == "mav-tiny-clip" and identity["dim"] == 32
    assert identity["pixel_filters"] is None and "shards" not in identity  # written once, no per-shard ledger
    assert _markers(root) == {name: (rows, identity) for name, rows in SHARDS.items()}
    assert out["rows"] == sum(SHARDS.values())

    first = root / "embeddings/00000.parquet"
    before = pq.read_table(first)
    os.utime(first, ns=(1, 1))  # a rewrite would change this
    again = embed_image_dataset(str(root), TINY, clip_weights[0])
    assert again["computed"] == [] and again["skipped"] == list(SHARDS)
    assert first.stat().st_mtime_ns == 1

    killed = root / "embeddings/00001.parquet"  # its task died mid-write: a partial parquet, no marker
    killed.write_bytes(killed.read_bytes()[:100])
    (root / "embeddings/00001.done.json").unlink()
    partial = embed_image_dataset(str(root), TINY, clip_weights[0], batch_size=8)  # redone, the rest kept
    assert partial["computed"] == ["shards/00001.tar"] and first.stat().st_mtime_ns == 1
    assert pq.read_table(root / "embeddings/00001.parquet").num_rows == SHARDS["shards/00001.tar"]

    changed = embed_image_dataset(str(root), TINY, clip_weights[1], batch_size=8)
    assert changed["computed"] == list(SHARDS) and changed["rows"] == sum(SHARDS.values())
    assert changed["clip"]["weights"] == sha256_file(clip_weights[1])
    assert {m[1]["clip"]["weights"] for m in _markers(root).values()} == {sha256_file(clip_weights[1])}
    after = pq.read_table(first)
    assert after["key"].to_pylist() == before["key"].to_pylist()
    assert not torch.allclose(_column(after, "image_emb"), _column(before, "image_emb"))


def test_manifest_count_must_match_the_tar(tmp_path, clip_weights, ray_session):
    root = tmp_path / "images"
    _write_dataset(root, {"shards/00000.tar": 4, "shards/00001.tar": 2},
                   manifest_samples={"shards/00000.tar": 5, "shards/00001.tar": 2})
    (root / "shards/00001.tar").write_bytes(b"not a tar" * 100)
    with pytest.raises(ManifestError, match=r"^shards hold fewer samples than the manifest says \(read vs manifest\): "
                       r"shards/00000.tar 4 vs 5; shards/00001.tar: the tar does not read \(invalid header\)$"):
        embed_image_dataset(str(root), TINY, clip_weights[0])
    assert not list((root / "embeddings").glob("*.done.json"))  # both shards stay unfinished
    assert unfinished_embeddings(str(root), ["shards/00000.tar", "shards/00001.tar"]) == ["shards/00000.tar",
                                                                                          "shards/00001.tar"]


@pytest.mark.slow
def test_shard_tasks_write_their_embeddings_and_unfinished_shards_are_seen(dataset, clip_weights, ray_session):
    """The actors write each shard's parquet and marker and hand the driver a few numbers only; a shard
    whose parquet has no marker (its task killed mid-shard) or whose parquet is lost is unfinished, for
    training and for the next embed run (which redoes it: see the first test)."""
    root, _ = dataset
    clip = TINY.model_copy(update={"weights_path": clip_weights[0]})
    identity = {"clip": clip_identity(clip), "dim": TINY.embed_dim, "pixel_filters": None}
    shards = [{"name": name, "samples": n} for name, n in SHARDS.items()]
    write_identity(str(root), identity)
    summaries = list(embed_shards(ray_session, str(root), shards, identity, clip, None, batch_size=5, gpu=False))
    assert sorted(s["name"] for s in summaries) == list(SHARDS)
    for out in summaries:  # names and counts: the embeddings stay in the files their actor wrote
        assert all(isinstance(v, (str, int, type(None))) for v in out.values())
        assert out["rows"] == SHARDS[out["name"]] and out["error"] is None
        assert len(pickle.dumps(out)) < 256 < TINY.embed_dim * 2 * 4 * out["rows"]
    assert _markers(root) == {name: (rows, identity) for name, rows in SHARDS.items()}
    assert unfinished_embeddings(str(root), list(SHARDS)) == []
    assert embed_image_dataset(str(root), TINY, clip_weights[0])["computed"] == []

    assert stage_data("prior", cascade_preset("tiny"), str(root), None) == str(root)

    (root / "embeddings/00001.done.json").unlink()  # killed after its parquet, before its marker
    assert unfinished_embeddings(str(root), list(SHARDS)) == ["shards/00001.tar"]
    (root / "embeddings/00000.parquet").unlink()  # lost
    assert unfinished_embeddings(str(root), list(SHARDS)) == list(SHARDS)
    assert pending_shards(str(root), shards, identity) == shards
    with pytest.raises(FileNotFoundError, match=r"stage prior needs CLIP embeddings: .*00000.done.json is missing "
                                                r"or from other CLIP weights \(2 shards\); run the embed flow"):
        stage_data("prior", cascade_preset("tiny"), str(root), None)


def test_video_shards_write_their_markers_and_a_killed_shard_is_redone(tmp_path):
    """The same for frame embeddings: each shard's call writes parquet then marker and returns a summary."""
    videos = video_dataset(tmp_path / "videos", 32, shards=2, per_shard=1)
    clip, seen = TINY.model_copy(update={"weights_path": None}), []

    def run(embedder, root, todo):  # one shard after another, as the default does, keeping what comes back
        for shard in todo:
            seen.append(embedder(root, shard))
            yield seen[-1]

    out = embed_video_dataset(str(videos), clip, run=run)
    assert out["computed"] == ["shards/00000.tar", "shards/00001.tar"] and out["clips"] == 2
    assert all(len(pickle.dumps(s)) < 256 and set(map(type, s.values())) <= {str, int} for s in seen)
    assert has_video_embeddings(str(videos))

    kept, killed = videos / "embeddings/00000.parquet", videos / "embeddings/00001.parquet"
    os.utime(kept, ns=(1, 1))
    killed.write_bytes(killed.read_bytes()[:50])
    (videos / "embeddings/00001.done.json").unlink()
    assert not has_video_embeddings(str(videos))  # the frozen CLIP conditions until it is redone
    again = embed_video_dataset(str(videos), clip)
    assert again["computed"] == ["shards/00001.tar"] and kept.stat().st_mtime_ns == 1
    assert pq.read_table(killed).num_rows == 1 and has_video_embeddings(str(videos))


def _train_red_head(weights: str, path: Path) -> str:
    """A small MLP that says "red" on the tiny CLIP's embeddings of fresh red and blue squares."""
    model, _, _ = build_clip(TINY.model_copy(update={"weights_path": weights}))
    rng = np.random.default_rng(1)
    colours = ["red", "blue"] * 32
    pixels = torch.stack([torch.from_numpy(_picture(c, rng)).permute(2, 0, 1) for c in colours])
    with torch.no_grad():
        emb = encode_images(model, pixels)
    labels = torch.tensor([c == "red" for c in colours], dtype=torch.float32)
    torch.manual_seed(0)
    head = EmbeddingHead(TINY.embed_dim, hidden=(16,))
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(300):
        opt.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(head(emb), labels).backward()
        opt.step()
    return str(save_weights(head, path))


def test_pixel_filter_flags_the_detected_samples(dataset, clip_weights, ray_session, tmp_path):
    root, colours = dataset
    head = _train_red_head(clip_weights[0], tmp_path / "red.safetensors")
    filters = PixelFilterConfig(nsfw_weights=head)
    out = embed_image_dataset(str(root), TINY, clip_weights[0], batch_size=8, filters=filters)
    table = pq.read_table(root / "embeddings/00000.parquet")
    assert table.column_names == ["key", "image_emb", "text_emb", "nsfw_score", "watermark_score", "pixel_keep"]
    red = np.array([colours[k] == "red" for k in table["key"].to_pylist()])
    nsfw = table["nsfw_score"].to_numpy()
    assert (nsfw[red] > 0.5).all() and (nsfw[~red] < 0.5).all()
    assert table["pixel_keep"].to_pylist() == list(~red)
    assert table["watermark_score"].null_count == len(table)  # that head is off
    assert out["pixel_kept"] == 7 and out["rows"] == sum(SHARDS.values())
    markers = {n: json.loads((root / f"embeddings/{n}.done.json").read_text()) for n in ("00000", "00001")}
    assert {n: m["pixel_kept"] for n, m in markers.items()} == {"00000": 6, "00001": 1}
    assert out["pixel_filters"] == {"nsfw": {"sha256": sha256_file(head), "max": 0.5}}


def test_missing_weights_name_the_path(tmp_path, dataset):
    root, _ = dataset
    missing = tmp_path / "nope" / "head.safetensors"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_head(str(missing), 32)
    with pytest.raises(FileNotFoundError, match=str(missing)):
        embed_image_dataset(str(root), TINY, str(missing))
    with pytest.raises(FileNotFoundError, match=f"watermark head weights not found: {missing}"):
        embed_image_dataset(str(root), TINY, None, filters=PixelFilterConfig(watermark_weights=str(missing)))


def test_head_loading_and_keep_rule(tmp_path):
    torch.manual_seed(0)
    path = save_weights(EmbeddingHead(32, hidden=(8, 4)), tmp_path / "h.safetensors")
    head = load_head(str(path), 32)
    assert [m.out_features for m in head.net if isinstance(m, torch.nn.Linear)] == [8, 4, 1]
    probs = score(head, torch.randn(5, 32))
    assert probs.shape == (5,) and ((probs > 0) & (probs < 1)).all()
    with pytest.raises(ValueError, match="head takes 32-dim embeddings, the CLIP model gives 64"):
        load_head(str(path), 64)

    cfg = PixelFilterConfig(nsfw_weights="n", watermark_weights="w", nsfw_max=0.5, watermark_max=0.8)
    keep = keep_mask(cfg, {"nsfw": torch.tensor([0.1, 0.6, 0.1]), "watermark": torch.tensor([0.7, 0.1, 0.9])})
    assert keep.tolist() == [True, False, False]
    assert not PixelFilterConfig().enabled and PixelFilterConfig(nsfw_weights="n").enabled
