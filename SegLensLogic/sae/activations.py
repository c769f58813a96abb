"""Activation stores: every spatial position of every brain slice at a hook point, as one vector, on disk.

A store is a folder::

    store.json            d_in, dtype, hook point, model hash, cases, shards
    vectors_00000.npy     (n, d_in) float16 or float32, read memory-mapped
    index_00000.npy       (n, 4) int32: case number, axial slice (RAS), row, column of the feature map

Extraction streams case by case and shard by shard, so a cohort never has to fit in memory; the store is
written into a temporary folder and renamed into place when complete, so a failed run leaves nothing half
written. Feature maps of any spatial rank work: 2D maps ``(N, D, h, w)`` and 3D maps ``(N, D, d, h, w)`` flatten
the same way (:func:`feature_map_to_vectors`); the index then records the first spatial axes that fit.

One piece of code writes stores for both ways of extracting: :func:`extract_case` runs one case into a
:class:`ShardWriter`, and :func:`store_manifest` plus :func:`publish_store` finish the folder. The single-process
:func:`extract_activations` feeds every case to one writer (shards run across cases); the Ray path
(:mod:`.distributed`) gives each case its own writer and numbers the shards in case order, so both stores hold the
same vectors in the same order. Subsampling draws from one seeded stream in case order; a case's draws start at a
known offset in it (:func:`subsample_generator`), which is what lets a worker reproduce them alone.

Reading is lazy: opening a store reads ``store.json`` and the shard headers only, shards are memory-mapped when
read and at most a few stay mapped (:data:`OPEN_SHARDS`), so resident memory does not grow with the store.
:meth:`ActivationStore.shard_split` splits and streams shard by shard (memory bounded by a few shards, none of it
proportional to the store's length); :meth:`ActivationStore.split` and :meth:`ActivationStore.batches` keep their
exact global shuffle (index arrays of 8 bytes per vector).
"""

from __future__ import annotations

import math
import shutil
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pydantic import Field, model_validator

from .. import storage
from ..data.cohort import Cohort
from ..errors import InputFileError, SegLensError, refuse_existing
from ..storage import MAX_CHANNELS, Schema, atomic_write_json, read_document
from ..segmentation.inference import default_batch_size, prepare_for_model
from ..networks.segmenter import Segmenter, weights_sha256
from .model import DEFAULT_MIN_BRAIN_FRACTION

STORE_NAME = "store.json"
STORE_FORMAT_VERSION = 1
# Shard files kept memory-mapped at once by a reader (least recently used ones are closed).
OPEN_SHARDS = 4
# Shards (or shard pieces) shuffled together by the streaming order of ActivationStore.shard_split.
STREAM_BUFFER_SHARDS = 4


def feature_map_to_vectors(activations: torch.Tensor) -> torch.Tensor:
    """``(N, D, *spatial)`` -> ``(N * prod(spatial), D)``: channels last, positions in row-major order."""
    n, d = activations.shape[:2]
    return activations.reshape(n, d, -1).transpose(1, 2).reshape(-1, d)


