"""The training input path: loader workers, the shard split, resuming without re-reading, per-sample
draws, and the video stages' stored frame embeddings. Real tar shards and mp4s, built here."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import webdataset as wds
from test_training import image_dataset, video_dataset, write_manifest

from model.config import cascade_preset
from pipelines.embed_videos import embed_video_dataset
from training.data import choose_split, load_frame_embeddings, rank_stream, span_embedding, stage_batches
from training.loaders.stream import epoch_plan, sample_stream
from training.stages import ImageView, SampleRng, Stage, stage_spec
from training.storage import read_manifest

VIEW = ImageView(16, embeddings=False, tokens=False)


def take(it, n: int) -> list[dict[str, torch.Tensor]]:
    return [next(it) for _ in range(n)]


def test_loader_workers_deliver_the_batches_of_the_inline_loader(tmp_path) -> None:
    """Two DataLoader processes decode what the training loop would decode itself, batch for batch, in the
    same order (images through an epoch boundary, and video clips)."""
    images = image_dataset(tmp_path / "images", 16, shards=2, per_shard=5)
    kw = dict(global_batch=4, rank=0, world=1, seed=1, total_steps=8, shuffle_buffer=3)
    inline = take(stage_batches(str(images), VIEW, **kw), 4)
    workers = take(stage_batches(str(images), VIEW, loader_workers=2, **kw), 4)
    for a, b in zip(inline, workers):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    videos = video_dataset(tmp_path / "videos", 16, shards=1, per_shard=3)
    view = stage_spec("temporal").view(cascade_preset("tiny"))
    one = next(stage_batches(str(videos), view, **{**kw, "global_batch": 2}))
    two = next(stage_batches(str(videos), view, loader_workers=2, **{**kw, "global_batch": 2}))
    assert torch.equal(one["video"], two["video"]) and torch.equal(one["fps"], two["fps"])


def test_a_sample_that_does_not_decode_is_left_out_and_the_next_fills_the_batch(tmp_path) -> None:
    """A broken JPEG is skipped: every batch still holds batch-size samples, the same with loader workers
    as without, and the broken one's seed is in none of them."""
    images = image_dataset(tmp_path / "images", 16, shards=1, per_shard=7)
    with wds.TarWriter(str(images / "shards/00001.tar")) as sink:
        sink.write({"__key__": "000010000", "jpg": b"not a jpeg", "txt": b"broken"})
    write_manifest(images, "images", [("shards/00000.tar", 7), ("shards/00001.tar", 1)])
    kw = dict(global_batch=3, rank=0, world=1, seed=4, total_steps=8, shuffle_buffer=0)
    inline = take(stage_batches(str(images), VIEW, **kw), 5)
    workers = take(stage_batches(str(images), VIEW, loader_workers=2, **kw), 5)
    for a, b in zip(inline, workers):
        assert len(a["seed"]) == 3 and torch.equal(a["seed"], b["seed"]) and torch.equal(a["image"], b["image"])
    seeds = torch.cat([b["seed"] for b in inline]).tolist()
    assert len(set(seeds)) == 15  # two epochs' 14 good samples and the third's first: none twice, none broken


def test_shard_split_reads_every_sample_once_per_epoch_across_ranks(tmp_path, capfd) -> None:
    """auto picks the shard split when each rank can have a shard, and says so: rank r reads shards
    r, r+world, ..., so one epoch of every rank's stream covers each sample exactly once. With fewer
    shards than ranks it falls back to the sample split."""
    images = image_dataset(tmp_path / "images", 8, shards=5, per_shard=3)
    streams = [rank_stream(str(images), "images", global_batch=4, rank=r, world=2, seed=0, total_steps=4,
                           start_step=0, split="auto", shuffle_buffer=4) for r in (0, 1)]
    assert "split=shards (auto): 5 shards over 2 workers" in capfd.readouterr().out
    keys = []
    for rs in streams:
        epoch = sum(rs.sizes)
        keys.append([s["__key__"] for _, (_, s) in zip(range(epoch), rs.owned())])
    assert not set(keys[0]) & set(keys[1])
    assert sorted(keys[0] + keys[1]) == sorted(f"{s:05d}{i:04d}" for s in range(5) for i in range(3))
    assert choose_split("auto", shards=1, world=2) == "samples" and choose_split("auto", 4, 1) == "samples"
    with pytest.raises(ValueError, match="needs at least 2 shards"):
        choose_split("shards", shards=1, world=2)


