"""Weight import/export: name mapping, round trips, file formats, reference run checkpoints."""

from __future__ import annotations

import collections
import json
import sys

import numpy as np
import pytest
import torch

from conftest import require_shared
from l2t_jax import reference_run as RR
from l2t_jax import weights as W
from l2t_jax.io import msgpack as MP
from l2t_jax.io import torch_layout as TL
from l2t_jax.io import torch_pickle as TP
from l2t_jax.io import weights_file as WF
from l2t_jax.transfer import parse_pairs
from l2t_jax.models import available_models, model_info
from torch_reference import make_torch_model, perturb_

STL10_PAIRS = "4-0,4-1,4-2,4-3,4-4,9-0,9-1,9-2,9-3,9-4,14-0,14-1,14-2,14-3,14-4"


def sd_numpy(module: torch.nn.Module) -> dict:
    return collections.OrderedDict((k, v.detach().numpy().copy()) for k, v in module.state_dict().items())


def tree_equal(a, b) -> bool:
    if isinstance(a, dict) or isinstance(b, dict):
        return isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys() and all(tree_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(tree_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (
            isinstance(a, np.ndarray)
            and isinstance(b, np.ndarray)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and np.array_equal(a, b)
        )
    return a == b


def cifar_num(name: str) -> int:
    return 10 if model_info(name).image_size == 32 else 1000


def test_weights_module_reexports_the_split_modules():
    """`l2t_jax.weights`, kept for old imports, hands out the very objects of the modules that now hold them."""
    homes = {
        TP: ["WeightImportError", "CheckpointReadError", "UnsafeCheckpointError", "read_torch_file"],
        TL: ["TorchEntry", "torch_entries", "variables_from_torch", "variables_to_torch", "unwrap_state_dict",
             "load_pretrained", "check_variables"],
        MP: ["save_variables", "load_variables"],
        WF: ["load_weights"],
        RR: ["TorchLayout", "ReferenceRun", "load_reference_run", "save_reference_run"],
    }
    names = [n for ns in homes.values() for n in ns]
    assert sorted(W.__all__) == sorted(names)
    for module, ns in homes.items():
        for n in ns:
            assert getattr(W, n) is getattr(module, n), n


# ---- name mapping ----------------------------------------------------------------------


@pytest.mark.parametrize("name", available_models())
def test_mapping_is_pytorch_state_dict_layout(name):
    tm = make_torch_model(name, 7)
    sd = tm.state_dict()
    entries = TL.torch_entries(name)
    assert [e.torch_key for e in entries] == list(sd), "keys or registration order differ"
    variables = TL.variables_from_torch(name, sd_numpy(tm))
    assert TL.check_variables(name, variables) == 7
    for e in entries:
        ours = variables[e.collection]
        for p in e.path:
            ours = ours[p]
        assert TL.torch_shape(tuple(ours.shape), e.layout) == tuple(sd[e.torch_key].shape), e.torch_key


@pytest.mark.parametrize("name", ["resnet20", "resnet32", "vgg9_bn", "resnet18", "resnet50"])
def test_import_export_import_round_trip_is_exact(name):
    tm = perturb_(make_torch_model(name, 5), seed=3)
    sd = sd_numpy(tm)
    v1 = TL.variables_from_torch(name, sd)
    assert v1["batch_stats"]["bn1"]["num_batches_tracked"].dtype == np.int32
    out = TL.variables_to_torch(name, v1)
    assert list(out) == list(sd)
    for k in sd:
        assert out[k].dtype == sd[k].dtype and out[k].shape == sd[k].shape and np.array_equal(out[k], sd[k]), k
    assert tree_equal(TL.variables_from_torch(name, out), v1)
    fresh = make_torch_model(name, 5)
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in out.items()}, strict=True)
    # jax arrays are accepted too
    import jax.numpy as jnp
    import jax

    out2 = TL.variables_to_torch(name, jax.tree_util.tree_map(jnp.asarray, v1))
    assert all(np.array_equal(out2[k], out[k]) for k in out)


