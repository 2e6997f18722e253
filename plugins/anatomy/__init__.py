"""Anatomy injection (Jaus 2025 thesis ch. 4.2; spec shared/specs/003-jaus-thesis.md M5): the anatomy map as an extra
input (``AnatomyInputTrainer``), GRASP's bottleneck fusion of a frozen anatomy encoder (``GRASPTrainer``) and the
multi-task baseline (``AnatomyMultiTaskTrainer``).

Submodules: ``encoding`` (anatomy map -> input channels), ``fusion`` (align block, SA/SE, attention, gated residual),
``mirror`` (the frozen organ-model encoder and its CT re-normalisation), ``multitask`` (second decoder, normalised
loss), ``volumes`` (false-positive / false-negative volumes), ``cost``, ``bench``, ``trainer``. The trainer is not
imported here, so the light submodules do not pull in nnU-Net's trainer.
"""
