"""The diffusion prior: shapes, the null condition, padding masks, causality, determinism, one training step."""
from __future__ import annotations

import pytest
import torch

from model.config import PriorConfig, cascade_preset
from model.networks import build_network
from model.prior import DiffusionPrior

TINY = cascade_preset("tiny")
CFG = TINY.prior.net
B, L = 3, 6


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    d = CFG.embed_dim
    return {"x_t": torch.randn(B, d, generator=gen), "t": torch.tensor([0, 250, 999]),
            "text_emb": torch.randn(B, d, generator=gen), "text_tokens": torch.randn(B, L, d, generator=gen)}


@pytest.fixture(scope="module")
def prior() -> DiffusionPrior:
    torch.manual_seed(0)
    return build_network("prior", TINY).eval()


def test_shapes_and_optional_text(prior: DiffusionPrior) -> None:
    batch = _batch()
    with torch.no_grad():
        full = prior(**batch)
        no_tokens = prior(batch["x_t"], batch["t"], text_emb=batch["text_emb"])
        nothing = prior(batch["x_t"], batch["t"])
        full_length = prior(**{**batch, "text_tokens": torch.randn(B, CFG.text_len, CFG.embed_dim)})
    for out in (full, no_tokens, nothing, full_length):
        assert out.shape == (B, CFG.embed_dim) and torch.isfinite(out).all()
    assert not torch.allclose(full, nothing, atol=1e-4)


def test_zero_rows_are_the_null_condition(prior: DiffusionPrior) -> None:
    """Zeroed rows (classifier-free dropout) equal passing None, per sample in a mixed batch."""
    batch = _batch(1)
    dropped = {**batch, "text_emb": batch["text_emb"].clone(), "text_tokens": batch["text_tokens"].clone()}
    dropped["text_emb"][1] = 0
    dropped["text_tokens"][1] = 0
    with torch.no_grad():
        mixed = prior(**dropped)
        cond = prior(**batch)
        null = prior(batch["x_t"], batch["t"], text_tokens=torch.zeros(B, L, CFG.embed_dim))
    torch.testing.assert_close(mixed[[0, 2]], cond[[0, 2]], atol=1e-5, rtol=0)
    null_row = prior(batch["x_t"][1:2], batch["t"][1:2], text_tokens=torch.zeros(1, L, CFG.embed_dim)).detach()
    torch.testing.assert_close(mixed[1:2], null_row, atol=1e-5, rtol=0)
    assert not torch.allclose(mixed[1], cond[1], atol=1e-4)
    assert null.shape == (B, CFG.embed_dim)


def test_padding_tokens_are_ignored(prior: DiffusionPrior) -> None:
    batch = _batch(2)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[:, 4:] = False
    noisy = batch["text_tokens"].clone()
    noisy[:, 4:] = torch.randn(B, L - 4, CFG.embed_dim)
    with torch.no_grad():
        a = prior(**batch, text_mask=mask)
        b = prior(**{**batch, "text_tokens": noisy}, text_mask=mask)
        c = prior(**{**batch, "text_tokens": noisy})
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert not torch.allclose(a, c, atol=1e-4)


def test_output_depends_on_timestep_and_noised_embedding(prior: DiffusionPrior) -> None:
    batch = _batch(3)
    with torch.no_grad():
        base = prior(**batch)
        other_t = prior(**{**batch, "t": torch.tensor([500, 500, 500])})
        other_x = prior(**{**batch, "x_t": torch.randn(B, CFG.embed_dim)})
    assert not torch.allclose(base, other_t, atol=1e-4)
    assert not torch.allclose(base, other_x, atol=1e-4)


def test_determinism_with_seed() -> None:
    outs = []
    for _ in range(2):
        torch.manual_seed(42)
        net = DiffusionPrior(CFG).eval()
        with torch.no_grad():
            outs.append(net(**_batch(4)))
    assert torch.equal(outs[0], outs[1])


def test_one_adam_step_lowers_mse() -> None:
    torch.manual_seed(0)
    net = DiffusionPrior(CFG).train()
    batch = _batch(5)
    target = torch.randn(B, CFG.embed_dim, generator=torch.Generator().manual_seed(6))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    losses = []
    for _ in range(2):
        loss = torch.nn.functional.mse_loss(net(**batch), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[1] < losses[0]


def test_shape_errors(prior: DiffusionPrior) -> None:
    batch = _batch()
    with pytest.raises(ValueError, match="x_t"):
        prior(torch.randn(B, CFG.embed_dim + 1), batch["t"])
    with pytest.raises(ValueError, match="text_tokens"):
        prior(batch["x_t"], batch["t"], text_tokens=torch.randn(B, CFG.text_len + 1, CFG.embed_dim))
    with pytest.raises(ValueError, match="heads"):
        DiffusionPrior(PriorConfig(embed_dim=8, text_len=4, width=30, depth=1, heads=4))
