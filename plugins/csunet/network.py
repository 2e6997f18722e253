"""CS-Unet (Convolutional Swin-Unet; Liu 2025 thesis ch. 3, spec ``shared/specs/001-liu-thesis.md`` §3.2, §3.7)
lifted to 2D/3D and configured from an nnU-Net plan.

Interface (used by ``CSUNetTrainer`` and by other plugins, e.g. cross-teaching)
--------------------------------------------------------------------------------
``CSUNET_OPTIONS``
    ``{name: nnx.options.Option}``: ``csunet_embed_dim``, ``csunet_max_dim``, ``csunet_depths``,
    ``csunet_head_dim``, ``csunet_window``, ``csunet_window_fit``, ``csunet_mlp_ratio``, ``csunet_dsf_kernel``,
    ``csunet_layer_scale``, ``csunet_drop_path``, ``csunet_dropout``. Merge into a trainer's ``nnx_options``;
    pass the values on as ``**options``.
``build_csunet(arch_init_kwargs, num_input_channels, num_output_channels, enable_deep_supervision, patch_size,
**options) -> CSUNet``
    ``arch_init_kwargs``: the planned configuration's ``network_arch_init_kwargs`` (``n_stages``, ``strides``,
    ``kernel_sizes``, ``features_per_stage``; the rest is ignored); ``options``: values of ``CSUNET_OPTIONS``
    (missing ones take their defaults, unknown ones raise ``ValueError``).
``CSUNet``
    ``forward(x)`` -> logits ``(B, num_classes, *P)``, or with ``decoder.deep_supervision`` a list of logits at
    nnU-Net's deep-supervision scales, highest resolution first (``n_stages - 1`` outputs, as nnU-Net's U-Net).
    ``.decoder.deep_supervision`` is what nnU-Net's ``set_deep_supervision_enabled`` toggles. All heads always
    exist, so weights trained with deep supervision load into a network built without it.
    **Self-describing weights**: the buffer ``csunet_config`` (JSON as uint8) holds every build argument (plan
    values, patch size, options). Loading a state dict whose ``csunet_config`` differs from the network's rebuilds
    the network from the stored configuration first (on the same device), so stock ``nnUNetv2_predict``, which
    rebuilds the network without trainer options, gets the trained architecture. Set ``rebuild_on_load = False``
    on a network an optimizer already holds (trainers do), then a mismatch is an error instead.
Memory estimate for planning (both forms, same numbers)
    ``CSUNet.compute_conv_feature_map_size(input_size)`` (as dynamic_network_architectures' networks), and the
    class ``CSUNetPlanning`` (``network_class_name`` for ``nnx_memory["extra_architectures"]``, options under
    ``arch_kwargs={"csunet": {...}}``; it builds no modules). :func:`csunet_memory_profile` returns the
    ``nnx_memory`` dict of a trainer whose network IS the CS-Unet; :func:`csunet_extra_architecture` returns one
    ``extra_architectures`` entry (e.g. for a second, cross-teaching network). The estimate is in nnU-Net's units
    (see :func:`csunet_feature_map_size`).
``csunet_build_options(options)``
    context manager: the options ``build_csunet_from_managers`` uses while a trainer's static
    ``build_network_architecture`` runs (it has no other way to see trainer options).

Mapping to the plan (stages l = 0..S-1 of the planned U-Net, ``strides[l]`` = down-sampling into stage l)
------------------------------------------------------------------------------------------------------------
* Convolutional embedding: the plan's strides ``strides[1]`` and ``strides[2]`` (the thesis' two stride-2 convs,
  e.g. (1,2,2) then (2,2,2) for an anisotropic plan), kernels from ``kernel_sizes`` (1 on axes the plan keeps
  thin). Tokens start at stage 2.
* Transformer stages 2..S-1: a CST layer (``depths[l-2]`` blocks, W/SW alternating), then patch merging with
  ``strides[l+1]``; stage S-1 is the bottleneck. Decoder stages S-2..2: conv up-sampling (kernel = stride),
  concatenation with the skip, Skip-Convolution, a CST layer (mirrored depth).
* Head: two patch expansions (ConvTranspose with kernel = stride ``strides[2]``, then ``strides[1]``, each + LN)
  back to stages 1 and 0, a 1x1 conv (no bias) per output. Deep supervision: 1x1 heads on stage 0, 1 and the
  decoder stages 2..S-2.
* Widths: ``csunet_embed_dim`` C > 0: stage l >= 2 has min(C * 2^(l-2), ``csunet_max_dim``) channels (thesis:
  96, 192, 384, 768), stage 1 C/2, stage 0 C/4; 0: the plan's ``features_per_stage``. Heads = width /
  ``csunet_head_dim`` (32: the thesis' 3, 6, 12, 24 for C = 96).
* Windows: per stage and axis ``min(window, token grid of the planned patch)``; a grid that is not a multiple of
  the window is padded and the padding masked (:mod:`.windows`), or, with ``csunet_window_fit=divide``, the
  window shrinks to the largest divisor of the grid; SW shift = window // 2 on axes the window does not cover.
  DSF depthwise kernel per axis ``min(k, grid rounded up to odd)`` (7x7x7; 1 or 3 on a thin z axis).
* No positional embedding or relative position bias anywhere; trained from scratch.
"""
from __future__ import annotations

