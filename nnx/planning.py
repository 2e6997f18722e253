"""Plugin-aware planning: nnU-Net's planners, fitted to the memory of the trainer that will run.

nnU-Net sizes patch, batch and topology with one activation estimate (``static_estimate_VRAM_usage``: the summed
conv feature-map size of ONE network for batch 1) against a reference that is linear in the GPU budget. A trainer's
memory profile (:mod:`nnx.memory`) states how its training step relates to that stock step:

    estimate_nnx = activation_factor * estimate(planned U-Net) + sum_i factor_i * estimate(extra architecture i)
    budget the planner sees = budget - static_gb            (parameters / optimizer state of extra modules)

Both enter nnU-Net's own loop (patch shrinking) and batch-size formula unchanged, so the identity profile gives
exactly nnU-Net's plans, and a factor of 2 at budget B gives the identity's plans at B/2. Calibrated factors
(``nnx_plan --calibrate``, :mod:`nnx.memory`) replace declared ones when they exist for the device kind.

CPU planning (``-device cpu``) is a different target: 16 base features (max 128), a patch of at most
``CPU_MAX_PATCH_VOXELS`` voxels and batch size 2, so that a few hundred steps take minutes on 2 cores. Its plans say
so in ``plans["nnx"]``.

Plans are written under a distinct identifier (``nnxPlans_<Trainer>_<budget>GB``, ``..._cpu``) with
``plans["nnx"]`` (trainer, budget, profile and its source) and per configuration ``nnx_memory`` (the estimate, the
predicted GB, measurements). ``2d``/``3d_fullres`` share nnU-Net's preprocessed data (``nnUNetPlans_<cfg>``: same
spacing and normalisation); other configurations get their own data identifier unless an existing plans file
already preprocesses the same signature.
"""
from __future__ import annotations

import copy
import json
import os
from typing import Any, Dict, Optional, Tuple

import numpy as np

from nnx.errors import NNXError

PRESETS = {
    "default": ("nnunetv2.experiment_planning.experiment_planners.default_experiment_planner.ExperimentPlanner", 8, ""),
    "ResEncM": ("nnunetv2.experiment_planning.experiment_planners.residual_unets.residual_encoder_unet_planners."
                "nnUNetPlannerResEncM", 8, "ResEncM"),
    "ResEncL": ("nnunetv2.experiment_planning.experiment_planners.residual_unets.residual_encoder_unet_planners."
                "nnUNetPlannerResEncL", 24, "ResEncL"),
    "ResEncXL": ("nnunetv2.experiment_planning.experiment_planners.residual_unets.residual_encoder_unet_planners."
                 "nnUNetPlannerResEncXL", 40, "ResEncXL"),
}
TABLE_BUDGETS = (4, 8, 16, 24, 40, 80)
CPU_MAX_PATCH_VOXELS = 32 * 64 * 64
CPU_BASE_FEATURES, CPU_MAX_FEATURES_3D, CPU_MAX_FEATURES_2D = 16, 128, 256
MIN_PATCH_VOXELS_3D, MIN_PATCH_PIXELS_2D = 16 ** 3, 32 ** 2  # below this a patch is not a useful configuration
SHARED_DATA_CONFIGS = ("2d", "3d_fullres")

_BASE_ESTIMATES: Dict[tuple, float] = {}  # process-wide cache of nnU-Net's estimate (network instantiation is slow)


class BudgetTooSmall(NNXError):
    pass


def _locate(dotted: str):
    import pydoc
    cls = pydoc.locate(dotted)
    if cls is None:
        raise NNXError(f"planner class {dotted} not found")
    return cls


def base_estimate(patch_size, n_in, n_out, arch_class_name, arch_kwargs, req_import) -> float:
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
    key = (tuple(int(p) for p in patch_size), n_in, n_out, arch_class_name,
           json.dumps(arch_kwargs, sort_keys=True, default=str))
    if key not in _BASE_ESTIMATES:
        _BASE_ESTIMATES[key] = float(ExperimentPlanner.static_estimate_VRAM_usage(
            patch_size, n_in, n_out, arch_class_name, arch_kwargs, req_import))
    return _BASE_ESTIMATES[key]


