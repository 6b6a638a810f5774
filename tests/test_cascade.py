"""The cascade sampler on the tiny preset with random weights: frame and size arithmetic per stage,
seeds, stop_at, the known frames of interpolation and animation, variation's condition, guidance."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from model.cascade import STAGE_ORDER, build_cascade, stage_network, stage_seed, stages_needed
from model.cascade_stages import (decode_images, frame_jumps, frame_similarity, image_embedding, keyframe_hooks,
                                  keyframe_index, sample_masked, sample_prior, sample_temporal, super_resolve_high,
                                  super_resolve_low, text_embedding, video_embedding)
from model.cascade_uses import animate_image, interpolate_images, text_to_video, to_base, vary_video
from model.clip import tokenize
from model.config import cascade_preset
from model.frames import linear_fill, mask_from_indices, spread_indices
from model.layers import resize
from model.metrics import clip_similarities

PROMPT = ["a red circle on a blue background"]


@pytest.fixture(scope="module")
def cascade():
    torch.manual_seed(0)
    return build_cascade(cascade_preset("tiny"))


@pytest.fixture(scope="module")
def full(cascade):
    return text_to_video(cascade, PROMPT, fps=8, seed=3, progress=False)


def test_sizes_and_frames_follow_the_config(full):
    # tiny: 4 frames at 16 px -> (4-1)*2+1 = 7 frames -> 32 px -> 64 px
    shapes = {stage: tuple(full[stage].shape) for stage in STAGE_ORDER}
    assert shapes == {"prior": (1, 32), "temporal": (1, 3, 4, 16, 16), "interpolation": (1, 3, 7, 16, 16),
                      "sr_low": (1, 3, 7, 32, 32), "sr_high": (1, 3, 7, 64, 64)}
    for stage in STAGE_ORDER[1:]:
        assert full[stage].min() >= -1 and full[stage].max() <= 1
    assert torch.allclose(full["prior"].norm(dim=-1), torch.ones(1))
    assert full.fps == {"temporal": 8.0, "interpolation": 16.0, "sr_low": 16.0, "sr_high": 16.0}
    assert set(full.timings_s) == set(STAGE_ORDER) and full.last_stage == "sr_high"


def test_same_seed_same_video_other_seed_another(cascade, full):
    again = text_to_video(cascade, PROMPT, fps=8, seed=3, progress=False)
    for stage in STAGE_ORDER:
        assert torch.equal(again[stage], full[stage]), stage
    other = text_to_video(cascade, PROMPT, fps=8, seed=4, stop_at="temporal", progress=False)
    assert not torch.equal(other["temporal"], full["temporal"])


def test_stop_at_runs_a_prefix_with_the_same_results(cascade, full):
    out = text_to_video(cascade, PROMPT, fps=8, seed=3, stop_at="interpolation", progress=False)
    assert list(out.outputs) == ["prior", "temporal", "interpolation"]
    assert torch.equal(out["interpolation"], full["interpolation"])  # per-stage seeds: a prefix is the same run
    assert list(text_to_video(cascade, PROMPT, 8, 3, stop_at="prior", progress=False).outputs) == ["prior"]
    with pytest.raises(ValueError, match="stop_at"):
        text_to_video(cascade, PROMPT, 8, 3, stop_at="decoder", progress=False)


def test_interpolation_starts_from_the_blend_of_its_neighbours(cascade):
    """fill_strength < 1 (SDEdit): the known frames are still held exactly and the new frames start from the
    noised linear blend of their neighbours - near it at a low strength even under random weights, far from
    it when sampled from pure noise (strength 1)."""
    video = torch.rand(2, 3, 4, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    known = mask_from_indices([0, 3], 4)
    blend = linear_fill(video, known)
    away = {}
    for strength in (1.0, 0.02):
        stage = cascade.cfg.interpolation.model_copy(update={"fill_strength": strength})
        cfg = cascade.cfg.model_copy(update={"interpolation": stage})
        out = sample_masked(dataclasses.replace(cascade, cfg=cfg), video, known, torch.randn(2, 32), 8.0,
                            torch.Generator().manual_seed(0))
        assert torch.equal(out[:, :, known], video[:, :, known])
        away[strength] = (out - blend)[:, :, ~known].abs().mean().item()
    assert away[0.02] < 0.1 < 0.3 < away[1.0]


def test_interpolation_holds_the_base_frames_exactly(full):
    assert torch.equal(full["interpolation"][:, :, ::2], full["temporal"])  # frame skip 2
    assert not torch.equal(full["interpolation"][:, :, 1], full["interpolation"][:, :, 0])


def test_two_images_stay_first_and_last_at_any_length(cascade):
    torch.manual_seed(1)
    a, b = torch.rand(1, 3, 24, 24) * 2 - 1, torch.rand(1, 3, 24, 24) * 2 - 1
    out = interpolate_images(cascade, a, b, fps=4, seed=0, stop_at="interpolation", target_frames=10, progress=False)
    base, video = out["temporal"], out["interpolation"]
    assert base.shape[2] == 4 and video.shape[2] == 10
    assert torch.equal(base[:, :, 0], to_base(cascade, a)) and torch.equal(base[:, :, -1], to_base(cascade, b))
    assert torch.equal(video[:, :, spread_indices(4, 10)], base)
    assert out.fps["interpolation"] == pytest.approx(4 * 9 / 3)


def test_animation_keeps_the_image_as_frame_zero(cascade):
    torch.manual_seed(2)
    image = torch.rand(2, 3, 40, 40) * 2 - 1
    out = animate_image(cascade, image, fps=8, seed=5, stop_at="temporal", progress=False)
    base = out["temporal"]  # (2, 3, 4, 16, 16), before any SR
    assert torch.allclose(base[:, :, 0], to_base(cascade, image), atol=1e-6)
    assert (base[:, :, 1:] - base[:, :, :1]).abs().max() > 1e-3  # the other frames are generated
    assert torch.allclose(out["prior"][0], video_embedding(cascade, image[:1, :, None])[0], atol=1e-5)


def test_vary_conditions_on_the_mean_embedding_and_skips_the_prior(cascade):
    torch.manual_seed(3)
    video = torch.rand(1, 3, 5, 32, 32) * 2 - 1
    seen, prior_calls = [], []
    hooks = [cascade.net("temporal").register_forward_pre_hook(lambda m, a, kw: seen.append(kw["cond_emb"]),
                                                               with_kwargs=True),
             cascade.net("prior").register_forward_pre_hook(lambda m, a: prior_calls.append(1))]
    try:
        out = vary_video(cascade, video, fps=8, seed=0, stop_at="temporal", progress=False)
    finally:
        for hook in hooks:
            hook.remove()
    frames = torch.stack([video_embedding(cascade, video[:, :, i:i + 1])[0] for i in range(5)])  # (5, D)
    mean = torch.nn.functional.normalize(frames.mean(0), dim=-1)
    assert torch.allclose(out["prior"][0], mean, atol=1e-5)
    assert not prior_calls and len(seen) == cascade.cfg.temporal.sampler.steps
    assert all(torch.allclose(c[0], mean, atol=1e-5) for c in seen)
    assert out.seeds.keys() == {"temporal"}  # the embedding is computed, not sampled


def test_guidance_runs_every_stage_with_both_branches(cascade, full):
    cfg = cascade.cfg.model_copy(deep=True)
    for stage in STAGE_ORDER:
        getattr(cfg, stage).sampler.guidance_scale = 2.0
    guided = text_to_video(dataclasses.replace(cascade, cfg=cfg), PROMPT, fps=8, seed=3, progress=False)
    assert guided["sr_high"].shape == full["sr_high"].shape
    assert not torch.equal(guided["temporal"], full["temporal"])
    assert torch.equal(guided["interpolation"][:, :, ::2], guided["temporal"])  # known frames held under CFG too


def _sr_input(frames: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(4)
    low = torch.rand(1, 3, frames, size, size) * 2 - 1
    return low, torch.nn.functional.normalize(torch.randn(1, 32), dim=-1)


def test_sr_high_chunking_does_not_change_the_result():
    cascade = build_cascade(cascade_preset("tiny"))
    cascade.net("sr_high").conv_out.spatial.reset_parameters()  # SR nets start at zero output
    low, emb = _sr_input(3, 32)
    outs = [super_resolve_high(dataclasses.replace(cascade, sr_high_chunk=chunk), low, emb,
                               torch.Generator().manual_seed(0)) for chunk in (1, 8)]
    assert outs[0].shape == (1, 3, 3, 64, 64)
    assert not torch.allclose(outs[0], resize(low, 64), atol=1e-3)
    assert torch.allclose(outs[0], outs[1], atol=1e-5)


def test_untrained_residual_sr_stages_return_the_bilinear_upsample():
    """tiny's SR stages diffuse the difference to the upsampled input and predict x0: before any training
    they give the plain upsample, and a trained net's detail is added to it within the pixel range."""
    cascade = build_cascade(cascade_preset("tiny"))
    assert cascade.cfg.sr_low.diffusion.residual and cascade.cfg.sr_high.diffusion.residual
    low, emb = _sr_input(3, 16)
    mid = super_resolve_low(cascade, low, emb, 8.0, torch.Generator().manual_seed(0))
    torch.testing.assert_close(mid, resize(low, 32), atol=1e-6, rtol=0)
    high = super_resolve_high(cascade, mid, emb, torch.Generator().manual_seed(0))
    torch.testing.assert_close(high, resize(mid, 64), atol=1e-6, rtol=0)
    cascade.net("sr_low").conv_out.spatial.reset_parameters()
    moved = super_resolve_low(cascade, low, emb, 8.0, torch.Generator().manual_seed(0))
    assert not torch.allclose(moved, mid, atol=1e-3)
    assert moved.abs().max() <= 1


