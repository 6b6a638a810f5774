"""Generation I/O on the tiny preset: mp4/GIF/grid/sidecar outputs that decode, the watermark's pixels,
loading the cascade from a checkpoint folder and from a real MLflow sqlite registry, and the CLI."""
from __future__ import annotations

import argparse
import json

import decord
import numpy as np
import pytest
import torch
from PIL import Image

from model.cascade import STAGE_ORDER, build_cascade
from model.checkpoint import save_weights
from model.config import cascade_preset
from pipelines.cli.generate import add_generate_commands
from pipelines.defaults import STAGES
from pipelines.generate import MissingWeightsError, animate, generate, load_cascade
from pipelines.outputs import write_outputs
from pipelines.watermark import WatermarkConfig, apply_watermark, watermark_mask
from training.storage import sha256_file
from training.tracking import MlflowTracker

CFG = cascade_preset("tiny")
META = {"config": {"cascade": CFG.model_dump(mode="json")}}


@pytest.fixture(scope="module")
def cascade():
    torch.manual_seed(0)
    return build_cascade(CFG)


def _weights(cascade) -> dict[str, dict[str, torch.Tensor]]:
    return {"clip": cascade.clip.state_dict(), **{s: n.state_dict() for s, n in cascade.nets.items()}}


@pytest.fixture(scope="module")
def checkpoints(cascade, tmp_path_factory):
    folder = tmp_path_factory.mktemp("checkpoints")
    for stage, state in _weights(cascade).items():
        save_weights(state, folder / f"{stage}.safetensors", META)
    return folder


def _gradient(frames: int, height: int, width: int) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // width, y * 255 // height, np.full_like(x, 160)], axis=-1)
    return np.stack([np.roll(base, 2 * i, axis=1) for i in range(frames)]).astype(np.uint8)  # (F, H, W, 3)


def test_watermark_pixels_follow_the_mask():
    for size in [(64, 64), (768, 768), (48, 120)]:
        frames = _gradient(2, *size)
        mask = watermark_mask(size, WatermarkConfig())
        marked = apply_watermark(frames, WatermarkConfig())
        assert mask.any() and np.array_equal(marked[:, ~mask], frames[:, ~mask])
        assert (marked[:, mask] != frames[:, mask]).any(axis=-1).mean() > 0.9
        rows, cols = np.nonzero(mask)
        assert rows.min() >= size[0] / 2 and cols.max() >= 0.9 * size[1]  # bottom-right by default
    assert watermark_mask((64, 64), WatermarkConfig()).mean() < 0.4  # legible at 64 px without hiding it
    assert watermark_mask((768, 768), WatermarkConfig()).mean() < 0.05
    rows, cols = np.nonzero(watermark_mask((128, 128), WatermarkConfig(position="top-left")))
    assert rows.max() < 64 and cols.min() < 13
    assert np.array_equal(apply_watermark(_gradient(1, 32, 32), WatermarkConfig(enabled=False)), _gradient(1, 32, 32))


def test_logo_watermark(tmp_path):
    logo = tmp_path / "logo.png"
    Image.new("RGBA", (40, 20), (255, 0, 0, 255)).save(logo)
    cfg = WatermarkConfig(logo_path=str(logo), position="top-right", opacity=1.0)
    mask = watermark_mask((128, 128), cfg)
    assert mask.any() and mask[:64, 64:].sum() == mask.sum()
    marked = apply_watermark(_gradient(1, 128, 128), cfg)
    assert (marked[0][mask] == [255, 0, 0]).all()
    with pytest.raises(FileNotFoundError, match="logo"):
        watermark_mask((64, 64), WatermarkConfig(logo_path=str(tmp_path / "none.png")))


