"""Trainer registry (entry points), the nnU-Net shim, options and nnx_trainers."""
from __future__ import annotations

import json
import os
import pickle
import sys
import textwrap

import pytest

from conftest import run_cli
from nnx import options
from nnx.errors import NNXError
from nnx.registry import describe, load_trainer, trainer_names

THIRD_PARTY = textwrap.dedent('''
    import torch
    from nnx.trainer_base import nnxTrainer
    from nnx.options import Option

    class ThirdPartyWideTrainer(nnxTrainer):
        """A third-party trainer that swaps the network (so it cannot be exported)."""
        nnx_summary = "test plugin from another package"
        nnx_options = {"width": Option(2, "width multiplier")}
        nnx_memory = {"activation_factor": 2.0, "static_gb": 0.5}

        @staticmethod
        def build_network_architecture(plans_manager, configuration_manager, num_input_channels,
                                       num_output_channels, enable_deep_supervision=True):
            return torch.nn.Conv3d(num_input_channels, num_output_channels, 1)
''')


@pytest.fixture(scope="module")
def third_party(tmp_path_factory):
    """A separately 'installed' package that registers a trainer through the nnx.trainers entry-point group."""
    root = tmp_path_factory.mktemp("site")
    (root / "thirdparty_nnx").mkdir()
    (root / "thirdparty_nnx" / "__init__.py").write_text("")
    (root / "thirdparty_nnx" / "trainers.py").write_text(THIRD_PARTY)
    dist = root / "thirdparty_nnx-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: thirdparty-nnx\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[nnx.trainers]\nThirdPartyWideTrainer = thirdparty_nnx.trainers:ThirdPartyWideTrainer\n")
    return str(root)


def test_baseline_and_plugins_registered():
    names = trainer_names()
    assert names[0] == "nnUNetTrainer"
    assert "RotNPCTrainer" in names
    info = describe(load_trainer("nnUNetTrainer"))
    assert info["baseline"] and info["memory_profile"]["activation_factor"] == 1.0
    assert info["inference_network_is_stock"]
    rot = describe(load_trainer("RotNPCTrainer"))
    assert rot["source"] and "pretrain_fraction" in rot["options"] and "epochs" in rot["options"]


def test_unknown_trainer_suggests_closest():
    with pytest.raises(NNXError) as e:
        load_trainer("RotNPCTrainr")
    assert "RotNPCTrainer" in str(e.value) and "\n" not in str(e.value)


def test_third_party_entry_point(third_party):
    env = {"PYTHONPATH": third_party + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = run_cli([sys.executable, "-m", "nnx.cli.trainers", "--json"], env=env)
    assert r.returncode == 0, r.stderr
    infos = {i["name"]: i for i in json.loads(r.stdout)}
    assert {"nnUNetTrainer", "RotNPCTrainer", "ThirdPartyWideTrainer"} <= set(infos)
    tp = infos["ThirdPartyWideTrainer"]
    assert tp["options"]["width"]["default"] == 2 and tp["memory_profile"]["activation_factor"] == 2.0
    assert tp["inference_network_is_stock"] is False
    r = run_cli([sys.executable, "-m", "nnx.cli.trainers"], env=env)
    assert "ThirdPartyWideTrainer" in r.stdout and "not exportable" in r.stdout
    # export refuses, with a clear one-line message, before touching anything
    target = os.path.join(third_party, "exported")
    r = run_cli([sys.executable, "-m", "nnx.cli.export", "-d", "1", "-c", "3d_fullres", "-f", "0", "-tr",
                 "ThirdPartyWideTrainer", "-o", target], env=env)
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "ThirdPartyWideTrainer" in err[0] and "cannot run as plain nnU-Net" in err[0]
    assert not os.path.exists(target)


def test_shim_gives_stable_picklable_classes(monkeypatch):
    from nnx.ext_path import SHIM_DIR
    monkeypatch.setenv("nnUNet_extTrainer", SHIM_DIR)
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    a = recursive_find_trainer_class_by_name("RotNPCTrainer")
    b = recursive_find_trainer_class_by_name("RotNPCTrainer")
    assert a is b is load_trainer("RotNPCTrainer")
    assert pickle.loads(pickle.dumps(a)) is a
    # the shim does not shadow stock trainers, and unknown names still fail the stock way
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    assert recursive_find_trainer_class_by_name("nnUNetTrainer") is nnUNetTrainer
    with pytest.raises(RuntimeError):
        recursive_find_trainer_class_by_name("NoSuchTrainerAnywhere")


def test_options_validation():
    cls = load_trainer("RotNPCTrainer")
    vals = options.resolve(cls, options.parse_opts_string("epochs=3 iters_per_epoch=4,initial_lr=0.001"))
    assert vals["epochs"] == 3 and vals["iters_per_epoch"] == 4 and vals["initial_lr"] == 0.001
    with pytest.raises(NNXError) as e:
        options.resolve(cls, {"epoch": "3"})
    assert "unknown option 'epoch'" in str(e.value) and "epochs" in str(e.value)
    with pytest.raises(NNXError) as e:
        options.resolve(cls, {"epochs": "three"})
    assert "expects int" in str(e.value)
    with pytest.raises(NNXError):
        options.parse_opts_string("epochs")


def test_stock_trainer_gets_common_options_only():
    cls = load_trainer("nnUNetTrainer")
    assert set(options.declared_options(cls)) == set(options.COMMON_OPTIONS)
    with pytest.raises(NNXError):
        options.resolve(cls, {"pretrain_fraction": "0.5"})
