"""What Ray Train costs: samples/s of the tiny decoder stage under Ray Train against the same loop in plain
PyTorch (training.jobs.run_local), with the same number of processes, the same data and settings.

    python benchmarks/bench_train.py [--workers N] [--steps N] [--batch N] [--out PATH]

Both runs execute training/loop.py's `run` on shards built here (coloured shapes, embeddings from a
random tiny CLIP) with an MLflow sqlite store, one checkpoint at the end and no previews. Throughput is
the loop's own steady-state figure (global samples per second from the end of the first step to the
last); wall time adds start-up (Ray: controller and worker actors; both: imports, model build).
N > 1 plain workers are torch.multiprocessing processes joined by gloo, as Ray Train joins its workers.
Results go to benchmarks/results/train.json; the ratio Ray / plain is printed. One run each, not a
statistic: on a shared machine expect noise of tens of percent.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from model.config import cascade_preset  # noqa: E402
from training.config import StageTrainConfig, train_preset  # noqa: E402
from training.jobs import fit_stage, job_config, run_local, worker_cpus  # noqa: E402
from training.tracking import MlflowTracker, default_tracking_uri  # noqa: E402

STAGE = "decoder"


def write_dataset(root: Path, samples: int, size: int) -> None:
    """One image shard in img2dataset's layout plus its embeddings parquet (a random tiny CLIP)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import webdataset as wds
    from PIL import Image, ImageDraw

    from model.clip import build_clip, encode_images, encode_text

    (root / "shards").mkdir(parents=True)
    (root / "embeddings").mkdir()
    rng = np.random.default_rng(0)
    keys, pixels, captions = [], [], []
    with wds.TarWriter(str(root / "shards" / "00000.tar")) as sink:
        for i in range(samples):
            colour, background = (tuple(int(c) for c in rng.integers(0, 256, 3)) for _ in range(2))
            img = Image.new("RGB", (size, size), background)
            ImageDraw.Draw(img).ellipse((size // 4, size // 4, 3 * size // 4, 3 * size // 4), fill=colour)
            buf = io.BytesIO()
            img.save(buf, format="JPEG")
            keys.append(f"00000{i:04d}")
            captions.append(f"a shape of colour {colour} on {background}")
            pixels.append(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1))
            sink.write({"__key__": keys[-1], "jpg": buf.getvalue(), "txt": captions[-1]})
    torch.manual_seed(0)
    clip, _, tokenizer = build_clip(cascade_preset("tiny").clip)
    with torch.no_grad():
        image, text = encode_images(clip, torch.stack(pixels)).numpy(), encode_text(clip, tokenizer, captions).numpy()
    dim = image.shape[1]
    pq.write_table(pa.table({"key": keys, "image_emb": pa.FixedSizeListArray.from_arrays(pa.array(image.ravel()), dim),
                             "text_emb": pa.FixedSizeListArray.from_arrays(pa.array(text.ravel()), dim)}),
                   root / "embeddings" / "00000.parquet")
    manifest = {"kind": "images", "inputs_hash": "bench", "shards": [{"name": "shards/00000.tar", "samples": samples}]}
    (root / "manifest.json").write_text(json.dumps(manifest))


def bench_config(args: argparse.Namespace) -> SimpleNamespace:
    train = train_preset("tiny")
    stage = getattr(train, STAGE).model_copy(update={
        "steps": args.steps, "batch_size": args.batch, "num_workers": args.workers, "max_failures": 0,
        "checkpoint_every": args.steps, "log_every": args.steps, "sample_every": args.steps + 1})
    return SimpleNamespace(cascade=cascade_preset("tiny"), train=train.model_copy(update={STAGE: stage}))


def job(cfg: SimpleNamespace, data: Path, run_root: Path, name: str) -> dict:
    uri = default_tracking_uri(str(run_root))
    run_id = MlflowTracker(uri, "bench-train").start(name)
    return job_config(STAGE, cfg, str(data), str(run_root), tracking_uri=uri, experiment="bench-train", run_id=run_id)


def run_ray(cfg: SimpleNamespace, data: Path, run_root: Path) -> dict:
    import ray

    ray.init(num_cpus=max(cfg.train.decoder.num_workers, os.cpu_count() or 1), include_dashboard=False,
             log_to_driver=False)
    config = job(cfg, data, run_root, "ray")
    start = time.perf_counter()
    result = fit_stage(STAGE, config, cfg.train.decoder, run_root / "ray")
    wall = time.perf_counter() - start
    ray.shutdown()
    return {"samples_per_s": round(result.metrics["samples_per_s"], 2), "wall_s": round(wall, 2)}


def _plain_worker(rank: int, world: int, config: dict, folder: str, port: int, out: str) -> None:
    # As many threads as a Ray Train worker reserves on this machine (training.jobs.worker_cpus).
    torch.set_num_threads(worker_cpus(StageTrainConfig.model_validate(config["train"]), [os.cpu_count() or 1]))
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    metrics = run_local(config, folder)
    if rank == 0:
        Path(out).write_text(json.dumps(metrics))
    if world > 1:
        torch.distributed.destroy_process_group()


def run_plain(cfg: SimpleNamespace, data: Path, run_root: Path) -> dict:
    config, world = job(cfg, data, run_root, "plain"), cfg.train.decoder.num_workers
    out = run_root / "plain-metrics.json"
    start = time.perf_counter()
    if world == 1:
        _plain_worker(0, 1, config, str(run_root / "checkpoints"), 0, str(out))
    else:
        os.environ["OMP_NUM_THREADS"] = "1"  # what Ray sets for 1-CPU workers, before the children import torch
        torch.multiprocessing.spawn(_plain_worker, args=(world, config, str(run_root / "checkpoints"), 29531,
                                                         str(out)), nprocs=world)
    wall = time.perf_counter() - start
    return {"samples_per_s": round(json.loads(out.read_text())["samples_per_s"], 2), "wall_s": round(wall, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=1, help="processes in both runs (default 1)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=8, help="global batch")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "train.json")
    args = parser.parse_args()
    cfg = bench_config(args)
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        data = Path(tmp) / "images"
        write_dataset(data, samples=max(64, args.batch * 4), size=cfg.cascade.shape.base_size)
        plain = run_plain(cfg, data, Path(tmp) / "plain")
        ray_run = run_ray(cfg, data, Path(tmp) / "ray")
    ratio = ray_run["samples_per_s"] / plain["samples_per_s"]
    record = {"stage": STAGE, "preset": "tiny", "workers": args.workers, "steps": args.steps,
              "global_batch": args.batch, "device": "cpu", "machine": platform.machine(),
              "cpus": os.cpu_count(), "torch": torch.__version__, "ray_train": ray_run, "plain_pytorch": plain,
              "ray_over_plain_samples_per_s": round(ratio, 3)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"{STAGE} (tiny, {args.workers} worker(s), batch {args.batch}, {args.steps} steps): "
          f"Ray Train {ray_run['samples_per_s']} samples/s (wall {ray_run['wall_s']} s), "
          f"plain PyTorch {plain['samples_per_s']} samples/s (wall {plain['wall_s']} s); "
          f"ratio Ray/plain = {ratio:.2f}")


if __name__ == "__main__":
    main()
