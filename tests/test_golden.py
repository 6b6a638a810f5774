"""Refactors keep sampling exact: the tiny preset's frames for every use and sampler (tests/golden.py)
equal the frames saved in tests/data/golden_tiny.safetensors."""
from __future__ import annotations

import torch
from safetensors.torch import load_file

from golden import GOLDEN, golden_frames


def test_every_use_and_sampler_gives_the_saved_frames():
    saved = load_file(str(GOLDEN))
    now = golden_frames()
    assert sorted(now) == sorted(saved)
    for key, value in now.items():
        assert value.shape == saved[key].shape, key
        torch.testing.assert_close(value, saved[key], atol=1e-5, rtol=1e-4, msg=key)
