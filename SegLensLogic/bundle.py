"""Model bundles: a segmenter, its SAE, latent labels and alignments in one folder that loads in one call.

A bundle is a folder::

    BUNDLE/
      bundle.json            versioned manifest (below)
      model/                 config.json + model.safetensors (the segmenter)
      sae/                   sae_config.json + sae.safetensors (threshold and normalisation folded in)
      latents.json           latent labels (optional, ``seglens interpret``)
      alignments/*.json      alignment files against other cohorts' SAEs (optional, any number)
      MODEL_CARD.md          the model card (optional; its measured figures are in the manifest's ``figures``)
      suggestions.json       suggested corrections per population (optional; ``SegLensLogic.steering.suggestions``)

``bundle.json`` (``format_version`` 1)::

    {"format_version": 1, "kind": "seglens-bundle", "name": "adult", "cohort": "adult", "seglens_version": "0.1.0",
     "model": {"path": "model", "arch": "unet", "hook_point": "down_3", "sha256": "<weights>"},
     "sae": {"path": "sae", "d_in": 32, "d_sae": 128, "k": 8, "threshold": 1.3, "sha256": "<weights>"},
     "labels": "latents.json" | null,
     "alignments": ["alignments/adult-vs-pediatric.json"],
     "card": "MODEL_CARD.md" | null, "figures": {...} | null, "suggestions": "suggestions.json" | null,
     "classes": {"names": ["background", ...], "colours": [[0, 0, 0], [255, 0, 0], ...], "label_scheme": "brats2023"},
     "preprocessing": {"modalities": ["t1n", "t1c", "t2w", "t2f"], "image_size": 64, "label_scheme": "brats2023",
                       "slice_axis": "axial (RAS k)", "intensity": "z-score inside the brain per modality"},
     "files": {"model/config.json": "<sha256>", "model/model.safetensors": "<sha256>", ...}}

Loading validates the manifest before anything else: the version and kind, that every path is relative and stays
inside the bundle (no absolute paths, no ``..``, no symlink leading out), that every listed file exists and has its
SHA-256, and that the SAE, labels and alignments belong together. Every problem is an :class:`InputFileError`
naming the file. Weights are safetensors and configs JSON: nothing is unpickled.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from .data.io import atomic_write_text, file_sha256, read_json
from .errors import InputFileError, OutputExistsError, SegLensError

MANIFEST_NAME = "bundle.json"
BUNDLE_KIND = "seglens-bundle"
BUNDLE_FORMAT_VERSION = 1
MODEL_FILES = ("config.json", "model.safetensors")
SAE_FILES = ("sae_config.json", "sae.safetensors")

# FreeSurfer's colour table (FreeSurferColorLUT.txt) for the healthy structures, in HEALTHY_CLASSES order.
ASEG_COLOURS = {
    1: (0, 118, 14),  # thalamus
    2: (122, 186, 220),  # caudate
    3: (236, 13, 176),  # putamen
    4: (12, 48, 255),  # pallidum
    5: (220, 216, 20),  # hippocampus
    6: (103, 255, 255),  # amygdala
    7: (255, 165, 0),  # accumbens
    8: (165, 42, 42),  # ventral diencephalon
}


def class_colours(label_scheme: str, num_classes: int) -> list[list[int]]:
    """RGB (0-255) per class index, background black: BraTS viewer colours for tumours, FreeSurfer's for aseg."""
    from .data.labels import TUMOUR_COLOURS

    table = ASEG_COLOURS if label_scheme == "aseg" else TUMOUR_COLOURS
    grey = (128, 128, 128)
    return [[0, 0, 0]] + [list(table.get(index, grey)) for index in range(1, num_classes)]


