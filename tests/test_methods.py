"""Every method of Table 1 and the ablations: what one config key selects, the baselines'
losses against PyTorch, multi-source transfer, and short runs with each method's
expected structure.

The runs are the runner's (l2t_jax.loop) on 8 px digits with `vgg_tiny`, 2 epochs of
3 steps (the first epoch's lr is 0.05; the cosine schedule's last epoch has lr 0),
T = 1 and two pairs where the method lets the config choose them, so each method
compiles once and quickly.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config, write_digits_npz
from l2t_jax import bilevel, loop, run_config, transfer
from l2t_jax.io.msgpack import load_variables, save_variables
from l2t_jax.models import get_model, init_model, model_info
from l2t_jax.transfer import MatchingConfig

try:  # only the two PyTorch comparisons of the baselines' losses need it; the runs do not
    import torch
    import torch.nn.functional as F
except ImportError:
    torch = F = None
needs_torch = pytest.mark.skipif(torch is None, reason="PyTorch is not installed (pip install -e '.[torch]'): "
                                                       "no reference to compare the loss with")

N_CLASSES = 4
SOURCE_CLASSES = 7


@pytest.fixture(scope="module")
def npz_path(tmp_path_factory) -> Path:
    """Digits 0-3 at 8 px: 16 training + 8 test images per class."""
    return write_digits_npz(tmp_path_factory.mktemp("npz") / "digits4.npz", N_CLASSES)


@pytest.fixture(scope="module")
def source_weights(tmp_path_factory) -> str:
    """A randomly initialised vgg_tiny with 7 classes (another task's head than the target's 4)."""
    variables = init_model(get_model("vgg_tiny", SOURCE_CLASSES), jax.random.key(7), 8)
    path = tmp_path_factory.mktemp("src") / "source.msgpack"
    save_variables(path, jax.device_get(variables))
    return str(path)


def method_config(npz_path, source_weights, method: str, **overrides):
    """`tiny_config` with a method, two pairs (matching and AT), T = 1 and a log line every step."""
    spec = run_config.METHOD_SPECS.get(method)
    pairs = "" if spec and spec.pairs else "1-1,2-2"  # a name that fixes the pairs: its own
    c = tiny_config(f"npz:{npz_path}", method=method, source_weights=source_weights, pairs=pairs,
                    at_pairs="1-1,2-2", T=1, eval_batch_size=32, log_every=1)
    for k, v in overrides.items():
        c[k] = v
    return c


# --------------------------------------------------------------------------- what one key selects


def test_method_key_resolves_to_the_papers_settings(npz_path, source_weights):
    def resolved(method, **kw):
        return run_config.resolve_method(method_config(npz_path, source_weights, method, **kw))

    one_to_one = transfer.named_pairs("one_to_one", "vgg_tiny", "vgg_tiny", 8)
    single = transfer.named_pairs("single", "vgg_tiny", "vgg_tiny", 8)
    assert single == ((2, 2),) and one_to_one == ((0, 0), (1, 1), (2, 2))
    r = resolved("scratch")
    assert (r.matching, r.pairs, r.at_pairs, r.lwf_weight, r.sources) == ("scratch", (), (), 0.0, ())
    r = resolved("lwf")
    assert (r.matching, r.pairs, r.at_pairs, r.lwf_weight, len(r.sources)) == ("scratch", (), (), 1.0, 1)
    r = resolved("at")
    assert (r.matching, r.at_pairs, r.lwf_weight) == ("scratch", ((1, 1), (2, 2)), 0.0)
    assert resolved("at", at_pairs="one_to_one").at_pairs == one_to_one
    r = resolved("lwf_at", lwf_weight=0.5)
    assert (r.at_pairs, r.lwf_weight) == (((1, 1), (2, 2)), 0.5)
    assert resolved("fm").pairs == ((1, 1), (2, 2))
    assert (resolved("fm_single").matching, resolved("fm_single").pairs) == ("fm", single)
    assert (resolved("fm_one_to_one").matching, resolved("fm_one_to_one").pairs) == ("fm", one_to_one)
    assert (resolved("l2t_w_single").matching, resolved("l2t_w_single").pairs) == ("l2t_w", single)
    assert resolved("l2t_w_one_to_one").pairs == one_to_one
    r = resolved("l2t_ww", pairs="all_to_all")
    assert r.matching == "l2t_ww" and len(r.pairs) == 9 and (r.scheme, r.meta_kind) == ("proposed", "network")
    assert resolved("l2t_ww_weights").meta_kind == "weights"
    assert resolved("l2t_ww_original").scheme == "original"
    assert resolved("l2t_ww_first_order").scheme == "first_order"
    # The ablation names agree with the explicit keys; contradicting them is an error.
    assert resolved("l2t_ww_original", scheme="original").scheme == "original"
    with pytest.raises(run_config.ConfigError, match="sets scheme='original'.*first_order"):
        resolved("l2t_ww_original", scheme="first_order")
    with pytest.raises(run_config.ConfigError, match="config.method='fitnet' is not one of"):
        resolved("fitnet")
    with pytest.raises(run_config.ConfigError, match="config.at_pairs='7-0'"):
        resolved("at", at_pairs="7-0")


def test_multi_source_pairs_count_across_sources(npz_path, source_weights):
    c = method_config(npz_path, source_weights, "l2t_ww", extra_sources=f"vgg_tiny:{source_weights}:0-2,2-2")
    r = run_config.resolve_method(c)
    assert [s.model for s in r.sources] == ["vgg_tiny", "vgg_tiny"]
    assert r.pairs == ((1, 1), (2, 2), (3, 2), (5, 2))  # the second source's taps are 3, 4, 5
    assert run_config.validate(c) == r.pairs
    c.extra_sources = f"vgg_tiny:{source_weights}"  # default: the same pair spec as `pairs`
    assert run_config.resolve(c).pairs == ((1, 1), (2, 2), (4, 1), (5, 2))
    c.extra_sources = "vgg_tiny"
    with pytest.raises(run_config.ConfigError, match="MODEL:WEIGHTS"):
        run_config.validate(c)
    c.extra_sources = f"vgg_tiny:{source_weights}:9-0"
    with pytest.raises(run_config.ConfigError, match=r"extra_sources\[0\] pairs='9-0'"):
        run_config.validate(c)
    c.extra_sources = "vgg_tiny:/nonexistent/w.msgpack"
    with pytest.raises(FileNotFoundError, match=r"extra_sources\[0\] weights"):
        run_config.validate(c)
    c = method_config(npz_path, source_weights, "lwf", extra_sources=f"vgg_tiny:{source_weights}")
    with pytest.raises(run_config.ConfigError, match="extra_sources is for matching methods"):
        run_config.validate(c)


# --------------------------------------------------------------------------- the baselines' losses vs PyTorch


def _torch_at_loss(fs, ft):
    """Zagoruyko & Komodakis' at(x) = normalize(x.pow(2).mean(1).view(B, -1)); (at_s - at_t).pow(2).mean()."""
    at = lambda x: F.normalize(x.pow(2).mean(1).view(x.size(0), -1))  # noqa: E731
    return (at(fs) - at(ft)).pow(2).mean()


