"""MOD (Pang et al., seed 002): online self-distillation and masked self-modeling on the nnU-Net encoder, removed
at inference.

Submodules, in the order of the paper's method section: ``views`` (the two augmented views), ``masking`` (block
masking over the token grid), ``backbone`` (the encoder stage that yields the tokens), ``heads`` (projection heads of
the online tokenizer, dense predictor), ``teacher`` (EMA teacher, momentum and temperature schedules, centring),
``loss`` (L_efm, L_cls, L_OT, L_DP, L_MOD, focal + Dice), ``cost`` (the step-time ratio implied by the extra passes),
``trainer`` (``MODTrainer`` and its variants), ``bench`` (the ``nnx_bench mod`` suite). The trainer is not imported
here, so the light submodules do not pull in nnU-Net.
"""
