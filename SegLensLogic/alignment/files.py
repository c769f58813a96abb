"""The alignment file: which latents of two SAEs are shared, with their partners, similarities and metrics.

``alignment.json`` (``kind`` ``seglens-alignment``, ``format_version`` 1)::

    {"format_version": 1, "kind": "seglens-alignment",
     "sae_a": {"name": "adult", "path": "...", "sha256": "...", "d_sae": 128, "d_in": 32, "hook_point": "down_3",
               "model_sha256": "..."},
     "sae_b": {...},
     "method": "decoder-encoder-cosine",      # or encoder-cosine, activation-correlation,
                                              #    procrustes-decoder-encoder-cosine
     "matcher": "hungarian", "tau": 0.8,
     "space": {"relation": "same-model", "shared_space": true, "detail": "..."},
     "pairs": [{"a": 0, "b": 17, "enc": 0.91, "dec": 0.88, "shared": true}, ...],  # one per matched A latent;
                     # a "b_enc" key appears where the encoder matching picked another partner
     "shared_a": [0], "shared_b": [17], "specific_a": [...], "specific_b": [...],
     "shared_fraction": 0.62, "tau_sweep": [{"tau": 0.5, "shared": 90, "shared_fraction": 0.70}, ...],
     "metrics": {"agreement": 100.0, "agreement_all": 97.7, "stability": 96.1, "collision": 0.0,
                 "predictability": 85.2, "coverage": 62.5, ...},
     "seed_noise_floor": null | {"shared_fraction": 0.55, "sae": "...", "replica": "...", "cohort": "adult"},
     "info": {...}}                           # method details (Procrustes fit, images used)

Similarity keys of a pair are the method's spaces: ``enc``/``dec`` for cosines, ``corr`` for activation
correlations. ``shared_b[i]`` is the partner of ``shared_a[i]``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from ..errors import InputFileError, SegLensError
from ..storage import MAX_CHANNELS, MAX_LATENTS, Measured, Schema, atomic_write_text, check_document, read_json

ALIGNMENT_KIND = "seglens-alignment"
ALIGNMENT_FORMAT_VERSION = 1
SIDES = ("a", "b")


def _clean(value: Any) -> Any:
    """JSON-safe copy: numpy scalars to Python, NaN to None."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, str | bytes):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def sae_record(sae, folder: str | Path | None = None, name: str | None = None) -> dict:
    """The ``sae_a`` / ``sae_b`` entry of an SAE: name (cohort or folder name), path, content hash, sizes."""
    from ..sae import sae_sha256

    folder = Path(folder) if folder else None
    cohort = (sae.config.training or {}).get("cohort")
    return {
        "name": name or cohort or (folder.name if folder else "sae"),
        "path": str(folder) if folder else None,
        "sha256": sae_sha256(folder) if folder else None,
        "d_sae": int(sae.config.d_sae),
        "d_in": int(sae.config.d_in),
        "hook_point": sae.config.hook_point,
        "model_sha256": sae.config.model_sha256,
        "cohort": cohort,
        "seed": ((sae.config.training or {}).get("options") or {}).get("seed"),
    }


def alignment_document(
    alignment,
    sae_a: dict,
    sae_b: dict,
    metrics: dict | None = None,
    space: dict | None = None,
    tau_sweep: list[dict] | None = None,
    seed_noise_floor: dict | None = None,
    matcher: str = "hungarian",
) -> dict:
    """The JSON document of a :class:`~SegLensLogic.alignment.latent_alignment.LatentAlignment`."""
    shared_a, shared_b = alignment.shared_pairs()
    shared_set_a, shared_set_b = set(shared_a.tolist()), set(shared_b.tolist())
    return _clean({
        "format_version": ALIGNMENT_FORMAT_VERSION,
        "kind": ALIGNMENT_KIND,
        "sae_a": sae_a,
        "sae_b": sae_b,
        "method": alignment.method,
        "matcher": matcher,
        "tau": float(alignment.tau),
        "space": space,
        "pairs": alignment.pairs(),
        "shared_a": [int(a) for a in shared_a],
        "shared_b": [int(b) for b in shared_b],
        "specific_a": [int(a) for a in range(alignment.n_a) if a not in shared_set_a],
        "specific_b": [int(b) for b in range(alignment.n_b) if b not in shared_set_b],
        "shared_fraction": alignment.shared_fraction(),
        "tau_sweep": tau_sweep,
        "metrics": metrics or {},
        "seed_noise_floor": seed_noise_floor,
        "info": alignment.info,
    })