@needs_torch
def test_attention_loss_and_gradient_match_pytorch():
    rng = np.random.default_rng(0)
    src = [rng.normal(size=(3, 8, 8, 5)), rng.normal(size=(3, 4, 4, 6))]
    tgt = [rng.normal(size=(3, 8, 8, 7)), rng.normal(size=(3, 4, 4, 2))]
    pairs = ((0, 0), (1, 1))
    beta = 1000.0

    def ours(t0, t1):
        return transfer.attention_loss([jnp.asarray(s) for s in src], [t0, t1], pairs, beta)

    loss, per_pair = ours(jnp.asarray(tgt[0]), jnp.asarray(tgt[1]))
    grads = jax.grad(lambda *t: ours(*t)[0], argnums=(0, 1))(jnp.asarray(tgt[0]), jnp.asarray(tgt[1]))
    nchw = lambda a: torch.tensor(np.transpose(a, (0, 3, 1, 2)), dtype=torch.float64)  # noqa: E731
    tt = [nchw(t).requires_grad_(True) for t in tgt]
    ref = [beta / 2 * _torch_at_loss(nchw(s), t) for s, t in zip(src, tt)]
    total = sum(ref)
    total.backward()
    np.testing.assert_allclose(np.asarray(per_pair), [float(r.detach()) for r in ref], rtol=1e-12)
    np.testing.assert_allclose(float(loss), float(total.detach()), rtol=1e-12)
    for g, t in zip(grads, tt):
        np.testing.assert_allclose(np.asarray(g), np.transpose(t.grad.numpy(), (0, 2, 3, 1)), rtol=1e-10, atol=1e-14)


