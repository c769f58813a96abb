"""Synthetic cohorts with planted shifts: brain phantoms built on the MNI152 template, with exact labels.

Anatomy comes from a real template: the ICBM 2009a MNI152 T1 and grey/white-matter probability maps that ship inside
the ``nilearn`` wheel (read from the package folder, no network). Per case the tissue maps are resampled onto the
phantom grid through a random smooth deformation (plus a random head scale), rendered as T1n, T1c, T2w and T2-FLAIR
from a tissue contrast table (partial volumes mix), and given a smooth multiplicative bias field, Rician noise and,
for thick-slice protocols, blur and resampling along the slice axis. A tumour has three subregions -- a necrotic core
inside an enhancing rim, surrounded by edema that spreads along white matter -- and its labels are exact (they are
drawn on the phantom grid, not resampled).

Populations (:data:`POPULATIONS`) are presets that change named *factors* relative to ``adult``:

- ``adult``: large supratentorial hemispheric tumours with wide edema, good signal-to-noise, 1 mm slices.
- ``pediatric``: smaller heads; smaller tumours in the midline or posterior fossa, little edema, weak enhancement;
  lower grey/white contrast (less myelinated white matter).
- ``ssa`` (sub-Saharan-like acquisition): adult anatomy and tumours, low signal-to-noise, strong bias field, thick
  slices.
- ``healthy``: no tumour; FreeSurfer ``aseg`` labels (cortex, white matter, ventricles, cerebellum, brainstem and the
  eight subcortical structures SegLens segments) in a ``<id>-aseg.nii.gz`` file.
- ``pediatric-cyst`` and ``ssa-band``: adult in every factor but one *planted feature* (:data:`FEATURES`) with an
  exact voxel footprint, written beside the labels as ``<id>-feature.nii.gz``: a fluid cyst beside the tumour (the
  cystic component of pediatric pilocytic astrocytomas) or a band of stripes across the brain (an acquisition
  artefact of a faulty scanner). The feature is the only difference from ``adult``, so a model diffing that finds
  what one population has and the other lacks must find it, and its footprint says where it is
  (:func:`read_feature_mask`; scored by :func:`SegLensLogic.experiments.footprint.footprint_scores`). For one seed, a
  planted case is the ``adult`` case of that seed plus the feature (the feature draws from its own random stream).

A cohort folder holds one folder per case in BraTS 2023 naming and ``cohort.json`` (:data:`COHORT_MANIFEST`): the
population, the factors shifted relative to ``adult`` with both settings, each case's seed and tumour, and for a
planted feature its description and each case's footprint file (``feature``, ``cases[i].feature_mask``). The
shifted factors map to latent categories (:func:`planted_shift_categories`); the footprint of a planted feature is the
exact ground truth that diffing is scored against.

Arrays are RAS ``(X, Y, Z)``; Z is the axial slice axis. Files are stored LPS, as BraTS stores them.
"""

from __future__ import annotations

import functools
import importlib.util
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

from ..errors import InputFileError, OutputExistsError, SegLensError
from ..storage import Schema, read_document
from .modalities import MODALITIES

COHORT_MANIFEST = "cohort.json"
COHORT_KIND = "seglens-phantom-cohort"
TEMPLATE_FILES = {name: f"mni_icbm152_{name}_tal_nlin_sym_09a_converted.nii.gz" for name in ("t1", "gm", "wm")}

# Rendered tissues, in the order of the contrast tables.
TISSUES = ("background", "csf", "grey matter", "white matter", "necrotic core", "edema", "enhancing tumour")
# Relative signal per tissue and modality (white matter of an adult T1n ~0.85). Adult brains: myelinated white matter
# is bright on T1 and dark on T2/FLAIR; edema is bright on T2/FLAIR; the rim enhances on T1c; the core is fluid-like.
ADULT_CONTRAST = {
    "t1n": (0.0, 0.25, 0.60, 0.85, 0.30, 0.52, 0.55),
    "t1c": (0.0, 0.25, 0.62, 0.85, 0.28, 0.52, 1.30),
    "t2w": (0.0, 1.00, 0.65, 0.45, 0.95, 0.85, 0.70),
    "t2f": (0.0, 0.10, 0.62, 0.48, 0.55, 1.00, 0.75),
}
# Children: less myelin (grey/white contrast shrinks, white matter darker on T1 and brighter on T2), tumours enhance
# less (e.g. diffuse midline gliomas) and their cores hold less fluid.
PEDIATRIC_CONTRAST = {
    "t1n": (0.0, 0.25, 0.64, 0.74, 0.40, 0.55, 0.56),
    "t1c": (0.0, 0.25, 0.65, 0.75, 0.38, 0.55, 0.92),
    "t2w": (0.0, 1.00, 0.70, 0.62, 0.85, 0.82, 0.76),
    "t2f": (0.0, 0.12, 0.62, 0.58, 0.60, 0.92, 0.80),
}
# Tissue index -> BraTS 2023 label. Index 7 is a planted cyst, labelled necrotic core as BraTS labels cystic
# components of gliomas (NCR).
TISSUE_TO_LABEL = np.array([0, 0, 0, 0, 1, 2, 3, 1], dtype=np.uint8)
CYST_TISSUE = 7
# A proteinaceous cyst: darker than CSF on T1, brighter than CSF on T2, bright on FLAIR (CSF is dark there), no
# enhancement: a signal no tissue of an adult phantom has.
CYST_CONTRAST = {"t1n": 0.15, "t1c": 0.15, "t2w": 1.25, "t2f": 0.9}
CYST_SIZE = (2.0, 2.5)  # the cyst's radius over the tumour's (a large cyst: a few positions at the demo's hook)

