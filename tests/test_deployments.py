"""prefect.yaml for real: a Prefect server, a process work pool, `prefect deploy --all`, a worker.

Everything the way infra/README.md tells an operator to do it, each a subprocess of this test on
127.0.0.1 with its own PREFECT_HOME and sqlite database: the deployments read back from the server
must be prefect.yaml's (schedules included), and flow runs triggered through the API must be picked
up by the worker, run in the project directory and leave their data behind.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from uuid import UUID

import pyarrow.parquet as pq
import pytest
import yaml
from prefect.client.orchestration import SyncPrefectClient
from prefect.flows import load_flow_from_entrypoint
from prefect.utilities.schema_tools import validate

from pipelines.config import load_config
from pipelines.world import rebase_world, serve_world, world_preset
from training.storage import read_manifest
from _procs import kill_session, session_pids

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
PREFECT = str(Path(sys.executable).with_name("prefect"))
PREFECT_YAML = yaml.safe_load((ROOT / "prefect.yaml").read_text())
START_TIMEOUT_S = 120
RUN_TIMEOUT_S = 180


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tail(path: Path, chars: int = 4000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


def _spawn(args: list[str], env: dict[str, str], log: Path, cwd: Path = ROOT) -> subprocess.Popen:
    with log.open("wb") as out:  # the child keeps its own descriptor
        return subprocess.Popen(args, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _stop(proc: subprocess.Popen, grace: float = 20) -> None:
    """SIGTERM the process's group, then SIGKILL whatever is left of its session."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    kill_session(proc.pid)
    proc.wait()
    assert not session_pids(proc.pid), f"processes outlived {proc.args}: {session_pids(proc.pid)}"


