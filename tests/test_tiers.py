"""Annotation tiers and auxiliary inputs: preprocessing, aligned loading, label ratios, inference inputs."""
from __future__ import annotations

import builtins
import json
import os
import shutil

import numpy as np
import pytest
import torch

from conftest import TIERED_ID, TIERED_PLAIN_ID, nnx_cmd, run_cli
from nnx.trainer_base import nnxTrainer

FE = ".nii.gz"


class AllEntriesTrainer(nnxTrainer):
    """Test trainer: every entry in its batches, the anatomy map as a network input, an unlabeled batch."""
    nnx_requires = {"batch": ["coarse", "scribbles", "anatomy", "train_only", "unlabeled"], "inputs": ["anatomy"]}


class CoarseBatchTrainer(nnxTrainer):
    nnx_requires = {"batch": ["coarse", "scribbles"]}


def make_trainer(dataset, cls=nnxTrainer, opts="", fold=0, monkeypatch=None):
    from batchgenerators.utilities.file_and_folder_operations import load_json
    pp = os.path.join(os.environ["nnUNet_preprocessed"], dataset)
    plans = load_json(os.path.join(pp, "nnUNetPlans.json"))
    plans["continue_training"] = False
    dj = load_json(os.path.join(pp, "dataset.json"))
    old = os.environ.get("NNX_TRAINER_OPTS")
    os.environ["NNX_TRAINER_OPTS"] = opts
    try:
        t = cls(plans, "3d_fullres", fold, dj, torch.device("cpu"))
    finally:
        if old is None:
            os.environ.pop("NNX_TRAINER_OPTS", None)
        else:
            os.environ["NNX_TRAINER_OPTS"] = old
    return t


def raw_folder(dataset):
    return os.path.join(os.environ["nnUNet_raw"], dataset)


def stock_folder(dataset):
    return os.path.join(os.environ["nnUNet_preprocessed"], dataset, "nnUNetPlans_3d_fullres")


def read(path):
    import SimpleITK as sitk
    return sitk.GetArrayFromImage(sitk.ReadImage(path))


@pytest.fixture(autouse=True)
def _single_threaded_da(monkeypatch):
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")


# ----------------------------------------------------------------------------------------------------------------------
# preprocessing
# ----------------------------------------------------------------------------------------------------------------------
def test_preprocessed_layout(tiered_planned):
    from nnx.extras import load_manifest
    from nnx.tiers import DatasetSpec
    spec = DatasetSpec.from_folder(raw_folder(tiered_planned))
    stock, extras = stock_folder(tiered_planned), stock_folder(tiered_planned) + "__nnx"
    m = load_manifest(extras)
    assert m["signature"]["data_identifier"] == "nnUNetPlans_3d_fullres"
    unl = spec.unlabeled_cases
    assert unl and m["unlabeled"]["cases"] == unl
    # unlabeled cases live only in their own set: never in nnU-Net's folder, never with a seg file
    stock_cases = {f[:-5] for f in os.listdir(stock) if f.endswith(".b2nd") and not f.endswith("_seg.b2nd")}
    assert not stock_cases & set(unl)
    assert not [f for f in os.listdir(os.path.join(extras, "unlabeled")) if "_seg" in f]
    for name in ("coarse", "scribbles", "anatomy", "train_only"):
        assert name in m["entries"], name
    # every entry has the preprocessed shape of its image
    from nnx.extras import open_array
    for case in sorted(stock_cases)[:3]:
        shape = open_array(os.path.join(stock, case)).shape[1:]
        for name in ("coarse", "anatomy", "train_only"):
            assert open_array(os.path.join(extras, name, case)).shape[1:] == shape
    # a coarse-tier case: its coarse entry equals nnU-Net's own preprocessed target (same pipeline)
    case = spec.cases_of("coarse")[0]
    seg = np.asarray(open_array(os.path.join(stock, case + "_seg"))[:])
    coarse = np.asarray(open_array(os.path.join(extras, "coarse", case))[:])
    np.testing.assert_array_equal(np.where(seg < 0, 0, seg), coarse)


