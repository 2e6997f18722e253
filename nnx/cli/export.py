"""``nnx_export``: write a model folder that stock ``nnUNetv2_predict_from_modelfolder`` loads without nnx.

Only for trainers whose inference network is nnU-Net's own network, or whose inference output is that of one stock
network inside their own module (the trainer's ``nnx_stock_network_weights`` extracts it, e.g. the CNN of a CNN +
Transformer pair): the checkpoint's trainer name becomes ``nnUNetTrainer``, plugin-only state (``nnx_extra``),
optimizer and grad-scaler state are dropped, and the original trainer name is kept as ``nnx_trainer_name`` for
provenance.
"""
from __future__ import annotations

import os
import shutil

from nnx.errors import ArgumentParser, NNXError, cli_entry

STOCK_TRAINER = "nnUNetTrainer"
KEEP_KEYS = ("network_weights", "init_args", "current_epoch", "inference_allowed_mirroring_axes", "_best_ema")


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="nnx_export", description="Export a trained model to a plain nnU-Net model folder.")
    p.add_argument("-d", required=True, help="dataset name or id")
    p.add_argument("-c", required=True, help="configuration")
    p.add_argument("-f", nargs="+", required=True, help="fold(s) to export")
    p.add_argument("-tr", required=True, help="trainer name")
    p.add_argument("-p", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    p.add_argument("-chk", default="checkpoint_final.pth", help="checkpoint name (default checkpoint_final.pth)")
    p.add_argument("-o", required=True, help="output model folder")
    return p


def stock_checkpoint(ckpt: dict, trainer_name: str, weights: dict) -> dict:
    out = {k: ckpt[k] for k in KEEP_KEYS if k in ckpt}
    out["network_weights"] = weights
    out["trainer_name"] = STOCK_TRAINER
    out["nnx_trainer_name"] = trainer_name
    out["optimizer_state"] = None
    out["grad_scaler_state"] = None
    return out


def verify_stock_network(model_dir: str, weights: dict, configuration: str, where: str) -> None:
    """The weights must load strictly into nnU-Net's own network built from the plans."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from nnx.io_utils import read_json
    plans = read_json(os.path.join(model_dir, "plans.json"), "plans.json")
    dataset_json = read_json(os.path.join(model_dir, "dataset.json"), "dataset.json")
    pm = PlansManager(plans)
    cm = pm.get_configuration(configuration)
    lm = pm.get_label_manager(dataset_json)
    net = nnUNetTrainer.build_network_architecture(pm, cm, determine_num_input_channels(pm, cm, dataset_json),
                                                   lm.num_segmentation_heads, enable_deep_supervision=False)
    try:
        net.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise NNXError(f"checkpoint weights do not match nnU-Net's network ({first})", where) from None


@cli_entry("nnx_export")
def main(argv):
    args = build_parser().parse_args(argv)
    import torch
    from nnx import checks
    from nnx.cli.predict import model_folder
    from nnx.io_utils import atomic_dir
    from nnx.registry import load_trainer, stock_weights_converter

    cls = load_trainer(args.tr)
    convert = stock_weights_converter(cls)
    if convert is None:
        raise NNXError(f"trainer {args.tr} uses its own inference network, so its models cannot run as plain "
                       f"nnU-Net models; predict with nnx_predict (or stock nnU-Net with nnUNet_extTrainer set)")
    checks.require_env("nnUNet_results")
    dataset_name = checks.resolve_dataset(args.d, where=("results",))
    src = model_folder(dataset_name, args.tr, args.p, args.c)
    if not os.path.isdir(src):
        raise NNXError(f"no trained model for trainer {args.tr}, plans {args.p}, configuration {args.c}", src)
    ckpts = {}
    for f in args.f:
        path = os.path.join(src, f"fold_{f}", args.chk)
        if not os.path.isfile(path):
            raise NNXError(f"checkpoint not found for fold {f}", path)
        try:
            ckpts[f] = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:  # noqa: BLE001
            raise NNXError(f"unreadable checkpoint ({type(e).__name__})", path) from None
    if os.path.abspath(args.o) == os.path.abspath(src):
        raise NNXError("output folder must differ from the trained model folder", args.o)
    with atomic_dir(args.o) as tmp:
        for name in ("dataset.json", "plans.json", "dataset_fingerprint.json"):
            if os.path.isfile(os.path.join(src, name)):
                shutil.copy2(os.path.join(src, name), os.path.join(tmp, name))
        for f, ckpt in ckpts.items():
            where = os.path.join(src, f"fold_{f}", args.chk)
            try:
                weights = convert(ckpt["network_weights"])
            except ValueError as e:
                raise NNXError(f"cannot export this checkpoint as a plain nnU-Net model: {e}", where) from None
            verify_stock_network(tmp, weights, ckpt["init_args"]["configuration"], where)
            os.makedirs(os.path.join(tmp, f"fold_{f}"))
            torch.save(stock_checkpoint(ckpt, args.tr, weights),
                       os.path.join(tmp, f"fold_{f}", "checkpoint_final.pth"))
    print(f"nnx_export: exported {args.tr} ({dataset_name}, {args.c}, folds {', '.join(args.f)}) to {args.o}")
    print(f"  predict with stock nnU-Net: nnUNetv2_predict_from_modelfolder -i INPUT -o OUTPUT -m {args.o} "
          f"-f {' '.join(args.f)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
