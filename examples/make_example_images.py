"""Generate the example images in examples/images (and their masks in examples/masks).

The images are synthetic (no patient data, free to redistribute): an ultrasound-like
speckled image with a dark oval lesion, and a chest-radiograph-like image with two
dark lung fields. They exercise the whole pipeline; real BiomedCLIP weights are of
course needed for meaningful saliency.

    python examples/make_example_images.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from skimage.draw import ellipse
from skimage.filters import gaussian

HERE = Path(__file__).parent


def ultrasound_like(seed: int = 0, size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    depth = np.linspace(1.0, 0.55, size)[:, None]
    speckle = rng.gamma(2.0, 0.5, (size, size))
    img = gaussian(speckle, 1.2) * depth
    mask = np.zeros((size, size), bool)
    rr, cc = ellipse(size * 0.48, size * 0.55, size * 0.14, size * 0.2, shape=mask.shape,
                     rotation=0.3)
    mask[rr, cc] = True
    img[mask] *= 0.25
    img = gaussian(img, 1.0)
    img = (img - img.min()) / (img.max() - img.min())
    return (img * 255).astype(np.uint8), mask


def xray_like(seed: int = 1, size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    img = 0.75 + 0.05 * rng.standard_normal((size, size))
    mask = np.zeros((size, size), bool)
    for cx in (0.32, 0.68):
        rr, cc = ellipse(size * 0.5, size * cx, size * 0.3, size * 0.13, shape=mask.shape)
        mask[rr, cc] = True
    img[mask] -= 0.45
    img = gaussian(img, 3.0)
    img = (img - img.min()) / (img.max() - img.min())
    return (img * 255).astype(np.uint8), mask


def main() -> None:
    import imageio.v3 as iio

    (HERE / "images").mkdir(exist_ok=True)
    (HERE / "masks").mkdir(exist_ok=True)
    for name, (img, mask) in {"us_lesion": ultrasound_like(), "xray_lungs": xray_like()}.items():
        iio.imwrite(HERE / "images" / f"{name}.png", img)
        iio.imwrite(HERE / "masks" / f"{name}.png", mask.astype(np.uint8) * 255)
        print("wrote", name)


if __name__ == "__main__":
    main()
