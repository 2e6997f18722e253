"""The inference network of the cross-teaching family: both networks in ONE module (spec §7.2 ``DualNet``).

:class:`DualNet` holds ``a`` = the planned nnU-Net CNN (stock ``build_network_architecture``) and ``b`` = the
second network: the CS-Unet (``nnx_plugins.csunet``, default) or a second planned nnU-Net network with its own
random initialisation (``second_network=cnn``, a CNN-CNN cross-pseudo-supervision ablation). ``forward(x)``
returns the output selected by ``infer_mode``: ``cnn`` (a, MCSC's choice: "the Transformer is discarded"),
``second`` (b) or ``mean`` (``log`` of the mean of both softmaxes, a valid logit tensor whose softmax / argmax are
those of the mean probability).

**The configuration travels with the weights.** nnU-Net's predictor rebuilds the network through the trainer's
*static* ``build_network_architecture`` (no trainer options there) and then calls ``load_state_dict``. The second
network's kind and options and ``infer_mode`` are the module's *extra state* (``state_dict()['_extra_state']``);
loading a state dict whose configuration differs from the module's rebuilds ``b`` from the stored configuration
first (:meth:`DualNet.set_extra_state`). So stock ``nnUNetv2_predict`` (with ``nnUNet_extTrainer``) and
``nnx_predict`` run the network exactly as trained, whatever the options were, without reading any option.

Plugin-only modules (projectors) live outside this module (:class:`CrossTeachTrainWrapper` joins them for DDP).
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Dict, Optional

import torch
from torch import nn

SECOND_NETWORKS = ("csunet", "cnn")
INFER_MODES = ("cnn", "second", "mean")
DEFAULT_CONFIG: Dict[str, Any] = {"second": "csunet", "second_options": {}, "infer_mode": "cnn"}


def full_resolution(out):
    """The full-resolution output of a network (first deep-supervision output, or the tensor)."""
    return out[0] if isinstance(out, (list, tuple)) else out


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside DDP / torch.compile wrappers."""
    from torch._dynamo import OptimizedModule
    from torch.nn.parallel import DistributedDataParallel as DDP
    while isinstance(module, (DDP, OptimizedModule)):
        module = module.module if isinstance(module, DDP) else module._orig_mod
    return module


def csunet_api():
    """(CSUNET_OPTIONS, build_csunet) of the CS-Unet plugin, or a one-line error."""
    try:
        from nnx_plugins.csunet.network import CSUNET_OPTIONS, build_csunet
    except ImportError as e:  # pragma: no cover - the plugin ships with nnx
        from nnx.errors import NNXError
        raise NNXError(f"second_network=csunet needs the CS-Unet plugin (nnx_plugins.csunet): {e}; use "
                       f"second_network=cnn") from None
    return CSUNET_OPTIONS, build_csunet


def build_second_network(kind: str, plans_manager, configuration_manager, num_input_channels: int,
                         num_output_channels: int, enable_deep_supervision: bool,
                         options: Optional[Dict[str, Any]] = None) -> nn.Module:
    """The second network: ``csunet`` (built from the planned configuration by the CS-Unet plugin, its options
    ``options``) or ``cnn`` (the planned nnU-Net network again, new random initialisation)."""
    if kind == "cnn":
        from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
        return nnUNetTrainer.build_network_architecture(plans_manager, configuration_manager, num_input_channels,
                                                        num_output_channels, enable_deep_supervision)
    if kind == "csunet":
        known, build = csunet_api()
        # options the installed CS-Unet does not know are dropped: the CS-Unet's own weights carry its full build
        # configuration (buffer csunet_config) and rebuild it exactly when the state dict is loaded
        opts = {k: v for k, v in dict(options or {}).items() if k in known}
        return build(dict(configuration_manager.network_arch_init_kwargs), num_input_channels, num_output_channels,
                     enable_deep_supervision, list(configuration_manager.patch_size), **opts)
    raise ValueError(f"unknown second network {kind!r} (choices: {', '.join(SECOND_NETWORKS)})")


class _DeepSupervisionSwitch:
    """``dual.decoder.deep_supervision = x`` (what nnU-Net's ``set_deep_supervision_enabled`` does) reaches both
    networks."""

    def __init__(self, dual: "DualNet"):
        object.__setattr__(self, "_dual", dual)

    @property
    def deep_supervision(self) -> bool:
        return bool(self._dual.a.decoder.deep_supervision)

    @deep_supervision.setter
    def deep_supervision(self, value: bool) -> None:
        self._dual.set_deep_supervision(value)


