"""The paper preset trains for real: each stage's memory plan fills its accumulation, checkpointing and sharding
(a field the config sets wins), a stage that cannot fit fails before any worker starts, and CLIP comes from a
local open_clip file, without which training refuses to start."""
from __future__ import annotations

import pytest
import torch

from model.checkpoint import save_weights
from model.clip import build_clip
from pipelines.cli import main
from pipelines.config import ConfigError, load_config
from pipelines.flows.train import train_cascade
from training.config import STAGES
from training.job import Job
from training.jobs import job_config, resolve, resolve_all, stages_for
from training.plan import GIB, PLANNED_STAGES, plan_cascade
from training.stages import build_stage, requires


@pytest.fixture(scope="module")
def paper():
    cfg = load_config("paper")
    return cfg, resolve_all(PLANNED_STAGES, cfg)  # traces every stage on the meta device (~15 s)


def test_the_paper_jobs_carry_each_stages_plan(paper):
    cfg, resolved = paper
    for stage in PLANNED_STAGES:
        plan = resolved[stage][2]
        assert plan is not None and plan.fits, stage
        job = job_config(stage, cfg, "/data", "/runs", resolved=resolved[stage])
        train = job["train"]
        assert (train["grad_accum"], train["grad_checkpointing"], train["sharding"]) == (
            plan.grad_accum, plan.checkpointing, plan.sharding), stage
        assert plan.micro_batch * plan.grad_accum * train["num_workers"] == train["batch_size"] == 256
        if stage != "prior":  # the prior is a transformer: no U-Net blocks to checkpoint
            assert job["cascade"][stage]["net"]["grad_checkpointing"] is plan.checkpointing
        assert Job.from_config(job).train.grad_accum == plan.grad_accum  # what every worker rebuilds
    assert resolved["sr_low"][2].checkpointing and not resolved["decoder"][2].checkpointing
    # The same figures `mav plan --gpus 8 --gpu-memory 80GB` prints.
    (printed,) = plan_cascade(cfg.cascade, cfg.train, ("sr_low",), 8, 80 * GIB)
    assert (printed.grad_accum, printed.checkpointing, printed.sharding) == (
        resolved["sr_low"][2].grad_accum, True, resolved["sr_low"][1].sharding)


def test_a_field_the_config_sets_wins_over_the_plan():
    cfg = load_config("paper", overrides=["train.sr_low.grad_accum=2", "train.sr_low.grad_checkpointing=false"])
    cascade, train, plan = resolve("sr_low", cfg)
    assert plan.checkpointing and plan.grad_accum != 2  # what the plan alone would have chosen
    assert (train.grad_accum, train.grad_checkpointing, train.sharding) == (2, False, plan.sharding)
    assert cascade.sr_low.net.grad_checkpointing is False


def test_the_tiny_preset_trains_as_configured_without_a_plan():
    cfg = load_config("tiny")
    for stage in STAGES:
        cascade, train, plan = resolve(stage, cfg)
        assert plan is None and cascade == cfg.cascade
        assert (train.grad_accum, train.grad_checkpointing, train.sharding) == (1, False, "ddp")
        unset = {"grad_accum": None, "grad_checkpointing": None, "sharding": None}
        assert train.model_copy(update=unset) == cfg.train.stage(stage)


def test_a_stage_that_cannot_fit_stops_mav_train_before_any_worker(tmp_path, capsys):
    weights = tmp_path / "ViT-L-14.safetensors"
    weights.write_bytes(b"not read: the plan fails first")
    code = main(["train", "all", "--preset", "paper", "--out", str(tmp_path / "runs"), "--images", str(tmp_path),
                 "--set", f"cascade.clip.weights_path={weights}", "--set", "train.sr_high.num_workers=1",
                 "--set", "train.sr_high.gpu_memory=2GB"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "stage sr_high cannot fit 1 x 2GB" in err and "GiB usable" in err
    assert not (tmp_path / "runs").exists()  # no stage started, not even the prior


def test_the_paper_preset_refuses_to_train_without_a_clip_file(tmp_path, capsys):
    assert main(["train", "all", "--preset", "paper", "--out", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--set cascade.clip.weights_path=/path/ViT-L-14.safetensors" in err
    missing = load_config("paper", overrides=[f"cascade.clip.weights_path={tmp_path / 'none.safetensors'}"])
    with pytest.raises(FileNotFoundError, match="cascade.clip.weights_path: no file at"):
        train_cascade(["all"], missing, run_root=str(tmp_path / "runs"))
    assert not (tmp_path / "runs").exists()


def test_a_pretrained_clip_file_replaces_the_clip_stage(tmp_path, capsys):
    tiny = load_config("tiny")
    model, _, _ = build_clip(tiny.cascade.clip)
    path = save_weights(model, tmp_path / "clip.safetensors", {})
    cfg = load_config("tiny", overrides=[f"cascade.clip.weights_path={path}", "train.pretrained_clip=true"])
    assert stages_for(["all"], cfg.cascade) == [s for s in STAGES if s != "clip"]
    assert "clip" not in requires("prior", cfg.cascade) and "clip" in requires("prior", tiny.cascade)

    def registry(stage: str):
        raise AssertionError(f"{stage} loaded from the registry")

    torch.manual_seed(1)  # another random init: only the file can make the weights agree
    stage, _ = build_stage("prior", cfg.cascade, registry)
    loaded, saved = stage.clip.state_dict(), model.state_dict()
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)
    with pytest.raises(ConfigError, match="stage clip: .* it is not trained"):
        train_cascade(["clip"], cfg, run_root=str(tmp_path / "runs"))
