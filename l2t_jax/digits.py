"""A real dataset that needs no download: scikit-learn's handwritten digits (`load_digits`).

1,797 grey 8x8 images of the digits 0-9 (values 0..16), shipped inside the
scikit-learn wheel. Here they become RGB uint8 images upsampled to `image_size`
(PIL bilinear), split once into train and test (stratified, fixed seed), for the
offline quickstart and the tests.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from l2t_jax.data import ImageDataset

TEST_FRACTION = 1.0 / 3.0
_SPLIT_SEED = 20190505


def digits_images(image_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 digits as uint8 RGB.

    Args:
      image_size: output side; the 8x8 images are upsampled with PIL's bilinear filter.

    Returns:
      (x uint8 (1797, image_size, image_size, 3), y int64 (1797,)).
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    grey = np.clip(np.round(bunch.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)  # (N, 8, 8)
    if image_size != grey.shape[1]:
        grey = np.stack(
            [np.asarray(Image.fromarray(g, mode="L").resize((image_size, image_size), Image.BILINEAR)) for g in grey]
        )
    return np.repeat(grey[..., None], 3, axis=-1), bunch.target.astype(np.int64)


def load_digits_dataset(image_size: int = 16) -> dict[str, ImageDataset]:
    """Digits as {"train", "test"} (a third of every class in test; fixed split).

    Args:
      image_size: side of the returned images.

    Returns:
      {"train": ImageDataset (1,198 images), "test": ImageDataset (599 images)}, 10 classes.
    """
    x, y = digits_images(image_size)
    rng = np.random.default_rng(_SPLIT_SEED)
    is_test = np.zeros(len(y), bool)
    for c in range(10):
        idx = np.flatnonzero(y == c)
        is_test[rng.permutation(idx)[: int(round(len(idx) * TEST_FRACTION))]] = True
    names = tuple(str(c) for c in range(10))
    return {
        "train": ImageDataset(x[~is_test], y[~is_test], 10, names),
        "test": ImageDataset(x[is_test], y[is_test], 10, names),
    }
