"""How an anatomy label map becomes network input (spec 003 M5 §1 and §7 (a)/(b); ambiguity 1).

GRASP feeds the anatomical pseudo-label map as *one* extra channel; the thesis does not say how IDs are encoded. The
spec's proposal (M5 §7 (a)): IDs scaled to [0, 1], ``id / C_ana``. Here:

* ``scaled``: one channel, class ``g`` (1..G, after grouping) -> ``g / G``; background 0. Without groups ``g`` is the
  label value itself and ``G`` the largest one, i.e. exactly ``id / C_ana``.
* ``onehot``: one channel per (grouped) class, as nnU-Net's cascade feeds a previous stage.

Grouping (option ``anatomy_groups``, e.g. ``liver+kidney/spleen/bladder+spine``): groups separated by ``/``, members
by ``+``, by label name or value; group ``g`` is the g-th group. Classes in no group become background (they are
dropped), so a grouping can also keep only the organs that matter. Empty = every foreground label is its own class.
A group ``*`` stands for every class not named elsewhere, each its own group in label order, at that place: with
TotalSegmentator's 117 classes ``*/kidney_left+kidney_right/liver`` keeps them all and gives the lesion organs the
highest codes.

A scaled channel puts the classes on one line, so which code each class gets matters. On the anatomy phantom,
with liver (a lesion organ) at 0.2 next to background's 0, lesion mimics in soft tissue (code 0) were segmented
about twice as often as with no anatomy input (48 % vs 26 %). With the same five classes in reverse order
(``anatomy_groups=spine/bladder/spleen/kidney/liver``: liver 1.0, kidney 0.8) they were hit in 14 %. The plugin's
README has the numbers. Moving every organ away from background (``offset``, option ``anatomy_offset``: code
``offset + (1 - offset) * s``) did not help there, nor did putting the lesion organs lowest; only the lesion organs at
the *top* of the line did (``anatomy_groups=*/kidney/liver``). So with ``scaled``, give the organs that carry the
pathology the highest codes. ``onehot`` has no order.

The encodings are lists of channel definitions for :func:`nnx.extras.onehot` (an int = one-hot of that value,
``[[value, weight], ...]`` = weighted sum), so training batches, validation and ``nnx_predict`` produce the same
channels (the list is stored in the checkpoints as ``nnx_inputs``).
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Sequence

from nnx.errors import NNXError

ENCODINGS = ("scaled", "onehot")


def parse_groups(text: str, labels: Mapping[str, int], source: str = "anatomy_groups") -> List[List[int]]:
    """``"liver+kidney/spleen"`` -> ``[[1, 3], [2]]`` (label names or values); empty -> one group per foreground
    value (sorted)."""
    fg = {int(v) for k, v in labels.items() if k not in ("background", "ignore") and int(v) != 0}
    if not text or not text.strip():
        return [[v] for v in sorted(fg)]
    parts = text.split("/")
    if sum(p.strip() == "*" for p in parts) > 1:
        raise NNXError(f"option 'anatomy_groups': '*' (every class not named) may appear once, in '{text}'", source)
    groups: List[List[int]] = []
    seen: Dict[int, int] = {}
    star = None
    for gi, part in enumerate(parts):
        if part.strip() == "*":
            star = len(groups)
            continue
        members = [m.strip() for m in part.split("+") if m.strip()]
        if not members:
            raise NNXError(f"option 'anatomy_groups': group {gi + 1} of '{text}' is empty", source)
        vals = []
        for m in members:
            if m in labels:
                v = int(labels[m])
            elif m.lstrip("-").isdigit():
                v = int(m)
            else:
                raise NNXError(f"option 'anatomy_groups': '{m}' is not an anatomy label (labels: "
                               f"{', '.join(k for k in labels if k != 'background')})", source)
            if v not in fg:
                raise NNXError(f"option 'anatomy_groups': '{m}' is not a foreground anatomy label", source)
            if v in seen:
                raise NNXError(f"option 'anatomy_groups': label {v} is in groups {seen[v] + 1} and {gi + 1}", source)
            seen[v] = gi
            vals.append(v)
        groups.append(sorted(vals))
    if star is not None:  # every class not named elsewhere, one group each in label order, at the '*'
        groups[star:star] = [[v] for v in sorted(fg - set(seen))]
    return groups


def channel_definitions(groups: Sequence[Sequence[int]], encoding: str, scale_by_value: bool = True,
                        offset: float = 0.0) -> List:
    """Channel definitions for :func:`nnx.extras.onehot`.

    ``scaled``: one channel; ungrouped (every group a single value, ``scale_by_value``) -> ``s = value / max value``,
    grouped -> ``s = group index / number of groups``; the code is ``offset + (1 - offset) * s`` (background stays 0),
    so with ``offset`` > 0 every organ is at least ``offset`` away from background. ``onehot``: one channel per group
    (an int for a single value); ``offset`` must be 0."""
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown anatomy encoding {encoding!r} (encodings: {', '.join(ENCODINGS)})")
    if not groups:
        raise ValueError("no anatomy classes to encode")
    if not 0.0 <= offset < 1.0:
        raise ValueError(f"the scaled code offset must be in [0, 1), got {offset}")
    if encoding == "onehot":
        if offset:
            raise ValueError("an offset applies to the scaled encoding only")
        return [g[0] if len(g) == 1 else [[v, 1.0] for v in g] for g in groups]
    code = lambda s: offset + (1.0 - offset) * s  # noqa: E731
    if scale_by_value and all(len(g) == 1 for g in groups):
        top = max(g[0] for g in groups)
        return [[[g[0], code(g[0] / top)] for g in groups]]
    n = len(groups)
    return [[[v, code((i + 1) / n)] for i, g in enumerate(groups) for v in g]]


def class_lut(groups: Sequence[Sequence[int]]) -> Dict[int, int]:
    """label value -> class index 1..G (targets of the multi-task anatomy decoder); other values -> 0."""
    return {v: i + 1 for i, g in enumerate(groups) for v in g}


__all__ = ["ENCODINGS", "parse_groups", "channel_definitions", "class_lut"]