def test_unused_keys_prefix_and_old_files_without_counters():
    tm = perturb_(make_torch_model("vgg9_bn", 10, extras=True), seed=1)
    sd = sd_numpy(tm)
    v = TL.variables_from_torch("vgg9_bn", sd)  # alphas, new_bn, w1.. ignored
    ref = TL.variables_from_torch("vgg9_bn", {k: v_ for k, v_ in sd.items() if k.startswith(("features", "classifier"))})
    assert tree_equal(v, ref)
    assert tree_equal(TL.variables_from_torch("vgg9_bn", {"module." + k: x for k, x in sd.items()}), v)
    old = {k: x for k, x in sd.items() if not k.endswith("num_batches_tracked")}
    v_old = TL.variables_from_torch("vgg9_bn", old)
    assert int(v_old["batch_stats"]["bn3"]["num_batches_tracked"]) == 0
    # torch tensors are accepted as values
    assert tree_equal(TL.variables_from_torch("vgg9_bn", tm.state_dict()), v)


def test_import_errors_collect_every_problem():
    sd = sd_numpy(make_torch_model("resnet18", 1000))
    del sd["layer2.0.downsample.1.running_var"]
    del sd["layer4.1.conv2.weight"]
    sd["layer3.0.conv1.weight"] = np.zeros((256, 128, 1, 1), np.float32)
    with pytest.raises(TP.WeightImportError) as e:
        TL.variables_from_torch("resnet18", sd)
    msg = str(e.value)
    for needle in ("layer2.0.downsample.1.running_var", "layer4.1.conv2.weight", "(512, 512, 3, 3)", "layer3.0.conv1.weight", "(256, 128, 1, 1)", "(256, 128, 3, 3)"):
        assert needle in msg, needle


def test_num_classes_inferred_and_checked():
    sd = sd_numpy(make_torch_model("resnet20", 37))
    v = TL.variables_from_torch("resnet20", sd)
    assert v["params"]["fc"]["kernel"].shape == (64, 37)
    assert TL.variables_from_torch("resnet20", sd, 37)["params"]["fc"]["bias"].shape == (37,)
    with pytest.raises(TP.WeightImportError, match=r"num_classes=10.*fc\.weight.*37"):
        TL.variables_from_torch("resnet20", sd, 10)
    with pytest.raises(TP.WeightImportError, match="37"):
        TL.check_variables("resnet20", v, 10)


# ---- files ------------------------------------------------------------------------------


def test_load_pretrained_plain_and_wrapped(tmp_path):
    tm = perturb_(make_torch_model("resnet18", 1000), seed=5)
    expect = TL.variables_from_torch("resnet18", sd_numpy(tm))
    plain = tmp_path / "resnet18-5c106cde.pth"
    torch.save(tm.state_dict(), plain)
    assert tree_equal(TL.load_pretrained(plain, "resnet18"), expect)
    assert tree_equal(WF.load_weights(plain, "resnet18", 1000), expect)

    cm = perturb_(make_torch_model("resnet32", 100), seed=6)
    wrapped = tmp_path / "model_best.pth.tar"
    torch.save({"epoch": 3, "state_dict": cm.state_dict(), "num_classes": 100}, wrapped)
    assert tree_equal(WF.load_weights(wrapped, "resnet32"), TL.variables_from_torch("resnet32", sd_numpy(cm)))
    with pytest.raises(TP.WeightImportError, match="num_classes=100"):
        WF.load_weights(wrapped, "resnet32", 10)
    with pytest.raises(TP.WeightImportError, match=r"unexpected keys.*blocks2\.2\.conv1\.weight"):
        WF.load_weights(wrapped, "resnet20")  # a deeper model's weights do not load silently
    legacy = tmp_path / "legacy.pt"
    torch.save(cm.state_dict(), legacy, _use_new_zipfile_serialization=False)
    assert tree_equal(WF.load_weights(legacy, "resnet32"), TL.variables_from_torch("resnet32", sd_numpy(cm)))


