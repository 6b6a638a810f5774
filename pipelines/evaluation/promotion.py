"""Promotion on evidence after training: the stages a run registered are challengers; the cascade they
make with the other stages' current versions (alias `candidate`, set here) is evaluated as the policy says - the toy world's bar (`eval/...` metrics), the
UCF-101 protocol (`ucf101.*`) or the MSR-VTT one (`msrvtt.*`) - and each stage's `current` moves only
when `training.registry.promote_on_evidence` finds the challenger meets the bar or beats the current.
The comparison is written to the evaluation's MLflow run (promotion.json) and printed.

A stage's first registration is already `current` (nothing to compare with), so a run that only made
first versions needs no evaluation here; `record_evidence` then stores a later evaluation's score on
them, the number the next challenger has to beat.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from training.registry import PromotionPolicy, promote_on_evidence, stage_versions
from training.tracker import DEFAULT_ALIAS
from training.tracking import mlflow_client, registered_name

CANDIDATE_ALIAS = "candidate"  # the cascade under judgement: the run's new versions, elsewhere the current ones


def pending(tracking_uri: str, versions: Mapping[str, int]) -> dict[str, int]:
    """The stages whose registered `versions` are not their `current` yet."""
    current = stage_versions(tracking_uri, DEFAULT_ALIAS)
    return {s: int(v) for s, v in versions.items()
            if current.get(s, {}).get("alias") != DEFAULT_ALIAS or current[s]["version"] != int(v)}


def set_candidates(tracking_uri: str, waiting: Mapping[str, int]) -> dict[str, int]:
    """Point `CANDIDATE_ALIAS` of every registered stage at its `waiting` version, else at its current
    (else newest) one; returns {stage: version}."""
    client = mlflow_client(tracking_uri)
    chosen = {s: int(waiting.get(s, v["version"])) for s, v in stage_versions(tracking_uri, DEFAULT_ALIAS).items()}
    for stage, version in chosen.items():
        client.set_registered_model_alias(registered_name(stage), CANDIDATE_ALIAS, str(version))
    return chosen


def evaluate_challengers(cfg: Any, policy: PromotionPolicy, tracking_uri: str, out: str | Path,
                         evaluation: Mapping[str, Any] | None = None) -> tuple[dict[str, float], str]:
    """(metrics, run id) of the `CANDIDATE_ALIAS` cascade under the policy's protocol; `evaluation`: keyword
    arguments of that protocol (e.g. dataset_root and the model files of ucf101/msrvtt, n_prompts of toy)."""
    kw = dict(evaluation or {})
    protocol = policy.metric.split(".", 1)[0] if "." in policy.metric else "toy"
    if protocol == "ucf101":
        from pipelines.evaluation.ucf101 import evaluate_ucf101 as run
    elif protocol == "msrvtt":
        from pipelines.evaluation.msrvtt import evaluate_msrvtt as run
    else:
        from pipelines.evaluation.run import evaluate

        result = evaluate(str(out), config=cfg.model_dump(mode="json"), tracking_uri=tracking_uri,
                          alias=CANDIDATE_ALIAS, **kw)
        return result["metrics"], result["run_id"]
    result = run(cfg, out=out, tracking_uri=tracking_uri, alias=CANDIDATE_ALIAS, **kw)
    return {f"{protocol}.{k}": v for k, v in result["metrics"].items()}, result["run_id"]


def promote_trained(cfg: Any, versions: Mapping[str, int], policy: PromotionPolicy, tracking_uri: str,
                    out: str | Path, evaluation: Mapping[str, Any] | None = None) -> dict[str, dict]:
    """Judge the challengers among `versions` ({stage: registered version}) and move `current` where they
    win; {stage: the comparison} (empty when the policy evaluates nothing or every version is current)."""
    waiting = pending(tracking_uri, versions)
    if policy.metric is None or not waiting:
        return {}
    set_candidates(tracking_uri, waiting)
    metrics, run_id = evaluate_challengers(cfg, policy, tracking_uri, out, evaluation)
    decisions = {stage: promote_on_evidence(tracking_uri, stage, v, metrics, policy) for stage, v in waiting.items()}
    mlflow_client(tracking_uri).log_dict(run_id, decisions, "promotion.json")
    for d in decisions.values():
        print(f"promotion {registered_name(d['stage'])}/{d['version']}: "
              f"{'promoted' if d['promoted'] else 'kept current ' + str(d['current_version'])} - {d['reason']}")
    return decisions


def record_evidence(tracking_uri: str, versions: Mapping[str, int], metrics: Mapping[str, float],
                    policy: PromotionPolicy) -> None:
    """Tag `versions` with the policy metric's value (mav.eval.<metric>): the score a later challenger of
    each stage is compared with."""
    if policy.metric is None or policy.metric not in metrics:
        return
    client = mlflow_client(tracking_uri)
    for stage, version in versions.items():
        client.set_model_version_tag(registered_name(stage), str(version), f"mav.eval.{policy.metric}",
                                     str(float(metrics[policy.metric])))
