"""infra/: every deployment file parses, carries what its tool requires, and agrees with the project.

Static checks (no Docker engine, Kubernetes or cloud account on the dev machine): the Dockerfile installs
the project exactly as the Makefile does; the compose stack's services, healthchecks, start order, URLs
and variables fit together; the KubeRay objects have the fields and types KubeRay and Kubernetes demand
and the RayJob's command parses as `mav train` and as a config; Ray's own validator accepts the launcher
file; and every environment variable the files set is one the project or the consuming library reads.
Building the image needs a Docker engine; that one test skips without one.
"""
from __future__ import annotations

import argparse
import ast
import fnmatch
import importlib.util
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlparse

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
INFRA = ROOT / "infra"
DOCKERFILE = INFRA / "docker" / "Dockerfile"
COMPOSE = INFRA / "compose" / "docker-compose.yaml"
ENV_EXAMPLE = INFRA / "compose" / ".env.example"
RAYCLUSTER = INFRA / "kuberay" / "raycluster.yaml"
RAYJOB = INFRA / "kuberay" / "rayjob-train.yaml"
LAUNCHER = INFRA / "ray" / "cluster.yaml"
README = INFRA / "README.md"

DOCKERFILE_KEYWORDS = {"FROM", "RUN", "CMD", "LABEL", "MAINTAINER", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT",
                       "VOLUME", "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL"}
# pip flags that change output, not what gets installed.
PIP_NOISE = {"-q", "--quiet", "--disable-pip-version-check", "--no-cache-dir"}
SHELL_OPERATORS = {"&&", "||", ";", "|", "(", ")", "&", ";;"}
COMPOSE_SERVICES = {"prefect-server", "mlflow", "postgres", "minio", "worker"}
# botocore's documented variables (botocore itself is not installed in the dev environment).
BOTOCORE_ENV = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION",
                "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE"}
# Read by the interpreter, pip and apt themselves.
PLATFORM_ENV = {"PATH", "VIRTUAL_ENV", "PIP_DISABLE_PIP_VERSION_CHECK", "PIP_NO_CACHE_DIR", "DEBIAN_FRONTEND"}
GPU_INSTANCE_FAMILIES = ("p3", "p4d", "p4de", "p5", "p5e", "p5en", "g4dn", "g5", "g6", "g6e")


# --- readers ---------------------------------------------------------------------------------------

