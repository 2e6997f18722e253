"""Baselines that need nnx's data handling but no method.

``nnxInputsTrainer`` is stock nnU-Net (network, loss, schedule, augmentation) whose input is the image plus the
one-hot encoding of the label maps named by the option ``inputs`` (``coarse``, an aux map such as ``anatomy``, or
several joined by ``+``). It is the comparison a paper that refines coarse masks or injects anatomy implies
("what if nnU-Net simply saw the same extra input?"). At inference ``nnx_predict -inputs NAME=FOLDER`` supplies the
maps; stock ``nnUNetv2_predict`` cannot, so the model does not export to plain nnU-Net.

``nnxTierTrainer`` is stock nnU-Net trained through nnx's tier loader: coarse masks and scribbles (including the
files of demoted expert cases) are its targets. ``--labeled 0 --demote-to coarse`` trains it on the coarse
non-expert masks only: "nnU-Net trained on the non-expert labels", the other baseline a coarse-mask method implies.
Its inference network is stock.
"""
from __future__ import annotations

from typing import Any, Dict, List

from nnx.errors import NNXError
from nnx.options import Option
from nnx.trainer_base import nnxTrainer


class nnxInputsTrainer(nnxTrainer):
    nnx_summary = "nnU-Net + label maps (coarse mask, anatomy map) as extra one-hot input channels"
    nnx_source = "baseline implied by ReReNet (coarse mask as input) and anatomy injection; docs/dataset_format.md"
    nnx_requires = {"inputs": ["coarse"]}
    nnx_options = {"inputs": Option("coarse", "label maps appended to the input, joined by '+' "
                                              "(e.g. coarse, anatomy, coarse+anatomy)", str)}
    nnx_memory = {"activation_factor": 1.0, "static_gb": 0.0}
    nnx_inference_network_is_stock = False

    @classmethod
    def nnx_check_options(cls, values: Dict[str, Any], source: str) -> None:
        super().nnx_check_options(values, source)
        names = [s for s in str(values.get("inputs", "")).split("+") if s]
        if not names or len(set(names)) != len(names):
            raise NNXError(f"option 'inputs' must name one or more distinct label maps joined by '+', got "
                           f"'{values.get('inputs')}'", source)

    def nnx_requirements(self) -> Dict[str, List[str]]:  # the instance's inputs come from its option
        from nnx.registry import requirements
        req = requirements(type(self))
        opts = getattr(self, "nnx_opts", None) or {}
        req["inputs"] = [s for s in str(opts.get("inputs", "coarse")).split("+") if s]
        return req


class nnxTierTrainer(nnxTrainer):
    nnx_summary = "stock nnU-Net trained on every labeled tier through nnx's loader (coarse masks, scribbles as targets)"
    nnx_source = "baseline: nnU-Net on non-expert labels (--labeled 0 --demote-to coarse); docs/dataset_format.md"
    nnx_memory = {"activation_factor": 1.0, "static_gb": 0.0}
