"""Where the real third-party test files live: ../shared/data beside the checkout, never copied in."""
from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def shared_file(name: str) -> Path:
    """The file `name` of ../shared/data, or skip the test with the reason."""
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(f"real test file not found at {path} (the project's shared/data folder)")
    return path