def test_scribble_voxels_survive_preprocessing(tiered_planned):
    from nnx.extras import load_manifest, open_array
    from nnx.resample import count_labels
    raw = raw_folder(tiered_planned)
    extras = stock_folder(tiered_planned) + "__nnx"
    m = load_manifest(extras)["entries"]["scribbles"]
    ignore = m["ignore_value"]
    assert m["voxels_before"] == m["voxels_after"] and not m["cases_losing_a_class"]
    for case in m["cases"]:
        before = count_labels(read(os.path.join(raw, "scribblesTr", case + FE)), ignore)
        after = count_labels(np.asarray(open_array(os.path.join(extras, "scribbles", case))[:]), ignore)
        assert before == after, case


def test_resample_scribbles_keeps_every_stroke():
    from scipy import ndimage
    from nnx.resample import _forward_index, resample_scribbles
    ignore = 9
    rng = np.random.default_rng(0)
    seg = np.full((30, 40, 44), ignore, np.int16)
    for k in range(25):  # one-voxel-thin strokes of random classes and directions
        v = int(rng.integers(0, 5))
        start = rng.integers(0, (30, 40, 44))
        axis = int(rng.integers(0, 3))
        length = int(rng.integers(2, 12))
        sl = [int(s) for s in start]
        for i in range(length):
            p = list(sl)
            p[axis] = min(p[axis] + i, seg.shape[axis] - 1)
            seg[tuple(p)] = v
    np.testing.assert_array_equal(resample_scribbles(seg, seg.shape, ignore), seg)
    new_shape = (11, 13, 17)
    out = resample_scribbles(seg, new_shape, ignore)
    assert out.shape == new_shape
    assert set(np.unique(out)) <= set(np.unique(seg))
    assert set(np.unique(out)) == set(np.unique(seg))  # every class survives
    lost = 0
    for v in np.unique(seg[seg != ignore]):
        comps, n = ndimage.label(seg == v)
        for c in range(1, n + 1):
            coords = np.nonzero(comps == c)
            target = tuple(_forward_index(x, a, b) for x, a, b in zip(coords, seg.shape, new_shape))
            lost += not (out[target] != ignore).any()
    assert lost == 0
    # nnU-Net's own seg resampling (linear one-hot) drops thin strokes at this scale: the reason this exists
    from nnunetv2.preprocessing.resampling.default_resampling import resample_data_or_seg_to_shape
    stock = resample_data_or_seg_to_shape(seg[None].astype(np.float32), new_shape, (1, 1, 1), (2.7, 3.1, 2.6),
                                          is_seg=True, order=1, order_z=0)[0]
    assert (stock != ignore).sum() < (out != ignore).sum()


# ----------------------------------------------------------------------------------------------------------------------
# loading
# ----------------------------------------------------------------------------------------------------------------------
def test_one_batch_per_tier_entries_and_shapes(tiered_planned):
    t = make_trainer(tiered_planned, AllEntriesTrainer, "unlabeled_batch_size=3")
    t.initialize()
    dl_tr, dl_val = t.get_dataloaders()
    patch = tuple(t.configuration_manager.patch_size)
    n_anat = len(t._nnx_spec().entry("anatomy").foreground_values)
    seen = set()
    for _ in range(12):
        b = next(dl_tr)
        assert b["data"].shape == (2, 1 + n_anat, *patch)  # CT + one-hot anatomy (PET is train-only)
        assert b["target"][0].shape == (2, 1, *patch)
        for name in ("coarse", "scribbles", "anatomy"):
            assert b[name].shape == (2, 1, *patch) and b[name].dtype == torch.int16
        assert b["train_only"].shape == (2, 1, *patch) and b["train_only"].dtype == torch.float32
        u = b["unlabeled"]
        assert u["data"].shape == (3, 1 + n_anat, *patch) and "target" not in u
        assert set(u["tiers"]) == {"none"} and set(u) == {"data", "keys", "tiers", "anatomy", "train_only"}
        seen.update(b["tiers"])
        # the one-hot input channels are exactly the (augmented) anatomy entry
        for k, v in enumerate(t._nnx_spec().entry("anatomy").foreground_values):
            assert torch.equal(b["data"][:, 1 + k], (b["anatomy"][:, 0] == v).float())
    assert seen == {"expert", "coarse", "scribble"}
    bv = next(dl_val)
    assert set(bv["tiers"]) == {"expert"}  # validation is scored against expert labels only