def _yaml_docs(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s#]+)", line.strip())
        if match:
            pins[match.group(1).lower()] = match.group(2)
    return pins


def _makefile_exports() -> dict[str, str]:
    text = (ROOT / "Makefile").read_text()
    return dict(re.findall(r"^export\s+([A-Z_][A-Z0-9_]*)\s*:=\s*(.*?)\s*$", text, flags=re.M))


def _shell_commands(text: str) -> Iterator[list[str]]:
    """Simple commands of a shell text (split at newlines, &&, ||, ;, | and parentheses; quotes respected)."""
    for line in text.splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        command: list[str] = []
        for token in lexer:
            if token in SHELL_OPERATORS:
                if command:
                    yield command
                command = []
            else:
                command.append(token)
        if command:
            yield command


def _pip_installs(text: str) -> list[tuple[str, ...]]:
    """The arguments of every `pip install` in a shell text, output-only flags dropped."""
    found = []
    for command in _shell_commands(text):
        for i, token in enumerate(command[:-1]):
            if (token == "pip" or token.endswith("/pip")) and command[i + 1] == "install":
                found.append(tuple(a for a in command[i + 2:] if a not in PIP_NOISE))
                break
    return found


def _constrained(args: tuple[str, ...]) -> bool:
    return any(a == "-c" and b == "constraints.txt" for a, b in zip(args, args[1:]))


def _makefile_pip_installs() -> list[tuple[str, ...]]:
    """The project's installs in the Makefile's recipe, as pip arguments: `$(UV) ARGS` is `uv pip install
    ARGS`, which takes pip's arguments (the images and nodes may install with pip itself; the `$(PIP)`
    install of uv is the Makefile's own bootstrap)."""
    lines = [line for line in (ROOT / "Makefile").read_text().splitlines() if line.startswith("\t$(UV) ")]
    installs = [_pip_installs("pip install " + line.split("$(UV)", 1)[1])[0] for line in lines]
    assert len(installs) == 2, "the Makefile's install recipe changed: update this test and infra/"
    return installs


def _dockerfile() -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction; continuation lines joined, comments dropped."""
    instructions, buf = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not buf):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        keyword, _, args = buf.strip().partition(" ")
        instructions.append((keyword.upper(), args.strip()))
        buf = ""
    assert not buf, "the Dockerfile ends in a continuation line"
    return instructions


def _dockerfile_env() -> dict[str, str]:
    env = {}
    for keyword, args in _dockerfile():
        if keyword == "ENV":
            for item in shlex.split(args):
                key, _, value = item.partition("=")
                env[key] = value
    return env


def _env_example() -> dict[str, str]:
    values = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f".env.example: not KEY=VALUE: {line!r}"
            values[key.strip()] = value.strip()
    return values


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def _interpolate(value: Any, env: dict[str, str]) -> Any:
    """Docker Compose's interpolation of ${VAR}, ${VAR:-default}, ${VAR:?error} and $$ in every string."""
    if isinstance(value, dict):
        return {k: _interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match) -> str:
        name, op, arg = match.group(1), match.group(2), match.group(3)
        current = env.get(name)
        missing = current is None or (op is not None and op.startswith(":") and current == "")
        if op in ("-", ":-"):
            return arg if missing else current
        if op in ("?", ":?"):
            assert not missing, f"compose would stop: {name} unset ({arg})"
        return current or ""

    return _VAR.sub(substitute, value.replace("$$", "\0")).replace("\0", "$")


def _compose_raw() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _compose() -> dict:
    """The compose file as `docker compose config` sees it with .env copied from .env.example."""
    return _interpolate(_compose_raw(), _env_example())


def _options(argv: list[str]) -> dict[str, str]:
    """--key=value and --key value options of an argument list (flags map to "")."""
    opts, i = {}, 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--"):
            key, eq, value = arg.partition("=")
            if not eq and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                value, i = argv[i + 1], i + 1
            opts[key] = value
        i += 1
    return opts


def _kube(kind: str, path: Path = RAYCLUSTER) -> dict:
    docs = [d for d in _yaml_docs(path) if d.get("kind") == kind]
    assert len(docs) == 1, f"{path.name}: expected one {kind}, found {len(docs)}"
    return docs[0]


def _pod_specs(cluster: dict) -> dict[str, dict]:
    spec = cluster["spec"]
    pods = {"head": spec["headGroupSpec"]["template"]["spec"]}
    pods.update({g["groupName"]: g["template"]["spec"] for g in spec["workerGroupSpecs"]})
    return pods


def _project_source() -> str:
    parts = [p.read_text() for folder in ("pipelines", "training", "model") for p in (ROOT / folder).rglob("*.py")]
    parts += [(ROOT / "prefect.yaml").read_text(), (ROOT / "Makefile").read_text()]
    return "\n".join(parts)


def _package_file(package: str, relative: str) -> str:
    """A file of an installed package, read without importing the package."""
    spec = importlib.util.find_spec(package)
    assert spec is not None and spec.submodule_search_locations, f"{package} is not installed"
    return (Path(list(spec.submodule_search_locations)[0]) / relative).read_text()


def _mav_train_parser() -> argparse.ArgumentParser:
    """The real `mav` parser (building it imports no torch or Ray)."""
    from pipelines.cli import build_parser

    return build_parser()


def _train_command(argv: list[str]) -> argparse.Namespace:
    assert argv[:2] == ["mav", "train"], argv
    return _mav_train_parser().parse_args(argv[1:])


# --- Dockerfile ------------------------------------------------------------------------------------

def test_dockerfile_instructions_and_base_image():
    instructions = _dockerfile()
    assert instructions, "empty Dockerfile"
    unknown = [k for k, _ in instructions if k not in DOCKERFILE_KEYWORDS]
    assert not unknown, f"unknown instructions: {unknown}"
    first_from = next(i for i, (k, _) in enumerate(instructions) if k == "FROM")
    assert all(k == "ARG" for k, _ in instructions[:first_from]), "only ARG may come before FROM"
    args = dict(a.partition("=")[::2] for k, a in instructions[:first_from])
    base = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), ""), instructions[first_from][1])
    assert base.startswith("python:3.11"), f"default base image {base!r}: the project targets Python 3.11"
    users = [a for k, a in instructions if k == "USER"]
    assert users and users[-1] not in ("root", "0"), "the image must end as a non-root user"