# -- paths inside a bundle -----------------------------------------------------------------------------------------
def _inside(root: Path, relative: Any, manifest: Path, what: str) -> Path:
    """``root / relative`` after checking that it cannot leave the bundle.

    Raises:
        InputFileError: not a string, absolute, with ``..``, or resolving (through symlinks) outside ``root``.
    """
    if not isinstance(relative, str) or not relative.strip():
        raise InputFileError(manifest, f"{what}: path must be a non-empty string, got {relative!r}")
    pure = PurePosixPath(relative.replace("\\", "/"))
    if pure.is_absolute() or relative.startswith(("/", "\\")) or (len(relative) > 1 and relative[1] == ":"):
        raise InputFileError(manifest, f"{what}: absolute path '{relative}' is not allowed; paths are relative to the bundle")
    if ".." in pure.parts:
        raise InputFileError(manifest, f"{what}: path '{relative}' leaves the bundle ('..')")
    path = root / Path(*pure.parts)
    resolved = path.resolve()
    if resolved != root.resolve() and root.resolve() not in resolved.parents:
        raise InputFileError(manifest, f"{what}: path '{relative}' resolves outside the bundle (to {resolved}; a symlink?)")
    return path


@dataclass
class Bundle:
    """A validated bundle (see the module docstring for the layout).

    Attributes:
        root: the bundle folder.
        manifest: the parsed ``bundle.json``.
    """

    root: Path
    manifest: dict = field(repr=False)

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def cohort(self) -> str | None:
        return self.manifest.get("cohort")

    @property
    def model_dir(self) -> Path:
        return self.root / self.manifest["model"]["path"]

    @property
    def sae_dir(self) -> Path:
        return self.root / self.manifest["sae"]["path"]

    @property
    def hook_point(self) -> str:
        return self.manifest["model"]["hook_point"]

    @property
    def labels_path(self) -> Path | None:
        labels = self.manifest.get("labels")
        return None if labels is None else self.root / labels

    @property
    def alignment_paths(self) -> list[Path]:
        return [self.root / path for path in self.manifest.get("alignments", [])]

    @property
    def card_path(self) -> Path | None:
        card = self.manifest.get("card")
        return None if card is None else self.root / card

    @property
    def suggestions_path(self) -> Path | None:
        suggestions = self.manifest.get("suggestions")
        return None if suggestions is None else self.root / suggestions

    def load_suggestions(self):
        """The suggested corrections (``SegLensLogic.steering.suggestions.Suggestions``), or None."""
        if self.suggestions_path is None:
            return None
        from .steering.suggestions import load_suggestions

        return load_suggestions(self.suggestions_path)

    @property
    def figures(self) -> dict:
        """The model card's measured figures (empty when the bundle has no card)."""
        return dict(self.manifest.get("figures") or {})

    @property
    def class_names(self) -> list[str]:
        return list(self.manifest["classes"]["names"])

    @property
    def colours(self) -> list[tuple[int, int, int]]:
        """RGB 0-255 per class index (background first)."""
        return [tuple(c) for c in self.manifest["classes"]["colours"]]

    @property
    def label_scheme(self) -> str:
        return self.manifest["preprocessing"]["label_scheme"]

    @property
    def modalities(self) -> list[str]:
        return list(self.manifest["preprocessing"]["modalities"])

    @property
    def image_size(self) -> int:
        return int(self.manifest["preprocessing"]["image_size"])

    @property
    def files(self) -> dict[str, str]:
        """Relative path -> SHA-256 of every file the manifest lists."""
        return dict(self.manifest["files"])

    def load_model(self, device=None):
        """The segmenter (:class:`SegLensLogic.networks.Segmenter`), in eval mode on ``device`` (default: GPU if any)."""
        from .networks import load_segmenter

        return load_segmenter(self.model_dir, device=device)

    def load_sae(self, device=None):
        """The sparse autoencoder (:class:`SegLensLogic.sae.BatchTopKSAE`) on ``device`` (default CPU)."""
        from .sae import BatchTopKSAE

        return BatchTopKSAE.load(self.sae_dir, device=device)

    def load_labels(self):
        """The latent labels (``SegLensLogic.interpretation.LatentLabels``), or None when the bundle has none."""
        if self.labels_path is None:
            return None
        from .interpretation import load_latent_labels

        return load_latent_labels(self.labels_path)

    def load_alignments(self) -> list:
        """The alignments (``SegLensLogic.alignment.Alignment``) against other cohorts' SAEs."""
        if not self.alignment_paths:
            return []
        from .alignment import load_alignment

        return [load_alignment(path) for path in self.alignment_paths]

    def summary(self) -> str:
        """A few lines describing the bundle, for the command line."""
        m = self.manifest
        lines = [
            f"bundle '{self.name}' (cohort {self.cohort or '-'}) at {self.root}",
            f"  model: {m['model']['arch']}, hook {self.hook_point}, inputs {', '.join(self.modalities)} at {self.image_size} px",
            f"  SAE: {m['sae']['d_sae']} latents over {m['sae']['d_in']} channels, k {m['sae']['k']}, threshold {m['sae']['threshold']}",
            f"  classes ({self.label_scheme}): {', '.join(self.class_names)}",
            f"  latent labels: {self.labels_path.name if self.labels_path else 'none'}; alignments: {len(self.alignment_paths)}",
            f"  {len(self.files)} files, all SHA-256 verified",
        ]
        return "\n".join(lines)