# Planted features: something only one population has, with an exact footprint (see the module docstring).
FEATURES = {
    "cyst": "a fluid cyst beside the tumour (the cystic component of pediatric pilocytic astrocytomas): dark on T1, "
            "bright on T2 and FLAIR, labelled necrotic core",
    "band": "an acquisition artefact: a band of stripes (period 8 voxels, signal x 1 +- 0.8) across the brain over a "
            "slab of axial slices, as from RF interference on a faulty scanner; labels unchanged",
}  # fmt: skip
FEATURE_SUFFIX = "-feature"
# The band artefact (:func:`_band_artefact`): its stripes' period (voxels) and amplitude (the signal times 1 +- amplitude: the mean is kept, so the
# per-image intensity normalisation does not change the rest of the image), its width (share of the brain's Y
# extent) and depth (share of the brain's axial slices).
BAND_PERIOD, BAND_AMPLITUDE, BAND_WIDTH, BAND_SLICES = 8.0, 0.8, 0.35, 0.5


@dataclass(frozen=True)
class Population:
    """Generation parameters of one population (distances in mm, noise and bias relative to white matter).

    Attributes:
        name: population name (``adult``, ``pediatric``, ``ssa``, ``healthy``).
        tumour: whether cases have a tumour.
        location: where tumours grow: ``supratentorial`` (hemispheric) or ``midline-posterior`` (midline or
            posterior fossa).
        tumour_radius: range of the enhancing tumour's radius.
        core_fraction: range of the necrotic core's radius over the tumour's.
        edema_factor: range of the edema's outer radius over the tumour's (1 means no edema).
        contrast: modality -> relative signal per tissue (:data:`TISSUES` order).
        head_scale: range of the isotropic head scale relative to the template.
        deformation: maximum displacement of the random smooth deformation.
        noise: Rician noise standard deviation.
        bias: amplitude of the log bias field (the field is ``exp(bias * smooth noise in [-1, 1])``).
        slice_thickness: acquired slice thickness along Z (blur + resampling when thicker than the grid spacing).
        feature: a planted feature (:data:`FEATURES`: ``cyst`` or ``band``) or None.
    """

    name: str
    tumour: bool = True
    location: str = "supratentorial"
    tumour_radius: tuple[float, float] = (11.0, 18.0)
    core_fraction: tuple[float, float] = (0.35, 0.6)
    edema_factor: tuple[float, float] = (1.7, 2.3)
    contrast: dict = field(default_factory=lambda: ADULT_CONTRAST)
    head_scale: tuple[float, float] = (0.95, 1.05)
    deformation: float = 4.0
    noise: float = 0.025
    bias: float = 0.12
    slice_thickness: float = 1.0
    feature: str | None = None


POPULATIONS = {
    "adult": Population("adult"),
    "pediatric": Population(
        "pediatric", location="midline-posterior", tumour_radius=(6.0, 10.0), core_fraction=(0.2, 0.45),
        edema_factor=(1.05, 1.3), contrast=PEDIATRIC_CONTRAST, head_scale=(0.86, 0.94),
    ),
    "ssa": Population("ssa", noise=0.09, bias=0.45, slice_thickness=6.0),
    "healthy": Population("healthy", tumour=False),
    # Adult in every factor but a planted feature with an exact footprint.
    "pediatric-cyst": Population("pediatric-cyst", feature="cyst"),
    "ssa-band": Population("ssa-band", feature="band"),
}  # fmt: skip

# What each factor shifts, and the latent categories (interpretation vocabulary) a factor is expected to move: the
# population-specific latents of a diffing should fall into these.
FACTORS = {
    "location": ("tumour location", ("necrotic core", "enhancing tumour", "tumour boundary", "edema")),
    "tumour_radius": ("tumour size", ("necrotic core", "enhancing tumour", "tumour boundary")),
    "core_fraction": ("necrotic core size", ("necrotic core",)),
    "edema_factor": ("edema extent", ("edema", "tumour boundary")),
    "contrast": ("tissue contrast", ("healthy tissue", "enhancing tumour", "edema", "brain edge")),
    "head_scale": ("head size", ("brain edge", "background")),
    "noise": ("signal-to-noise", ("healthy tissue", "diffuse", "brain edge", "background")),
    "bias": ("bias field", ("healthy tissue", "diffuse", "brain edge")),
    "slice_thickness": ("slice thickness", ("tumour boundary", "brain edge", "diffuse", "healthy tissue")),
    "tumour": ("tumour presence", ("necrotic core", "edema", "enhancing tumour", "tumour boundary")),
    "feature": ("planted feature", ()),  # scored by its footprint, not by categories
}


def get_population(name: str) -> Population:
    try:
        return POPULATIONS[name]
    except KeyError:
        raise SegLensError(f"unknown population '{name}'; choose one of {', '.join(POPULATIONS)}") from None


def shifted_factors(population: Population, reference: Population | None = None) -> dict[str, dict]:
    """Factors whose setting differs from ``reference`` (default adult): ``{factor: {"adult": .., "pediatric": ..}}``."""
    reference = reference or POPULATIONS["adult"]
    out = {}
    for name in FACTORS:
        ours, theirs = getattr(population, name), getattr(reference, name)
        if name == "location" and not population.tumour:
            continue  # no tumour: location, size, edema and contrast of tumours are moot, the presence shifted
        if ours != theirs:
            what = FACTORS[name][0] if name != "feature" else f"planted feature: {ours or 'none'}"
            out[name] = {reference.name: _jsonable(theirs), population.name: _jsonable(ours), "what": what}
    return out


def planted_shift_categories(manifest_or_population) -> list[str]:
    """Latent categories tied to the factors a cohort shifted (the ground truth for scoring diffing).

    Args:
        manifest_or_population: a cohort manifest (dict), a path to one, a population name or a :class:`Population`.
    """
    if isinstance(manifest_or_population, (str, Path)) and Path(manifest_or_population).suffix == ".json":
        manifest_or_population = read_cohort_manifest(manifest_or_population)
    if isinstance(manifest_or_population, dict):
        factors = manifest_or_population.get("shifted_factors", {})
    else:
        population = manifest_or_population if isinstance(manifest_or_population, Population) else get_population(manifest_or_population)
        factors = shifted_factors(population)
    categories: list[str] = []
    for name in factors:
        for category in FACTORS.get(name, ("", ()))[1]:
            if category not in categories:
                categories.append(category)
    return categories


def _jsonable(value):
    if isinstance(value, dict):
        return {k: list(v) for k, v in value.items()}
    return list(value) if isinstance(value, tuple) else value