def _forced_spatial(trainer):
    """The trainer's full training pipeline with rotation, scaling, elastic deformation and mirroring forced on."""
    from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
    rot, dummy2d, initial, mirror = trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
    tr = trainer.get_training_transforms(trainer.configuration_manager.patch_size, rot,
                                         trainer._get_deep_supervision_scales(), mirror, dummy2d,
                                         use_mask_for_norm=trainer.configuration_manager.use_mask_for_norm,
                                         is_cascaded=False, foreground_labels=trainer.label_manager.foreground_labels,
                                         regions=None, ignore_label=trainer.label_manager.ignore_label)
    for s in tr.transforms:
        if isinstance(s, SpatialTransform):
            s.p_rotation = s.p_scaling = s.p_elastic_deform = 1.0
    return tr, initial


@pytest.mark.parametrize("tier,entry", [("coarse", "coarse"), ("scribble", "scribbles")])
def test_entry_equal_to_label_stays_identical_after_augmentation(tiered_planned, tier, entry):
    """Coarse-tier cases' labelsTr IS their coarse mask (scribble tier: their scribbles): after the full
    augmentation the entry must equal the target voxel for voxel."""
    from nnx.loading import nnxDataLoader
    t = make_trainer(tiered_planned, CoarseBatchTrainer)
    t.initialize()
    ds_tr, _ = t.get_tr_and_val_datasets()
    cases = [c for c in ds_tr.identifiers if t._nnx_fold.tiers[c] == tier]
    assert cases
    ds_tr.identifiers = cases
    tr, initial = _forced_spatial(t)
    dl = nnxDataLoader(ds_tr, 2, initial, t.configuration_manager.patch_size, t.label_manager, 0.33,
                       transforms=tr, entries={"coarse": "label", "scribbles": "label"})
    dl.indices = cases
    np.random.seed(0)
    torch.manual_seed(0)
    for _ in range(4):
        b = dl.generate_train_batch()
        assert torch.equal(b[entry], b["target"][0]), b["keys"]
        assert (b[entry] != 0).any()


