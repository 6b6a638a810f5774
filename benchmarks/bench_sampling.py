"""Seconds and peak memory of each cascade stage at sampling time, random weights.

    python benchmarks/bench_sampling.py [--presets tiny toy] [--steps 2] [--out PATH]
    python benchmarks/bench_sampling.py --preset paper --device cuda [--steps N | --config-steps]

Every stage runs its configured sampler and guidance with `--steps` steps (the cost is linear in steps;
seconds_per_step is reported so full-length runs can be read off). The paper preset times
16x64x64 -> 76 frames -> 256 -> 768 and needs a GPU. Peak memory: torch.cuda.max_memory_allocated on GPU;
on CPU the peak growth of the process's resident memory during the stage, sampled every 2 ms by a
thread after glibc has returned freed memory to the OS (tracemalloc does not see torch's CPU allocator,
so it would report almost nothing). CPU timings depend on what else runs: the load average is recorded.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.cascade import Cascade, build_cascade  # noqa: E402
from model.cascade_stages import (interpolate_frames, sample_prior, sample_temporal, super_resolve_high,  # noqa: E402
                                  super_resolve_low)
from model.config import CascadeConfig, cascade_preset  # noqa: E402
from model.frames import interpolation_mask, plan_windows, mask_from_indices  # noqa: E402
from model.networks import count_parameters  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PROMPT = "a red circle moving left on a blue background"


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * 4096


def _malloc_trim() -> None:
    """Hand freed heap memory back to the OS, so the next stage's resident growth is its own."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory added while the block runs: CUDA allocator stats, or resident memory polled on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.peak, self._stop = device, 0, threading.Event()

    def _poll(self, start: int) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss_bytes() - start)

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            _malloc_trim()
            self._thread = threading.Thread(target=self._poll, args=(_rss_bytes(),), daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._base
        else:
            self._stop.set()
            self._thread.join()


def _with_steps(cfg: CascadeConfig, steps: int | None) -> CascadeConfig:
    cfg = cfg.model_copy(deep=True)
    if steps is not None:
        for stage in ("prior", "temporal", "interpolation", "sr_low", "sr_high"):
            getattr(cfg, stage).sampler.steps = steps
    return cfg


def _measure(cascade: Cascade, stage: str, fn: Callable[[torch.Generator], torch.Tensor], steps: int,
             results: dict) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    with PeakMemory(cascade.device) as mem:
        start = time.perf_counter()
        with torch.no_grad():
            out = fn(generator)
        if cascade.device.type == "cuda":
            torch.cuda.synchronize(cascade.device)
        seconds = time.perf_counter() - start
    results[stage] = {"seconds": round(seconds, 4), "steps": steps, "seconds_per_step": round(seconds / steps, 4),
                      "peak_mem_mb": round(mem.peak / 2**20, 1), "output_shape": list(out.shape)}
    print(f"  {stage:<14} {seconds:8.2f} s  {mem.peak / 2**20:9.1f} MB  -> {tuple(out.shape)}", flush=True)
    return out


def bench_preset(name: str, device: torch.device, steps: int | None, precision: str | None) -> dict:
    """Build the preset's cascade with random weights and time each stage once."""
    cfg = _with_steps(cascade_preset(name), steps)
    torch.manual_seed(0)
    started = time.perf_counter()
    cascade = build_cascade(cfg, device=device, precision=precision)
    build_s = time.perf_counter() - started
    s = cfg.shape
    print(f"{name}: {s.frames}x{s.base_size}px -> {s.interpolated_frames} frames -> {s.sr_low_size} -> "
          f"{s.sr_high_size} px on {device} ({cascade.precision}), built in {build_s:.1f} s", flush=True)
    known, total = interpolation_mask(s.frames, s.frame_skip)
    windows = len(plan_windows(mask_from_indices(known, total), s.frames))
    fps, stages = 8.0, {}
    emb = _measure(cascade, "prior", lambda g: sample_prior(cascade, [PROMPT], g), cfg.prior.sampler.steps, stages)
    base = _measure(cascade, "temporal", lambda g: sample_temporal(cascade, emb, fps, g),
                    cfg.temporal.sampler.steps, stages)
    fps_out = fps * s.frame_skip
    video = _measure(cascade, "interpolation", lambda g: interpolate_frames(cascade, base, total, emb, fps_out, g),
                     cfg.interpolation.sampler.steps * windows, stages)
    low = _measure(cascade, "sr_low", lambda g: super_resolve_low(cascade, video, emb, fps_out, g),
                   cfg.sr_low.sampler.steps, stages)
    _measure(cascade, "sr_high", lambda g: super_resolve_high(cascade, low, emb, g), cfg.sr_high.sampler.steps, stages)
    return {"shape": s.model_dump(), "interpolated_frames": total, "interpolation_windows": windows,
            "precision": cascade.precision, "build_s": round(build_s, 2),
            "params": {k: count_parameters(v) for k, v in cascade.nets.items()},
            "samplers": {k: getattr(cfg, k).sampler.model_dump() for k in stages},
            "stages": stages, "total_s": round(sum(v["seconds"] for v in stages.values()), 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", "--preset", nargs="+", default=["tiny", "toy"], choices=["tiny", "toy", "paper"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=2, help="sampler steps of every stage (default: %(default)s)")
    parser.add_argument("--config-steps", action="store_true", help="use each stage's configured steps instead")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--out", type=Path, help="default: results/sampling.json (paper: sampling_paper.json)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if "paper" in args.presets and (device.type != "cuda" or not torch.cuda.is_available()):
        parser.error("--preset paper times 16x64x64 -> 76 frames -> 256 -> 768 and needs a GPU: "
                     "run it with --device cuda on a machine with CUDA")
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
              "load_average_start": round(os.getloadavg()[0], 2),
              "steps": None if args.config_steps else args.steps, "presets": {}}
    for name in args.presets:
        report["presets"][name] = bench_preset(name, device, None if args.config_steps else args.steps, args.precision)
    report["load_average_end"] = round(os.getloadavg()[0], 2)
    out = args.out or RESULTS / ("sampling_paper.json" if "paper" in args.presets else "sampling.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
