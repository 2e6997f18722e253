"""``nnx_bench rerenet`` (spec M1.5/M1.8; issue: ReReNet against the baselines its thesis implies).

Phantom ``small`` (all training cases expert-labelled, a coarse non-expert mask for every training and test case at
Dice 0.65 to the expert label, as in the thesis' SegRap2023 setting), coarse masks given at test. Arms:

* ``nnU-Net expert``: the stock trainer on the expert labels, image only ((a), the baseline of the deltas);
* ``ReReNet``: ``ReReNetTrainer`` (K = 5, discrepancy-weighted loss, stagewise steps);
* ``K1 noDiscr``: ``ReReNetTrainer_K1_noDiscr``, nnU-Net with the coarse mask as an extra input ((b); the thesis'
  Table 3.4 shows that most of the gain comes from this input);
* ``nnU-Net coarse labels``: stock nnU-Net trained on the coarse masks only ((c), ``nnxTierTrainer --labeled 0
  --demote-to coarse``);
* ``coarse masks``: the test cases' coarse masks themselves, evaluated as predictions ((d)).

The 2d configuration: the thesis' network is 2D. The schedule is sized for a CPU (2 cores: about 40 min for 3
seeds); on a GPU copy this dict into a YAML file, raise ``training`` (thesis: 100 epochs) and run with
``--device cuda``.
"""

SUITE = {
    "name": "rerenet",
    "description": "ReReNet vs nnU-Net (expert labels, image only), nnU-Net + coarse input (K=1, no discrepancy "
                   "weight), nnU-Net on the coarse labels, and the coarse masks themselves",
    "dataset": {"phantom": "small", "phantom_id": 874, "phantom_seed": 0,
                "phantom_options": {"tiers": "expert=1.0", "coarse_dice": 0.65}},
    "configuration": "2d",
    "training": {"epochs": 30, "iters_per_epoch": 20, "val_iters": 2},
    "seeds": 3,
    "test": {"inputs": {"coarse": "coarseTs"}, "tta": False},
    "references": {"coarse masks": "coarseTs"},
    "arms": [
        {"name": "nnU-Net expert", "trainer": "nnUNetTrainer"},
        {"name": "ReReNet", "trainer": "ReReNetTrainer"},
        {"name": "K1 noDiscr", "trainer": "ReReNetTrainer_K1_noDiscr"},
        {"name": "nnU-Net coarse labels", "trainer": "nnxTierTrainer",
         "options": {"labeled": "0", "demote_to": "coarse"}},
    ],
    "baseline": "nnU-Net expert",
    "measure": {"steps": 3, "rounds": 3, "warmup": 2, "infer": 3},
}
