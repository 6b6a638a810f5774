"""Finding a stage's weights: from the MLflow model registry by name, or from a path on disk.

`register_weights` (training/tracking.py) makes every registered version point at one safetensors file
logged as a run artifact; this module turns "the current decoder" back into a local file. Sources:

- `"mlflow"`: the default, `models:/mav-<stage>@current`;
- `"models:/<name>@<alias>"` or `"models:/<name>/<version>"`: that registry version;
- any other URI MLflow can download (`runs:/...`, `s3://...`, `file://...`);
- a local `.safetensors` file, or a checkpoint folder holding one.

Promotion on evidence: every registration points the stage's `challenger` alias at the new version;
`current` (what sampling reads) moves when the registering caller says so (no evaluation configured, or
the stage's first version), when `promote_on_evidence` finds the challenger meets its `PromotionPolicy`'s
bar or beats the current version's recorded score, or by hand with a recorded reason (`promote`).

The registry is read with an explicit `MlflowClient(tracking_uri)`: MLflow's own `models:/` resolver uses
the process-wide registry URI, which would silently read another store.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch

from model.checkpoint import load_weights
from training.config import STAGES
from training.tracker import DEFAULT_ALIAS
from training.tracking import is_mlflow_error, mlflow_client, registered_name

DEFAULT_SOURCE = "mlflow"
LOCAL_SCHEMES = ("", "file")


def default_cache_dir() -> Path:
    """Downloads from remote artifact stores land here (local stores are read in place)."""
    return Path(os.environ.get("MAV_STATE_DIR", ".state")).resolve() / "weights-cache"


def _parse_models_uri(uri: str) -> tuple[str, str | None, str | None]:
    """`models:/name@alias` -> (name, alias, None); `models:/name/3` -> (name, None, "3")."""
    rest = uri[len("models:/"):].strip("/")
    if "@" in rest:
        name, alias = rest.split("@", 1)
        return name, alias, None
    name, _, version = rest.partition("/")
    if not name or not version.isdigit():
        raise ValueError(f"unsupported model URI {uri!r}; use models:/<name>@<alias> or models:/<name>/<version>")
    return name, None, version


def _registry_version(stage: str, uri: str, tracking_uri: str | None):
    """The ModelVersion a models:/ URI names, or a LookupError naming the stage and the store searched."""
    client = mlflow_client(tracking_uri)
    name, alias, version = _parse_models_uri(uri)
    try:
        if alias is not None:
            return client.get_model_version_by_alias(name, alias)
        return client.get_model_version(name, version)
    except Exception as err:
        if not is_mlflow_error(err, "RESOURCE_DOES_NOT_EXIST"):
            raise
        raise LookupError(f"no registered weights for stage {stage!r}: {uri} not found in the MLflow "
                          f"registry at {client.tracking_uri}") from None


def find_safetensors(stage: str, path: Path) -> Path:
    """A .safetensors file, or the one for `stage` in a checkpoint folder: `<stage>.safetensors` when
    present, else the folder's only .safetensors file."""
    if not path.exists():
        raise FileNotFoundError(f"no weights for stage {stage!r}: {path} does not exist")
    if path.is_file():
        return path
    named = path / f"{stage}.safetensors"
    if named.is_file():
        return named
    found = sorted(path.glob("*.safetensors"))
    if len(found) == 1:
        return found[0]
    if not found:
        raise FileNotFoundError(f"no weights for stage {stage!r}: no .safetensors file in {path}")
    raise FileNotFoundError(f"stage {stage!r}: {path} holds several .safetensors files "
                            f"({', '.join(f.name for f in found)}) and none is named {named.name}")


def _download(uri: str, tracking_uri: str | None, dst: Path) -> Path:
    """Local artifact URIs are returned in place; remote ones are downloaded once into `dst`."""
    import mlflow.artifacts  # seconds to import: only when weights are fetched

    local = urlparse(uri).scheme in LOCAL_SCHEMES
    if not local:
        cached = dst / Path(urlparse(uri).path).name
        if cached.exists():  # registry versions and run artifacts are immutable
            return cached
        dst.mkdir(parents=True, exist_ok=True)
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=None if local else str(dst),
                                                    tracking_uri=tracking_uri, registry_uri=tracking_uri))


