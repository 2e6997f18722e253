"""Phantom datasets for nnx (``nnx_synth``): nnU-Net raw datasets with organs, lesions, lesion mimics, a CT and a
PET channel, and every annotation tier of docs/dataset_format.md (expert, coarse, scribble, none)."""
from nnx.synth.dataset import PRESETS, SynthReport, make_dataset, parse_tiers, task_labels
from nnx.synth.preview import preview

__all__ = ["PRESETS", "SynthReport", "make_dataset", "parse_tiers", "preview", "task_labels"]