def test_outputs_decode_and_carry_the_watermark(tmp_path):
    video = _gradient(5, 33, 63)  # odd sizes: the mp4 is padded to even (decord misreads some widths, e.g. 48)
    paths = write_outputs(video, tmp_path, "clip", 6.0, WatermarkConfig(), {"prompt": "p"})
    reader = decord.VideoReader(str(paths["mp4"]))
    assert len(reader) == 5 and reader[0].shape == (34, 64, 3)
    assert reader.get_avg_fps() == pytest.approx(6.0)
    decoded = reader.get_batch(list(range(5))).asnumpy()[:, :33, :63].astype(int)
    mask = watermark_mask((33, 63), WatermarkConfig())
    marked = apply_watermark(video, WatermarkConfig()).astype(int)
    assert np.abs(decoded[:, mask] - video[:, mask]).mean() > 40  # the mark is there...
    assert np.abs(decoded[:, mask] - marked[:, mask]).mean() < 25  # ...and it is the mark we drew
    assert np.abs(decoded[:, ~mask] - video[:, ~mask]).mean() < 8
    with Image.open(paths["gif"]) as gif:
        assert gif.n_frames == 5 and gif.size == (63, 33)
        assert np.abs(np.asarray(gif.convert("RGB"), dtype=int)[mask] - video[0][mask]).mean() > 40
    assert Image.open(paths["grid"]).size == (5 * 63, 33)
    sidecar = json.loads(paths["json"].read_text())
    assert sidecar["prompt"] == "p" and sidecar["watermark"]["enabled"]
    assert sidecar["files"] == {"mp4": "clip.mp4", "gif": "clip.gif", "grid": "clip.grid.png"}


def test_generate_writes_complete_outputs(cascade, tmp_path):
    records = generate(CFG, ["a red circle"], tmp_path, cascade=cascade, seed=2, fps=8, progress=False)
    (record,) = records
    reader = decord.VideoReader(str(record["files"]["mp4"]))
    assert len(reader) == 7 and reader[0].shape == (64, 64, 3)
    side = json.loads(record["files"]["json"].read_text())
    assert side["prompt"] == "a red circle" and side["seed"] == 2 and side["use"] == "text_to_video"
    assert set(side["stages"]) == set(STAGE_ORDER) and set(side["stage_seeds"]) == set(STAGE_ORDER)
    sizes = {s: (e.get("frames"), e.get("height")) for s, e in side["stages"].items()}
    assert sizes == {"prior": (None, None), "temporal": (4, 16), "interpolation": (7, 16), "sr_low": (7, 32),
                     "sr_high": (7, 64)}
    for stage in STAGE_ORDER:
        assert {"sampler", "steps", "guidance_scale", "seed", "seconds"} <= set(side["stages"][stage])
    assert side["fps"] == 16.0 and side["stages"]["temporal"]["fps"] == 8.0
    assert len(side["config_hash"]) == 16 and side["timings_s"]["total"] > 0
    assert side["watermark"]["text"] == "Make-A-Video (generated)" and "weights" in side
    again = generate(CFG, ["a red circle"], tmp_path / "again", cascade=cascade, seed=2, fps=8, progress=False)
    grids = [np.asarray(Image.open(r["files"]["grid"])) for r in (record, again[0])]
    assert np.array_equal(*grids)  # same seed, same frames (the grid PNG is lossless)
    plain = generate(CFG, ["a red circle"], tmp_path / "plain", cascade=cascade, seed=2, fps=8,
                     watermark=WatermarkConfig(enabled=False), stop_at="temporal", progress=False)
    assert json.loads(plain[0]["files"]["json"].read_text())["watermark"] == {"enabled": False}


def test_animate_from_an_image_file(cascade, tmp_path):
    Image.fromarray(_gradient(1, 40, 40)[0]).save(tmp_path / "cat.png")
    (record,) = animate(CFG, tmp_path / "cat.png", tmp_path / "out", cascade=cascade, stop_at="interpolation",
                        progress=False)
    side = json.loads(record["files"]["json"].read_text())
    assert record["name"] == "animate-cat" and side["inputs"]["image"].endswith("cat.png")
    assert side["stages"]["temporal"]["network"] == "interpolation" and side["stages"]["prior"]["network"] == "clip"
    assert len(decord.VideoReader(str(record["files"]["mp4"]))) == 7


