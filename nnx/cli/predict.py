"""``nnx_predict``: nnU-Net inference with a registered trainer (like ``nnUNetv2_predict``).

Inputs are checked first (one-line errors). Predictions are written to a temporary folder next to ``-o`` and moved
into place when they are complete, so an interrupted run never leaves half-written files in the output folder.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time

from nnx.errors import ArgumentParser, NNXError, cli_entry


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="nnx_predict", description="Predict a folder of images with a trained model.")
    p.add_argument("-i", required=True, help="input folder (CASE_XXXX.nii.gz files, like imagesTs)")
    p.add_argument("-o", required=True, help="output folder")
    p.add_argument("-d", required=True, help="dataset name or id")
    p.add_argument("-c", required=True, help="configuration")
    p.add_argument("-f", nargs="+", default=None,
                   help="folds, e.g. 0 1 2 3 4 or all (default: every trained fold_N found)")
    p.add_argument("-tr", default="nnUNetTrainer", help="trainer (default nnUNetTrainer)")
    p.add_argument("-p", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    p.add_argument("-chk", default="checkpoint_final.pth", help="checkpoint name (default checkpoint_final.pth)")
    p.add_argument("-step_size", type=float, default=0.5, help="sliding window step (default 0.5)")
    p.add_argument("--disable_tta", action="store_true", help="no mirroring test-time augmentation")
    p.add_argument("--save_probabilities", action="store_true", help="also write .npz probabilities")
    p.add_argument("-npp", type=int, default=0, help="preprocessing workers (0 = sequential, default)")
    p.add_argument("-nps", type=int, default=0, help="export workers (0 = sequential, default)")
    p.add_argument("-device", default=None, help="cuda | cpu | mps (default: cuda if available, else cpu)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("-inputs", nargs="+", default=[], metavar="NAME=FOLDER",
                   help="inference inputs the model was trained with, e.g. coarse=coarseTs anatomy=anatomyTs "
                        "(one CASE<file_ending> map per case of -i)")
    p.add_argument("--opt", nargs="+", default=[], metavar="KEY=VALUE",
                   help="prediction-time trainer options (nnx_trainers lists them under 'predict:'); the other "
                        "options stay as trained")
    return p


def model_folder(dataset_name: str, trainer: str, plans: str, configuration: str) -> str:
    from nnunetv2.utilities.file_path_utilities import get_output_folder
    return get_output_folder(dataset_name, trainer, plans, configuration)


def resolve_folds(folder: str, folds, checkpoint: str, explicit: bool):
    present = [f for f in folds if os.path.isfile(os.path.join(folder, f"fold_{f}", checkpoint))]
    if explicit and len(present) != len(folds):
        missing = [f for f in folds if f not in present]
        raise NNXError(f"no {checkpoint} for fold(s) {', '.join(map(str, missing))} (train them first)", folder)
    if not present:
        raise NNXError(f"no trained fold with {checkpoint} found (train with nnx_train first)", folder)
    return [f if f == "all" else int(f) for f in present]


def predict_folder(input_folder: str, output_folder: str, model_dir: str, folds, checkpoint: str, device,
                   step_size: float = 0.5, tta: bool = True, save_probabilities: bool = False, npp: int = 0,
                   nps: int = 0, progress: bool = True, inputs=None, input_folders=None, cases=None,
                   options=None) -> list:
    """Predict every case of ``input_folder`` into ``output_folder``; returns the list of written files.
    ``inputs``/``input_folders``: the model's inference inputs (see :mod:`nnx.inference_inputs`); ``options``:
    checked prediction-time option overrides (:func:`nnx.inference_inputs.inference_option_overrides`)."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnx import inference_inputs
    predictor = nnUNetPredictor(tile_step_size=step_size, use_gaussian=True, use_mirroring=tta,
                                perform_everything_on_device=device.type == "cuda", device=device,
                                verbose=False, verbose_preprocessing=False, allow_tqdm=progress)
    inference_inputs.initialize_predictor(predictor, model_dir, folds, checkpoint, inputs or [], options)
    parent = os.path.dirname(os.path.abspath(output_folder))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp_nnx_predict_", dir=parent)
    try:
        if inputs:
            items = inference_inputs.iterate_preprocessed(input_folder, cases, input_folders, inputs, predictor, tmp)
            predictor.predict_from_data_iterator(items, save_probabilities, max(nps, 1))
        elif npp > 0 or nps > 0:
            predictor.predict_from_files(input_folder, tmp, save_probabilities, True, max(npp, 1), max(nps, 1))
        else:
            predictor.predict_from_files_sequential(input_folder, tmp, save_probabilities, True)
        os.makedirs(output_folder, exist_ok=True)
        written = []
        for name in sorted(os.listdir(tmp)):
            os.replace(os.path.join(tmp, name), os.path.join(output_folder, name))
            written.append(os.path.join(output_folder, name))
        return written
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@cli_entry("nnx_predict")
def main(argv):
    args = build_parser().parse_args(argv)
    from nnx import checks
    from nnx.cli.common import pick_device
    from nnx.registry import load_trainer

    checks.require_env("nnUNet_results")
    dataset_name = checks.resolve_dataset(args.d, where=("results",))
    load_trainer(args.tr)  # unknown trainer -> suggestions
    folder = model_folder(dataset_name, args.tr, args.p, args.c)
    if not os.path.isdir(folder):
        raise NNXError(f"no trained model for trainer {args.tr}, plans {args.p}, configuration {args.c}", folder)
    folds = resolve_folds(folder, args.f or ["0", "1", "2", "3", "4"], args.chk, explicit=args.f is not None)
    from nnx.io_utils import read_json
    dataset_json = read_json(os.path.join(folder, "dataset.json"), "dataset.json")
    cases = checks.check_image_folder(args.i, dataset_json, purpose="prediction input")
    if os.path.abspath(args.i) == os.path.abspath(args.o):
        raise NNXError("output folder must differ from the input folder", args.o)
    from nnx import inference_inputs
    from nnx.options import parse_kv_list
    overrides = inference_inputs.inference_option_overrides(args.tr, parse_kv_list(args.opt))
    folders = inference_inputs.parse_input_args(args.inputs)
    inputs = inference_inputs.model_inputs(folder, folds, args.chk)
    inference_inputs.check_input_folders(cases, args.i, folders, inputs, dataset_json["file_ending"])
    device = pick_device(args.device)
    from nnx.ext_path import ensure_ext_trainer_env
    ensure_ext_trainer_env()
    t0 = time.time()
    opts = "".join(f", {k}={v}" for k, v in overrides.items())
    print(f"nnx_predict: {len(cases)} case(s) with {args.tr} ({dataset_name}, {args.c}, folds {folds}, "
          f"device {device.type}{opts})")
    written = predict_folder(args.i, args.o, folder, folds, args.chk, device, args.step_size, not args.disable_tta,
                             args.save_probabilities, args.npp, args.nps, progress=not args.quiet,
                             inputs=inputs, input_folders=folders, cases=cases, options=overrides)
    n = sum(1 for w in written if w.endswith(dataset_json["file_ending"]))
    print(f"nnx_predict: wrote {n} prediction(s) to {args.o} in {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
