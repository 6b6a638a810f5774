"""Image flow throughput against bare img2dataset on the same loopback-served toy images, same cores.

Both download the same kept rows (the flow's filter runs first; bare img2dataset gets the kept rows
directly, with no egress proxy). Reported: images/s and CPU-seconds per image (this process and its
children), and the ratio flow/bare. The flow's extra cost is the filter, the URL decisions, the
egress proxy on every request and the outcome bookkeeping.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

from pipelines.config import ImageDataConfig
from pipelines.flows.images import build_image_dataset
from pipelines.images.filters import filter_metadata, split_kept
from pipelines.world import generate_world, rebase_world, serve_world
from training.data import read_manifest

from _toy_images import LOOPBACK_POLICY, image_world, write_result


def _cpu() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _measure(fn) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), _cpu()
    fn()
    return time.perf_counter() - wall, _cpu() - cpu


def _bare(url_list: str, out: str, cfg: ImageDataConfig) -> None:
    import img2dataset

    with contextlib.redirect_stdout(io.StringIO()):
        img2dataset.download(url_list=url_list, input_format="parquet", url_col="URL", caption_col="TEXT",
                             output_format="webdataset", output_folder=out, image_size=cfg.image_size,
                             resize_mode="center_crop", processes_count=cfg.processes, thread_count=cfg.threads,
                             number_sample_per_shard=cfg.samples_per_shard, timeout=4, retries=0,
                             enable_wandb=False, extract_exif=False, disallowed_header_directives=[])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "images.json")
    parser.add_argument("--images", type=int, default=1500)
    parser.add_argument("--repeats", type=int, default=3, help="rounds, the two sides alternated (medians)")
    args = parser.parse_args()
    world_cfg = image_world(args.images)
    cfg = ImageDataConfig(image_size=64, samples_per_shard=500, processes=2, threads=16, retries=0)
    runs: dict[str, list[tuple[float, float]]] = {"bare": [], "flow": []}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "world"
        generate_world(root, world_cfg)
        with serve_world(root, port=0) as server:
            rebase_world(root, server.url)
            kept, _ = split_kept(filter_metadata(pq.read_table(root / "laion.parquet"), cfg.filters))
            pq.write_table(kept.select(["URL", "TEXT"]), Path(tmp) / "kept.parquet")
            sides = {"bare": lambda out: _bare(str(Path(tmp) / "kept.parquet"), out, cfg),
                     "flow": lambda out: build_image_dataset([str(root / "laion.parquet")], out, cfg, LOOPBACK_POLICY)}
            for r in range(args.repeats):
                for side in ("bare", "flow") if r % 2 == 0 else ("flow", "bare"):
                    runs[side].append(_measure(lambda: sides[side](f"{tmp}/{side}-{r}")))
            written = read_manifest(f"{tmp}/flow-0", "images")["counts"]["written"]
    n = len(kept)
    (bare_wall, bare_cpu), (flow_wall, flow_cpu) = (tuple(statistics.median(x) for x in zip(*runs[s]))
                                                    for s in ("bare", "flow"))
    result = {
        "device": "cpu", "cores": os.cpu_count(), "input_rows": args.images, "kept_rows": n, "written": written,
        "processes": cfg.processes, "threads": cfg.threads, "repeats": args.repeats,
        "bare_img2dataset": {"wall_s": round(bare_wall, 2), "images_per_s": round(n / bare_wall, 1),
                             "cpu_s_per_image": round(bare_cpu / n, 4)},
        "flow": {"wall_s": round(flow_wall, 2), "images_per_s": round(n / flow_wall, 1),
                 "cpu_s_per_image": round(flow_cpu / n, 4)},
        "flow_over_bare_throughput": round(bare_wall / flow_wall, 3),
        "flow_over_bare_cpu_per_image": round(flow_cpu / max(bare_cpu, 1e-9), 3),
        "runs_wall_s": {k: [round(w, 2) for w, _ in v] for k, v in runs.items()},
        "notes": "Reproduce: `python benchmarks/bench_images.py` (or `run_all.py --only images`). The flow with "
                 "its egress gate (host limiter on, at the toy world's loopback rate), filter, saved decisions and "
                 "outcome parts, against bare img2dataset on the kept rows with no proxy; same cores, the two "
                 "alternated each round; medians.",
    }
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
