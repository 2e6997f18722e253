"""Batches with named extra entries, aligned with image and target under the same augmentation.

A trainer declares what it needs in ``nnx_requires`` (see :mod:`nnx.trainer_base`); the core then builds

* :class:`nnxLabeledDataset`: nnU-Net's preprocessed case plus its entries from ``<data_identifier>__nnx/<entry>/``;
  the target can come from an entry instead of the stock seg (label-ratio demotions), and then the stock seg
  file is never opened;
* :class:`nnxUnlabeledDataset`: images only (``__nnx/unlabeled`` or demoted cases' stock data); it has no
  segmentation and never opens a ``_seg`` file;
* :class:`nnxDataLoader`: nnU-Net's ``nnUNetDataLoader`` sampling and cropping, with every entry cropped by the
  same box and passed through :func:`transform_with_extras`.

Batch keys: ``data``, ``target``, ``keys`` exactly as nnU-Net's, plus ``tiers`` (tier per sample), one key per
entry (label maps ``(B, 1, *patch)`` int16, train-only channels ``(B, C, *patch)`` float32) and, if requested,
``unlabeled`` = ``{"data", "keys", <entries>}`` with its own batch size. Label entries listed as network inputs are
additionally appended to ``data`` as channels (one-hot by default, see :func:`nnx.extras.onehot` and the trainer
hook ``nnx_input_encoding``), after intensity augmentation,
exactly as nnU-Net appends the previous stage of a cascade.

Augmentation rule: a transform moves voxels (``SpatialTransform``, ``MirrorTransform``, or any transform with
``nnx_spatial = True``) -> every entry gets it with the *same* parameters (label maps through the segmentation
path, so a label entry equal to the target stays voxel-identical to it); nnU-Net's dummy-2D augmentation of
anisotropic 3D patches (``Convert3DTo2DTransform`` ... ``Convert2DTo3DTransform``) folds and unfolds every entry
like the image; ``RemoveLabelTransform`` (nnU-Net's -1 padding marker -> 0) -> label entries too; intensity
transforms -> train-only channels only, with their own draws; never label maps. Region conversion and
deep-supervision downsampling apply to the target only.
"""
from __future__ import annotations

import os
import pickle
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.training.dataloading.nnunet_dataset import nnUNetBaseDataset, nnUNetDatasetBlosc2

from nnx.errors import NNXError
from nnx.extras import onehot, open_array

LABEL, IMAGE = "label", "image"
_NCHANNELS_KEY = "nnx_extras_nchannels"  # channel counts of the extras while dummy-2D augmentation folds them


# ----------------------------------------------------------------------------------------------------------------------
# datasets
# ----------------------------------------------------------------------------------------------------------------------
class ExtrasSource:
    """Where the preprocessed entries of each case live: ``root/<entry>/<case>.b2nd``."""

    def __init__(self, root: Optional[str], entries: Dict[str, str]):
        self.root = root
        self.entries = dict(entries)  # name -> kind

    def load(self, case: str) -> Dict[str, object]:
        out = {}
        for name in self.entries:
            p = os.path.join(self.root, name, case)
            if not os.path.isfile(p + ".b2nd"):
                raise NNXError(f"no preprocessed '{name}' for case {case} (is the raw file missing, or was "
                               f"nnx_plan not run after adding it?)", p + ".b2nd")
            out[name] = open_array(p)
        return out


