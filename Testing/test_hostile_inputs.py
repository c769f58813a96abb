"""Every bad input gets one clear line: a corpus of hostile inputs, and property-based fuzzing of every document loader.

The corpus (``CORPUS``) holds one case per hostile input, across everything SegLens reads: image files, case folders,
cohort lists, model and SAE folders, activation stores, bundles, recipes, latent labels, alignments and command-line
options. Each runs the ``seglens`` command in-process and must end with exit status 2, exactly one stderr line that
names the offending file or option, no traceback, nothing written at ``--out`` and every file that existed before
unchanged. Signals (SIGTERM, Ctrl-C) end a command with 143 or 130, one line, nothing left behind.

The fuzzing starts from valid documents (model and SAE configs, store index, bundle manifest, labels, alignment,
recipe, suggestions, demo and pipeline state, training checkpoint, phantom cohort manifest) and applies random
deletions, type swaps, huge and negative numbers and wrong nesting: each loader must return a usable object (its
accessors are exercised) or raise ``SegLensError``, never anything else. Examples are derandomised (the same in
every run) and few enough for the file to run in well under a minute on two cores; ``SEGLENS_FUZZ_EXAMPLES=2000``
hunts with that many fresh random examples per loader.

The inputs are tiny: a random U-Net (64 px), a random SAE with a threshold at its ``down_3`` hook, a 32x32x16 case.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import shutil
import signal
import struct
from copy import deepcopy
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import assert_one_line_error, save_tiny_unet, seglens, write_synthetic_case
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from SegLensLogic.errors import SegLensError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MODALITIES = ["t1n", "t1c", "t2w", "t2f"]
SHAPE = (32, 32, 16)
CASE_ID = "BraTS-HOS-00001-000"


# -- the valid inputs every hostile one starts from ------------------------------------------------------------------
class Kit:
    """Valid inputs on disk (never modified by a test): model, SAE, case, recipe, labels, alignment, bundle, store."""

    def __init__(self, root: Path):
        from SegLensLogic.alignment.files import ALIGNMENT_KIND
        from SegLensLogic.bundle import build_bundle
        from SegLensLogic.networks import weights_sha256
        from SegLensLogic.sae.model import BatchTopKSAE, SAEConfig, sae_sha256
        from SegLensLogic.steering import LatentEdit, Region, SteeringSession

        self.root = root
        self.model = save_tiny_unet(root / "model", MODALITIES)
        torch.manual_seed(0)
        sae = BatchTopKSAE(SAEConfig(d_in=32, expansion=4, k=8, threshold=0.05, hook_point="down_3", model_sha256=weights_sha256(self.model)))
        self.sae = sae.save(root / "sae")
        self.sae_sha = sae_sha256(self.sae)
        self.case = write_synthetic_case(root / "cases", CASE_ID, shape=SHAPE)
        session = SteeringSession.open(self.model, self.sae, self.case, device="cpu")
        base = session.segment()
        self.latent = session.top_latents(1)[0][0]
        session.apply(LatentEdit((self.latent,), "scale", 2.0, region=Region.slices(4, 9)))
        session.apply(LatentEdit((self.latent,), "add", 1.0, region=Region.from_mask(base > 0) if base.any() else Region.volume()))
        self.mask, self.recipe = session.export(root / "steered.nii.gz")
        self.labels = root / "latents.json"
        self.labels.write_text(json.dumps({
            "format_version": 1, "kind": "seglens-latent-labels", "sae": {"path": str(self.sae), "sha256": self.sae_sha},
            "d_sae": 128, "class_names": ["background", "necrotic core", "edema", "enhancing tumour"],
            "latents": [{"id": j, "category": "edema" if j % 2 else "texture", "description": f"latent {j}", "confidence": 0.5,
                         "stable": None, "metrics": {"p_edema": 0.1}, "top_examples": [{"case_id": CASE_ID, "slice": 5, "activation": 1.5}]}
                        for j in range(6)],
        }))  # fmt: skip
        self.alignment = root / "adult-vs-other.json"
        self.alignment.write_text(json.dumps({
            "format_version": 1, "kind": ALIGNMENT_KIND, "method": "decoder-encoder-cosine", "matcher": "hungarian", "tau": 0.8,
            "sae_a": {"name": "adult", "sha256": self.sae_sha, "d_sae": 128, "d_in": 32},
            "sae_b": {"name": "other", "sha256": "0" * 64, "d_sae": 64, "d_in": 32},
            "pairs": [{"a": j, "b": j, "enc": 0.9, "dec": 0.85, "shared": j < 3} for j in range(8)],
            "shared_a": [0, 1, 2], "shared_b": [0, 1, 2], "metrics": {"agreement": 90.0}, "space": None,
        }))  # fmt: skip
        self.bundle = build_bundle(self.model, self.sae, root / "bundle", "kit", labels=self.labels, alignments=[self.alignment]).root
        self.store = write_store(root / "store", np.random.default_rng(0).standard_normal((300, 32)).astype(np.float16))
        self.cohort_list = root / "cohort.txt"
        self.cohort_list.write_text(f"cases/{CASE_ID}\n")


def write_store(folder: Path, vectors: np.ndarray, shard_size: int = 200) -> Path:
    """An activation store folder as ``seglens extract`` writes it."""
    folder.mkdir(parents=True)
    shards = []
    for number, start in enumerate(range(0, len(vectors), shard_size)):
        part = vectors[start : start + shard_size]
        np.save(folder / f"vectors_{number:05d}.npy", part)
        np.save(folder / f"index_{number:05d}.npy", np.zeros((len(part), 4), dtype=np.int32))
        shards.append({"vectors": f"vectors_{number:05d}.npy", "index": f"index_{number:05d}.npy", "n": len(part)})
    manifest = {"format_version": 1, "d_in": int(vectors.shape[1]), "dtype": str(vectors.dtype), "hook_point": "down_3",
                "cases": [{"case_id": CASE_ID, "slices": [1], "vectors": len(vectors)}], "n_vectors": len(vectors), "shards": shards}  # fmt: skip
    (folder / "store.json").write_text(json.dumps(manifest))
    return folder


@pytest.fixture(scope="module")
def kit(tmp_path_factory) -> Kit:
    return Kit(tmp_path_factory.mktemp("hostile-kit"))


def snapshot(*roots: Path) -> dict[str, str]:
    """Every file (and symlink target) under ``roots`` with the SHA-256 of its bytes."""
    state = {}
    for root in roots:
        for path in sorted(root.rglob("*")):
            if path.is_symlink():
                state[str(path)] = "-> " + os.readlink(path)
            elif path.is_file():
                state[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                state[str(path)] = "dir"
    return state


def copy(source: Path, target: Path) -> Path:
    if source.is_dir():
        shutil.copytree(source, target, symlinks=True)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    return target


def edit_json(path: Path, change) -> Path:
    """``change(document)`` applied in place to a JSON file (its return value is ignored)."""
    document = json.loads(path.read_text())
    change(document)
    path.write_text(json.dumps(document))
    return path


def rehash(bundle: Path, relative: str) -> None:
    """Record a changed file's hash in the bundle manifest (a tampered bundle that still verifies)."""
    digest = hashlib.sha256((bundle / relative).read_bytes()).hexdigest()
    edit_json(bundle / "bundle.json", lambda m: m["files"].__setitem__(relative, digest))


def case_with(tmp: Path, replace: dict | None = None, **kwargs) -> Path:
    return write_synthetic_case(tmp / "cases", CASE_ID, shape=SHAPE, replace=replace, **kwargs)


