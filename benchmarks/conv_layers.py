"""Where the plain step's time goes: each 3x3 convolution of VGG9 (or ResNet18), forward
and backward, per lowering, beside PyTorch's.

    python -m benchmarks.conv_layers [--model vgg9|resnet18] [--batch 128] [--iters 7]
        [--impls im2col,xla] [--compare_torch] [--torch_threads N] [--out FILE.json]

For every distinct 3x3 convolution shape of the model (C_in, C_out, input size, stride)
it times, in this process, one jitted forward + backward of the convolution (the VJP
with respect to input and kernel, for a fixed random output cotangent) per lowering of
`l2t_jax.models.layers` and, with --compare_torch, PyTorch's `conv2d` forward +
`backward` on the same shapes. For the im2col lowering it also times its two halves
alone: building the patches (pad + shifted slices + concatenation) and the matmuls on
ready patches. Every column's input and kernel gradients are compared with the first
lowering's (`grad_rel_diff`, float32 rounding ~1e-6): all do the same work. Each row has the median milliseconds, the GFLOP/s of the three matmul-
sized products (forward, input and kernel gradients: 3 x 2 x B x H_out x W_out x 9 x
C_in x C_out), and the minor page faults and system CPU seconds per call (getrusage):
page faults measure what the kernel spends mapping and zeroing fresh buffers.

stdout: one JSON line per shape, then a Markdown table; `--out` writes one JSON document.
Time it on an idle machine; GLIBC_TUNABLES (see benchmarks.plain_step) applies to the
whole process, JAX and PyTorch alike.
"""

from __future__ import annotations

import argparse

from benchmarks import common
from benchmarks.common import log, rounded

#: model -> distinct 3x3 convolutions as (C_in, C_out, input size, stride), at the paper's resolution
SHAPES: dict[str, list[tuple[int, int, int, int]]] = {
    # VGG9-bn at 32 px: 64, M, 128, M, 256, 256, M, 512, 512, M, 512, 512, M
    "vgg9": [(3, 64, 32, 1), (64, 128, 16, 1), (128, 256, 8, 1), (256, 256, 8, 1), (256, 512, 4, 1),
             (512, 512, 4, 1), (512, 512, 2, 1)],
    # torchvision ResNet18 at 224 px: the 3x3 convolutions of its four stages (stem excluded)
    "resnet18": [(64, 64, 56, 1), (64, 128, 56, 2), (128, 128, 28, 1), (128, 256, 28, 2), (256, 256, 14, 1),
                 (256, 512, 14, 2), (512, 512, 7, 1)],
    # smoke tests only
    "tiny": [(3, 8, 8, 1), (8, 16, 4, 2)],
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vgg9", choices=sorted(SHAPES))
    p.add_argument("--batch", type=int, default=None, help="default: 128 (vgg9), 64 (resnet18), 4 (tiny)")
    p.add_argument("--iters", type=int, default=7, help="timed calls per measurement (after one warm-up call)")
    p.add_argument("--impls", default="im2col,xla", help="comma-separated lowerings of l2t_jax.models.layers")
    p.add_argument("--compare_torch", action="store_true")
    p.add_argument("--torch_threads", type=int, default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.batch is None:
        args.batch = {"vgg9": 128, "resnet18": 64}.get(args.model, 4)
    args.impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    bad = [i for i in args.impls if i not in ("im2col", "im2col_single", "xla")]
    if bad or args.batch < 1 or args.iters < 1:
        p.error(f"--impls takes im2col, im2col_single, xla (got {bad}); --batch and --iters must be >= 1")
    return args


def out_size(size: int, stride: int) -> int:
    """Output size of a 3x3 convolution with padding 1."""
    return (size + 2 - 3) // stride + 1


def _measure(call, n: int, sync=lambda r: r) -> dict:
    """Median ms of `n` calls after one warm-up, with minor faults and system CPU per call."""
    sync(call())
    with common.CpuUsage() as cpu:
        times = common.time_calls(call, n, sync)
    per = cpu.per_call(n)
    return {"ms": rounded(1e3 * common.median(times), 2), "minor_faults": per["minor_faults_per_call"],
            "sys_s": per["sys_s_per_call"]}


def jax_rows(args, shape) -> dict:
    """forward + backward per lowering, and im2col's patches / matmuls alone."""
    import jax
    import jax.numpy as jnp

    from l2t_jax.models import layers

    cin, cout, size, stride = shape
    kx, kw, kd = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (args.batch, size, size, cin), jnp.float32)
    w = jax.random.normal(kw, (3, 3, cin, cout), jnp.float32) * (2.0 / (9 * cin)) ** 0.5
    n_out = out_size(size, stride)
    dy = jax.random.normal(kd, (args.batch, n_out, n_out, cout), jnp.float32)
    out, grads = {}, {}
    for impl in args.impls:
        if impl == "xla":
            conv = lambda x, w: layers.xla_conv(x, w, stride, 1)  # noqa: E731
        else:
            mc = None if impl == "im2col_single" else layers.IM2COL_MAX_CONTRACTION
            conv = lambda x, w, mc=mc: layers.im2col_conv(x, w, stride, 1, mc)  # noqa: E731
        fwd_bwd = jax.jit(lambda x, w, dy, conv=conv: jax.vjp(conv, x, w)[1](dy))
        out[impl] = _measure(lambda: fwd_bwd(x, w, dy), args.iters, jax.block_until_ready)
        grads[impl] = [jax.device_get(g) for g in fwd_bwd(x, w, dy)]
    if "im2col" in args.impls:
        build = jax.jit(lambda x: jnp.concatenate(layers.im2col_taps(x, 3, 3, stride, 1)[0], -1))
        p = build(x).reshape(-1, 9 * cin)
        d2 = dy.reshape(-1, cout)
        w2 = w.reshape(9 * cin, cout)
        hi = jax.lax.Precision.HIGHEST
        # the three products of forward + backward on ready patches: P w, d w^T, P^T d
        dots = jax.jit(lambda p, w2, d2: (jnp.matmul(p, w2, precision=hi), jnp.matmul(d2, w2.T, precision=hi),
                                          jnp.matmul(p.T, d2, precision=hi)))
        out["im2col_patches"] = _measure(lambda: build(x), args.iters, jax.block_until_ready)
        out["im2col_matmuls"] = _measure(lambda: dots(p, w2, d2), args.iters, jax.block_until_ready)
    return out, grads, (jax.device_get(x), jax.device_get(w), jax.device_get(dy))


def rel_diff(a, b) -> float:
    """max |a - b| / max |b|: the same work in every column (float32 rounding ~1e-6)."""
    import numpy as np

    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30))


