import hashlib
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


# --------------------------------------------------------------------------- shared synthetic image sets
# Built once per test session and handed to every test file that asks, instead of each file writing its own
# copy. They are shared, so they are read-only: write runs, configs and copies under tmp_path, never into them
# (teardown checks that every file is unchanged).


def _checksums(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def _shared_set(tmp_path_factory, name: str, **kw):
    from cytofuse.synthetic.phantoms import write_synthetic_dataset

    out = tmp_path_factory.mktemp(name) / "data"
    write_synthetic_dataset(out, progress=False, **kw)
    before = _checksums(out)
    yield out
    assert _checksums(out) == before, f"a test wrote into the shared {name} at {out}; copy it into tmp_path first"


@pytest.fixture(scope="session")
def synthetic_set(tmp_path_factory):
    """Two phantom classes of four 4-channel images, 2x96x96, seed 0, with ``labels.csv``: the tiny set of the
    CV-run tests (crossval, explain, report, predict, examples). Read-only."""
    yield from _shared_set(tmp_path_factory, "synthetic_set", classes=2, images_per_class=4, shape=(2, 96, 96), seed=0)


@pytest.fixture(scope="session")
def small_synthetic_set(tmp_path_factory):
    """Two phantom classes of two 4-channel images, 2x64x64, seed 1, with ``labels.csv``: the inputs of the
    CLI tests (cli, overwrite). Read-only."""
    yield from _shared_set(tmp_path_factory, "small_synthetic_set", classes=2, images_per_class=2, shape=(2, 64, 64), seed=1)
