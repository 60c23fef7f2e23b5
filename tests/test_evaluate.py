"""The evaluation CLI: exact preprocessing, top-1 against a PyTorch computation, clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, require_shared
from experiments import evaluate as ev
from l2t_jax.io.msgpack import save_variables
from l2t_jax.io.torch_layout import variables_from_torch
from torch_reference import make_torch_model, perturb_

MEAN = torch.tensor([0.485, 0.456, 0.406])
STD = torch.tensor([0.229, 0.224, 0.225])


def torch_preprocess(images_uint8: np.ndarray, resize: int | None = None) -> torch.Tensor:
    """torchvision's Resize (PIL) + ToTensor + Normalize, written out with PIL and torch."""
    out = []
    for img in images_uint8:
        pil = Image.fromarray(img)
        if resize is not None:
            pil = pil.resize((resize, resize), Image.BILINEAR)
        t = torch.from_numpy(np.array(pil)).permute(2, 0, 1).contiguous().float().div(255)
        out.append(t.sub(MEAN[:, None, None]).div(STD[:, None, None]))
    return torch.stack(out)


def torch_predictions(module: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    module.eval()
    with torch.no_grad():
        return module(x)[0].argmax(1).numpy()


def labels_with_half_right(pred: np.ndarray, num_classes: int) -> np.ndarray:
    y = pred.copy()
    y[1::2] = (y[1::2] + 1) % num_classes
    return y


def run_main(capsys, *args: str) -> tuple[int, str, str]:
    rc = ev.main(list(args))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def one_json_line(out: str) -> dict:
    lines = out.splitlines()
    assert len(lines) == 1, out
    result = json.loads(lines[0])
    assert set(result) == {"top1", "n"}
    return result


def test_normalise_is_torchvision_bitwise():
    x = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    ours = ev.normalise(x)
    assert ours.dtype == np.float32
    assert np.array_equal(ours.transpose(0, 3, 1, 2), torch_preprocess(x).numpy())


def test_resize_is_pil_bilinear():
    x = np.random.default_rng(1).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    small = ev.resize_images(x, 32)
    assert small.shape == (2, 32, 32, 3) and small.dtype == np.uint8
    assert np.array_equal(small[1], np.asarray(Image.fromarray(x[1]).resize((32, 32), Image.BILINEAR)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A perturbed VGG9 (10 classes) saved as the reference does, 7 images, half the labels right."""
    d = tmp_path_factory.mktemp("tiny")
    tm = perturb_(make_torch_model("vgg9_bn", 10), seed=4)
    torch.save({"state_dict": tm.state_dict(), "num_classes": 10}, d / "vgg.pth.tar")
    save_variables(d / "vgg.msgpack", variables_from_torch("vgg9_bn", tm.state_dict()))
    x = np.random.default_rng(2).integers(0, 256, (7, 32, 32, 3), dtype=np.uint8)
    pred = torch_predictions(tm, torch_preprocess(x))
    y = labels_with_half_right(pred, 10)
    np.savez(d / "data.npz", x=x, y=y)
    return d, x, y


@pytest.mark.parametrize("weights", ["vgg.pth.tar", "vgg.msgpack"])
def test_cli_top1_on_tiny_npz(capsys, tiny, weights):
    d, x, y = tiny
    rc, out, err = run_main(
        capsys, "--model=vgg9_bn", "--num_classes=10", f"--weights={d / weights}", f"--data={d / 'data.npz'}", "--batch_size=3"
    )
    assert rc == 0, err
    assert one_json_line(out) == {"top1": pytest.approx(100.0 * 4 / 7), "n": 7}


def test_cli_num_classes_optional_and_conv_impl(capsys, tiny):
    d, _, _ = tiny
    rc, out, err = run_main(capsys, "--model=vgg9_bn", f"--weights={d / 'vgg.pth.tar'}", f"--data={d / 'data.npz'}", "--conv_impl=xla")
    assert rc == 0, err
    assert one_json_line(out)["top1"] == pytest.approx(100.0 * 4 / 7)


def _npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def test_cli_errors(capsys, tiny, tmp_path):
    d, x, y = tiny
    good = [f"--weights={d / 'vgg.pth.tar'}", f"--data={d / 'data.npz'}"]
    cases = [
        (["--model=vgg9_bn", f"--weights={tmp_path / 'none.pth'}", good[1]], "weights not found"),
        (["--model=vgg9_bn", good[0], f"--data={tmp_path / 'none.npz'}"], "data file not found"),
        (["--model=vgg9_bn", good[0], f"--data={_npz(tmp_path / 'a.npz', x=x)}"], "lacks array(s) ['y']"),
        (["--model=vgg9_bn", good[0], f"--data={_npz(tmp_path / 'b.npz', x=x.astype(np.float32), y=y)}"], "uint8"),
        (["--model=vgg9_bn", good[0], f"--data={_npz(tmp_path / 'c.npz', x=x[..., 0], y=y)}"], "(N, H, W, 3)"),
        (["--model=vgg9_bn", good[0], f"--data={_npz(tmp_path / 'd.npz', x=x, y=y[:3])}"], "y must have shape"),
        (["--model=vgg9_bn", good[0], f"--data={_npz(tmp_path / 'e.npz', x=x, y=y + 10)}"], "labels must lie in [0, 10)"),
        (["--model=vgg9_bn", "--num_classes=100", *good], "num_classes=100"),
        (["--model=resnet20", *good], "cannot load weights"),
        (["--model=vgg99", *good], "unknown model 'vgg99'"),
        (["--model=vgg9_bn", *good, "--conv_impl=cudnn"], "unknown --conv_impl"),
        (["--model=vgg9_bn", good[0], f"--data={_npz(tmp_path / 'f.npz', x=np.zeros((2, 20, 20, 3), np.uint8), y=[0, 1])}"],
         "vgg9_bn cannot take 20x20 images: VGG with 5 max-pools needs H and W divisible by 32"),
        (["--model=resnet18", f"--weights={_torchvision_file(tmp_path)}", f"--data={_npz(tmp_path / 'g.npz', x=np.zeros((1, 100, 100, 3), np.uint8), y=[0])}"],
         "7x7 final map"),
    ]
    for argv, needle in cases:
        rc, out, err = run_main(capsys, *argv)
        assert rc == 2 and out == "", (argv, out, err)
        assert "error:" in err and needle in err, (argv, err)


def _torchvision_file(tmp_path: Path) -> Path:
    path = tmp_path / "resnet18-5c106cde.pth"
    if not path.exists():
        torch.save(make_torch_model("resnet18", 1000).state_dict(), path)
    return path


def test_cli_real_tinyimagenet_weights_subprocess(tmp_path, capsys):
    """The real entry point on 64 px synthetic images resized to 32: top1 equals a PyTorch computation."""
    weights = require_shared("reference/tinyimagenet-resnet32.pth.tar")
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:64, 0:64] / 63.0
    x = np.stack(
        [
            np.clip(255 * (0.5 + 0.4 * np.sin(2 * np.pi * (a * xx[..., None] + b * yy[..., None]) + ph)) + rng.normal(0, 20, (64, 64, 3)), 0, 255)
            for a, b, ph in rng.uniform(-2, 2, (12, 3, 3))
        ]
    ).astype(np.uint8)
    assert x.shape == (12, 64, 64, 3)
    ck = torch.load(weights, map_location="cpu", weights_only=True)
    tm = make_torch_model("resnet32", 200)
    tm.load_state_dict(ck["state_dict"], strict=True)
    pred = torch_predictions(tm, torch_preprocess(x, resize=32))
    y = labels_with_half_right(pred, 200)
    y[1] = pred[1]
    y[3] = pred[3]  # 8 of 12 right
    data = _npz(tmp_path / "val.npz", x=x, y=y)
    env = dict(
        os.environ,
        PYTHONPATH=str(REPO),
        JAX_COMPILATION_CACHE_DIR=str(REPO / ".jax_cache"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5",
    )
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.evaluate", "--model=resnet32", "--num_classes=200", f"--weights={weights}", f"--data={data}", "--resize=32", "--batch_size=5"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert one_json_line(proc.stdout) == {"top1": pytest.approx(100.0 * 8 / 12), "n": 12}
    # Without --resize the 64 px images are refused, naming the fix (in-process: no second start-up).
    rc, out, err = run_main(capsys, "--model=resnet32", f"--weights={weights}", f"--data={data}")
    assert rc == 2 and out == ""
    assert "takes 32x32 images" in err and "--resize=32" in err