def test_attention_loss_resizes_the_source_map_and_is_zero_for_equal_maps():
    rng = np.random.default_rng(1)
    t = jnp.asarray(rng.normal(size=(2, 8, 8, 4)))
    loss, _ = transfer.attention_loss([t * 3.0], [t], ((0, 0),))  # the same attention up to scale
    assert float(loss) < 1e-20
    small = jnp.asarray(rng.normal(size=(2, 4, 4, 4)))
    loss, _ = transfer.attention_loss([small], [t], ((0, 0),))
    q_s = transfer.attention_map(transfer.resize_bilinear(small, 2.0))
    expected = 500.0 * jnp.mean(jnp.square(q_s - transfer.attention_map(t)))
    np.testing.assert_allclose(float(loss), float(expected), rtol=1e-12)


@needs_torch
def test_distillation_loss_matches_pytorch_kl_div():
    rng = np.random.default_rng(2)
    s, t = rng.normal(size=(5, 7)) * 3, rng.normal(size=(5, 7)) * 3
    tau = 2.0
    ours, g = jax.value_and_grad(lambda a: transfer.distillation_loss(a, jnp.asarray(t), tau))(jnp.asarray(s))
    ts = torch.tensor(s, requires_grad=True)
    ref = F.kl_div(F.log_softmax(ts / tau, 1), F.softmax(torch.tensor(t) / tau, 1), reduction="batchmean") * tau**2
    ref.backward()
    np.testing.assert_allclose(float(ours), float(ref.detach()), rtol=1e-12)
    np.testing.assert_allclose(np.asarray(g), ts.grad.numpy(), rtol=1e-10)
    assert float(transfer.distillation_loss(jnp.asarray(t), jnp.asarray(t), tau)) == pytest.approx(0.0, abs=1e-14)


def test_multi_source_matching_loss_is_the_sum_of_the_single_source_losses():
    """Concatenated taps + offset pairs = one matching branch and meta-network per source, losses added."""
    target = get_model("vgg_tiny", N_CLASSES)
    src_a, src_b = get_model("vgg_tiny", SOURCE_CLASSES), get_model("vgg_tiny", 5)
    f64 = lambda v: jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), v)  # noqa: E731
    tv = f64(init_model(target, jax.random.key(0), 8))
    va = f64(init_model(src_a, jax.random.key(1), 8))
    vb = f64(init_model(src_b, jax.random.key(2), 8))
    x = jax.random.normal(jax.random.key(3), (4, 8, 8, 3), jnp.float64)
    y = jnp.arange(4) % N_CLASSES
    ch = model_info("vgg_tiny").tap_channels
    pairs_a, pairs_b = ((1, 1), (2, 2)), ((0, 2),)
    multi_pairs = pairs_a + tuple((m + len(ch), n) for m, n in pairs_b)
    cfg = bilevel.BilevelConfig(MatchingConfig(pairs=multi_pairs, method="l2t_ww"), T=1)
    state = bilevel.create_train_state(jax.random.key(4), bilevel.Models(target, (src_a, src_b)), cfg, tv,
                                       source_channels=ch + ch, target_channels=ch)
    logits, feats = bilevel.source_outputs((src_a, src_b), (va, vb), x)
    assert len(feats) == 2 * len(ch) and logits.shape == (4, SOURCE_CLASSES)
    w, lam = transfer.meta_outputs(state.meta_params, transfer.pool(feats), cfg.matching)
    multi = bilevel.loss_terms(target, state.params, state.batch_stats, x, y, feats, w, lam, cfg.matching)

    def single(src_model, src_vars, pairs, idx):
        m = MatchingConfig(pairs=pairs, method="l2t_ww")
        p = {**state.params, "branch": [state.params["branch"][i] for i in idx]}
        phi = {k: [v[i] for i in idx] for k, v in state.meta_params.items()}
        f = bilevel.source_features(src_model, src_vars, x)
        wi, li = transfer.meta_outputs(phi, transfer.pool(f), m)
        return bilevel.loss_terms(target, p, state.batch_stats, x, y, f, wi, li, m).wfm

    expected = single(src_a, va, pairs_a, [0, 1]) + single(src_b, vb, pairs_b, [2])
    np.testing.assert_allclose(float(multi.wfm), float(expected), rtol=1e-12)


# --------------------------------------------------------------------------- short runs with every method


def _records(workdir: Path, kind: str) -> list[dict]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == kind]


