"""Fuzzed bytes for the readers (slow suite): any failure must be cytofuse's own input error.

Each reader gets random bytes and mutations of a valid file (bytes flipped, cut short,
inserted) for a bounded number of examples (``CYTOFUSE_FUZZ_EXAMPLES``, 300 by default). A
MemoryError would show an unchecked decoded size; any other exception type is a crash where a
sentence naming the file belongs; a timeout is a reader that loops (as tifffile did on a TIFF
whose IFD chain points back to itself).
"""

from __future__ import annotations

import io as _bytesio
import os
import warnings
from pathlib import Path

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from cytofuse.io.imagesets import ImageSet  # noqa: E402
from cytofuse.errors import CytofuseError  # noqa: E402
from cytofuse.io.readers import probe_image, read_image  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
FUZZ = settings(max_examples=int(os.environ.get("CYTOFUSE_FUZZ_EXAMPLES", "300")), deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


def _valid(suffix: str) -> bytes:
    """A small valid file of each format, the seed of the mutations."""
    data = (np.arange(2 * 3 * 16 * 16) % 251).astype(np.uint16).reshape(2, 3, 16, 16)
    buf = _bytesio.BytesIO()
    if suffix == ".tif":
        import tifffile

        tifffile.imwrite(buf, data.transpose(1, 0, 2, 3), imagej=True, metadata={"axes": "ZCYX"}, compression="zlib")
    elif suffix == ".png":
        from PIL import Image as PILImage

        PILImage.fromarray(data[0, 0].astype(np.uint8)).save(buf, format="PNG")
    elif suffix == ".npy":
        np.save(buf, data)
    else:
        buf.write(b"path,label,group\nimg/a.tif,x,g1\nimg/b.tif,y,g2\n")
    return buf.getvalue()


@st.composite
def _mutated(draw, seed: bytes) -> bytes:
    """``seed`` with a few bytes replaced, a slice cut out, random bytes inserted, or cut short."""
    out = bytearray(seed)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "cut", "insert", "truncate"]))
        at = draw(st.integers(0, max(len(out) - 1, 0)))
        if kind == "flip" and out:
            out[at] = draw(st.integers(0, 255))
        elif kind == "cut":
            del out[at:at + draw(st.integers(1, 64))]
        elif kind == "insert":
            out[at:at] = draw(st.binary(min_size=1, max_size=32))
        else:
            del out[at:]
    return bytes(out)


def _bytes_for(suffix: str):
    return st.one_of(st.binary(max_size=512), _mutated(_valid(suffix)))


def _read_all_ways(path: Path) -> None:
    axes = "CZYX" if path.suffix == ".npy" else None
    for reader in (probe_image, read_image):
        try:
            image = reader(path, axes=axes)
        except CytofuseError:
            continue
        assert image is not None


@pytest.mark.parametrize("suffix", [".tif", ".png", ".npy"])
def test_image_readers_raise_only_input_errors(suffix, tmp_path):
    path = tmp_path / f"fuzz{suffix}"

    @FUZZ
    @given(content=_bytes_for(suffix))
    def check(content: bytes) -> None:
        path.write_bytes(content)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # readers may warn about odd files; only exceptions count here
            _read_all_ways(path)

    check()


def test_manifest_reader_raises_only_input_errors(tmp_path):
    path = tmp_path / "labels.csv"

    @FUZZ
    @given(content=_bytes_for(".csv"))
    def check(content: bytes) -> None:
        path.write_bytes(content)
        try:
            ImageSet.from_manifest(path)
        except CytofuseError:
            pass

    check()
