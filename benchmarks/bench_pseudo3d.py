"""Why pseudo-3D: FLOPs and wall time of factorised (2D + 1D) layers against full 3D ones at the paper
decoder's widths, and (--train-step, CUDA only) the paper decoder's and Dt's training step.

    python benchmarks/bench_pseudo3d.py [--out PATH] [--device cuda] [--repeats N] [--train-step]

Layers: one ConvP3D (3x3 conv + kernel-3 temporal conv) vs a 3x3x3 Conv3d; spatial + temporal attention
vs one attention over all F*H*W tokens. FLOPs come from torch.utils.flop_counter.FlopCounterMode; ratios
are full / factorised. Results go to benchmarks/results/pseudo3d.json and a markdown table is printed.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.config import CascadeConfig, cascade_preset  # noqa: E402
from model.layers import Attention, PseudoConv3d, TemporalAttention, fold_frames  # noqa: E402
from model.networks import count_parameters  # noqa: E402
from model.unet import UNet  # noqa: E402

FRAMES = 16
CASES = [(256, 32), (512, 16)]  # (channels, feature-map side) of the paper decoder's attention levels
HEAD_DIM = 64
aten = torch.ops.aten


def _cpu_sdpa(q, k, v, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(q, k, v)


def _cpu_sdpa_backward(grad, q, k, v, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad, q, k, v)


# The counter knows the CUDA attention kernels but not CPU flash attention; count it the same way.
CPU_SDPA = {aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward}


def count_flops(fn: Callable[[], object]) -> int:
    with FlopCounterMode(display=False, custom_mapping=CPU_SDPA) as counter:
        fn()
    return counter.get_total_flops()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def wall_time(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median seconds of `repeats` calls after one warm-up call."""
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class FullAttention(nn.Module):
    """Attention over all F*H*W tokens of a video at once: what AttnP3D factorises."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        self.attn = Attention(channels, HEAD_DIM)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # (B, F*H*W, C)
        return tokens + self.attn(self.norm(tokens))


class FactorisedAttention(nn.Module):
    """Spatial attention per frame, then temporal attention per position (paper eq. 3)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        self.spatial = Attention(channels, HEAD_DIM)
        self.temporal = TemporalAttention(channels, HEAD_DIM)

    def forward(self, tokens: torch.Tensor, frames: int) -> torch.Tensor:  # (B*F, H*W, C)
        tokens = tokens + self.spatial(self.norm(tokens))
        return self.temporal(tokens, frames)


def _pair(name: str, full: Callable[[], object], factorised: Callable[[], object], device: torch.device,
          repeats: int) -> dict:
    with torch.no_grad():
        row = {"layer": name, "full_flops": count_flops(full), "factorised_flops": count_flops(factorised),
               "full_s": wall_time(full, device, repeats), "factorised_s": wall_time(factorised, device, repeats)}
    row["flops_ratio"] = row["full_flops"] / row["factorised_flops"]
    row["time_ratio"] = row["full_s"] / row["factorised_s"]
    return row


def layer_rows(device: torch.device, repeats: int) -> list[dict]:
    rows = []
    for channels, side in CASES:
        torch.manual_seed(0)
        video = torch.randn(1, channels, FRAMES, side, side, device=device)  # (B, C, F, H, W)
        conv_p3d = PseudoConv3d(channels, channels, temporal=True).to(device)
        conv_3d = nn.Conv3d(channels, channels, 3, padding=1).to(device)
        name = f"conv C={channels} {FRAMES}x{side}x{side}"
        rows.append(_pair(name, lambda: conv_3d(video), lambda: conv_p3d(video), device, repeats))
        per_frame = fold_frames(video).flatten(2).transpose(1, 2).contiguous()  # (B*F, H*W, C)
        all_tokens = per_frame.reshape(1, FRAMES * side * side, channels)  # (B, F*H*W, C)
        full, factorised = FullAttention(channels).to(device), FactorisedAttention(channels).to(device)
        name = f"attention C={channels} {FRAMES}x{side}x{side}"
        rows.append(_pair(name, lambda: full(all_tokens), lambda: factorised(per_frame, FRAMES), device, repeats))
    return rows


