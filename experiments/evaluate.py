"""Top-1 accuracy of a model on a folder-free image array.

    python -m experiments.evaluate --model=resnet32 --num_classes=200 \\
        --weights=tinyimagenet-resnet32.pth.tar --data=val32.npz [--batch_size=N] \\
        [--conv_impl=auto] [--resize=N] [--debug]

`--data` is an `.npz` with `x` (N, H, W, 3) uint8 RGB images and `y` (N,)
integer labels. Images are scaled to [0, 1] and normalised with the ImageNet
mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225) exactly as
torchvision's `ToTensor` + `Normalize` do (float32); BN runs in evaluation mode.
Images must already be at the model's resolution unless `--resize=N` is given,
which resizes every image to N x N with PIL's bilinear filter (what
torchvision's `Resize(N)` does to a square PIL image; e.g. TinyImageNet's
64 px images -> 32 px for the CIFAR-style ResNet32). Nothing is resized
silently.

Prints exactly one JSON line `{"top1": <percent>, "n": <count>}` on stdout; logs
go to stderr. A weights file that cannot be read as weights (not a checkpoint,
truncated, corrupt, or refused because a pickle in it asks for more than tensors
and plain data; reading never runs code from the file) exits with status 2 and
one `error: ...` line on stderr, as does every other unusable input (a missing
file, data of the wrong shape, weights of another model). `--debug` shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from l2t_jax import data as data_lib

log = logging.getLogger("evaluate")



class EvaluationError(Exception):
    """An input problem to report to the user in one line, exit status 2 (no traceback)."""

    status = 2


def normalise(images: np.ndarray) -> np.ndarray:
    """uint8 (B, H, W, 3) -> float32, `ToTensor` then `Normalize(ImageNet mean, std)`.

    Args:
      images: uint8 RGB images.

    Returns:
      float32 (B, H, W, 3).
    """
    return data_lib.normalize(images)  # the training pipeline's normalisation, the same float32 operations


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """Resizes uint8 images to size x size with PIL's bilinear filter (torchvision `Resize` on PIL images).

    Args:
      images: uint8 (N, H, W, 3).
      size: output side.

    Returns:
      uint8 (N, size, size, 3).
    """
    from PIL import Image

    if images.shape[1:3] == (size, size):
        return images
    out = np.empty((images.shape[0], size, size, 3), np.uint8)
    for i, img in enumerate(images):
        out[i] = np.asarray(Image.fromarray(img, mode="RGB").resize((size, size), Image.BILINEAR))
    return out


def load_data(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Reads and validates the `.npz` (x uint8 (N, H, W, 3), y integer (N,)).

    Args:
      path: the file.

    Returns:
      (x, y as int64).

    Raises:
      EvaluationError: naming the problem.
    """
    path = Path(path)
    if not path.is_file():
        raise EvaluationError(f"data file not found: {path}")
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - anything np.load raises means "not an npz"
        raise EvaluationError(f"cannot read {path} as .npz: {e}") from None
    with data:
        missing = [k for k in ("x", "y") if k not in data.files]
        if missing:
            raise EvaluationError(f"{path} lacks array(s) {missing}; it has {data.files} (expected 'x' images and 'y' labels)")
        x, y = data["x"], data["y"]
    if x.dtype != np.uint8:
        raise EvaluationError(f"{path}: x must be uint8 RGB images (N, H, W, 3), got dtype {x.dtype}")
    if x.ndim != 4 or x.shape[-1] != 3:
        raise EvaluationError(f"{path}: x must have shape (N, H, W, 3), got {x.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise EvaluationError(f"{path}: y must hold integer labels, got dtype {y.dtype}")
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise EvaluationError(f"{path}: y must have shape (N,) = ({x.shape[0]},), got {y.shape}")
    if x.shape[0] == 0:
        raise EvaluationError(f"{path}: no images")
    return x, y.astype(np.int64)


def evaluate(
    model_name: str,
    weights: str | Path,
    data: str | Path,
    *,
    num_classes: int | None = None,
    batch_size: int | None = None,
    conv_impl: str = "auto",
    resize: int | None = None,
) -> dict:
    """Top-1 accuracy of `model_name` with `weights` on `data`.

    Args:
      model_name: registered model name.
      weights: `.pth`/`.pth.tar`/`.pt`/`.tar` (PyTorch) or `.msgpack` file.
      data: `.npz` with `x`, `y`.
      num_classes: expected classes (checked against the weights); inferred when None.
      batch_size: images per forward pass (default 256 up to 64 px, 32 above).
      conv_impl: "auto" | "xla" | "im2col".
      resize: resize images to resize x resize first (PIL bilinear).

    Returns:
      {"top1": percent, "n": number of images}.

    Raises:
      EvaluationError: for unusable inputs, naming the problem.
    """
    import jax

    from l2t_jax.evaluation import evaluate_batches
    from l2t_jax.models import get_model, model_info
    from l2t_jax.models.layers import CONV_IMPLS
    from l2t_jax.weights import CheckpointReadError, WeightImportError, load_weights

    try:
        model_info(model_name)
    except ValueError as e:
        raise EvaluationError(str(e)) from None
    if conv_impl not in CONV_IMPLS:
        raise EvaluationError(f"unknown --conv_impl {conv_impl!r}; expected one of {CONV_IMPLS}")
    if num_classes is not None and num_classes < 1:
        raise EvaluationError(f"--num_classes must be positive, got {num_classes}")
    if resize is not None and resize < 1:
        raise EvaluationError(f"--resize must be positive, got {resize}")
    if not Path(weights).exists():
        raise EvaluationError(f"weights not found: {weights}")
    x, y = load_data(data)

    try:
        variables = load_weights(weights, model_name, num_classes)
    except CheckpointReadError as e:  # the message names the file and what is wrong
        raise EvaluationError(str(e)) from e
    except (WeightImportError, FileNotFoundError, ImportError, OSError) as e:
        raise EvaluationError(f"cannot load weights {weights} for {model_name}: {e}") from e
    found = int(np.shape(variables["params"]["fc"]["kernel"])[1])
    log.info("weights %s: %s with %d classes", weights, model_name, found)
    if y.min() < 0 or y.max() >= found:
        raise EvaluationError(f"labels must lie in [0, {found}) for a {found}-class model; found range [{y.min()}, {y.max()}]")

    if resize is not None:
        log.info("resizing %d images %dx%d -> %dx%d (PIL bilinear)", len(x), x.shape[1], x.shape[2], resize, resize)
        x = resize_images(x, resize)

    model = get_model(model_name, found, conv_impl=conv_impl)
    h, w = x.shape[1:3]
    if batch_size is None:
        batch_size = 256 if max(h, w) <= 64 else 32
    if batch_size < 1:
        raise EvaluationError(f"--batch_size must be positive, got {batch_size}")
    batch_size = min(batch_size, len(x))
    try:
        jax.eval_shape(lambda v, xb: model.apply(v, xb, train=False)[0], variables,
                       jax.ShapeDtypeStruct((batch_size, h, w, 3), np.float32))
    except ValueError as e:
        hint = f" (use --resize={model_info(model_name).image_size} to resize them)" if (h, w) != (model_info(model_name).image_size,) * 2 else ""
        raise EvaluationError(f"{model_name} cannot take {h}x{w} images: {e}{hint}") from None

    start = time.time()
    batches = ((normalise(x[i : i + batch_size]), y[i : i + batch_size]) for i in range(0, len(x), batch_size))
    result = evaluate_batches(model, variables, batches, batch_size)  # the training loop's evaluation step
    log.info("evaluated %d images in %.1fs", len(x), time.time() - start)
    return {"top1": 100.0 * result["correct"] / len(x), "n": int(len(x))}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="registered model name, e.g. resnet32, vgg9_bn, resnet18")
    p.add_argument("--num_classes", type=int, default=None, help="classes (checked against the weights; inferred if omitted)")
    p.add_argument("--weights", required=True, help=".pth/.pth.tar/.pt/.tar (PyTorch) or .msgpack file")
    p.add_argument("--data", required=True, help=".npz with x (N,H,W,3) uint8 and y (N,) int labels")
    p.add_argument("--batch_size", type=int, default=None)
    p.add_argument("--conv_impl", default="auto", help="auto | xla | im2col")
    p.add_argument("--resize", type=int, default=None, help="resize images to NxN first (PIL bilinear), e.g. 32 for TinyImageNet's 64 px")
    p.add_argument("--debug", action="store_true", help="on an error, raise it with its traceback instead of one error line")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)  # the current stderr, on every call
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        result = evaluate(
            args.model,
            args.weights,
            args.data,
            num_classes=args.num_classes,
            batch_size=args.batch_size,
            conv_impl=args.conv_impl,
            resize=args.resize,
        )
    except EvaluationError as e:
        if args.debug:  # the underlying error, with the traceback of where it was raised
            raise (e.__cause__ or e)
        print(f"error: {e}", file=sys.stderr)
        return e.status
    finally:
        log.removeHandler(handler)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