class nnxPlannerMixin:
    """Mixed in front of a stock planner class by :func:`planner_class`."""

    nnx_profile: Dict[str, Any] = {"activation_factor": 1.0, "static_gb": 0.0, "extra_architectures": []}
    nnx_device: str = "cuda"
    nnx_budget_gb: float = 8.0

    def __init__(self, dataset_name_or_id, gpu_memory_target_in_gb=None, preprocessor_name="DefaultPreprocessor",
                 plans_name=None, overwrite_target_spacing=None, suppress_transpose=False):
        budget = float(gpu_memory_target_in_gb if gpu_memory_target_in_gb is not None else self.nnx_budget_gb)
        static = float(self.nnx_profile.get("static_gb", 0.0))
        if budget - static <= 0:
            raise BudgetTooSmall(f"budget {budget:g} GB is below the trainer's static memory {static:g} GB "
                                 f"(parameters/optimizer state of its extra modules)")
        kw = {} if plans_name is None else {"plans_name": plans_name}
        import warnings
        with warnings.catch_warnings():  # ResEnc presets warn about any non-default budget; ours is deliberate
            warnings.simplefilter("ignore")
            super().__init__(dataset_name_or_id, budget - static, preprocessor_name,
                             overwrite_target_spacing=overwrite_target_spacing, suppress_transpose=suppress_transpose,
                             **kw)
        self.nnx_budget_gb = budget
        self.nnx_estimates: Dict[tuple, float] = {}
        if self.nnx_device == "cpu":
            self.UNet_base_num_features = CPU_BASE_FEATURES
            self.UNet_max_features_3d = CPU_MAX_FEATURES_3D
            self.UNet_max_features_2d = CPU_MAX_FEATURES_2D

    # -- the estimate nnU-Net's loop and batch formula see ----------------------------------------------------------
    def static_estimate_VRAM_usage(self, patch_size, n_in, n_out, arch_class_name, arch_kwargs, req_import):
        prof = self.nnx_profile
        est = float(prof.get("activation_factor", 1.0)) * base_estimate(patch_size, n_in, n_out, arch_class_name,
                                                                        arch_kwargs, req_import)
        for extra in prof.get("extra_architectures", []) or []:
            kwargs = copy.deepcopy(arch_kwargs)
            if "feature_scale" in extra:  # e.g. a second, thinner network of the planned topology
                kwargs["features_per_stage"] = [max(1, int(round(f * float(extra["feature_scale"]))))
                                                for f in kwargs["features_per_stage"]]
            kwargs.update(extra.get("arch_kwargs", {}))
            est += float(extra.get("factor", 1.0)) * base_estimate(
                patch_size, n_in, n_out, extra.get("network_class_name", arch_class_name), kwargs, req_import)
        patch_voxels = float(np.prod(patch_size, dtype=np.float64))
        if self.nnx_device == "cpu" and len(patch_size) == 3 and patch_voxels > CPU_MAX_PATCH_VOXELS:
            est = max(est, self._reference(len(patch_size)) * 1.0001)  # keep shrinking the patch
        elif est > self._reference(len(patch_size)) and \
                patch_voxels <= (MIN_PATCH_VOXELS_3D if len(patch_size) == 3 else MIN_PATCH_PIXELS_2D):
            need = est / self._reference(len(patch_size)) * (self.nnx_budget_gb - prof.get("static_gb", 0.0)) \
                + prof.get("static_gb", 0.0)
            raise BudgetTooSmall(f"budget {self.nnx_budget_gb:g} GB is below the smallest viable configuration "
                                 f"(patch {list(int(p) for p in patch_size)}, batch 2 still needs about {need:.2f} GB "
                                 f"for this trainer); give a larger -gpu_memory_target")
        self.nnx_estimates[(tuple(int(p) for p in patch_size), json.dumps(arch_kwargs.get("strides"), default=str))] \
            = est
        return est

    def _reference(self, dim: int) -> float:
        ref = self.UNet_reference_val_2d if dim == 2 else self.UNet_reference_val_3d
        ref_bs = self.UNet_reference_val_corresp_bs_2d if dim == 2 else self.UNet_reference_val_corresp_bs_3d
        # nnU-Net's loop condition is estimate / ref_bs * 2 > reference
        return ref * (self.UNet_vram_target_GB / self.UNet_reference_val_corresp_GB) * ref_bs / 2

    def generate_data_identifier(self, configuration_name: str) -> str:
        if configuration_name in SHARED_DATA_CONFIGS:
            return "nnUNetPlans_" + configuration_name  # nnU-Net's: same spacing and normalisation
        return self.plans_identifier + "_" + configuration_name

    def get_plans_for_configuration(self, spacing, median_shape, data_identifier, approximate_n_voxels_dataset,
                                    _cache):
        plan = super().get_plans_for_configuration(spacing, median_shape, data_identifier,
                                                   approximate_n_voxels_dataset, _cache)
        if self.nnx_device == "cpu":
            plan["batch_size"] = 2
        return plan

    # -- bookkeeping ----------------------------------------------------------------------------------------------------
    def predicted_gb(self, plan: dict) -> Tuple[float, float]:
        """(estimate, predicted GB) of a configuration, in nnU-Net's own scale: the reference estimate at the
        reference batch size corresponds to UNet_reference_val_corresp_GB."""
        dim = len(plan["patch_size"])
        key = (tuple(int(p) for p in plan["patch_size"]),
               json.dumps(plan["architecture"]["arch_kwargs"].get("strides"), default=str))
        est = self.nnx_estimates.get(key)
        if est is None:
            a = plan["architecture"]
            est = self.static_estimate_VRAM_usage(plan["patch_size"], len(self.dataset_json["channel_names"]),
                                                  len(self.dataset_json["labels"]), a["network_class_name"],
                                                  a["arch_kwargs"], a["_kw_requires_import"])
        ref = self.UNet_reference_val_2d if dim == 2 else self.UNet_reference_val_3d
        ref_bs = self.UNet_reference_val_corresp_bs_2d if dim == 2 else self.UNet_reference_val_corresp_bs_3d
        gb = est * plan["batch_size"] / ref_bs / ref * self.UNet_reference_val_corresp_GB
        return est, gb + float(self.nnx_profile.get("static_gb", 0.0))


