"""Datasets, splits, augmentation and batching for L2T-ww (host-side numpy).

Everything here runs on the host in numpy (plus Pillow for decoding and
resizing); batches come out as ``float32`` NHWC arrays ready to be put on the
accelerator.

Sources (each loader returns ``{split_name: ImageDataset}``):

* :func:`load_tfds` -- a prepared TensorFlow-Datasets dataset read through
  random-access data sources (works without TensorFlow);
* :func:`load_image_folder` -- ``root/<split>/<class>/<image>`` folders;
* :func:`load_npz` -- a ``.npz`` with ``x``/``y`` (and ``x_test``/``y_test``);
* :func:`load_dataset` -- one string (``"tfds:NAME"``, ``"folder:PATH"``,
  ``"npz:PATH"``) dispatching to the above.

Preprocessing follows the reference (alinlab/L2T-ww ``check_dataset.py``, with
torchvision's documented semantics on PIL images):

* small images (``image_size <= 64``, e.g. CIFAR, STL-10 resized 96->32):
  train = [Resize(resize_to)] -> Pad(4, zeros) -> RandomCrop(size) ->
  RandomHorizontalFlip; eval = [Resize(resize_to)] only;
* large images (``image_size > 64``, e.g. 224 for CUB/MIT67/Stanford40/Dogs):
  train = RandomResizedCrop(size) -> RandomHorizontalFlip; eval =
  Resize(size * 256 / 224) -> CenterCrop(size);
* then ``x / 255`` and normalisation with the ImageNet mean/std, in float32.

Randomness is a pure function of ``(seed, epoch, index)``: the shuffle order of
an epoch comes from ``(seed, epoch)`` and the augmentation of an image from
``(seed, epoch, dataset index)``. A run resumed at ``start_step=k`` therefore sees
exactly the batches ``k, k+1, ...`` of the uninterrupted epoch, whatever the
number of worker threads.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeAlias, runtime_checkable

import numpy as np
from PIL import Image

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
# File suffixes accepted by torchvision's ImageFolder (compared case-insensitively).
IMG_EXTENSIONS: tuple[str, ...] = (
    ".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp",
)
SMALL_IMAGE_MAX = 64  # image_size <= this uses the pad/crop pipeline, else the ImageNet one
PAD = 4  # Pad(4) of the small-image pipeline

_MEAN32 = np.asarray(IMAGENET_MEAN, dtype=np.float32)
_STD32 = np.asarray(IMAGENET_STD, dtype=np.float32)
# Independent random streams derived from (seed, epoch, stream, index).
_STREAM_ORDER, _STREAM_SMALL_AUG, _STREAM_LARGE_AUG = 0, 1, 2


@runtime_checkable
class RandomAccessImages(Protocol):
    """A lazy image source: ``len(src)`` and ``src[i]`` -> uint8 array (H, W, 3)."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> np.ndarray: ...


Images: TypeAlias = "np.ndarray | Sequence[np.ndarray] | RandomAccessImages"


# --------------------------------------------------------------------------- #
# Dataset container
# --------------------------------------------------------------------------- #
@dataclasses.dataclass(frozen=True, eq=False)
class ImageDataset:
    """Labelled images of one split.

    Attributes:
      images: a uint8 array (N, H, W, 3) held in memory, or a sequence of uint8
        (H_i, W_i, 3) arrays, or a lazy random-access source whose ``[i]``
        returns such an array (decoded on demand; used for large-image sets).
      labels: int64 (N,), values in ``[0, num_classes)``.
      num_classes: number of classes of the task (may exceed the labels present).
      class_names: optional names, ``len == num_classes``.
    """

    images: Images
    labels: np.ndarray
    num_classes: int
    class_names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        labels = np.asarray(self.labels)
        if labels.ndim != 1 or not (labels.dtype.kind in "iu" or labels.size == 0):
            raise ValueError(f"labels must be a 1-D integer array, got {labels.dtype} {labels.shape}")
        labels = labels.astype(np.int64)
        object.__setattr__(self, "labels", labels)
        if isinstance(self.images, np.ndarray):
            if self.images.dtype != np.uint8 or self.images.ndim != 4 or self.images.shape[-1] != 3:
                raise ValueError(
                    f"in-memory images must be uint8 (N, H, W, 3), got {self.images.dtype} {self.images.shape}"
                )
        elif not (hasattr(self.images, "__len__") and hasattr(self.images, "__getitem__")):
            raise TypeError(f"images must support len() and [i], got {type(self.images).__name__}")
        if len(self.images) != len(labels):
            raise ValueError(f"{len(self.images)} images but {len(labels)} labels")
        if int(self.num_classes) < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        object.__setattr__(self, "num_classes", int(self.num_classes))
        if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"labels must lie in [0, {self.num_classes}), got [{labels.min()}, {labels.max()}]")
        if self.class_names is not None:
            names = tuple(str(n) for n in self.class_names)
            if len(names) != self.num_classes:
                raise ValueError(f"{len(names)} class names for {self.num_classes} classes")
            object.__setattr__(self, "class_names", names)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def in_memory(self) -> bool:
        """Whether ``images`` is one uint8 (N, H, W, 3) array."""
        return isinstance(self.images, np.ndarray)

    def image(self, index: int) -> np.ndarray:
        """Decoded image ``index`` as uint8 (H, W, 3)."""
        return as_rgb_uint8(self.images[int(index)])

    def subset(self, indices: Sequence[int] | np.ndarray) -> ImageDataset:
        """The images at ``indices`` (in that order), lazily if the source is lazy.

        Args:
          indices: int (M,) positions into this dataset.

        Returns:
          An ``ImageDataset`` of M images with the same classes.
        """
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"subset indices out of range [0, {len(self)})")
        if isinstance(self.images, np.ndarray):
            images: Images = self.images[idx]
        elif isinstance(self.images, (list, tuple)):
            images = [self.images[i] for i in idx]
        else:
            images = _IndexedView.of(self.images, idx)
        return ImageDataset(images, self.labels[idx], self.num_classes, self.class_names)

    def class_indices(self) -> list[np.ndarray]:
        """Per class c, the ascending int64 indices of its images (``num_classes`` arrays)."""
        order = np.argsort(self.labels, kind="stable")
        bounds = np.searchsorted(self.labels[order], np.arange(self.num_classes + 1))
        return [order[bounds[c]:bounds[c + 1]] for c in range(self.num_classes)]


