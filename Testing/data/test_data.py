"""Tests of SegLensLogic.data: real cases of every family, cohorts, label schemes, preprocessing, image I/O in
NIfTI / NRRD / MGZ, writing on the exact input grid, and the errors users get for broken input.

Real volumes are read once per module (module-scoped fixtures) so the file stays fast.
"""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from helpers import (
    SYNTHETIC_BRAIN_SLICES,
    SYNTHETIC_SHAPE,
    case_file_name,
    lia_affine,
    lps_affine,
    make_nifti,
    nifti_to_mgz,
    nifti_to_sitk,
    oblique_affine,
    synthetic_arrays,
)
from SegLensLogic.data import (
    ASEG,
    BRATS2013,
    BRATS2018,
    BRATS2023,
    MODALITIES,
    SliceGeometry,
    case_from_mapping,
    find_case,
    load_cohort,
    prepare_case,
    read_case,
    read_image,
    write_image,
)
from SegLensLogic.data.labels import detect_tumour_scheme
from SegLensLogic.data.preprocessing import Orientation, zscore_in_mask
from SegLensLogic.errors import InputFileError, OutputExistsError, SegLensError

CASE_ID = "BraTS-SYN-00001-000"


def raw(path: Path) -> np.ndarray:
    """The stored array of an image file, read independently of SegLens."""
    return np.asanyarray(nib.load(str(path)).dataobj)


def counts(array: np.ndarray) -> dict[int, int]:
    """Voxel count of every value present in an integer-valued (non-negative) array."""
    n = np.bincount(np.asarray(array).astype(np.int64, copy=False).ravel())
    return {int(v): int(n[v]) for v in np.flatnonzero(n)}


def assert_names(excinfo: pytest.ExceptionInfo, path: Path, *words: str) -> None:
    """The error message names ``path`` and every word of the problem."""
    message = str(excinfo.value)
    assert str(path) in message, f"message does not name {path}: {message}"
    for word in words:
        assert word.lower() in message.lower(), f"message does not say '{word}': {message}"


def syn_file(folder: Path, role: str, naming: str = "brats2023") -> Path:
    return folder / case_file_name(folder.name, role, naming)


# ----------------------------------------------------------------------------------------------------------------
# Real cases (module-scoped: each volume is read once)
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def brats2018_cohort(brats2018_dir):
    return load_cohort(brats2018_dir)


@pytest.fixture(scope="module")
def brats2018_read(brats2018_case):
    return read_case(brats2018_case)


@pytest.fixture(scope="module")
def bert_read(bert_case):
    return read_case(bert_case)


def test_brats2018_cohort_has_12_cases_with_four_modalities(brats2018_cohort, brats2018_dir):
    cohort = brats2018_cohort
    assert len(cohort) == 12
    assert cohort.name == "brats2018"
    assert sorted(c.case_id for c in cohort) == sorted(p.name for p in brats2018_dir.iterdir() if p.is_dir())
    assert cohort.modalities == MODALITIES
    for case in cohort:
        assert case.naming == "brats2018"
        assert case.modalities == MODALITIES
        assert case.label_scheme == "brats2018"
        assert Path(case.label).name == f"{case.case_id}_seg.nii.gz"
        assert case.images["t1c"].name == f"{case.case_id}_t1ce.nii.gz"
        assert case.images["t2f"].name == f"{case.case_id}_flair.nii.gz"
        assert case.images["t2w"].name == f"{case.case_id}_t2.nii.gz"
        assert case.images["t1n"].name == f"{case.case_id}_t1.nii.gz"


def test_brats2018_labels_map_0124_to_0123_in_every_case(brats2018_cohort):
    for case in brats2018_cohort:
        read = read_case(case, modalities=["t1"])  # one modality is enough to check the labels
        assert read.label_scheme is BRATS2018
        assert read.label.dtype == np.uint8
        assert read.label.shape == (240, 240, 155)
        source = raw(case.label)
        raw_counts = counts(source)
        assert set(raw_counts) == {0, 1, 2, 4}, case.case_id
        mapped = counts(read.label)
        assert set(mapped) == {0, 1, 2, 3}, case.case_id
        assert mapped == {0: raw_counts[0], 1: raw_counts[1], 2: raw_counts[2], 3: raw_counts[4]}, case.case_id
        # voxel by voxel, not only in count
        assert np.array_equal(read.label == 3, source == 4)


def test_brats2018_case_reads_four_modalities_on_one_grid(brats2018_read, brats2018_case):
    read = brats2018_read
    assert tuple(read.images) == MODALITIES
    assert read.shape == (240, 240, 155)
    assert nib.aff2axcodes(read.affine) == ("L", "P", "S")
    assert np.allclose(read.affine, nib.load(str(read.case.images["t1n"])).affine)
    for modality, array in read.images.items():
        assert array.dtype == np.float32 and array.shape == (240, 240, 155)
        assert np.array_equal(array, raw(read.case.images[modality]).astype(np.float32)), modality
    assert read.brain_mask is None
    assert read.case_id == brats2018_case.name