def test_stock_batches_unchanged(tiered_planned):
    """A stock trainer on the nnx dataset sees exactly what it sees on the same images + labelsTr as a plain
    nnU-Net dataset; and nnx's loader, asked for label entries, yields the same data/target for the same seed."""
    from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
    from nnx.cli.plan import main
    from nnx.loading import ExtrasSource, nnxDataLoader, nnxLabeledDataset
    raw = raw_folder(tiered_planned)
    plain_name = f"Dataset{TIERED_PLAIN_ID}_PlainCopy"
    plain = os.path.join(os.environ["nnUNet_raw"], plain_name)
    if not os.path.isdir(plain):
        shutil.copytree(os.path.join(raw, "imagesTr"), os.path.join(plain, "imagesTr"))
        shutil.copytree(os.path.join(raw, "labelsTr"), os.path.join(plain, "labelsTr"))
        dj = json.load(open(os.path.join(raw, "dataset.json")))
        dj.pop("nnx")
        json.dump(dj, open(os.path.join(plain, "dataset.json"), "w"))
    assert main(["-d", str(TIERED_PLAIN_ID), "-c", "3d_fullres", "-np", "1"]) == 0
    a_dir, b_dir = stock_folder(tiered_planned), stock_folder(plain_name)
    assert not os.path.isdir(b_dir + "__nnx")
    pa = json.load(open(os.path.join(os.path.dirname(a_dir), "nnUNetPlans.json")))
    pb = json.load(open(os.path.join(os.path.dirname(b_dir), "nnUNetPlans.json")))
    assert pa["configurations"] == pb["configurations"]
    t = make_trainer(tiered_planned)  # nnxTrainer without requirements -> nnU-Net's own loader class
    t.initialize()
    dl_tr, _ = t.get_dataloaders()
    assert type(dl_tr.data_loader) is nnUNetDataLoader
    keys = sorted(t.do_split()[0])
    rot, dummy2d, initial, mirror = t.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
    tr = t.get_training_transforms(t.configuration_manager.patch_size, rot, t._get_deep_supervision_scales(),
                                   mirror, dummy2d, use_mask_for_norm=t.configuration_manager.use_mask_for_norm,
                                   is_cascaded=False, foreground_labels=t.label_manager.foreground_labels,
                                   regions=None, ignore_label=t.label_manager.ignore_label)
    loaders = {
        "nnx dataset, stock loader": nnUNetDataLoader(nnUNetDatasetBlosc2(a_dir, keys), 2, initial,
                                                      t.configuration_manager.patch_size, t.label_manager, 0.33,
                                                      transforms=tr),
        "plain dataset, stock loader": nnUNetDataLoader(nnUNetDatasetBlosc2(b_dir, keys), 2, initial,
                                                        t.configuration_manager.patch_size, t.label_manager, 0.33,
                                                        transforms=tr),
        "nnx loader with label entries": nnxDataLoader(
            nnxLabeledDataset(a_dir, keys, extras=ExtrasSource(a_dir + "__nnx", {"coarse": "label",
                                                                                 "anatomy": "label"})),
            2, initial, t.configuration_manager.patch_size, t.label_manager, 0.33, transforms=tr,
            entries={"coarse": "label", "anatomy": "label"}),
    }
    batches = {}
    for name, dl in loaders.items():
        np.random.seed(123)
        torch.manual_seed(123)
        batches[name] = [dl.generate_train_batch() for _ in range(3)]
    ref = batches["nnx dataset, stock loader"]
    for name, bs in batches.items():
        for b, r in zip(bs, ref):
            assert list(b["keys"]) == list(r["keys"]), name
            assert torch.equal(b["data"], r["data"]), name
            for x, y in zip(b["target"], r["target"]):
                assert torch.equal(x, y), name


def _record_opens(monkeypatch):
    import blosc2
    opened = []
    real_blosc_open, real_open = blosc2.open, builtins.open

    def rec_blosc(*a, **kw):
        opened.append(str(kw.get("urlpath", a[0] if a else "")))
        return real_blosc_open(*a, **kw)

    def rec_open(file, *a, **kw):
        opened.append(str(file))
        return real_open(file, *a, **kw)

    monkeypatch.setattr(blosc2, "open", rec_blosc)
    monkeypatch.setattr(builtins, "open", rec_open)
    return opened


def test_unlabeled_loader_never_opens_a_label_file(tiered_planned, monkeypatch):
    from nnx.loading import nnxDataLoader
    t = make_trainer(tiered_planned, AllEntriesTrainer, "labeled=2 demote_to=none")
    t.initialize()
    t.do_split()
    fd = t._nnx_fold
    assert len(fd.demoted) >= 2 and set(fd.demoted) <= set(fd.unlabeled)  # demoted expert cases are unlabeled now
    ds = t._nnx_unlabeled_dataset()
    tr, initial = _forced_spatial(t)
    dl = nnxDataLoader(ds, 4, initial, t.configuration_manager.patch_size, t.label_manager, transforms=tr,
                       entries=ds.extras.entries, onehot_inputs=t._nnx_inputs(), is_unlabeled=True)
    opened = _record_opens(monkeypatch)
    seen = set()
    for _ in range(6):
        b = dl.generate_train_batch()
        seen.update(b["keys"])
        assert "target" not in b
    monkeypatch.undo()
    assert seen & set(fd.demoted)
    assert opened and not [p for p in opened if p.endswith("_seg.b2nd") or "labelsTr" in p or "truthTr" in p]