# -- the template --------------------------------------------------------------------------------------------------
def template_folder() -> Path:
    """The folder of nilearn's bundled MNI152 files (found without importing nilearn)."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise SegLensError("the nilearn package (which ships the MNI152 template) is not installed: pip install nilearn")
    folder = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
    for name in TEMPLATE_FILES.values():
        if not (folder / name).is_file():
            raise InputFileError(folder / name, "MNI152 template file missing from the nilearn installation")
    return folder


@dataclass
class Template:
    """Tissue probabilities of the template on a phantom grid covering the brain's bounding box.

    Attributes:
        csf, gm, wm: ``float32`` probability maps, shape ``shape`` (RAS), summing to the brain mask.
        spacing: voxel size in mm of the phantom grid.
        origin: MNI coordinates (mm) of voxel ``(0, 0, 0)``.
    """

    csf: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    spacing: np.ndarray
    origin: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.gm.shape

    def mni(self) -> np.ndarray:
        """MNI coordinates of every voxel, ``(3, X, Y, Z)`` float32."""
        axes = [(self.origin[d] + self.spacing[d] * np.arange(n)).astype(np.float32) for d, n in enumerate(self.shape)]
        return np.stack(np.meshgrid(*axes, indexing="ij"))


@functools.lru_cache(maxsize=4)
def load_template(shape: tuple[int, int, int]) -> Template:
    """The MNI152 tissue maps resampled onto a ``shape`` grid spanning the brain (with a margin), cached per shape."""
    import nibabel as nib
    from scipy import ndimage
    folder = template_folder()
    images = {name: nib.load(str(folder / file)) for name, file in TEMPLATE_FILES.items()}
    affine = images["t1"].affine  # 1 mm, RAS, axis-aligned
    t1 = np.asarray(images["t1"].dataobj, dtype=np.float32)
    brain = t1 > 0
    gm = np.asarray(images["gm"].dataobj, dtype=np.float32) / 255.0
    wm = np.asarray(images["wm"].dataobj, dtype=np.float32) / 255.0
    total = gm + wm
    scale = np.where(total > 1, 1 / np.maximum(total, 1e-6), 1.0)
    gm, wm = gm * scale * brain, wm * scale * brain
    csf = np.clip(brain - gm - wm, 0, 1)
    lo = np.array([np.flatnonzero(brain.any(axis=tuple(a for a in range(3) if a != d)))[0] for d in range(3)])
    hi = np.array([np.flatnonzero(brain.any(axis=tuple(a for a in range(3) if a != d)))[-1] for d in range(3)])
    margin = 0.08 * (hi - lo)  # room for larger heads and deformation
    start, stop = lo - margin, hi + margin
    spacing = (stop - start) / (np.asarray(shape) - 1)
    coords = np.stack(np.meshgrid(*[start[d] + spacing[d] * np.arange(shape[d]) for d in range(3)], indexing="ij"))
    maps = {}
    for name, volume in (("csf", csf), ("gm", gm), ("wm", wm)):
        # Smooth before sampling coarser grids so thin cortex averages into partial volumes instead of aliasing.
        sigma = np.maximum(spacing / 2.355 * 0.8, 0.0)
        smoothed = ndimage.gaussian_filter(volume, sigma) if (sigma > 0.4).any() else volume
        maps[name] = ndimage.map_coordinates(smoothed, coords, order=1, mode="constant").astype(np.float32)
    origin = affine[:3, :3] @ start + affine[:3, 3]
    return Template(maps["csf"], maps["gm"], maps["wm"], spacing.astype(np.float64), origin.astype(np.float64))


# -- random fields -------------------------------------------------------------------------------------------------
def smooth_field(rng: np.random.Generator, shape: tuple[int, ...], coarse: int = 5) -> np.ndarray:
    """A smooth random field in ``[-1, 1]``: Gaussian noise on a ``coarse``-per-axis grid of control points, spread
    onto ``shape`` by separable Gaussian bumps (a few tensor products, far cheaper than spline zooming)."""
    field_ = rng.standard_normal((coarse,) * len(shape))
    for axis, n in enumerate(shape):
        centres = np.linspace(0, n - 1, coarse)
        width = max((n - 1) / (coarse - 1), 1.0)
        basis = np.exp(-0.5 * ((np.arange(n)[:, None] - centres[None, :]) / width) ** 2)  # (n, coarse)
        field_ = np.moveaxis(np.tensordot(field_, basis, axes=([axis], [1])), -1, axis)
    return (field_ / (np.abs(field_).max() + 1e-8)).astype(np.float32)


def _deformed_coordinates(rng: np.random.Generator, template: Template, population: Population) -> tuple[np.ndarray, float]:
    """Sampling coordinates (template voxels) of a random head: isotropic scale about the centre plus a smooth warp."""
    shape = template.shape
    scale = rng.uniform(*population.head_scale)
    centre = (np.asarray(shape) - 1) / 2
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij"))
    coords = centre[:, None, None, None] + (grid - centre[:, None, None, None]) / scale
    for d in range(3):
        coords[d] += population.deformation / template.spacing[d] * smooth_field(rng, shape, coarse=4)
    return coords.astype(np.float32), float(scale)


def _warp(volume: np.ndarray, coords: np.ndarray, order: int = 1) -> np.ndarray:
    from scipy import ndimage
    return ndimage.map_coordinates(volume, coords, order=order, mode="constant").astype(volume.dtype)


# -- tumours -------------------------------------------------------------------------------------------------------
def _tumour_centre(rng: np.random.Generator, mni: np.ndarray, wm: np.ndarray, population: Population) -> np.ndarray:
    """A tumour centre (MNI mm) in the population's region (in white matter for hemispheric tumours)."""
    x, y, z = mni
    if population.location == "supratentorial":
        region = (np.abs(x) > 14) & (z > 0) & (y > -75)
    elif population.location == "midline-posterior":
        if rng.uniform() < 0.5:  # posterior fossa: cerebellum and fourth ventricle region
            region = (np.abs(x) < 14) & (y < -42) & (y > -70) & (z < -18) & (z > -45)
        else:  # midline: thalamus and brainstem (diffuse midline glioma)
            region = (np.abs(x) < 9) & (y < -8) & (y > -35) & (z < 12) & (z > -25)
    else:
        raise ValueError(f"unknown tumour location '{population.location}'")
    if population.location == "supratentorial":
        region = region & (wm > 0.2)  # hemispheric gliomas grow in white matter
    candidates = np.argwhere(region)
    if len(candidates) == 0:
        raise SegLensError(f"no voxel of the phantom grid lies in the {population.location} tumour region; use a larger shape")
    voxel = candidates[rng.integers(len(candidates))]
    return mni[:, voxel[0], voxel[1], voxel[2]].astype(np.float64)


