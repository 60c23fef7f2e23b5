"""Reading weight files never runs code from them, and a bad file is one clear error.

Every pickle the library reads (torch's zip format, its legacy format with its
five pickles, a plain pickle) goes through one restricted unpickler with an
allow-list of what a PyTorch checkpoint needs. The payloads below would create a
marker file in the test's temporary folder if they ran; each test checks that
the load is refused with a one-line `WeightImportError` naming the file and the
refused global, and that the marker does not exist afterwards.

The command-line entry points (`experiments.evaluate`, `experiments.run`) turn
a refused or unreadable weights file into exit status 2 with one `error:` line
and no traceback.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import random
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

from conftest import REPO, require_shared, write_digits_npz
from experiments import evaluate as ev
from l2t_jax import reference_run as RR
from l2t_jax.io import torch_layout as TL
from l2t_jax.io import torch_pickle as TP
from l2t_jax.io import weights_file as WF

try:
    import torch
except ImportError:  # the torch-free reader is what most of this file tests
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="PyTorch is not installed: nothing to compare with (pip install l2t_jax[torch])")

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_SYS_INFO = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}
SHARED_TORCH_FILES = [
    "reference/tinyimagenet-resnet32.pth.tar",
    "reference/cases/stl10_vgg9/source.pth",
    "reference/cases/stl10_vgg9/checkpoint.pth",
    "reference/trajectories/resnet32_resnet32/source.pth",
    "reference/trajectories/resnet32_resnet32/checkpoint.pth",
    "reference/trajectories/resnet32_resnet32/expected.pth",
]


# --------------------------------------------------------------------------- payloads


class _Reduce:
    """Pickles as `func(*args)`: the classic code-execution payload."""

    def __init__(self, func: Callable, *args: Any) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple:
        return self.func, self.args


def _touch_code(marker: Path) -> str:
    return f"open({str(marker)!r}, 'w').close()"


def _global_call(module: str, name: str, *args: Any) -> bytes:
    """A protocol-2 pickle of `module.name(*args)` written by hand (the global need not be importable here)."""
    return b"\x80\x02c" + f"{module}\n{name}\n".encode() + pickle.dumps(args, 2)[2:-1] + b"R."


def payload_os_system(marker: Path) -> tuple[bytes, str]:
    return pickle.dumps(_Reduce(os.system, f"touch {marker}"), 2), f"{os.system.__module__}.system"


def payload_eval(marker: Path) -> tuple[bytes, str]:
    return pickle.dumps(_Reduce(eval, _touch_code(marker)), 2), "builtins.eval"


def payload_popen(marker: Path) -> tuple[bytes, str]:
    return pickle.dumps(_Reduce(subprocess.Popen, ["touch", str(marker)]), 2), "subprocess.Popen"


def payload_check_call(marker: Path) -> tuple[bytes, str]:
    return pickle.dumps(_Reduce(subprocess.check_call, ["touch", str(marker)]), 2), "subprocess.check_call"


def payload_nested_pickle(marker: Path) -> tuple[bytes, str]:
    inner = pickle.dumps(_Reduce(eval, _touch_code(marker)), 2)
    return pickle.dumps(_Reduce(pickle.loads, inner), 2), "pickle.loads"


def payload_torch_load_from_bytes(marker: Path) -> tuple[bytes, str]:
    """`torch.storage._load_from_bytes` runs an unrestricted `torch.load` on its argument."""
    inner = pickle.dumps(_Reduce(eval, _touch_code(marker)), 2)
    return _global_call("torch.storage", "_load_from_bytes", inner), "torch.storage._load_from_bytes"


def payload_protocol0_text(marker: Path) -> tuple[bytes, str]:
    return f"cos\nsystem\n(S'touch {marker}'\ntR.".encode(), "os.system"


PAYLOADS = {
    "os_system": payload_os_system,
    "eval": payload_eval,
    "popen": payload_popen,
    "check_call": payload_check_call,
    "nested_pickle": payload_nested_pickle,
    "torch_load_from_bytes": payload_torch_load_from_bytes,
    "protocol0_text": payload_protocol0_text,
}


# --------------------------------------------------------------------------- framings


def legacy_bytes(*pickles: bytes) -> bytes:
    """Torch's legacy format: magic number, protocol, sys_info, then `pickles` (main pickle, storage keys, ...)."""
    head = pickle.dumps(LEGACY_MAGIC, 2) + pickle.dumps(1001, 2) + pickle.dumps(LEGACY_SYS_INFO, 2)
    return head + b"".join(pickles)