def _require(manifest: dict, key: str, kind: type | tuple, path: Path) -> Any:
    if key not in manifest:
        raise InputFileError(path, f"manifest lacks '{key}'")
    value = manifest[key]
    if not isinstance(value, kind):
        raise InputFileError(path, f"'{key}' has the wrong type ({type(value).__name__})")
    return value


def _check_sha_links(root: Path, manifest: dict, path: Path) -> None:
    """The SAE was trained on this model; labels and alignments were made with this SAE (when they say so)."""
    model_sha, sae_sha = manifest["model"]["sha256"], manifest["sae"]["sha256"]
    sae_config = read_json(root / manifest["sae"]["path"] / SAE_FILES[0])
    trained_on = sae_config.get("model_sha256") if isinstance(sae_config, dict) else None
    if trained_on and trained_on != model_sha:
        raise InputFileError(root / manifest["sae"]["path"] / SAE_FILES[0], "SAE was trained on another model (model_sha256 differs from the bundle's model)")
    if manifest.get("labels"):
        labels = read_json(root / manifest["labels"])
        recorded = (labels.get("sae") or {}).get("sha256") if isinstance(labels, dict) else None
        if recorded and recorded != sae_sha:
            raise InputFileError(root / manifest["labels"], "latent labels were made for another SAE (sae.sha256 differs)")
    for relative in manifest.get("alignments", []):
        alignment = read_json(root / relative)
        if not isinstance(alignment, dict):
            raise InputFileError(root / relative, "is not a JSON object")
        sides = [(alignment.get(side) or {}).get("sha256") for side in ("sae_a", "sae_b")]
        if sae_sha not in sides:
            raise InputFileError(root / relative, "alignment does not involve the bundle's SAE (neither sae_a nor sae_b has its sha256)")


