"""Memory and compute planned before a GPU is booked: each stage's network traced on the `meta` device.

A trace runs one training forward of the real network at batch 1 on meta tensors (no memory, no compute) and
records what autograd saves for backward (`saved_tensors_hooks`, one count per storage, parameters left out)
and the FLOPs (`FlopCounterMode`). Per-block bookkeeping gives the same figure under activation checkpointing
of every U-Net block: what stays outside the blocks, each block's input, and one block's internals live again
while it is recomputed. From those and the optimiser state (fp32 weights, gradients, Adam's two moments, EMA)
`plan_stage` picks, for a cluster, the sharding (DDP, else FSDP when the state does not fit), the checkpointing
(only when needed) and the largest micro-batch that fits, with gradient accumulation making up the stage's
global batch.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as Fn
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode

from model.config import CascadeConfig, UNetConfig
from model.inflate import is_added
from model.networks import build_network
from model.unet import UNetBlock
from training.config import PLANNED_STAGES, StageTrainConfig

GIB = 1024 ** 3
# bf16 dense matmul peak of the GPUs a plan is usually made for (vendor datasheets), FLOP/s.
PEAK_FLOPS = {"h100": 989e12, "h200": 989e12, "a100": 312e12}
RESERVED_BYTES = 3 * GIB  # CUDA context, NCCL buffers and allocator slack kept out of every plan
FRAGMENTATION = 0.10  # share of the remaining memory the caching allocator may lose to fragmentation
OPTIMIZER_BYTES = 8  # AdamW: two fp32 moments per trainable parameter
MIN_MICRO_BATCH = 4  # rows per GPU per forward below which a GPU idles on small kernels
DEFAULT_MFU = 0.35  # model FLOPs utilisation a step-time estimate assumes
# The stages a plan covers: CLIP is open_clip's network, pretrained for real runs.


@dataclass
class Trace:
    """One traced training forward at batch 1 of a stage's network."""

    params: int
    saved_bytes: int  # saved for backward, per sample, no checkpointing
    saved_bytes_checkpointed: int  # the same with every U-Net block checkpointed
    forward_flops: int  # per sample
    saved_fixed: int = 0  # saved once per forward whatever the batch (embeddings of a shared condition)

    def activations(self, batch: int, checkpointed: bool = False) -> int:
        per_sample = self.saved_bytes_checkpointed if checkpointed else self.saved_bytes
        return self.saved_fixed + batch * per_sample


@dataclass
class StagePlan:
    stage: str
    params: int
    state_bytes: int  # per GPU, after sharding
    activation_bytes_per_sample: int  # in the chosen checkpointing mode
    activation_bytes_per_sample_plain: int
    activation_bytes_per_sample_checkpointed: int
    flops_per_sample: int  # forward + backward (+ recompute under checkpointing)
    micro_batch: int = 0
    grad_accum: int = 0
    checkpointing: bool = False
    sharding: str = "ddp"
    peak_bytes: int = 0
    step_time_s: float = 0.0
    fits: bool = False
    why: str = ""
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def stage_inputs(stage: str, cfg: CascadeConfig, device: torch.device, dtype: torch.dtype, batch: int = 1,
                 crop: int | None = None) -> dict[str, torch.Tensor]:
    """The network's training inputs for `batch` samples at the stage's training resolution (what
    training.stages feeds it; `crop`: sr_high's crop side): x, t and the conditions."""
    one = _one_input(stage, cfg, device, dtype, crop)
    return {k: v.expand(batch, *v.shape[1:]).clone() for k, v in one.items()}


