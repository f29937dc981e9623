"""The napari plugin: the reader, the prediction widget, Grad-CAM per channel, and a rendered screenshot.

Needs the ``napari`` extra, pytest-qt and an X server: a running one (``DISPLAY``) or Xvfb, started here
(Debian ``xvfb``; Qt's xcb platform needs ``libxcb-icccm4`` and ``libxcb-keysyms1`` too; napari's GL canvas does
not render with ``QT_QPA_PLATFORM=offscreen``). Whatever is missing skips these tests, naming it.
napari's pytest plugin (``make_napari_viewer``) is loaded here only: pyproject.toml keeps it off (``-p no:napari``)
for the rest of the suite, whose warnings-are-errors setting its autouse fixtures would trip.
"""

import os
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest

with warnings.catch_warnings():  # napari's pydantic models warn (deprecation) when first imported
    warnings.simplefilter("ignore", DeprecationWarning)
    pytest.importorskip("napari", reason="napari is not installed: pip install 'cytofuse[napari]'")
    pytest.importorskip("pytestqt", reason="pytest-qt is not installed (napari's make_napari_viewer needs it)")
    import napari._qt  # noqa: F401  (the Qt side, under the same filter)
    import napari.utils._testsupport  # noqa: F401

import tifffile  # noqa: E402
import torch  # noqa: E402

from cytofuse.inference.heatmaps import upsample_cells  # noqa: E402
from cytofuse.inference.modelfolder import card_for, load_models, write_model_folder  # noqa: E402
from cytofuse.inference.predict import predict_image, predict_images, prepare_models  # noqa: E402
from cytofuse.io.readers import Image, write_ome_tiff  # noqa: E402
from cytofuse.models import create_model  # noqa: E402
from cytofuse.preprocess.patches import PatchSettings  # noqa: E402

pytest_plugins = ["napari.utils._testsupport"]
CLASSES, CHANNELS, SIZE = ["calm", "fused"], ["dna", "mito"], 16


@pytest.fixture(scope="session", autouse=True)
def x_display():
    """A running X display: DISPLAY if set, else a private Xvfb for this session (skips, naming what is missing).

    Session-scoped so it exists before pytest-qt's QApplication; Qt is first started in a child process, since a
    Qt that cannot load its xcb platform aborts the whole process instead of raising."""
    started = None
    if not os.environ.get("DISPLAY"):
        if shutil.which("Xvfb") is None:
            pytest.skip("Xvfb is not installed (Debian: xvfb libxcb-icccm4 libxcb-keysyms1 libxcb-cursor0) and "
                        "DISPLAY is not set: napari's GL canvas needs an X server")
        started = _start_xvfb()
    try:
        _check_qt_starts()
        yield os.environ["DISPLAY"]
    finally:
        if started is not None:
            del os.environ["DISPLAY"]
            started.terminate()
            started.wait(10)


