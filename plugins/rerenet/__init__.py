"""ReReNet (Li 2026 thesis ch. 3; Jiang, Li et al., BIBM 2024): recurrent refinement of a coarse (non-expert) mask
with a discrepancy-aware loss (``ReReNetTrainer`` and its variants).

Submodules: ``network`` (the K-stage wrapper around the planned nnU-Net network), ``loss`` (Eq. 3.2-3.6),
``trainer``. The trainer is not imported here, so the light submodules do not pull in nnU-Net's trainer.
"""
