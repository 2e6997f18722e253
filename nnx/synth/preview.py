"""PNG preview of one case of an nnx (phantom) dataset: every channel and every annotation / auxiliary map."""
from __future__ import annotations

import json
import os
from typing import Dict, List, Tuple

import numpy as np

from nnx.errors import NNXError


def _read(path: str) -> Tuple[np.ndarray, Tuple[float, float, float]]:
    import SimpleITK as sitk

    img = sitk.ReadImage(path)
    return sitk.GetArrayFromImage(img), tuple(img.GetSpacing())


def _find_case_files(folder: str, case: str) -> Dict[str, object]:
    djp = os.path.join(folder, "dataset.json")
    if not os.path.isfile(djp):
        raise NNXError("no dataset.json (not a raw dataset folder)", folder)
    with open(djp) as f:
        dj = json.load(f)
    fe = dj.get("file_ending", ".nii.gz")
    nnx = dj.get("nnx", {}) or {}
    channels: List[Tuple[str, str]] = []
    split = None
    for sub, sp in (("imagesTr", "train"), ("imagesUnlabeledTr", "train"), ("imagesTs", "test")):
        if os.path.isfile(os.path.join(folder, sub, f"{case}_0000{fe}")):
            for c, cname in sorted(dj.get("channel_names", {}).items(), key=lambda kv: int(kv[0])):
                channels.append((cname, os.path.join(folder, sub, f"{case}_{int(c):04d}{fe}")))
            split = sp
            break
    if split is None:
        raise NNXError(f"case '{case}' not found in imagesTr, imagesUnlabeledTr or imagesTs", folder)
    toc = nnx.get("train_only_channels")
    if toc and split == "train":
        for c, cname in sorted(toc.get("channel_names", {}).items(), key=lambda kv: int(kv[0])):
            p = os.path.join(folder, toc.get("folder", "trainOnlyTr"), f"{case}_{int(c):04d}{fe}")
            if os.path.isfile(p):
                channels.append((f"{cname} (train only)", p))
    maps: List[Tuple[str, str, Dict[str, int]]] = []
    labels = {k: v for k, v in dj.get("labels", {}).items() if k != "ignore"}

    def add(title, sub, lab):
        if sub:
            p = os.path.join(folder, sub, case + fe)
            if os.path.isfile(p):
                maps.append((title, p, lab))
                return True
        return False

    if split == "train":
        if not add("expert (truth)", nnx.get("phantom_truth"), labels):
            if nnx.get("tiers", {}).get(case) == "expert":
                add("expert", "labelsTr", labels)
        add("coarse", (nnx.get("coarse") or {}).get("train"), labels)
        add("scribbles", (nnx.get("scribbles") or {}).get("train"), labels)
    else:
        add("expert (labelsTs)", "labelsTs", labels)
        add("coarse", (nnx.get("coarse") or {}).get("test"), labels)
    for mname, m in (nnx.get("aux_maps") or {}).items():
        add(mname, m.get("train" if split == "train" else "test"), dict(m.get("labels", {})))
    return {"channels": channels, "maps": maps, "labels": labels, "split": split,
            "tier": (nnx.get("tiers") or {}).get(case, "test" if split == "test" else None)}


def preview(dataset_folder: str, case: str, out_png: str) -> str:
    """Write a PNG with an axial and a coronal slice of every channel and label map of ``case``; returns the path.

    The axial slice (numpy axis 0) is the one with the most lesion voxels (else the most foreground); the coronal
    slice goes through the lesion / foreground centre."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    info = _find_case_files(dataset_folder, case)
    chans = [(n, *_read(p)) for n, p in info["channels"]]
    maps = [(t, *_read(p), lab) for t, p, lab in info["maps"]]
    ref = chans[0][1]
    spacing = chans[0][2]  # (x, y, z)
    labels: Dict[str, int] = info["labels"]
    truth = maps[0][1] if maps else np.zeros(ref.shape, np.uint8)
    les = labels.get("lesion")
    focus = (truth == les) if les is not None and (truth == les).any() else (truth > 0)
    if focus.any():
        z = int(np.argmax(focus.sum(axis=(1, 2))))
        y = int(np.argmax(focus.sum(axis=(0, 2))))
    else:
        z, y = ref.shape[0] // 2, ref.shape[1] // 2
    aspect = spacing[2] / spacing[0]

    n_cols = len(chans) + len(maps)
    fig, axes = plt.subplots(2, n_cols, figsize=(2.6 * n_cols, 2.6 * (1 + ref.shape[0] * aspect / ref.shape[2]) + 0.9),
                             gridspec_kw={"height_ratios": [ref.shape[1], max(1.0, ref.shape[0] * aspect)]},
                             squeeze=False)
    base = chans[0][1].astype(np.float32)
    colors = plt.get_cmap("tab10").colors

    def lab_cmap(n):
        return ListedColormap([(0, 0, 0, 0)] + [(*colors[(i - 1) % 10], 1.0) for i in range(1, n)])

    col = 0
    for name, arr, _ in chans:
        a = arr.astype(np.float32)
        if name.upper().startswith("CT"):
            kw = dict(cmap="gray", vmin=-150, vmax=200)
        else:
            kw = dict(cmap="hot", vmin=0, vmax=float(np.percentile(a, 99.8)) or 1.0)
        axes[0, col].imshow(a[z], interpolation="nearest", **kw)
        axes[1, col].imshow(a[:, y, :], origin="lower", aspect=aspect, interpolation="nearest", **kw)
        axes[0, col].set_title(name, fontsize=9)
        col += 1
    for title, arr, _, lab in maps:
        n = max(lab.values()) + 1 if lab else int(arr.max()) + 1
        scr = title == "scribbles"
        if scr:  # background strokes white, unannotated (ignore) transparent
            a = np.where(arr >= n, 0, arr + 1)
            cmap = ListedColormap([(0, 0, 0, 0), (1, 1, 1, 1)] + [(*colors[(i - 1) % 10], 1.0) for i in range(1, n)])
            vmax = n + 0.5
        else:
            a = arr
            cmap = lab_cmap(n)
            vmax = n - 0.5
        for r, (bg, sl) in enumerate(((base[z], a[z]), (base[:, y, :], a[:, y, :]))):
            kw = dict(origin="lower", aspect=aspect) if r == 1 else {}
            axes[r, col].imshow(bg, cmap="gray", vmin=-150, vmax=200, interpolation="nearest", **kw)
            axes[r, col].imshow(sl, cmap=cmap, vmin=-0.5, vmax=vmax, interpolation="nearest",
                                alpha=1.0 if scr else 0.55, **kw)
        axes[0, col].set_title(title, fontsize=9)
        col += 1
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0, 0].set_ylabel(f"axial z={z}", fontsize=8)
    axes[1, 0].set_ylabel(f"coronal y={y}", fontsize=8)
    all_names = dict(labels)
    for _, _, _, lab in maps:
        for k, v in lab.items():
            all_names.setdefault(k, v)
    handles = [Patch(color=colors[(v - 1) % 10], label=f"{v} {k}") for k, v in sorted(all_names.items(),
                                                                                       key=lambda kv: kv[1]) if v > 0]
    handles.append(Patch(facecolor="white", edgecolor="black", label="background scribble"))
    fig.legend(handles=handles, loc="lower center", ncol=min(8, max(1, len(handles))), fontsize=8, frameon=False)
    fig.suptitle(f"{os.path.basename(os.path.normpath(dataset_folder))} / {case} ({info['split']}, tier "
                 f"{info['tier']})", fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 0.95))
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
