"""``MODTrainer``: MOD (Pang et al., seed 002) on nnU-Net — online self-distillation (online tokenizer) and masked
self-modeling (dense predictor) on the encoder, removed at inference.

One iteration (paper Alg. 1; spec 002 §7), for a batch x with segmentation target y:

1. views μ = A_μ(x), ν = A_ν(x) (``views``); token masks M_μ, M_ν at ratio 0.6 (``masking``); μ̂, ν̂ = masked views
   with the learnable mask token;
2. student (``MODTrainWrapper``, the only module DDP wraps): the nnU-Net encoder on [x, μ̂, ν̂] up to the token
   stage, deeper stages + decoder on x only → segmentation outputs (deep supervision as usual); projection head on
   the token-stage maps of μ̂, ν̂ → cls logits and the patch logits of the masked tokens; dense predictor →
   recon(μ̂), recon(ν̂);
3. EMA teacher (no gradient) on the unmasked μ, ν → cls / patch logits;
4. L = λ_seg·L_SEG + λ_MOD·(λ_OT·(1.5·L_efm + 0.5·L_cls) + λ_DP·L_DP) (``loss``), one backward, nnU-Net's
   AMP / grad-scaler / clip-12 / optimizer step over the network and the MOD student modules;
5. teacher EMA with the cosine momentum 0.996 → 1, centres updated (``teacher``).

``self.network`` stays nnU-Net's own network (its ``network_weights`` load strictly into the stock predictor); the
mask token, projection head, dense predictor, EMA teacher and centres live outside it and go to the checkpoint key
``nnx_extra``. See README.md next to this file.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from torch import autocast, nn
from torch import distributed as dist

from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from nnunetv2.utilities.collate_outputs import collate_outputs
from nnunetv2.utilities.helpers import dummy_context

from nnx.errors import NNXError
from nnx.options import Option
from nnx.trainer_base import nnxTrainer

from .backbone import (choose_token_stage, cumulative_strides, encoder_of, split_forward, stage_channels,
                       token_grid, unwrap)
from .heads import DensePredictor, MODStudentModules, ProjectionHead, head_logits
from .loss import DC_and_Focal_loss, cls_loss, dp_loss, efm_loss, entropy, mod_loss, ot_loss
from .masking import MASK_MODES, apply_mask, masked_token_index, token_masks, upsample_mask
from .teacher import Centering, EMATeacher, cosine_momentum, teacher_patch_temperature
from .views import VIEW_MODES, make_views

#: per-epoch log keys added to nnU-Net's logger (NaN where a part is switched off)
LOG_KEYS = ("mod_loss_seg", "mod_loss_efm", "mod_loss_cls", "mod_loss_dp", "mod_teacher_entropy", "mod_momentum")
SEG_LOSSES = ("nnunet", "dice_focal")
VIEW_PASSES = ("auto", "batched", "per_view")


class MODTrainWrapper(nn.Module):
    """Network + MOD student modules as one module, so that DDP wraps (and synchronises) both in one forward.
    Holds references: its parameters are those of ``network`` and ``student``."""

    def __init__(self, network: nn.Module, student: MODStudentModules, token_stage: int,
                 view_chunk: Optional[int] = None):
        super().__init__()
        self.network = network
        self.student = student
        self.token_stage = int(token_stage)
        self.view_chunk = view_chunk  # None: one pass over [x, views]; n: the views in passes of n samples

    def forward(self, x: torch.Tensor, views: Optional[torch.Tensor] = None,
                voxel_mask: Optional[torch.Tensor] = None,
                token_index: Optional[torch.Tensor] = None) -> Dict[str, Any]:
        """``views`` (V·B, C, ...) unmasked, ``voxel_mask`` (V·B, 1, ...) 1 = masked, ``token_index`` (V·B, n) the
        masked tokens (the student head runs on those only). Returns ``seg`` (the network's output for ``x``),
        ``s_cls`` (V·B, K), ``s_patch`` (V·B, n, K) and ``recon`` (V·B, C, ...)."""
        masked = None if views is None else apply_mask(views, voxel_mask, self.student.mask_token)
        skips, tok = split_forward(self.network.encoder, x, masked, self.token_stage, self.view_chunk)
        out: Dict[str, Any] = {"seg": self.network.decoder(skips)}
        if tok is not None:
            if self.student.head is not None:
                out["s_cls"], out["s_patch"] = head_logits(self.student.head, tok, token_index)
            if self.student.dense_predictor is not None:
                out["recon"] = self.student.dense_predictor(tok)
        return out


class WarmupCosineLR(PolyLRScheduler):
    """Per-epoch learning rate: linear warm-up ``lr0·(e + 1)/W`` for e < W, then ``lr0·(1 + cos(π·(e − W)/(E − W)))/2``
    (paper: "cosine scheduler for a warm-up"; logs: 2 warm-up epochs). Stepped with the epoch like nnU-Net's poly."""

    def __init__(self, optimizer, initial_lr: float, max_steps: int, warmup_steps: int = 2):
        self.warmup_steps = int(max(warmup_steps, 0))
        super().__init__(optimizer, initial_lr, max(int(max_steps), 1))

    def lr_at(self, step: int) -> float:
        w, e = self.warmup_steps, self.max_steps
        if step < w:
            return self.initial_lr * (step + 1) / w
        t = min(max(step - w, 0) / max(e - w, 1), 1.0)
        return self.initial_lr * 0.5 * (1.0 + math.cos(math.pi * t))

    def step(self, current_step=None):
        if current_step is None or current_step == -1:
            current_step = self.ctr
            self.ctr += 1
        new_lr = self.lr_at(int(current_step))
        for group in self.optimizer.param_groups:
            group["lr"] = new_lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]