def _tumour_tissue(
    rng: np.random.Generator, mni: np.ndarray, brain: np.ndarray, wm: np.ndarray, population: Population
) -> tuple[np.ndarray, dict]:
    """Tumour tissue index per voxel (0 none, 4 necrotic, 5 edema, 6 enhancing) and a description of the tumour."""
    radius = rng.uniform(*population.tumour_radius)
    centre = _tumour_centre(rng, mni, wm, population)
    axes = rng.uniform(0.8, 1.2, 3)
    offset = (mni - centre[:, None, None, None].astype(np.float32)) / axes[:, None, None, None].astype(np.float32)
    distance = np.sqrt((offset**2).sum(0)) / radius
    # Irregular borders: the radial distance is modulated by a smooth field.
    distance = distance * (1 + 0.18 * smooth_field(rng, brain.shape, coarse=6))
    core = rng.uniform(*population.core_fraction)
    edema_factor = rng.uniform(*population.edema_factor)
    tumour = np.zeros(brain.shape, dtype=np.uint8)
    # Edema spreads along white matter: its reach is longer where white matter is.
    edema_reach = 1 + (edema_factor - 1) * np.clip(0.35 + wm, 0, 1.2)
    tumour[(distance < edema_reach) & brain & (edema_factor > 1.01)] = 5
    tumour[(distance < 1.0) & brain] = 6
    tumour[(distance < core) & brain] = 4
    info = {"centre_mni": [round(float(c), 1) for c in centre], "radius_mm": round(float(radius), 2),
            "core_fraction": round(float(core), 3), "edema_factor": round(float(edema_factor), 3)}  # fmt: skip
    return tumour, info


# -- healthy structure labels (FreeSurfer aseg codes) ----------------------------------------------------------------
# Subcortical structures as ellipsoids in MNI space (left-hemisphere centre, radii in mm), aseg codes (left, right).
_STRUCTURES = {
    "thalamus": ((-11, -18, 7), (7, 12, 8), (10, 49)),
    "caudate": ((-13, 11, 10), (4.5, 12, 8), (11, 50)),
    "putamen": ((-25, 2, 1), (5, 14, 8), (12, 51)),
    "pallidum": ((-19, -3, 0), (3, 7, 4), (13, 52)),
    "hippocampus": ((-27, -22, -13), (5, 15, 5), (17, 53)),
    "amygdala": ((-23, -4, -19), (6, 6, 6), (18, 54)),
    "accumbens": ((-10, 11, -7), (4, 4, 4), (26, 58)),
    "ventral diencephalon": ((-11, -16, -9), (5, 7, 5), (28, 60)),
}


def aseg_labels(mni: np.ndarray, csf: np.ndarray, gm: np.ndarray, wm: np.ndarray) -> np.ndarray:
    """FreeSurfer ``aseg`` codes of a template-space head: cortex (3/42), white matter (2/41), lateral ventricles (4/43),
    other CSF (24), cerebellum cortex/white matter (8/47, 7/46), brainstem (16) and the eight subcortical structures.

    The subcortical structures are ellipsoids at their MNI positions (an approximation of an atlas, not a
    segmentation); everything else follows the tissue maps.
    """
    x, y, z = mni
    brain = (csf + gm + wm) > 0.5
    dominant = np.argmax(np.stack([csf, gm, wm]), axis=0)
    left = x < 0
    labels = np.zeros(brain.shape, dtype=np.int16)
    labels[brain & (dominant == 0)] = 24
    labels[brain & (dominant == 1)] = np.where(left, 3, 42)[brain & (dominant == 1)]
    labels[brain & (dominant == 2)] = np.where(left, 2, 41)[brain & (dominant == 2)]
    ventricle = brain & (dominant == 0) & (np.abs(x) < 30) & (y > -45) & (y < 30) & (z > -5) & (z < 35)
    labels[ventricle] = np.where(left, 4, 43)[ventricle]
    cerebellum = brain & (y < -40) & (z < -10) & (np.abs(x) > 4 + 0.3 * np.clip(-z - 30, 0, None))
    labels[cerebellum & (dominant == 1)] = np.where(left, 8, 47)[cerebellum & (dominant == 1)]
    labels[cerebellum & (dominant == 2)] = np.where(left, 7, 46)[cerebellum & (dominant == 2)]
    brainstem = brain & (np.abs(x) < 11) & (y > -45) & (y < -12) & (z < -12) & (dominant != 0)
    labels[brainstem] = 16
    for centre, radii, (code_left, code_right) in _STRUCTURES.values():
        for side, code in ((-1, code_left), (1, code_right)):
            c = np.array([side * abs(centre[0]), centre[1], centre[2]], dtype=np.float32)
            inside = sum(((mni[d] - c[d]) / radii[d]) ** 2 for d in range(3)) <= 1
            labels[inside & brain & (dominant != 0)] = code
    return labels


