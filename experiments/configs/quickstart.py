"""Offline quickstart: a real transfer on scikit-learn's digits, end to end in a few minutes on a CPU.

    python -m experiments.run --config=experiments/configs/quickstart.py --workdir=/tmp/qs

1. Source: a tiny VGG (`vgg_tiny`: 16, M, 32, M, 64, M; taps 16/32/64 channels at
   16/8/4 px) trained from scratch on the digits 0-4 (about 540 training images,
   16 px, 3 channels).
2. Targets: a fresh `vgg_tiny` on the digits 5-9 with only `target.n_per_class` (10)
   labelled images per class, trained with each method of `methods`:
   scratch; FM (unweighted feature matching, one-to-one pairs); L2T-ww (learned what
   and where, all-to-all pairs, the paper's meta-networks and bilevel scheme).
3. A table of validation/test accuracies is printed and written to WORKDIR/results.md.

Everything else follows the paper (SGD 0.9, wd 1e-4, lr 0.1 cosine, β 0.5, T 2,
Adam 1e-4 on φ). Override like any config: --config.target.epochs=60,
--config.methods=scratch,l2t_ww, --config.target.seed=1.
"""

import ml_collections

from l2t_jax.run_config import base_config


def get_config():
    source = base_config()
    source.dataset = "digits"
    source.classes = "0-4"
    source.image_size = 16
    source.target_model = "vgg_tiny"
    source.method = "scratch"
    source.epochs = 20
    source.batch_size = 64
    source.drop_last = True  # one compiled step shape
    source.log_every = 10
    source.eval_batch_size = 300

    target = base_config()
    target.dataset = "digits"
    target.classes = "5-9"
    target.n_per_class = 10
    target.image_size = 16
    target.target_model = "vgg_tiny"
    target.source_model = "vgg_tiny"
    target.method = "scratch"  # set per run from `methods`
    target.epochs = 40
    target.batch_size = 10  # 50 images: five full batches per epoch
    target.log_every = 10
    target.eval_batch_size = 300

    c = ml_collections.ConfigDict()
    c.experiment = "quickstart"
    c.methods = "scratch,fm,l2t_ww"
    c.pairs = ml_collections.ConfigDict({"fm": "one_to_one", "l2t_w": "one_to_one", "l2t_ww": "all_to_all"})
    c.source = source
    c.target = target
    return c
