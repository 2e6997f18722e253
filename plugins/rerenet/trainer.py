"""``ReReNetTrainer`` and variants: ReReNet (Li 2026 thesis ch. 3, spec ``shared/specs/000-li-thesis.md`` M1) on
nnU-Net.

Input: the image plus the one-hot coarse (non-expert) mask, appended by nnx's loader after augmentation
(``nnx_requires["inputs"] = ["coarse"]``; spatial augmentation is shared with image and label). Training samples
expert-tier cases only (they have the paired expert label; coarse-tier cases would teach the identity).

One training iteration (Eq. 3.1-3.6; ``ŷ^0`` = the coarse mask of the batch)::

    for k = 1..K:
        z^k = f_θ(x ⊕ onehot(ŷ^{k-1}))                     # one pass of the planned nnU-Net network
        ℓ^k = ŵ_k · ℓ(z^k, y, ŷ^{k-1})                      # DiscrepancyAwareLoss (Dice only in warm-up)
        step_mode=stagewise: optimizer step on ℓ^k          # thesis' primary reading: K updates per batch
        ŷ^k = argmax z^k (hard, detached)
    step_mode=summed: one optimizer step on Σ_k ℓ^k

Validation (nnU-Net's pseudo-Dice, checkpoint selection, final validation, ``nnx_predict``) uses the final stage:
the network runs all K stages itself in eval mode (:class:`~nnx_plugins.rerenet.network.RecurrentRefiner`).
See ``README.md`` next to this file for options and design choices.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List

import numpy as np
import torch
from torch import autocast
from torch import distributed as dist

from nnunetv2.utilities.collate_outputs import collate_outputs
from nnunetv2.utilities.helpers import dummy_context

from nnx.errors import NNXError
from nnx.options import Option
from nnx.trainer_base import nnxTrainer

from .loss import DS_POOLS, STAGE_NORMS, DiscrepancyAwareLoss, stage_weights
from .network import build_recurrent_network, unwrap

STEP_MODES = ("stagewise", "summed")

#: per-epoch log keys added to nnU-Net's logger (saved in the checkpoint): per-stage mean training loss (unweighted
#: ℓ of Eq. 3.5) and per-stage validation pseudo-Dice (global over the epoch's validation batches, mean over the
#: foreground classes), whose first entry is the coarse input's own pseudo-Dice
LOG_KEYS = ("rerenet_train_loss_stages", "rerenet_val_dice_stages", "rerenet_warmup")


class ReReNetTrainer(nnxTrainer):
    nnx_summary = ("ReReNet: the planned U-Net applied K times, each stage refining the previous stage's mask "
                   "(stage 1: the coarse mask), discrepancy-weighted Dice+CE loss; needs coarse masks at inference")
    nnx_source = "Li 2026 thesis ch. 3 (ReReNet, BIBM 2024); spec shared/specs/000-li-thesis.md M1"
    nnx_requires = {"tiers": ["expert"], "inputs": ["coarse"]}
    nnx_options = {
        "K": Option(5, "number of recurrent stages K (training and inference; stored with the weights)"),
        "lambda_discr": Option(10.0, "lambda: extra CE weight on voxels where the previous stage's mask differs "
                                     "from the expert label, w = lambda*[prev != y] + 1 (Eq. 3.3)"),
        "alpha": Option(0.8, "alpha: loss = alpha*Dice + (1-alpha)*weighted CE (Eq. 3.5)"),
        "sigma": Option(1.0, "sigma: stage weight max(sigma, 2^k) (Eq. 3.6)"),
        "stage_index_base": Option(1, "k of the first stage in max(sigma, 2^k): 1 (Eq. 3.1, weights 2,4,..) or 0 "
                                      "(weights 1,2,..)", int, choices=(0, 1)),
        "stage_weight_norm": Option("mean", "normalise the stage weights: mean (they average 1), sum (they sum to "
                                            "1) or none (the thesis' raw factors)", str, choices=STAGE_NORMS),
        "warmup_fraction": Option(0.2, "fraction of the epochs trained with the Dice loss only (thesis: 20 of 100)"),
        "step_mode": Option("stagewise", "stagewise: one optimizer step per stage (thesis' primary reading); summed: "
                                         "one step on the sum of the stage losses", str, choices=STEP_MODES),
        "ds_pool": Option("max", "how the discrepancy map reaches the deep-supervision scales: max (max-pooling) or "
                                 "nearest (like nnU-Net's target downsampling)", str, choices=DS_POOLS),
        "deep_supervision": Option(True, "nnU-Net's deep supervision (the thesis has none)", bool),
    }
    # stagewise (default): every stage's forward + backward finishes before the next stage starts, so the peak is
    # one stock step plus a hard mask (factor 1.0). step_mode=summed keeps all K graphs until the single backward:
    # activation_factor K (5.0 at the default K) -- plan with a smaller budget for that mode (see README).
    nnx_memory = {"activation_factor": 1.0, "static_gb": 0.0}
    nnx_inference_network_is_stock = False
    #: options a variant pins (checked in nnx_check_options)
    rerenet_fixed: Dict[str, Any] = {}

    @classmethod
    def nnx_check_options(cls, values: Dict[str, Any], src: str) -> None:
        super().nnx_check_options(values, src)
        if values["K"] < 1:
            raise NNXError(f"option 'K' must be >= 1, got {values['K']}", src)
        if not (values["lambda_discr"] >= 0 and math.isfinite(values["lambda_discr"])):
            raise NNXError(f"option 'lambda_discr' must be >= 0, got {values['lambda_discr']}", src)
        if not 0.0 <= values["alpha"] <= 1.0:
            raise NNXError(f"option 'alpha' must be in [0, 1], got {values['alpha']}", src)
        if not (values["sigma"] > 0 and math.isfinite(values["sigma"])):
            raise NNXError(f"option 'sigma' must be > 0, got {values['sigma']}", src)
        if not 0.0 <= values["warmup_fraction"] <= 1.0:
            raise NNXError(f"option 'warmup_fraction' must be in [0, 1], got {values['warmup_fraction']}", src)
        for key, val in cls.rerenet_fixed.items():
            if values[key] != val:
                raise NNXError(f"{cls.__name__} fixes {key}={val} (got {values[key]}); use ReReNetTrainer --opt "
                               f"{key}=... for other values", src)

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True):
        # the stored buffer 'num_stages' overrides the default K when a checkpoint is loaded; the trainer sets it
        # from the option K in initialize()
        return build_recurrent_network(plans_manager, configuration_manager, num_input_channels,
                                       num_output_channels, enable_deep_supervision)

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        lm = self.label_manager
        if lm.has_regions:
            raise NNXError("ReReNet refines label maps: region-based datasets (list values in 'labels') are not "
                           "supported")
        if self.is_cascaded:
            raise NNXError(f"ReReNet does not support the cascaded configuration '{configuration}'")
        coarse = self._nnx_spec().entry("coarse")  # one-line error if the dataset declares no coarse masks
        if list(coarse.foreground_values) != list(range(1, lm.num_segmentation_heads)):
            raise NNXError(f"coarse mask labels {coarse.foreground_values} do not match the segmentation outputs "
                           f"1..{lm.num_segmentation_heads - 1}")
        o = self.nnx_opts
        self.enable_deep_supervision = bool(o["deep_supervision"])
        self.rerenet_K = int(o["K"])
        self.rerenet_stage_weights = stage_weights(self.rerenet_K, o["sigma"], o["stage_index_base"],
                                                   o["stage_weight_norm"])
        self.nnx_register_log_keys(LOG_KEYS)

    # ------------------------------------------------------------------ helpers
    @property
    def rerenet_warmup_epochs(self) -> int:
        """Number of Dice-only epochs at the start: round(warmup_fraction * epochs), half up."""
        return int(math.floor(self.nnx_opts["warmup_fraction"] * self.num_epochs + 0.5))

    def rerenet_dice_only(self) -> bool:
        return self.current_epoch < self.rerenet_warmup_epochs

    def _rerenet_gather_sum(self, arr: np.ndarray) -> np.ndarray:
        if not self.is_ddp:
            return arr
        parts = [None for _ in range(dist.get_world_size())]
        dist.all_gather_object(parts, arr)
        return np.sum(np.stack(parts), 0)

    def _autocast(self):
        return autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context()

    # ------------------------------------------------------------------ setup
    def initialize(self):
        if self.is_ddp and self.nnx_opts["step_mode"] == "summed":
            raise NNXError("step_mode=summed runs K forward passes of the DDP-wrapped network before one backward, "
                           "which DDP does not support; use step_mode=stagewise with several GPUs")
        super().initialize()
        unwrap(self.network).set_num_stages(self.rerenet_K)
        o = self.nnx_opts
        self.print_to_log_file(
            f"ReReNet: K={self.rerenet_K} stages, step_mode={o['step_mode']}, lambda={o['lambda_discr']}, "
            f"alpha={o['alpha']}, stage weights {[round(w, 4) for w in self.rerenet_stage_weights]} "
            f"(sigma={o['sigma']}, k from {o['stage_index_base']}, norm={o['stage_weight_norm']}), Dice-only warm-up "
            f"{self.rerenet_warmup_epochs} of {self.num_epochs} epochs, deep supervision "
            f"{self.enable_deep_supervision} (discrepancy map pooling: {o['ds_pool']})")

    def _build_loss(self):
        ds_weights = None
        if self.enable_deep_supervision:
            n = len(self._get_deep_supervision_scales())
            w = np.array([1 / (2 ** i) for i in range(n)])
            w[-1] = 1e-6 if self.is_ddp else 0.0  # nnU-Net's DS weights (see nnUNetTrainer._build_loss)
            ds_weights = (w / w.sum()).tolist()
        o = self.nnx_opts
        return DiscrepancyAwareLoss(alpha=o["alpha"], lam=o["lambda_discr"],
                                    batch_dice=self.configuration_manager.batch_dice,
                                    ignore_label=self.label_manager.ignore_label, ds_weights=ds_weights,
                                    ds_pool=o["ds_pool"], ddp=self.is_ddp)

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        super().load_checkpoint(filename_or_checkpoint)
        net = unwrap(self.network)
        if net.K != self.rerenet_K:
            self.print_to_log_file(f"ReReNet: checkpoint was trained with K={net.K}; continuing with K="
                                   f"{self.rerenet_K} (option K)")
            net.set_num_stages(self.rerenet_K)
        self.nnx_register_log_keys(LOG_KEYS)

    # ------------------------------------------------------------------ training
    def _rerenet_step(self, loss: torch.Tensor) -> None:
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            self.grad_scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
            self.optimizer.step()

    def train_step(self, batch: dict) -> dict:
        data, target = self.nnx_batch_on_device(batch)
        net = unwrap(self.network)
        image, prev = net.split(data)  # prev = ŷ^0, the coarse mask
        dice_only = self.rerenet_dice_only()
        stagewise = self.nnx_opts["step_mode"] == "stagewise"
        stage_losses: List[torch.Tensor] = []
        total = 0.0
        inp = data
        self.optimizer.zero_grad(set_to_none=True)
        for k, w in enumerate(self.rerenet_stage_weights):
            if stagewise and k > 0:
                self.optimizer.zero_grad(set_to_none=True)
            with self._autocast():
                out = self.network(inp)  # train mode: one stage
                loss = self.loss(out, target, prev, dice_only)
            if stagewise:
                self._rerenet_step(w * loss)
            else:
                total = total + w * loss
            stage_losses.append(loss.detach())
            prev = net.hard_mask(out)
            del out
            if k + 1 < self.rerenet_K:
                inp = net.stage_input(image, prev)
        if not stagewise:
            self._rerenet_step(total)
        per_stage = torch.stack(stage_losses).float().cpu().numpy()
        weights = np.asarray(self.rerenet_stage_weights)
        # nnU-Net's 'train_losses': the stage losses averaged with the stage weights (comparable to 'val_losses')
        return {"loss": np.array(float((weights * per_stage).sum() / weights.sum())), "stage_losses": per_stage}

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        self.logger.log("rerenet_warmup", int(self.rerenet_dice_only()), self.current_epoch)

    def on_train_epoch_end(self, train_outputs: List[dict]):
        super().on_train_epoch_end(train_outputs)
        stage = np.mean(collate_outputs(train_outputs)["stage_losses"], 0)
        if self.is_ddp:
            stage = self._rerenet_gather_sum(stage) / dist.get_world_size()
        self.logger.log("rerenet_train_loss_stages", [float(v) for v in stage], self.current_epoch)

    # ------------------------------------------------------------------ validation
    def _rerenet_counts(self, masks: List[torch.Tensor], target: torch.Tensor) -> np.ndarray:
        """Hard tp/fp/fn per foreground class of each mask vs the target: ``(len(masks), 3, C_fg)``."""
        lm = self.label_manager
        t = target[:, 0].long()
        valid = (t != lm.ignore_label) if lm.has_ignore_label else torch.ones_like(t, dtype=torch.bool)
        out = np.zeros((len(masks), 3, lm.num_segmentation_heads - 1), dtype=np.int64)
        for i, m in enumerate(masks):
            for c in range(1, lm.num_segmentation_heads):
                p = (m == c) & valid
                g = (t == c) & valid
                out[i, 0, c - 1] = int((p & g).sum())
                out[i, 1, c - 1] = int((p & ~g).sum())
                out[i, 2, c - 1] = int((~p & g).sum())
        return out

    def validation_step(self, batch: dict) -> dict:
        data, target = self.nnx_batch_on_device(batch)
        net = unwrap(self.network)
        dice_only = self.rerenet_dice_only()
        with self._autocast():
            outputs, masks = net.refine(data, self.rerenet_K, keep_all=True)  # eval mode: K stages
            losses = [self.loss(o, target, masks[k], dice_only) for k, o in enumerate(outputs)]
        weights = self.rerenet_stage_weights
        loss = sum(w * float(lk) for w, lk in zip(weights, losses)) / sum(weights)
        counts = self._rerenet_counts(masks, target[0] if isinstance(target, list) else target)
        # the final stage's hard tp/fp/fn: nnU-Net's pseudo-Dice (checkpoint_best) measures ŷ^K
        return {"loss": np.array(loss), "tp_hard": counts[-1, 0], "fp_hard": counts[-1, 1],
                "fn_hard": counts[-1, 2], "stage_counts": counts}

    def on_validation_epoch_end(self, val_outputs: List[dict]):
        super().on_validation_epoch_end(val_outputs)
        counts = self._rerenet_gather_sum(np.sum(collate_outputs(val_outputs)["stage_counts"], 0))
        tp, fp, fn = counts[:, 0].astype(float), counts[:, 1].astype(float), counts[:, 2].astype(float)
        with np.errstate(invalid="ignore", divide="ignore"):
            dice = 2 * tp / (2 * tp + fp + fn)
        per_stage = [float(np.nanmean(d)) if np.any(np.isfinite(d)) else float("nan") for d in dice]
        self.logger.log("rerenet_val_dice_stages", per_stage, self.current_epoch)
        train = self.logger.get_value("rerenet_train_loss_stages", step=-1)
        self.print_to_log_file(
            "ReReNet: pseudo-Dice coarse input {:.4f} -> stages {} | train loss per stage {}{}".format(
                per_stage[0], [round(d, 4) for d in per_stage[1:]], [round(v, 4) for v in train],
                " (Dice-only warm-up)" if self.rerenet_dice_only() else ""))


class ReReNetTrainer_thesisHP(ReReNetTrainer):
    """ReReNet with the thesis' optimisation: Adam, lr 1e-4, weight decay 1e-5, 100 epochs (20 warm-up)."""
    nnx_summary = "ReReNet with the thesis' optimiser: Adam lr 1e-4, weight decay 1e-5, 100 epochs"
    # Adam keeps two moment buffers where nnU-Net's SGD keeps one momentum buffer: one more copy of the weights
    # (~31 M parameters for a 3d_fullres nnU-Net at 8 GB: 0.13 GB)
    nnx_memory = {"activation_factor": 1.0, "static_gb": 0.13}
    nnx_options = {
        "epochs": Option(100, "number of epochs (thesis: 100)", int, attr="num_epochs"),
        "initial_lr": Option(1e-4, "initial learning rate of Adam (thesis: 1e-4)", float, attr="initial_lr"),
    }

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.weight_decay = 1e-5

    def configure_optimizers(self):
        from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
        optimizer = torch.optim.Adam(self.network.parameters(), self.initial_lr, weight_decay=self.weight_decay)
        # the thesis gives no schedule ("initial lr"): nnU-Net's poly decay over the run
        return optimizer, PolyLRScheduler(optimizer, self.initial_lr, self.num_epochs)


