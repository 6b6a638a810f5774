"""The evaluation stage on the tiny preset: a deterministic prompt set with held-out combinations, a real
evaluation run logged to a sqlite MLflow store (random weights registered there), the quality bar (random
weights fail it, the world's own videos pass it), the Prefect flow's body and the CLI."""
from __future__ import annotations

import argparse
import json

import decord
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from mlflow import MlflowClient
from PIL import Image

from model.cascade import CascadeOutput, build_cascade, stages_needed, to_uint8
from model.checkpoint import save_weights
from pipelines.config import preset_config
from pipelines.cli.evaluate import add_evaluate_commands
from pipelines.evaluation.aggregate import QUALITY_BAR, aggregate, score_videos, stage_reading
from pipelines.evaluation.prompts import PromptSpec, held_out_combinations, parse_prompt, prompt_set, world_config
from pipelines.evaluation.references import load_reference_videos, output_shape
from pipelines.evaluation.run import evaluate_cascade, stage_trace, viewing_size
from pipelines.world import generate_world, world_preset
from training.tracking import MlflowTracker

CFG = preset_config("tiny")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """(world folder, its ground truth as a DataFrame)."""
    root = tmp_path_factory.mktemp("world")
    generate_world(root, world_preset("tiny"))
    return root, pq.read_table(root / "ground_truth.parquet").to_pandas()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A sqlite MLflow store with random tiny weights registered for CLIP, D and every stage text-to-video runs."""
    folder = tmp_path_factory.mktemp("store")
    torch.manual_seed(0)
    cascade = build_cascade(CFG.cascade, stages=("decoder", *stages_needed("text", None, CFG.cascade)))
    states = {"clip": cascade.clip.state_dict(), **{s: n.state_dict() for s, n in cascade.nets.items()}}
    uri = f"sqlite:///{folder}/mlflow.db"
    tracker = MlflowTracker(uri, "weights")
    tracker.start("weights")
    for stage, state in states.items():
        path = folder / f"{stage}.safetensors"
        save_weights(state, path, {"config": {"cascade": CFG.cascade.model_dump(mode="json")}})
        tracker.register_weights(stage, str(path))
    tracker.end()
    return uri


def test_the_prompt_set_is_fixed_and_holds_out_unseen_combinations(world):
    root, truth = world
    wcfg = world_config(root)
    laion = set(zip(*(truth[truth.source == "laion"][c] for c in ("shape", "colour", "background"))))
    held = held_out_combinations(wcfg, root)
    assert held and not held & laion
    assert held == held_out_combinations(world_preset("tiny"))  # the config's plan is the folder's rows
    specs = prompt_set(wcfg, 8, seed=3, held_out=held)
    assert specs == prompt_set(world_preset("tiny"), 8, seed=3, held_out=held)
    assert specs == prompt_set(wcfg, 8, seed=3, held_out=held) and specs != prompt_set(wcfg, 8, seed=4, held_out=held)
    flagged = [s for s in specs if s.held_out]
    assert len(flagged) == 4 and len(specs) == 8
    for s in specs:
        assert ((s.shape, s.colour, s.background) in laion) is not s.held_out
        p = parse_prompt(s.text)  # phrased as the world's captions: the evaluator reads back every field
        assert (p.shape, p.colour, p.background, p.motion) == (s.shape, s.colour, s.background, s.motion)
    assert {s.motion for s in specs} == set(wcfg.motions)
    assert not any(s.held_out for s in prompt_set(wcfg, 4, held_out=[]))
    with pytest.raises(ValueError, match="vocabulary"):
        prompt_set(wcfg, 4, held_out=[("hexagon", "red", "white")])
    with pytest.raises(ValueError, match="n_prompts"):
        prompt_set(wcfg, 0)


def test_evaluate_cascade_logs_the_run(store, world, tmp_path, capsys):
    root, _ = world
    parent = MlflowTracker(store, CFG.train.experiment)
    parent.start("pipeline")
    prompts = prompt_set(world_config(root), 4, seed=0)
    frames, side = output_shape(CFG, None)
    reference = load_reference_videos(root, frames, side, seconds=0.5)
    assert reference[0].shape == (7, 64, 64, 3) and len(reference) >= 5
    result = evaluate_cascade(CFG, weights="mlflow", tracking_uri=store, out_dir=tmp_path, prompts=prompts,
                              samples_per_prompt=2, seed=0, reference_videos=reference,
                              parent_run_id=parent.run_id, device="cpu")
    parent.end()

    assert len(result["rows"]) == 8 and sorted({r["sample"] for r in result["rows"]}) == [0, 1]
    bar = result["summary"]["quality_bar"]
    assert set(bar["checks"]) == {*QUALITY_BAR, "video_text_samples"} and bar["passed"] is False  # no shapes drawn
    assert result["summary"]["all"]["prompt_faithfulness"] < 0.8

    client = MlflowClient(store)
    run = client.get_run(result["run_id"])
    assert run.info.run_name == "evaluate" and run.data.tags["mlflow.parentRunId"] == parent.run_id
    metrics = run.data.metrics
    for key in ("prompt_faithfulness", "temporal_consistency", "motion_share", "frame_quality", "fvd", "clipsim",
                "held_out/prompt_faithfulness", "seen/motion_share"):
        assert f"eval/{key}" in metrics, key
    assert metrics["eval/quality_bar"] == 0.0 and metrics["eval/fvd"] > 0 and -1 <= metrics["eval/clipsim"] <= 1
    assert metrics["eval/prompt_faithfulness"] == pytest.approx(result["summary"]["all"]["prompt_faithfulness"])
    assert run.data.tags["mav.weights.temporal"] == "mav-temporal/1" and run.data.tags["mav.quality_bar"] == "fail"
    params = run.data.params
    assert params["weights.sr_high.version"] == "1" and params["weights.clip.name"] == "mav-clip"
    assert params["eval.samples_per_prompt"] == "2" and "relative" in params["eval.fvd_features"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
    assert {"evaluation/videos.csv", "evaluation/videos.json", "evaluation/samples"} <= artifacts
    assert len(client.list_artifacts(run.info.run_id, "evaluation/samples")) == 4
    with Image.open(tmp_path / "samples" / "000.gif") as gif:  # 64 px videos, shown at 128 px
        assert gif.size == (128, 128) and gif.n_frames == result["rows"][0]["n_frames"]
    logged = json.loads(open(client.download_artifacts(run.info.run_id, "evaluation/videos.json",
                                                       str(tmp_path / "dl"))).read())
    assert len(logged["videos"]) == 8 and logged["videos"][0]["prompt"] == prompts[0].text

    # The store's weights were registered by hand, with no training record: the lineage is not verified.
    lineage = result["summary"]["lineage"]
    assert not lineage["text_free"] and set(lineage["stages"]) == {"temporal", "interpolation", "sr_low"}
    assert all("no training record of its data" in p for p in lineage["problems"]) and len(lineage["problems"]) == 3
    assert not result["summary"]["quality_bar"]["checks"]["video_text_samples"]["passed"]
    assert metrics["eval/video_text_samples"] == 0.0

    # Every video stage of the same calls is read too, in cascade order; the last one is the table's.
    stages = result["summary"]["stages"]
    assert list(stages) == ["temporal", "interpolation", "sr_low", "sr_high"]
    assert stages["sr_high"]["temporal_consistency"] == pytest.approx(result["summary"]["all"]["temporal_consistency"])
    temporal = stages["temporal"]["prompt_faithfulness"]
    assert metrics["eval/stages/temporal/prompt_faithfulness"] == pytest.approx(temporal)

    captured = capsys.readouterr()
    printed = captured.out
    assert "by stage (faithful / consist / shape" in printed and "interpolation " in printed
    assert "evaluation videos" in captured.err and "8/8" in captured.err  # one progress bar over the stage
    assert all(p.text[:40] in printed for p in prompts) and "quality bar: FAIL" in printed
    assert "lineage: video stages (temporal v1, interpolation v1, sr_low v1) trained on 0 clips" in printed
    assert "not verified: temporal v1: no training record of its data" in printed
    assert "all (8 videos)" in printed and "held-out (4 videos)" in printed and "FVD" in printed
    assert (tmp_path / "videos.csv").read_text().count("\n") == 9
    with pytest.raises(ValueError, match="stop_at"):
        evaluate_cascade(CFG, weights="mlflow", tracking_uri=store, out_dir=tmp_path, prompts=prompts, stop_at="prior")


def test_the_worlds_own_videos_pass_the_bar(world):
    root, truth = world
    rows = truth[(truth.source != "laion") & truth.truth.notna() & ~truth.expected.isin(["corrupt", "html"])]
    videos, specs = [], []
    for r in rows.drop_duplicates("sample_id").itertuples():
        reader = decord.VideoReader(str(root / "files" / "videos" / f"{r.sample_id}.mp4"))
        videos.append(reader.get_batch(list(range(0, len(reader), 2))).asnumpy())
        specs.append(PromptSpec(r.caption, r.shape, r.colour, r.background, r.motion, held_out=len(specs) % 2 == 0))
    scores = score_videos(videos, specs)
    summary = aggregate(scores)
    assert summary["quality_bar"]["passed"], summary["quality_bar"]
    # With the lineage: the bar also needs the video data verified text-free.
    clean = {"text_samples": 0, "text_free": True}
    assert aggregate(scores, clean)["quality_bar"]["checks"]["video_text_samples"] == {
        "value": 0, "max": 0, "passed": True}
    assert aggregate(scores, clean)["quality_bar"]["passed"]
    assert not aggregate(scores, {"text_samples": 2, "text_free": False})["quality_bar"]["passed"]
    assert not aggregate(scores, {"text_samples": 0, "text_free": False})["quality_bar"]["passed"]  # unverified
    assert summary["all"]["videos"] == len(videos) >= 5 and summary["held_out"]["motion_share"] == 1.0
    frozen = aggregate(score_videos([np.repeat(v[:1], 8, axis=0) for v in videos], specs))
    assert not frozen["quality_bar"]["passed"] and not frozen["quality_bar"]["checks"]["motion_share"]["passed"]
    assert frozen["quality_bar"]["checks"]["prompt_faithfulness"]["passed"]  # only the motion is missing


def test_cli_runs_the_flow_body_on_a_world(store, world, tmp_path, capsys):
    from pipelines.flows.evaluate import evaluate_flow

    root, _ = world
    parser = argparse.ArgumentParser(prog="mav")
    add_evaluate_commands(parser.add_subparsers(dest="command"), runner=evaluate_flow.fn)
    args = parser.parse_args(["evaluate", "--preset", "tiny", "--out", str(tmp_path), "--tracking-uri", store,
                              "--world", str(root), "--prompts", "2", "--samples", "1", "--stop-at", "temporal"])
    assert args.func(args) == 0
    saved = json.loads((tmp_path / "evaluation.json").read_text())
    assert len(saved["videos"]) == 2 and saved["summary"]["fvd"] > 0
    assert {v["stage"] for v in saved["videos"]} == {"temporal"}
    assert "quality bar:" in capsys.readouterr().out
    assert evaluate_flow.name == "evaluate-cascade"


def test_a_lineage_the_caller_has_is_used_as_given(store, world, tmp_path):
    """The demo reads the lineage once (to print it) and hands it to the evaluation, which must not scan the
    video shards again: the store's own lineage is unverified, the given one is not, and the bar reads the given."""
    from training.lineage import video_lineage

    root, _ = world
    own = video_lineage(store)
    assert not own["text_free"]
    given = {**own, "problems": [], "text_free": True}
    result = evaluate_cascade(CFG, weights="mlflow", tracking_uri=store, out_dir=tmp_path,
                              prompts=prompt_set(world_config(root), 1, seed=0), samples_per_prompt=1,
                              stop_at="temporal", device="cpu", lineage=given)
    assert result["summary"]["lineage"] == given
    assert result["summary"]["quality_bar"]["checks"]["video_text_samples"]["passed"]