def test_msgpack_round_trip_and_dispatch(tmp_path):
    v = TL.variables_from_torch("vgg9_bn", sd_numpy(perturb_(make_torch_model("vgg9_bn", 10), seed=2)))
    path = tmp_path / "sub" / "vgg.msgpack"
    MP.save_variables(path, v)
    assert sorted(p.name for p in path.parent.iterdir()) == ["vgg.msgpack"]  # no temp file left
    back = MP.load_variables(path)
    assert tree_equal(back, v)
    assert tree_equal(WF.load_weights(path, "vgg9_bn", 10), v)
    with pytest.raises(TP.WeightImportError, match="num_classes=100"):
        WF.load_weights(path, "vgg9_bn", 100)
    with pytest.raises(TP.WeightImportError, match="does not fit|fc"):
        WF.load_weights(path, "resnet20")
    with pytest.raises(FileNotFoundError, match="nope.msgpack"):
        WF.load_weights(tmp_path / "nope.msgpack", "vgg9_bn")
    with pytest.raises(TP.WeightImportError, match="directory"):
        WF.load_weights(tmp_path, "vgg9_bn")
    (tmp_path / "w.npz").write_bytes(b"")
    with pytest.raises(TP.WeightImportError, match="unknown weights format"):
        WF.load_weights(tmp_path / "w.npz", "vgg9_bn")


def test_read_torch_file_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        TP.read_torch_file(tmp_path / "missing.pth")
    path = tmp_path / "x.pth"
    torch.save({"a": torch.arange(3)}, path)
    monkeypatch.setitem(sys.modules, "torch", None)  # torch not installed
    with pytest.raises(ImportError, match=r"install l2t_jax\[torch\]"):
        TP.read_torch_file(path, backend="torch")
    out = TP.read_torch_file(path)  # auto falls back to the torch-free reader
    assert np.array_equal(out["a"], np.arange(3))


def _alias_groups(tree, prefix=""):
    """{data pointer/shape/strides: [paths]} of the arrays in a loaded checkpoint."""
    groups = collections.defaultdict(list)

    def walk(x, p):
        if isinstance(x, dict):
            for k, v in x.items():
                walk(v, f"{p}/{k}")
        elif isinstance(x, (list, tuple)):
            for i, v in enumerate(x):
                walk(v, f"{p}/{i}")
        elif isinstance(x, np.ndarray) and x.nbytes:
            groups[RR._view_identity(x)].append(p)

    walk(tree, prefix)
    return sorted(sorted(v) for v in groups.values())


def _assert_same_load(path):
    a = TP.read_torch_file(path, backend="torch")
    b = TP.read_torch_file(path, backend="numpy")
    assert tree_equal(a, b)
    assert _alias_groups(a) == _alias_groups(b)
    return a


@pytest.mark.parametrize(
    "rel", ["tinyimagenet-resnet32.pth.tar", "cases/stl10_vgg9/source.pth", "cases/stl10_vgg9/checkpoint.pth"]
)
def test_torch_free_reader_equals_torch_load_on_shared_files(rel):
    a = _assert_same_load(require_shared("reference/" + rel))
    if rel.endswith("checkpoint.pth"):  # shared storage survives: w.0 is w1
        assert RR._view_identity(a["target_model"]["w.0.weight"]) == RR._view_identity(a["target_model"]["w1.weight"])


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_torch_free_reader_equals_torch_load_on_varied_tensors(tmp_path, legacy):
    base = torch.arange(24, dtype=torch.float64).reshape(4, 6)
    obj = {
        "f32": torch.randn(3, 4),
        "f16": torch.randn(5).half(),
        "bf16": torch.randn(5).bfloat16(),
        "i64": torch.tensor(7),
        "i32": torch.arange(4, dtype=torch.int32),
        "u8": torch.arange(9, dtype=torch.uint8).reshape(3, 3),
        "bool": torch.tensor([True, False]),
        "view": base,
        "view_t": base.t(),
        "view_slice": base[1:3, 2:],
        "empty": torch.zeros(0, 3),
        "nested": [1, 2.5, "s", None, (torch.ones(2), {"k": torch.zeros(1)})],
        "od": collections.OrderedDict(b=torch.ones(1), a=torch.zeros(2)),
        "param": torch.nn.Parameter(torch.randn(2, 2)),
    }
    path = tmp_path / "varied.pth"
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    a = _assert_same_load(path)
    assert type(a["od"]) is collections.OrderedDict and list(a["od"]) == ["b", "a"]


