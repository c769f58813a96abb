"""Synthetic cohorts with planted shifts (MNI152-based phantoms) and the acquisition shift of real cases."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from helpers import assert_one_line_error, seglens
from SegLensLogic.data import find_case, load_cohort, read_case
from SegLensLogic.data.phantoms import (
    COHORT_MANIFEST,
    degrade_case,
    make_phantom,
    planted_shift_categories,
    read_cohort_manifest,
    thick_slices,
    write_phantom_cohort,
)
from SegLensLogic.errors import OutputExistsError

SHAPE = (48, 56, 48)  # one shape for the module: the template is resampled once per shape


def phantom(population="adult", seed=0):
    return make_phantom(shape=SHAPE, seed=seed, population=population, return_info=True)


def test_deterministic_per_seed():
    a_images, a_labels, a_info = phantom("adult", 3)
    b_images, b_labels, b_info = phantom("adult", 3)
    assert a_info == b_info and np.array_equal(a_labels, b_labels)
    for modality in ("t1n", "t1c", "t2w", "t2f"):
        assert np.array_equal(a_images[modality], b_images[modality])
    c_images, c_labels, c_info = phantom("adult", 4)
    assert c_info["tumour"] != a_info["tumour"] and not np.array_equal(c_labels, a_labels)
    assert not np.allclose(c_images["t1c"], a_images["t1c"])


def test_labels_are_consistent_with_the_images():
    images, labels, info = phantom("adult", 1)
    brain = images["t1n"] > 0
    assert set(np.unique(labels)) == {0, 1, 2, 3}
    assert brain[labels > 0].mean() > 0.99  # tumour lies in the head
    necrotic, edema, enhancing = (labels == 1), (labels == 2), (labels == 3)
    # White matter far from the tumour, in the other hemisphere: bright on T1n, dark on FLAIR.
    from scipy import ndimage

    far = brain & (ndimage.distance_transform_edt(labels == 0) > 6) & (images["t1n"] > np.percentile(images["t1n"][brain], 70))
    mean = lambda m, region: float(images[m][region].mean())  # noqa: E731
    assert mean("t1c", enhancing) > 1.3 * mean("t1c", far)  # the rim enhances
    assert mean("t1c", enhancing) > 2 * mean("t1c", necrotic)  # around a dark core
    assert mean("t2f", edema) > 1.5 * mean("t2f", far)  # edema is bright on FLAIR
    assert mean("t2w", necrotic) > mean("t2w", far)  # a fluid-like core is bright on T2
    # The enhancing rim surrounds the core: every core voxel is farther from the edema than some rim voxel.
    dist = ndimage.distance_transform_edt(~(edema | (labels == 0)))
    assert dist[necrotic].mean() > dist[enhancing].mean()


def test_populations_plant_their_shifts():
    adult = [phantom("adult", s) for s in range(3)]
    child = [phantom("pediatric", s) for s in range(3)]
    volume = lambda runs: np.mean([(lab > 0).sum() for _, lab, _ in runs])  # noqa: E731
    edema_share = lambda runs: np.mean([(lab == 2).sum() / max((lab > 0).sum(), 1) for _, lab, _ in runs])  # noqa: E731
    assert volume(child) < 0.5 * volume(adult)
    assert edema_share(child) < 0.6 * edema_share(adult)
    for _, _, info in child:
        x, y, z = info["tumour"]["centre_mni"]
        assert abs(x) < 15 and (y < -40 or z < 13)  # midline or posterior fossa
    for _, _, info in adult:
        x, _, z = info["tumour"]["centre_mni"]
        assert abs(x) > 13 and z > -1  # supratentorial, hemispheric
    # ssa: the same anatomy and tumour as adult for a seed, but noisier, and blurred along the slice axis.
    a_images, a_labels, _ = adult[0]
    s_images, s_labels, _ = phantom("ssa", 0)
    assert np.array_equal(a_labels, s_labels)
    brain = a_images["t1n"] > 0

    def roughness(image, axis):
        return float(np.abs(np.diff(image, axis=axis))[np.take(brain, range(1, brain.shape[axis]), axis=axis)].mean())

    assert roughness(s_images["t1n"], 0) > 1.25 * roughness(a_images["t1n"], 0)  # in-plane: noise (over anatomy)
    ratio = lambda images: roughness(images["t1n"], 2) / roughness(images["t1n"], 0)  # noqa: E731
    assert ratio(s_images) < ratio(a_images)  # along slices: smoother than in-plane (thick slices)


def test_thick_slices_keep_the_grid_and_blur_only_along_z():
    rng = np.random.default_rng(0)
    image = rng.standard_normal((8, 8, 60)).astype(np.float32)
    thick = thick_slices(image, thickness=5.0, spacing_z=1.0)
    assert thick.shape == image.shape
    assert np.abs(np.diff(thick, axis=2)).mean() < 0.5 * np.abs(np.diff(image, axis=2)).mean()
    assert thick_slices(image, 1.0, 1.0) is image


def test_cohort_files_manifest_and_healthy_structures(tmp_path):
    out = write_phantom_cohort(tmp_path / "ped", 2, seed=5, shape=SHAPE, population="pediatric")
    manifest = read_cohort_manifest(out)
    assert manifest["population"] == "pediatric" and manifest["n"] == 2 and manifest["label_scheme"] == "brats2023"
    assert set(manifest["shifted_factors"]) == {"location", "tumour_radius", "core_fraction", "edema_factor", "contrast", "head_scale"}
    assert "edema" in manifest["expected_specific_categories"]
    cohort = load_cohort(out)
    assert [c.case_id for c in cohort] == ["SYN-PEDIATRIC-00000-000", "SYN-PEDIATRIC-00001-000"]
    case = read_case(cohort[0])
    assert case.case.naming == "brats2023" and case.label_scheme.name == "brats2023"
    _, labels, info = make_phantom(shape=SHAPE, seed=5, population="pediatric", return_info=True)
    assert np.array_equal(case.label, labels[::-1, ::-1, :])  # stored LPS, as BraTS stores volumes
    # The affine puts the tumour where the manifest says (MNI millimetres).
    centroid = case.affine @ np.append(np.argwhere(case.label > 0).mean(0), 1)
    assert np.linalg.norm(centroid[:3] - np.array(info["tumour"]["centre_mni"])) < 1.5 * info["tumour"]["radius_mm"]
    with pytest.raises(OutputExistsError):
        write_phantom_cohort(out, 1, shape=SHAPE, population="pediatric")

    ssa = write_phantom_cohort(tmp_path / "ssa", 1, shape=SHAPE, population="ssa")
    assert set(read_cohort_manifest(ssa)["shifted_factors"]) == {"noise", "bias", "slice_thickness"}
    assert read_cohort_manifest(write_phantom_cohort(tmp_path / "adult", 1, shape=SHAPE))["shifted_factors"] == {}

    healthy = write_phantom_cohort(tmp_path / "healthy", 1, shape=SHAPE, population="healthy")
    case = read_case(find_case(healthy / "SYN-HEALTHY-00000-000"))
    assert case.label_scheme.name == "aseg"
    assert set(range(1, 9)) <= set(np.unique(case.label).tolist())  # the eight subcortical structures
    assert read_cohort_manifest(healthy)["shifted_factors"]["tumour"] == {"adult": True, "healthy": False, "what": "tumour presence"}
    assert planted_shift_categories(healthy / COHORT_MANIFEST) == planted_shift_categories("healthy")


def test_phantoms_command(capsys, tmp_path):
    out = tmp_path / "adult"
    code, stdout, err = seglens(capsys, "phantoms", "--population", "adult", "--n", "1", "--seed", "2", "--shape", "48,56,48", "--out", out)
    assert code == 0, err
    assert json.loads((out / COHORT_MANIFEST).read_text())["cases"][0]["seed"] == 2
    code, _, err = seglens(capsys, "phantoms", "--n", "1", "--shape", "48,56,48", "--prefix", "SYN-ADULT", "--seed", "2", "--out", out)
    assert_one_line_error(code, err, "already exists")
    code, _, err = seglens(capsys, "phantoms", "--shape", "4,4", "--out", out)
    assert code == 2 and "--shape" in err


@pytest.fixture(scope="module")
def cropped_real_case(brats2018_case, tmp_path_factory):
    """A slab of a real BraTS 2018 case (all modalities and labels, same naming and affine chain): fast to degrade."""
    folder = tmp_path_factory.mktemp("real") / brats2018_case.name
    folder.mkdir()
    for path in sorted(brats2018_case.glob("*.nii.gz")):
        image = nib.load(str(path))
        nib.save(image.slicer[40:200, 30:220, 50:110], str(folder / path.name))
    return folder


def test_degrade_a_real_case(capsys, cropped_real_case, tmp_path):
    code, stdout, err = seglens(capsys, "degrade", "--preset", "ssa", cropped_real_case, "--out", tmp_path)
    assert code == 0, err
    target = tmp_path / cropped_real_case.name
    source, degraded = read_case(cropped_real_case), read_case(target)
    assert sorted(p.name for p in target.glob("*.nii.gz")) == sorted(p.name for p in cropped_real_case.glob("*.nii.gz"))
    assert degraded.reference.same_grid(source.reference)
    assert np.array_equal(degraded.label, source.label) and (source.label > 0).any()
    seg = next(cropped_real_case.glob("*_seg.nii.gz"))
    assert (target / seg.name).read_bytes() == seg.read_bytes()
    brain = np.any([image != 0 for image in source.images.values()], axis=0)
    for modality in source.images:
        a, b = source.images[modality], degraded.images[modality]
        assert nib.load(str(degraded.case.images[modality])).get_data_dtype() == nib.load(str(source.case.images[modality])).get_data_dtype()
        assert np.array_equal(a[~brain], b[~brain])  # background untouched
        in_plane = lambda v: np.abs(np.diff(v, axis=0))[brain[1:]].mean()  # noqa: E731
        along = lambda v: np.abs(np.diff(v, axis=2))[brain[:, :, 1:]].mean()  # noqa: E731
        assert in_plane(b) > in_plane(a)  # noisier in plane
        assert along(b) / in_plane(b) < along(a) / in_plane(a)  # smoother along the (thick) slices
    record = json.loads((target / "degradation.json").read_text())
    assert record["preset"] == "ssa" and record["slice_axis"] == 2 and set(record["shifted_factors"]) == {"noise", "bias", "slice_thickness"}
    code, _, err = seglens(capsys, "degrade", cropped_real_case, "--out", tmp_path)
    assert_one_line_error(code, err, str(target), "already exists")
    with pytest.raises(OutputExistsError):
        degrade_case(cropped_real_case, cropped_real_case.parent)  # never onto itself


@pytest.mark.parametrize("population", ["pediatric-cyst", "ssa-band"])
def test_planted_feature_is_the_only_difference_and_its_footprint_is_exact(population, tmp_path):
    from scipy import ndimage

    from SegLensLogic.data.phantoms import FEATURES, read_feature_mask

    a_images, a_labels, a_info = phantom("adult", 2)
    p_images, p_labels, p_info = phantom(population, 2)
    footprint = p_info["feature_mask"]
    assert footprint.dtype == bool and footprint.any() and "feature_mask" not in a_info
    assert p_info["feature"]["name"] in FEATURES and p_info["feature"]["voxels"] == int(footprint.sum())
    brain = a_images["t1n"] > 0
    assert brain[footprint].all()  # the footprint lies in the head
    # Same seed: the adult case plus the feature (its own random stream), nothing else.
    assert {k: v for k, v in p_info.items() if k not in ("population", "feature", "feature_mask")} == {k: v for k, v in a_info.items() if k != "population"}
    # (to float32 rounding: BLAS may round the tissue mixing differently from one allocation to the next)
    changed = np.any([np.abs(a_images[m] - p_images[m]) > 1e-3 * a_images[m].max() for m in a_images], axis=0)
    if population == "ssa-band":
        assert np.array_equal(changed, footprint & changed) and changed[footprint].mean() > 0.95  # exactly the band
        assert np.array_equal(a_labels, p_labels)  # an artefact: labels unchanged
        x = np.argwhere(footprint)[:, 0]
        gain = p_images["t1n"][footprint] / np.maximum(a_images["t1n"][footprint], 1e-6)
        assert gain.min() < 0.4 and gain.max() > 1.6  # stripes of +-80 % signal
        assert len(np.unique(x % 8)) == 8  # spread across X, stripes 8 voxels apart
    else:
        near = ndimage.binary_dilation(footprint, iterations=3)  # partial volume at the cyst's border
        assert not changed[~near].any() and changed[footprint].mean() > 0.95
        assert np.array_equal(p_labels != a_labels, footprint & (p_labels != a_labels)) and (p_labels[footprint] == 1).all()
        far_white = brain & ~near & (a_labels == 0) & (a_images["t1n"] > np.percentile(a_images["t1n"][brain], 70))
        mean = lambda m, region: float(p_images[m][region].mean())  # noqa: E731
        assert mean("t2w", footprint) > 2 * mean("t2w", far_white) and mean("t1n", footprint) < 0.4 * mean("t1n", far_white)

    # Written beside the labels, recorded in cohort.json, ignored as an image, read back on the file's grid.
    out = write_phantom_cohort(tmp_path / population, 1, seed=2, shape=SHAPE, population=population)
    manifest = read_cohort_manifest(out)
    assert set(manifest["shifted_factors"]) == {"feature"} and manifest["feature"]["name"] == p_info["feature"]["name"]
    entry = manifest["cases"][0]
    case = find_case(out / entry["case_id"])
    assert (out / entry["feature_mask"]).is_file() and sorted(case.images) == ["t1c", "t1n", "t2f", "t2w"]
    mask = read_feature_mask(case)
    assert np.array_equal(mask, footprint[::-1, ::-1, :])  # stored LPS like the images
    assert np.array_equal(read_case(case).label > 0, (p_labels > 0)[::-1, ::-1, :])
    assert read_feature_mask(find_case(write_phantom_cohort(tmp_path / "adult", 1, shape=SHAPE) / "SYN-ADULT-00000-000")) is None