def image_path(case: Path, role: str) -> Path:
    return case / f"{CASE_ID}-{role}.nii.gz"


# -- the corpus -------------------------------------------------------------------------------------------------------
CORPUS = []


def hostile(kind: str):
    """Register a corpus case: ``case(kit, tmp) -> (arguments, fragments the one error line must hold)``."""

    def register(function):
        function.kind = kind
        CORPUS.append(function)
        return function

    return register


def segment(kit: Kit, tmp: Path, case: Path, model: Path | None = None) -> list:
    return ["segment", "--model", model or kit.model, "--case", case, "--out", tmp / "mask.nii.gz"]


def explicit(kit: Kit, tmp: Path, **files) -> list:
    """``segment`` with every modality given by ``--image``, some of them replaced by ``files``."""
    images = [f"--image={m}={files.get(m, image_path(kit.case, m))}" for m in MODALITIES]
    return ["segment", "--model", kit.model, *images, "--out", tmp / "mask.nii.gz"]


def steer(kit: Kit, tmp: Path, *more, model=None, sae=None, case=None) -> list:
    return ["steer", "--model", model or kit.model, "--sae", sae or kit.sae, "--case", case or kit.case, "--out", tmp / "out.nii.gz", *more]


# Image files.
@hostile("image")
def truncated_nifti(kit, tmp):
    case = case_with(tmp)
    bad = image_path(case, "t1c")
    bad.write_bytes(bad.read_bytes()[:300])
    return segment(kit, tmp, case), [bad, "corrupt or truncated"]


@hostile("image")
def empty_file(kit, tmp):
    case = case_with(tmp)
    bad = image_path(case, "t2w")
    bad.write_bytes(b"")
    return segment(kit, tmp, case), [bad, "cannot be read as an image"]


@hostile("image")
def nan_voxels(kit, tmp):
    values = np.full(SHAPE, 100.0, dtype=np.float32)
    values[3:6, 3:6, 8] = np.nan
    case = case_with(tmp, replace={"t2f": values})
    return segment(kit, tmp, case), [image_path(case, "t2f"), "9 NaN or Inf voxels"]


@hostile("image")
def slope_beyond_float32(kit, tmp):
    case = case_with(tmp)
    bad = image_path(case, "t1n")
    raw = bytearray(gzip.decompress(bad.read_bytes()))
    raw[112:120] = struct.pack("<ff", 1e36, 0.0)  # scl_slope, scl_inter of the NIfTI-1 header (nibabel would reset them)
    bad.write_bytes(gzip.compress(bytes(raw)))
    return segment(kit, tmp, case), [bad, "beyond the float32 range"]


@hostile("image")
def image_2d(kit, tmp):
    case = case_with(tmp, replace={"t1c": np.ones(SHAPE[:2], dtype=np.int16)})
    return segment(kit, tmp, case), [image_path(case, "t1c"), "2D image"]


@hostile("image")
def image_4d(kit, tmp):
    case = case_with(tmp, replace={"t2w": np.ones((*SHAPE, 2), dtype=np.int16)})
    return segment(kit, tmp, case), [image_path(case, "t2w"), "4D image"]


@hostile("image")
def complex_voxels(kit, tmp):
    case = case_with(tmp, replace={"t1n": np.ones(SHAPE, dtype=np.complex64)})
    return segment(kit, tmp, case), [image_path(case, "t1n"), "complex64"]


@hostile("image")
def gzipped_nrrd(kit, tmp):
    bad = tmp / "post.nrrd"
    bad.write_bytes(gzip.compress(b"NRRD0004\ntype: short\ndimension: 3\n"))
    return explicit(kit, tmp, t1c=bad), [bad, "gzip-compressed"]


@hostile("image")
def garbage_nrrd(kit, tmp):
    bad = tmp / "post.nrrd"
    bad.write_bytes(b"NRRD0004\ntype: nonsense\n\n\x00\x01")
    return explicit(kit, tmp, t1c=bad), [bad, "cannot be read as an image"]


@hostile("image")
def unsupported_suffix(kit, tmp):
    bad = tmp / "scan.jpg"
    bad.write_bytes(b"\xff\xd8\xff")
    return explicit(kit, tmp, t1c=bad), [bad, "unsupported image format"]


@hostile("image")
def image_is_a_folder(kit, tmp):
    bad = tmp / "t1c.nii.gz"
    bad.mkdir()
    return explicit(kit, tmp, t1c=bad), [bad, "not found"]


@hostile("image")
def label_value_too_large(kit, tmp):
    labels = np.zeros(SHAPE, dtype=np.int64)
    labels[10, 10, 8] = 2**40
    case = case_with(tmp)
    nib.save(nib.Nifti1Image(labels, nib.load(image_path(case, "t1n")).affine, dtype=np.int64), image_path(case, "seg"))
    return ["evaluate", "--model", kit.model, "--cohort", case], [image_path(case, "seg"), "unknown label value(s) [1099511627776]"]


@hostile("image")
def label_value_negative(kit, tmp):
    labels = np.zeros(SHAPE, dtype=np.int16)
    labels[10, 10, 8] = -7
    case = case_with(tmp, seg=labels)
    return ["evaluate", "--model", kit.model, "--cohort", case], [image_path(case, "seg"), "negative label value"]


@hostile("image")
def label_value_fractional(kit, tmp):
    labels = np.zeros(SHAPE, dtype=np.float32)
    labels[10, 10, 8] = 1.5
    case = case_with(tmp, seg=labels)
    return ["evaluate", "--model", kit.model, "--cohort", case], [image_path(case, "seg"), "non-integer"]


# Case folders.
@hostile("case")
def no_brain_segment(kit, tmp):
    case = case_with(tmp, replace={m: np.zeros(SHAPE, dtype=np.int16) for m in MODALITIES})
    return segment(kit, tmp, case), [image_path(case, "t1n"), "has no brain"]


@hostile("case")
def no_brain_steer(kit, tmp):
    case = case_with(tmp, replace={m: np.full(SHAPE, 300, dtype=np.int16) for m in MODALITIES})
    return steer(kit, tmp, "--latent", 1, case=case), [image_path(case, "t1n"), "has no brain"]


@hostile("case")
def no_brain_latents(kit, tmp):
    case = case_with(tmp, replace={m: np.zeros(SHAPE, dtype=np.int16) for m in MODALITIES})
    return ["latents", "--model", kit.model, "--sae", kit.sae, "--case", case], [image_path(case, "t1n"), "has no brain"]


@hostile("case")
def grids_differ(kit, tmp):
    case = case_with(tmp, replace={"t2f": np.ones((30, 32, 16), dtype=np.int16)})
    return segment(kit, tmp, case), [image_path(case, "t2f"), "voxel grid"]


@hostile("case")
def two_files_for_one_modality(kit, tmp):
    case = case_with(tmp)
    shutil.copyfile(image_path(case, "t1c"), case / f"{CASE_ID}-t1c.nii")
    return segment(kit, tmp, case), [CASE_ID, "second file for 't1c'"]


@hostile("case")
def missing_modality(kit, tmp):
    case = case_with(tmp, modalities=("t1n", "t1c", "t2w"))
    return segment(kit, tmp, case), [case, "has no t2f"]


@hostile("case")
def not_a_case(kit, tmp):
    folder = tmp / "photos"
    folder.mkdir()
    (folder / "beach.png").write_bytes(b"\x89PNG")
    return segment(kit, tmp, folder), [folder, "no case found"]


@hostile("case")
def cohort_list_not_utf8(kit, tmp):
    bad = tmp / "cohort.txt"
    bad.write_bytes(b"\xff\xfe" + str(kit.case).encode() + b"\n")
    return ["evaluate", "--model", kit.model, "--cohort", bad], [bad, "not UTF-8"]