class DualNet(nn.Module):
    """Planned CNN ``a`` + second network ``b``; ``forward`` returns the ``infer_mode`` output (module docstring).
    ``rebuild(config)`` returns a new second network for a configuration (set by :func:`build_dual_network`)."""

    def __init__(self, a: nn.Module, b: nn.Module, config: Dict[str, Any],
                 rebuild: Optional[Callable[[Dict[str, Any]], nn.Module]] = None):
        super().__init__()
        self.a = a
        self.b = b
        self.config = {**copy.deepcopy(DEFAULT_CONFIG), **copy.deepcopy(config)}
        if self.config["infer_mode"] not in INFER_MODES:
            raise ValueError(f"infer_mode must be one of {INFER_MODES}, got {self.config['infer_mode']!r}")
        self._rebuild = rebuild
        self.rebuild_on_load = True   # trainers switch this off (an optimizer holds the parameters)

    # -- configuration carried in the state dict --------------------------------------------------------------------
    @property
    def infer_mode(self) -> str:
        return self.config["infer_mode"]

    def set_infer_mode(self, mode: str) -> None:
        if mode not in INFER_MODES:
            raise ValueError(f"infer_mode must be one of {INFER_MODES}, got {mode!r}")
        self.config["infer_mode"] = mode

    def get_extra_state(self) -> Dict[str, Any]:
        return {"version": 1, **copy.deepcopy(self.config)}

    def set_extra_state(self, state: Dict[str, Any]) -> None:
        new = {k: copy.deepcopy(state[k]) for k in DEFAULT_CONFIG if k in state}
        new = {**copy.deepcopy(DEFAULT_CONFIG), **new}
        if (new["second"], new["second_options"]) != (self.config["second"], self.config["second_options"]):
            if self._rebuild is None or not self.rebuild_on_load:
                raise RuntimeError(f"the weights hold another second network ({new['second']}, "
                                   f"{new['second_options']}) than this network ({self.config['second']}, "
                                   f"{self.config['second_options']}); a trainer cannot rebuild it under its "
                                   f"optimizer: use the options the checkpoint was trained with")
            p = next(self.a.parameters())
            ds = bool(getattr(getattr(self.b, "decoder", None), "deep_supervision", False))
            self.b = self._rebuild({**new, "deep_supervision": ds}).to(device=p.device)
        self.config = new

    # -- deep supervision ---------------------------------------------------------------------------------------------
    @property
    def decoder(self) -> _DeepSupervisionSwitch:
        return _DeepSupervisionSwitch(self)

    def set_deep_supervision(self, enabled: bool) -> None:
        for net in (self.a, self.b):
            dec = getattr(net, "decoder", None)
            if dec is not None and hasattr(dec, "deep_supervision"):
                dec.deep_supervision = bool(enabled)

    # -- inference ----------------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor):
        mode = self.config["infer_mode"]
        if mode == "cnn":
            return self.a(x)
        if mode == "second":
            return self.b(x)
        pa = torch.softmax(full_resolution(self.a(x)).float(), 1)
        pb = torch.softmax(full_resolution(self.b(x)).float(), 1)
        return torch.log(((pa + pb) / 2).clamp_min(1e-12))


def cnn_weights(weights: Dict[str, Any]) -> Dict[str, Any]:
    """The planned CNN's weights from a DualNet state dict whose ``infer_mode`` is ``cnn`` (its inference output is
    then exactly that stock network's); ``ValueError`` for ``second`` / ``mean``, whose output needs the pair."""
    mode = {**DEFAULT_CONFIG, **dict(weights.get("_extra_state") or {})}["infer_mode"]
    if mode != "cnn":
        raise ValueError(f"its inference output is infer_mode={mode!r}, which needs the second network; only "
                         f"infer_mode='cnn' (the CNN alone) runs as nnU-Net's own network")
    return {k[2:]: v for k, v in weights.items() if k.startswith("a.")}


def build_dual_network(plans_manager, configuration_manager, num_input_channels: int, num_output_channels: int,
                       enable_deep_supervision: bool = True, config: Optional[Dict[str, Any]] = None) -> DualNet:
    """What the trainers' ``build_network_architecture`` returns (``config`` = DEFAULT_CONFIG at prediction time;
    the stored configuration replaces it when the weights are loaded)."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    cfg = {**copy.deepcopy(DEFAULT_CONFIG), **copy.deepcopy(config or {})}

    def rebuild(c: Dict[str, Any]) -> nn.Module:
        return build_second_network(c["second"], plans_manager, configuration_manager, num_input_channels,
                                    num_output_channels, c.get("deep_supervision", enable_deep_supervision),
                                    c.get("second_options"))

    a = nnUNetTrainer.build_network_architecture(plans_manager, configuration_manager, num_input_channels,
                                                 num_output_channels, enable_deep_supervision)
    b = rebuild(cfg)
    return DualNet(a, b, cfg, rebuild)
