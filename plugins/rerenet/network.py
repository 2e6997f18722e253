"""The ReReNet network: the planned nnU-Net network applied recurrently (thesis Eq. 3.1, spec M1.2/M1.3/M1.7).

``ŷ^k = f_θ(x ⊕ onehot(ŷ^{k-1}))``, k = 1..K, ``ŷ^0`` = the coarse (non-expert) mask, one network ``f_θ`` with
shared weights, the hard (argmax) mask of stage k fed to stage k+1 without gradient.

:class:`RecurrentRefiner` wraps the network nnU-Net builds from the plans (stock ``build_network_architecture``)
with ``C_img + C_fg`` input channels: the image channels, then one channel per foreground label (the one-hot mask,
in the order nnx's loader and nnU-Net's cascade input use: labels 1..C_fg).

* **train mode**: ``forward(x)`` is one stage (one pass of the wrapped network on ``x`` as given); the trainer runs
  the stage loop itself, because the thesis updates the weights between stages.
* **eval mode**: ``forward(x)`` runs all K stages and returns the last stage's output (a list when deep supervision
  is on, as nnU-Net's validation step expects), so nnU-Net's predictor (sliding window, mirroring), nnU-Net's
  validation and ``nnx_predict`` work unchanged. The recurrence therefore happens per sliding-window tile (and per
  mirrored copy), not on the whole image: a deviation from the thesis' whole-slice 2D inference for images larger
  than the patch.
* **K travels with the weights**: it is the buffer ``num_stages`` of the state dict, so any predictor that builds
  the network from the plans and loads a checkpoint runs the K the model was trained with.
* **Input without mask channels** (stock ``nnUNetv2_predict`` without ``-prev_stage_predictions``): a clear error;
  ReReNet needs the coarse mask of every case at inference (thesis M1.1).
"""
from __future__ import annotations

from typing import List, Optional, Tuple, Union

import torch
from torch import nn

Output = Union[torch.Tensor, List[torch.Tensor]]


class MissingMaskInputError(RuntimeError):
    """The network got only the image channels (no coarse-mask channels)."""


def full_resolution(output: Output) -> torch.Tensor:
    """The full-resolution logits of a network output (the first deep-supervision output, or the tensor)."""
    return output[0] if isinstance(output, (list, tuple)) else output


