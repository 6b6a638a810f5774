"""Run every benchmark, each writing benchmarks/results/<name>.json, then summarise them in BENCHMARKS.md.

    python benchmarks/run_all.py                 # all, then the summary
    python benchmarks/run_all.py --only decode   # one
    python benchmarks/run_all.py --summarise     # rewrite BENCHMARKS.md from the results already there

Each benchmark measures ratios against a baseline inside the same run, so figures from different
machines are comparable as ratios, not as absolute times.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
BENCHES = {  # name -> (script, what the ratio compares)
    "pseudo3d": ("bench_pseudo3d.py", "full 3D conv / attention over factorised pseudo-3D (FLOPs and CPU time)"),
    "decode": ("bench_decode.py", "16-frame clip decoding: decord frames/s over PyAV frames/s"),
    "images": ("bench_images.py", "image flow vs bare img2dataset on the same loopback-served toy images"),
    "train": ("bench_train.py", "tiny decoder samples/s: Ray Train over plain PyTorch, same process count"),
    "sampling": ("bench_sampling.py", "seconds per cascade stage and peak memory, tiny and toy presets"),
    "data": ("bench_data.py", "image stages' data path: ms per batch with the last shards' embeddings tables "
             "kept over one table"),
    "loader": ("bench_loader.py", "input path per stage: loader samples/s (2 DataLoader workers) over training-step "
               "samples/s (toy preset, CPU), and loader workers a paper-run GPU needs"),
    "scale": ("bench_scale.py", "the image flow's driver at 10M synthetic LAION rows over 1M: peak RSS and rows/s"),
    "curation": ("bench_curation.py", "precision and recall of the video curation scorers against the toy world's "
                 "planted defects"),
}


def run(names: list[str]) -> dict[str, int]:
    codes = {}
    for name in names:
        script = HERE / BENCHES[name][0]
        if not script.exists():
            print(f"[{name}] {script.name} not present, skipped")
            continue
        print(f"[{name}] running {script.name}", flush=True)
        codes[name] = subprocess.call([sys.executable, str(script), "--out", str(RESULTS / f"{name}.json")])
    return codes


def _rows(name: str, data: dict) -> list[str]:
    if name == "pseudo3d":
        return [f"| {r['layer']} | {r['flops_ratio']:.1f}x | {r['time_ratio']:.1f}x |" for r in data.get("layers", [])]
    if name == "decode":
        return [f"| {r['fps']} fps | {r['decord_frames_per_s']} | {r['pyav_frames_per_s']} | "
                f"{r['decord_over_pyav']:.2f}x |" for r in data.get("rows", [])]
    if name == "images":
        b, f = data["bare_img2dataset"], data["flow"]
        return [f"| bare img2dataset | {b['images_per_s']} | {b['cpu_s_per_image']} |",
                f"| image flow (filter + URL decisions + egress proxy + outcomes) | {f['images_per_s']} | "
                f"{f['cpu_s_per_image']} |",
                f"| ratio flow/bare | {data['flow_over_bare_throughput']:.2f}x throughput | "
                f"{data['flow_over_bare_cpu_per_image']:.2f}x CPU per image |"]
    if name == "train":
        r, p = data["ray_train"], data["plain_pytorch"]
        return [f"| plain PyTorch loop | {p['samples_per_s']} |",
                f"| Ray Train (TorchTrainer) | {r['samples_per_s']} |",
                f"| ratio Ray/plain ({data['workers']} worker, {data['steps']} steps, batch {data['global_batch']}) | "
                f"{data['ray_over_plain_samples_per_s']:.3f} |"]
    if name == "sampling":
        rows = []
        for preset, p in data.get("presets", {}).items():
            for stage, st in p.get("stages", {}).items():
                rows.append(f"| {preset} | {stage} | {st['steps']} | {st['seconds']:.2f} | {st['peak_mem_mb']} | "
                            f"{'x'.join(str(n) for n in st['output_shape'])} |")
        return rows
    if name == "data":
        return [f"| one table (the current shard's) | {data['ms_per_batch_one_table']} |",
                f"| last {data['tables_kept']} tables kept | {data['ms_per_batch_tables_kept']} |",
                f"| speed-up ({data['images']} images in {data['shards']} shards, batch {data['batch']}, "
                f"shuffle buffer {data['shuffle_buffer']}) | {data['speedup']:.2f}x |"]
    if name == "loader":
        return _loader_rows(data)
    if name == "scale":
        rows = [f"| {int(n):,} | {m['seconds']:.1f} | {m['rows_per_s']:,.0f} | {m['driver_peak_rss_mb']:.0f} | "
                f"{m['driver_growth_mb']:.0f} |" for n, m in data.get("median", {}).items()]
        return rows + [f"| ratio 10M/1M | | **{data['rows_per_s_ratio']:.2f}x** (goal >= 0.9) | "
                       f"**{data['driver_rss_ratio']:.2f}x** (goal <= 1.3) | {data['driver_growth_ratio']:.2f}x |"]
    if name == "curation":
        return [f"| {stage} | {s['precision']:.3f} | {s['recall']:.3f} | {s['tp'] + s['fn']} | {s['clips_per_s']} |"
                for stage, s in data.get("stages", {}).items()]
    return [f"| {k} | {json.dumps(v)[:120]} |" for k, v in data.items() if not isinstance(v, (list, dict))]


def _loader_rows(data: dict) -> list[str]:
    rows = [f"| {stage} (toy, batch {s['batch']}) | {s['step_samples_per_s']} | {s['loader_inline_samples_per_s']} | "
            f"{s['loader_2_workers_samples_per_s']} | {s['loader_2_workers_over_step']:.2f}x |"
            for stage, s in data.get("stages", {}).items()]
    rows += ["", "| stage (paper sizes, 8 x H100 80GB) | GPU step s | GPU samples/s | one worker's samples/s | "
             "workers per GPU |", "|---|---:|---:|---:|---:|"]
    rows += [f"| {stage} | {g['gpu_step_s']} | {g['gpu_samples_per_s']} | {g['worker_samples_per_s']} | "
             f"{g['workers_per_gpu']} |" for stage, g in data.get("paper_gpu", {}).items()]
    return rows


HEADERS = {
    "train": "| run | samples/s |\n|---|---:|",
    "sampling": "| preset | stage | steps | seconds | peak memory (MB) | output shape |\n|---|---|---:|---:|---:|---|",
    "images": "| run | images/s | CPU-s per image |\n|---|---:|---:|",
    "pseudo3d": "| layer (paper decoder size, 16 frames) | FLOPs full/factorised | CPU time full/factorised |"
                "\n|---|---:|---:|",
    "data": "| embeddings tables kept | ms per batch |\n|---|---:|",
    "decode": "| target fps | decord frames/s | PyAV frames/s | decord/PyAV |\n|---|---:|---:|---:|",
    "loader": "| stage | step samples/s | loader inline samples/s | loader 2 workers samples/s | loader/step |"
              "\n|---|---:|---:|---:|---:|",
    "scale": "| rows | s | rows/s | driver peak RSS MB | growth over imports MB |\n|---:|---:|---:|---:|---:|",
    "curation": "| stage | precision | recall | positives | clips/s (one core) |\n|---|---:|---:|---:|---:|",
}


def summarise() -> str:
    lines = ["# Benchmarks", "",
             "Written by `benchmarks/run_all.py` from `benchmarks/results/*.json` (run it with `make bench`).",
             "Every figure is a ratio against a baseline measured in the same run on the same machine.", ""]
    for name, (script, what) in BENCHES.items():
        path = RESULTS / f"{name}.json"
        lines += [f"## {name}: {what}", ""]
        if not path.exists():
            lines += [f"Not run yet (`python benchmarks/{script}`).", ""]
            continue
        data = json.loads(path.read_text())
        stamp = dt.datetime.fromtimestamp(path.stat().st_mtime, dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        lines += [f"Source: `benchmarks/results/{name}.json` ({stamp}; device {data.get('device', 'cpu')}).", ""]
        if name in HEADERS:
            lines.append(HEADERS[name])
        else:
            lines += ["| field | value |", "|---|---|"]
        lines += _rows(name, data) + [""]
        if data.get("notes"):
            lines += [str(data["notes"]), ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=sorted(BENCHES), action="append")
    parser.add_argument("--summarise", action="store_true", help="only rewrite BENCHMARKS.md")
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    codes = {} if args.summarise else run(args.only or list(BENCHES))
    (HERE.parent / "BENCHMARKS.md").write_text(summarise())
    print(f"wrote {HERE.parent / 'BENCHMARKS.md'}")
    failed = [n for n, c in codes.items() if c != 0]
    if failed:
        print(f"benchmarks that failed: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
