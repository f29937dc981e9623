"""The dock widget: predict an image layer with a model folder (or a CV run) and show Grad-CAM per channel."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from magicgui.widgets import ComboBox, Container, FileEdit, Label, LineEdit, PushButton

from cytofuse.errors import InputError
from cytofuse.napari.layers import (
    Prediction,
    gradcam_layers,
    image_from_layers,
    pick_patch,
    predict_in_chunks,
    prediction_layers,
)

if TYPE_CHECKING:
    import napari


class PredictWidget(Container):
    """Image layer + model folder or CV run -> one heat-map layer per class (decision in the name) and, for the
    patch under the last point of a points layer (or the most confident patch), Grad-CAM per channel."""

    def __init__(self, napari_viewer: "napari.Viewer") -> None:
        self.viewer = napari_viewer
        self.image = ComboBox(label="image", choices=self._image_layers)
        self.model = FileEdit(label="model folder or CV run", mode="d")
        self.model_name = LineEdit(label="CV model (optional)")
        self.run_button = PushButton(text="Predict")
        self.points = ComboBox(label="patch at last point of", choices=self._points_layers, nullable=True)
        self.gradcam_button = PushButton(text="Grad-CAM per channel")
        self.status = Label(value="")
        super().__init__(widgets=[self.image, self.model, self.model_name, self.run_button, self.points,
                                  self.gradcam_button, self.status])
        self.prediction: Prediction | None = None
        self.run_button.changed.connect(self.predict)
        self.gradcam_button.changed.connect(self.add_gradcam)
        for event in (napari_viewer.layers.events.inserted, napari_viewer.layers.events.removed):
            event.connect(self.reset_choices)

    def _image_layers(self, _=None) -> list:
        from napari.layers import Image

        return [layer for layer in self.viewer.layers if isinstance(layer, Image)]

    def _points_layers(self, _=None) -> list:
        from napari.layers import Points

        return [layer for layer in self.viewer.layers if isinstance(layer, Points)]

    def predict(self, _=None):
        """Start prediction in a worker thread (napari's progress bar counts patches); return the worker."""
        from napari.qt.threading import create_worker

        from cytofuse.inference.modelfolder import load_models
        from cytofuse.inference.predict import prepare_models

        layer, path = self.image.value, Path(self.model.value)
        if layer is None:
            raise InputError("predict: choose an image layer (the viewer has none)")
        if not path.is_dir():
            raise InputError(f"predict: the model folder or CV run {str(path)!r} is not a folder")
        models, card = load_models(path, model_name=self.model_name.value or None)
        image = image_from_layers(layer, list(self.viewer.layers), card.channel_names)
        scale = tuple(layer.scale)[-3:] if layer.ndim >= 3 else (1.0, *layer.scale)
        name = layer.name

        def work():
            done = yield from predict_in_chunks(image, prepare_models(models), card, name=name)
            return done

        worker = create_worker(work, _progress={"desc": f"cytofuse: predicting {name}"})
        worker.yielded.connect(lambda step: self._show_progress(worker, *step))
        worker.returned.connect(lambda pred: self._add_prediction(pred, scale))
        worker.errored.connect(lambda err: setattr(self.status, "value", f"prediction failed: {err}"))
        self.status.value = f"predicting {name} ..."
        worker.start()
        return worker

    def _show_progress(self, worker, done: int, total: int) -> None:
        bar = getattr(worker, "pbar", None)
        if bar is not None:
            bar.total = total
            bar.update(done - bar.n)

    def _add_prediction(self, pred: Prediction, scale) -> None:
        self.prediction, self._scale = pred, scale
        for data, kwargs, _ in prediction_layers(pred, scale):
            self.viewer.add_image(data, **kwargs)
        probs = ", ".join(f"{c} {p:.2f}" for c, p in zip(pred.card.class_names, pred.mean))
        self.status.value = f"{pred.name}: {pred.decision or 'no decision'} ({probs})"

    def add_gradcam(self, _=None) -> list:
        """Grad-CAM layers (one per channel) of the patch under the chosen points layer's last point, or of the
        most confident patch; returns the new layers."""
        if self.prediction is None:
            raise InputError("Grad-CAM: predict an image first (the Predict button)")
        points = self.points.value
        point = None
        if points is not None and len(points.data):
            world = points.data_to_world(points.data[-1])
            point = [w / s for w, s in zip(world[-3:], self._scale)] if len(world) >= 3 else [0, *world]
        index = pick_patch(self.prediction, point)
        return [self.viewer.add_image(data, **kwargs)
                for data, kwargs, _ in gradcam_layers(self.prediction, index, self._scale)]