# -- rendering -----------------------------------------------------------------------------------------------------
def add_acquisition(
    image: np.ndarray, rng: np.random.Generator, noise: float, bias_field: np.ndarray | None, slice_thickness: float,
    spacing_z: float, reference: float,
) -> np.ndarray:
    """Apply an acquisition to a clean image: bias field, thick slices along Z, Rician noise.

    Args:
        image: ``(X, Y, Z)`` clean signal.
        noise: noise standard deviation relative to ``reference`` (the white-matter signal).
        bias_field: multiplicative field of the image's shape, or None.
        slice_thickness: acquired slice thickness (mm); thicker than ``spacing_z``, each acquired slice averages its
            slab, the noise is that of the acquired slices, and interpolation brings them back onto the original grid
            (the voxel grid is kept, so labels stay valid).
        spacing_z: the grid's Z spacing (mm).
    """
    out = image * bias_field if bias_field is not None else image
    acquired, centres = _acquire_slices(out, slice_thickness / spacing_z)
    if noise > 0:
        sigma = noise * reference
        real = acquired + sigma * rng.standard_normal(acquired.shape, dtype=np.float32)
        imag = sigma * rng.standard_normal(acquired.shape, dtype=np.float32)
        acquired = np.sqrt(real**2 + imag**2)
    return _slices_to_grid(acquired, centres, image.shape[2]).astype(np.float32)


def _acquire_slices(image: np.ndarray, factor: float) -> tuple[np.ndarray, np.ndarray | None]:
    """Slabs ``factor`` grid slices thick (box profile), ``factor`` apart: ``(acquired slices, their Z centres)``."""
    from scipy import ndimage
    if factor <= 1.05:
        return image.astype(np.float32, copy=True), None
    depth = image.shape[2]
    smoothed = ndimage.uniform_filter1d(image, size=max(int(round(factor)), 1), axis=2, mode="nearest")
    centres = np.arange(factor / 2 - 0.5, depth, factor)
    return smoothed[:, :, np.clip(np.round(centres).astype(int), 0, depth - 1)].astype(np.float32), centres


def _slices_to_grid(acquired: np.ndarray, centres: np.ndarray | None, depth: int) -> np.ndarray:
    """Linear interpolation of acquired slices at ``centres`` back onto ``depth`` grid slices."""
    if centres is None:
        return acquired
    z = np.clip(np.interp(np.arange(depth), centres, np.arange(len(centres))), 0, len(centres) - 1)
    lo = np.floor(z).astype(int)
    hi = np.minimum(lo + 1, len(centres) - 1)
    w = (z - lo).astype(np.float32)
    return acquired[:, :, lo] * (1 - w) + acquired[:, :, hi] * w


def thick_slices(image: np.ndarray, thickness: float, spacing_z: float) -> np.ndarray:
    """Simulate slices ``thickness`` mm thick on a grid of ``spacing_z`` mm (no noise), on the same grid."""
    if thickness / spacing_z <= 1.05:
        return image
    return _slices_to_grid(*_acquire_slices(image, thickness / spacing_z), image.shape[2])


def make_phantom(
    shape: tuple[int, int, int] = (96, 112, 96),
    seed: int = 0,
    tumour: bool = True,
    noise: float | None = None,
    bias: float | None = None,
    population: str | Population = "adult",
    return_info: bool = False,
):
    """Render one phantom.

    Args:
        shape: volume shape ``(X, Y, Z)`` in RAS voxel order; the grid spans the template brain, so small shapes
            have coarse (anisotropic) voxels.
        seed: makes the anatomy, tumour, bias field and noise reproducible.
        tumour: add a tumour (False gives a healthy head with BraTS labels all 0; the ``healthy`` population also
            returns aseg labels in ``info``).
        noise, bias: override the population's noise and bias amplitude.
        population: a preset name from :data:`POPULATIONS` or a :class:`Population`.
        return_info: also return a dict describing the case (spacing, origin, tumour, aseg labels for healthy; for a
            planted feature its parameters under ``feature`` and its footprint, a boolean RAS volume, under
            ``feature_mask``).

    Returns:
        ``(images, labels)`` or ``(images, labels, info)``: modality -> ``float32`` volume in scanner-like units
        (white matter ~850), and BraTS 2023 labels ``uint8`` (all 0 without a tumour).
    """
    from scipy import ndimage
    population = get_population(population) if isinstance(population, str) else population
    if noise is not None or bias is not None:
        population = replace(population, noise=population.noise if noise is None else noise, bias=population.bias if bias is None else bias)
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"phantom shape must be three sizes of at least 8 voxels, got {shape}")
    rng = np.random.default_rng(seed)
    template = load_template(shape)
    coords, scale = _deformed_coordinates(rng, template, population)
    csf, gm, wm = (_warp(m, coords) for m in (template.csf, template.gm, template.wm))
    mni = template.mni()
    brain = (csf + gm + wm) > 0.5
    info: dict = {"population": population.name, "seed": int(seed), "shape": list(shape),
                  "spacing_mm": [round(float(s), 4) for s in template.spacing], "head_scale": round(scale, 4)}  # fmt: skip
    tumour_tissue = np.zeros(shape, dtype=np.uint8)
    if tumour and population.tumour:
        tumour_tissue, info["tumour"] = _tumour_tissue(rng, mni, brain, wm, population)
    feature_rng = np.random.default_rng([int(seed) % 2**32, 0xFEA7])  # the feature's own stream: the rest is adult's
    footprint = None
    if population.feature == "cyst":
        if "tumour" not in info:
            raise SegLensError(f"the cyst feature of population '{population.name}' needs a tumour (tumour=False was asked)")
        footprint, info["feature"] = _plant_cyst(feature_rng, mni, brain, tumour_tissue, info["tumour"])
    elif population.feature is not None and population.feature not in FEATURES:
        raise SegLensError(f"unknown planted feature '{population.feature}'; choose one of {', '.join(FEATURES)}")
    labels = TISSUE_TO_LABEL[tumour_tissue]
    if not population.tumour:
        # Template coordinates of each phantom voxel: structure positions follow the head's deformation.
        template_mni = np.stack([template.origin[d] + template.spacing[d] * coords[d] for d in range(3)]).astype(np.float32)
        info["aseg"] = aseg_labels(template_mni, csf, gm, wm)

    bias_field = np.exp(population.bias * smooth_field(rng, shape, coarse=4)).astype(np.float32)
    heterogeneity = 1 + 0.12 * smooth_field(rng, shape, coarse=8)
    healthy = np.stack([csf, gm, wm])
    reference = 1000 * population.contrast["t1n"][3]
    images = {}
    for modality in MODALITIES:
        table = np.append(np.asarray(population.contrast[modality], dtype=np.float32), np.float32(CYST_CONTRAST[modality]))
        signal = np.tensordot(table[1:4], healthy, axes=1)
        if tumour_tissue.any():
            # Tumour voxels take the tumour's signal, mixed with some healthy tissue at the border for partial volume.
            tumour_signal = table[tumour_tissue] * heterogeneity
            weight = ndimage.gaussian_filter((tumour_tissue > 0).astype(np.float32), 0.6)
            weight = np.where(tumour_tissue > 0, np.maximum(weight, 0.85), 0.0)
            signal = (1 - weight) * signal + weight * tumour_signal
        clean = 1000 * signal * brain
        images[modality] = add_acquisition(clean, rng, population.noise, bias_field, population.slice_thickness,
                                           template.spacing[2], reference) * brain  # fmt: skip
    if population.feature == "band":
        footprint, gain, info["feature"] = _band_artefact(feature_rng, brain)
        for modality in MODALITIES:
            images[modality] = np.where(footprint, images[modality] * gain, images[modality]).astype(np.float32)
    if footprint is not None:
        info["feature"] = {"name": population.feature, **info["feature"], "voxels": int(footprint.sum())}
        info["feature_mask"] = footprint
    if return_info:
        return images, labels, info
    return images, labels


