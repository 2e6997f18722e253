"""Preprocessing of annotation tiers and auxiliary inputs, next to nnU-Net's own preprocessed data.

For every configuration nnU-Net writes ``$nnUNet_preprocessed/D/<data_identifier>/``. nnx writes a sibling

``<data_identifier>__nnx/``
    ``unlabeled/<case>.b2nd + .pkl``   tier ``none`` cases: images only (nnU-Net's preprocessing, no seg file at all)
    ``<entry>/<case>.b2nd``            one folder per entry (``coarse``, ``scribbles``, aux maps, ``train_only``)
    ``<entry>/<case>.pkl``             ``class_locations`` for ``coarse``/``scribbles`` (used when a label-ratio
                                       setting makes that entry a case's training target)
    ``nnx_preprocessing.json``         manifest: cases per entry, timings, scribble voxel counts, plans signature

Every entry gets exactly its image's geometry pipeline: transpose, the crop nnU-Net chose for the image
(``bbox_used_for_cropping`` of the case's ``.pkl``), resampling to the image's preprocessed shape. Label maps use
nnU-Net's label-safe seg resampling (``resampling_fn_seg``), scribbles the stroke-keeping
:func:`nnx.resample.resample_scribbles`, train-only channels normalisation (scheme from their channel name) and
``resampling_fn_data``. The folder lives outside ``<data_identifier>/`` because nnU-Net deletes that folder when
it preprocesses again, and its loaders would treat extra files there as training cases. It is written under a
temporary name and renamed when complete.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import pickle
import shutil
import time
from typing import Dict, List, Optional, Sequence

import numpy as np

from nnx.errors import NNXError
from nnx.resample import count_labels, resample_scribbles
from nnx.tiers import DatasetSpec, Entry

SUFFIX = "__nnx"
MANIFEST = "nnx_preprocessing.json"
UNLABELED = "unlabeled"
MANIFEST_VERSION = 1


# ----------------------------------------------------------------------------------------------------------------------
# layout
# ----------------------------------------------------------------------------------------------------------------------
def extras_folder(preprocessed_dataset_folder: str) -> str:
    """``.../D/<data_identifier>`` -> ``.../D/<data_identifier>__nnx``."""
    return os.path.normpath(preprocessed_dataset_folder) + SUFFIX


def load_manifest(folder: str) -> Optional[dict]:
    p = os.path.join(folder, MANIFEST)
    if not os.path.isfile(p):
        return None
    with open(p) as f:
        return json.load(f)


def plans_signature(plans: dict, configuration: str) -> dict:
    """What the extras depend on: if any of it changes, they must be preprocessed again."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    cm = PlansManager(plans).get_configuration(configuration)
    return {"data_identifier": cm.data_identifier, "spacing": [float(s) for s in cm.spacing],
            "normalization_schemes": list(cm.normalization_schemes),
            "use_mask_for_norm": [bool(u) for u in cm.use_mask_for_norm],
            "transpose_forward": list(plans["transpose_forward"]),
            "resampling_fn_seg": cm.configuration["resampling_fn_seg"],
            "resampling_fn_data": cm.configuration["resampling_fn_data"]}


# ----------------------------------------------------------------------------------------------------------------------
# one array through the image's geometry pipeline (also used at inference)
# ----------------------------------------------------------------------------------------------------------------------
def _transpose_and_crop(arr: np.ndarray, props: dict, transpose_forward: Sequence[int], path: str) -> np.ndarray:
    from acvl_utils.cropping_and_padding.bounding_boxes import bounding_box_to_slice
    arr = arr.transpose([0, *[i + 1 for i in transpose_forward]])
    if tuple(arr.shape[1:]) != tuple(props["shape_before_cropping"]):
        raise NNXError(f"shape {tuple(arr.shape[1:])} (after transpose) differs from its image's "
                       f"{tuple(props['shape_before_cropping'])}", path)
    slicer = (slice(None),) + tuple(bounding_box_to_slice(props["bbox_used_for_cropping"]))
    return np.ascontiguousarray(arr[slicer])


