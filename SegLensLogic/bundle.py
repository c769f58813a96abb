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

import shutil
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from .errors import InputFileError, OutputExistsError, SegLensError
from .storage import (
    MAX_CHANNELS,
    MAX_LATENTS,
    MAX_WEIGHTS_BYTES,
    Schema,
    Sha256,
    atomic_write_json,
    file_sha256,
    publish_folder,
    read_document,
    read_json,
    staging_folder,
)

MANIFEST_NAME = "bundle.json"
BUNDLE_KIND = "seglens-bundle"
BUNDLE_FORMAT_VERSION = 1
MODEL_FILES = ("config.json", "model.safetensors")
SAE_FILES = ("sae_config.json", "sae.safetensors")
# Files a manifest may list (a bundle holds a few dozen).
MAX_BUNDLE_FILES = 10_000

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
    if "\x00" in relative:
        raise InputFileError(manifest, f"{what}: path {relative!r:.60} holds a NUL character")
    path = root / Path(*pure.parts)
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop
        raise InputFileError(manifest, f"{what}: path '{relative}' cannot be resolved ({exc})") from None
    if resolved != root.resolve() and root.resolve() not in resolved.parents:
        raise InputFileError(manifest, f"{what}: path '{relative}' resolves outside the bundle (to {resolved}; a symlink?)")
    return path


@dataclass
class Bundle:
    """A validated bundle (see the module docstring for the layout).

    Attributes:
        root: the bundle folder.
        manifest: the parsed ``bundle.json``.
        verified: whether every file's SHA-256 was checked on loading (then the weights' hashes are not computed
            again when the model and SAE are loaded).
        parts: the latent labels, alignments and suggestions as :func:`load_bundle` read and checked them (they are
            handed on, never parsed twice).
    """

    root: Path
    manifest: dict = field(repr=False)
    verified: bool = False
    parts: dict = field(default_factory=dict, repr=False)

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
        if "suggestions" not in self.parts:
            from .steering.suggestions import load_suggestions

            self.parts["suggestions"] = load_suggestions(self.suggestions_path)
        return self.parts["suggestions"]

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
    def accepts_missing_modalities(self) -> bool:
        """Whether the model works with sequences left out (their channels set to zero), from the manifest or, for
        a manifest that does not say, the model's config (the weights are not loaded)."""
        tolerated = self.manifest["preprocessing"].get("missing_modalities")
        if tolerated:
            return tolerated == "zero"
        if "model_config" not in self.parts:
            from .networks.segmenter import CONFIG_NAME, SegmenterConfig

            path = self.model_dir / CONFIG_NAME
            self.parts["model_config"] = SegmenterConfig.from_dict(read_json(path), path)
        return bool(self.parts["model_config"].accepts_missing_modalities)

    @property
    def files(self) -> dict[str, str]:
        """Relative path -> SHA-256 of every file the manifest lists."""
        return dict(self.manifest["files"])

    def load_model(self, device=None):
        """The segmenter (:class:`SegLensLogic.networks.Segmenter`), in eval mode on ``device`` (default: GPU if any)."""
        from .networks import load_segmenter

        return load_segmenter(self.model_dir, device=device, sha256=self.manifest["model"]["sha256"] if self.verified else None)

    def load_sae(self, device=None):
        """The sparse autoencoder (:class:`SegLensLogic.sae.BatchTopKSAE`) on ``device`` (default CPU)."""
        from .sae import BatchTopKSAE

        return BatchTopKSAE.load(self.sae_dir, device=device, sha256=self.manifest["sae"]["sha256"] if self.verified else None)

    def load_labels(self):
        """The latent labels (``SegLensLogic.interpretation.LatentLabels``), or None when the bundle has none."""
        if self.labels_path is None:
            return None
        if "labels" not in self.parts:
            from .interpretation import load_latent_labels

            self.parts["labels"] = load_latent_labels(self.labels_path)
        return self.parts["labels"]

    def load_alignments(self) -> list:
        """The alignments (``SegLensLogic.alignment.Alignment``) against other cohorts' SAEs."""
        if not self.alignment_paths:
            return []
        if "alignments" not in self.parts:
            from .alignment import load_alignment

            self.parts["alignments"] = [load_alignment(path) for path in self.alignment_paths]
        return list(self.parts["alignments"])

    def open_session(self, case, device=None, batch_size: int | None = None, cache_mb: float | None = None):
        """A :class:`~SegLensLogic.steering.SteeringSession` on ``case`` (a folder, a ``Case`` or images read from
        volume nodes) with this bundle's model, SAE, labels, alignments and suggestions, as loaded and checked once.

        Args:
            device: where the model runs (default: GPU if any); batch_size: slices per forward pass;
            cache_mb: the most the case's kept encoder outputs may hold (default: the session's).
        """
        from .steering.session import DEFAULT_CACHE_MB, SteeringSession

        if case is None:
            raise SegLensError("opening a session needs a case (a folder, a Case or images read from volume nodes)")
        model = self.load_model(device=device)
        sae = self.load_sae(device=next(model.parameters()).device)
        return SteeringSession(model, sae, case, labels=self.load_labels(), alignments=self.load_alignments(),
                               suggestions=self.load_suggestions(), batch_size=batch_size,
                               cache_mb=DEFAULT_CACHE_MB if cache_mb is None else cache_mb)  # fmt: skip

    def summary(self) -> str:
        """A few lines describing the bundle, for the command line."""
        m = self.manifest
        lines = [
            f"bundle '{self.name}' (cohort {self.cohort or '-'}) at {self.root}",
            f"  model: {m['model'].get('arch', '?')}, hook {self.hook_point}, inputs {', '.join(self.modalities)} at {self.image_size} px",
            f"  SAE: {m['sae'].get('d_sae', '?')} latents over {m['sae'].get('d_in', '?')} channels, k {m['sae'].get('k', '?')}, "
            f"threshold {m['sae'].get('threshold', '?')}",
            f"  classes ({self.label_scheme}): {', '.join(self.class_names)}",
            f"  latent labels: {self.labels_path.name if self.labels_path else 'none'}; alignments: {len(self.alignment_paths)}",
            f"  {len(self.files)} files, all SHA-256 verified",
        ]
        return "\n".join(lines)