def _plant_cyst(
    rng: np.random.Generator, mni: np.ndarray, brain: np.ndarray, tumour_tissue: np.ndarray, tumour: dict
) -> tuple[np.ndarray, dict]:
    """A cyst beside the tumour, written into ``tumour_tissue`` (index :data:`CYST_TISSUE`); returns its footprint.

    The cyst is a sphere ``CYST_SIZE`` (2.0-2.5) times the tumour's radius whose centre lies one tumour radius plus half its own
    radius from the tumour's, towards the brain's centre (so that it stays inside the head): the tumour sits on the
    cyst's wall like a mural nodule. It replaces edema and healthy tissue, never the enhancing rim or the core.
    """
    centre = np.asarray(tumour["centre_mni"], dtype=np.float64)
    radius = float(tumour["radius_mm"])
    cyst_radius = rng.uniform(CYST_SIZE[0], CYST_SIZE[1]) * radius
    inward = mni[:, brain].mean(axis=1) - centre
    inward /= max(np.linalg.norm(inward), 1e-6)
    random = rng.standard_normal(3)
    direction = inward + 0.7 * random / max(np.linalg.norm(random), 1e-6)
    direction /= max(np.linalg.norm(direction), 1e-6)
    cyst_centre = centre + direction * (radius + 0.45 * cyst_radius)
    offset = mni - cyst_centre[:, None, None, None].astype(np.float32)
    cyst = (np.sqrt((offset**2).sum(0)) < cyst_radius) & brain & ~np.isin(tumour_tissue, (4, 6))
    tumour_tissue[cyst] = CYST_TISSUE
    return cyst, {"centre_mni": [round(float(c), 1) for c in cyst_centre], "radius_mm": round(float(cyst_radius), 2)}


def _band_artefact(rng: np.random.Generator, brain: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict]:
    """A band of stripes across the brain: ``(footprint, gain (X, 1, 1), description)``.

    The band spans ``BAND_WIDTH`` of the brain's anterior-posterior extent (Y) at a random position in its middle
    two thirds, every X, over a random slab of ``BAND_SLICES`` of the brain's axial slices. Inside it the signal is
    multiplied by ``1 + BAND_AMPLITUDE * cos(2 pi x / BAND_PERIOD + phase)``: stripes along X whose mean gain is 1.
    Stripes 4 voxels apart would vanish at the hook of the demo's U-Net (its stride there is 4: each position
    averages one period); 8 apart they survive. The footprint is the band inside the brain.
    """
    ys = np.flatnonzero(brain.any(axis=(0, 2)))
    zs = np.flatnonzero(brain.any(axis=(0, 1)))
    if len(ys) == 0:
        raise SegLensError("the phantom has no brain voxel to put the band artefact on")
    lo, hi = int(ys[0]), int(ys[-1])
    extent = hi - lo + 1
    width = max(2, int(round(BAND_WIDTH * extent)))
    first, last = lo + extent // 6, hi - extent // 6 - width + 1
    start = int(rng.integers(first, last + 1)) if last >= first else lo
    depth = max(1, int(round(BAND_SLICES * len(zs))))
    z0 = int(zs[0]) + int(rng.integers(0, len(zs) - depth + 1))
    phase = float(rng.uniform(0, 2 * np.pi))
    x = np.arange(brain.shape[0], dtype=np.float32)
    wave = np.cos(2 * np.pi * x / BAND_PERIOD + phase).astype(np.float32)[:, None, None]
    gain = 1 + BAND_AMPLITUDE * wave
    footprint = np.zeros(brain.shape, dtype=bool)
    footprint[:, start : start + width, z0 : z0 + depth] = True
    footprint &= brain
    return footprint, gain, {"y_voxels": [start, start + width], "z_slices": [z0, z0 + depth], "period_voxels": BAND_PERIOD,
                             "amplitude": BAND_AMPLITUDE, "phase": round(phase, 4)}  # fmt: skip


def phantom_affine(spacing, shape, origin_ras) -> np.ndarray:
    """LPS-stored affine of a RAS array flipped on X and Y: voxel ``(i, j, k)`` of the file is RAS ``(X-1-i, Y-1-j, k)``."""
    spacing = np.asarray(spacing, dtype=np.float64)
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    affine[:3, 3] = np.asarray(origin_ras, dtype=np.float64) + np.array([spacing[0] * (shape[0] - 1), spacing[1] * (shape[1] - 1), 0.0])
    return affine


