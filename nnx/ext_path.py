"""``nnx_ext_path``: print the folder to put into ``nnUNet_extTrainer`` for stock nnU-Net commands."""
from __future__ import annotations

import os

from nnx.errors import ArgumentParser, cli_entry

SHIM_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_nnunet_ext")


def ensure_ext_trainer_env() -> None:
    """Put the shim folder first in ``nnUNet_extTrainer`` of this process (children inherit it)."""
    current = [p for p in os.environ.get("nnUNet_extTrainer", "").split(os.pathsep) if p]
    if SHIM_DIR not in current:
        os.environ["nnUNet_extTrainer"] = os.pathsep.join([SHIM_DIR] + current)


@cli_entry("nnx_ext_path")
def main(argv):
    p = ArgumentParser(prog="nnx_ext_path", description=(
        "Print the folder that makes nnx trainers visible to stock nnU-Net: "
        "export nnUNet_extTrainer=$(nnx_ext_path)"))
    p.parse_args(argv)
    print(SHIM_DIR)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
