"""Limited-data CIFAR-10: N labelled images per class, TinyImageNet ResNet32 -> VGG9-bn (32 px).

Paper (Section 3.3, Figure 5): CIFAR-10 with N training images per class (the figure
spans N = 25 ... 500 — e.g. --config.n_per_class=25/50/100/250/500), comparing
scratch, LwF, AT, LwF+AT and L2T-ww; same optimisation as the 32 px tasks (SGD 0.9,
wd 1e-4, cosine, β 0.5, T 2, Adam 1e-4 on φ, 200 epochs at batch 128: with N = 25 that
is 2 steps an epoch) except the learning rate: 0.01 instead of 0.1, calibrated on
validation for scratch at N = 25 (results/cifar10_limited/README.md).

Data: the CIFAR-10 JPEG image folder shipped as ../shared/data/cifar10-jpeg.tar
(train/<class>/*.jpg, test/<class>/*.jpg; re-encoded JPEGs, so absolute accuracies
run a few points below the PNG originals). Extract it once, e.g.
    mkdir -p ~/data/cifar10-jpeg && tar xf ../shared/data/cifar10-jpeg.tar -C ~/data/cifar10-jpeg
and point --config.data_dir at the parent ($L2T_DATA or ~/data by default).
10 % of every training class is held out for validation first; the N images per
class are then drawn (seeded) from the remaining training images.
Compact alternative (e.g. to carry to a GPU machine): pack a 500-per-class training pool
and the test set into one 41 MiB file,
    python -m experiments.pack_cifar10 --tar ../shared/data/cifar10-jpeg.tar --out data/cifar10_pool500.npz
and run with --config.dataset=npz:data/cifar10_pool500.npz --config.data_dir=. (validation: 10 %
of the pool; N per class from the rest). The study: `bash results/cifar10_limited/study.sh calib|n25|n50` (resumable).
Source: the authors' tinyimagenet-resnet32.pth.tar under $L2T_SHARED/reference
($L2T_SHARED defaults to ../shared beside the repository).
"""

from l2t_jax.run_config import data_path, tinyimagenet_transfer_config


def get_config():
    c = tinyimagenet_transfer_config("folder:cifar10-jpeg", data_path(""))
    c.n_per_class = 25
    # The calibrated protocol of the limited-data study (results/cifar10_limited/README.md):
    # at N = 25 the paper's lr 0.1 does not train (scratch: 28.4 % best validation accuracy),
    # so the target's learning rate was chosen on validation for scratch and is used by
    # every method. Validation every 4 epochs and the test split only at the end (final
    # and best-validation weights) keep evaluation under ~15 % of a scratch run.
    c.lr = 0.01
    c.eval_every_epochs = 4
    c.test_eval = "at_end"
    return c