def test_brats2013_cases_map_3_to_1_and_4_to_3(brats2013_dir):
    cases = sorted(p for p in brats2013_dir.iterdir() if p.is_dir())
    assert len(cases) == 3
    for folder in cases:
        case = find_case(folder)
        assert case.naming == "brats2013"
        assert case.modalities == ("t1c", "t2f")
        assert case.images["t1c"].name.startswith("T1c_") and case.images["t2f"].name.startswith("Flair_")
        assert Path(case.label).name == "OTMultiClass.nii.gz"
        read = read_case(case)
        assert read.label_scheme is BRATS2013
        source = raw(case.label)
        before = counts(source)
        assert set(before) == {0, 1, 2, 3, 4}, folder.name
        after = counts(read.label)
        assert after[1] == before[1] + before[3], folder.name
        assert after[2] == before[2], folder.name
        assert after[3] == before[4], folder.name
        assert after[0] == before[0], folder.name
        assert set(after) == {0, 1, 2, 3}
        assert np.array_equal(read.label == 1, (source == 1) | (source == 3))
        for modality in ("t1c", "t2f"):
            assert np.array_equal(read.images[modality], raw(case.images[modality]).astype(np.float32))


def test_brats2023_named_case_has_four_modalities_and_no_label(brats2023_case):
    case = find_case(brats2023_case)
    assert case.naming == "brats2023"
    assert case.modalities == MODALITIES
    for modality in MODALITIES:
        assert case.images[modality].name == f"{brats2023_case.name}-{modality}.nii.gz"
    assert case.label is None
    read = read_case(case)
    assert read.label is None and read.label_scheme is None
    assert read.shape == (240, 240, 155)
    for modality in MODALITIES:
        assert np.array_equal(read.images[modality], raw(case.images[modality]).astype(np.float32)), modality


def test_bert_freesurfer_case(bert_read, bert_case):
    read = bert_read
    case = read.case
    assert case.naming == "freesurfer"
    assert case.modalities == ("t1n",)
    assert case.images["t1n"] == bert_case / "norm.mgz"
    assert Path(case.label) == bert_case / "aseg.mgz"
    assert case.brain_mask == bert_case / "brainmask.mgz"
    assert read.shape == (256, 256, 256)
    assert nib.aff2axcodes(read.affine) == ("L", "I", "A")
    assert np.array_equal(read.images["t1n"], raw(bert_case / "norm.mgz").astype(np.float32))
    # the shipped brain mask is used, as a boolean mask
    assert read.brain_mask is not None and read.brain_mask.dtype == bool
    assert np.array_equal(read.brain_mask, raw(bert_case / "brainmask.mgz") > 0)
    # aseg: left and right codes of each structure join one class, everything else is background
    assert read.label_scheme is ASEG
    aseg = counts(raw(bert_case / "aseg.mgz"))
    mapped = counts(read.label)
    assert set(mapped) <= set(range(ASEG.num_classes))
    for code, cls in ASEG.mapping.items():
        if cls:
            assert mapped.get(cls, 0) == sum(aseg.get(c, 0) for c, k in ASEG.mapping.items() if k == cls)
    assert mapped[1] == aseg[10] + aseg[49]  # thalamus
    assert sum(mapped.values()) == 256**3


def test_voxelmorph_scan_from_mapping_with_npz_labels(voxelmorph_case):
    case = case_from_mapping(
        {"t1": "test_vol.nii.gz", "seg": "test_scan.npz:seg"}, label_scheme="aseg", base=voxelmorph_case
    )
    assert case.modalities == ("t1n",)
    assert case.images["t1n"] == voxelmorph_case / "test_vol.nii.gz"
    read = read_case(case)
    assert read.shape == (160, 192, 224)
    assert np.allclose(read.affine, nib.load(str(voxelmorph_case / "test_vol.nii.gz")).affine)
    assert np.array_equal(read.images["t1n"], raw(voxelmorph_case / "test_vol.nii.gz").astype(np.float32))
    with np.load(voxelmorph_case / "test_scan.npz") as archive:
        seg = archive["seg"]
    assert read.label_scheme is ASEG
    assert read.label.shape == seg.shape and read.label.dtype == np.uint8
    for cls in range(1, ASEG.num_classes):
        codes = [c for c, k in ASEG.mapping.items() if k == cls]
        assert np.array_equal(read.label == cls, np.isin(seg, codes)), cls
    assert (read.label > 0).sum() > 1000  # real structures, not an empty map


# ----------------------------------------------------------------------------------------------------------------
# Cohorts
# ----------------------------------------------------------------------------------------------------------------


def test_load_cohort_from_text_file_of_relative_case_folders(tmp_path, synthetic_case):
    cases = tmp_path / "cases"
    for n in range(3):
        synthetic_case(f"BraTS-SYN-0000{n}-000", root=cases, shape=(16, 12, 8))
    lists = tmp_path / "lists"
    lists.mkdir()
    listing = lists / "my-cohort.txt"
    listing.write_text(
        "# training cases\n"
        "\n"
        "../cases/BraTS-SYN-00002-000   # the odd one\n"
        "   ../cases/BraTS-SYN-00000-000\n"
        "#../cases/BraTS-SYN-00001-000\n",
        encoding="utf-8",
    )
    cohort = load_cohort(listing)
    assert cohort.name == "my-cohort"
    assert [c.case_id for c in cohort] == ["BraTS-SYN-00002-000", "BraTS-SYN-00000-000"]  # file order, comment skipped
    assert cohort.cases[0].images["t1n"].resolve() == (cases / "BraTS-SYN-00002-000" / "BraTS-SYN-00002-000-t1n.nii.gz")
    assert cohort.modalities == MODALITIES