class ReReNetTrainer_noDiscr(ReReNetTrainer):
    """Ablation (Table 3.3 'non-expert input + recurrence'): ReReNet without the discrepancy weight (lambda=0)."""
    nnx_summary = "ReReNet ablation: recurrence and coarse input, no discrepancy weight (lambda=0)"
    nnx_options = {"lambda_discr": Option(0.0, "fixed to 0 in this variant")}
    rerenet_fixed = {"lambda_discr": 0.0}


class ReReNetTrainer_K1_noDiscr(ReReNetTrainer):
    """The honest baseline: nnU-Net with the coarse mask as an extra input (K=1, lambda=0), ReReNet's loss
    weighting (alpha, Dice-only warm-up) otherwise unchanged."""
    nnx_summary = ("baseline: nnU-Net + coarse mask as input, no recurrence (K=1), no discrepancy weight; "
                   "ReReNet's alpha-weighted Dice+CE and warm-up")
    nnx_options = {"K": Option(1, "fixed to 1 in this variant"),
                   "lambda_discr": Option(0.0, "fixed to 0 in this variant")}
    rerenet_fixed = {"K": 1, "lambda_discr": 0.0}


__all__ = ["ReReNetTrainer", "ReReNetTrainer_thesisHP", "ReReNetTrainer_noDiscr", "ReReNetTrainer_K1_noDiscr",
           "LOG_KEYS", "STEP_MODES"]
