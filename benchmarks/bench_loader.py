"""Does the input path keep the step busy? Per stage (decoder, temporal, sr_low): samples/s the loader
(`training.data.stage_batches`) delivers against samples/s the training step consumes, on this CPU, and
the loader workers a GPU of the paper run needs.

    python benchmarks/bench_loader.py [--repeats 3] [--out benchmarks/results/loader.json]

Loader: the toy preset's view sizes and batch, shards built here (decoder: 256 px JPEGs with an
embeddings parquet; video stages: 448x256 24 fps mp4s with stored frame embeddings from a seeded
from-scratch CLIP), inline (0 workers) and with 2 DataLoader workers; the batches before each worker
has delivered one (process start, shuffle buffer) are excluded. Step: the toy stage's network, its loss
(training/stages.py) on a batch of that shape, backward and AdamW, fp32. The two sides alternate
`repeats` times (the machine is shared) and the median of each is kept; they are measured apart, so the
ratio says whether decoding would keep up if it had cores of its own, as loader workers do on a GPU node.

GPU side: `training.plan.plan_cascade` (what `mav plan` prints) gives the step time of the paper preset
on 8 x 80 GB H100s; a GPU then consumes (batch / 8) / step_time samples/s. One loader worker's rate at the
paper's sizes is measured here inline (one process = one worker) on the same sources; workers per GPU =
GPU rate / that rate, rounded up.
"""
from __future__ import annotations

import argparse
import io
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.config import cascade_preset  # noqa: E402
from model.networks import build_network  # noqa: E402
from training.config import train_preset  # noqa: E402
from training.data import stage_batches  # noqa: E402
from training.plan import plan_cascade  # noqa: E402
from training.stages import SampleRng, Stage, stage_spec  # noqa: E402

from _toy_images import write_result  # noqa: E402

STAGES = ("decoder", "temporal", "sr_low")
FFMPEG = "/usr/bin/ffmpeg"
GIB = 1024 ** 3
NOTES = ("Reproduce: `python benchmarks/run_all.py --only loader` (or `python benchmarks/bench_loader.py`). "
         "Medians of 3 alternated runs on a 2-core CPU shared with other jobs. paper_gpu: the plan's step time on "
         "8 x H100 80GB, global batch 256; one worker's rate measured on one core of this CPU at the paper's view "
         "sizes from 256 px JPEGs and 448x256 24 fps mp4s.")


def write_manifest(root: Path, kind: str, shards: list[tuple[str, int]]) -> None:
    import json

    (root / "manifest.json").write_text(json.dumps({"kind": kind, "format": 1, "shards": [
        {"name": n, "samples": k} for n, k in shards]}))


