"""Hints: points a user places on a case to say what the mask gets wrong there.

A hint is a world point (RAS, millimetres, as Slicer's views report it) with what the user says of it:

- ``+``: this is tumour; ``+edema`` (``+ED``, ``+necrotic core``, ...): this is that tumour class;
- ``-``: this is not tumour; ``-edema``: this is not edema (whatever else it is).

On the command line a hint is written ``R,A,S:+`` or ``R,A,S:-edema`` (:func:`parse_hint`). Hints are resolved to
voxels of a prepared case (:func:`resolve_hints`), which refuses, in one line, what cannot be a hint: a
non-finite coordinate, a point outside the volume or outside the brain, an unknown class, two hints at one voxel
that contradict each other, more than :data:`MAX_HINTS` hints. What turns hints into latent edits is
:mod:`~SegLensLogic.steering.guided`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import SegLensError

# A sane cap: interactive correction takes a handful of clicks; hundreds would be a script gone wrong.
MAX_HINTS = 64
SIGNS = ("+", "-")
# Short names and words a user may type for the BraTS 2023 tumour classes (index in the 4-class scheme).
CLASS_ALIASES = {
    "nc": 1, "ncr": 1, "necrotic": 1, "necrosis": 1, "core": 1, "necrotic core": 1,
    "ed": 2, "edema": 2, "oedema": 2,
    "et": 3, "enhancing": 3, "enhancing tumour": 3, "enhancing tumor": 3,
}  # fmt: skip


@dataclass(frozen=True)
class Hint:
    """A point and what the user says of it.

    Attributes:
        point: ``(R, A, S)`` world coordinates in mm.
        sign: ``"+"`` (tumour there) or ``"-"`` (no tumour there).
        cls: the class named with the sign (a model class index), or None: any tumour class for ``+``, every
            tumour class for ``-``.
    """

    point: tuple[float, float, float]
    sign: str = "+"
    cls: int | None = None

    def __post_init__(self):
        if self.sign not in SIGNS:
            raise SegLensError(f"a hint's sign must be '+' or '-', got {self.sign!r:.20}")
        try:
            point = tuple(float(v) for v in self.point)
        except (TypeError, ValueError):
            raise SegLensError(f"a hint's point must be three numbers (R, A, S in mm), got {self.point!r:.60}") from None
        if len(point) != 3:
            raise SegLensError(f"a hint's point must be three numbers (R, A, S in mm), got {len(point)}")
        if not all(math.isfinite(v) for v in point):
            raise SegLensError(f"hint at {point}: a coordinate is not a finite number")
        object.__setattr__(self, "point", point)
        if self.cls is not None:
            if isinstance(self.cls, bool) or not isinstance(self.cls, (int, np.integer)) or self.cls < 1:
                raise SegLensError(f"a hint's class must be a tumour class index (1 or more), got {self.cls!r:.20}")
            object.__setattr__(self, "cls", int(self.cls))

    def describe(self, class_names: Sequence[str] | None = None) -> str:
        """``R,A,S:+edema`` (the command-line form)."""
        name = ""
        if self.cls is not None:
            name = class_names[self.cls] if class_names is not None and self.cls < len(class_names) else str(self.cls)
        return f"{','.join(f'{v:g}' for v in self.point)}:{self.sign}{name}"

    def to_json(self) -> dict:
        return {"point": list(self.point), "sign": self.sign, "class": self.cls}


def class_index(name: str, class_names: Sequence[str]) -> int:
    """The model class a user names: its full name (``edema``, ``enhancing tumour``), its BraTS short name (``ED``)
    or a common word for it (``necrotic``, ``enhancing``); case does not matter.

    Raises:
        SegLensError: no foreground class of the model has that name.
    """
    key = " ".join(name.strip().lower().replace("_", " ").replace("-", " ").split())
    lowered = [c.lower() for c in class_names]
    if key in lowered[1:]:
        return lowered.index(key)
    if len(class_names) == 4 and key in CLASS_ALIASES:
        return CLASS_ALIASES[key]
    known = ", ".join(class_names[1:])
    raise SegLensError(f"unknown class '{name}' in a hint; this model's classes are {known}"
                       + (" (or NC, ED, ET)" if len(class_names) == 4 else ""))  # fmt: skip


def parse_hint(text: str, class_names: Sequence[str]) -> Hint:
    """A hint from its command-line form ``R,A,S:+`` / ``R,A,S:-`` / ``R,A,S:+edema`` (mm, as Slicer shows).

    Raises:
        SegLensError: naming the hint and what is wrong with it.
    """
    where, sep, said = str(text).rpartition(":")
    if not sep or not said or said[0] not in SIGNS:
        raise SegLensError(f"hint '{text}': write it as R,A,S:+ or R,A,S:- (mm), optionally with a class, e.g. 10,-20,5:+edema")
    parts = [p.strip() for p in where.split(",")]
    try:
        point = tuple(float(p) for p in parts)
    except ValueError:
        raise SegLensError(f"hint '{text}': the point must be three numbers R,A,S in mm") from None
    if len(point) != 3:
        raise SegLensError(f"hint '{text}': the point must be three numbers R,A,S in mm, got {len(point)}")
    if not all(math.isfinite(v) for v in point):
        raise SegLensError(f"hint '{text}': a coordinate is not a finite number")
    try:
        cls = class_index(said[1:], class_names) if said[1:].strip() else None
    except SegLensError as exc:
        raise SegLensError(f"hint '{text}': {exc}") from None
    return Hint(point, said[0], cls)


@dataclass(frozen=True)
class HintVoxel:
    """A hint resolved on a prepared case: its voxel in RAS order ``(x, y, z)`` (``z`` the axial slice)."""

    hint: Hint
    voxel: tuple[int, int, int]

    @property
    def slice(self) -> int:
        return self.voxel[2]


def point_to_ras_voxel(point: Sequence[float], prepared) -> tuple[int, int, int] | None:
    """The RAS-order voxel ``(x, y, z)`` of a prepared case nearest a world point, or None outside the volume."""
    source = prepared.source
    ijk = np.linalg.solve(np.asarray(source.affine, dtype=np.float64), np.array([*point[:3], 1.0]))[:3]
    ijk = np.rint(ijk).astype(np.int64)
    shape = source.shape[:3]
    if any(not 0 <= v < n for v, n in zip(ijk, shape)):
        return None
    ras = [0, 0, 0]
    for file_axis, (ras_axis, flip) in enumerate(prepared.orientation.to_ras):
        ras_axis = int(ras_axis)
        ras[ras_axis] = int(ijk[file_axis] if flip > 0 else shape[file_axis] - 1 - ijk[file_axis])
    return tuple(ras)  # type: ignore[return-value]


def ras_voxel_to_point(voxel: Sequence[int], prepared) -> tuple[float, float, float]:
    """The world point (mm) of a RAS-order voxel of a prepared case: the inverse of :func:`point_to_ras_voxel`."""
    shape = prepared.source.shape[:3]
    ijk = [0, 0, 0]
    for file_axis, (ras_axis, flip) in enumerate(prepared.orientation.to_ras):
        v = int(voxel[int(ras_axis)])
        ijk[file_axis] = v if flip > 0 else shape[file_axis] - 1 - v
    world = np.asarray(prepared.source.affine, dtype=np.float64) @ np.array([*ijk, 1.0])
    return tuple(float(v) for v in world[:3])  # type: ignore[return-value]


def resolve_hints(hints: Sequence[Hint], prepared, num_classes: int) -> list[HintVoxel]:
    """Hints on a prepared case's RAS voxels, checked.

    Raises:
        SegLensError: no hint or more than :data:`MAX_HINTS`; a point outside the volume or the brain; a class the
            model does not have; two hints at one voxel that say opposite things.
    """
    hints = list(hints)
    if not hints:
        raise SegLensError("no hint given: place at least one point (+ tumour here, - no tumour here)")
    if len(hints) > MAX_HINTS:
        raise SegLensError(f"{len(hints)} hints given; SegLens takes at most {MAX_HINTS} at a time")
    out: list[HintVoxel] = []
    said: dict[tuple[int, int, int], Hint] = {}
    for hint in hints:
        if not isinstance(hint, Hint):
            raise SegLensError(f"a hint must be a Hint, got {type(hint).__name__}")
        if hint.cls is not None and hint.cls >= num_classes:
            raise SegLensError(f"hint {hint.describe()}: class {hint.cls} does not exist (the model has {num_classes} classes)")
        voxel = point_to_ras_voxel(hint.point, prepared)
        if voxel is None:
            raise SegLensError(f"hint {hint.describe()}: the point is outside the volume")
        if not prepared.brain_mask[voxel]:
            raise SegLensError(f"hint {hint.describe()}: the point is outside the brain")
        earlier = said.get(voxel)
        if earlier is not None and _contradict(earlier, hint):
            raise SegLensError(f"hints {earlier.describe()} and {hint.describe()} fall on the same voxel and contradict each other")
        said[voxel] = hint
        out.append(HintVoxel(hint, voxel))
    return out


def _contradict(a: Hint, b: Hint) -> bool:
    """Whether two hints at one voxel cannot both hold."""
    if a.sign == b.sign:
        return a.sign == "+" and a.cls is not None and b.cls is not None and a.cls != b.cls
    plus, minus = (a, b) if a.sign == "+" else (b, a)
    return minus.cls is None or plus.cls is None or minus.cls == plus.cls