@hostile("case")
def cohort_list_names_nothing_there(kit, tmp):
    bad = tmp / "cohort.txt"
    bad.write_text("# adult cases\nnowhere/case-1\n")
    return ["evaluate", "--model", kit.model, "--cohort", bad], [bad, "line 2", "case folder not found"]


@hostile("case")
def cohort_list_too_large(kit, tmp):
    bad = tmp / "cohort.txt"
    with open(bad, "wb") as handle:
        handle.truncate(17 << 20)  # sparse: nothing is written, the size alone is refused
    return ["evaluate", "--model", kit.model, "--cohort", bad], [bad, "more than SegLens reads"]


# Model folders.
def broken_model(kit: Kit, tmp: Path, change=None, weights: bytes | None = None) -> Path:
    model = copy(kit.model, tmp / "model")
    if change is not None:
        edit_json(model / "config.json", change)
    if weights is not None:
        (model / "model.safetensors").write_bytes(weights)
    return model


@hostile("model")
def model_config_missing(kit, tmp):
    model = broken_model(kit, tmp)
    (model / "config.json").unlink()
    return segment(kit, tmp, kit.case, model), [model / "config.json", "missing"]


@hostile("model")
def model_config_not_json(kit, tmp):
    model = broken_model(kit, tmp)
    (model / "config.json").write_text('{"arch": "unet", ')
    return segment(kit, tmp, kit.case, model), [model / "config.json", "not valid JSON"]


