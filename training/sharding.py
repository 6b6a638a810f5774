"""FSDP2 for the stage networks (`train.<stage>.sharding: fsdp`), beside DDP's full replica per worker.

`shard` applies `fully_shard` to every block (each `UNetBlock` of a U-Net, each `PriorBlock` of the prior),
then to the root for what lies outside the blocks, as torchtitan's `parallelize` does: parameters become
DTensors holding a 1/world slice on each rank, gathered block by block in forward and backward. Every
rank must take part in each forward of a sharded module and in each gather below.

A full state dict (`full_state_dict`, `optimizer_state`) is gathered onto rank 0's CPU; the other ranks
get {}. Loading (`load_full_state_dict`, `load_optimizer_state`) takes the full dict on every rank, each
keeping its own slice. On an unsharded module these are the plain state_dict calls.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard

from model.prior import PriorBlock
from model.unet import UNetBlock

BLOCKS = (UNetBlock, PriorBlock)
GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)
# strict=False: a parameter that never had a gradient has no AdamW state to restore.
SCATTER = StateDictOptions(full_state_dict=True, strict=False)


def device_mesh(device: torch.device, world: int) -> DeviceMesh:
    """The workers' 1-D mesh over the initialised process group (gloo on CPU, NCCL on CUDA)."""
    return init_device_mesh(device.type, (world,))


def shard(module: nn.Module, mesh: DeviceMesh) -> nn.Module:
    """FSDP2 in place: each block, then the root; returns `module`, now an FSDPModule."""
    blocks = [m for m in module.modules() if isinstance(m, BLOCKS)]
    if not blocks:
        raise ValueError(f"sharding=fsdp shards U-Net and prior blocks; {type(module).__name__} has none: "
                         "train it with sharding=ddp")
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(module, mesh=mesh)
    return module


def is_sharded(module: nn.Module) -> bool:
    return isinstance(module, FSDPModule)


def mesh_of(module: nn.Module) -> DeviceMesh:
    """The mesh a sharded module's parameters live on."""
    return next(module.parameters()).device_mesh


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's slice of a DTensor; a plain tensor as it is."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict; for a sharded module gathered on rank 0's CPU ({} elsewhere), all ranks calling."""
    return get_model_state_dict(module, options=GATHER) if is_sharded(module) else module.state_dict()


def load_full_state_dict(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a full state dict (every rank passes it; a sharded module keeps each rank's slice)."""
    if is_sharded(module):
        set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=True))
    else:
        module.load_state_dict(state)


def optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """AdamW's state keyed by parameter name, gathered on rank 0's CPU ({} elsewhere); all ranks call it."""
    return get_optimizer_state_dict(module, optimizer, options=GATHER)


def load_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load `optimizer_state`'s full dict (every rank passes it) into this module's (sharded) optimiser."""
    set_optimizer_state_dict(module, optimizer, state, options=SCATTER)


@contextlib.contextmanager
def skip_grad_sync(net: nn.Module) -> Iterator[None]:
    """Backward inside accumulates this rank's gradients without the reduction (a micro-batch that is not
    the step's last): DDP's no_sync, FSDP2's requires_gradient_sync off."""
    if isinstance(net, nn.parallel.DistributedDataParallel):
        with net.no_sync():
            yield
    elif is_sharded(net):
        net.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            net.set_requires_gradient_sync(True)
    else:
        yield