class nnxLabeledDataset(nnUNetDatasetBlosc2):
    """nnU-Net's blosc2 dataset + entries; ``target_from[case] = entry`` makes that entry the case's target."""

    def __init__(self, folder: str, identifiers: List[str] = None, folder_with_segs_from_previous_stage: str = None,
                 extras: Optional[ExtrasSource] = None, target_from: Optional[Dict[str, str]] = None,
                 tiers: Optional[Dict[str, str]] = None, onehot_inputs: Sequence[Tuple[str, Sequence[int]]] = ()):
        super().__init__(folder, identifiers, folder_with_segs_from_previous_stage)
        self.extras = extras or ExtrasSource(None, {})
        self.target_from = dict(target_from or {})
        self.tiers = dict(tiers or {})
        self.onehot_inputs = list(onehot_inputs)

    def load_case(self, identifier):
        import blosc2
        from batchgenerators.utilities.file_and_folder_operations import load_pickle
        dparams = {"nthreads": 1}
        data = blosc2.open(urlpath=os.path.join(self.source_folder, identifier + ".b2nd"), mode="r",
                           dparams=dparams, **self.mmap_kwargs)
        props = load_pickle(os.path.join(self.source_folder, identifier + ".pkl"))
        src = self.target_from.get(identifier)
        if src is None:
            seg = blosc2.open(urlpath=os.path.join(self.source_folder, identifier + "_seg.b2nd"), mode="r",
                              dparams=dparams, **self.mmap_kwargs)
        else:  # the stock seg (e.g. an expert label demoted by a label-ratio setting) is never opened
            seg = open_array(os.path.join(self.extras.root, src, identifier))
            with open(os.path.join(self.extras.root, src, identifier + ".pkl"), "rb") as f:
                props["class_locations"] = pickle.load(f)["class_locations"]
        seg_prev = None
        if self.folder_with_segs_from_previous_stage is not None:
            seg_prev = blosc2.open(urlpath=os.path.join(self.folder_with_segs_from_previous_stage,
                                                        identifier + ".b2nd"), mode="r", dparams=dparams,
                                   **self.mmap_kwargs)
        props["nnx_extras"] = self.extras.load(identifier)
        props["nnx_tier"] = self.tiers.get(identifier, "expert")
        if self.onehot_inputs:  # validation / prediction: inputs appended as one-hot channels, no augmentation
            extras = props.pop("nnx_extras")  # props travel to export workers: no open arrays in them
            data = np.vstack([np.asarray(data[:])] + [onehot(np.asarray(extras[n][:]), v)
                                                       for n, v in self.onehot_inputs])
        return data, seg, seg_prev, props


class nnxUnlabeledDataset(nnUNetBaseDataset):
    """Images (+ entries) of unlabeled cases. ``sources[case]`` = the folder with ``case.b2nd`` and ``case.pkl``."""

    def __init__(self, sources: Dict[str, str], extras: Optional[ExtrasSource] = None):
        super().__init__(None, sorted(sources))
        self.sources = dict(sources)
        self.extras = extras or ExtrasSource(None, {})
        self.mmap_kwargs = {} if os.name == "nt" else {"mmap_mode": "r"}

    def load_case(self, identifier):
        from batchgenerators.utilities.file_and_folder_operations import load_pickle
        folder = self.sources[identifier]
        data = open_array(os.path.join(folder, identifier))
        props = load_pickle(os.path.join(folder, identifier + ".pkl"))
        props["class_locations"] = {}
        props["nnx_extras"] = self.extras.load(identifier)
        props["nnx_tier"] = "none"
        return data, None, None, props

    @staticmethod
    def save_case(data, seg, properties, output_filename_truncated):
        raise NotImplementedError

    @staticmethod
    def get_identifiers(folder: str) -> List[str]:
        return sorted(f[:-5] for f in os.listdir(folder) if f.endswith(".b2nd") and not f.endswith("_seg.b2nd"))


# ----------------------------------------------------------------------------------------------------------------------
# augmentation with extras
# ----------------------------------------------------------------------------------------------------------------------
def _is_spatial(t) -> bool:
    from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
    from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
    return getattr(t, "nnx_spatial", False) or isinstance(t, (SpatialTransform, MirrorTransform))


