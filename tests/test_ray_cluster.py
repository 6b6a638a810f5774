"""The data flows on a real two-node Ray cluster, as at scale: `ray start` twice, RAY_ADDRESS, a driver.

Both nodes run on this machine (on 127.0.0.2, so nothing but loopback is used) with one CPU each,
started with `ray start ... --block` in sessions and a temp dir of their own, so this cluster never
meets the suite's `ray_session` nor any other Ray on the machine; stopping it kills those sessions
(`ray stop` would end every Ray process on the machine). Each job is a separate driver process with
RAY_ADDRESS set: `run_on_cluster(code, env)`.
"""
from __future__ import annotations

import http.server
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from _procs import kill_session, session_pids
from test_image_flow import Canary

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
RAY = str(Path(sys.executable).with_name("ray"))
HOST = "127.0.0.2"  # Ray turns 127.0.0.1 into the machine's public address; other loopback ones it keeps
START_TIMEOUT_S = 120
JOB_TIMEOUT_S = 240


def _free_port(host: str = HOST) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@dataclass
class RayCluster:
    address: str  # GCS host:port, what RAY_ADDRESS names
    dashboard: str
    temp_dir: Path
    env: dict[str, str]  # a driver's environment: RAY_ADDRESS and the cluster's auth token
    nodes: list[subprocess.Popen] = field(default_factory=list)

    def start_node(self, args: list[str], log: Path) -> None:
        with log.open("wb") as out:
            proc = subprocess.Popen([RAY, "start", "--block", "--num-cpus", "1", "--node-ip-address", HOST,
                                     "--temp-dir", str(self.temp_dir), "--object-store-memory", str(100 * 2**20),
                                     "--min-worker-port", "0", "--max-worker-port", "0",
                                     "--dashboard-agent-listen-port", str(_free_port()), *args],
                                    env={k: v for k, v in self.env.items() if k != "RAY_ADDRESS"}, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        self.nodes.append(proc)
        deadline = time.monotonic() + START_TIMEOUT_S
        while b"Ray runtime started" not in log.read_bytes():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray start failed: {' '.join(args)}\n{log.read_text()[-3000:]}")
            time.sleep(0.5)

    def alive_nodes(self) -> int:
        """Alive nodes as the dashboard's state API sees them (the cluster's auth token as bearer)."""
        request = urllib.request.Request(f"{self.dashboard}/api/v0/nodes?limit=10&detail=false",
                                         headers={"Authorization": f"Bearer {self.env['RAY_AUTH_TOKEN']}"})
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never a proxy
        with opener.open(request, timeout=10) as response:
            rows = json.load(response)["data"]["result"]["result"]
        return sum(row["state"] == "ALIVE" for row in rows)

    def stop(self) -> None:
        """Ends every process of the cluster: all of each node's session (Ray workers get groups of their own)."""
        for proc in self.nodes:
            _signal_group(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 5  # Ray keeps no state worth a longer grace
        for proc in self.nodes:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass  # `ray start --block` and the gcs can outlive a SIGTERM
            kill_session(proc.pid)
            proc.wait()

    def leftovers(self) -> list[int]:
        return [pid for proc in self.nodes for pid in session_pids(proc.pid)]


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="module")
def ray_cluster():
    # A short temp dir: Ray's unix sockets live under it and their paths must stay below 108 bytes.
    temp_dir = Path(tempfile.mkdtemp(prefix="mav-ray-", dir="/tmp"))
    port, dashboard_port = _free_port(), _free_port()
    # Token auth as a real cluster has it; the token lives in these environments only.
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(32), "RAY_ADDRESS": f"{HOST}:{port}"}
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    cluster = RayCluster(address=f"{HOST}:{port}", dashboard=f"http://{HOST}:{dashboard_port}",
                         temp_dir=temp_dir, env=env)
    try:
        head = ["--head", "--port", str(port), "--include-dashboard=true", "--dashboard-host", HOST,
                "--dashboard-port", str(dashboard_port), "--ray-client-server-port", str(_free_port())]
        cluster.start_node(head, temp_dir / "head.log")
        cluster.start_node(["--address", cluster.address], temp_dir / "worker.log")
        deadline = time.monotonic() + START_TIMEOUT_S
        while cluster.alive_nodes() < 2:
            assert time.monotonic() < deadline, "the second node never joined"
            time.sleep(1)
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not cluster.leftovers(), f"Ray processes outlived the cluster: {cluster.leftovers()}"


