"""Anatomy injection trainers (Jaus 2025 thesis ch. 4.2, GRASP; spec ``shared/specs/003-jaus-thesis.md`` M5 and the
multi-task baseline of M5 §2 / M4).

* :class:`AnatomyInputTrainer` ("ANA in."): the anatomy map (dataset.json ``nnx.aux_maps.anatomy``) is an extra
  network input -- one scaled channel (default, as GRASP) or one-hot over (grouped) classes. nnx's loader prepares it
  label-safely and augments it with the image; ``nnx_predict -inputs anatomy=DIR`` feeds the test maps. Network,
  loss and schedule are stock.
* :class:`GRASPTrainer`: ANA in. + bottleneck fusion of a frozen anatomy encoder (``Mirror``) at the deepest encoder
  stages, switched on after ``fusion_start_fraction`` of the epochs, never at inference (the thesis): the inference
  network is the plain planned network with the anatomy input (its weights load into nnU-Net's own network). The
  spec's keep-fusion-at-inference variant is the option ``inference_fusion=on`` (:class:`GRASPFusedNet`), at
  training (validation, ``checkpoint_best``) or at prediction time (``nnx_predict --opt inference_fusion=on``).
* :class:`AnatomyMultiTaskTrainer`: shared encoder, pathology and anatomy decoders, magnitude-normalised
  ``α·L_path + (1−α)·L_ana``; image-only input, the anatomy decoder never reaches inference (stock network).

See README.md next to this file for options, choices on the spec's ambiguities, the two-step recipe and the cost.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import autocast, nn

from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from nnunetv2.utilities.helpers import dummy_context

from nnx.errors import NNXError
from nnx.options import Option
from nnx.trainer_base import nnxTrainer

from .encoding import ENCODINGS, channel_definitions, class_lut, parse_groups
from .fusion import GRASPFusion
from .multitask import NORMS, MagnitudeNormalizedSum, build_anatomy_decoder

AUX_MAP = "anatomy"  # the dataset.json nnx.aux_maps entry these trainers read


def unwrap(network: nn.Module) -> nn.Module:
    """The plain network inside DDP / torch.compile wrappers."""
    mod = network
    while True:
        if isinstance(getattr(mod, "module", None), nn.Module):
            mod = mod.module
        elif hasattr(mod, "_orig_mod"):
            mod = mod._orig_mod
        else:
            return mod


def _encoder_decoder(net: nn.Module, who: str):
    if not (hasattr(net, "encoder") and hasattr(net, "decoder")):
        raise NNXError(f"{who} needs an nnU-Net encoder-decoder network (encoder + decoder), got {type(net).__name__}")
    return net.encoder, net.decoder


_ANATOMY_OPTIONS = {
    "anatomy_encoding": Option("scaled", "anatomy input encoding: scaled (one channel, class/C as in GRASP) or onehot "
                                         "(one channel per class or group)", str, choices=ENCODINGS),
    "anatomy_groups": Option("", "group anatomy classes, e.g. liver+kidney/spleen/bladder+spine (groups separated "
                                 "by '/', members by '+', names or values; classes in no group are dropped; a group "
                                 "'*' = every class not named, one group each, e.g. */kidney/liver); empty = "
                                 "every anatomy label is its own class", str),
    "anatomy_offset": Option(0.0, "scaled encoding only: organ codes offset + (1 - offset) * class/C, background 0; "
                                  "0 = class/C (the spec's proposal), e.g. 0.5 puts every organ >= 0.5 away from "
                                  "background", float),
}


class _AnatomyMixin:
    def _anatomy_labels(self) -> Dict[str, int]:
        return dict(self._nnx_spec().entry(AUX_MAP).labels)

    def anatomy_groups(self) -> List[List[int]]:
        return parse_groups(self.nnx_opts["anatomy_groups"], self._anatomy_labels(), "anatomy_groups")

    def _autocast(self):
        return autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context()

    def _step(self, loss: torch.Tensor, params: List[nn.Parameter]) -> None:
        """nnU-Net's backward + clipping (norm 12) + optimizer step, over ``params``."""
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            self.grad_scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(params, 12)
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 12)
            self.optimizer.step()


