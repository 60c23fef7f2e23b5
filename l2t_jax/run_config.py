"""The configuration of one training run: its keys, their defaults, and what it resolves to.

Every experiment config (`experiments/configs/*.py`) starts from `base_config()`
and overrides what its task needs. `resolve(config)` checks it and returns the frozen
`RunSpec` (the step's `BilevelConfig`, the sources, the target, the `DataSpec` and the
`Schedule`): the only reading of a config; the loop and the tools take the `RunSpec`.
The keys, with their meaning:

Data
  dataset            "tfds:NAME" (prepared tfds dataset under data_dir), "folder:PATH"
                     (PATH/train/<class>/*, PATH/test/<class>/*), "npz:PATH" (x, y[, x_test,
                     y_test]) or the built-in "digits" (scikit-learn's 8x8 digits, offline).
  data_dir           tfds data dir and base of relative folder/npz paths ("" = none).
  classes            keep only these classes, relabelled 0..K-1 in the given order
                     ("5-9", "0,2,4"; "" = all).
  image_size         network input side (<= 64: pad-4/crop/flip pipeline, else 224-style).
  resize_to          shorter-side resize applied first (STL-10: 96 -> 32); 0 = none.
  val_fraction       fraction of every training class held out for model selection.
  n_per_class        limited-data regime: training images kept per class, drawn from the
                     training part after the validation split (0 = all).
  num_workers        image decoding / augmentation threads.
  offline            never download (tfds datasets must be prepared already).
Schedule
  seed, epochs, batch_size, drop_last (drop the last partial batch; the reference keeps it),
  lr (0.1, cosine-annealed per epoch), momentum (0.9), wd (1e-4), nesterov (unsupported,
  must stay False as in the reference).
Transfer
  method             one key selects the method (see METHOD_SPECS):
                       scratch; lwf (distillation through an extra head for the source's
                       classes); at (attention transfer on `at_pairs`); lwf_at;
                       fm / l2t_w / l2t_ww on `pairs`; fm_single, fm_one_to_one,
                       l2t_w_single, l2t_w_one_to_one (pairs fixed by the name);
                       l2t_ww_weights (Appendix C.1 meta-weights), l2t_ww_original
                       (C.2 original bilevel scheme), l2t_ww_first_order.
                       A name that fixes pairs, scheme or meta_kind refuses an explicit
                       value that contradicts it (ConfigError); leave those keys "" (the
                       default: "the method's own") or give the fixed value. A name with
                       LwF / AT refuses lwf_weight = 0 / at_beta = 0 / no at_pairs. Keys a
                       method does not use (pairs for scratch, lwf_weight for fm, ...) stay
                       free, so one sweep can share them across methods. `validate` writes
                       the effective values of pairs, scheme and meta_kind into the config,
                       so config.json names what ran.
  pairs              "all_to_all" | "one_to_one" | "single" | "m-n,m-n,..."; "" = the
                     method's own (all_to_all unless the name fixes it).
  at_pairs, at_beta  AT's pairs ("one_to_one": every source stage end -> the target's of the
                     same size) and β (1000, the AT paper's).
  lwf_weight, lwf_temperature  LwF's distillation weight (1) and temperature (2).
  extra_sources      multi-source transfer: more sources beside source_model, as
                     "MODEL:WEIGHTS[:PAIRS[:NUM_CLASSES]]" entries separated by ";" (PAIRS
                     in that source's own tap indices or a named configuration; default:
                     `pairs`). Each source gets its own branch convs and meta-networks
                     (one per pair); the matching losses add up. Matching methods only.
  beta (0.5), lambda_type ("relu6"), lambda_init (1.0), meta_kind ("network" | "weights";
  "" = the method's own: network unless the name fixes it), meta_lr (1e-4), meta_wd (1e-4),
  T (2), scheme ("proposed" | "original" | "first_order"; "" = the method's own: proposed
  unless the name fixes it),
  bn_updates ("reference" | "single"), remat (rematerialise the look-ahead steps: less
  memory, ~10 % more time), unroll (True: the look-ahead steps as straight-line code when
  remat is off; faster, longer compile for large T). remat and unroll change no numbers:
  a run may resume with either changed. hvp ("reverse" | "mixed"): how the meta-gradient
  differentiates each look-ahead step's gradient (`bilevel.inner_value_and_grad`; "mixed"
  keeps no inner backward residuals; the same numbers up to rounding). cpu_scheduler
  ("auto" | "concurrency" | "memory"): XLA CPU's instruction order for the whole process,
  set by `experiments.run` before JAX starts (`l2t_jax.xla_flags`; "auto": depth-first
  "memory" in mixed mode, fewer temporaries; XLA's default otherwise). It changes no
  numbers: a run may resume with it changed.
Models
  source_model, source_weights (.pth/.pth.tar/.msgpack), source_num_classes (0 = from the
  weights), target_model, target_weights (optional initialisation; a classifier of another
  size is re-initialised), conv_impl ("auto" | "xla" | "im2col" | "im2col_single" |
  "im2col_loop"; "auto": im2col on CPU, "im2col_loop" there in mixed mode, XLA's elsewhere).
Run
  data_parallel      "" (one device) | "sync" | "local": the training step data-parallel
                     over this process's devices (`l2t_jax.parallel`; the batch split across
                     them, gradients and meta-gradients averaged). "sync": BN statistics
                     over the whole batch (the same numbers as one device); "local": per
                     device. batch_size (and the last batch, unless drop_last) must divide
                     among the devices. Several hosts: `parallel.make_parallel_train_step`.
  eval_batch_size, log_every (steps between metric fetches/log lines),
  checkpoint_every_epochs, max_checkpoints, progress_bar.
  eval_every_epochs  evaluate every k epochs and after the last (1: every epoch). Only
                     evaluated epochs can become the best-validation epoch.
  test_eval          "each_eval": the test split at every evaluation; "on_improvement":
                     only when validation accuracy improves (what the best-validation
                     protocol reports) and after the last epoch; "at_end": after the last
                     epoch only, for the final weights and for the best-validation epoch's
                     (best_weights.msgpack): the same two figures at two test passes per
                     run. None changes training.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Collection
from pathlib import Path
from typing import Optional

import ml_collections

from l2t_jax import transfer
from l2t_jax.bilevel import BN_UPDATES, HVP_MODES, SCHEMES, BilevelConfig
from l2t_jax.data import BUILTIN_DATASETS, DatasetSpec, parse_dataset
from l2t_jax.models import available_models, model_info
from l2t_jax.models.layers import CONV_IMPLS
from l2t_jax.parallel import BN_MODES
from l2t_jax.transfer import MatchingConfig
from l2t_jax.xla_flags import CPU_SCHEDULERS

#: config.data_parallel: "" (off), or one of `parallel.BN_MODES`
DATA_PARALLEL = ("",) + BN_MODES
# Keys a resumed run may change (they do not affect the numbers).
RESUME_MUTABLE_KEYS = frozenset({"progress_bar", "num_workers", "offline", "remat", "unroll", "eval_batch_size",
                                 "cpu_scheduler"})
#: config.test_eval
TEST_EVAL = ("each_eval", "on_improvement", "at_end")


class ConfigError(ValueError):
    """A configuration that cannot run (reported before any training)."""


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """What one `config.method` value means.

    Attributes:
      matching: the matching method ("scratch" | "fm" | "l2t_w" | "l2t_ww").
      pairs: the pair configuration the name fixes (None: `config.pairs`).
      meta_kind, scheme: what the name fixes (None: the config's).
      lwf, at: the LwF / AT baseline terms are on.
    """

    matching: str
    pairs: Optional[str] = None
    meta_kind: Optional[str] = None
    scheme: Optional[str] = None
    lwf: bool = False
    at: bool = False


METHOD_SPECS: dict[str, MethodSpec] = {
    "scratch": MethodSpec("scratch"),
    "lwf": MethodSpec("scratch", lwf=True),
    "at": MethodSpec("scratch", at=True),
    "lwf_at": MethodSpec("scratch", lwf=True, at=True),
    "fm": MethodSpec("fm"),
    "fm_single": MethodSpec("fm", pairs="single"),
    "fm_one_to_one": MethodSpec("fm", pairs="one_to_one"),
    "l2t_w": MethodSpec("l2t_w"),
    "l2t_w_single": MethodSpec("l2t_w", pairs="single"),
    "l2t_w_one_to_one": MethodSpec("l2t_w", pairs="one_to_one"),
    "l2t_ww": MethodSpec("l2t_ww"),
    "l2t_ww_weights": MethodSpec("l2t_ww", meta_kind="weights"),
    "l2t_ww_original": MethodSpec("l2t_ww", scheme="original"),
    "l2t_ww_first_order": MethodSpec("l2t_ww", scheme="first_order"),
}
METHODS = tuple(METHOD_SPECS)
#: The keys a method name may fix (`MethodSpec` fields of the same names), each with the value
#: that "" (the default: "the method's own") stands for when the name does not fix it.
METHOD_KEY_DEFAULTS: dict[str, str] = {"pairs": "all_to_all", "scheme": "proposed", "meta_kind": "network"}


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """One source network of a run: registry name, weights file, classes (0 = from the weights), pairs spec."""

    model: str
    weights: str
    num_classes: int
    pairs: str


@dataclasses.dataclass(frozen=True)
class ResolvedMethod:
    """A config's method, resolved.

    Attributes:
      name: config.method.
      matching: the matching method; pairs: its pairs over the concatenated source taps.
      meta_kind, scheme: effective values.
      at_pairs: AT's pairs (first source), () when off; lwf_weight: 0 when off.
      sources: the source networks (empty for scratch).
    """

    name: str
    matching: str
    pairs: tuple[tuple[int, int], ...]
    meta_kind: str
    scheme: str
    at_pairs: tuple[tuple[int, int], ...]
    lwf_weight: float
    sources: tuple[SourceSpec, ...]


def base_config() -> ml_collections.ConfigDict:
    """Every key of a run with the reference's defaults (ResNet34 ImageNet -> ResNet18, CUB-like)."""
    c = ml_collections.ConfigDict()
    # data
    c.dataset = ""
    c.data_dir = ""
    c.classes = ""
    c.image_size = 224
    c.resize_to = 0
    c.val_fraction = 0.1
    c.n_per_class = 0
    c.num_workers = 4
    c.offline = True
    # schedule
    c.seed = 0
    c.epochs = 200
    c.batch_size = 64
    c.drop_last = False
    c.lr = 0.1
    c.momentum = 0.9
    c.wd = 1e-4
    c.nesterov = False
    # transfer
    c.method = "l2t_ww"
    c.pairs = ""  # the method's own (METHOD_KEY_DEFAULTS)
    c.at_pairs = "one_to_one"
    c.at_beta = 1000.0
    c.lwf_weight = 1.0
    c.lwf_temperature = 2.0
    c.extra_sources = ""
    c.beta = 0.5
    c.lambda_type = "relu6"
    c.lambda_init = 1.0
    c.meta_kind = ""  # the method's own
    c.meta_lr = 1e-4
    c.meta_wd = 1e-4
    c.T = 2
    c.scheme = ""  # the method's own
    c.bn_updates = "reference"
    c.remat = False
    c.unroll = True
    c.hvp = "reverse"
    c.cpu_scheduler = "auto"
    # models
    c.source_model = "resnet34"
    c.source_weights = ""
    c.source_num_classes = 0
    c.target_model = "resnet18"
    c.target_weights = ""
    c.conv_impl = "auto"
    # run
    c.eval_batch_size = 256
    c.eval_every_epochs = 1
    c.test_eval = "each_eval"
    c.log_every = 20
    c.checkpoint_every_epochs = 1
    c.max_checkpoints = 2
    c.progress_bar = True
    c.data_parallel = ""
    return c



def tinyimagenet_transfer_config(dataset: str, data_dir: str = "") -> ml_collections.ConfigDict:
    """The paper's 32 px setting: the authors' TinyImageNet ResNet32 -> VGG9-bn, batch 128, 200 epochs.

    SGD momentum 0.9, wd 1e-4, lr 0.1 cosine-annealed; β = 0.5, T = 2, Adam 1e-4 (wd 1e-4)
    on φ; pad-4 random crop + flip, ImageNet normalisation. The source is the authors'
    `tinyimagenet-resnet32.pth.tar` under $L2T_SHARED/reference. The method is one key
    (README, "Choosing the method"); the default, L2T-ww all-to-all, uses the reference's
    15 pairs 4-0 ... 14-4.

    Args:
      dataset: the data source ("tfds:NAME", "folder:PATH" or "npz:PATH").
      data_dir: tfds data directory or the folder datasets' root ("" = default).
    """
    c = base_config()
    c.dataset = dataset
    c.data_dir = data_dir
    c.image_size = 32
    c.batch_size = 128
    c.epochs = 200
    c.method = "l2t_ww"  # pairs, scheme, meta_kind: the method's own (all_to_all, proposed, network)
    c.source_model = "resnet32"
    c.source_weights = shared_path("reference/tinyimagenet-resnet32.pth.tar")
    c.source_num_classes = 200
    c.target_model = "vgg9_bn"
    return c


def imagenet_transfer_config(dataset: str, data_dir: str = "") -> ml_collections.ConfigDict:
    """The paper's 224 px setting: ImageNet ResNet34 -> ResNet18, batch 64, 200 epochs, L2T-ww all-to-all.

    SGD momentum 0.9, wd 1e-4, lr 0.1 cosine-annealed; β = 0.5, T = 2, Adam 1e-4 (wd 1e-4)
    on φ; RandomResizedCrop(224) + flip for training, Resize(256) + CenterCrop(224) for
    evaluation, ImageNet normalisation. The source is a torchvision resnet34 state dict
    (e.g. resnet34-333f7ec4.pth), by default $L2T_SHARED/weights/resnet34.pth
    (--config.source_weights=PATH). The method is one key (README, "Choosing the
    method"); the default, L2T-ww all-to-all, uses the reference's 16 pairs {1..4}-{1..4}.

    Args:
      dataset: the data source ("tfds:NAME" or "folder:PATH").
      data_dir: tfds data directory or the folder datasets' root ("" = default).
    """
    c = base_config()
    c.dataset = dataset
    c.data_dir = data_dir
    c.image_size = 224
    c.batch_size = 64
    c.epochs = 200
    c.method = "l2t_ww"  # pairs, scheme, meta_kind: the method's own (all_to_all, proposed, network)
    c.source_model = "resnet34"
    c.source_weights = shared_path("weights/resnet34.pth")
    c.source_num_classes = 1000
    c.target_model = "resnet18"
    c.eval_batch_size = 128
    return c


def shared_path(rel: str) -> str:
    """`rel` under the shared artefacts folder: $L2T_SHARED, else ../shared beside the repository."""
    root = os.environ.get("L2T_SHARED") or str(Path(__file__).resolve().parents[1].parent / "shared")
    return str(Path(root).expanduser() / rel)


def data_path(rel: str) -> str:
    """`rel` under the image-folder data root: $L2T_DATA, else ~/data."""
    return str(Path(os.environ.get("L2T_DATA") or "~/data").expanduser() / rel)


def to_plain(config: ml_collections.ConfigDict) -> dict:
    """The config as plain JSON values (tuples become lists)."""
    return json.loads(json.dumps(config.to_dict()))


def normalize_record(plain: dict) -> dict:
    """A plain config (config.json, summary["config"]) with the keys its method fixes set to what ran.

    pairs / scheme / meta_kind become their effective values: the method's where its name
    fixes them, else the recorded value ("" = the default). A record written before these
    keys defaulted to "" holds the old defaults (or an ignored explicit value) for keys its
    method fixed; the run used the method's value, as here. Unknown methods are left as they are.
    """
    spec = METHOD_SPECS.get(plain.get("method"))
    if spec is None:
        return dict(plain)
    out = dict(plain)
    for key, default in METHOD_KEY_DEFAULTS.items():
        if key in out or getattr(spec, key) is not None:
            out[key] = getattr(spec, key) or out.get(key) or default
    return out


def config_differences(saved: dict, current: dict, ignore=RESUME_MUTABLE_KEYS) -> list[str]:
    """Keys whose values differ between two plain configs, as 'key: saved -> current' lines.

    The keys a method fixes are compared by what ran (`normalize_record`), so a config
    leaving them to the method ("") matches a record of the same run.
    """
    out = []
    saved, current = normalize_record(saved), normalize_record(current)
    defaults = normalize_record(to_plain(base_config()))
    for key in sorted(set(saved) | set(current)):
        if key in ignore:
            continue
        if key not in saved and key in defaults and current.get(key) == defaults[key]:
            continue  # a key added after the run started, at its default: same numbers
        a, b = saved.get(key, "<absent>"), current.get(key, "<absent>")
        if a != b:
            out.append(f"{key}: {a!r} -> {b!r}")
    return out


def parse_classes(spec: str) -> Optional[list[int]]:
    """'5-9' / '0,2,4' / '0-2,7' -> list of class ids in that order; '' -> None (all)."""
    spec = spec.replace(" ", "")
    if not spec:
        return None
    out: list[int] = []
    for item in spec.split(","):
        lo, sep, hi = item.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ConfigError(f"bad classes {spec!r}: expected e.g. '5-9' or '0,2,4'")
        out.extend(range(int(lo), int(hi) + 1) if sep else [int(lo)])
    if len(set(out)) != len(out):
        raise ConfigError(f"bad classes {spec!r}: a class is listed twice")
    return out


def _choice(config, key: str, choices) -> None:
    if config[key] not in choices:
        raise ConfigError(f"config.{key}={config[key]!r} is not one of {', '.join(map(str, choices))}")


def parse_extra_sources(spec: str, default_pairs: str) -> tuple[SourceSpec, ...]:
    """'MODEL:WEIGHTS[:PAIRS[:NUM_CLASSES]];...' -> SourceSpecs ('' -> ())."""
    out = []
    for entry in (e.strip() for e in spec.split(";")):
        if not entry:
            continue
        parts = entry.split(":")
        if len(parts) < 2 or len(parts) > 4 or not parts[0] or not parts[1]:
            raise ConfigError(
                f"config.extra_sources entry {entry!r}: expected MODEL:WEIGHTS[:PAIRS[:NUM_CLASSES]]"
            )
        pairs = parts[2] if len(parts) > 2 and parts[2] else default_pairs
        n = parts[3] if len(parts) > 3 else "0"
        if not n.isdigit():
            raise ConfigError(f"config.extra_sources entry {entry!r}: NUM_CLASSES {n!r} is not an integer")
        out.append(SourceSpec(parts[0], parts[1], int(n), pairs))
    return tuple(out)


def _resolve(spec: str, source_model: str, target_model: str, image_size: int, what: str):
    try:
        return transfer.resolve_pairs(spec, source_model, target_model, image_size)
    except ValueError as e:
        raise ConfigError(f"{what}={spec!r}: {e}") from None


def method_values(config) -> dict[str, str]:
    """The effective pairs, scheme and meta_kind of a config ({key: value}).

    A key the method's name fixes takes the fixed value; an explicit value that
    contradicts it raises ConfigError ("" and the fixed value itself are accepted).
    Other keys keep the config's value, "" standing for `METHOD_KEY_DEFAULTS`.
    """
    _choice(config, "method", METHODS)
    spec = METHOD_SPECS[config.method]
    out = {}
    for key, default in METHOD_KEY_DEFAULTS.items():
        fixed, value = getattr(spec, key), config[key]
        if fixed is not None and value not in ("", fixed):
            raise ConfigError(
                f"method {config.method!r} sets {key}={fixed!r}; config.{key}={value!r} conflicts "
                f"(leave config.{key} unset, or choose it with method {spec.matching!r})"
            )
        out[key] = fixed or value or default
    return out


def fill_method_keys(config) -> None:
    """Writes `method_values` into `config` in place: its pairs / scheme / meta_kind name what runs."""
    for key, value in method_values(config).items():
        config[key] = value


def resolve_method(config) -> ResolvedMethod:
    """What `config.method` (and the transfer keys) amount to; raises ConfigError on conflicts."""
    values = method_values(config)
    spec = METHOD_SPECS[config.method]
    scheme, meta_kind, pair_spec = values["scheme"], values["meta_kind"], values["pairs"]
    if spec.lwf and not float(config.lwf_weight) > 0.0:
        raise ConfigError(f"method {config.method!r} adds LwF; config.lwf_weight={config.lwf_weight:g} turns "
                          f"it off (choose a method without LwF instead)")
    if spec.at and not float(config.at_beta) > 0.0:
        raise ConfigError(f"method {config.method!r} adds AT; config.at_beta={config.at_beta:g} turns it off "
                          f"(choose a method without AT instead)")
    needs_source = spec.matching != "scratch" or spec.lwf or spec.at
    sources: tuple[SourceSpec, ...] = ()
    if needs_source:
        sources = (SourceSpec(config.source_model, config.source_weights, int(config.source_num_classes),
                              pair_spec),)
    extra = parse_extra_sources(config.extra_sources, pair_spec)
    if extra and spec.matching == "scratch":
        raise ConfigError(f"config.extra_sources is for matching methods (fm, l2t_w, l2t_ww, ...), not {config.method!r}")
    sources += extra
    for i, src in enumerate(sources):
        key = "source_model" if i == 0 else f"extra_sources[{i - 1}].model"
        if src.model not in available_models():
            raise ConfigError(f"config.{key}={src.model!r} is not a known model; available: {', '.join(available_models())}")
    pairs: list[tuple[int, int]] = []
    if spec.matching != "scratch":
        offset = 0
        for i, src in enumerate(sources):
            what = "config.pairs" if i == 0 else f"config.extra_sources[{i - 1}] pairs"
            got = _resolve(src.pairs, src.model, config.target_model, config.image_size, what)
            pairs.extend((m + offset, n) for m, n in got)
            offset += len(model_info(src.model).tap_channels)
        if not pairs:
            raise ConfigError(f"config.pairs={pair_spec!r} selects no pairs; method {config.method!r} matches "
                              f"at least one")
    at_pairs = ()
    if spec.at:
        at_pairs = _resolve(config.at_pairs, config.source_model, config.target_model, config.image_size,
                            "config.at_pairs")
        if not at_pairs:
            raise ConfigError(f"config.at_pairs={config.at_pairs!r} selects no pairs; method {config.method!r} "
                              f"transfers attention on at least one")
    return ResolvedMethod(
        name=config.method, matching=spec.matching, pairs=tuple(pairs), meta_kind=meta_kind, scheme=scheme,
        at_pairs=tuple(at_pairs), lwf_weight=float(config.lwf_weight) if spec.lwf else 0.0, sources=sources,
    )


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """Where a run's images come from and how its splits are drawn.

    Attributes:
      dataset: the dataset string as the config gives it; source: it parsed.
      data_dir: the base of relative paths and the tfds data dir ("" = none).
      classes: the classes kept, relabelled 0..K-1 in this order (None = all).
      image_size, resize_to: network input side; shorter-side resize first (0 = none).
      val_fraction: share of every training class held out for validation.
      n_per_class: training images kept per class after that (0 = all).
      seed: the split and shuffling seed (the run's seed).
      offline: never download; num_workers: decoding / augmentation threads.
    """

    dataset: str
    source: DatasetSpec
    data_dir: str
    classes: Optional[tuple[int, ...]]
    image_size: int
    resize_to: int
    val_fraction: float
    n_per_class: int
    seed: int
    offline: bool
    num_workers: int


@dataclasses.dataclass(frozen=True)
class TargetSpec:
    """The network being trained: registry name, optional initial weights ("" = none), conv lowering."""

    model: str
    weights: str
    conv_impl: str

    @property
    def tap_channels(self) -> tuple[int, ...]:
        return tuple(model_info(self.model).tap_channels)


@dataclasses.dataclass(frozen=True)
class Schedule:
    """How the loop runs: epochs and batches, the learning rate, evaluation, logging, checkpoints.

    lr is the initial learning rate, cosine-annealed per epoch. eval_every_epochs and
    test_eval decide when the validation and test splits are evaluated (`run_config`'s
    key list); none of these fields changes the training numbers but epochs, batch_size,
    drop_last and lr.
    """

    epochs: int
    batch_size: int
    drop_last: bool
    lr: float
    eval_batch_size: int
    eval_every_epochs: int
    test_eval: str
    log_every: int
    checkpoint_every_epochs: int
    max_checkpoints: int
    progress_bar: bool

    def evaluates(self, epoch: int) -> bool:
        """Whether the epoch that just ended (1-based `epoch`) is evaluated on validation."""
        return epoch == self.epochs or epoch % self.eval_every_epochs == 0


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One run, resolved from its config: what the loop and the tools read instead of the config.

    Attributes:
      method: the config's method name (`METHOD_SPECS`); resolved: what it amounts to.
      seed: the run's seed (initialisation, splits, shuffling, augmentation).
      bilevel: the training step's configuration (matching, look-ahead, optimisers).
      sources: the source networks (empty without transfer); target: the trained network.
      data, schedule: the data and the loop's schedule.
      lambda_init: the initial λ of the meta-networks' output.
      data_parallel: "" (one device) | `parallel.BN_MODES`.
      record: the config as plain JSON values with the keys its method fixes set to what
        runs: config.json, the checkpoints' record, and what a resume is compared with.
    """

    method: str
    resolved: ResolvedMethod
    seed: int
    bilevel: BilevelConfig
    sources: tuple[SourceSpec, ...]
    target: TargetSpec
    data: DataSpec
    schedule: Schedule
    lambda_init: float
    data_parallel: str
    record: dict = dataclasses.field(compare=False, hash=False, repr=False)

    @property
    def pairs(self) -> tuple[tuple[int, int], ...]:
        """The (source tap, target tap) matching pairs (source taps counted across the sources)."""
        return self.bilevel.matching.pairs

    @property
    def source_channels(self) -> tuple[int, ...]:
        """The channels of every source tap, the sources' taps concatenated in order."""
        return tuple(c for s in self.sources for c in model_info(s.model).tap_channels)

    def describe(self) -> str:
        """One line naming the run (for logs)."""
        names = [s.model for s in self.sources]
        src = f"{'+'.join(names)} -> " if names else ""
        return (f"{self.method} {src}{self.target.model} on {self.data.dataset} "
                f"(seed {self.seed}, {self.schedule.epochs} epochs)")


def _check_keys(config) -> None:
    missing = sorted(set(base_config().keys()) - set(config.keys()))
    if missing:
        raise ConfigError(f"config lacks key(s) {missing}; start configs from l2t_jax.run_config.base_config()")
    unknown = sorted(set(config.keys()) - set(base_config().keys()))
    if unknown:
        raise ConfigError(f"unknown config key(s) {unknown}")


def _check_values(config) -> None:
    """The checks of single keys: allowed values (each list lives with the code it configures), signs, ranges."""
    _choice(config, "method", METHODS)
    for key, choices in (("scheme", SCHEMES), ("meta_kind", transfer.META_KINDS)):
        if config[key] not in ("",) + tuple(choices):
            raise ConfigError(f"config.{key}={config[key]!r} is not one of {', '.join(choices)} "
                              f"(or '': the method's own)")
    _choice(config, "bn_updates", BN_UPDATES)
    _choice(config, "hvp", HVP_MODES)
    _choice(config, "cpu_scheduler", CPU_SCHEDULERS)
    _choice(config, "lambda_type", transfer.LAMBDA_TYPES)
    _choice(config, "conv_impl", CONV_IMPLS)
    _choice(config, "data_parallel", DATA_PARALLEL)
    _choice(config, "test_eval", TEST_EVAL)
    positive = ("epochs", "batch_size", "T", "eval_batch_size", "eval_every_epochs", "log_every", "checkpoint_every_epochs",
                "max_checkpoints", "image_size")
    for key in positive:
        if int(config[key]) < 1:
            raise ConfigError(f"config.{key} must be >= 1, got {config[key]}")
    for key in ("seed", "n_per_class", "resize_to", "source_num_classes", "num_workers"):
        if int(config[key]) < 0:
            raise ConfigError(f"config.{key} must be >= 0, got {config[key]}")
    for key in ("lr", "wd", "momentum", "meta_lr", "meta_wd", "beta", "at_beta", "lwf_weight"):
        if not float(config[key]) >= 0.0:
            raise ConfigError(f"config.{key} must be >= 0, got {config[key]}")
    if not 0.0 <= config.val_fraction < 1.0:
        raise ConfigError(f"config.val_fraction must be in [0, 1), got {config.val_fraction}")
    if config.nesterov:
        raise ConfigError("config.nesterov=True is not supported (the reference uses plain momentum SGD)")
    if not float(config.lwf_temperature) > 0.0:
        raise ConfigError(f"config.lwf_temperature must be > 0, got {config.lwf_temperature}")


def resolve_data(config) -> DataSpec:
    """The data part of `resolve` alone (for tools that need a run's images but not its weights)."""
    if not config.dataset:
        raise ConfigError("config.dataset is empty: give 'tfds:NAME', 'folder:PATH', 'npz:PATH' or 'digits'")
    try:
        source = parse_dataset(config.dataset, config.data_dir)
    except ValueError:
        raise ConfigError(
            f"config.dataset={config.dataset!r}: unknown source; use 'tfds:NAME', 'folder:PATH', 'npz:PATH' "
            f"or a built-in ({', '.join(BUILTIN_DATASETS)})"
        ) from None
    if source.path is not None and not source.path.exists():
        raise FileNotFoundError(f"config.dataset={config.dataset!r}: {source.path} does not exist")
    classes = parse_classes(config.classes)
    return DataSpec(
        dataset=config.dataset, source=source, data_dir=config.data_dir, classes=None if classes is None else tuple(classes),
        image_size=int(config.image_size), resize_to=int(config.resize_to), val_fraction=float(config.val_fraction),
        n_per_class=int(config.n_per_class), seed=int(config.seed), offline=bool(config.offline),
        num_workers=int(config.num_workers),
    )


def _check_models(config, resolved: ResolvedMethod, pending: Collection[str]) -> None:
    info = model_info(config.target_model)
    if info.family == "cifar_resnet" and config.image_size != 32:
        raise ConfigError(
            f"config.target_model={config.target_model} takes 32 px images, image_size={config.image_size}"
        )
    for i, src in enumerate(resolved.sources):
        key = "config.source_model" if i == 0 else f"config.extra_sources[{i - 1}]"
        wkey = "config.source_weights" if i == 0 else f"config.extra_sources[{i - 1}] weights"
        if model_info(src.model).family == "cifar_resnet" and config.image_size != 32:
            raise ConfigError(f"{key}={src.model} takes 32 px images, image_size={config.image_size}")
        if not src.weights:
            raise ConfigError(f"method {config.method!r} needs {wkey} (a .pth/.pth.tar/.msgpack file)")
        if src.weights not in pending and not os.path.isfile(os.path.expanduser(src.weights)):
            raise FileNotFoundError(f"{wkey}: weights file not found: {src.weights}")
    if config.target_weights and not os.path.isfile(os.path.expanduser(config.target_weights)):
        raise FileNotFoundError(f"config.target_weights: weights file not found: {config.target_weights}")


def resolve(config: ml_collections.ConfigDict, *, pending: Collection[str] = ()) -> RunSpec:
    """The run a config describes, checked as far as it can be without loading data or weights.

    The one place a config is read: everything downstream (the loop, the tools) takes
    the `RunSpec`. The config itself is left unchanged; `RunSpec.record` is its plain
    copy with the method's effective pairs / scheme / meta_kind, so config.json names
    what runs.

    Args:
      config: the run's config (`base_config()` and overrides).
      pending: weights files that an earlier stage of the same command will write
        (the quickstart's source): not required to exist yet.

    Raises:
      ConfigError (or FileNotFoundError for a missing data / weights path), with a
      message naming the key.
    """
    _check_keys(config)
    _check_values(config)
    data = resolve_data(config)
    if config.target_model not in available_models():
        raise ConfigError(
            f"config.target_model={config.target_model!r} is not a known model; "
            f"available: {', '.join(available_models())}"
        )
    resolved = resolve_method(config)
    _check_models(config, resolved, pending)
    bilevel_config = BilevelConfig(
        matching=MatchingConfig(
            pairs=resolved.pairs, method=resolved.matching, beta=config.beta,
            lambda_type=config.lambda_type, meta_kind=resolved.meta_kind,
        ),
        T=config.T, scheme=resolved.scheme, momentum=config.momentum, weight_decay=config.wd,
        meta_lr=config.meta_lr, meta_weight_decay=config.meta_wd, bn_updates=config.bn_updates,
        remat=config.remat, unroll=config.unroll, hvp=config.hvp, lwf_weight=resolved.lwf_weight,
        lwf_temperature=config.lwf_temperature, at_pairs=resolved.at_pairs, at_beta=config.at_beta,
    )
    schedule = Schedule(
        epochs=int(config.epochs), batch_size=int(config.batch_size), drop_last=bool(config.drop_last),
        lr=config.lr, eval_batch_size=int(config.eval_batch_size), eval_every_epochs=int(config.eval_every_epochs),
        test_eval=config.test_eval, log_every=int(config.log_every),
        checkpoint_every_epochs=int(config.checkpoint_every_epochs), max_checkpoints=int(config.max_checkpoints),
        progress_bar=bool(config.progress_bar),
    )
    record = to_plain(config)
    record.update(method_values(config))
    return RunSpec(
        method=config.method, resolved=resolved, seed=int(config.seed), bilevel=bilevel_config,
        sources=resolved.sources, target=TargetSpec(config.target_model, config.target_weights, config.conv_impl),
        data=data, schedule=schedule, lambda_init=config.lambda_init, data_parallel=config.data_parallel,
        record=record,
    )


def validate(config: ml_collections.ConfigDict, *, pending: Collection[str] = ()) -> tuple[tuple[int, int], ...]:
    """`resolve`'s checks, for code that holds a config: returns the pairs and fills the method's keys in.

    On success the effective pairs / scheme / meta_kind are written into `config`
    (`fill_method_keys`), so the config names what runs.
    """
    spec = resolve(config, pending=pending)
    fill_method_keys(config)
    return spec.pairs