def run_on_cluster(code: str, env: dict[str, str], timeout: float = JOB_TIMEOUT_S) -> subprocess.CompletedProcess:
    """Run `code` as a driver of the cluster (a fresh Python process in the repository root; `env`
    carries RAY_ADDRESS). The driver reports by printing one JSON line prefixed `RESULT `."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def _result(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, f"driver failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, f"driver printed no RESULT line:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(lines[-1][len("RESULT "):])


# --- data: the image flow's downloads as Ray tasks on both nodes ------------------------------

# What each ground-truth category must become: (status, reason).
EXPECTED = {
    "ok": ("written", None), "nsfw": ("filtered", "nsfw"), "watermark": ("filtered", "watermark"),
    "toxic": ("filtered", "toxic"), "too_small": ("filtered", "too_small"), "http_404": ("failed", "http_404"),
    "corrupt": ("failed", "corrupt"), "slow": ("failed", "timeout"),
}

IMAGE_DRIVER = """
    import json, os, time
    import ray
    from ray.util.state import list_tasks
    from pipelines.config import ImageDataConfig
    from pipelines.flows.images import build_image_dataset
    from pipelines.safety import UrlPolicy

    world, out = os.environ["WORLD"], os.environ["OUT"]
    policy = UrlPolicy(allow_public=False, allow_networks=["127.0.0.1/32"], timeout_s=2.0, max_bytes=2**20)
    # Eight rows a shard: several shards, so both one-CPU nodes get download tasks.
    cfg = ImageDataConfig(image_size=32, samples_per_shard=8, processes=1, threads=4, retries=0, distributor="auto")
    manifest = build_image_dataset([world + "/laion.parquet", os.environ["CANARY_ROWS"]], out, cfg, policy)
    assert ray.is_initialized(), "the flow did not use Ray"
    # Task events reach the state API a little after the tasks end.
    deadline = time.monotonic() + 60
    while True:
        tasks = list_tasks(filters=[("name", "=", "ray_download")], detail=True, raise_on_missing_output=False)
        if len(tasks) == len(manifest["shards"]) and all(t.state == "FINISHED" for t in tasks):
            break
        assert time.monotonic() < deadline, [(t.name, t.state) for t in tasks]
        time.sleep(1)
    result = {"manifest": manifest, "gcs": ray.get_runtime_context().gcs_address,
              "nodes": sorted(n["NodeID"] for n in ray.nodes() if n["Alive"]),
              "task_nodes": sorted(t.node_id for t in tasks), "driver_pid": os.getpid(),
              "task_procs": sorted([t.node_id, t.worker_pid] for t in tasks)}
    print("RESULT " + json.dumps(result))
