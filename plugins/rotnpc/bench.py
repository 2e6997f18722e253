"""``nnx_bench rotnpc``: 3DRotNPC against nnU-Net trained from scratch (the thesis' "ResUNet3D (scratch)" row of
Table 4.1, spec M2.5) with 30 % of the expert labels, on a tiny phantom, sized for a CPU (about 25 minutes on 2
cores). For a GPU run copy this dict into a YAML file, raise ``training`` and use ``--device cuda``."""

SUITE = {
    "name": "rotnpc",
    "description": "RotNPCTrainer (rotation pretext, then fine-tuning) vs nnU-Net from scratch, 30 % expert labels",
    "dataset": {"phantom": "tiny", "phantom_id": 873, "phantom_seed": 0,
                "phantom_options": {"tiers": "expert=1.0", "num_train": 20, "num_test": 6}},
    "configuration": "3d_fullres",
    "labels": {"labeled": "30%"},
    "training": {"epochs": 20, "iters_per_epoch": 10, "val_iters": 2},
    "seeds": 3,
    "test": {"tta": False},
    "arms": [
        {"name": "nnU-Net scratch", "trainer": "nnUNetTrainer"},
        {"name": "3DRotNPC", "trainer": "RotNPCTrainer"},
    ],
    "measure": {"steps": 3, "rounds": 3, "warmup": 2, "infer": 3},
}