def vectors_to_feature_map(vectors: torch.Tensor, n: int, spatial: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`feature_map_to_vectors`: ``(N * prod(spatial), D)`` -> ``(N, D, *spatial)``."""
    d = vectors.shape[1]
    return vectors.reshape(n, -1, d).transpose(1, 2).reshape(n, d, *spatial)


def mask_fraction_on_grid(mask: np.ndarray, geometry, slices: np.ndarray, grid: tuple[int, int]) -> torch.Tensor:
    """Fraction of each feature-map position's patch inside ``mask``: ``(N, h, w)`` in [0, 1].

    Args:
        mask: boolean ``(X, Y, Z)`` in RAS order (a :class:`PreparedCase`'s order).
        geometry: the case's :class:`~SegLensLogic.data.preprocessing.SliceGeometry`.
        slices: RAS axial slice indices ``(N,)``.
        grid: feature-map ``(h, w)``.
    """
    mask = torch.from_numpy(np.ascontiguousarray(mask[:, :, slices].transpose(2, 0, 1))).float()
    mask = geometry.to_model(mask[:, None], mode="nearest")
    return F.adaptive_avg_pool2d(mask, grid)[:, 0]


def brain_fraction_on_grid(prepared, slices: np.ndarray, grid: tuple[int, int]) -> torch.Tensor:
    """Fraction of each feature-map position's receptive patch that is brain: ``(N, h, w)`` in [0, 1]."""
    return mask_fraction_on_grid(prepared.brain_mask, prepared.geometry, slices, grid)


@dataclass
class ExtractionOptions:
    """What to extract.

    Attributes:
        hook: hook point (default: the model's).
        brain_only: keep only positions whose patch is at least ``min_brain_fraction`` brain.
        min_brain_fraction: see ``brain_only``.
        subsample: keep each position with this probability (1 keeps all).
        dtype: ``float16`` (half the disk) or ``float32``.
        shard_size: vectors per shard file.
        batch_size: slices per forward pass (default: 16 on a GPU; on the CPU 1 for U-Net, 4 for SegFormer).
        seed: for subsampling.
        tumour_repeat: write every kept position whose patch touches the case's ground-truth tumour this many times
            (labelled cases only; 1: once, as every other position). Tumour is a small share of brain positions, so
            an SAE sees little of it; on the shipped U-Net's store, 8 repeats doubled the tumour-labelled latents and
            the labels that hold on the test cases (docs/measurements/seed-agreement.md). The repeats are exact
            copies, so an SAE's held-out split of such a store shares vectors with its training split: measure the
            SAE on a store written without repeats.
    """

    hook: str | None = None
    brain_only: bool = True
    min_brain_fraction: float = DEFAULT_MIN_BRAIN_FRACTION
    subsample: float = 1.0
    dtype: str = "float16"
    shard_size: int = 1 << 18
    batch_size: int | None = None
    seed: int = 0
    tumour_repeat: int = 1


class ShardWriter:
    """Appends vectors and their index rows to ``vectors_NNNNN.npy`` / ``index_NNNNN.npy`` shards in ``folder``.

    ``shards`` lists what was written (``{"vectors", "index", "n"}``), in order; :meth:`flush` writes the
    partial last shard.
    """

    def __init__(self, folder: Path, d_in: int, dtype: str, shard_size: int):
        self.folder, self.d_in, self.dtype, self.shard_size = folder, d_in, np.dtype(dtype), shard_size
        self.vectors = np.empty((shard_size, d_in), dtype=self.dtype)
        self.index = np.empty((shard_size, 4), dtype=np.int32)
        self.fill = 0
        self.shards: list[dict] = []

    def add(self, vectors: np.ndarray, index: np.ndarray) -> None:
        start = 0
        while start < len(vectors):
            take = min(self.shard_size - self.fill, len(vectors) - start)
            self.vectors[self.fill : self.fill + take] = vectors[start : start + take]
            self.index[self.fill : self.fill + take] = index[start : start + take]
            self.fill += take
            start += take
            if self.fill == self.shard_size:
                self.flush()

    def flush(self) -> None:
        if self.fill == 0:
            return
        number = len(self.shards)
        np.save(self.folder / f"vectors_{number:05d}.npy", self.vectors[: self.fill])
        np.save(self.folder / f"index_{number:05d}.npy", self.index[: self.fill])
        self.shards.append({"vectors": f"vectors_{number:05d}.npy", "index": f"index_{number:05d}.npy", "n": int(self.fill)})
        self.fill = 0


def subsample_generator(seed: int, offset: int = 0) -> np.random.Generator:
    """The subsampling stream of a store: ``default_rng(seed)``, advanced by ``offset`` draws.

    Extraction draws one number per position of every brain slice, case after case, so case ``i``'s draws start at
    ``offset = positions per slice * brain slices of cases 0..i-1``: a worker that knows it reproduces the
    single-process draws of its case exactly.
    """
    bits = np.random.PCG64(seed)  # what default_rng(seed) builds
    if offset:
        bits.advance(offset)  # one 64-bit step per float64 drawn
    return np.random.Generator(bits)


@torch.no_grad()
def extract_case(
    model: Segmenter,
    case,
    case_number: int,
    options: ExtractionOptions,
    writer: ShardWriter,
    rng: np.random.Generator | None,
    prepared=None,
) -> dict:
    """Run ``model`` over ``case``'s brain slices and append the kept vectors to ``writer``.

    Args:
        case_number: the case's position in its cohort (the index's first column).
        rng: the subsampling stream, positioned at this case's first draw (see :func:`subsample_generator`);
            only used when ``options.subsample < 1``.
        prepared: the case already prepared for ``model``, if at hand.

    Returns:
        the case's manifest entry ``{"case_id", "slices", "vectors"}``.

    Raises:
        SegLensError: the model produced NaN or Inf activations.
    """
    hook = model._hook(options.hook)
    device = next(model.parameters()).device
    batch_size = options.batch_size or default_batch_size(model)
    prepared = prepared if prepared is not None else prepare_for_model(model, case)
    tumour_mask = None
    if options.tumour_repeat > 1:
        if prepared.label is None:
            raise SegLensError(f"case '{case.case_id}' has no label map: repeating tumour positions needs labelled cases")
        tumour_mask = prepared.label > 0  # once per case, not per batch
    slices = prepared.brain_slices()
    kept = 0
    for start in range(0, len(slices), batch_size):
        batch = slices[start : start + batch_size]
        # Only the encoder up to the hook: the rest of the network is not needed here.
        activations, _ = model.encode(prepared.model_input(batch).to(device), hook, with_cache=False)
        if not torch.isfinite(activations).all():
            raise SegLensError(f"case '{case.case_id}': the model produced NaN or Inf activations at '{hook}'")
        vectors = feature_map_to_vectors(activations).float().cpu().numpy()
        grid = activations.shape[2:]
        positions = np.indices(grid).reshape(len(grid), -1).T  # (P, rank)
        keep = np.ones((len(batch), positions.shape[0]), dtype=bool)
        if options.brain_only and len(grid) == 2:
            keep &= brain_fraction_on_grid(prepared, batch, tuple(grid)).flatten(1).numpy() >= options.min_brain_fraction
        if options.subsample < 1:
            keep &= rng.random(keep.shape) < options.subsample
        rows = np.zeros((len(batch), positions.shape[0], 4), dtype=np.int32)
        rows[..., 0] = case_number
        rows[..., 1] = batch[:, None]
        rows[..., 2] = positions[:, -2] if positions.shape[1] >= 2 else 0
        rows[..., 3] = positions[:, -1]
        flat_keep = keep.reshape(-1)
        if tumour_mask is not None and len(grid) == 2:
            tumour = (mask_fraction_on_grid(tumour_mask, prepared.geometry, batch, tuple(grid)).flatten(1).numpy() > 0).reshape(-1)
            flat_keep = np.flatnonzero(flat_keep)
            flat_keep = np.concatenate([flat_keep, np.repeat(flat_keep[tumour[flat_keep]], options.tumour_repeat - 1)])
            kept += len(flat_keep)
        else:
            kept += int(flat_keep.sum())
        writer.add(vectors[flat_keep], rows.reshape(-1, 4)[flat_keep])
    return {"case_id": case.case_id, "slices": [int(z) for z in slices], "vectors": kept}


def store_manifest(
    model: Segmenter,
    cohort: Cohort,
    options: ExtractionOptions,
    cases: list[dict],
    shards: list[dict],
    model_dir: str | Path | None = None,
) -> dict:
    """The ``store.json`` of a store extracted from ``cohort`` by ``model``.

    Raises:
        SegLensError: nothing was kept.
    """
    hook = model._hook(options.hook)
    d_in, *spatial = model.hook_points()[hook]
    total = sum(shard["n"] for shard in shards)
    if total == 0:
        raise SegLensError(f"no activation vectors were kept from cohort '{cohort.name}' (check --subsample and the brain masks)")
    return {
        "format_version": STORE_FORMAT_VERSION,
        "d_in": int(d_in),
        "dtype": options.dtype,
        "hook_point": hook,
        "feature_map": [int(s) for s in spatial],
        "arch": model.config.arch,
        "model_dir": str(model_dir) if model_dir else None,
        "model_sha256": weights_sha256(model_dir) if model_dir else None,
        "image_size": model.config.image_size,
        "modalities": list(model.config.modalities),
        "cohort": cohort.name,
        "cases": cases,
        "n_vectors": int(total),
        "shards": shards,
        "options": {k: v for k, v in vars(options).items()},
    }


def staging_folder(out_dir: Path) -> Path:
    """A fresh hidden folder beside ``out_dir`` where its store is written before :func:`publish_store`."""
    return storage.staging_folder(out_dir)


def publish_store(tmp: Path, out_dir: Path, manifest: dict) -> None:
    """Write ``store.json`` into the finished ``tmp`` folder and rename it to ``out_dir`` (replacing it)."""
    atomic_write_json(tmp / STORE_NAME, manifest)
    storage.publish_folder(tmp, out_dir, overwrite=True)


@torch.no_grad()
def extract_activations(
    model: Segmenter,
    cohort: Cohort,
    out_dir: str | Path,
    options: ExtractionOptions | None = None,
    model_dir: str | Path | None = None,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> "ActivationStore":
    """Run ``model`` over every brain slice of ``cohort`` and store the hook point's vectors.

    Args:
        model: the segmenter.
        cohort: cases to run (labels are not needed).
        out_dir: store folder to create.
        options: hook point, brain restriction, subsampling, precision, shard size.
        model_dir: the model's folder, recorded with its weights hash so the store says where it came from.
        overwrite: replace an existing store.

    Raises:
        OutputExistsError: ``out_dir`` exists and ``overwrite`` is False.
        SegLensError: the model produced NaN or Inf activations, or nothing was kept.

    :func:`SegLensLogic.sae.distributed.extract_activations_ray` writes the same store with Ray workers.
    """
    options = options or ExtractionOptions()
    out_dir = refuse_existing(out_dir, overwrite)
    hook = model._hook(options.hook)
    d_in = model.hook_points()[hook][0]
    model.eval()
    rng = subsample_generator(options.seed)
    tmp = staging_folder(out_dir)
    try:
        writer = ShardWriter(tmp, d_in, options.dtype, options.shard_size)
        cases = []
        for case_number, case in enumerate(cohort):
            entry = extract_case(model, case, case_number, options, writer, rng)
            cases.append(entry)
            log(f"  {case.case_id}: {entry['vectors']} vectors from {len(entry['slices'])} slices")
        writer.flush()
        manifest = store_manifest(model, cohort, options, cases, writer.shards, model_dir)
        publish_store(tmp, out_dir, manifest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"Wrote {manifest['n_vectors']} vectors of dimension {d_in} ({options.dtype}) in {len(writer.shards)} shard(s) to {out_dir}")
    return ActivationStore(out_dir)


def _npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype, bool, int]:
    """``(shape, dtype, fortran_order, data offset)`` of a ``.npy`` file, read from its header alone.

    Raises:
        InputFileError: not a ``.npy`` file, an object (pickled) array, or shorter than its header says.
    """
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version in ((2, 0), (3, 0)):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f"unsupported .npy version {version}")
            offset = f.tell()
    except (ValueError, OSError, SyntaxError) as exc:
        raise InputFileError(path, f"cannot be read as a .npy shard ({exc})") from None
    if dtype.hasobject:
        raise InputFileError(path, "cannot be read as a .npy shard (it holds Python objects, which are never unpickled)")
    if path.stat().st_size < offset + math.prod(shape) * dtype.itemsize:
        raise InputFileError(path, f"cannot be read as a .npy shard (shorter than its {shape} {dtype} header says)")
    return tuple(shape), dtype, fortran, offset


class StoreShardRecord(Schema):
    """One shard of ``store.json``: its two file names (inside the store folder) and its number of vectors."""

    vectors: str = Field(min_length=1, max_length=255, pattern=r"^[^/\\]+$")
    index: str = Field(min_length=1, max_length=255, pattern=r"^[^/\\]+$")
    n: int = Field(ge=0, le=1 << 40)


class StoreCaseRecord(Schema):
    case_id: str


class StoreIndex(Schema):
    """``store.json``: the fields a reader relies on, each checked before any shard is opened."""

    d_in: int = Field(ge=1, le=MAX_CHANNELS)
    n_vectors: int = Field(ge=0, le=1 << 40)
    shards: list[StoreShardRecord] = Field(max_length=1 << 20)
    cases: list[StoreCaseRecord] = Field(default_factory=list, max_length=1 << 24)
    hook_point: str | None = None
    model_sha256: str | None = None
    cohort: str | None = None
    format_version: int = STORE_FORMAT_VERSION

    @model_validator(mode="after")
    def _count(self):
        total = sum(shard.n for shard in self.shards)
        if total != self.n_vectors:
            raise ValueError(f"'n_vectors' is {self.n_vectors} but the shards hold {total} vectors")
        return self


class ActivationStore:
    """A read-only view of an activation store folder; shards are read lazily, memory-mapped.

    Opening reads ``store.json`` and each shard's header. Reads map the shards they touch; at most
    ``open_shards`` stay mapped (least recently used ones are closed), so resident memory stays bounded by a few
    shards whatever the store's size. Global vector positions run through the shards in manifest order.

    Raises:
        InputFileError: on open, when the folder, its ``store.json`` or a shard is missing or inconsistent.
    """

    def __init__(self, folder: str | Path, open_shards: int = OPEN_SHARDS):
        self.folder = Path(folder)
        manifest_path = self.folder / STORE_NAME
        if not self.folder.is_dir():
            raise InputFileError(self.folder, "activation store not found")
        if not manifest_path.is_file():
            raise InputFileError(manifest_path, "missing: not an activation store (run seglens extract)")
        self.manifest = read_document(manifest_path, None, STORE_FORMAT_VERSION, StoreIndex, "activation store index",
                                      default_version=STORE_FORMAT_VERSION)
        self.d_in = int(self.manifest["d_in"])
        self._paths: dict[str, list[Path]] = {"vectors": [], "index": []}
        sizes, dtypes = [], []
        for shard in self.manifest["shards"]:
            vectors_path, index_path = self.folder / shard["vectors"], self.folder / shard["index"]
            for path in (vectors_path, index_path):
                if not path.is_file() or path.parent.resolve() != self.folder.resolve():
                    raise InputFileError(path, "shard listed in store.json is missing")
            vectors_shape, vectors_dtype = _npy_header(vectors_path)[:2]
            dtypes.append(vectors_dtype)
            index_shape, index_dtype = _npy_header(index_path)[:2]
            if vectors_dtype.kind != "f":
                raise InputFileError(vectors_path, f"holds {vectors_dtype} values; activation vectors are float16 or float32")
            if index_dtype.kind not in "iu":
                raise InputFileError(index_path, f"holds {index_dtype} values; an index holds integers")
            if len(vectors_shape) != 2 or vectors_shape[1] != self.d_in or vectors_shape[0] != shard["n"]:
                raise InputFileError(vectors_path, f"has shape {vectors_shape}, store.json says ({shard['n']}, {self.d_in})")
            if index_shape != (shard["n"], 4):
                raise InputFileError(index_path, f"has shape {index_shape}, expected ({shard['n']}, 4)")
            self._paths["vectors"].append(vectors_path)
            self._paths["index"].append(index_path)
            sizes.append(int(shard["n"]))
        self.shard_sizes = np.array(sizes, dtype=np.int64)
        self.dtype = np.result_type(*dtypes) if dtypes else np.dtype(np.float32)  # of the vectors as stored
        self._offsets = np.cumsum([0] + sizes)
        if self._offsets[-1] == 0:
            raise InputFileError(self.folder, "activation store is empty")
        self.open_shards = max(1, int(open_shards))
        self._open: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()

    def __len__(self) -> int:
        return int(self._offsets[-1])

    @property
    def hook_point(self) -> str | None:
        return self.manifest.get("hook_point")

    @property
    def case_ids(self) -> list[str]:
        return [c["case_id"] for c in self.manifest.get("cases", [])]

    @property
    def shard_offsets(self) -> np.ndarray:
        """Global position of each shard's first vector (and the store's length last): ``(n_shards + 1,)``."""
        return self._offsets

    def _shard(self, kind: str, shard: int) -> np.ndarray:
        """Shard ``shard`` of ``kind`` (``"vectors"`` or ``"index"``), memory-mapped; closes the least recently used."""
        key = (kind, int(shard))
        array = self._open.pop(key, None)
        if array is None:
            path = self._paths[kind][shard]
            try:
                array = np.load(path, mmap_mode="r", allow_pickle=False)
            except (ValueError, OSError) as exc:
                raise InputFileError(path, f"cannot be read as a .npy shard ({exc})") from None
        self._open[key] = array
        while len(self._open) > self.open_shards:
            self._open.popitem(last=False)  # dropping the last reference unmaps the file
        return array

    def _gather(self, kind: str, indices: np.ndarray) -> np.ndarray:
        if len(indices) and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"vector positions must lie in [0, {len(self)})")
        order = np.argsort(indices, kind="stable")
        sorted_idx = indices[order]
        shard_of = np.searchsorted(self._offsets, sorted_idx, side="right") - 1
        parts = []
        for shard in np.unique(shard_of):
            local = sorted_idx[shard_of == shard] - self._offsets[shard]
            parts.append(np.asarray(self._shard(kind, shard)[local]))
        width = self.d_in if kind == "vectors" else 4
        out = np.concatenate(parts) if parts else np.empty((0, width), dtype=np.float32 if kind == "vectors" else np.int32)
        result = np.empty_like(out)
        result[order] = out
        return result

    def _float32(self, raw: np.ndarray) -> torch.Tensor:
        out = torch.from_numpy(np.asarray(raw, dtype=np.float32))
        if not torch.isfinite(out).all():
            raise InputFileError(self.folder, "activation store holds NaN or Inf vectors")
        return out

    def vectors(self, indices: np.ndarray) -> torch.Tensor:
        """Vectors at global positions ``indices`` as float32 ``(n, d_in)``; NaN or Inf raise InputFileError."""
        return self._float32(self._gather("vectors", np.asarray(indices, dtype=np.int64)))

    def trace(self, indices: np.ndarray) -> list[dict]:
        """Where vectors came from: ``{"case_id", "slice", "row", "col"}`` per global index."""
        rows = self._gather("index", np.asarray(indices, dtype=np.int64))
        cases = self.case_ids
        return [{"case_id": cases[r[0]] if 0 <= r[0] < len(cases) else int(r[0]), "slice": int(r[1]), "row": int(r[2]), "col": int(r[3])} for r in rows]

    def split(self, holdout_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """A seeded random split of all vector indices: ``(train, holdout)``.

        Exact and global (8 bytes per vector); :meth:`shard_split` is the streaming one.
        """
        order = np.random.default_rng(seed).permutation(len(self))
        n_hold = max(1, int(round(holdout_fraction * len(self)))) if holdout_fraction > 0 else 0
        return order[n_hold:], order[:n_hold]

    def batches(self, indices: np.ndarray, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
        """Batches of vectors from ``indices`` in a fresh random order: vectors from all images shuffled together."""
        order = np.random.default_rng(seed).permutation(indices)
        for start in range(0, len(order), batch_size):
            yield self.vectors(order[start : start + batch_size])

    def shard_split(self, holdout_fraction: float, seed: int = 0) -> "ShardSplit":
        """A seeded train/hold-out split made shard by shard, for streaming reads (see :class:`ShardSplit`)."""
        return ShardSplit(self, holdout_fraction, seed)


class ShardSplit:
    """A train/hold-out split of a store made shard by shard, and its streaming reads.

    Shard ``s`` holds out ``round(holdout_fraction * n_s)`` of its vectors, chosen by ``default_rng([seed, s])``:
    nothing proportional to the store's length is ever held in memory.

    - :meth:`sample`: a uniform random sample without replacement of the training (or held-out) vectors, read shard
      by shard;
    - :meth:`batches`: an endless stream of full training batches. Every epoch the shards (or, when they are few,
      equal pieces of them) are dealt out to the workers in a seeded random order, balanced by vector count
      (:meth:`assignment`); a worker reads its pieces a buffer of :data:`STREAM_BUFFER_SHARDS` shards' worth at a
      time, shuffles the buffer and cuts it into batches, carrying the remainder into the next buffer. No worker
      reads another's pieces within an epoch, and memory is bounded by the buffer.
    """

    def __init__(self, store: ActivationStore, holdout_fraction: float, seed: int = 0):
        self.store, self.holdout_fraction, self.seed = store, float(holdout_fraction), int(seed)
        sizes = store.shard_sizes
        self.hold_counts = np.array([int(round(self.holdout_fraction * n)) for n in sizes], dtype=np.int64)
        self.train_counts = sizes - self.hold_counts
        self._rows_cache: tuple[int, np.ndarray] = (-1, np.empty(0, dtype=np.int64))

    @property
    def n_train(self) -> int:
        return int(self.train_counts.sum())

    @property
    def n_holdout(self) -> int:
        return int(self.hold_counts.sum())

    def rows(self, shard: int, part: str = "train") -> np.ndarray:
        """Sorted rows (within the shard) of ``shard`` that belong to ``part`` (``"train"`` or ``"holdout"``)."""
        order = np.random.default_rng([self.seed, int(shard)]).permutation(int(self.store.shard_sizes[shard]))
        n_hold = int(self.hold_counts[shard])
        return np.sort(order[n_hold:] if part == "train" else order[:n_hold])

    def sample(self, n: int, rng: np.random.Generator, part: str = "train") -> torch.Tensor:
        """``min(n, size of part)`` vectors drawn uniformly without replacement from ``part``, in random order."""
        counts = self.train_counts if part == "train" else self.hold_counts
        n = int(min(n, counts.sum()))
        if n == 0:
            return torch.empty(0, self.store.d_in)
        per_shard = rng.multivariate_hypergeometric(counts, n)
        picks = []
        for shard in np.flatnonzero(per_shard):
            rows = self.rows(shard, part)
            picks.append(self.store.shard_offsets[shard] + rows[rng.choice(len(rows), int(per_shard[shard]), replace=False)])
        positions = np.concatenate(picks)
        return self.store.vectors(positions[rng.permutation(len(positions))])

    def _pieces(self, world: int) -> list[tuple[int, int, int]]:
        """``(shard, start, stop)`` ranges of each shard's training rows: whole shards, or (when the store has few
        shards for ``world`` workers) equal pieces of them, so that every worker gets about 8 per epoch or more."""
        target = max(1, math.ceil(self.n_train / (8 * world)))
        pieces = []
        for shard, n in enumerate(self.train_counts):
            cuts = np.linspace(0, n, max(1, math.ceil(n / target)) + 1).astype(np.int64) if n else []
            pieces += [(shard, int(a), int(b)) for a, b in zip(cuts[:-1], cuts[1:])]
        return pieces

    def _piece_positions(self, shard: int, start: int, stop: int) -> np.ndarray:
        if self._rows_cache[0] != shard:
            self._rows_cache = (shard, self.rows(shard, "train"))
        return self.store.shard_offsets[shard] + self._rows_cache[1][start:stop]

    def _read(self, parts: list[np.ndarray], shards: list[int | None]) -> np.ndarray:
        """The vectors at ``parts`` (positions; each within ``shards[i]``, or anywhere when None) into one array,
        piece by piece (rows in order, no intermediate copies)."""
        buffer = np.empty((sum(len(p) for p in parts), self.store.d_in), dtype=self.store.dtype)
        start = 0
        for positions, shard in zip(parts, shards):
            stop = start + len(positions)
            if shard is None:
                buffer[start:stop] = self.store._gather("vectors", positions)
            else:
                vectors, rows = self.store._shard("vectors", shard), positions - self.store.shard_offsets[shard]
                if vectors.dtype == buffer.dtype:
                    np.take(vectors, rows, axis=0, out=buffer[start:stop])
                else:
                    buffer[start:stop] = vectors[rows]
            start = stop
        return buffer

    def assignment(self, epoch: int, world: int) -> list[list[tuple[int, int, int]]]:
        """Each worker's pieces for ``epoch``: pieces in a seeded random order, each given to the worker with the
        fewest training vectors so far (so workers get about the same number)."""
        pieces = self._pieces(world)
        load = np.zeros(world, dtype=np.int64)
        mine: list[list[tuple[int, int, int]]] = [[] for _ in range(world)]
        for i in np.random.default_rng([self.seed, 1, epoch]).permutation(len(pieces)):
            worker = int(np.argmin(load))
            mine[worker].append(pieces[i])
            load[worker] += pieces[i][2] - pieces[i][1]
        return mine

    def batches(self, batch_size: int, rank: int = 0, world: int = 1, skip: int = 0,
                buffer_shards: int = STREAM_BUFFER_SHARDS) -> Iterator[torch.Tensor]:  # fmt: skip
        """Endless full training batches ``(batch_size, d_in)`` float32 for worker ``rank`` of ``world``.

        A buffer gathers pieces until it holds ``buffer_shards`` shards' worth of vectors; it is shuffled and cut
        into batches, the remainder carried into the next. ``skip`` batches are passed over without reading their
        vectors (resuming from a checkpoint).

        Raises:
            SegLensError: the split leaves no training vectors.
        """
        if self.n_train == 0:
            raise SegLensError(f"{self.store.folder}: no training vectors left after holding out {self.holdout_fraction:.0%}")
        buffer_rows = buffer_shards * int(self.store.shard_sizes.max())
        carry = np.empty(0, dtype=np.int64)
        epoch = 0
        while True:
            groups, rows = [[]], 0
            for piece in self.assignment(epoch, world)[rank]:
                if rows >= buffer_rows:
                    groups, rows = groups + [[]], 0
                groups[-1].append(piece)
                rows += piece[2] - piece[1]
            for number, group in enumerate(groups):
                parts = [carry] + [self._piece_positions(*piece) for piece in group]
                positions = np.concatenate(parts)
                order = np.random.default_rng([self.seed, 2, epoch, rank, number]).permutation(len(positions))
                full = len(positions) // batch_size
                carry = positions[order[full * batch_size :]]
                if full <= skip:
                    skip -= full
                    continue
                buffer = self._read(parts, [None] + [piece[0] for piece in group])
                for b in range(skip, full):
                    yield self.store._float32(buffer[order[b * batch_size : (b + 1) * batch_size]])
                skip = 0
            epoch += 1


def effective_dimensions(vectors: torch.Tensor, share: float = 0.95) -> int:
    """How many principal components hold ``share`` of the variance of activation vectors ``(n, d)``: how many
    directions an SAE on them has to find (a dictionary far wider than this leaves latents dead)."""
    x = vectors.double()
    values = torch.linalg.svdvals(x - x.mean(dim=0)) ** 2
    cumulative = torch.cumsum(values, 0) / values.sum().clamp_min(1e-12)
    return int(torch.searchsorted(cumulative, torch.tensor(share, dtype=cumulative.dtype)).item()) + 1