# ---- reference run checkpoints -----------------------------------------------------------


def _stl10_run(path=None, **kw):
    case = require_shared("reference/cases/stl10_vgg9")
    cfg = json.loads((case / "config.json").read_text())
    args = dict(
        target_model=cfg["target_model"],
        num_classes=cfg["num_classes"],
        pairs=cfg["pairs"],
        source_tap_channels=model_info(cfg["source_model"]).tap_channels,
        target_tap_channels=model_info(cfg["target_model"]).tap_channels,
    )
    args.update(kw)
    return RR.load_reference_run(path or case / "checkpoint.pth", **args), case


def _torch_branch(pairs, src_ch, tgt_ch):
    return torch.nn.ModuleList([torch.nn.Conv2d(tgt_ch[n], src_ch[m], 1) for m, n in pairs])


def test_reference_run_matches_pytorch_optimizer_state():
    run, case = _stl10_run()
    ck = torch.load(case / "checkpoint.pth", map_location="cpu", weights_only=True)
    pairs = list(parse_pairs(STL10_PAIRS))
    assert run.pairs == pairs and run.num_classes == 10 and run.model_name == "vgg9_bn"
    assert run.hyper == {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4, "nesterov": False}
    assert run.has_momentum_buffers

    # Rebuild the reference's objects in PyTorch and let torch map the optimizer state.
    tm = make_torch_model("vgg9_bn", 10, extras=True)
    tm.load_state_dict(ck["target_model"], strict=True)
    src_ch, tgt_ch = model_info("resnet32").tap_channels, model_info("vgg9_bn").tap_channels
    branch = _torch_branch(pairs, src_ch, tgt_ch)
    branch.load_state_dict(ck["target_branch"], strict=True)
    params = list(tm.parameters()) + list(branch.parameters())
    assert len(params) == len(ck["target_optimizer"]["param_groups"][0]["params"]) == 91
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-4)
    opt.load_state_dict(ck["target_optimizer"])
    by_name = dict(tm.named_parameters())
    n_checked = 0
    for e in TL.torch_entries("vgg9_bn"):
        if not e.is_parameter:
            continue
        buf = opt.state[by_name[e.torch_key]]["momentum_buffer"].numpy()
        ours = run.momentum["model"]
        for p in e.path:
            ours = ours[p]
        assert np.array_equal(TL.to_torch_layout(ours, e.layout), buf), e.torch_key
        n_checked += 1
    assert n_checked == 34
    for i, conv in enumerate(branch):
        assert np.array_equal(run.momentum["branch"][i]["kernel"], opt.state[conv.weight]["momentum_buffer"].numpy()[:, :, 0, 0].T)
        assert np.array_equal(run.momentum["branch"][i]["bias"], opt.state[conv.bias]["momentum_buffer"].numpy())
        assert np.array_equal(run.branch[i]["kernel"], conv.weight.detach().numpy()[:, :, 0, 0].T)
        m = pairs[i][0]
        assert run.branch[i]["kernel"].shape == (tgt_ch[pairs[i][1]], src_ch[m])
        assert run.meta_params["w"][i]["kernel"].shape == (src_ch[m], src_ch[m])
        assert np.array_equal(run.meta_params["w"][i]["kernel"], ck["w"][f"{i}.weight"].numpy().T)
        assert np.array_equal(run.meta_params["lw"][i]["kernel"], ck["lw"][f"{i}.weight"].numpy().T)
        assert run.meta_params["lw"][i]["bias"].shape == (1,)
    assert tree_equal(run.variables, TL.variables_from_torch("vgg9_bn", ck["target_model"]))


def _mutated_checkpoint(tmp_path, mutate):
    case = require_shared("reference/cases/stl10_vgg9")
    ck = torch.load(case / "checkpoint.pth", map_location="cpu", weights_only=True)
    mutate(ck)
    path = tmp_path / "mutated.pth"
    torch.save(ck, path)
    return path


