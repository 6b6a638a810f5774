"""Prefect flows: the orchestration layer. Heavy work runs in the functions they call (and on Ray)."""
