"""CS-Unet (Liu 2025 thesis ch. 3; ICASSP 2023): a Convolutional Swin-Unet lifted to 3D and configured from the
nnU-Net plan (``CSUNetTrainer``; also the Transformer of the cross-teaching trainers).

Submodules, in the order of the thesis' method section: ``windows`` (window partition, cyclic shift, attention
mask), ``blocks`` (convolutional embedding, (S)W-CMSA, DSF, CST block, patch merging, skip convolution, patch
expansion), ``network`` (the CS-Unet from a plan, its options and its memory estimate), ``cost`` (parameters and
MACs against the planned U-Net), ``trainer`` (``CSUNetTrainer``). The trainer is not imported here, so the light
submodules do not pull in nnU-Net's trainer.
"""