def transform_with_extras(t, data_dict: dict, extras: Dict[str, Tuple[torch.Tensor, str]]) -> dict:
    """Apply transform ``t`` to ``data_dict`` (nnU-Net's keys) and, by the module's rule, to ``extras`` (in place).

    Random draws for the stock keys happen in exactly the order nnU-Net's ``ComposeTransforms`` makes them, so
    ``data``/``target`` equal the stock loader's for the same seed when no train-only channels are requested.
    """
    from batchgeneratorsv2.transforms.base.basic_transform import ImageOnlyTransform
    from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
    from batchgeneratorsv2.transforms.utils.random import RandomTransform
    from batchgeneratorsv2.transforms.utils.remove_label import RemoveLabelTransform
    if not extras:
        return t(**data_dict)
    if isinstance(t, ComposeTransforms):
        for s in t.transforms:
            data_dict = transform_with_extras(s, data_dict, extras)
        return data_dict
    if isinstance(t, RandomTransform):
        if not t.get_parameters(**data_dict)["apply_transform"]:
            return data_dict
        return transform_with_extras(t.transform, data_dict, extras)
    if _is_spatial(t):
        params = t.get_parameters(**data_dict)
        data_dict = t.apply(data_dict, **params)
        for name, (x, kind) in list(extras.items()):
            y = t._apply_to_segmentation(x, **params) if kind == LABEL else t._apply_to_image(x, **params)
            extras[name] = (y, kind)
        return data_dict
    from batchgeneratorsv2.transforms.utils.pseudo2d import Convert2DTo3DTransform, Convert3DTo2DTransform
    if isinstance(t, Convert3DTo2DTransform):  # dummy-2D augmentation: fold the first spatial axis like the image
        data_dict = t(**data_dict)
        data_dict[_NCHANNELS_KEY] = {name: x.shape[0] for name, (x, _) in extras.items()}
        for name, (x, kind) in list(extras.items()):
            extras[name] = (x.reshape((x.shape[0] * x.shape[1], *x.shape[2:])), kind)
        return data_dict
    if isinstance(t, Convert2DTo3DTransform):
        data_dict = t(**data_dict)
        nch = data_dict.pop(_NCHANNELS_KEY)
        for name, (x, kind) in list(extras.items()):
            extras[name] = (x.reshape((nch[name], x.shape[0] // nch[name], *x.shape[1:])), kind)
        return data_dict
    data_dict = t(**data_dict)
    if isinstance(t, RemoveLabelTransform):
        for name, (x, kind) in list(extras.items()):
            if kind == LABEL:
                extras[name] = (t._apply_to_segmentation(x), kind)
    elif isinstance(t, ImageOnlyTransform):
        for name, (x, kind) in list(extras.items()):
            if kind == IMAGE:
                extras[name] = (t(image=x)["image"], kind)
    return data_dict


# ----------------------------------------------------------------------------------------------------------------------
# loader
# ----------------------------------------------------------------------------------------------------------------------
class nnxDataLoader(nnUNetDataLoader):
    """``nnUNetDataLoader`` + entries. ``entries``: name -> kind; ``onehot_inputs``: [(entry, values)] appended to
    ``data``; ``unlabeled``: another nnxDataLoader (over :class:`nnxUnlabeledDataset`) whose batch is attached
    under ``unlabeled``."""

    def __init__(self, data, batch_size, patch_size, final_patch_size, label_manager,
                 oversample_foreground_percent: float = 0.0, sampling_probabilities=None, pad_sides=None,
                 probabilistic_oversampling: bool = False, transforms=None, *, entries: Dict[str, str] = None,
                 onehot_inputs: Sequence[Tuple[str, Sequence[int]]] = (), unlabeled: "nnxDataLoader" = None,
                 is_unlabeled: bool = False):
        super().__init__(data, batch_size, patch_size, final_patch_size, label_manager,
                         oversample_foreground_percent, sampling_probabilities, pad_sides,
                         probabilistic_oversampling, transforms)
        self.entries = dict(entries or {})
        self.onehot_inputs = list(onehot_inputs)
        self.unlabeled = unlabeled
        self.is_unlabeled = is_unlabeled
        if is_unlabeled:  # random crops only: no labels to sample from
            self.has_ignore = False
            self.oversample_foreground_percent = 0.0

    def generate_train_batch(self):
        from acvl_utils.cropping_and_padding.bounding_boxes import crop_and_pad_nd
        from threadpoolctl import threadpool_limits
        selected_keys = self.get_indices()
        data_all = seg_all = None
        extra_all: Dict[str, torch.Tensor] = {}
        tiers = []
        with torch.no_grad(), threadpool_limits(limits=1, user_api=None):
            for j, key in enumerate(selected_keys):
                force_fg = self.get_do_oversample(j) and not self.is_unlabeled
                data, seg, seg_prev, props = self._data.load_case(key)
                tiers.append(props.get("nnx_tier", "expert"))
                bbox_lbs, bbox_ubs = self.get_bbox(data.shape[1:], force_fg, props["class_locations"])
                bbox = [[a, b] for a, b in zip(bbox_lbs, bbox_ubs)]
                data_c = torch.from_numpy(crop_and_pad_nd(data, bbox, 0)).float()
                seg_c = None
                if seg is not None:
                    seg_c = torch.from_numpy(crop_and_pad_nd(seg, bbox, -1, cast_cropped_to=np.int16)).to(torch.int16)
                    if seg_prev is not None:
                        prev = torch.from_numpy(crop_and_pad_nd(seg_prev, bbox, -1, cast_cropped_to=np.int16))
                        seg_c = torch.cat((seg_c, prev.to(torch.int16)[None]), dim=0)
                extras = {}
                for name, arr in props.get("nnx_extras", {}).items():
                    kind = self.entries.get(name, LABEL)
                    if kind == LABEL:
                        x = torch.from_numpy(crop_and_pad_nd(arr, bbox, -1, cast_cropped_to=np.int16)).to(torch.int16)
                    else:
                        x = torch.from_numpy(crop_and_pad_nd(arr, bbox, 0)).float()
                    extras[name] = (x, kind)
                if self.patch_size_was_2d:
                    data_c = data_c[:, 0]
                    seg_c = seg_c[:, 0] if seg_c is not None else None
                    extras = {n: (x[:, 0], k) for n, (x, k) in extras.items()}
                if self.transforms is not None:
                    d = {"image": data_c}
                    if seg_c is not None:
                        d["segmentation"] = seg_c
                    out = transform_with_extras(self.transforms, d, extras)
                    data_s, seg_s = out["image"], out.get("segmentation")
                else:
                    data_s, seg_s = data_c, seg_c
                if self.onehot_inputs:
                    data_s = torch.cat([data_s] + [torch.from_numpy(onehot(extras[n][0].numpy(), v))
                                                   for n, v in self.onehot_inputs])
                if data_all is None:
                    data_all = torch.empty((self.batch_size, *data_s.shape), dtype=torch.float32)
                data_all[j] = data_s
                if seg_s is not None:
                    if isinstance(seg_s, list):
                        if seg_all is None:
                            seg_all = [torch.empty((self.batch_size, *s.shape), dtype=s.dtype) for s in seg_s]
                        for i, s in enumerate(seg_s):
                            seg_all[i][j] = s
                    else:
                        if seg_all is None:
                            seg_all = torch.empty((self.batch_size, *seg_s.shape), dtype=seg_s.dtype)
                        seg_all[j] = seg_s
                for name, (x, _kind) in extras.items():
                    if name not in extra_all:
                        extra_all[name] = torch.empty((self.batch_size, *x.shape), dtype=x.dtype)
                    extra_all[name][j] = x
        batch = {"data": data_all, "keys": selected_keys, "tiers": tiers}
        if not self.is_unlabeled:
            batch["target"] = seg_all
        batch.update(extra_all)
        if self.unlabeled is not None:
            batch["unlabeled"] = self.unlabeled.generate_train_batch()
        return batch