RelativePath = Annotated[str, Field(min_length=1, max_length=1024)]


class ModelEntry(Schema):
    path: RelativePath
    hook_point: str = Field(max_length=64)
    sha256: Sha256
    arch: str | None = None


class SaeEntry(Schema):
    path: RelativePath
    sha256: Sha256
    d_in: int | None = Field(default=None, ge=1, le=MAX_CHANNELS)
    d_sae: int | None = Field(default=None, ge=1, le=MAX_LATENTS)
    k: int | None = Field(default=None, ge=1)
    threshold: float | None = None
    hook_point: str | None = None


class ClassesEntry(Schema):
    names: list[str] = Field(min_length=2, max_length=256)
    colours: list[Annotated[list[Annotated[int, Field(ge=0, le=255)]], Field(min_length=3, max_length=3)]] = Field(min_length=2, max_length=256)
    label_scheme: str | None = None

    @model_validator(mode="after")
    def _same_length(self):
        if len(self.names) != len(self.colours):
            raise ValueError("'classes' needs 'names' and 'colours' lists of the same length (background first)")
        return self


class PreprocessingEntry(Schema):
    modalities: list[Literal["t1n", "t1c", "t2w", "t2f"]] = Field(min_length=1, max_length=4)
    image_size: int = Field(ge=32, le=2048)
    label_scheme: str
    missing_modalities: str | None = None


class BundleManifest(Schema):
    """``bundle.json`` (module docstring): every field a reader uses, typed and bounded (paths are checked to stay
    in the bundle, files to exist with their hash, by :func:`load_bundle`)."""

    name: str = Field(max_length=256)
    model: ModelEntry
    sae: SaeEntry
    classes: ClassesEntry
    preprocessing: PreprocessingEntry
    files: dict[str, Sha256] = Field(max_length=MAX_BUNDLE_FILES)
    cohort: str | None = None
    labels: RelativePath | None = None
    alignments: list[RelativePath] = Field(default_factory=list, max_length=MAX_BUNDLE_FILES)
    card: RelativePath | None = None
    suggestions: RelativePath | None = None
    figures: dict[str, Any] | None = None
    seglens_version: str | None = None


