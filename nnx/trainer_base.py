"""Base class of every nnx trainer.

An nnx trainer is an ``nnUNetTrainer`` subclass with the exact constructor signature
``(plans, configuration, fold, dataset_json, device)`` plus a few class attributes that nnx reads without
instantiating it:

``nnx_summary``      one line shown by ``nnx_trainers``
``nnx_source``       source document / spec section
``nnx_requires``     what it trains on (defaults in ``DEFAULT_REQUIRES``; see docs/dataset_format.md):
                     ``tiers``  labeled tiers its labeled loader samples (``expert``, ``coarse``, ``scribble``);
                     ``batch``  named entries in every batch: ``coarse``, ``scribbles``, ``train_only``, aux map
                                names, and ``unlabeled`` (a separate image-only batch, ``unlabeled_batch_size``);
                     ``inputs`` label entries appended one-hot to the network input, in training, validation
                                and ``nnx_predict`` (which then needs them per test case); the encoding
                                (one-hot, grouped, scaled) comes from :meth:`nnx_input_encoding`
``nnx_options``      ``{"key": Option(default, "help")}``: its own options (common ones are always there);
                     ranges and combinations are checked in the classmethod ``nnx_check_options``
``nnx_memory``       memory profile for planning (see :mod:`nnx.memory`)
``nnx_inference_network_is_stock``  False if inference needs more than nnU-Net's own network
``nnx_stock_network_weights``  None, or for trainers whose inference network is their own module but whose
                     inference *output* can be nnU-Net's own network's (e.g. one member of a pair) a function from a
                     checkpoint's ``network_weights`` to that stock network's weights, raising ``ValueError(reason)``
                     for a stored configuration that needs more; ``nnx_export`` uses it
``nnx_overhead_options``  options (key -> string) the ``nnx_bench overhead`` suite gives the trainer, for trainers
                     that cannot run on their defaults alone (e.g. one that needs a trained model as an option)
``nnx_inference_options``  names of options that ``nnx_predict --opt`` may change for prediction (the others are
                     the training run's, from ``<fold>/nnx_config.json``); read by :meth:`nnx_inference_network`

Options are read from ``NNX_TRAINER_OPTS`` (set by ``nnx_train`` or by the user under stock ``nnUNetv2_train``),
validated *before* nnU-Net creates any output folder, applied, and written to ``<fold>/nnx_config.json``.
Modules that must not reach inference (teachers, heads) live outside ``self.network``, are created before
``configure_optimizers()`` and saved under the checkpoint key ``nnx_extra`` through :meth:`nnx_extra_state`.
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from nnunetv2.training.nnUNetTrainer import nnUNetTrainer as _stock_trainer_module
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnx import options as nnx_options
from nnx.compat import patched
from nnx.errors import NNXError

DEFAULT_REQUIRES = {"tiers": ("expert", "coarse", "scribble"), "batch": (), "inputs": ()}


class nnxTrainerMixin:
    """Marker + option handling shared by all nnx trainers (use :class:`nnxTrainer`)."""

    nnx_summary: str = ""
    nnx_source: str = ""
    nnx_requires: Dict[str, Any] = {}
    nnx_options: Dict[str, nnx_options.Option] = {
        "unlabeled_batch_size": nnx_options.Option(
            0, "batch size of the unlabeled batch (trainers whose nnx_requires batch has 'unlabeled'); "
               "0 = the labeled batch size", int, attr="nnx_unlabeled_batch_size"),
    }
    nnx_memory: Dict[str, Any] = {}
    nnx_inference_network_is_stock: bool = True
    nnx_stock_network_weights: Optional[Callable[[Dict[str, Any]], Dict[str, Any]]] = None
    nnx_overhead_options: Dict[str, str] = {}
    nnx_inference_options: Tuple[str, ...] = ()

    @classmethod
    def nnx_inference_network(cls, network: torch.nn.Module, folds: List[Dict[str, Any]], predictor
                              ) -> Optional[Tuple[torch.nn.Module, List[Dict[str, Any]]]]:
        """What ``nnx_predict`` runs. ``None`` (default): nnU-Net's planned ``network`` with each fold's
        ``network_weights``. Or ``(module, state_dicts)``: a module that replaces the network at inference (it gets
        the same preprocessed input and returns the same logits) and one ``module.load_state_dict`` dict per fold.
        ``folds``: one ``{"dir", "checkpoint", "options"}`` per fold; ``options`` are the fold's training options
        (``nnx_config.json``) with ``nnx_predict --opt`` overrides of :attr:`nnx_inference_options` applied.
        ``predictor``: the initialised ``nnUNetPredictor`` (plans, configuration, dataset.json, device)."""
        return None

    @contextlib.contextmanager
    def nnx_eval_network(self):
        """While active, ``self.network`` is what eval mode runs: nnU-Net's per-epoch validation, the final
        validation and ``nnx_bench``'s inference timing go through it. Default: the network itself. Override for a
        trainer whose eval-mode network wraps it (keep ``self.network`` the plain network outside)."""
        yield

    @classmethod
    def nnx_check_options(cls, values: Dict[str, Any], source: str) -> None:
        """Check option values beyond type and choices (ranges, combinations); raise NNXError(msg, source).
        Called by :func:`nnx.options.resolve`, i.e. by nnx_train and before nnU-Net creates any folder.
        Overrides should call ``super().nnx_check_options(values, source)``."""
        if values.get("unlabeled_batch_size", 0) < 0:
            raise NNXError("option 'unlabeled_batch_size' must be >= 0", source)

    @classmethod
    def nnx_requirements(cls) -> Dict[str, List[str]]:
        from nnx.registry import requirements
        return requirements(cls)

    def nnx_input_encoding(self, name: str, values: List[int]) -> List:
        """Channels of the network input ``name`` (an ``inputs`` entry) from its label map: by default one one-hot
        channel per foreground value. Override to group classes or scale them into one channel: return a list with
        one item per channel, an int (one-hot of that value) or ``[[value, weight], ...]`` (see
        :func:`nnx.extras.onehot`). The encoding is stored in the checkpoints (``nnx_inputs``), so ``nnx_predict``
        applies the same one."""
        return list(values)

    def nnx_extra_state(self) -> Dict[str, Any]:
        """State of plugin-only modules to store in the checkpoint (key ``nnx_extra``). Override."""
        return {}

    def nnx_load_extra_state(self, state: Dict[str, Any]) -> None:
        """Restore what :meth:`nnx_extra_state` returned. Override."""

    def nnx_register_log_keys(self, keys: Sequence[str]) -> None:
        """Add per-epoch keys to nnU-Net's logger (``self.logger``), padded with NaN up to the epochs already logged,
        so that a log restored from a checkpoint without them (an older run, another trainer) stays aligned. Call it
        in ``__init__`` and again after ``load_checkpoint``; then ``self.logger.log(key, value, epoch)`` as usual."""
        log = self.logger.local_logger.my_fantastic_logging
        n = len(log.get("epoch_end_timestamps", []))
        for key in keys:
            vals = log.setdefault(key, [])
            vals.extend([float("nan")] * (n - len(vals)))

    def nnx_batch_on_device(self, batch: Dict[str, Any]):
        """``(data, target)`` of a batch moved to ``self.device``; ``target`` stays a list under deep supervision."""
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"]
        target = [t.to(self.device, non_blocking=True) for t in target] if isinstance(target, list) else \
            target.to(self.device, non_blocking=True)
        return data, target


class nnxTrainer(nnxTrainerMixin, nnUNetTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        values = nnx_options.options_from_env(type(self))  # raises before any folder is created
        super().__init__(plans, configuration, fold, dataset_json, device)
        source = os.environ.get(nnx_options.SOURCE_ENV_VAR) or (
            nnx_options.ENV_VAR if os.environ.get(nnx_options.ENV_VAR) else "defaults")
        nnx_options.apply(self, values, source)
        self._nnx_fold = None
        self._nnx_root = None
        self._nnx_datasets = None

    # -- data: tiers, splits, entries ------------------------------------------------------------------------------
    def _nnx_spec(self):
        from nnx.tiers import DatasetSpec
        return DatasetSpec.from_dataset_json(self.dataset_json)

    def _nnx_inputs(self) -> List[Tuple[str, List]]:
        spec = self._nnx_spec()
        return [(n, self.nnx_input_encoding(n, spec.entry(n).foreground_values))
                for n in self.nnx_requirements()["inputs"]]

    def _nnx_entries(self) -> Dict[str, str]:
        """name -> kind of every entry in labeled batches (batch entries + inputs)."""
        spec, req = self._nnx_spec(), self.nnx_requirements()
        names = [n for n in list(req["batch"]) + list(req["inputs"]) if n != "unlabeled"]
        return {n: spec.entry(n).kind for n in dict.fromkeys(names)}

    def _nnx_uses_loader(self) -> bool:
        req = self.nnx_requirements()
        return bool(req["batch"] or req["inputs"] or (self._nnx_fold and self._nnx_fold.target_from))

    def do_split(self):
        if self._nnx_fold is not None:
            return self._nnx_fold.train, self._nnx_fold.val
        from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
        from nnx.fold_data import SPLIT_FILE, ensure_tiered_splits, resolve_fold
        from nnx.io_utils import atomic_write_json
        spec = self._nnx_spec()
        if self.fold != "all":
            ids = infer_dataset_class(self.preprocessed_dataset_folder).get_identifiers(self.preprocessed_dataset_folder)
            if ensure_tiered_splits(self.preprocessed_dataset_folder_base, ids, spec):
                self.print_to_log_file("nnx: wrote splits_final.json with validation folds over expert cases")
        tr, val = super().do_split()
        fd = resolve_fold(spec, tr, val, self.fold, getattr(self, "nnx_labeled", ""),
                          getattr(self, "nnx_demote_to", "none"), self.nnx_requirements()["tiers"])
        self._nnx_fold = fd
        if self.local_rank == 0:
            atomic_write_json(fd.to_json(), os.path.join(self.output_folder, SPLIT_FILE))
        by_tier = fd.to_json()["train_labeled_by_tier"]
        self.print_to_log_file(f"nnx: labeled training cases {len(fd.train)} ({by_tier}), unlabeled "
                               f"{len(fd.unlabeled)}, demoted {len(fd.demoted)} (labeled={fd.labeled_setting or 'all'},"
                               f" demote_to={fd.demote_to}), validation {len(fd.val)}")
        return fd.train, fd.val

    def _nnx_extras_root(self) -> str:
        if self._nnx_root is None:
            from nnx.fold_data import check_extras
            fd = self._nnx_fold
            needed = set(self._nnx_entries()) | set(fd.target_from.values())
            unl_entries = self._nnx_unlabeled_entries() if self._nnx_wants_unlabeled() else []
            self._nnx_root = check_extras(self.preprocessed_dataset_folder, self.plans_manager.plans,
                                          self.configuration_name, sorted(needed), fd.train + fd.val,
                                          [c for c in fd.unlabeled if fd.spec.tier(c) == "none"])
            if unl_entries:
                check_extras(self.preprocessed_dataset_folder, self.plans_manager.plans, self.configuration_name,
                             unl_entries, fd.unlabeled, [])
        return self._nnx_root

    def _nnx_wants_unlabeled(self) -> bool:
        return "unlabeled" in self.nnx_requirements()["batch"]

    def _nnx_unlabeled_entries(self) -> List[str]:
        """Entries of the unlabeled batch: everything requested except annotations (unless they are inputs)."""
        inputs = self.nnx_requirements()["inputs"]
        return [n for n in self._nnx_entries() if n in inputs or n not in ("coarse", "scribbles")]

    def get_tr_and_val_datasets(self):
        tr, val = self.do_split()
        if not self._nnx_uses_loader():
            return super().get_tr_and_val_datasets()
        from nnx.loading import ExtrasSource, nnxLabeledDataset
        src = ExtrasSource(self._nnx_extras_root(), self._nnx_entries())
        fd = self._nnx_fold
        ds_tr = nnxLabeledDataset(self.preprocessed_dataset_folder, tr, self.folder_with_segs_from_previous_stage,
                                  extras=src, target_from=fd.target_from, tiers=fd.tiers)
        ds_val = nnxLabeledDataset(self.preprocessed_dataset_folder, val, self.folder_with_segs_from_previous_stage,
                                   extras=src, tiers=fd.tiers)
        self._nnx_datasets = (ds_tr, ds_val)
        return ds_tr, ds_val

    def _nnx_unlabeled_dataset(self):
        from nnx.extras import UNLABELED
        from nnx.loading import ExtrasSource, nnxUnlabeledDataset
        fd = self._nnx_fold
        if not fd.unlabeled:
            raise NNXError(f"{type(self).__name__} needs unlabeled cases, but fold {self.fold} has none (tier 'none' "
                           f"in the dataset, or a label-ratio setting such as --opt labeled=10%)")
        root = self._nnx_extras_root()
        sources = {c: (os.path.join(root, UNLABELED) if fd.spec.tier(c) == "none" else self.preprocessed_dataset_folder)
                   for c in fd.unlabeled}
        ents = {n: k for n, k in self._nnx_entries().items() if n in self._nnx_unlabeled_entries()}
        return nnxUnlabeledDataset(sources, ExtrasSource(root, ents))

    def get_dataloaders(self):
        self.do_split()
        if not self._nnx_uses_loader() and not self._nnx_wants_unlabeled():
            return super().get_dataloaders()
        from nnx.loading import nnxDataLoader
        entries, inputs = self._nnx_entries(), self._nnx_inputs()
        unl_ds = self._nnx_unlabeled_dataset() if self._nnx_wants_unlabeled() else None
        trainer = self

        def loader(dataset, batch_size, patch_size, final_patch_size, label_manager, **kw):
            unl = None
            if unl_ds is not None and trainer._nnx_datasets and dataset is trainer._nnx_datasets[0]:
                ubs = getattr(trainer, "nnx_unlabeled_batch_size", 0) or batch_size
                unl = nnxDataLoader(unl_ds, ubs, patch_size, final_patch_size, label_manager,
                                    transforms=kw.get("transforms"), entries=unl_ds.extras.entries,
                                    onehot_inputs=inputs, is_unlabeled=True)
            return nnxDataLoader(dataset, batch_size, patch_size, final_patch_size, label_manager, **kw,
                                 entries=entries, onehot_inputs=inputs, unlabeled=unl)

        with patched(_stock_trainer_module, "nnUNetDataLoader", loader):
            return super().get_dataloaders()

    # -- network inputs ----------------------------------------------------------------------------------------------
    def initialize(self):
        inputs = self._nnx_inputs() if not self.was_initialized else []
        if not inputs:
            return super().initialize()
        extra = sum(len(v) for _, v in inputs)
        stock_fn = _stock_trainer_module.determine_num_input_channels

        def with_inputs(*a, **kw):
            return stock_fn(*a, **kw) + extra

        with patched(_stock_trainer_module, "determine_num_input_channels", with_inputs):
            super().initialize()

    def validation_step(self, batch: dict) -> dict:
        with self.nnx_eval_network():
            return super().validation_step(batch)

    def perform_actual_validation(self, save_probabilities: bool = False):
        with self.nnx_eval_network():
            self._nnx_validate(save_probabilities)
        if self.local_rank == 0:  # CC-Metrics next to nnU-Net's validation summary
            from nnunetv2.configuration import default_num_processes
            from nnx.cc_evaluation import cc_after_validation
            out = cc_after_validation(self.output_folder, self.preprocessed_dataset_folder_base, self.dataset_json,
                                      self.plans_manager.image_reader_writer_class.__name__, default_num_processes)
            if out:
                self.print_to_log_file(f"nnx: CC-Metrics of the validation written to {out}")

    def _nnx_validate(self, save_probabilities: bool) -> None:
        inputs = self._nnx_inputs()
        if not inputs:
            return super().perform_actual_validation(save_probabilities)
        from nnx.loading import LABEL, ExtrasSource, nnxLabeledDataset
        self.do_split()
        src = ExtrasSource(self._nnx_extras_root(), {n: LABEL for n, _ in inputs})
        old = self.dataset_class
        self.dataset_class = functools.partial(nnxLabeledDataset, extras=src, onehot_inputs=inputs)
        try:
            return super().perform_actual_validation(save_probabilities)
        finally:
            self.dataset_class = old

    def save_checkpoint(self, filename: str) -> None:
        extra = self.nnx_extra_state()
        inputs = self._nnx_inputs()
        if not extra and not inputs:
            return super().save_checkpoint(filename)
        # build the checkpoint once, with the extra state, instead of rewriting the file
        orig_save = torch.save
        add = {"nnx_trainer_name": type(self).__name__}
        if extra:
            add["nnx_extra"] = extra
        if inputs:  # what nnx_predict must append to the images, in this order
            add["nnx_inputs"] = [{"name": n, "values": list(v)} for n, v in inputs]

        def save_with_extra(obj, f, *a, **kw):
            if isinstance(obj, dict) and "network_weights" in obj:
                obj = dict(obj, **add)
            return orig_save(obj, f, *a, **kw)

        torch.save = save_with_extra
        try:
            super().save_checkpoint(filename)
        finally:
            torch.save = orig_save

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        super().load_checkpoint(filename_or_checkpoint)
        if isinstance(filename_or_checkpoint, str):
            ckpt = torch.load(filename_or_checkpoint, map_location=self.device, weights_only=False)
        else:
            ckpt = filename_or_checkpoint
        if ckpt.get("nnx_extra"):
            self.nnx_load_extra_state(ckpt["nnx_extra"])