def _one_input(stage: str, cfg: CascadeConfig, device: torch.device, dtype: torch.dtype,
               crop: int | None = None) -> dict[str, torch.Tensor]:
    s, d = cfg.shape, cfg.clip.embed_dim
    t = torch.zeros(1, dtype=torch.long, device=device)
    if stage == "prior":
        p = cfg.prior.net
        return {"x_t": torch.zeros(1, p.embed_dim, device=device, dtype=dtype), "t": t,
                "text_emb": torch.zeros(1, p.embed_dim, device=device, dtype=dtype),
                "text_tokens": torch.zeros(1, p.text_len, p.embed_dim, device=device, dtype=dtype),
                "text_mask": torch.ones(1, p.text_len, dtype=torch.bool, device=device)}
    net = getattr(cfg, stage).net
    size = {"sr_low": s.sr_low_size, "sr_high": crop or s.sr_high_size}.get(stage, s.base_size)
    frames = s.frames if net.temporal else None
    shape = (1, net.in_channels + net.extra_in_channels, *(() if frames is None else (frames,)), size, size)
    inputs = {"x": torch.zeros(shape, device=device, dtype=dtype), "t": t,
              "cond_emb": torch.zeros(1, d, device=device, dtype=dtype)}
    if net.temporal and net.fps_cond:
        inputs["fps"] = torch.full((1,), 8.0, device=device, dtype=dtype)
    if net.lowres_cond:
        low = s.base_size if stage == "sr_low" else size * s.sr_low_size // s.sr_high_size
        inputs["lowres"] = torch.zeros(1, net.in_channels, *(() if frames is None else (frames,)), low, low,
                                       device=device, dtype=dtype)
        inputs["noise_level"] = t
    return inputs


class FlashAttention(TorchFunctionMode):
    """Attention through the fused kernel's op, which keeps O(sequence) for backward as the GPU's flash and
    memory-efficient kernels do; on meta tensors `scaled_dot_product_attention` takes the math path, which
    keeps the whole attention matrix."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not Fn.scaled_dot_product_attention:
            return func(*args, **kwargs)
        q, k, v, *rest = args
        mask = kwargs.get("attn_mask", rest[0] if rest else None)
        dropout = kwargs.get("dropout_p", rest[1] if len(rest) > 1 else 0.0)
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, dropout, False, attn_mask=mask)[0]


class _SavedBytes:
    """saved_tensors_hooks that count each storage autograd keeps once, parameters excluded, with the
    running total readable between blocks."""

    def __init__(self, module: nn.Module) -> None:
        self.params = {p.untyped_storage()._cdata for p in module.parameters()}
        self.seen: dict[int, torch.Tensor] = {}  # holding the tensor keeps its storage's address unique
        self.total = 0

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = storage._cdata
        if key not in self.params and key not in self.seen:
            self.seen[key] = t
            self.total += storage.nbytes()
        return t

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)


def saved_bytes(net: nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[int, list[tuple[int, int]]]:
    """(bytes saved for backward by one training forward, [(block input bytes, block internal bytes)] for
    every UNetBlock), on whatever device the network and inputs are."""
    counter, blocks = _SavedBytes(net), []

    def before(module, args):
        module._mav_start = counter.total

    def after(module, args, output):
        x = args[0]
        blocks.append((x.untyped_storage().nbytes(), counter.total - module._mav_start))

    handles = []
    for module in net.modules():
        if isinstance(module, UNetBlock):
            handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
    try:
        with counter.hooks():
            net(**inputs)
    finally:
        for h in handles:
            h.remove()
    return counter.total, blocks


def trace_stage(stage: str, cfg: CascadeConfig, precision: str = "bf16", device: str = "meta",
                crop: int | None = None) -> Trace:
    """Trace a stage's network in `precision` at batches 1 and 2: the difference is what each sample adds,
    the rest is fixed per forward. On "meta" nothing is allocated, so the paper preset traces on a laptop."""
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    with torch.device(device):
        net = build_network(stage, cfg)
    net = net.to(dtype).train()
    params = sum(p.numel() for p in net.parameters())
    for p in net.parameters():
        p.requires_grad_(True)
    with FlashAttention():
        return _trace(net, stage, cfg, torch.device(device), dtype, params, crop)


def _trace(net: nn.Module, stage: str, cfg: CascadeConfig, device: torch.device, dtype: torch.dtype,
           params: int, crop: int | None = None) -> Trace:
    plain, checkpointed = [], []
    for batch in (1, 2):
        total, blocks = saved_bytes(net, stage_inputs(stage, cfg, device, dtype, batch, crop))
        inside = sum(internal for _, internal in blocks)
        kept = total - inside + sum(size for size, _ in blocks) + max((i for _, i in blocks), default=0)
        plain.append(total)
        checkpointed.append(min(total, kept))
    with FlopCounterMode(display=False) as flops:
        net(**stage_inputs(stage, cfg, device, dtype, crop=crop))
    fixed = max(0, 2 * plain[0] - plain[1])
    return Trace(params, plain[1] - plain[0], checkpointed[1] - checkpointed[0], flops.get_total_flops(), fixed)


def state_bytes(params: int, trainable: int, shards: int) -> int:
    """fp32 weights, fp32 gradients, AdamW's moments and an fp32 EMA, divided over `shards` GPUs."""
    return math.ceil((4 * params + (4 + OPTIMIZER_BYTES + 4) * trainable) / shards)


