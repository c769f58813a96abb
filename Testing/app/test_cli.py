"""Tests of the ``seglens`` command line: help, segment (real BraTS 2018 / 2023-named / 2013 cases, NRRD input),
evaluate, hooks, train-segmenter, and the one-line errors users get for bad input.

Commands run in-process (``SegLensLogic.app.cli.main``) with captured output, which is what ``seglens`` runs; two
subprocess runs check the real entry point (``python -m SegLensLogic.app.cli``) end to end. Models are tiny,
randomly initialised U-Nets at 64x64: the point is the plumbing (grids, files, errors), not accuracy.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers import assert_one_line_error, nifti_to_sitk, save_tiny_unet, seglens, synthetic_arrays, write_synthetic_case
from SegLensLogic.data.io import read_image

ALL_MODALITIES = ["t1n", "t1c", "t2w", "t2f"]
SMALL = (32, 32, 8)
SUBCOMMANDS = ("segment", "evaluate", "train-segmenter", "hooks", "demo")
ABM = "Brats18_CBICA_ABM_1"


pytestmark = pytest.mark.usefixtures("one_torch_thread")



@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Tiny random U-Net folders: 'all' (t1n,t1c,t2w,t2f), 't1c_t2f' and 't1n_t1c'."""
    root = tmp_path_factory.mktemp("models")
    return {
        "all": save_tiny_unet(root / "unet-all", ALL_MODALITIES),
        "t1c_t2f": save_tiny_unet(root / "unet-t1c-t2f", ["t1c", "t2f"]),
        "t1n_t1c": save_tiny_unet(root / "unet-t1n-t1c", ["t1n", "t1c"]),
    }


@pytest.fixture(scope="module")
def abm_case(brats2018_dir) -> Path:
    path = brats2018_dir / ABM
    if not path.is_dir():
        pytest.skip(f"real case {path} not found")
    return path






def assert_mask_on_grid(mask: Path, reference: Path) -> np.ndarray:
    """The mask has the reference NIfTI's exact grid (shape, affine, zooms), uint8 labels in 0..3."""
    out, ref = nib.load(str(mask)), nib.load(str(reference))
    assert out.shape == ref.shape
    np.testing.assert_allclose(out.affine, ref.affine, atol=1e-6)
    assert out.header.get_zooms() == ref.header.get_zooms()
    assert out.get_data_dtype() == np.uint8
    data = np.asanyarray(out.dataobj)
    assert data.dtype == np.uint8
    assert set(np.unique(data).tolist()) <= {0, 1, 2, 3}
    return data


def file_state(path: Path) -> tuple[bytes, int]:
    return path.read_bytes(), path.stat().st_mtime_ns


# ---------------------------------------------------------------------------------------------------------------
# Help
# ---------------------------------------------------------------------------------------------------------------


