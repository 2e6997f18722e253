"""``nnx_train``: stock nnU-Net training (``run_training``) with a registered trainer and validated options.

DDP, ``--c``, ``--val`` and ``-pretrained_weights`` go through nnU-Net's own ``run_training``. nnx only resolves the
trainer through its registry (the shim folder is put into ``nnUNet_extTrainer``), validates the options against
the trainer's declared ones before anything is written, and passes them on through ``NNX_TRAINER_OPTS``.
"""
from __future__ import annotations

import os

from nnx.errors import ArgumentParser, NNXError, cli_entry


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="nnx_train", description="Train a registered trainer with nnU-Net's run_training.")
    p.add_argument("dataset_name_or_id", help="dataset name or id")
    p.add_argument("configuration", help="configuration, e.g. 3d_fullres")
    p.add_argument("fold", help="fold 0-4 or 'all'")
    p.add_argument("-tr", default="nnUNetTrainer", help="trainer name (see nnx_trainers); default nnUNetTrainer")
    p.add_argument("-p", default="nnUNetPlans", help="plans identifier; default nnUNetPlans")
    p.add_argument("-pretrained_weights", default=None, help="checkpoint to initialise the network from")
    p.add_argument("-num_gpus", type=int, default=1, help="number of GPUs (DDP); default 1")
    p.add_argument("--npz", action="store_true", help="save validation softmax outputs (.npz)")
    p.add_argument("--c", action="store_true", help="continue from the latest checkpoint")
    p.add_argument("--val", action="store_true", help="only run the validation (needs checkpoint_final.pth)")
    p.add_argument("--val_best", action="store_true", help="validate with checkpoint_best.pth")
    p.add_argument("--disable_checkpointing", action="store_true", help="do not write checkpoints")
    p.add_argument("-device", default=None, help="cuda | cpu | mps (default: cuda if available, else cpu)")
    p.add_argument("--epochs", type=int, default=None, help="option epochs")
    p.add_argument("--iters-per-epoch", type=int, default=None, help="option iters_per_epoch")
    p.add_argument("--val-iters", type=int, default=None, help="option val_iters")
    p.add_argument("--labeled", default=None, metavar="N|X%",
                   help="option labeled: keep expert labels for N cases or X%% of the fold's expert training "
                        "cases; demote the others (see --demote-to)")
    p.add_argument("--demote-to", default=None, choices=["none", "coarse", "scribble"],
                   help="option demote_to: tier of demoted cases (default none = unlabeled)")
    p.add_argument("--opt", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="trainer option(s), validated against the trainer's declared options (nnx_trainers)")
    return p


def collect_raw_options(args) -> dict:
    from nnx.options import parse_kv_list
    raw = parse_kv_list(args.opt, "--opt")
    for key, val in (("epochs", args.epochs), ("iters_per_epoch", args.iters_per_epoch),
                     ("val_iters", args.val_iters), ("labeled", args.labeled), ("demote_to", args.demote_to)):
        if val is not None:
            raw[key] = str(val)
    for key, val in raw.items():
        if any(c.isspace() for c in val) or "," in val:
            raise NNXError(f"option '{key}': values must not contain spaces or commas ('{val}')", "--opt")
    return raw


def _patch_options_for_stock_trainers(values: dict) -> None:
    """Stock trainers do not read NNX_TRAINER_OPTS: apply the common options right after construction."""
    import nnunetv2.run.run_training as rt
    from nnx import options

    original = rt.get_trainer_from_args

    def get_trainer_with_options(*a, **kw):
        trainer = original(*a, **kw)
        options.apply(trainer, values, "nnx_train")
        if values.get("labeled"):
            _stock_label_ratio(trainer, values["labeled"], values.get("demote_to", "none"))
        return trainer

    rt.get_trainer_from_args = get_trainer_with_options


def _stock_label_ratio(trainer, labeled: str, demote_to: str) -> None:
    """A stock trainer can only learn from labelsTr: under a label-ratio setting it trains on the kept cases only
    (the honest 'nnU-Net on N labeled cases' baseline). The fold's tiers go to fold_N/nnx_split.json."""
    from nnx.fold_data import SPLIT_FILE, resolve_fold
    from nnx.io_utils import atomic_write_json
    from nnx.tiers import DatasetSpec
    stock_do_split = trainer.do_split
    cache = {}

    def do_split():
        if "fd" not in cache:
            tr, val = stock_do_split()
            fd = resolve_fold(DatasetSpec.from_dataset_json(trainer.dataset_json), tr, val, trainer.fold, labeled,
                              demote_to, stock=True)
            cache["fd"] = fd
            if trainer.local_rank == 0:
                atomic_write_json(fd.to_json(), os.path.join(trainer.output_folder, SPLIT_FILE))
            trainer.print_to_log_file(f"nnx: labeled={labeled}: stock trainer keeps {len(fd.train)} labeled "
                                      f"training cases ({len(fd.demoted)} demoted cases left out)")
        return cache["fd"].train, cache["fd"].val

    trainer.do_split = do_split