def test_load_cohort_text_file_with_real_cases(tmp_path, brats2018_dir, brats2013_case):
    chosen = sorted(p for p in brats2018_dir.iterdir() if p.is_dir())[:2]
    lines = ["# two 2018 cases and one 2013 case"] + [os.path.relpath(p, tmp_path) for p in chosen]
    lines.append(os.path.relpath(brats2013_case, tmp_path) + "  # 2013 naming")
    listing = tmp_path / "mixed.txt"
    listing.write_text("\n".join(lines) + "\n", encoding="utf-8")
    cohort = load_cohort(listing)
    assert [c.case_id for c in cohort] == [p.name for p in chosen] + [brats2013_case.name]
    assert [c.naming for c in cohort] == ["brats2018", "brats2018", "brats2013"]
    assert cohort.modalities == ("t1c", "t2f")  # what every case has


def test_load_cohort_text_file_bad_line_names_file_and_line(tmp_path, synthetic_case):
    synthetic_case("BraTS-SYN-00001-000", root=tmp_path / "cases", shape=(16, 12, 8))
    listing = tmp_path / "cohort.txt"
    listing.write_text("# header\ncases/BraTS-SYN-00001-000\n\ncases/no-such-case\n", encoding="utf-8")
    with pytest.raises(InputFileError) as excinfo:
        load_cohort(listing)
    assert_names(excinfo, listing, "line 4", "no-such-case", "not found")


def test_load_cohort_of_empty_list_and_missing_source(tmp_path):
    listing = tmp_path / "empty.txt"
    listing.write_text("# nothing yet\n\n", encoding="utf-8")
    with pytest.raises(InputFileError) as excinfo:
        load_cohort(listing)
    assert_names(excinfo, listing, "no case")
    missing = tmp_path / "no-such-cohort"
    with pytest.raises(InputFileError) as excinfo:
        load_cohort(missing)
    assert_names(excinfo, missing, "not found")


def test_load_cohort_of_a_single_case_folder(synthetic_case):
    folder = synthetic_case(shape=(16, 12, 8))
    cohort = load_cohort(folder)
    assert len(cohort) == 1 and cohort[0].case_id == folder.name


# ----------------------------------------------------------------------------------------------------------------
# Label schemes
# ----------------------------------------------------------------------------------------------------------------


def test_brats2018_scheme_maps_4_to_3():
    labels = np.array([[0, 1], [2, 4]], dtype=np.int16)
    out = BRATS2018.apply(labels)
    assert out.dtype == np.uint8
    assert out.tolist() == [[0, 1], [2, 3]]


def test_brats2023_scheme_is_identity():
    labels = np.arange(4, dtype=np.uint8).reshape(2, 2)
    assert np.array_equal(BRATS2023.apply(labels), labels)
    floats = labels.astype(np.float32)  # labels stored as floats, as some tools write them
    assert np.array_equal(BRATS2023.apply(floats), labels)


def test_brats2013_scheme_joins_non_enhancing_core_with_necrosis():
    labels = np.array([0, 1, 2, 3, 4])
    assert BRATS2013.apply(labels).tolist() == [0, 1, 2, 1, 3]


@pytest.mark.parametrize(
    "values, expected",
    [
        ([0, 1, 2, 4], BRATS2018),
        ([0, 2, 4], BRATS2018),
        ([0, 1, 2, 3, 4], BRATS2013),
        ([0, 1, 2, 3], BRATS2023),
        ([0, 2], BRATS2023),
        ([0], BRATS2023),
    ],
)
def test_detect_tumour_scheme(values, expected):
    assert detect_tumour_scheme(np.array(values, dtype=np.float32)) is expected


def test_explicit_case_without_scheme_detects_it(tmp_path):
    images, seg = synthetic_arrays((16, 12, 8), label_values=(1, 2, 4))
    affine = oblique_affine()
    t1 = make_nifti(tmp_path / "t1.nii.gz", images["t1n"], affine)
    labels = make_nifti(tmp_path / "labels.nii.gz", seg, affine)
    read = read_case(case_from_mapping({"T1": t1, "labels": labels}))
    assert read.label_scheme is BRATS2018
    assert np.array_equal(read.label == 3, seg == 4)
    assert counts(read.label).keys() == {0, 1, 2, 3}


def test_aseg_scheme_sends_unmodelled_structures_to_background():
    labels = np.array([0, 2, 10, 49, 17, 53, 41, 251, 60])
    assert ASEG.apply(labels).tolist() == [0, 0, 1, 1, 5, 5, 0, 0, 8]


# ----------------------------------------------------------------------------------------------------------------
# Preprocessing
# ----------------------------------------------------------------------------------------------------------------


def _world_axis_check(affine: np.ndarray, shape: tuple[int, int, int]) -> None:
    """After Orientation.apply, RAS array axis a must point (mostly) along +world axis a."""
    orientation = Orientation.of(affine)
    index = np.arange(int(np.prod(shape))).reshape(shape)
    ras = orientation.apply(index)
    assert sorted(ras.shape) == sorted(shape)
    origin = np.array(np.unravel_index(ras[0, 0, 0], shape))
    for axis in range(3):
        step = [0, 0, 0]
        step[axis] = 1
        moved = np.array(np.unravel_index(ras[tuple(step)], shape))
        world = affine[:3, :3] @ (moved - origin)
        assert np.argmax(np.abs(world)) == axis and world[axis] > 0, (axis, world)


def _bert_affine():
    from conftest import shared_data_path

    path = shared_data_path() / "healthy" / "bert" / "norm.mgz"
    if not path.is_file():
        pytest.skip(f"real BraTS cases not found at {path}: set SEGLENS_DATA or place ../shared/data beside the repo")
    return nib.load(str(path)).affine


