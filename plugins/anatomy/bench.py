"""``nnx_bench anatomy`` (spec 003 M5 §4-5; issue: anatomy injection vs the image-only trainer).

The two-step GRASP recipe as one suite. Phantom ``small``, lesion task (lesions live only inside liver and kidneys,
lesion mimics elsewhere), CT + PET channels, anatomy maps for every training and test case (``anatomyTr/Ts``). The
mimics have a lesion's contrast against their own surroundings (``mimic_contrast: relative``, docs/synth.md), so
only anatomy tells them apart; with the phantom's default ``absolute`` mimics (a lesion's HU wherever they lie) the
image-only network already told most of them from lesions by their local contrast (README, 5000-step table):

* ``Organs`` (trained only, on its own dataset): the stock trainer on a second phantom with the same geometry whose
  labels are the organ maps (``task: organs``) and whose only channel is CT -- the ``Mirror`` organ model. Planned
  with the same settings, so its plans match the lesion task's (GRASPTrainer checks patch, spacing and topology);
* ``nnU-Net``: the stock trainer, image only (the baseline of the deltas, "2c");
* ``ANA in.``: ``AnatomyInputTrainer`` (anatomy map as one scaled input channel, "3c");
* ``MultiTask``: ``AnatomyMultiTaskTrainer`` (second decoder on the organ maps, 0.8 L_path + 0.2 L_ana);
* ``GRASP``: ``GRASPTrainer`` with ``anatomy_model: "@arm:Organs"`` (the Organs model of the same seed); its speed
  is measured with fusion on (``measure_options``), its inference network is ANA in.'s;
* ``ANA in. onehot``: the same with the anatomy map one-hot encoded (one channel per organ) instead of the thesis'
  single scaled channel;
* ``GRASP onehot``: GRASP with that one-hot input (its inference network is ``ANA in. onehot``'s). On this phantom
  the scaled channel makes the soft-tissue mimics *more* likely to be segmented than no anatomy at all (README), so
  the one-hot pair is the fair test of "anatomy removes mimic false positives";
* ``GRASP fused-inf``, ``GRASP onehot fused-inf``: the trainings of ``GRASP`` and ``GRASP onehot`` (shared, not
  trained again), predicted with the fusion kept at inference (``predict_options: inference_fusion: on``, the
  spec's keep-fusion-at-inference variant; the frozen organ encoder runs at test time).

nnx_bench reports Dice, CC-Dice, step-time ratios to the stock trainer and predict s/case; the false-positive and
false-negative volumes (mL, autoPET definitions), the FP volume outside organs (where the mimics are) and the
inference ratio GRASP / ANA in. come from ``python -m nnx_plugins.anatomy.volumes <bench output folder>``, and so
do the FP volume on the mimics and the fraction of mimics hit (from the phantom's ``mimicsTs`` masks).

Sized for a CPU: the ``2d`` configuration (nnx's CPU plan: patch 80x80, batch 2; ~0.09 s per stock step at one
thread), 50 epochs x 100 iterations = 5000 steps per lesion run, GRASP's fusion from epoch 8 of 50
(``fusion_start_epoch`` default round(epochs / 6), the thesis' 50 of 300); the organ model 20 epochs (2000 steps).
Measured per run (one thread, the other core busy): Organs ~4-5 min, nnU-Net and ANA in. ~8.5 min, GRASP ~10.5 min,
MultiTask ~12 min; 7 arms x 3 seeds ~3.2 h. At 2000 steps per lesion run the image-only arm alone spread from 0.14
to 0.35 Dice between seeds and no difference could be resolved (README); at 5000 steps it could. A first version ran
``3d_fullres`` for 25 steps (patch 32x64x64, ~4 s per step): no arm learned anything (Dice <= 0.08). For a GPU run
copy this dict into a YAML file, set ``configuration: 3d_fullres`` (the thesis' setting), raise ``training``
(thesis: 300 epochs; e.g. epochs 300, iters_per_epoch 250 -- fusion then starts at epoch 50) and the Organs arm's
``epochs``, use phantom ``medium`` and ``--device cuda``.
"""

_PHANTOM = {"phantom": "small", "phantom_seed": 0}

