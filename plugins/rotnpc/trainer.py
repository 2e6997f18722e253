"""``RotNPCTrainer``: 3DRotNPC (Li 2026 thesis ch. 4) in one nnU-Net training run.

Epochs ``[0, P)`` (pretext phase): the nnU-Net encoder (``network.encoder``, bottleneck included) and a
:class:`~nnx_plugins.rotnpc.head.RotationHead` that lives outside ``self.network`` learn to predict the in-plane
rotation class of every slice of the training patches (:func:`~nnx_plugins.rotnpc.rotation.rotate_slices`,
Eq. 4.1) with the batch inverse-frequency weighted CE (:func:`~nnx_plugins.rotnpc.loss.rotation_loss`, Eq. 4.2-4.3).
Segmentation labels are not used; the decoder gets no gradient and stays at its initialisation.

Epochs ``[P, epochs)`` (fine-tune phase): a fresh optimizer from nnU-Net's ``configure_optimizers`` (SGD, momentum
0.99, Nesterov) with its own poly schedule over the remaining epochs, and stock nnU-Net segmentation training of the
whole network. ``network_weights`` in every checkpoint is the stock nnU-Net network; the head, its optimizer and the
phase go to the checkpoint key ``nnx_extra``. See ``README.md`` next to this file for the design choices.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Iterable, List

import numpy as np
import torch
from torch import autocast
from torch import distributed as dist

from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from nnunetv2.utilities.collate_outputs import collate_outputs
from nnunetv2.utilities.helpers import dummy_context

from nnx import options as nnx_options
from nnx.errors import NNXError
from nnx.options import Option
from nnx.trainer_base import nnxTrainer

from .head import RotationHead, build_rotation_head, encoder_of
from .loss import balanced_accuracy, confusion_matrix, rotation_loss
from .rotation import NONSQUARE_MODES, NUM_ROTATION_CLASSES, rotate_slices

PRETEXT = "pretext"
FINETUNE = "finetune"

#: per-epoch log keys added to nnU-Net's logger (NaN in the epochs of the other phase)
LOG_KEYS = ("rotnpc_phase", "rotnpc_train_loss", "rotnpc_train_bacc", "rotnpc_val_loss", "rotnpc_val_bacc")


class SegmentPolyLR(PolyLRScheduler):
    """nnU-Net's poly schedule ``lr = initial_lr · (1 - (epoch - start) / max_steps) ** 0.9`` over the epochs
    ``[start, start + max_steps)`` of one phase; stepped with the absolute epoch like :class:`PolyLRScheduler`."""

    def __init__(self, optimizer, initial_lr: float, max_steps: int, start_step: int = 0, exponent: float = 0.9):
        self.start_step = int(start_step)
        super().__init__(optimizer, initial_lr, max(1, int(max_steps)), exponent)

    def step(self, current_step=None):
        if current_step is None or current_step == -1:
            current_step = self.start_step + self.ctr
            self.ctr += 1
        rel = min(max(int(current_step) - self.start_step, 0), self.max_steps)
        new_lr = self.initial_lr * (1 - rel / self.max_steps) ** self.exponent
        for group in self.optimizer.param_groups:
            group["lr"] = new_lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]


class RotNPCTrainer(nnxTrainer):
    nnx_summary = ("3DRotNPC: slice-rotation self-supervised pretext (encoder + rotation head) for the first "
                   "epochs, then segmentation fine-tuning of the whole U-Net, in one run")
    nnx_source = "Li 2026 thesis ch. 4 (3DRotNPC); spec shared/specs/000-li-thesis.md M2"
    nnx_requires = {"tiers": ["expert"]}
    nnx_options = {
        "pretrain_fraction": Option(0.25, "fraction of 'epochs' spent on the rotation pretext task (used when "
                                          "pretrain_epochs < 0); P = round(fraction * epochs)"),
        "pretrain_epochs": Option(-1, "number of pretext epochs P; overrides pretrain_fraction when >= 0 "
                                      "(0 = plain nnU-Net training, >= epochs = pretext only)"),
        "rotated_fraction": Option(0.25, "fraction of the patch's slices that are rotated, k = round(D * f), "
                                         "at least 1 (thesis: 4 of 16)"),
        "rotated_slices": Option(-1, "number k of rotated slices per patch; overrides rotated_fraction when > 0"),
        "nonsquare": Option("crop", "non-square in-plane patch: 'crop' rotates the centred min(H,W) square of a "
                                    "slice, 'error' refuses to train", choices=NONSQUARE_MODES),
        "head_hidden": Option(256, "hidden units of the rotation head's MLP"),
        "head_pool_hw": Option(4, "in-plane size P of the head's adaptive pooling of the bottleneck to (D_b, P, P)"),
    }
    # Pretext epochs run the encoder only (its activations are a part of one U-Net step: no decoder), fine-tune
    # epochs are a stock step, so the peak is one stock step (factor 1.0). Static: the head (C_b*P^2*hidden weights,
    # 1.3 M for nnU-Net's 320-channel bottleneck, P=4, hidden=256) + gradients + optimizer state, ~16 MB, and the
    # pretext transform's copy of the input batch; 0.1 GB is a conservative bound.
    nnx_memory = {"activation_factor": 1.0, "static_gb": 0.1}
    nnx_inference_network_is_stock = True

    @classmethod
    def nnx_check_options(cls, values: Dict[str, Any], src: str) -> None:
        super().nnx_check_options(values, src)
        if not 0.0 <= values["pretrain_fraction"] <= 1.0:
            raise NNXError(f"option 'pretrain_fraction' must be in [0, 1], got {values['pretrain_fraction']}", src)
        if not 0.0 < values["rotated_fraction"] <= 1.0:
            raise NNXError(f"option 'rotated_fraction' must be in (0, 1], got {values['rotated_fraction']}", src)
        for key in ("head_hidden", "head_pool_hw"):
            if values[key] < 1:
                raise NNXError(f"option '{key}' must be >= 1, got {values[key]}", src)

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        patch = tuple(int(i) for i in self.configuration_manager.patch_size)
        if len(patch) != 3:
            raise NNXError(f"RotNPCTrainer needs a 3D configuration (slices along the first axis), "
                           f"'{configuration}' has patch size {patch}")
        if patch[1] != patch[2] and self.nnx_opts["nonsquare"] == "error":
            raise NNXError(f"in-plane patch size {patch[1]}x{patch[2]} is not square and nonsquare=error",
                           nnx_options.ENV_VAR)
        self.rotnpc_phase = None          # set in configure_optimizers (PRETEXT or FINETUNE)
        self.rotnpc_switch_epoch = None   # first fine-tune epoch
        self.rotnpc_head: RotationHead = None
        self.rotnpc_head_optimizer = None
        self.rotnpc_head_scheduler = None
        self.nnx_register_log_keys(LOG_KEYS)

    # ------------------------------------------------------------------ helpers
    @property
    def rotnpc_pretrain_epochs(self) -> int:
        """P: number of pretext epochs, from ``pretrain_epochs`` (>= 0) or ``pretrain_fraction``."""
        o = self.nnx_opts
        p = o["pretrain_epochs"] if o["pretrain_epochs"] >= 0 else \
            int(math.floor(o["pretrain_fraction"] * self.num_epochs + 0.5))
        return int(min(max(p, 0), self.num_epochs))

    def _rotnpc_log(self, key: str, value: float) -> None:
        self.logger.log(key, float(value), self.current_epoch)

    def _rotnpc_encoder(self) -> torch.nn.Module:
        return encoder_of(self.network)

    def _rotnpc_trained_params(self) -> List[torch.nn.Parameter]:
        return list(self._rotnpc_encoder().parameters()) + list(self.rotnpc_head.parameters())

    def _rotnpc_transform(self, data: torch.Tensor):
        o = self.nnx_opts
        return rotate_slices(data, o["rotated_fraction"], o["rotated_slices"], o["nonsquare"])

    def _rotnpc_gather_sum(self, arr: np.ndarray) -> np.ndarray:
        if not self.is_ddp:
            return arr
        parts = [None for _ in range(dist.get_world_size())]
        dist.all_gather_object(parts, arr)
        return np.sum(np.stack(parts), 0)

    def _rotnpc_make_head_optimizer(self, network_optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        # same optimizer class and hyperparameters as the network's (nnU-Net: SGD, momentum 0.99, Nesterov)
        defaults = dict(network_optimizer.defaults)
        defaults.pop("differentiable", None)
        try:
            return type(network_optimizer)(self.rotnpc_head.parameters(), **defaults)
        except TypeError:
            return torch.optim.SGD(self.rotnpc_head.parameters(), self.initial_lr, weight_decay=self.weight_decay,
                                   momentum=0.99, nesterov=True)

    def _rotnpc_finetune_scheduler(self, optimizer) -> SegmentPolyLR:
        start = int(self.rotnpc_switch_epoch or 0)
        return SegmentPolyLR(optimizer, self.initial_lr, self.num_epochs - start, start_step=start)

    # ------------------------------------------------------------------ setup
    def configure_optimizers(self):
        """Runs inside ``initialize()`` after ``self.network`` exists: builds the head (outside ``self.network``),
        its optimizer and the network optimizer/scheduler of the current phase."""
        if self.rotnpc_head is None:
            head = build_rotation_head(self.network, self.num_input_channels, self.configuration_manager.patch_size,
                                       hidden=self.nnx_opts["head_hidden"], pool_hw=self.nnx_opts["head_pool_hw"])
            self.rotnpc_head = head.to(self.device)
            if self.is_ddp:  # same initial head on every rank (the network is broadcast by DDP)
                for t in self.rotnpc_head.state_dict().values():
                    dist.broadcast(t, 0)
        if self.rotnpc_phase is None:
            self.rotnpc_phase = PRETEXT if self.rotnpc_pretrain_epochs > 0 else FINETUNE
            if self.rotnpc_phase == FINETUNE:
                self.rotnpc_switch_epoch = 0
        optimizer, _ = super().configure_optimizers()  # nnU-Net's SGD over self.network.parameters()
        p = self.rotnpc_pretrain_epochs
        self.rotnpc_head_optimizer = self._rotnpc_make_head_optimizer(optimizer)
        self.rotnpc_head_scheduler = SegmentPolyLR(self.rotnpc_head_optimizer, self.initial_lr, p)
        if self.rotnpc_phase == PRETEXT:
            # decoder parameters are in the optimizer but never get a gradient (grad None -> SGD skips them,
            # weight decay included), so they stay at their initialisation
            scheduler = SegmentPolyLR(optimizer, self.initial_lr, p)
        else:
            scheduler = self._rotnpc_finetune_scheduler(optimizer)
        self.print_to_log_file(f"3DRotNPC: {p} pretext epoch(s), then {self.num_epochs - p} fine-tune epoch(s); "
                               f"head {self.rotnpc_head.config}")
        return optimizer, scheduler

    def _rotnpc_switch_to_finetune(self) -> None:
        """Fresh network optimizer + poly schedule over the remaining epochs; checkpoint selection restarts."""
        self.rotnpc_phase = FINETUNE
        self.rotnpc_switch_epoch = int(self.current_epoch)
        self.optimizer, _ = super().configure_optimizers()
        self.lr_scheduler = self._rotnpc_finetune_scheduler(self.optimizer)
        self._best_ema = None
        self.print_to_log_file(f"3DRotNPC: switching to segmentation fine-tuning at epoch {self.current_epoch} "
                               f"(fresh optimizer, poly lr over {self.num_epochs - self.rotnpc_switch_epoch} epochs)")

    # ------------------------------------------------------------------ training
    def on_train_epoch_start(self):
        if self.rotnpc_phase == PRETEXT and self.current_epoch >= self.rotnpc_pretrain_epochs:
            self._rotnpc_switch_to_finetune()
        if self.rotnpc_phase == PRETEXT:
            self.rotnpc_head.train()
            self.rotnpc_head_scheduler.step(self.current_epoch)
        super().on_train_epoch_start()
        self._rotnpc_log("rotnpc_phase", 0 if self.rotnpc_phase == PRETEXT else 1)

    def _rotnpc_forward(self, data: torch.Tensor):
        x, labels, _ = self._rotnpc_transform(data)
        with autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context():
            logits = self.rotnpc_head(self._rotnpc_encoder()(x))
        loss = rotation_loss(logits.float(), labels)
        return logits, labels, loss

    def train_step(self, batch: dict) -> dict:
        if self.rotnpc_phase != PRETEXT:
            return super().train_step(batch)
        data = batch["data"].to(self.device, non_blocking=True)  # segmentation target unused
        self.optimizer.zero_grad(set_to_none=True)
        self.rotnpc_head_optimizer.zero_grad(set_to_none=True)
        logits, labels, loss = self._rotnpc_forward(data)
        params = self._rotnpc_trained_params()
        optimizers = (self.optimizer, self.rotnpc_head_optimizer)
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            self._rotnpc_allreduce_grads(params)
            for opt in optimizers:
                self.grad_scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, 12)
            for opt in optimizers:
                self.grad_scaler.step(opt)
            self.grad_scaler.update()
        else:
            loss.backward()
            self._rotnpc_allreduce_grads(params)
            torch.nn.utils.clip_grad_norm_(params, 12)
            for opt in optimizers:
                opt.step()
        return {"loss": loss.detach().cpu().numpy(), "rot_confusion": confusion_matrix(logits, labels)}

    def _rotnpc_allreduce_grads(self, params: Iterable[torch.nn.Parameter]) -> None:
        # the pretext forward bypasses the DDP wrapper of self.network, so average gradients by hand
        if not self.is_ddp:
            return
        world = dist.get_world_size()
        for prm in params:
            if prm.grad is not None:
                dist.all_reduce(prm.grad)
                prm.grad.div_(world)

    def on_train_epoch_end(self, train_outputs: List[dict]):
        super().on_train_epoch_end(train_outputs)  # 'train_losses' = pretext loss during the pretext phase
        if self.rotnpc_phase == PRETEXT:
            conf = self._rotnpc_gather_sum(np.sum(collate_outputs(train_outputs)["rot_confusion"], 0))
            self._rotnpc_log("rotnpc_train_loss", self.logger.get_value("train_losses", step=-1))
            self._rotnpc_log("rotnpc_train_bacc", balanced_accuracy(conf))
        else:
            self._rotnpc_log("rotnpc_train_loss", float("nan"))
            self._rotnpc_log("rotnpc_train_bacc", float("nan"))

    # ------------------------------------------------------------------ validation
    def on_validation_epoch_start(self):
        super().on_validation_epoch_start()
        self.rotnpc_head.eval()

    def validation_step(self, batch: dict) -> dict:
        if self.rotnpc_phase != PRETEXT:
            return super().validation_step(batch)
        data = batch["data"].to(self.device, non_blocking=True)
        logits, labels, loss = self._rotnpc_forward(data)
        return {"loss": loss.detach().cpu().numpy(), "rot_confusion": confusion_matrix(logits, labels)}

    def on_validation_epoch_end(self, val_outputs: List[dict]):
        ll = self.logger.local_logger.my_fantastic_logging
        if self.rotnpc_phase != PRETEXT:
            super().on_validation_epoch_end(val_outputs)
            if self.current_epoch == self.rotnpc_switch_epoch and self.current_epoch > 0:
                # the pseudo-Dice EMA restarts with fine-tuning (pretext epochs only hold placeholders)
                ll["ema_fg_dice"][self.current_epoch] = ll["mean_fg_dice"][self.current_epoch]
            self._rotnpc_log("rotnpc_val_loss", float("nan"))
            self._rotnpc_log("rotnpc_val_bacc", float("nan"))
            return
        collated = collate_outputs(val_outputs)
        conf = self._rotnpc_gather_sum(np.sum(collated["rot_confusion"], 0))
        loss_sum = self._rotnpc_gather_sum(np.array([np.sum(collated["loss"]), len(collated["loss"])], float))
        loss_here = float(loss_sum[0] / max(loss_sum[1], 1))
        bacc = balanced_accuracy(conf)
        lm = self.label_manager
        n_dice = lm.num_segmentation_heads if lm.has_regions else lm.num_segmentation_heads - 1
        # segmentation is not trained yet: placeholder pseudo-Dice 0.0 keeps nnU-Net's on_epoch_end, the EMA and the
        # progress plot working; checkpoint_best selection restarts at the switch (see _rotnpc_switch_to_finetune)
        self.logger.log("mean_fg_dice", 0.0, self.current_epoch)
        self.logger.log("dice_per_class_or_region", [0.0] * max(n_dice, 1), self.current_epoch)
        self.logger.log("val_losses", loss_here, self.current_epoch)
        self._rotnpc_log("rotnpc_val_loss", loss_here)
        self._rotnpc_log("rotnpc_val_bacc", bacc)
        self.print_to_log_file(f"3DRotNPC pretext: train loss {self.logger.get_value('rotnpc_train_loss', -1):.4f}, "
                               f"train balanced acc {self.logger.get_value('rotnpc_train_bacc', -1):.4f}, "
                               f"val loss {loss_here:.4f}, val balanced acc {bacc:.4f} (chance 0.25)")

    # ------------------------------------------------------------------ checkpoints
    def nnx_extra_state(self) -> Dict[str, Any]:
        if self.rotnpc_head is None:
            return {}
        return {
            "rotnpc_version": 1,
            "phase": self.rotnpc_phase,
            "switch_epoch": self.rotnpc_switch_epoch,
            "pretrain_epochs": self.rotnpc_pretrain_epochs,
            "head_config": dict(self.rotnpc_head.config),
            "head_state": self.rotnpc_head.state_dict(),
            "head_optimizer_state": self.rotnpc_head_optimizer.state_dict(),
        }

    def nnx_load_extra_state(self, state: Dict[str, Any]) -> None:
        if "head_state" not in state:
            return
        if dict(state.get("head_config", {})) != dict(self.rotnpc_head.config):
            raise NNXError(f"rotation head of the checkpoint {state.get('head_config')} does not match this run's "
                           f"{self.rotnpc_head.config} (head_hidden/head_pool_hw or patch size changed?)")
        self.rotnpc_head.load_state_dict(state["head_state"])
        if state.get("head_optimizer_state") is not None:
            self.rotnpc_head_optimizer.load_state_dict(state["head_optimizer_state"])
        self.rotnpc_phase = state["phase"]
        self.rotnpc_switch_epoch = state.get("switch_epoch")
        if self.rotnpc_phase == FINETUNE:
            # the network optimizer state was restored by nnU-Net (same parameter layout in both phases)
            self.lr_scheduler = self._rotnpc_finetune_scheduler(self.optimizer)
        else:
            self.lr_scheduler = SegmentPolyLR(self.optimizer, self.initial_lr, self.rotnpc_pretrain_epochs)
        self.nnx_register_log_keys(LOG_KEYS)


__all__ = ["RotNPCTrainer", "SegmentPolyLR", "PRETEXT", "FINETUNE", "LOG_KEYS", "NUM_ROTATION_CLASSES"]