def _spacings(props: dict, transpose_forward, cm):
    original = [props["spacing"][i] for i in transpose_forward]
    target = list(cm.spacing)
    if len(target) < len(original):
        target = [original[0]] + target
    return original, target


def prepare_label_map(arr: np.ndarray, props: dict, new_shape, plans_manager, cm, path: str,
                      scribble_ignore: Optional[int] = None) -> np.ndarray:
    """Raw label map ``(1, X, Y, Z)`` -> preprocessed ``(1, *new_shape)`` int16 (transpose, crop, label-safe
    resampling; stroke-keeping for scribbles)."""
    seg = _transpose_and_crop(arr, props, plans_manager.transpose_forward, path)
    new_shape = tuple(int(s) for s in new_shape)
    if tuple(seg.shape[1:]) != new_shape:
        if scribble_ignore is not None:
            seg = resample_scribbles(seg.astype(np.int16), new_shape, scribble_ignore)
        else:
            original, target = _spacings(props, plans_manager.transpose_forward, cm)
            seg = cm.resampling_fn_seg(seg.astype(np.float32), new_shape, original, target)
    return np.asarray(seg).astype(np.int16, copy=False)


def prepare_image(arr: np.ndarray, props: dict, new_shape, plans_manager, cm, channel_names: Dict[str, str],
                  intensity: Dict[str, dict], path: str) -> np.ndarray:
    """Raw channels ``(C, X, Y, Z)`` -> normalised, resampled ``(C, *new_shape)`` float32."""
    from nnunetv2.preprocessing.normalization.map_channel_name_to_normalization import get_normalization_scheme
    data = _transpose_and_crop(arr.astype(np.float32), props, plans_manager.transpose_forward, path)
    for c in range(data.shape[0]):
        scheme = get_normalization_scheme(channel_names[str(c)])
        norm = scheme(use_mask_for_norm=False, intensityproperties=intensity.get(str(c), {}))
        data[c] = norm.run(data[c], None)
    new_shape = tuple(int(s) for s in new_shape)
    if tuple(data.shape[1:]) != new_shape:
        original, target = _spacings(props, plans_manager.transpose_forward, cm)
        data = cm.resampling_fn_data(data, new_shape, original, target)
    return np.asarray(data, dtype=np.float32)


def onehot(seg: np.ndarray, values: Sequence, dtype=np.float32) -> np.ndarray:
    """``(1, *spatial)`` label map -> ``(len(values), *spatial)`` input channels (the network-input encoding of a
    label entry; used identically in training batches, validation and nnx_predict).

    Each item of ``values`` defines one channel: an int ``v`` gives the one-hot channel ``seg == v``; a list of
    ``[value, weight]`` pairs gives ``sum(weight * (seg == value))``, so a trainer can group classes (weights 1) or
    encode the map as one scaled channel (e.g. ``[[1, 0.2], [2, 0.4], ...]``) through
    :meth:`nnx.trainer_base.nnxTrainerMixin.nnx_input_encoding`."""
    if seg.shape[0] != 1:
        raise ValueError(f"expected a one-channel label map (1, *spatial), got shape {seg.shape}")
    s = np.asarray(seg[0])
    out = np.zeros((len(values), *s.shape), dtype=dtype)
    for i, v in enumerate(values):
        if isinstance(v, (list, tuple)):
            for val, w in v:
                out[i][s == int(val)] += w
        else:
            out[i] = s == v
    return out


def input_label_values(values: Sequence) -> List[int]:
    """The label values an input encoding (see :func:`onehot`) reads, sorted."""
    out = set()
    for v in values:
        if isinstance(v, (list, tuple)):
            out.update(int(val) for val, _w in v)
        else:
            out.add(int(v))
    return sorted(out)