def load_bundle(path: str | Path, verify: bool = True) -> Bundle:
    """Open a bundle folder (or its ``bundle.json``) and validate it.

    Args:
        path: the bundle folder or its manifest.
        verify: check the SHA-256 of every listed file (a few ms per MB); paths are always checked.

    Raises:
        InputFileError: missing folder or file, malformed JSON, wrong kind or version, a path leaving the bundle,
            a hash mismatch, or parts that do not belong together.
    """
    path = Path(path)
    root = path.parent if path.name == MANIFEST_NAME and path.is_file() else path
    manifest_path = root / MANIFEST_NAME
    if not root.is_dir():
        raise InputFileError(root, "bundle folder not found")
    if not manifest_path.is_file():
        raise InputFileError(manifest_path, "missing: a bundle folder needs bundle.json (build one with seglens bundle)")
    manifest = read_json(manifest_path)
    if not isinstance(manifest, dict):
        raise InputFileError(manifest_path, "is not a JSON object")
    if manifest.get("kind") != BUNDLE_KIND:
        raise InputFileError(manifest_path, f"is not a SegLens bundle manifest (kind {manifest.get('kind')!r}, expected '{BUNDLE_KIND}')")
    version = manifest.get("format_version")
    if version != BUNDLE_FORMAT_VERSION:
        raise InputFileError(manifest_path, f"bundle format_version {version!r} is not supported (this SegLens reads {BUNDLE_FORMAT_VERSION})")
    _require(manifest, "name", str, manifest_path)
    model = _require(manifest, "model", dict, manifest_path)
    sae = _require(manifest, "sae", dict, manifest_path)
    classes = _require(manifest, "classes", dict, manifest_path)
    preprocessing = _require(manifest, "preprocessing", dict, manifest_path)
    files = _require(manifest, "files", dict, manifest_path)
    alignments = manifest.setdefault("alignments", [])
    if not isinstance(alignments, list):
        raise InputFileError(manifest_path, "'alignments' must be a list of paths")
    for key in ("path", "hook_point", "sha256"):
        if key not in model:
            raise InputFileError(manifest_path, f"'model' lacks '{key}'")
    for key in ("path", "sha256"):
        if key not in sae:
            raise InputFileError(manifest_path, f"'sae' lacks '{key}'")
    for key in ("modalities", "image_size", "label_scheme"):
        if key not in preprocessing:
            raise InputFileError(manifest_path, f"'preprocessing' lacks '{key}'")
    names, colours = classes.get("names"), classes.get("colours")
    if not isinstance(names, list) or not isinstance(colours, list) or len(names) != len(colours) or len(names) < 2:
        raise InputFileError(manifest_path, "'classes' needs 'names' and 'colours' lists of the same length (background first)")

    # Every path: relative, inside the bundle; every listed file present with its hash.
    for relative in files:
        _inside(root, relative, manifest_path, "files")
    _inside(root, model["path"], manifest_path, "model.path")
    _inside(root, sae["path"], manifest_path, "sae.path")
    required = [f"{model['path']}/{name}" for name in MODEL_FILES] + [f"{sae['path']}/{name}" for name in SAE_FILES]
    if manifest.get("labels") is not None:
        _inside(root, manifest["labels"], manifest_path, "labels")
        required.append(manifest["labels"])
    for key in ("card", "suggestions"):
        if manifest.get(key) is not None:
            _inside(root, manifest[key], manifest_path, key)
            required.append(manifest[key])
    if not isinstance(manifest.get("figures") or {}, dict):
        raise InputFileError(manifest_path, "'figures' must be a JSON object")
    for index, relative in enumerate(alignments):
        _inside(root, relative, manifest_path, f"alignments[{index}]")
        required.append(relative)
    normalised = {str(PurePosixPath(k)): v for k, v in files.items()}
    for relative in required:
        if str(PurePosixPath(relative)) not in normalised:
            raise InputFileError(manifest_path, f"'{relative}' is used but not listed (with its SHA-256) under 'files'")
    for relative, digest in files.items():
        file = root / relative
        if not file.is_file():
            raise InputFileError(file, "missing from the bundle (listed in bundle.json)")
        if verify and file_sha256(file) != digest:
            raise InputFileError(file, "SHA-256 does not match bundle.json: the file was changed or corrupted")
    if normalised[f"{model['path']}/{MODEL_FILES[1]}"] != model["sha256"]:
        raise InputFileError(manifest_path, "model.sha256 disagrees with the hash listed for the model weights")
    if normalised[f"{sae['path']}/{SAE_FILES[1]}"] != sae["sha256"]:
        raise InputFileError(manifest_path, "sae.sha256 disagrees with the hash listed for the SAE weights")
    _check_sha_links(root, manifest, manifest_path)
    return Bundle(root=root, manifest=manifest)