def test_the_stage_trace_reads_each_earlier_stage_at_the_final_size(world):
    root, truth = world
    rows = truth[(truth.source != "laion") & truth.truth.notna() & ~truth.expected.isin(["corrupt", "html"])]
    rows = rows.drop_duplicates("sample_id").head(2)
    videos = [decord.VideoReader(str(root / "files" / "videos" / f"{r.sample_id}.mp4")).get_batch(list(range(8)))
              .asnumpy() for r in rows.itertuples()]  # (8, H, W, 3) each
    specs = [PromptSpec(r.caption, r.shape, r.colour, r.background, r.motion) for r in rows.itertuples()]
    clip = torch.from_numpy(np.stack(videos)).permute(0, 4, 1, 2, 3).float() / 127.5 - 1  # (B, C, F, H, W)
    base = torch.nn.functional.avg_pool3d(clip, (1, 2, 2))  # the scenes at 32 px: what Dt would make
    wrong = clip[:, [2, 0, 1]]  # the final stage swaps the colours: a red object turns blue
    result = CascadeOutput(outputs={"prior": torch.zeros(2, 8), "temporal": base, "sr_low": wrong})
    trace = stage_trace(result)
    assert list(trace) == ["temporal"] and trace["temporal"].shape == (2, *videos[0].shape)
    assert trace["temporal"].dtype == np.uint8
    flat = stage_trace(CascadeOutput(outputs={"temporal": torch.full((1, 3, 2, 8, 8), 0.5),
                                              "sr_low": torch.zeros(1, 3, 2, 32, 32)}))["temporal"]
    assert flat.shape == (1, 2, 32, 32, 3) and (flat == 191).all()  # a flat frame stays flat

    final = score_videos(to_uint8(wrong).numpy(), specs)
    reading = stage_reading(trace, specs, final, "sr_low")
    assert list(reading) == ["temporal", "sr_low"]
    assert reading["temporal"]["prompt_faithfulness"] >= 0.9 and reading["temporal"]["colour_accuracy"] >= 0.9
    assert reading["sr_low"]["colour_accuracy"] < 0.5 and reading["sr_low"]["prompt_faithfulness"] < 0.5


