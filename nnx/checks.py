"""Fast, clear input validation used by every ``nnx_*`` command before anything is written.

Every failure raises :class:`nnx.errors.NNXError` whose ``str()`` is one line ``"<path>: <problem>"``.

Public functions
----------------
* :func:`require_env` -- ``nnUNet_raw`` / ``nnUNet_preprocessed`` / ``nnUNet_results`` are set.
* :func:`resolve_dataset` -- id or name -> ``DatasetXXX_Name`` (searches the nnU-Net folders).
* :func:`load_dataset_json` -- ``dataset.json`` keys, labels, ``numTraining``.
* :func:`check_raw_dataset` -- a whole raw dataset (``imagesTr``/``labelsTr`` or the ``"dataset"`` key).
* :func:`check_nnx_block` -- the ``"nnx"`` block of dataset.json: annotation tiers and auxiliary inputs
  (contract: docs/dataset_format.md); :func:`check_raw_dataset` runs it when the block is present.
* :func:`check_image_folder` -- an inference input folder.
* :func:`check_prediction_folder` -- predictions vs references for evaluation.
* :func:`read_image` / :func:`read_geometry` -- the single place where image files are read.

Geometry is always reported in ITK order: ``shape`` is the ITK size ``(x, y, z)`` (``array.shape[::-1]`` for
scalar images), ``spacing`` / ``origin`` are ``(x, y, z)`` in mm (LPS), ``direction`` is the row-major direction
matrix. Arrays are returned in SimpleITK/numpy order ``(z, y, x)``, like nnU-Net's ``SimpleITKIO``.

Tolerances (nnU-Net compares spacing with ``np.allclose`` and only *warns* on origin/direction; nnx rejects all
four, with tolerances that absorb float32 header rounding): spacing ``rtol=1e-5, atol=1e-6``; origin
``rtol=1e-5, atol=1e-3 * min(spacing)``; direction ``atol=1e-4``.

Reading: geometry always comes from SimpleITK's header parsing (what nnU-Net's ``SimpleITKIO`` sees). NIfTI voxels
are read with nibabel because ITK's NIfTI reader silently turns NaN/inf into 0 and zero-fills truncated files; other
formats are read with SimpleITK. NIfTI files that ITK refuses (non-orthonormal direction) fall back to nibabel
geometry, as nnU-Net falls back to ``NibabelIO``. Only numpy is imported at module import; SimpleITK and nibabel
are imported on first read so that ``nnx_* --help`` stays fast.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import re
import time
from collections import namedtuple
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from nnx.errors import NNXError

__all__ = [
    "Geometry",
    "require_env",
    "resolve_dataset",
    "load_dataset_json",
    "declared_labels",
    "check_raw_dataset",
    "check_nnx_block",
    "check_image_folder",
    "check_prediction_folder",
    "read_image",
    "read_geometry",
]

Geometry = namedtuple("Geometry", ["shape", "spacing", "origin", "direction"])
Geometry.__doc__ = "Image geometry in ITK order: shape=(x, y, z) size, spacing, origin, row-major direction."

ENV_VARS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
_WHERE = {"raw": "nnUNet_raw", "preprocessed": "nnUNet_preprocessed", "results": "nnUNet_results"}
_REQUIRED_KEYS = ("labels", "numTraining", "file_ending")  # plus channel_names (or legacy modality)
_CASE_RE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
_DATASET_NAME_RE = re.compile(r"^Dataset(?P<id>\d{3})_(?P<name>[^/\\]+)$")
_MAX_LIST = 10


# ----------------------------------------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------------------------------------
def _one_line(text: Any, limit: int = 200) -> str:
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _fmt_list(items: Sequence[Any], limit: int = _MAX_LIST) -> str:
    items = list(items)
    s = ", ".join(str(i) for i in items[:limit])
    if len(items) > limit:
        s += f", ... ({len(items) - limit} more)"
    return s


def _fmt_set(values: Iterable[int]) -> str:
    return "{" + ", ".join(str(int(v)) for v in sorted(values)) + "}"


def _fmt_tuple(values: Sequence[Any]) -> str:
    out = []
    for v in values:
        if isinstance(v, (int, np.integer)):
            out.append(str(int(v)))
        else:
            f = float(f"{float(v):.6g}") + 0.0  # no "-0.0"
            out.append(repr(f))
    return "(" + ", ".join(out) + (",)" if len(out) == 1 else ")")


def _more(items: Sequence[Any], what: str) -> str:
    """`` (N more: a, b, ...)`` for the items after the first one that is reported, else ``""``."""
    if len(items) <= 1:
        return ""
    return f" ({len(items) - 1} {what}: {_fmt_list(items[1:], 5)})"


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _visible_files(folder: str) -> List[str]:
    """Sorted names of the non-hidden regular files in ``folder``."""
    try:
        with os.scandir(folder) as it:
            return sorted(e.name for e in it if not e.name.startswith(".") and e.is_file())
    except OSError as e:
        raise NNXError(f"cannot list folder ({e.strerror or e})", folder) from None


# ----------------------------------------------------------------------------------------------------------------------
# 1. environment
# ----------------------------------------------------------------------------------------------------------------------
def require_env(*names: str) -> Dict[str, str]:
    """Check that the requested nnU-Net environment variables are set and non-empty.

    ``names`` are ``nnUNet_raw`` / ``nnUNet_preprocessed`` / ``nnUNet_results`` (or the short forms ``raw``,
    ``preprocessed``, ``results``); none given = all three. Returns ``{env_var_name: value}`` keyed by the full
    variable name. The folders themselves are not required to exist.
    """
    wanted = []
    for n in names or ENV_VARS:
        full = _WHERE.get(n, n)
        if full not in ENV_VARS:
            raise ValueError(f"unknown nnU-Net environment variable {n!r}; expected one of {', '.join(ENV_VARS)}")
        if full not in wanted:
            wanted.append(full)
    missing = [n for n in wanted if not os.environ.get(n, "").strip()]
    if missing:
        how = "; ".join(f"export {n}=/path/to/{n}" for n in missing)
        s = "s" if len(missing) > 1 else ""
        raise NNXError(f"environment variable{s} {', '.join(missing)} not set (or empty); set {'them' if s else 'it'}"
                       f" before running nnx, e.g. {how}")
    return {n: os.environ[n] for n in wanted}


# ----------------------------------------------------------------------------------------------------------------------
# 2. dataset name / id
# ----------------------------------------------------------------------------------------------------------------------
def _parse_dataset_arg(dataset: Union[str, int]) -> Tuple[Optional[int], Optional[str]]:
    hint = "expected a dataset id (e.g. 4 or 004) or a name like Dataset004_Name"
    if isinstance(dataset, bool):
        raise NNXError(f"malformed dataset {dataset!r}: {hint}")
    if _is_int(dataset):
        if not 0 <= int(dataset) <= 999:
            raise NNXError(f"malformed dataset id {int(dataset)}: dataset ids have at most 3 digits (0-999)")
        return int(dataset), None
    if not isinstance(dataset, str):
        raise NNXError(f"malformed dataset {dataset!r}: {hint}")
    s = dataset.strip().rstrip("/\\")
    if re.fullmatch(r"\d{1,3}", s):
        return int(s), None
    if _DATASET_NAME_RE.fullmatch(s):
        return None, s
    if re.fullmatch(r"\d+", s):
        raise NNXError(f"malformed dataset id {s!r}: dataset ids have at most 3 digits (0-999)")
    raise NNXError(f"malformed dataset {dataset!r}: {hint}")


def resolve_dataset(dataset: Union[str, int], where: Union[str, Sequence[str]] = ("raw", "preprocessed", "results")
                    ) -> str:
    """Return the dataset name ``DatasetXXX_Name`` for an id (``4``, ``"4"``, ``"004"``) or a name.

    Searches the folders of the env vars in ``where`` (``raw``/``preprocessed``/``results`` or full env var names)
    that are set; the dataset must exist in at least one of them. Errors: malformed input, no env var set, not
    found (lists up to 10 available names), ambiguous id (several names share the id).
    """
    ds_id, ds_name = _parse_dataset_arg(dataset)
    if isinstance(where, str):
        where = (where,)
    env_names = []
    for w in where:
        full = _WHERE.get(w, w)
        if full not in ENV_VARS:
            raise ValueError(f"unknown location {w!r}; expected raw, preprocessed or results")
        if full not in env_names:
            env_names.append(full)
    set_vars = {n: os.environ[n] for n in env_names if os.environ.get(n, "").strip()}
    if not set_vars:
        require_env(*env_names)  # raises with the export hint

    found: Dict[str, List[str]] = {}  # dataset name -> env vars where it exists
    searched = []
    for n, folder in set_vars.items():
        searched.append(f"{n}={folder}")
        if not os.path.isdir(folder):
            continue
        try:
            entries = os.listdir(folder)
        except OSError:
            continue
        for e in entries:
            if _DATASET_NAME_RE.fullmatch(e) and os.path.isdir(os.path.join(folder, e)):
                found.setdefault(e, []).append(n)
    unset = [n for n in env_names if n not in set_vars]
    where_txt = ", ".join(searched) + (f" ({', '.join(unset)} not set)" if unset else "")
    available = sorted(found)
    avail_txt = f"available: {_fmt_list(available)}" if available else "no DatasetXXX_Name folders there"

    if ds_name is not None:
        if ds_name in found:
            return ds_name
        same_id = [a for a in available if a.startswith(ds_name[:11])]
        extra = f"; did you mean {', '.join(same_id)}?" if same_id else ""
        raise NNXError(f"dataset {ds_name} not found in {where_txt}{extra} ({avail_txt})")

    prefix = f"Dataset{ds_id:03d}_"
    candidates = [a for a in available if a.startswith(prefix)]
    if not candidates:
        raise NNXError(f"dataset id {ds_id} ({prefix}*) not found in {where_txt} ({avail_txt})")
    if len(candidates) > 1:
        detail = "; ".join(f"{c} in {', '.join(found[c])}" for c in candidates)
        raise NNXError(f"dataset id {ds_id} is ambiguous: several dataset names use it ({detail}); rename or remove "
                       f"all but one, or pass the full name")
    return candidates[0]


# ----------------------------------------------------------------------------------------------------------------------
# 3. dataset.json
# ----------------------------------------------------------------------------------------------------------------------
def declared_labels(labels: Union[Mapping[str, Any], Iterable[int], None], include_ignore: bool = True
                    ) -> Optional[List[int]]:
    """Sorted label values that may appear in a label file.

    ``labels`` is a dataset.json ``labels`` dict (region lists are flattened; the ``ignore`` value is included
    when ``include_ignore``) or an iterable of ints; ``None`` -> ``None`` (no restriction).
    """
    if labels is None:
        return None
    if isinstance(labels, Mapping):
        vals = set()
        for k, v in labels.items():
            if k == "ignore" and not include_ignore:
                continue
            if isinstance(v, (list, tuple)):
                vals.update(int(i) for i in v)
            else:
                vals.add(int(v))
        return sorted(vals)
    return sorted({int(v) for v in labels})


def _validate_labels(labels: Any, dj: Mapping[str, Any], path: str) -> None:
    if not isinstance(labels, Mapping) or not labels:
        raise NNXError(f"'labels' must be a non-empty object mapping names to integer values, got {labels!r}", path)
    if "background" not in labels:
        raise NNXError(f"'labels' must declare \"background\": 0 (got keys {_fmt_list(list(labels))})", path)
    bg = labels["background"]
    if not _is_int(bg) or int(bg) != 0:
        raise NNXError(f"'labels' background must be the integer 0, got {bg!r}", path)
    has_regions = False
    for name, v in labels.items():
        if isinstance(v, (list, tuple)):
            if name == "ignore":
                raise NNXError(f"'labels' ignore must be an integer, not a region {v!r}", path)
            if not v or not all(_is_int(i) for i in v):
                raise NNXError(f"'labels' region {name!r} must be a non-empty list of integers, got {v!r}", path)
            if any(int(i) < 0 for i in v):
                raise NNXError(f"'labels' region {name!r} has negative values {list(v)}", path)
            has_regions = has_regions or len(v) > 1
        elif not _is_int(v):
            raise NNXError(f"'labels' value of {name!r} must be an integer (or a list for regions), got {v!r}", path)
        elif int(v) < 0:
            raise NNXError(f"'labels' value of {name!r} is negative ({v})", path)
    values = declared_labels(labels, include_ignore=False)
    expected = list(range(max(values) + 1))
    if values != expected:
        missing = sorted(set(expected) - set(values))
        raise NNXError(f"'labels' values must be consecutive integers starting at 0 (background); declared "
                       f"{_fmt_set(values)}, missing {missing}", path)
    if "ignore" in labels:
        ign = int(labels["ignore"])
        if ign != max(values) + 1:
            raise NNXError(f"'labels' ignore must be the highest value, max(labels) + 1 = {max(values) + 1}, got {ign}",
                           path)
    if has_regions:
        rco = dj.get("regions_class_order")
        if rco is None:
            raise NNXError("'labels' uses regions (list values) but 'regions_class_order' is missing", path)
        n_regions = sum(1 for k, v in labels.items()
                        if k != "ignore" and not (
                            (isinstance(v, (list, tuple)) and set(int(i) for i in v) == {0}) or
                            (not isinstance(v, (list, tuple)) and int(v) == 0)))
        if not isinstance(rco, (list, tuple)) or not all(_is_int(i) for i in rco):
            raise NNXError(f"'regions_class_order' must be a list of integers, got {rco!r}", path)
        if len(rco) != n_regions:
            raise NNXError(f"'regions_class_order' has {len(rco)} entries but 'labels' declares {n_regions} "
                           f"non-background regions", path)


def _channel_names(dj: Mapping[str, Any], path: str) -> Dict[str, str]:
    key = "channel_names" if "channel_names" in dj else "modality"
    ch = dj[key]
    if not isinstance(ch, Mapping) or not ch:
        raise NNXError(f"'{key}' must be a non-empty object like {{\"0\": \"CT\"}}, got {ch!r}", path)
    keys = list(ch.keys())
    try:
        idx = sorted(int(k) for k in keys)
    except (TypeError, ValueError):
        idx = None
    if idx != list(range(len(keys))):
        raise NNXError(f"'{key}' keys must be the channel indices \"0\", \"1\", ... (consecutive), got "
                       f"{_fmt_list(keys)}", path)
    return {str(k): v for k, v in ch.items()}


def _json_path(folder: str) -> Tuple[str, str]:
    folder = os.fspath(folder)
    if os.path.basename(folder).endswith(".json") and not os.path.isdir(folder):
        return os.path.dirname(folder) or ".", folder
    return folder, os.path.join(folder, "dataset.json")


def load_dataset_json(folder: str, check_num_training: Optional[bool] = None) -> dict:
    """Load and validate ``<folder>/dataset.json`` (``folder`` may also be the json file itself).

    Checks: file exists, valid JSON (line/column on error), required keys (``channel_names`` or legacy
    ``modality``, ``labels``, ``numTraining``, ``file_ending``), ``labels`` (background 0, consecutive integers,
    regions need ``regions_class_order``, ``ignore`` = max + 1), ``numTraining`` = number of training cases.
    The case count is checked when ``check_num_training`` is True, or by default when the dataset has a
    ``"dataset"`` key or an ``imagesTr`` folder (raw datasets; preprocessed/results copies are not counted).
    Extra keys (e.g. the ``"nnx"`` block) are kept untouched.
    """
    folder, path = _json_path(folder)
    if not os.path.isfile(path):
        where = "folder does not exist" if not os.path.isdir(folder) else "file not found"
        raise NNXError(f"dataset.json missing ({where})", path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
        dj = json.loads(raw.decode("utf-8-sig"))
    except json.JSONDecodeError as e:
        raise NNXError(f"invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}", path) from None
    except UnicodeDecodeError as e:
        raise NNXError(f"invalid JSON: not UTF-8 text ({e.reason} at byte {e.start})", path) from None
    except OSError as e:
        raise NNXError(f"cannot read dataset.json ({e.strerror or e})", path) from None
    if not isinstance(dj, dict):
        raise NNXError(f"dataset.json must contain a JSON object, got {type(dj).__name__}", path)

    missing = [k for k in _REQUIRED_KEYS if k not in dj]
    if "channel_names" not in dj and "modality" not in dj:
        missing.insert(0, "channel_names")
    if missing:
        raise NNXError(f"missing required key{'s' if len(missing) > 1 else ''} {', '.join(repr(m) for m in missing)} "
                       f"(required: 'channel_names', 'labels', 'numTraining', 'file_ending')", path)
    _channel_names(dj, path)
    fe = dj["file_ending"]
    if not isinstance(fe, str) or not fe.startswith(".") or len(fe) < 2:
        raise NNXError(f"'file_ending' must be a string like \".nii.gz\", got {fe!r}", path)
    nt = dj["numTraining"]
    if not _is_int(nt) or nt < 0:
        raise NNXError(f"'numTraining' must be a non-negative integer, got {nt!r}", path)
    _validate_labels(dj["labels"], dj, path)
    if "dataset" in dj and not isinstance(dj["dataset"], Mapping):
        raise NNXError("'dataset' must be an object mapping case ids to {\"images\": [...], \"label\": ...}", path)

    if check_num_training is None:
        check_num_training = "dataset" in dj or os.path.isdir(os.path.join(folder, "imagesTr"))
    if check_num_training:
        if "dataset" in dj:
            n, where = len(dj["dataset"]), "the 'dataset' key lists"
            ids = list(dj["dataset"])
        else:
            cases = _scan_image_folder(os.path.join(folder, "imagesTr"), fe, len(_channel_names(dj, path)),
                                       "imagesTr", require_all_channels=False)
            ids = list(cases)
            n, where = len(ids), "imagesTr has"
        if n != nt:
            raise NNXError(f"numTraining is {nt} but {where} {n} case{'s' if n != 1 else ''}"
                           f"{' (' + _fmt_list(ids, 5) + ')' if ids else ''}", path)
    return dj


# ----------------------------------------------------------------------------------------------------------------------
# folder scanning (nnU-Net naming CASE_XXXX<ending>)
# ----------------------------------------------------------------------------------------------------------------------
def _scan_image_folder(folder: str, file_ending: str, n_channels: int, what: str,
                       require_all_channels: bool = True) -> Dict[str, List[str]]:
    """``{case: [path of channel 0, 1, ...]}`` (sorted by case). Strict about names, endings and channels."""
    if not os.path.isdir(folder):
        raise NNXError(f"{what} folder not found" if not os.path.exists(folder) else f"{what} is not a folder", folder)
    names = _visible_files(folder)
    wrong = [n for n in names if not n.endswith(file_ending)]
    if wrong:
        raise NNXError(f"file does not end with file_ending {file_ending!r} from dataset.json"
                       f"{_more(wrong, 'more such files')}", os.path.join(folder, wrong[0]))
    cases: Dict[str, Dict[int, str]] = {}
    for n in names:
        m = _CASE_RE.fullmatch(n[: -len(file_ending)])
        if m is None:
            raise NNXError(f"file name does not follow nnU-Net naming CASE_XXXX{file_ending} (XXXX = 4-digit channel "
                           f"index, e.g. case_001_0000{file_ending})", os.path.join(folder, n))
        ch = int(m.group("channel"))
        if ch >= n_channels:
            allowed = "_0000" + (f"-_{n_channels - 1:04d}" if n_channels > 1 else "")
            raise NNXError(f"unexpected channel {ch:04d}: dataset.json declares {n_channels} channel"
                           f"{'s' if n_channels != 1 else ''} ({allowed})", os.path.join(folder, n))
        cases.setdefault(m.group("case"), {})[ch] = os.path.join(folder, n)
    out = {}
    for case in sorted(cases):
        chans = cases[case]
        if require_all_channels:
            for c in range(n_channels):
                if c not in chans:
                    raise NNXError(f"missing channel file (case {case!r} has channel"
                                   f"{'s' if len(chans) > 1 else ''} {', '.join('%04d' % i for i in sorted(chans))}, "
                                   f"dataset.json declares {n_channels})",
                                   os.path.join(folder, f"{case}_{c:04d}{file_ending}"))
        out[case] = [chans[c] for c in sorted(chans)]
    return out


# ----------------------------------------------------------------------------------------------------------------------
# 7. reading (the single place where image files are opened)
# ----------------------------------------------------------------------------------------------------------------------
# Why NIfTI voxels are read with nibabel: ITK's NIfTI reader (niftilib) silently replaces NaN/inf float voxels with 0
# and zero-fills truncated files (.nii and .nii.gz), so neither problem would be visible through SimpleITK. Geometry
# still comes from ITK's header parsing (ReadImageInformation), i.e. exactly what nnU-Net's SimpleITKIO sees.
# nibabel reads the whole gzip stream and raises on truncation. Other formats (nrrd, mha, png, tif, ...) are read
# with SimpleITK, which raises on truncated data and keeps NaN.
_NIFTI_ENDINGS = (".nii", ".nii.gz")


def _sitk_reason(exc: BaseException, path: str) -> str:
    text = str(exc).replace(path, os.path.basename(path))
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    cleaned = []
    for ln in lines:
        if ln.startswith("Exception thrown in SimpleITK"):
            continue
        ln = re.sub(r"^(sitk::)?ERROR:\s*", "", ln)
        ln = re.sub(r"^ITK ERROR:\s*\w+\(0x[0-9a-fA-F]+\):\s*", "", ln)
        ln = re.sub(r"^\[\w+\]\s*", "", ln)
        if not ln or ln.endswith(":"):
            continue
        if ln.startswith("Reason:") and os.path.isfile(path):  # stale errno text from MetaImageIO
            continue
        cleaned.append(ln)
    reason = "; ".join(cleaned[-2:]) if cleaned else type(exc).__name__
    return _one_line(reason, 160)


def _unreadable(path: str, reason: str) -> NNXError:
    return NNXError(f"unreadable or truncated image file ({reason})", path)


def _nib_load(path: str):
    import nibabel as nib
    try:
        return nib.load(path, mmap=False)
    except Exception as e:  # nibabel ImageFileError, gzip/zlib/EOF errors, OSError
        raise _unreadable(path, f"{type(e).__name__}: {_one_line(e, 120)}") from None


def _nifti_geometry_nibabel(img) -> Geometry:
    """Geometry from the nibabel affine (RAS -> LPS), for files ITK refuses (non-orthonormal direction)."""
    aff = np.asarray(img.affine, dtype=np.float64)
    lps = np.diag([-1.0, -1.0, 1.0]) @ aff[:3, :4]
    m = lps[:, :3]
    spacing = np.sqrt((m ** 2).sum(0))
    spacing[spacing == 0] = 1.0
    direction = m / spacing
    shape = tuple(int(i) for i in img.shape)
    nd = min(len(shape), 3)
    return Geometry(shape, tuple(float(x) for x in spacing[:nd]) + (1.0,) * (len(shape) - nd),
                    tuple(float(x) for x in lps[:nd, 3]) + (0.0,) * (len(shape) - nd),
                    tuple(float(x) for x in direction[:nd, :nd].ravel()))


def _nifti_voxels(path: str, img) -> np.ndarray:
    """Voxels in (z, y, x) order with NIfTI scaling applied (float32 when scaled); raises on truncation."""
    try:
        proxy = img.dataobj
        raw = np.asarray(proxy.get_unscaled()) if hasattr(proxy, "get_unscaled") else np.asanyarray(proxy)
        slope = float(getattr(proxy, "slope", 1.0))
        inter = float(getattr(proxy, "inter", 0.0))
    except Exception as e:  # EOFError (truncated gzip), OSError ("Expected N bytes"), zlib.error
        raise _unreadable(path, f"{type(e).__name__}: {_one_line(e, 120)}") from None
    if np.isfinite(slope) and np.isfinite(inter) and (slope != 1.0 or inter != 0.0) and slope != 0.0:
        raw = raw.astype(np.float32) * np.float32(slope) + np.float32(inter)
    return raw.T


def _read(path: str, header_only: bool) -> Tuple[Optional[np.ndarray], Geometry]:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise NNXError("image file not found" if not os.path.exists(path) else "not a regular file", path)
    if os.path.getsize(path) == 0:
        raise _unreadable(path, "empty file")
    import SimpleITK as sitk
    is_nifti = path.lower().endswith(_NIFTI_ENDINGS)
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    nib_img = None
    try:
        reader.ReadImageInformation()
        geom = Geometry(tuple(int(i) for i in reader.GetSize()), tuple(float(i) for i in reader.GetSpacing()),
                        tuple(float(i) for i in reader.GetOrigin()), tuple(float(i) for i in reader.GetDirection()))
    except Exception as e:  # SimpleITK raises RuntimeError with a multi-line ITK message
        if not (is_nifti and "orthonormal" in str(e)):
            raise _unreadable(path, _sitk_reason(e, path)) from None
        nib_img = _nib_load(path)  # nnU-Net would fall back to NibabelIO for such files
        geom = _nifti_geometry_nibabel(nib_img)
    if header_only:
        return None, geom
    if is_nifti:
        nib_img = nib_img if nib_img is not None else _nib_load(path)
        arr = _nifti_voxels(path, nib_img)
        expected = tuple(geom.shape[::-1])
        if arr.shape == expected:
            return arr, geom
        if reader.GetNumberOfComponents() == 1 and arr.size == int(np.prod(expected)):
            return arr.reshape(expected), geom
        # unusual layouts (e.g. 5D vector NIfTI): fall through to ITK's array layout
    try:
        img = reader.Execute()
    except Exception as e:
        raise _unreadable(path, _sitk_reason(e, path)) from None
    return sitk.GetArrayFromImage(img), geom


def read_image(path: str) -> Tuple[np.ndarray, Geometry]:
    """Read an image/label file -> ``(array in (z, y, x) order, Geometry in ITK order)``.

    Raises ``NNXError`` (one line naming the file) for missing, unreadable, corrupt or truncated files. NIfTI
    voxels come from nibabel (ITK hides NaN/inf and truncation in NIfTI), so the array may be a transposed view.
    """
    return _read(path, header_only=False)


def read_geometry(path: str) -> Geometry:
    """Geometry from the file header only (fast; does not detect truncated voxel data)."""
    return _read(path, header_only=True)[1]


# ----------------------------------------------------------------------------------------------------------------------
# per-file value checks and geometry comparison
# ----------------------------------------------------------------------------------------------------------------------
def _geometry_difference(g: Geometry, ref: Geometry) -> Optional[Tuple[str, tuple, tuple]]:
    """First of shape/spacing/origin/direction that differs (field, value, reference value), else None."""
    if tuple(g.shape) != tuple(ref.shape):
        return "shape", g.shape, ref.shape
    if len(g.spacing) != len(ref.spacing) or not np.allclose(g.spacing, ref.spacing, rtol=1e-5, atol=1e-6):
        return "spacing", g.spacing, ref.spacing
    atol = 1e-3 * float(min(min(np.abs(ref.spacing)), 1.0)) if len(ref.spacing) else 1e-3
    if len(g.origin) != len(ref.origin) or not np.allclose(g.origin, ref.origin, rtol=1e-5, atol=max(atol, 1e-6)):
        return "origin", g.origin, ref.origin
    if len(g.direction) != len(ref.direction) or not np.allclose(g.direction, ref.direction, rtol=0, atol=1e-4):
        return "direction", g.direction, ref.direction
    return None


def _check_same_geometry(path: str, g: Geometry, ref_path: str, ref: Geometry, ref_role: str,
                         what: Optional[str] = None) -> None:
    diff = _geometry_difference(g, ref)
    if diff is not None:
        field, a, b = diff
        subject = f"{what} " if what else ""
        raise NNXError(f"{subject}{field} {_fmt_tuple(a)} != {ref_role} {field} {_fmt_tuple(b)} "
                       f"({os.path.basename(ref_path)})", path)


def _check_finite(path: str, arr: np.ndarray, what: str = "image") -> None:
    if arr.dtype.kind not in "fc":
        return
    finite = np.isfinite(arr)
    if finite.all():
        return
    n_nan = int(np.count_nonzero(np.isnan(arr)))
    n_inf = int(finite.size - np.count_nonzero(finite) - n_nan)
    parts = []
    if n_nan:
        parts.append(f"{n_nan} NaN voxel{'s' if n_nan != 1 else ''}")
    if n_inf:
        parts.append(f"{n_inf} inf voxel{'s' if n_inf != 1 else ''}")
    raise NNXError(f"{what} contains {' and '.join(parts)} (of {arr.size}); replace them with finite values", path)


def _label_values(path: str, arr: np.ndarray, role: str = "label") -> List[int]:
    """Sorted distinct values of an integer-valued label array (errors for non-integer / non-finite values)."""
    if arr.size == 0:
        return []
    kind = arr.dtype.kind
    if kind in "ui":
        mn, mx = int(arr.min()), int(arr.max())
        if mn >= 0 and mx < (1 << 16) and arr.dtype.itemsize <= 4:
            flat = arr.reshape(-1)
            counts = np.zeros(mx + 1, dtype=np.int64)
            step = 1 << 24
            for i in range(0, flat.size, step):
                counts += np.bincount(flat[i:i + step], minlength=mx + 1)
            return [int(v) for v in np.flatnonzero(counts)]
        return [int(v) for v in np.unique(arr)]
    if kind == "f":
        finite = np.isfinite(arr)
        if not finite.all():
            n = int(finite.size - np.count_nonzero(finite))
            raise NNXError(f"{role} file contains {n} NaN/inf voxel{'s' if n != 1 else ''}; {role}s must be integers",
                           path)
        frac = arr != np.round(arr)
        if frac.any():
            ex = float(arr[frac].flat[0])
            n = int(np.count_nonzero(frac))
            raise NNXError(f"{role} file has non-integer values ({n} voxel{'s' if n != 1 else ''}, e.g. {ex:.6g}); "
                           f"{role}s must be integer-valued", path)
        return [int(v) for v in np.unique(arr)]
    raise NNXError(f"{role} file has unsupported voxel type {arr.dtype} (multi-component or complex); {role}s must be "
                   f"single-component integer images", path)


def _check_group(job: dict) -> Tuple[str, Any]:
    """Check one case: ``job['files']`` = list of ``(path, kind, declared)`` or ``(path, kind, declared, opts)``
    with kind in image/label/prediction/reference.

    The first file is the geometry reference (role ``job['ref_role']``). ``opts`` (optional, used for the inputs of
    the ``nnx`` block) may hold: ``role`` (what the file is, used in messages, e.g. ``"coarse mask"``),
    ``declared_in`` (where ``declared`` comes from, e.g. ``"the task's labels"``), ``header`` (read the geometry
    only), ``collect`` (add the values to the job's ``label_values``; default: only files without a role) and
    ``checks``: ``(op, value, message)`` with op ``has`` (the value must occur), ``lacks`` (it must not; ``{n}``
    in the message becomes the voxel count) or ``has_other`` (some other value must occur). Returns
    ``("ok", info)`` or ``("error", (message, path))`` so that it can run in a spawn pool.
    """
    try:
        ref_path = ref_geom = None
        values: set = set()
        for spec in job["files"]:
            path, kind, declared = spec[:3]
            opts = spec[3] if len(spec) > 3 else {}
            role = opts.get("role")
            if job.get("header_only") or opts.get("header"):
                arr, geom = None, read_geometry(path)
            else:
                arr, geom = read_image(path)
            if ref_path is None:
                ref_path, ref_geom = path, geom
            else:
                _check_same_geometry(path, geom, ref_path, ref_geom, job.get("ref_role", "image"), what=role)
            if arr is None:
                continue
            if kind == "image":
                _check_finite(path, arr, role or "image")
            else:
                found = _label_values(path, arr, role=role or kind)
                if opts.get("collect", role is None):
                    values.update(found)
                for op, v, msg in opts.get("checks", ()):
                    if op == "has" and v not in found:
                        raise NNXError(msg, path)
                    if op == "lacks" and v in found:
                        n = int(np.count_nonzero(arr == v))
                        raise NNXError(msg.replace("{n}", f"{n} voxel{'s' if n != 1 else ''}"), path)
                    if op == "has_other" and not set(found) - {v}:
                        raise NNXError(msg, path)
                if declared is not None:
                    bad = sorted(set(found) - set(declared))
                    if bad:
                        if role:
                            raise NNXError(f"{role} values {bad} not declared in "
                                           f"{opts.get('declared_in', 'dataset.json labels')} {_fmt_set(declared)}",
                                           path)
                        raise NNXError(f"{kind} values {bad} not declared in dataset.json labels {_fmt_set(declared)}",
                                       path)
        return "ok", {"case": job.get("case"), "label_values": sorted(values),
                      "spacing": ref_geom.spacing if ref_geom else None,
                      "shape": ref_geom.shape if ref_geom else None}
    except NNXError as e:
        return "error", (e.message, e.path)


def _run_jobs(jobs: List[dict], num_processes: int) -> List[dict]:
    """Run ``_check_group`` over jobs (in order); raise the first error (in job order)."""
    results = []
    if num_processes is None or num_processes <= 1 or len(jobs) <= 1:
        for job in jobs:
            status, payload = _check_group(job)
            if status == "error":
                raise NNXError(*payload)
            results.append(payload)
        return results
    n = min(int(num_processes), len(jobs))
    with multiprocessing.get_context("spawn").Pool(n) as pool:
        for status, payload in pool.imap(_check_group, jobs, chunksize=max(1, len(jobs) // (4 * n))):
            if status == "error":
                raise NNXError(*payload)  # leaving the with-block terminates the pool
            results.append(payload)
    return results


# ----------------------------------------------------------------------------------------------------------------------
# 4. raw dataset
# ----------------------------------------------------------------------------------------------------------------------
def _resolve_dataset_key_path(folder: str, p: str) -> str:
    p = os.path.expandvars(p)
    return p if os.path.isabs(p) else os.path.abspath(os.path.join(folder, p))


def _training_cases(folder: str, dj: dict) -> Dict[str, Tuple[List[str], str]]:
    """``{case: ([channel files], label file)}`` with every file checked to exist."""
    fe = dj["file_ending"]
    json_path = os.path.join(folder, "dataset.json")
    n_ch = len(_channel_names(dj, json_path))
    out: Dict[str, Tuple[List[str], str]] = {}
    if "dataset" in dj:
        for case, entry in dj["dataset"].items():
            if not isinstance(entry, Mapping) or not isinstance(entry.get("images"), (list, tuple)) \
                    or not isinstance(entry.get("label"), str):
                raise NNXError(f"'dataset' entry {case!r} must be {{\"images\": [one path per channel], "
                               f"\"label\": path}}", json_path)
            if len(entry["images"]) != n_ch:
                raise NNXError(f"'dataset' entry {case!r} lists {len(entry['images'])} image(s) but dataset.json "
                               f"declares {n_ch} channel{'s' if n_ch != 1 else ''}", json_path)
            images = [_resolve_dataset_key_path(folder, p) for p in entry["images"]]
            label = _resolve_dataset_key_path(folder, entry["label"])
            for c, p in enumerate(images):
                if not os.path.isfile(p):
                    raise NNXError(f"missing channel file (channel {c} of case {case!r} in dataset.json 'dataset')", p)
            if not os.path.isfile(label):
                raise NNXError(f"missing label file (case {case!r} in dataset.json 'dataset')", label)
            out[case] = (images, label)
        return out

    images_tr = os.path.join(folder, "imagesTr")
    labels_tr = os.path.join(folder, "labelsTr")
    for d in (images_tr, labels_tr):
        if not os.path.isdir(d):
            raise NNXError(f"{os.path.basename(d)} folder not found (required unless dataset.json has a "
                           f"'dataset' key)", d)
    cases = _scan_image_folder(images_tr, fe, n_ch, "imagesTr")
    label_names = _visible_files(labels_tr)
    wrong = [n for n in label_names if not n.endswith(fe)]
    if wrong:
        raise NNXError(f"file does not end with file_ending {fe!r} from dataset.json{_more(wrong, 'more such files')}",
                       os.path.join(labels_tr, wrong[0]))
    label_cases = {n[: -len(fe)] for n in label_names}
    for case, files in cases.items():
        if case not in label_cases:
            raise NNXError(f"missing label file for case {case!r} (imagesTr has {os.path.basename(files[0])})",
                           os.path.join(labels_tr, case + fe))
        out[case] = (files, os.path.join(labels_tr, case + fe))
    orphans = sorted(label_cases - set(cases))
    if orphans:
        o = orphans[0]
        raise NNXError(f"label file has no image in imagesTr (expected {o}_0000{fe})"
                       f"{' (' + str(len(orphans) - 1) + ' more)' if len(orphans) > 1 else ''}",
                       os.path.join(labels_tr, o + fe))
    return out


def check_raw_dataset(folder: str, num_processes: int = 1, check_all_cases: bool = True) -> dict:
    """Validate a raw nnU-Net dataset folder; returns a summary dict.

    Checks dataset.json (:func:`load_dataset_json`), the case list (imagesTr/labelsTr naming, every channel and
    label file present, no stray files; or the ``"dataset"`` key), then per case: files readable and not truncated,
    channels and label share shape/spacing/origin/direction, label values integer and declared (incl. ignore),
    images free of NaN/inf. ``check_all_cases=False`` fully reads only the first case and checks the headers
    (geometry) of the others. ``num_processes > 1`` uses a spawn pool.

    Summary keys: ``folder``, ``dataset``, ``cases`` (count), ``case_ids``, ``channels``, ``channel_names``,
    ``file_ending``, ``labels`` (declared values incl. ignore), ``label_values_found``, ``fully_read_cases``,
    ``time`` (seconds); ``nnx`` (see :func:`check_nnx_block`) when dataset.json has an ``"nnx"`` block, whose
    files are checked in the same per-case jobs.
    """
    t0 = time.perf_counter()
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise NNXError("raw dataset folder not found", folder)
    dj = load_dataset_json(folder)
    channel_names = _channel_names(dj, os.path.join(folder, "dataset.json"))
    spec = _nnx_precheck(folder, dj) if "nnx" in dj else None
    cases = _training_cases(folder, dj)
    plan = _nnx_plan(folder, dj, spec, cases) if spec is not None else None
    declared = declared_labels(dj["labels"], include_ignore=True)
    jobs = []
    for i, (case, (images, label)) in enumerate(cases.items()):
        files = [(p, "image", None) for p in images] + [(label, "label", declared)]
        if plan is not None:  # the nnx inputs of the case join its job: every file is read once
            files[-1] = (label, "label", declared, plan["label_opts"].get(case, {}))
            files += plan["extra_files"].get(case, [])
        jobs.append({"case": case, "files": files, "ref_role": "image",
                     "header_only": not check_all_cases and i > 0})
    if plan is not None:  # unlabeled and test cases: jobs of their own (their images are the reference)
        for job in plan["jobs"]:
            jobs.append(dict(job, header_only=not check_all_cases and len(jobs) > 0))
    results = _run_jobs(jobs, num_processes)[:len(cases)]
    found = sorted(set().union(*[set(r["label_values"]) for r in results])) if results else []
    extra = {"nnx": plan["summary"]} if plan is not None else {}
    return {
        "folder": folder,
        "dataset": os.path.basename(os.path.normpath(folder)),
        "cases": len(cases),
        "case_ids": list(cases),
        "channels": len(channel_names),
        "channel_names": channel_names,
        "file_ending": dj["file_ending"],
        "labels": declared,
        "label_values_found": found,
        "fully_read_cases": len(cases) if check_all_cases else min(1, len(cases)),
        **extra,
        "time": time.perf_counter() - t0,
    }


# ----------------------------------------------------------------------------------------------------------------------
# 4b. the nnx block: annotation tiers and auxiliary inputs (contract: docs/dataset_format.md)
# ----------------------------------------------------------------------------------------------------------------------
def _nnx_precheck(folder: str, dj: dict):
    """Parse the ``nnx`` block and check what must be reported before the imagesTr/labelsTr pairing is: the
    declarations (scribble tier needs ``ignore``, scribbles ignore value) and that tier ``none`` cases are neither
    in imagesTr nor have a label file (else the generic pairing errors would hide the real problem)."""
    from nnx.tiers import DatasetSpec
    json_path = os.path.join(folder, "dataset.json")
    spec = DatasetSpec.from_dataset_json(dj, json_path)
    fe = dj["file_ending"]
    labels = dj["labels"]
    scribble_cases = spec.cases_of("scribble")
    if scribble_cases and "ignore" not in labels:
        n = len(scribble_cases)
        raise NNXError(f"nnx.tiers has {n} scribble-tier case{'s' if n != 1 else ''} "
                       f"({_fmt_list(scribble_cases, 3)}) but 'labels' declares no \"ignore\" value (scribble labels "
                       f"mark every unannotated voxel with it; nnU-Net's rule: ignore = max label + 1)", json_path)
    sc = spec.entries.get("scribbles")
    if sc is not None:
        if "ignore" in labels and sc.ignore_value != int(labels["ignore"]):
            raise NNXError(f"nnx.scribbles.ignore_value is {sc.ignore_value} but 'labels' ignore is "
                           f"{int(labels['ignore'])}; they must be equal", json_path)
        if sc.ignore_value in declared_labels(labels, include_ignore=False):
            raise NNXError(f"nnx.scribbles.ignore_value {sc.ignore_value} is also a task label value; the ignore "
                           f"value must differ from every label (nnU-Net's rule: max label + 1)", json_path)
    none_cases = set(spec.unlabeled_cases)
    unl = spec.unlabeled_folder or "imagesUnlabeledTr"
    images_tr = os.path.join(folder, "imagesTr")
    if none_cases and "dataset" not in dj and os.path.isdir(images_tr):
        for n in _visible_files(images_tr):
            m = _CASE_RE.fullmatch(n[: -len(fe)]) if n.endswith(fe) else None
            if m is not None and m.group("case") in none_cases:
                raise NNXError(f"imagesTr case {m.group('case')!r} is tier none (unlabeled) in nnx.tiers; the images "
                               f"of tier none cases belong in {unl}, not imagesTr", os.path.join(images_tr, n))
    labels_tr = os.path.join(folder, "labelsTr")
    if none_cases and os.path.isdir(labels_tr):
        present = set(_visible_files(labels_tr))
        bad = [c for c in sorted(none_cases) if c + fe in present]
        if bad:
            raise NNXError(f"unlabeled (tier none) case has a label file (case {bad[0]!r}; remove the file or change "
                           f"the case's tier in nnx.tiers){_more(bad, 'more such cases')}",
                           os.path.join(labels_tr, bad[0] + fe))
    return spec


def _entry_rules(entry, dj: dict) -> dict:
    """How the files of one nnx entry are checked: role (for messages), declared values, requirements."""
    labels = dj["labels"]
    task = declared_labels(labels, include_ignore=False)
    ignore = int(labels["ignore"]) if "ignore" in labels else None
    if entry.name == "coarse":
        checks_ = [] if ignore is None else [
            ("lacks", ignore, f"coarse mask contains the ignore value {ignore} ({{n}}); coarse masks are dense and "
                              f"use the task's labels only")]
        return {"role": "coarse mask", "declared": task, "declared_in": "the task's labels", "checks": checks_,
                "required": False, "where": "nnx.coarse"}
    if entry.name == "scribbles":
        iv = int(entry.ignore_value)
        return {"role": "scribble label", "declared": sorted(set(task) | {iv}),
                "declared_in": f"the task's labels plus the ignore value {iv}",
                "checks": [("has", iv, f"scribble label has no ignore voxels (value {iv}); scribbles mark every "
                                       f"unannotated voxel with the ignore value")],
                "required": False, "where": "nnx.scribbles"}
    if entry.kind == "label":
        return {"role": f"{entry.name} map", "declared": sorted({int(v) for v in entry.labels.values()}),
                "declared_in": f"nnx.aux_maps.{entry.name}.labels", "checks": [], "required": True,
                "where": f"nnx.aux_maps.{entry.name}"}
    return {"role": "train-only channel", "declared": None, "declared_in": None, "checks": [], "required": True,
            "where": "nnx.train_only_channels"}


def _file_spec(path: str, entry, rules: dict) -> tuple:
    opts = {"role": rules["role"], "collect": False}
    if entry.kind == "image":
        return path, "image", None, opts
    opts.update(declared_in=rules["declared_in"], checks=rules["checks"])
    return path, "label", rules["declared"], opts


def _entry_folder_cases(folder: str, sub: str, entry, fe: str, rules: dict, known: Mapping[str, Any],
                        unknown: str) -> Dict[str, List[str]]:
    """``{case: [files]}`` of one entry folder; every file must end with ``fe`` and belong to a known case."""
    d = os.path.join(folder, sub)
    if entry.kind == "image":
        found = _scan_image_folder(d, fe, entry.num_channels, sub)
    else:
        names = _visible_files(d)
        wrong = [n for n in names if not n.endswith(fe)]
        if wrong:
            raise NNXError(f"file does not end with file_ending {fe!r} from dataset.json"
                           f"{_more(wrong, 'more such files')}", os.path.join(d, wrong[0]))
        found = {n[: -len(fe)]: [os.path.join(d, n)] for n in names}
    stray = [c for c in found if c not in known]
    if stray:
        raise NNXError(f"{rules['role']} file of unknown case {stray[0]!r}: {unknown}"
                       f"{_more(stray, 'more such cases')}", found[stray[0]][0])
    return found


def _nnx_plan(folder: str, dj: dict, spec, cases: Mapping[str, Tuple[List[str], str]]) -> dict:
    """Check names and presence of every file of the nnx block and build the jobs that read them.

    Returns ``label_opts`` (``{imagesTr case: opts of its labelsTr file}``), ``extra_files`` (``{imagesTr case:
    [file specs]}``, appended to the case's job), ``jobs`` (tier none and test cases, own reference images) and
    ``summary``.
    """
    from nnx.tiers import TIERS
    json_path = os.path.join(folder, "dataset.json")
    fe = dj["file_ending"]
    n_ch = len(_channel_names(dj, json_path))
    tiers = spec.tiers
    src = "imagesTr" if "dataset" not in dj else "'dataset'"

    # -- declarations vs the case lists
    no_tier = [c for c in cases if c not in tiers]
    if no_tier:
        raise NNXError(f"{src} case {no_tier[0]!r} has no tier in nnx.tiers (every training case needs "
                       f"expert|coarse|scribble|none){_more(no_tier, 'more without a tier')}", json_path)
    as_none = [c for c in cases if tiers[c] == "none"]
    if as_none:
        raise NNXError(f"{src} case {as_none[0]!r} is tier none (unlabeled) in nnx.tiers; tier none cases have no "
                       f"label and their images belong in {spec.unlabeled_folder or 'imagesUnlabeledTr'}"
                       f"{_more(as_none, 'more')}", json_path)
    unl = spec.unlabeled_folder or "imagesUnlabeledTr"
    unl_dir = os.path.join(folder, unl)
    unl_images: Dict[str, List[str]] = {}
    if os.path.isdir(unl_dir):
        unl_images = _scan_image_folder(unl_dir, fe, n_ch, unl)
        for c, files in unl_images.items():
            t = tiers.get(c)
            why = "has no tier in nnx.tiers" if t is None else f"is tier {t} in nnx.tiers"
            if t != "none":
                raise NNXError(f"{unl} case {c!r} {why}; only tier none (unlabeled) cases belong in {unl}", files[0])
    none_cases = spec.unlabeled_cases
    for c in none_cases:
        if c not in unl_images:
            where = unl if os.path.isdir(unl_dir) else f"{unl} (folder not found)"
            raise NNXError(f"missing images of unlabeled (tier none) case {c!r}: nnx.tiers lists it but {where} has "
                           f"no {c}_0000{fe}", os.path.join(unl_dir, f"{c}_0000{fe}"))
    missing = [c for c, t in tiers.items() if t != "none" and c not in cases]
    if missing:
        c = missing[0]
        raise NNXError(f"nnx.tiers lists case {c!r} (tier {tiers[c]}) but {src} has no images for it (only tier none "
                       f"cases live in {unl}){_more(missing, 'more')}",
                       os.path.join(folder, "imagesTr", f"{c}_0000{fe}") if "dataset" not in dj else json_path)

    # -- the labelsTr file of each imagesTr case, by tier
    labels = dj["labels"]
    ignore = int(labels["ignore"]) if "ignore" in labels else None
    label_opts: Dict[str, dict] = {}
    for c in cases:
        if tiers[c] == "scribble":
            label_opts[c] = {"checks": [
                ("has", ignore, f"scribble-tier label has no ignore voxels (value {ignore}): it looks dense; scribble "
                                f"labels mark every unannotated voxel with the ignore value"),
                ("has_other", ignore, f"scribble-tier label has no annotated voxels (every voxel is the ignore value "
                                      f"{ignore})")]}
        elif tiers[c] == "coarse" and ignore is not None:
            label_opts[c] = {"checks": [
                ("lacks", ignore, f"coarse-tier label contains the ignore value {ignore} ({{n}}); coarse labels are "
                                  f"dense masks with the task's labels only")]}

    # -- entry folders
    train_refs = {c: files for c, (files, _) in cases.items()}
    train_refs.update(unl_images)  # every training case -> its images (geometry reference)
    extra: Dict[str, List[tuple]] = {c: [] for c in train_refs}
    entries_summary: Dict[str, int] = {}
    test_summary: Dict[str, int] = {}
    images_ts = os.path.join(folder, "imagesTs")
    test_cases: Optional[Dict[str, List[str]]] = None
    if any(e.test_folder for e in spec.entries.values()) and os.path.isdir(images_ts):
        test_cases = _scan_image_folder(images_ts, fe, n_ch, "imagesTs")
    test_extra: Dict[str, List[tuple]] = {c: [] for c in (test_cases or {})}
    standalone: List[dict] = []
    for name, entry in spec.entries.items():
        rules = _entry_rules(entry, dj)
        n_files = 0
        if entry.train_folder is not None:
            d = os.path.join(folder, entry.train_folder)
            if not os.path.isdir(d):
                raise NNXError(f"{rules['role']} folder not found (declared in {rules['where']} of dataset.json)", d)
            found = _entry_folder_cases(folder, entry.train_folder, entry, fe, rules, train_refs,
                                        f"not a training case (neither in {src} nor a tier none case in "
                                        f"nnx.tiers)")
            for c in train_refs:
                if c not in found:
                    if rules["required"] and (entry.kind == "label" or c in cases):
                        what = f"{rules['role']} file" if entry.kind == "label" else f"{rules['role']} file (channel 0)"
                        raise NNXError(f"missing {what} of training case {c!r} ({rules['where']}: every "
                                       f"{'training' if entry.kind == 'label' else src} case needs one)",
                                       entry.train_files(folder, c, fe)[0])
                    continue
                extra[c] += [_file_spec(p, entry, rules) for p in found[c]]
                n_files += len(found[c])
        entries_summary[name] = n_files
        if entry.test_folder is not None:
            d = os.path.join(folder, entry.test_folder)
            n_test = 0
            if test_cases is not None:
                if not os.path.isdir(d) and test_cases:
                    raise NNXError(f"{rules['role']} test folder not found (declared in {rules['where']} of "
                                   f"dataset.json; imagesTs has {len(test_cases)} cases and each needs one: it is an "
                                   f"inference input)", d)
                found = _entry_folder_cases(folder, entry.test_folder, entry, fe, rules, test_cases,
                                            "imagesTs has no such case") if os.path.isdir(d) else {}
                for c in test_cases:
                    if c not in found:
                        raise NNXError(f"missing {rules['role']} of test case {c!r} ({rules['where']}: every imagesTs "
                                       f"case needs one; it is an inference input)",
                                       os.path.join(d, c + fe))
                    test_extra[c] += [_file_spec(p, entry, rules) for p in found[c]]
                    n_test += len(found[c])
            elif os.path.isdir(d):  # no imagesTs: the files are checked on their own (no geometry reference)
                for n in _visible_files(d):
                    p = os.path.join(d, n)
                    if not n.endswith(fe):
                        raise NNXError(f"file does not end with file_ending {fe!r} from dataset.json", p)
                    standalone.append({"case": n[: -len(fe)], "files": [_file_spec(p, entry, rules)],
                                       "ref_role": rules["role"]})
                    n_test += 1
            test_summary[name] = n_test

    jobs = [{"case": c, "files": [(p, "image", None) for p in unl_images[c]] + extra[c], "ref_role": "image"}
            for c in none_cases]
    jobs += [{"case": c, "ref_role": "image",
              "files": [(p, "image", None, {"header": True, "collect": False}) for p in test_cases[c]] + test_extra[c]}
             for c in (test_cases or {}) if test_extra[c]]
    jobs += standalone
    counts = {t: 0 for t in TIERS}
    for t in tiers.values():
        counts[t] += 1
    return {"label_opts": label_opts, "extra_files": {c: extra[c] for c in cases}, "jobs": jobs,
            "summary": {"tiers": counts, "entries": entries_summary, "unlabeled": len(none_cases),
                        "test_inputs": test_summary}}


def check_nnx_block(folder: str, dj: Mapping[str, Any], cases: Mapping[str, Tuple[List[str], str]],
                    num_processes: int = 1, check_all_cases: bool = True) -> dict:
    """Validate the ``"nnx"`` block of dataset.json and every file it declares (contract: docs/dataset_format.md).

    ``cases`` is ``{case: ([channel files], label file)}`` of the imagesTr cases (as built by
    :func:`check_raw_dataset`). Checks: the block parses; every imagesTr case has a tier other than ``none``;
    tier ``none`` cases have all their channels in the unlabeled folder and no label file; no undeclared cases
    anywhere; scribble tier needs ``labels`` ignore, scribble-tier labels contain ignore and annotated voxels,
    coarse-tier labels no ignore; coarse masks / scribbles / aux maps / train-only channels match their case's
    image geometry, carry only declared values (scribbles also need ignore voxels), train-only channels are finite;
    aux maps (every training case) and train-only channels (every imagesTr case) are required, and so are the test
    inputs (coarse, aux maps) of every imagesTs case. :func:`check_raw_dataset` runs the same checks inside its
    per-case jobs (each file read once); this function is the standalone form (it reads channel 0 headers as the
    geometry reference and the labelsTr files for the tier checks).

    Returns ``{"tiers": {tier: count}, "entries": {entry: train files checked}, "unlabeled": n,
    "test_inputs": {entry: files checked}}``.
    """
    folder = os.fspath(folder)
    dj = dict(dj)
    spec = _nnx_precheck(folder, dj)
    plan = _nnx_plan(folder, dj, spec, cases)
    declared = declared_labels(dj["labels"], include_ignore=True)
    jobs = []
    for case, (images, label) in cases.items():
        files = [(images[0], "image", None, {"header": True, "collect": False}),
                 (label, "label", declared, plan["label_opts"].get(case, {}))] + plan["extra_files"].get(case, [])
        jobs.append({"case": case, "files": files, "ref_role": "image"})
    jobs += plan["jobs"]
    for i, job in enumerate(jobs):
        job["header_only"] = not check_all_cases and i > 0
    _run_jobs(jobs, num_processes)
    return plan["summary"]


# ----------------------------------------------------------------------------------------------------------------------
# 5. inference inputs
# ----------------------------------------------------------------------------------------------------------------------
def check_image_folder(folder: str, dataset_json: Union[Mapping[str, Any], str], purpose: str = "prediction input",
                       num_processes: int = 1) -> List[str]:
    """Validate a folder of images for prediction; returns the sorted case ids.

    ``dataset_json`` is the dict (or a folder/file to load it from). Checks: folder exists and has files; every
    file ends with ``file_ending`` and follows ``CASE_XXXX``; every case has all channels of ``channel_names``;
    files readable; the channels of a case share geometry; no NaN/inf voxels.
    """
    if not isinstance(dataset_json, Mapping):
        dataset_json = load_dataset_json(dataset_json, check_num_training=False)
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise NNXError(f"{purpose} folder not found" if not os.path.exists(folder) else f"{purpose} is not a folder",
                       folder)
    fe = dataset_json["file_ending"]
    if not _visible_files(folder):
        raise NNXError(f"{purpose} folder is empty (expected files named CASE_XXXX{fe})", folder)
    n_ch = len(dataset_json.get("channel_names") or dataset_json.get("modality") or {})
    cases = _scan_image_folder(folder, fe, max(n_ch, 1), f"{purpose}")
    jobs = [{"case": c, "files": [(p, "image", None) for p in files], "ref_role": "channel 0"}
            for c, files in cases.items()]
    _run_jobs(jobs, num_processes)
    return list(cases)


# ----------------------------------------------------------------------------------------------------------------------
# 6. evaluation inputs
# ----------------------------------------------------------------------------------------------------------------------
def check_prediction_folder(ref_folder: str, pred_folder: str, file_ending: str,
                            labels: Union[Mapping[str, Any], Iterable[int], None] = None,
                            num_processes: int = 1) -> List[str]:
    """Validate predictions against references; returns the sorted prediction file names.

    Checks: both folders exist; ``pred_folder`` has at least one ``*file_ending`` file (other files such as
    plans.json are ignored); every prediction has a reference of the same name; both readable and integer-valued;
    prediction geometry == reference geometry; values within ``labels`` (references may also contain ``ignore``;
    ``labels=None`` skips the value check).
    """
    ref_folder, pred_folder = os.fspath(ref_folder), os.fspath(pred_folder)
    if not os.path.isdir(ref_folder):
        raise NNXError("reference folder not found", ref_folder)
    if not os.path.isdir(pred_folder):
        raise NNXError("prediction folder not found", pred_folder)
    preds = [n for n in _visible_files(pred_folder) if n.endswith(file_ending)]
    if not preds:
        raise NNXError(f"prediction folder has no *{file_ending} files", pred_folder)
    refs = set(_visible_files(ref_folder))
    missing = [n for n in preds if n not in refs]
    if missing:
        raise NNXError(f"reference file missing for prediction {os.path.join(pred_folder, missing[0])}"
                       f"{_more(missing, 'more')}", os.path.join(ref_folder, missing[0]))
    ref_declared = declared_labels(labels, include_ignore=True)
    pred_declared = declared_labels(labels, include_ignore=False)
    jobs = [{"case": n, "ref_role": "reference",
             "files": [(os.path.join(ref_folder, n), "reference", ref_declared),
                       (os.path.join(pred_folder, n), "prediction", pred_declared)]} for n in preds]
    _run_jobs(jobs, num_processes)
    return preds
