"""Prefect flows: the orchestration layer. Heavy work runs in the functions they call (and on Ray)."""
from __future__ import annotations

from typing import Any

from prefect.context import FlowRunContext


def run_step(step: Any, *args: Any) -> Any:
    """A task inside a flow run; its plain function outside one (a bare task call would start a
    temporary Prefect server), so a flow's body is also an ordinary function for tests and scripts."""
    return step(*args) if FlowRunContext.get() is not None else step.fn(*args)
