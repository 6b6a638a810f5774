"""CLIP through open_clip: the tiny from-scratch model, local weights only, encoders, contrastive training."""
from __future__ import annotations

import pytest
import torch

from model.checkpoint import save_weights
from model.clip import (CLIP_CONFIGS, build_clip, clip_loss, contrastive_step, encode_images, encode_text,
                        encode_text_tokens, tokenize)
from model.config import ClipConfig, cascade_preset

TINY = ClipConfig(model_name="mav-tiny-clip", embed_dim=32, image_size=32, context_length=16)
CAPTIONS = ["a red circle on a blue background", "a green square", "a small yellow triangle", "a white star"]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_clip(TINY)


def _images(batch: int = 4) -> torch.Tensor:
    return torch.randint(0, 256, (batch, 3, 40, 40), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def test_presets_name_registered_configs():
    for preset in ("tiny", "toy"):
        cfg = cascade_preset(preset).clip
        arch = CLIP_CONFIGS[cfg.model_name]
        assert arch["embed_dim"] == cfg.embed_dim
        assert arch["vision_cfg"]["image_size"] == cfg.image_size
        assert arch["text_cfg"]["context_length"] == cfg.context_length


def test_shapes_and_normalisation(tiny):
    model, preprocess, tokenizer = tiny
    model.eval()
    with torch.no_grad():
        img = encode_images(model, _images())
        img_float = encode_images(model, _images().float() / 255)
        txt = encode_text(model, tokenizer, CAPTIONS)
        tokens = tokenize(model, tokenizer, CAPTIONS)
        per_token = encode_text_tokens(model, tokens)
    assert img.shape == (4, 32) and txt.shape == (4, 32) and tokens.shape == (4, 16)
    assert per_token.shape == (4, 16, 32)
    # open_clip pools the end-of-text token (the largest id): the per-token features agree with it there.
    with torch.no_grad():
        pooled = per_token[torch.arange(4), tokens.argmax(dim=-1)]
        torch.testing.assert_close(pooled, model.encode_text(tokens))
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(txt.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(img, img_float)  # uint8 and [0, 1] floats are the same pixels
    assert callable(preprocess)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        encode_images(model, torch.zeros(2, 32, 32, 3))


def test_absent_weights_file_names_the_path(tmp_path):
    missing = tmp_path / "weights" / "clip.safetensors"
    with pytest.raises(FileNotFoundError, match="clip.safetensors"):
        build_clip(TINY.model_copy(update={"weights_path": str(missing)}))


def test_wrong_embed_dim_and_unknown_name_are_refused():
    with pytest.raises(ValueError, match="embed_dim"):
        build_clip(TINY.model_copy(update={"embed_dim": 64}))
    with pytest.raises(ValueError, match="unknown CLIP model"):
        build_clip(TINY.model_copy(update={"model_name": "no-such-clip"}))


def test_safetensors_round_trip_gives_identical_embeddings(tiny, tmp_path):
    model, _, tokenizer = tiny
    path = save_weights(model, tmp_path / "clip.safetensors", {"config": TINY.model_dump(mode="json")})
    torch.manual_seed(123)  # a different random init: only the file can make the embeddings agree
    loaded, _, _ = build_clip(TINY.model_copy(update={"weights_path": str(path)}))
    model.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.equal(encode_images(model, _images()), encode_images(loaded, _images()))
        assert torch.equal(encode_text(model, tokenizer, CAPTIONS), encode_text(loaded, tokenizer, CAPTIONS))


def test_building_logs_no_random_init_warning_and_keeps_other_warnings(caplog):
    """open_clip's "initialized randomly" line is dropped (the weights are loaded after the build); the
    root logger's other warnings still pass once the build is done."""
    import logging

    with caplog.at_level(logging.WARNING):
        build_clip(TINY)
        logging.warning("another warning")
    messages = [r.getMessage() for r in caplog.records]
    assert not any("No pretrained weights loaded" in m for m in messages)
    assert "another warning" in messages


def test_custom_config_is_registered_by_name():
    arch = {**CLIP_CONFIGS["mav-tiny-clip"], "embed_dim": 16}
    model, _, _ = build_clip(TINY.model_copy(update={"model_name": "mav-test-custom", "embed_dim": 16,
                                                     "custom": arch}))
    with torch.no_grad():
        assert encode_images(model.eval(), _images(2)).shape == (2, 16)


def test_contrastive_steps_lower_the_loss():
    torch.manual_seed(0)
    model, _, tokenizer = build_clip(TINY)
    images, tokens = _images(), tokenizer(CAPTIONS)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    first = clip_loss(model, images, tokens).item()
    for _ in range(4):
        contrastive_step(model, images, tokens, opt)
    assert clip_loss(model, images, tokens).item() < 0.8 * first
    assert model.logit_scale.exp().item() <= 100.0 + 1e-4
