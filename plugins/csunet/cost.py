"""Cost of a CS-Unet against the planned nnU-Net U-Net on the same plan: parameters, multiply-accumulates of one
forward pass (batch 1, the planned patch), the planning estimate, and optionally the CPU time of a training step.

MACs come from ``torch.utils.flop_counter.FlopCounterMode`` on the meta device (shapes only, so GPU-sized plans
count in seconds): convolutions, linear layers and the attention matmuls (counted through the explicit attention
path, because the counter does not see CPU SDPA kernels). Norms, activations and softmax are not counted, for
either network.

``python -m nnx_plugins.csunet.cost PLANS.json [CONFIG] [--opt key=value ...] [--time]`` prints a table.
"""
from __future__ import annotations

import argparse
import json
import time
from typing import Any, Dict, Optional

import torch


def _macs(net: torch.nn.Module, x: torch.Tensor) -> float:
    from torch.utils.flop_counter import FlopCounterMode
    explicit = {m: m.explicit for m in net.modules() if hasattr(m, "explicit")}
    for m in explicit:
        m.explicit = True
    try:
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            net(x)
    finally:
        for m, v in explicit.items():
            m.explicit = v
    return fc.get_total_flops() / 2.0


def _step_seconds(net: torch.nn.Module, x: torch.Tensor, repeats: int = 3) -> float:
    net.train()
    best = float("inf")
    for _ in range(repeats + 1):
        t = time.perf_counter()
        out = net(x)
        out = out[0] if isinstance(out, (list, tuple)) else out
        out.float().mean().backward()
        best = min(best, time.perf_counter() - t)
        net.zero_grad(set_to_none=True)
    return best


def compare(plans: Dict[str, Any], configuration: str = "3d_fullres", num_input_channels: int = 1,
            num_classes: int = 2, options: Optional[Dict[str, Any]] = None, timing: bool = False,
            batch_size: Optional[int] = None) -> Dict[str, Dict[str, float]]:
    """Parameters (M), forward GMACs (batch 1), planning estimate (nnU-Net units) and, with ``timing``, the best
    CPU seconds of a forward+backward at the planned batch size, for the planned U-Net and the CS-Unet."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from .network import build_csunet
    cfg = plans["configurations"][configuration]
    arch = cfg["architecture"]
    patch = [int(p) for p in cfg["patch_size"]]

    def build(device):
        with torch.device(device):
            unet = get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"],
                                          arch["_kw_requires_import"], num_input_channels, num_classes,
                                          allow_init=device != "meta", deep_supervision=True)
            cs = build_csunet(arch["arch_kwargs"], num_input_channels, num_classes, True, patch, **(options or {}))
        return {"unet": unet, "csunet": cs}

    out = {}
    x1 = torch.empty(1, num_input_channels, *patch, device="meta")
    for name, net in build("meta").items():
        out[name] = {"params_M": sum(p.numel() for p in net.parameters()) / 1e6,
                     "GMACs": _macs(net.eval(), x1) / 1e9,
                     "estimate": float(net.compute_conv_feature_map_size(patch))}
    if timing:
        bs = int(batch_size or cfg.get("batch_size", 2))
        for name, net in build("cpu").items():
            out[name]["step_s"] = _step_seconds(net, torch.randn(bs, num_input_channels, *patch))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m nnx_plugins.csunet.cost", description=__doc__.split("\n\n")[0])
    p.add_argument("plans")
    p.add_argument("configuration", nargs="?", default="3d_fullres")
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--classes", type=int, default=2)
    p.add_argument("--opt", nargs="*", default=[], metavar="KEY=VALUE", help="CS-Unet options")
    p.add_argument("--time", action="store_true", help="also time a CPU forward+backward")
    a = p.parse_args(argv)
    from .network import CSUNET_OPTIONS
    opts = {}
    for kv in a.opt:
        k, v = kv.split("=", 1)
        opts[k] = CSUNET_OPTIONS[k].convert(k, v, "--opt") if k in CSUNET_OPTIONS else v
    with open(a.plans) as f:
        plans = json.load(f)
    res = compare(plans, a.configuration, a.channels, a.classes, opts, a.time)
    keys = list(res["unet"])
    print("network  " + "  ".join(f"{k:>10}" for k in keys))
    for name, row in res.items():
        print(f"{name:8} " + "  ".join(f"{row[k]:10.3f}" if k != "estimate" else f"{row[k]:10.3g}" for k in keys))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
