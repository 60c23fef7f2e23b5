"""Plain supervised training of a source network (method "scratch"), e.g. ResNet32 on TinyImageNet.

The authors' source for the 32 px tasks is a CIFAR-style ResNet32 trained on
TinyImageNet (200 classes, 64 px images resized to 32; their record: top-1 49.27 %).
This config trains such a network with the same recipe as the targets (SGD 0.9,
wd 1e-4, lr 0.1 cosine, batch 128, pad-4 crop + flip after the resize), from an image
folder DATA/tiny-imagenet-200/{train,test}/<class>/*.JPEG (rearrange TinyImageNet's
val/ into class folders as test/). DATA = $L2T_DATA or ~/data.

The run writes best_weights.msgpack (best validation epoch) and final_weights.msgpack
in --workdir; use one as --config.source_weights of a transfer run (with
--config.source_model=resnet32). Any registered model and dataset work:
--config.target_model=..., --config.dataset=tfds:NAME / folder:PATH / npz:PATH.
"""

from l2t_jax.run_config import base_config, data_path


def get_config():
    c = base_config()
    c.dataset = "folder:tiny-imagenet-200"
    c.data_dir = data_path("")
    c.image_size = 32
    c.resize_to = 32
    c.batch_size = 128
    c.epochs = 200
    c.method = "scratch"
    c.target_model = "resnet32"
    return c
