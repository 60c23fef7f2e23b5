"""Stanford 40 Actions (40 classes) from the ImageNet ResNet34 into ResNet18 (224 px).

The paper's 224 px setting (`run_config.imagenet_transfer_config`: optimisation,
augmentation, source weights, method key).
Reported top-1 (Table 1): scratch 36.93, FM single 42.93, FM one-to-one 44.50,
L2T-w single 46.25, L2T-w one-to-one 48.19, L2T-ww 63.08
(Appendix C: --config.method=l2t_ww_weights / l2t_ww_original for the C.1 / C.2 ablations).
Data: an image folder DATA/stanford40/{train,test}/<class>/*.jpg (the official 100-per-
class train split), DATA = $L2T_DATA or ~/data; 10 % of every training class held out
for validation.
"""

from l2t_jax.run_config import data_path, imagenet_transfer_config


def get_config():
    return imagenet_transfer_config("folder:stanford40", data_path(""))
