"""Tests of l2t_jax.data: loaders, splits, augmentation and batching.

torchvision cannot be imported beside torch 2.13 here, so the expected
behaviour of its transforms is written from their documented algorithms.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path
from unittest import mock

import numpy as np
import pytest

from PIL import Image

from conftest import require_shared

from l2t_jax import data as D

REPO = Path(__file__).resolve().parents[1]
CIFAR_CLASSES = ("airplane", "automobile", "bird")
N_TRAIN, N_TEST = 5, 3  # images per class extracted from the CIFAR-10 JPEG tar


def _random_images(n: int, h: int = 32, w: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def _dataset(n_per_class=(30, 20, 10), h: int = 32, seed: int = 0) -> D.ImageDataset:
    labels = np.repeat(np.arange(len(n_per_class)), n_per_class)
    labels = np.random.default_rng(seed + 1).permutation(labels)
    return D.ImageDataset(_random_images(len(labels), h, h, seed), labels, len(n_per_class))


def _collect(it):
    xs, ys = zip(*list(it), strict=True)
    return list(xs), list(ys)


# --------------------------------------------------------------------------- #
# Image folders, on a slice of the real CIFAR-10 JPEG tar
# --------------------------------------------------------------------------- #
@pytest.fixture(scope="module")
def cifar_folder(tmp_path_factory) -> Path:
    tar_path = require_shared("data/cifar10-jpeg.tar")  # skips (fails under CI) when absent or stale
    root = tmp_path_factory.mktemp("cifar10_jpeg")
    want = {"train": N_TRAIN, "test": N_TEST}
    counts: dict[tuple[str, str], int] = {}
    with tarfile.open(tar_path) as tar:  # members come class by class; stop once all are found
        for member in tar:
            parts = member.name.split("/")
            if not member.isfile() or len(parts) != 3 or parts[1] not in CIFAR_CLASSES:
                continue
            key = (parts[0], parts[1])
            if counts.get(key, 0) < want[parts[0]]:
                counts[key] = counts.get(key, 0) + 1
                dest = root.joinpath(*parts)
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(tar.extractfile(member).read())
            if len(counts) == 6 and all(counts[k] == want[k[0]] for k in counts):
                break
    assert len(counts) == 6, f"tar {tar_path} lacks some of {CIFAR_CLASSES}: {counts}"
    return root


def test_image_folder_cifar10_jpeg(cifar_folder):
    out = D.load_image_folder(cifar_folder)
    assert set(out) == {"train", "test"}
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        ds = out[split]
        assert ds.class_names == CIFAR_CLASSES and ds.num_classes == 3
        assert not ds.in_memory and len(ds) == 3 * n
        np.testing.assert_array_equal(ds.labels, np.repeat(np.arange(3), n))
        assert ds.labels.dtype == np.int64
        first = sorted((cifar_folder / split / "bird").iterdir())[0]
        img = ds.image(2 * n)
        assert img.shape == (32, 32, 3) and img.dtype == np.uint8
        np.testing.assert_array_equal(img, np.asarray(Image.open(first).convert("RGB")))
    mem = D.load_image_folder(cifar_folder, in_memory=True)
    assert mem["train"].in_memory and mem["train"].images.shape == (3 * N_TRAIN, 32, 32, 3)
    np.testing.assert_array_equal(mem["test"].images, np.stack([out["test"].image(i) for i in range(3 * N_TEST)]))
    via = D.load_dataset(f"folder:{cifar_folder.name}", data_dir=cifar_folder.parent)
    np.testing.assert_array_equal(via["train"].labels, out["train"].labels)


def test_lazy_and_in_memory_batches_identical(cifar_folder):
    lazy = D.load_image_folder(cifar_folder)["train"]
    mem = D.to_memory(lazy)
    for train in (True, False):
        kw = dict(train=train, image_size=32, seed=3, epoch=1)
        a = _collect(D.batch_iterator(lazy, 4, num_workers=2, **kw))
        b = _collect(D.batch_iterator(mem, 4, **kw))
        for xa, xb in zip(a[0] + a[1], b[0] + b[1], strict=True):
            np.testing.assert_array_equal(xa, xb)


def test_image_folder_layout_rules(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "train" / "b_cls" / "nested").mkdir(parents=True)
    (tmp_path / "train" / "a_cls").mkdir(parents=True)
    (tmp_path / "test" / "a_cls").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, (5, 7), dtype=np.uint8), "L").save(tmp_path / "train/a_cls/x.PNG")
    Image.fromarray(rng.integers(0, 256, (6, 4, 4), dtype=np.uint8), "RGBA").save(tmp_path / "train/b_cls/nested/y.png")
    Image.fromarray(rng.integers(0, 256, (3, 3, 3), dtype=np.uint8)).save(tmp_path / "test/a_cls/z.bmp")
    (tmp_path / "train" / "a_cls" / "notes.txt").write_text("not an image")
    out = D.load_image_folder(tmp_path)
    assert out["train"].class_names == ("a_cls", "b_cls") == out["test"].class_names
    np.testing.assert_array_equal(out["train"].labels, [0, 1])
    assert out["train"].image(0).shape == (5, 7, 3) and out["train"].image(1).shape == (6, 4, 3)
    assert isinstance(out["train"].images, D.ImageFiles) and len(out["test"]) == 1
    with pytest.raises(FileNotFoundError, match="validation"):
        D.load_image_folder(tmp_path, splits=("train", "validation"))
    with pytest.raises(FileNotFoundError, match="not found"):
        D.load_image_folder(tmp_path / "nope")


# --------------------------------------------------------------------------- #
# tfds
# --------------------------------------------------------------------------- #
@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    """Two small real tfds datasets written as array_record into one data_dir.

    * ``l2t_tiny_tensor``: ``tfds.features.Tensor`` uint8 images (fixed 8x8) + ClassLabel.
    * ``l2t_birds_like``: the caltech_birds2011 feature layout (variable-size
      ``Image`` + ``image/filename``, ``label``, ``label_name``, ``bbox``,
      ``segmentation_mask``). tfds encodes Image features with TensorFlow,
      absent here, so ``Image.encode_example`` is patched to write the same
      PNG bytes with Pillow; reading back is tfds' own Pillow decoding.

    Both skip registration: they are found from their files in data_dir, as a
    dataset prepared elsewhere and copied over would be.
    """
    tfds = pytest.importorskip("tensorflow_datasets")
    data_dir = tmp_path_factory.mktemp("tfds")

    def image_of(i: int, h: int = 8, w: int = 8) -> np.ndarray:
        return np.random.default_rng(i).integers(0, 256, (h, w, 3), dtype=np.uint8)

    class L2tTinyTensor(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(8, 8, 3), dtype=np.uint8),
                "label": tfds.features.ClassLabel(names=["cat", "dog", "eel"]),
                "id": tfds.features.Text(),
            }))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(0, 12), "test": self._generate_examples(100, 6)}

        def _generate_examples(self, start, n):
            for i in range(start, start + n):
                yield i, {"image": image_of(i), "label": i % 3, "id": str(i)}

    def sizes(i):
        return 20 + (7 * i) % 30, 25 + (11 * i) % 30

    class L2tBirdsLike(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("0.2.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3)),
                "image/filename": tfds.features.Text(),
                "label": tfds.features.ClassLabel(names=["a", "b"]),
                "label_name": tfds.features.Text(),
                "bbox": tfds.features.BBoxFeature(),
                "segmentation_mask": tfds.features.Image(shape=(None, None, 1)),
            }))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(0, 6), "test": self._generate_examples(50, 2)}

        def _generate_examples(self, start, n):
            for i in range(start, start + n):
                h, w = sizes(i)
                yield i, {"image": image_of(i, h, w), "image/filename": f"{i}.jpg", "label": i % 2,
                          "label_name": "ab"[i % 2], "bbox": tfds.features.BBox(0.1, 0.2, 0.5, 0.6),
                          "segmentation_mask": np.zeros((h, w, 1), np.uint8)}

    def png_bytes(self, image):
        arr = np.asarray(image)
        buf = io.BytesIO()
        Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(buf, format="PNG")
        return buf.getvalue()

    L2tTinyTensor(data_dir=data_dir, file_format="array_record").download_and_prepare()
    with mock.patch.object(tfds.features.Image, "encode_example", png_bytes):
        L2tBirdsLike(data_dir=data_dir, file_format="array_record").download_and_prepare()
    return data_dir, image_of, sizes


def test_tfds_tensor_dataset_in_memory(tfds_dir):
    data_dir, image_of, _ = tfds_dir
    out = D.load_tfds("l2t_tiny_tensor", data_dir)
    assert set(out) == {"train", "test"}
    for split, start, n in (("train", 0, 12), ("test", 100, 6)):
        ds = out[split]
        assert ds.in_memory and ds.images.shape == (n, 8, 8, 3) and len(ds) == n
        assert ds.class_names == ("cat", "dog", "eel") and ds.num_classes == 3
        # tfds shuffles records on write: match each image to the one generated for its key.
        by_image = {image_of(i).tobytes(): i % 3 for i in range(start, start + n)}
        assert {ds.images[k].tobytes(): int(ds.labels[k]) for k in range(n)} == by_image
    lazy = D.load_dataset("tfds:l2t_tiny_tensor", str(data_dir), in_memory=False)
    assert not lazy["train"].in_memory
    np.testing.assert_array_equal(np.stack([lazy["train"].image(i) for i in range(12)]), out["train"].images)
    np.testing.assert_array_equal(lazy["train"].labels, out["train"].labels)
    renamed = D.load_tfds("l2t_tiny_tensor", data_dir, splits={"train": "train[:8]", "val": "train[8:]"})
    assert len(renamed["train"]) == 8 and len(renamed["val"]) == 4
    with pytest.raises(ValueError, match="Unknown split 'validation'"):
        D.load_tfds("l2t_tiny_tensor", data_dir, splits=("train", "validation"))


def test_tfds_image_features_lazy(tfds_dir):
    data_dir, image_of, sizes = tfds_dir
    out = D.load_tfds("l2t_birds_like", data_dir)
    ds = out["train"]
    assert not ds.in_memory and len(ds) == 6 and len(out["test"]) == 2
    assert ds.class_names == ("a", "b")
    generated = {image_of(i, *sizes(i)).tobytes(): i % 2 for i in range(6)}
    decoded = {ds.image(k).tobytes(): int(ds.labels[k]) for k in range(6)}
    assert decoded == generated  # variable sizes survive; labels read without decoding images
    assert len({ds.image(k).shape for k in range(6)}) > 1
    x, y = next(D.batch_iterator(ds, 4, train=True, image_size=224, seed=0, epoch=0, prefetch=0))
    assert x.shape == (4, 224, 224, 3) and x.dtype == np.float32 and y.dtype == np.int32


def test_tfds_mock_real_builders():
    """tfds.testing.mock_data serves the real cifar10/stl10 builders through data_source without TF.

    Only decoding without ``decoders`` works under the mock: given
    ``SkipDecoding`` it re-encodes its random Image features with TensorFlow,
    so caltech_birds2011/stanford_dogs (whose extra Image features / lazy
    label pass use SkipDecoding) cannot be mocked here; the birds-like dataset
    above covers their real reading path.
    """
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
        cifar = D.load_dataset("tfds:cifar10", "/nonexistent/tfds")
        stl = D.load_tfds("stl10", "/nonexistent/tfds")
    assert set(cifar) == set(stl) == {"train", "test"}  # stl10's "unlabelled" split is not loaded
    assert cifar["train"].images.shape == (6, 32, 32, 3) and cifar["train"].num_classes == 10
    assert stl["test"].images.shape == (6, 96, 96, 3) and stl["test"].num_classes == 10
    x, y = next(D.batch_iterator(stl["train"], 4, train=True, image_size=32, seed=0, epoch=0, resize_to=32))
    assert x.shape == (4, 32, 32, 3)


def test_tfds_missing_dataset_message(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(FileNotFoundError) as err:
        D.load_tfds("cifar10", tmp_path)
    msg = str(err.value)
    assert str(tmp_path / "cifar10") in msg
    assert f"tfds build cifar10 --data_dir={tmp_path} --file_format=array_record" in msg
    assert "--manual_dir" in msg
    assert not any(tmp_path.iterdir())  # nothing downloaded or written
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        D.load_tfds("l2t_no_such_dataset", tmp_path)


# --------------------------------------------------------------------------- #
# npz and dispatch
# --------------------------------------------------------------------------- #
def test_npz_round_trip_and_dispatch(tmp_path):
    x, xt = _random_images(7), _random_images(3, seed=1)
    y, yt = np.array([0, 1, 2, 3, 0, 1, 2]), np.array([4, 0, 1], np.int32)
    np.savez(tmp_path / "d.npz", x=x, y=y, x_test=xt, y_test=yt)
    out = D.load_npz(tmp_path / "d.npz")
    np.testing.assert_array_equal(out["train"].images, x)
    np.testing.assert_array_equal(out["test"].labels, yt)
    assert out["test"].labels.dtype == np.int64 and out["train"].num_classes == 5
    np.savez(tmp_path / "e.npz", x=x, y=y, class_names=np.array(list("abcdef")))
    out = D.load_dataset("e.npz", data_dir=tmp_path)
    assert set(out) == {"train"} and out["train"].class_names == tuple("abcdef") and out["train"].num_classes == 6
    assert len(D.load_dataset(f"npz:{tmp_path / 'd.npz'}")["test"]) == 3
    with pytest.raises(ValueError, match="unknown dataset source"):
        D.load_dataset("hdf5:foo")


@pytest.mark.parametrize(
    "arrays, match",
    [
        (dict(x=_random_images(2)), r"missing key\(s\) \['y'\]"),
        (dict(x=_random_images(2).astype(np.float32), y=[0, 1]), "x must be uint8"),
        (dict(x=_random_images(2)[..., 0], y=[0, 1]), "x must be uint8"),
        (dict(x=_random_images(2), y=[0, 1, 1]), "2 images in x but 3 labels"),
        (dict(x=_random_images(2), y=[0.0, 1.0]), "y must be a 1-D integer array"),
        (dict(x=_random_images(2), y=[0, -1]), "negative"),
        (dict(x=_random_images(2), y=[0, 1], x_test=_random_images(1)), "together"),
    ],
)
def test_npz_bad_inputs(tmp_path, arrays, match):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match=match):
        D.load_npz(tmp_path / "bad.npz")


def test_npz_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        D.load_npz(tmp_path / "nope.npz")


def test_image_dataset_validation():
    with pytest.raises(ValueError, match="labels must lie"):
        D.ImageDataset(_random_images(2), np.array([0, 3]), 3)
    with pytest.raises(ValueError, match="2 images but 3 labels"):
        D.ImageDataset(_random_images(2), np.array([0, 1, 1]), 3)
    with pytest.raises(ValueError, match="uint8"):
        D.ImageDataset(_random_images(2).astype(np.float32), np.array([0, 1]), 3)
    with pytest.raises(ValueError, match="class names"):
        D.ImageDataset(_random_images(2), np.array([0, 1]), 3, ("a", "b"))


# --------------------------------------------------------------------------- #
# Splits
# --------------------------------------------------------------------------- #
def test_train_val_split():
    ds = _dataset((30, 20, 10))
    train, val = D.train_val_split(ds, 0.1, seed=0)
    train2, val2 = D.train_val_split(ds, 0.1, seed=0)
    np.testing.assert_array_equal(val.images, val2.images)
    np.testing.assert_array_equal(np.bincount(val.labels, minlength=3), [3, 2, 1])
    assert len(train) + len(val) == len(ds)
    train_keys = {im.tobytes() for im in train.images}
    val_keys = {im.tobytes() for im in val.images}
    assert not train_keys & val_keys and len(train_keys | val_keys) == len(ds)
    _, val3 = D.train_val_split(ds, 0.1, seed=1)
    assert {im.tobytes() for im in val3.images} != val_keys
    _, flat = D.train_val_split(ds, 0.25, seed=0, stratified=False)
    assert len(flat) == 15
    lazy = D.ImageDataset(list(ds.images), ds.labels, 3)
    lazy_train, _ = D.train_val_split(lazy, 0.1, seed=0)
    np.testing.assert_array_equal(np.stack([lazy_train.image(i) for i in range(len(lazy_train))]), train.images)


def test_per_class_subset_nested():
    ds = _dataset((30, 20, 10))
    small = D.per_class_subset(ds, 5, seed=7)
    large = D.per_class_subset(ds, 10, seed=7)
    np.testing.assert_array_equal(np.bincount(small.labels), [5, 5, 5])
    keys = lambda d: {im.tobytes() for im in d.images}  # noqa: E731
    assert keys(small) < keys(large)
    np.testing.assert_array_equal(D.per_class_subset(ds, 5, seed=7).images, small.images)
    assert keys(D.per_class_subset(ds, 5, seed=8)) != keys(small)
    with pytest.raises(ValueError, match="class 2 has 10 images, fewer than n_per_class=11"):
        D.per_class_subset(ds, 11)


# --------------------------------------------------------------------------- #
# Transforms
# --------------------------------------------------------------------------- #
def test_normalize_constants():
    x = np.array([[[0, 0, 0], [255, 255, 255], [1, 128, 254]]], np.uint8)
    out = D.normalize(x)
    assert out.dtype == np.float32 and out.shape == x.shape
    mean = np.array([0.485, 0.456, 0.406], np.float32)
    std = np.array([0.229, 0.224, 0.225], np.float32)
    expected = (x.astype(np.float32) / np.float32(255) - mean) / std  # torchvision's float32 ops
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_allclose(out[0, 0], -np.array([0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225], rtol=1e-6)


def _shift_match(out: np.ndarray, image: np.ndarray, pad: int = 4):
    """The (dy, dx, flipped) for which out is image shifted with zero fill, or None."""
    size = out.shape[0]
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
    hits = []
    for top in range(2 * pad + 1):
        for left in range(2 * pad + 1):
            crop = padded[top:top + size, left:left + size]
            for flipped in (False, True):
                if np.array_equal(out, crop[:, ::-1] if flipped else crop):
                    hits.append((top - pad, left - pad, flipped))
    return hits


def test_pad_crop_flip():
    image = _random_images(1, seed=3)[0] | 1  # no zero pixel inside the image
    out = D.pad_crop_flip(image, 0, 8, False)
    assert out.shape == (32, 32, 3)
    assert not out[:4].any() and not out[:, 28:].any()  # black borders of the shifted content
    np.testing.assert_array_equal(out[4:, :28], image[:28, 4:])
    np.testing.assert_array_equal(D.pad_crop_flip(image, 4, 4, True), image[:, ::-1])
    seen, flips = set(), 0
    for s in range(200):
        out = D.random_pad_crop_flip(image, np.random.default_rng(s))
        hits = _shift_match(out, image)
        assert len(hits) == 1 and abs(hits[0][0]) <= 4 and abs(hits[0][1]) <= 4
        seen.add(hits[0][:2])
        flips += hits[0][2]
    assert {dy for dy, _ in seen} == set(range(-4, 5)) and 60 < flips < 140
    np.testing.assert_array_equal(
        D.random_pad_crop_flip(image, np.random.default_rng(5)), D.random_pad_crop_flip(image, np.random.default_rng(5))
    )


def test_pad_crop_flip_batch_matches_per_image():
    images = _random_images(6)
    rng = np.random.default_rng(0)
    top, left, flip = rng.integers(0, 9, 6), rng.integers(0, 9, 6), rng.random(6) < 0.5
    batch = D.pad_crop_flip_batch(images, top, left, flip)
    for k in range(6):
        np.testing.assert_array_equal(batch[k], D.pad_crop_flip(images[k], top[k], left[k], flip[k]))


def test_random_horizontal_flip():
    image = _random_images(1)[0]
    outs = [D.random_horizontal_flip(image, np.random.default_rng(s)) for s in range(40)]
    n_flipped = sum(np.array_equal(o, image[:, ::-1]) for o in outs)
    assert all(np.array_equal(o, image) or np.array_equal(o, image[:, ::-1]) for o in outs)
    assert 5 < n_flipped < 35


def test_resize_and_center_crop():
    assert D.resize_shorter(_random_images(1, 96, 96)[0], 32).shape == (32, 32, 3)
    assert D.resize_shorter(_random_images(1, 300, 400)[0], 256).shape == (256, 341, 3)  # int(256*400/300)
    assert D.resize_shorter(_random_images(1, 400, 300)[0], 256).shape == (341, 256, 3)
    img = _random_images(1, 32, 40)[0]
    assert D.resize_shorter(img, 32) is img  # already the right size: unchanged
    flat = np.full((96, 96, 3), 77, np.uint8)
    np.testing.assert_array_equal(D.resize_shorter(flat, 32), np.full((32, 32, 3), 77, np.uint8))
    # PIL bilinear shrinking antialiases: a 3x down-scale averages 3-pixel spans.
    stripes = np.zeros((96, 96, 3), np.uint8)
    stripes[:, ::3] = 255
    assert 80 <= D.resize_shorter(stripes, 32)[10, 10, 0] <= 90
    # CenterCrop: top/left = round((H - size) / 2) with Python rounding (117 / 2 -> 58).
    coded = np.arange(256 * 341, dtype=np.int64).reshape(256, 341)
    image = np.stack([coded % 256, coded // 256 % 256, coded // 65536], -1).astype(np.uint8)
    crop = D.center_crop(image, 224)
    assert crop.shape == (224, 224, 3)
    np.testing.assert_array_equal(crop, image[16:240, 58:282])
    small = np.full((200, 210, 3), 9, np.uint8)
    padded = D.center_crop(small, 224)  # torchvision pads with zeros first
    assert padded.shape == (224, 224, 3) and not padded[:12].any() and not padded[:, :7].any()
    assert padded[12:212, 7:217].min() == 9
    out = D.eval_transform(_random_images(1, 300, 500)[0], image_size=224)
    assert out.shape == (224, 224, 3)


def test_random_resized_crop():
    rng = np.random.default_rng(0)
    for h, w in ((300, 500), (224, 224), (60, 40), (500, 120)):
        image = _random_images(1, h, w)[0]
        for _ in range(20):
            top, left, ch, cw = D.random_resized_crop_box(h, w, rng)
            assert 0 <= top and top + ch <= h and 0 <= left and left + cw <= w and ch > 0 and cw > 0
        assert D.random_resized_crop(image, rng).shape == (224, 224, 3)
        assert D.train_transform(image, rng, image_size=224).shape == (224, 224, 3)
    # Area fraction and aspect ratio within bounds when a try succeeds.
    boxes = [D.random_resized_crop_box(1000, 1000, rng) for _ in range(300)]
    fracs = np.array([b[2] * b[3] / 1e6 for b in boxes])
    ratios = np.array([b[3] / b[2] for b in boxes])
    assert fracs.min() >= 0.079 and fracs.max() <= 1.0 and fracs.min() < 0.2 and fracs.max() > 0.8
    assert ratios.min() >= 0.74 and ratios.max() <= 1.34
    # Fallback: no try can fit a 10-px-high image, so the widest centred crop of ratio 4/3.
    assert D.random_resized_crop_box(10, 1000, rng) == (0, (1000 - 13) // 2, 10, 13)
    assert D.random_resized_crop_box(1000, 10, rng) == ((1000 - 13) // 2, 0, 13, 10)
    image = _random_images(1, 120, 90)[0]
    a = D.train_transform(image, np.random.default_rng(4), image_size=224)
    np.testing.assert_array_equal(a, D.train_transform(image, np.random.default_rng(4), image_size=224))


def test_resized_crop_is_crop_then_resize():
    image = _random_images(1, 50, 60)[0]
    out = D.resized_crop(image, 5, 7, 20, 30, 16)
    expected = Image.fromarray(np.ascontiguousarray(image[5:25, 7:37])).resize((16, 16), Image.BILINEAR)
    np.testing.assert_array_equal(out, np.asarray(expected))


# --------------------------------------------------------------------------- #
# Batching
# --------------------------------------------------------------------------- #
def test_steps_per_epoch():
    assert D.steps_per_epoch(50000, 128) == 391 and D.steps_per_epoch(50000, 128, True) == 390
    assert D.steps_per_epoch(256, 128) == 2 == D.steps_per_epoch(256, 128, True)


def test_batch_iterator_eval_and_shapes():
    ds = _dataset((10, 7, 6))
    xs, ys = _collect(D.batch_iterator(ds, 10, train=False, image_size=32, seed=0, epoch=0))
    assert [x.shape for x in xs] == [(10, 32, 32, 3), (10, 32, 32, 3), (3, 32, 32, 3)]
    assert all(x.dtype == np.float32 for x in xs) and all(y.dtype == np.int32 for y in ys)
    np.testing.assert_array_equal(np.concatenate(xs), D.normalize(ds.images))  # no augmentation, in order
    np.testing.assert_array_equal(np.concatenate(ys), ds.labels)
    xs, _ = _collect(D.batch_iterator(ds, 10, train=True, image_size=32, seed=0, epoch=0, drop_remainder=True))
    assert len(xs) == 2


def test_batch_iterator_train_epoch_semantics():
    ds = _dataset((10, 7, 6))
    ds = D.ImageDataset(ds.images | 1, ds.labels, 3)  # no black pixel inside the images
    kw = dict(train=True, image_size=32, seed=1)
    xs, ys = _collect(D.batch_iterator(ds, 8, epoch=0, **kw))
    again, _ = _collect(D.batch_iterator(ds, 8, epoch=0, **kw))
    other, other_y = _collect(D.batch_iterator(ds, 8, epoch=1, **kw))
    for a, b in zip(xs, again, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(np.concatenate(ys), np.concatenate(other_y))  # reshuffled per epoch
    assert sorted(np.concatenate(ys).tolist()) == sorted(ds.labels.tolist())  # each example once
    black = D.normalize(np.zeros((1, 1, 3), np.uint8))[0, 0]
    x = np.concatenate(xs)
    assert (x == black).all(-1).any()  # zero padding, black before normalisation
    # Each output is one input, shifted by <= 4 px (zero fill) and maybe mirrored.
    first = np.round((x[0] * D._STD32 + D._MEAN32) * 255).astype(np.uint8)
    assert sum(len(_shift_match(first, im)) for im in ds.images) == 1


def _assert_resume(ds, batch_size, **kw):
    full, full_y = _collect(D.batch_iterator(ds, batch_size, **kw))
    for k in (1, len(full) - 1):
        rest, rest_y = _collect(D.batch_iterator(ds, batch_size, start_step=k, **kw))
        assert len(rest) == len(full) - k
        for a, b in zip(rest + rest_y, full[k:] + full_y[k:], strict=True):
            np.testing.assert_array_equal(a, b)
    assert list(D.batch_iterator(ds, batch_size, start_step=len(full), **kw)) == []
    with pytest.raises(ValueError, match="start_step"):
        D.batch_iterator(ds, batch_size, start_step=len(full) + 1, **kw)


def test_resume_small_in_memory():
    _assert_resume(_dataset((10, 7, 6)), 6, train=True, image_size=32, seed=2, epoch=3)


def test_resume_small_lazy_resized_matches_in_memory():
    big = _dataset((5, 4, 3), h=96)
    lazy = D.ImageDataset(list(big.images), big.labels, 3)
    kw = dict(train=True, image_size=32, seed=2, epoch=3, resize_to=32)
    _assert_resume(lazy, 4, num_workers=2, **kw)
    a, _ = _collect(D.batch_iterator(lazy, 4, num_workers=1, prefetch=0, **kw))
    b, _ = _collect(D.batch_iterator(big, 4, num_workers=3, prefetch=3, **kw))
    for xa, xb in zip(a, b, strict=True):
        np.testing.assert_array_equal(xa, xb)
    x, _ = next(D.batch_iterator(big, 12, train=False, image_size=32, seed=0, epoch=0, resize_to=32))
    np.testing.assert_array_equal(x[0], D.normalize(D.resize_shorter(big.images[0], 32)))


def test_resume_large_lazy():
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (int(rng.integers(40, 80)), int(rng.integers(40, 80)), 3), dtype=np.uint8)
              for _ in range(7)]
    ds = D.ImageDataset(images, np.arange(7) % 2, 2)
    _assert_resume(ds, 3, train=True, image_size=64 + 1, seed=5, epoch=2, num_workers=2)
    a, _ = _collect(D.batch_iterator(ds, 3, train=True, image_size=224, seed=5, epoch=2, num_workers=1))
    b, _ = _collect(D.batch_iterator(ds, 3, train=True, image_size=224, seed=5, epoch=2, num_workers=3, prefetch=0))
    for xa, xb in zip(a, b, strict=True):
        assert xa.shape[1:] == (224, 224, 3)
        np.testing.assert_array_equal(xa, xb)
    x, _ = next(D.batch_iterator(ds, 7, train=False, image_size=224, seed=0, epoch=0))
    np.testing.assert_array_equal(x[3], D.normalize(D.center_crop(D.resize_shorter(images[3], 256), 224)))


def test_batch_iterator_errors_and_early_stop():
    class Broken:
        def __len__(self):
            return 4

        def __getitem__(self, i):
            raise OSError(f"cannot read image {i}")

    ds = D.ImageDataset(Broken(), np.zeros(4, np.int64), 1)
    with pytest.raises(OSError, match="cannot read image"):
        list(D.batch_iterator(ds, 2, train=False, image_size=32, seed=0, epoch=0))
    it = D.batch_iterator(_dataset((40, 40, 40)), 2, train=True, image_size=32, seed=0, epoch=0, prefetch=1)
    next(it)
    it.close()  # stops the prefetch thread without consuming the epoch
    assert len(list(D.batch_iterator(_dataset((4, 4, 4)), 5, train=True, image_size=32, seed=0, epoch=0))) == 3