# ----------------------------------------------------------------------------------------------------------------------
class AnatomyInputTrainer(_AnatomyMixin, nnxTrainer):
    nnx_summary = ("ANA in.: nnU-Net + the anatomy map as an extra input (one scaled channel as in GRASP, or one-hot "
                   "over grouped classes); needs anatomy maps at inference")
    nnx_source = "Jaus 2025 thesis ch. 4.2 (GRASP 'ANA in.', Table 15); spec shared/specs/003-jaus-thesis.md M5"
    nnx_requires = {"inputs": [AUX_MAP]}
    nnx_options = dict(_ANATOMY_OPTIONS)
    # one (scaled) or a few (one-hot) more input channels: only the first convolution grows
    nnx_memory = {"activation_factor": 1.0, "static_gb": 0.0}
    nnx_inference_network_is_stock = False  # stock nnU-Net cannot feed the anatomy map (nnx_predict -inputs can)

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.anatomy_groups()  # one-line errors for a missing anatomy map / bad groups, before any training
        off, enc = self.nnx_opts["anatomy_offset"], self.nnx_opts["anatomy_encoding"]
        if not 0.0 <= off < 1.0:
            raise NNXError(f"option 'anatomy_offset' must be in [0, 1), got {off}")
        if off and enc != "scaled":
            raise NNXError(f"option 'anatomy_offset' applies to anatomy_encoding=scaled only (got {enc})")

    def nnx_input_encoding(self, name: str, values: List[int]) -> List:
        if name != AUX_MAP:
            return super().nnx_input_encoding(name, values)
        return channel_definitions(self.anatomy_groups(), self.nnx_opts["anatomy_encoding"],
                                   scale_by_value=not self.nnx_opts["anatomy_groups"].strip(),
                                   offset=self.nnx_opts["anatomy_offset"])

# ----------------------------------------------------------------------------------------------------------------------
class GRASPTrainNet(nn.Module):
    """Training-time forward: the plain network, or encoder -> fusion of the deepest stages -> decoder."""

    def __init__(self, network: nn.Module, fusion: GRASPFusion):
        super().__init__()
        self.net = network
        self.fusion = fusion

    def forward(self, x: torch.Tensor, ana_skips: Optional[List[torch.Tensor]] = None):
        if ana_skips is None:
            return self.net(x)
        return self.net.decoder(self.fusion(self.net.encoder(x), ana_skips))


class GRASPFusedNet(nn.Module):
    """Eval-mode forward with fusion (``inference_fusion=on``, the spec's keep-fusion-at-inference variant): the
    pathology encoder, the fusion blocks fed by the frozen anatomy encoder on the re-normalised CT channel, the
    pathology decoder. Same input and output as the plain network, so nnU-Net's predictor runs it unchanged."""

    def __init__(self, network: nn.Module, fusion: GRASPFusion, anatomy, ct_channel: int):
        super().__init__()
        self.net = network
        self.fusion = fusion
        self.anatomy = anatomy.encoder  # frozen; its weights travel in the state dict only to load it per fold
        self.anatomy_model = anatomy    # the same encoder with its CT re-normalisation
        self.ct_channel = int(ct_channel)

    @property
    def decoder(self) -> nn.Module:  # nnU-Net's set_deep_supervision_enabled reaches network.decoder
        return self.net.decoder

    def train(self, mode: bool = True):
        super().train(mode)
        self.anatomy.eval()  # always eval: it is frozen
        return self

    def forward(self, x: torch.Tensor):
        from .mirror import anatomy_features
        ana = anatomy_features(self.anatomy_model, x, self.ct_channel, keep=self.fusion.n_stages)
        return self.net.decoder(self.fusion(self.net.encoder(x), ana))