def _check_parts(root: Path, manifest: dict, path: Path) -> dict:
    """The bundle's parts belong together, each read with its own loader (bounded, checked) before anything is
    built from it: the configs describe what the manifest says, the SAE was trained on this model, and the labels,
    alignments and suggestions were made for this SAE (its weights hash and its size)."""
    from .networks.segmenter import CONFIG_NAME, SegmenterConfig
    from .sae.model import SAEConfig

    model, sae = manifest["model"], manifest["sae"]
    parts: dict = {}
    model_config_path = root / model["path"] / CONFIG_NAME
    model_config = SegmenterConfig.from_dict(read_json(model_config_path), model_config_path)
    parts["model_config"] = model_config
    sae_config_path = root / sae["path"] / SAE_FILES[0]
    sae_config = SAEConfig.from_dict(read_json(sae_config_path), sae_config_path)
    preprocessing, classes = manifest["preprocessing"], manifest["classes"]
    for what, claimed, actual in (("preprocessing.modalities", preprocessing["modalities"], model_config.modalities),
                                  ("preprocessing.image_size", preprocessing["image_size"], model_config.image_size),
                                  ("classes.names", classes["names"], model_config.class_names)):  # fmt: skip
        if claimed != actual:
            raise InputFileError(path, f"'{what}' is {claimed} but the model's {CONFIG_NAME} says {actual}")
    for what, claimed, actual in (("d_in", sae.get("d_in"), sae_config.d_in), ("d_sae", sae.get("d_sae"), sae_config.d_sae),
                                  ("k", sae.get("k"), sae_config.k)):  # fmt: skip
        if claimed is not None and claimed != actual:
            raise InputFileError(path, f"'sae.{what}' is {claimed} but the SAE's {SAE_FILES[0]} says {actual}")
    if sae_config.model_sha256 and sae_config.model_sha256 != model["sha256"]:
        raise InputFileError(sae_config_path, "SAE was trained on another model (model_sha256 differs from the bundle's model)")
    if manifest.get("labels"):
        from .interpretation.latent_labels import load_latent_labels

        labels = load_latent_labels(root / manifest["labels"])
        if labels.sae_sha256 and labels.sae_sha256 != sae["sha256"]:
            raise InputFileError(labels.path, "latent labels were made for another SAE (sae.sha256 differs)")
        labels.check_sae(sae_config.d_sae)
        parts["labels"] = labels
    if manifest.get("alignments"):
        from .alignment.files import load_alignment

        parts["alignments"] = [load_alignment(root / relative) for relative in manifest["alignments"]]
        for alignment in parts["alignments"]:
            alignment.check_sae(sae["sha256"], sae_config.d_sae, sae_config.d_in, whose="the bundle's SAE")
    if manifest.get("suggestions"):
        from .steering.suggestions import load_suggestions

        parts["suggestions"] = load_suggestions(root / manifest["suggestions"]).check_sae(sae_config.d_sae)
    return parts