import contextlib
import contextvars
import json
import math
import re
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from nnx.options import Option

from .blocks import (ConvEmbedding, CSTLayer, PatchExpand, PatchMerging, UpSkip, conv_nd, to_channels_first)
from .windows import padded_size, stage_shift, stage_window

CSUNET_OPTIONS: Dict[str, Option] = {
    "csunet_embed_dim": Option(96, "CS-Unet width C of the first Transformer stage, doubled per stage (thesis 96); "
                                   "0 = the plan's features_per_stage", int),
    "csunet_max_dim": Option(768, "cap on the doubled widths (thesis' largest: 768), for plans with more than 4 "
                                  "Transformer stages", int),
    "csunet_depths": Option("2-2-2-2", "CST blocks per Transformer stage, encoder stages then bottleneck, '-'-"
                                       "separated; the decoder mirrors them; missing entries repeat the last "
                                       "([code] Swin-T lite: 2-2-2-2)", str),
    "csunet_head_dim": Option(32, "channels per attention head: heads = width / head_dim (32: 3,6,12,24 at C=96)",
                              int),
    "csunet_window": Option(7, "attention window per axis, clamped to each stage's token grid ([code]: 7)", int),
    "csunet_window_fit": Option("pad", "grids that are not a multiple of the window: pad (masked padding, window "
                                       "kept) or divide (window = largest divisor of the grid <= csunet_window)",
                                str, choices=("pad", "divide")),
    "csunet_mlp_ratio": Option(4.0, "DSF hidden width / width (thesis 4)", float),
    "csunet_dsf_kernel": Option(7, "DSF depthwise kernel per axis, clamped to thin grids (thesis 7)", int),
    "csunet_layer_scale": Option(1e-6, "DSF LayerScale initial value (thesis 1e-6; [code] 0.7; 0 = none)", float),
    "csunet_drop_path": Option(0.2, "stochastic depth rate, linear over the encoder blocks ([code] 0.2)", float),
    "csunet_dropout": Option(0.2, "dropout after the embedding, the up-sampling and the skip convs ([code] 0.2)",
                             float),
}

#: plan keys a CS-Unet is built from (the rest of network_arch_init_kwargs is the U-Net's business)
PLAN_KEYS = ("n_stages", "strides", "kernel_sizes", "features_per_stage")

_BUILD_OPTIONS: contextvars.ContextVar = contextvars.ContextVar("csunet_build_options", default=None)


def option_defaults() -> Dict[str, Any]:
    return {k: o.default for k, o in CSUNET_OPTIONS.items()}