def _opt(default, text, **kw):
    return Option(default, text, **kw)


class MODTrainer(nnxTrainer):
    nnx_summary = ("MOD: online self-distillation (EMA teacher, masked patch + cross-view cls tokens) and masked "
                   "reconstruction on the encoder, removed at inference; nnU-Net's schedule")
    nnx_source = "Pang et al., MOD (seed 002); spec shared/specs/002-mod.md"
    nnx_options = {
        # views and masking (§2.2)
        "views": _opt("blur_contrast", "the two views: 'blur_contrast' (mu = Gaussian blur, nu = contrast) or "
                                       "'both' (each view blur + contrast)", choices=VIEW_MODES),
        "blur_sigma_min": _opt(0.5, "Gaussian blur sigma range (voxels), lower end"),
        "blur_sigma_max": _opt(1.0, "Gaussian blur sigma range (voxels), upper end"),
        "contrast_range": _opt(0.25, "contrast factor ~ U[1 - r, 1 + r]"),
        "mask_ratio": _opt(0.6, "fraction of tokens masked per sample and view (paper: 0.6)"),
        "mask_mode": _opt("block", "'block' (block-wise, iBOT/BEiT) or 'random' token masking", choices=MASK_MODES),
        "mask_min_block": _opt(4, "block masking: minimum tokens per block (BEiT/iBOT: 4)"),
        "mask_min_aspect": _opt(0.3, "block masking: minimum aspect ratio of a block (BEiT/iBOT: 0.3)"),
        "token_stride": _opt(16, "target cumulative stride of the token stage (paper's ViT tokens: 16)"),
        "token_stage": _opt(-1, "encoder stage giving the tokens; -1 = the stage with stride closest to token_stride"),
        "view_passes": _opt("auto", "how the encoder runs on the clean batch and the views: 'batched' (one pass over "
                            "the concatenation), 'per_view' (one pass per view at the stock batch size; same "
                            "result with InstanceNorm), 'auto' = per_view on a CPU, batched otherwise",
                            choices=VIEW_PASSES),
        # online tokenizer (§2.3, iBOT defaults)
        "out_dim": _opt(8192, "K: output dimension of the projection head (iBOT: 8192)"),
        "head_hidden": _opt(2048, "hidden units of the head's MLP (iBOT: 2048)"),
        "head_bottleneck": _opt(256, "bottleneck dimension before the weight-normalised last layer (iBOT: 256)"),
        "head_layers": _opt(3, "MLP layers of the head (iBOT: 3)"),
        "shared_head": _opt(True, "one last layer for cls and patch tokens (iBOT teacher); false: a second one for "
                                  "patch tokens in student and teacher"),
        "norm_last_layer": _opt(True, "fix the norm of the last layer's weights to 1 (iBOT: true)"),
        "freeze_last_layer_epochs": _opt(1, "epochs during which the last layer gets no update (iBOT: 1)"),
        "student_temp": _opt(0.1, "tau_s (iBOT: 0.1)"),
        "teacher_temp": _opt(0.04, "tau_t of the cls token (iBOT: 0.04)"),
        "teacher_patch_temp": _opt(0.07, "tau_t of patch tokens after the warm-up (iBOT: 0.07)"),
        "warmup_teacher_patch_temp": _opt(0.04, "tau_t of patch tokens at epoch 0 (iBOT: 0.04)"),
        "warmup_teacher_temp_epochs": _opt(30, "epochs of the linear patch-temperature warm-up (iBOT: 30)"),
        "center_momentum": _opt(0.9, "centre update momentum (iBOT: 0.9)"),
        "momentum_teacher": _opt(0.996, "teacher EMA momentum at iteration 0, cosine to 1 (paper: 0.996)"),
        # loss weights (Eq. 3, 5, 8, 9)
        "lambda_efm": _opt(1.5, "alpha: weight of L_efm in L_OT (paper: 1.5)"),
        "lambda_cls": _opt(0.5, "beta: weight of L_cls in L_OT (paper: 0.5)"),
        "lambda_ot": _opt(1.0, "lambda_1: weight of L_OT in L_MOD (paper: 1); 0 = no online tokenizer"),
        "lambda_dp": _opt(1.0, "lambda_2: weight of L_DP in L_MOD (paper: 1); 0 = no dense predictor"),
        "lambda_mod": _opt(1.0, "weight of L_MOD in the total (paper: 1)"),
        "lambda_seg": _opt(1.0, "weight of the segmentation loss in the total (paper: 1)"),
        "seg_loss": _opt("nnunet", "segmentation loss: 'nnunet' (nnU-Net's Dice + CE/BCE) or 'dice_focal' "
                                   "(paper Eq. 8: focal (gamma 2) + Dice)", choices=SEG_LOSSES),
        "focal_gamma": _opt(2.0, "gamma of the focal loss (seg_loss=dice_focal)"),
    }
    # Student encoder to the token stage on 3x the batch with gradients (clean + 2 masked views), the rest of the
    # network on 1x; the teacher runs without gradients (its activations are freed stage by stage). The token
    # stages hold ~40 % of a PlainConvUNet step's activations (compute_conv_feature_map_size: 0.40 for the tiny
    # phantom's 3d_fullres, 0.39 for 128^3 / 6 stages), so activations are ~1 + 2 x 0.4 = 1.8 x stock, plus the
    # views, masks and reconstructions (a few input-sized tensors): 1.9. Static: the student head (~7.4 M weights for
    # a 320-channel token stage at K = 8192) with gradient and SGD momentum, its EMA copy, the teacher's copy of the
    # encoder's token stages, the centres: ~0.25 GB; 0.3 GB declared.
    nnx_memory = {"activation_factor": 1.9, "static_gb": 0.3}
    nnx_inference_network_is_stock = True

    @classmethod
    def nnx_check_options(cls, v: Dict[str, Any], src: str) -> None:
        super().nnx_check_options(v, src)

        def need(cond, msg):
            if not cond:
                raise NNXError(msg, src)

        need(0.0 < v["mask_ratio"] < 1.0, f"option 'mask_ratio' must be in (0, 1), got {v['mask_ratio']}")
        need(0.0 <= v["blur_sigma_min"] <= v["blur_sigma_max"],
             "options 'blur_sigma_min' <= 'blur_sigma_max' must hold and be >= 0")
        need(0.0 <= v["contrast_range"] < 1.0, f"option 'contrast_range' must be in [0, 1), got {v['contrast_range']}")
        need(v["mask_min_block"] >= 1, "option 'mask_min_block' must be >= 1")
        need(0.0 < v["mask_min_aspect"] <= 1.0, "option 'mask_min_aspect' must be in (0, 1]")
        need(v["token_stride"] >= 1, "option 'token_stride' must be >= 1")
        for k in ("out_dim", "head_hidden", "head_bottleneck", "head_layers"):
            need(v[k] >= 1, f"option '{k}' must be >= 1, got {v[k]}")
        for k in ("student_temp", "teacher_temp", "teacher_patch_temp", "warmup_teacher_patch_temp"):
            need(v[k] > 0, f"option '{k}' must be > 0, got {v[k]}")
        need(v["warmup_teacher_temp_epochs"] >= 0 and v["freeze_last_layer_epochs"] >= 0,
             "warm-up / freeze epochs must be >= 0")
        need(0.0 <= v["center_momentum"] < 1.0, "option 'center_momentum' must be in [0, 1)")
        need(0.0 <= v["momentum_teacher"] <= 1.0, "option 'momentum_teacher' must be in [0, 1]")
        for k in ("lambda_efm", "lambda_cls", "lambda_ot", "lambda_dp", "lambda_mod", "lambda_seg"):
            need(v[k] >= 0, f"option '{k}' must be >= 0, got {v[k]}")
        ot = v["lambda_ot"] > 0 and (v["lambda_efm"] > 0 or v["lambda_cls"] > 0)
        need(v["lambda_mod"] > 0 and (ot or v["lambda_dp"] > 0),
             "MOD without its losses (lambda_mod = 0, or lambda_ot and lambda_dp both 0) is nnUNetTrainer; use that")
        need(v["focal_gamma"] >= 0, "option 'focal_gamma' must be >= 0")

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        o = self.nnx_opts
        self.mod_ot = o["lambda_ot"] > 0 and (o["lambda_efm"] > 0 or o["lambda_cls"] > 0)
        self.mod_dp = o["lambda_dp"] > 0
        self.mod_student: Optional[MODStudentModules] = None
        self.mod_teacher: Optional[EMATeacher] = None
        self.mod_centers: Optional[Centering] = None
        self.mod_it = 0                      # global iteration k of the momentum schedule
        self.mod_config: Dict[str, Any] = {}
        self.mod_token_stage = None
        self.mod_stride = None
        self.mod_grid = None
        self.mod_rng = np.random.default_rng([int(np.random.randint(0, 2 ** 31 - 1)), int(self.local_rank)])
        self._mod_train_module: Optional[nn.Module] = None
        self.nnx_register_log_keys(LOG_KEYS)

    # ------------------------------------------------------------------ helpers
    def _do_i_compile(self):
        # spec §7: the training forward bypasses network.forward (split encoder pass); torch.compile is untested
        return False

    @property
    def mod_total_iterations(self) -> int:
        return int(self.num_epochs) * int(self.num_iterations_per_epoch)

    def _mod_student_encoder(self) -> nn.Module:
        return encoder_of(self.network)

    def _mod_trained_params(self) -> List[nn.Parameter]:
        return list(unwrap(self.network).parameters()) + list(self.mod_student.parameters())

    # ------------------------------------------------------------------ setup
    def _mod_build(self) -> None:
        """MOD modules, outside ``self.network``; runs inside ``initialize()`` before the optimizer exists."""
        if self.mod_student is not None:
            return
        o = self.nnx_opts
        enc = self._mod_student_encoder()
        patch = [int(i) for i in self.configuration_manager.patch_size]
        ndim = len(patch)
        k = choose_token_stage(enc, ndim, o["token_stride"], o["token_stage"])
        stride = cumulative_strides(enc, ndim)[k]
        grid = token_grid(patch, stride)
        c_tok = stage_channels(enc)[k]
        head = ProjectionHead(c_tok, o["out_dim"], o["head_hidden"], o["head_bottleneck"], o["head_layers"],
                              o["shared_head"], o["norm_last_layer"]) if self.mod_ot else None
        dp = DensePredictor(c_tok, self.num_input_channels, stride) if self.mod_dp else None
        self.mod_student = MODStudentModules(self.num_input_channels, ndim, head, dp).to(self.device)
        if head is not None:
            self.mod_teacher = EMATeacher(enc, k, self.mod_student.head).to(self.device)
            self.mod_centers = Centering(o["out_dim"]).to(self.device)
        self.mod_token_stage, self.mod_stride, self.mod_grid = k, tuple(stride), tuple(grid)
        self.mod_config = {"token_stage": k, "stride": list(stride), "grid": list(grid), "token_channels": c_tok,
                           "in_channels": int(self.num_input_channels), "online_tokenizer": self.mod_ot,
                           "dense_predictor": self.mod_dp,
                           "head": dict(head.config) if head is not None else None}
        n_s = sum(p.numel() for p in self.mod_student.parameters())
        n_t = sum(p.numel() for p in self.mod_teacher.parameters()) if self.mod_teacher is not None else 0
        self.print_to_log_file(f"MOD: token stage {k} (stride {tuple(stride)}, grid {tuple(grid)} = "
                               f"{int(np.prod(grid))} tokens, {c_tok} channels); online tokenizer "
                               f"{'on' if self.mod_ot else 'off'}, dense predictor {'on' if self.mod_dp else 'off'}; "
                               f"student MOD parameters {n_s:,}, teacher parameters {n_t:,}")

    def mod_view_chunk(self) -> Optional[int]:
        """Samples per encoder pass over the views (option ``view_passes``): None = one batched pass."""
        mode = self.nnx_opts["view_passes"]
        if mode == "batched" or (mode == "auto" and self.device.type != "cpu"):
            return None
        return int(self.batch_size)

    def configure_optimizers(self):
        self._mod_build()
        return self._mod_configure_optimizers()

    def _mod_param_groups(self) -> List[Dict[str, Any]]:
        return [{"params": list(self.network.parameters())},
                {"params": [p for p in self.mod_student.parameters() if p.requires_grad]}]

    def _mod_configure_optimizers(self):
        """nnU-Net's SGD (momentum 0.99, Nesterov) and poly schedule; the MOD student modules as a second group."""
        optimizer = torch.optim.SGD(self._mod_param_groups(), self.initial_lr, weight_decay=self.weight_decay,
                                    momentum=0.99, nesterov=True)
        return optimizer, PolyLRScheduler(optimizer, self.initial_lr, self.num_epochs)

    def initialize(self):
        super().initialize()
        wrapper = MODTrainWrapper(unwrap(self.network), self.mod_student, self.mod_token_stage, self.mod_view_chunk())
        if self.is_ddp:
            # one DDP module for everything that gets gradients: network + MOD student modules (broadcast from
            # rank 0 here). self.network stays nnU-Net's DDP(network) for validation and checkpoints.
            from torch.nn.parallel import DistributedDataParallel as DDP
            wrapper = DDP(wrapper, device_ids=[self.local_rank])
        self._mod_train_module = wrapper

    def _build_loss(self):
        loss = super()._build_loss()
        if self.nnx_opts["seg_loss"] == "nnunet":
            return loss
        lm, cm = self.label_manager, self.configuration_manager
        dice_kw = {"batch_dice": cm.batch_dice, "smooth": 1e-5, "do_bg": bool(lm.has_regions), "ddp": self.is_ddp}
        mine = DC_and_Focal_loss(lm.has_regions, dice_kw, lm.ignore_label, self.nnx_opts["focal_gamma"])
        if hasattr(loss, "weight_factors") and hasattr(loss, "loss"):  # DeepSupervisionWrapper: same DS weights
            loss.loss = mine
            return loss
        return mine

    def on_train_start(self):
        super().on_train_start()
        if self.mod_teacher is not None and self.mod_it == 0:
            # fresh run: teacher = student (after DDP's broadcast and after -pretrained_weights were loaded)
            self.mod_teacher.copy_from(self._mod_student_encoder(), self.mod_student.head)

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        self.mod_student.train()
        if self.mod_teacher is not None:
            self.mod_teacher.eval()

    # ------------------------------------------------------------------ training
    def mod_temperatures(self) -> Dict[str, float]:
        o = self.nnx_opts
        return {"student": o["student_temp"], "teacher_cls": o["teacher_temp"],
                "teacher_patch": teacher_patch_temperature(self.current_epoch, o["warmup_teacher_patch_temp"],
                                                           o["teacher_patch_temp"], o["warmup_teacher_temp_epochs"])}

    @torch.no_grad()
    def mod_make_inputs(self, data: torch.Tensor):
        """Views (2B, C, ...) = [μ; ν], token masks (2B, *grid), voxel masks (2B, 1, ...) and the indices of the
        masked tokens (2B, n)."""
        o = self.nnx_opts
        mu, nu = make_views(data, o["views"], (o["blur_sigma_min"], o["blur_sigma_max"]), o["contrast_range"])
        views = torch.cat([mu, nu], 0)
        tmask = token_masks(views.shape[0], self.mod_grid, o["mask_ratio"], self.mod_rng, o["mask_mode"],
                            o["mask_min_block"], o["mask_min_aspect"], device=data.device)
        return views, tmask, upsample_mask(tmask, self.mod_stride).to(data.dtype), masked_token_index(tmask)

    def mod_losses(self, out: Dict[str, Any], views: torch.Tensor, token_index: torch.Tensor, vmask: torch.Tensor,
                   teacher_out=None) -> Dict[str, torch.Tensor]:
        """L_efm, L_cls, L_OT, L_DP, L_MOD (float32) from the student outputs and the teacher's logits.
        ``out["s_patch"]`` holds the masked tokens only (``token_index``); the teacher's patch logits (all tokens)
        are gathered at the same positions, so L_efm = the masked mean of loss.efm_loss."""
        o = self.nnx_opts
        b = views.shape[0] // 2
        zero = views.new_zeros((), dtype=torch.float32)
        res = {"efm": zero, "cls": zero, "ot": zero, "dp": zero}
        if self.mod_ot:
            t_cls, t_patch = teacher_out
            tau = self.mod_temperatures()
            k = t_cls.shape[-1]
            n = token_index.shape[1]
            t_sel = torch.gather(t_patch, 1, token_index.unsqueeze(-1).expand(-1, -1, k))
            all_masked = torch.ones(2, b, n, dtype=torch.bool, device=views.device)
            res["efm"] = efm_loss(t_sel.reshape(2, b, n, k), out["s_patch"].reshape(2, b, n, k), all_masked,
                                  self.mod_centers.patch, tau["teacher_patch"], tau["student"])
            res["cls"] = cls_loss(t_cls.reshape(2, b, k), out["s_cls"].reshape(2, b, k), self.mod_centers.cls,
                                  tau["teacher_cls"], tau["student"])
            res["ot"] = ot_loss(res["efm"], res["cls"], o["lambda_efm"], o["lambda_cls"])
        if self.mod_dp:
            rec = out["recon"]
            res["dp"] = dp_loss(rec.reshape(2, b, *rec.shape[1:]), views.reshape(2, b, *views.shape[1:]),
                                vmask.reshape(2, b, *vmask.shape[1:]))
        res["mod"] = mod_loss(res["ot"], res["dp"], o["lambda_ot"] if self.mod_ot else 0.0,
                              o["lambda_dp"] if self.mod_dp else 0.0)
        return res

    def train_step(self, batch: dict) -> dict:
        o = self.nnx_opts
        data = batch["data"]
        target = batch["target"]
        data = data.to(self.device, non_blocking=True)
        if isinstance(target, list):
            target = [i.to(self.device, non_blocking=True) for i in target]
        else:
            target = target.to(self.device, non_blocking=True)

        self.optimizer.zero_grad(set_to_none=True)
        views, tmask, vmask, tidx = self.mod_make_inputs(data)
        with autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context():
            out = self._mod_train_module(data, views, vmask, tidx if self.mod_ot else None)
            l_seg = self.loss(out["seg"], target)
            teacher_out = self.mod_teacher(views, self.mod_view_chunk()) if self.mod_ot else None
        parts = self.mod_losses(out, views, tidx, vmask, teacher_out)
        total = o["lambda_seg"] * l_seg + o["lambda_mod"] * parts["mod"]

        params = self._mod_trained_params()
        if self.grad_scaler is not None:
            self.grad_scaler.scale(total).backward()
            self.grad_scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(params, 12)
            self._mod_cancel_last_layer_grads()
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            total.backward()
            torch.nn.utils.clip_grad_norm_(params, 12)
            self._mod_cancel_last_layer_grads()
            self.optimizer.step()

        m = cosine_momentum(self.mod_it, self.mod_total_iterations, o["momentum_teacher"], 1.0)
        ent = float("nan")
        if self.mod_ot:
            self.mod_teacher.ema_update(self._mod_student_encoder(), self.mod_student.head, m)
            t_cls, t_patch = teacher_out
            # collapse monitor on ~16 evenly spaced tokens per view and sample (a K-wide softmax over all tokens
            # would cost as much as the loss itself)
            sub = t_patch[:, :: max(1, t_patch.shape[1] // 16)]
            ent = float(entropy(sub, self.mod_centers.patch, self.mod_temperatures()["teacher_patch"]))
            self.mod_centers.update(t_cls, t_patch, o["center_momentum"])
        self.mod_it += 1
        nan = float("nan")
        return {"loss": total.detach().cpu().numpy(),
                "mod_seg": float(l_seg.detach()),
                "mod_efm": float(parts["efm"].detach()) if self.mod_ot else nan,
                "mod_cls": float(parts["cls"].detach()) if self.mod_ot else nan,
                "mod_dp": float(parts["dp"].detach()) if self.mod_dp else nan,
                "mod_entropy": ent, "mod_momentum": m}

    def _mod_cancel_last_layer_grads(self) -> None:
        """iBOT ``cancel_gradients_last_layer``: no update of the head's last layer in the first epochs."""
        if self.mod_ot and self.current_epoch < self.nnx_opts["freeze_last_layer_epochs"]:
            for layer in self.mod_student.head.last_layers():
                for p in layer.parameters():
                    p.grad = None

    def on_train_epoch_end(self, train_outputs: List[dict]):
        super().on_train_epoch_end(train_outputs)
        col = collate_outputs(train_outputs)
        keys = (("mod_seg", "mod_loss_seg"), ("mod_efm", "mod_loss_efm"), ("mod_cls", "mod_loss_cls"),
                ("mod_dp", "mod_loss_dp"), ("mod_entropy", "mod_teacher_entropy"))
        means = np.array([float(np.mean(col[k])) for k, _ in keys], dtype=np.float64)
        if self.is_ddp:
            parts = [None] * dist.get_world_size()
            dist.all_gather_object(parts, means)
            means = np.mean(np.stack(parts), 0)
        for (_, key), val in zip(keys, means):
            self.logger.log(key, float(val), self.current_epoch)
        self.logger.log("mod_momentum", float(col["mod_momentum"][-1]), self.current_epoch)
        log_k = math.log(self.nnx_opts["out_dim"])
        self.print_to_log_file(
            f"MOD: L_seg {means[0]:.4f}, L_efm {means[1]:.4f}, L_cls {means[2]:.4f}, L_dp {means[3]:.4f}, "
            f"teacher patch entropy {means[4]:.3f} (log K = {log_k:.3f}), momentum {col['mod_momentum'][-1]:.5f}, "
            f"teacher patch temperature {self.mod_temperatures()['teacher_patch']:.4f}")

    # ------------------------------------------------------------------ checkpoints
    def nnx_extra_state(self) -> Dict[str, Any]:
        if self.mod_student is None:
            return {}
        return {
            "mod_version": 1,
            "config": dict(self.mod_config),
            "student": self.mod_student.state_dict(),
            "teacher": self.mod_teacher.state_dict() if self.mod_teacher is not None else None,
            "centers": self.mod_centers.state_dict() if self.mod_centers is not None else None,
            "iteration": int(self.mod_it),
        }

    def nnx_load_extra_state(self, state: Dict[str, Any]) -> None:
        if "student" not in state:
            return
        if dict(state.get("config", {})) != dict(self.mod_config):
            raise NNXError(f"MOD modules of the checkpoint {state.get('config')} do not match this run's "
                           f"{self.mod_config} (token stage, head or loss options changed?)")
        self.mod_student.load_state_dict(state["student"])
        if self.mod_teacher is not None:
            self.mod_teacher.load_state_dict(state["teacher"])
            self.mod_centers.load_state_dict(state["centers"])
        self.mod_it = int(state.get("iteration", 0))
        self.nnx_register_log_keys(LOG_KEYS)


class MODTrainer_paperHP(MODTrainer):
    nnx_summary = "MOD with the paper's optimisation: AdamW (lr 1e-3, weight decay 0.05), cosine schedule with warm-up"
    nnx_options = {
        "initial_lr": Option(1e-3, "initial learning rate (paper: 1e-3)", float, attr="initial_lr"),
        "weight_decay": Option(0.05, "AdamW weight decay (paper: 0.05)", float, attr="weight_decay"),
        "warmup_epochs": Option(2, "linear warm-up epochs before the cosine decay (paper logs: 2)"),
    }

    @classmethod
    def nnx_check_options(cls, v: Dict[str, Any], src: str) -> None:
        super().nnx_check_options(v, src)
        if v["warmup_epochs"] < 0 or v["weight_decay"] < 0 or v["initial_lr"] <= 0:
            raise NNXError("warmup_epochs and weight_decay must be >= 0, initial_lr > 0", src)

    def _mod_configure_optimizers(self):
        optimizer = torch.optim.AdamW(self._mod_param_groups(), lr=self.initial_lr, weight_decay=self.weight_decay)
        return optimizer, WarmupCosineLR(optimizer, self.initial_lr, self.num_epochs, self.nnx_opts["warmup_epochs"])


class MODTrainer_noDP(MODTrainer):
    nnx_summary = "MOD ablation: online tokenizer only (no dense predictor, L_DP off)"
    nnx_options = {"lambda_dp": _opt(0.0, "lambda_2: weight of L_DP (ablation: 0)")}


class MODTrainer_noOT(MODTrainer):
    nnx_summary = "MOD ablation: dense predictor only (no online tokenizer / teacher, L_OT off)"
    nnx_options = {"lambda_ot": _opt(0.0, "lambda_1: weight of L_OT (ablation: 0)")}


__all__ = ["MODTrainer", "MODTrainer_paperHP", "MODTrainer_noDP", "MODTrainer_noOT", "MODTrainWrapper",
           "WarmupCosineLR", "LOG_KEYS"]
