"""Shim for nnU-Net's ``nnUNet_extTrainer`` (nnunetv2 >= 2.8.0): ``export nnUNet_extTrainer=$(nnx_ext_path)``.

nnU-Net imports every module in that folder, checks ``hasattr(module, TrainerName)`` and afterwards deletes the
modules it imported from the folder. This module therefore holds no classes itself: attribute access resolves the
name through nnx's trainer registry (PEP 562), which imports the trainer from its installed package, where it stays
importable and picklable. Keep this folder free of anything else.
"""


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    from nnx.registry import trainer_names, load_trainer, BASELINE
    if name != BASELINE and name in trainer_names():
        return load_trainer(name)
    raise AttributeError(name)