def test_dockerfile_installs_ffmpeg_and_the_project_like_the_makefile():
    runs = "\n".join(a for k, a in _dockerfile() if k == "RUN")
    apt = [c for c in _shell_commands(runs) if c[:2] == ["apt-get", "install"]]
    assert any("ffmpeg" in c for c in apt), "Debian's ffmpeg is not installed"
    installs = _pip_installs(runs)
    for expected in _makefile_pip_installs():
        assert expected in installs, f"the Makefile's `pip install {' '.join(expected)}` is missing"
    for args in installs:
        assert _constrained(args), f"unconstrained install: pip install {' '.join(args)}"
    # The install of the package itself must come after its sources are in the image.
    instructions = _dockerfile()
    copied = [shlex.split(a)[:-1] for k, a in instructions if k == "COPY"]
    sources = {s.rstrip("/") for srcs in copied for s in srcs if not s.startswith("--")}
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: not in the build context (the repository root)"
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert packages <= sources and {"pyproject.toml", "constraints.txt", "README.md", "prefect.yaml"} <= sources
    last_copy = max(i for i, (k, _) in enumerate(instructions) if k == "COPY")
    assert any(k == "RUN" and "-e ." in a for k, a in instructions[last_copy:]), "editable install before the sources"


def test_dockerfile_environment_matches_the_makefile():
    env, exports = _dockerfile_env(), _makefile_exports()
    assert exports, "no exports found in the Makefile"
    for key, value in exports.items():
        assert key in env, f"{key} (exported by the Makefile) is not set in the image"
        if "$(" not in value:  # paths differ by design (the state folder lives under /var/lib/mav there)
            assert env[key] == value, f"{key}: image {env[key]!r} vs Makefile {value!r}"
    assert env["MAV_PROJECT_DIR"] == "/app" and env["PREFECT_HOME"].startswith(env["MAV_STATE_DIR"])


def test_image_user_matches_the_pod_security_context():
    runs = " ".join(a for k, a in _dockerfile() if k == "RUN")
    uid = int(re.search(r"useradd[^&;]*--uid (\d+)", runs).group(1))
    assert uid != 0
    for name, pod in _pod_specs(_kube("RayCluster")).items():
        assert pod["securityContext"]["runAsUser"] == uid, name


@pytest.mark.slow
def test_image_builds_and_runs():
    if shutil.which("docker") is None or subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        pytest.skip("no Docker engine")
    tag = "make-a-video:infra-test"
    subprocess.run(["docker", "build", "-f", str(DOCKERFILE), "-t", tag, str(ROOT)], check=True, timeout=3600)
    probe = "id -u && ffprobe -version >/dev/null && mav --help"
    out = subprocess.run(["docker", "run", "--rm", tag, "bash", "-c", probe],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] != "0" and "train" in out.stdout


# --- compose -------------------------------------------------------------------------------------------

def test_compose_services_images_commands_healthchecks():
    services = _compose()["services"]
    assert COMPOSE_SERVICES <= set(services), f"missing: {COMPOSE_SERVICES - set(services)}"
    one_shots = {name for name, s in services.items() if s.get("restart") == "no"}
    assert "create-buckets" in one_shots
    for name, service in services.items():
        assert service.get("image"), f"{name}: no image"
        if name in one_shots:
            continue
        assert service.get("command"), f"{name}: no command"
        test = service.get("healthcheck", {}).get("test")
        assert test and test[0] in ("CMD", "CMD-SHELL") and len(test) > 1, f"{name}: no healthcheck"
    for name, service in services.items():
        for dep, rule in service.get("depends_on", {}).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            if rule["condition"] == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep} to be healthy; it has no healthcheck"
            if rule["condition"] == "service_completed_successfully":
                assert dep in one_shots, f"{name} waits for {dep} to exit; it is a long-running service"
    assert "build" in services["worker"] and services["worker"]["image"] == services["mlflow"]["image"]
    build = services["worker"]["build"]
    context = (COMPOSE.parent / build["context"]).resolve()
    assert context == ROOT and (context / build["dockerfile"]).resolve() == DOCKERFILE