def test_registering_the_command_does_not_load_torch():
    import subprocess
    import sys

    code = ("import argparse, sys; from pipelines.cli.evaluate import add_evaluate_commands; "
            "add_evaluate_commands(argparse.ArgumentParser().add_subparsers()); "
            "print(sorted(m for m in ('torch', 'open_clip', 'mlflow', 'model.cascade') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_evaluation_samples_are_enlarged_pixel_for_pixel_to_a_viewable_size():
    video = np.random.default_rng(0).integers(0, 256, (3, 32, 48, 3), dtype=np.uint8)
    big = viewing_size(video)
    assert big.shape == (3, 128, 192, 3)  # factor 4: the shorter side reaches 128
    assert np.array_equal(big[:, ::4, ::4], video) and np.array_equal(big[:, 3::4, 3::4], video)
    assert viewing_size(big) is big and viewing_size(video[:, :30, :30]).shape == (3, 150, 150, 3)


# --- mav evaluate --links: where a prompt is lost before the video stages -----------------------------------

def test_link_renders_are_the_worlds_own_scenes():
    """The retrieval bank holds every (shape, colour) the background allows at each asked size, and the
    scenes D is asked to redraw read as the scene: the decoder link's ceiling is 1."""
    from pipelines.evaluation.links import candidate_renders, prompt_sizes, scene_renders
    from pipelines.evaluation.scorer import detect_object
    from pipelines.world.generate import backgrounds_for

    toy = world_preset("toy")
    assert prompt_sizes(toy, "a small red diamond on a blue background, the camera pans up") == ["small"]
    assert prompt_sizes(toy, "a green circle growing at the top on a black background") == ["small", "medium", "large"]
    labels, images = candidate_renders(toy, "gray", ["small", "large"])
    drawable = [c for c in toy.colours if "gray" in backgrounds_for(toy, c)]
    assert sorted(set(labels)) == sorted((s, c) for s in toy.shapes for c in drawable)
    assert len(labels) == 2 * len(set(labels)) == len(images) and images.shape[1:] == (128, 128, 3)
    assert [(o.shape, o.colour) for o in map(detect_object, images)] == labels
    scenes = scene_renders(toy, "triangle", "red", "black", ["medium"], 6, np.random.default_rng(0))
    assert all((o.shape, o.colour, o.found) == ("triangle", "red", True) for o in map(detect_object, scenes))
    assert len({img.tobytes() for img in scenes}) == 6  # placed and sized as the LAION images are, not one copy


def test_a_prompt_is_lost_at_the_first_wrong_link():
    from pipelines.evaluation.links import first_lost, summarise_links

    row = {"text": 1.0, "prior": 1.0, "decoder": 1.0, "keyframe": 1.0}
    assert first_lost(row) is None and first_lost({**row, "text": 0.0}) is None  # the key frame is right
    assert first_lost({**row, "keyframe": 0.25}) == "keyframe"  # D draws the scene, not from the prior's embedding
    assert first_lost({**row, "keyframe": 0.25, "decoder": 0.0}) == "decoder"
    assert first_lost({**row, "keyframe": 0.0, "prior": 0.0, "decoder": 0.0}) == "prior"
    assert first_lost({**row, "keyframe": 0.0, "text": 0.0, "prior": 0.0}) == "text"
    assert first_lost({**row, "keyframe": 0.0, "text": 0.0}) == "keyframe"  # the prior mended the text's miss
    summary = summarise_links([{**row, "held_out": True}, {**row, "keyframe": 0.0, "held_out": False}])
    assert summary["all"]["keyframe"] == 0.5 and summary["held_out"]["keyframe"] == 1.0
    assert summary["seen"] == {**row, "keyframe": 0.0, "prompts": 1.0}


def test_link_scores_read_what_the_decoder_draws(store, monkeypatch):
    """D's two links are read by the evaluator off D's drawings: a decoder that draws the prompt's scene
    scores 1 on both, one that draws it in another colour 0 (and shows that colour); the retrieval links do
    not depend on D, and the same seed gives the same row."""
    import pipelines.evaluation.links
    from pipelines.evaluation.links import first_lost, link_scores, prompt_sizes, scene_renders
    from pipelines.generate import load_cascade
    from pipelines.world.generate import backgrounds_for

    toy = world_preset("toy")
    spec = PromptSpec.from_text("a large red square drifting up on a black background")
    cascade = load_cascade(CFG, "mlflow", store, stop_at="prior", device="cpu", extra=("decoder",))
    assert set(cascade.nets) == {"prior", "decoder"}
    with pytest.raises(ValueError, match="extra networks"):
        load_cascade(CFG, "mlflow", store, stop_at="prior", device="cpu", extra=("vae",))
    calls = []

    def decoder_drawing(colour):
        def draw(cascade, emb, generator, bar=None):
            calls.append(emb.shape[0])
            images = scene_renders(toy, spec.shape, colour, spec.background, prompt_sizes(toy, spec.text),
                                   emb.shape[0], np.random.default_rng(1))
            return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
        return draw

    monkeypatch.setattr(pipelines.evaluation.links, "decode_images", decoder_drawing("red"))
    right = link_scores(cascade, toy, [spec], draws=3, seed=5)[0]
    assert calls == [6]  # the true embeddings' 3 and the prior's 3, in one batch
    assert right["decoder"] == right["keyframe"] == 1.0 and right["keyframe_shows"] == "red square"
    assert 0.0 <= right["text"] <= 1.0 and right["prior"] in (0.0, 1 / 3, 2 / 3, 1.0) and first_lost(right) is None
    other = next(c for c in toy.colours if c != "red" and "black" in backgrounds_for(toy, c))
    monkeypatch.setattr(pipelines.evaluation.links, "decode_images", decoder_drawing(other))
    wrong = link_scores(cascade, toy, [spec], draws=3, seed=5)[0]
    assert wrong["decoder"] == wrong["keyframe"] == 0.0 and wrong["decoder_shows"] == f"{other} square"
    assert [wrong[k] for k in ("text", "prior", "prior_shows")] == [right[k] for k in ("text", "prior", "prior_shows")]
    assert first_lost(wrong) is not None  # a wrong key frame is always put down to one link
    with pytest.raises(ValueError, match="names no colour"):
        link_scores(cascade, toy, [PromptSpec.from_text("a square on a black background")])


def test_cli_reads_the_links_and_logs_them(store, world, tmp_path, capsys):
    root, _ = world
    parser = argparse.ArgumentParser(prog="mav")
    add_evaluate_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["evaluate", "--preset", "tiny", "--out", str(tmp_path), "--tracking-uri", store,
                              "--world", str(root), "--prompts", "3", "--links", "2"])
    assert args.func(args) == 0
    saved = json.loads((tmp_path / "links.json").read_text())
    prompts = prompt_set(world_config(root), 3, seed=0, held_out=held_out_combinations(world_config(root), root))
    assert [r["prompt"] for r in saved["prompts"]] == [p.text for p in prompts]
    assert all(0.0 <= r[k] <= 1.0 for r in saved["prompts"] for k in ("text", "prior", "decoder", "keyframe"))
    assert {r["draws"] for r in saved["prompts"]} == {2} and saved["summary"]["all"]["prompts"] == 3
    printed = capsys.readouterr().out
    assert "evaluate --links: 3 prompts x 2 draws" in printed and "all (3 prompts)" in printed
    client = MlflowClient(store)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              "attributes.run_name = 'evaluate-links'")
    metrics = next(r for r in runs if r.data.params.get("links.prompts") == "3").data.metrics
    assert metrics["links/keyframe"] == pytest.approx(saved["summary"]["all"]["keyframe"])
    assert "links/held_out/text" in metrics and "links/seen/decoder" in metrics
    with pytest.raises(SystemExit):
        parser.parse_args(["evaluate", "--out", str(tmp_path), "--links", "0"])
    assert "must be >= 1" in capsys.readouterr().err
