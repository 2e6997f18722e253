"""Tests of the 3DRotNPC plugin (``nnx_plugins.rotnpc``): transform, loss, head, learnability, trainer end to end."""
from __future__ import annotations

import copy
import json
import math
import os

import numpy as np
import pytest
import torch

from nnx_plugins.rotnpc.head import RotationHead, build_rotation_head, slice_groups
from nnx_plugins.rotnpc.loss import (balanced_accuracy, batch_inverse_frequency_weights, confusion_matrix,
                                     rotation_loss)
from nnx_plugins.rotnpc.rotation import num_rotated_slices, rotate_slices, unrotate_slices


def _unet(features, strides, in_ch=1, n_cls=2, deep_supervision=False):
    from dynamic_network_architectures.architectures.unet import PlainConvUNet
    n = len(features)
    kernels = [(1, 3, 3)] + [(3, 3, 3)] * (n - 1)
    return PlainConvUNet(in_ch, n, features, torch.nn.Conv3d, kernels, strides, 2, n_cls, 2, True,
                         torch.nn.InstanceNorm3d, {"eps": 1e-5, "affine": True}, None, None,
                         torch.nn.LeakyReLU, {"inplace": True}, deep_supervision=deep_supervision)


# ----------------------------------------------------------------------------------------------- transform (Eq. 4.1)
def test_transform_selects_k_slices_and_is_invertible():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 2, 16, 12, 12, generator=g)
    out = rotate_slices(x, rotated_fraction=0.25, generator=g)
    assert out.data.shape == x.shape and out.labels.shape == (8, 16) and out.labels.dtype == torch.long
    assert torch.equal(out.selected.sum(1), torch.full((8,), 4))             # exactly k = 4 of 16 per volume
    assert set(out.labels[out.selected].tolist()) <= {0, 1, 2, 3}
    assert torch.all(out.labels[~out.selected] == 0)                          # unchosen slices: class 0
    # unchosen slices and chosen ones with y = 0 are bit-identical; y > 0 slices differ
    same = (out.data == x).flatten(3).all(-1).all(1)                          # (B, D)
    assert torch.all(same[out.labels == 0])
    assert not torch.any(same[out.labels > 0])
    # each rotated slice is rot90 of its original, all channels alike
    b, s = torch.nonzero(out.labels)[0].tolist()
    y = int(out.labels[b, s])
    assert torch.equal(out.data[b, :, s], torch.rot90(x[b, :, s], y, dims=(-2, -1)))
    # exact inverse; the input is not modified in place
    assert torch.equal(unrotate_slices(out.data, out.labels), x)
    x0 = x.clone()
    rotate_slices(x)
    assert torch.equal(x, x0)


def test_transform_label_frequencies():
    g = torch.Generator().manual_seed(1)
    out = rotate_slices(torch.zeros(4000, 1, 16, 2, 2), generator=g)
    freq = np.bincount(out.labels.flatten().numpy(), minlength=4) / out.labels.numel()
    assert abs(freq[0] - 13 / 16) < 0.01
    assert np.all(np.abs(freq[1:] - 1 / 16) < 0.005)


def test_number_of_rotated_slices():
    assert num_rotated_slices(16) == 4                        # thesis: 4 of 16
    assert num_rotated_slices(10, 0.25) == 3                  # 2.5 rounds half up
    assert num_rotated_slices(2, 0.25) == 1                   # at least one slice
    assert num_rotated_slices(16, rotated_slices=6) == 6      # explicit k wins
    assert num_rotated_slices(4, rotated_slices=9) == 4       # never more than D
    with pytest.raises(ValueError):
        num_rotated_slices(16, 0.0)


def test_transform_nonsquare_crop_and_error():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, 1, 8, 12, 8, generator=g)              # in-plane 12 x 8: centred 8 x 8 square is rows 2..9
    out = rotate_slices(x, rotated_fraction=0.5, nonsquare="crop", generator=g)
    assert out.data.shape == x.shape
    assert torch.equal(out.data[..., :2, :], x[..., :2, :]) and torch.equal(out.data[..., 10:, :], x[..., 10:, :])
    b, s = torch.nonzero(out.labels)[0].tolist()
    y = int(out.labels[b, s])
    assert torch.equal(out.data[b, :, s, 2:10, :], torch.rot90(x[b, :, s, 2:10, :], y, dims=(-2, -1)))
    assert torch.equal(unrotate_slices(out.data, out.labels, nonsquare="crop"), x)
    with pytest.raises(ValueError, match="square"):
        rotate_slices(x, nonsquare="error")
    rotate_slices(torch.zeros(1, 1, 4, 8, 8), nonsquare="error")  # square is fine


