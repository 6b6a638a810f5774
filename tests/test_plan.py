"""The memory plan: the meta-device trace against the bytes really saved for backward on the CPU, and the
choices the plan makes for the paper preset and for clusters too small for it."""
from __future__ import annotations

import json

import pytest
import torch

from model.config import cascade_preset
from model.networks import build_network
from pipelines.cli import main
from training.config import train_preset
from training.plan import GIB, parse_memory, plan_stage, saved_bytes, stage_inputs, state_bytes, trace_stage

PAPER_STAGES = ("prior", "decoder", "temporal", "interpolation", "sr_low", "sr_high")


@pytest.mark.parametrize("stage", ["prior", "decoder", "temporal", "interpolation", "sr_low", "sr_high"])
def test_meta_trace_matches_the_bytes_saved_on_the_cpu(stage):
    """Batches of 1 and 2 traced on meta, extrapolated to 3, against a real fp32 forward of 3 samples on the CPU
    counted by saved-tensor hooks (each storage once, parameters out): within 15%."""
    cfg = cascade_preset("tiny")
    trace = trace_stage(stage, cfg, "fp32")
    torch.manual_seed(0)
    net = build_network(stage, cfg).train()
    inputs = stage_inputs(stage, cfg, torch.device("cpu"), torch.float32, batch=3)
    inputs = {k: (torch.randn_like(v) if v.is_floating_point() and k != "fps" else v) for k, v in inputs.items()}
    real, blocks = saved_bytes(net, inputs)
    assert real > 0 and (blocks or stage == "prior")  # the prior is a transformer: no U-Net blocks
    assert abs(trace.activations(3) - real) / real < 0.15, (trace.activations(3), real)


def test_checkpointing_keeps_block_inputs_and_one_block():
    trace = trace_stage("temporal", cascade_preset("tiny"), "fp32")
    assert 0 < trace.saved_bytes_checkpointed < trace.saved_bytes / 2
    assert trace.forward_flops > 0 and trace.params > 0


def test_mav_plan_fits_the_paper_preset_on_eight_80gb_gpus(capsys):
    assert main(["plan", "--preset", "paper", "--gpus", "8", "--gpu-memory", "80GB", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    plans = {p["stage"]: p for p in report["stages"]}
    assert list(plans) == list(PAPER_STAGES)
    for p in plans.values():
        assert p["fits"], (p["stage"], p["why"])
        assert p["peak_bytes"] <= 80 * GIB and p["micro_batch"] * p["grad_accum"] * 8 == 256
        assert p["step_time_s"] > 0 and p["flops_per_sample"] > 0
    assert plans["sr_low"]["checkpointing"]  # 16 frames at 256 px: no micro-batch of 4 fits without it
    assert not plans["decoder"]["checkpointing"]  # images at 64 px fit the whole per-GPU batch


def test_mav_plan_exits_1_naming_the_stage_that_cannot_fit(capsys):
    assert main(["plan", "--preset", "paper", "--gpus", "1", "--gpu-memory", "16GB", "--stage", "sr_low"]) == 1
    out = capsys.readouterr().out
    assert "DOES NOT FIT" in out and "sr_low cannot fit 1 x 16GB" in out


def test_a_cluster_too_small_is_named_stage_by_stage():
    trace = trace_stage("temporal", cascade_preset("tiny"), "fp32")
    train = train_preset("tiny").temporal.model_copy(update={"batch_size": 8})
    roomy = plan_stage("temporal", trace, train, 2, 80 * GIB, 1e12, 0.5)
    assert roomy.fits and roomy.sharding == "ddp" and not roomy.checkpointing and roomy.micro_batch == 4
    # State that only fits sharded over 2 GPUs: FSDP is chosen.
    memory = 3 * GIB + int((state_bytes(10**8, 10**8, 2) + 8 * trace.saved_bytes) / 0.9) + 1
    tight = plan_stage("temporal", trace.__class__(10**8, trace.saved_bytes, trace.saved_bytes_checkpointed,
                                                   trace.forward_flops), train, 2, memory, 1e12, 0.5)
    assert tight.fits and tight.sharding == "fsdp"
    tiny_gpu = plan_stage("temporal", trace.__class__(10**10, 1, 1, 1), train, 2, 4 * GIB, 1e12, 0.5)
    assert not tiny_gpu.fits and "GiB usable" in tiny_gpu.why


def test_memory_sizes_read_as_gpus_quote_them():
    assert parse_memory("80GB") == parse_memory("80GiB") == parse_memory("80g") == 80 * GIB
    with pytest.raises(ValueError, match="80GB"):
        parse_memory("lots")
