"""MIT Indoor 67 (67 scene classes) from the ImageNet ResNet34 into ResNet18 (224 px).

The paper's 224 px setting (`run_config.imagenet_transfer_config`: optimisation,
augmentation, source weights, method key).
Reported top-1 (Table 1): scratch 48.91, FM single 55.15, FM one-to-one 54.88,
L2T-w single 60.41, L2T-w one-to-one 59.78, L2T-ww 64.85
(Appendix C: --config.method=l2t_ww_weights / l2t_ww_original for the C.1 / C.2 ablations).
Data: an image folder DATA/mit67/{train,test}/<class>/*.jpg (the official
TrainImages/TestImages lists), DATA = $L2T_DATA or ~/data; 10 % of every training class
held out for validation.
"""

from l2t_jax.run_config import data_path, imagenet_transfer_config


def get_config():
    return imagenet_transfer_config("folder:mit67", data_path(""))
