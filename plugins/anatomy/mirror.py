"""GRASP's frozen anatomy encoder E_ana, "Mirror" variant (spec 003 M5 §1-2, §7 "Mirror anatomy model").

E_ana is the encoder of an nnU-Net (or nnx) model trained on the *organ* task with the same plans (patch size,
spacing, network topology) on the CT channel alone. It is loaded from that model's results folder
(``.../DatasetXXX/<Trainer>__<Plans>__<configuration>``, option ``anatomy_model``), frozen (``requires_grad=False``,
eval mode, run under ``torch.no_grad``) and never saved into the pathology model: the checkpoint keeps its path and
a checksum of its weights (see the trainer).

The CT channel reaches E_ana normalised the way the organ model's own training normalised it: the pathology
data's CT channel is de-normalised with this dataset's ``CTNormalization`` statistics and normalised again with the
organ dataset's (both from the plans' ``foreground_intensity_properties_per_channel``)::

    hu  = x · max(std_p, 1e-8) + mean_p                     (exact inside the pathology clip window)
    x_a = (clip(hu, p0.5_a, p99.5_a) − mean_a) / max(std_a, 1e-8)
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Dict

import numpy as np
import torch
from torch import nn

from nnx.errors import NNXError

CT_SCHEME = "CTNormalization"
RANDOM = "random"  # cost measurement only: a frozen, randomly initialised encoder with this run's plans


@dataclass
class CTRenorm:
    """x (pathology CT normalisation) -> x_a (the anatomy model's CT normalisation)."""
    mean_p: float
    std_p: float
    mean_a: float
    std_a: float
    lo_a: float
    hi_a: float

    @classmethod
    def from_props(cls, props_p: Dict[str, float], props_a: Dict[str, float]) -> "CTRenorm":
        return cls(float(props_p["mean"]), max(float(props_p["std"]), 1e-8), float(props_a["mean"]),
                   max(float(props_a["std"]), 1e-8), float(props_a["percentile_00_5"]),
                   float(props_a["percentile_99_5"]))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        hu = x * self.std_p + self.mean_p
        return (hu.clamp(self.lo_a, self.hi_a) - self.mean_a) / self.std_a


@dataclass
class AnatomyModel:
    folder: str
    fold: str
    checkpoint: str
    encoder: nn.Module
    renorm: CTRenorm
    channels: list            # per-stage output channels of E_ana
    checksum: float           # sum of all encoder weights (float64): detects a changed model on --c


def _fail(msg: str, where: str) -> None:
    raise NNXError(f"anatomy model: {msg}", where)


def _arch(cm) -> Dict[str, Any]:
    kw = cm.network_arch_init_kwargs
    return {"class": cm.network_arch_class_name, "n_stages": kw.get("n_stages"),
            "strides": [list(s) if isinstance(s, (list, tuple)) else s for s in kw.get("strides", [])]}


def encoder_checksum(encoder: nn.Module) -> float:
    return float(sum(p.detach().double().sum().item() for p in encoder.state_dict().values()
                     if torch.is_floating_point(p)))


def load_anatomy_model(folder: str, fold: str, checkpoint: str, plans_manager, configuration_manager,
                       configuration: str, dataset_json: dict, ct_channel: int, device: torch.device
                       ) -> AnatomyModel:
    """Check the organ model against this run's plans and load its frozen encoder. One-line NNXError on: a missing
    folder / plans / checkpoint, different patch size, spacing or network topology, an organ model that does not take
    exactly one (CT) channel, a pathology channel ``ct_channel`` that is not CT-normalised."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from nnx.io_utils import read_json

    if folder == RANDOM:
        return random_anatomy_model(plans_manager, configuration_manager, ct_channel, device)
    if not folder:
        _fail("no organ model given: set the option anatomy_model=<results folder of an nnU-Net model trained on "
              "the organ maps with the same plans>", "anatomy_model")
    folder = os.path.abspath(os.path.expanduser(folder))
    if not os.path.isdir(folder):
        _fail("organ model folder not found", folder)
    for f in ("plans.json", "dataset.json"):
        if not os.path.isfile(os.path.join(folder, f)):
            _fail(f"no {f} in the organ model folder (give a results folder <Trainer>__<Plans>__<configuration>)",
                  folder)
    fold_dir = os.path.join(folder, f"fold_{fold}")
    ck_path = os.path.join(fold_dir, checkpoint)
    if not os.path.isfile(ck_path):
        _fail(f"no {checkpoint} for fold {fold} (train the organ model first, or set anatomy_fold / "
              f"anatomy_checkpoint)", ck_path)
    plans_a = read_json(os.path.join(folder, "plans.json"), "plans.json")
    dj_a = read_json(os.path.join(folder, "dataset.json"), "dataset.json")
    cfg_a = os.path.basename(folder.rstrip(os.sep)).split("__")[-1]
    if cfg_a not in plans_a.get("configurations", {}):
        cfg_a = configuration
    if cfg_a not in plans_a.get("configurations", {}):
        _fail(f"its plans have no configuration '{configuration}'", os.path.join(folder, "plans.json"))
    pm_a = PlansManager(plans_a)
    cm_a = pm_a.get_configuration(cfg_a)
    cm_p = configuration_manager
    where = os.path.join(folder, "plans.json")
    if list(cm_a.patch_size) != list(cm_p.patch_size):
        _fail(f"patch size {list(cm_a.patch_size)} differs from this run's {list(cm_p.patch_size)} (train it with "
              f"the same plans: nnUNetv2_move_plans_between_datasets)", where)
    if not np.allclose(cm_a.spacing, cm_p.spacing, rtol=1e-4):
        _fail(f"spacing {list(cm_a.spacing)} differs from this run's {list(cm_p.spacing)} (same plans needed)", where)
    if _arch(cm_a) != _arch(cm_p):
        _fail(f"network {_arch(cm_a)} differs from this run's {_arch(cm_p)} (same plans needed)", where)
    ch_a = dj_a.get("channel_names") or dj_a.get("modality") or {}
    if len(ch_a) != 1:
        _fail(f"it takes {len(ch_a)} input channels ({', '.join(map(str, ch_a.values()))}); GRASP feeds it the CT "
              f"channel only (train it on CT alone)", os.path.join(folder, "dataset.json"))
    if cm_a.normalization_schemes[0] != CT_SCHEME:
        _fail(f"its channel uses {cm_a.normalization_schemes[0]}, not {CT_SCHEME} (a CT model is needed)", where)
    n_img = len(dataset_json.get("channel_names") or dataset_json.get("modality"))
    if not 0 <= ct_channel < n_img:
        _fail(f"option ct_channel={ct_channel} is not an image channel (0..{n_img - 1})", "ct_channel")
    if cm_p.normalization_schemes[ct_channel] != CT_SCHEME:
        raise NNXError(f"channel {ct_channel} of this dataset uses {cm_p.normalization_schemes[ct_channel]}, not "
                       f"{CT_SCHEME}: GRASP cannot recover CT intensities for the anatomy encoder (option "
                       f"ct_channel)", "ct_channel")
    props_p = plans_manager.plans["foreground_intensity_properties_per_channel"][str(ct_channel)]
    props_a = plans_a["foreground_intensity_properties_per_channel"]["0"]
    lm_a = pm_a.get_label_manager(dj_a)
    net = nnUNetTrainer.build_network_architecture(pm_a, cm_a, 1, lm_a.num_segmentation_heads,
                                                   enable_deep_supervision=False)
    ck = torch.load(ck_path, map_location="cpu", weights_only=False)
    weights = {k.replace("_orig_mod.", "").removeprefix("module."): v for k, v in ck["network_weights"].items()}
    try:
        net.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        _fail(f"its weights do not fit its plans ({str(e).strip().splitlines()[0]})", ck_path)
    if not hasattr(net, "encoder"):
        _fail(f"{type(net).__name__} has no encoder (an encoder-decoder nnU-Net network is needed)", where)
    enc = net.encoder
    enc.requires_grad_(False)
    enc.eval()
    enc.to(device)
    channels = list(getattr(enc, "output_channels", [])) or list(cm_a.network_arch_init_kwargs["features_per_stage"])
    return AnatomyModel(folder, str(fold), checkpoint, enc, CTRenorm.from_props(props_p, props_a), channels,
                        encoder_checksum(enc))


def random_anatomy_model(plans_manager, configuration_manager, ct_channel: int, device: torch.device
                         ) -> AnatomyModel:
    """``anatomy_model=random``: the encoder of this run's planned network (1 input channel), randomly initialised
    (seed 0) and frozen, CT passed through unchanged. It carries no anatomy knowledge: for speed and memory
    measurement (``nnx_bench overhead``) only, never for results."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    try:
        net = nnUNetTrainer.build_network_architecture(plans_manager, configuration_manager, 1, 2,
                                                       enable_deep_supervision=False)
    finally:
        torch.random.set_rng_state(state)
    enc = net.encoder.requires_grad_(False).eval().to(device)
    ident = CTRenorm(0.0, 1.0, 0.0, 1.0, -float("inf"), float("inf"))
    return AnatomyModel(RANDOM, "-", "-", enc, ident, list(enc.output_channels), encoder_checksum(enc))


def anatomy_features(model: AnatomyModel, data: torch.Tensor, ct_channel: int, keep: int = 0) -> list:
    """E_ana's stage outputs for the CT channel of ``data`` (no gradients, eval mode). ``keep`` > 0: only the
    ``keep`` deepest stages are kept (the others are ``None``), so the shallow stages' activations are freed at
    once."""
    model.encoder.eval()
    with torch.no_grad():
        x = model.renorm(data[:, ct_channel:ct_channel + 1].float())
        out = model.encoder(x)
    return out if keep <= 0 else [None] * (len(out) - keep) + list(out[-keep:])


def same_encoder(stored_checksum, model: AnatomyModel) -> bool:
    """Whether ``model``'s encoder is the one whose checksum a checkpoint stored (no stored checksum: yes)."""
    return stored_checksum is None or bool(np.isclose(stored_checksum, model.checksum, rtol=1e-9, atol=1e-6))


__all__ = ["RANDOM", "random_anatomy_model", "CTRenorm", "AnatomyModel", "load_anatomy_model", "anatomy_features",
           "same_encoder",
           "encoder_checksum"]
