"""The egress gates of one download run: a gate in every process that downloads, on every node.

A gate (`pipelines.egress.EgressProxy`) listens on 127.0.0.1 of the process that runs it, so its
address means something only on its own machine. Rather than one gate on the driver (unreachable from
other nodes, and one GIL for every byte of the run), each downloader process starts its own gate the
first time it needs one, from the run's `GateSpec` (policy, record folder, run id) carried in the
environment variable `MAV_EGRESS_GATE`:
- Ray tasks of img2dataset: `ray_runtime_env()` puts the spec in `env_vars` and names
  `start_worker_gate` as the `worker_process_setup_hook`, which starts the gate when the worker
  process starts and installs urllib's opener through it (img2dataset fetches with `urlopen`).
  A Ray job's runtime_env is fixed when `ray.init` runs, so `init_ray` refuses (one line) a process
  where Ray is already initialised without this run's gates, instead of letting tasks fetch ungated.
- video2dataset shards (Ray tasks or a process pool): `ShardRunner` resolves the gate in the process
  that runs the shard (`gate_env`), and `CheckedDownloader` asks `local_gate_url` at each fetch.
- img2dataset's own process pool (one node) goes through the driver's gate: img2dataset spawns those
  workers itself, with no hook to start a gate in them; the driver's gate is on their machine.
Nothing but the spec crosses processes; no loopback address is sent to another node. A `resolve`
given to `GateRun` (tests' fake DNS) serves the driver's gate only; the other gates ask the system.
Why a gate per process rather than one node-pinned actor per node: a task could not learn the actor's
port before urllib builds its opener, every byte of a node would cross one more process and one GIL,
and a gate that lives in its downloader's process ends with it. The cost: per-host limits hold per
gate (`pipelines.hosts`). The hook is job-wide, so later Ray tasks of the same driver (training in
the demo flow) also start a gate; it routes only their urllib requests.

Every gate writes a small record (node id, pid, counts by reason, bounded samples;
`pipelines.egress_record`) to `record_dir/<run id>/<gate id>.json` through fsspec (storage every node
reaches; the run id is a hash of the folder and the policy, so a job's attempts add up): at most once a
`FLUSH_S` while it changes, at exit, after each video shard, and when asked by a GET of
/_gate/flush on its own port (`GateRun.records()` asks every node's gates through a Ray task pinned
to that node). `summary()` adds the records up; its size depends on the gates, not the rows.

    with GateRun(policy, record_dir=join(out, "_work", "egress")) as gates:
        run_downloaders(env=gates.env())  # or ray.init(runtime_env=gates.ray_runtime_env())
        manifest["egress"] = gates.summary()
"""
from __future__ import annotations

import atexit
import hashlib
import json
import logging
import os
import socket
import sys
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass

import fsspec

from pipelines.egress import FLUSH_PATH, EgressProxy
from pipelines.egress_record import merge
from pipelines.safety import Resolver, UrlPolicy, system_resolve

log = logging.getLogger(__name__)

GATE_VAR = "MAV_EGRESS_GATE"
HOOK = "pipelines.gates.start_worker_gate"
FLUSH_S = 1.0  # a changing record is written at most this often
KEEP_GATES = 4  # gates of other runs kept open in one long-lived worker process


class GateError(RuntimeError):
    """A download cannot be given its gate; the message is one line that says what to do."""


@dataclass(frozen=True)
class GateSpec:
    """What a process needs to start its gate for a run."""

    run_id: str
    record_dir: str
    policy: str  # UrlPolicy as JSON

    def to_env(self) -> str:
        return json.dumps({"run_id": self.run_id, "record_dir": self.record_dir, "policy": self.policy})

    @classmethod
    def from_env(cls, text: str) -> "GateSpec":
        return cls(**json.loads(text))


