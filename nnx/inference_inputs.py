"""Inference inputs beyond the images (coarse masks, anatomy maps) for ``nnx_predict``.

A trainer whose ``nnx_requires["inputs"]`` is non-empty stores ``nnx_inputs`` = ``[{"name", "values"}]`` in its
checkpoints. ``nnx_predict`` then needs one folder per input (``-inputs coarse=DIR anatomy=DIR``) holding
``CASE<file_ending>`` for every case of ``-i``. Each map is validated like the training tiers (geometry of the
case's image, values declared), goes through the image's preprocessing geometry
(:func:`nnx.extras.prepare_label_map`) and is appended with the encoding stored in the model (:func:`nnx.extras.onehot`), exactly as in training.

A trainer may also replace the network ``nnx_predict`` runs (``nnx_inference_network``, e.g. with a fusion block fed
by a frozen encoder) and declare options that ``nnx_predict --opt`` may change (``nnx_inference_options``); see
:func:`initialize_predictor`.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from nnx.errors import NNXError


def model_inputs(model_dir: str, folds: Sequence, checkpoint: str) -> List[dict]:
    """``nnx_inputs`` of the model (identical across folds; checked)."""
    import torch
    found = None
    for f in folds:
        p = os.path.join(model_dir, f"fold_{f}", checkpoint)
        ck = torch.load(p, map_location="cpu", weights_only=False)
        inputs = ck.get("nnx_inputs") or []
        if found is not None and inputs != found:
            raise NNXError("folds disagree on their inference inputs (trained with different settings?)", p)
        found = inputs
    return found or []


def parse_input_args(items: Sequence[str]) -> Dict[str, str]:
    out = {}
    for it in items or []:
        if "=" not in it:
            raise NNXError(f"-inputs expects NAME=FOLDER, got '{it}'")
        k, v = it.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def check_input_folders(cases: Sequence[str], image_folder: str, folders: Dict[str, str], inputs: List[dict],
                        file_ending: str) -> None:
    """Every required input folder given, has exactly one map per case, with the image's geometry and declared
    values. One-line :class:`NNXError` otherwise."""
    from nnx import checks
    from nnx.extras import input_label_values
    needed = [i["name"] for i in inputs]
    missing = [n for n in needed if n not in folders]
    if missing:
        raise NNXError(f"this model needs inference input(s) {', '.join(missing)}: pass "
                       + " ".join(f"-inputs {n}=FOLDER" for n in missing))
    unknown = sorted(set(folders) - set(needed))
    if unknown:
        raise NNXError(f"the model does not take input(s) {', '.join(unknown)} (it takes: "
                       f"{', '.join(needed) or 'images only'})")
    for spec in inputs:
        name, values = spec["name"], set(input_label_values(spec["values"])) | {0}
        folder = folders[name]
        if not os.path.isdir(folder):
            raise NNXError(f"{name} input folder not found", folder)
        names = sorted(f for f in os.listdir(folder) if not f.startswith("."))
        stray = [f for f in names if not f.endswith(file_ending) or f[: -len(file_ending)] not in cases]
        if stray:
            raise NNXError(f"{name} file has no case in {image_folder} (expected CASE{file_ending} per image case)",
                           os.path.join(folder, stray[0]))
        for case in cases:
            p = os.path.join(folder, case + file_ending)
            if not os.path.isfile(p):
                raise NNXError(f"missing {name} map for case {case}", p)
            ref = os.path.join(image_folder, f"{case}_0000{file_ending}")
            arr, geom = checks.read_image(p)
            checks._check_same_geometry(p, geom, ref, checks.read_geometry(ref), "image")
            found = checks._label_values(p, arr, role=f"{name} map")
            bad = sorted(set(found) - values)
            if bad:
                raise NNXError(f"{name} map values {bad} are not among the values the model was trained with "
                               f"{sorted(values)}", p)


def iterate_preprocessed(image_folder: str, cases: Sequence[str], folders: Dict[str, str], inputs: List[dict],
                         predictor, output_folder: str):
    """Yield nnU-Net predictor items (``data`` with the input channels appended, ``data_properties``, ``ofile``)."""
    import torch
    from nnx.extras import onehot, prepare_label_map
    pm, cm, dj = predictor.plans_manager, predictor.configuration_manager, predictor.dataset_json
    fe = dj["file_ending"]
    n_ch = len(dj.get("channel_names") or dj.get("modality"))
    pre = cm.preprocessor_class(verbose=False)
    rw = pm.image_reader_writer_class()
    for case in cases:
        files = [os.path.join(image_folder, f"{case}_{c:04d}{fe}") for c in range(n_ch)]
        data, _, props = pre.run_case(files, None, pm, cm, dj)
        parts = [data.astype(np.float32)]
        for spec in inputs:
            p = os.path.join(folders[spec["name"]], case + fe)
            arr, _ = rw.read_seg(p)
            seg = prepare_label_map(arr, props, data.shape[1:], pm, cm, p)
            parts.append(onehot(seg, spec["values"]))
        yield {"data": torch.from_numpy(np.vstack(parts)), "data_properties": props,
               "ofile": os.path.join(output_folder, case)}


def inference_option_overrides(trainer_name: str, raw: Dict[str, str]) -> Dict[str, Any]:
    """``nnx_predict --opt`` values, checked: only the trainer's ``nnx_inference_options`` can be changed at
    prediction time (the others shaped the trained weights). One-line :class:`NNXError` otherwise."""
    if not raw:
        return {}
    from nnx.options import declared_options
    from nnx.registry import load_trainer
    cls = load_trainer(trainer_name)
    allowed = tuple(getattr(cls, "nnx_inference_options", ()) or ())
    bad = [k for k in raw if k not in allowed]
    if bad:
        raise NNXError(f"option '{bad[0]}' cannot be changed at prediction time; {trainer_name} takes "
                       + (f"--opt {', '.join(allowed)}" if allowed else "no prediction-time options"), "--opt")
    declared = declared_options(cls)
    return {k: declared[k].convert(k, v, "--opt") for k, v in raw.items()}


def fold_options(cls: type, fold_dir: str, overrides: Dict[str, Any]) -> Dict[str, Any]:
    """The training options of one fold (``nnx_config.json``; defaults where missing) with ``overrides`` applied."""
    from nnx.io_utils import read_json
    from nnx.options import CONFIG_FILE, declared_options, resolve
    path = os.path.join(fold_dir, CONFIG_FILE)
    declared = declared_options(cls)
    if not os.path.isfile(path):  # a fold copied without its config: defaults (the hook sees what is missing)
        return {**{k: o.default for k, o in declared.items()}, **overrides}
    stored = read_json(path, CONFIG_FILE).get("options", {})
    raw = {k: v for k, v in stored.items() if k in declared}  # options a newer nnx removed are ignored
    raw.update(overrides)
    return resolve(cls, raw, path)


def initialize_predictor(predictor, model_dir: str, folds, checkpoint: str, inputs: List[dict],
                         options: Optional[Dict[str, Any]] = None) -> None:
    """``initialize_from_trained_model_folder`` with the input channels counted; then the trainer's
    ``nnx_inference_network`` may replace the network (``options``: prediction-time option overrides)."""
    import nnunetv2.inference.predict_from_raw_data as pfr
    import torch
    from nnx.compat import patched
    extra = sum(len(i["values"]) for i in inputs)
    stock = pfr.determine_num_input_channels
    with patched(pfr, "determine_num_input_channels", lambda *a, **kw: stock(*a, **kw) + extra):
        predictor.initialize_from_trained_model_folder(model_dir, use_folds=tuple(folds), checkpoint_name=checkpoint)
    from nnx.registry import load_trainer
    from nnx.trainer_base import nnxTrainerMixin
    try:
        cls = load_trainer(predictor.trainer_name)
    except NNXError:  # not an nnx trainer: nnU-Net's network as loaded
        return
    hook = getattr(cls, "nnx_inference_network", None)
    if hook is None or getattr(hook, "__func__", None) is nnxTrainerMixin.nnx_inference_network.__func__:
        return  # nnU-Net's network as loaded
    info = []
    for f in folds:
        d = os.path.join(model_dir, f"fold_{f}")
        ck = torch.load(os.path.join(d, checkpoint), map_location="cpu", weights_only=False)
        info.append({"dir": d, "checkpoint": ck, "options": fold_options(cls, d, options or {})})
    network = getattr(predictor.network, "_orig_mod", predictor.network)  # nnUNet_compile: the plain module
    res = hook(network, info, predictor)
    if res is not None:
        module, params = res
        module.load_state_dict(params[0])
        predictor.network, predictor.list_of_parameters = module, list(params)