def resolve_weights(stage: str, source: str, tracking_uri: str | None = None, *,
                    cache_dir: str | os.PathLike | None = None) -> str:
    """Local path of the safetensors file holding `stage`'s weights, from `source` (see module doc).
    A stage that is not registered, or a path without weights, raises LookupError / FileNotFoundError
    naming the stage and where it looked."""
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    if source == DEFAULT_SOURCE:
        source = f"models:/{registered_name(stage)}@{DEFAULT_ALIAS}"
    scheme = urlparse(source).scheme
    if scheme == "models":
        version = _registry_version(stage, source, tracking_uri)
        path = _download(version.source, tracking_uri, cache / version.name / str(version.version))
    elif len(scheme) > 1:  # a URI; one letter would be a Windows drive
        path = _download(source, tracking_uri, cache / "uri" / stage)
    else:
        path = Path(source).expanduser()
    return str(find_safetensors(stage, path))


def load_stage_weights(stage: str, source: str, tracking_uri: str | None = None, *,
                       cache_dir: str | os.PathLike | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """(state_dict, metadata) of a stage; metadata["config"] is the resolved config it was trained with."""
    return load_weights(resolve_weights(stage, source, tracking_uri, cache_dir=cache_dir))


def stage_versions(tracking_uri: str, alias: str = DEFAULT_ALIAS) -> dict[str, dict]:
    """For each registered stage: the version `alias` points at (else the newest), its run and source.
    Written into sidecars so a generated video says exactly which weights made it."""
    client = mlflow_client(tracking_uri)
    out: dict[str, dict] = {}
    for stage in STAGES:
        name = registered_name(stage)
        try:
            version = client.get_model_version_by_alias(name, alias)
            held = alias
        except Exception as err:
            if not is_mlflow_error(err, "RESOURCE_DOES_NOT_EXIST"):
                raise
            versions = client.search_model_versions(f"name = '{name}'")
            if not versions:
                continue
            version = max(versions, key=lambda v: int(v.version))
            held = None
        out[stage] = {"name": name, "version": int(version.version), "run_id": version.run_id, "alias": held,
                      "source": version.source, "config_hash": version.tags.get("config_hash"),
                      "sha256": version.tags.get("sha256")}
    return out


# ----------------------------------------------------------------------------- promotion on evidence

LOWER_IS_BETTER = ("fvd", "fid")  # metric names ending so are distances; every other metric is a score
TOY_METRIC = "eval/quality_bar"  # 1 when the toy world's quality bar passed, 0 when it failed


@dataclass(frozen=True)
class PromotionPolicy:
    """What moves a stage's `current`. `metric` None: every registration does (no evaluation). Else a
    challenger is promoted when its `metric` meets `bar` (when set) or beats the value recorded on the
    current version; `higher_is_better` says which way beats."""

    metric: str | None = None
    higher_is_better: bool = True
    bar: float | None = None

    @classmethod
    def parse(cls, text: str) -> "PromotionPolicy":
        """"none"; "toy" (the toy world's quality bar); "<metric>>=<bar>" or "<metric><=<bar>"; or a bare
        "<metric>" (beat the current; distances such as ucf101.fvd lower, scores higher)."""
        text = text.strip()
        if text == "none":
            return cls()
        if text == "toy":
            return cls(TOY_METRIC, True, 1.0)
        for op, higher in ((">=", True), ("<=", False)):
            if op in text:
                metric, _, bar = text.partition(op)
                try:
                    return cls(metric.strip(), higher, float(bar))
                except ValueError:
                    raise ValueError(f"promotion bar must be a number: {text!r}") from None
        if not text or any(c in text for c in "<>= "):
            raise ValueError(f"promotion policy must be none, toy, METRIC, METRIC>=BAR or METRIC<=BAR; got {text!r}")
        return cls(text, not text.lower().endswith(LOWER_IS_BETTER), None)

    def decide(self, value: float | None, current: float | None) -> tuple[bool, str]:
        """(promote?, why) for a challenger scoring `value` against the current's recorded `current`."""
        if self.metric is None:
            return True, "no evaluation configured: every registration becomes current"
        if value is None or math.isnan(value):
            return False, f"no {self.metric} for the challenger"
        better = (lambda a, b: a > b) if self.higher_is_better else (lambda a, b: a < b)
        if self.bar is not None and (value == self.bar or better(value, self.bar)):
            return True, f"{self.metric} {value:.6g} meets the bar {self.bar:.6g}"
        if current is None:
            if self.bar is not None:
                return False, f"{self.metric} {value:.6g} misses the bar {self.bar:.6g} (current has no {self.metric})"
            return True, f"{self.metric} {value:.6g}; the current version has no {self.metric} recorded"
        if better(value, current):
            return True, f"{self.metric} {value:.6g} beats the current's {current:.6g}"
        return False, f"{self.metric} {value:.6g} does not beat the current's {current:.6g}"


def _alias_version(client, name: str, alias: str):
    try:
        return client.get_model_version_by_alias(name, alias)
    except Exception as err:
        if not is_mlflow_error(err, "RESOURCE_DOES_NOT_EXIST"):
            raise
        return None


def promote_on_evidence(tracking_uri: str, stage: str, version: int, metrics: dict[str, float],
                        policy: PromotionPolicy) -> dict:
    """Decide whether `version` of `stage` becomes `current` (`PromotionPolicy.decide` against the value the
    current version carries in its tag mav.eval.<metric>), record the evidence and the decision as tags of
    `version` (mav.eval.<metric>, mav.promotion.decision, mav.promotion.reason), move `current` when it
    wins, and return the comparison."""
    client = mlflow_client(tracking_uri)
    name = registered_name(stage)
    held = _alias_version(client, name, DEFAULT_ALIAS)
    value = metrics.get(policy.metric) if policy.metric else None
    record = {"stage": stage, "version": int(version), "metric": policy.metric, "value": value, "bar": policy.bar,
              "current_version": int(held.version) if held else None, "current_value": None}
    if held is not None and int(held.version) == int(version):
        promoted, reason = True, "already current (the stage's first registration, or promoted before)"
    else:
        if held is not None and policy.metric:
            tagged = held.tags.get(f"mav.eval.{policy.metric}")
            record["current_value"] = float(tagged) if tagged is not None else None
        promoted, reason = policy.decide(value, record["current_value"])
    if value is not None:
        client.set_model_version_tag(name, str(version), f"mav.eval.{policy.metric}", str(value))
    client.set_model_version_tag(name, str(version), "mav.promotion.decision", "promoted" if promoted else "kept")
    client.set_model_version_tag(name, str(version), "mav.promotion.reason", reason)
    if promoted:
        client.set_registered_model_alias(name, DEFAULT_ALIAS, str(version))
    return {**record, "promoted": promoted, "reason": reason}


def promote(tracking_uri: str, stage: str, version: int, reason: str) -> dict:
    """Move `stage`'s `current` to `version` by hand, the reason recorded on the version
    (mav.promotion.decision = "manual", mav.promotion.reason). Returns {stage, version, previous, reason}."""
    if not reason.strip():
        raise ValueError("a manual promotion needs a reason")
    client = mlflow_client(tracking_uri)
    name = registered_name(stage)
    target = _registry_version(stage, f"models:/{name}/{int(version)}", tracking_uri)
    held = _alias_version(client, name, DEFAULT_ALIAS)
    client.set_model_version_tag(name, target.version, "mav.promotion.decision", "manual")
    client.set_model_version_tag(name, target.version, "mav.promotion.reason", reason.strip())
    client.set_registered_model_alias(name, DEFAULT_ALIAS, target.version)
    return {"stage": stage, "version": int(target.version), "previous": int(held.version) if held else None,
            "reason": reason.strip()}
