"""MIT Indoor 67 (67 scene classes) from the ImageNet ResNet34 into ResNet18 (224 px).

Paper (Table 1, 224x224 scale): source torchvision ResNet34 pretrained on ImageNet,
target ResNet18 from scratch; SGD momentum 0.9, wd 1e-4, lr 0.1 cosine over 200
epochs, batch 64; β = 0.5, T = 2, Adam 1e-4 (wd 1e-4) on φ; RandomResizedCrop(224) +
flip for training, Resize(256) + CenterCrop(224) for evaluation, ImageNet
normalisation. Reported top-1: scratch 48.91, FM single 55.15, FM one-to-one 54.88,
L2T-w single 60.41, L2T-w one-to-one 59.78, L2T-ww 64.85 (Appendix C on CUB/MIT67/Stanford40:
meta-weights instead of meta-networks --config.meta_kind=weights; the original
bilevel scheme --config.scheme=original).

The method is one key (README, "Choosing the method"): --config.method=scratch|lwf|at|
lwf_at|fm_single|fm_one_to_one|l2t_w_single|l2t_w_one_to_one|l2t_ww (all-to-all: the
reference's 16 pairs {1..4}-{1..4}; default) and the ablations l2t_ww_weights (C.1),
l2t_ww_original (C.2), l2t_ww_first_order.
Source weights: a torchvision resnet34 state dict (e.g. resnet34-333f7ec4.pth), by
default $L2T_SHARED/weights/resnet34.pth; pass --config.source_weights=PATH.
Data: an image folder DATA/mit67/{train,test}/<class>/*.jpg (the official
TrainImages/TestImages lists), DATA = $L2T_DATA or ~/data; 10 % of every training class
held out for validation.
"""

from l2t_jax.run_config import data_path, imagenet_transfer_config


def get_config():
    return imagenet_transfer_config("folder:mit67", data_path(""))
