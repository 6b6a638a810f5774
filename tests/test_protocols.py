"""The paper's zero-shot protocols on tiny stand-ins in the real layouts: a UCF-101 folder of three classes
of .avi clips, an MSR-VTT annotation file with its test videos, random-weight I3D / Inception (TorchScript,
the StyleGAN-V/StyleGAN3 calling conventions), C3D and CLIP (state dicts) in local files, and the tiny
cascade's random weights in a checkpoint folder. Each protocol runs whole and logs to a sqlite MLflow store;
a rerun skips the made videos; the feature paths' preprocessing is checked on its own."""
from __future__ import annotations

import csv
import json
import subprocess

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from model.c3d import C3D, C3DClassifier, c3d_input
from model.cascade import build_cascade, stages_needed
from model.checkpoint import save_weights
from model.clip import build_clip
from model.config import ClipConfig
from model.feature_extractors import I3DExtractor, InceptionExtractor, i3d_input
from model.metrics import RunningStats, feature_statistics, fid, fid_of_stats, inception_score
from pipelines.cli import main
from pipelines.config import ConfigError, preset_config
from pipelines.evaluation.datasets import class_prompts, class_text, msrvtt_captions, read_clip, ucf101_classes
from pipelines.evaluation.msrvtt import evaluate_msrvtt
from pipelines.evaluation.ucf101 import evaluate_ucf101
from pipelines.outputs import FFMPEG, write_mp4

CFG = preset_config("tiny")
CLASSES = ("ApplyEyeMakeup", "JumpRope", "YoYo")


class TinyI3D(torch.nn.Module):
    """StyleGAN-V's i3d_torchscript.pt interface: (B, 3, F, H, W) in [0, 255] -> features."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(3, 8, 3, stride=2)

    def forward(self, x: torch.Tensor, rescale: bool = True, resize: bool = True,
                return_features: bool = True) -> torch.Tensor:
        if rescale:
            x = x / 127.5 - 1
        return torch.relu(self.conv(x)).mean(dim=(2, 3, 4))


class TinyInception(torch.nn.Module):
    """StyleGAN3's inception-2015-12-05.pt interface: (B, 3, H, W) in [0, 255] -> pool features."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 6, 3, stride=2)

    def forward(self, x: torch.Tensor, return_features: bool = True) -> torch.Tensor:
        return torch.relu(self.conv(x / 127.5 - 1)).mean(dim=(2, 3))


def _avi(frames: np.ndarray, path) -> None:
    f, h, w, _ = frames.shape
    subprocess.run([FFMPEG, "-loglevel", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}",
                    "-r", "25", "-i", "-", "-c:v", "mpeg4", "-q:v", "2", str(path)],
                   input=frames.tobytes(), check=True)


def _clip(rng: np.random.Generator, frames: int = 12, h: int = 24, w: int = 32) -> np.ndarray:
    """A coloured square drifting over a flat background: (F, H, W, 3) uint8."""
    video = np.full((frames, h, w, 3), rng.integers(0, 255, 3), np.uint8)
    x, y = rng.integers(0, w - 8), rng.integers(0, h - 8)
    for t in range(frames):
        video[t, y:y + 8, (x + t) % (w - 8):(x + t) % (w - 8) + 8] = rng.integers(0, 255, 3)
    return video


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Local model files, the cascade's weights folder, the two datasets and a sqlite store."""
    root = tmp_path_factory.mktemp("protocols")
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    torch.jit.script(TinyI3D()).save(str(root / "i3d_torchscript.pt"))
    torch.jit.script(TinyInception()).save(str(root / "inception.pt"))
    c3d = C3D(num_classes=len(CLASSES), widths=(2, 2, 2, 2, 2), hidden=8).state_dict()
    save_weights({**c3d, "mean": torch.full((3, 1, 1, 1), 100.0)}, root / "c3d.safetensors")
    clip, _, _ = build_clip(ClipConfig(model_name="mav-tiny-clip", embed_dim=32, image_size=32, context_length=16))
    save_weights(clip.state_dict(), root / "clip.safetensors")
    cascade = build_cascade(CFG.cascade, stages=stages_needed("text", None, CFG.cascade))
    states = {"clip": cascade.clip.state_dict(), **{s: n.state_dict() for s, n in cascade.nets.items()}}
    (root / "weights").mkdir()
    for stage, state in states.items():
        save_weights(state, root / "weights" / f"{stage}.safetensors",
                     {"config": {"cascade": CFG.cascade.model_dump(mode="json")}})
    for name in CLASSES:
        (root / "ucf" / name).mkdir(parents=True)
        for c in (1, 2):
            _avi(_clip(rng), root / "ucf" / name / f"v_{name}_g01_c0{c}.avi")
    (root / "ucf" / "notes").mkdir()  # a folder without clips is not a class
    (root / "msrvtt" / "videos" / "all").mkdir(parents=True)
    for vid in ("video7010", "video7011", "video1"):
        write_mp4(_clip(rng, h=32), root / "msrvtt" / "videos" / "all" / f"{vid}.mp4", 25)
    annotation = {"videos": [{"video_id": "video7010", "split": "test"}, {"video_id": "video7011", "split": "test"},
                             {"video_id": "video1", "split": "train"}],
                  "sentences": [{"video_id": "video7010", "caption": "a man is cooking", "sen_id": 0},
                                {"video_id": "video1", "caption": "a train caption", "sen_id": 1},
                                {"video_id": "video7011", "caption": "a dog runs on grass", "sen_id": 2},
                                {"video_id": "video7010", "caption": "someone stirs a pot", "sen_id": 3}]}
    (root / "msrvtt" / "MSRVTT_data.json").write_text(json.dumps(annotation))
    return root


