"""Sample images for the napari ``File > Open Sample`` menu.

scikit-image's ``data.brain()`` is fetched from the internet on first use, so the offline
sample is the Shepp-Logan head phantom that ships inside scikit-image.
"""

from __future__ import annotations

import numpy as np


def head_phantom() -> list[tuple[np.ndarray, dict]]:
    """Shepp-Logan head phantom (400x400 float in [0, 1]); bundled, works offline."""
    from skimage import data

    return [(np.asarray(data.shepp_logan_phantom(), dtype=np.float32),
             {"name": "head phantom (Shepp-Logan)"})]


def brain_mri() -> list[tuple[np.ndarray, dict]]:
    """Middle slice (256x256 uint16) of scikit-image's brain MRI (downloaded once, cached)."""
    from skimage import data

    volume = data.brain()
    return [(np.asarray(volume[volume.shape[0] // 2]), {"name": "brain MRI (scikit-image)"})]
