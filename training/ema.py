"""An exponential moving average of a network's weights: what sampling and the next stage use."""
from __future__ import annotations

import copy

import torch
from torch import nn

from training.sharding import full_state_dict, is_sharded, local, mesh_of, shard


class Ema:
    """Exponential moving average of the weights, kept on every rank: a full copy under DDP (which keeps the
    weights identical), a copy sharded like the trained module under FSDP (`shard_as`), each rank averaging
    its own slices. The decay warms up as min(decay, (1+step)/(10+step)), so short runs are not stuck at
    their init."""

    def __init__(self, module: nn.Module, decay: float) -> None:
        self.module = copy.deepcopy(module).requires_grad_(False).eval()
        self.decay = decay
        self.template: nn.Module | None = None  # the unsharded layout on the meta device, once sharded

    def shard_as(self, trained: nn.Module) -> None:
        """Shard the copy over `trained`'s mesh (FSDP2 modules do not deep-copy: copy first, then shard)."""
        self.template = copy.deepcopy(self.module).to("meta")
        shard(self.module, mesh_of(trained))

    @torch.no_grad()
    def update(self, module: nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        for ema, p in zip(self.module.parameters(), module.parameters()):
            local(ema).lerp_(local(p.detach()), 1 - decay)
        for ema, b in zip(self.module.buffers(), module.buffers()):
            ema.copy_(b)

    def gathered(self, rank: int) -> nn.Module | None:
        """The EMA as one unsharded module: the copy itself when unsharded; when sharded, every rank joins
        the gather and rank 0 gets a new full module on the copy's device (None elsewhere)."""
        if not is_sharded(self.module):
            return self.module
        state = full_state_dict(self.module)
        if rank != 0:
            return None
        device = local(next(self.module.parameters())).device
        full = copy.deepcopy(self.template).to_empty(device=device)
        full.load_state_dict(state)
        for name, buf in self.module.named_buffers():  # non-persistent buffers are not in the state dict
            full.get_buffer(name).copy_(buf)
        return full.requires_grad_(False).eval()