# ----------------------------------------------------------------------------------------------------------------------
# storage
# ----------------------------------------------------------------------------------------------------------------------
def save_array(arr: np.ndarray, path_no_ext: str, patch_size) -> None:
    import blosc2
    from nnunetv2.training.dataloading.nnunet_dataset import comp_blosc2_params
    blosc2.set_nthreads(1)
    blocks, chunks = comp_blosc2_params(arr.shape, tuple(patch_size), arr.itemsize)
    if os.path.isfile(path_no_ext + ".b2nd"):
        os.remove(path_no_ext + ".b2nd")
    # ZSTD level 1 + shuffle: measured 6x faster to write than nnU-Net's LZ4HC-5 on float data, and smaller
    blosc2.asarray(np.ascontiguousarray(arr), urlpath=path_no_ext + ".b2nd", chunks=chunks, blocks=blocks,
                   cparams={"codec": blosc2.Codec.ZSTD, "clevel": 1, "nthreads": 1,
                            "filters": [blosc2.Filter.SHUFFLE]})


def open_array(path_no_ext: str):
    import blosc2
    return blosc2.open(urlpath=path_no_ext + ".b2nd", mode="r", dparams={"nthreads": 1},
                       **({} if os.name == "nt" else {"mmap_mode": "r"}))


# ----------------------------------------------------------------------------------------------------------------------
# worker
# ----------------------------------------------------------------------------------------------------------------------
def _class_locations(seg: np.ndarray, label_manager, with_annotated: bool) -> dict:
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    collect = list(label_manager.foreground_regions if label_manager.has_regions
                   else label_manager.foreground_labels)
    if with_annotated and label_manager.has_ignore_label:
        collect.append([-1] + label_manager.all_labels)
    return DefaultPreprocessor._sample_foreground_locations(seg, collect, verbose=False)


