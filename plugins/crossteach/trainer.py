"""``CrossTeachingTrainer`` (CTS), ``MCSCTrainer`` and ``MCSCv2Trainer``: semi-supervised cross-teaching between
the planned nnU-Net CNN and a second network (CS-Unet by default) on nnU-Net (spec 001 §4, §5, §7.2).

One iteration, labeled batch (x_l, y_l) and unlabeled batch x_u (nnx's separate image-only loader,
``unlabeled_batch_size``, no foreground oversampling, never a label file), x = [x_l; x_u]:

1. both networks on x (one module, :class:`CrossTeachTrainWrapper`, so that DDP wraps everything with gradients);
2. L_sup(a), L_sup(b): nnU-Net's Dice + CE (deep supervision as planned) on the labeled part;
3. pseudo-labels Ŷ_a = argmax softmax(a(x_u)), Ŷ_b likewise, detached; L_cps(a) = Dice(a(x_u), Ŷ_b),
   L_cps(b) = Dice(b(x_u), Ŷ_a) (Eq. 4.1, Dice only);
4. MCSC / MCSCv2: contrastive loss L_cl over projected decoder features of both networks (``heads``), labels GT on
   labeled and the *other* network's pseudo-label on unlabeled voxels (CroLab);
5. L = Σ_{n∈{a,b}} [L_sup(n) + w_cps(t)·L_cps(n) + w_cl·L_cl] (the MCSC code sums the two networks' losses, so
   L_cl enters twice), one backward, nnU-Net's clip 12, one optimizer (AdamW param groups: CNN, second network,
   projectors) with a per-group per-iteration poly schedule.

Inference: ``self.network`` is :class:`~nnx_plugins.crossteach.network.DualNet` (both networks, no projector);
its ``forward`` returns the CNN's output by default (``infer_mode``). See README.md next to this file.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import autocast, nn
from torch import distributed as dist

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.collate_outputs import collate_outputs
from nnunetv2.utilities.helpers import dummy_context

from nnx.compat import patched
from nnx.errors import NNXError
from nnx.options import Option
from nnx.trainer_base import nnxTrainer

from .certainty import (ClassMemoryBank, anchor_mask, class_ranks, entropy, entropy_threshold, negative_mask)
from .heads import SCALES, FeatureTaps, Projectors, candidate_modules, gather_voxels, probe_taps, stream_projections
from .losses import balanced_supcon_loss, certainty_contrast_loss, cps_dice_loss
from .network import (INFER_MODES, SECOND_NETWORKS, DualNet, build_dual_network, cnn_weights, full_resolution, unwrap)
from .sampling import block_group_positions, resample_nearest
from .schedules import PerGroupPolyLR, cps_weight, uncertain_fraction

try:  # the CS-Unet's own options (window, depths, ...), merged into the trainers' options
    from nnx_plugins.csunet.network import CSUNET_OPTIONS, csunet_extra_architecture
except ImportError:  # pragma: no cover - the plugin ships with nnx
    CSUNET_OPTIONS, csunet_extra_architecture = {}, None

OPTIMIZERS = ("adamw", "sgd")
#: per-epoch log keys added to nnU-Net's logger
LOG_KEYS = ("ct_loss_sup_a", "ct_loss_sup_b", "ct_loss_cps_a", "ct_loss_cps_b", "ct_loss_cl", "ct_w_cps",
            "ct_val_dice_a", "ct_val_dice_b")


def _second_memory(factor: float) -> List[Dict[str, Any]]:
    """``extra_architectures`` entry of the default second network (CS-Unet, default options) on ``factor`` × the
    planned batch."""
    if csunet_extra_architecture is None:  # pragma: no cover
        return [{"feature_scale": 1.0, "factor": factor}]
    return [csunet_extra_architecture(factor)]


class CrossTeachTrainWrapper(nn.Module):
    """The DualNet (both networks) + projectors as one module for training (DDP wraps this one). ``forward(x,
    features)`` returns the outputs of both networks and, with ``features``, the hooked decoder features
    ``{"a": {scale: (B, C, *S)}, "b": {...}}`` (raw, before projection; the projectors act on gathered voxels)."""

    def __init__(self, dual: DualNet, projectors: Optional[Projectors], taps: Dict[str, Dict[str, int]]):
        super().__init__()
        self.dual = dual
        self.projectors = projectors
        self.taps = taps                                  # {"a"/"b": {scale: candidate index}}
        self._hooks = {"a": FeatureTaps(), "b": FeatureTaps()}

    def _attach(self) -> None:
        for name in ("a", "b"):
            net = getattr(self.dual, name)
            if self.taps.get(name) and not self._hooks[name].attached_to(net):
                cands, last = candidate_modules(net)
                self._hooks[name].attach(net, {s: cands[k] for s, k in self.taps[name].items()}, last)

    def forward(self, x: torch.Tensor, features: bool = False) -> Dict[str, Any]:
        self._attach()
        for h in self._hooks.values():
            h.capture, h.store = features, {}
        try:
            out = {"a": self.dual.a(x), "b": self.dual.b(x)}
        finally:
            for h in self._hooks.values():
                h.capture = False
        if features:
            out["features"] = {n: dict(h.store) for n, h in self._hooks.items()}
            for h in self._hooks.values():
                h.store = {}
        return out


def _opt(default, text, **kw):
    return Option(default, text, **kw)


class CrossTeachingTrainer(nnxTrainer):
    nnx_summary = ("CTS cross-teaching: the planned CNN + a CS-Unet trained together on labeled + unlabeled batches, "
                   "Dice cross pseudo-supervision on unlabeled cases; inference = the CNN (one module)")
    nnx_source = "Luo et al. 2022 (CTS) as in Liu 2025 thesis ch. 4; spec shared/specs/001-liu-thesis.md §4, §7"
    nnx_requires = {"tiers": ("expert",), "batch": ("unlabeled",)}
    nnx_options = {
        "second_network": _opt("csunet", "the second network: csunet (the CS-Unet, options csunet_*) or cnn (the "
                                         "planned nnU-Net network again, own random init: CNN-CNN ablation)",
                               choices=SECOND_NETWORKS),
        "infer_mode": _opt("cnn", "inference output: cnn (MCSC), second (the second network) or mean (mean of "
                                  "both softmaxes); stored with the weights", choices=INFER_MODES),
        "cps_weight": _opt(0.1, "w of the cross pseudo-supervision, reached at the end of the ramp-up (thesis 0.1)"),
        "rampup_fraction": _opt(1.0, "Gaussian ramp-up exp(-5(1-t/T_r)^2) of w_cps over this fraction of all "
                                     "iterations (epochs x iters_per_epoch); thesis 1.0, MCSC code 0.75; 0 = none"),
        "optimizer": _opt("adamw", "adamw (thesis: AdamW, per-network rates) or sgd (nnU-Net's SGD, momentum 0.99, "
                                   "Nesterov, for every group)", choices=OPTIMIZERS),
        "lr_cnn": _opt(5e-4, "initial learning rate of the CNN (thesis 5e-4)"),
        "lr_second": _opt(1e-4, "initial learning rate of the second network (thesis 1e-4 for the Transformer)"),
        "lr_proj": _opt(5e-4, "initial learning rate of the projector heads (MCSC code 5e-4)"),
        "weight_decay": _opt(5e-4, "weight decay (thesis: AdamW 5e-4)", attr="weight_decay"),
        "poly_exponent": _opt(0.9, "per-group poly decay exponent, stepped every iteration"),
        **CSUNET_OPTIONS,
    }
    # activations: both networks on labeled + unlabeled patches: the CNN on (B_l + B_u) = 2 x the planned batch
    # (factor 2.0) and the CS-Unet (default options) on 2 x the batch; the CPS terms add four softmax / one-hot
    # output-sized tensors (noise). Static: the CS-Unet (~25 M weights at width 96) with AdamW's two moments and
    # its gradient (~0.4 GB), and AdamW's second moment of the CNN (~0.15 GB): 0.6 GB.
    nnx_memory = {"activation_factor": 2.0, "static_gb": 0.6, "extra_architectures": _second_memory(2.0)}
    nnx_inference_network_is_stock = False
    #: contrastive loss of the subclass: None (CTS), "mcsc" or "mcscv2"
    ct_contrast: Optional[str] = None

    @classmethod
    def nnx_check_options(cls, v: Dict[str, Any], src: str) -> None:
        super().nnx_check_options(v, src)

        def need(cond, msg):
            if not cond:
                raise NNXError(msg, src)

        need(v["cps_weight"] >= 0, f"option 'cps_weight' must be >= 0, got {v['cps_weight']}")
        need(0.0 <= v["rampup_fraction"], f"option 'rampup_fraction' must be >= 0, got {v['rampup_fraction']}")
        for k in ("lr_cnn", "lr_second", "lr_proj"):
            need(v[k] > 0 and math.isfinite(v[k]), f"option '{k}' must be > 0, got {v[k]}")
        need(v["weight_decay"] >= 0, "option 'weight_decay' must be >= 0")
        need(v["poly_exponent"] >= 0, "option 'poly_exponent' must be >= 0")
        if v["second_network"] == "csunet" and CSUNET_OPTIONS:
            from nnx_plugins.csunet.network import check_options
            try:
                check_options({k: v[k] for k in CSUNET_OPTIONS})
            except ValueError as e:
                raise NNXError(str(e), src) from None

    # nnx_export: with infer_mode=cnn (the default) the inference output is the planned CNN's alone
    nnx_stock_network_weights = staticmethod(cnn_weights)

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True):
        # default configuration here (stock prediction has no trainer options); the configuration stored with the
        # weights replaces it on load_state_dict (network.DualNet.set_extra_state). Training builds with the
        # options (initialize()).
        return build_dual_network(plans_manager, configuration_manager, num_input_channels, num_output_channels,
                                  enable_deep_supervision)

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.label_manager.has_regions:
            raise NNXError("cross-teaching uses argmax pseudo-labels: region-based datasets (list values in "
                           "'labels') are not supported")
        if self.is_cascaded:
            raise NNXError(f"cross-teaching does not support the cascaded configuration '{configuration}'")
        self.ct_it = 0                              # global iteration t (ramp-up, poly, beta)
        self.ct_projectors: Optional[Projectors] = None
        self.ct_taps: Dict[str, Dict[str, int]] = {}
        self.ct_tap_info: Dict[str, Any] = {}
        self._ct_train_module: Optional[nn.Module] = None
        self._ct_plain_loss = None
        self.ct_gen = torch.Generator().manual_seed(int(np.random.randint(0, 2 ** 31 - 1)) + int(self.local_rank))
        self.nnx_register_log_keys(LOG_KEYS)

    # ------------------------------------------------------------------ helpers
    def _do_i_compile(self):
        return False  # the training forward goes through the wrapper and hooks; torch.compile is untested

    @property
    def ct_total_iterations(self) -> int:
        return int(self.num_epochs) * int(self.num_iterations_per_epoch)

    def ct_w_cps(self, t: Optional[int] = None) -> float:
        o = self.nnx_opts
        return cps_weight(self.ct_it if t is None else t, self.ct_total_iterations, o["cps_weight"],
                          o["rampup_fraction"])

    def ct_network_config(self) -> Dict[str, Any]:
        o = self.nnx_opts
        second_opts = {k: o[k] for k in CSUNET_OPTIONS} if o["second_network"] == "csunet" else {}
        return {"second": o["second_network"], "second_options": second_opts, "infer_mode": o["infer_mode"]}

    @property
    def dual(self) -> DualNet:
        return unwrap(self.network)

    def _autocast(self):
        return autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context()

    # ------------------------------------------------------------------ setup
    def initialize(self):
        cfg = self.ct_network_config()

        def build(plans_manager, configuration_manager, num_input_channels, num_output_channels,
                  enable_deep_supervision=True):
            return build_dual_network(plans_manager, configuration_manager, num_input_channels,
                                      num_output_channels, enable_deep_supervision, cfg)

        with patched(type(self), "build_network_architecture", staticmethod(build)):
            super().initialize()
        self.dual.rebuild_on_load = False  # an optimizer holds the parameters: a mismatching checkpoint is an error
        if hasattr(self.dual.b, "rebuild_on_load"):
            self.dual.b.rebuild_on_load = False
        wrapper = CrossTeachTrainWrapper(self.dual, self.ct_projectors, self.ct_taps)
        if self.is_ddp:
            # one DDP module for everything that gets gradients: both networks + projectors
            from torch.nn.parallel import DistributedDataParallel as DDP
            wrapper = DDP(wrapper, device_ids=[self.local_rank])
        self._ct_train_module = wrapper
        saved = self.enable_deep_supervision
        self.enable_deep_supervision = False
        try:  # nnU-Net's Dice + CE without deep supervision (validation, second network without DS outputs)
            self._ct_plain_loss = nnUNetTrainer._build_loss(self)
        finally:
            self.enable_deep_supervision = saved
        n_a = sum(p.numel() for p in self.dual.a.parameters())
        n_b = sum(p.numel() for p in self.dual.b.parameters())
        n_p = sum(p.numel() for p in self.ct_projectors.parameters()) if self.ct_projectors is not None else 0
        o = self.nnx_opts
        self.print_to_log_file(
            f"cross-teaching: CNN {n_a:,} parameters, second network '{o['second_network']}' {n_b:,}, projectors "
            f"{n_p:,}; infer_mode={o['infer_mode']}; w_cps={o['cps_weight']} (ramp over {o['rampup_fraction']} of "
            f"{self.ct_total_iterations} iterations); {o['optimizer']} lr cnn/second/proj = {o['lr_cnn']}/"
            f"{o['lr_second']}/{o['lr_proj']}; contrast={self.ct_contrast}; taps {self.ct_tap_info}")

    def ct_build_heads(self) -> None:
        """Projectors (MCSC / MCSCv2), built before the optimizer. Nothing for CTS."""

    def configure_optimizers(self):
        self.ct_build_heads()
        o = self.nnx_opts
        groups = [{"params": list(self.dual.a.parameters()), "lr": o["lr_cnn"], "name": "cnn"},
                  {"params": list(self.dual.b.parameters()), "lr": o["lr_second"], "name": "second"}]
        if self.ct_projectors is not None:
            groups.append({"params": list(self.ct_projectors.parameters()), "lr": o["lr_proj"], "name": "proj"})
        for g in groups:
            g["initial_lr"] = g["lr"]
        if o["optimizer"] == "adamw":
            optimizer = torch.optim.AdamW(groups, lr=o["lr_cnn"], weight_decay=self.weight_decay)
        else:
            optimizer = torch.optim.SGD(groups, lr=o["lr_cnn"], weight_decay=self.weight_decay, momentum=0.99,
                                        nesterov=True)
        return optimizer, PerGroupPolyLR(optimizer, self.ct_total_iterations, o["poly_exponent"])

    def set_deep_supervision_enabled(self, enabled: bool):
        self.dual.set_deep_supervision(enabled)

    def on_train_epoch_start(self):
        # nnU-Net's version steps its scheduler with the epoch; ours is per iteration (global t)
        self.network.train()
        if self.ct_projectors is not None:
            self.ct_projectors.train()
        self.lr_scheduler.set_iteration(self.ct_it)
        self.print_to_log_file("")
        self.print_to_log_file(f"Epoch {self.current_epoch}")
        lrs = [round(g["lr"], 7) for g in self.optimizer.param_groups]
        self.print_to_log_file(f"Current learning rates (cnn, second{', proj' if len(lrs) > 2 else ''}): {lrs}")
        self.logger.log("lrs", self.optimizer.param_groups[0]["lr"], self.current_epoch)

    # ------------------------------------------------------------------ training
    def _ct_batch(self, batch: dict):
        if "unlabeled" not in batch:
            raise NNXError("cross-teaching needs the unlabeled batch (batch['unlabeled']) from nnx's loader")
        xl = batch["data"].to(self.device, non_blocking=True)
        xu = batch["unlabeled"]["data"].to(self.device, non_blocking=True)
        target = batch["target"]
        target = [t.to(self.device, non_blocking=True) for t in target] if isinstance(target, list) else \
            target.to(self.device, non_blocking=True)
        return xl, xu, target

    def _ct_sup_loss(self, out, target) -> torch.Tensor:
        """nnU-Net's loss when ``out`` matches the deep-supervision targets, else Dice + CE at full resolution."""
        if isinstance(out, (list, tuple)) and isinstance(target, list) and len(out) == len(target):
            return self.loss(out, target)
        t = target[0] if isinstance(target, list) else target
        return self._ct_plain_loss(full_resolution(out), t)

    def _ct_labels_full(self, target) -> torch.Tensor:
        """Full-resolution labels (B_l, *S) of the labeled part; ignored voxels -> -1."""
        t = (target[0] if isinstance(target, list) else target)[:, 0].long()
        lm = self.label_manager
        if lm.has_ignore_label:
            t = torch.where(t == lm.ignore_label, torch.full_like(t, -1), t)
        return t

    def ct_losses(self, out: Dict[str, Any], target, bl: int) -> Dict[str, Any]:
        """Supervised and cross pseudo-supervision terms (float32) + what the contrastive losses need."""
        def part(o, sl):
            return [i[sl] for i in o] if isinstance(o, (list, tuple)) else o[sl]

        lab, unl = slice(0, bl), slice(bl, None)
        res: Dict[str, Any] = {"sup_a": self._ct_sup_loss(part(out["a"], lab), target),
                               "sup_b": self._ct_sup_loss(part(out["b"], lab), target)}
        fa, fb = full_resolution(out["a"]), full_resolution(out["b"])
        with torch.no_grad():
            pa, pb = torch.softmax(fa.detach().float(), 1), torch.softmax(fb.detach().float(), 1)
        ya_u, yb_u = pa[unl].argmax(1), pb[unl].argmax(1)          # hard pseudo-labels, no gradient
        res["cps_a"] = cps_dice_loss(fa[unl], yb_u)                 # the CNN learns from the second network
        res["cps_b"] = cps_dice_loss(fb[unl], ya_u)                 # and vice versa
        res.update(pa=pa, pb=pb, ya_u=ya_u, yb_u=yb_u)
        return res

    def ct_contrast_loss(self, feats: Dict[str, Dict[str, torch.Tensor]], labels_l: torch.Tensor,
                         parts: Dict[str, Any], bl: int) -> Optional[torch.Tensor]:
        """L_cl (summed over scales) of the subclass; None for CTS."""
        return None

    def _ct_optimizer_step(self, total: torch.Tensor) -> None:
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if self.grad_scaler is not None:
            self.grad_scaler.scale(total).backward()
            self.grad_scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(params, 12)
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            total.backward()
            torch.nn.utils.clip_grad_norm_(params, 12)
            self.optimizer.step()

    def train_step(self, batch: dict) -> dict:
        xl, xu, target = self._ct_batch(batch)
        bl = xl.shape[0]
        x = torch.cat([xl, xu], 0)
        self.optimizer.zero_grad(set_to_none=True)
        w = self.ct_w_cps()
        with self._autocast():
            out = self._ct_train_module(x, features=self.ct_contrast is not None)
            parts = self.ct_losses(out, target, bl)
        l_cl = None
        if self.ct_contrast is not None:  # float32, outside autocast (similarities / exp on many voxel pairs)
            l_cl = self.ct_contrast_loss(out["features"], self._ct_labels_full(target), parts, bl)
        total = parts["sup_a"] + parts["sup_b"] + w * (parts["cps_a"] + parts["cps_b"])
        if l_cl is not None:
            total = total + 2.0 * self.nnx_opts["cl_weight"] * l_cl
        self._ct_optimizer_step(total)
        self.ct_it += 1
        self.lr_scheduler.set_iteration(self.ct_it)
        nan = float("nan")
        return {"loss": total.detach().cpu().numpy(), "ct_sup_a": float(parts["sup_a"].detach()),
                "ct_sup_b": float(parts["sup_b"].detach()), "ct_cps_a": float(parts["cps_a"].detach()),
                "ct_cps_b": float(parts["cps_b"].detach()), "ct_cl": float(l_cl.detach()) if l_cl is not None else nan,
                "ct_w_cps": w}

    def on_train_epoch_end(self, train_outputs: List[dict]):
        super().on_train_epoch_end(train_outputs)
        col = collate_outputs(train_outputs)
        keys = ("ct_sup_a", "ct_sup_b", "ct_cps_a", "ct_cps_b", "ct_cl")
        means = np.array([float(np.nanmean(col[k])) if np.any(np.isfinite(col[k])) else float("nan") for k in keys])
        if self.is_ddp:
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, means)
            means = np.nanmean(np.stack(gathered), 0)
        for k, v in zip(("ct_loss_sup_a", "ct_loss_sup_b", "ct_loss_cps_a", "ct_loss_cps_b", "ct_loss_cl"), means):
            self.logger.log(k, float(v), self.current_epoch)
        self.logger.log("ct_w_cps", float(col["ct_w_cps"][-1]), self.current_epoch)
        self.print_to_log_file(f"cross-teaching: L_sup cnn {means[0]:.4f} second {means[1]:.4f} | L_cps cnn "
                               f"{means[2]:.4f} second {means[3]:.4f} | L_cl {means[4]:.4f} | w_cps "
                               f"{col['ct_w_cps'][-1]:.5f} | t={self.ct_it}")

    # ------------------------------------------------------------------ validation
    def validation_step(self, batch: dict) -> dict:
        """nnU-Net's validation step on the inference output (``infer_mode``) at full resolution; also the
        pseudo-Dice of each network (logged as ``ct_val_dice_a`` / ``_b``)."""
        target = batch["target"]
        batch = dict(batch, target=target[0] if isinstance(target, list) else target)
        dual = self.dual
        saved = (self.loss, self.enable_deep_supervision, dual.a.decoder.deep_supervision)
        self.loss, self.enable_deep_supervision = self._ct_plain_loss, False
        dual.set_deep_supervision(False)
        try:
            res = super().validation_step(batch)
            with torch.no_grad(), self._autocast():
                data = batch["data"].to(self.device, non_blocking=True)
                t = batch["target"].to(self.device, non_blocking=True)
                for name in ("a", "b"):
                    res[f"ct_counts_{name}"] = self._ct_counts(full_resolution(getattr(dual, name)(data)), t)
        finally:
            self.loss, self.enable_deep_supervision = saved[0], saved[1]
            dual.set_deep_supervision(saved[2])
        return res

    def _ct_counts(self, logits: torch.Tensor, target: torch.Tensor) -> np.ndarray:
        lm = self.label_manager
        pred = logits.argmax(1)
        t = target[:, 0].long()
        valid = (t != lm.ignore_label) if lm.has_ignore_label else torch.ones_like(t, dtype=torch.bool)
        out = np.zeros((3, lm.num_segmentation_heads - 1), dtype=np.int64)
        for c in range(1, lm.num_segmentation_heads):
            p, g = (pred == c) & valid, (t == c) & valid
            out[:, c - 1] = [int((p & g).sum()), int((p & ~g).sum()), int((~p & g).sum())]
        return out

    def on_validation_epoch_end(self, val_outputs: List[dict]):
        col = collate_outputs(val_outputs)
        counts = {n: np.sum(col.pop(f"ct_counts_{n}"), 0) for n in ("a", "b")}
        for o in val_outputs:
            o.pop("ct_counts_a", None)
            o.pop("ct_counts_b", None)
        super().on_validation_epoch_end(val_outputs)
        for n in ("a", "b"):
            c = counts[n]
            if self.is_ddp:
                parts = [None] * dist.get_world_size()
                dist.all_gather_object(parts, c)
                c = np.sum(np.stack(parts), 0)
            with np.errstate(invalid="ignore", divide="ignore"):
                d = 2 * c[0] / (2 * c[0] + c[1] + c[2])
            val = float(np.nanmean(d)) if np.any(np.isfinite(d)) else float("nan")
            self.logger.log(f"ct_val_dice_{n}", val, self.current_epoch)
        self.print_to_log_file(f"cross-teaching: pseudo-Dice cnn {self.logger.get_value('ct_val_dice_a', -1):.4f}, "
                               f"second {self.logger.get_value('ct_val_dice_b', -1):.4f}")

    # ------------------------------------------------------------------ checkpoints
    def nnx_extra_state(self) -> Dict[str, Any]:
        state: Dict[str, Any] = {"ct_version": 1, "iteration": int(self.ct_it), "contrast": self.ct_contrast}
        if self.ct_projectors is not None:
            state["projectors"] = self.ct_projectors.state_dict()
            state["taps"] = {n: dict(v) for n, v in self.ct_taps.items()}
        return state

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        super().load_checkpoint(filename_or_checkpoint)
        self.dual.set_infer_mode(self.nnx_opts["infer_mode"])  # this run's option, not the checkpoint's

    def nnx_load_extra_state(self, state: Dict[str, Any]) -> None:
        self.ct_it = int(state.get("iteration", 0))
        if self.ct_projectors is not None and state.get("projectors") is not None:
            self.ct_projectors.load_state_dict(state["projectors"])
        if self.lr_scheduler is not None:
            self.lr_scheduler.set_iteration(self.ct_it)
        self.nnx_register_log_keys(LOG_KEYS)


