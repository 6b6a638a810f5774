"""The demo flow's step reuse: a rerun keeps the videos and the evaluation made by the same weights and settings."""
from __future__ import annotations

import json

import pytest

from pipelines.flows.demo import reuse_step


def test_a_step_runs_once_per_inputs_and_again_when_they_change_or_it_was_killed(tmp_path):
    calls = []

    def step(tag):
        def run():
            calls.append(tag)
            return {"made_by": tag, "score": 0.5}
        return run

    inputs = {"weights": {"temporal": {"version": 1, "run_id": "abc"}}, "prompts": ["a red circle"]}
    assert reuse_step(tmp_path / "eval", inputs, step("first")) == ({"made_by": "first", "score": 0.5}, False)
    assert reuse_step(tmp_path / "eval", dict(reversed(list(inputs.items()))), step("again")) == (
        {"made_by": "first", "score": 0.5}, True)  # same inputs (key order aside): not run
    assert calls == ["first"]

    retrained = {**inputs, "weights": {"temporal": {"version": 2, "run_id": "def"}}}
    again = reuse_step(tmp_path / "eval", retrained, step("retrained"))
    assert again == ({"made_by": "retrained", "score": 0.5}, False)
    assert json.loads((tmp_path / "eval" / "step.json").read_text())["inputs"] == retrained

    def killed():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        reuse_step(tmp_path / "videos", inputs, killed)
    assert not (tmp_path / "videos" / "step.json").exists()  # nothing recorded: the rerun runs it
    assert reuse_step(tmp_path / "videos", inputs, step("rerun"))[1] is False
    assert calls == ["first", "retrained", "rerun"]
