"""Reading files this library did not write.

`l2t_jax.io.torch_pickle` reads files written by `torch.save` (PyTorch
checkpoints and state dicts) with a restricted unpickler, so that no file can
run code when it is loaded.
"""