def torch_row(args, shape, inputs) -> tuple[dict, list]:
    """PyTorch's forward + backward on the same x, w, dy (NCHW / OIHW); its (dx, dw) in our layouts."""
    import torch

    _, _, _, stride = shape
    x_, w_, dy_ = inputs
    x = torch.tensor(x_.transpose(0, 3, 1, 2).copy(), requires_grad=True)
    w = torch.tensor(w_.transpose(3, 2, 0, 1).copy(), requires_grad=True)
    dy = torch.tensor(dy_.transpose(0, 3, 1, 2).copy())

    def call():
        x.grad = w.grad = None
        torch.nn.functional.conv2d(x, w, stride=stride, padding=1).backward(dy)

    m = _measure(call, args.iters)
    return m, [x.grad.numpy().transpose(0, 2, 3, 1), w.grad.numpy().transpose(2, 3, 1, 0)]


def table(rows: list[dict], impls: list[str]) -> str:
    cols = impls + (["im2col_patches", "im2col_matmuls"] if "im2col" in impls else []) + ["torch"]
    head = "| C_in→C_out @ size/stride | " + " | ".join(f"{c} ms (GFLOP/s, faults)" for c in cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 1)]
    for r in rows:
        cells = []
        for c in cols:
            m = r.get(c)
            if m is None:
                cells.append("—")
            else:
                gf = f", {m['gflop_s']:.0f}" if "gflop_s" in m else ""
                cells.append(f"{m['ms']:.1f}{gf}, {m['minor_faults']}")
        lines.append(f"| {r['cin']}→{r['cout']} @ {r['size']}/{r['stride']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.compare_torch and args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
    rows = []
    for shape in SHAPES[args.model]:
        cin, cout, size, stride = shape
        row = {"benchmark": "conv_layers", "model": args.model, "batch": args.batch, "cin": cin, "cout": cout,
               "size": size, "stride": stride,
               "gflop": rounded(3 * 2 * args.batch * out_size(size, stride) ** 2 * 9 * cin * cout / 1e9, 9)}
        log(f"{cin}->{cout} @ {size}/{stride}")
        measured, grads, inputs = jax_rows(args, shape)
        row.update(measured)
        if args.compare_torch:
            row["torch"], grads["torch"] = torch_row(args, shape, inputs)
        first = grads[args.impls[0]]
        for name, g in grads.items():  # (dx, dw) of every column against the first lowering's
            row[name]["grad_rel_diff"] = max(rel_diff(a, b) for a, b in zip(g, first))
        for col in args.impls + [c for c in ("im2col_matmuls", "torch") if c in row]:  # the columns that do the products
            row[col]["gflop_s"] = rounded(row["gflop"] / (row[col]["ms"] / 1e3), 1)
        common.emit(row)
        rows.append(row)
    print(table(rows, args.impls), flush=True)
    if args.out:
        common.write_rows(args.out, "conv_layers", rows, model=args.model, batch=args.batch)
    return rows


if __name__ == "__main__":
    main()