def test_compose_variables_come_from_env_example_and_no_secret_is_written_in():
    text, env = COMPOSE.read_text(), _env_example()
    used = {m.group(1) for m in _VAR.finditer(text.replace("$$", ""))}
    required = {m.group(1) for m in _VAR.finditer(text.replace("$$", "")) if m.group(2) in (None, "?", ":?")}
    assert required <= set(env), f"required by compose, missing in .env.example: {required - set(env)}"
    assert set(env) <= used, f"in .env.example but unused by compose: {set(env) - used}"
    for match in _VAR.finditer(text.replace("$$", "")):
        if match.group(2) in ("-", ":-"):
            assert match.group(3) == env[match.group(1)], \
                f"compose's default for {match.group(1)} differs from .env.example: {match.group(3)!r}"
    _compose()  # interpolates every value; fails on a required variable that is unset
    secrets = {k: v for k, v in env.items() if "PASSWORD" in k}
    assert secrets
    for key, value in secrets.items():
        assert value not in text, f"the value of {key} is written into docker-compose.yaml"
    raw = _compose_raw()["services"]
    for service in raw.values():
        for key, value in (service.get("environment") or {}).items():
            if "PASSWORD" in key or "SECRET" in key:
                assert re.fullmatch(r"\$\{\w+(:\?[^}]*)?\}", value), f"{key} must come from .env, got {value!r}"


def test_compose_mlflow_uses_postgres_and_s3_artifacts():
    compose = _compose()
    services, env = compose["services"], _env_example()
    opts = _options(services["mlflow"]["command"])
    store = urlparse(opts["--backend-store-uri"])
    assert store.scheme.startswith("postgresql") and store.hostname == "postgres"
    assert store.path.lstrip("/") == env["MLFLOW_DB"]
    assert f'CREATE DATABASE "{env["MLFLOW_DB"]}"' in compose["configs"]["create-mlflow-db"]["content"]
    assert services["postgres"]["configs"][0]["target"].startswith("/docker-entrypoint-initdb.d/")
    artifacts = opts.get("--artifacts-destination") or opts.get("--default-artifact-root")
    assert artifacts and urlparse(artifacts).scheme == "s3", artifacts
    assert urlparse(artifacts).netloc == env["MLFLOW_BUCKET"]
    buckets = services["create-buckets"]
    assert "mc mb" in buckets["command"][0] and "$MLFLOW_BUCKET" in buckets["command"][0]
    assert buckets["environment"]["MLFLOW_BUCKET"] == env["MLFLOW_BUCKET"]
    assert urlparse(services["mlflow"]["environment"]["MLFLOW_S3_ENDPOINT_URL"]).hostname == "minio"
    # Prefect's server keeps its own database on the same Postgres.
    prefect_db = urlparse(services["prefect-server"]["environment"]["PREFECT_SERVER_DATABASE_CONNECTION_URL"])
    assert prefect_db.scheme == "postgresql+asyncpg" and prefect_db.hostname == "postgres"
    assert prefect_db.path.lstrip("/") == services["postgres"]["environment"]["POSTGRES_DB"]


def test_compose_mlflow_accepts_the_hosts_it_is_called_by():
    """MLflow 3 answers 403 to unknown Host headers (mlflow/server/security_utils.py: a pattern with `*`
    matches with fnmatch, any other must be equal). The worker calls it by service name, a browser by
    localhost on the published port."""
    services, env = _compose()["services"], _env_example()
    allowed = [h.strip() for h in _options(services["mlflow"]["command"])["--allowed-hosts"].split(",")]

    def ok(host: str) -> bool:
        return any(fnmatch.fnmatch(host, a) if "*" in a else host == a for a in allowed)

    assert ok(urlparse(services["worker"]["environment"]["MLFLOW_TRACKING_URI"]).netloc)
    assert ok(f"localhost:{env['MLFLOW_PORT']}") and ok(f"127.0.0.1:{env['MLFLOW_PORT']}")
    assert not ok("attacker.example:5000")