def write_phantom_case(
    folder: str | Path, case_id: str, images: dict[str, np.ndarray], labels: np.ndarray | None, spacing=(1.0, 1.0, 1.0),
    origin=(0.0, 0.0, 0.0), aseg: np.ndarray | None = None, feature: np.ndarray | None = None,
) -> Path:
    """Write a phantom in BraTS 2023 naming (``-t1n -t1c -t2w -t2f -seg``, ``-aseg`` for structure labels,
    ``-feature`` for a planted feature's footprint, 0/1), stored LPS like BraTS volumes (the affine says so).
    ``labels`` None writes no ``-seg`` file."""
    folder = Path(folder) / case_id
    folder.mkdir(parents=True, exist_ok=True)
    shape = next(iter(images.values())).shape
    affine = phantom_affine(spacing, shape, origin)
    flip = (slice(None, None, -1), slice(None, None, -1), slice(None))  # RAS arrays -> LPS voxel order
    for modality, image in images.items():
        _save(image[flip].astype(np.float32), affine, folder / f"{case_id}-{modality}.nii.gz")
    if labels is not None:
        _save(labels[flip].astype(np.uint8), affine, folder / f"{case_id}-seg.nii.gz")
    if aseg is not None:
        _save(aseg[flip].astype(np.int16), affine, folder / f"{case_id}-aseg.nii.gz")
    if feature is not None:
        _save(np.asarray(feature)[flip].astype(np.uint8), affine, folder / f"{case_id}{FEATURE_SUFFIX}.nii.gz")
    return folder


def feature_mask_path(case) -> Path:
    """Where a phantom case's planted-feature footprint is (or would be): ``<case folder>/<folder name>-feature.nii.gz``.

    Args:
        case: a case folder or a :class:`~SegLensLogic.data.cases.Case` (its folder is that of its first image).
    """
    folder = Path(case) if isinstance(case, (str, Path)) else Path(next(iter(case.images.values()))).parent
    return folder / f"{folder.name}{FEATURE_SUFFIX}.nii.gz"


def read_feature_mask(case) -> np.ndarray | None:
    """The planted-feature footprint of a phantom case as a boolean volume in the file's voxel order (the order
    of its images, and of :meth:`~SegLensLogic.sae.codes.VolumeCodes.heatmap`), or None when the case has none.

    Raises:
        InputFileError: the footprint file exists but is not on the grid of the case's images.
    """
    path = feature_mask_path(case)
    if not path.is_file():
        return None
    from .io import read_image

    mask = read_image(path).array > 0
    if not isinstance(case, (str, Path)):
        first = read_image(next(iter(case.images.values())))
        if first.array.shape != mask.shape:
            raise InputFileError(path, f"has shape {mask.shape}, the case's images {first.array.shape}")
    return mask