def test_demote_to_coarse_trains_on_the_coarse_mask_only(tiered_planned, monkeypatch):
    t = make_trainer(tiered_planned, nnxTrainer, "labeled=50% demote_to=coarse")
    t.initialize()
    tr, val = t.do_split()
    fd = t._nnx_fold
    assert fd.demoted and all(fd.target_from[c] == "coarse" for c in fd.demoted)
    ds_tr, _ = t.get_tr_and_val_datasets()
    case = fd.demoted[0]
    opened = _record_opens(monkeypatch)
    data, seg, _, props = ds_tr.load_case(case)
    monkeypatch.undo()
    assert not [p for p in opened if p.endswith(case + "_seg.b2nd")]
    coarse = read(os.path.join(raw_folder(tiered_planned), "coarseTr", case + FE))
    assert np.asarray(seg[:]).sum() > 0 and set(np.unique(np.asarray(seg[:]))) <= set(np.unique(coarse))
    assert props["class_locations"]  # sampled from the coarse mask
    split = json.load(open(os.path.join(t.output_folder, "nnx_split.json")))
    assert split["demoted"] == fd.demoted and split["demote_to"] == "coarse"


def test_label_ratio_is_deterministic_and_nested():
    from nnx.errors import NNXError
    from nnx.fold_data import resolve_fold
    from nnx.splits import apply_label_ratio, tiered_splits
    from nnx.tiers import DatasetSpec
    cases = [f"c{i:02d}" for i in range(20)]
    tiers = {c: "expert" for c in cases}
    tiers.update({"c18": "coarse", "c19": "scribble"})
    e10, d10 = apply_label_ratio(cases, tiers, "10%", "none", 7)
    e20, d20 = apply_label_ratio(cases, tiers, "20%", "none", 7)
    kept10 = {c for c, t in e10.items() if t == "expert"}
    kept20 = {c for c, t in e20.items() if t == "expert"}
    assert len(kept10) == 2 and len(kept20) == 4 and kept10 < kept20  # 10% of the 18 expert cases, rounded
    assert apply_label_ratio(cases, tiers, "10%", "none", 7) == (e10, d10)
    assert e10["c18"] == "coarse" and e10["c19"] == "scribble" and "c18" not in d10
    assert apply_label_ratio(cases, tiers, "3", "coarse", 7)[0]["c00"] in ("expert", "coarse")
    with pytest.raises(NNXError, match="only 18 expert"):
        apply_label_ratio(cases, tiers, "19", "none", 7)
    with pytest.raises(NNXError, match="percentage"):
        apply_label_ratio(cases, tiers, "101%", "none", 7)
    for zero in ("0", "0%"):  # no expert label kept: every expert case is demoted, non-expert tiers stay
        e0, d0 = apply_label_ratio(cases, tiers, zero, "coarse", 7)
        assert d0 == cases[:18] and all(e0[c] == "coarse" for c in d0) and e0["c19"] == "scribble"
    from nnx import options
    from nnx.registry import load_trainer
    with pytest.raises(NNXError, match="case count"):  # checked for stock trainers too, before any work
        options.resolve(load_trainer("nnUNetTrainer"), {"labeled": "ten"}, "--opt")
    # folds validate on expert cases only; non-expert tiers always train
    splits = tiered_splits(cases, tiers)
    assert all("c18" in s["train"] and "c19" in s["train"] for s in splits)
    assert sorted(sum((s["val"] for s in splits), [])) == cases[:18]
    # a stock trainer simply loses the demoted cases
    spec = DatasetSpec(tiers, {}, None, {"background": 0, "a": 1}, FE, True)
    fd = resolve_fold(spec, splits[0]["train"], splits[0]["val"], 0, "25%", "none", stock=True)
    assert not set(fd.train) & set(fd.demoted) and {"c18", "c19"} <= set(fd.train)
    # labeled=0: only an nnx trainer can learn from the non-expert files of the demoted cases
    only_expert = DatasetSpec({c: "expert" for c in cases}, {}, None, {"background": 0, "a": 1}, FE, True)
    with pytest.raises(NNXError, match="no labeled training case.*nnxTierTrainer"):
        resolve_fold(only_expert, cases[:16], cases[16:], 0, "0", "none", stock=True)
    with pytest.raises(NNXError, match="no labeled training case left in fold 0"):
        resolve_fold(only_expert, cases[:16], cases[16:], 0, "0", "none")


