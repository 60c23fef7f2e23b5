"""CIFAR-100 from the TinyImageNet ResNet32 into VGG9-bn (32 px).

Paper (Table 1): source ResNet32 on TinyImageNet, target VGG9-bn; SGD momentum 0.9,
wd 1e-4, lr 0.1 cosine over 200 epochs, batch 128; β = 0.5, T = 2, Adam 1e-4 on φ;
pad-4 crop + flip, ImageNet normalisation. Reported top-1: scratch 67.69,
FM single 69.40, FM one-to-one 69.97, L2T-w single 70.27, L2T-w one-to-one 70.02,
L2T-ww 70.96.

The method is one key (README, "Choosing the method"): --config.method=scratch|lwf|at|
lwf_at|fm_single|fm_one_to_one|l2t_w_single|l2t_w_one_to_one|l2t_ww (all-to-all, default)
and the ablations l2t_ww_weights|l2t_ww_original|l2t_ww_first_order. Data: tfds "cifar100" (array_record) under
--config.data_dir; 10 % of every training class held out for validation.
"""

from l2t_jax.run_config import base_config, shared_path


def get_config():
    c = base_config()
    c.dataset = "tfds:cifar100"
    c.image_size = 32
    c.batch_size = 128
    c.epochs = 200
    c.method = "l2t_ww"
    c.pairs = "all_to_all"
    c.source_model = "resnet32"
    c.source_weights = shared_path("reference/tinyimagenet-resnet32.pth.tar")
    c.source_num_classes = 200
    c.target_model = "vgg9_bn"
    return c