def image_dataset(root: Path, n: int, size: int, dim: int) -> Path:
    """256 px JPEGs of random colours with a random embeddings parquet, in 2 shards."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import webdataset as wds
    from PIL import Image, ImageDraw

    (root / "shards").mkdir(parents=True)
    (root / "embeddings").mkdir()
    rng, written = np.random.default_rng(0), []
    for s in range(2):
        keys = []
        with wds.TarWriter(str(root / f"shards/{s:05d}.tar")) as sink:
            for i in range(n // 2):
                img = Image.new("RGB", (size, size), tuple(int(c) for c in rng.integers(0, 256, 3)))
                ImageDraw.Draw(img).ellipse((size // 4, size // 4, 3 * size // 4, size - 8), fill=(200, 40, 40))
                buf = io.BytesIO()
                img.save(buf, "JPEG", quality=90)
                keys.append(f"{s:05d}{i:04d}")
                sink.write({"__key__": keys[-1], "jpg": buf.getvalue(), "txt": b"a shape"})
        emb = pa.FixedSizeListArray.from_arrays(pa.array(rng.standard_normal(len(keys) * dim, np.float32)), dim)
        pq.write_table(pa.table({"key": keys, "image_emb": emb, "text_emb": emb}), root / f"embeddings/{s:05d}.parquet")
        written.append((f"shards/{s:05d}.tar", len(keys)))
    write_manifest(root, "images", written)
    return root


def video_dataset(root: Path, n: int, clip_cfg) -> Path:
    """448x256 24 fps 4 s mp4s (ffmpeg test patterns) in 2 shards, with stored frame embeddings."""
    import webdataset as wds

    from pipelines.embed_videos import embed_video_dataset

    (root / "shards").mkdir(parents=True)
    sources, written = ["testsrc", "testsrc2", "rgbtestsrc", "smptebars"], []
    for s in range(2):
        with wds.TarWriter(str(root / f"shards/{s:05d}.tar")) as sink:
            for i in range(n // 2):
                out = root / "clip.mp4"
                subprocess.run([FFMPEG, "-y", "-loglevel", "error", "-f", "lavfi", "-i",
                                f"{sources[i % 4]}=size=448x256:rate=24", "-t", "4", "-c:v", "libx264", "-g", "24",
                                "-pix_fmt", "yuv420p", str(out)], check=True)
                sink.write({"__key__": f"{s:05d}{i:04d}", "mp4": out.read_bytes()})
        written.append((f"shards/{s:05d}.tar", n // 2))
    write_manifest(root, "videos", written)
    embed_video_dataset(str(root), clip_cfg.model_copy(update={"weights_path": None}))
    return root


def loader_rate(root: Path, view, batch: int, workers: int, batches: int) -> float:
    """Samples/s stage_batches delivers once each loader worker has handed over its first batch."""
    it = stage_batches(str(root), view, global_batch=batch, rank=0, world=1, seed=0, total_steps=100,
                       shuffle_buffer=16, loader_workers=workers)
    for _ in range(1 + workers):  # process start-up is paid once per run, not per step
        next(it)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    rate = batch * batches / (time.perf_counter() - start)
    it.close()
    return rate


def step_rate(stage: Stage, net: torch.nn.Module, opt: torch.optim.Optimizer, batch: dict, steps: int) -> float:
    """Samples/s of loss + backward + AdamW on one fixed batch."""
    n = len(batch["seed"])
    start = time.perf_counter()
    for _ in range(steps):
        loss = stage.loss(net, batch, SampleRng(batch["seed"]))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return n * steps / (time.perf_counter() - start)


def gpu_need(stages: tuple[str, ...], roots: dict[str, Path]) -> dict[str, dict]:
    """Per stage at the paper's sizes: GPU samples/s from the plan, one worker's decode rate, workers needed."""
    paper, train = cascade_preset("paper"), train_preset("paper")
    plans = {p.stage: p for p in plan_cascade(paper, train, stages, 8, 80 * GIB)}
    out = {}
    for name in stages:
        per_gpu = train.stage(name).batch_size / 8
        gpu_rate = per_gpu / plans[name].step_time_s
        view = stage_spec(name).view(paper)
        worker = loader_rate(roots[stage_spec(name).data], view, 8, 0, 4)
        out[name] = {"view": str(view), "gpu_step_s": round(plans[name].step_time_s, 3),
                     "gpu_samples_per_s": round(gpu_rate, 1), "worker_samples_per_s": round(worker, 1),
                     "workers_per_gpu": math.ceil(gpu_rate / worker)}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "loader.json")
    args = parser.parse_args()
    toy, train = cascade_preset("toy"), train_preset("toy")
    result: dict = {"device": "cpu", "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "preset": "toy", "repeats": args.repeats, "stages": {}}
    with tempfile.TemporaryDirectory(prefix="bench-loader-") as tmp:
        roots = {"images": image_dataset(Path(tmp) / "images", 64, 256, toy.clip.embed_dim),
                 "videos": video_dataset(Path(tmp) / "videos", 8, toy.clip)}
        for name in STAGES:
            spec, batch_size = stage_spec(name), train.stage(name).batch_size
            root, view = roots[spec.data], spec.view(toy)
            torch.manual_seed(0)
            stage, net = Stage(spec, toy, clip=None), build_network(name, toy)
            opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
            batch = next(stage_batches(str(root), view, global_batch=batch_size, rank=0, world=1, seed=0,
                                       total_steps=100))
            step_rate(stage, net, opt, batch, 1)  # warm-up: allocator, AdamW state
            runs: dict[str, list[float]] = {"step": [], "loader_0": [], "loader_2": []}
            for _ in range(args.repeats):  # alternated, so drift in the machine's speed hits every side alike
                runs["step"].append(step_rate(stage, net, opt, batch, 1))
                for w in (0, 2):
                    batches = 6 if spec.data == "images" else 3
                    runs[f"loader_{w}"].append(loader_rate(root, view, batch_size, w, batches))
            med = {k: statistics.median(v) for k, v in runs.items()}
            result["stages"][name] = {
                "batch": batch_size, "view": str(view), "step_samples_per_s": round(med["step"], 1),
                "loader_inline_samples_per_s": round(med["loader_0"], 1),
                "loader_2_workers_samples_per_s": round(med["loader_2"], 1),
                "loader_2_workers_over_step": round(med["loader_2"] / med["step"], 2),
                "runs": {k: [round(x, 1) for x in v] for k, v in runs.items()}}
            print(name, result["stages"][name], flush=True)
        result["paper_gpu"] = gpu_need(STAGES, roots)
    result["notes"] = NOTES
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
