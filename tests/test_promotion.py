"""Promotion on evidence in a real sqlite MLflow registry: a registration is the stage's `challenger` (and
`current` only for its first version), `current` moves when the challenger meets the bar or beats the
current's recorded score, a worse challenger - judged by a real toy evaluation of the tiny cascade - leaves
it where it was, and `mav promote` moves it by hand with the reason recorded."""
from __future__ import annotations

import json

import pytest
import torch
from mlflow import MlflowClient

from model.cascade import build_cascade, stages_needed
from model.checkpoint import save_weights
from pipelines.cli import main
from pipelines.config import preset_config
from pipelines.evaluation.promotion import pending, promote_trained, record_evidence, set_candidates
from training.registry import PromotionPolicy, promote_on_evidence
from training.tracking import MlflowTracker

CFG = preset_config("tiny")


def _register(uri: str, states: dict, folder, alias) -> dict[str, int]:
    tracker = MlflowTracker(uri, "weights")
    tracker.start("weights")
    versions = {}
    folder.mkdir(exist_ok=True)
    for stage, state in states.items():
        path = folder / f"{stage}.safetensors"
        save_weights(state, path, {"config": {"cascade": CFG.cascade.model_dump(mode="json")}})
        versions[stage] = tracker.register_weights(stage, str(path), alias=alias)
    tracker.end()
    return versions


def _random_states(seed: int) -> dict:
    torch.manual_seed(seed)
    cascade = build_cascade(CFG.cascade, stages=stages_needed("text", "temporal", CFG.cascade))
    return {"clip": cascade.clip.state_dict(), **{s: n.state_dict() for s, n in cascade.nets.items()}}


def _aliases(client: MlflowClient, stage: str) -> dict[str, int]:
    return {a: int(v) for a, v in client.get_registered_model(f"mav-{stage}").aliases.items()}


def test_policies_parse_and_decide():
    assert PromotionPolicy.parse("none").decide(None, None)[0]
    toy = PromotionPolicy.parse("toy")
    assert toy.decide(1.0, 1.0)[0] and not toy.decide(0.0, 1.0)[0] and not toy.decide(0.0, None)[0]
    fvd = PromotionPolicy.parse("ucf101.fvd")
    assert not fvd.higher_is_better and fvd.bar is None
    assert fvd.decide(300.0, 350.0) == (True, "ucf101.fvd 300 beats the current's 350")
    assert not fvd.decide(400.0, 350.0)[0] and fvd.decide(400.0, None)[0]
    clipsim = PromotionPolicy.parse("msrvtt.clipsim>=0.3")
    assert clipsim.higher_is_better and clipsim.decide(0.31, 0.5)[0] and not clipsim.decide(0.2, 0.25)[0]
    assert PromotionPolicy.parse("ucf101.fvd<=400").decide(390.0, 100.0)[0]
    for bad in ("fvd<=x", "a b", ""):
        with pytest.raises(ValueError, match="promotion"):
            PromotionPolicy.parse(bad)


def test_registration_sets_the_challenger_and_evidence_moves_current(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    state = {"decoder": {"w": torch.zeros(2)}}
    assert _register(uri, state, tmp_path / "a", None) == {"decoder": 1}
    assert _aliases(client, "decoder") == {"challenger": 1, "current": 1}  # a first version is current
    record_evidence(uri, {"decoder": 1}, {"ucf101.fvd": 350.0}, PromotionPolicy.parse("ucf101.fvd"))
    policy = PromotionPolicy.parse("ucf101.fvd")
    for version, fvd, expected_current in ((2, 420.0, 1), (3, 310.0, 3)):
        _register(uri, {"decoder": {"w": torch.full((2,), float(version))}}, tmp_path / str(version), None)
        assert pending(uri, {"decoder": version}) == {"decoder": version}
        decision = promote_on_evidence(uri, "decoder", version, {"ucf101.fvd": fvd}, policy)
        assert decision["promoted"] is (expected_current == version)
        assert _aliases(client, "decoder") == {"challenger": version, "current": expected_current}
    kept = client.get_model_version("mav-decoder", "2").tags
    assert kept["mav.promotion.decision"] == "kept"
    assert "does not beat the current's 350" in kept["mav.promotion.reason"]
    assert client.get_model_version("mav-decoder", "3").tags["mav.eval.ucf101.fvd"] == "310.0"

    assert main(["promote", "decoder", "--version", "2", "--reason", "A/B test on real users",
                 "--tracking-uri", uri]) == 0
    assert "version 3 -> 2" in capsys.readouterr().out
    tags = client.get_model_version("mav-decoder", "2").tags
    assert tags["mav.promotion.decision"] == "manual" and tags["mav.promotion.reason"] == "A/B test on real users"
    assert _aliases(client, "decoder")["current"] == 2
    assert main(["promote", "decoder", "--version", "9", "--reason", "x", "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "mav-decoder/9" in err
    assert _aliases(client, "decoder")["current"] == 2


def test_a_challenger_cascade_that_scores_worse_leaves_current_where_it_was(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    first = _register(uri, _random_states(0), tmp_path / "v1", None)
    policy = PromotionPolicy.parse("toy")
    record_evidence(uri, first, {"eval/quality_bar": 1.0}, policy)  # the current versions passed the bar
    second = _register(uri, _random_states(1), tmp_path / "v2", None)
    assert all(_aliases(client, s) == {"challenger": 2, "current": 1} for s in second)
    decisions = promote_trained(CFG, second, policy, uri, tmp_path / "eval", evaluation={
        "n_prompts": 2, "samples_per_prompt": 1, "stop_at": "temporal"})
    assert set(decisions) == set(second)
    for stage, d in decisions.items():  # random weights fail the toy bar: nothing moves
        assert not d["promoted"] and d["value"] == 0.0 and d["current_value"] == 1.0
        assert _aliases(client, stage) == {"challenger": 2, "current": 1, "candidate": 2}
        assert client.get_model_version(f"mav-{stage}", "2").tags["mav.promotion.decision"] == "kept"
    run = client.search_runs([client.get_experiment_by_name(CFG.train.experiment).experiment_id])[0]
    assert run.data.params["eval.alias"] == "candidate"
    assert all(_aliases(client, s)["candidate"] == 2 for s in second)
    logged = json.load(open(client.download_artifacts(run.info.run_id, "promotion.json", str(tmp_path))))
    assert logged["temporal"]["reason"] == "eval/quality_bar 0 does not beat the current's 1"
    assert promote_trained(CFG, first, policy, uri, tmp_path / "eval2") == {}  # already current: no evaluation
    # One stage retrained alone is judged beside the other stages' current versions, not their challengers.
    assert set_candidates(uri, {"temporal": 2}) == {"clip": 1, "prior": 1, "temporal": 2}
    assert _aliases(client, "prior")["candidate"] == 1
