"""STL-10 (10 classes, 96 px resized to 32) from the TinyImageNet ResNet32 into VGG9-bn.

Paper (Table 1, 32x32 scale): source ResNet32 trained on TinyImageNet (the authors'
`tinyimagenet-resnet32.pth.tar`), target VGG9-bn from scratch; SGD momentum 0.9,
wd 1e-4, lr 0.1 with cosine annealing, 200 epochs, batch 128; β = 0.5, T = 2,
Adam 1e-4 (wd 1e-4) on the meta-networks; pad-4 random crop + flip after the 96 -> 32
resize; ImageNet normalisation. Reported top-1: scratch 65.18, FM single 75.00,
FM one-to-one 76.38, L2T-w single 74.35, L2T-w one-to-one 76.42, L2T-ww 78.31.

The method is one key (README, "Choosing the method"): --config.method=scratch|lwf|at|
lwf_at|fm_single|fm_one_to_one|l2t_w_single|l2t_w_one_to_one|l2t_ww (all-to-all: the
reference's 15 pairs 4-0 ... 14-4; default) and the ablations l2t_ww_weights,
l2t_ww_original, l2t_ww_first_order.
Data: the tfds "stl10" dataset prepared as array_record under --config.data_dir
(tfds' default directory when empty); 10 % of every training class is held out
for model selection.
"""

from l2t_jax.run_config import base_config, shared_path


def get_config():
    c = base_config()
    c.dataset = "tfds:stl10"
    c.image_size = 32
    c.resize_to = 32
    c.batch_size = 128
    c.epochs = 200
    c.method = "l2t_ww"
    c.pairs = "all_to_all"
    c.source_model = "resnet32"
    c.source_weights = shared_path("reference/tinyimagenet-resnet32.pth.tar")
    c.source_num_classes = 200
    c.target_model = "vgg9_bn"
    return c
