"""The evaluation stage as a Prefect flow; its body is `pipelines.evaluation.run.evaluate`."""
from __future__ import annotations

from prefect import flow

from pipelines.evaluation.run import evaluate

evaluate_flow = flow(name="evaluate-cascade", log_prints=True)(evaluate)