def planner_class(preset: str = "default", profile: Optional[dict] = None, device: str = "cuda") -> type:
    if preset not in PRESETS:
        raise NNXError(f"unknown planner preset '{preset}' (choose from {', '.join(PRESETS)})")
    base = _locate(PRESETS[preset][0])
    from nnx.memory import IDENTITY
    prof = dict(IDENTITY)
    prof.update(profile or {})
    return type(f"nnx{base.__name__}", (nnxPlannerMixin, base),
                {"nnx_profile": prof, "nnx_device": device, "nnx_budget_gb": float(PRESETS[preset][1])})


def default_budget(preset: str) -> float:
    return float(PRESETS[preset][1])


def plans_name_for(preset: str, trainer: str, budget: Optional[float], device: str) -> str:
    tag = PRESETS[preset][2]
    where = "cpu" if device == "cpu" else f"{budget:g}GB".replace(".", "p")
    return f"nnx{tag}Plans_{trainer}_{where}"


def _refuse_to_replace_stock_plans(dataset_name: str, name: str) -> None:
    """nnx plans never overwrite a plans file that nnU-Net's own planning wrote (no ``nnx`` block): a user's
    nnUNetPlans.json may have trained models next to it."""
    from nnx.io_utils import read_json
    path = os.path.join(os.environ["nnUNet_preprocessed"], dataset_name, name + ".json")
    if os.path.isfile(path) and "nnx" not in read_json(path, "plans file"):
        raise NNXError(f"plans '{name}' are nnU-Net's own; nnx plans (for a trainer, a budget or -device cpu) would "
                       f"overwrite them: give them another name (-overwrite_plans_name) or leave it to nnx", path)