def _body(obj: Any) -> bytes:
    """The opcodes that push `obj` (its protocol-2 pickle without PROTO and STOP)."""
    return pickle.dumps(obj, 2)[2:-1]


def tensor_pickle(key: str, numel: int) -> bytes:
    """A zip-format data.pkl of one float32 tensor of `numel` elements in storage `key`, written by hand."""
    storage = b"(" + _body("storage") + b"ctorch\nFloatStorage\n" + _body(key) + _body("cpu") + _body(numel) + b"tQ"
    args = _body(0) + _body((numel,)) + _body((1,)) + _body(False) + b"ccollections\nOrderedDict\n)R"
    return b"\x80\x02}" + _body("w") + b"ctorch._utils\n_rebuild_tensor_v2\n(" + storage + args + b"tRs."


def frame_plain(payload: bytes) -> bytes:
    return payload


def frame_legacy_protocol(payload: bytes) -> bytes:
    return pickle.dumps(LEGACY_MAGIC, 2) + payload


def frame_legacy_sys_info(payload: bytes) -> bytes:
    return pickle.dumps(LEGACY_MAGIC, 2) + pickle.dumps(1001, 2) + payload


def frame_legacy_main(payload: bytes) -> bytes:
    return legacy_bytes(payload, pickle.dumps([], 2))


def frame_legacy_storage_keys(payload: bytes) -> bytes:
    return legacy_bytes(pickle.dumps({"epoch": 3}, 2), payload)