class _IndexedView:
    """Lazy ``source[indices[i]]``."""

    def __init__(self, source: Any, indices: np.ndarray):
        self.source, self.indices = source, indices

    @classmethod
    def of(cls, source: Any, indices: np.ndarray) -> _IndexedView:
        if isinstance(source, _IndexedView):  # compose rather than nest
            return cls(source.source, source.indices[indices])
        return cls(source, indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> np.ndarray:
        return self.source[int(self.indices[index])]


class ImageFiles:
    """Lazy images from files, decoded by Pillow to RGB uint8 (H, W, 3) on access."""

    def __init__(self, paths: Sequence[str | os.PathLike]):
        self.paths = tuple(os.fspath(p) for p in paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> np.ndarray:
        return decode_image_file(self.paths[index])


def decode_image_file(path: str | os.PathLike) -> np.ndarray:
    """Decode an image file like torchvision's ``pil_loader`` (``convert("RGB")``).

    Returns:
      uint8 (H, W, 3).
    """
    with open(path, "rb") as f, Image.open(f) as img:
        return np.asarray(img.convert("RGB"))


def as_rgb_uint8(image: Any) -> np.ndarray:
    """Coerce one image to uint8 (H, W, 3): grey (H, W) / (H, W, 1) is repeated, alpha dropped."""
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise ValueError(f"images must be uint8, got {arr.dtype}")
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected an (H, W, 3) image, got shape {arr.shape}")
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    return arr[..., :3]


def to_memory(ds: ImageDataset, num_workers: int = 4) -> ImageDataset:
    """Decode every image of a lazy dataset (in a thread pool).

    Returns:
      The same dataset with ``images`` a uint8 (N, H, W, 3) array when all
      images share one size, else a list of uint8 (H_i, W_i, 3) arrays.
    """
    if ds.in_memory:
        return ds
    return dataclasses.replace(ds, images=_stack_if_same_shape(_parallel_map(ds.image, range(len(ds)), num_workers)))


def _stack_if_same_shape(images: list[np.ndarray]) -> Images:
    if images and all(im.shape == images[0].shape for im in images):
        return np.stack(images)
    return images


def _parallel_map(fn: Callable[[Any], Any], items: Iterable[Any], num_workers: int, chunk: int = 256) -> list[Any]:
    """``[fn(i) for i in items]``, in chunks over a thread pool when ``num_workers > 1``."""
    items = list(items)
    if num_workers <= 1 or len(items) <= 1:
        return [fn(i) for i in items]
    chunks = [items[k:k + chunk] for k in range(0, len(items), chunk)]
    with concurrent.futures.ThreadPoolExecutor(num_workers) as pool:
        return [r for part in pool.map(lambda c: [fn(i) for i in c], chunks) for r in part]


# --------------------------------------------------------------------------- #
# Loaders
# --------------------------------------------------------------------------- #
def load_npz(path: str | os.PathLike) -> dict[str, ImageDataset]:
    """Load a ``.npz`` dataset.

    Expected keys: ``x`` uint8 (N, H, W, 3) and ``y`` integer (N,); optional
    ``x_test``/``y_test`` (same layout) for a test split; optional ``num_classes``
    (scalar) or ``class_names`` (str array); otherwise ``num_classes`` is
    ``max(label) + 1`` over both splits.

    Args:
      path: the ``.npz`` file.

    Returns:
      ``{"train": ImageDataset}`` plus ``"test"`` when ``x_test`` is present.

    Raises:
      FileNotFoundError: the file does not exist.
      ValueError: missing keys, wrong dtypes/shapes, or mismatched lengths.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"npz dataset not found: {path}")
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    missing = {"x", "y"} - arrays.keys()
    if missing:
        raise ValueError(f"{path}: missing key(s) {sorted(missing)}; found {sorted(arrays)} (need x, y)")
    if ("x_test" in arrays) != ("y_test" in arrays):
        raise ValueError(f"{path}: x_test and y_test must be given together")
    pairs = {"train": ("x", "y")}
    if "x_test" in arrays:
        pairs["test"] = ("x_test", "y_test")
    for xk, yk in pairs.values():
        x, y = arrays[xk], arrays[yk]
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"{path}: {xk} must be uint8 (N, H, W, 3), got {x.dtype} {x.shape}")
        if y.ndim != 1 or y.dtype.kind not in "iu":
            raise ValueError(f"{path}: {yk} must be a 1-D integer array, got {y.dtype} {y.shape}")
        if len(y) != len(x):
            raise ValueError(f"{path}: {len(x)} images in {xk} but {len(y)} labels in {yk}")
        if y.size and y.min() < 0:
            raise ValueError(f"{path}: {yk} has negative labels")
    class_names = tuple(str(s) for s in arrays["class_names"]) if "class_names" in arrays else None
    if "num_classes" in arrays:
        num_classes = int(arrays["num_classes"])
    elif class_names is not None:
        num_classes = len(class_names)
    else:
        num_classes = 1 + max(int(arrays[yk].max(initial=0)) for _, yk in pairs.values())
    return {
        split: ImageDataset(arrays[xk], arrays[yk].astype(np.int64), num_classes, class_names)
        for split, (xk, yk) in pairs.items()
    }


def load_image_folder(
    root: str | os.PathLike,
    *,
    splits: Sequence[str] = ("train", "test"),
    in_memory: bool = False,
    num_workers: int = 4,
) -> dict[str, ImageDataset]:
    """Load ``root/<split>/<class>/**/<image>`` folders (MIT67, Stanford40, CIFAR JPEG tar).

    Classes are the sub-folder names of all requested splits, sorted as Python
    strings (torchvision ``ImageFolder`` order when every split has every
    class); files are walked recursively in sorted order and kept if their
    suffix is in :data:`IMG_EXTENSIONS`. Images are decoded lazily by Pillow to
    RGB uint8 unless ``in_memory``.

    Note: ``tfds.ImageFolder`` (tfds 4.9.10) cannot be used without TensorFlow:
    its constructor already lists the folders through ``tf.io.gfile`` (checked:
    ``ModuleNotFoundError: tensorflow``) and its ``as_dataset`` is tf.data. So
    the folders are read here with ``os``/Pillow; the class discovery follows
    the same rule as tfds (sorted union of class names over the splits).

    Args:
      root: folder holding one sub-folder per split.
      splits: split folder names to load (all must exist).
      in_memory: decode everything now (see :func:`to_memory`).
      num_workers: decoding threads when ``in_memory``.

    Returns:
      ``{split: ImageDataset}`` with shared ``class_names``.

    Raises:
      FileNotFoundError: ``root`` or a split folder is missing, or a split has no image.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"image folder root not found: {root}")
    missing = [s for s in splits if not (root / s).is_dir()]
    if missing:
        present = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise FileNotFoundError(
            f"split folder(s) {missing} not found in {root} (found {present}); "
            "expected root/<split>/<class>/<image>"
        )
    classes = sorted({p.name for s in splits for p in (root / s).iterdir() if p.is_dir()})
    out = {}
    for split in splits:
        paths, labels = [], []
        for label, name in enumerate(classes):
            class_dir = root / split / name
            for dirpath, _, fnames in sorted(os.walk(class_dir, followlinks=True)):
                for fname in sorted(fnames):
                    if fname.lower().endswith(IMG_EXTENSIONS):
                        paths.append(os.path.join(dirpath, fname))
                        labels.append(label)
        if not paths:
            raise FileNotFoundError(f"no image files ({', '.join(IMG_EXTENSIONS)}) under {root / split}")
        ds = ImageDataset(ImageFiles(paths), np.asarray(labels, np.int64), len(classes), tuple(classes))
        out[split] = to_memory(ds, num_workers) if in_memory else ds
    return out


class _TfdsImages:
    """Lazy images of a tfds random-access data source (decodes one example on access)."""

    def __init__(self, source: Any, key: str):
        self.source, self.key = source, key

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> np.ndarray:
        return as_rgb_uint8(self.source[int(index)][self.key])


def _tfds_not_prepared(name: str, builder: Any, data_dir: str | None) -> str:
    root = data_dir or str(Path(builder.data_dir).parents[1])
    return (
        f"tfds dataset {name!r} is not prepared: nothing readable in {builder.data_dir} "
        f"(data_dir={root}). It is never downloaded with download=False, and building it needs "
        f"TensorFlow (and internet). On a machine that has both, run\n"
        f"    tfds build {name} --data_dir={root} --file_format=array_record\n"
        f"(for datasets whose files must be downloaded by hand, put them in a folder and add "
        f"--manual_dir=THAT_FOLDER), then copy {root}/{builder.name}/ into {root} on this machine."
    )


def load_tfds(
    name: str,
    data_dir: str | os.PathLike | None,
    *,
    download: bool = False,
    splits: Sequence[str] | Mapping[str, str] = ("train", "test"),
    image_key: str = "image",
    label_key: str = "label",
    in_memory: bool | None = None,
    manual_dir: str | os.PathLike | None = None,
    num_workers: int = 4,
) -> dict[str, ImageDataset]:
    """Load a prepared TensorFlow-Datasets dataset through random-access data sources.

    Uses ``tfds.builder(name, data_dir=...)`` and ``builder.as_data_source``,
    which need no TensorFlow (tfds' Image features are decoded with Pillow).
    The dataset must have been prepared in a random-access format
    (``array_record``). Known layouts: cifar10/cifar100/stl10 have
    ``image``/``label`` (cifar also ``id``, cifar100 ``coarse_label``; stl10's
    ``unlabelled`` split is not loaded); caltech_birds2011 adds
    ``image/filename``, ``label_name``, ``bbox``, ``segmentation_mask`` and
    stanford_dogs ``image/filename``, ``objects`` -- extra keys are ignored and
    extra Image features are not decoded.

    Args:
      name: tfds name (``"cifar10"``, ``"stl10"``, ``"caltech_birds2011"``,
        ``"stanford_dogs"``, ``"cifar100"``, or any registered or
        file-prepared dataset; may carry ``:version``).
      data_dir: the tfds data dir (None: tfds' default, ``$TFDS_DATA_DIR`` or
        ``~/tensorflow_datasets``).
      download: if True, call ``download_and_prepare`` first (needs TensorFlow
        and internet for the real builders); if False nothing is downloaded.
      splits: output split names (each read from the tfds split of the same
        name), or a mapping ``{output_name: tfds_split}`` such as
        ``{"train": "train", "test": "validation"}``.
      image_key: feature holding the image.
      label_key: feature holding the class label.
      in_memory: decode all images now into uint8 (N, H, W, 3). None: only when
        the image feature has a fixed shape and a split fits in 4 GiB
        (cifar, stl10); variable-size sets (CUB, Dogs) stay lazy.
      manual_dir: ``DownloadConfig.manual_dir`` when ``download``.
      num_workers: decoding threads when loading into memory.

    Returns:
      ``{split: ImageDataset}``, class names from the label's ``ClassLabel``.

    Raises:
      FileNotFoundError: the dataset is not prepared under ``data_dir`` (the
        message names the directory and the ``tfds build`` command).
      ImportError: tensorflow-datasets is not installed.
      ValueError: unknown split or feature keys.
    """
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:  # e.g. the GPU machine
        raise ImportError("load_tfds needs tensorflow-datasets (pip install tensorflow-datasets)") from e
    data_dir_s = os.fspath(Path(data_dir).expanduser()) if data_dir is not None else None
    try:
        builder = tfds.builder(name, data_dir=data_dir_s)
    except tfds.core.registered.DatasetNotFoundError:
        where = data_dir_s or "the default tfds data_dir"
        raise FileNotFoundError(
            f"tfds dataset {name!r} is neither a registered tfds builder nor prepared under {where}. "
            f"Prepare it with `tfds build {name} --data_dir={where} --file_format=array_record` "
            "on a machine with TensorFlow and internet, then copy it here."
        ) from None
    if download:
        builder.download_and_prepare(
            file_format="array_record",
            download_config=tfds.download.DownloadConfig(
                manual_dir=os.fspath(manual_dir) if manual_dir is not None else None
            ),
        )
    split_map = dict(splits) if isinstance(splits, Mapping) else {s: s for s in splits}
    features = builder.info.features
    for key in (image_key, label_key):
        if key not in features:
            raise ValueError(f"{name}: no feature {key!r}; features are {sorted(features.keys())}")
    image_features = [k for k, f in features.items() if isinstance(f, tfds.features.Image)]
    skip_others = {k: tfds.decode.SkipDecoding() for k in image_features if k != image_key}
    skip_all = {k: tfds.decode.SkipDecoding() for k in image_features}
    try:
        sources = {o: builder.as_data_source(split=s, decoders=skip_others or None) for o, s in split_map.items()}
    except Exception as e:
        if not builder.is_prepared():
            raise FileNotFoundError(_tfds_not_prepared(name, builder, data_dir_s)) from e
        if isinstance(e, NotImplementedError):
            raise RuntimeError(
                f"{name} is prepared in {builder.data_dir} but not in a random-access format "
                f"({e}); rebuild it with `tfds build {name} --file_format=array_record`."
            ) from e
        raise
    shape = tuple(features[image_key].shape)
    if in_memory is None:
        fixed = all(d is not None for d in shape)
        in_memory = fixed and max(map(len, sources.values())) * int(np.prod(shape)) <= 4 << 30
    images: dict[str, Images] = {}
    labels = {}
    for o in split_map:
        if in_memory:  # one pass decoding image and label
            pairs = _parallel_map(lambda i, s=sources[o]: _image_label(s[i], image_key, label_key),
                                  range(len(sources[o])), num_workers)
            images[o] = _stack_if_same_shape([p[0] for p in pairs])
            labels[o] = np.asarray([p[1] for p in pairs], np.int64)
        else:  # labels only (images skipped), images decoded on access
            src = builder.as_data_source(split=split_map[o], decoders=skip_all or None)
            labels[o] = np.asarray(_parallel_map(lambda i, s=src: int(s[i][label_key]), range(len(src)),
                                                 num_workers), np.int64)
            images[o] = _TfdsImages(sources[o], image_key)
    label_feature = features[label_key]
    class_names = tuple(label_feature.names) if isinstance(label_feature, tfds.features.ClassLabel) else None
    num_classes = len(class_names) if class_names else 1 + max(int(y.max(initial=0)) for y in labels.values())
    return {o: ImageDataset(images[o], labels[o], num_classes, class_names) for o in split_map}


def _image_label(example: Mapping[str, Any], image_key: str, label_key: str) -> tuple[np.ndarray, int]:
    return as_rgb_uint8(example[image_key]), int(example[label_key])


#: Datasets built into the library (no files): scikit-learn's 8x8 digits.
BUILTIN_DATASETS: tuple[str, ...] = ("digits",)


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """A parsed dataset string: where a run's images come from.

    Attributes:
      kind: "tfds" (a prepared tfds dataset), "folder" (PATH/train/<class>/*,
        PATH/test/<class>/*), "npz" (x, y[, x_test, y_test]) or "builtin".
      name: the tfds or built-in name, or the path as written.
      path: the folder / npz file, resolved against data_dir (None for tfds and built-ins).
    """

    kind: str
    name: str
    path: Path | None = None


def parse_dataset(source: str, data_dir: str | os.PathLike | None = None) -> DatasetSpec:
    """Parses "tfds:NAME" | "folder:PATH" | "npz:PATH" | "PATH.npz" | a built-in name.

    A relative PATH is taken relative to `data_dir` when that is given. The one parser of
    dataset strings: configs are checked and datasets loaded through it.

    Raises:
      ValueError: an empty or unknown source (the message lists the accepted forms).
    """
    if source in BUILTIN_DATASETS:
        return DatasetSpec("builtin", source)
    kind, sep, rest = source.partition(":")
    if not sep and source.endswith(".npz"):
        kind, rest = "npz", source
    if kind == "tfds" and rest:
        return DatasetSpec("tfds", rest)
    if kind in ("folder", "npz") and rest:
        path = Path(rest).expanduser()
        if data_dir and not path.is_absolute():
            path = Path(data_dir).expanduser() / path
        return DatasetSpec(kind, rest, path)
    raise ValueError(
        f"unknown dataset source {source!r}: use 'tfds:NAME', 'folder:PATH', 'npz:PATH' (or a *.npz path) "
        f"or a built-in ({', '.join(BUILTIN_DATASETS)})"
    )


def load_dataset(source: str, data_dir: str | os.PathLike | None = None, **kw: Any) -> dict[str, ImageDataset]:
    """Load a dataset named by one string (`parse_dataset`'s forms but the built-ins).

    Args:
      source: ``"tfds:NAME"`` (read from ``data_dir``), ``"folder:PATH"``,
        ``"npz:PATH"``, or a bare path ending in ``.npz``. A relative PATH is
        taken relative to ``data_dir`` when that is given.
      data_dir: tfds data dir, and the base of relative paths.
      **kw: passed on to :func:`load_tfds` / :func:`load_image_folder`.

    Returns:
      ``{split: ImageDataset}``.
    """
    spec = parse_dataset(source, data_dir)
    if spec.kind == "tfds":
        return load_tfds(spec.name, data_dir, **kw)
    if spec.kind == "folder":
        return load_image_folder(spec.path, **kw)
    if spec.kind == "npz":
        return load_npz(spec.path, **kw)
    raise ValueError(f"dataset {source!r} is built in: load it with its own loader (l2t_jax.digits)")


# --------------------------------------------------------------------------- #
# Splits
# --------------------------------------------------------------------------- #
def _count(n: int, fraction: float) -> int:
    return int(math.floor(n * fraction + 1e-9))


def train_val_split(
    ds: ImageDataset, val_fraction: float = 0.1, seed: int = 0, stratified: bool = True
) -> tuple[ImageDataset, ImageDataset]:
    """Hold out a validation split, deterministically for a given seed.

    Stratified: ``floor(n_c * val_fraction)`` random images of every class c
    (the reference's ``m // 10`` per class); otherwise ``floor(N *
    val_fraction)`` random images overall. Both parts keep the original order.

    Args:
      ds: the training set (N images).
      val_fraction: fraction held out, in [0, 1).
      seed: non-negative seed.
      stratified: split every class separately.

    Returns:
      ``(train, val)``, disjoint, together all N images.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    rng = np.random.default_rng([seed, 0x5A11])
    if stratified:
        val = [rng.permutation(idx)[:_count(len(idx), val_fraction)] for idx in ds.class_indices()]
        val_idx = np.concatenate(val) if val else np.zeros(0, np.int64)
    else:
        val_idx = rng.permutation(len(ds))[:_count(len(ds), val_fraction)]
    is_val = np.zeros(len(ds), bool)
    is_val[val_idx] = True
    return ds.subset(np.flatnonzero(~is_val)), ds.subset(np.flatnonzero(is_val))


def per_class_subset(ds: ImageDataset, n_per_class: int, seed: int = 0) -> ImageDataset:
    """Limited-data regime: ``n_per_class`` images of every class.

    Takes the first ``n_per_class`` of a per-class permutation that depends on
    ``seed`` and the class only, so for one seed the subset for N is contained
    in the subset for any larger N.

    Args:
      ds: a dataset with at least ``n_per_class`` images in every class.
      n_per_class: images kept per class.
      seed: non-negative seed.

    Returns:
      An ``ImageDataset`` of ``num_classes * n_per_class`` images in original order.

    Raises:
      ValueError: some class has fewer than ``n_per_class`` images.
    """
    if n_per_class < 1:
        raise ValueError(f"n_per_class must be >= 1, got {n_per_class}")
    keep = []
    for c, idx in enumerate(ds.class_indices()):
        if len(idx) < n_per_class:
            name = f" ({ds.class_names[c]})" if ds.class_names else ""
            raise ValueError(f"class {c}{name} has {len(idx)} images, fewer than n_per_class={n_per_class}")
        keep.append(np.random.default_rng([seed, 0xC1A55, c]).permutation(idx)[:n_per_class])
    return ds.subset(np.sort(np.concatenate(keep)))


# --------------------------------------------------------------------------- #
# Per-image transforms (uint8 in, uint8 out; torchvision semantics on PIL images)
# --------------------------------------------------------------------------- #
def normalize(images: np.ndarray) -> np.ndarray:
    """ToTensor + Normalize(ImageNet mean, std), in float32 like torchvision.

    Args:
      images: uint8 (..., 3), e.g. (B, H, W, 3).

    Returns:
      float32 of the same shape: ``(x / 255 - mean) / std``.
    """
    arr = np.asarray(images)
    if arr.ndim < 2 or arr.shape[-1] != 3:
        raise ValueError(f"expected (..., W, 3) images, got shape {arr.shape}")
    # Same float32 operations as torchvision, on rows of W*3 values: numpy is
    # much faster with the channel constants tiled than broadcast over a size-3 axis.
    width = arr.shape[-2]
    x = arr.reshape(-1, width * 3).astype(np.float32)
    x /= np.float32(255.0)
    x -= np.tile(_MEAN32, width)
    x /= np.tile(_STD32, width)
    return x.reshape(arr.shape)


def resize_shorter(image: np.ndarray, size: int) -> np.ndarray:
    """torchvision ``Resize(size)`` on a PIL image: shorter side -> size, bilinear.

    The longer side becomes ``int(size * long / short)``; PIL's bilinear
    filter antialiases when shrinking. An image already at that size is
    returned unchanged.

    Args:
      image: uint8 (H, W, 3).
      size: target length of the shorter side.

    Returns:
      uint8 (H', W', 3) with ``min(H', W') == size``.
    """
    h, w = image.shape[:2]
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    new_h, new_w = (new_long, size) if w <= h else (size, new_long)
    if (new_h, new_w) == (h, w):
        return image
    return np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR))


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """torchvision ``CenterCrop(size)``: zero-pads first if the image is smaller.

    Args:
      image: uint8 (H, W, 3).
      size: output side.

    Returns:
      uint8 (size, size, 3); top = ``round((H - size) / 2)``, likewise left.
    """
    h, w = image.shape[:2]
    if size > h or size > w:
        ph, pw = max(size - h, 0), max(size - w, 0)
        image = np.pad(image, ((ph // 2, (ph + 1) // 2), (pw // 2, (pw + 1) // 2), (0, 0)))
        h, w = image.shape[:2]
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return image[top:top + size, left:left + size]


def pad_crop_flip(
    image: np.ndarray, top: int, left: int, flip: bool, *, size: int = 32, pad: int = PAD
) -> np.ndarray:
    """``Pad(pad)`` with zeros, crop ``size``x``size`` at (top, left), optional mirror.

    Args:
      image: uint8 (H, W, 3).
      top, left: crop corner in the padded image, ``0 <= top <= H + 2*pad - size``.
      flip: mirror left-right after cropping.
      size: crop side.
      pad: zero border added on every side.

    Returns:
      uint8 (size, size, 3).
    """
    return _crop(np.pad(image, ((pad, pad), (pad, pad), (0, 0))), top, left, flip, size)


def _crop(padded: np.ndarray, top: int, left: int, flip: bool, size: int) -> np.ndarray:
    if not (0 <= top <= padded.shape[0] - size and 0 <= left <= padded.shape[1] - size):
        raise ValueError(f"crop ({top}, {left}, {size}) outside padded image {padded.shape[:2]}")
    out = padded[top:top + size, left:left + size]
    return out[:, ::-1] if flip else out


def _pad_crop_flip_from_uniform(u: np.ndarray, height: int, width: int, size: int, pad: int):
    """Map uniforms u (..., 3) in [0, 1) to (top, left, flip): uniform integer offsets, p(flip) = 1/2."""
    n_top, n_left = height + 2 * pad - size + 1, width + 2 * pad - size + 1
    if n_top < 1 or n_left < 1:
        raise ValueError(f"a {height}x{width} image padded by {pad} is smaller than the {size} px crop")
    top = np.floor(u[..., 0] * n_top).astype(np.int64)
    left = np.floor(u[..., 1] * n_left).astype(np.int64)
    return top, left, u[..., 2] < 0.5


def random_pad_crop_flip(
    image: np.ndarray, rng: np.random.Generator, *, size: int = 32, pad: int = PAD
) -> np.ndarray:
    """Pad(pad) -> RandomCrop(size) -> RandomHorizontalFlip() of the reference.

    Draws three uniforms ``rng.random(3)``: crop row, crop column (each a
    uniform integer over the valid offsets) and the flip (``u < 0.5``).

    Args:
      image: uint8 (H, W, 3).
      rng: random generator.

    Returns:
      uint8 (size, size, 3).
    """
    top, left, flip = _pad_crop_flip_from_uniform(rng.random(3), *image.shape[:2], size, pad)
    return pad_crop_flip(image, int(top), int(left), bool(flip), size=size, pad=pad)


def pad_crop_flip_batch(
    images: np.ndarray, top: np.ndarray, left: np.ndarray, flip: np.ndarray, *, size: int = 32, pad: int = PAD
) -> np.ndarray:
    """Vectorised :func:`pad_crop_flip` over a batch.

    Args:
      images: uint8 (B, H, W, 3).
      top, left: int (B,) crop corners in the padded images.
      flip: bool (B,).

    Returns:
      uint8 (B, size, size, 3).
    """
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    out = np.empty((len(images), size, size, images.shape[-1]), images.dtype)
    for k, (t, lft, f) in enumerate(zip(top.tolist(), left.tolist(), flip.tolist(), strict=True)):
        # A slicing loop is ~3x faster here than one fancy-indexing gather.
        out[k] = _crop(padded[k], t, lft, f, size)
    return out


def random_resized_crop_box(
    height: int,
    width: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """torchvision ``RandomResizedCrop.get_params``: up to 10 tries, then a centre crop.

    Each try draws an area fraction ``U(scale)`` and a log aspect ratio
    ``U(log ratio)``, rounds ``w = round(sqrt(A*r))``, ``h = round(sqrt(A/r))``
    and, if it fits, a uniform corner. The fallback is the largest centred
    crop with the ratio clamped to ``ratio``.

    Args:
      height, width: image size.
      rng: random generator.

    Returns:
      ``(top, left, h, w)`` of the crop.
    """
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def resized_crop(image: np.ndarray, top: int, left: int, h: int, w: int, size: int) -> np.ndarray:
    """Crop (top, left, h, w) then bilinear-resize (PIL) to (size, size): torchvision ``resized_crop``.

    Returns:
      uint8 (size, size, 3).
    """
    crop = image[top:top + h, left:left + w]
    if crop.shape[:2] == (size, size):
        return crop
    return np.asarray(Image.fromarray(np.ascontiguousarray(crop)).resize((size, size), Image.BILINEAR))


def random_resized_crop(image: np.ndarray, rng: np.random.Generator, size: int = 224) -> np.ndarray:
    """torchvision ``RandomResizedCrop(size)`` (scale (0.08, 1), ratio (3/4, 4/3), bilinear).

    Args:
      image: uint8 (H, W, 3).
      rng: random generator.

    Returns:
      uint8 (size, size, 3).
    """
    return resized_crop(image, *random_resized_crop_box(*image.shape[:2], rng), size)


def random_horizontal_flip(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Mirror left-right with probability 1/2 (one ``rng.random()`` draw, flip if < 0.5)."""
    return image[:, ::-1] if rng.random() < 0.5 else image


def eval_resize_size(image_size: int) -> int:
    """Resize target before the eval centre crop: 256 for 224 (``round(size * 256 / 224)``)."""
    return int(round(image_size * 256 / 224))


def train_transform(
    image: np.ndarray, rng: np.random.Generator, *, image_size: int, resize_to: int | None = None
) -> np.ndarray:
    """The reference's training augmentation for one image (before normalisation).

    Small (``image_size <= 64``): [Resize(resize_to)] -> Pad(4) -> RandomCrop ->
    flip. Large: [Resize(resize_to)] -> RandomResizedCrop(image_size) -> flip.

    Args:
      image: uint8 (H, W, 3).
      rng: random generator (the only source of randomness).
      image_size: output side.
      resize_to: optional shorter-side resize applied first (STL-10: 32).

    Returns:
      uint8 (image_size, image_size, 3).
    """
    if resize_to is not None:
        image = resize_shorter(image, resize_to)
    if image_size <= SMALL_IMAGE_MAX:
        return random_pad_crop_flip(image, rng, size=image_size)
    return random_horizontal_flip(random_resized_crop(image, rng, image_size), rng)


def eval_transform(image: np.ndarray, *, image_size: int, resize_to: int | None = None) -> np.ndarray:
    """The reference's evaluation transform for one image (before normalisation).

    Small: [Resize(resize_to)] only (a non-square result is centre-cropped to
    ``image_size``, which the reference's square datasets never need). Large:
    [Resize(resize_to)] -> Resize(image_size * 256 / 224) -> CenterCrop(image_size).

    Args:
      image: uint8 (H, W, 3).
      image_size: output side.
      resize_to: optional shorter-side resize applied first.

    Returns:
      uint8 (image_size, image_size, 3).
    """
    if resize_to is not None:
        image = resize_shorter(image, resize_to)
    if image_size > SMALL_IMAGE_MAX:
        image = resize_shorter(image, eval_resize_size(image_size))
    return image if image.shape[:2] == (image_size, image_size) else center_crop(image, image_size)


# --------------------------------------------------------------------------- #
# Batching
# --------------------------------------------------------------------------- #
def steps_per_epoch(n: int, batch_size: int, drop_remainder: bool = False) -> int:
    """Batches in an epoch of ``n`` examples: ``n // B`` if dropping the remainder, else ``ceil(n / B)``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return n // batch_size if drop_remainder else -(-n // batch_size)


def _rng(seed: int, epoch: int, stream: int, index: int = 0) -> np.random.Generator:
    # Fixed-length entropy: SeedSequence keys of different lengths could collide.
    return np.random.default_rng(np.random.SeedSequence([seed, epoch, stream, index]))


def epoch_order(n: int, *, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """Dataset indices in the order of one epoch: a permutation seeded by (seed, epoch), or 0..n-1.

    Returns:
      int64 (n,).
    """
    return _rng(seed, epoch, _STREAM_ORDER).permutation(n) if shuffle else np.arange(n, dtype=np.int64)


def batch_iterator(
    ds: ImageDataset,
    batch_size: int,
    *,
    train: bool,
    image_size: int,
    seed: int,
    epoch: int,
    start_step: int = 0,
    drop_remainder: bool = False,
    num_workers: int = 4,
    prefetch: int = 2,
    resize_to: int | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Batches of one epoch, augmented and normalised, from step ``start_step`` on.

    Training shuffles with a permutation seeded by ``(seed, epoch)`` and
    augments image i with randomness seeded by ``(seed, epoch, i)``; evaluation
    keeps the dataset order. Batch k therefore does not depend on
    ``start_step``, ``num_workers`` or ``prefetch``: resuming at ``start_step=k``
    yields exactly batches ``k, k+1, ...`` of the full epoch. In-memory images
    of the small pipeline are augmented in vectorised numpy; other images are
    decoded and transformed in a pool of ``num_workers`` threads, and a
    background thread keeps up to ``prefetch`` batches ready.

    Args:
      ds: the dataset (N images).
      batch_size: B; the last batch is smaller unless ``drop_remainder``.
      train: augment and shuffle (else the eval transform, dataset order).
      image_size: output side (32 for the small pipeline, 224 for the large one).
      seed: non-negative seed.
      epoch: non-negative epoch number.
      start_step: first batch to produce, ``0 <= start_step <= steps_per_epoch``.
      drop_remainder: drop the last partial batch (the reference keeps it).
      num_workers: decoding/augmentation threads (<= 1: inline).
      prefetch: batches prepared ahead in a background thread (0: none).
      resize_to: shorter-side resize applied first (STL-10 96 -> 32).

    Yields:
      ``(x, y)``: x float32 (B, image_size, image_size, 3), y int32 (B,).
    """
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be non-negative, got {seed}, {epoch}")
    n = len(ds)
    steps = steps_per_epoch(n, batch_size, drop_remainder)
    if not 0 <= start_step <= steps:
        raise ValueError(f"start_step {start_step} outside [0, {steps}]")
    order = epoch_order(n, seed=seed, epoch=epoch, shuffle=train)
    small = image_size <= SMALL_IMAGE_MAX
    # Small-pipeline crop/flip uniforms for every dataset index: (N, 3).
    crop_u = _rng(seed, epoch, _STREAM_SMALL_AUG).random((n, 3)) if train and small else None
    vectorised = small and ds.in_memory and resize_to is None

    def one_image(i: int) -> np.ndarray:
        image = ds.image(i)
        if not train:
            return eval_transform(image, image_size=image_size, resize_to=resize_to)
        if small:
            if resize_to is not None:
                image = resize_shorter(image, resize_to)
            top, left, flip = _pad_crop_flip_from_uniform(crop_u[i], *image.shape[:2], image_size, PAD)
            return pad_crop_flip(image, int(top), int(left), bool(flip), size=image_size)
        rng = _rng(seed, epoch, _STREAM_LARGE_AUG, i)
        return train_transform(image, rng, image_size=image_size, resize_to=resize_to)

    def make_batch(step: int, pool: concurrent.futures.Executor | None) -> tuple[np.ndarray, np.ndarray]:
        idx = order[step * batch_size:(step + 1) * batch_size]
        if vectorised:
            images = ds.images[idx]
            if train:
                top, left, flip = _pad_crop_flip_from_uniform(crop_u[idx], *images.shape[1:3], image_size, PAD)
                images = pad_crop_flip_batch(images, top, left, flip, size=image_size)
            elif images.shape[1:3] != (image_size, image_size):
                images = np.stack([center_crop(im, image_size) for im in images])
        else:
            outs = list(pool.map(one_image, idx)) if pool is not None else [one_image(i) for i in idx]
            images = np.stack(outs)
        return normalize(images), ds.labels[idx].astype(np.int32)

    def run() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        pool = None if vectorised or num_workers <= 1 else concurrent.futures.ThreadPoolExecutor(num_workers)
        try:
            batches = (make_batch(s, pool) for s in range(start_step, steps))
            yield from (_prefetched(batches, prefetch) if prefetch > 0 else batches)
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)

    return run()


class _Raised:
    def __init__(self, exc: BaseException):
        self.exc = exc


_END = object()


def _prefetched(items: Iterator[Any], size: int) -> Iterator[Any]:
    """Run ``items`` in a background thread, keeping at most ``size`` results queued.

    Exceptions are re-raised in the consumer; closing the generator stops the thread.
    """
    q: queue.Queue[Any] = queue.Queue(maxsize=size)
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.05)
                return True
            except queue.Full:
                pass
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(_END)
        except BaseException as e:  # handed to the consumer
            put(_Raised(e))

    thread = threading.Thread(target=produce, name="l2t-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _END:
                return
            if isinstance(item, _Raised):
                raise item.exc
            yield item
    finally:
        stop.set()
        thread.join()