def _copy_files(source: Path, names: tuple[str, ...], target: Path) -> None:
    target.mkdir(parents=True)
    for name in names:
        if not (source / name).is_file():
            raise InputFileError(source / name, "missing: cannot be bundled")
        shutil.copyfile(source / name, target / name)


def build_bundle(
    model_dir: str | Path,
    sae_dir: str | Path,
    out: str | Path,
    name: str,
    labels: str | Path | None = None,
    alignments: list[str | Path] | tuple = (),
    cohort: str | None = None,
    overwrite: bool = False,
    card: str | Path | None = None,
    figures: dict | None = None,
    suggestions: str | Path | None = None,
) -> Bundle:
    """Copy a segmenter, its SAE and (optionally) latent labels, alignments and a model card into a new bundle folder.

    The model and SAE are loaded first (so a broken input fails before anything is written), the bundle is built
    in a temporary folder beside ``out`` and renamed into place at the end: a bundle is complete or absent.

    Args:
        model_dir: segmenter folder (``config.json`` + ``model.safetensors``).
        sae_dir: SAE folder (``sae_config.json`` + ``sae.safetensors``) trained at one of the model's hook points.
        out: bundle folder to create.
        name: bundle name (usually the population).
        labels: latent labels JSON made for this SAE.
        alignments: alignment JSON files that involve this SAE.
        cohort: the training cohort's name (default: the one recorded in the model's training provenance).
        overwrite: replace an existing bundle folder.
        card: a Markdown model card, copied as ``MODEL_CARD.md``; figures: its measured numbers (JSON), in the manifest.
        suggestions: a suggestions file for this SAE (``SegLensLogic.steering.suggestions``).

    Returns:
        The loaded, validated bundle.
    """
    from .networks import load_segmenter, weights_sha256
    from .sae import BatchTopKSAE, sae_sha256

    out = Path(out)
    if out.exists() and not overwrite:
        raise OutputExistsError(out)
    model_dir, sae_dir = Path(model_dir), Path(sae_dir)
    model = load_segmenter(model_dir, device="cpu")
    sae = BatchTopKSAE.load(sae_dir)
    config = model.config
    hook = sae.config.hook_point or config.hook_point
    shapes = model.hook_points()
    if hook not in shapes:
        raise InputFileError(sae_dir / SAE_FILES[0], f"hook point '{hook}' is not one of the model's ({', '.join(shapes)})")
    if shapes[hook][0] != sae.config.d_in:
        raise InputFileError(sae_dir / SAE_FILES[0], f"SAE takes {sae.config.d_in} channels but hook '{hook}' has {shapes[hook][0]}")
    if sae.config.threshold is None:
        raise InputFileError(sae_dir / SAE_FILES[0], "SAE has no inference threshold; it cannot encode single cases")
    model_sha, sae_sha = weights_sha256(model_dir), sae_sha256(sae_dir)
    if sae.config.model_sha256 and sae.config.model_sha256 != model_sha:
        raise InputFileError(sae_dir / SAE_FILES[0], f"SAE was trained on another model than {model_dir}")
    alignment_names = []
    for path in alignments:
        stem = Path(path).name
        if stem in alignment_names:
            raise SegLensError(f"two alignment files are named {stem}; rename one")
        alignment_names.append(stem)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        _copy_files(model_dir, MODEL_FILES, tmp / "model")
        _copy_files(sae_dir, SAE_FILES, tmp / "sae")
        labels_rel = None
        if labels is not None:
            labels = Path(labels)
            if not labels.is_file():
                raise InputFileError(labels, "latent labels file not found")
            read_json(labels)
            labels_rel = "latents.json"
            shutil.copyfile(labels, tmp / labels_rel)
        card_rel = None
        if card is not None:
            card = Path(card)
            if not card.is_file():
                raise InputFileError(card, "model card not found")
            card_rel = "MODEL_CARD.md"
            shutil.copyfile(card, tmp / card_rel)
        suggestions_rel = None
        if suggestions is not None:
            from .steering.suggestions import load_suggestions

            load_suggestions(suggestions)
            suggestions_rel = "suggestions.json"
            shutil.copyfile(suggestions, tmp / suggestions_rel)
        alignment_rels = []
        for path in alignments:
            path = Path(path)
            if not path.is_file():
                raise InputFileError(path, "alignment file not found")
            read_json(path)
            (tmp / "alignments").mkdir(exist_ok=True)
            relative = f"alignments/{path.name}"
            shutil.copyfile(path, tmp / relative)
            alignment_rels.append(relative)
        files = {
            str(p.relative_to(tmp).as_posix()): file_sha256(p)
            for p in sorted(tmp.rglob("*"))
            if p.is_file()
        }
        manifest = {
            "format_version": BUNDLE_FORMAT_VERSION,
            "kind": BUNDLE_KIND,
            "name": name,
            "cohort": cohort or config.training.get("cohort"),
            "seglens_version": _version(),
            "model": {"path": "model", "arch": config.arch, "hook_point": hook, "sha256": model_sha},
            "sae": {"path": "sae", "d_in": sae.config.d_in, "d_sae": sae.config.d_sae, "k": sae.config.k,
                    "threshold": sae.config.threshold, "hook_point": hook, "sha256": sae_sha},
            "labels": labels_rel,
            "alignments": alignment_rels,
            "card": card_rel,
            "figures": figures,
            "suggestions": suggestions_rel,
            "classes": {"names": list(config.class_names), "colours": class_colours(config.label_scheme, config.num_classes),
                        "label_scheme": config.label_scheme},
            "preprocessing": {"modalities": list(config.modalities), "image_size": config.image_size,
                              "crop_to_brain": config.crop_to_brain, "missing_modalities": "zero" if config.accepts_missing_modalities else "refused",
                              "label_scheme": config.label_scheme, "slice_axis": "axial (RAS k)",
                              "intensity": "z-score inside the brain per modality"},
            "files": files,
        }  # fmt: skip
        atomic_write_text(tmp / MANIFEST_NAME, json.dumps(manifest, indent=2) + "\n")
        load_bundle(tmp)  # the bundle must validate before it is published (labels/alignments for this SAE)
        os.chmod(tmp, 0o777 & ~_umask())
        _publish_folder(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return load_bundle(out)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish_folder(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename a finished folder into place; an existing one (``overwrite``) is moved aside first, then removed."""
    if out.exists():
        if not overwrite:
            raise OutputExistsError(out)
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)


def _version() -> str:
    from . import __version__

    return __version__


# -- command line ----------------------------------------------------------------------------------------------------
def cmd_bundle(args) -> int:
    from .console import log

    if args.check:
        log(load_bundle(args.check).summary())
        return 0
    missing = [flag for flag, value in (("--model", args.model), ("--sae", args.sae), ("--out", args.out), ("--name", args.name)) if not value]
    if missing:
        raise SegLensError(f"seglens bundle needs {', '.join(missing)} (or --check BUNDLE to validate one)")
    bundle = build_bundle(args.model, args.sae, args.out, args.name, labels=args.labels, alignments=args.alignment or [],
                          cohort=args.cohort, overwrite=args.overwrite)  # fmt: skip
    log(f"Wrote {bundle.root}")
    log(bundle.summary())
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("bundle", help="pack a model, its SAE, latent labels and alignments into one bundle folder")
    p.add_argument("--model", help="segmenter folder")
    p.add_argument("--sae", help="SAE folder trained on the model")
    p.add_argument("--labels", help="latent labels JSON (seglens interpret)")
    p.add_argument("--alignment", action="append", metavar="FILE", help="alignment JSON involving this SAE (repeat)")
    p.add_argument("--name", help="bundle name, e.g. the population")
    p.add_argument("--cohort", help="training cohort name (default: recorded in the model)")
    p.add_argument("--out", help="bundle folder to create")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle folder")
    p.add_argument("--check", metavar="BUNDLE", help="validate an existing bundle and print its summary instead")
    p.set_defaults(func=cmd_bundle)