@hostile("model")
def model_config_nested_too_deeply(kit, tmp):
    model = broken_model(kit, tmp)
    (model / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    return segment(kit, tmp, kit.case, model), [model / "config.json", "nested too deeply"]


@hostile("model")
def model_config_number_too_long(kit, tmp):
    model = broken_model(kit, tmp)
    (model / "config.json").write_text('{"image_size": ' + "9" * 5000 + "}")
    return segment(kit, tmp, kit.case, model), [model / "config.json", "not valid JSON"]


@hostile("model")
def model_unknown_modality(kit, tmp):
    model = broken_model(kit, tmp, lambda c: c.update(modalities=["t1n", "pd", "t2w", "t2f"]))
    return segment(kit, tmp, kit.case, model), [model / "config.json", "modalities[1]", "'pd'"]


@hostile("model")
def model_image_size_zero(kit, tmp):
    model = broken_model(kit, tmp, lambda c: c.update(image_size=0))
    return segment(kit, tmp, kit.case, model), [model / "config.json", "image_size"]


@hostile("model")
def model_absurd_widths(kit, tmp):
    model = broken_model(kit, tmp, lambda c: c["arch_options"].update(features=[10**6] * 6))
    return segment(kit, tmp, kit.case, model), [model / "model.safetensors", "weights do not match config.json"]


@hostile("model")
def model_unknown_arch(kit, tmp):
    model = broken_model(kit, tmp, lambda c: c.update(arch="resnet-1000"))
    return segment(kit, tmp, kit.case, model), [model / "config.json", "does not describe a valid model"]


@hostile("model")
def model_one_class(kit, tmp):
    model = broken_model(kit, tmp, lambda c: c.update(class_names=["background"]))
    return segment(kit, tmp, kit.case, model), [model / "config.json", "class_names"]


@hostile("model")
def model_weights_not_safetensors(kit, tmp):
    model = broken_model(kit, tmp, weights=b"\x80\x04\x95pickle, never loaded")
    return segment(kit, tmp, kit.case, model), [model / "model.safetensors", "cannot be read as safetensors"]


@hostile("model")
def model_weights_nan(kit, tmp):
    from safetensors.torch import load_file, save_file

    model = broken_model(kit, tmp)
    state = load_file(model / "model.safetensors")
    name = next(k for k, v in state.items() if v.is_floating_point() and v.numel() > 1)
    state[name][0] = float("nan")
    save_file(state, model / "model.safetensors")
    return segment(kit, tmp, kit.case, model), [model / "model.safetensors", "NaN or Inf weights"]


@hostile("model")
def model_folder_is_a_file(kit, tmp):
    model = tmp / "model"
    model.write_text("not a folder")
    return segment(kit, tmp, kit.case, model), [model, "is a file"]


# SAE folders.
def broken_sae(kit: Kit, tmp: Path, change=None) -> Path:
    sae = copy(kit.sae, tmp / "sae")
    if change is not None:
        edit_json(sae / "sae_config.json", change)
    return sae


@hostile("sae")
def sae_without_threshold(kit, tmp):
    from SegLensLogic.sae.model import BatchTopKSAE, SAEConfig

    BatchTopKSAE(SAEConfig(d_in=32, expansion=4, k=8, hook_point="down_3")).save(tmp / "sae")
    return ["latents", "--model", kit.model, "--sae", tmp / "sae", "--case", kit.case], [tmp / "sae" / "sae_config.json", "no inference threshold"]


@hostile("sae")
def sae_width_does_not_fit_the_hook(kit, tmp):
    sae = broken_sae(kit, tmp, lambda c: c.update(hook_point="down_2"))
    return steer(kit, tmp, "--latent", 1, sae=sae), [sae / "sae_config.json", "16 channels"]


@hostile("sae")
def sae_absurd_expansion(kit, tmp):
    sae = broken_sae(kit, tmp, lambda c: c.update(d_in=4096, expansion=1000))
    return ["latents", "--model", kit.model, "--sae", sae, "--case", kit.case], [sae / "sae.safetensors", "weights do not match"]


@hostile("sae")
def sae_expansion_beyond_bound(kit, tmp):
    sae = broken_sae(kit, tmp, lambda c: c.update(expansion=10**12))
    return ["latents", "--model", kit.model, "--sae", sae, "--case", kit.case], [sae / "sae_config.json", "'expansion'"]


@hostile("sae")
def sae_threshold_nan(kit, tmp):
    sae = broken_sae(kit, tmp, lambda c: c.update(threshold=float("nan")))
    return ["latents", "--model", kit.model, "--sae", sae, "--case", kit.case], [sae / "sae_config.json", "threshold"]


@hostile("sae")
def sae_k_beyond_dictionary(kit, tmp):
    sae = broken_sae(kit, tmp, lambda c: c.update(k=4000))
    return ["latents", "--model", kit.model, "--sae", sae, "--case", kit.case], [sae / "sae_config.json", "larger than the dictionary"]


@hostile("sae")
def sae_unknown_field(kit, tmp):
    sae = broken_sae(kit, tmp, lambda c: c.update(colour="red"))
    return steer(kit, tmp, "--latent", 1, sae=sae), [sae / "sae_config.json", "unknown SAE config field"]


# Activation stores.
def broken_store(kit: Kit, tmp: Path, change=None) -> Path:
    store = copy(kit.store, tmp / "store")
    if change is not None:
        edit_json(store / "store.json", change)
    return store


def train_sae(kit: Kit, tmp: Path, store: Path) -> list:
    return ["train-sae", "--activations", store, "--out", tmp / "sae-out", "--k", 4, "--expansion", 2, "--max-steps", 2, "--batch-size", 64]


@hostile("store")
def store_without_d_in(kit, tmp):
    store = broken_store(kit, tmp, lambda m: m.pop("d_in"))
    return train_sae(kit, tmp, store), [store / "store.json", "'d_in' is missing"]


@hostile("store")
def store_count_disagrees(kit, tmp):
    store = broken_store(kit, tmp, lambda m: m.update(n_vectors=10**12))
    return train_sae(kit, tmp, store), [store / "store.json", "n_vectors"]


@hostile("store")
def store_shard_outside(kit, tmp):
    store = broken_store(kit, tmp, lambda m: m["shards"][0].update(vectors="../../etc/passwd"))
    return train_sae(kit, tmp, store), [store / "store.json", "shards[0].vectors"]


@hostile("store")
def store_shard_pickled(kit, tmp):
    store = broken_store(kit, tmp)
    np.save(store / "vectors_00000.npy", np.array([{"x": 1}] * 200, dtype=object), allow_pickle=True)
    return train_sae(kit, tmp, store), [store / "vectors_00000.npy", "never unpickled"]


@hostile("store")
def store_shard_truncated(kit, tmp):
    store = broken_store(kit, tmp)
    raw = (store / "vectors_00001.npy").read_bytes()
    (store / "vectors_00001.npy").write_bytes(raw[: len(raw) // 2])
    return train_sae(kit, tmp, store), [store / "vectors_00001.npy", "shorter than"]


@hostile("store")
def store_shard_integers(kit, tmp):
    store = broken_store(kit, tmp)
    np.save(store / "vectors_00000.npy", np.zeros((200, 32), dtype=np.int64))
    return train_sae(kit, tmp, store), [store / "vectors_00000.npy", "int64"]


@hostile("store")
def store_vectors_nan(kit, tmp):
    store = broken_store(kit, tmp)
    vectors = np.load(store / "vectors_00000.npy")
    vectors[:] = np.nan
    np.save(store / "vectors_00000.npy", vectors)
    return ["evaluate-sae", "--sae", kit.sae, "--activations", store], [store, "NaN or Inf"]


# Bundles.
def broken_bundle(kit: Kit, tmp: Path, change=None) -> Path:
    bundle = copy(kit.bundle, tmp / "bundle")
    if change is not None:
        edit_json(bundle / "bundle.json", change)
    return bundle


def check(bundle: Path) -> list:
    return ["bundle", "--check", bundle]


@hostile("bundle")
def bundle_manifest_not_json(kit, tmp):
    bundle = broken_bundle(kit, tmp)
    (bundle / "bundle.json").write_text("{")
    return check(bundle), [bundle / "bundle.json", "not valid JSON"]


@hostile("bundle")
def bundle_wrong_kind(kit, tmp):
    bundle = broken_bundle(kit, tmp, lambda m: m.update(kind="zip-bomb"))
    return check(bundle), [bundle / "bundle.json", "not a SegLens bundle manifest"]


@hostile("bundle")
def bundle_model_path_leaves(kit, tmp):
    bundle = broken_bundle(kit, tmp, lambda m: m["model"].update(path="../model"))
    return check(bundle), [bundle / "bundle.json", "leaves the bundle"]


@hostile("bundle")
def bundle_absolute_path(kit, tmp):
    bundle = broken_bundle(kit, tmp, lambda m: m.update(labels="/etc/passwd"))
    return check(bundle), [bundle / "bundle.json", "absolute path"]


@hostile("bundle")
def bundle_symlink_out(kit, tmp):
    bundle = broken_bundle(kit, tmp)
    (bundle / "latents.json").unlink()
    (bundle / "latents.json").symlink_to(kit.labels)
    return check(bundle), [bundle / "bundle.json", "resolves outside the bundle"]


@hostile("bundle")
def bundle_weights_tampered(kit, tmp):
    bundle = broken_bundle(kit, tmp)
    with open(bundle / "sae" / "sae.safetensors", "r+b") as handle:
        handle.seek(-4, os.SEEK_END)
        handle.write(b"\x00\x00\x80\x7f")
    return check(bundle), [bundle / "sae" / "sae.safetensors", "SHA-256 does not match"]


@hostile("bundle")
def bundle_manifest_lies_about_the_sae(kit, tmp):
    bundle = broken_bundle(kit, tmp, lambda m: m["sae"].update(d_sae=10**9))
    return check(bundle), [bundle / "bundle.json", "sae.d_sae"]


@hostile("bundle")
def bundle_manifest_lies_about_the_model(kit, tmp):
    bundle = broken_bundle(kit, tmp, lambda m: m["preprocessing"].update(image_size=512))
    return check(bundle), [bundle / "bundle.json", "preprocessing.image_size"]


@hostile("bundle")
def bundle_colour_out_of_range(kit, tmp):
    bundle = broken_bundle(kit, tmp, lambda m: m["classes"]["colours"][1].__setitem__(0, 300))
    return check(bundle), [bundle / "bundle.json", "classes.colours[1][0]"]


@hostile("bundle")
def bundle_alignment_right_hash_other_size(kit, tmp):
    bundle = broken_bundle(kit, tmp)
    relative = "alignments/adult-vs-other.json"
    edit_json(bundle / relative, lambda a: a["sae_a"].update(d_sae=4096))
    rehash(bundle, relative)
    return check(bundle), [bundle / relative, "d_sae 4096"]


@hostile("bundle")
def bundle_alignment_malformed_body(kit, tmp):
    bundle = broken_bundle(kit, tmp)
    relative = "alignments/adult-vs-other.json"
    edit_json(bundle / relative, lambda a: a.update(pairs={"a": 1}))
    rehash(bundle, relative)
    return check(bundle), [bundle / relative, "pairs"]


@hostile("bundle")
def bundle_labels_beyond_the_sae(kit, tmp):
    bundle = broken_bundle(kit, tmp)
    edit_json(bundle / "latents.json", lambda d: (d.pop("d_sae"), d["latents"].append({"id": 5000, "category": "edema"})))
    rehash(bundle, "latents.json")
    return check(bundle), [bundle / "latents.json", "latent 5000"]


@hostile("bundle")
def bundle_listed_file_is_a_folder(kit, tmp):
    bundle = broken_bundle(kit, tmp)
    (bundle / "latents.json").unlink()
    (bundle / "latents.json").mkdir()
    return check(bundle), [bundle / "latents.json", "missing from the bundle"]


@hostile("bundle")
def bundle_build_with_foreign_alignment(kit, tmp):
    bad = copy(kit.alignment, tmp / "adult-vs-other.json")
    edit_json(bad, lambda a: a["sae_a"].update(d_sae=64))
    return ["bundle", "--model", kit.model, "--sae", kit.sae, "--alignment", bad, "--name", "x", "--out", tmp / "b"], [bad, "d_sae 64"]


# Recipes.
def broken_recipe(kit: Kit, tmp: Path, change) -> Path:
    return edit_json(copy(kit.recipe, tmp / "recipe.json"), change)


def replay(kit: Kit, tmp: Path, recipe: Path) -> list:
    return steer(kit, tmp, "--recipe", recipe)


@hostile("recipe")
def recipe_latent_out_of_range(kit, tmp):
    recipe = broken_recipe(kit, tmp, lambda r: r["edits"][0].update(latents=[127, 128]))
    return replay(kit, tmp, recipe), [recipe, "edits[0]", "[128]"]


@hostile("recipe")
def recipe_latent_beyond_any_sae(kit, tmp):
    recipe = broken_recipe(kit, tmp, lambda r: r["edits"][0].update(latents=[2**62]))
    return replay(kit, tmp, recipe), [recipe, "edits[0].latents[0]"]


@hostile("recipe")
def recipe_region_terabytes(kit, tmp):
    recipe = broken_recipe(kit, tmp, lambda r: r["edits"][1].update(region={"kind": "mask", "shape": [10**5] * 3, "runs": [0, 10]}))
    return replay(kit, tmp, recipe), [recipe, "edits[1].region.shape[0]"]


@hostile("recipe")
def recipe_region_other_grid(kit, tmp):
    recipe = broken_recipe(kit, tmp, lambda r: r["edits"][1].update(region={"kind": "mask", "shape": [8, 8, 8], "runs": [0, 10]}))
    return replay(kit, tmp, recipe), [recipe, "edits[1].region", "not on the recipe's grid"]


@hostile("recipe")
def recipe_region_runs_outside(kit, tmp):
    size = math.prod(SHAPE)
    recipe = broken_recipe(kit, tmp, lambda r: r["edits"][1].update(region={"kind": "mask", "shape": list(SHAPE), "runs": [size - 1, 50]}))
    return replay(kit, tmp, recipe), [recipe, "edits[1]", "runs"]


@hostile("recipe")
def recipe_slices_beyond_the_volume(kit, tmp):
    recipe = broken_recipe(kit, tmp, lambda r: r["edits"][0].update(region={"kind": "slices", "start": 2, "stop": 400}))
    return replay(kit, tmp, recipe), [recipe, "edits[0]", "outside the volume's 16 axial slices"]


@hostile("recipe")
def recipe_slices_absurd(kit, tmp):
    recipe = broken_recipe(kit, tmp, lambda r: r["edits"][0].update(region={"kind": "slices", "start": 0, "stop": 10**12}))
    return replay(kit, tmp, recipe), [recipe, "edits[0].region.stop"]


@hostile("recipe")
def recipe_alpha_not_finite(kit, tmp):
    recipe = broken_recipe(kit, tmp, lambda r: r["edits"][0].update(alpha=float("inf")))
    return replay(kit, tmp, recipe), [recipe, "edits[0].alpha", "finite"]


@hostile("recipe")
def recipe_edits_not_a_list(kit, tmp):
    recipe = broken_recipe(kit, tmp, lambda r: r.update(edits={"0": {}}))
    return replay(kit, tmp, recipe), [recipe, "'edits'"]


@hostile("recipe")
def recipe_unknown_mode(kit, tmp):
    recipe = broken_recipe(kit, tmp, lambda r: r["edits"][0].update(mode="explode"))
    return replay(kit, tmp, recipe), [recipe, "edits[0].mode"]


@hostile("recipe")
def recipe_case_not_an_object(kit, tmp):
    recipe = broken_recipe(kit, tmp, lambda r: r.update(case="x"))
    return replay(kit, tmp, recipe), [recipe, "'case'"]


@hostile("recipe")
def recipe_other_model(kit, tmp):
    recipe = broken_recipe(kit, tmp, lambda r: r["model"].update(sha256="f" * 64))
    return replay(kit, tmp, recipe), [recipe, "was made with the model"]


@hostile("recipe")
def recipe_other_grid(kit, tmp):
    recipe = broken_recipe(kit, tmp, lambda r: (r.update(edits=r["edits"][:1]), r["case"].update(shape=[64, 64, 64])))
    return replay(kit, tmp, recipe), [recipe, "was made on a volume of shape (64, 64, 64)"]


@hostile("recipe")
def recipe_wrong_kind(kit, tmp):
    recipe = broken_recipe(kit, tmp, lambda r: r.update(kind="seglens-latent-labels"))
    return replay(kit, tmp, recipe), [recipe, "not a SegLens steering recipe"]


# Latent labels and alignments.
def broken_labels(kit: Kit, tmp: Path, change) -> Path:
    return edit_json(copy(kit.labels, tmp / "latents.json"), change)


@hostile("labels")
def labels_id_not_an_integer(kit, tmp):
    labels = broken_labels(kit, tmp, lambda d: d["latents"][2].update(id="7"))
    return steer(kit, tmp, "--latent", 1, "--labels", labels), [labels, "latents[2].id"]


@hostile("labels")
def labels_id_twice(kit, tmp):
    labels = broken_labels(kit, tmp, lambda d: d["latents"][3].update(id=1))
    return steer(kit, tmp, "--latent", 1, "--labels", labels), [labels, "latent 1 is listed twice"]


@hostile("labels")
def labels_of_another_sae(kit, tmp):
    labels = broken_labels(kit, tmp, lambda d: d["sae"].update(sha256="e" * 64))
    return steer(kit, tmp, "--latent", 1, "--labels", labels), [labels, "made for another SAE"]


@hostile("labels")
def labels_confidence_a_string(kit, tmp):
    labels = broken_labels(kit, tmp, lambda d: d["latents"][0].update(confidence="high"))
    return steer(kit, tmp, "--latent", 1, "--labels", labels), [labels, "latents[0].confidence"]


def build_with_alignment(kit: Kit, tmp: Path, alignment: Path) -> list:
    return ["bundle", "--model", kit.model, "--sae", kit.sae, "--alignment", alignment, "--name", "x", "--out", tmp / "b"]


def broken_alignment(kit: Kit, tmp: Path, change) -> Path:
    return edit_json(copy(kit.alignment, tmp / "adult-vs-other.json"), change)


@hostile("alignment")
def alignment_pairs_not_a_list(kit, tmp):
    alignment = broken_alignment(kit, tmp, lambda a: a.update(pairs=7))
    return build_with_alignment(kit, tmp, alignment), [alignment, "'pairs'"]


@hostile("alignment")
def alignment_latent_out_of_range(kit, tmp):
    alignment = broken_alignment(kit, tmp, lambda a: a.update(shared_b=[0, 1, 64]))
    return build_with_alignment(kit, tmp, alignment), [alignment, "shared_b[2]", "out of range"]


@hostile("alignment")
def alignment_without_sizes(kit, tmp):
    alignment = broken_alignment(kit, tmp, lambda a: a["sae_b"].pop("d_sae"))
    return build_with_alignment(kit, tmp, alignment), [alignment, "sae_b.d_sae"]


@hostile("alignment")
def alignment_of_other_saes(kit, tmp):
    alignment = broken_alignment(kit, tmp, lambda a: a["sae_a"].update(sha256="1" * 64))
    return build_with_alignment(kit, tmp, alignment), [alignment, "does not involve the bundle's SAE"]


# Command-line options.
@hostile("option")
def option_modality_twice(kit, tmp):
    t1 = image_path(kit.case, "t1n")
    return ["segment", "--model", kit.model, "--image", f"t1={t1}", "--image", f"t1n={t1}", "--out", tmp / "m.nii.gz"], ["--image gives t1n twice"]


@hostile("option")
def option_unknown_modality(kit, tmp):
    return ["segment", "--model", kit.model, "--image", f"pd={image_path(kit.case, 't1n')}", "--out", tmp / "m.nii.gz"], ["--image pd=", "unknown modality"]


@hostile("option")
def option_image_without_equals(kit, tmp):
    return ["segment", "--model", kit.model, "--image", image_path(kit.case, "t1n"), "--out", tmp / "m.nii.gz"], ["--image expects MODALITY=FILE"]


@hostile("option")
def option_latent_out_of_range(kit, tmp):
    return steer(kit, tmp, "--latent", 128), ["--latent 128 is out of range", "128 latents"]


@hostile("option")
def option_alpha_not_finite(kit, tmp):
    return steer(kit, tmp, "--latent", 1, "--alpha", "nan"), ["--alpha must be a finite number"]


@hostile("option")
def option_slices_reversed(kit, tmp):
    return steer(kit, tmp, "--latent", 1, "--slices", "9:3"), ["--slices 9:3"]


@hostile("option")
def option_slices_beyond_the_volume(kit, tmp):
    return steer(kit, tmp, "--latent", 1, "--slices", "2:99"), ["--slices 2:99", "16 axial slices"]


@hostile("option")
def option_heatmap_out_of_range(kit, tmp):
    return ["latents", "--model", kit.model, "--sae", kit.sae, "--case", kit.case, "--heatmap", 500, "--out-dir", tmp], ["--heatmap 500"]


@hostile("option")
def option_batch_size_zero(kit, tmp):
    return segment(kit, tmp, kit.case) + ["--batch-size", 0], ["--batch-size must be at least 1"]


@hostile("option")
def option_expansion_absurd(kit, tmp):
    return ["train-sae", "--activations", kit.store, "--out", tmp / "s", "--expansion", 10**6], ["--expansion"]


@hostile("option")
def option_unet_features_absurd(kit, tmp):
    return ["train-segmenter", "--cohort", kit.cohort_list, "--out", tmp / "m", "--unet-features", "8,8,16,32,64,100000000"], ["--unet-features"]


@hostile("option")
def option_image_size_zero(kit, tmp):
    return ["train-segmenter", "--cohort", kit.cohort_list, "--out", tmp / "m", "--image-size", 0, "--epochs", 1], ["--image-size"]


@hostile("option")
def option_out_is_a_file_for_training(kit, tmp):
    out = tmp / "existing"
    out.write_text("keep me")
    return ["train-segmenter", "--cohort", kit.cohort_list, "--out", out, "--epochs", 1, "--image-size", 64], [out, "not a folder"]


@hostile("option")
def option_out_is_a_file_for_sae_training(kit, tmp):
    out = tmp / "existing"
    out.write_text("keep me")
    return ["train-sae", "--activations", kit.store, "--out", out], [out, "not a folder"]


@hostile("option")
def option_out_exists(kit, tmp):
    out = tmp / "out.nii.gz"
    out.write_bytes(b"precious")
    return steer(kit, tmp, "--latent", 1), [out, "already exists"]


@hostile("option")
def option_subsample_zero(kit, tmp):
    return ["extract", "--model", kit.model, "--cohort", kit.cohort_list, "--out", tmp / "acts", "--subsample", 0], ["--subsample"]


@hostile("option")
def option_threads_zero(kit, tmp):
    return ["demo", "--out", tmp / "demo", "--threads", 0], ["--threads"]


@pytest.mark.parametrize("case", CORPUS, ids=lambda f: f"{f.kind}-{f.__name__}")
def test_hostile_input_ends_in_one_line(kit, tmp_path, capsys, monkeypatch, case):
    """Exit 2, one stderr line naming the offending file or option, no traceback, nothing written, nothing changed."""
    monkeypatch.chdir(tmp_path)  # outputs that default to the current folder land where they are watched
    args, fragments = case(kit, tmp_path)
    before = snapshot(kit.root, tmp_path)
    code, _, err = seglens(capsys, *args)
    assert_one_line_error(code, err, *fragments)
    assert snapshot(kit.root, tmp_path) == before


def test_the_corpus_covers_every_kind():
    kinds = {case.kind for case in CORPUS}
    assert kinds == {"image", "case", "model", "sae", "store", "bundle", "recipe", "labels", "alignment", "option"}
    assert len(CORPUS) >= 60


# -- signals ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sig, code, line", [(signal.SIGTERM, 143, "seglens: terminated"), (signal.SIGINT, 130, "seglens: interrupted")])
def test_signal_while_writing_leaves_nothing(kit, tmp_path, capsys, monkeypatch, sig, code, line):
    """A signal while the corrected mask is written: one line, the exit status of the signal, no mask, no recipe, no
    temporary file; the default handlers are back afterwards."""
    before_handler = signal.getsignal(signal.SIGTERM)
    real_save = nib.save

    def save_then_signal(image, filename, *args, **kwargs):
        real_save(image, filename, *args, **kwargs)
        signal.raise_signal(sig)

    monkeypatch.setattr(nib, "save", save_then_signal)
    # Ctrl-C as in a terminal: a process started in the background (nohup, `&`, some CI runners) inherits SIGINT
    # ignored, and Python then never turns it into KeyboardInterrupt.
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    before = snapshot(kit.root, tmp_path)
    try:
        result, _, err = seglens(capsys, *steer(kit, tmp_path, "--latent", kit.latent))
    finally:
        signal.signal(signal.SIGINT, previous_int)
    assert result == code and err.strip() == line
    assert snapshot(kit.root, tmp_path) == before
    assert signal.getsignal(signal.SIGTERM) is before_handler


def test_signal_while_training_leaves_nothing(kit, tmp_path, capsys, monkeypatch):
    """SIGTERM in the middle of SAE training: exit 143, no SAE folder."""
    import SegLensLogic.sae.trainer as sae_training

    def terminated(*args, **kwargs):
        signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(sae_training, "train_sae", terminated)
    monkeypatch.setattr("SegLensLogic.sae.train_sae", terminated)
    code, _, err = seglens(capsys, "train-sae", "--activations", kit.store, "--out", tmp_path / "sae", "--max-steps", 2)
    assert code == 143 and err.strip() == "seglens: terminated"
    assert not list(tmp_path.iterdir())


# -- fuzzing of every document loader ---------------------------------------------------------------------------------
# The same examples in every run (CI); SEGLENS_FUZZ_EXAMPLES=N draws N fresh random examples per loader instead.
_HUNT = int(os.environ.get("SEGLENS_FUZZ_EXAMPLES", "0"))
FUZZ = settings(max_examples=_HUNT or 150, deadline=None, derandomize=not _HUNT, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip

ODD_VALUES = st.sampled_from([
    None, True, False, 0, -1, 1, -(2**31), 2**31, 2**63, -(2**63), 10**30, -(10**30), 1e308, -1e308, 1e-308, 0.5, -0.5,
    float("nan"), float("inf"), float("-inf"), "", "x", "../../etc/passwd", "/etc/passwd", "\x00", "é" * 3, [], {}, [[[]]],
    [0, 1, 2], [-1], [10**12], {"a": 1}, {"kind": "volume"}, "0" * 64,
])  # fmt: skip


def _paths(value, prefix=()):
    """Every place inside a JSON value: ``(path, value)`` pairs, the root first."""
    yield prefix, value
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, prefix + (key,))
    elif isinstance(value, list):
        for index, item in enumerate(value[:6]):  # enough places without walking long lists
            yield from _paths(item, prefix + (index,))


def _set(document, path, value):
    if not path:
        return value
    parent = document
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = value
    return document


def _delete(document, path):
    if not path:
        return document
    parent = document
    for key in path[:-1]:
        parent = parent[key]
    del parent[path[-1]]
    return document


@st.composite
def mutated(draw, document):
    """``document`` after 1-3 random mutations: a deletion, an odd value, a type swap, wrong nesting, a huge or
    negative number near the original."""
    document = json.loads(json.dumps(document))
    for _ in range(draw(st.integers(1, 3))):
        places = list(_paths(document))[1:] or [((), document)]  # the root itself is replaced by the "odd" values rarely
        path, value = draw(st.sampled_from(places))
        operation = draw(st.sampled_from(["delete", "odd", "swap", "nest", "number", "number"]))
        value = deepcopy(value)  # no object is shared between two places (or with the strategies' constants)
        if operation == "delete" and path:
            document = _delete(document, path)
        elif operation == "odd":
            document = _set(document, path, deepcopy(draw(ODD_VALUES)))
        elif operation == "swap":
            swapped = (str(value) if not isinstance(value, str) else (int(value) if value.isdigit() else [value]))
            document = _set(document, path, swapped)
        elif operation == "nest":
            choice = draw(st.sampled_from(["list", "object", "values"]))
            nested = {"list": [value], "object": {"value": value}, "values": list(value.values()) if isinstance(value, dict) else [[value]]}[choice]
            document = _set(document, path, nested)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            factor = draw(st.sampled_from([-1, 10**6, 10**12, -(10**12), 0]))
            document = _set(document, path, value * factor if math.isfinite(value * factor) else value)
        else:
            document = _set(document, path, draw(st.integers(-(2**64), 2**64)))
    return document


def write_json(path: Path, document) -> Path:
    path.write_text(json.dumps(document))
    return path


def fuzz(loader, original: dict):
    """Decorate ``test(original mutated)``: ``loader`` returns a valid object or raises SegLensError."""

    @FUZZ
    @given(document=mutated(original))
    def run(document):
        try:
            loader(document)
        except SegLensError:
            pass

    run()


def test_fuzz_model_config(kit, tmp_path):
    from SegLensLogic.networks import load_segmenter

    folder = copy(kit.model, tmp_path / "model")

    def load(document):
        write_json(folder / "config.json", document)
        model = load_segmenter(folder, device="cpu")
        assert model.config.image_size >= 32 and model.config.in_channels >= 1 and model.hook_points()

    fuzz(load, json.loads((kit.model / "config.json").read_text()))


def test_fuzz_sae_config(kit, tmp_path):
    from SegLensLogic.sae.model import BatchTopKSAE

    folder = copy(kit.sae, tmp_path / "sae")

    def load(document):
        write_json(folder / "sae_config.json", document)
        sae = BatchTopKSAE.load(folder)
        assert sae.d_sae == sae.config.d_in * sae.config.expansion
        sae.encode(torch.zeros(2, sae.config.d_in))

    fuzz(load, json.loads((kit.sae / "sae_config.json").read_text()))


def test_fuzz_store_index(kit, tmp_path):
    from SegLensLogic.sae.activations import ActivationStore

    folder = copy(kit.store, tmp_path / "store")

    def load(document):
        write_json(folder / "store.json", document)
        store = ActivationStore(folder)
        store.vectors(np.array([0, len(store) - 1]))
        store.trace(np.array([0]))
        assert store.hook_point is None or isinstance(store.hook_point, str)

    fuzz(load, json.loads((kit.store / "store.json").read_text()))


def test_fuzz_bundle_manifest(kit, tmp_path):
    from SegLensLogic.bundle import load_bundle

    folder = copy(kit.bundle, tmp_path / "bundle")

    def load(document):
        write_json(folder / "bundle.json", document)
        bundle = load_bundle(folder)
        bundle.summary()
        assert len(bundle.class_names) == len(bundle.colours) and bundle.modalities and bundle.image_size >= 32
        bundle.load_labels(), bundle.load_alignments(), bundle.load_suggestions(), bundle.figures, bundle.card_path

    fuzz(load, json.loads((kit.bundle / "bundle.json").read_text()))


def test_fuzz_latent_labels(kit, tmp_path):
    from SegLensLogic.interpretation.latent_labels import load_latent_labels

    def load(document):
        labels = load_latent_labels(write_json(tmp_path / "latents.json", document))
        for name, latents in labels.categories().items():
            assert all(isinstance(labels.description(j), (str, type(None))) for j in latents)
        labels.class_names, labels.stability, labels.cohort, labels.sae_sha256, labels.check_sae(128)

    fuzz(load, json.loads(kit.labels.read_text()))


def test_fuzz_alignment(kit, tmp_path):
    from SegLensLogic.alignment.files import load_alignment

    def load(document):
        alignment = load_alignment(write_json(tmp_path / "alignment.json", document))
        for side in ("a", "b"):
            shared, specific = alignment.shared(side), alignment.specific(side)
            for j in (shared + specific)[:5]:
                alignment.status(j, side), alignment.partner(j, side), alignment.matched_partner(j, side)
        repr(alignment), alignment.shared_fraction, alignment.pairs
        try:
            alignment.check_sae(kit.sae_sha, 128, 32)
        except SegLensError:
            pass

    fuzz(load, json.loads(kit.alignment.read_text()))


def test_fuzz_recipe(kit, tmp_path):
    from SegLensLogic.steering.recipe import edit_from_json, load_recipe

    def load(document):
        recipe = load_recipe(write_json(tmp_path / "recipe.json", document))
        recipe.check_matches("a" * 64, "b" * 64, tmp_path)
        recipe.check_case(CASE_ID, SHAPE, np.eye(4), tmp_path)
        for index, edit in enumerate(recipe.edits):
            edit_from_json(edit, tmp_path, {}, shape=SHAPE, where=f"edits[{index}]")

    fuzz(load, json.loads(kit.recipe.read_text()))


def test_fuzz_suggestions(tmp_path):
    from SegLensLogic.steering.suggestions import load_suggestions

    original = {"format_version": 1, "kind": "seglens-steering-suggestions", "n_latents": 5, "alphas": [0, 0.5, 1, 2],
                "reference": {"proportions": [0.2, 0.6, 0.2], "log_size": [10.0, 1.0]},
                "populations": {"ssa": {"specific": [1, 2, 3], "alignment": "alignments/a.json", "calibrated_alpha": 2.0}},
                "calibrated_alpha": {"all": 2.0, "ssa": 2.0}, "evidence": []}  # fmt: skip

    def load(document):
        suggestions = load_suggestions(write_json(tmp_path / "suggestions.json", document))
        suggestions.check_sae(128)
        assert suggestions.alphas and len(suggestions.proportions) == 3 and "all" in suggestions.calibrated_alpha

    fuzz(load, original)


def test_fuzz_demo_state(tmp_path):
    from SegLensLogic.app.demo import STATE_FORMAT_VERSION, STATE_KIND, open_state

    out = tmp_path / "demo"
    (out / "01-cohorts").mkdir(parents=True)
    options = {"quick": True, "data": None}
    original = {"format_version": STATE_FORMAT_VERSION, "kind": STATE_KIND, "options": options, "started": "2025-01-01T00:00:00Z",
                "steps": {"cohorts": {"folder": "01-cohorts", "seconds": 1.5, "finished": "2025-01-01T00:00:02Z", "outputs": {"cohorts": []}}}}  # fmt: skip

    def load(document):
        write_json(out / "demo.json", document)
        state = open_state(out, options, overwrite=False, log=lambda message: None)
        record = state.done("cohorts")
        if record is not None:
            state.outputs("cohorts"), state.folder("cohorts"), float(record["seconds"])

    fuzz(load, original)


def test_fuzz_pipeline_state(tmp_path):
    from SegLensLogic.app.pipeline import PIPELINE_FORMAT_VERSION, Pipeline

    out = tmp_path / "run"
    (out / "split").mkdir(parents=True)
    options = {"size": 64}
    original = {"kind": "seglens-test-run", "format_version": PIPELINE_FORMAT_VERSION, "options": options, "started": "x",
                "steps": {"split": {"folder": "split", "seconds": 0.5, "finished": "y", "outputs": {"cases": 3}}}}  # fmt: skip

    def load(document):
        write_json(out / "state.json", document)
        pipeline = Pipeline(out, "seglens-test-run", "state.json", options, [("split", "Split"), ("train", "Train")], log=lambda m: None)
        if pipeline.done("split") is not None:
            assert isinstance(pipeline.outputs("split"), dict)

    fuzz(load, original)


def test_fuzz_training_checkpoint(tmp_path):
    from safetensors.torch import save_file

    from SegLensLogic.segmentation.training import _CHECKPOINT_STATE, _CHECKPOINT_TENSORS, _load_checkpoint

    folder = tmp_path / "checkpoint"
    folder.mkdir()
    save_file({"model.w": torch.zeros(2)}, folder / _CHECKPOINT_TENSORS)
    original = {"kind": "seglens-training-checkpoint", "run": {"cohort": ["a"], "options": {"epochs": 2}}, "epoch": 1,
                "history": [{"epoch": 1, "loss": 0.5}], "best_epoch": 1, "best_metric": 0.4, "best_scores": {"dice_mean": 0.4},
                "seconds": 12.5, "optimizer": {"param_groups": [{"lr": 0.001, "params": [0]}], "plain": {"0.step": 3}},
                "scheduler": None}  # fmt: skip

    def load(document):
        write_json(folder / _CHECKPOINT_STATE, document)
        tensors, state = _load_checkpoint(folder)
        assert state["epoch"] >= 0 and isinstance(state["history"], list) and isinstance(state["run"], dict)

    fuzz(load, original)


def test_fuzz_cohort_manifest(tmp_path):
    from SegLensLogic.data.phantoms import COHORT_KIND, planted_shift_categories, read_cohort_manifest

    original = {"format_version": 1, "kind": COHORT_KIND, "population": "ssa", "label_scheme": "brats2023", "seed": 0, "n": 2,
                "shifted_factors": {"noise": {"adult": 0.01, "ssa": 0.05, "what": "Rician noise"}}, "feature": None,
                "cases": [{"case_id": "SYN-1"}]}  # fmt: skip

    def load(document):
        manifest = read_cohort_manifest(write_json(tmp_path / "cohort.json", document))
        planted_shift_categories(manifest)

    fuzz(load, original)


@FUZZ
@given(text=st.text(max_size=400) | st.binary(max_size=400))
def test_fuzz_cohort_list(tmp_path_factory, text):
    from SegLensLogic.data.cohort import load_cohort

    path = tmp_path_factory.mktemp("cohort-list") / "cohort.txt"
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
    try:
        load_cohort(path)
    except SegLensError:
        pass


def test_fuzz_safetensors_header(kit, tmp_path):
    """Weights files whose header lies (shapes, offsets, sizes): refused from the header, nothing allocated."""
    from SegLensLogic.sae.model import BatchTopKSAE

    folder = copy(kit.sae, tmp_path / "sae")
    raw = (kit.sae / "sae.safetensors").read_bytes()
    length = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + length])

    def load(document):
        encoded = json.dumps(document).encode()
        (folder / "sae.safetensors").write_bytes(struct.pack("<Q", len(encoded)) + encoded + raw[8 + length :])
        BatchTopKSAE.load(folder)

    fuzz(load, header)


def test_a_run_resumes_under_options_added_since_it_started_and_refuses_changed_ones(tmp_path):
    """A long run (the reference build) started by an earlier version resumes when the only difference is options
    that version lacked, at their defaults (said in the log); a changed option, an added one away from its default,
    or any added option of a run that gives no defaults (the demo) is still refused."""
    from SegLensLogic.errors import SegLensError
    from SegLensLogic.app.pipeline import Pipeline

    steps = [("one", "the first step")]
    defaults = {"settings": {"a": 0, "b": 2, "c": 0}, "data": "x"}
    first = Pipeline(tmp_path / "run", "demo-run", "run.json", {"settings": {"a": 1}, "data": "x"}, steps, log=lambda _m: None)
    first.run("one", lambda folder: {"value": 1})
    lines = []
    with pytest.raises(SegLensError, match="other options"):  # no defaults: exact options only
        Pipeline(tmp_path / "run", "demo-run", "run.json", {"settings": {"a": 1, "b": 2}, "data": "x"}, steps, log=lines.append)
    with pytest.raises(SegLensError, match="other options"):  # added, but not at its default
        Pipeline(tmp_path / "run", "demo-run", "run.json", {"settings": {"a": 1, "b": 5}, "data": "x"}, steps, log=lines.append,
                 defaults=defaults)  # fmt: skip
    resumed = Pipeline(tmp_path / "run", "demo-run", "run.json", {"settings": {"a": 1, "b": 2}, "data": "x"}, steps, log=lines.append,
                       defaults=defaults)  # fmt: skip
    assert resumed.done("one") is not None and resumed.data["options"]["settings"] == {"a": 1, "b": 2}
    assert lines == ["Options added since this run started, taken at their defaults: settings.b"]
    with pytest.raises(SegLensError, match=r"other options \(settings\)"):
        Pipeline(tmp_path / "run", "demo-run", "run.json", {"settings": {"a": 3, "b": 2, "c": 0}, "data": "x"}, steps, log=lines.append,
                 defaults=defaults)  # fmt: skip
    with pytest.raises(SegLensError, match="other options"):
        Pipeline(tmp_path / "run", "demo-run", "run.json", {"settings": {"b": 2}, "data": "x"}, steps, log=lines.append, defaults=defaults)


def test_a_staged_numbered_run_never_records_a_half_written_step(tmp_path):
    """The demo's runner: numbered step folders, each written into a hidden ``.NN-name.tmp`` renamed into place
    when the step returns (paths in its outputs recorded under the final name); a step that fails leaves no
    record and no visible folder, and the rerun redoes only it."""
    from SegLensLogic.app.pipeline import Pipeline

    steps = [("one", "first"), ("two", "second")]

    def open_run(log):
        return Pipeline(tmp_path / "run", "staged-run", "run.json", {}, steps, log=log, numbered=True, staged=True)

    def one(folder):
        (folder / "a.txt").write_text("a")
        return {"file": str(folder / "a.txt")}

    def broken(folder):
        (folder / "half.txt").write_text("half")
        raise RuntimeError("cut off")

    run = open_run(lambda m: None)
    assert run.run("one", one) == {"file": str(tmp_path / "run" / "01-one" / "a.txt")}
    with pytest.raises(RuntimeError):
        run.run("two", broken)
    assert not (tmp_path / "run" / "02-two").exists() and "two" not in run.data["steps"]
    lines = []
    again = open_run(lines.append)
    again.run("one", one)
    again.run("two", lambda folder: {"n": len(list(folder.iterdir()))})
    assert again.outputs("two") == {"n": 0} and not (tmp_path / "run" / ".02-two.tmp").exists()
    assert lines[0] == "[1/2] first: already done in an earlier run (0.0 s), skipped" and lines[1] == "[2/2] second"


def test_redo_reruns_a_finished_step_and_every_later_one(tmp_path):
    """``build-reference --redo STEP``: the step and those after it run again (their old outputs replaced), the
    earlier ones stay done; an unknown step is refused by name."""
    from SegLensLogic.errors import SegLensError
    from SegLensLogic.app.pipeline import Pipeline

    steps = [("one", "first"), ("two", "second"), ("three", "third")]
    calls = []

    def open_run():
        return Pipeline(tmp_path / "run", "redo-run", "run.json", {}, steps, log=lambda m: None)

    def run_all(run, value):
        for name, _ in steps:
            run.run(name, lambda folder, name=name: calls.append(name) or {"value": value})

    run_all(open_run(), 1)
    assert calls == ["one", "two", "three"]
    run = open_run()
    assert run.redo("two") == ["two", "three"]
    again = open_run()  # the forgetting is saved: a new process sees it
    assert again.done("one") is not None and again.done("two") is None and again.done("three") is None
    run_all(again, 2)
    assert calls == ["one", "two", "three", "two", "three"]
    assert [again.outputs(n)["value"] for n, _ in steps] == [1, 2, 2]
    with pytest.raises(SegLensError, match="unknown step 'four'"):
        again.redo("four")