def write_alignment(document: dict, path: str | Path, overwrite: bool = False) -> Path:
    """Write an alignment document atomically (refuses to replace a file unless ``overwrite``)."""
    document = _clean(document)
    Alignment(document, source=path)  # validate before writing
    return atomic_write_text(path, json.dumps(document, indent=1) + "\n", overwrite=overwrite)


class SaeSide(Schema):
    """``sae_a`` / ``sae_b``: which SAE a side is (by the hash of its weights) and its sizes."""

    d_sae: int = Field(ge=1, le=MAX_LATENTS)
    d_in: int | None = Field(default=None, ge=1, le=MAX_CHANNELS)
    name: str | None = None
    path: str | None = None
    sha256: str | None = None
    hook_point: str | None = None
    model_sha256: str | None = None


class AlignedPair(Schema):
    a: int = Field(ge=0, lt=MAX_LATENTS)
    b: int = Field(ge=0, lt=MAX_LATENTS)
    shared: bool | None = None


class AlignmentDocument(Schema):
    """``alignment.json`` (module docstring): the sides, the pairs and the shared latents, every latent id within
    its side's ``d_sae`` and no latent shared twice; checked before any table of latents is built."""

    sae_a: SaeSide
    sae_b: SaeSide
    method: str
    tau: Measured | None
    pairs: list[AlignedPair] = Field(max_length=MAX_LATENTS)
    shared_a: list[int] = Field(max_length=MAX_LATENTS)
    shared_b: list[int] = Field(max_length=MAX_LATENTS)
    matcher: str | None = None
    metrics: dict[str, Any] | None = None
    space: dict[str, Any] | None = None
    seed_noise_floor: dict[str, Any] | None = None
    tau_sweep: list[dict[str, Any]] | None = None
    info: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _latents(self):
        sizes = {"a": self.sae_a.d_sae, "b": self.sae_b.d_sae}
        if len(self.shared_a) != len(self.shared_b):
            raise ValueError("'shared_a' and 'shared_b' must be lists of equal length (partners pairwise)")
        for where, latents, side in (("pairs[].a", [p.a for p in self.pairs], "a"), ("pairs[].b", [p.b for p in self.pairs], "b"),
                                     ("shared_a", self.shared_a, "a"), ("shared_b", self.shared_b, "b")):  # fmt: skip
            for index, latent in enumerate(latents):
                if not 0 <= latent < sizes[side]:
                    at = where.replace("[]", f"[{index}]") if "[]" in where else f"{where}[{index}]"
                    raise ValueError(f"{at}: latent {latent} of SAE {side.upper()} is out of range (d_sae {sizes[side]})")
        if len(set(self.shared_a)) != len(self.shared_a) or len(set(self.shared_b)) != len(self.shared_b):
            raise ValueError("a latent appears twice in 'shared_a' or 'shared_b'")
        return self