def load_bundle(path: str | Path, verify: bool = True) -> Bundle:
    """Open a bundle folder (or its ``bundle.json``) and validate it.

    Args:
        path: the bundle folder or its manifest.
        verify: check the SHA-256 of every listed file (a few ms per MB); paths are always checked.

    Raises:
        InputFileError: missing folder or file, malformed JSON, wrong kind or version, a field of the wrong type or
            size, a path leaving the bundle, a file too large, a hash mismatch, or parts that do not belong together.
    """
    path = Path(path)
    root = path.parent if path.name == MANIFEST_NAME and path.is_file() else path
    manifest_path = root / MANIFEST_NAME
    if not root.is_dir():
        raise InputFileError(root, "bundle folder not found")
    if not manifest_path.is_file():
        raise InputFileError(manifest_path, "missing: a bundle folder needs bundle.json (build one with seglens bundle)")
    manifest = read_document(manifest_path, BUNDLE_KIND, BUNDLE_FORMAT_VERSION, BundleManifest, "SegLens bundle manifest", versioned="bundle")
    manifest.setdefault("alignments", [])
    model, sae, files, alignments = manifest["model"], manifest["sae"], manifest["files"], manifest["alignments"]

    # Every path: relative, inside the bundle; every listed file present, of bounded size, with its hash.
    for relative in files:
        _inside(root, relative, manifest_path, "files")
    _inside(root, model["path"], manifest_path, "model.path")
    _inside(root, sae["path"], manifest_path, "sae.path")
    required = [f"{model['path']}/{name}" for name in MODEL_FILES] + [f"{sae['path']}/{name}" for name in SAE_FILES]
    for key in ("labels", "card", "suggestions"):
        if manifest.get(key) is not None:
            _inside(root, manifest[key], manifest_path, key)
            required.append(manifest[key])
    for index, relative in enumerate(alignments):
        _inside(root, relative, manifest_path, f"alignments[{index}]")
        required.append(relative)
    normalised = {str(PurePosixPath(k.replace("\\", "/"))): v for k, v in files.items()}
    for relative in required:
        if str(PurePosixPath(relative.replace("\\", "/"))) not in normalised:
            raise InputFileError(manifest_path, f"'{relative}' is used but not listed (with its SHA-256) under 'files'")
    for relative in files:
        file = root / relative
        if not file.is_file():
            raise InputFileError(file, "missing from the bundle (listed in bundle.json)")
        if file.stat().st_size > MAX_WEIGHTS_BYTES:
            raise InputFileError(file, f"is larger than SegLens reads from a bundle ({MAX_WEIGHTS_BYTES / 2**30:.0f} GB)")
    if verify:
        for relative, digest in files.items():
            if file_sha256(root / relative) != digest:
                raise InputFileError(root / relative, "SHA-256 does not match bundle.json: the file was changed or corrupted")
    if normalised[str(PurePosixPath(f"{model['path']}/{MODEL_FILES[1]}"))] != model["sha256"]:
        raise InputFileError(manifest_path, "model.sha256 disagrees with the hash listed for the model weights")
    if normalised[str(PurePosixPath(f"{sae['path']}/{SAE_FILES[1]}"))] != sae["sha256"]:
        raise InputFileError(manifest_path, "sae.sha256 disagrees with the hash listed for the SAE weights")
    parts = _check_parts(root, manifest, manifest_path)
    return Bundle(root=root, manifest=manifest, verified=verify, parts=parts)


