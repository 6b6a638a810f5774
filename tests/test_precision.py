"""Precision decided in one place: names become autocast contexts and grad scalers."""
from __future__ import annotations

import pytest
import torch

from model.precision import autocast_context, autocast_dtype, default_precision, grad_scaler


def test_defaults_per_device():
    assert default_precision("cpu") == "fp32"
    assert default_precision(torch.device("cuda", 0)) == "bf16"


def test_fp32_context_changes_nothing():
    a = torch.randn(4, 4)
    with autocast_context("cpu", "fp32"):
        assert (a @ a).dtype == torch.float32


def test_bf16_autocast_on_cpu():
    lin = torch.nn.Linear(4, 4)
    with autocast_context(torch.device("cpu"), "bf16"):
        out = lin(torch.randn(2, 4))
    assert out.dtype == torch.bfloat16 and lin.weight.dtype == torch.float32
    assert autocast_dtype("bf16") == torch.bfloat16


def test_disabled_scaler_is_a_pass_through():
    lin = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    scaler = grad_scaler("fp32", "cpu")
    assert not scaler.is_enabled()
    before = lin.weight.detach().clone()
    loss = lin(torch.ones(2, 4)).sum()
    assert scaler.scale(loss) is loss
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    assert not torch.equal(lin.weight, before)


def test_bad_names_and_fp16_on_cpu_are_refused():
    with pytest.raises(ValueError, match="unknown precision"):
        autocast_context("cpu", "fp8")
    with pytest.raises(ValueError, match="fp16"):
        autocast_context("cpu", "fp16")
    with pytest.raises(ValueError, match="fp16"):
        grad_scaler("fp16", "cpu")