def _start_xvfb() -> subprocess.Popen:
    read, write = os.pipe()
    proc = subprocess.Popen(["Xvfb", "-displayfd", str(write), "-screen", "0", "1024x768x24", "-nolisten", "tcp"],
                            pass_fds=(write,), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(write)
    with os.fdopen(read) as pipe:
        number = pipe.readline().strip()
    if not number:
        proc.kill()
        pytest.skip("Xvfb did not start (it printed no display number)")
    os.environ["DISPLAY"] = f":{number}"
    return proc


def _check_qt_starts() -> None:
    probe = "from qtpy.QtWidgets import QApplication; QApplication([])"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        lines = [line.strip() for line in done.stderr.splitlines() if line.strip()]
        pytest.skip(f"Qt cannot start on DISPLAY={os.environ['DISPLAY']} (missing Debian libraries such as "
                    f"libxcb-icccm4 libxcb-keysyms1 libxcb-cursor0?): {' | '.join(lines[:3])}")


def _image(seed=0) -> Image:
    """Two channels, 2 x 48 x 64: dna bright on the left, mito on the right."""
    data = np.random.default_rng(seed).integers(0, 50, (2, 2, 48, 64)).astype(np.uint16)
    data[0, :, :, :32] += 900
    data[1, :, :, 32:] += 900
    return Image(data, tuple(CHANNELS), source="cells.tif")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = create_model("early", in_channels=2, num_classes=2, encoder="smallcnn", dropout=0.0).eval()
    card = card_for([model], class_names=CLASSES, channel_names=CHANNELS,
                    patches=PatchSettings(size=SIZE, min_ratio=0.0, drop_duplicates=False))
    return write_model_folder(tmp_path_factory.mktemp("napari") / "model", [model], card)


@pytest.fixture(scope="module")
def prediction(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("napari") / "pred"
    summary = predict_images(model_dir, [_image()], out=out, progress=False, precision="fp32", workers=0)
    return out, summary


@pytest.fixture
def image_file(tmp_path):
    return write_ome_tiff(tmp_path / "cells.ome.tif", _image())


def test_reader_opens_a_prediction_folder_one_heat_map_per_class_on_image_pixels(make_napari_viewer, prediction):
    out, summary = prediction
    viewer = make_napari_viewer()
    viewer.open(str(out), plugin="cytofuse")
    heat = tifffile.imread(out / "images" / "cells" / "heatmap.tif")  # (K, Z, y, x) on the cell grid
    cell, decision = int(summary.loc[0, "heatmap_cell_px"]), summary.loc[0, "decision"]
    assert cell == SIZE and heat.shape == (2, 2, 3, 4)
    for k, c in enumerate(CLASSES):
        layer = viewer.layers[f"cells {c} [{decision}]"]
        np.testing.assert_array_equal(layer.data, heat[k])
        assert tuple(layer.scale) == (1, cell, cell) and tuple(layer.translate) == (0, 7.5, 7.5)
        # the cell's corner pixel and the image's last covered pixel map to the cell's values
        assert layer.world_to_data((1, 0, 0)) == pytest.approx((1, -0.5 + 0.5 / cell, -0.5 + 0.5 / cell))
    points = viewer.layers["patches"]
    assert len(points.data) == summary.loc[0, "patches"] == 2 * 3 * 4
    assert {f"prob_{c}" for c in CLASSES} <= set(points.features.columns)
    probs = points.features[[f"prob_{c}" for c in CLASSES]].to_numpy()
    assert np.allclose(probs.sum(axis=1), 1, atol=1e-5)


def test_reader_opens_any_image_as_named_channel_layers(make_napari_viewer, image_file):
    viewer = make_napari_viewer()
    viewer.open(str(image_file), plugin="cytofuse")
    assert [layer.name for layer in viewer.layers] == CHANNELS
    for c, name in enumerate(CHANNELS):
        np.testing.assert_array_equal(viewer.layers[name].data, _image().data[c])


def test_reader_declines_what_it_cannot_read(tmp_path):
    from cytofuse.napari.reader import get_reader

    (tmp_path / "notes.txt").write_text("x")
    assert get_reader(str(tmp_path / "notes.txt")) is None
    assert get_reader(str(tmp_path)) is None  # a folder that is no prediction folder


def _predict_with_widget(viewer, qtbot, image_file, model_dir):
    from cytofuse.napari.widget import PredictWidget

    viewer.open(str(image_file), plugin="cytofuse")
    widget = PredictWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.image.value = viewer.layers["dna"]
    widget.model.value = str(model_dir)
    worker = widget.predict()
    qtbot.waitUntil(lambda: widget.prediction is not None, timeout=30_000)
    qtbot.waitUntil(lambda: not worker.is_running, timeout=5_000)
    assert worker.pbar.total == worker.pbar.n == 2 * 3 * 4  # napari's progress bar counted every patch
    return widget


def test_widget_adds_predict_images_heat_maps_with_the_decision(make_napari_viewer, qtbot, image_file, model_dir,
                                                                tmp_path):
    viewer = make_napari_viewer()
    widget = _predict_with_widget(viewer, qtbot, image_file, model_dir)
    models, card = load_models(model_dir)
    folder = tmp_path / "ref"
    folder.mkdir()
    ref = predict_image(_image(), prepare_models(models), card, name="cells", folder=folder, workers=0)
    cells = tifffile.imread(folder / "heatmap.tif")
    for k, c in enumerate(CLASSES):
        layer = viewer.layers[f"dna {c} [decision: {ref.decision}]"]
        expected = upsample_cells(cells[k], ref.heatmap_cell, (48, 64))
        np.testing.assert_allclose(layer.data, expected, atol=1e-6)  # NaN where no patch covers (none here)
        assert layer.data.shape == (2, 48, 64)
    assert widget.status.value.startswith(f"dna: {ref.decision}")


def test_screenshot_with_heat_maps_shows_them(make_napari_viewer, prediction):
    out, _ = prediction
    viewer = make_napari_viewer(show=True)  # a hidden window's GL canvas renders black
    viewer.open(str(out), plugin="cytofuse")
    viewer.layers["patches"].visible = False
    shot = viewer.screenshot(canvas_only=True, flash=False)
    rgb = shot[..., :3].astype(float)
    background = rgb[0, 0]
    assert rgb.std() > 1
    assert np.abs(rgb - background).sum(axis=-1).astype(bool).mean() > 0.05  # heat-map pixels, not just background


def test_gradcam_adds_one_patch_sized_layer_per_channel(make_napari_viewer, qtbot, image_file, model_dir):
    viewer = make_napari_viewer()
    widget = _predict_with_widget(viewer, qtbot, image_file, model_dir)
    points = viewer.add_points([[1, 20, 40]], name="pick")
    widget.points.reset_choices()
    widget.points.value = points
    added = widget.add_gradcam()
    assert [layer.name.split(" (")[0] for layer in added] == [f"Grad-CAM {c}" for c in CHANNELS]
    for layer in added:
        assert layer.data.shape == (SIZE, SIZE)
        assert np.isfinite(layer.data).all() and 0 <= layer.data.min() and layer.data.max() <= 1
        assert tuple(layer.translate) == (16, 32)  # the patch under (y, x) = (20, 40): corner (16, 32)
        assert "z1 y16 x32" in layer.name


def test_widget_names_the_missing_channel_layer(make_napari_viewer, image_file, model_dir):
    from cytofuse.errors import InputError
    from cytofuse.napari.widget import PredictWidget

    viewer = make_napari_viewer()
    viewer.open(str(image_file), plugin="cytofuse")
    viewer.layers.remove("mito")
    widget = PredictWidget(viewer)
    widget.image.value = viewer.layers["dna"]
    widget.model.value = str(model_dir)
    with pytest.raises(InputError, match=r"expects channels \['dna', 'mito'\].*missing \['mito'\]"):
        widget.predict()
    widget.model.value = str(model_dir / "nowhere")
    with pytest.raises(InputError, match="is not a folder"):
        widget.predict()