# ======================================================================================================== MCSC
class MCSCTrainer(CrossTeachingTrainer):
    nnx_summary = ("MCSC: cross-teaching + class-balanced multi-scale supervised contrastive loss on projected "
                   "features of both networks (cross labels), random 3D block groups; inference = the CNN")
    nnx_source = "Liu 2025 thesis ch. 4 (MCSC, BMVC 2023); spec shared/specs/001-liu-thesis.md §4, §7.3"
    nnx_options = {
        "cl_weight": _opt(1e-3, "w_cl, constant (thesis 1e-3); added to both networks' losses"),
        "cl_temperature": _opt(0.1, "tau of the contrastive loss (thesis 0.1)"),
        "cl_scales": _opt("full,coarse", "feature scales: full (finest decoder output), coarse (decoder output at "
                                         "in-plane stride ~cl_coarse_stride); thesis {256, 28} = full + 1/8"),
        "cl_coarse_stride": _opt(8, "in-plane stride of the coarse scale (thesis 1/8)"),
        "cl_labeled_only_fraction": _opt(0.075, "fraction of the iterations in which the contrastive loss uses "
                                                "the labeled images only (MCSC code: 3000 of 40000; 0 = never)"),
        "proj_hidden": _opt(256, "hidden width of the projectors (thesis 256)"),
        "proj_dim": _opt(128, "output width of the projectors (thesis 128)"),
        "cl_block": _opt(6, "MCSC: block edge h' (voxels per axis, clamped to the map) at the full scale"),
        "cl_block_coarse": _opt(4, "MCSC: block edge h' at the coarse scale"),
        "cl_groups": _opt(16, "MCSC: at most this many random non-background block groups per scale and iteration"),
    }
    # + projected features of the sampled voxels only (cl_groups x 2(B_l+B_u) x h'^3 per scale) and one group's
    # similarity matrix at a time in the graph (16 groups x (8 x 216)^2 floats x ~4 tensors = 0.8 GB at the
    # defaults, independent of the patch): static_gb + 0.8.
    nnx_memory = {"activation_factor": 2.0, "static_gb": 1.4, "extra_architectures": _second_memory(2.0)}
    ct_contrast = "mcsc"

    @classmethod
    def nnx_check_options(cls, v: Dict[str, Any], src: str) -> None:
        super().nnx_check_options(v, src)
        scales = [s.strip() for s in str(v["cl_scales"]).split(",") if s.strip()]
        if not scales or any(s not in SCALES for s in scales) or len(set(scales)) != len(scales):
            raise NNXError(f"option 'cl_scales' must be a comma list of {', '.join(SCALES)}, got "
                           f"'{v['cl_scales']}'", src)
        for k in ("cl_temperature", "cl_weight"):
            if not v[k] > 0:
                raise NNXError(f"option '{k}' must be > 0, got {v[k]}", src)
        if not 0.0 <= v["cl_labeled_only_fraction"] <= 1.0:
            raise NNXError("option 'cl_labeled_only_fraction' must be in [0, 1]", src)
        for k in ("proj_hidden", "proj_dim", "cl_coarse_stride") + tuple(
                k for k in ("cl_block", "cl_block_coarse", "cl_groups") if k in v):
            if v[k] < 1:
                raise NNXError(f"option '{k}' must be >= 1, got {v[k]}", src)

    @property
    def ct_scales(self) -> List[str]:
        return [s.strip() for s in str(self.nnx_opts["cl_scales"]).split(",") if s.strip()]

    def ct_build_heads(self) -> None:
        if self.ct_projectors is not None:
            return
        o = self.nnx_opts
        dual = self.dual
        example = torch.zeros((1, self.num_input_channels, *self.configuration_manager.patch_size),
                              device=self.device)
        taps, channels = {}, {}
        for name in ("a", "b"):
            info = probe_taps(getattr(dual, name), example, o["cl_coarse_stride"])
            taps[name] = {s: info[s][0] for s in self.ct_scales}
            channels[name] = {s: info[s][1] for s in self.ct_scales}
            self.ct_tap_info[name] = {s: {"stage": info[s][0], "channels": info[s][1], "stride": list(info[s][2])}
                                      for s in self.ct_scales}
        self.ct_taps.update(taps)
        self.ct_projectors = Projectors(channels["a"], channels["b"], o["proj_hidden"], o["proj_dim"],
                                        norm_b=o["second_network"] == "csunet").to(self.device)

    def ct_labeled_only(self) -> bool:
        return self.ct_it < self.nnx_opts["cl_labeled_only_fraction"] * self.ct_total_iterations

    def ct_cross_labels(self, labels_l: torch.Tensor, parts: Dict[str, Any], labeled_only: bool
                        ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Full-resolution labels of the CNN's and the second network's maps: GT on labeled images; on unlabeled
        images the *other* network's pseudo-label (CroLab)."""
        if labeled_only:
            return labels_l, labels_l
        return torch.cat([labels_l, parts["yb_u"]]), torch.cat([labels_l, parts["ya_u"]])

    def _ct_maps(self, feats, scale: str, n: int):
        """Raw features of both networks at ``scale`` for the first ``n`` images; b on a's grid if they differ."""
        fa, fb = feats["a"][scale][:n], feats["b"][scale][:n]
        if fb.shape[2:] != fa.shape[2:]:  # documented: nearest resampling of b's features to a's grid
            fb = torch.nn.functional.interpolate(fb, size=fa.shape[2:], mode="nearest")
        return fa, fb

    def ct_contrast_loss(self, feats, labels_l, parts, bl):
        o = self.nnx_opts
        labeled_only = self.ct_labeled_only()
        lab_a, lab_b = self.ct_cross_labels(labels_l, parts, labeled_only)
        n = lab_a.shape[0]
        total = None
        for scale in self.ct_scales:
            fa, fb = self._ct_maps(feats, scale, n)
            size = fa.shape[2:]
            labels = torch.cat([resample_nearest(lab_a, size), resample_nearest(lab_b, size)])   # (2n, *S)
            block = o["cl_block"] if scale == "full" else o["cl_block_coarse"]
            pos, glab = block_group_positions(labels, block, o["cl_groups"], self.ct_gen)       # (2n, G, v)
            if pos.shape[1] == 0:
                continue
            za = self.ct_projectors.project(scale, "a", gather_voxels(fa, pos[:n]))             # (n, G, v, d)
            zb = self.ct_projectors.project(scale, "b", gather_voxels(fb, pos[n:]))
            z = torch.cat([za, zb]).permute(1, 0, 2, 3).flatten(1, 2)                          # (G, 2n·v, d)
            y = glab.permute(1, 0, 2).flatten(1)                                                # (G, 2n·v)
            losses = []
            for g in range(z.shape[0]):
                keep = y[g] >= 0
                losses.append(balanced_supcon_loss(z[g][keep], y[g][keep], o["cl_temperature"]))
            l_s = torch.stack(losses).mean()
            total = l_s if total is None else total + l_s
        return total if total is not None else labels_l.new_zeros((), dtype=torch.float32)


# ====================================================================================================== MCSCv2
class MCSCv2Trainer(MCSCTrainer):
    nnx_summary = ("MCSCv2: cross-teaching + certainty-guided contrastive loss (confident, certain anchors; "
                   "class-mean positives; per-class FIFO memory banks of rank-selected negatives)")
    nnx_source = "Liu 2025 thesis ch. 5 (MCSCv2); spec shared/specs/001-liu-thesis.md §5, §7.3"
    nnx_options = {
        "cl_labeled_only_fraction": _opt(0.0, "fraction of iterations using labeled images only (MCSCv2: none; "
                                              "the certainty schedule handles early noise)"),
        "v2_conf": _opt(0.9, "h: anchors need a (cross) top-1 probability > h (thesis 0.9)"),
        "v2_beta0": _opt(0.2, "beta_0: initial fraction of uncertain unlabeled voxels, beta(t) = beta_0 (1 - t/T)"),
        "v2_anchors": _opt(1000, "anchors sampled per class and scale (thesis 1000)"),
        "v2_negatives": _opt(500, "negatives sampled per class from its bank (thesis 500)"),
        "v2_bank_size": _opt(60000, "K: FIFO bank size per class and scale (thesis best 60k)"),
        "v2_push_fraction": _opt(0.25, "t_b: at most t_b*K candidates pushed per class and update (thesis 0.25)"),
        "v2_rank_low": _opt(1, "r^l of Eq. 5.5/5.6 (thesis 1)"),
        "v2_rank_high": _opt(-1, "r^h of Eq. 5.6; -1 = max(r^l + 1, C - 2): the thesis' 2 for ACDC (C=4) and 7 "
                                 "for Synapse (C=9)"),
        "v2_entropy_samples": _opt(1000000, "entropy percentile from at most this many voxels (kthvalue)"),
        "v2_save_banks": _opt(False, "store the memory banks in checkpoints (else they refill after a resume)"),
    }
    # MCSC's heads, no block groups; per class and scale up to 1000 anchors (with gradient) x 500 negatives, the
    # class-mean positives (no gradient, chunked) and the banks: C x scales x K x 128 fp16 (C = 9, 2 scales, 60k:
    # 0.28 GB, spec §7.3).
    nnx_memory = {"activation_factor": 2.0, "static_gb": 1.0, "extra_architectures": _second_memory(2.0)}
    ct_contrast = "mcscv2"

    @classmethod
    def nnx_check_options(cls, v: Dict[str, Any], src: str) -> None:
        super().nnx_check_options(v, src)

        def need(cond, msg):
            if not cond:
                raise NNXError(msg, src)

        need(0.0 <= v["v2_conf"] < 1.0, f"option 'v2_conf' must be in [0, 1), got {v['v2_conf']}")
        need(0.0 <= v["v2_beta0"] <= 1.0, f"option 'v2_beta0' must be in [0, 1], got {v['v2_beta0']}")
        for k in ("v2_anchors", "v2_negatives", "v2_bank_size", "v2_entropy_samples", "v2_rank_low"):
            need(v[k] >= 1, f"option '{k}' must be >= 1, got {v[k]}")
        need(0.0 < v["v2_push_fraction"] <= 1.0, "option 'v2_push_fraction' must be in (0, 1]")
        need(v["v2_rank_high"] == -1 or v["v2_rank_high"] >= 1, "option 'v2_rank_high' must be >= 1 or -1 (auto)")

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.ct_banks: Dict[str, ClassMemoryBank] = {}
        self.ct_last_gamma = float("nan")

    @property
    def ct_num_classes(self) -> int:
        return int(self.label_manager.num_segmentation_heads)

    @property
    def ct_rank_high(self) -> int:
        o, c = self.nnx_opts, self.ct_num_classes
        return int(o["v2_rank_high"]) if o["v2_rank_high"] != -1 else max(int(o["v2_rank_low"]) + 1, c - 2)

    def ct_build_heads(self) -> None:
        super().ct_build_heads()
        if not self.ct_banks:
            o = self.nnx_opts
            for s in self.ct_scales:
                self.ct_banks[s] = ClassMemoryBank(self.ct_num_classes, o["v2_bank_size"], o["proj_dim"],
                                                   o["v2_push_fraction"], device=self.device)

    def ct_beta(self) -> float:
        return uncertain_fraction(self.ct_it, self.ct_total_iterations, self.nnx_opts["v2_beta0"])

    def ct_certainty(self, labels_l: torch.Tensor, parts: Dict[str, Any], bl: int, labeled_only: bool):
        """Per map (CNN maps first, then the second network's; images labeled first): label, (cross) top-1
        probability, entropy and class ranks at full resolution, the unlabeled flag and γ_t. The maps of one network
        take label AND probabilities from the *other* network (cross), GT labels on labeled images."""
        pa, pb = parts["pa"], parts["pb"]
        n = pa.shape[0] if not labeled_only else bl
        pa, pb = pa[:n], pb[:n]
        ha, hb = entropy(pa), entropy(pb)
        unl_img = torch.arange(n, device=pa.device) >= bl
        gamma = entropy_threshold(torch.cat([ha[bl:], hb[bl:]]), self.ct_beta(), self.nnx_opts["v2_entropy_samples"],
                                  self.ct_gen) if n > bl else float("inf")
        lab_a, lab_b = self.ct_cross_labels(labels_l, parts, labeled_only)
        # CNN maps <- second network's probabilities; second network's maps <- the CNN's
        probs = torch.cat([pb, pa])
        return {"labels": torch.cat([lab_a, lab_b]), "maxprob": probs.amax(1), "entropy": torch.cat([hb, ha]),
                "ranks": class_ranks(probs), "unlabeled": torch.cat([unl_img, unl_img]), "gamma": gamma, "n": n}

    def _ct_project_flat(self, scale: str, fa: torch.Tensor, fb: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Projections of flat voxel indices into [CNN maps; second maps] (2n·S), in the order of ``idx``."""
        n, s = fa.shape[0], int(np.prod(fa.shape[2:]))
        out = torch.empty((idx.numel(), self.ct_projectors.out_dim), device=fa.device, dtype=torch.float32)
        is_a = idx < n * s
        for name, fmap, mask, off in (("a", fa, is_a, 0), ("b", fb, ~is_a, n * s)):
            if mask.any():
                flat = fmap.movedim(1, -1).reshape(-1, fmap.shape[1])
                out[mask] = self.ct_projectors.project(scale, name, flat[idx[mask] - off])
        return out

    def ct_contrast_loss(self, feats, labels_l, parts, bl):
        o = self.nnx_opts
        cert = self.ct_certainty(labels_l, parts, bl, self.ct_labeled_only())
        self.ct_last_gamma = cert["gamma"]
        n, c_num, gen = cert["n"], self.ct_num_classes, self.ct_gen
        total = None
        for scale in self.ct_scales:
            fa, fb = self._ct_maps(feats, scale, n)
            size = fa.shape[2:]
            lab = resample_nearest(cert["labels"], size).reshape(-1)
            maxp = resample_nearest(cert["maxprob"], size).reshape(-1)
            ent = resample_nearest(cert["entropy"], size).reshape(-1)
            ranks = resample_nearest(cert["ranks"], size).movedim(1, -1).reshape(-1, c_num)
            unl = cert["unlabeled"].view(-1, *([1] * len(size))).expand(-1, *size).reshape(-1)
            valid = lab >= 0
            is_anchor = anchor_mask(maxp, ent, unl, o["v2_conf"], cert["gamma"]) & valid
            bank = self.ct_banks[scale]
            with torch.no_grad():
                # this step's bank candidates per class (at most t_b*K each), then ONE no-grad projection pass over
                # every anchor (class means) and every candidate: a voxel is projected once, not once per class
                push = {}
                for c in range(c_num):
                    cand = torch.nonzero(negative_mask(c, lab, ranks[:, c], ent, unl, cert["gamma"], o["v2_rank_low"],
                                                       self.ct_rank_high, c_num) & valid).flatten()
                    if cand.numel() > bank.max_push:
                        cand = cand[torch.randperm(cand.numel(), generator=gen)[: bank.max_push].to(cand.device)]
                    push[c] = cand
                keep = torch.unique(torch.cat(list(push.values())))
                need = torch.unique(torch.cat([torch.nonzero(is_anchor).flatten(), keep]))
                sums, counts, kept = stream_projections(lambda i: self._ct_project_flat(scale, fa, fb, i), need,
                                                        lab[need], is_anchor[need], keep, c_num,
                                                        self.ct_projectors.out_dim, keep_dtype=bank.feats.dtype)
            anchors, positives, negs, neg_labels = {}, {}, {}, {}
            for c in range(c_num):
                if int(counts[c]) == 0:
                    continue
                idx = torch.nonzero(is_anchor & (lab == c)).flatten()
                positives[c] = sums[c] / counts[c]                                # a_p: mean of ALL anchors of c
                pick = idx[torch.randperm(idx.numel(), generator=gen)[: o["v2_anchors"]].to(idx.device)]
                anchors[c] = self._ct_project_flat(scale, fa, fb, pick)
                negs[c], neg_labels[c] = bank.sample(c, o["v2_negatives"], gen)
            l_s = certainty_contrast_loss(anchors, positives, negs, neg_labels, o["cl_temperature"])
            # bank update after the loss (spec §5.2 recommendation): this step's candidates, detached
            for c, cand in push.items():
                if cand.numel():
                    bank.push(c, kept[torch.searchsorted(keep, cand)], lab[cand], gen)
            if l_s is not None:
                total = l_s if total is None else total + l_s
        return total if total is not None else labels_l.new_zeros((), dtype=torch.float32)

    def nnx_extra_state(self) -> Dict[str, Any]:
        state = super().nnx_extra_state()
        if self.nnx_opts["v2_save_banks"] and self.ct_banks:
            state["banks"] = {s: b.state_dict() for s, b in self.ct_banks.items()}
        return state

    def nnx_load_extra_state(self, state: Dict[str, Any]) -> None:
        super().nnx_load_extra_state(state)
        for s, b in (state.get("banks") or {}).items():
            if s in self.ct_banks:
                self.ct_banks[s].load_state_dict(b)


__all__ = ["CrossTeachingTrainer", "MCSCTrainer", "MCSCv2Trainer", "CrossTeachTrainWrapper", "LOG_KEYS"]