class Alignment:
    """A loaded alignment file (see the module docstring for the format).

    Attributes:
        sae_a, sae_b: the two SAE records (dicts with ``name``, ``path``, ``sha256``, ``d_sae``, ...).
        method, tau, metrics, space, seed_noise_floor, document (the whole JSON object).
    """

    def __init__(self, document: Any, source: str | Path = "<alignment>"):
        self.source = Path(source)
        check_document(document, source, ALIGNMENT_KIND, ALIGNMENT_FORMAT_VERSION, AlignmentDocument, "SegLens alignment file")
        self.document = document
        self.sae_a: dict = document["sae_a"]
        self.sae_b: dict = document["sae_b"]
        self.method: str = document["method"]
        self.tau: float = document["tau"]
        self.metrics: dict = document.get("metrics") or {}
        self.space: dict | None = document.get("space")
        self.seed_noise_floor: dict | None = document.get("seed_noise_floor")
        sizes = {side: self.sae(side)["d_sae"] for side in SIDES}
        self._partner: dict[str, dict[int, int]] = {"a": {}, "b": {}}
        self._shared: dict[str, dict[int, int]] = {"a": {}, "b": {}}
        for pair in document["pairs"]:
            self._partner["a"][pair["a"]] = pair["b"]
            self._partner["b"][pair["b"]] = pair["a"]
        for a, b in zip(document["shared_a"], document["shared_b"]):
            self._shared["a"][a] = b
            self._shared["b"][b] = a
        self._sizes = sizes

    def check_sae(self, sae_sha256: str | None, d_sae: int, d_in: int | None = None, whose: str = "this SAE") -> str:
        """The side of the SAE with this weights hash, after checking that the alignment's record of it has the
        SAE's sizes (an alignment claiming the right hash with another size is refused); returns ``"a"`` or ``"b"``.

        Raises:
            InputFileError: naming this file, when the SAE is neither side or its record's sizes differ.
        """
        sides = [side for side in SIDES if sae_sha256 and self.sae(side).get("sha256") == sae_sha256]
        if not sides:
            raise InputFileError(self.source, f"alignment does not involve {whose} (neither sae_a nor sae_b has the sha256 of its weights)")
        for side in sides:
            record = self.sae(side)
            if record["d_sae"] != d_sae or (d_in is not None and record.get("d_in") not in (None, d_in)):
                raise InputFileError(self.source, f"sae_{side} has the SAE's sha256 but d_sae {record['d_sae']}, d_in {record.get('d_in')}; "
                                                  f"the SAE has d_sae {d_sae}, d_in {d_in} (the file was altered or is corrupt)")  # fmt: skip
        return sides[0]

    @property
    def compares_populations(self) -> bool:
        """False when both SAEs record the same cohort: two models (or two seeds) of one population, whose
        alignment says nothing about a population shift (e.g. ``unet-vs-segformer.json``); True otherwise,
        including when a side does not record its cohort."""
        a, b = self.sae_a.get("cohort"), self.sae_b.get("cohort")
        return not (a and b and a == b)

    # -- the agreed interface --------------------------------------------------------------------------
    def sae(self, side: str) -> dict:
        return self.document[f"sae_{self._side(side)}"]

    @staticmethod
    def _side(side: str) -> str:
        if side not in SIDES:
            raise ValueError(f"side must be 'a' or 'b', got {side!r}")
        return side

    def side_of(self, sae_sha256: str) -> str:
        """``"a"`` or ``"b"``: which side of this alignment the SAE with this content hash is."""
        for side in SIDES:
            if self.sae(side).get("sha256") == sae_sha256:
                return side
        raise SegLensError(
            f"{self.source}: the SAE {sae_sha256[:12]}... is neither side of this alignment "
            f"({self.sae_a.get('name')} {str(self.sae_a.get('sha256'))[:12]}..., {self.sae_b.get('name')} {str(self.sae_b.get('sha256'))[:12]}...)"
        )

    def _latent(self, latent: int, side: str) -> int:
        side = self._side(side)
        if not 0 <= int(latent) < self._sizes[side]:
            raise ValueError(f"latent {latent} is out of range for SAE {side.upper()} ({self._sizes[side]} latents)")
        return int(latent)

    def status(self, latent: int, side: str) -> str:
        """``"shared"`` or ``"specific"`` (to this side's cohort)."""
        return "shared" if self._latent(latent, side) in self._shared[side] else "specific"

    def partner(self, latent: int, side: str) -> int | None:
        """The aligned partner of a *shared* latent on the other side; None for a specific latent."""
        return self._shared[side].get(self._latent(latent, side))

    def matched_partner(self, latent: int, side: str) -> int | None:
        """The latent the matching paired it with, shared or not (None when unmatched): used to swap
        non-shared latents (feature swapping)."""
        return self._partner[side].get(self._latent(latent, side))

    def shared(self, side: str) -> list[int]:
        """Shared latents of one side, sorted."""
        return sorted(self._shared[self._side(side)])

    def specific(self, side: str) -> list[int]:
        """Latents of one side that are not shared, sorted."""
        shared = self._shared[self._side(side)]
        return [j for j in range(self._sizes[side]) if j not in shared]

    @property
    def shared_fraction(self) -> float:
        return len(self._shared["a"]) / max(self._sizes.values())

    @property
    def pairs(self) -> list[dict]:
        return self.document["pairs"]

    def __repr__(self) -> str:
        return (f"Alignment({self.sae_a.get('name')!r} <-> {self.sae_b.get('name')!r}, {self.method}, tau {self.tau}, "
                f"{len(self._shared['a'])} shared)")


def load_alignment(path: str | Path) -> Alignment:
    """Read and check an ``alignment.json``.

    Raises:
        InputFileError: missing file, invalid JSON, wrong kind or version, malformed or out-of-range latents.
    """
    path = Path(path)
    if not path.is_file():
        raise InputFileError(path, "alignment file not found")
    return Alignment(read_json(path), source=path)