def plan_for_trainer(dataset_name: str, trainer: str, budget: Optional[float] = None, preset: str = "default",
                     device: str = "cuda", plans_name: Optional[str] = None, verbose: bool = False) -> Tuple[str, dict]:
    """Plan ``dataset_name`` for ``trainer`` (fingerprint must exist). Writes and returns (identifier, plans)."""
    import contextlib
    import io
    profile, source = trainer_profile(trainer, device)
    budget = default_budget(preset) if budget is None else float(budget)
    if budget <= 0:
        raise NNXError(f"-gpu_memory_target must be > 0, got {budget:g}")
    name = plans_name or plans_name_for(preset, trainer, budget, device)
    _refuse_to_replace_stock_plans(dataset_name, name)
    P = planner_class(preset, profile, device)
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink) if not verbose else contextlib.nullcontext():
        planner = P(dataset_name, gpu_memory_target_in_gb=budget, plans_name=name)
        plans = planner.plan_experiment()  # writes the plans file
    for cfg_name, cfg in plans["configurations"].items():
        if "patch_size" in cfg:
            est, gb = planner.predicted_gb(cfg)
            cfg["nnx_memory"] = {"estimate": est, "predicted_gb": round(gb, 3), "measured": {}}
    plans["nnx"] = {"trainer": trainer, "device": device, "budget_gb": budget, "planner": PRESETS[preset][0],
                    "profile": profile, "profile_source": source}
    if device == "cpu":
        plans["nnx"]["note"] = (f"CPU plan: {CPU_BASE_FEATURES} base features (max {CPU_MAX_FEATURES_3D} in 3D), "
                                f"patch <= {CPU_MAX_PATCH_VOXELS} voxels, batch 2; made to train in minutes on a few "
                                f"cores, not comparable to GPU plans")
    _reuse_data_identifiers(dataset_name, name, plans)
    save_plans(dataset_name, name, plans)
    return name, plans


def trainer_profile(trainer: str, device: str = "cuda") -> Tuple[Dict[str, Any], str]:
    """The profile planning uses for a registered trainer. The stock trainer is the identity by definition (the
    reference of every calibration), known without importing it."""
    from nnx.memory import IDENTITY, declared_profile, with_calibration
    from nnx.registry import BASELINE, trainer_target
    if trainer == BASELINE:
        trainer_target(trainer)
        return dict(IDENTITY), "identity (stock trainer)"
    return with_calibration(declared_profile(trainer), trainer, device)


def preload_trainer(trainer: str) -> None:
    """Import a trainer's module in a background thread (nnx_plan overlaps it with fingerprinting)."""
    import threading
    from nnx.memory import declared_profile
    from nnx.registry import BASELINE, load_trainer
    if trainer == BASELINE or declared_profile(trainer, cached_only=True) is not None:
        return

    def _load():
        try:
            load_trainer(trainer)
        except Exception:  # noqa: BLE001 - reported properly when planning loads it again
            pass

    threading.Thread(target=_load, name="nnx-preload-trainer", daemon=True).start()


def preprocessing_signature(plans: dict, cfg: dict) -> str:
    keys = ("spacing", "normalization_schemes", "use_mask_for_norm", "resampling_fn_data", "resampling_fn_data_kwargs",
            "resampling_fn_seg", "resampling_fn_seg_kwargs", "preprocessor_name")
    return json.dumps({"cfg": {k: cfg.get(k) for k in keys}, "transpose": plans.get("transpose_forward"),
                       "rw": plans.get("image_reader_writer"),
                       "fg": plans.get("foreground_intensity_properties_per_channel")}, sort_keys=True, default=str)