def zip_bytes(data_pkl: bytes, *, extra: dict[str, bytes] | None = None, with_data_pkl: bool = True) -> bytes:
    """Torch's zip format: `archive/data.pkl`, `archive/byteorder`, `archive/version`, `archive/data/<key>`."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        if with_data_pkl:
            z.writestr("archive/data.pkl", data_pkl)
        z.writestr("archive/byteorder", "little")
        for name, data in (extra or {}).items():
            z.writestr(f"archive/{name}", data)
        z.writestr("archive/version", "3\n")
    return buf.getvalue()


def frame_zip(payload: bytes) -> bytes:
    return zip_bytes(payload)


FRAMINGS = {  # name: (suffix, framing)
    "plain": (".pth", frame_plain),
    "legacy_protocol": (".pth.tar", frame_legacy_protocol),
    "legacy_sys_info": (".pth.tar", frame_legacy_sys_info),
    "legacy_main": (".pth.tar", frame_legacy_main),
    "legacy_storage_keys": (".pth.tar", frame_legacy_storage_keys),
    "zip_data_pkl": (".pth", frame_zip),
}

# A second pickle after the ones a reader expects: never unpickled; refused where torch.save writes
# nothing, and a plain pickle is not a checkpoint whatever follows it.
LATE = {  # name: (suffix, framing, what the message says)
    "zip_second_pickle": (".pth", lambda p: zip_bytes(pickle.dumps({"epoch": 3}, 2) + p), "refused to load"),
    "legacy_after_storages": (
        ".pth.tar", lambda p: legacy_bytes(pickle.dumps({"epoch": 3}, 2), pickle.dumps([], 2)) + p, "refused to load"),
    "plain_after_data": (".pth", lambda p: pickle.dumps({"epoch": 3}, 2) + p, "not a PyTorch checkpoint"),
}


# --------------------------------------------------------------------------- backends


BACKENDS = ["numpy", "auto", "auto_without_torch", "torch"]


def read_with(backend: str, path: Path, monkeypatch) -> Any:
    """`read_torch_file` with `backend`; "auto_without_torch" hides torch as if it were not installed."""
    if backend in ("auto", "torch") and torch is None:
        pytest.skip("PyTorch is not installed: the torch-installed path cannot be exercised")
    if backend == "auto_without_torch":
        monkeypatch.setitem(sys.modules, "torch", None)
        backend = "auto"
    return TP.read_torch_file(path, backend=backend)


def assert_one_line_error(err: BaseException, path: Path, *needles: str) -> str:
    text = str(err)
    assert "\n" not in text.strip(), text
    assert str(path) in text, text
    for needle in needles:
        assert needle in text, (needle, text)
    return text


def assert_untouched(marker: Path, wait: float = 0.0) -> None:
    """The payload did not run: its marker file does not exist (after `wait` seconds, for a Popen'ed `touch`)."""
    time.sleep(wait)
    assert not marker.exists(), f"the payload ran: {marker} was created"


# --------------------------------------------------------------------------- payload tests


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("framing", list(FRAMINGS))
@pytest.mark.parametrize("payload", list(PAYLOADS))
def test_payload_is_refused_and_does_not_run(payload, framing, backend, tmp_path, monkeypatch):
    marker = tmp_path / "PWNED"
    data, refused = PAYLOADS[payload](marker)
    suffix, frame = FRAMINGS[framing]
    path = tmp_path / f"evil{suffix}"
    path.write_bytes(frame(data))
    with pytest.raises(TP.WeightImportError) as e:
        read_with(backend, path, monkeypatch)
    assert_untouched(marker, wait=0.2 if payload == "popen" else 0.0)
    assert_one_line_error(e.value, path, "refused to load", refused, "allow-list")
    assert isinstance(e.value, TP.UnsafeCheckpointError)


@pytest.mark.parametrize("backend", ["numpy", "auto", "auto_without_torch"])
@pytest.mark.parametrize("late", list(LATE))
def test_a_late_pickle_is_refused_and_does_not_run(late, backend, tmp_path, monkeypatch):
    marker = tmp_path / "PWNED"
    data, _ = payload_os_system(marker)
    suffix, frame, needle = LATE[late]
    path = tmp_path / f"late{suffix}"
    path.write_bytes(frame(data))
    with pytest.raises(TP.WeightImportError) as e:
        read_with(backend, path, monkeypatch)
    assert_untouched(marker)
    assert_one_line_error(e.value, path, needle)


@pytest.mark.parametrize("backend", ["numpy", "auto", "auto_without_torch"])
@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_persistent_ids_other_than_storages_are_refused(legacy, backend, tmp_path, monkeypatch):
    marker = tmp_path / "PWNED"
    target = object()

    class P(pickle.Pickler):
        def persistent_id(self, obj):
            # torch.save of a whole nn.Module (pre-1.0) stored source code under a "module" persistent id
            return ("module", "os", f"touch {marker}", "import os") if obj is target else None

    buf = io.BytesIO()
    P(buf, protocol=2).dump({"model": target})
    path = tmp_path / ("pid.pth.tar" if legacy else "pid.pth")
    path.write_bytes(legacy_bytes(buf.getvalue(), pickle.dumps([], 2)) if legacy else zip_bytes(buf.getvalue()))
    with pytest.raises(TP.WeightImportError) as e:
        read_with(backend, path, monkeypatch)
    assert_untouched(marker)
    assert_one_line_error(e.value, path, "refused to load", "persistent id")


_BUILD_CASES = {  # name: (pickle, the refusal's needle or None when it loads)
    # bytearray() then BUILD {"evil": 1}: plain pickle would set attributes (or call __setstate__) of any object
    "bytearray": (b"\x80\x02c__builtin__\nbytearray\n)R}U\x04evilK\x01sb.", "bytearray"),
    # a state dict's attributes may not shadow OrderedDict's own (here `items`, as builtins.set)
    "ordered_dict_items": (b"\x80\x02ccollections\nOrderedDict\n)R}U\x05itemsc__builtin__\nset\nsb.", "items"),
    # what torch.save writes for a state dict: OrderedDict() with a `_metadata` attribute
    "ordered_dict_metadata": (b"\x80\x02ccollections\nOrderedDict\n)R}U\t_metadata}sb.", None),
}


@pytest.mark.parametrize("backend", ["numpy", "auto"])
@pytest.mark.parametrize("case", list(_BUILD_CASES))
def test_object_state_is_set_only_on_an_ordered_dict(case, backend, tmp_path, monkeypatch):
    data, needle = _BUILD_CASES[case]
    path = tmp_path / "build.pth"
    path.write_bytes(zip_bytes(data))
    if needle is None:
        out = read_with(backend, path, monkeypatch)
        assert type(out) is collections.OrderedDict and out._metadata == {}
        return
    with pytest.raises(TP.WeightImportError) as e:
        read_with(backend, path, monkeypatch)
    assert_one_line_error(e.value, path, "refused to load", needle)


@pytest.mark.parametrize("encoding", ["latin1", "zlib_codec"])
def test_bytes_decode_only_as_latin1(encoding, tmp_path, monkeypatch):
    """Protocol 2 stores bytes as `_codecs.encode(text, 'latin1')`; no other codec runs."""
    text = "\x00\xff ab"
    data = b"\x80\x02}X\x01\x00\x00\x00bc_codecs\nencode\n" + pickle.dumps((text, encoding), 2)[2:-1] + b"Rs."
    path = tmp_path / "bytes.pth"
    path.write_bytes(zip_bytes(data))
    if encoding == "latin1":
        assert read_with("numpy", path, monkeypatch) == {"b": text.encode("latin1")}
        return
    with pytest.raises(TP.WeightImportError) as e:
        read_with("numpy", path, monkeypatch)
    assert_one_line_error(e.value, path, "refused to load", "_codecs.encode", encoding)


def test_a_hand_written_checkpoint_reads_without_torch(tmp_path, monkeypatch):
    """The builders above write what torch writes: a well-formed file loads (so the refusals are not vacuous)."""
    path = tmp_path / "ok.pth"
    path.write_bytes(zip_bytes(tensor_pickle("0", 4), extra={"data/0": np.arange(4, dtype="<f4").tobytes()}))
    out = read_with("auto_without_torch", path, monkeypatch)
    assert list(out) == ["w"] and out["w"].dtype == np.float32 and np.array_equal(out["w"], np.arange(4))
    legacy = tmp_path / "ok.pth.tar"
    legacy.write_bytes(legacy_bytes(pickle.dumps({"epoch": 3}, 2), pickle.dumps([], 2)))
    assert read_with("auto_without_torch", legacy, monkeypatch) == {"epoch": 3}


def test_the_allow_list_is_exactly_what_a_checkpoint_needs():
    from l2t_jax.io import torch_pickle

    storages = {f"torch.{t}Storage" for t in (
        "Float", "Double", "Half", "BFloat16", "Long", "Int", "Short", "Char", "Byte", "Bool", "ComplexFloat",
        "ComplexDouble", "Untyped")}
    dtypes = {f"torch.{d}" for d in (
        "float32", "float", "float64", "double", "float16", "half", "bfloat16", "int64", "long", "int32", "int",
        "int16", "short", "int8", "uint8", "bool", "complex64", "complex128")}
    expected = storages | dtypes | {
        "torch._utils._rebuild_tensor",
        "torch._utils._rebuild_tensor_v2",
        "torch._utils._rebuild_parameter",
        "torch._utils._rebuild_parameter_with_state",
        "torch._tensor._rebuild_from_type_v2",
        "torch.nn.parameter.Parameter",
        "torch.Tensor",
        "torch.Size",
        "collections.OrderedDict",
        "builtins.set",
        "builtins.frozenset",
        "builtins.slice",
        "builtins.complex",
        "builtins.bytes",
        "builtins.bytearray",
        "_codecs.encode",
    }
    assert set(torch_pickle.ALLOWED_GLOBALS) == expected
    # Python 2 pickles name builtins `__builtin__`; they map onto the same entries.
    assert torch_pickle.RestrictedUnpickler(io.BytesIO(b"")).find_class("__builtin__", "set") is set


def test_public_loaders_refuse_payloads(tmp_path):
    marker = tmp_path / "PWNED"
    data, refused = payload_eval(marker)
    path = tmp_path / "evil.pth.tar"
    path.write_bytes(frame_legacy_main(data))
    for load in (TL.load_pretrained, WF.load_weights):
        with pytest.raises(TP.WeightImportError) as e:
            load(path, "resnet32")
        assert_one_line_error(e.value, path, "refused to load", refused)
    with pytest.raises(TP.WeightImportError):
        RR.load_reference_run(path, target_model="vgg9_bn", num_classes=10, pairs="0-0",
                             source_tap_channels=[64], target_tap_channels=[64])
    assert_untouched(marker)


# --------------------------------------------------------------------------- equal to torch.load on real files


def _torch_tree(obj: Any) -> Any:
    """torch.load output with tensors as (numpy array, alias identity)."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), str(t.dtype))
        return ("tensor", t.numpy(), ident)
    if isinstance(obj, dict):
        return type(obj)((k, _torch_tree(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_torch_tree(v) for v in obj)
    return obj


def _assert_identical(ours: Any, theirs: Any, where: str, aliases: tuple[dict, dict]) -> None:
    if isinstance(theirs, tuple) and len(theirs) == 3 and theirs[0] == "tensor":
        ref, ident = theirs[1], theirs[2]
        assert isinstance(ours, np.ndarray), where
        assert ours.dtype == ref.dtype and ours.shape == ref.shape, (where, ours.dtype, ref.dtype, ours.shape, ref.shape)
        assert np.ascontiguousarray(ours).tobytes() == np.ascontiguousarray(ref).tobytes(), where  # bit for bit
        if ours.nbytes:
            aliases[0].setdefault(RR._view_identity(ours), []).append(where)
            aliases[1].setdefault(ident, []).append(where)
        return
    assert type(ours) is type(theirs), (where, type(ours), type(theirs))
    if isinstance(theirs, dict):
        assert list(ours) == list(theirs), where  # same keys in the same order
        for k in theirs:
            _assert_identical(ours[k], theirs[k], f"{where}/{k}", aliases)
    elif isinstance(theirs, (list, tuple)):
        assert len(ours) == len(theirs), where
        for i, (a, b) in enumerate(zip(ours, theirs)):
            _assert_identical(a, b, f"{where}/{i}", aliases)
    else:
        assert ours == theirs or (ours != ours and theirs != theirs), (where, ours, theirs)


@needs_torch
@pytest.mark.parametrize("rel", SHARED_TORCH_FILES)
def test_restricted_reader_equals_torch_load_on_shared_files(rel, monkeypatch):
    path = require_shared(rel)
    theirs = _torch_tree(torch.load(path, map_location="cpu", weights_only=True))

    def no_torch_load(*args, **kwargs):
        raise AssertionError("backend='auto' must read with the restricted reader, not torch.load")

    monkeypatch.setattr(torch, "load", no_torch_load)
    ours = TP.read_torch_file(path)  # backend="auto", torch installed: the path users hit
    aliases: tuple[dict, dict] = ({}, {})
    _assert_identical(ours, theirs, rel, aliases)
    assert sorted(map(sorted, aliases[0].values())) == sorted(map(sorted, aliases[1].values()))


# --------------------------------------------------------------------------- bad files, one clear error


def _torch_saved(tmp_path: Path, legacy: bool) -> Path:
    if torch is None:
        pytest.skip("PyTorch is not installed: cannot write a real torch.save file to damage")
    path = tmp_path / ("real.pth.tar" if legacy else "real.pth")
    sd = collections.OrderedDict((f"layer{i}.weight", torch.arange(64 * 64, dtype=torch.float32).reshape(64, 64) + i) for i in range(4))
    torch.save({"state_dict": sd, "num_classes": 10}, path, _use_new_zipfile_serialization=not legacy)
    return path


def _bad_file(kind: str, tmp_path: Path) -> Path:
    """Writes one kind of unusable weights file; returns its path."""
    rng = random.Random(0)
    if kind == "text":
        path = tmp_path / "notes.pth"
        path.write_text("these are not weights\njust text\n")
    elif kind == "head_1000_shared_pth_tar":
        path = tmp_path / "head.pth.tar"
        path.write_bytes(require_shared("reference/tinyimagenet-resnet32.pth.tar").read_bytes()[:1000])
    elif kind == "head_1000_legacy":
        path = tmp_path / "head_legacy.pth.tar"
        path.write_bytes(_torch_saved(tmp_path, legacy=True).read_bytes()[:1000])
    elif kind == "truncated_zip":
        full = _torch_saved(tmp_path, legacy=False).read_bytes()
        path = tmp_path / "truncated.pth"
        path.write_bytes(full[: len(full) // 2])
    elif kind == "truncated_storage_legacy":
        full = _torch_saved(tmp_path, legacy=True).read_bytes()
        path = tmp_path / "cut.pth.tar"
        path.write_bytes(full[:-100])
    elif kind == "empty":
        path = tmp_path / "empty.pth"
        path.write_bytes(b"")
    elif kind == "directory":
        path = tmp_path / "weights_dir.pth"
        path.mkdir()
    elif kind == "random_bytes":
        path = tmp_path / "random.pth"
        path.write_bytes(bytes(rng.randrange(256) for _ in range(4096)))
    elif kind == "random_after_pickle_opcode":
        path = tmp_path / "random2.pth"
        path.write_bytes(b"\x80\x02" + bytes(rng.randrange(256) for _ in range(4096)))
    elif kind == "zip_without_data_pkl":
        path = tmp_path / "nodata.pth"
        path.write_bytes(zip_bytes(b"", with_data_pkl=False))
    elif kind == "zip_missing_storage":
        path = tmp_path / "nostorage.pth"
        path.write_bytes(zip_bytes(tensor_pickle("0", 4)))
    elif kind == "zip_short_storage":
        path = tmp_path / "shortstorage.pth"
        path.write_bytes(zip_bytes(tensor_pickle("0", 4), extra={"data/0": np.arange(3, dtype="<f4").tobytes()}))
    elif kind == "plain_data_pickle":
        path = tmp_path / "plain.pth"
        path.write_bytes(pickle.dumps({"weights": [1.0, 2.0]}, 2))
    elif kind == "random_msgpack":
        path = tmp_path / "random.msgpack"
        path.write_bytes(bytes(rng.randrange(256) for _ in range(512)))
    else:
        raise AssertionError(kind)
    return path


BAD_FILES = [
    "text", "head_1000_shared_pth_tar", "head_1000_legacy", "truncated_zip", "truncated_storage_legacy", "empty",
    "directory", "random_bytes", "random_after_pickle_opcode", "zip_without_data_pkl", "zip_missing_storage",
    "zip_short_storage", "plain_data_pickle", "random_msgpack",
]


@pytest.mark.parametrize("kind", BAD_FILES)
def test_bad_files_are_one_clear_error_from_the_loaders(kind, tmp_path):
    path = _bad_file(kind, tmp_path)
    with pytest.raises(TP.WeightImportError) as e:
        WF.load_weights(path, "resnet32")
    assert_one_line_error(e.value, path)
    assert isinstance(e.value, TP.CheckpointReadError)
    if kind != "random_msgpack":
        for backend in ("numpy", "auto", "torch") if torch is not None else ("numpy", "auto"):
            with pytest.raises(TP.CheckpointReadError) as e:
                TP.read_torch_file(path, backend=backend)
            assert_one_line_error(e.value, path, "torch.save")
        with pytest.raises(TP.CheckpointReadError):
            TL.load_pretrained(path, "resnet32")


def test_bad_file_messages_say_what_is_wrong(tmp_path):
    cases = {
        "text": "not a PyTorch checkpoint (neither torch's zip format nor its legacy format)",
        "empty": "is empty",
        "truncated_zip": "truncated or corrupt zip archive",
        "zip_without_data_pkl": "has no data.pkl",
        "head_1000_legacy": "truncated",
        "plain_data_pickle": "a pickle, but not a PyTorch checkpoint",
    }
    for kind, needle in cases.items():
        (tmp_path / kind).mkdir()
        path = _bad_file(kind, tmp_path / kind)
        with pytest.raises(TP.CheckpointReadError) as e:
            TP.read_torch_file(path)
        assert needle in str(e.value), (kind, str(e.value))


# --------------------------------------------------------------------------- the command lines


def _tiny_npz(path: Path) -> Path:
    np.savez(path, x=np.zeros((2, 32, 32, 3), np.uint8), y=np.array([0, 1]))
    return path


def _run_main(capsys, *args: str) -> tuple[int, str, str]:
    rc = ev.main(list(args))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _assert_cli_error(rc: int, out: str, err: str, *needles: str) -> None:
    assert rc == 2, (rc, err)
    assert out == "", out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, (needle, err)


@pytest.mark.parametrize("kind", BAD_FILES)
def test_evaluate_cli_bad_weights_exit_2(kind, tmp_path, capsys):
    path = _bad_file(kind, tmp_path)
    rc, out, err = _run_main(capsys, "--model=resnet32", f"--weights={path}", f"--data={_tiny_npz(tmp_path / 'x.npz')}")
    _assert_cli_error(rc, out, err, str(path))


@pytest.mark.parametrize("framing", list(FRAMINGS))
def test_evaluate_cli_payloads_exit_2(framing, tmp_path, capsys):
    marker = tmp_path / "PWNED"
    data, refused = payload_os_system(marker)
    suffix, frame = FRAMINGS[framing]
    path = tmp_path / f"payload{suffix}"
    path.write_bytes(frame(data))
    rc, out, err = _run_main(capsys, "--model=resnet32", f"--weights={path}", f"--data={_tiny_npz(tmp_path / 'x.npz')}")
    assert_untouched(marker)
    _assert_cli_error(rc, out, err, str(path), "refused to load", refused)


def test_evaluate_debug_flag_shows_the_traceback(tmp_path):
    path = _bad_file("text", tmp_path)
    with pytest.raises(TP.CheckpointReadError):
        ev.main(["--model=resnet32", f"--weights={path}", f"--data={_tiny_npz(tmp_path / 'x.npz')}", "--debug"])


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")


@pytest.mark.parametrize(
    "name, build",
    [("payload.pth", lambda m: payload_os_system(m)[0]), ("payload.pth.tar", lambda m: frame_legacy_main(payload_eval(m)[0]))],
)
def test_evaluate_subprocess_refuses_payload(name, build, tmp_path):
    """The issue's reproduction, through the real entry point (torch installed or not)."""
    marker = tmp_path / "PWNED"
    path = tmp_path / name
    path.write_bytes(build(marker))
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.evaluate", "--model=resnet32", f"--weights={path}",
         f"--data={_tiny_npz(tmp_path / 'x.npz')}"],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300,
    )
    assert_untouched(marker)
    _assert_cli_error(proc.returncode, proc.stdout, proc.stderr, str(path), "refused to load")


def test_run_cli_refuses_payload_source_weights(tmp_path):
    marker = tmp_path / "PWNED"
    path = tmp_path / "source.pth"
    path.write_bytes(frame_zip(payload_eval(marker)[0]))
    npz = write_digits_npz(tmp_path / "digits.npz")
    cfg = tmp_path / "cfg.py"
    cfg.write_text(
        "from l2t_jax.run_config import base_config\n\n\ndef get_config():\n    c = base_config()\n"
        f"    c.dataset = 'npz:{npz}'\n    c.image_size = 8\n    c.val_fraction = 0.25\n    c.batch_size = 16\n"
        "    c.target_model = 'vgg_tiny'\n    c.source_model = 'vgg_tiny'\n    c.method = 'l2t_ww'\n"
        f"    c.pairs = '1-1'\n    c.source_weights = {str(path)!r}\n    c.epochs = 1\n"
        "    c.eval_batch_size = 16\n    c.num_workers = 1\n    c.progress_bar = False\n    return c\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.run", f"--config={cfg}", f"--workdir={tmp_path / 'w'}"],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300,
    )
    assert_untouched(marker)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(path) in errors[0] and "refused to load" in errors[0], proc.stderr
