"""``python -m nnx.bench.train_run SEED NNX_TRAIN_ARGS...``: ``nnx_train`` with Python, NumPy and torch seeded.

nnU-Net itself does not seed; a benchmark seed fixes the network initialisation, the batch sampling and (with
``nnUNet_n_proc_DA=0``) the augmentation draws of one training run.
"""
from __future__ import annotations

import random
import sys


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    seed = int(argv[0])
    import numpy as np
    import torch
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    from nnx.cli.train import main as train_main
    return train_main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