def _leaves_changed(a, b) -> bool:
    return any(not np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


RUN_METHODS = [
    "lwf", "at", "lwf_at", "fm", "fm_single", "fm_one_to_one", "l2t_w", "l2t_w_single", "l2t_w_one_to_one",
    "l2t_ww", "l2t_ww_weights", "l2t_ww_original", "l2t_ww_first_order", "multi_source",
]


@pytest.mark.parametrize("method", RUN_METHODS)
def test_every_method_trains_with_its_structure(method, npz_path, source_weights, tmp_path):
    overrides = {}
    if method == "multi_source":
        overrides["extra_sources"] = f"vgg_tiny:{source_weights}:0-2"
    c = method_config(npz_path, source_weights, "l2t_ww" if method == "multi_source" else method, **overrides)
    resolved = run_config.resolve_method(c)
    summary = loop.train(c, tmp_path)
    assert summary["steps"] == 6 and summary["best_val_acc"] is not None
    assert summary["method"] == c.method and summary["source_model"] == "vgg_tiny"
    final = load_variables(tmp_path / "final_transfer.msgpack")
    train = _records(tmp_path, "train")
    first_epoch = [r for r in train if r["epoch"] == 1]
    assert first_epoch and all(math.isfinite(r["loss"]) for r in train)
    P = len(resolved.pairs)
    assert summary["pairs"] == transfer.format_pairs(resolved.pairs)
    assert len(final.get("branch", [])) == P

    # The baselines' terms are on exactly for their methods, and enter the loss.
    for r in train:
        assert ("lwf" in r) == (method in ("lwf", "lwf_at"))
        assert ("at" in r) == (method in ("at", "lwf_at"))
        # float32 sum of <= 4 non-negative terms: <= 4 roundings of half an ulp, 2.4e-7 (measured <= 6e-8)
        assert r["loss"] == pytest.approx(r["ce"] + r["wfm"] + r.get("at", 0.0) + r.get("lwf", 0.0), rel=2.4e-7)
        if "at" in r or "lwf" in r:
            assert r.get("at", 1.0) > 0 and r.get("lwf", 1.0) > 0
    if method in ("lwf", "lwf_at"):
        head = final["lwf_head"]
        assert head["kernel"].shape == (model_info("vgg_tiny").tap_channels[-1], SOURCE_CLASSES)
    else:
        assert "lwf_head" not in final
    assert summary["at_pairs"] == ("1-1,2-2" if method in ("at", "lwf_at") else None)

    meta = final.get("meta_params", {})
    epoch0 = _records(tmp_path, "epoch")[0]
    if resolved.matching in ("scratch", "fm"):
        assert not meta  # FM: uniform w and λ = 1, nothing to learn
        assert "train_outer_loss" not in epoch0
        if resolved.matching == "fm":
            assert epoch0["train_lambda"] == [1.0] * P
            assert epoch0["train_wfm"] > 0
        return
    # Meta-learned methods: φ moved by Adam, an outer loss was computed each step.
    assert "train_outer_loss" in epoch0 and epoch0["train_meta_grad_norm"] > 0
    init = bilevel.create_train_state(
        jax.random.key(0), bilevel.Models(None, None),
        bilevel.BilevelConfig(MatchingConfig(pairs=resolved.pairs, method=resolved.matching,
                                             meta_kind=resolved.meta_kind)),
        {"params": {"x": jnp.zeros(1)}}, source_channels=model_info("vgg_tiny").tap_channels * 2,
        target_channels=model_info("vgg_tiny").tap_channels,
    ).meta_params
    assert jax.tree.structure(init) == jax.tree.structure(jax.tree.map(jnp.asarray, meta))
    assert _leaves_changed(init["w"], meta["w"])
    if resolved.matching == "l2t_w":
        assert "lw" not in meta and epoch0["train_lambda"] == [1.0] * P
        return
    lam = epoch0["train_lambda"]
    assert len(lam) == P
    # The λ networks learned: their deterministic start (bias / value = lambda_init 1.0) moved
    # in every pair (a random kernel differs by pair from the start, so "λ differs by pair"
    # would prove nothing). That the moves descend the outer loss is tested in test_bilevel.
    start = [float(np.asarray(v["bias" if "bias" in v else "value"]).ravel()[0]) for v in meta["lw"]]
    assert all(v != 1.0 for v in start), start
    if resolved.meta_kind == "weights":
        assert set(meta["w"][0]) == {"logits"} and set(meta["lw"][0]) == {"value"}
        # Constants: λ is the same for every sample of a batch, relu6 of the learned value.
        # epoch 1's λ (mean over steps 1-3: φ before Adam steps 0-2) against the final φ (after step 6): 4-6
        # Adam steps apart, each at most meta_lr·(1-β1)/√(1-β2) = 3.2·meta_lr, relu6 1-Lipschitz (measured 4e-4)
        bound = 5 * c.meta_lr * 0.1 / math.sqrt(0.001) + 1e-6
        assert lam == pytest.approx([min(max(float(v["value"]), 0.0), 6.0) for v in meta["lw"]], abs=bound)