def test_a_resumed_stream_starts_at_its_step_without_reading_the_shards_before(tmp_path) -> None:
    """The position is a function of (seed, step): a run resumed at step k gets the k-th batch of the
    fresh run (with a shuffle buffer, in the second epoch too), and shards whose samples all come
    before the resume point are never opened (here: deleted)."""
    images = image_dataset(tmp_path / "images", 16, shards=3, per_shard=4)
    kw = dict(global_batch=4, rank=0, world=1, seed=2, total_steps=8, shuffle_buffer=0)
    fresh = take(stage_batches(str(images), VIEW, **kw), 5)
    for k in (1, 3, 4):
        resumed = next(stage_batches(str(images), VIEW, start_step=k, **kw))
        assert torch.equal(resumed["seed"], fresh[k]["seed"]) and torch.equal(resumed["image"], fresh[k]["image"])
    buffered = take(stage_batches(str(images), VIEW, **{**kw, "shuffle_buffer": 5}), 5)
    assert torch.equal(next(stage_batches(str(images), VIEW, start_step=4, **{**kw, "shuffle_buffer": 5}))["image"],
                       buffered[4]["image"])
    order, _ = epoch_plan([4, 4, 4], seed=2, epoch=0, shuffle_buffer=0)
    (images / f"shards/{order[0]:05d}.tar").unlink()  # the shard epoch 0 reads first
    urls = [str(images / f"shards/{i:05d}.tar") for i in range(3)]
    position, _ = next(sample_stream(urls, 2, sizes=[4, 4, 4], start=4))
    assert position == 4


def test_a_samples_draws_follow_its_seed_whatever_the_batch() -> None:
    """Noise, timesteps and dropout of a sample depend on its seed alone, not on its batch neighbours."""
    seeds = torch.tensor([11, 22, 33])
    x = torch.zeros(3, 2, 4, 4)
    whole, part = SampleRng(seeds), SampleRng(seeds[1:])
    assert torch.equal(whole.noise_like(x)[1:], part.noise_like(x[1:]))
    cond = torch.ones(3, 5)
    assert torch.equal(whole.drop(cond, 0.5)[1:], part.drop(cond[1:], 0.5))


def test_video_stages_read_the_stored_frame_embeddings_of_their_clips(tmp_path) -> None:
    """The embed step stores a frame embedding every 0.5 s of each clip; the loader hands each clip the
    renormalised mean of those its frames span, and the stage conditions on it instead of running CLIP."""
    cascade = cascade_preset("tiny")
    videos = video_dataset(tmp_path / "videos", 32, shards=2, per_shard=2)
    clip = cascade.clip.model_copy(update={"weights_path": None})
    view = stage_spec("temporal").view(cascade)
    before = next(stage_batches(str(videos), view, global_batch=2, rank=0, world=1, seed=0, total_steps=4))
    assert "clip_emb" not in before  # no embeddings yet: the frozen CLIP conditions
    out = embed_video_dataset(str(videos), clip)
    assert out["computed"] == ["shards/00000.tar", "shards/00001.tar"]
    assert embed_video_dataset(str(videos), clip)["computed"] == []  # done once
    table = load_frame_embeddings(str(videos / "embeddings" / "00000.parquet"))
    times, embs = table["000000000"]
    assert np.allclose(times, np.arange(len(times)) * 0.5) and embs.shape == (len(times), clip.embed_dim)
    batch = next(stage_batches(str(videos), view, global_batch=2, rank=0, world=1, seed=0, total_steps=4))
    assert batch["clip_emb"].shape == (2, clip.embed_dim)
    torch.testing.assert_close(batch["clip_emb"].norm(dim=-1), torch.ones(2))
    stage = Stage(stage_spec("temporal"), cascade, clip=None)  # no CLIP: the stored embedding must serve
    assert torch.equal(stage.video_embedding(batch["video"], batch["clip_emb"]), batch["clip_emb"])
    mid = span_embedding(times, embs, 0.4, 1.1)  # frames at 0.5 and 1.0
    torch.testing.assert_close(mid, torch.nn.functional.normalize(torch.from_numpy(embs[1:3].mean(0)), dim=-1))
    marker = json.loads((videos / "embeddings" / "00000.done.json").read_text())  # written after the parquet
    assert marker["rows"] == read_manifest(str(videos))["shards"][0]["samples"] and marker["skipped_clips"] == 0
    assert marker["identity"] == json.loads((videos / "embeddings" / "embeddings.json").read_text())
