import os
from pathlib import Path

import pytest

_DEFAULT = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared_data_dir() -> Path:
    """Real public images: $CYTOFUSE_DATA, else ../shared/data beside the project."""
    return Path(os.environ.get("CYTOFUSE_DATA", _DEFAULT))


@pytest.fixture
def real_data():
    """Path to the real data folder, or skip with a message when it is absent."""
    root = shared_data_dir()
    if not root.is_dir():
        pytest.skip(f"real data not found at {root} (set CYTOFUSE_DATA to its folder)")
    return root