def test_reference_run_without_momentum_and_const_lambda(tmp_path):
    def mutate(ck):
        ck["target_optimizer"]["state"] = {}
        ck["lw"] = collections.OrderedDict(weights=torch.linspace(-1, 1, 15))

    run, _ = _stl10_run(_mutated_checkpoint(tmp_path, mutate))
    assert not run.has_momentum_buffers
    import jax

    assert all(not np.any(x) for x in jax.tree_util.tree_leaves(run.momentum))
    assert run.momentum["model"]["conv3"]["kernel"].shape == run.variables["params"]["conv3"]["kernel"].shape
    assert np.array_equal(run.meta_params["lw"]["weights"], torch.linspace(-1, 1, 15).numpy())
    out = tmp_path / "resaved.pth"
    RR.save_reference_run(out, run)
    back, _ = _stl10_run(out)
    assert not back.has_momentum_buffers and tree_equal(back.meta_params, run.meta_params)


def test_reference_run_parameter_count_is_verified(tmp_path):
    def mutate(ck):
        ck["target_optimizer"]["param_groups"][0]["params"].pop()

    with pytest.raises(TP.WeightImportError, match="tracks 90 parameters.*91"):
        _stl10_run(_mutated_checkpoint(tmp_path, mutate))


def test_reference_run_errors_name_entries(tmp_path):
    def mutate(ck):
        del ck["target_branch"]["3.bias"]
        ck["w"]["5.weight"] = torch.zeros(16, 16)

    with pytest.raises(TP.WeightImportError) as e:
        _stl10_run(_mutated_checkpoint(tmp_path, mutate))
    assert "'3.bias'" in str(e.value) and "'5.weight'" in str(e.value) and "(32, 32)" in str(e.value)
    with pytest.raises(TP.WeightImportError, match="num_classes=100"):
        _stl10_run(num_classes=100)


def test_save_reference_run_reproduces_the_file(tmp_path):
    run, case = _stl10_run()
    out = tmp_path / "resaved.pth"
    RR.save_reference_run(out, run)
    a = torch.load(case / "checkpoint.pth", map_location="cpu", weights_only=True)
    b = torch.load(out, map_location="cpu", weights_only=True)
    assert list(a) == list(b)
    for k in ("target_model", "target_branch", "w", "lw"):
        assert list(a[k]) == list(b[k]), k
        for key in a[k]:
            assert a[k][key].dtype == b[k][key].dtype and torch.equal(a[k][key], b[k][key]), (k, key)
    assert a["target_optimizer"]["param_groups"] == b["target_optimizer"]["param_groups"]
    sa, sb = a["target_optimizer"]["state"], b["target_optimizer"]["state"]
    assert sorted(sa) == sorted(sb)
    assert all(torch.equal(sa[i]["momentum_buffer"], sb[i]["momentum_buffer"]) for i in sa)
    assert b["target_model"]["w.0.weight"].untyped_storage().data_ptr() == b["target_model"]["w1.weight"].untyped_storage().data_ptr()
    back, _ = _stl10_run(out)
    assert tree_equal(back.variables, run.variables) and tree_equal(back.momentum, run.momentum)
    assert tree_equal(back.branch, run.branch) and tree_equal(back.meta_params, run.meta_params)
    assert back.hyper == run.hyper


def test_save_reference_run_without_layout_round_trips(tmp_path):
    run, _ = _stl10_run()
    run.torch_layout = None
    out = tmp_path / "fresh.pth"
    RR.save_reference_run(out, run)
    ck = torch.load(out, map_location="cpu", weights_only=True)
    assert len(ck["target_optimizer"]["param_groups"][0]["params"]) == 34 + 30
    tm = make_torch_model("vgg9_bn", 10)
    tm.load_state_dict(ck["target_model"], strict=True)
    params = list(tm.parameters()) + list(_torch_branch(run.pairs, model_info("resnet32").tap_channels, model_info("vgg9_bn").tap_channels).parameters())
    torch.optim.SGD(params, lr=0.1, momentum=0.9).load_state_dict(ck["target_optimizer"])
    back, _ = _stl10_run(out)
    assert tree_equal(back.variables, run.variables) and tree_equal(back.momentum, run.momentum)
    assert tree_equal(back.branch, run.branch) and tree_equal(back.meta_params, run.meta_params)