@pytest.mark.parametrize(
    "name, make_affine, shape",
    [
        ("LPS (BraTS)", lambda: lps_affine(), (12, 10, 8)),
        ("LIA (FreeSurfer conformed)", lambda: lia_affine((12, 10, 8)), (12, 10, 8)),
        ("LIA (bert's norm.mgz)", _bert_affine, (12, 10, 8)),
        ("oblique LPS-like", lambda: oblique_affine(), SYNTHETIC_SHAPE),
        ("oblique permuted", lambda: oblique_affine(angles_deg=(80.0, 5.0, -10.0), flips=(1, -1, -1)), (9, 7, 5)),
    ],
)
def test_orientation_round_trip_and_ras(name, make_affine, shape):
    affine = make_affine()
    orientation = Orientation.of(affine)
    a = np.random.default_rng(1).integers(0, 1000, shape)
    ras = orientation.apply(a)
    assert np.array_equal(orientation.invert(ras), a)
    # trailing axes (channels, classes) are kept
    stacked = np.stack([a, a + 1], axis=-1)
    assert np.array_equal(orientation.invert(orientation.apply(stacked)), stacked)
    _world_axis_check(affine, shape)


def test_orientation_of_lps_flips_first_two_axes():
    a = np.arange(24).reshape(2, 3, 4)
    assert np.array_equal(Orientation.of(lps_affine()).apply(a), a[::-1, ::-1, :])


def test_orientation_of_bert_is_lia(bert_read):
    orientation = Orientation.of(bert_read.affine)
    volume = bert_read.images["t1n"]
    ras = orientation.apply(volume)
    # LIA -> RAS: file axis 0 (L) flipped to x, file axis 2 (A) to y, file axis 1 (I) flipped to z
    assert np.array_equal(ras, np.transpose(volume[::-1, ::-1, :], (0, 2, 1)))
    assert np.array_equal(orientation.invert(ras), volume)


def test_prepare_case_gives_ras_arrays(synthetic_case):
    folder = synthetic_case()
    read = read_case(folder)
    assert nib.aff2axcodes(read.affine) == ("L", "P", "S")
    prepared = prepare_case(read, ["t2f", "t1c"], size=64)
    assert prepared.modalities == ("t2f", "t1c")
    assert prepared.images.shape == (2, *SYNTHETIC_SHAPE) and prepared.images.dtype == np.float32
    # LPS-like oblique: RAS order flips the first two file axes
    expected_mask = (raw(syn_file(folder, "t2f")) > 0)[::-1, ::-1, :]
    assert np.array_equal(prepared.brain_mask, expected_mask | (raw(syn_file(folder, "t1c")) > 0)[::-1, ::-1, :])
    for channel, modality in enumerate(("t2f", "t1c")):
        flipped = raw(syn_file(folder, modality)).astype(np.float32)[::-1, ::-1, :]
        assert np.allclose(prepared.images[channel], zscore_in_mask(flipped, prepared.brain_mask), atol=1e-6)
    assert np.array_equal(prepared.label, read.label[::-1, ::-1, :])
    # and back to the file's voxel order
    assert np.array_equal(prepared.to_input_grid(prepared.label), read.label)
    assert np.array_equal(prepared.to_input_grid(prepared.brain_mask), raw(syn_file(folder, "t2f")) > 0)
    assert prepared.geometry == SliceGeometry(in_plane=SYNTHETIC_SHAPE[:2], size=64)
    assert prepared.num_slices == SYNTHETIC_SHAPE[2]


def test_zscore_inside_mask_has_mean_0_std_1(synthetic_case):
    prepared = prepare_case(read_case(synthetic_case()), MODALITIES, size=48)
    mask = prepared.brain_mask
    assert 0.05 < mask.mean() < 0.9
    for channel in prepared.images:
        inside = channel[mask].astype(np.float64)
        assert abs(inside.mean()) < 1e-4
        assert abs(inside.std() - 1.0) < 1e-3
        assert np.all(channel[~mask] == 0)


def test_prepare_real_brats_case_masks_tumour_and_normalises(brats2018_read):
    prepared = prepare_case(brats2018_read, MODALITIES, size=256)
    mask = prepared.brain_mask
    assert prepared.images.shape == (4, 240, 240, 155)
    # the expert labels reach a few voxels where every modality is 0 (outside any image-based mask); all others in
    tumour = prepared.label > 0
    assert np.count_nonzero(tumour & ~mask) <= 1e-4 * np.count_nonzero(tumour), "tumour voxels outside the brain mask"
    assert 0.05 < mask.mean() < 0.3
    for channel in prepared.images:
        inside = channel[mask].astype(np.float64)
        assert abs(inside.mean()) < 1e-3 and abs(inside.std() - 1.0) < 1e-3
    assert np.array_equal(prepared.to_input_grid(prepared.label), brats2018_read.label)
    slices = prepared.brain_slices()
    assert 0 < len(slices) < 155
    assert np.all(prepared.brain_mask[:, :, slices].any(axis=(0, 1)))


def test_prepare_bert_uses_shipped_brain_mask(bert_read):
    prepared = prepare_case(bert_read, ["t1n"], size=256)
    assert prepared.images.shape == (1, 256, 256, 256)
    assert np.array_equal(prepared.brain_mask, Orientation.of(bert_read.affine).apply(bert_read.brain_mask))
    inside = prepared.images[0][prepared.brain_mask].astype(np.float64)
    assert abs(inside.mean()) < 1e-3 and abs(inside.std() - 1.0) < 1e-3


