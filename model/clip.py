"""CLIP through open_clip: build by name, load weights from a local file only, encode images and text,
and one contrastive training step for the toy world's from-scratch CLIP.

Weights never come from a hub: models are created with `pretrained=None`, and `ClipConfig.weights_path`
names a local safetensors or .pt/.pth state dict (loaded by `model.checkpoint.load_weights`, which only
accepts plain tensors). Tokenizers are open_clip's SimpleTokenizer, whose BPE vocabulary ships with the
package, so building works offline.

Two small from-scratch architectures are registered with open_clip under their names:
"mav-tiny-clip" (tests) and "mav-toy-clip" (the toy-world demo).
"""
from __future__ import annotations

import copy
import logging
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import open_clip
import torch
import torch.nn.functional as F
from open_clip.factory import _MODEL_CONFIGS

from model.checkpoint import load_weights
from model.config import ClipConfig

# open_clip model configs (the schema of its model_configs/*.json). tiny: a small ViT (8x8 patches); text towers
# keep open_clip's 49408-token BPE vocabulary so its SimpleTokenizer works unchanged.
CLIP_CONFIGS: dict[str, dict] = {
    "mav-tiny-clip": {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
    },
    "mav-toy-clip": {
        "embed_dim": 64,
        # A small ResNet (open_clip's ModifiedResNet, attention pooling): in the toy world it learns an
        # object's position and shape from captions in far fewer steps than a ViT of the same cost. At 32 px
        # (the toy cascade's base size) its last 1x1 map sees the whole object, and a step costs a fifth of
        # one at 64 px; shape is learnt sooner and less at the seed's mercy (see the toy preset's notes).
        "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 32},
        # 20 tokens: the world's longest video caption ("..., the camera pans to the right") is 17 with its
        # start and end tokens, and 16 cut it.
        "text_cfg": {"context_length": 20, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 4},
    },
}


def register_clip_config(name: str, model_cfg: dict) -> None:
    """Make `name` buildable by open_clip. open_clip's public `add_model_config` only reads JSON files;
    our configs live in code, so they go straight into its registry dict (which its rescans keep)."""
    if not all(key in model_cfg for key in ("embed_dim", "vision_cfg", "text_cfg")):
        raise ValueError(f"CLIP config {name!r} needs embed_dim, vision_cfg and text_cfg")
    _MODEL_CONFIGS[name] = copy.deepcopy(model_cfg)


for _name, _cfg in CLIP_CONFIGS.items():
    register_clip_config(_name, _cfg)