def _micro_batch(per_gpu: int, free: int, per_sample: int) -> int:
    """The largest divisor of the per-GPU batch whose activations fit in `free` bytes (0: none)."""
    fitting = [m for m in range(1, per_gpu + 1) if per_gpu % m == 0 and m * per_sample <= free]
    return max(fitting, default=0)


def plan_stage(stage: str, trace: Trace, train: StageTrainConfig, gpus: int, gpu_memory: int,
               peak_flops: float, mfu: float, trainable: int | None = None) -> StagePlan:
    """Choose sharding, checkpointing and micro-batch for one stage on `gpus` GPUs of `gpu_memory` bytes. The
    options, cheapest first: DDP, DDP + checkpointing, FSDP, FSDP + checkpointing; the first whose micro-batch
    reaches MIN_MICRO_BATCH wins (a GPU starved of rows costs more than checkpointing's recompute), else the
    fitting option with the largest micro-batch."""
    trainable = trace.params if trainable is None else trainable
    per_gpu = max(1, train.batch_size // gpus)
    usable = int((gpu_memory - RESERVED_BYTES) * (1 - FRAGMENTATION))
    plan = StagePlan(stage, trace.params, 0, 0, trace.saved_bytes, trace.saved_bytes_checkpointed, 0)
    if train.batch_size % gpus:
        plan.notes.append(f"global batch {train.batch_size} does not split evenly over {gpus} GPUs")
    best = None
    for sharding, checkpointing in (("ddp", False), ("ddp", True), ("fsdp", False), ("fsdp", True)):
        state = state_bytes(trace.params, trainable, gpus if sharding == "fsdp" else 1)
        per_sample = trace.saved_bytes_checkpointed if checkpointing else trace.saved_bytes
        micro = _micro_batch(per_gpu, usable - state - trace.saved_fixed, per_sample)
        if micro and (best is None or micro > best[0]):
            best = (micro, sharding, checkpointing, state, per_sample)
        if micro >= min(MIN_MICRO_BATCH, per_gpu):
            break
    if best is None:
        plan.state_bytes = state_bytes(trace.params, trainable, gpus)
        plan.why = (f"one sample needs {trace.saved_bytes_checkpointed / GIB:.1f} GiB of activations even with "
                    f"checkpointing, beside {plan.state_bytes / GIB:.1f} GiB of sharded state, in "
                    f"{usable / GIB:.1f} GiB usable")
        return plan
    micro, plan.sharding, plan.checkpointing, plan.state_bytes, plan.activation_bytes_per_sample = best
    plan.flops_per_sample = trace.forward_flops * (4 if plan.checkpointing else 3)  # backward ~2x; recompute 1x
    plan.micro_batch, plan.grad_accum = micro, per_gpu // micro
    plan.peak_bytes = (plan.state_bytes + trace.activations(micro, plan.checkpointing) + RESERVED_BYTES)
    plan.step_time_s = plan.flops_per_sample * per_gpu / (peak_flops * mfu)
    plan.fits = True
    return plan


def parse_memory(text: str) -> int:
    """'80GB', '80GiB', '80G' or a number of bytes -> bytes (GB read as GiB, as GPU memory is quoted)."""
    value = text.strip().upper().removesuffix("B").removesuffix("I")
    scale = {"G": GIB, "M": 1024 ** 2, "T": 1024 ** 4}.get(value[-1:], 1)
    try:
        return int(float(value[:-1] if scale != 1 else value) * scale)
    except ValueError:
        raise ValueError(f"cannot read a memory size from {text!r}; write e.g. 80GB") from None


def trainable_params(stage: str, cfg: CascadeConfig, train: StageTrainConfig) -> int | None:
    """Parameters with optimiser state: with `trainable: temporal` only what inflation added (as
    `training.loop.restrict_trainable` keeps them); else all (None)."""
    if train.trainable != "temporal":
        return None
    with torch.device("meta"):
        net = build_network(stage, cfg)
    return sum(p.numel() for name, p in net.named_parameters() if is_added(name))


def plan_cascade(cfg: CascadeConfig, train: Any, stages: tuple[str, ...], gpus: int, gpu_memory: int,
                 gpu: str = "h100", mfu: float = DEFAULT_MFU) -> list[StagePlan]:
    """A StagePlan per stage (see `plan_stage`); activations are traced at fp32 on the meta device."""
    if gpu not in PEAK_FLOPS:
        raise ValueError(f"unknown GPU {gpu!r}; choose one of {sorted(PEAK_FLOPS)}")
    plans = []
    for stage in stages:
        stage_train = train.stage(stage)
        trace = trace_stage(stage, cfg, "fp32", crop=stage_train.crop_size)
        plans.append(plan_stage(stage, trace, stage_train, gpus, gpu_memory, PEAK_FLOPS[gpu], mfu,
                                trainable_params(stage, cfg, stage_train)))
    return plans


def format_plan(plans: list[StagePlan], gpus: int, gpu_memory: int, gpu: str, mfu: float) -> str:
    """A table a person reads before booking the cluster."""
    head = (f"{'stage':<14}{'params':>9}{'state':>9}{'act/sample':>12}{'ckpt/sample':>12}{'micro':>7}{'accum':>7}"
            f"{'ckpt':>6}{'shard':>7}{'peak':>9}{'TFLOP/sample':>14}{'step s':>8}")
    lines = [f"{gpus} x {gpu} ({gpu_memory / GIB:.0f} GiB), bf16 peak {PEAK_FLOPS[gpu] / 1e12:.0f} TFLOP/s at "
             f"MFU {mfu:.2f}; activations traced at fp32 on the meta device", head]
    for p in plans:
        lines.append(f"{p.stage:<14}{p.params / 1e6:>8.0f}M{p.state_bytes / GIB:>8.1f}G"
                     f"{p.activation_bytes_per_sample_plain / GIB:>11.2f}G"
                     f"{p.activation_bytes_per_sample_checkpointed / GIB:>11.2f}G"
                     + (f"{p.micro_batch:>7}{p.grad_accum:>7}{'yes' if p.checkpointing else 'no':>6}{p.sharding:>7}"
                        f"{p.peak_bytes / GIB:>8.1f}G{p.flops_per_sample / 1e12:>14.2f}{p.step_time_s:>8.2f}"
                        if p.fits else f"   DOES NOT FIT: {p.why}"))
        lines += [f"{'':<14}note: {n}" for n in p.notes]
    return "\n".join(lines)


def resolve_stage(stage: str, cascade: CascadeConfig, train: StageTrainConfig
                  ) -> tuple[CascadeConfig, StageTrainConfig, StagePlan | None]:
    """The stage as it trains: grad_accum, grad_checkpointing and sharding all set, and the stage network's
    `grad_checkpointing` following the training config. A field the config sets wins; the others come from
    the plan for num_workers GPUs of `gpu_memory` when that is set, else 1, the network config's and ddp.
    Raises ValueError with the plan's reason when the stage cannot fit, before any worker starts."""
    stage_cfg = getattr(cascade, stage, None)
    net = getattr(stage_cfg, "net", None)
    chosen: dict[str, Any] = {"grad_accum": 1, "grad_checkpointing": bool(getattr(net, "grad_checkpointing", False)),
                              "sharding": "ddp"}
    plan = None
    if train.gpu_memory is not None:
        if stage not in PLANNED_STAGES:
            raise ValueError(f"train.{stage}.gpu_memory: the {stage} stage is not planned; unset it")
        gpus, memory = train.num_workers, parse_memory(train.gpu_memory)
        trace = trace_stage(stage, cascade, "fp32", crop=train.crop_size)
        plan = plan_stage(stage, trace, train, gpus, memory, PEAK_FLOPS["h100"], DEFAULT_MFU,
                          trainable_params(stage, cascade, train))
        if not plan.fits:
            raise ValueError(f"stage {stage} cannot fit {gpus} x {train.gpu_memory}: {plan.why}")
        chosen = {"grad_accum": plan.grad_accum, "grad_checkpointing": plan.checkpointing,
                  "sharding": plan.sharding}
    train = train.model_copy(update={k: v for k, v in chosen.items() if getattr(train, k) is None})
    if isinstance(net, UNetConfig) and net.grad_checkpointing != train.grad_checkpointing:
        net = net.model_copy(update={"grad_checkpointing": train.grad_checkpointing})
        cascade = cascade.model_copy(update={stage: stage_cfg.model_copy(update={"net": net})})
    return cascade, train, plan