def node_id() -> str:
    """The Ray node this process runs on, or its host name outside Ray (never imports Ray)."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        try:
            return ray.get_runtime_context().get_node_id()
        except Exception:  # noqa: BLE001 - a Ray without a node id here: name the host instead
            pass
    return "host:" + socket.gethostname()


class GateRecorder:
    """Writes one gate's record: throttled while it changes, and at once on `flush()`."""

    def __init__(self, proxy: EgressProxy, spec: GateSpec, role: str) -> None:
        self.proxy, self.spec, self.role = proxy, spec, role
        self.gate_id = uuid.uuid4().hex[:12]
        self.path = f"{spec.record_dir.rstrip('/')}/{spec.run_id}/{self.gate_id}.json"
        self.port = int(proxy.url.rsplit(":", 1)[1])
        self._dirty, self._stop, self._write_lock = threading.Event(), threading.Event(), threading.Lock()
        proxy.counters.on_change = self._dirty.set
        proxy.on_flush = self.settle_and_flush
        self.flush()
        self._thread = threading.Thread(target=self._loop, name="egress-record", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while self._dirty.wait() and not self._stop.is_set():
            self._stop.wait(FLUSH_S)
            self.flush()

    def record(self) -> dict:
        return {"run_id": self.spec.run_id, "gate_id": self.gate_id, "role": self.role, "node_id": node_id(),
                "hostname": socket.gethostname(), "pid": os.getpid(), "port": self.port, "written_at": time.time(),
                **self.proxy.counters.snapshot()}

    def flush(self) -> None:
        with self._write_lock:
            self._dirty.clear()
            try:
                write_json(self.path, self.record())
            except OSError as err:
                log.warning("egress gate record %s not written: %s", self.path, err)

    def settle_and_flush(self) -> None:
        """Flush once the requests in flight have ended (a client may have its last byte a moment before
        the gate has counted it), waiting at most the policy's timeout_s."""
        deadline = time.monotonic() + self.proxy.policy.timeout_s
        while self.proxy.counters.active and time.monotonic() < deadline:
            time.sleep(0.01)
        self.flush()

    def close(self) -> None:
        self._stop.set()
        self._dirty.set()
        self.flush()


def write_json(path: str, value: dict) -> None:
    fs, local = fsspec.core.url_to_fs(path)
    fs.makedirs(local.rsplit("/", 1)[0], exist_ok=True)
    data = json.dumps(value).encode()
    if "file" in fs.protocol:  # readers never see half a file: write aside, then rename
        part = f"{local}.{os.getpid()}.part"
        fs.pipe_file(part, data)
        fs.mv(part, local)
    else:  # an object store's put is whole or nothing
        fs.pipe_file(local, data)


def read_records(record_dir: str, run_id: str) -> list[dict]:
    fs, root = fsspec.core.url_to_fs(f"{record_dir.rstrip('/')}/{run_id}")
    records = []
    for path in sorted(fs.glob(root + "/*.json")):
        try:
            records.append(json.loads(fs.cat_file(path)))
        except (OSError, ValueError) as err:
            log.warning("egress gate record %s unreadable: %s", path, err)
    return records


# --- the gate of this process, per run -------------------------------------------------------

_GATES: dict[str, tuple[EgressProxy, GateRecorder]] = {}
_GATES_LOCK = threading.Lock()


def process_gate(spec: GateSpec) -> EgressProxy:
    """This process's gate for the run, started on first use."""
    with _GATES_LOCK:
        if spec.run_id not in _GATES:
            if not _GATES:
                atexit.register(_flush_at_exit)
            workers = [run_id for run_id, (_, rec) in _GATES.items() if rec.role == "worker"]
            for run_id in workers[: max(0, len(workers) + 1 - KEEP_GATES)]:
                _stop(*_GATES.pop(run_id))
            proxy = EgressProxy(UrlPolicy.model_validate_json(spec.policy)).__enter__()
            _GATES[spec.run_id] = (proxy, GateRecorder(proxy, spec, "worker"))
        return _GATES[spec.run_id][0]


def _stop(proxy: EgressProxy, recorder: GateRecorder) -> None:
    recorder.close()
    proxy.__exit__(None, None, None)


def _flush_at_exit() -> None:
    for _, recorder in list(_GATES.values()):
        recorder.flush()


def flush_process_gates() -> None:
    """Write the record of every gate in this process now (after a shard, at exit)."""
    with _GATES_LOCK:
        recorders = [rec for _, rec in _GATES.values()]
    for recorder in recorders:
        recorder.settle_and_flush()


def gate_env(env: dict[str, str]) -> dict[str, str]:
    """`env` with its proxy variables pointed at this process's gate for the run it names."""
    if GATE_VAR not in env:
        return env
    return {**env, **process_gate(GateSpec.from_env(env[GATE_VAR])).env()}


def local_gate_url(default: str) -> str:
    """The proxy a downloader in this process uses: its gate for the run in the environment, else `default`."""
    text = os.environ.get(GATE_VAR)
    return process_gate(GateSpec.from_env(text)).url if text else default


def start_worker_gate() -> None:
    """Ray's worker_process_setup_hook: start this worker's gate and make it urllib's proxy, which is how
    img2dataset fetches (`urlopen` through the installed opener). Only urllib: the job's other clients
    (Ray's own, MLflow's requests, boto) keep their routes; with no_proxy emptied no host bypasses it."""
    text = os.environ.get(GATE_VAR)
    if not text:
        raise GateError(f"{HOOK} needs {GATE_VAR} in the runtime_env's env_vars")
    url = process_gate(GateSpec.from_env(text)).url
    os.environ.update({"no_proxy": "", "NO_PROXY": ""})  # urllib's ProxyHandler reads its exceptions from these
    urllib.request.install_opener(urllib.request.build_opener(urllib.request.ProxyHandler({"http": url,
                                                                                          "https": url})))


def ray_runtime_env_for(env: dict[str, str]) -> dict:
    """The runtime_env that gives each Ray worker process its own gate (the spec, never an address)."""
    if GATE_VAR not in env:
        raise GateError(f"no {GATE_VAR} in the proxy environment: pass GateRun.env()")
    return {"env_vars": {GATE_VAR: env[GATE_VAR]}, "worker_process_setup_hook": HOOK}


def init_ray(env: dict[str, str], address: str | None) -> None:
    """Connect this process to Ray with the run's gates in the job's runtime_env."""
    import ray  # seconds to import: only where Ray runs the downloads

    runtime_env = ray_runtime_env_for(env)
    if not ray.is_initialized():
        ray.init(address=address, runtime_env=runtime_env)
        return
    current = (ray.get_runtime_context().runtime_env or {}).get("env_vars") or {}
    if current.get(GATE_VAR) != env[GATE_VAR]:
        raise GateError("Ray is already initialised in this process without this run's egress gates, so its "
                        "download tasks would fetch ungated; run the download in a fresh process")


def flush_node_gates(record_dir: str, run_id: str) -> int:
    """On one node: ask each live gate of the run on this node to write its record; how many did."""
    # A gate started outside Ray names its host instead of a Ray node: on this machine, that is this node too.
    here, done = {node_id(), "host:" + socket.gethostname()}, 0
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # the gate itself, never via a proxy
    for rec in read_records(record_dir, run_id):
        if rec.get("node_id") not in here or not _alive(rec["pid"]):
            continue
        if rec["pid"] == os.getpid():
            flush_process_gates()
            done += 1
            continue
        try:
            with opener.open(f"http://127.0.0.1:{rec['port']}{FLUSH_PATH}", timeout=10) as reply:
                done += reply.status == 200
        except OSError as err:
            log.warning("egress gate %s (pid %s) not flushed: %s", rec["gate_id"], rec["pid"], err)
    return done


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def flush_remote_gates(record_dir: str, run_id: str, records: list[dict]) -> None:
    """Ask the gates in other processes to write their records, one Ray task on each node that has one."""
    ray = sys.modules.get("ray")
    nodes = {r["node_id"] for r in records if r.get("pid") != os.getpid() and not r["node_id"].startswith("host:")}
    if not nodes or ray is None or not ray.is_initialized():
        return
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(num_cpus=0, max_retries=0)(flush_node_gates)
    refs = [task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(record_dir,
                                                                                                       run_id)
            for node in sorted(nodes)]
    try:
        ray.get(refs, timeout=60)
    except Exception as err:  # noqa: BLE001 - a node gone since: its gates' last records stand
        log.warning("egress gates not all flushed: %s", err)


class GateRun:
    """The gates of one run; a context manager. The driver's own gate serves this process and the
    processes it spawns itself (`env()`); other downloader processes start theirs from the spec."""

    def __init__(self, policy: UrlPolicy, record_dir: str, resolve: Resolver = system_resolve) -> None:
        self.policy = policy
        self.record_dir = record_dir
        spec = policy.model_dump_json()
        # One id per output folder and policy: the rounds and attempts of a job add up under it, and a
        # Ray job started for one round keeps serving the next (its runtime_env names the same spec).
        self.spec = GateSpec(hashlib.sha256(f"{record_dir}\n{spec}".encode()).hexdigest()[:12], record_dir, spec)
        self._local = EgressProxy(policy, resolve)
        self._recorder: GateRecorder | None = None

    def __enter__(self) -> "GateRun":
        self._local.__enter__()
        self._recorder = GateRecorder(self._local, self.spec, "driver")
        with _GATES_LOCK:  # a downloader in this process uses the driver's gate
            _GATES[self.spec.run_id] = (self._local, self._recorder)
        return self

    def __exit__(self, *exc: object) -> None:
        with _GATES_LOCK:
            _GATES.pop(self.spec.run_id, None)
        if self._recorder is not None:
            self._recorder.close()
        self._local.__exit__(*exc)

    @property
    def url(self) -> str:
        """The driver's gate, for downloaders in this process."""
        return self._local.url

    def env(self) -> dict[str, str]:
        """Proxy variables for processes on this node (the driver's gate) and the run's gate spec."""
        return {**self._local.env(), GATE_VAR: self.spec.to_env()}

    def ray_runtime_env(self) -> dict:
        """The runtime_env that gives every Ray worker process of the job its own gate."""
        return ray_runtime_env_for(self.env())

    def records(self) -> list[dict]:
        """Every gate's record for this run, each written after the gates were asked to flush."""
        if self._recorder is not None:
            self._recorder.settle_and_flush()
        flush_remote_gates(self.record_dir, self.spec.run_id, read_records(self.record_dir, self.spec.run_id))
        return read_records(self.record_dir, self.spec.run_id)

    def summary(self) -> dict:
        """The run's egress record: totals, counts by reason, bounded samples, hosts, requests per node."""
        return {"run_id": self.spec.run_id, **merge(self.records())}