def _unwrap(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """open_clip training checkpoints saved under DistributedDataParallel prefix every key with 'module.'."""
    if state_dict and all(k.startswith("module.") for k in state_dict):
        return {k[len("module."):]: v for k, v in state_dict.items()}
    return state_dict


def _not_random_init_warning(record: logging.LogRecord) -> bool:
    """False for open_clip's "No pretrained weights loaded ... initialized randomly", logged whenever
    `pretrained` is None - every build here: the weights come from `cfg.weights_path` or from the caller (a
    registered stage) after the build, so in a log the line said the opposite of what happened."""
    return "No pretrained weights loaded" not in record.getMessage()


@contextmanager
def _quiet_random_init() -> Iterator[None]:
    root = logging.getLogger()  # open_clip logs through the root logger
    root.addFilter(_not_random_init_warning)
    try:
        yield
    finally:
        root.removeFilter(_not_random_init_warning)


def build_clip(cfg: ClipConfig, device: torch.device | str = "cpu"
               ) -> tuple[torch.nn.Module, Callable, Callable[[Sequence[str]], torch.Tensor]]:
    """(model, preprocess, tokenizer) for `cfg.model_name` from open_clip's registry (`cfg.custom`, if set,
    is registered under that name first). The config's image size and context length override the
    registry's. With `cfg.weights_path` the weights are loaded from that local file; without it the model
    is randomly initialised (the toy world trains it). The model comes back in eval mode. preprocess is
    open_clip's eval transform for PIL images; for tensors use `encode_images`."""
    if cfg.custom is not None:
        register_clip_config(cfg.model_name, cfg.custom)
    arch = open_clip.get_model_config(cfg.model_name)
    if arch is None:
        raise ValueError(f"unknown CLIP model {cfg.model_name!r}; not in open_clip's registry")
    if arch["embed_dim"] != cfg.embed_dim:
        raise ValueError(f"CLIP {cfg.model_name!r} embeds to {arch['embed_dim']}, config says "
                         f"embed_dim={cfg.embed_dim}")
    if cfg.weights_path is not None:
        state_dict, _ = load_weights(cfg.weights_path)  # FileNotFoundError naming the path if absent
    with _quiet_random_init():
        model, _, preprocess = open_clip.create_model_and_transforms(
            cfg.model_name, pretrained=None, pretrained_image=False, pretrained_text=False,
            force_image_size=cfg.image_size, force_context_length=cfg.context_length, device=device)
    if cfg.weights_path is not None:
        model.load_state_dict(_unwrap(state_dict))
    tokenizer = open_clip.get_tokenizer(cfg.model_name, context_length=cfg.context_length)
    return model.eval(), preprocess, tokenizer


def prepare_images(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Pixels -> the visual tower's input: (B, 3, H, W) uint8 in [0, 255] or float in [0, 1], resized to
    the model's image size (bicubic, antialiased, no crop) and normalised with its mean/std."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    device = next(model.parameters()).device
    x = x.to(device)
    size = model.visual.image_size
    size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    if tuple(x.shape[-2:]) != size:
        x = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    mean = torch.tensor(model.visual.preprocess_cfg["mean"], device=device).view(1, 3, 1, 1)
    std = torch.tensor(model.visual.preprocess_cfg["std"], device=device).view(1, 3, 1, 1)
    return (x - mean) / std  # (B, 3, S, S)


def encode_images(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """L2-normalised image embeddings (B, D) of raw pixels (see `prepare_images`)."""
    return model.encode_image(prepare_images(model, images), normalize=True)


def tokenize(model: torch.nn.Module, tokenizer: Callable, texts: Sequence[str]) -> torch.Tensor:
    """Token ids (B, context_length) on the model's device; text longer than the context is truncated."""
    if isinstance(texts, str):
        raise TypeError("texts must be a list of strings, not one string")
    return tokenizer(list(texts)).to(next(model.parameters()).device)


def encode_text(model: torch.nn.Module, tokenizer: Callable, texts: Sequence[str]) -> torch.Tensor:
    """L2-normalised text embeddings (B, D)."""
    return model.encode_text(tokenize(model, tokenizer, texts), normalize=True)


def encode_text_tokens(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Per-token text features projected into the joint embedding space: (B, L, D), unnormalised. The
    token sequence a DALL-E 2 style prior attends to. Mirrors open_clip's `CLIP.encode_text` without the
    pooling (final norm, then the text projection applied to every token). Needs open_clip's `CLIP` class,
    i.e. its built-in text tower (every config here; not HF text towers)."""
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast_dtype) + model.positional_embedding.to(cast_dtype)  # (B, L, W)
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask))
    proj = model.text_projection
    return proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj  # (B, L, D)


def clip_loss(model: torch.nn.Module, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over the batch with open_clip's own `ClipLoss` and the model's learned
    temperature. images: raw pixels as in `prepare_images`; tokens: (B, L) ids."""
    image_features = model.encode_image(prepare_images(model, images), normalize=True)  # (B, D)
    text_features = model.encode_text(tokens.to(image_features.device), normalize=True)  # (B, D)
    return open_clip.ClipLoss()(image_features, text_features, model.logit_scale.exp())


def contrastive_step(model: torch.nn.Module, images: torch.Tensor, tokens: torch.Tensor,
                     optimizer: torch.optim.Optimizer, max_logit_scale: float = 100.0) -> float:
    """One optimisation step of the contrastive loss; returns the loss before the step. The temperature
    is clamped afterwards to at most `max_logit_scale`, as CLIP and open_clip's training loop do."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    loss = clip_loss(model, images, tokens)
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        model.logit_scale.clamp_(0, torch.log(torch.tensor(max_logit_scale)).item())
    return float(loss.detach())