def test_tier_trainer_with_no_expert_label_trains_on_the_coarse_masks(tiered_planned):
    from nnx.baselines import nnxTierTrainer
    t = make_trainer(tiered_planned, nnxTierTrainer, "labeled=0 demote_to=coarse")
    tr, val = t.do_split()
    fd = t._nnx_fold
    expert_train = [c for c in tr if fd.spec.tier(c) == "expert"]
    assert expert_train and sorted(fd.demoted) == sorted(expert_train)
    assert all(fd.target_from[c] == "coarse" for c in fd.demoted) and t._nnx_uses_loader()
    assert all(fd.spec.tier(c) == "expert" for c in val)  # still judged against expert labels


# ----------------------------------------------------------------------------------------------------------------------
# training + prediction with inference inputs
# ----------------------------------------------------------------------------------------------------------------------
def test_inputs_trainer_trains_and_predicts_with_input_folders(tiered_planned, tmp_path):
    raw = raw_folder(tiered_planned)
    env = {"nnUNet_n_proc_DA": "0"}
    r = run_cli(nnx_cmd("train", str(TIERED_ID), "3d_fullres", "0", "-tr", "nnxInputsTrainer", "-device", "cpu",
                        "--epochs", "1", "--iters-per-epoch", "2", "--val-iters", "1",
                        "--opt", "inputs=coarse+anatomy"), env)
    assert r.returncode == 0, r.stderr[-2000:]
    val = os.path.join(os.environ["nnUNet_results"], tiered_planned, "nnxInputsTrainer__nnUNetPlans__3d_fullres",
                       "fold_0", "validation")
    with open(os.path.join(val, "summary_cc.json")) as f:  # CC-Metrics next to nnU-Net's validation summary
        assert "CC_Dice" in json.load(f)["foreground_mean"]
    out = tmp_path / "pred"
    base = nnx_cmd("predict", "-i", os.path.join(raw, "imagesTs"), "-o", str(out), "-d", str(TIERED_ID),
                   "-c", "3d_fullres", "-tr", "nnxInputsTrainer", "-f", "0", "-device", "cpu", "--quiet")
    r = run_cli(base + ["-inputs", f"coarse={raw}/coarseTs", f"anatomy={raw}/anatomyTs"], env)
    assert r.returncode == 0, r.stderr[-2000:]
    cases = sorted(f for f in os.listdir(os.path.join(raw, "imagesTs")) if f.endswith("_0000" + FE))
    assert sorted(os.listdir(out)) == [c.replace("_0000", "") for c in cases]
    pred = read(str(out / cases[0].replace("_0000", "")))
    assert pred.shape == read(os.path.join(raw, "imagesTs", cases[0])).shape
    # a missing input and a map with the wrong geometry: one-line errors naming the problem / the file
    r = run_cli(base + ["-inputs", f"coarse={raw}/coarseTs"], env)
    assert r.returncode == 2 and "anatomy" in r.stderr and "Traceback" not in r.stderr
    bad = tmp_path / "anatomyTs_bad"
    shutil.copytree(os.path.join(raw, "anatomyTs"), bad)
    import SimpleITK as sitk
    victim = str(bad / cases[0].replace("_0000", ""))
    img = sitk.ReadImage(victim)
    img.SetSpacing((2.0, 2.0, 2.0))
    sitk.WriteImage(img, victim)
    r = run_cli(base + ["-inputs", f"coarse={raw}/coarseTs", f"anatomy={bad}"], env)
    assert r.returncode == 2 and os.path.basename(victim) in r.stderr and "spacing" in r.stderr
    assert len([ln for ln in r.stderr.splitlines() if ln.strip()]) == 1