def test_compose_worker_reaches_the_services_and_serves_the_work_pool():
    services = _compose()["services"]
    worker = services["worker"]
    env = worker["environment"]

    def port_of(name: str, default: int) -> int:
        opts = _options(services[name]["command"])
        value = opts.get("--port") or opts.get("--address", f":{default}")
        return int(str(value).rsplit(":", 1)[-1])

    for var, service, default in (("PREFECT_API_URL", "prefect-server", 4200), ("MLFLOW_TRACKING_URI", "mlflow", 5000),
                                  ("AWS_ENDPOINT_URL_S3", "minio", 9000), ("FSSPEC_S3_ENDPOINT_URL", "minio", 9000)):
        url = urlparse(env[var])
        assert (url.hostname, url.port) == (service, port_of(service, default)), f"{var}={env[var]}"
    assert urlparse(env["PREFECT_API_URL"]).path == "/api"
    command = worker["command"]
    assert command[:3] == ["prefect", "worker", "start"] and "--with-healthcheck" in command
    pools = {d["work_pool"]["name"] for d in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]}
    assert pools == {_options(command)["--pool"]}, "the worker must poll the pool of prefect.yaml's deployments"
    assert _options(command)["--type"] == "process"
    assert env["MAV_PROJECT_DIR"] == _dockerfile_env()["MAV_PROJECT_DIR"]


def test_compose_prefect_server_matches_the_pinned_prefect():
    pin = _pins()["prefect"]
    image = _compose()["services"]["prefect-server"]["image"]
    assert image.startswith(f"prefecthq/prefect:{pin}-python3.11"), image
    assert _env_example()["PREFECT_VERSION"] == pin


# --- KubeRay ----------------------------------------------------------------------------------------

def test_raycluster_fields():
    cluster = _kube("RayCluster")
    assert cluster["apiVersion"] == "ray.io/v1"
    spec = cluster["spec"]
    assert spec["rayVersion"] == _pins()["ray"]
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    for group in groups:
        # KubeRay's CRD types rayStartParams as map[string]string: a bare YAML number is rejected.
        assert all(isinstance(v, str) for v in group["rayStartParams"].values()), group["rayStartParams"]
    names = [g["groupName"] for g in spec["workerGroupSpecs"]]
    assert len(names) == len(set(names)) >= 2
    for group in spec["workerGroupSpecs"]:
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group["groupName"]
    image = _env_example()["MAV_IMAGE"]
    for name, pod in _pod_specs(cluster).items():
        container = pod["containers"][0]
        assert container["image"] == image, f"{name}: {container['image']} is not the worker image"
        refs = [e["configMapRef"]["name"] for e in container.get("envFrom", []) if "configMapRef" in e]
        assert refs == [_kube("ConfigMap")["metadata"]["name"]], name


def test_raycluster_gpu_group_fits_the_paper_preset():
    from training.config import STAGES, train_preset

    paper = train_preset("paper")
    needed = max(paper.stage(s).num_workers for s in STAGES if paper.stage(s).use_gpu)
    gpu_groups = []
    for group in _kube("RayCluster")["spec"]["workerGroupSpecs"]:
        resources = group["template"]["spec"]["containers"][0]["resources"]
        gpus = int(resources.get("limits", {}).get("nvidia.com/gpu", 0))
        if gpus:
            # Kubernetes: an extended resource's request, when given, must equal its limit.
            assert int(resources.get("requests", {}).get("nvidia.com/gpu", gpus)) == gpus
            tolerated = {t["key"] for t in group["template"]["spec"].get("tolerations", [])}
            assert "nvidia.com/gpu" in tolerated, "GPU nodes are usually tainted nvidia.com/gpu"
            gpu_groups.append(gpus * group["maxReplicas"])
    assert gpu_groups, "no worker group requests nvidia.com/gpu"
    assert max(gpu_groups) >= needed, f"the paper preset trains on {needed} GPUs; GPU groups top out at {gpu_groups}"


def test_kuberay_configmap_carries_the_service_settings():
    data = _kube("ConfigMap")["data"]
    assert all(isinstance(v, str) for v in data.values()), "ConfigMap data values must be strings"
    assert {"MLFLOW_TRACKING_URI", "PREFECT_API_URL", "AWS_ENDPOINT_URL_S3", "MAV_STATE_DIR"} <= set(data)
    assert urlparse(data["PREFECT_API_URL"]).path == "/api"
    assert data["MAV_STATE_DIR"] == _dockerfile_env()["MAV_STATE_DIR"]


