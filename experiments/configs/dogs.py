"""Stanford Dogs (120 breeds) from the ImageNet ResNet34 into ResNet18 (224 px).

The paper's 224 px setting (`run_config.imagenet_transfer_config`: optimisation,
augmentation, source weights, method key).
Reported top-1 (Table 1): scratch 58.08, FM single 66.05, FM one-to-one 67.25,
L2T-w single 69.16, L2T-w one-to-one 69.84, L2T-ww 78.08
(Appendix C: --config.method=l2t_ww_weights / l2t_ww_original for the C.1 / C.2 ablations).
Data: tfds "stanford_dogs" (array_record) under --config.data_dir; 10 % of every
training class held out for validation.
"""

from l2t_jax.run_config import imagenet_transfer_config


def get_config():
    # tfds default data_dir ($TFDS_DATA_DIR or ~/tensorflow_datasets) when ""
    return imagenet_transfer_config("tfds:stanford_dogs", "")
