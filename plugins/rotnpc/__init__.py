"""3DRotNPC (Li 2026 thesis ch. 4): slice-rotation self-supervision + segmentation fine-tuning (``RotNPCTrainer``).

Submodules: ``rotation`` (pretext transform), ``loss`` (weighted CE), ``head`` (rotation head), ``trainer``.
The trainer is not imported here, so the light submodules do not pull in nnU-Net.
"""