def parse_depths(value: Union[str, Sequence[int]]) -> List[int]:
    if isinstance(value, str):
        try:
            out = [int(v) for v in re.split(r"[-,x:]", value.replace(" ", "")) if v != ""]
        except ValueError:
            raise ValueError(f"csunet_depths must be '-'-separated integers (e.g. 2-2-2-2), got '{value}'") from None
    else:
        out = [int(v) for v in value]
    if not out or any(d < 1 for d in out):
        raise ValueError(f"csunet_depths needs at least one entry, each >= 1, got '{value}'")
    return out


def check_options(options: Dict[str, Any]) -> Dict[str, Any]:
    """All options (defaults filled in), validated; raises ValueError with a one-line message."""
    unknown = sorted(set(options) - set(CSUNET_OPTIONS))
    if unknown:
        raise ValueError(f"unknown CS-Unet option(s) {unknown} (known: {sorted(CSUNET_OPTIONS)})")
    o = option_defaults()
    o.update(options)
    parse_depths(o["csunet_depths"])
    if o["csunet_embed_dim"] < 0:
        raise ValueError(f"csunet_embed_dim must be >= 0 (0 = the plan's features), got {o['csunet_embed_dim']}")
    if 0 < o["csunet_embed_dim"] < 4:
        raise ValueError(f"csunet_embed_dim must be 0 or >= 4, got {o['csunet_embed_dim']}")
    if o["csunet_max_dim"] < 1:
        raise ValueError(f"csunet_max_dim must be >= 1, got {o['csunet_max_dim']}")
    if o["csunet_head_dim"] < 1:
        raise ValueError(f"csunet_head_dim must be >= 1, got {o['csunet_head_dim']}")
    if o["csunet_window_fit"] not in ("pad", "divide"):
        raise ValueError(f"csunet_window_fit must be pad or divide, got '{o['csunet_window_fit']}'")
    if o["csunet_window"] < 1:
        raise ValueError(f"csunet_window must be >= 1, got {o['csunet_window']}")
    if o["csunet_dsf_kernel"] < 1 or o["csunet_dsf_kernel"] % 2 == 0:
        raise ValueError(f"csunet_dsf_kernel must be odd and >= 1, got {o['csunet_dsf_kernel']}")
    if not o["csunet_mlp_ratio"] > 0:
        raise ValueError(f"csunet_mlp_ratio must be > 0, got {o['csunet_mlp_ratio']}")
    if o["csunet_layer_scale"] < 0:
        raise ValueError(f"csunet_layer_scale must be >= 0, got {o['csunet_layer_scale']}")
    for k in ("csunet_drop_path", "csunet_dropout"):
        if not 0.0 <= o[k] < 1.0:
            raise ValueError(f"{k} must be in [0, 1), got {o[k]}")
    o["csunet_depths"] = "-".join(str(d) for d in parse_depths(o["csunet_depths"]))
    return o