def _save(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    import nibabel as nib
    image = nib.Nifti1Image(array, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    nib.save(image, str(path))


def write_phantom_cohort(
    out: str | Path, n: int, seed: int = 0, shape=(96, 112, 96), prefix: str | None = None, population: str | Population = "adult",
    overwrite: bool = False, log=None,
) -> Path:
    """Write ``n`` phantom cases (seeds ``seed`` ... ``seed + n - 1``) and ``cohort.json`` into ``out``; returns ``out``.

    Case ids are ``<prefix>-<index:05d>-000`` (BraTS 2023 style; default prefix ``SYN-<POPULATION>``). Healthy cases
    get ``-aseg`` structure labels instead of ``-seg``; a planted feature's footprint is ``-feature``.

    Raises:
        OutputExistsError: ``out`` already holds a cohort manifest or a case folder of this cohort (unless ``overwrite``).
    """
    from ..storage import atomic_write_text

    population = get_population(population) if isinstance(population, str) else population
    out = Path(out)
    prefix = prefix or f"SYN-{population.name.upper()}"
    ids = [f"{prefix}-{index:05d}-000" for index in range(n)]
    if not overwrite:
        for existing in [out / COHORT_MANIFEST] + [out / case_id for case_id in ids]:
            if existing.exists():
                raise OutputExistsError(existing)
    out.mkdir(parents=True, exist_ok=True)
    cases = []
    for index, case_id in enumerate(ids):
        images, labels, info = make_phantom(shape=shape, seed=seed + index, population=population, return_info=True)
        aseg = info.pop("aseg", None)
        feature = info.pop("feature_mask", None)
        template = load_template(tuple(int(s) for s in shape))
        write_phantom_case(out, case_id, images, None if aseg is not None else labels, template.spacing, template.origin, aseg=aseg,
                           feature=feature)  # fmt: skip
        info["case_id"] = case_id
        if feature is not None:
            info["feature_mask"] = f"{case_id}/{case_id}{FEATURE_SUFFIX}.nii.gz"
        if aseg is None:
            info["label_counts"] = {str(v): int(c) for v, c in zip(*np.unique(labels, return_counts=True)) if v}
        cases.append(info)
        if log:
            log(f"  {case_id} ({population.name}, seed {seed + index})")
    manifest = {
        "format_version": 1,
        "kind": COHORT_KIND,
        "population": population.name,
        "reference_population": "adult",
        "seed": int(seed),
        "n": int(n),
        "shape": [int(s) for s in shape],
        "label_scheme": "brats2023" if population.tumour else "aseg",
        "template": "ICBM 2009a nonlinear symmetric MNI152 (T1, GM, WM) from the nilearn package",
        "parameters": {k: _jsonable(v) for k, v in asdict(population).items()},
        "shifted_factors": shifted_factors(population),
        "expected_specific_categories": planted_shift_categories(population),
        "feature": None if population.feature is None else {
            "name": population.feature, "what": FEATURES[population.feature],
            "footprint": f"<case>/<case>{FEATURE_SUFFIX}.nii.gz (1 on the feature, 0 elsewhere; cases[i].feature_mask)",
        },
        "cases": cases,
    }
    atomic_write_text(out / COHORT_MANIFEST, json.dumps(manifest, indent=2) + "\n", overwrite=True)
    return out


class CohortManifest(Schema):
    """A phantom cohort's ``cohort.json``: the fields the demo and the report read back, typed."""

    population: str
    label_scheme: str
    shifted_factors: dict[str, Any] = Field(default_factory=dict)
    cases: list[dict[str, Any]] = Field(default_factory=list)
    feature: dict[str, Any] | None = None


def read_cohort_manifest(path: str | Path) -> dict:
    """Read a phantom cohort's ``cohort.json`` (a cohort folder or the file), checked against its schema."""
    path = Path(path)
    path = path / COHORT_MANIFEST if path.is_dir() else path
    if not path.is_file():
        raise InputFileError(path, "cohort manifest not found (write a cohort with seglens phantoms)")
    return read_document(path, COHORT_KIND, 1, CohortManifest, "phantom cohort manifest", versioned="cohort manifest")


# -- degrading real cases ------------------------------------------------------------------------------------------
# Presets of ``seglens degrade``: the acquisition factors of a population, applied to real images.
DEGRADE_PRESETS = {name: POPULATIONS[name] for name in ("ssa",)}
DEGRADATION_RECORD = "degradation.json"


def slice_axis(affine: np.ndarray) -> int:
    """The array axis closest to the world's superior-inferior axis (the axial slice axis of the file)."""
    import nibabel as nib
    codes = nib.aff2axcodes(affine)
    return next(axis for axis, code in enumerate(codes) if code in ("S", "I"))


def degrade_images(
    images: dict[str, np.ndarray], affine: np.ndarray, preset: str | Population = "ssa", seed: int = 0,
    brain: np.ndarray | None = None,
) -> tuple[dict[str, np.ndarray], dict]:
    """Apply a population's acquisition shift (noise, bias field, thick slices) to co-registered images.

    Args:
        images: modality -> array in file order, all on one grid with voxel->RAS ``affine``.
        preset: a :data:`DEGRADE_PRESETS` name or a :class:`Population` (its noise, bias and slice_thickness).
        brain: where the head is (default: any modality non-zero); the background stays as it was.

    Returns:
        ``(degraded images as float32, record of what was done)``. The grid is unchanged, so labels stay valid.
    """
    population = _degrade_preset(preset) if isinstance(preset, str) else preset
    rng = np.random.default_rng(seed)
    shape = next(iter(images.values())).shape
    if brain is None:
        brain = np.any([np.asarray(image) != 0 for image in images.values()], axis=0)
    axis = slice_axis(affine)
    spacing = float(np.sqrt((affine[:3, axis] ** 2).sum()))
    bias_field = np.exp(population.bias * smooth_field(rng, shape, coarse=4)).astype(np.float32)
    out = {}
    for modality, image in images.items():
        image = np.asarray(image, dtype=np.float32)
        reference = float(np.percentile(image[brain], 75)) if brain.any() else 1.0
        moved = np.moveaxis(image, axis, 2)
        degraded = add_acquisition(moved, rng, population.noise, np.moveaxis(bias_field, axis, 2), population.slice_thickness,
                                   spacing, reference)  # fmt: skip
        out[modality] = np.where(brain, np.moveaxis(degraded, 2, axis), image).astype(np.float32)
    record = {"preset": population.name, "seed": int(seed), "noise": population.noise, "bias": population.bias,
              "slice_thickness_mm": population.slice_thickness, "slice_axis": int(axis), "slice_spacing_mm": round(spacing, 4),
              "shifted_factors": shifted_factors(population)}  # fmt: skip
    return out, record


def _degrade_preset(name: str) -> Population:
    if name not in DEGRADE_PRESETS:
        raise SegLensError(f"unknown degradation preset '{name}'; choose one of {', '.join(DEGRADE_PRESETS)}")
    return DEGRADE_PRESETS[name]


def scaled_preset(name: str, strength: float = 1.0) -> Population:
    """A degradation preset at ``strength`` times its noise and bias, and its slice thickness scaled alike
    (``1 + strength * (thickness - 1)`` mm): 0 is no degradation, 1 the preset, 2 twice as strong."""
    import dataclasses

    if not 0 <= strength <= 10:
        raise SegLensError(f"degradation strength must be between 0 and 10, got {strength}")
    base = _degrade_preset(name)
    return dataclasses.replace(base, noise=base.noise * strength, bias=base.bias * strength,
                               slice_thickness=1.0 + strength * (base.slice_thickness - 1.0))  # fmt: skip


def degrade_case(
    case_dir: str | Path, out: str | Path, preset: str = "ssa", seed: int = 0, overwrite: bool = False, strength: float = 1.0
) -> Path:
    """Write a degraded copy of a real case into ``out/<case folder name>``: same file names, same voxel grid.

    Images get the preset's acquisition shift (stored in their original integer type when they had one); the label
    map and brain mask are copied byte for byte (the grid is unchanged, so they stay exact); ``degradation.json``
    records what was done.

    Raises:
        OutputExistsError: the output case folder exists (unless ``overwrite``) or is the input folder.
    """
    import shutil

    from .cases import find_case, read_case
    from ..errors import refuse_existing
    from ..storage import atomic_write_text
    from .io import read_image, write_image

    population = scaled_preset(preset, strength)
    case_dir = Path(case_dir)
    case = find_case(case_dir)
    target = Path(out) / case_dir.name
    if target.resolve() == case_dir.resolve():
        raise OutputExistsError(target)
    refuse_existing(target, overwrite)
    data = read_case(case, with_label=False)
    degraded, record = degrade_images(data.images, data.affine, population, seed=seed, brain=data.brain_mask)
    target.mkdir(parents=True, exist_ok=True)
    for modality, path in case.images.items():
        source = read_image(path)
        array = degraded[modality]
        if source.array.dtype.kind in "iu":
            info = np.iinfo(source.array.dtype)
            array = np.clip(np.round(array), info.min, info.max).astype(source.array.dtype)
        name = path.name if path.name.endswith((".nii.gz", ".nii")) else f"{case_dir.name}-{modality}.nii.gz"
        write_image(array, source, target / name, overwrite=overwrite)
    for extra in (case.label, case.brain_mask):
        if extra is not None and Path(str(extra)).is_file():
            shutil.copyfile(extra, target / Path(str(extra)).name)
    record["source"] = str(case_dir)
    record["strength"] = float(strength)
    atomic_write_text(target / DEGRADATION_RECORD, json.dumps(record, indent=2) + "\n", overwrite=True)
    return target
