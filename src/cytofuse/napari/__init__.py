"""napari plugin (the optional extra ``cytofuse[napari]``): a reader for prediction folders, patch tables and
any image cytofuse reads, and a dock widget that predicts an image layer and shows Grad-CAM per channel.

The manifest is ``napari.yaml`` beside this file (npe2); the layer data comes from ``cytofuse.napari.layers``,
which imports no napari, so it is usable (and tested) on its own.
"""
