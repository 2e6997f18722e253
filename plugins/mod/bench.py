"""``nnx_bench mod``: MODTrainer against the stock nnUNetTrainer with few labelled training cases (8 and 16), 3 seeds,
on the ``small`` phantom, sized for a CPU.

Cost on 2 idle CPU cores: with nnx's CPU plan of the ``small`` phantom (patch 32 x 64 x 64, batch 2) a stock step
takes ~0.9 s, a MOD step ~2x that (measured 2.03x / 1.99x, README "Cost"); training, per-epoch and final validation,
test prediction (no TTA) and the interleaved speed measurement took 68 min on 2 cores shared with other runs. At 24 steps the
networks are far from converged: this run checks the pipeline and the overheads (step-time ratio ~1.9-2.1,
inference ratio 1.00) more than accuracy. For a meaningful accuracy comparison copy this dict into a YAML file,
raise ``training`` (e.g. epochs 100, iters_per_epoch 250) and use ``--device cuda``.

Deltas are reported against the 8-case stock arm; compare ``MOD 16`` with ``nnU-Net 16`` through their means.
"""

SUITE = {
    "name": "mod",
    "description": ("MODTrainer (online self-distillation + masked reconstruction on the encoder) vs nnU-Net, "
                    "8 and 16 labelled training cases of the small phantom, 3 seeds, 24 steps per run (CPU, "
                    "~40 min on 2 idle cores; raise 'training' for a GPU run)"),
    "dataset": {"phantom": "small", "phantom_id": 874, "phantom_seed": 0,
                "phantom_options": {"tiers": "expert=1.0", "num_train": 20, "num_test": 8}},
    "configuration": "3d_fullres",
    "fold": 0,                       # 20 cases: 16 training, 4 validation
    "training": {"epochs": 4, "iters_per_epoch": 6, "val_iters": 1},
    "seeds": 3,
    "test": {"tta": False},
    "arms": [
        {"name": "nnU-Net 8", "trainer": "nnUNetTrainer", "options": {"labeled": 8}},
        {"name": "MOD 8", "trainer": "MODTrainer", "options": {"labeled": 8}},
        {"name": "nnU-Net 16", "trainer": "nnUNetTrainer"},
        {"name": "MOD 16", "trainer": "MODTrainer"},
    ],
    "baseline": "nnU-Net 8",
    "measure": {"steps": 2, "rounds": 3, "warmup": 1, "infer": 3},
}
