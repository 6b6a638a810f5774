"""prefect.yaml: every deployment points at a real flow whose parameters it names correctly."""
from __future__ import annotations

import inspect
from pathlib import Path

import yaml
from prefect import Flow

ROOT = Path(__file__).resolve().parent.parent


def _flow(entrypoint: str) -> Flow:
    """The flow as Prefect's own loader finds it (what a worker does with the entrypoint)."""
    from prefect.flows import load_flow_from_entrypoint

    path, name = entrypoint.split(":")
    return load_flow_from_entrypoint(f"{ROOT / path}:{name}")


def test_deployments_name_real_flows_and_parameters():
    config = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    assert config["deployments"], "prefect.yaml has no deployments"
    for deployment in config["deployments"]:
        flow = _flow(deployment["entrypoint"])
        assert isinstance(flow, Flow), deployment["name"]
        accepted = set(inspect.signature(flow.fn).parameters)
        assert set(deployment.get("parameters", {})) <= accepted, deployment["name"]
        for schedule in deployment.get("schedules", []):
            assert len(schedule["cron"].split()) == 5
