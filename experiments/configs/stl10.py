"""STL-10 (10 classes, 96 px resized to 32) from the TinyImageNet ResNet32 into VGG9-bn.

The paper's 32 px setting (`run_config.tinyimagenet_transfer_config`: optimisation,
augmentation, source, method key), with the 96 -> 32 resize before the pad-4 crop.
Reported top-1 (Table 1): scratch 65.18, LwF 68.64, AT 74.19, LwF+AT 75.06, FM single
75.00, FM one-to-one 76.38, L2T-w single 74.35, L2T-w one-to-one 76.42, L2T-ww 78.31.
Data: the tfds "stl10" dataset prepared as array_record under --config.data_dir
(tfds' default directory when empty); 10 % of every training class is held out
for model selection.
"""

from l2t_jax.run_config import tinyimagenet_transfer_config


def get_config():
    c = tinyimagenet_transfer_config("tfds:stl10")
    c.resize_to = 32
    return c