class GRASPTrainer(AnatomyInputTrainer):
    nnx_summary = ("GRASP: ANA in. + fusion of a frozen anatomy encoder (Mirror: an organ model with the same plans) "
                   "at the 2 deepest encoder stages, on after 1/6 of the epochs, dropped at inference (inference_fusion=on "
                   "keeps it)")
    nnx_source = "Jaus 2025 thesis ch. 4.2 (GRASP, MLMI 2025), Fig. 25; spec shared/specs/003-jaus-thesis.md M5"
    nnx_options = {
        "anatomy_model": Option("", "results folder of the organ model (<Trainer>__<Plans>__<configuration>, trained "
                                    "on CT with the same plans); required ('random': an untrained frozen encoder, "
                                    "for cost measurement only)", str),
        "anatomy_fold": Option("0", "fold of the organ model whose encoder is used (0..4 or all)", str),
        "anatomy_checkpoint": Option("checkpoint_final.pth", "checkpoint of the organ model", str),
        "ct_channel": Option(0, "image channel that is CT (the anatomy encoder's input)", int),
        "fusion_start_fraction": Option(50 / 300, "fusion is off for the first round(f * epochs) epochs (thesis: 50 "
                                                  "of 300)", float),
        "fusion_start_epoch": Option(-1, "first epoch with fusion; overrides fusion_start_fraction when >= 0", int),
        "fusion_stages": Option(2, "number of deepest encoder stages fused (thesis: 2)", int),
        "heads": Option(8, "attention heads (thesis: 8)", int),
        "sa_kernel": Option(7, "kernel of the spatial attention (UNSPECIFIED; CBAM default 7)", int),
        "se_reduction": Option(16, "reduction ratio of the SE channel attention (UNSPECIFIED; SE default 16)", int),
        "ffn_ratio": Option(2.0, "hidden width / channels of the transformer block's FFN (UNSPECIFIED; 0 = no FFN "
                                 "is not supported, use a small value)", float),
        "inference_fusion": Option("off", "off: fusion dropped in eval mode (validation, checkpoint_best, "
                                          "nnx_predict), as the thesis; on: kept there after the switch epoch (the "
                                          "spec's keep-fusion-at-inference variant; prediction then needs the organ "
                                          "model). nnx_predict --opt inference_fusion=on|off overrides it", str,
                                   choices=("off", "on")),
    }
    # nnx_predict --opt may change these: whether the fusion runs, and where the organ model lives now (checksummed)
    nnx_inference_options = ("inference_fusion", "anatomy_model")
    # the frozen encoder runs under no_grad: its activations are transient (one stage at a time) and its weights are
    # not in the optimizer; the fusion blocks see only the two deepest stages (few voxels; attention over N tokens
    # costs heads*N^2 per sample, N = 4^3..8^3 for 3d_fullres), see cost.py
    nnx_memory = {"activation_factor": 1.1, "static_gb": 0.3}
    nnx_inference_network_is_stock = False  # the plain planned network, but with the anatomy input (nnx_predict)
    # nnx_bench overhead: a random frozen encoder of the same plans (same cost) and fusion from the first step
    nnx_overhead_options = {"anatomy_model": "random", "fusion_start_epoch": "0"}

    @classmethod
    def nnx_check_options(cls, v: Dict[str, Any], src: str) -> None:
        super().nnx_check_options(v, src)
        if not str(v["anatomy_model"]).strip():
            raise NNXError("GRASPTrainer needs the option anatomy_model=<results folder of the organ model> (see "
                           "plugins/anatomy/README.md, two-step recipe)", src)
        for k in ("fusion_stages", "heads", "sa_kernel", "se_reduction"):
            if v[k] < 1:
                raise NNXError(f"option '{k}' must be >= 1, got {v[k]}", src)
        if v["sa_kernel"] % 2 == 0:
            raise NNXError(f"option 'sa_kernel' must be odd, got {v['sa_kernel']}", src)
        if not 0.0 <= v["fusion_start_fraction"] <= 1.0:
            raise NNXError(f"option 'fusion_start_fraction' must be in [0, 1], got {v['fusion_start_fraction']}", src)
        if not v["ffn_ratio"] > 0:
            raise NNXError(f"option 'ffn_ratio' must be > 0, got {v['ffn_ratio']}", src)

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        from .mirror import load_anatomy_model
        o = self.nnx_opts
        self.grasp_anatomy = load_anatomy_model(o["anatomy_model"], o["anatomy_fold"], o["anatomy_checkpoint"],
                                                self.plans_manager, self.configuration_manager,
                                                self.configuration_name, dataset_json, o["ct_channel"], self.device)
        self.grasp_fusion: Optional[GRASPFusion] = None
        self._grasp_train_module: Optional[nn.Module] = None
        if o["inference_fusion"] == "on" and self.is_ddp:
            raise NNXError("inference_fusion=on is not supported with DDP training; train with one GPU, or with "
                           "inference_fusion=off and predict with nnx_predict --opt inference_fusion=on")

    @property
    def grasp_start_epoch(self) -> int:
        o = self.nnx_opts
        if o["fusion_start_epoch"] >= 0:
            return int(o["fusion_start_epoch"])
        return int(np.floor(o["fusion_start_fraction"] * self.num_epochs + 0.5))

    def grasp_fused_in_eval(self) -> bool:
        """Eval mode (validation, inference) is fused: ``inference_fusion=on`` and the switch epoch reached."""
        return self.nnx_opts["inference_fusion"] == "on" and self.current_epoch >= self.grasp_start_epoch

    def grasp_fusion_active(self) -> bool:
        """Fusion runs in training mode from ``grasp_start_epoch`` on; in eval mode (validation, inference) only with
        ``inference_fusion=on``."""
        if unwrap(self.network).training:
            return self.current_epoch >= self.grasp_start_epoch
        return self.grasp_fused_in_eval()

    @contextmanager
    def nnx_eval_network(self):
        """With ``inference_fusion=on`` after the switch epoch, nnU-Net's validation (and nnx_bench's inference
        timing) runs :class:`GRASPFusedNet`; otherwise the plain network."""
        if not self.grasp_fused_in_eval():
            yield
            return
        self._grasp_build()
        plain = self.network
        fused = GRASPFusedNet(unwrap(plain), self.grasp_fusion, self.grasp_anatomy, self.nnx_opts["ct_channel"])
        fused.train(unwrap(plain).training)
        self.network = fused
        try:
            yield
        finally:
            self.network = plain
            self.grasp_fusion.train()

    def _grasp_build(self) -> None:
        if self.grasp_fusion is not None:
            return
        o = self.nnx_opts
        enc, _ = _encoder_decoder(unwrap(self.network), "GRASPTrainer")
        ndim = len(self.configuration_manager.patch_size)
        c_path = list(enc.output_channels)
        try:
            self.grasp_fusion = GRASPFusion(c_path, self.grasp_anatomy.channels, o["fusion_stages"], ndim, o["heads"],
                                            o["sa_kernel"], o["se_reduction"], o["ffn_ratio"]).to(self.device)
        except ValueError as e:
            raise NNXError(f"GRASP fusion: {e} (options fusion_stages / heads)") from None
        n = sum(p.numel() for p in self.grasp_fusion.parameters())
        where = "also in validation and at inference" if o["inference_fusion"] == "on" else "never at inference"
        self.print_to_log_file(
            f"GRASP: anatomy encoder from {self.grasp_anatomy.folder} (fold {self.grasp_anatomy.fold}, frozen, "
            f"stage channels {self.grasp_anatomy.channels}); fusion at the {o['fusion_stages']} deepest stages "
            f"(channels {c_path[::-1][:o['fusion_stages']]}), {o['heads']} heads, {n:,} parameters; fusion from epoch "
            f"{self.grasp_start_epoch} of {self.num_epochs}, {where}")

    def grasp_params(self) -> List[nn.Parameter]:
        return list(unwrap(self.network).parameters()) + list(self.grasp_fusion.parameters())

    def configure_optimizers(self):
        self._grasp_build()
        optimizer = torch.optim.SGD([{"params": list(self.network.parameters())},
                                     {"params": list(self.grasp_fusion.parameters())}], self.initial_lr,
                                    weight_decay=self.weight_decay, momentum=0.99, nesterov=True)
        return optimizer, PolyLRScheduler(optimizer, self.initial_lr, self.num_epochs)

    def initialize(self):
        super().initialize()
        module = GRASPTrainNet(unwrap(self.network), self.grasp_fusion)
        if self.is_ddp:  # fusion parameters are unused before the switch epoch
            from torch.nn.parallel import DistributedDataParallel as DDP
            module = DDP(module, device_ids=[self.local_rank], find_unused_parameters=True)
        self._grasp_train_module = module

    def grasp_forward(self, data: torch.Tensor):
        """The training forward: fused from the switch epoch on (training mode), the plain network otherwise."""
        if self.grasp_fusion_active():
            from .mirror import anatomy_features
            # E_ana runs before the pathology forward, so its transient activations are freed before the peak; only
            # the fused (deepest) stages are kept
            ana = anatomy_features(self.grasp_anatomy, data, self.nnx_opts["ct_channel"],
                                   keep=self.grasp_fusion.n_stages)
            return self._grasp_train_module(data, ana)
        return self._grasp_train_module(data)

    def train_step(self, batch: dict) -> dict:
        data, target = self.nnx_batch_on_device(batch)
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            output = self.grasp_forward(data)
            loss = self.loss(output, target)
        self._step(loss, self.grasp_params())
        return {"loss": loss.detach().cpu().numpy()}

    def on_train_epoch_end(self, train_outputs: List[dict]):
        super().on_train_epoch_end(train_outputs)
        deltas = [round(float(b.delta.detach()), 4) for b in self.grasp_fusion.blocks]
        state = "on" if self.current_epoch >= self.grasp_start_epoch else "off"
        self.print_to_log_file(f"GRASP: fusion {state}, delta per fused stage (deepest first) {deltas}")

    # ------------------------------------------------------------------ checkpoints
    def nnx_extra_state(self) -> Dict[str, Any]:
        if self.grasp_fusion is None:
            return {}
        a = self.grasp_anatomy
        return {"grasp_version": 1, "fusion": self.grasp_fusion.state_dict(), "fusion_start_epoch":
                self.grasp_start_epoch, "anatomy_model": a.folder, "anatomy_fold": a.fold,
                "anatomy_checkpoint": a.checkpoint, "anatomy_encoder_checksum": a.checksum}

    def nnx_load_extra_state(self, state: Dict[str, Any]) -> None:
        if "fusion" not in state:
            return
        from .mirror import same_encoder
        old, new = state.get("anatomy_encoder_checksum"), self.grasp_anatomy.checksum
        if not same_encoder(old, self.grasp_anatomy):
            raise NNXError(f"the anatomy encoder at {self.grasp_anatomy.folder} is not the one this checkpoint was "
                           f"trained with ({state.get('anatomy_model')}; weights checksum {old} vs {new})")
        self.grasp_fusion.load_state_dict(state["fusion"])

    @classmethod
    def nnx_inference_network(cls, network: nn.Module, folds: List[Dict[str, Any]], predictor
                              ) -> Optional[Tuple[nn.Module, List[Dict[str, Any]]]]:
        """``inference_fusion=on``: :class:`GRASPFusedNet` with each fold's network and fusion weights and the organ
        model's frozen encoder (loaded from ``anatomy_model``, checked against the checksum stored at training)."""
        from .mirror import load_anatomy_model, same_encoder
        modes = {f["options"]["inference_fusion"] for f in folds}
        if modes == {"off"}:
            return None
        if len(modes) > 1:
            raise NNXError("the folds disagree on inference_fusion (set it for all with nnx_predict --opt "
                           "inference_fusion=on|off)", folds[0]["dir"])
        o = folds[0]["options"]
        anatomy, key0, params = None, None, []
        for f in folds:
            ck, where = f["checkpoint"], f["dir"]
            e = ck.get("nnx_extra") or {}
            if "fusion" not in e:
                raise NNXError("inference_fusion=on needs the fusion weights, but this checkpoint has none (saved "
                               "before the fusion blocks were built)", where)
            if int(ck.get("current_epoch", 0)) <= int(e.get("fusion_start_epoch", 0)):
                raise NNXError(f"inference_fusion=on: the fusion was never trained (training stopped at epoch "
                               f"{ck.get('current_epoch')}, fusion from epoch {e.get('fusion_start_epoch')})", where)
            key = (f["options"]["anatomy_model"] or e["anatomy_model"], str(e["anatomy_fold"]),
                   e["anatomy_checkpoint"])
            if anatomy is None:
                key0 = key
                anatomy = load_anatomy_model(*key, predictor.plans_manager, predictor.configuration_manager,
                                             ck["init_args"]["configuration"], predictor.dataset_json,
                                             o["ct_channel"], torch.device("cpu"))
            elif key != key0:
                raise NNXError("inference_fusion=on: the folds were trained with different organ models; predict "
                               "them separately", where)
            if not same_encoder(e.get("anatomy_encoder_checksum"), anatomy):
                raise NNXError(f"the organ model at {anatomy.folder} is not the one this checkpoint was trained with "
                               f"({e.get('anatomy_model')})", where)
            params.append({**{f"net.{k}": v for k, v in ck["network_weights"].items()},
                           **{f"fusion.{k}": v for k, v in e["fusion"].items()},
                           **{f"anatomy.{k}": v for k, v in anatomy.encoder.state_dict().items()}})
        try:
            fusion = GRASPFusion(list(network.encoder.output_channels), anatomy.channels, o["fusion_stages"],
                                 len(predictor.configuration_manager.patch_size), o["heads"], o["sa_kernel"],
                                 o["se_reduction"], o["ffn_ratio"])
        except ValueError as e:
            raise NNXError(f"GRASP fusion: {e}", folds[0]["dir"]) from None
        print(f"GRASP: fusion kept at inference (inference_fusion=on), frozen anatomy encoder from {anatomy.folder}")
        return GRASPFusedNet(network, fusion, anatomy, o["ct_channel"]).eval(), params