def plans_files(dataset_name: str, exclude: Optional[str] = None):
    """``(identifier, plans)`` of every plans file in the dataset's preprocessed folder (sorted), except
    ``exclude``; other JSON files (dataset.json, fingerprint, splits) and unreadable files are skipped."""
    base = os.path.join(os.environ["nnUNet_preprocessed"], dataset_name)
    for f in sorted(os.listdir(base)):
        if not f.endswith(".json") or f[:-5] == exclude:
            continue
        try:
            with open(os.path.join(base, f)) as fh:
                plans = json.load(fh)
        except (OSError, ValueError):
            continue
        if isinstance(plans, dict) and isinstance(plans.get("configurations"), dict):
            yield f[:-5], plans


def preprocessed_data(dataset_name: str, exclude: Optional[str] = None) -> list:
    """``(preprocessing signature, data identifier)`` of every configuration of the dataset's plans files except
    ``exclude``, in file order: which preprocessed folders hold which data."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    out = []
    for _, other in plans_files(dataset_name, exclude):
        try:
            pm = PlansManager(other)
            found = [(preprocessing_signature(other, pm.get_configuration(c).configuration),
                      pm.get_configuration(c).data_identifier) for c in pm.available_configurations]
        except Exception:  # noqa: BLE001 - a malformed plans file holds no reusable data
            continue
        out.extend(found)
    return out


def _reuse_data_identifiers(dataset_name: str, plans_name: str, plans: dict) -> None:
    """Configurations whose preprocessing equals one of another plans file reuse that file's data identifier."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    others = {}
    for sig, data_identifier in preprocessed_data(dataset_name, exclude=plans_name):
        others.setdefault(sig, data_identifier)
    pm = PlansManager(plans)
    for c, cfg in plans["configurations"].items():
        if "data_identifier" not in cfg or c in SHARED_DATA_CONFIGS:
            continue
        sig = preprocessing_signature(plans, pm.get_configuration(c).configuration)
        if sig in others:
            cfg["data_identifier"] = others[sig]


def save_plans(dataset_name: str, plans_name: str, plans: dict) -> str:
    from nnx.io_utils import atomic_write_json
    from nnunetv2.utilities.json_export import recursive_fix_for_json_export
    recursive_fix_for_json_export(plans)
    path = os.path.join(os.environ["nnUNet_preprocessed"], dataset_name, plans_name + ".json")
    atomic_write_json(plans, path)
    return path


def fullres_plan(dataset_name: str, trainer_cls, budget: float, preset: str = "default",
                 device: str = "cuda") -> dict:
    """Only the 3d_fullres (or 2d for 2D data) configuration, in memory (for tables and tests): what
    ``plan_experiment`` computes first, without lowres search or writing files."""
    import contextlib
    import io
    from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape
    from nnx.memory import effective_profile
    profile, source = effective_profile(trainer_cls, device)
    P = planner_class(preset, profile, device)
    with contextlib.redirect_stdout(io.StringIO()):
        pl = P(dataset_name, gpu_memory_target_in_gb=budget, plans_name="nnx_table_tmp")
        tf, _ = pl.determine_transpose()
        sp = pl.determine_fullres_target_spacing()
        shapes = [compute_new_shape(j, i, sp) for i, j in zip(pl.dataset_fingerprint["spacings"],
                                                               pl.dataset_fingerprint["shapes_after_crop"])]
        med = np.median(shapes, 0)[tf]
        n_vox = float(np.prod(med, dtype=np.float64) * pl.dataset_json["numTraining"])
        if med[0] != 1:
            plan = pl.get_plans_for_configuration(sp[tf], med, pl.generate_data_identifier("3d_fullres"), n_vox, {})
        else:
            plan = pl.get_plans_for_configuration(sp[tf][1:], med[1:], pl.generate_data_identifier("2d"), n_vox, {})
    est, gb = pl.predicted_gb(plan)
    return {"patch_size": [int(p) for p in plan["patch_size"]], "batch_size": int(plan["batch_size"]),
            "estimate": est, "predicted_gb": gb, "architecture": plan["architecture"], "spacing": plan["spacing"],
            "profile_source": source}