# ------------------------------------------------------------------------------------------------ loss (Eq. 4.2-4.3)
def test_loss_matches_hand_computation():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(1, 6, 4, generator=g)
    labels = torch.tensor([[0, 0, 0, 1, 1, 2]])
    # p = (3/6, 2/6, 1/6, 0)  ->  w = (2, 3, 6, 0)
    assert torch.allclose(batch_inverse_frequency_weights(labels), torch.tensor([2.0, 3.0, 6.0, 0.0]))
    z = logits.reshape(-1, 4).double().numpy()
    y = labels.reshape(-1).numpy()
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    nll = -logp[np.arange(6), y]
    w = np.array([2.0, 3.0, 6.0, 0.0])[y]
    expected = (w * nll).sum() / w.sum()
    # equivalently: mean over the present classes of the per-class mean CE
    per_class = [nll[y == c].mean() for c in (0, 1, 2)]
    assert math.isclose(expected, float(np.mean(per_class)), rel_tol=1e-12)
    got = rotation_loss(logits, labels)
    assert math.isclose(float(got), expected, rel_tol=1e-5)


def test_loss_degenerate_and_balanced_batches():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 8, 4, generator=g, requires_grad=True)
    zeros = torch.zeros(2, 8, dtype=torch.long)
    lz = rotation_loss(logits, zeros)                         # all-0 batch: finite, equals plain CE
    assert torch.isfinite(lz)
    assert torch.allclose(lz, torch.nn.functional.cross_entropy(logits.reshape(-1, 4), zeros.reshape(-1)))
    lz.backward()
    assert torch.isfinite(logits.grad).all()
    balanced = torch.arange(16).reshape(2, 8) % 4             # every class 4 times: weights equal -> plain CE
    assert torch.allclose(rotation_loss(logits, balanced),
                          torch.nn.functional.cross_entropy(logits.reshape(-1, 4), balanced.reshape(-1)))