def _cli(*args: str, env: dict[str, str]) -> str:
    proc = subprocess.run([PREFECT, *args], env={**env, "COLUMNS": "200"}, cwd=ROOT, capture_output=True, text=True,
                          timeout=300)  # wide enough that tables never cut an id
    assert proc.returncode == 0, f"prefect {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A Prefect server on a free port; yields (api_url, env for CLI subprocesses pointed at it)."""
    home = tmp_path_factory.mktemp("prefect")
    port = _free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": api_url,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false",
           "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home}/prefect.db",
           "PREFECT_WORKER_QUERY_SECONDS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)  # the flows' work stays in the worker's processes here
    # Deployed without it, the pull step keeps `{{ $MAV_PROJECT_DIR }}` and each worker resolves its own.
    env.pop("MAV_PROJECT_DIR", None)
    log = home / "server.log"
    proc = _spawn([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env, log)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        while True:
            assert proc.poll() is None, f"prefect server exited:\n{_tail(log)}"
            assert time.monotonic() < deadline, f"prefect server not healthy in {START_TIMEOUT_S} s:\n{_tail(log)}"
            try:
                with opener.open(f"{api_url}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            time.sleep(0.5)
        yield api_url, env
    finally:
        _stop(proc)


@pytest.fixture(scope="module")
def deployed(server):
    """The operator's two commands, from the repository root: a process pool `local`, then every deployment."""
    api_url, env = server
    _cli("work-pool", "create", "local", "--type", "process", env=env)
    _cli("--no-prompt", "deploy", "--all", env=env)
    return api_url, env


@pytest.fixture(scope="module")
def worker(deployed, tmp_path_factory):
    api_url, env = deployed
    # Started elsewhere: the flows' entrypoints are found only if the pull step moves runs into the project.
    elsewhere = tmp_path_factory.mktemp("worker")
    log = elsewhere / "worker.log"
    proc = _spawn([PREFECT, "worker", "start", "--pool", "local"], {**env, "MAV_PROJECT_DIR": str(ROOT)}, log,
                  cwd=elsewhere)
    try:
        yield api_url, log
    finally:
        _stop(proc)


@pytest.fixture
def client(server):
    with SyncPrefectClient(server[0]) as client:
        yield client


def _run_deployment(api_url: str, name: str, parameters: dict, worker_log: Path):
    """Trigger `flow/deployment` through the API and wait (bounded) for the worker to finish it."""
    with SyncPrefectClient(api_url) as client:
        deployment = client.read_deployment_by_name(name)
        run = client.create_flow_run_from_deployment(deployment.id, parameters=parameters)
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while not (run := client.read_flow_run(run.id)).state.is_final():
            assert time.monotonic() < deadline, (
                f"{name} still {run.state.name} after {RUN_TIMEOUT_S} s; worker log:\n{_tail(worker_log)}")
            time.sleep(1)
    assert run.state.is_completed(), f"{name} ended {run.state.name}: {run.state.message}\n{_tail(worker_log)}"
    return run


def _flow_name(entrypoint: str) -> str:
    path, func = entrypoint.split(":")
    return load_flow_from_entrypoint(f"{ROOT / path}:{func}").name


def test_work_pool_is_a_process_pool(deployed, client):
    pool = client.read_work_pool("local")
    assert pool.type == "process"
    assert not pool.is_paused


def test_every_deployment_is_registered_as_prefect_yaml_says(deployed, client):
    registered = {d.name: d for d in client.read_deployments()}
    assert set(registered) == {d["name"] for d in PREFECT_YAML["deployments"]}
    for spec in PREFECT_YAML["deployments"]:
        deployment = client.read_deployment_by_name(f"{_flow_name(spec['entrypoint'])}/{spec['name']}")
        assert deployment.id == registered[spec["name"]].id
        assert deployment.entrypoint == spec["entrypoint"]
        assert deployment.parameters == spec.get("parameters", {}), spec["name"]
        # What a scheduled run sends: the deployment's own parameters must pass its flow's schema.
        assert validate(deployment.parameters, deployment.parameter_openapi_schema) == [], spec["name"]
        assert deployment.work_pool_name == spec["work_pool"]["name"] == "local"
        # Flow runs start in $MAV_PROJECT_DIR, left to the worker (it was unset at deploy time).
        assert deployment.pull_steps == PREFECT_YAML["pull"]
        schedules = [(s.schedule.cron, s.schedule.timezone, s.active) for s in deployment.schedules]
        assert schedules == [(s["cron"], s["timezone"], s["active"]) for s in spec.get("schedules", [])], spec["name"]


def test_scheduled_refreshes_are_registered_but_paused(deployed, client):
    for name in ("image-data/image-data-refresh", "video-data/video-data-refresh"):
        deployment = client.read_deployment_by_name(name)
        assert len(deployment.schedules) == 1 and not deployment.schedules[0].active, name
        assert deployment.schedules[0].schedule.timezone == "UTC"
    video = client.read_deployment_by_name("video-data/video-data-refresh")
    assert video.parameters["sources"] == [["webvid", "runs/world/webvid.csv"], ["hdvila", "runs/world/hdvila.jsonl"]]


def test_a_schedule_is_turned_on_and_off_with_the_cli(deployed, client):
    """The commands prefect.yaml's header gives an operator (schedule ids from the API here)."""
    _, env = deployed
    name = "video-data/video-data-refresh"
    schedule = client.read_deployment_by_name(name).schedules[0]
    _cli("deployment", "schedule", "resume", name, str(schedule.id), env=env)
    try:
        assert client.read_deployment_by_name(name).schedules[0].active
    finally:
        _cli("deployment", "schedule", "pause", name, str(schedule.id), env=env)
    assert not client.read_deployment_by_name(name).schedules[0].active


@pytest.fixture(scope="module")
def world_run(worker, tmp_path_factory):
    """The toy-world deployment, tiny preset, run by the worker; returns (run, world folder)."""
    api_url, log = worker
    out = tmp_path_factory.mktemp("deployed") / "world"
    run = _run_deployment(api_url, "toy-world/toy-world", {"preset": "tiny", "out": str(out)}, log)
    return run, out


def test_toy_world_deployment_runs_on_the_worker(world_run, client):
    run, out = world_run
    for name in ("laion.parquet", "webvid.csv", "hdvila.jsonl", "ground_truth.parquet", "world.json"):
        assert (out / name).is_file(), name
    tiny = world_preset("tiny")
    assert pq.read_metadata(out / "laion.parquet").num_rows == tiny.n_images
    assert len((out / "webvid.csv").read_text().splitlines()) == tiny.n_videos + 1
    # The run the worker executed is the deployment's, with the parameters given at trigger time.
    assert isinstance(run.deployment_id, UUID)
    assert client.read_deployment(run.deployment_id).name == "toy-world"
    assert run.parameters == {"preset": "tiny", "out": str(out)}


# What each ground-truth category must become: (status, reason).
EXPECTED = {
    "ok": ("written", None), "nsfw": ("filtered", "nsfw"), "watermark": ("filtered", "watermark"),
    "toxic": ("filtered", "toxic"), "too_small": ("filtered", "too_small"), "http_404": ("failed", "http_404"),
    "corrupt": ("failed", "corrupt"), "slow": ("failed", "timeout"),
}


def test_image_data_deployment_downloads_the_served_world(world_run, worker, tmp_path):
    """The nightly refresh, triggered by hand on the world the first deployment wrote."""
    _, root = world_run
    api_url, log = worker
    out = tmp_path / "images"
    # One download process (the tiny world is one shard); the slow row costs one timeout, not two.
    overrides = ["data.images.processes=1", "data.images.retries=0"]
    with serve_world(root, port=0) as served:  # the run's downloads reach it through the flow's egress proxy
        rebase_world(root, served.url)
        _run_deployment(api_url, "image-data/image-data-refresh",
                        {"metadata": [str(root / "laion.parquet")], "out": str(out), "preset": "tiny",
                         "overrides": overrides}, log)
    truth = pq.read_table(root / "ground_truth.parquet").to_pandas().query("source == 'laion'")
    outcomes = {r["row_id"]: (r["status"], r["reason"]) for r in pq.read_table(out / "outcomes.parquet").to_pylist()}
    assert len(outcomes) == len(truth)
    for row in truth.itertuples():
        assert outcomes[row.row] == EXPECTED[row.expected], (row.row, row.expected, row.url)
    manifest = read_manifest(str(out))
    # The run's parameters reached the flow: the tiny preset's image settings with the override applied.
    expected = load_config("tiny", overrides=overrides).data.images
    assert manifest["settings"]["images"] == expected.model_dump(mode="json")
    assert manifest["settings"]["images"]["retries"] == 0
    written = manifest["counts"]["written"]
    assert written == (truth.expected == "ok").sum() == sum(s["samples"] for s in manifest["shards"]) > 0
