"""``nnx_synth``: write a phantom nnU-Net raw dataset with annotation tiers."""
from __future__ import annotations

from typing import Optional, Sequence

from nnx.errors import ArgumentParser, cli_entry

PROG = "nnx_synth"


def build_parser() -> ArgumentParser:
    from nnx.synth.dataset import MIMIC_CONTRASTS, PET_MODES, PRESETS, TASKS

    p = ArgumentParser(prog=PROG, description="Write a phantom nnU-Net raw dataset ($nnUNet_raw/DatasetXXX_Name) with "
                                       "organs, lesions, lesion mimics, CT (+PET) and the nnx annotation tiers.")
    p.add_argument("-d", "--dataset-id", type=int, required=True, help="dataset ID (1..999)")
    p.add_argument("-n", "--name", default=None, help="dataset name (default Phantom<Preset>)")
    p.add_argument("--preset", default="tiny", choices=list(PRESETS), help="size preset (default tiny)")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed -> byte-identical files)")
    p.add_argument("--task", default="joint", choices=TASKS, help="label set (default joint: organs + lesion)")
    p.add_argument("--pet", default=None, choices=PET_MODES,
                   help="PET as regular channel 1, as train-only channel (trainOnlyTr), or none (default: preset)")
    p.add_argument("--tiers", default=None,
                   help="fractions of training cases per tier, e.g. expert=0.75,coarse=0,scribble=0,none=0.25")
    p.add_argument("--coarse-dice", type=float, default=0.65, help="target mean Dice of coarse masks (0.65)")
    p.add_argument("--scribble-fraction", type=float, default=0.005,
                   help="annotated fraction of voxels in scribbles (0.005)")
    p.add_argument("--num-train", type=int, default=None, help="training cases incl. unlabeled (default: preset)")
    p.add_argument("--num-test", type=int, default=None, help="test cases (default: preset)")
    p.add_argument("--shape", default=None, help="volume shape z,y,x (default: preset)")
    p.add_argument("--spacing", default=None, help="voxel spacing x,y,z in mm (default 1,1,2.5)")
    p.add_argument("--lesion-contrast", type=float, default=None,
                   help="multiplier of lesion / mimic contrast in CT and PET (default 1.0)")
    p.add_argument("--max-lesions", type=int, default=None, help="max lesions per case (default: preset)")
    p.add_argument("--max-mimics", type=int, default=None, help="max lesion mimics per case (default: preset)")
    p.add_argument("--mimic-contrast", choices=MIMIC_CONTRASTS, default=None,
                   help="absolute (default): mimics have a liver/kidney lesion's CT value wherever they lie, half are "
                        "PET-hot; relative: mimics have a lesion's contrast against their own surroundings in CT and "
                        "PET (harder to tell from lesions without anatomy)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset of the same ID and name")
    p.add_argument("-np", "--num-processes", type=int, default=1, help="worker processes (default 1)")
    p.add_argument("--preview", default=None, metavar="PNG", help="also write a preview PNG of one case")
    p.add_argument("--preview-case", default=None, help="case of the preview (default: a case with lesions)")
    p.add_argument("-q", "--quiet", action="store_true", help="print only the dataset folder")
    return p


@cli_entry(PROG)
def main(argv: Optional[Sequence[str]] = None) -> int:
    from nnx.synth.dataset import make_dataset

    args = build_parser().parse_args(argv)
    report = make_dataset(
        args.dataset_id, name=args.name, preset=args.preset, seed=args.seed, task=args.task, pet=args.pet,
        tiers=args.tiers, coarse_dice=args.coarse_dice, scribble_fraction=args.scribble_fraction,
        num_train=args.num_train, num_test=args.num_test, shape=args.shape, spacing=args.spacing,
        lesion_contrast=args.lesion_contrast, max_lesions=args.max_lesions, max_mimics=args.max_mimics,
        mimic_contrast=args.mimic_contrast, overwrite=args.overwrite, num_processes=args.num_processes,
        preview=args.preview, preview_case=args.preview_case)
    print(report.folder if args.quiet else report.format())
    if args.preview and not args.quiet:
        print(f"  preview: {args.preview}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