# ----------------------------------------------------------------------------------------------------------------------
class MultiTaskTrainNet(nn.Module):
    """Shared encoder -> (pathology decoder output, anatomy decoder output)."""

    def __init__(self, network: nn.Module, anatomy_decoder: nn.Module):
        super().__init__()
        self.net = network
        self.anatomy_decoder = anatomy_decoder

    def forward(self, x: torch.Tensor):
        skips = self.net.encoder(x)
        return self.net.decoder(skips), self.anatomy_decoder(skips)


class AnatomyMultiTaskTrainer(_AnatomyMixin, nnxTrainer):
    nnx_summary = ("multi-task baseline: shared encoder, lesion and anatomy decoders, loss 0.8 L_path + 0.2 L_ana "
                   "(each divided by its running mean magnitude); image-only input, stock inference network")
    nnx_source = "Jaus 2025 thesis ch. 4.2 (GRASP exploration, Table 14 multi-task); spec 003 M5 §2, M4 §2"
    nnx_requires = {"batch": [AUX_MAP]}
    nnx_options = {
        "alpha": Option(0.8, "alpha: L = alpha L_path + (1 - alpha) L_ana (thesis' best 0.8)", float),
        "loss_norm": Option("running", "magnitude normalisation of each term: running (divide by a running mean of "
                                       "|L|), batch (by the detached |L| of the step) or none", str, choices=NORMS),
        "norm_momentum": Option(0.99, "momentum of the running mean (loss_norm=running)", float),
        "anatomy_groups": _ANATOMY_OPTIONS["anatomy_groups"],
    }
    # a second decoder (activations of about one decoder; nnU-Net's decoder holds roughly half a step's activations)
    nnx_memory = {"activation_factor": 1.5, "static_gb": 0.1}
    nnx_inference_network_is_stock = True

    @classmethod
    def nnx_check_options(cls, v: Dict[str, Any], src: str) -> None:
        super().nnx_check_options(v, src)
        if not 0.0 <= v["alpha"] <= 1.0:
            raise NNXError(f"option 'alpha' must be in [0, 1], got {v['alpha']}", src)
        if not 0.0 <= v["norm_momentum"] < 1.0:
            raise NNXError(f"option 'norm_momentum' must be in [0, 1), got {v['norm_momentum']}", src)

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        groups = self.anatomy_groups()
        lut = class_lut(groups)
        self.mt_num_classes = len(groups) + 1
        table = np.zeros(max(max(lut), 0) + 1, dtype=np.int64)
        for v, c in lut.items():
            table[v] = c
        self.mt_lut = torch.from_numpy(table)
        self.anatomy_decoder: Optional[nn.Module] = None
        self.mt_loss: Optional[MagnitudeNormalizedSum] = None
        self._mt_train_module: Optional[nn.Module] = None

    def anatomy_target(self, anatomy: torch.Tensor) -> torch.Tensor:
        """Aux map (B, 1, *patch) label values -> class indices 0..G (values outside the groups -> 0)."""
        a = anatomy.long().clamp_min(0)
        lut = self.mt_lut.to(a.device)
        a = torch.where(a < len(lut), a, torch.zeros_like(a))
        return lut[a]

    def _mt_build(self) -> None:
        if self.anatomy_decoder is not None:
            return
        from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
        from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
        net = unwrap(self.network)
        _encoder_decoder(net, "AnatomyMultiTaskTrainer")
        kw = self.configuration_manager.network_arch_init_kwargs
        n_conv = kw.get("n_conv_per_stage_decoder", 2)
        self.anatomy_decoder = build_anatomy_decoder(net, self.mt_num_classes, n_conv,
                                                     bool(kw.get("nonlin_first", False))).to(self.device)
        self.mt_anatomy_loss = DC_and_CE_loss({"batch_dice": self.configuration_manager.batch_dice, "smooth": 1e-5,
                                               "do_bg": False, "ddp": self.is_ddp}, {}, weight_ce=1, weight_dice=1,
                                              dice_class=MemoryEfficientSoftDiceLoss)
        o = self.nnx_opts
        self.mt_loss = MagnitudeNormalizedSum(o["alpha"], o["loss_norm"], o["norm_momentum"]).to(self.device)
        self.print_to_log_file(f"multi-task: anatomy decoder over {self.mt_num_classes - 1} classes "
                               f"({sum(p.numel() for p in self.anatomy_decoder.parameters()):,} parameters), "
                               f"alpha={o['alpha']}, normalisation {o['loss_norm']}")

    def configure_optimizers(self):
        self._mt_build()
        optimizer = torch.optim.SGD([{"params": list(self.network.parameters())},
                                     {"params": list(self.anatomy_decoder.parameters())}], self.initial_lr,
                                    weight_decay=self.weight_decay, momentum=0.99, nesterov=True)
        return optimizer, PolyLRScheduler(optimizer, self.initial_lr, self.num_epochs)

    def initialize(self):
        super().initialize()
        module = MultiTaskTrainNet(unwrap(self.network), self.anatomy_decoder)
        if self.is_ddp:
            from torch.nn.parallel import DistributedDataParallel as DDP
            module = DDP(module, device_ids=[self.local_rank])
        self._mt_train_module = module

    def mt_losses(self, data: torch.Tensor, target, anatomy: torch.Tensor) -> Dict[str, torch.Tensor]:
        out_path, out_ana = self._mt_train_module(data)
        l_path = self.loss(out_path, target)
        l_ana = self.mt_anatomy_loss(out_ana, self.anatomy_target(anatomy))
        res = self.mt_loss(l_path, l_ana)
        return {**res, "l_path": l_path, "l_ana": l_ana}

    def train_step(self, batch: dict) -> dict:
        data, target = self.nnx_batch_on_device(batch)
        anatomy = batch[AUX_MAP].to(self.device, non_blocking=True)
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            res = self.mt_losses(data, target, anatomy)
        params = list(unwrap(self.network).parameters()) + list(self.anatomy_decoder.parameters())
        self._step(res["loss"], params)
        return {"loss": res["loss"].detach().cpu().numpy(), "l_path": res["l_path"].detach().cpu().numpy(),
                "l_ana": res["l_ana"].detach().cpu().numpy()}

    def on_train_epoch_end(self, train_outputs: List[dict]):
        super().on_train_epoch_end(train_outputs)
        lp = float(np.mean([o["l_path"] for o in train_outputs]))
        la = float(np.mean([o["l_ana"] for o in train_outputs]))
        self.print_to_log_file(f"multi-task: L_path {lp:.4f}, L_ana {la:.4f}, running magnitudes "
                               f"{float(self.mt_loss.m_path):.4f} / {float(self.mt_loss.m_ana):.4f}")

    def nnx_extra_state(self) -> Dict[str, Any]:
        if self.anatomy_decoder is None:
            return {}
        return {"multitask_version": 1, "anatomy_decoder": self.anatomy_decoder.state_dict(),
                "loss_norm": self.mt_loss.state_dict(), "num_classes": self.mt_num_classes}

    def nnx_load_extra_state(self, state: Dict[str, Any]) -> None:
        if "anatomy_decoder" not in state:
            return
        if state.get("num_classes") != self.mt_num_classes:
            raise NNXError(f"the checkpoint's anatomy decoder has {state.get('num_classes')} classes, this run "
                           f"{self.mt_num_classes} (anatomy_groups changed?)")
        self.anatomy_decoder.load_state_dict(state["anatomy_decoder"])
        self.mt_loss.load_state_dict(state["loss_norm"])


__all__ = ["AUX_MAP", "AnatomyInputTrainer", "GRASPTrainer", "GRASPTrainNet", "GRASPFusedNet",
           "AnatomyMultiTaskTrainer", "MultiTaskTrainNet", "unwrap"]
