"""CIFAR-100 from the TinyImageNet ResNet32 into VGG9-bn (32 px).

The paper's 32 px setting (`run_config.tinyimagenet_transfer_config`: optimisation,
augmentation, source, method key). Reported top-1 (Table 1): scratch 67.69, LwF 69.23,
AT 67.54, LwF+AT 68.75, FM single 69.40, FM one-to-one 69.97, L2T-w single 70.27,
L2T-w one-to-one 70.02, L2T-ww 70.96.
Data: tfds "cifar100" (array_record) under --config.data_dir; 10 % of every training
class held out for validation.
"""

from l2t_jax.run_config import tinyimagenet_transfer_config


def get_config():
    return tinyimagenet_transfer_config("tfds:cifar100")