def _same_weights(loaded, cascade) -> bool:
    want = _weights(cascade)
    got = {"clip": loaded.clip.state_dict(), **{s: n.state_dict() for s, n in loaded.nets.items()}}
    return set(got) <= set(want) and all(torch.equal(got[s][k], want[s][k]) for s in got for k in want[s])


def test_load_cascade_from_a_checkpoint_folder(cascade, checkpoints):
    loaded = load_cascade(CFG, str(checkpoints), device="cpu")
    assert set(loaded.nets) == set(STAGE_ORDER) and _same_weights(loaded, cascade)
    assert loaded.sources["sr_high"]["sha256"] == sha256_file(checkpoints / "sr_high.safetensors")
    vary_only = load_cascade(CFG, str(checkpoints), use="vary", stop_at="temporal", device="cpu")
    assert set(vary_only.nets) == {"temporal"}


def test_a_missing_stage_is_named(checkpoints, tmp_path):
    partial = tmp_path / "partial"
    partial.mkdir()
    for stage in ("clip", "prior", "temporal", "interpolation"):
        (partial / f"{stage}.safetensors").write_bytes((checkpoints / f"{stage}.safetensors").read_bytes())
    assert set(load_cascade(CFG, str(partial), stop_at="interpolation").nets) == {"prior", "temporal", "interpolation"}
    with pytest.raises(MissingWeightsError, match=r"'sr_low'.*partial"):
        load_cascade(CFG, str(partial))
    with pytest.raises(MissingWeightsError, match="no MLflow store"):
        load_cascade(CFG, "mlflow", f"sqlite:///{tmp_path}/none.db")


def test_load_cascade_from_the_mlflow_registry(cascade, checkpoints, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = MlflowTracker(uri, "generate-test")
    tracker.start("weights")
    for stage in ("clip", "prior", "temporal"):
        tracker.register_weights(stage, str(checkpoints / f"{stage}.safetensors"))
    tracker.end()
    loaded = load_cascade(CFG, "mlflow", uri, stop_at="temporal", device="cpu")
    assert set(loaded.nets) == {"prior", "temporal"} and _same_weights(loaded, cascade)
    assert loaded.sources["temporal"]["version"] == 1
    assert loaded.sources["temporal"]["source"] == "models:/mav-temporal@current"
    with pytest.raises(MissingWeightsError, match="'interpolation'.*mlflow.db"):
        load_cascade(CFG, "mlflow", uri, stop_at="interpolation")


def test_cli_generate_from_checkpoints(checkpoints, tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="mav")
    add_generate_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["generate", "a red circle", "a blue square", "--preset", "tiny", "--out", str(tmp_path),
                              "--checkpoints", str(checkpoints), "--stop-at", "temporal", "--steps", "2",
                              "--steps", "temporal=3", "--device", "cpu", "--watermark-text", "MAV test",
                              "--seed", "5"])
    assert args.func(args) == 0
    sides = sorted(tmp_path.glob("*.json"))
    assert [p.name for p in sides] == ["000-a-red-circle.json", "001-a-blue-square.json"]
    side = json.loads(sides[1].read_text())
    assert side["stages"]["temporal"]["steps"] == 3 and side["stages"]["prior"]["steps"] == 2
    assert side["seed"] == 6 and side["watermark"]["text"] == "MAV test"
    assert "2 output(s)" in capsys.readouterr().out


def test_registering_the_commands_stays_cheap():
    """`mav --help` must not pay for torch and open_clip: the command imports them when it generates."""
    import subprocess
    import sys

    code = ("import sys, pipelines.cli.generate; "
            "print(sorted(m for m in ('torch', 'open_clip', 'model.cascade', 'mlflow') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
    assert STAGES == STAGE_ORDER
