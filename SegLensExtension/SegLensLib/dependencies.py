"""First-use installation of what SegLens needs inside Slicer: PyTorch, then SegLensLogic's requirements.

Nothing here runs at import time: the module calls :func:`ensure_dependencies` when the user first presses a button
that needs a model. PyTorch comes from the SlicerPyTorch extension's installer (it picks the CUDA build that
matches the NVIDIA driver); the other requirements (``Resources/requirements.txt``, SegLensLogic's dependencies
without torch) are pip-installed, only those missing, after the user agreed. Offline machines get a message that
says what to install and how, instead of a pip traceback.

``SegLensLogic`` itself is found beside the module: in a source checkout it is the repository root next to
``SegLensExtension/`` (added to ``sys.path``); in a built extension it is installed next to the module.
"""

from __future__ import annotations

import importlib
import importlib.util
import socket
import sys
from pathlib import Path
from typing import Callable

MODULE_DIR = Path(__file__).resolve().parents[1]
REQUIREMENTS = MODULE_DIR / "Resources" / "requirements.txt"
TORCH_REQUIREMENT = ">=2.1"
PACKAGE_INDEX_HOST = ("pypi.org", 443)


class DependencyError(Exception):
    """A dependency is missing and was not (or could not be) installed; the message says what to do."""


def read_requirements(path: str | Path = REQUIREMENTS) -> list[str]:
    """Requirement lines of a requirements file, without comments and blank lines."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [line.split("#", 1)[0].strip() for line in lines if line.split("#", 1)[0].strip()]


def source_root(module_dir: Path = MODULE_DIR) -> Path | None:
    """The repository root when the module runs from a source checkout (it holds ``SegLensLogic/``), else None."""
    root = module_dir.parent
    return root if (root / "SegLensLogic" / "__init__.py").is_file() else None


def add_source_to_path(module_dir: Path = MODULE_DIR) -> Path | None:
    """Make ``import SegLensLogic`` find the checkout's package (no-op when it is importable already)."""
    if importlib.util.find_spec("SegLensLogic") is not None:
        return None
    root = source_root(module_dir)
    if root is not None and str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return root


def missing_requirements(requirements: list[str]) -> list[str]:
    """The requirements that are not installed or whose installed version does not satisfy them."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        from packaging.requirements import Requirement
    except ImportError:  # pip vendors packaging; Slicer ships both, a bare environment may not
        from pip._vendor.packaging.requirements import Requirement

    missing = []
    for line in requirements:
        requirement = Requirement(line)
        try:
            installed = version(requirement.name)
        except PackageNotFoundError:
            missing.append(line)
            continue
        if requirement.specifier and not requirement.specifier.contains(installed, prereleases=True):
            missing.append(line)
    return missing


def package_index_reachable(address: tuple[str, int] = PACKAGE_INDEX_HOST, timeout: float = 3.0) -> bool:
    """True when a TCP connection to the package index opens within ``timeout`` seconds."""
    try:
        with socket.create_connection(address, timeout=timeout):
            return True
    except OSError:
        return False


def offline_message(what: list[str]) -> str:
    return (
        "SegLens needs these Python packages, and this computer cannot reach the package index (pypi.org): "
        + ", ".join(what)
        + ". Connect to the internet and try again, or install them in Slicer's Python by hand "
        "(PythonSlicer -m pip install <wheel files>) and restart Slicer."
    )


def torch_installed() -> bool:
    return importlib.util.find_spec("torch") is not None


def ensure_torch(confirm: Callable[[str], bool], online: Callable[[], bool] = package_index_reachable):
    """Import PyTorch, installing it with SlicerPyTorch's installer first if the user agrees.

    Args:
        confirm: asks the user (``slicer.util.confirmOkCancelDisplay``); False cancels.
        online: whether the package index is reachable.

    Raises:
        DependencyError: the PyTorch extension is missing, the machine is offline, or the user declined.
    """
    if torch_installed():
        return importlib.import_module("torch")
    try:
        import PyTorchUtils
    except ImportError:
        raise DependencyError(
            "SegLens needs PyTorch. Install the 'PyTorch' extension (SlicerPyTorch) from the Extensions Manager, "
            "restart Slicer, and press the button again."
        ) from None
    if not online():
        raise DependencyError(offline_message([f"torch{TORCH_REQUIREMENT}"]))
    if not confirm(
        "SegLens needs PyTorch, which is not installed yet. Install it now? It is a large download "
        "(up to a few GB with GPU support) and can take several minutes."
    ):
        raise DependencyError("PyTorch is required; installation was cancelled.")
    torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False, torchVersionRequirement=TORCH_REQUIREMENT)
    if torch is None:
        raise DependencyError("PyTorch could not be installed; see the Python console for the installer's output.")
    return torch


def ensure_requirements(
    confirm: Callable[[str], bool],
    install: Callable[[list[str]], None],
    requirements: list[str] | None = None,
    online: Callable[[], bool] = package_index_reachable,
) -> list[str]:
    """Install SegLensLogic's missing requirements (never torch: see :func:`ensure_torch`); returns what was installed.

    Args:
        confirm: asks the user; False cancels.
        install: installs requirement strings (:func:`pip_install` in Slicer).
        requirements: defaults to ``Resources/requirements.txt``.

    Raises:
        DependencyError: offline, declined, or still missing after installation.
    """
    add_source_to_path()
    missing = missing_requirements(read_requirements() if requirements is None else requirements)
    if missing:
        if not online():
            raise DependencyError(offline_message(missing))
        if not confirm("SegLens needs these Python packages in Slicer: " + ", ".join(missing) + ". Install them now?"):
            raise DependencyError("SegLens cannot run without " + ", ".join(missing) + "; installation was cancelled.")
        install(missing)
        importlib.invalidate_caches()
        still = missing_requirements(missing)
        if still:
            raise DependencyError("installation did not provide " + ", ".join(still) + "; see the Python console.")
    if importlib.util.find_spec("SegLensLogic") is None:
        raise DependencyError(
            "the SegLensLogic package was not found beside the module; install the SegLens extension again "
            "or add the repository's SegLensExtension folder (in a full checkout) to Slicer's module paths."
        )
    return missing


def pip_install(requirements: list[str]) -> None:
    """Install requirement strings into Slicer's Python (main thread only: Slicer's installer uses Qt)."""
    import shlex

    import slicer

    slicer.util.pip_install(" ".join(shlex.quote(r) for r in requirements))


def ensure_dependencies(confirm: Callable[[str], bool], install: Callable[[list[str]], None] = pip_install,
                        online: Callable[[], bool] = package_index_reachable) -> str:
    """PyTorch, then SegLensLogic's requirements; returns :func:`device_description`."""
    ensure_torch(confirm, online=online)
    ensure_requirements(confirm, install, online=online)
    return device_description()


def device_description() -> str:
    """Which device models run on, in words (``GPU: NVIDIA ... (CUDA 12.4)`` or ``CPU (no CUDA GPU found)``)."""
    import torch

    if torch.cuda.is_available():
        return f"GPU: {torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"
    return f"CPU ({torch.get_num_threads()} threads; no CUDA GPU found)"
