"""CUB-200-2011 (200 bird species) from the ImageNet ResNet34 into ResNet18 (224 px).

Paper (Table 1, 224x224 scale): source torchvision ResNet34 pretrained on ImageNet,
target ResNet18 from scratch; SGD momentum 0.9, wd 1e-4, lr 0.1 cosine over 200
epochs, batch 64; β = 0.5, T = 2, Adam 1e-4 (wd 1e-4) on φ; RandomResizedCrop(224) +
flip for training, Resize(256) + CenterCrop(224) for evaluation, ImageNet
normalisation. Reported top-1: scratch 42.15, FM single 47.60, FM one-to-one 48.93,
L2T-w single 51.95, L2T-w one-to-one 56.61, L2T-ww 65.05 (Appendix C on CUB/MIT67/Stanford40:
meta-weights instead of meta-networks --config.meta_kind=weights; the original
bilevel scheme --config.scheme=original).

The method is one key (README, "Choosing the method"): --config.method=scratch|lwf|at|
lwf_at|fm_single|fm_one_to_one|l2t_w_single|l2t_w_one_to_one|l2t_ww (all-to-all: the
reference's 16 pairs {1..4}-{1..4}; default) and the ablations l2t_ww_weights (C.1),
l2t_ww_original (C.2), l2t_ww_first_order.
Source weights: a torchvision resnet34 state dict (e.g. resnet34-333f7ec4.pth), by
default $L2T_SHARED/weights/resnet34.pth; pass --config.source_weights=PATH.
Data: tfds "caltech_birds2011" (array_record) under --config.data_dir; 10 % of every
training class held out for validation.
"""

from l2t_jax.run_config import imagenet_transfer_config


def get_config():
    # tfds default data_dir ($TFDS_DATA_DIR or ~/tensorflow_datasets) when ""
    return imagenet_transfer_config("tfds:caltech_birds2011", "")