def test_stages_needed_per_use():
    assert stages_needed("text") == ("prior", "temporal", "interpolation", "sr_low", "sr_high")
    assert stages_needed("text", "temporal") == ("prior", "temporal")
    assert stages_needed("animate", "temporal") == ("interpolation",)
    assert stages_needed("vary", "prior") == ()
    assert stages_needed("vary", "sr_low") == ("temporal", "interpolation", "sr_low")
    assert stage_network("interpolate", "temporal") == "interpolation" and stage_network("vary", "prior") == "clip"
    with pytest.raises(ValueError, match="use"):
        stages_needed("edit")


def test_keyframe_is_the_decoders_image_held_in_dts_video(cascade):
    """`temporal.keyframe`: D draws one frame per row from the same embedding (the draw D makes of an image
    with that generator), Dt's video holds it exactly at the key index and samples the other frames around
    it; the loader then needs D as well as Dt."""
    torch.manual_seed(0)
    cascade = build_cascade(cascade.cfg, stages=("decoder", "temporal"))
    emb = torch.nn.functional.normalize(torch.randn(2, 32, generator=torch.Generator().manual_seed(1)), dim=-1)
    plain = sample_temporal(cascade, emb, 8, torch.Generator().manual_seed(5))
    s = cascade.cfg.shape
    for keyframe, index in (("first", 0), ("middle", (s.frames - 1) // 2)):
        cfg = cascade.cfg.model_copy(deep=True)
        cfg.temporal.keyframe = keyframe
        video = sample_temporal(dataclasses.replace(cascade, cfg=cfg), emb, 8, torch.Generator().manual_seed(5))
        image = decode_images(cascade, emb, torch.Generator().manual_seed(5))
        assert keyframe_index(keyframe, s.frames) == index
        assert video.shape == plain.shape and torch.equal(video[:, :, index], image)
        assert not torch.equal(video[:, :, index], plain[:, :, index])
        others = [i for i in range(s.frames) if i != index]
        assert not torch.allclose(video[:, :, others], video[:, :, [index]].expand_as(video[:, :, others]))
        assert stages_needed("text", "temporal", cfg) == ("decoder", "prior", "temporal")
        assert stages_needed("vary", "temporal", cfg) == ("decoder", "temporal")
        assert stages_needed("animate", None, cfg) == ("interpolation", "sr_low", "sr_high")  # F, not Dt
        assert stages_needed("text", "prior", cfg) == ("prior",)
    assert keyframe_index("none", s.frames) is None and stages_needed("text", "temporal", cascade.cfg) == (
        "prior", "temporal")
    # keyframe_strength < 1: every frame starts from the key frame, noised (SDEdit); near 0 they stay it.
    spread = {}
    for strength in (1.0, 0.05):
        cfg.temporal.keyframe_strength = strength
        video = sample_temporal(dataclasses.replace(cascade, cfg=cfg), emb, 8, torch.Generator().manual_seed(5))
        assert torch.equal(video[:, :, index], image)
        spread[strength] = (video - image[:, :, None]).abs().mean().item()
    assert spread[0.05] < 0.25 * spread[1.0]
    # keyframe_guidance > 0: reconstruction guidance pulls the other frames through Dt's temporal layers -
    # none while they are the identity (frames independent), some once they mix frames; the key frame stays.
    cfg.temporal.keyframe_strength = 1.0
    guided_cfg = cfg.model_copy(deep=True)
    guided_cfg.temporal.keyframe_guidance = 5.0
    for mixing in (False, True):
        if mixing:
            with torch.no_grad():
                for name, p in cascade.net("temporal").named_parameters():
                    if ".temporal." in name:
                        p.add_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
        runs = [sample_temporal(dataclasses.replace(cascade, cfg=c), emb, 8, torch.Generator().manual_seed(5))
                for c in (cfg, guided_cfg)]
        assert torch.equal(runs[1][:, :, index], image)
        assert torch.allclose(runs[0], runs[1], atol=1e-5) is not mixing
    # keyframe_guidance_stop: the last share of the schedule unguided; all of it is no guidance at all.
    for stop in (1.0, 0.5):
        guided_cfg.temporal.keyframe_guidance_stop = stop
        stopped = sample_temporal(dataclasses.replace(cascade, cfg=guided_cfg), emb, 8,
                                  torch.Generator().manual_seed(5))
        assert torch.equal(stopped[:, :, index], image)
        assert torch.equal(stopped, runs[0]) is (stop == 1.0) and not torch.equal(stopped, runs[1])
    with pytest.raises(ValueError, match="keyframe_guidance"):
        type(cfg.temporal).model_validate({**cfg.temporal.model_dump(), "keyframe_guidance": -1.0})


def test_keyframe_draws_give_the_candidates_the_draws_closest_to_the_text(cascade):
    """`temporal.keyframe_draws` m: D draws m key frames per base video, and each prompt's k candidates get
    the k of its k*m draws whose CLIP image embeddings are closest to its text embedding, best first (the
    draws D makes of k*m copies of the embedding with that generator); without a target, or with m = 1, one
    draw per row as before. With one candidate Dt's video holds the best draw."""
    torch.manual_seed(0)
    cascade = build_cascade(cascade.cfg, stages=("decoder", "temporal"))
    prompts, k, m = PROMPT + ["a green square on a white background"], 2, 3
    emb = torch.nn.functional.normalize(torch.randn(len(prompts), 32, generator=torch.Generator().manual_seed(1)),
                                        dim=-1)
    target = text_embedding(cascade, prompts)
    s = cascade.cfg.shape
    cfg = cascade.cfg.model_copy(deep=True)
    cfg.temporal.keyframe, cfg.temporal.keyframe_draws = "middle", m
    drawn = dataclasses.replace(cascade, cfg=cfg)
    index = keyframe_index("middle", s.frames)
    shape = (len(prompts) * k, s.channels, s.frames, s.base_size, s.base_size)
    draws = decode_images(cascade, emb.repeat_interleave(k * m, dim=0), torch.Generator().manual_seed(5))
    scores = torch.einsum("pnd,pd->pn", image_embedding(cascade, draws).view(len(prompts), k * m, -1), target)
    order = scores.argsort(dim=1, descending=True)
    grouped = draws.view(len(prompts), k * m, *draws.shape[1:])
    assert not torch.allclose(grouped[:, 0], grouped[:, 1])  # the draws differ
    hooks = keyframe_hooks(drawn, emb.repeat_interleave(k, dim=0), shape, torch.Generator().manual_seed(5), target)
    best = grouped[torch.arange(len(prompts))[:, None], order[:, :k]].flatten(0, 1)  # (P*k, C, H, W)
    torch.testing.assert_close(hooks["x_known"][:, :, index], best)
    # without a target the draws are not ranked: one per row, as with m = 1
    plain = keyframe_hooks(drawn, emb.repeat_interleave(k, dim=0), shape, torch.Generator().manual_seed(5))
    cfg1 = cfg.model_copy(deep=True)
    cfg1.temporal.keyframe_draws = 1
    one = keyframe_hooks(dataclasses.replace(cascade, cfg=cfg1), emb.repeat_interleave(k, dim=0), shape,
                         torch.Generator().manual_seed(5), target)
    assert torch.equal(plain["x_known"], one["x_known"]) and plain["x_known"].shape == shape
    # one candidate: Dt's video holds each prompt's best of its m draws at the key index
    single = decode_images(cascade, emb.repeat_interleave(m, dim=0), torch.Generator().manual_seed(5))
    top = torch.einsum("pnd,pd->pn", image_embedding(cascade, single).view(len(prompts), m, -1), target).argmax(1)
    video = sample_temporal(drawn, emb, 8, torch.Generator().manual_seed(5), target=target)
    torch.testing.assert_close(video[:, :, index], single.view(len(prompts), m, *single.shape[1:])[
        torch.arange(len(prompts)), top])
    data = cascade.cfg.model_dump()
    data["temporal"]["keyframe_draws"] = 2
    with pytest.raises(ValueError, match="keyframe_draws ranks D's key frames: set temporal.keyframe"):
        type(cascade.cfg).model_validate(data)
    data = cfg.model_dump()
    data["decoder"]["keyframe_draws"] = 2
    with pytest.raises(ValueError, match="temporal stage only.*decoder"):
        type(cfg).model_validate(data)


def test_stage_seeds_are_stable_and_distinct():
    seeds = {stage_seed(7, s) for s in STAGE_ORDER}
    assert len(seeds) == len(STAGE_ORDER) and stage_seed(7, "prior") == stage_seed(7, "prior")
    assert stage_seed(7, "prior") != stage_seed(8, "prior")
    assert stage_seed(0, "prior") == 5808915875746014367  # fixed across processes and Python versions


def test_shared_frame_noise_starts_identity_temporal_layers_on_one_image(cascade):
    """Dt's temporal layers start as the identity, so before training it is the image decoder run per
    frame: with independent noise per frame its frames are unrelated samples; with most of the noise
    shared by the frames (diffusion.frame_noise_share, PYoCo's mixed noise) they start as one image."""
    spread = {}
    for share in (0.0, 0.95):
        cfg = cascade.cfg.model_copy(deep=True)
        cfg.temporal.diffusion.frame_noise_share = share
        video = text_to_video(dataclasses.replace(cascade, cfg=cfg), PROMPT, 8, 3, stop_at="temporal",
                              progress=False)["temporal"]
        spread[share] = (video - video.mean(dim=2, keepdim=True)).pow(2).mean().item()  # variance over frames
    assert spread[0.95] < 0.2 * spread[0.0]


def test_prior_candidates_keep_the_one_closest_to_the_text(cascade):
    """DALL-E 2's re-ranking: with `prior.candidates` k, each prompt's k embeddings are the ones k copies of
    the prompt would get in one batch (same seed), and the one kept has the highest dot product with the
    prompt's CLIP text embedding."""
    prompts, k = PROMPT + ["a green square on a white background"], 3
    repeated = [p for p in prompts for _ in range(k)]
    each = sample_prior(cascade, repeated, torch.Generator().manual_seed(5)).view(len(prompts), k, -1)  # (B, K, D)
    cfg = cascade.cfg.model_copy(deep=True)
    cfg.prior.candidates = k
    chosen = sample_prior(dataclasses.replace(cascade, cfg=cfg), prompts, torch.Generator().manual_seed(5))
    tokens = tokenize(cascade.clip, cascade.tokenizer, prompts)
    text = torch.nn.functional.normalize(cascade.clip.encode_text(tokens).float(), dim=-1)  # (B, D)
    scores = torch.einsum("bkd,bd->bk", each, text)
    assert not torch.allclose(each[:, 0], each[:, 1])  # the candidates differ
    torch.testing.assert_close(chosen, each[torch.arange(len(prompts)), scores.argmax(dim=1)])
    assert chosen.shape == (len(prompts), cfg.prior.net.embed_dim)


def test_temporal_candidates_keep_the_video_closest_to_the_text(cascade):
    """Re-ranking at the video level: with `temporal.candidates` k and a target, each row's k base videos are
    the ones k copies of its embedding get in one batch (same seed), and the one kept has the highest CLIPSIM
    with its prompt as the evaluation computes it (`metrics.clip_similarities`). Without a target k is unread."""
    prompts, k = PROMPT + ["a green square on a white background"], 3
    emb = torch.nn.functional.normalize(torch.randn(len(prompts), 32, generator=torch.Generator().manual_seed(1)),
                                        dim=-1)
    each = sample_temporal(cascade, emb.repeat_interleave(k, dim=0), 8, torch.Generator().manual_seed(5))
    cfg = cascade.cfg.model_copy(deep=True)
    cfg.temporal.candidates = k
    ranked = dataclasses.replace(cascade, cfg=cfg)
    chosen = sample_temporal(ranked, emb, 8, torch.Generator().manual_seed(5), target=text_embedding(cascade, prompts))
    pixels = ((each + 1) / 2).permute(0, 2, 3, 4, 1)  # (B*K, F, H, W, 3) in [0, 1]
    scores = clip_similarities(cascade.clip, cascade.tokenizer, pixels,
                               [p for p in prompts for _ in range(k)]).view(len(prompts), k)
    each = each.view(len(prompts), k, *each.shape[1:])
    assert not torch.allclose(each[:, 0], each[:, 1])  # the candidates differ
    torch.testing.assert_close(chosen, each[torch.arange(len(prompts)), scores.argmax(dim=1)])
    unranked = sample_temporal(ranked, emb, 8, torch.Generator().manual_seed(5))
    assert torch.equal(unranked, sample_temporal(cascade, emb, 8, torch.Generator().manual_seed(5)))


def test_jump_penalty_ranks_candidates_by_clipsim_less_their_largest_jump(cascade):
    """With `temporal.jump_penalty` w, a candidate's score is its CLIPSIM less w times log(largest / median
    change between consecutive frames); a large w keeps the evenest candidate. An object moving evenly scores
    no jump, one that leaps across the frame half-way scores a large one, a video of < 3 frames none."""
    prompts, k = PROMPT + ["a green square on a white background"], 4
    emb = torch.nn.functional.normalize(torch.randn(len(prompts), 32, generator=torch.Generator().manual_seed(1)),
                                        dim=-1)
    each = sample_temporal(cascade, emb.repeat_interleave(k, dim=0), 8, torch.Generator().manual_seed(5))
    target = text_embedding(cascade, prompts)
    similarity = frame_similarity(cascade, each, target.repeat_interleave(k, dim=0))
    jumps = frame_jumps(each)
    steps = (each[:, :, 1:] - each[:, :, :-1]).abs().mean(dim=(1, 3, 4))
    torch.testing.assert_close(jumps, torch.log((steps.max(1).values + 1e-4) / (steps.median(1).values + 1e-4)))
    for weight in (0.3, 100.0):
        cfg = cascade.cfg.model_copy(deep=True)
        cfg.temporal.candidates, cfg.temporal.jump_penalty = k, weight
        chosen = sample_temporal(dataclasses.replace(cascade, cfg=cfg), emb, 8, torch.Generator().manual_seed(5),
                                 target=target)
        best = (similarity - weight * jumps).view(len(prompts), k).argmax(dim=1)
        grouped = each.view(len(prompts), k, *each.shape[1:])
        torch.testing.assert_close(chosen, grouped[torch.arange(len(prompts)), best])
    assert torch.equal(best, jumps.view(len(prompts), k).argmin(dim=1))  # w = 100: the evenest candidate

    def square_at(xs):  # (1, 3, F, 16, 16): a white 4x4 square at column x of frame f, on black
        video = -torch.ones(1, 3, len(xs), 16, 16)
        for f, x in enumerate(xs):
            video[:, :, f, 6:10, x:x + 4] = 1.0
        return video

    even, leap = square_at([0, 1, 2, 3, 4, 5, 6, 7]), square_at([0, 1, 2, 3, 10, 11, 12, 12])
    assert frame_jumps(even).item() == pytest.approx(0.0, abs=1e-3)
    assert frame_jumps(leap).item() > math.log(1.5)
    assert frame_jumps(leap[:, :, :2]).item() == 0.0


def test_candidates_only_where_they_are_read():
    cfg = cascade_preset("tiny")
    cfg.temporal.candidates = 4
    assert cfg.temporal.candidates == 4
    data = cfg.model_dump()
    data["sr_low"]["candidates"] = 2
    with pytest.raises(ValueError, match="prior and temporal stages only.*sr_low"):
        type(cfg).model_validate(data)
    data = cfg.model_dump()
    data["decoder"]["jump_penalty"] = 1.0
    with pytest.raises(ValueError, match="temporal stage only.*decoder"):
        type(cfg).model_validate(data)
