"""Packs the CIFAR-10 JPEG tar into one compact .npz for the limited-data study.

    python -m experiments.pack_cifar10 --tar ../shared/data/cifar10-jpeg.tar \
        --out data/cifar10_pool500.npz [--pool_per_class 500] [--seed 0]

The limited-data runs need, per class, a training pool (the runner holds out
`val_fraction` of it for validation and draws `n_per_class` images from the rest)
and the whole test set. With a pool of 500 images per class the file holds 5,000
training and 10,000 test images (about 45 MB as uint8, less compressed), small enough
to travel with the working tree to a lent GPU machine. Images are decoded from the
tar directly (no extraction); the pool is a seeded per-class draw, so the file is a
pure function of (tar, pool_per_class, seed).

Use it with `--config.dataset=npz:PATH` (e.g. on experiments/configs/cifar10_limited.py).
"""

from __future__ import annotations

import argparse
import io
import sys
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from l2t_jax.io.atomic import write_atomic

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def _members(tar: tarfile.TarFile) -> dict[str, dict[str, list[tarfile.TarInfo]]]:
    """{split: {class: [members sorted by name]}} for split/class/*.jpg entries."""
    out: dict[str, dict[str, list[tarfile.TarInfo]]] = {}
    for m in tar.getmembers():
        parts = Path(m.name).parts
        if not m.isfile() or len(parts) < 3 or not parts[-1].lower().endswith((".jpg", ".jpeg", ".png")):
            continue
        split, cls = parts[-3], parts[-2]
        out.setdefault(split, {}).setdefault(cls, []).append(m)
    for split in out.values():
        for items in split.values():
            items.sort(key=lambda m: m.name)
    return out


def _decode(tar: tarfile.TarFile, member: tarfile.TarInfo) -> np.ndarray:
    with Image.open(io.BytesIO(tar.extractfile(member).read())) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def pack(tar_path: str | Path, out: str | Path, pool_per_class: int = 500, seed: int = 0) -> dict[str, int]:
    """Writes x, y (the training pool), x_test, y_test and class_names to `out` (np.savez_compressed).

    Args:
      tar_path: the image-folder tar (train/<class>/*.jpg, test/<class>/*.jpg).
      out: the .npz to write (written to a temporary name, then renamed).
      pool_per_class: training images kept per class (0 = all).
      seed: seeds the per-class draw of the pool.
    Returns:
      {"train": images in the pool, "test": test images}.
    """
    tar_path = Path(tar_path)
    if not tar_path.is_file():
        raise FileNotFoundError(f"{tar_path} not found (expected the CIFAR-10 JPEG tar, e.g. ../shared/data/cifar10-jpeg.tar)")
    with tarfile.open(tar_path) as tar:
        index = _members(tar)
        if "train" not in index or "test" not in index:
            raise ValueError(f"{tar_path}: expected train/<class>/ and test/<class>/ folders, found {sorted(index)}")
        classes = sorted(index["train"])
        rng = np.random.default_rng(seed)
        arrays: dict[str, list] = {"x": [], "y": [], "x_test": [], "y_test": []}
        for label, cls in enumerate(classes):
            members = index["train"][cls]
            if pool_per_class:
                if pool_per_class > len(members):
                    raise ValueError(f"class {cls!r} has {len(members)} training images < pool_per_class {pool_per_class}")
                members = [members[i] for i in sorted(rng.permutation(len(members))[:pool_per_class])]
            arrays["x"] += [_decode(tar, m) for m in members]
            arrays["y"] += [label] * len(members)
            test = index["test"].get(cls, [])
            arrays["x_test"] += [_decode(tar, m) for m in test]
            arrays["y_test"] += [label] * len(test)
    packed = dict(
        x=np.stack(arrays["x"]), y=np.asarray(arrays["y"], np.int64),
        x_test=np.stack(arrays["x_test"]), y_test=np.asarray(arrays["y_test"], np.int64),
        class_names=np.asarray(classes),
    )
    write_atomic(out, lambda f: np.savez_compressed(f, **packed))
    return {"train": len(arrays["y"]), "test": len(arrays["y_test"])}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tar", required=True, help="the CIFAR-10 JPEG tar")
    p.add_argument("--out", required=True, help="the .npz to write")
    p.add_argument("--pool_per_class", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    try:
        counts = pack(a.tar, a.out, a.pool_per_class, a.seed)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    size = Path(a.out).stat().st_size / 2**20
    print(f"wrote {a.out}: {counts['train']} training-pool and {counts['test']} test images, {size:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
