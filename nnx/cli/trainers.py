"""``nnx_trainers``: list the registered trainers (name, summary, source, requirements, options, memory profile)."""
from __future__ import annotations

import json

from nnx.errors import ArgumentParser, cli_entry


def _fmt_value(v):
    return repr(v) if isinstance(v, str) else str(v)


@cli_entry("nnx_trainers")
def main(argv):
    p = ArgumentParser(prog="nnx_trainers", description="List the trainers registered in the "
                                "'nnx.trainers' entry-point group (nnx plugins and third-party packages).")
    p.add_argument("--json", action="store_true", help="print a JSON list of objects")
    p.add_argument("names", nargs="*", help="only these trainers")
    args = p.parse_args(argv)

    import sys
    from nnx.registry import describe, load_trainer, trainer_names, unknown_trainer
    names = trainer_names()
    for n in args.names:
        if n not in names:
            raise unknown_trainer(n)
    infos, broken = [], 0
    for n in args.names or names:
        try:
            infos.append(describe(load_trainer(n)))
        except Exception as e:  # noqa: BLE001 - one broken third-party plugin must not hide the others
            broken += 1
            print(f"nnx_trainers: warning: trainer '{n}' cannot be loaded: {type(e).__name__}: {e}", file=sys.stderr)
    if args.json:
        print(json.dumps(infos, indent=2, default=str))
        return 1 if broken else 0
    for info in infos:
        tag = "  [baseline]" if info["baseline"] else ""
        print(f"{info['name']}{tag}")
        print(f"  {info['summary']}")
        if info["source"]:
            print(f"  source:    {info['source']}")
        req = info["requires"]
        print(f"  requires:  tiers={','.join(req.get('tiers', []))}  batch={','.join(req.get('batch', [])) or '-'}"
              f"  inputs={','.join(req.get('inputs', [])) or 'images only'}")
        mem = info["memory_profile"]
        extra = f" + {mem['extra_architectures']}" if mem.get("extra_architectures") else ""
        print(f"  memory:    activations x{mem['activation_factor']:g} + {mem['static_gb']:g} GB static{extra}")
        print(f"  inference: {'stock nnU-Net network (exportable)' if info['inference_network_is_stock'] else 'custom network (not exportable to plain nnU-Net)'}")
        print("  options:   " + ", ".join(f"{k}={_fmt_value(o['default'])}" for k, o in info["options"].items()))
        if info.get("predict_options"):
            print(f"  predict:   nnx_predict --opt {', '.join(info['predict_options'])} (prediction-time options)")
        print()
    return 1 if broken else 0


if __name__ == "__main__":
    raise SystemExit(main())