def matmul_tflops(device: torch.device, n: int = 8192, repeats: int = 20) -> float:
    """Measured bf16 matmul throughput: the ceiling the training step is compared to."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    seconds = wall_time(lambda: a @ b, device, repeats)
    return 2 * n**3 / seconds / 1e12


def train_step_rows(device: torch.device, preset: str, batches: dict[str, int], repeats: int,
                    grad_checkpointing: bool = False) -> list[dict]:
    """One AdamW step (bf16 autocast, SDPA) of the decoder D on images and Dt on 16-frame videos.
    A stage that runs out of GPU memory is reported as such; the others still run."""
    cfg = cascade_preset(preset)
    rows = []
    for stage, batch in batches.items():
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        try:
            rows.append(_train_step_row(device, cfg, stage, batch, repeats, grad_checkpointing))
        except torch.cuda.OutOfMemoryError:
            rows.append({"stage": stage, "batch": batch, "error": "out of GPU memory"})
    return rows


def _train_step_row(device: torch.device, cfg: CascadeConfig, stage: str, batch: int, repeats: int,
                    grad_checkpointing: bool) -> dict:
    torch.manual_seed(0)
    net_cfg = getattr(cfg, stage).net.model_copy(update={"grad_checkpointing": grad_checkpointing})
    net = UNet(net_cfg).to(device).train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=device.type == "cuda")
    frames = (cfg.shape.frames,) if net_cfg.temporal else ()
    size = cfg.shape.base_size
    x = torch.randn(batch, net_cfg.in_channels, *frames, size, size, device=device)  # (B, C, [F,] H, W)
    target = torch.randn_like(x)
    t = torch.randint(0, 1000, (batch,), device=device)
    cond = torch.randn(batch, net_cfg.cond_dim, device=device)
    kw = {"fps": torch.full((batch,), 8.0, device=device)} if frames else {}

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = nn.functional.mse_loss(net(x, t, cond, **kw).float(), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    flops = count_flops(step)
    seconds = wall_time(step, device, repeats)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return {"stage": stage, "batch": batch, "input": list(x.shape), "grad_checkpointing": grad_checkpointing,
            "params_m": count_parameters(net) / 1e6, "step_s": seconds, "peak_mem_gib": peak,
            "step_tflop": flops / 1e12, "achieved_tflops": flops / seconds / 1e12}


def markdown(rows: list[dict]) -> str:
    lines = ["| layer | full GFLOP | factorised GFLOP | FLOPs ratio | full ms | factorised ms | time ratio |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['layer']} | {r['full_flops'] / 1e9:.1f} | {r['factorised_flops'] / 1e9:.1f} | "
                     f"{r['flops_ratio']:.1f}x | {r['full_s'] * 1e3:.1f} | {r['factorised_s'] * 1e3:.1f} | "
                     f"{r['time_ratio']:.1f}x |")
    return "\n".join(lines)


def train_markdown(rows: list[dict], baseline: float) -> str:
    lines = [f"bf16 matmul baseline: {baseline:.0f} TFLOP/s", "",
             "| stage | batch | params (M) | step s | peak GiB | TFLOP/step | TFLOP/s | of baseline |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['stage']} | {r['batch']} | {r['error']} | | | | | |")
            continue
        lines.append(f"| {r['stage']} | {r['batch']} | {r['params_m']:.0f} | {r['step_s']:.3f} | "
                     f"{r['peak_mem_gib']:.1f} | {r['step_tflop']:.2f} | {r['achieved_tflops']:.0f} | "
                     f"{r['achieved_tflops'] / baseline:.0%} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "pseudo3d.json")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per layer (default 1 CPU, 10 CUDA)")
    parser.add_argument("--train-step", action="store_true", help="paper decoder and Dt training step (CUDA only)")
    parser.add_argument("--decoder-batch", type=int, default=16, help="64x64 images")
    parser.add_argument("--temporal-batch", type=int, default=1, help="videos of 16 frames")
    parser.add_argument("--grad-checkpointing", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda given but no CUDA device is available")
    if args.train_step and device.type != "cuda":
        parser.error("--train-step runs the paper-size decoder and Dt: it needs --device cuda and a GPU")
    repeats = args.repeats or (10 if device.type == "cuda" else 1)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    result: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
                    or "cpu", "torch": torch.__version__, "threads": torch.get_num_threads(), "frames": FRAMES,
                    "repeats": repeats, "layers": layer_rows(device, repeats)}
    print(markdown(result["layers"]))
    if args.train_step:
        result["matmul_bf16_tflops"] = matmul_tflops(device)
        batches = {"decoder": args.decoder_batch, "temporal": args.temporal_batch}
        result["train_step"] = train_step_rows(device, "paper", batches, 5, args.grad_checkpointing)
        print()
        print(train_markdown(result["train_step"], result["matmul_bf16_tflops"]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