def test_ucf101_names_and_msrvtt_captions_come_from_the_datasets_own_layouts(files):
    assert ucf101_classes(files / "ucf") == list(CLASSES)
    assert [class_text(c) for c in CLASSES] == ["apply eye makeup", "jump rope", "yo yo"]
    assert class_prompts(["JumpRope"], ["a person doing {}", "{}"]) == {"JumpRope": ["a person doing jump rope",
                                                                                     "jump rope"]}
    with pytest.raises(ValueError, match="exactly one"):
        class_prompts(["JumpRope"], ["no slot"])
    with pytest.raises(FileNotFoundError, match=r"UCF-101 not found.*msrvtt"):
        ucf101_classes(files / "msrvtt")
    captions = msrvtt_captions(files / "msrvtt" / "MSRVTT_data.json")
    assert captions == [("video7010", "a man is cooking"), ("video7011", "a dog runs on grass"),
                        ("video7010", "someone stirs a pot")]
    clip = read_clip(files / "ucf" / "YoYo" / "v_YoYo_g01_c01.avi", frames=16, side=20)
    assert clip.shape == (16, 20, 20, 3) and clip.dtype == np.uint8


def test_i3d_and_c3d_inputs_follow_the_reference_preprocessing(files):
    video = torch.zeros(2, 10, 48, 64, 3, dtype=torch.uint8)
    video[:, :, :, 32:] = 255
    x = i3d_input(video)
    assert x.shape == (2, 3, 10, 224, 224) and x.min() == -1 and x.max() == 1
    assert torch.allclose(x, i3d_input(video.float() / 255))  # uint8 and [0, 1] floats agree
    mean = torch.full((3, 1, 1, 1), 100.0)
    clips = c3d_input(video, mean)
    assert clips.shape == (2, 3, 16, 112, 112)  # 10 frames padded with the last to 16
    assert clips.min() == -100 and clips.max() == 155
    net = C3DClassifier(files / "c3d.safetensors")
    assert net(video).shape == (2, len(CLASSES)) and torch.equal(net.mean[:, 0, 0, 0], torch.full((3,), 100.0))
    scripted = I3DExtractor(files / "i3d_torchscript.pt")
    assert scripted.scripted and scripted(video).shape == (2, 8)
    assert InceptionExtractor(files / "inception.pt")(video[:, 0]).shape == (2, 6)


def test_running_statistics_match_the_whole_set_and_is_matches_a_hand_computed_value():
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(50, 4)), rng.normal(1.0, 2.0, size=(40, 4))
    stats_a, stats_b = RunningStats(4), RunningStats(4)
    for part in np.array_split(a, 3):
        stats_a.update(part)
    stats_b.update(b)
    mean, cov = feature_statistics(a)
    assert np.allclose(stats_a.statistics()[0], mean) and np.allclose(stats_a.statistics()[1], cov)
    assert fid_of_stats(stats_a, stats_b) == pytest.approx(fid(a, b), rel=1e-9)
    # p(y|x) = (1, 0) and (1/2, 1/2): p(y) = (3/4, 1/4), KLs log(4/3) and (log(2/3) + log 2) / 2.
    expected = np.exp((np.log(4 / 3) + (np.log(2 / 3) + np.log(2)) / 2) / 2)
    assert inception_score(np.array([[1.0, 0.0], [0.5, 0.5]]), splits=1)[0] == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(1.24081, abs=1e-5)


