"""Trainer options: declared per trainer, validated, applied, and recorded in ``nnx_config.json``.

Every trainer run through nnx accepts the common options below. nnx trainers add their own through the class
attribute ``nnx_options = {"name": Option(default, "help")}`` (merged along the MRO). Values reach a trainer from
``nnx_train --opt key=value`` / ``--epochs`` etc., or, under stock ``nnUNetv2_train``, from the environment
variable ``NNX_TRAINER_OPTS="epochs=1 iters_per_epoch=2"`` (same keys).
"""
from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

from nnx.errors import NNXError

ENV_VAR = "NNX_TRAINER_OPTS"
SOURCE_ENV_VAR = "NNX_TRAINER_OPTS_SOURCE"  # recorded in nnx_config.json (set by nnx_train)
CONFIG_FILE = "nnx_config.json"


@dataclass(frozen=True)
class Option:
    """One trainer option. ``type`` defaults to the type of ``default``; ``attr`` names a trainer attribute the
    value is written to (common nnU-Net hyperparameters); ``choices`` restricts string values."""

    default: Any
    help: str = ""
    type: Optional[Callable[[str], Any]] = None
    choices: Optional[Tuple[Any, ...]] = None
    attr: Optional[str] = None

    def convert(self, key: str, raw: Any, source: str) -> Any:
        if not isinstance(raw, str):
            value = raw
        else:
            typ = self.type or type(self.default)
            try:
                if typ is bool:
                    low = raw.strip().lower()
                    if low not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                        raise ValueError(raw)
                    value = low in ("1", "true", "yes", "on")
                elif typ is type(None):
                    value = raw
                else:
                    value = typ(raw)
            except (TypeError, ValueError):
                raise NNXError(f"option '{key}' expects {getattr(typ, '__name__', typ)}, got '{raw}'", source) from None
        if self.choices is not None and value not in self.choices:
            raise NNXError(f"option '{key}' must be one of {list(self.choices)}, got '{value}'", source)
        return value


COMMON_OPTIONS: Dict[str, Option] = {
    "epochs": Option(1000, "number of epochs (nnU-Net num_epochs)", int, attr="num_epochs"),
    "iters_per_epoch": Option(250, "training iterations per epoch", int, attr="num_iterations_per_epoch"),
    "val_iters": Option(50, "validation iterations per epoch", int, attr="num_val_iterations_per_epoch"),
    "initial_lr": Option(1e-2, "initial learning rate", float, attr="initial_lr"),
    "save_every": Option(50, "write checkpoint_latest.pth every N epochs", int, attr="save_every"),
    "labeled": Option("", "keep expert labels for N cases or X% of the fold's expert training cases "
                      "(e.g. 4 or 10%); the others are demoted (see demote_to). Default: all", str,
                      attr="nnx_labeled"),
    "demote_to": Option("none", "tier of demoted cases: none (unlabeled), coarse (their coarseTr mask) or "
                        "scribble (their scribblesTr file)", str, ("none", "coarse", "scribble"),
                        attr="nnx_demote_to"),
}


def declared_options(trainer_cls: type) -> Dict[str, Option]:
    """Common options, then ``nnx_options`` of every class in the MRO (subclasses override parents)."""
    opts = dict(COMMON_OPTIONS)
    for klass in reversed(trainer_cls.__mro__):
        opts.update(klass.__dict__.get("nnx_options", {}) or {})
    return opts


def parse_opts_string(text: str) -> Dict[str, str]:
    """``"a=1 b=2"`` or ``"a=1,b=2"`` -> ``{"a": "1", "b": "2"}``."""
    return parse_kv_list(text.replace(",", " ").split(), ENV_VAR)


def parse_kv_list(items: Sequence[str], source: str = "--opt") -> Dict[str, str]:
    out: Dict[str, str] = {}
    for item in items:
        if "=" not in item or item.startswith("="):
            raise NNXError(f"option '{item}' is not of the form key=value", source)
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def resolve(trainer_cls: type, raw: Mapping[str, Any], source: str = "--opt") -> Dict[str, Any]:
    """Validate ``raw`` against the trainer's declared options and return every option with its value."""
    declared = declared_options(trainer_cls)
    values = {k: o.default for k, o in declared.items()}
    for key, val in raw.items():
        if key not in declared:
            close = difflib.get_close_matches(key, list(declared), n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise NNXError(f"unknown option '{key}' for trainer {trainer_cls.__name__} "
                           f"(known: {', '.join(sorted(declared))}){hint}", source)
        values[key] = declared[key].convert(key, val, source)
    if values.get("labeled"):  # common option: checked for every trainer, stock ones included
        from nnx.splits import parse_labeled
        try:
            parse_labeled(values["labeled"])
        except NNXError as e:
            raise NNXError(e.message, source) from None
    check = getattr(trainer_cls, "nnx_check_options", None)
    if check is not None:
        check(values, source)  # value ranges and combinations the trainer itself knows about
    return values


def options_from_env(trainer_cls: type) -> Dict[str, Any]:
    return resolve(trainer_cls, parse_opts_string(os.environ.get(ENV_VAR, "")), ENV_VAR)


def apply(trainer: Any, values: Mapping[str, Any], source: str) -> None:
    """Write attribute-backed options onto a trainer instance, keep all values in ``trainer.nnx_opts`` and record
    them (with ``source``) in ``<output_folder>/nnx_config.json`` on rank 0."""
    declared = declared_options(type(trainer))
    for key, val in values.items():
        attr = declared[key].attr if key in declared else None
        if attr:
            setattr(trainer, attr, val)
    trainer.nnx_opts = dict(values)
    if getattr(trainer, "local_rank", 0) == 0 and getattr(trainer, "output_folder", None) is not None:
        write_config(trainer.output_folder, type(trainer).__name__, values, source)


def write_config(output_folder: str, trainer_name: str, values: Mapping[str, Any], source: str,
                 extra: Optional[Mapping[str, Any]] = None) -> str:
    """Atomically write ``nnx_config.json`` (resolved options and provenance) into ``output_folder``."""
    from nnx import __version__
    from nnx.io_utils import atomic_write_json

    try:
        from importlib.metadata import version
        nnunet_version = version("nnunetv2")
    except Exception:  # pragma: no cover
        nnunet_version = "unknown"
    payload = {"trainer": trainer_name, "options": dict(values), "options_source": source,
               "nnx_version": __version__, "nnunetv2_version": nnunet_version}
    if extra:
        payload.update(extra)
    path = os.path.join(output_folder, CONFIG_FILE)
    atomic_write_json(payload, path)
    return path


def options_table(trainer_cls: type) -> Dict[str, Dict[str, Any]]:
    return {k: {"default": o.default, "help": o.help} for k, o in declared_options(trainer_cls).items()}


__all__ = ["Option", "COMMON_OPTIONS", "ENV_VAR", "SOURCE_ENV_VAR", "CONFIG_FILE", "declared_options", "parse_opts_string",
           "parse_kv_list", "resolve", "options_from_env", "apply", "write_config", "options_table"]
