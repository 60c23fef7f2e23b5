"""Weight import/export: a compatibility facade over the modules that now hold it.

`from l2t_jax import weights` keeps working with the names below; new code imports
from where each lives:

* `l2t_jax.io.torch_pickle`: reading `torch.save` files without running code from
  them (`read_torch_file`) and the errors (`WeightImportError`,
  `CheckpointReadError`, `UnsafeCheckpointError`).
* `l2t_jax.io.torch_layout`: PyTorch state dicts of the reference's architectures
  <-> our variables (`TorchEntry`, `torch_entries`, `variables_from_torch`,
  `variables_to_torch`, `unwrap_state_dict`, `load_pretrained`, `check_variables`).
* `l2t_jax.io.msgpack`: this library's own format (`save_variables`,
  `load_variables`).
* `l2t_jax.io.weights_file`: `load_weights`, either format chosen by the file suffix.
* `l2t_jax.reference_run`: run checkpoints of the reference's `train_l2t_ww.py`
  (`ReferenceRun`, `TorchLayout`, `load_reference_run`, `save_reference_run`).
* `l2t_jax.io.atomic`: the atomic file writers all of these use.
"""

from __future__ import annotations

from l2t_jax.io.msgpack import load_variables, save_variables
from l2t_jax.io.torch_layout import (
    TorchEntry,
    check_variables,
    load_pretrained,
    torch_entries,
    unwrap_state_dict,
    variables_from_torch,
    variables_to_torch,
)
from l2t_jax.io.torch_pickle import (
    CheckpointReadError,
    UnsafeCheckpointError,
    WeightImportError,
    read_torch_file,
)
from l2t_jax.io.weights_file import load_weights
from l2t_jax.reference_run import (
    ReferenceRun,
    TorchLayout,
    load_reference_run,
    save_reference_run,
)

__all__ = [
    "CheckpointReadError",
    "ReferenceRun",
    "TorchEntry",
    "TorchLayout",
    "UnsafeCheckpointError",
    "WeightImportError",
    "check_variables",
    "load_pretrained",
    "load_reference_run",
    "load_variables",
    "load_weights",
    "read_torch_file",
    "save_reference_run",
    "save_variables",
    "torch_entries",
    "unwrap_state_dict",
    "variables_from_torch",
    "variables_to_torch",
]