def _ensure_splits(dataset_name: str, plans: dict, configuration: str) -> None:
    """Datasets with non-expert tiers validate on expert cases only (written once, like nnU-Net's own split)."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from nnx.fold_data import ensure_tiered_splits
    from nnx.tiers import DatasetSpec
    base = os.path.join(os.environ["nnUNet_preprocessed"], dataset_name)
    spec = DatasetSpec.from_folder(base)
    folder = os.path.join(base, PlansManager(plans).get_configuration(configuration).data_identifier)
    if not spec.has_block or not os.path.isdir(folder) or not os.listdir(folder):
        return  # nothing preprocessed yet: nnU-Net's own error follows
    if ensure_tiered_splits(base, infer_dataset_class(folder).get_identifiers(folder), spec):
        print(f"nnx_train: wrote {os.path.join(base, 'splits_final.json')} (folds over expert cases)")


@cli_entry("nnx_train")
def main(argv):
    args = build_parser().parse_args(argv)
    from nnx import checks, options
    from nnx.cli.common import check_configuration, load_plans, parse_fold, pick_device
    from nnx.io_utils import read_json
    from nnx.registry import is_nnx_trainer, load_trainer

    checks.require_env("nnUNet_preprocessed", "nnUNet_results")
    dataset_name = checks.resolve_dataset(args.dataset_name_or_id, where=("preprocessed",))
    plans = load_plans(dataset_name, args.p)
    check_configuration(plans, args.configuration, f"{args.p}.json")
    fold = parse_fold(args.fold)
    trainer_cls = load_trainer(args.tr)
    raw = collect_raw_options(args)
    values = options.resolve(trainer_cls, raw, "--opt")
    if args.c and args.pretrained_weights:
        raise NNXError("--c and -pretrained_weights cannot be combined")
    if args.c and args.val:
        raise NNXError("--c and --val cannot be combined")
    if args.pretrained_weights and not os.path.isfile(args.pretrained_weights):
        raise NNXError("pretrained weights file not found", args.pretrained_weights)
    from nnunetv2.utilities.file_path_utilities import get_output_folder
    out = get_output_folder(dataset_name, args.tr, args.p, args.configuration, fold)
    if args.val and not os.path.isfile(os.path.join(out, "checkpoint_final.pth")):
        raise NNXError("--val needs a finished training (checkpoint_final.pth missing)", out)
    if args.num_gpus > 1 and raw and not is_nnx_trainer(trainer_cls):
        raise NNXError(f"options for the stock trainer {args.tr} are not supported with -num_gpus > 1")
    device = pick_device(args.device)

    if args.fold != "all":
        _ensure_splits(dataset_name, plans, args.configuration)
    from nnx.ext_path import ensure_ext_trainer_env
    ensure_ext_trainer_env()
    os.environ[options.ENV_VAR] = " ".join(f"{k}={v}" for k, v in raw.items())
    os.environ[options.SOURCE_ENV_VAR] = "nnx_train"
    if not is_nnx_trainer(trainer_cls):
        _patch_options_for_stock_trainers(values)

    from nnunetv2.run.run_training import run_training
    print(f"nnx_train: {args.tr} on {dataset_name} {args.configuration} fold {fold} "
          f"(plans {args.p}, device {device.type}); options: "
          + ", ".join(f"{k}={v}" for k, v in values.items() if k in raw or k in ("epochs", "iters_per_epoch")))
    run_training(dataset_name, args.configuration, fold, args.tr, args.p, args.pretrained_weights, args.num_gpus,
                 args.npz, args.c, args.val, args.disable_checkpointing, args.val_best, device=device)
    if not is_nnx_trainer(trainer_cls):  # nnx trainers do this themselves (also under stock nnUNetv2_train)
        from nnx.cc_evaluation import cc_after_validation
        from nnx.cli.common import default_processes
        pp = os.path.join(os.environ["nnUNet_preprocessed"], dataset_name)
        cc = cc_after_validation(out, pp, read_json(os.path.join(pp, "dataset.json"), "dataset.json"),
                                 plans["image_reader_writer"], default_processes())
        if cc:
            print(f"nnx_train: CC-Metrics of the validation written to {cc}")
    print(f"nnx_train: done, results in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