def test_help_entry_point(tmp_path):
    """The real entry point prints help and exits 0."""
    result = subprocess.run(
        [sys.executable, "-m", "SegLensLogic.app.cli", "--help"], capture_output=True, text=True, cwd=tmp_path, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert "usage: seglens" in result.stdout
    for command in SUBCOMMANDS:
        assert command in result.stdout


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_help_subcommand(capsys, command):
    code, out, err = seglens(capsys, command, "--help")
    assert code == 0, err
    assert out.startswith(f"usage: seglens {command}")
    assert "Traceback" not in err


def test_version(capsys):
    code, out, _ = seglens(capsys, "--version")
    assert code == 0
    assert out.startswith("seglens ")


def test_no_command_is_a_usage_error(capsys):
    code, _, err = seglens(capsys)
    assert code == 2
    assert "usage: seglens" in err


# ---------------------------------------------------------------------------------------------------------------
# segment on real cases
# ---------------------------------------------------------------------------------------------------------------


def test_segment_brats2018_case(capsys, tmp_path, models, abm_case):
    out = tmp_path / "mask.nii.gz"
    code, stdout, err = seglens(capsys, "segment", "--model", models["all"], "--case", abm_case, "--out", out)
    assert code == 0, err
    assert f"Wrote {out}" in stdout
    assert "Voxels per class: necrotic core" in stdout
    # The reference grid is the model's first modality, t1n (the _t1 file); every modality shares it.
    data = assert_mask_on_grid(out, abm_case / f"{ABM}_t1.nii.gz")
    assert data.shape == (240, 240, 155)
    before = file_state(out)

    code, stdout, err = seglens(capsys, "segment", "--model", models["all"], "--case", abm_case, "--out", out)
    assert_one_line_error(code, err, out, "already exists")
    assert file_state(out) == before

    code, stdout, err = seglens(capsys, "segment", "--model", models["all"], "--case", abm_case, "--out", out, "--overwrite")
    assert code == 0, err
    again = assert_mask_on_grid(out, abm_case / f"{ABM}_t1.nii.gz")
    np.testing.assert_array_equal(again, data)  # same model, same case: same mask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mask.nii.gz"]  # no temporary files left behind


def test_segment_brats2023_named_case(capsys, tmp_path, models, brats2023_case):
    out = tmp_path / "sub" / "mask.nii.gz"  # the output folder is created
    code, _, err = seglens(capsys, "segment", "--model", models["all"], "--case", brats2023_case, "--out", out)
    assert code == 0, err
    reference = next(brats2023_case.glob("*-t1n.nii.gz"))
    assert_mask_on_grid(out, reference)


def test_segment_brats2013_case_two_channels(capsys, tmp_path, models, brats2013_case):
    out = tmp_path / "mask.nii.gz"
    code, _, err = seglens(capsys, "segment", "--model", models["t1c_t2f"], "--case", brats2013_case, "--out", out)
    assert code == 0, err
    assert_mask_on_grid(out, brats2013_case / "T1c_subtrMeanDivStd.nii.gz")
    # The 4-modality model cannot run on it: the case has no t1n / t2w.
    code, _, err = seglens(capsys, "segment", "--model", models["all"], "--case", brats2013_case, "--out", tmp_path / "x.nii.gz")
    assert_one_line_error(code, err, brats2013_case, "t1n")
    assert not (tmp_path / "x.nii.gz").exists()


def test_segment_explicit_nrrd_images(capsys, tmp_path, models, abm_case):
    t1n = nifti_to_sitk(abm_case / f"{ABM}_t1.nii.gz", tmp_path / "native.nrrd")
    t1c = nifti_to_sitk(abm_case / f"{ABM}_t1ce.nii.gz", tmp_path / "post.nrrd")
    out = tmp_path / "mask.nii.gz"
    code, stdout, err = seglens(
        capsys, "segment", "--model", models["t1n_t1c"], "--image", f"t1n={t1n}", "--image", f"T1ce={t1c}", "--out", out
    )
    assert code == 0, err
    reference = read_image(t1n)
    mask = nib.load(str(out))
    assert mask.shape == reference.shape
    np.testing.assert_allclose(mask.affine, reference.affine, atol=1e-6)
    assert np.allclose(mask.header.get_zooms(), reference.spacing)
    assert mask.get_data_dtype() == np.uint8
    assert set(np.unique(np.asanyarray(mask.dataobj)).tolist()) <= {0, 1, 2, 3}
    # The NRRD copy is on the same grid as the original NIfTI (SimpleITK's LPS converted back to RAS).
    np.testing.assert_allclose(reference.affine, nib.load(str(abm_case / f"{ABM}_t1.nii.gz")).affine, atol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# evaluate, hooks
# ---------------------------------------------------------------------------------------------------------------


def test_evaluate_real_cohort(capsys, tmp_path, models, brats2018_dir):
    names = [ABM, "Brats18_CBICA_ALU_1"]
    cohort = tmp_path / "cohort"
    cohort.mkdir()
    for name in names:
        if not (brats2018_dir / name).is_dir():
            pytest.skip(f"real case {brats2018_dir / name} not found")
        (cohort / name).symlink_to(brats2018_dir / name, target_is_directory=True)
    out_csv = tmp_path / "scores.csv"
    code, stdout, err = seglens(capsys, "evaluate", "--model", models["all"], "--cohort", cohort, "--csv", out_csv)
    assert code == 0, err
    table = [line for line in stdout.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| case | dice_NC | dice_ED | dice_ET |")
    assert [line.split("|")[1].strip() for line in table[1:]] == [*names, "mean"]

    with open(out_csv, newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0][:6] == ["case", "dice_NC", "dice_ED", "dice_ET", "dice_WT", "dice_TC"]
    assert [r[0] for r in rows[1:]] == [*names, "mean"]
    values = np.array([[float(v) for v in r[1:]] for r in rows[1:]])
    assert ((values >= 0) & (values <= 1)).all()
    np.testing.assert_allclose(values[-1], values[:-1].mean(axis=0), atol=1e-9)

    before = file_state(out_csv)
    code, _, err = seglens(capsys, "evaluate", "--model", models["all"], "--cohort", cohort, "--csv", out_csv)
    assert_one_line_error(code, err, out_csv, "already exists")
    assert file_state(out_csv) == before


def test_hooks(capsys, models):
    code, stdout, err = seglens(capsys, "hooks", "--model", models["all"])
    assert code == 0, err
    lines = stdout.splitlines()
    assert lines[0].startswith("unet: inputs t1n, t1c, t2w, t2f at 64x64")
    default = [line for line in lines if "(default)" in line]
    assert len(default) == 1
    assert default[0].split()[0] == "down_3"
    assert "32 channels x 8x8" in default[0]
    assert [line.split()[0] for line in lines[1:]] == ["conv_0", "down_1", "down_2", "down_3", "down_4", "up_4", "up_3", "up_2", "up_1"]


# ---------------------------------------------------------------------------------------------------------------
# Errors: one line naming the file, exit status 2, no traceback
# ---------------------------------------------------------------------------------------------------------------


def small_case(root: Path, case_id: str = "BraTS-BAD-00001-000", **kwargs) -> Path:
    return write_synthetic_case(root, case_id, shape=SMALL, **kwargs)


def test_synthetic_case_segments(capsys, tmp_path, models):
    """The small synthetic case the error tests break is itself fine."""
    case = small_case(tmp_path)
    out = tmp_path / "mask.nii.gz"
    code, _, err = seglens(capsys, "segment", "--model", models["all"], "--case", case, "--out", out)
    assert code == 0, err
    assert_mask_on_grid(out, case / "BraTS-BAD-00001-000-t1n.nii.gz")


def _missing_modality(tmp_path):
    case = small_case(tmp_path, modalities=("t1n", "t1c", "t2w"))
    return case, [case, "t2f"]


def _different_shapes(tmp_path):
    case = small_case(tmp_path, replace={"t2f": np.full((30, 32, 8), 100, dtype=np.int16)})
    bad = case / "BraTS-BAD-00001-000-t2f.nii.gz"
    return case, [bad, "voxel grid", "(30, 32, 8)"]


def _truncated_nifti(tmp_path):
    case = small_case(tmp_path)
    bad = case / "BraTS-BAD-00001-000-t1c.nii.gz"
    raw = bad.read_bytes()
    bad.write_bytes(raw[: len(raw) // 2])
    return case, [bad, "corrupt or truncated"]


def _nan_voxels(tmp_path):
    array = np.full(SMALL, 50.0, dtype=np.float32)
    array[4:8, 4:8, 2] = np.nan
    case = small_case(tmp_path, replace={"t2w": array})
    return case, [case / "BraTS-BAD-00001-000-t2w.nii.gz", "16 NaN or Inf voxels"]


def _image_2d(tmp_path):
    case = small_case(tmp_path, replace={"t1c": np.ones(SMALL[:2], dtype=np.int16)})
    return case, [case / "BraTS-BAD-00001-000-t1c.nii.gz", "2D image"]


def _image_4d(tmp_path):
    case = small_case(tmp_path, replace={"t1n": np.ones((*SMALL, 2), dtype=np.int16)})
    return case, [case / "BraTS-BAD-00001-000-t1n.nii.gz", "4D image"]


def _not_a_case(tmp_path):
    folder = tmp_path / "holiday-photos"
    folder.mkdir()
    (folder / "beach.jpg").write_bytes(b"\xff\xd8\xff")
    return folder, [folder, "no case found"]


@pytest.mark.parametrize(
    "breaker",
    [_missing_modality, _different_shapes, _truncated_nifti, _nan_voxels, _image_2d, _image_4d, _not_a_case],
    ids=lambda f: f.__name__.strip("_"),
)
def test_segment_bad_case(capsys, tmp_path, models, breaker):
    case, fragments = breaker(tmp_path)
    out = tmp_path / "mask.nii.gz"
    code, _, err = seglens(capsys, "segment", "--model", models["all"], "--case", case, "--out", out)
    assert_one_line_error(code, err, *fragments)
    assert not out.exists()


def test_segment_bad_explicit_images(capsys, tmp_path, models):
    case = small_case(tmp_path)
    t1n = case / "BraTS-BAD-00001-000-t1n.nii.gz"
    out = tmp_path / "mask.nii.gz"
    # Missing file among the explicit images.
    missing = tmp_path / "nowhere-t1c.nii.gz"
    code, _, err = seglens(
        capsys, "segment", "--model", models["t1n_t1c"], "--image", f"t1n={t1n}", "--image", f"t1c={missing}", "--out", out
    )
    assert_one_line_error(code, err, missing, "not found")
    # Malformed --image and unknown modality names.
    code, _, err = seglens(capsys, "segment", "--model", models["t1n_t1c"], "--image", str(t1n), "--out", out)
    assert_one_line_error(code, err, "MODALITY=FILE")
    code, _, err = seglens(capsys, "segment", "--model", models["t1n_t1c"], "--image", f"pd={t1n}", "--out", out)
    assert_one_line_error(code, err, "unknown modality 'pd'")
    # Neither --case nor --image.
    code, _, err = seglens(capsys, "segment", "--model", models["t1n_t1c"], "--out", out)
    assert_one_line_error(code, err, "--case")
    # An output that is not NIfTI.
    code, _, err = seglens(capsys, "segment", "--model", models["all"], "--case", case, "--out", tmp_path / "mask.nrrd")
    assert_one_line_error(code, err, tmp_path / "mask.nrrd", "NIfTI")
    assert not out.exists() and not (tmp_path / "mask.nrrd").exists()


def test_evaluate_unknown_label_value(capsys, tmp_path, models):
    _, seg = synthetic_arrays(SMALL)
    seg = seg.copy()
    seg[10:12, 10:12, 4] = 7
    cohort = tmp_path / "cohort"
    case = small_case(cohort, seg=seg)
    bad = case / "BraTS-BAD-00001-000-seg.nii.gz"
    out_csv = tmp_path / "scores.csv"
    code, _, err = seglens(capsys, "evaluate", "--model", models["all"], "--cohort", cohort, "--csv", out_csv)
    assert_one_line_error(code, err, bad, "unknown label value(s) [7]")
    assert not out_csv.exists()


def test_evaluate_cohort_without_labels(capsys, tmp_path, models):
    cohort = tmp_path / "cohort"
    small_case(cohort, seg=False)
    code, stdout, err = seglens(capsys, "evaluate", "--model", models["all"], "--cohort", cohort)
    assert_one_line_error(code, err, "no labelled case")
    assert "no label map, skipped" in stdout


def _copy_model(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def _model_without_config(models, tmp_path):
    folder = _copy_model(models["all"], tmp_path / "model")
    (folder / "config.json").unlink()
    return folder, [folder / "config.json", "missing"]


def _model_mismatched_config(models, tmp_path):
    folder = _copy_model(models["all"], tmp_path / "model")
    config = json.loads((folder / "config.json").read_text())
    config["class_names"] = ["background", "tumour"]
    (folder / "config.json").write_text(json.dumps(config))
    return folder, [folder / "model.safetensors", "do not match"]


def _model_other_arch(models, tmp_path):
    folder = _copy_model(models["all"], tmp_path / "model")
    config = json.loads((folder / "config.json").read_text())
    config.update(arch="segformer-b0", hook_point=None, arch_options={})
    (folder / "config.json").write_text(json.dumps(config))
    return folder, [folder / "model.safetensors", "do not match"]


def _model_missing(models, tmp_path):
    return tmp_path / "no-model", [tmp_path / "no-model", "model folder not found"]


MODEL_BREAKERS = [_model_without_config, _model_mismatched_config, _model_other_arch, _model_missing]


@pytest.mark.parametrize("breaker", MODEL_BREAKERS, ids=lambda f: f.__name__.strip("_"))
def test_bad_model_folder(capsys, tmp_path, models, breaker):
    folder, fragments = breaker(models, tmp_path)
    case = small_case(tmp_path)
    for args in (
        ["segment", "--model", folder, "--case", case, "--out", tmp_path / "mask.nii.gz"],
        ["evaluate", "--model", folder, "--cohort", case],
        ["hooks", "--model", folder],
    ):
        code, _, err = seglens(capsys, *args)
        assert_one_line_error(code, err, *fragments)
    assert not (tmp_path / "mask.nii.gz").exists()


def test_bad_model_folder_entry_point(tmp_path, models):
    """Through the real entry point: exit 2, one ``seglens: error:`` line naming the file, no traceback."""
    folder, fragments = _model_mismatched_config(models, tmp_path)
    case = small_case(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "SegLensLogic.app.cli", "segment", "--model", str(folder), "--case", str(case), "--out", "m.nii.gz"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("seglens: error:")]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert str(fragment) in errors[0]
    assert not (tmp_path / "m.nii.gz").exists()


# ---------------------------------------------------------------------------------------------------------------
# train-segmenter
# ---------------------------------------------------------------------------------------------------------------


def test_train_segmenter(capsys, tmp_path):
    from SegLensLogic.data.phantoms import write_phantom_cohort
    from SegLensLogic.networks import load_segmenter

    cohort = write_phantom_cohort(tmp_path / "cohort", 3, shape=(64, 64, 24))
    out = tmp_path / "model"
    args = [
        "train-segmenter", "--cohort", cohort, "--arch", "unet", "--out", out, "--epochs", "1", "--image-size", "64",
        "--unet-features", "8,8,16,32,64,8", "--slices-per-epoch", "32", "--val-cases", "1",
    ]  # fmt: skip
    code, stdout, err = seglens(capsys, *args)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "training_history.json"]
    history = json.loads((out / "training_history.json").read_text())
    assert len(history) == 1 and history[0]["epoch"] == 1
    assert "dice_mean" in history[0]["validation"]
    model = load_segmenter(out, device="cpu")
    assert model.config.arch == "unet"
    assert model.config.modalities == ALL_MODALITIES
    assert model.config.image_size == 64
    assert model.config.arch_options == {"features": [8, 8, 16, 32, 64, 8]}
    assert model.config.training["cohort"] == "cohort"
    assert len(model.config.training["validation_cases"]) == 1
    assert "Best validation:" in stdout

    before = {p.name: file_state(p) for p in out.iterdir()}
    code, _, err = seglens(capsys, *args)
    assert_one_line_error(code, err, out / "model.safetensors", "already exists")
    assert {p.name: file_state(p) for p in out.iterdir()} == before


def test_train_segmenter_bad_cohort(capsys, tmp_path):
    missing = tmp_path / "no-cohort"
    code, _, err = seglens(capsys, "train-segmenter", "--cohort", missing, "--out", tmp_path / "m", "--epochs", "1")
    assert_one_line_error(code, err, missing, "cohort not found")
    assert not (tmp_path / "m").exists()


def test_sigterm_during_a_write_leaves_no_temporary_file(tmp_path, capsys, monkeypatch):
    """SIGTERM arriving while an output is being written ends the command like Ctrl-C: one line, exit 143, the
    half-written temporary file removed, and the default SIGTERM handler back in place."""
    import signal

    import nibabel

    before = signal.getsignal(signal.SIGTERM)
    real_save = nibabel.save

    def save_then_terminated(image, filename, *args, **kwargs):
        real_save(image, filename, *args, **kwargs)
        assert Path(filename).exists()  # the temporary file is there ...
        signal.raise_signal(signal.SIGTERM)  # ... when the signal arrives

    monkeypatch.setattr(nibabel, "save", save_then_terminated)
    out = tmp_path / "cohort"
    code, _, err = seglens(capsys, "phantoms", "--population", "adult", "--n", "1", "--shape", "32,32,16", "--out", out)
    assert code == 143 and err.strip() == "seglens: terminated"
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".") or p.name.endswith(".tmp")]
    assert signal.getsignal(signal.SIGTERM) is before


def test_unexpected_errors_and_memory_errors_are_one_line(tmp_path, capsys, monkeypatch):
    import SegLensLogic.app.data_commands as data_commands

    def boom(args):
        raise RuntimeError("something inside\nspanning lines")

    def huge(args):
        raise MemoryError

    for failing, fragment in ((boom, "unexpected RuntimeError: something inside; spanning lines"), (huge, "out of memory")):
        monkeypatch.setattr(data_commands, "cmd_phantoms", failing)
        code, _, err = seglens(capsys, "phantoms", "--out", tmp_path / "x")
        assert_one_line_error(code, err, fragment)


def test_segment_model_names_a_shipped_bundle(tmp_path, monkeypatch):
    """``--model`` takes a shipped bundle by its folder name (the SegFormer or the U-Net in ``Resources/``); a
    folder of that name in the working directory is still a folder, and an unknown name is left to the loader."""
    from SegLensLogic.app.cli import model_folder
    from SegLensLogic.resources import reference_bundle_path

    shipped = reference_bundle_path()
    resources = tmp_path / "resources"
    resources.mkdir()
    (resources / "adult-glioma-unet").symlink_to(shipped, target_is_directory=True)
    monkeypatch.setenv("SEGLENS_RESOURCES", str(resources))
    monkeypatch.chdir(tmp_path)
    assert model_folder("adult-glioma-unet") == resources / "adult-glioma-unet" / "model"
    assert model_folder("no-such-bundle") == Path("no-such-bundle")
    (tmp_path / "adult-glioma-unet").mkdir()
    assert model_folder("adult-glioma-unet") == Path("adult-glioma-unet")
