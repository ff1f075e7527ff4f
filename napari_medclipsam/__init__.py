"""napari-medclipsam: text-driven medical image segmentation (MedCLIP-SAMv2) for napari.

Importing the package is cheap: torch, open_clip and segment-anything are imported only
when a model is loaded. The compute lives in :mod:`napari_medclipsam.core`, the command
line in :mod:`napari_medclipsam.cli`.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
