"""The image flow's driver at scale: peak RSS and rows/s at 1M and 10M synthetic LAION rows.

Metadata in LAION's schema is written to a temp folder in bounded batches. URLs are IP literals, so
no DNS query and no real network is involved: most point at private 10.x addresses the policy refuses,
a small share at a loopback server that answers with a small JPEG (img2dataset fetches those, so its
per-shard outcome files, shard hashes and manifest are part of what is measured), and the filters drop
the rows whose scores, size or caption say so. Host popularity follows Zipf(1.3) over 10.0.0.0/8, so
the number of distinct hosts grows slower than the rows, as in LAION; URL decisions are made once
per distinct scheme://authority, and the distinct hosts are counted in the result. Each run is a fresh subprocess: read + filter + decide
+ download of the allowed share + outcome bookkeeping + manifest, timed inside it; its peak RSS is
the kernel's high-water mark of that process (VmHWM, img2dataset's worker processes not counted).
Sizes alternate (1M, 10M, 1M, 10M, ...) so a slow spell of the machine hits both.

    python benchmarks/bench_scale.py                       # 1M and 10M, 2 rounds -> results/scale.json
    python benchmarks/bench_scale.py --sizes 20000 200000 --repeats 1 --out /tmp/scale.json
"""
from __future__ import annotations

import argparse
import http.server
import io
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent
WORDS = ("a", "red", "blue", "circle", "square", "photo", "of", "small", "large", "dog", "cat", "tree", "house",
         "on", "the", "beach", "at", "night", "green", "field", "with", "sky", "mountain", "river", "car")
BATCH = 500_000
HOST_ZIPF = 1.3
BATCH_ROWS = 262_144  # the flow's batch: memory per batch is the same at every size
ROW_GROUP = 65_536


def _captions(rng: np.random.Generator, n: int = 2000) -> pa.Array:
    lengths = rng.integers(3, 12, n)
    return pa.array([" ".join(rng.choice(WORDS, k)) for k in lengths] + ["", "a nude photo"], pa.string())


def _batch(start: int, n: int, every: int, port: int, rng: np.random.Generator, captions: pa.Array) -> pa.Table:
    """LAION-schema rows start..start+n: every `every`-th row on the loopback server and clean, the
    rest on a private address (refused) unless the filters drop them first."""
    ids = np.arange(start, start + n, dtype=np.int64)
    served = ids % every == 0 if every else np.zeros(n, dtype=bool)
    hosts = (rng.zipf(HOST_ZIPF, n) - 1) % (1 << 24)  # a few popular hosts and a long tail, like LAION's
    octets = [pc.cast(pa.array((hosts >> shift) & 255), pa.string()) for shift in (16, 8, 0)]
    private = pc.binary_join_element_wise("http://10", *octets, ".")
    host = pc.if_else(pa.array(served), pa.scalar(f"http://127.0.0.1:{port}"), private)
    url = pc.binary_join_element_wise(host, pc.cast(pa.array(ids), pa.string()), "/img")
    url = pc.binary_join_element_wise(url, ".jpg", "")
    clean = lambda values, good: pa.array(np.where(served, good, values))  # noqa: E731 - local shorthand
    return pa.table({
        "SAMPLE_ID": pa.array(ids), "URL": url,
        "TEXT": pc.if_else(pa.array(served), pa.scalar("a red circle"),
                           captions.take(pa.array(rng.integers(0, len(captions), n)))),
        "HEIGHT": clean(rng.integers(16, 1024, n), 256), "WIDTH": clean(rng.integers(16, 1024, n), 256),
        "LICENSE": pa.nulls(n, pa.string()), "NSFW": pa.array(np.full(n, "UNLIKELY")),
        "similarity": clean(rng.uniform(0.2, 0.4, n), 0.3),
        "punsafe": clean(rng.uniform(0.0, 0.6, n), 0.0), "pwatermark": clean(rng.uniform(0.0, 0.55, n), 0.0),
    })


def write_metadata(path: Path, rows: int, every: int, port: int, seed: int = 0) -> None:
    """`rows` LAION-schema rows to one parquet file, BATCH rows at a time (bounded memory)."""
    rng = np.random.default_rng(seed)
    captions = _captions(rng)
    writer = None
    for start in range(0, rows, BATCH):
        table = _batch(start, min(BATCH, rows - start), every, port, rng, captions)
        writer = writer or pq.ParquetWriter(path, table.schema)
        writer.write_table(table, row_group_size=ROW_GROUP)
    writer.close()


class _Jpeg(http.server.BaseHTTPRequestHandler):
    body = b""

    def do_GET(self):  # noqa: N802 - stdlib name
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


