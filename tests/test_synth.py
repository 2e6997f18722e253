"""Tests of nnx.synth (nnx_synth phantom datasets). CPU only, about 30 s."""
from __future__ import annotations

import glob
import json
import os

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage as ndi

from nnx.errors import NNXError
from nnx.synth import make_dataset, parse_tiers, preview
from nnx.synth.cli import main as synth_main
from nnx.synth.dataset import tier_counts
from nnx.synth.phantom import LESION_ORGANS, ORGAN_ID, PhantomParams, generate_case

FE = ".nii.gz"
MIXED_TIERS = "expert=0.4,coarse=0.2,scribble=0.2,none=0.2"


@pytest.fixture(autouse=True)
def _own_raw(tmp_path, monkeypatch):
    """Every test gets its own nnUNet_raw (tests that need another one set it themselves)."""
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))


def _make(tmp_path_factory, tag, **kw):
    raw = tmp_path_factory.mktemp(tag)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("nnUNet_raw", str(raw))
        return make_dataset(**kw)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The default tiny preset (tiers expert 0.75 / none 0.25, joint task, PET channel)."""
    return _make(tmp_path_factory, "tiny", dataset_id=1)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """All four tiers, PET as train-only channel, coarse target 0.85."""
    return _make(tmp_path_factory, "mixed", dataset_id=2, name="Mixed", tiers=MIXED_TIERS, pet="train_only",
                 coarse_dice=0.85, num_train=10, num_test=2)


def _read(path):
    img = sitk.ReadImage(path)
    return sitk.GetArrayFromImage(img), img


def _dj(folder):
    with open(os.path.join(folder, "dataset.json")) as f:
        return json.load(f)


def _case_files(folder, case):
    return sorted(p for p in glob.glob(os.path.join(folder, "*", case + "*" + FE))
                  if os.path.basename(p) in (case + FE,) or os.path.basename(p).startswith(case + "_"))


def _dice(a, b, classes):
    ds = []
    for k in classes:
        x, y = a == k, b == k
        s = x.sum() + y.sum()
        if s:
            ds.append(2.0 * np.logical_and(x, y).sum() / s)
    return float(np.mean(ds)) if ds else None


# ---------------------------------------------------------------------------------------------------------------
# determinism


def _all_bytes(folder):
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, folder)] = fh.read()
    return out


def test_determinism_same_seed_same_bytes(tmp_path, monkeypatch):
    kw = dict(dataset_id=11, name="Det", tiers=MIXED_TIERS, num_train=5, num_test=1, pet="train_only")
    folders = []
    for i, seed in enumerate((3, 3, 4)):
        monkeypatch.setenv("nnUNet_raw", str(tmp_path / f"raw{i}"))
        folders.append(make_dataset(seed=seed, **kw).folder)
    a, b, c = (_all_bytes(f) for f in folders)
    assert "dataset.json" in a and any(k.startswith("trainOnlyTr") for k in a)
    assert any(k.startswith("scribblesTr") for k in a) and any(k.startswith("imagesUnlabeledTr") for k in a)
    assert sorted(a) == sorted(b)
    different = [k for k in a if a[k] != b[k]]
    assert different == [], f"files differ between two runs with the same seed: {different}"
    # gzip header: no timestamp
    for k, v in a.items():
        if k.endswith(".gz"):
            assert v[:2] == b"\x1f\x8b" and v[4:8] == b"\x00\x00\x00\x00", k
    # another seed: the images differ
    imgs = [k for k in a if k.startswith("imagesTr") or k.startswith("imagesTs")]
    assert imgs and all(a[k] != c.get(k) for k in imgs if k in c)
    assert sum(a[k] != c.get(k) for k in a) > len(a) // 2


# ---------------------------------------------------------------------------------------------------------------
# layout, geometry, tiers


def test_layout_and_dataset_json(tiny):
    folder = tiny.folder
    dj = _dj(folder)
    assert os.path.basename(folder) == "Dataset001_PhantomTiny"
    assert dj["channel_names"] == {"0": "CT", "1": "PET"}
    assert dj["file_ending"] == FE and dj["overwrite_image_reader_writer"] == "SimpleITKIO"
    assert dj["labels"] == {"background": 0, "liver": 1, "spleen": 2, "kidney": 3, "bladder": 4, "spine": 5,
                            "lesion": 6}
    nnx = dj["nnx"]
    assert nnx["format_version"] == 1 and nnx["phantom_truth"] == "truthTr"
    assert nnx["aux_maps"]["anatomy"] == {"train": "anatomyTr", "test": "anatomyTs",
                                          "labels": {"background": 0, "liver": 1, "spleen": 2, "kidney": 3,
                                                     "bladder": 4, "spine": 5}}
    assert nnx["scribbles"]["ignore_value"] == 7 and "ignore" not in dj["labels"]
    tiers = nnx["tiers"]
    counts = {t: sum(v == t for v in tiers.values()) for t in ("expert", "coarse", "scribble", "none")}
    assert counts == tier_counts(11, parse_tiers(None)) == {"expert": 8, "coarse": 0, "scribble": 0, "none": 3}
    assert counts == tiny.tiers
    tr = sorted(os.path.basename(p)[:-len("_0000" + FE)] for p in glob.glob(f"{folder}/imagesTr/*_0000{FE}"))
    assert dj["numTraining"] == len(tr) == 8
    assert len(glob.glob(f"{folder}/imagesTr/*_0001{FE}")) == 8
    unl = sorted(os.path.basename(p)[:-len("_0000" + FE)] for p in glob.glob(f"{folder}/imagesUnlabeledTr/*_0000{FE}"))
    assert sorted(tr + unl) == sorted(tiers)
    assert all(tiers[c] == "none" for c in unl) and all(tiers[c] != "none" for c in tr)
    listing = lambda sub: sorted(os.path.basename(p)[:-len(FE)] for p in glob.glob(f"{folder}/{sub}/*{FE}"))  # noqa
    assert listing("labelsTr") == tr
    assert listing("scribblesTr") == tr
    for sub in ("truthTr", "coarseTr", "anatomyTr"):
        assert listing(sub) == sorted(tiers), sub
    test_cases = sorted(os.path.basename(p)[:-len("_0000" + FE)] for p in glob.glob(f"{folder}/imagesTs/*_0000{FE}"))
    assert len(test_cases) == 3 and not set(test_cases) & set(tiers)
    for sub in ("labelsTs", "coarseTs", "anatomyTs", "mimicsTs"):
        assert listing(sub) == test_cases, sub
    assert nnx["phantom_mimics"] == {"test": "mimicsTs"}
    n_mimic_voxels = 0
    for c in test_cases:   # evaluation-only mimic masks: binary, never on a lesion, one per placed mimic
        mim, lab = _read(f"{folder}/mimicsTs/{c}{FE}")[0], _read(f"{folder}/labelsTs/{c}{FE}")[0]
        assert set(np.unique(mim)) <= {0, 1} and not (mim.astype(bool) & (lab == dj["labels"]["lesion"])).any()
        assert ndi.label(mim)[1] == tiny.cases[c]["n_mimics"]
        n_mimic_voxels += int(mim.sum())
    assert n_mimic_voxels > 0
    # expert labelsTr == truthTr
    for c in tr:
        assert np.array_equal(_read(f"{folder}/labelsTr/{c}{FE}")[0], _read(f"{folder}/truthTr/{c}{FE}")[0])


def test_mixed_tiers_layout(mixed):
    folder = mixed.folder
    dj = _dj(folder)
    tiers = dj["nnx"]["tiers"]
    assert mixed.tiers == tier_counts(10, parse_tiers(MIXED_TIERS)) == {"expert": 4, "coarse": 2, "scribble": 2,
                                                                          "none": 2}
    assert dj["labels"]["ignore"] == 7 == dj["nnx"]["scribbles"]["ignore_value"]
    assert dj["channel_names"] == {"0": "CT"}
    assert dj["nnx"]["train_only_channels"] == {"folder": "trainOnlyTr", "channel_names": {"0": "PET"}}
    assert not glob.glob(f"{folder}/imagesTr/*_0001{FE}") and not glob.glob(f"{folder}/imagesTs/*_0001{FE}")
    assert len(glob.glob(f"{folder}/trainOnlyTr/*_0000{FE}")) == 10
    assert dj["numTraining"] == 8
    for c, t in tiers.items():
        lab_p = f"{folder}/labelsTr/{c}{FE}"
        if t == "none":
            assert not os.path.exists(lab_p)
            continue
        lab = _read(lab_p)[0]
        ref = {"expert": "truthTr", "coarse": "coarseTr", "scribble": "scribblesTr"}[t]
        assert np.array_equal(lab, _read(f"{folder}/{ref}/{c}{FE}")[0]), (c, t)
        if t == "scribble":
            assert lab.max() == 7 and (lab == 7).mean() > 0.9


@pytest.mark.parametrize("which", ["tiny", "mixed"])
def test_geometry_consistent_per_case(which, request):
    rep = request.getfixturevalue(which)
    folder = rep.folder
    cases = list(_dj(folder)["nnx"]["tiers"]) + [os.path.basename(p)[:-len("_0000" + FE)]
                                                  for p in glob.glob(f"{folder}/imagesTs/*_0000{FE}")]
    origins = set()
    for c in cases:
        files = _case_files(folder, c)
        assert len(files) >= 4, (c, files)
        ref = sitk.ReadImage(files[0])
        sp = np.array(ref.GetSpacing())
        assert sp.max() / sp.min() >= 2.0, "spacing must be anisotropic"
        assert np.all(np.abs(ref.GetOrigin()) > 1.0), "origin must be non-zero"
        origins.add(tuple(np.round(ref.GetOrigin(), 2)))
        for f in files[1:]:
            im = sitk.ReadImage(f)
            assert im.GetSize() == ref.GetSize(), f
            assert np.allclose(im.GetSpacing(), ref.GetSpacing()), f
            assert np.allclose(im.GetOrigin(), ref.GetOrigin()), f
            assert np.allclose(im.GetDirection(), ref.GetDirection()), f
        # numpy (z, y, x): z is the coarse axis
        assert np.argmax(sp) == 2
    assert len(origins) > 1


# ---------------------------------------------------------------------------------------------------------------
# annotation statistics


@pytest.mark.parametrize("which,target", [("tiny", 0.65), ("mixed", 0.85)])
def test_coarse_dice_near_target(which, target, request):
    rep = request.getfixturevalue(which)
    folder = rep.folder
    dj = _dj(folder)
    classes = [v for k, v in dj["labels"].items() if k not in ("background", "ignore")]
    ds = []
    for c in dj["nnx"]["tiers"]:
        d = _dice(_read(f"{folder}/truthTr/{c}{FE}")[0], _read(f"{folder}/coarseTr/{c}{FE}")[0], classes)
        if d is not None:
            ds.append(d)
    assert abs(np.mean(ds) - target) <= 0.05, (np.mean(ds), target)
    assert rep.coarse_dice_target == target
    assert abs(rep.coarse_dice["all_train"] - np.mean(ds)) < 1e-3
    assert abs(rep.coarse_dice["test"] - target) <= 0.05
    # coarse masks really differ from the expert label
    assert max(ds) < 0.99


def test_coarse_dice_lesion_task(tmp_path):
    rep = make_dataset(3, task="lesion", coarse_dice=0.5, num_train=8, num_test=0, max_lesions=4,
                       tiers="expert=1")
    assert rep.labels == {"background": 0, "lesion": 1}
    assert abs(rep.coarse_dice["all_train"] - 0.5) <= 0.05
    assert not os.path.exists(os.path.join(rep.folder, "imagesTs"))


def test_scribbles(mixed, tiny):
    for rep in (tiny, mixed):
        folder = rep.folder
        dj = _dj(folder)
        ign = dj["nnx"]["scribbles"]["ignore_value"]
        annotated = total = 0
        for c, t in dj["nnx"]["tiers"].items():
            if t == "none":
                continue
            s = _read(f"{folder}/scribblesTr/{c}{FE}")[0]
            truth = _read(f"{folder}/truthTr/{c}{FE}")[0]
            m = s != ign
            annotated += m.sum()
            total += s.size
            assert np.array_equal(s[m], truth[m]), "scribbles must agree with the expert label"
            assert set(np.unique(truth)) <= set(np.unique(s[m])), "every class present gets a stroke"
            per_slice = m.sum(axis=(1, 2))
            assert (per_slice == 0).any() and (per_slice > 0).any(), "strokes on some axial slices only"
        frac = annotated / total
        assert 0.7 * 0.005 <= frac <= 1.3 * 0.005, frac
        assert frac < 0.01
        assert abs(rep.scribble_fraction - frac) < 1e-6
    assert sum(tiny.scribble_voxels.values()) > 0 and tiny.scribble_voxels["lesion"] > 0


def test_scribbles_are_thin_strokes():
    from nnx.synth.annotate import make_scribbles

    truth = np.zeros((6, 40, 40), np.uint8)
    truth[:, 5:35, 5:35] = 1
    truth[:, 15:25, 15:25] = 2
    s = make_scribbles(truth, 3, 3, 0.01, np.random.default_rng(0))
    m = s != 3
    assert 0.5 * 0.01 < m.mean() < 1.5 * 0.01
    # 1 voxel wide: no annotated 2x2 block in any slice
    blocks = m[:, :-1, :-1] & m[:, 1:, :-1] & m[:, :-1, 1:] & m[:, 1:, 1:]
    assert blocks.sum() <= 0.02 * m.sum()


# ---------------------------------------------------------------------------------------------------------------
# content: lesions, mimics, threshold baseline


def test_lesions_only_inside_lesion_organs(tiny):
    folder = tiny.folder
    les_lab = _dj(folder)["labels"]["lesion"]
    ok_ids = [ORGAN_ID[n] for n in LESION_ORGANS]
    n_les_vox = 0
    for p in sorted(glob.glob(f"{folder}/truthTr/*{FE}")) + sorted(glob.glob(f"{folder}/labelsTs/*{FE}")):
        truth = _read(p)[0]
        anat = _read(p.replace("truthTr", "anatomyTr").replace("labelsTs", "anatomyTs"))[0]
        les = truth == les_lab
        n_les_vox += les.sum()
        assert np.isin(anat[les], ok_ids).all(), p
        # in the joint task every non-lesion organ voxel carries its organ label
        assert np.array_equal(truth[~les], anat[~les])
    assert n_les_vox > 0
    assert tiny.lesions["count"] > 0 and tiny.lesions["voxels_min"] <= 30
    assert tiny.lesions["cases_without_lesions"] < tiny.lesions["cases"]


def test_mimics_outside_lesion_organs_and_lesion_like():
    p = PhantomParams(shape=(28, 56, 56), spacing_zyx=(2.5, 1.0, 1.0), max_lesions=3, max_mimics=3,
                      lesion_radius=(1.5, 5.0))
    n_mim = hot_mimics = 0
    for i in range(4):
        c = generate_case(np.random.default_rng(i), p)
        les_org = np.isin(c.organs, [ORGAN_ID[n] for n in LESION_ORGANS])
        assert not (c.mimic & les_org).any()
        assert not (c.mimic & c.lesion).any()
        assert np.isin(c.organs[c.lesion], [ORGAN_ID[n] for n in LESION_ORGANS]).all()
        n_mim += c.n_mimics
        lab, n = ndi.label(c.mimic)
        for i in range(1, n + 1):
            # mimics look like liver or kidney lesions on CT (organ HU - 12..25)
            assert -20 < c.ct[lab == i].mean() < 75
            hot_mimics += c.pet[lab == i].mean() > 3.0
        if c.lesion.any():
            assert c.pet[c.lesion].mean() > 1.5 * c.pet[c.organs == ORGAN_ID["liver"]].mean()  # PET-hot
        assert c.ct.dtype == np.int16 and c.pet.dtype == np.float32
        far = ~ndi.binary_dilation(c.body, iterations=2)  # outside the partial-volume shell of the body
        assert (c.ct[far] < -900).mean() > 0.999 and abs(np.median(c.ct[far]) + 1000) < 10  # air
    assert n_mim >= 4 and hot_mimics >= 1


def _local_contrast(c, mask):
    """Per component of ``mask``: median CT and PET inside minus the median of a 1-voxel ring one voxel out."""
    out = []
    lab, n = ndi.label(mask)
    for k in range(1, n + 1):
        m = lab == k
        ring = ndi.binary_dilation(m, iterations=2) & ~ndi.binary_dilation(m) & ~c.lesion & ~c.mimic
        out.append((np.median(c.ct[m]) - np.median(c.ct[ring]), np.median(c.pet[m]) - np.median(c.pet[ring])))
    return np.array(out)


def test_relative_mimics_have_a_lesions_local_contrast():
    """mimic_contrast='relative': a mimic is as much darker (CT) and hotter (PET) than the tissue around it as a
    lesion is than its organ; 'absolute' mimics (the default) are not (a lesion's HU in soft tissue or fat)."""
    kw = dict(shape=(40, 80, 80), spacing_zyx=(2.5, 1.0, 1.0), max_lesions=4, max_mimics=4, lesion_radius=(1.5, 7.2))
    contrast, lesions = {}, {}
    for mode in ("absolute", "relative"):
        p = PhantomParams(mimic_contrast=mode, **kw)
        les, mim = [], []
        for i in range(6):
            c = generate_case(np.random.default_rng([0, 0, i]), p)
            lesions.setdefault(i, []).append((c.organs, c.lesion))
            les.append(_local_contrast(c, c.lesion))
            mim.append(_local_contrast(c, c.mimic))
            les_org = np.isin(c.organs, [ORGAN_ID[n] for n in LESION_ORGANS])
            assert not (c.mimic & les_org).any() and not (c.mimic & c.lesion).any()
        contrast[mode] = np.concatenate(les), np.concatenate(mim)
    les, mim = contrast["relative"]
    assert len(mim) >= 8
    assert abs(np.mean(mim[:, 0]) - np.mean(les[:, 0])) < 5 and np.std(mim[:, 0]) < 1.5 * np.std(les[:, 0]) + 2
    assert (mim[:, 1] > 0.5).all() and np.mean(mim[:, 1]) > 0.6 * np.mean(les[:, 1])   # every mimic PET-hot
    mim_a = contrast["absolute"][1]
    for (org_a, les_a), (org_r, les_r) in lesions.values():      # the option moves only the mimics
        assert np.array_equal(org_a, org_r) and np.array_equal(les_a, les_r)
    assert np.std(mim_a[:, 0]) > 2 * np.std(mim[:, 0]) and (mim_a[:, 1] < 0.5).sum() >= 3
    with pytest.raises(ValueError, match="mimic_contrast"):
        generate_case(np.random.default_rng(0), PhantomParams(mimic_contrast="loud", **kw))


def _best_threshold_dice(values, lesion, n_q=400):
    qs = np.unique(np.quantile(values, np.linspace(0.0005, 0.9995, n_q)))
    order = np.sort(values)
    les_sorted = np.sort(values[lesion])
    L = lesion.sum()
    best = 0.0
    for t in qs:
        n_gt = order.size - np.searchsorted(order, t, side="right")
        tp_gt = les_sorted.size - np.searchsorted(les_sorted, t, side="right")
        n_lt = np.searchsorted(order, t, side="left")
        tp_lt = np.searchsorted(les_sorted, t, side="left")
        best = max(best, 2 * tp_gt / (n_gt + L), 2 * tp_lt / (n_lt + L))
    return best


def test_threshold_baseline_below_half(tiny):
    folder = tiny.folder
    les_lab = _dj(folder)["labels"]["lesion"]
    assert set(tiny.threshold_baseline) == {"CT", "PET"}
    for ch, r in tiny.threshold_baseline.items():
        assert 0.0 <= r["dice"] < 0.5, (ch, r)
    # independent check from the files: quantile search, both directions, all training cases pooled
    vals = {0: [], 1: []}
    les = []
    for c in _dj(folder)["nnx"]["tiers"]:
        sub = "imagesTr" if os.path.exists(f"{folder}/imagesTr/{c}_0000{FE}") else "imagesUnlabeledTr"
        for ch in (0, 1):
            vals[ch].append(_read(f"{folder}/{sub}/{c}_{ch:04d}{FE}")[0].ravel().astype(np.float32))
        les.append((_read(f"{folder}/truthTr/{c}{FE}")[0] == les_lab).ravel())
    les = np.concatenate(les)
    assert les.sum() > 0
    for ch in (0, 1):
        d = _best_threshold_dice(np.concatenate(vals[ch]), les)
        assert d < 0.5, (ch, d)
        assert d <= tiny.threshold_baseline["CT" if ch == 0 else "PET"]["dice"] + 0.02


# ---------------------------------------------------------------------------------------------------------------
# stock nnU-Net accepts the datasets


@pytest.mark.parametrize("which", ["tiny", "mixed"])
def test_nnunet_verify_dataset_integrity(which, request, capsys):
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    verify_dataset_integrity(request.getfixturevalue(which).folder, num_processes=1)
    out = capsys.readouterr().out
    assert "Error" not in out and "Warning" not in out


# ---------------------------------------------------------------------------------------------------------------
# report, preview, CLI and bad input


def test_report_format(tiny):
    txt = tiny.format()
    for s in ("expert 8", "none 3", "numTraining 8", "test cases 3", "coarse vs expert Dice", "scribbles",
              "lesions:", "threshold", "CT", "PET", tiny.folder):
        assert s in txt, s
    with open(os.path.join(tiny.folder, "synth_report.json")) as f:
        stats = json.load(f)
    assert stats["threshold_baseline"] == tiny.threshold_baseline
    assert len(stats["cases"]) == 14


def test_preview_png(tiny, tmp_path):
    out = tmp_path / "p.png"
    preview(tiny.folder, "case_001", str(out))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(NNXError):
        preview(tiny.folder, "nope", str(tmp_path / "q.png"))


def test_pet_none_and_organs_task(tmp_path):
    rep = make_dataset(4, task="organs", pet="none", num_train=3, num_test=1, tiers="expert=1")
    dj = _dj(rep.folder)
    assert dj["channel_names"] == {"0": "CT"} and "lesion" not in dj["labels"]
    assert "train_only_channels" not in dj["nnx"] and "unlabeled" not in dj["nnx"]
    assert set(rep.threshold_baseline) == {"CT"}


def test_cli_writes_dataset(tmp_path, capsys):
    rc = synth_main(["-d", "9", "-n", "Cli", "--num-train", "3", "--num-test", "1", "--tiers", "expert=1",
                     "--preview", str(tmp_path / "prev.png")])
    out = capsys.readouterr().out
    assert rc == 0
    assert "Dataset009_Cli" in out and "threshold" in out
    assert os.path.isfile(tmp_path / "raw" / "Dataset009_Cli" / "dataset.json")
    assert os.path.isfile(tmp_path / "prev.png")
    # the same ID again: error without --overwrite, fine with it; a different name with the same ID: error
    assert synth_main(["-d", "9", "-n", "Cli", "--num-train", "2", "--num-test", "0", "--tiers", "expert=1"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert synth_main(["-d", "9", "-n", "Cli", "--num-train", "2", "--num-test", "0", "--tiers", "expert=1",
                       "--overwrite", "-q", "--mimic-contrast", "relative"]) == 0
    assert "relative mimics" in _dj(tmp_path / "raw" / "Dataset009_Cli")["description"]
    assert len(glob.glob(str(tmp_path / "raw" / "Dataset009_Cli" / "imagesTr" / "*"))) == 4
    assert synth_main(["-d", "9", "-n", "Other", "--num-train", "2", "--tiers", "expert=1", "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "Dataset009_Cli" in err and len(err.strip().splitlines()) == 1
    assert sorted(os.listdir(tmp_path / "raw")) == ["Dataset009_Cli"]


def test_unset_raw_is_one_line_error(monkeypatch, capsys):
    monkeypatch.delenv("nnUNet_raw", raising=False)
    with pytest.raises(NNXError) as ei:
        make_dataset(1)
    assert "nnUNet_raw" in str(ei.value) and "\n" not in str(ei.value)
    assert synth_main(["-d", "1"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("nnx_synth: error:") and "nnUNet_raw" in err


@pytest.mark.parametrize("tiers", ["expert=0.5", "expert=0.5,bogus=0.5", "expert=x,none=1", "expert",
                                   "expert=-0.5,none=1.5", "none=1", ""])
def test_bad_tiers(tiers, capsys):
    with pytest.raises(NNXError):
        parse_tiers(tiers)
    assert synth_main(["-d", "1", "--tiers", tiers]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("nnx_synth: error:")


@pytest.mark.parametrize("argv", [["-d", "0"], ["-d", "1000"], ["-d", "1", "--preset", "huge"],
                                  ["-d", "1", "--task", "x"], ["-d", "1", "--coarse-dice", "1.5"],
                                  ["-d", "1", "-n", "bad name"], ["--preset", "tiny"], ["-d", "abc"],
                                  ["-d", "1", "--shape", "4,4"], ["-d", "1", "--mimic-contrast", "loud"]])
def test_bad_cli_input(argv, capsys, tmp_path):
    assert synth_main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("nnx_synth: error:"), err
    assert not os.path.exists(tmp_path / "raw") or os.listdir(tmp_path / "raw") == []


def test_failure_leaves_nothing_behind(tmp_path, monkeypatch):
    import nnx.synth.dataset as ds

    calls = {"n": 0}
    real = ds._case_job

    def boom(job):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("disk full")
        return real(job)

    monkeypatch.setattr(ds, "_case_job", boom)
    with pytest.raises(RuntimeError):
        make_dataset(5, num_train=4, num_test=1)
    assert os.listdir(tmp_path / "raw") == []
