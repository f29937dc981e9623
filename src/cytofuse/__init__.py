"""cytofuse: organelle-aware fusion classifiers for microscopy images.

Arrays follow one axis order everywhere: (C, Z, Y, X) for images and
(C, Y, X) for 2D patches.
"""

__version__ = "0.1.0"
