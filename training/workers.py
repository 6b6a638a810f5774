"""Where the training loop runs: a Ray Train worker (`RayWorker`), or this process (`LocalWorker`).

The loop sees either through `Worker`: its rank and world size, its device, how to spread the network over
the workers (DDP, or FSDP2 through training/sharding.py), the checkpoint to resume from, and where to
report metrics and checkpoint folders. A single worker trains the module as it is, whatever the sharding.
"""
from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Iterator, Protocol

import torch
import torch.distributed as dist
from torch import nn

from training.sharding import device_mesh, shard


class Worker(Protocol):
    """What the loop needs from its runner: Ray Train here, plain torch.distributed in the benchmark."""

    rank: int
    world: int
    device: torch.device

    def prepare(self, module: nn.Module, sharding: str = "ddp", find_unused: bool = False) -> nn.Module: ...

    def checkpoint(self) -> contextlib.AbstractContextManager[str | None]: ...

    def report(self, metrics: dict[str, float], checkpoint_dir: str | None) -> None: ...


class RayWorker:
    """The loop's view of a Ray Train worker. Ray Train is imported in the methods: it takes seconds to
    import, and only a Ray Train worker builds one of these (not the driver, nor an in-process run)."""

    def __init__(self) -> None:
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()

    def prepare(self, module: nn.Module, sharding: str = "ddp", find_unused: bool = False) -> nn.Module:
        import ray.train.torch

        if sharding == "fsdp" and self.world > 1:  # Ray Train has joined the workers' process group
            return shard(module.to(self.device), device_mesh(self.device, self.world))
        # to the device; DDP when world > 1
        return ray.train.torch.prepare_model(module, parallel_strategy_kwargs={"find_unused_parameters": find_unused})

    @contextlib.contextmanager
    def checkpoint(self) -> Iterator[str | None]:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            yield None
            return
        with ckpt.as_directory() as path:
            yield path

    def report(self, metrics: dict[str, float], checkpoint_dir: str | None) -> None:
        import ray.train

        ckpt = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=ckpt)


class LocalWorker:
    """The loop's runner without Ray: this process is one worker (rank and world from torch.distributed
    when it is initialised, DDP or FSDP2 then), checkpoints are copied to `folder/step_NNNNNNN`, the last `keep`
    kept (Ray Train keeps 2 too). For training a stage in this process (`run_stage(in_process=True)`)
    and for the benchmark's plain-PyTorch baseline."""

    def __init__(self, folder: str | Path, device: str = "cpu", keep: int = 2) -> None:
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.device, self.folder, self.keep = torch.device(device), Path(folder), keep

    def prepare(self, module: nn.Module, sharding: str = "ddp", find_unused: bool = False) -> nn.Module:
        module = module.to(self.device)
        if self.world == 1:
            return module
        if sharding == "fsdp":
            return shard(module, device_mesh(self.device, self.world))
        return nn.parallel.DistributedDataParallel(module, find_unused_parameters=find_unused)

    @contextlib.contextmanager
    def checkpoint(self) -> Iterator[str | None]:
        found = sorted(self.folder.glob("step_*"))
        yield str(found[-1]) if found else None

    def report(self, metrics: dict[str, float], checkpoint_dir: str | None) -> None:
        if checkpoint_dir is not None:
            shutil.copytree(checkpoint_dir, self.folder / f"step_{int(metrics['step']):07d}", dirs_exist_ok=True)
            for old in sorted(self.folder.glob("step_*"))[:-self.keep]:
                shutil.rmtree(old)


def global_mean(value: float, worker: Worker) -> float:
    """The mean over workers (every rank must call it at the same step)."""
    if worker.world == 1 or not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=worker.device)  # NCCL reduces CUDA tensors only
    dist.all_reduce(t)
    return float(t) / worker.world