def _jpeg() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (48, 48), (200, 30, 30)).save(buf, "JPEG")
    return buf.getvalue()


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def one_run(meta: str, out: str, fetches: bool = True) -> dict:
    """The measured part, in the process that runs it: the flow over `meta` into `out`."""
    from pipelines.config import ImageDataConfig
    from pipelines.flows.images import build_image_dataset
    from pipelines.safety import UrlPolicy

    if fetches:  # the flow imports img2dataset to fetch: counted in the baseline, not as growth
        import img2dataset  # noqa: F401

    # Larger batches than the default: each plan batch's fetched rows start a shard of their own, and
    # img2dataset's cost per shard (seconds on a loaded 2-core machine) would dwarf the few rows fetched.
    cfg = ImageDataConfig(image_size=32, samples_per_shard=1000, processes=2, threads=16, retries=0,
                          batch_rows=BATCH_ROWS)
    # Politeness is not what is measured: one loopback host serves every fetched row.
    policy = UrlPolicy(allow_public=False, allow_networks=["127.0.0.1/32"], timeout_s=10.0, host_rate=10_000.0,
                       host_concurrency=64)
    imported = _status_kib("VmRSS")
    start = time.perf_counter()
    manifest = build_image_dataset([meta], out, cfg, policy)
    seconds = time.perf_counter() - start
    plan = json.loads(Path(out, "_work", "plan.json").read_text())
    return {"rows": manifest["rows"], "seconds": round(seconds, 2), "rows_per_s": round(manifest["rows"] / seconds),
            "origins_decided": plan["origins_decided"], "fetched": plan["allowed"],
            "driver_peak_rss_mb": round(_status_kib("VmHWM") / 1024, 1),
            "ru_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "rss_after_imports_mb": round(imported / 1024, 1),
            "driver_growth_mb": round((_status_kib("VmHWM") - imported) / 1024, 1), "shards": len(manifest["shards"]),
            "counts": manifest["counts"]}


def _child(meta: Path, out: Path, every: int) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]),
           "NO_ALBUMENTATIONS_UPDATE": "1"}
    proc = subprocess.run([sys.executable, str(Path(__file__)), "--one", str(meta), str(out), str(every)], env=env,
                          capture_output=True, text=True, cwd=HERE.parent, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        raise RuntimeError(f"run on {meta} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(lines[-1])


def _summary(runs: list[dict], sizes: list[int]) -> dict:
    per = {n: [r for r in runs if r["rows"] == n] for n in sizes}
    keys = ("driver_peak_rss_mb", "driver_growth_mb", "rows_per_s", "seconds")
    med = {n: {k: statistics.median(r[k] for r in per[n]) for k in keys} for n in sizes if per[n]}
    small, big = sizes[0], sizes[-1]
    if small not in med or big not in med:
        return {"sizes": sizes, "median": {str(n): v for n, v in med.items()}}
    ratio = lambda key: round(med[big][key] / max(med[small][key], 1e-9), 3)  # noqa: E731 - local shorthand
    return {"sizes": sizes, "median": {str(n): med[n] for n in sizes}, "driver_rss_ratio": ratio("driver_peak_rss_mb"),
            "driver_growth_ratio": ratio("driver_growth_mb"), "rows_per_s_ratio": ratio("rows_per_s")}


NOTES = ("Reproduce: `python benchmarks/run_all.py --only scale` (or `python benchmarks/bench_scale.py`; ~6 min, "
         "~0.6 GB of temp files). Synthetic LAION-schema metadata written in bounded batches, then read + filter + "
         "decide + download + outcome bookkeeping + manifest by `build_image_dataset` in a fresh process per run. URLs "
         "are IP literals (no DNS, no outside network): hosts drawn Zipf(1.3) over 10.0.0.0/8 (refused by the policy), "
         "one row in 1,000 on a loopback server answering a small JPEG, fetched by img2dataset through the egress "
         "gate (so shard parts, hashes and the manifest's shard list are measured). Peak RSS: the driver's VmHWM "
         "(img2dataset's workers not counted); ~700 MB of it is the baseline after imports at both sizes. Sizes "
         "alternated 1M, 10M, 10M, 1M; medians. rows/s rises with size: decisions are made once per distinct "
         "scheme://authority, and Zipf hosts repeat more in more rows.")


def _result(runs: list[dict], sizes: list[int], every: int) -> dict:
    return {"benchmark": "scale", "served_every": every, "cpus": os.cpu_count(),
            "load_average": os.getloadavg(), **_summary(runs, sorted(sizes)),
            "goals": {"driver_rss_ratio": "<= 1.3", "rows_per_s_ratio": ">= 0.9"}, "notes": NOTES, "runs": runs}


def run(sizes: list[int], repeats: int, every: int, out: Path) -> dict:
    """Write the metadata once per size, then alternate the sizes `repeats` times, each run in a fresh
    process; the result file is rewritten after every run."""
    _Jpeg.body = _jpeg()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Jpeg)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    runs: list[dict] = []
    try:
        with tempfile.TemporaryDirectory(prefix="mav-scale-") as tmp:
            metas = {n: Path(tmp) / f"laion-{n}.parquet" for n in sizes}
            for n, meta in metas.items():
                write_metadata(meta, n, every, server.server_address[1])
            for round_ in range(repeats):
                for n in sizes if round_ % 2 == 0 else sizes[::-1]:
                    target = Path(tmp) / f"out-{n}-{round_}"
                    runs.append(_child(metas[n], target, every) | {"round": round_})
                    subprocess.run(["rm", "-rf", str(target)], check=True)
                    print(json.dumps(runs[-1]), flush=True)
                    out.write_text(json.dumps(_result(runs, sizes, every), indent=2))
    finally:
        server.shutdown()
        server.server_close()
    return _result(runs, sizes, every)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs=2, default=[1_000_000, 10_000_000])
    parser.add_argument("--repeats", type=int, default=2, help="rounds over both sizes, alternating")
    parser.add_argument("--every", type=int, default=1000,
                        help="one row in this many on the loopback server (0: none, img2dataset is not run)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "scale.json")
    parser.add_argument("--one", nargs=3, metavar=("META", "OUT", "EVERY"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(one_run(args.one[0], args.one[1], args.one[2] != "0")), flush=True)
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = run(args.sizes, args.repeats, args.every, args.out)
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
