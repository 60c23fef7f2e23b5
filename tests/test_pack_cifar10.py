"""experiments.pack_cifar10: the limited-data study's compact array file."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
from PIL import Image

from conftest import require_shared
from experiments import pack_cifar10
from l2t_jax import data as data_lib


def _write_tar(path, per_class=(5, 3), classes=("cat", "dog")):
    rng = np.random.default_rng(0)
    with tarfile.open(path, "w") as tar:
        for split, n in zip(("train", "test"), per_class):
            for c, cls in enumerate(classes):
                for i in range(n):
                    img = np.full((32, 32, 3), 40 * c + i, np.uint8) + rng.integers(0, 3, (32, 32, 3), dtype=np.uint8)
                    buf = io.BytesIO()
                    Image.fromarray(img).save(buf, format="PNG")
                    info = tarfile.TarInfo(f"{split}/{cls}/{i:04d}.png")
                    info.size = len(buf.getvalue())
                    buf.seek(0)
                    tar.addfile(info, buf)


def test_pack_draws_a_seeded_pool_per_class_and_keeps_the_whole_test_set(tmp_path):
    _write_tar(tmp_path / "t.tar")
    out = tmp_path / "pool.npz"
    assert pack_cifar10.main(["--tar", str(tmp_path / "t.tar"), "--out", str(out), "--pool_per_class", "3"]) == 0
    splits = data_lib.load_npz(out)
    train, test = splits["train"], splits["test"]
    assert train.class_names == ("cat", "dog") and train.num_classes == 2
    assert np.bincount(train.labels).tolist() == [3, 3] and np.bincount(test.labels).tolist() == [3, 3]
    # Every pooled image is one of its class's training images (PNG: lossless), chosen by the seed.
    base = train.images[:, 0, 0, 0].astype(int) // 40 * 40
    assert (base == 40 * train.labels).all()
    again = tmp_path / "again.npz"
    pack_cifar10.pack(tmp_path / "t.tar", again, 3, seed=0)
    other = tmp_path / "other.npz"
    pack_cifar10.pack(tmp_path / "t.tar", other, 3, seed=1)
    with np.load(out) as a, np.load(again) as b, np.load(other) as c:
        assert np.array_equal(a["x"], b["x"]) and not np.array_equal(a["x"], c["x"])
    assert not list(tmp_path.glob(".*tmp*"))  # written atomically


def test_pack_errors_name_the_problem(tmp_path):
    assert pack_cifar10.main(["--tar", str(tmp_path / "missing.tar"), "--out", str(tmp_path / "o.npz")]) == 2
    _write_tar(tmp_path / "t.tar")
    with pytest.raises(ValueError, match="class 'cat' has 5 training images < pool_per_class 9"):
        pack_cifar10.pack(tmp_path / "t.tar", tmp_path / "o.npz", 9)


def test_pack_reads_the_shared_cifar10_tar(tmp_path):
    tar = require_shared("data/cifar10-jpeg.tar")
    pack_cifar10.pack(tar, tmp_path / "c10.npz", pool_per_class=2)
    splits = data_lib.load_npz(tmp_path / "c10.npz")
    assert len(splits["train"]) == 20 and len(splits["test"]) == 10000
    assert splits["train"].images.shape[1:] == (32, 32, 3) and splits["train"].class_names[0] == "airplane"
