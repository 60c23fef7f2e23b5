"""Limited-data transfer on scikit-learn's digits, offline on a CPU: the paper's Fig. 5 protocol in miniature.

Target: a fresh `vgg_tiny` (16 px) on the digits 5-9 with `n_per_class` labelled images
per class (10 % of every class held out first for validation; the test split is
scikit-learn's held-out part). Source: a `vgg_tiny` trained on the digits 0-4, e.g. the
quickstart's source stage:

    python -m experiments.run --config=experiments/configs/quickstart.py --workdir=runs/qs
    python -m experiments.sweep --config=experiments/configs/digits_limited.py --workdir=runs/digits \\
        --config.source_weights=runs/qs/source/best_weights.msgpack \\
        --grid method=scratch,lwf,at,fm_one_to_one,l2t_ww --grid n_per_class=5,10,25 --grid seed=0,1,2
    python -m experiments.table runs/digits
    python -m experiments.figures --out figs --accuracy_vs_n runs/digits

Everything else follows the paper's optimisation (SGD 0.9, wd 1e-4, lr 0.1 cosine,
β 0.5, T 2, Adam 1e-4 on φ); 40 epochs, batch 10.
"""

from l2t_jax.run_config import base_config


def get_config():
    c = base_config()
    c.dataset = "digits"
    c.classes = "5-9"
    c.n_per_class = 10
    c.image_size = 16
    c.target_model = "vgg_tiny"
    c.source_model = "vgg_tiny"
    c.source_weights = ""  # --config.source_weights=runs/qs/source/best_weights.msgpack
    c.method = "l2t_ww"  # pairs: the method's own (all_to_all; fm_one_to_one's one_to_one, ...)
    c.at_pairs = "one_to_one"
    c.epochs = 40
    c.batch_size = 10
    c.log_every = 10
    c.eval_batch_size = 300
    c.num_workers = 2
    c.progress_bar = False
    return c