def onehot_mask(seg: torch.Tensor, num_classes: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Label map ``(B, *spatial)`` -> one-hot of the foreground labels 1..num_classes-1, ``(B, C_fg, *spatial)``."""
    values = torch.arange(1, num_classes, device=seg.device).view(1, -1, *([1] * (seg.ndim - 1)))
    return (seg.unsqueeze(1) == values).to(dtype)


def decode_mask(onehot: torch.Tensor) -> torch.Tensor:
    """One-hot foreground channels ``(B, C_fg, *spatial)`` (values 0/1) -> label map ``(B, *spatial)`` (long);
    voxels with no channel set are background (0)."""
    on = onehot > 0.5
    labels = torch.arange(1, onehot.shape[1] + 1, device=onehot.device).view(1, -1, *([1] * (onehot.ndim - 2)))
    return (on.long() * labels).amax(1)


class RecurrentRefiner(nn.Module):
    """K-stage recurrent refinement around a segmentation network (see the module docstring).

    ``unet``: the planned network with ``num_image_channels + num_classes - 1`` input channels and ``num_classes``
    outputs (nnU-Net's segmentation heads, background included; label-based, not region-based training).
    """

    def __init__(self, unet: nn.Module, num_image_channels: int, num_classes: int, num_stages: int = 5):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"ReReNet needs at least one foreground class, got {num_classes} output channel(s)")
        if num_stages < 1:
            raise ValueError(f"num_stages must be >= 1, got {num_stages}")
        self.unet = unet
        self.num_image_channels = int(num_image_channels)
        self.num_classes = int(num_classes)
        self.register_buffer("num_stages", torch.tensor(int(num_stages), dtype=torch.long))

    # nnU-Net toggles deep supervision through ``network.decoder.deep_supervision``
    @property
    def decoder(self) -> nn.Module:
        return self.unet.decoder

    @property
    def encoder(self) -> nn.Module:
        return self.unet.encoder

    @property
    def num_mask_channels(self) -> int:
        return self.num_classes - 1

    @property
    def num_input_channels(self) -> int:
        return self.num_image_channels + self.num_mask_channels

    @property
    def K(self) -> int:
        return int(self.num_stages)

    def set_num_stages(self, k: int) -> None:
        if int(k) < 1:
            raise ValueError(f"num_stages must be >= 1, got {k}")
        self.num_stages.fill_(int(k))

    # -- inputs --------------------------------------------------------------------------------------------------
    def split(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``x`` -> (image channels, mask label map ``(B, *spatial)``)."""
        if x.shape[1] == self.num_image_channels:
            raise MissingMaskInputError(
                "ReReNet needs the coarse (non-expert) mask of every case as input: use nnx_predict -inputs "
                "coarse=FOLDER, or stock nnUNetv2_predict with -prev_stage_predictions FOLDER (one CASE<file_ending> "
                "mask per image)")
        if x.shape[1] != self.num_input_channels:
            raise ValueError(f"expected {self.num_image_channels} image + {self.num_mask_channels} mask channels, "
                             f"got {x.shape[1]} input channels")
        return x[:, :self.num_image_channels], decode_mask(x[:, self.num_image_channels:])

    def stage_input(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``x ⊕ onehot(ŷ)``: image channels and the one-hot of a label map ``(B, *spatial)``."""
        return torch.cat((image, onehot_mask(mask, self.num_classes, image.dtype)), 1)

    @staticmethod
    def hard_mask(output: Output) -> torch.Tensor:
        """The stage's hard mask: argmax of the full-resolution logits, detached, ``(B, *spatial)`` long."""
        return full_resolution(output).detach().argmax(1)

    # -- forward -------------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> Output:
        if self.training:
            return self.unet(x)
        outputs, _ = self.refine(x)
        return outputs[-1]

    def refine(self, x: torch.Tensor, num_stages: Optional[int] = None, keep_all: bool = False
               ) -> Tuple[List[Output], List[torch.Tensor]]:
        """Run K stages on ``x`` (image + one-hot coarse mask). Returns ``(outputs, masks)``: ``masks[0]`` is the
        coarse mask, ``masks[k]`` the hard mask of stage k (``masks[k-1]`` is what stage k saw); ``outputs`` holds
        every stage's output if ``keep_all`` else only the last one."""
        k_total = self.K if num_stages is None else int(num_stages)
        if k_total < 1:
            raise ValueError(f"num_stages must be >= 1, got {k_total}")
        image, mask = self.split(x)
        masks = [mask]
        outputs: List[Output] = []
        inp = x
        for k in range(k_total):
            out = self.unet(inp)
            mask = self.hard_mask(out)
            masks.append(mask)
            outputs = outputs + [out] if keep_all else [out]
            if k + 1 < k_total:
                inp = self.stage_input(image, mask)
        return outputs, masks


def build_recurrent_network(plans_manager, configuration_manager, num_input_channels: int, num_output_channels: int,
                            enable_deep_supervision: bool = True, num_stages: int = 5) -> RecurrentRefiner:
    """The planned nnU-Net network (stock ``build_network_architecture``) with the mask channels, wrapped.

    ``num_input_channels`` may count the mask channels (nnx training, ``nnx_predict``) or not (stock
    ``nnUNetv2_predict``, which counts the images only): the wrapped network always has image + mask channels, so
    the same weights load in both.
    """
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    if configuration_manager.previous_stage_name is not None:
        raise ValueError("ReReNet does not support cascaded configurations (its mask input is the coarse mask)")
    n_img = len(configuration_manager.normalization_schemes)
    n_fg = int(num_output_channels) - 1
    if int(num_input_channels) not in (n_img, n_img + n_fg):
        raise ValueError(f"ReReNet expects {n_img} image channel(s) (+ {n_fg} coarse-mask channel(s)), got "
                         f"{num_input_channels} input channels")
    unet = nnUNetTrainer.build_network_architecture(plans_manager, configuration_manager, n_img + n_fg,
                                                    num_output_channels, enable_deep_supervision)
    return RecurrentRefiner(unet, n_img, num_output_channels, num_stages)


def unwrap(network: nn.Module) -> RecurrentRefiner:
    """The :class:`RecurrentRefiner` inside DDP / torch.compile wrappers."""
    mod = network
    for _ in range(3):
        if isinstance(mod, RecurrentRefiner):
            return mod
        mod = getattr(mod, "module", None) or getattr(mod, "_orig_mod", None) or mod
    if not isinstance(mod, RecurrentRefiner):
        raise TypeError(f"not a ReReNet network: {type(network).__name__}")
    return mod


__all__ = ["RecurrentRefiner", "MissingMaskInputError", "build_recurrent_network", "onehot_mask", "decode_mask",
           "full_resolution", "unwrap"]
