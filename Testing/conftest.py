"""Shared fixtures: the real MRI cases beside the repository and small synthetic cases written on the fly.

The real cases live in ``../shared/data`` relative to the repository root (set ``SEGLENS_DATA`` to use another
place); tests that need them are skipped, with the reason, when they are absent.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers import (  # noqa: F401  (re-exported for tests: ``from conftest import make_nifti`` also works)
    MODALITIES_2023,
    SYNTHETIC_SHAPE,
    lia_affine,
    lps_affine,
    make_nifti,
    oblique_affine,
    synthetic_arrays,
    write_synthetic_case,
)

def pytest_configure(config):
    """Under pytest-xdist (the default: two workers) every worker, and every process its tests start, runs PyTorch
    on one thread: two single-threaded workers keep two cores busy, where two-thread workers would spin-wait on
    each other's OpenMP threads."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"
        import torch

        torch.set_num_threads(1)


REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data"


def shared_data_path() -> Path:
    """Where the real cases are: ``$SEGLENS_DATA`` or ``../shared/data`` beside the repository."""
    env = os.environ.get("SEGLENS_DATA")
    return Path(env).expanduser().resolve() if env else DEFAULT_DATA


def _skip_missing(path: Path) -> None:
    pytest.skip(f"real BraTS cases not found at {path}: set SEGLENS_DATA or place ../shared/data beside the repo")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Folder of the real MRI cases (see its README.md); skips the test when it is absent."""
    path = shared_data_path()
    if not path.is_dir():
        _skip_missing(path)
    return path


def _sub(shared: Path, relative: str) -> Path:
    path = shared / relative
    if not path.exists():
        _skip_missing(path)
    return path


def _first_case(family: Path) -> Path:
    cases = sorted(p for p in family.iterdir() if p.is_dir())
    if not cases:
        _skip_missing(family)
    return cases[0]


@pytest.fixture(scope="session")
def brats2018_dir(shared_data) -> Path:
    """The folder of the 12 BraTS 2018 cases."""
    return _sub(shared_data, "brats2018")


@pytest.fixture(scope="session")
def brats2013_dir(shared_data) -> Path:
    """The folder of the 3 BraTS 2013 (DeepMedic) cases."""
    return _sub(shared_data, "brats2013")


@pytest.fixture(scope="session")
def brats2018_case(brats2018_dir) -> Path:
    """One BraTS 2018 case folder (``_t1 _t1ce _t2 _flair _seg``; the first in name order)."""
    return _first_case(brats2018_dir)


@pytest.fixture(scope="session")
def brats2013_case(brats2013_dir) -> Path:
    """One BraTS 2013 case folder (``T1c_*``, ``Flair_*``, ``OTMultiClass``; the first in name order)."""
    return _first_case(brats2013_dir)


@pytest.fixture(scope="session")
def brats2023_case(shared_data) -> Path:
    """The BraTS 2023-named case folder (``-t1n -t1c -t2w -t2f``, no labels)."""
    return _first_case(_sub(shared_data, "brats2023-naming"))


@pytest.fixture(scope="session")
def bert_case(shared_data) -> Path:
    """FreeSurfer's sample subject: ``norm.mgz``, ``brainmask.mgz``, ``aseg.mgz``."""
    return _sub(shared_data, "healthy/bert")


@pytest.fixture(scope="session")
def voxelmorph_case(shared_data) -> Path:
    """voxelmorph's test scan: ``test_vol.nii.gz`` and ``test_scan.npz`` (arrays ``vol`` and ``seg``)."""
    return _sub(shared_data, "healthy/voxelmorph-test-scan")


@pytest.fixture
def synthetic_case(tmp_path):
    """Factory writing a small synthetic case folder under ``tmp_path`` and returning its Path.

    ``synthetic_case(case_id=..., naming="brats2023" | "brats2018", shape=(48, 40, 24), affine=oblique,
    modalities=("t1n", "t1c", "t2w", "t2f"), seg=True, label_values=None, replace={role: array}, root=None)``.
    See :func:`helpers.write_synthetic_case`. Defaults: 48x40x24 voxels, spacing (1.2, 0.9, 2.5) mm, an oblique
    LPS-like affine, four ``int16`` modalities and a label map with values 0..3, BraTS 2023 names.
    """

    def factory(case_id: str = "BraTS-SYN-00001-000", root: str | Path | None = None, **kwargs) -> Path:
        return write_synthetic_case(tmp_path if root is None else root, case_id, **kwargs)

    return factory


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run a module's tiny models on one intra-op thread (restored afterwards).

    With several test processes sharing two cores, PyTorch's OpenMP threads spin-wait on each other and a tiny
    forward pass gets ~20x slower; one thread is fast whether the machine is busy or not. Modules of tiny models
    use it with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``.
    """
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def real_pipeline(brats2018_dir, tmp_path_factory):
    """A tiny U-Net trained on four real BraTS 2018 cases plus its SAE (see ``pipelines.py``), shared by every
    suite of the session. Its folders on disk must not be modified by tests: copy them first."""
    from pipelines import REAL_TEST_CASES, REAL_TRAIN_CASES, real_pipeline as build

    for name in REAL_TRAIN_CASES + REAL_TEST_CASES:
        if not (brats2018_dir / name).is_dir():
            _skip_missing(brats2018_dir / name)
    return build(brats2018_dir, tmp_path_factory.mktemp("real-pipeline"))


@pytest.fixture(scope="session")
def real_decoder_sae(real_pipeline, tmp_path_factory):
    """An SAE of the real pipeline's model at its decoder level ``up_4`` (see ``pipelines.decoder_sae``): its folder."""
    from pipelines import decoder_sae

    return decoder_sae(real_pipeline, tmp_path_factory.mktemp("decoder-sae"))


@pytest.fixture(scope="session")
def phantom_pipeline(tmp_path_factory):
    """The same tiny pipeline trained on six synthetic phantoms (needs no real data)."""
    from pipelines import phantom_pipeline as build

    return build(tmp_path_factory.mktemp("phantom-pipeline"))