def open_session(case, bundle: "str | Path | Bundle | None" = None, device=None, batch_size: int | None = None,
                 cache_mb: float | None = None):  # fmt: skip
    """A steering session on ``case`` in one call: ``bundle`` is a folder or a loaded :class:`Bundle` (default: the
    shipped reference bundle, :func:`~SegLensLogic.resources.reference_bundle_path`); the rest as for
    :meth:`Bundle.open_session`."""
    if not isinstance(bundle, Bundle):
        from .resources import reference_bundle_path

        bundle = load_bundle(bundle if bundle is not None else reference_bundle_path())
    return bundle.open_session(case, device=device, batch_size=batch_size, cache_mb=cache_mb)


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
    from .networks import load_segmenter
    from .sae import BatchTopKSAE

    out = Path(out)
    if out.exists() and not overwrite:
        raise OutputExistsError(out)
    model_dir, sae_dir = Path(model_dir), Path(sae_dir)
    model = load_segmenter(model_dir, device="cpu")
    sae = BatchTopKSAE.load(sae_dir)
    hook, model_sha, sae_sha = _check_inputs(model, sae, model_dir, sae_dir, labels, suggestions, alignments)
    tmp = staging_folder(out, suffix=".tmp")
    try:
        _copy_files(model_dir, MODEL_FILES, tmp / "model")
        _copy_files(sae_dir, SAE_FILES, tmp / "sae")
        if card is not None and not Path(card).is_file():
            raise InputFileError(card, "model card not found")
        parts = {"labels": _copy_part(labels, tmp, "latents.json"), "card": _copy_part(card, tmp, "MODEL_CARD.md"),
                 "suggestions": _copy_part(suggestions, tmp, "suggestions.json"),
                 "alignments": [_copy_part(path, tmp, f"alignments/{Path(path).name}") for path in alignments]}  # fmt: skip
        config = model.config
        manifest = {
            "format_version": BUNDLE_FORMAT_VERSION,
            "kind": BUNDLE_KIND,
            "name": name,
            "cohort": cohort or config.training.get("cohort"),
            "seglens_version": _version(),
            "model": {"path": "model", "arch": config.arch, "hook_point": hook, "sha256": model_sha},
            "sae": {"path": "sae", "d_in": sae.config.d_in, "d_sae": sae.config.d_sae, "k": sae.config.k,
                    "threshold": sae.config.threshold, "hook_point": hook, "sha256": sae_sha},
            "labels": parts["labels"],
            "alignments": parts["alignments"],
            "card": parts["card"],
            "figures": figures,
            "suggestions": parts["suggestions"],
            "classes": {"names": list(config.class_names), "colours": class_colours(config.label_scheme, config.num_classes),
                        "label_scheme": config.label_scheme},
            "preprocessing": {"modalities": list(config.modalities), "image_size": config.image_size,
                              "crop_to_brain": config.crop_to_brain, "missing_modalities": "zero" if config.accepts_missing_modalities else "refused",
                              "label_scheme": config.label_scheme, "slice_axis": "axial (RAS k)",
                              "intensity": "z-score inside the brain per modality"},
            "files": {p.relative_to(tmp).as_posix(): file_sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()},
        }  # fmt: skip
        atomic_write_json(tmp / MANIFEST_NAME, manifest)
        load_bundle(tmp)  # the bundle must validate before it is published (labels/alignments for this SAE)
        publish_folder(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return load_bundle(out)


def add_alignments(bundle: str | Path, alignments: list[str | Path] | tuple, overwrite: bool = False) -> Bundle:
    """Add alignment files to a finished bundle (e.g. a cross-architecture alignment made after both bundles were
    built), in place and atomically (:func:`_edit_bundle`): the files and their hashes join its manifest.

    Args:
        bundle: the bundle folder.
        alignments: alignment JSON files in which the bundle's SAE is one side (``seglens align``).
        overwrite: replace an alignment of the same file name already in the bundle (else refused).

    Raises:
        InputFileError: an alignment that does not involve the bundle's SAE, or a broken bundle.
        OutputExistsError: an alignment of that name is already in the bundle and ``overwrite`` is false.
    """
    current = load_bundle(bundle)
    root = current.root
    sae_sha, d_sae, d_in = current.manifest["sae"]["sha256"], current.manifest["sae"]["d_sae"], current.manifest["sae"]["d_in"]
    names = _check_alignments(alignments, sae_sha, d_sae, d_in, whose=f"the SAE of the bundle {root}")
    for name in names:
        if (root / "alignments" / name).exists() and not overwrite:
            raise OutputExistsError(root / "alignments" / name)

    def add(tmp: Path, manifest: dict) -> None:
        listed = list(manifest.get("alignments") or [])
        for path, name in zip(alignments, names):
            relative = _copy_part(path, tmp, f"alignments/{name}")
            if relative not in listed:
                listed.append(relative)
            manifest["files"][relative] = file_sha256(tmp / relative)
        manifest["alignments"] = listed

    return _edit_bundle(current, add)


def _edit_bundle(current: Bundle, edit) -> Bundle:
    """Change a finished bundle in place and atomically: the bundle is copied to a staging folder, ``edit(copy,
    manifest)`` writes its files into the copy and records them in ``manifest`` (a copy of the bundle's, ``files``
    included), the manifest is written, the copy validated (labels included) and renamed over the original, so the
    folder is always the old bundle or the new one."""
    root = current.root
    tmp = staging_folder(root, suffix=".tmp")
    try:
        shutil.copytree(root, tmp, dirs_exist_ok=True)
        manifest = {**current.manifest, "files": dict(current.manifest.get("files", {}))}
        edit(tmp, manifest)
        atomic_write_json(tmp / MANIFEST_NAME, manifest, overwrite=True)
        load_bundle(tmp).load_labels()
        publish_folder(tmp, root, overwrite=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return load_bundle(root)


def replace_labels(bundle: str | Path, document: dict) -> Bundle:
    """Replace a finished bundle's latent labels with ``document`` (e.g. the same labels annotated with a
    measurement), in place and atomically (:func:`_edit_bundle`): the labels must be for the bundle's SAE.

    Raises:
        InputFileError: the bundle is broken or has no labels file, or the new labels are for another SAE.
    """
    from .interpretation.latent_labels import write_latent_labels

    current = load_bundle(bundle)
    relative = current.manifest.get("labels")
    if relative is None:
        raise InputFileError(current.root / MANIFEST_NAME, "the bundle has no latent labels to replace")

    def replace(tmp: Path, manifest: dict) -> None:
        write_latent_labels(document, tmp / relative, overwrite=True)
        manifest["files"][relative] = file_sha256(tmp / relative)

    return _edit_bundle(current, replace)


def _check_inputs(model, sae, model_dir: Path, sae_dir: Path, labels, suggestions, alignments) -> tuple[str, str, str]:
    """Check that the SAE reads one of the model's hook points, has its inference threshold and was trained on
    this model, and that every other part is for this SAE, before anything is copied (so that an error names the
    user's file, not its copy in the staging folder). Returns ``(hook, model sha256, SAE sha256)``."""
    from .networks import weights_sha256
    from .sae import sae_sha256
    from .sae.model import NoThresholdError

    hook = sae.config.hook_point or model.config.hook_point
    shapes = model.hook_points()
    if hook not in shapes:
        raise InputFileError(sae_dir / SAE_FILES[0], f"hook point '{hook}' is not one of the model's ({', '.join(shapes)})")
    if shapes[hook][0] != sae.config.d_in:
        raise InputFileError(sae_dir / SAE_FILES[0], f"SAE takes {sae.config.d_in} channels but hook '{hook}' has {shapes[hook][0]}")
    try:
        sae.inference_threshold()
        missing = sae.config.threshold is None
    except NoThresholdError:
        missing = True
    if missing:
        raise InputFileError(sae_dir / SAE_FILES[0], "SAE has no inference threshold; it cannot encode single cases")
    model_sha, sae_sha = weights_sha256(model_dir), sae_sha256(sae_dir)
    if sae.config.model_sha256 and sae.config.model_sha256 != model_sha:
        raise InputFileError(sae_dir / SAE_FILES[0], f"SAE was trained on another model than {model_dir}")
    if labels is not None:
        from .interpretation.latent_labels import load_latent_labels

        load_latent_labels(labels).check_sae(sae.d_sae, sae_sha)
    if suggestions is not None:
        from .steering.suggestions import load_suggestions

        load_suggestions(suggestions).check_sae(sae.d_sae)
    _check_alignments(alignments, sae_sha, sae.d_sae, sae.config.d_in, whose="the bundle's SAE")
    return hook, model_sha, sae_sha


def _check_alignments(alignments, sae_sha: str, d_sae: int, d_in: int, whose: str) -> list[str]:
    """Check that alignment files have distinct names (each becomes ``alignments/<name>`` in a bundle) and that
    the SAE with this hash and sizes is one side of each; returns their file names."""
    from .alignment.files import load_alignment

    names = [Path(path).name for path in alignments]
    for name in names:
        if names.count(name) > 1:
            raise SegLensError(f"two alignment files are named {name}; rename one")
    for path in alignments:
        load_alignment(path).check_sae(sae_sha, d_sae, d_in, whose=whose)
    return names


def _copy_part(source: str | Path | None, folder: Path, relative: str) -> str | None:
    """Copy an optional part into the bundle folder at ``relative``; its path in the manifest (None when absent)."""
    if source is None:
        return None
    (folder / relative).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, folder / relative)
    return relative


def _version() -> str:
    from . import __version__

    return __version__
