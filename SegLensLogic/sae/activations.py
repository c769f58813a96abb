"""Activation stores: every spatial position of every brain slice at a hook point, as one vector, on disk.

A store is a folder::

    store.json            d_in, dtype, hook point, model hash, cases, shards
    vectors_00000.npy     (n, d_in) float16 or float32, read memory-mapped
    index_00000.npy       (n, 4) int32: case number, axial slice (RAS), row, column of the feature map

Extraction streams case by case and shard by shard, so a cohort never has to fit in memory; the store is
written into a temporary folder and renamed into place when complete, so a failed run leaves nothing half
written. Feature maps of any spatial rank work: 2D maps ``(N, D, h, w)`` and 3D maps ``(N, D, d, h, w)`` flatten
the same way (:func:`feature_map_to_vectors`); the index then records the first spatial axes that fit.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..data.cohort import Cohort
from ..data.io import atomic_write_text, read_json
from ..errors import InputFileError, SegLensError, refuse_existing
from ..inference import default_batch_size, prepare_for_model
from ..networks.segmenter import Segmenter, weights_sha256

STORE_NAME = "store.json"
STORE_FORMAT_VERSION = 1


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
    """

    hook: str | None = None
    brain_only: bool = True
    min_brain_fraction: float = 0.5
    subsample: float = 1.0
    dtype: str = "float16"
    shard_size: int = 1 << 18
    batch_size: int | None = None
    seed: int = 0


class _ShardWriter:
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
    """
    options = options or ExtractionOptions()
    out_dir = refuse_existing(out_dir, overwrite)
    hook = model._hook(options.hook)
    d_in, *spatial = model.hook_points()[hook]
    device = next(model.parameters()).device
    model.eval()
    batch_size = options.batch_size or default_batch_size(model)
    rng = np.random.default_rng(options.seed)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        writer = _ShardWriter(tmp, d_in, options.dtype, options.shard_size)
        cases = []
        for case_number, case in enumerate(cohort):
            prepared = prepare_for_model(model, case)
            slices = prepared.brain_slices()
            kept = 0
            for start in range(0, len(slices), batch_size):
                batch = slices[start : start + batch_size]
                # Only the encoder up to the hook: the rest of the network is not needed here.
                activations, _ = model.encode(prepared.model_input(batch).to(device), hook)
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
                writer.add(vectors[flat_keep], rows.reshape(-1, 4)[flat_keep])
                kept += int(flat_keep.sum())
            cases.append({"case_id": case.case_id, "slices": [int(z) for z in slices], "vectors": kept})
            log(f"  {case.case_id}: {kept} vectors from {len(slices)} slices")
        writer.flush()
        total = sum(shard["n"] for shard in writer.shards)
        if total == 0:
            raise SegLensError(f"no activation vectors were kept from cohort '{cohort.name}' (check --subsample and the brain masks)")
        manifest = {
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
            "shards": writer.shards,
            "options": {k: v for k, v in vars(options).items()},
        }
        atomic_write_text(tmp / STORE_NAME, json.dumps(manifest, indent=2) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"Wrote {total} vectors of dimension {d_in} ({options.dtype}) in {len(writer.shards)} shard(s) to {out_dir}")
    return ActivationStore(out_dir)


class ActivationStore:
    """A read-only, memory-mapped view of an activation store folder.

    Raises:
        InputFileError: on open, when the folder, its ``store.json`` or a shard is missing or inconsistent.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        manifest_path = self.folder / STORE_NAME
        if not self.folder.is_dir():
            raise InputFileError(self.folder, "activation store not found")
        if not manifest_path.is_file():
            raise InputFileError(manifest_path, "missing: not an activation store (run seglens extract)")
        self.manifest = read_json(manifest_path)
        if not isinstance(self.manifest, dict):
            raise InputFileError(manifest_path, "is not a JSON object")
        for key in ("d_in", "shards", "n_vectors"):
            if key not in self.manifest:
                raise InputFileError(manifest_path, f"missing field '{key}'")
        self.d_in = int(self.manifest["d_in"])
        self._vectors, self._index = [], []
        for shard in self.manifest["shards"]:
            vectors_path, index_path = self.folder / shard["vectors"], self.folder / shard["index"]
            for path in (vectors_path, index_path):
                if not path.is_file() or path.parent.resolve() != self.folder.resolve():
                    raise InputFileError(path, "shard listed in store.json is missing")
            try:
                vectors = np.load(vectors_path, mmap_mode="r", allow_pickle=False)
                index = np.load(index_path, mmap_mode="r", allow_pickle=False)
            except ValueError as exc:
                raise InputFileError(vectors_path, f"cannot be read as a .npy shard ({exc})") from None
            if vectors.ndim != 2 or vectors.shape[1] != self.d_in or vectors.shape[0] != shard["n"]:
                raise InputFileError(vectors_path, f"has shape {vectors.shape}, store.json says ({shard['n']}, {self.d_in})")
            if index.shape != (shard["n"], 4):
                raise InputFileError(index_path, f"has shape {index.shape}, expected ({shard['n']}, 4)")
            self._vectors.append(vectors)
            self._index.append(index)
        self._offsets = np.cumsum([0] + [len(v) for v in self._vectors])
        if self._offsets[-1] == 0:
            raise InputFileError(self.folder, "activation store is empty")

    def __len__(self) -> int:
        return int(self._offsets[-1])

    @property
    def hook_point(self) -> str | None:
        return self.manifest.get("hook_point")

    @property
    def case_ids(self) -> list[str]:
        return [c["case_id"] for c in self.manifest.get("cases", [])]

    def _gather(self, arrays: list[np.ndarray], indices: np.ndarray) -> np.ndarray:
        order = np.argsort(indices, kind="stable")
        sorted_idx = indices[order]
        shard_of = np.searchsorted(self._offsets, sorted_idx, side="right") - 1
        parts = []
        for shard in np.unique(shard_of):
            local = sorted_idx[shard_of == shard] - self._offsets[shard]
            parts.append(np.asarray(arrays[shard][local]))
        out = np.concatenate(parts)
        result = np.empty_like(out)
        result[order] = out
        return result

    def vectors(self, indices: np.ndarray) -> torch.Tensor:
        """Vectors at global positions ``indices`` as float32 ``(n, d_in)``; NaN or Inf raise InputFileError."""
        out = torch.from_numpy(self._gather(self._vectors, np.asarray(indices, dtype=np.int64)).astype(np.float32))
        if not torch.isfinite(out).all():
            raise InputFileError(self.folder, "activation store holds NaN or Inf vectors")
        return out

    def trace(self, indices: np.ndarray) -> list[dict]:
        """Where vectors came from: ``{"case_id", "slice", "row", "col"}`` per global index."""
        rows = self._gather(self._index, np.asarray(indices, dtype=np.int64))
        cases = self.case_ids
        return [{"case_id": cases[r[0]] if r[0] < len(cases) else int(r[0]), "slice": int(r[1]), "row": int(r[2]), "col": int(r[3])} for r in rows]

    def split(self, holdout_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """A seeded random split of all vector indices: ``(train, holdout)``."""
        order = np.random.default_rng(seed).permutation(len(self))
        n_hold = max(1, int(round(holdout_fraction * len(self)))) if holdout_fraction > 0 else 0
        return order[n_hold:], order[:n_hold]

    def batches(self, indices: np.ndarray, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
        """Batches of vectors from ``indices`` in a fresh random order: vectors from all images shuffled together."""
        order = np.random.default_rng(seed).permutation(indices)
        for start in range(0, len(order), batch_size):
            yield self.vectors(order[start : start + batch_size])