@pytest.mark.slow
def test_ucf101_protocol_runs_on_ray_logs_to_mlflow_and_resumes(files, tmp_path, ray_session):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    kw = dict(dataset_root=files / "ucf", out=tmp_path / "ucf", i3d=files / "i3d_torchscript.pt",
              c3d=files / "c3d.safetensors", weights=str(files / "weights"), tracking_uri=uri, samples=6,
              templates=["a video of {}"], stop_at="temporal", actors=1, batch_size=2, feature_batch=4)
    first = evaluate_ucf101(CFG, **kw)
    assert first["counts"] == {"made": 6, "skipped": 0, "failed": 0}
    assert first["metrics"]["fvd"] > 0 and 1.0 <= first["metrics"]["is"] <= len(CLASSES)
    assert first["metrics"]["real_clips"] == 6
    with open(tmp_path / "ucf" / "table.csv") as fh:
        table = list(csv.DictReader(fh))
    assert [r["class"] for r in table] == list(CLASSES) and all(r["samples"] == "2" for r in table)
    assert all(0 <= float(r["c3d_top1"]) <= 1 for r in table)
    client = MlflowClient(uri)
    run = client.get_run(first["run_id"])
    assert run.data.metrics["ucf101.fvd"] == pytest.approx(first["metrics"]["fvd"])
    assert run.data.tags["mav.protocol"] == "ucf101" and run.data.tags["mav.weights.temporal"].startswith("sha256:")
    logged = {a.path for a in client.list_artifacts(first["run_id"], "evaluation")}
    assert {"evaluation/table.csv", "evaluation/grid.png", "evaluation/summary.json"} <= logged
    made = sorted((tmp_path / "ucf" / "videos").glob("*.npy"))
    stamps = {p: p.stat().st_mtime_ns for p in made}
    made[-1].unlink()  # a lost sample: the rerun remakes its batch only
    again = evaluate_ucf101(CFG, **{**kw, "actors": 0})
    assert again["counts"] == {"made": 2, "skipped": 4, "failed": 0}
    assert all(p.stat().st_mtime_ns == stamps[p] for p in made[:4])
    assert again["metrics"]["fvd"] == pytest.approx(first["metrics"]["fvd"], rel=1e-4)  # same seeds, same videos


def test_msrvtt_protocol_runs_in_process_and_logs_clipsim_and_fid(files, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    result = evaluate_msrvtt(CFG, dataset_root=files / "msrvtt", out=tmp_path / "msrvtt",
                             clip=files / "clip.safetensors", inception=files / "inception.pt",
                             clip_model="mav-tiny-clip", weights=str(files / "weights"), tracking_uri=uri,
                             stop_at="temporal", actors=0)
    assert result["counts"] == {"made": 3, "skipped": 0, "failed": 0}
    assert -1 <= result["metrics"]["clipsim"] <= 1 and result["metrics"]["fid"] > 0
    assert result["metrics"]["real_videos"] == 2
    with open(tmp_path / "msrvtt" / "table.csv") as fh:
        rows = {r["video_id"]: int(r["captions"]) for r in csv.DictReader(fh)}
    assert rows == {"video7010": 2, "video7011": 1}
    run = MlflowClient(uri).get_run(result["run_id"])
    assert run.data.metrics["msrvtt.clipsim"] == pytest.approx(result["metrics"]["clipsim"])


def test_missing_model_files_and_datasets_are_one_clear_line(files, tmp_path, capsys):
    base = ["evaluate", "--preset", "tiny", "--out", str(tmp_path / "o"), "--weights", str(files / "weights")]
    assert main(base + ["--protocol", "ucf101", "--dataset-root", str(files / "ucf"),
                        "--c3d", str(files / "c3d.safetensors"), "--i3d", str(tmp_path / "none.pt")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "I3D weights not found" in err and "none.pt" in err and "--i3d" in err
    assert main(base + ["--protocol", "msrvtt", "--dataset-root", str(tmp_path), "--inception",
                        str(files / "inception.pt"), "--clip-weights", str(files / "clip.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "MSR-VTT annotations not found" in err and str(tmp_path) in err
    (tmp_path / "ann").mkdir()
    (tmp_path / "ann" / "test_videodatainfo.json").write_text(json.dumps(
        {"sentences": [{"video_id": "video9", "caption": "x"}, {"video_id": "video9", "caption": "y"}]}))
    assert main(base + ["--protocol", "msrvtt", "--dataset-root", str(tmp_path / "ann"), "--inception",
                        str(files / "inception.pt"), "--clip-weights", str(files / "clip.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "MSR-VTT video video9 not found" in err
    assert not (tmp_path / "o" / "videos").exists()  # nothing generated before the inputs were checked


def test_a_reference_video_that_does_not_decode_is_one_error_naming_it(tmp_path):
    bad = tmp_path / "v_Bad_g01_c01.avi"
    bad.write_bytes(b"not a video")
    with pytest.raises(ConfigError, match=f"reference video {bad} does not decode"):
        read_clip(bad, 4, 16)
