"""The image stages' data path: milliseconds per training batch with the last shards' embeddings tables
kept (`training.data.EMBEDDING_TABLES_KEPT`) against keeping only the current shard's table (baseline).

A toy world's images go through the real image flow (filter, img2dataset download into webdataset shards)
and the real embeddings step (a seeded from-scratch CLIP: the vectors' values do not matter here), then
`training.data.stage_batches` reads them as the decoder does (32 px pixels + embeddings, shuffle buffer
of 1000 samples). The shuffle buffer mixes samples of several shards, so a loader that keeps one table
re-reads a shard's parquet at almost every sample.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

import training.data as data
from model.config import cascade_preset
from pipelines.config import ImageDataConfig
from pipelines.embed import embed_image_dataset
from pipelines.flows.images import build_image_dataset
from pipelines.world import generate_world, rebase_world, serve_world
from training.stages import ImageView

from _toy_images import LOOPBACK_POLICY, image_world, write_result


def ms_per_batch(root: str, kept: int, batches: int, batch: int, size: int) -> float:
    data.EMBEDDING_TABLES_KEPT = kept
    stream = data.stage_batches(root, ImageView(size, True, False), global_batch=batch, rank=0, world=1, seed=0,
                                total_steps=batches + 1, shuffle_buffer=1000)
    next(stream)  # fills the shuffle buffer
    start = time.perf_counter()
    for _ in range(batches):
        next(stream)
    return (time.perf_counter() - start) / batches * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "data.json")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    world_cfg = image_world(args.images)
    cfg = ImageDataConfig(image_size=128, samples_per_shard=250, processes=2, threads=16, retries=0)
    cascade = cascade_preset("toy")
    default_kept = data.EMBEDDING_TABLES_KEPT
    with tempfile.TemporaryDirectory() as tmp:
        world, root = Path(tmp) / "world", f"{tmp}/images"
        generate_world(world, world_cfg)
        with serve_world(world, port=0) as server:
            rebase_world(world, server.url)
            build_image_dataset([str(world / "laion.parquet")], root, cfg, LOOPBACK_POLICY)
        embed_image_dataset(root, cascade.clip, None, use_gpu=False)
        shards = len(data.read_manifest(root, "images")["shards"])
        runs = {1: [], default_kept: []}
        for _ in range(args.repeats):  # interleaved, so drift in the machine's speed hits both alike
            for kept in runs:
                runs[kept].append(ms_per_batch(root, kept, args.batches, 32, cascade.shape.base_size))
    baseline, kept = min(runs[1]), min(runs[default_kept])
    result = {
        "device": "cpu", "cores": os.cpu_count(), "images": args.images, "shards": shards, "batch": 32,
        "batches": args.batches, "shuffle_buffer": 1000, "tables_kept": default_kept,
        "ms_per_batch_one_table": round(baseline, 1), "ms_per_batch_tables_kept": round(kept, 1),
        "speedup": round(baseline / kept, 2), "runs_ms": {str(k): [round(v, 1) for v in vs] for k, vs in runs.items()},
    }
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