def test_confusion_and_balanced_accuracy():
    labels = torch.tensor([[0, 0, 0, 0, 1, 2]])
    logits = torch.nn.functional.one_hot(torch.tensor([[0, 0, 0, 1, 1, 0]]), 4).float()
    conf = confusion_matrix(logits, labels)
    assert conf.tolist() == [[3, 1, 0, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]
    assert math.isclose(balanced_accuracy(conf), (3 / 4 + 1 + 0) / 3)   # class 3 absent: not counted
    assert math.isnan(balanced_accuracy(np.zeros((4, 4))))


# ------------------------------------------------------------------------------------------------------------- head
def test_head_shape_on_anisotropic_plainconvunet():
    net = _unet((8, 16, 32, 64), ((1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 2)))
    head = build_rotation_head(net, 1, (16, 32, 32), hidden=32)
    assert head.config["in_channels"] == 64 and head.config["num_groups"] == 4   # bottleneck (4, 4, 4)
    x = rotate_slices(torch.randn(2, 1, 16, 32, 32)).data
    feats = net.encoder(x)
    assert feats[-1].shape == (2, 64, 4, 4, 4)
    logits = head(feats)
    assert logits.shape == (2, 16, 4)
    rotation_loss(logits, torch.zeros(2, 16, dtype=torch.long)).backward()
    assert net.encoder.stages[0][0].convs[0].conv.weight.grad is not None      # gradient reaches the encoder
    assert all(p.grad is None for p in net.decoder.seg_layers.parameters())    # decoder unused
    # adaptive pooling: any bottleneck size works; the group count divides D
    assert RotationHead(8, 12, num_groups=slice_groups(12, 5), pool_hw=2, hidden=4)(torch.randn(1, 8, 3, 5, 7)).shape \
        == (1, 12, 4)
    assert [slice_groups(16, d) for d in (1, 3, 4, 8, 16)] == [1, 2, 4, 8, 16]
    assert slice_groups(12, 5) == 4 and slice_groups(7, 3) == 1


def test_head_on_residual_encoder_unet():
    from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet
    net = ResidualEncoderUNet(1, 3, (8, 16, 32), torch.nn.Conv3d, ((1, 3, 3), (3, 3, 3), (3, 3, 3)),
                              ((1, 1, 1), (1, 2, 2), (2, 2, 2)), (1, 1, 1), 2, (1, 1), True, torch.nn.InstanceNorm3d,
                              {"eps": 1e-5, "affine": True}, None, None, torch.nn.LeakyReLU, {"inplace": True})
    head = build_rotation_head(net, 1, (8, 16, 24), hidden=16)
    assert head(net.encoder(torch.randn(2, 1, 8, 16, 24))).shape == (2, 8, 4)


# ----------------------------------------------------------------------------------------------------- learnability
def _l_shapes(b, g, d=16, hw=32):
    """Off-centre L-shaped bright structure through all slices, random offset, random in-plane flips (as nnU-Net's
    mirroring), noise."""
    x = 0.3 * torch.randn(b, 1, d, hw, hw, generator=g)
    for i in range(b):
        oy, ox = torch.randint(2, 10, (2,), generator=g).tolist()
        x[i, 0, :, oy:oy + 16, ox:ox + 4] += 2.0
        x[i, 0, :, oy + 12:oy + 16, ox:ox + 12] += 2.0
        for axis in (2, 3):
            if torch.rand(1, generator=g).item() < 0.5:
                x[i] = x[i].flip(axis)
    return x


@pytest.fixture
def one_thread():
    """One intra-op thread: tiny convolutions gain nothing from more, and OpenMP spinning is very slow when the
    CPU is shared with other processes."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_encoder_and_head_learn_the_pretext_task(one_thread):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    net = _unet((8, 16, 32), ((1, 1, 1), (1, 2, 2), (2, 2, 2)))
    head = build_rotation_head(net, 1, (16, 32, 32), hidden=64)
    params = list(net.encoder.parameters()) + list(head.parameters())
    opt = torch.optim.SGD(params, 1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5)   # nnU-Net's optimizer
    for _ in range(200):                                   # ~0.9 balanced accuracy after 150 steps
        x, y, _ = rotate_slices(_l_shapes(4, g), generator=g)
        loss = rotation_loss(head(net.encoder(x)), y)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 12)
        opt.step()
    net.eval()
    head.eval()
    conf = np.zeros((4, 4), dtype=np.int64)
    with torch.no_grad():
        for _ in range(8):
            x, y, _ = rotate_slices(_l_shapes(8, g), generator=g)
            conf += confusion_matrix(head(net.encoder(x)), y)
    assert balanced_accuracy(conf) > 0.5, conf                                             # chance: 0.25


# --------------------------------------------------------------------------------------------- trainer end to end
DATASET_ID = 987
DATASET = "Dataset987_RotNPCTiny"


def _write_dataset(raw):
    import SimpleITK as sitk
    ds = os.path.join(raw, DATASET)
    os.makedirs(os.path.join(ds, "imagesTr"))
    os.makedirs(os.path.join(ds, "labelsTr"))
    rng = np.random.default_rng(0)
    zz, yy, xx = np.meshgrid(np.arange(16), np.arange(32), np.arange(32), indexing="ij")
    for i in range(6):
        c = rng.uniform([6, 10, 10], [10, 22, 22])
        r = rng.uniform(4, 6)
        lab = ((((zz - c[0]) * 3) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2) < r ** 2).astype(np.uint8)
        img = (100 + rng.normal(0, 1, lab.shape) + 50 * lab).astype(np.float32)
        for arr, name in ((img, f"imagesTr/case_{i:03d}_0000.nii.gz"), (lab, f"labelsTr/case_{i:03d}.nii.gz")):
            im = sitk.GetImageFromArray(arr)
            im.SetSpacing((1.0, 1.0, 3.0))
            sitk.WriteImage(im, os.path.join(ds, name))
    with open(os.path.join(ds, "dataset.json"), "w") as f:
        json.dump({"channel_names": {"0": "MRI"}, "labels": {"background": 0, "lesion": 1}, "numTraining": 6,
                   "file_ending": ".nii.gz", "overwrite_image_reader_writer": "SimpleITKIO"}, f)
    return ds


@pytest.fixture(scope="module")
def rotnpc_env(tmp_path_factory):
    """Tiny anisotropic dataset (6 cases, 16 x 32 x 32, spacing 3 x 1 x 1), planned and preprocessed (3d_fullres)."""
    root = tmp_path_factory.mktemp("rotnpc_nnunet")
    mp = pytest.MonkeyPatch()
    for key in ("raw", "preprocessed", "results"):
        os.makedirs(root / key)
        mp.setenv(f"nnUNet_{key}", str(root / key))
    mp.setenv("nnUNet_def_n_proc", "1")
    mp.delenv("nnUNet_n_proc_DA", raising=False)        # 0 breaks planning; set after planning
    mp.setenv("nnUNet_compile", "0")
    try:
        raw_ds = _write_dataset(str(root / "raw"))
        from nnunetv2.experiment_planning.plan_and_preprocess_api import plan_experiments, preprocess
        from nnx.cli.plan import extract_fingerprint
        extract_fingerprint(DATASET_ID, 1, True, samples=1_000_000)  # nnU-Net's extractor, 1e6 samples (not 1e8)
        plan_experiments([DATASET_ID])
        preprocess([DATASET_ID], configurations=("3d_fullres",), num_processes=(1,), show_progress_bar=False)
        mp.setenv("nnUNet_n_proc_DA", "0")
        yield {"root": root, "pp": str(root / "preprocessed" / DATASET), "raw": raw_ds, "mp": mp}
    finally:
        mp.undo()


def _make_trainer(env, opts, fold=0, continue_training=False):
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnx_plugins.rotnpc.trainer import RotNPCTrainer
    env["mp"].setenv("NNX_TRAINER_OPTS", opts)
    plans = load_json(os.path.join(env["pp"], "nnUNetPlans.json"))
    plans["continue_training"] = continue_training      # what get_trainer_from_args adds
    return RotNPCTrainer(plans=plans, configuration="3d_fullres", fold=fold,
                         dataset_json=load_json(os.path.join(env["pp"], "dataset.json")), device=torch.device("cpu"))


def _is_decoder_key(k):
    return k.startswith("decoder.") and not k.startswith("decoder.encoder.")


@pytest.fixture(scope="module")
def trained(rotnpc_env):
    """One run: 2 epochs x 2 iterations, the first epoch is the pretext phase."""
    tr = _make_trainer(rotnpc_env, "epochs=2 iters_per_epoch=2 val_iters=1 pretrain_epochs=1")
    tr.initialize()
    snaps = {"init": copy.deepcopy(tr.network.state_dict())}
    switch = tr._rotnpc_switch_to_finetune

    def spy():
        snaps["switch"] = copy.deepcopy(tr.network.state_dict())
        snaps["switch_epoch"] = tr.current_epoch
        snaps["head_at_switch"] = copy.deepcopy(tr.rotnpc_head.state_dict())
        switch()

    tr._rotnpc_switch_to_finetune = spy
    tr.run_training()
    return tr, snaps


@pytest.mark.slow
def test_trainer_phases_and_logging(trained):
    tr, snaps = trained
    assert snaps["switch_epoch"] == 1 and tr.rotnpc_phase == "finetune" and tr.rotnpc_switch_epoch == 1
    log = tr.logger.local_logger.my_fantastic_logging
    assert log["rotnpc_phase"] == [0, 1]
    assert np.isfinite(log["rotnpc_train_loss"][0]) and np.isnan(log["rotnpc_train_loss"][1])
    assert 0.0 <= log["rotnpc_val_bacc"][0] <= 1.0 and np.isnan(log["rotnpc_val_bacc"][1])
    assert log["mean_fg_dice"][0] == 0.0
    assert log["ema_fg_dice"][1] == log["mean_fg_dice"][1]          # EMA restarts with fine-tuning
    assert all(len(v) == 2 for v in log.values())                   # one value per epoch for every key
    with open(os.path.join(tr.output_folder, "nnx_config.json")) as f:
        cfg = json.load(f)
    assert cfg["trainer"] == "RotNPCTrainer" and cfg["options"]["pretrain_epochs"] == 1


@pytest.mark.slow
def test_trainer_pretext_updates_encoder_only(trained):
    tr, snaps = trained
    init, at_switch, final = snaps["init"], snaps["switch"], tr.network.state_dict()
    enc = [k for k in init if k.startswith("encoder.") and k.endswith("weight")]
    dec = [k for k in init if _is_decoder_key(k)]
    assert enc and dec and any(".seg_layers." in k for k in dec)
    assert all(not torch.equal(init[k], at_switch[k]) for k in enc if ".conv." in k)      # pretext trained encoder
    assert all(torch.equal(init[k], at_switch[k]) for k in dec)                             # decoder untouched
    assert any(not torch.equal(at_switch[k], final[k]) for k in dec)                        # fine-tune trains it
    assert all(torch.equal(snaps["head_at_switch"][k], v) for k, v in tr.rotnpc_head.state_dict().items())  # idle


@pytest.mark.slow
def test_checkpoint_is_stock_and_predictable(trained, rotnpc_env):
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    tr, _ = trained
    ckpt = torch.load(os.path.join(tr.output_folder, "checkpoint_final.pth"), map_location="cpu", weights_only=False)
    stock = nnUNetTrainer.build_network_architecture(tr.plans_manager, tr.configuration_manager, 1,
                                                     tr.label_manager.num_segmentation_heads, False)
    assert set(ckpt["network_weights"]) == set(stock.state_dict())
    stock.load_state_dict(ckpt["network_weights"])                                         # strict
    extra = ckpt["nnx_extra"]
    assert extra["phase"] == "finetune" and extra["switch_epoch"] == 1
    assert set(extra["head_state"]) == set(tr.rotnpc_head.state_dict())
    assert "head_optimizer_state" in extra and ckpt["nnx_trainer_name"] == "RotNPCTrainer"

    pred = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                           perform_everything_on_device=False, device=torch.device("cpu"), allow_tqdm=False)
    pred.manual_initialization(stock, tr.plans_manager, tr.configuration_manager, [ckpt["network_weights"]],
                               tr.dataset_json, "nnUNetTrainer", ckpt["inference_allowed_mirroring_axes"])
    img, props = SimpleITKIO().read_images([os.path.join(rotnpc_env["raw"], "imagesTr", "case_000_0000.nii.gz")])
    seg = pred.predict_single_npy_array(img, props, None, None, False)
    assert seg.shape == img.shape[1:]


@pytest.mark.slow
def test_trainer_continue_restores_phase(rotnpc_env):
    from nnunetv2.run.run_training import maybe_load_checkpoint
    # run A: pretext only (1 epoch), i.e. interrupted right before the switch
    a = _make_trainer(rotnpc_env, "epochs=1 iters_per_epoch=1 val_iters=1 pretrain_epochs=1", fold=1)
    a.run_training()
    assert a.rotnpc_phase == "pretext"
    head_a = copy.deepcopy(a.rotnpc_head.state_dict())
    # run B (--c, 2 epochs): resumes in the pretext phase with A's head, then switches at epoch 1
    b = _make_trainer(rotnpc_env, "epochs=2 iters_per_epoch=1 val_iters=1 pretrain_epochs=1", fold=1,
                      continue_training=True)
    maybe_load_checkpoint(b, True, False)
    assert b.current_epoch == 1 and b.rotnpc_phase == "pretext"
    assert all(torch.equal(head_a[k], v) for k, v in b.rotnpc_head.state_dict().items())
    assert len(b.rotnpc_head_optimizer.state) > 0                      # momentum buffers restored
    b.run_training()
    assert b.rotnpc_phase == "finetune" and b.rotnpc_switch_epoch == 1
    assert b.logger.local_logger.my_fantastic_logging["rotnpc_phase"] == [0, 1]
    # run C (--c, 3 epochs): resumes in the fine-tune phase with its schedule over epochs [1, 3)
    c = _make_trainer(rotnpc_env, "epochs=3 iters_per_epoch=1 val_iters=1 pretrain_epochs=1", fold=1,
                      continue_training=True)
    maybe_load_checkpoint(c, True, False)
    assert c.current_epoch == 2 and c.rotnpc_phase == "finetune" and c.rotnpc_switch_epoch == 1
    assert c.lr_scheduler.start_step == 1 and c.lr_scheduler.max_steps == 2
    c.run_training()
    log = c.logger.local_logger.my_fantastic_logging
    assert log["rotnpc_phase"] == [0, 1, 1]
    assert math.isclose(log["lrs"][2], 1e-2 * (1 - 1 / 2) ** 0.9)


def test_bad_options_fail_before_any_folder(monkeypatch, tmp_path):
    from nnx.errors import NNXError
    from nnx_plugins.rotnpc.trainer import RotNPCTrainer
    monkeypatch.setenv("nnUNet_results", str(tmp_path))
    for opts in ("pretrain_fraction=1.5", "rotated_fraction=0", "nonsquare=pad", "head_hidden=0"):
        monkeypatch.setenv("NNX_TRAINER_OPTS", opts)
        with pytest.raises(NNXError):
            RotNPCTrainer({"continue_training": False}, "3d_fullres", 0, {}, torch.device("cpu"))
    assert list(tmp_path.iterdir()) == []