def _heads(dim: int, head_dim: int) -> int:
    h = max(1, dim // head_dim)
    while dim % h:
        h -= 1
    return h


def make_config(arch_init_kwargs: Dict[str, Any], num_input_channels: int, num_output_channels: int,
                patch_size: Sequence[int], **options) -> Dict[str, Any]:
    """The JSON-able build configuration of a CS-Unet (plan values, channels, patch size, all options)."""
    missing = [k for k in PLAN_KEYS if k not in arch_init_kwargs]
    if missing:
        raise ValueError(f"CS-Unet needs the plan's {missing} in network_arch_init_kwargs")
    a = arch_init_kwargs
    n = int(a["n_stages"])
    nd = len(patch_size)

    def per_stage(v, name):
        v = [v] * n if isinstance(v, (int, np.integer)) else list(v)
        out = [[int(x)] * nd if isinstance(x, (int, np.integer)) else [int(y) for y in x] for x in v]
        if len(out) != n or any(len(x) != nd for x in out):
            raise ValueError(f"plan's {name} does not match n_stages={n} and a {nd}D patch")
        return out

    feats = a["features_per_stage"]
    feats = [int(feats)] * n if isinstance(feats, (int, np.integer)) else [int(f) for f in feats]
    if n < 3:
        raise ValueError(f"CS-Unet needs a plan with at least 3 stages (embedding strides + one Transformer "
                         f"stage), got n_stages={n}")
    if nd not in (2, 3):
        raise ValueError(f"CS-Unet supports 2D and 3D patches, got {list(patch_size)}")
    cfg = {"in_channels": int(num_input_channels), "num_classes": int(num_output_channels),
           "patch_size": [int(p) for p in patch_size], "n_stages": n, "strides": per_stage(a["strides"], "strides"),
           "kernel_sizes": per_stage(a["kernel_sizes"], "kernel_sizes"), "features_per_stage": feats}
    cfg.update(check_options(options))
    return cfg


def layout(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """Per-stage widths, heads, token grids, windows, shifts and DSF kernels derived from a build configuration."""
    n, nd = cfg["n_stages"], len(cfg["patch_size"])
    c = cfg["csunet_embed_dim"]
    if c > 0:
        dims = [max(1, c // 4), max(1, c // 2)] + [min(c * 2 ** (l - 2), max(c, cfg["csunet_max_dim"]))
                                                   for l in range(2, n)]
    else:
        dims = list(cfg["features_per_stage"])
    depths = parse_depths(cfg["csunet_depths"])
    depths = [depths[min(i, len(depths) - 1)] for i in range(n - 2)]
    grids, g = [], list(cfg["patch_size"])
    for l in range(n):
        g = [max(1, math.ceil(x / s)) for x, s in zip(g, cfg["strides"][l])]
        grids.append(list(g))
    windows, shifts, kernels, heads = {}, {}, {}, {}
    for l in range(2, n):
        w = stage_window(cfg["csunet_window"], grids[l], cfg["csunet_window_fit"])
        windows[l], shifts[l] = list(w), list(stage_shift(w, grids[l]))
        kernels[l] = [min(cfg["csunet_dsf_kernel"], x if x % 2 else x + 1) for x in grids[l]]
        heads[l] = _heads(dims[l], cfg["csunet_head_dim"])
    return {"nd": nd, "dims": dims, "depths": depths, "grids": grids, "windows": windows, "shifts": shifts,
            "dsf_kernels": kernels, "heads": heads}


def _encode(cfg: Dict[str, Any]) -> torch.Tensor:
    return torch.tensor(list(json.dumps(cfg, sort_keys=True).encode()), dtype=torch.uint8)


def _decode(t: torch.Tensor) -> Dict[str, Any]:
    return json.loads(bytes(t.detach().cpu().to(torch.uint8).tolist()).decode())


class CSUNetDecoder(nn.Module):
    """Decoder stages, head expansions and segmentation heads; ``deep_supervision`` as nnU-Net's decoder."""

    def __init__(self, cfg: Dict[str, Any], lay: Dict[str, Any], drop_paths: Dict[int, List[float]]):
        super().__init__()
        n, nd, dims = cfg["n_stages"], lay["nd"], lay["dims"]
        st, ks = cfg["strides"], cfg["kernel_sizes"]
        self.deep_supervision = False
        self.ups = nn.ModuleList()
        self.layers = nn.ModuleList()
        for l in range(n - 2, 1, -1):  # decoder stages S-2 .. 2
            self.ups.append(UpSkip(nd, dims[l + 1], dims[l], st[l + 1], ks[l], cfg["csunet_dropout"]))
            self.layers.append(CSTLayer(nd, dims[l], lay["depths"][l - 2], lay["heads"][l], lay["windows"][l],
                                        lay["shifts"][l], lay["dsf_kernels"][l], cfg["csunet_mlp_ratio"],
                                        cfg["csunet_layer_scale"], drop_paths[l][::-1]))
        self.expand1 = PatchExpand(nd, dims[2], dims[1], st[2])
        self.expand0 = PatchExpand(nd, dims[1], dims[0], st[1])
        conv = conv_nd(nd)
        # seg_layers[i] -> output at plan stage i (0 = full resolution), i = 0..S-2
        self.seg_layers = nn.ModuleList([conv(dims[l], cfg["num_classes"], 1, bias=False) for l in range(n - 1)])

    def forward(self, bottleneck: torch.Tensor, skips: List[torch.Tensor]):
        """``skips``: encoder tokens of stages 2..S-2 (channel-last)."""
        x = bottleneck
        outs = {}
        n = len(self.seg_layers) + 1
        for i, (up, layer) in enumerate(zip(self.ups, self.layers)):
            l = n - 2 - i
            x = layer(up(x, skips[l - 2]))
            if self.deep_supervision:
                outs[l] = self.seg_layers[l](to_channels_first(x))
        x1 = self.expand1(x)
        if self.deep_supervision:
            outs[1] = self.seg_layers[1](to_channels_first(x1))
        outs[0] = self.seg_layers[0](to_channels_first(self.expand0(x1)))
        if not self.deep_supervision:
            return outs[0]
        return [outs[l] for l in range(n - 1)]


class CSUNet(nn.Module):
    """CS-Unet built from :func:`make_config` (see the module docstring)."""

    def __init__(self, cfg: Dict[str, Any], deep_supervision: bool = False):
        super().__init__()
        self.rebuild_on_load = True
        self._build(cfg)
        self.decoder.deep_supervision = bool(deep_supervision)

    def _build(self, cfg: Dict[str, Any]) -> None:
        self.config = json.loads(json.dumps(cfg, sort_keys=True))
        lay = self.layout = layout(cfg)
        n, nd, dims = cfg["n_stages"], lay["nd"], lay["dims"]
        st, ks = cfg["strides"], cfg["kernel_sizes"]
        self.register_buffer("csunet_config", _encode(self.config))
        self.embed = ConvEmbedding(nd, cfg["in_channels"], dims[1], dims[2], st[1], st[2], ks[0], ks[1], ks[2],
                                   cfg["csunet_dropout"])
        total = sum(lay["depths"])
        dpr = np.linspace(0, cfg["csunet_drop_path"], total).tolist() if total else []
        drop_paths, i = {}, 0
        for l in range(2, n):
            drop_paths[l] = dpr[i:i + lay["depths"][l - 2]]
            i += lay["depths"][l - 2]
        self.layers = nn.ModuleList()
        self.merges = nn.ModuleList()
        for l in range(2, n):
            self.layers.append(CSTLayer(nd, dims[l], lay["depths"][l - 2], lay["heads"][l], lay["windows"][l],
                                        lay["shifts"][l], lay["dsf_kernels"][l], cfg["csunet_mlp_ratio"],
                                        cfg["csunet_layer_scale"], drop_paths[l]))
            if l < n - 1:
                self.merges.append(PatchMerging(dims[l], dims[l + 1], st[l + 1]))
        self.decoder = CSUNetDecoder(cfg, lay, drop_paths)
        self.apply(_init_weights)

    # -- forward ---------------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor):
        self._check_input(x)
        t = self.embed(x)
        skips = []
        for i, layer in enumerate(self.layers):
            t = layer(t)
            if i < len(self.merges):
                skips.append(t)
                t = self.merges[i](t)
        return self.decoder(t, skips)

    def _check_input(self, x: torch.Tensor) -> None:
        cfg = self.config
        if x.ndim != len(cfg["patch_size"]) + 2 or x.shape[1] != cfg["in_channels"]:
            raise ValueError(f"CS-Unet expects (B, {cfg['in_channels']}, <{len(cfg['patch_size'])} spatial dims>), "
                             f"got {tuple(x.shape)}")
        total = np.prod(np.array(cfg["strides"]), 0)
        if any(int(s) % int(t) for s, t in zip(x.shape[2:], total)):
            raise ValueError(f"CS-Unet input size {tuple(x.shape[2:])} must be divisible by the plan's total stride "
                             f"{tuple(int(t) for t in total)} (nnU-Net patch sizes are)")

    # -- self-describing weights -----------------------------------------------------------------------------------
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "csunet_config"
        if key in state_dict:
            stored = _decode(state_dict[key])
            if stored != self.config:
                if not self.rebuild_on_load:
                    diff = sorted(k for k in set(stored) | set(self.config) if stored.get(k) != self.config.get(k))
                    error_msgs.append(f"CS-Unet checkpoint was built with other settings ({', '.join(diff)}: "
                                      f"{[stored.get(k) for k in diff]} vs {[self.config.get(k) for k in diff]}); "
                                      f"rebuilding is disabled because an optimizer holds this network")
                else:
                    self._rebuild(stored)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _rebuild(self, cfg: Dict[str, Any]) -> None:
        p = next(self.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
        dtype = p.dtype if p is not None else torch.float32
        ds, training = self.decoder.deep_supervision, self.training
        for name in list(self._modules):
            del self._modules[name]
        del self._buffers["csunet_config"]
        self._build(cfg)
        self.to(device=device, dtype=dtype)
        self.decoder.deep_supervision = ds
        self.train(training)

    # -- cost ------------------------------------------------------------------------------------------------------
    def compute_conv_feature_map_size(self, input_size) -> float:
        """Planning estimate at ``input_size`` (spatial, batch 1), nnU-Net's units (see csunet_feature_map_size)."""
        return csunet_feature_map_size(self.config, input_size)


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def build_csunet(arch_init_kwargs: Dict[str, Any], num_input_channels: int, num_output_channels: int,
                 enable_deep_supervision: bool, patch_size: Sequence[int], **options) -> CSUNet:
    """A CS-Unet for a planned configuration (see the module docstring)."""
    cfg = make_config(arch_init_kwargs, num_input_channels, num_output_channels, patch_size, **options)
    return CSUNet(cfg, enable_deep_supervision)


@contextlib.contextmanager
def csunet_build_options(options: Optional[Dict[str, Any]]):
    """Within the block, :func:`build_csunet_from_managers` uses ``options`` (the trainer's)."""
    token = _BUILD_OPTIONS.set(dict(options or {}))
    try:
        yield
    finally:
        _BUILD_OPTIONS.reset(token)


def options_subset(values: Dict[str, Any]) -> Dict[str, Any]:
    """The CS-Unet options among a trainer's option values."""
    return {k: values[k] for k in CSUNET_OPTIONS if k in values}


def build_csunet_from_managers(plans_manager, configuration_manager, num_input_channels: int,
                               num_output_channels: int, enable_deep_supervision: bool = True) -> CSUNet:
    """``build_network_architecture`` body: the plan's configuration and patch size, the options set by
    :func:`csunet_build_options` (defaults outside; a checkpoint's ``csunet_config`` then rebuilds on load)."""
    opts = _BUILD_OPTIONS.get() or {}
    return build_csunet(configuration_manager.network_arch_init_kwargs, num_input_channels, num_output_channels,
                        enable_deep_supervision, configuration_manager.patch_size, **opts)


# ----------------------------------------------------------------------------------------------- memory estimate
#: saved-for-backward elements of one stock nnU-Net conv block (conv -> InstanceNorm -> LeakyReLU) per element that
#: nnU-Net's compute_conv_feature_map_size counts for it (measured, see tests/test_csunet.py)
UNET_SAVED_PER_COUNTED = 1.95


def csunet_saved_elements(cfg: Dict[str, Any], input_size: Sequence[int]) -> float:
    """Analytic count of the activation elements one training forward stores for backward (batch 1), per part as
    measured with ``torch.autograd.graph.saved_tensors_hooks`` (see tests/test_csunet.py): v_l voxels and d_l
    channels at stage l, T/T' real/padded tokens of a stage, N tokens per window, r the DSF ratio.

    * embedding: C_in v0 + 2 d1 v0 + 3 d1 v1 + 2 d2 v1 + 2 d2 v2
    * CST block: d (5 T + 10 T') + 2 r d T, plus the boolean attention mask N T' / 2 (fp16 units) when it exists
    * patch merging: 2 d_l v_l; decoder entry (up-sampling, concatenation, SC): 2 d_{l+1} v_{l+1} + 6 d_l v_l
    * head: d2 v2 + 2 d1 v1 + 2 d0 v0
    """
    lay = layout(cfg)
    n, dims = cfg["n_stages"], lay["dims"]
    grids, g = [], [int(s) for s in input_size]
    for l in range(n):
        g = [max(1, math.ceil(x / s)) for x, s in zip(g, cfg["strides"][l])]
        grids.append(g)
    v = [float(np.prod(x)) for x in grids]
    d = dims
    r = cfg["csunet_mlp_ratio"]
    total = cfg["in_channels"] * v[0] + 2 * d[1] * v[0] + 3 * d[1] * v[1] + 2 * d[2] * v[1] + 2 * d[2] * v[2]

    def cst(l: int, depth: int) -> float:
        w = lay["windows"][l]
        tok, padded = v[l], float(np.prod(padded_size(grids[l], w)))
        n_win = float(np.prod(w))
        out = 0.0
        for i in range(depth):
            out += d[l] * (5 * tok + 10 * padded) + 2 * r * d[l] * tok
            if padded != tok or (i % 2 and any(lay["shifts"][l])):
                out += n_win * padded / 2
        return out

    for l in range(2, n):
        total += cst(l, lay["depths"][l - 2])
        if l < n - 1:
            total += 2 * d[l] * v[l]
    for l in range(n - 2, 1, -1):
        total += 2 * d[l + 1] * v[l + 1] + 6 * d[l] * v[l] + cst(l, lay["depths"][l - 2])
    total += d[2] * v[2] + 2 * d[1] * v[1] + 2 * d[0] * v[0]
    return total


def csunet_feature_map_size(cfg: Dict[str, Any], input_size: Sequence[int]) -> float:
    """The CS-Unet's planning estimate in nnU-Net's units: stored activation elements divided by what a stock conv
    block stores per counted element, so that it adds up with ``compute_conv_feature_map_size`` of the U-Net."""
    return csunet_saved_elements(cfg, input_size) / UNET_SAVED_PER_COUNTED


class CSUNetPlanning:
    """Stand-in that nnU-Net's planner instantiates through ``get_network_from_plans`` (planned arch kwargs +
    ``csunet`` options); it only answers :meth:`compute_conv_feature_map_size`, building no modules."""

    def __init__(self, input_channels: int, num_classes: int, csunet: Optional[Dict[str, Any]] = None,
                 deep_supervision: bool = False, **arch_kwargs):
        self.arch_kwargs = arch_kwargs
        self.input_channels, self.num_classes = int(input_channels), int(num_classes)
        self.options = dict(csunet or {})

    def compute_conv_feature_map_size(self, input_size) -> float:
        cfg = make_config(self.arch_kwargs, self.input_channels, self.num_classes, input_size, **self.options)
        return csunet_feature_map_size(cfg, input_size)


PLANNING_CLASS = f"{__name__}.CSUNetPlanning"


def csunet_extra_architecture(factor: float = 1.0, **options) -> Dict[str, Any]:
    """One ``nnx_memory["extra_architectures"]`` entry for a CS-Unet on the planned configuration."""
    return {"network_class_name": PLANNING_CLASS, "arch_kwargs": {"csunet": check_options(options)},
            "factor": float(factor)}


def csunet_memory_profile(static_gb: float = 0.0, **options) -> Dict[str, Any]:
    """``nnx_memory`` of a trainer whose only network is the CS-Unet (it replaces the planned U-Net)."""
    return {"activation_factor": 0.0, "static_gb": float(static_gb),
            "extra_architectures": [csunet_extra_architecture(1.0, **options)]}


__all__ = ["CSUNET_OPTIONS", "CSUNet", "CSUNetDecoder", "build_csunet", "build_csunet_from_managers",
           "csunet_build_options", "options_subset", "make_config", "layout", "check_options",
           "csunet_feature_map_size", "csunet_saved_elements", "CSUNetPlanning", "csunet_extra_architecture",
           "csunet_memory_profile", "PLANNING_CLASS"]