def test_rayjob_runs_mav_train_on_the_cluster():
    from pipelines.config import load_config

    job, cluster = _kube("RayJob", RAYJOB), _kube("RayCluster")
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    assert spec["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]
    # KubeRay rejects shutdownAfterJobFinishes=true together with a clusterSelector.
    assert spec.get("shutdownAfterJobFinishes", False) is False and "rayClusterSpec" not in spec
    args = _train_command(shlex.split(spec["entrypoint"]))
    assert args.stage == "all" and args.preset == "paper"
    assert urlparse(args.out).scheme == "s3", "a multi-node run folder must be shared storage"
    for data in (args.images, args.videos):
        assert data and urlparse(data).scheme == "s3"
    cfg = load_config(preset=args.preset, overrides=args.overrides)  # the overrides are valid config
    # Training reads TrainConfig.tracking_uri, not MLFLOW_TRACKING_URI: both must name the same server.
    assert cfg.train.tracking_uri == _kube("ConfigMap")["data"]["MLFLOW_TRACKING_URI"]
    # The paper preset trains from a pretrained CLIP file: on the models volume of the head (the driver embeds
    # the images with it) and of the GPU workers (the video stages encode frames with it).
    clip, claim = cfg.cascade.clip.weights_path, _kube("PersistentVolumeClaim")["metadata"]["name"]
    assert cfg.train.pretrained_clip and clip
    for name, pod in _pod_specs(cluster).items():
        mount = next(m for m in pod["containers"][0]["volumeMounts"] if clip.startswith(m["mountPath"] + "/"))
        volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
        assert volume["persistentVolumeClaim"]["claimName"] == claim and mount["readOnly"], name
    # Every trained stage is planned for its GPUs (training.plan): the job needs no per-stage tuning.
    assert all(cfg.train.stage(s).gpu_memory for s in ("prior", "decoder", "temporal", "sr_low", "sr_high"))


# --- Ray cluster launcher -------------------------------------------------------------------------------

def test_cluster_launcher_config_passes_rays_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load(LAUNCHER.read_text())
    assert {"cluster_name", "provider", "available_node_types", "head_node_type", "setup_commands"} <= set(raw)
    config = prepare_config(raw)
    validate_config(config)
    assert config["provider"]["type"] == "aws"
    assert config["head_node_type"] in config["available_node_types"]
    # Nothing but the project's setup runs (the AWS defaults would add a system-pip install on the head).
    assert config["head_setup_commands"] == raw["setup_commands"] == config["worker_setup_commands"]
    gpu_types = [name for name, t in config["available_node_types"].items()
                 if t["node_config"]["InstanceType"].split(".")[0] in GPU_INSTANCE_FAMILIES]
    assert gpu_types and all(config["available_node_types"][n]["max_workers"] > 0 for n in gpu_types)


def test_cluster_launcher_installs_the_project_like_the_makefile():
    config = yaml.safe_load(LAUNCHER.read_text())
    (remote, local), = config["file_mounts"].items()
    assert (ROOT / local).resolve() == ROOT, "file_mounts must copy the repository (ray up runs from its root)"
    home = f"/home/{config['auth']['ssh_user']}"
    setup = "\n".join(config["setup_commands"])
    cds = {c[1].replace("~", home, 1) for c in _shell_commands(setup) if c[0] == "cd"}
    assert cds == {remote}, f"setup commands run in {cds}, the repository is mounted at {remote}"
    apt = [c for c in _shell_commands(setup) if "apt-get" in c and "install" in c]
    assert any("ffmpeg" in c for c in apt) and any("python3.11" in c for c in apt)
    installs = _pip_installs(setup)
    for expected in _makefile_pip_installs():
        assert expected in installs, f"the Makefile's `pip install {' '.join(expected)}` is missing"
    assert all(_constrained(a) for a in installs)
    venv_ray = f"{remote.replace(home, '~', 1)}/.venv/bin/ray"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in _shell_commands("\n".join(config[key])) if c[0].endswith("/ray")]
        assert starts and all(c[0] == venv_ray for c in starts), f"{key} must use the project's venv"