@pytest.mark.parametrize("in_plane", [(40, 48), (48, 40), (45, 48)])
def test_slice_geometry_round_trip(in_plane):
    x, y = in_plane
    i, j = np.meshgrid(np.arange(x), np.arange(y), indexing="ij")
    smooth = torch.from_numpy(np.sin(i / 6.0) * np.cos(j / 5.0)).float()[None, None].repeat(3, 2, 1, 1)
    geometry = SliceGeometry(in_plane=in_plane, size=64)
    model = geometry.to_model(smooth)
    assert model.shape == (3, 2, 64, 64)
    back = geometry.from_model(model)
    assert back.shape == smooth.shape
    assert (back - smooth)[:, :, 2:-2, 2:-2].abs().max() < 0.03  # bilinear there and back: close inside

    labels = torch.from_numpy(np.random.default_rng(2).integers(0, 4, (5, 1, x, y))).float()
    exact = SliceGeometry(in_plane=in_plane, size=max(in_plane))
    padded = exact.to_model(labels, mode="nearest")
    assert padded.shape == (5, 1, 48, 48)
    assert torch.equal(exact.from_model(padded, mode="nearest"), labels)
    # the padding is centred and zero
    px, py = 48 - x, 48 - y
    assert torch.equal(padded[:, :, px // 2 : px // 2 + x, py // 2 : py // 2 + y], labels)
    assert padded.sum() == labels.sum()
    # an integer zoom keeps nearest-mode labels exactly too
    double = SliceGeometry(in_plane=in_plane, size=96)
    assert torch.equal(double.from_model(double.to_model(labels, mode="nearest"), mode="nearest"), labels)


def test_brain_slices_skip_empty_slices(synthetic_case):
    prepared = prepare_case(read_case(synthetic_case()), MODALITIES, size=64)
    start, stop = SYNTHETIC_BRAIN_SLICES
    # file axis 2 is inferior -> superior for the LPS-like affine, so RAS slices are file slices
    assert prepared.brain_slices().tolist() == list(range(start, stop))
    batch = prepared.model_input(prepared.brain_slices())
    assert batch.shape == (stop - start, 4, 64, 64) and batch.dtype == torch.float32
    assert all(batch[n].abs().sum() > 0 for n in range(len(batch)))


# ----------------------------------------------------------------------------------------------------------------
# NRRD and MGZ
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture
def oblique_nifti(synthetic_case) -> Path:
    return syn_file(synthetic_case(), "t1n")


def test_read_nrrd_matches_nifti(oblique_nifti, tmp_path):
    nifti = read_image(oblique_nifti)
    nrrd = read_image(nifti_to_sitk(oblique_nifti, tmp_path / "t1n.nrrd"))
    assert nrrd.shape == nifti.shape
    assert np.array_equal(nrrd.array, nifti.array)
    assert np.allclose(nrrd.affine, nifti.affine, atol=1e-4)
    assert np.allclose(nrrd.spacing, (1.2, 0.9, 2.5), atol=1e-4)
    assert nrrd.same_grid(nifti)


def test_read_mha_matches_nifti(oblique_nifti, tmp_path):
    nifti = read_image(oblique_nifti)
    mha = read_image(nifti_to_sitk(oblique_nifti, tmp_path / "t1n.mha"))
    assert np.array_equal(mha.array, nifti.array)
    assert np.allclose(mha.affine, nifti.affine, atol=1e-4)


def test_read_mgz_matches_nifti(oblique_nifti, tmp_path):
    nifti = read_image(oblique_nifti)
    mgz = read_image(nifti_to_mgz(oblique_nifti, tmp_path / "t1n.mgz"))
    assert mgz.shape == nifti.shape
    assert np.array_equal(mgz.array, nifti.array)
    assert np.allclose(mgz.affine, nifti.affine, atol=1e-4)


def test_case_from_explicit_mapping_of_nrrd_files(synthetic_case, tmp_path):
    folder = synthetic_case()
    converted = tmp_path / "nrrd"
    converted.mkdir()
    mapping = {}
    for role, key in [("t1n", "T1"), ("t1c", "t1ce"), ("t2w", "T2"), ("t2f", "FLAIR"), ("seg", "seg")]:
        nifti_to_sitk(syn_file(folder, role), converted / f"{role}.nrrd")
        mapping[key] = f"{role}.nrrd"
    read = read_case(case_from_mapping(mapping, case_id="nrrd-case", label_scheme="brats2023", base=converted))
    reference = read_case(folder)
    assert read.case_id == "nrrd-case"
    assert tuple(read.images) == MODALITIES
    assert np.allclose(read.affine, reference.affine, atol=1e-4)
    for modality in MODALITIES:
        assert np.array_equal(read.images[modality], reference.images[modality]), modality
    assert np.array_equal(read.label, reference.label)


# ----------------------------------------------------------------------------------------------------------------
# Writing on the input grid
# ----------------------------------------------------------------------------------------------------------------


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("reference_format", ["nifti", "mgz", "nrrd"])
def test_write_image_keeps_reference_grid(reference_format, oblique_nifti, tmp_path):
    source = {
        "nifti": lambda: oblique_nifti,
        "mgz": lambda: nifti_to_mgz(oblique_nifti, tmp_path / "ref.mgz"),
        "nrrd": lambda: nifti_to_sitk(oblique_nifti, tmp_path / "ref.nrrd"),
    }[reference_format]()
    like = read_image(source)
    labels = (np.arange(np.prod(like.shape)) % 4).reshape(like.shape).astype(np.uint8)
    out = tmp_path / "out" / "mask.nii.gz"
    assert write_image(labels, like, out) == out
    written = nib.load(str(out))
    assert written.shape == like.shape
    assert np.allclose(written.affine, like.affine, atol=1e-5)
    assert np.allclose(written.affine, nib.load(str(oblique_nifti)).affine, atol=1e-4)
    assert np.allclose(written.get_qform(), like.affine, atol=1e-4)  # readers that prefer the qform agree
    assert int(written.header["qform_code"]) > 0 and int(written.header["sform_code"]) > 0
    data = np.asanyarray(written.dataobj)
    assert data.dtype == np.uint8 and np.array_equal(data, labels)
    assert _files(out.parent) == ["mask.nii.gz"]


def test_write_image_on_real_references(brats2018_read, bert_read, tmp_path):
    for read, name in [(brats2018_read, "brats.nii.gz"), (bert_read, "bert.nii"), (bert_read, "bert.nii.gz")]:
        out = write_image(read.label, read.reference, tmp_path / name)
        written = nib.load(str(out))
        assert written.shape == read.shape
        assert np.allclose(written.affine, read.affine, atol=1e-5)
        assert np.array_equal(np.asanyarray(written.dataobj), read.label)
    assert _files(tmp_path) == ["bert.nii", "bert.nii.gz", "brats.nii.gz"]


def test_write_image_ignores_reference_intensity_scaling(tmp_path):
    affine = oblique_affine()
    image = nib.Nifti1Image(np.full((6, 5, 4), 100, dtype=np.int16), affine)
    image.header.set_slope_inter(0.5, 10.0)
    nib.save(image, str(tmp_path / "scaled.nii.gz"))
    like = read_image(tmp_path / "scaled.nii.gz")
    assert np.allclose(like.array, 60.0)  # the reference itself is read with its scaling
    labels = np.ones((6, 5, 4), dtype=np.uint8)
    written = nib.load(str(write_image(labels, like, tmp_path / "labels.nii.gz")))
    assert np.array_equal(written.get_fdata(), labels)


def test_write_image_refuses_to_overwrite(oblique_nifti, tmp_path):
    like = read_image(oblique_nifti)
    out = tmp_path / "outputs" / "result.nii.gz"
    first = np.zeros(like.shape, dtype=np.uint8)
    write_image(first, like, out)
    before = out.read_bytes()
    with pytest.raises(OutputExistsError) as excinfo:
        write_image(first + 1, like, out)
    assert isinstance(excinfo.value, SegLensError)
    assert_names(excinfo, out, "exists", "overwrite")
    assert out.read_bytes() == before
    write_image(first + 2, like, out, overwrite=True)
    assert np.all(np.asanyarray(nib.load(str(out)).dataobj) == 2)
    assert _files(out.parent) == ["result.nii.gz"]


def test_write_image_leaves_no_temp_file_when_saving_fails(oblique_nifti, tmp_path, monkeypatch):
    like = read_image(oblique_nifti)
    out = tmp_path / "outputs" / "result.nii.gz"

    def broken_save(image, filename):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(nib, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        write_image(np.zeros(like.shape, dtype=np.uint8), like, out)
    assert _files(out.parent) == []


def test_write_image_rejects_wrong_shape_and_non_nifti_name(oblique_nifti, tmp_path):
    like = read_image(oblique_nifti)
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    with pytest.raises(ValueError, match="does not match"):
        write_image(np.zeros((4, 4, 4), dtype=np.uint8), like, outputs / "a.nii.gz")
    with pytest.raises(InputFileError) as excinfo:
        write_image(np.zeros(like.shape, dtype=np.uint8), like, outputs / "a.nrrd")
    assert_names(excinfo, outputs / "a.nrrd", "NIfTI")
    assert _files(outputs) == []


def test_written_files_get_normal_permissions(oblique_nifti, tmp_path):
    from SegLensLogic.data.io import atomic_write_text

    mask = os.umask(0o022)
    os.umask(mask)
    expected = 0o666 & ~mask
    out = write_image(np.zeros(read_image(oblique_nifti).shape, np.uint8), read_image(oblique_nifti), tmp_path / "o.nii")
    text = atomic_write_text(tmp_path / "notes.txt", "hello")
    assert (os.stat(out).st_mode & 0o777, os.stat(text).st_mode & 0o777) == (expected, expected)


# ----------------------------------------------------------------------------------------------------------------
# Bad input: the error names the file and the problem
# ----------------------------------------------------------------------------------------------------------------


def test_missing_modality(synthetic_case):
    folder = synthetic_case(modalities=("t1n", "t1c", "t2w"))
    case = find_case(folder)
    assert case.modalities == ("t1n", "t1c", "t2w")
    with pytest.raises(InputFileError) as excinfo:
        read_case(case, modalities=["t1n", "flair"])
    assert_names(excinfo, folder, "t2f", "no")


def test_modalities_of_different_shapes(synthetic_case):
    other, _ = synthetic_arrays((48, 40, 20))
    folder = synthetic_case(replace={"t1c": other["t1c"]})
    with pytest.raises(InputFileError) as excinfo:
        read_case(folder)
    assert_names(excinfo, syn_file(folder, "t1c"), "(48, 40, 20)", "(48, 40, 24)", "grid")


def test_modality_on_a_different_affine(synthetic_case, tmp_path):
    folder = synthetic_case()
    moved = oblique_affine(origin=(40.0, -22.25, -17.75))
    make_nifti(syn_file(folder, "t2w"), raw(syn_file(folder, "t2w")), moved)
    with pytest.raises(InputFileError) as excinfo:
        read_case(folder)
    assert_names(excinfo, syn_file(folder, "t2w"), "different affine")


def test_label_map_on_another_grid(synthetic_case):
    folder = synthetic_case(seg=np.zeros((48, 40, 23), dtype=np.uint8))
    with pytest.raises(InputFileError) as excinfo:
        read_case(folder)
    assert_names(excinfo, syn_file(folder, "seg"), "label map", "grid")


def test_truncated_nifti(synthetic_case):
    path = syn_file(synthetic_case(), "t1n")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputFileError) as excinfo:
        read_case(path.parent)
    assert_names(excinfo, path, "truncated")


def test_truncated_uncompressed_nifti(tmp_path):
    path = make_nifti(tmp_path / "t1.nii", np.ones((20, 20, 20), np.float32), oblique_affine())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputFileError) as excinfo:
        read_image(path)
    assert_names(excinfo, path, "truncated")


@pytest.mark.parametrize("name", ["t1.nii.gz", "t1.nii", "t1.mgz", "t1.nrrd"])
def test_corrupt_file(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(np.random.default_rng(3).bytes(4096))
    with pytest.raises(InputFileError) as excinfo:
        read_image(path)
    assert_names(excinfo, path, "corrupt")


def test_2d_image(tmp_path):
    path = make_nifti(tmp_path / "slice.nii.gz", np.ones((48, 40), np.float32))
    with pytest.raises(InputFileError) as excinfo:
        read_image(path)
    assert_names(excinfo, path, "2D", "3D volume")


def test_4d_image_with_two_volumes(tmp_path):
    path = make_nifti(tmp_path / "series.nii.gz", np.ones((8, 7, 6, 2), np.float32))
    with pytest.raises(InputFileError) as excinfo:
        read_image(path)
    assert_names(excinfo, path, "4D", "(8, 7, 6, 2)", "3D volume")
    # one volume with a time axis is a 3D volume
    single = make_nifti(tmp_path / "single.nii.gz", np.ones((8, 7, 6, 1), np.float32))
    assert read_image(single).shape == (8, 7, 6)


def test_2d_nrrd(tmp_path):
    import SimpleITK as sitk

    path = tmp_path / "slice.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((40, 48), np.float32)), str(path))
    with pytest.raises(InputFileError) as excinfo:
        read_image(path)
    assert_names(excinfo, path, "2D", "3D volume")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_voxels(synthetic_case, bad):
    images, _ = synthetic_arrays()
    t2w = images["t2w"].astype(np.float32)
    t2w[10, 10, 10] = bad
    t2w[11, 10, 10] = bad
    folder = synthetic_case(replace={"t2w": t2w})
    with pytest.raises(InputFileError) as excinfo:
        read_case(folder)
    assert_names(excinfo, syn_file(folder, "t2w"), "2 NaN or Inf")


def test_unknown_label_value_in_2023_seg(synthetic_case):
    _, seg = synthetic_arrays()
    seg[seg == 2] = 7
    folder = synthetic_case(seg=seg)
    with pytest.raises(InputFileError) as excinfo:
        read_case(folder)
    assert_names(excinfo, syn_file(folder, "seg"), "unknown label", "[7]", "brats2023")


def test_label_3_in_2018_named_seg(synthetic_case):
    folder = synthetic_case(naming="brats2018", label_values=(1, 2, 3))
    assert find_case(folder).naming == "brats2018"
    with pytest.raises(InputFileError) as excinfo:
        read_case(folder)
    assert_names(excinfo, syn_file(folder, "seg", "brats2018"), "unknown label", "[3]", "brats2018")
    # the same folder with 2018 labels reads fine
    good = synthetic_case("Brats18_SYN_1", naming="brats2018")
    assert counts(read_case(good).label).keys() == {0, 1, 2, 3}


def test_non_integer_labels(synthetic_case):
    _, seg = synthetic_arrays()
    seg = seg.astype(np.float32)
    seg[seg == 2] = 1.5
    folder = synthetic_case(seg=seg)
    with pytest.raises(InputFileError) as excinfo:
        read_case(folder)
    assert_names(excinfo, syn_file(folder, "seg"), "non-integer")


def test_negative_labels():
    with pytest.raises(InputFileError) as excinfo:
        ASEG.apply(np.array([0, 10, -1]), "aseg.mgz")
    assert_names(excinfo, Path("aseg.mgz"), "negative")


def test_npz_without_the_key(tmp_path):
    images, seg = synthetic_arrays((16, 12, 8))
    t1 = make_nifti(tmp_path / "t1.nii.gz", images["t1n"], oblique_affine())
    np.savez(tmp_path / "labels.npz", vol=images["t1n"], labels=seg)
    with pytest.raises(InputFileError) as excinfo:
        read_case(case_from_mapping({"t1": t1, "seg": "labels.npz:seg"}, base=tmp_path))
    assert_names(excinfo, tmp_path / "labels.npz", "no array 'seg'", "labels")
    read = read_case(case_from_mapping({"t1": t1, "seg": "labels.npz:labels"}, base=tmp_path))
    assert np.array_equal(read.label, seg)


def test_folder_with_no_recognised_images(tmp_path):
    folder = tmp_path / "patient-7"
    folder.mkdir()
    (folder / "notes.txt").write_text("not an image")
    make_nifti(folder / "scan_0001.nii.gz", np.ones((4, 4, 4), np.float32))
    with pytest.raises(InputFileError) as excinfo:
        find_case(folder)
    assert_names(excinfo, folder, "no case found", "scan_0001.nii.gz")
    with pytest.raises(InputFileError):
        read_case(folder)
    with pytest.raises(InputFileError) as excinfo:
        load_cohort(tmp_path)  # a folder whose only sub-folder holds no case
    assert_names(excinfo, tmp_path, "no case folders")


def test_missing_folder_and_file(tmp_path):
    missing = tmp_path / "no-such-case"
    with pytest.raises(InputFileError) as excinfo:
        find_case(missing)
    assert_names(excinfo, missing, "not found")
    with pytest.raises(InputFileError) as excinfo:
        read_case(missing)
    assert_names(excinfo, missing, "not found")
    with pytest.raises(InputFileError) as excinfo:
        read_image(missing / "t1.nii.gz")
    assert_names(excinfo, missing / "t1.nii.gz", "not found")
    with pytest.raises(InputFileError) as excinfo:
        read_image(tmp_path / "t1.png")
    assert_names(excinfo, tmp_path / "t1.png", "unsupported")


def test_standard_freesurfer_mri_folder(tmp_path):
    folder = tmp_path / "mri"
    for name in ("orig", "T1", "norm", "brainmask", "aseg", "aparc+aseg"):
        folder.mkdir(exist_ok=True)
        nib.save(nib.MGHImage(np.ones((8, 8, 8), np.uint8), lia_affine((8, 8, 8))), str(folder / f"{name}.mgz"))
    case = find_case(folder)
    assert case.naming == "freesurfer"
    assert case.images["t1n"].name == "norm.mgz"
    assert Path(case.label).name == "aseg.mgz" and case.brain_mask.name == "brainmask.mgz"


def test_crop_to_brain_maps_only_the_brain_window_and_back(brats2018_read):
    """A model that crops to the brain sees the brain's bounding box (plus margin) at its size; maps come back
    on the whole slice, exactly where they were, and zero outside the window."""
    from SegLensLogic.data.preprocessing import BRAIN_MARGIN, brain_window

    whole = prepare_case(brats2018_read, MODALITIES, size=192)
    cropped = prepare_case(brats2018_read, MODALITIES, size=192, crop_to_brain=True)
    x0, x1, y0, y1 = cropped.geometry.window
    brain = cropped.brain_mask.any(axis=2)
    xs, ys = np.flatnonzero(brain.any(axis=1)), np.flatnonzero(brain.any(axis=0))
    assert (x0, x1, y0, y1) == (xs[0] - BRAIN_MARGIN, xs[-1] + 1 + BRAIN_MARGIN, ys[0] - BRAIN_MARGIN, ys[-1] + 1 + BRAIN_MARGIN)
    assert whole.geometry.crop is None and cropped.geometry.window == brain_window(cropped.brain_mask)
    # more model pixels on the brain than the uncropped mapping at the same size
    slices = cropped.brain_slices()[60:62]
    brain_pixels = lambda p: int((p.model_input(slices)[:, 0] != 0).sum())  # noqa: E731
    assert brain_pixels(cropped) > 1.3 * brain_pixels(whole)
    # the label map goes there and back exactly at the window's own side (nearest), and is zero outside
    label = torch.from_numpy(cropped.label[:, :, slices].transpose(2, 0, 1)[:, None].astype(np.float32))
    exact = SliceGeometry(in_plane=cropped.geometry.in_plane, size=cropped.geometry.square, crop=cropped.geometry.crop)
    back = exact.from_model(exact.to_model(label, mode="nearest"), mode="nearest")
    assert torch.equal(back, label)
    outside = torch.ones_like(label, dtype=torch.bool)
    outside[:, :, x0:x1, y0:y1] = False
    assert back[outside].abs().sum() == 0
    heat = cropped.geometry.from_model(torch.ones(2, 1, 192, 192))
    assert heat.shape == (2, 1, 240, 240) and heat[outside].sum() == 0 and heat[~outside].min() >= 0


def test_missing_modalities_are_refused_or_filled_with_zeros(brats2013_case):
    """BraTS 2013 cases have T1c and FLAIR only: a four-input model refuses them unless it tolerates missing
    sequences, and then the missing channels are 0 (the brain mean after z-scoring)."""
    with pytest.raises(InputFileError, match="has no t1n, t2w image"):
        read_case(brats2013_case, modalities=MODALITIES)
    read = read_case(brats2013_case, modalities=MODALITIES, allow_missing=True)
    assert set(read.images) == {"t1c", "t2f"}
    prepared = prepare_case(read, MODALITIES, size=64)
    assert prepared.missing_modalities == ("t1n", "t2w")
    assert prepared.images.shape[0] == 4
    assert not prepared.images[0].any() and not prepared.images[2].any()
    assert prepared.images[1][prepared.brain_mask].std() == pytest.approx(1.0, abs=1e-3)
    with pytest.raises(InputFileError, match="has no"):
        read_case(brats2013_case, modalities=["t1n", "t2w"], allow_missing=True)