"""


@pytest.fixture(scope="module")
def world(served_world):
    return served_world[0]


@pytest.fixture(scope="module")
def image_job(ray_cluster, served_world, tmp_path_factory):
    """The image dataset built on the cluster: (its folder, the driver's report, what the servers heard:
    the canary's hits and the number of requests the world's server answered). Two rows after the
    world's point at the canary: directly, and through a redirect of the world's server."""
    world, server = served_world
    out = tmp_path_factory.mktemp("cluster") / "images"
    canary = http.server.ThreadingHTTPServer((HOST, 0), Canary)
    threading.Thread(target=canary.serve_forever, daemon=True).start()
    try:
        target = f"http://{HOST}:{canary.server_address[1]}/secret.jpg"
        truth = pq.read_table(world / "ground_truth.parquet").to_pandas().query("source == 'laion'")
        laion = pq.read_table(world / "laion.parquet")
        ok = laion.take([int(truth.query("expected == 'ok'").row.iloc[0])] * 2)  # rows the filters keep
        rows = ok.set_column(ok.schema.get_field_index("URL"), "URL",
                             pa.array([target, f"{server.url}/redirect?to={target}"], ok.schema.field("URL").type))
        pq.write_table(rows, out.parent / "canary.parquet")
        before = len(server.request_log)
        proc = run_on_cluster(IMAGE_DRIVER, {**ray_cluster.env, "WORLD": str(world), "OUT": str(out),
                                             "CANARY_ROWS": str(out.parent / "canary.parquet")})
    finally:
        canary.shutdown()
        canary.server_close()
    return out, _result(proc), {"canary": list(Canary.hits), "world": len(server.request_log) - before}


def test_image_flow_downloads_on_both_nodes_of_a_cluster(ray_cluster, world, image_job):
    out, result, _ = image_job
    assert result["gcs"] == ray_cluster.address
    # The downloads ran as Ray tasks, one per shard, on both nodes of the cluster.
    assert len(result["nodes"]) == 2
    assert set(result["task_nodes"]) == set(result["nodes"])
    manifest = result["manifest"]
    assert len(result["task_nodes"]) == len(manifest["shards"]) >= 2
    # Every input row ends as the world's ground truth says, and the shards hold the written rows.
    truth = pq.read_table(world / "ground_truth.parquet").to_pandas().query("source == 'laion'")
    outcomes = {r["row_id"]: (r["status"], r["reason"]) for r in pq.read_table(out / "outcomes.parquet").to_pylist()}
    assert len(outcomes) == len(truth) + 2 == manifest["rows"]
    for row in truth.itertuples():
        assert outcomes[row.row] == EXPECTED[row.expected], (row.row, row.expected, row.url)
    written = manifest["counts"]["written"]
    assert sum(s["samples"] for s in manifest["shards"]) == written == (truth.expected == "ok").sum()
    canary_rows = [outcomes[len(truth)], outcomes[len(truth) + 1]]  # direct, then through a redirect
    assert canary_rows == [("failed", "refused")] * 2


def test_every_request_is_served_by_a_gate_in_the_process_that_made_it(image_job):
    """The gates' own records (node id, pid): each gate that served or refused a request lives in a
    worker process that ran download tasks; the driver's gate served nothing; both nodes' gates served;
    the canary on 127.0.0.2 heard nothing, directly or through the redirect its gate refused."""
    out, result, heard = image_job
    records = [json.loads(p.read_text()) for p in (out / "_work" / "egress").glob("*/*.json")]
    busy = [r for r in records if r["forwarded"] or r["refused"]["count"] or r["deferred"]["count"]]
    task_procs = {tuple(proc) for proc in result["task_procs"]}
    assert busy and all((r["node_id"], r["pid"]) in task_procs and r["role"] == "worker" for r in busy)
    assert {r["node_id"] for r in busy if r["forwarded"]} == set(result["nodes"])  # both nodes' gates served
    driver = [r for r in records if r["role"] == "driver"]
    assert [r["pid"] for r in driver] == [result["driver_pid"]]
    assert driver[0]["forwarded"] == driver[0]["refused"]["count"] == 0
    assert heard["canary"] == []
    refused = [(url, why) for r in busy for url, why in r["refused"]["sample"]]
    assert len(refused) == 1 and HOST in refused[0][0] and "loopback address" in refused[0][1]
    egress = result["manifest"]["egress"]
    assert egress["refused"]["count"] == 1 and egress["refused"]["sample"] == [list(refused[0])]
    assert sum(r["forwarded"] for r in records) == heard["world"] > 0  # each request through exactly one gate


# --- training: a stage on the same cluster ---------------------------------------------------
# A training stage reaches the cluster the same way: a driver with `ray_cluster.env` (RAY_ADDRESS
# set) through `run_on_cluster`, reading the dataset `image_job` built on this cluster.

TRAIN_DRIVER = """
    import json, os
    import ray
    from pipelines.config import load_config
    from training.jobs import run_stage

    # The clip stage reads only images and captions: the dataset built on this cluster, as it is.
    cfg = load_config("tiny", overrides=["train.clip.steps=2", "train.clip.checkpoint_every=1"])
    result = run_stage("clip", cfg, images=os.environ["IMAGES"], run_root=os.environ["RUN"])
    runs = [e for e in ray.util.state.list_actors(detail=True, raise_on_missing_output=False)
            if e.class_name == "RayTrainWorker"]
    print("RESULT " + json.dumps({"gcs": ray.get_runtime_context().gcs_address, "steps": result.steps,
                                  "version": result.version, "weights": str(result.weights_path),
                                  "worker_nodes": sorted({a.node_id for a in runs}),
                                  "nodes": sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])}))
"""


def test_training_stage_runs_on_the_cluster(ray_cluster, image_job, tmp_path):
    images, _, _ = image_job
    proc = run_on_cluster(TRAIN_DRIVER, {**ray_cluster.env, "IMAGES": str(images), "RUN": str(tmp_path / "run")})
    result = _result(proc)
    assert result["gcs"] == ray_cluster.address
    assert result["steps"] == 2 and result["version"] == 1
    assert Path(result["weights"]).is_file()
    assert result["worker_nodes"] and set(result["worker_nodes"]) <= set(result["nodes"])