def test_label_map_follows_its_image_through_crop_and_resampling(tiered_planned, tmp_path):
    """An anatomy map at another spacing than the plans' target: after nnU-Net's image pipeline (crop to nonzero,
    resampling) and nnx's label pipeline, map and image still coincide and every label ID survives."""
    import copy
    import SimpleITK as sitk
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from nnx.extras import prepare_label_map
    pp = os.path.join(os.environ["nnUNet_preprocessed"], tiered_planned)
    plans = copy.deepcopy(load_json(os.path.join(pp, "nnUNetPlans.json")))
    cfg = plans["configurations"]["3d_fullres"]
    cfg.update(spacing=[2.0, 1.3, 1.3], normalization_schemes=["NoNormalization"], use_mask_for_norm=[False])
    pm = PlansManager(plans)
    cm = pm.get_configuration("3d_fullres")
    dj = load_json(os.path.join(pp, "dataset.json"))
    dj["channel_names"] = {"0": "noNorm"}
    shape = (24, 60, 70)  # z, y, x at spacing (x, y, z) = (0.9, 0.9, 3.0); zero margin -> nnU-Net crops it
    zz, yy, xx = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    lab = np.zeros(shape, np.uint8)
    for k, (cz, cy, cx, r) in enumerate([(12, 30, 20, 11), (12, 28, 48, 9), (8, 40, 35, 6)], start=1):
        lab[((zz - cz) * 3.0) ** 2 + ((yy - cy) * 0.9) ** 2 + ((xx - cx) * 0.9) ** 2 <= r * r] = k
    img = lab.astype(np.float32) * 100
    img[4:20, 5:55, 5:65] += 1  # body: nonzero box, so the crop removes the margin
    paths = {}
    for n, a in (("img", img), ("lab", lab)):
        im = sitk.GetImageFromArray(a)
        im.SetSpacing((0.9, 0.9, 3.0))
        paths[n] = str(tmp_path / f"{n}.nii.gz")
        sitk.WriteImage(im, paths[n])
    data, _, props = cm.preprocessor_class(verbose=False).run_case([paths["img"]], None, pm, cm, dj)
    assert tuple(props["shape_after_cropping_and_before_resampling"]) != tuple(data.shape[1:])  # really resampled
    raw, _ = pm.image_reader_writer_class().read_seg(paths["lab"])
    seg = prepare_label_map(raw, props, data.shape[1:], pm, cm, paths["lab"])
    assert seg.shape == (1, *data.shape[1:])
    assert set(np.unique(seg)) == {0, 1, 2, 3}
    from_image = np.clip(np.round((data[0] - 1) / 100), 0, 3).astype(int)
    for k in (1, 2, 3):
        a, b = seg[0] == k, from_image == k
        assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.9, k


def test_plan_without_preprocessing_writes_no_data(nnunet_env):
    from nnx.cli.plan import main
    from nnx.synth import make_dataset
    name = os.path.basename(make_dataset(904, preset="tiny", seed=1, num_train=6, num_test=1).folder)
    assert main(["-d", "904", "-c", "3d_fullres", "-np", "1", "--no-preprocess"]) == 0
    base = os.path.join(os.environ["nnUNet_preprocessed"], name)
    assert os.path.isfile(os.path.join(base, "nnUNetPlans.json"))
    assert not [d for d in os.listdir(base) if d.startswith("nnUNetPlans_")]