# --- environment variables --------------------------------------------------------------------------------

def _infra_env_names() -> dict[str, set[str]]:
    """Variable name -> files that set it for processes of the project's image or of Prefect/MLflow."""
    names: dict[str, set[str]] = {}

    def add(keys, where):
        for key in keys:
            names.setdefault(key, set()).add(where)

    add(_dockerfile_env(), "Dockerfile")
    services = _compose_raw()["services"]
    for name in ("worker", "mlflow", "prefect-server"):
        add(services[name].get("environment", {}), f"compose:{name}")
    add(_kube("ConfigMap")["data"], "raycluster.yaml")
    setup = "\n".join(yaml.safe_load(LAUNCHER.read_text())["setup_commands"])
    add(re.findall(r"\b([A-Z][A-Z0-9_]+)=", setup), "ray/cluster.yaml")
    return names


def test_env_var_names_are_ones_the_code_reads():
    from fsspec.config import set_conf_env
    from prefect.settings import Settings
    from prefect.settings.legacy import _get_valid_setting_names

    names = _infra_env_names()
    source, exports = _project_source(), _makefile_exports()
    mlflow_vars = _package_file("mlflow", "environment_variables.py")
    ray_constants = _package_file("ray", "_private/ray_constants.py")
    prefect_names = _get_valid_setting_names(Settings)
    # The four settings that move the pipeline from one machine to a cluster are set, and read.
    assert {"compose:worker"} <= names["RAY_ADDRESS"]
    assert {"compose:worker", "raycluster.yaml"} <= names["PREFECT_API_URL"]
    assert {"compose:worker", "raycluster.yaml"} <= names["MLFLOW_TRACKING_URI"]
    assert {"Dockerfile", "compose:worker", "raycluster.yaml", "ray/cluster.yaml"} <= names["MAV_STATE_DIR"]
    assert re.search(r"environ(?:\.get)?\W+\"RAY_ADDRESS\"", source), "the pipelines read RAY_ADDRESS"
    assert '"RAY_ADDRESS"' in ray_constants
    assert re.search(r"environ\.get\(\"MAV_STATE_DIR\"", source)
    unknown = []
    for name, where in sorted(names.items()):
        if name.startswith("MAV_"):
            ok = re.search(rf"\b{name}\b", source) is not None
        elif name.startswith("PREFECT_"):
            ok = name in prefect_names
        elif name.startswith("MLFLOW_"):
            ok = f'"{name}"' in mlflow_vars
        elif name.startswith("FSSPEC_"):
            conf: dict = {}
            set_conf_env(conf, envdict={name: "x"})
            ok = conf == {"s3": {"endpoint_url": "x"}} and name == "FSSPEC_S3_ENDPOINT_URL"
        elif name.startswith("AWS_"):
            ok = name in BOTOCORE_ENV
        elif name == "RAY_ADDRESS":
            ok = True
        else:
            ok = name in exports or name in PLATFORM_ENV
        if not ok:
            unknown.append(f"{name} ({', '.join(sorted(where))})")
    assert not unknown, f"set by infra/ but read by nothing: {unknown}"


# --- README ------------------------------------------------------------------------------------------------

def test_readme_is_short_and_names_real_things():
    text = README.read_text()
    assert len(text.splitlines()) < 120
    for path in re.findall(r"`((?:docker|compose|kuberay|ray)/[\w./-]+)`", text):
        assert (INFRA / path).exists(), path
    for path in re.findall(r"infra/[\w./-]+\.(?:yaml|md)|infra/docker/Dockerfile", text):
        assert (ROOT / path).exists(), path
    deployments = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
    for flow_name, deployment in re.findall(r"prefect deployment run '([\w-]+)/([\w-]+)'", text):
        entry = next(d["entrypoint"] for d in deployments if d["name"] == deployment)
        path, fn = entry.split(":")
        tree = ast.parse((ROOT / path).read_text())
        node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == fn)
        names = [k.value.value for d in node.decorator_list if isinstance(d, ast.Call) for k in d.keywords
                 if k.arg == "name"]
        assert names == [flow_name], f"flow of {deployment} is named {names}, README says {flow_name}"