SUITE = {
    "name": "anatomy",
    "description": ("anatomy injection on the small phantom (lesions only inside organs, mimics with a lesion's local "
                    "contrast elsewhere): nnU-Net "
                    "(image only) vs ANA in. (anatomy map as input), multi-task (anatomy decoder) and GRASP (frozen "
                    "organ-model encoder fused at the bottleneck, trained first as arm 'Organs'), and ANA in. and GRASP "
                    "with a one-hot anatomy input, and both GRASP trainings predicted with the fusion kept at inference; 2d, 3 seeds, 5000 steps per lesion run, 2000 for the organ model "
                    "(CPU, ~3.2 h; 3d_fullres and longer training for a GPU run)"),
    "dataset": {**_PHANTOM, "phantom_id": 877,
                "phantom_options": {"task": "lesion", "tiers": "expert=1.0", "pet": "channel",
                                    "mimic_contrast": "relative"}},
    "configuration": "2d",
    "fold": 0,
    "training": {"epochs": 50, "iters_per_epoch": 100, "val_iters": 5},
    "seeds": 3,
    "test": {"inputs": {"anatomy": "anatomyTs"}, "tta": False},
    "arms": [
        {"name": "Organs", "trainer": "nnUNetTrainer", "options": {"epochs": 20},
         "dataset": {**_PHANTOM, "phantom_id": 878,
                     "phantom_options": {"task": "organs", "tiers": "expert=1.0", "pet": "none",
                                         "mimic_contrast": "relative"}}},
        {"name": "nnU-Net", "trainer": "nnUNetTrainer"},
        {"name": "ANA in.", "trainer": "AnatomyInputTrainer"},
        {"name": "MultiTask", "trainer": "AnatomyMultiTaskTrainer"},
        {"name": "GRASP", "trainer": "GRASPTrainer", "options": {"anatomy_model": "@arm:Organs"},
         "measure_options": {"fusion_start_epoch": 0}},
        {"name": "ANA in. onehot", "trainer": "AnatomyInputTrainer", "options": {"anatomy_encoding": "onehot"}},
        {"name": "GRASP onehot", "trainer": "GRASPTrainer",
         "options": {"anatomy_model": "@arm:Organs", "anatomy_encoding": "onehot"},
         "measure_options": {"fusion_start_epoch": 0}},
        # the same two trainings, predicted with the fusion kept (spec's keep-fusion-at-inference variant)
        {"name": "GRASP fused-inf", "trainer": "GRASPTrainer", "options": {"anatomy_model": "@arm:Organs"},
         "measure_options": {"fusion_start_epoch": 0}, "predict_options": {"inference_fusion": "on"}},
        {"name": "GRASP onehot fused-inf", "trainer": "GRASPTrainer",
         "options": {"anatomy_model": "@arm:Organs", "anatomy_encoding": "onehot"},
         "measure_options": {"fusion_start_epoch": 0}, "predict_options": {"inference_fusion": "on"}},
    ],
    "baseline": "nnU-Net",
    "measure": {"steps": 2, "rounds": 3, "warmup": 1, "infer": 3},
}


# -- where the lesion organs sit on the scaled channel's code line (README, "code order") -------------------------
# The phantom's anatomy labels: liver 1, spleen 2, kidney 3, bladder 4, spine 5; lesions only in liver and kidney.
# Codes with the default (no groups): liver 0.2, spleen 0.4, kidney 0.6, bladder 0.8, spine 1.0.
LIVER_HIGH = "spine/bladder/spleen/kidney/liver"   # liver 1.0, kidney 0.8, spleen 0.6, bladder 0.4, spine 0.2
LESION_LOW = "liver/kidney/spleen/bladder/spine"   # liver 0.2, kidney 0.4, spleen 0.6, bladder 0.8, spine 1.0

ORDER_SUITE = {
    **{k: v for k, v in SUITE.items() if k not in ("name", "description", "arms")},
    "name": "anatomy_order",
    "description": ("the anatomy suite's data and settings; the thesis' single scaled anatomy channel with the organs "
                    "in four places on the code line (default id/C, every organ offset from background, lesion organs "
                    "lowest, lesion organs highest) and GRASP with the lesion organs highest, vs nnU-Net (image only); "
                    "2d, 3 seeds, 5000 steps (CPU, ~2.5 h; --out of an 'anatomy' run reuses its Organs, nnU-Net and "
                    "ANA in. trainings)"),
    "arms": [
        *[a for a in SUITE["arms"] if a["name"] in ("Organs", "nnU-Net", "ANA in.")],
        {"name": "ANA in. offset", "trainer": "AnatomyInputTrainer", "options": {"anatomy_offset": "0.5"}},
        {"name": "ANA in. lesion-low", "trainer": "AnatomyInputTrainer", "options": {"anatomy_groups": LESION_LOW}},
        {"name": "ANA in. liver-high", "trainer": "AnatomyInputTrainer", "options": {"anatomy_groups": LIVER_HIGH}},
        {"name": "GRASP liver-high", "trainer": "GRASPTrainer",
         "options": {"anatomy_model": "@arm:Organs", "anatomy_groups": LIVER_HIGH},
         "measure_options": {"fusion_start_epoch": 0}},
    ],
}