def _run_job(job: dict) -> dict:
    """Preprocess one (case, entry) pair; returns counts/timing. Runs in a spawn pool, so errors travel as
    ``("error", message, path)``."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    t0 = time.perf_counter()
    try:
        pm = PlansManager(job["plans"])
        cm = pm.get_configuration(job["configuration"])
        rw = pm.image_reader_writer_class()
        out = job["out"]
        if job["kind"] == UNLABELED:
            pre = cm.preprocessor_class(verbose=False)
            data, _seg, props = pre.run_case(job["files"], None, pm, cm, job["dataset_json"])
            props["class_locations"] = {}
            save_array(data.astype(np.float32, copy=False), out, cm.patch_size)
            with open(out + ".pkl", "wb") as f:
                pickle.dump(props, f)
            return {"case": job["case"], "seconds": time.perf_counter() - t0}
        with open(job["props_file"], "rb") as f:
            props = pickle.load(f)
        new_shape = open_array(job["data_file"]).shape[1:]
        result = {"case": job["case"]}
        if job["entry_kind"] == "image":
            arr, _ = rw.read_images(job["files"])
            data = prepare_image(arr, props, new_shape, pm, cm, job["channel_names"], job["intensity"],
                                 job["files"][0])
            save_array(data, out, cm.patch_size)
        else:
            arr, _ = rw.read_seg(job["files"][0])
            ignore = job.get("ignore_value")
            seg = prepare_label_map(arr, props, new_shape, pm, cm, job["files"][0], scribble_ignore=ignore)
            if ignore is not None:
                result["before"] = count_labels(arr, ignore)
                result["after"] = count_labels(seg, ignore)
            save_array(seg, out, cm.patch_size)
            if job.get("class_locations"):
                lm = pm.get_label_manager(job["dataset_json"])
                locs = _class_locations(seg, lm, with_annotated=ignore is not None)
                with open(out + ".pkl", "wb") as f:
                    pickle.dump({"class_locations": locs}, f)
        result["seconds"] = time.perf_counter() - t0
        return result
    except NNXError as e:
        return {"error": (e.message, e.path)}


POOL_MIN_VOXELS = 5e7  # voxels x entries below which one process beats starting a pool


def _stock_voxels(base: str, pm, configurations) -> int:
    total = 0
    for cfg in configurations:
        folder = os.path.join(base, pm.get_configuration(cfg).data_identifier)
        if os.path.isdir(folder):
            for f in os.listdir(folder):
                if f.endswith(".b2nd") and not f.endswith("_seg.b2nd"):
                    total += int(np.prod(open_array(os.path.join(folder, f[:-5])).shape[1:]))
    return total


def _warm_worker() -> None:
    """Pool initializer: import what the jobs need once per worker, so that entry timings do not include it."""
    import blosc2  # noqa: F401
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor  # noqa: F401
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager  # noqa: F401


def _run_all(jobs: List[dict], pool) -> List[dict]:
    results = pool.map(_run_job, jobs, chunksize=1) if pool is not None else [_run_job(j) for j in jobs]
    for r in results:
        if "error" in r:
            raise NNXError(*r["error"])
    return results


# ----------------------------------------------------------------------------------------------------------------------
# intensity statistics for train-only channels that need them (CT normalisation)
# ----------------------------------------------------------------------------------------------------------------------
def _train_only_intensity(entry: Entry, raw: str, cases: List[str], spec: DatasetSpec, rw, fe: str) -> Dict[str, dict]:
    from nnunetv2.preprocessing.normalization.map_channel_name_to_normalization import get_normalization_scheme
    from nnunetv2.preprocessing.normalization.default_normalization_schemes import CTNormalization
    need = [c for c, n in entry.channel_names.items() if get_normalization_scheme(n) is CTNormalization]
    if not need:
        return {}
    rng = np.random.RandomState(1234)
    samples: Dict[str, list] = {c: [] for c in need}
    for case in cases:
        label = os.path.join(raw, "labelsTr", case + fe)
        if not os.path.isfile(label):
            continue
        seg, _ = rw.read_seg(label)
        arr, _ = rw.read_images(entry.train_files(raw, case, fe))
        fg = seg[0] > 0
        for c in need:
            v = arr[int(c)][fg]
            if v.size:
                samples[c].append(v[rng.choice(v.size, min(10000, v.size), replace=False)])
    out = {}
    for c in need:
        v = np.concatenate(samples[c]) if samples[c] else np.zeros(1, np.float32)
        out[c] = {"mean": float(v.mean()), "std": float(v.std()),
                  "percentile_00_5": float(np.percentile(v, 0.5)), "percentile_99_5": float(np.percentile(v, 99.5))}
    return out


# ----------------------------------------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------------------------------------
def preprocess_extras(dataset_name: str, plans_identifier: str, configurations: Sequence[str],
                      num_processes: int = 1, verbose: bool = True, stock_seconds: Optional[Dict[str, float]] = None
                      ) -> Dict[str, dict]:
    """Preprocess every tier and auxiliary input of ``dataset_name`` for ``configurations``.

    Needs nnU-Net's preprocessed data of the same plans (the crop of each image comes from there). Returns
    ``{configuration: manifest}``; datasets without an ``nnx`` block return ``{}``.
    """
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    raw = os.path.join(os.environ["nnUNet_raw"], dataset_name)
    base = os.path.join(os.environ["nnUNet_preprocessed"], dataset_name)
    spec = DatasetSpec.from_folder(raw)
    if not spec.has_block:
        return {}
    dj = load_json(os.path.join(raw, "dataset.json"))
    plans = load_json(os.path.join(base, plans_identifier + ".json"))
    pm = PlansManager(plans)
    fe = dj["file_ending"]
    n_ch = len(dj.get("channel_names", dj.get("modality", {})))
    rw = pm.image_reader_writer_class()
    reports = {}
    tmp_folders: List[str] = []  # removed on any error, so nothing half-written stays behind
    # worker processes cost ~1.5 s each to start (imports): only worth it for enough voxels
    voxels = _stock_voxels(base, pm, [c for c in configurations if c in plans["configurations"]])
    use_pool = num_processes > 1 and voxels * max(1, len(spec.entries)) >= POOL_MIN_VOXELS
    t_pool = time.perf_counter()
    pool = multiprocessing.get_context("spawn").Pool(num_processes, initializer=_warm_worker) if use_pool else None
    if pool is not None:  # wait until the workers are up, so that start-up is not billed to the first entry
        pool.map(time.sleep, [0.05] * (4 * num_processes), chunksize=1)
    pool_start = time.perf_counter() - t_pool
    try:
        for cfg in configurations:
            if cfg not in plans["configurations"]:
                continue
            cm = pm.get_configuration(cfg)
            stock = os.path.join(base, cm.data_identifier)
            if not os.path.isdir(stock):
                raise NNXError(f"nnU-Net's preprocessed data for {cfg} not found (run nnx_plan without "
                               f"--no-preprocess first)", stock)
            labeled = sorted(f[:-5] for f in os.listdir(stock) if f.endswith(".b2nd") and not f.endswith("_seg.b2nd"))
            final = extras_folder(stock)
            tmp = final + f".tmp-{os.getpid()}"
            tmp_folders.append(tmp)
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
            common = {"plans": plans, "configuration": cfg, "dataset_json": dj}
            manifest = {"format_version": MANIFEST_VERSION, "configuration": cfg, "plans_identifier": plans_identifier,
                        "signature": plans_signature(plans, cfg), "labeled_cases": labeled,
                        "tiers": spec.tiers, "entries": {}, "unlabeled": None,
                        "pool_start_seconds": pool_start if not reports else 0.0,
                        "num_processes": num_processes if use_pool else 1}
            # 1. unlabeled cases: images only, nnU-Net's own run_case (crop/normalise/resample), no seg anywhere
            unl_cases = spec.unlabeled_cases
            unl_root = os.path.join(raw, spec.unlabeled_folder or "imagesUnlabeledTr")
            if unl_cases:
                os.makedirs(os.path.join(tmp, UNLABELED))
                jobs = [dict(common, kind=UNLABELED, case=c, out=os.path.join(tmp, UNLABELED, c),
                             files=[os.path.join(unl_root, f"{c}_{i:04d}{fe}") for i in range(n_ch)])
                        for c in unl_cases]
                t0 = time.perf_counter()
                res = _run_all(jobs, pool)
                manifest["unlabeled"] = {"cases": unl_cases, "seconds": time.perf_counter() - t0,
                                         "cpu_seconds": sum(r["seconds"] for r in res)}
            # 2. entries, for labeled and unlabeled cases that have the raw file(s)
            for name, entry in spec.entries.items():
                if entry.train_folder is None:
                    continue
                jobs = []
                for case in labeled + unl_cases:
                    files = entry.train_files(raw, case, fe)
                    if not files or not all(os.path.isfile(f) for f in files):
                        continue
                    src = stock if case in labeled else os.path.join(tmp, UNLABELED)
                    jobs.append(dict(common, kind="entry", case=case, files=files, entry=name,
                                     entry_kind=entry.kind, ignore_value=entry.ignore_value,
                                     channel_names=entry.channel_names,
                                     class_locations=name in ("coarse", "scribbles"),
                                     props_file=os.path.join(src, case + ".pkl"),
                                     data_file=os.path.join(src, case), out=os.path.join(tmp, name, case)))
                if not jobs:
                    continue
                os.makedirs(os.path.join(tmp, name))
                t0 = time.perf_counter()
                intensity = _train_only_intensity(entry, raw, labeled, spec, rw, fe) if entry.kind == "image" else {}
                for j in jobs:
                    j["intensity"] = intensity
                res = _run_all(jobs, pool)
                info = {"kind": entry.kind, "cases": [r["case"] for r in res],
                        "seconds": time.perf_counter() - t0, "cpu_seconds": sum(r["seconds"] for r in res)}
                if entry.kind == "image":
                    info["intensity_properties"] = intensity
                    info["channel_names"] = entry.channel_names
                else:
                    info["labels"] = entry.labels
                if entry.ignore_value is not None:
                    info["ignore_value"] = entry.ignore_value
                    info["voxels_before"] = _sum_counts(r["before"] for r in res)
                    info["voxels_after"] = _sum_counts(r["after"] for r in res)
                    info["cases_losing_a_class"] = [r["case"] for r in res
                                                    if set(r["before"]) - set(r["after"])]
                manifest["entries"][name] = info
            # 3. what nnU-Net itself kept of the scribble-tier labels (stock seg resampling)
            scr = spec.cases_of("scribble")
            if scr and "ignore" in dj["labels"]:
                manifest["stock_scribble_tier"] = _stock_scribble_counts(raw, stock, scr, fe, rw,
                                                                         int(dj["labels"]["ignore"]))
            if stock_seconds and cfg in stock_seconds:
                manifest["stock_seconds"] = stock_seconds[cfg]
            with open(os.path.join(tmp, MANIFEST), "w") as f:
                json.dump(manifest, f, indent=1, default=_json_default)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            reports[cfg] = manifest
            if verbose:
                print(format_report(manifest))
    finally:
        if pool is not None:
            pool.close()
            pool.join()
        for leftover in tmp_folders:
            shutil.rmtree(leftover, ignore_errors=True)
    return reports


def _sum_counts(dicts) -> Dict[str, int]:
    out: Dict[str, int] = {}
    for d in dicts:
        for k, v in d.items():
            out[str(k)] = out.get(str(k), 0) + int(v)
    return dict(sorted(out.items(), key=lambda kv: int(kv[0])))


def _stock_scribble_counts(raw, stock, cases, fe, rw, ignore) -> dict:
    before, after = [], []
    for c in cases:
        seg, _ = rw.read_seg(os.path.join(raw, "labelsTr", c + fe))
        before.append(count_labels(seg, ignore))
        after.append(count_labels(np.asarray(open_array(os.path.join(stock, c + "_seg"))[:]), ignore))
    return {"cases": list(cases), "voxels_before": _sum_counts(before), "voxels_after": _sum_counts(after),
            "cases_losing_a_class": [c for c, b, a in zip(cases, before, after) if set(b) - set(a)]}


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o))


def format_report(m: dict) -> str:
    """Human-readable summary of one manifest (printed by nnx_plan)."""
    lines = [f"nnx extras ({m['configuration']}, {m['signature']['data_identifier']}):"]
    stock = m.get("stock_seconds")
    head = f"  {'entry':<12} {'kind':<6} {'cases':>5} {'wall s':>7}" + (f" {'vs stock':>9}" if stock else "")
    lines.append(head)
    rows = []
    if m.get("unlabeled"):
        rows.append(("unlabeled", "image", len(m["unlabeled"]["cases"]), m["unlabeled"]["seconds"]))
    for n, e in m["entries"].items():
        rows.append((n, e["kind"], len(e["cases"]), e["seconds"]))
    for n, k, c, s in rows:
        lines.append(f"  {n:<12} {k:<6} {c:>5} {s:>7.2f}" + (f" {1 + s / stock:>8.2f}x" if stock else ""))
    for n, e in m["entries"].items():
        if "voxels_before" in e:
            lines.append(f"  {n}: annotated voxels per class before {e['voxels_before']} after {e['voxels_after']}"
                         f"; cases losing a class: {len(e['cases_losing_a_class'])}")
    if m.get("stock_scribble_tier"):
        s = m["stock_scribble_tier"]
        lines.append(f"  scribble-tier labels as nnU-Net preprocessed them: before {s['voxels_before']} "
                     f"after {s['voxels_after']}; cases losing a class: {len(s['cases_losing_a_class'])}")
    return "\n".join(lines)
