"""Weight files, by format, and the atomic writer they share.

* `l2t_jax.io.torch_pickle`: reads files written by `torch.save` (PyTorch
  checkpoints and state dicts) with a restricted unpickler, so that no file can
  run code when it is loaded; the errors of every weights reader
  (`WeightImportError`, `CheckpointReadError`, `UnsafeCheckpointError`).
* `l2t_jax.io.torch_layout`: PyTorch state dicts of the reference's architectures
  <-> this library's variables (names and layouts), `load_pretrained`.
* `l2t_jax.io.msgpack`: this library's own format (`save_variables`,
  `load_variables`).
* `l2t_jax.io.weights_file`: `load_weights`, either format chosen by the file suffix.
* `l2t_jax.io.atomic`: atomic file writes (bytes, text, JSON).

The reference's run checkpoints are read by `l2t_jax.reference_run`.
"""
