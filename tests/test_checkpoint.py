"""Weights on disk: safetensors with the config as metadata; pickles only as plain tensors, never code."""
from __future__ import annotations

import builtins
import pickle

import pytest
import torch

from model.checkpoint import UnsafeCheckpointError, load_config, load_weights, read_metadata, save_weights
from model.config import DiffusionConfig, UNetConfig


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.GroupNorm(2, 4), torch.nn.Linear(4, 2))


def test_safetensors_round_trip_with_config(tmp_path):
    net, cfg = _net(), UNetConfig(base_channels=16, channel_mult=(1, 2), attn_levels=(1,))
    path = save_weights(net, tmp_path / "sub" / "decoder.safetensors",
                        {"config": cfg.model_dump(mode="json"), "stage": "decoder"})
    state, meta = load_weights(path)
    assert state.keys() == net.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())
    assert meta["stage"] == "decoder"
    assert UNetConfig.model_validate(meta["config"]) == cfg  # the checkpoint rebuilds its own model
    assert load_config(path) == meta["config"] and read_metadata(path) == meta
    assert not list(path.parent.glob("*.tmp"))
    rebuilt = _net()
    rebuilt.load_state_dict(state)


def test_config_given_as_json_string_comes_back_as_dict(tmp_path):
    cfg = DiffusionConfig(timesteps=10)
    path = save_weights({"w": torch.ones(2)}, tmp_path / "w.safetensors", {"config": cfg.model_dump_json()})
    assert DiffusionConfig.model_validate(load_config(path)) == cfg


def test_shared_and_strided_tensors_are_saved(tmp_path):
    base = torch.arange(12.0).reshape(3, 4)
    path = save_weights({"a": base, "b": base, "t": base.t()}, tmp_path / "s.safetensors")
    state, meta = load_weights(path)
    assert torch.equal(state["t"], base.t()) and torch.equal(state["b"], base) and meta == {}


def test_plain_torch_state_dict_loads(tmp_path):
    net = _net()
    torch.save(net.state_dict(), tmp_path / "w.pt")
    torch.save({"state_dict": net.state_dict(), "epoch": 3}, tmp_path / "wrapped.pth")
    state, _ = load_weights(tmp_path / "w.pt")
    wrapped, meta = load_weights(tmp_path / "wrapped.pth")
    assert all(torch.equal(state[k], v) and torch.equal(wrapped[k], v) for k, v in net.state_dict().items())
    assert meta == {"epoch": 3}


class _RunsCodeOnLoad:
    """Unpickling this calls builtins.print with a marker: a stand-in for os.system."""

    def __reduce__(self):
        return (builtins.print, ("MARKER-CODE-RAN",))


def test_pickle_that_runs_code_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(2), "payload": _RunsCodeOnLoad()}, path)
    # The payload is real: an unrestricted unpickler runs it.
    with open(path, "rb") as f:
        torch.load(f, weights_only=False)
    assert "MARKER-CODE-RAN" in capsys.readouterr().out
    with pytest.raises(UnsafeCheckpointError, match="evil.pt"):
        load_weights(path)
    assert "MARKER-CODE-RAN" not in capsys.readouterr().out


def test_raw_pickle_file_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps(_RunsCodeOnLoad(), protocol=2))
    with pytest.raises(UnsafeCheckpointError, match="evil.pth"):
        load_weights(path)
    assert "MARKER-CODE-RAN" not in capsys.readouterr().out


def test_missing_and_unknown_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_weights(tmp_path / "nope.safetensors")
    (tmp_path / "w.npz").write_bytes(b"x")
    with pytest.raises(ValueError, match="unknown weights format"):
        load_weights(tmp_path / "w.npz")
    with pytest.raises(ValueError, match="safetensors"):
        save_weights({"w": torch.ones(1)}, tmp_path / "w.pt")
    torch.save([torch.ones(1)], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="not a state dict"):
        load_weights(tmp_path / "list.pt")
