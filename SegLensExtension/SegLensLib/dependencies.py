"""First-use installation of what the SegLens panel needs inside Slicer: PyTorch, then the panel's requirements.

Nothing is installed at import time: the module calls :func:`ensure_dependencies` when the user first presses a
button that needs a model. PyTorch comes from the SlicerPyTorch extension's installer (it picks the CUDA build that
matches the NVIDIA driver); the other requirements (``Resources/requirements.txt``: only the packages the panel's
code path imports, not everything ``seglens`` needs for training, reports or the demo) are pip-installed, only those
missing, after the user agreed.

Whether the package index can be reached is pip's business: SegLens does not probe the network (a proxy, a private
index or a pip configuration would defeat any probe). When pip fails, the message names the packages and the
command to install them by hand. When a package that was already imported gets a new version, the caller is told
that Slicer must restart (:attr:`DependencyStatus.restart_needed`).

``SegLensLogic`` itself is found beside the module: in a source checkout it is the repository root next to
``SegLensExtension/`` (put on ``sys.path`` by :func:`add_source_to_path` when the module loads); in a built
extension it is installed next to the module.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

MODULE_DIR = Path(__file__).resolve().parents[1]
REQUIREMENTS = MODULE_DIR / "Resources" / "requirements.txt"
TORCH_REQUIREMENT = ">=2.1"


class DependencyError(Exception):
    """A dependency is missing and was not (or could not be) installed; the message says what to do."""


@dataclass
class DependencyStatus:
    """What :func:`ensure_dependencies` found or did.

    Where models run (:func:`device_description`) needs PyTorch imported, which takes seconds: the Segment job
    asks for it on the worker thread, never here.

    Attributes:
        installed: requirement strings installed just now.
        restart_needed: installed requirements whose package was already imported in this Slicer session: the new
            version is used only after a restart.
    """

    installed: list[str] = field(default_factory=list)
    restart_needed: list[str] = field(default_factory=list)


def read_requirements(path: str | Path | None = None) -> list[str]:
    """Requirement lines of a requirements file (default ``Resources/requirements.txt``), without comments and blank
    lines."""
    lines = Path(path or REQUIREMENTS).read_text(encoding="utf-8").splitlines()
    return [line.split("#", 1)[0].strip() for line in lines if line.split("#", 1)[0].strip()]


def source_root(module_dir: Path = MODULE_DIR) -> Path | None:
    """The repository root when the module runs from a source checkout (it holds ``SegLensLogic/``), else None."""
    root = module_dir.parent
    return root if (root / "SegLensLogic" / "__init__.py").is_file() else None


def add_source_to_path(module_dir: Path = MODULE_DIR) -> Path | None:
    """Make ``import SegLensLogic`` find the checkout's package (no-op when it is importable already).

    Cheap (no import of SegLensLogic): the module calls it when Slicer loads it, so that the Python console can use
    ``SegLensLogic`` before any button is pressed.
    """
    if importlib.util.find_spec("SegLensLogic") is not None:
        return None
    root = source_root(module_dir)
    if root is not None and str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return root


def _requirement_class():
    try:
        from packaging.requirements import Requirement
    except ImportError:  # pip vendors packaging; Slicer ships both, a bare environment may not
        from pip._vendor.packaging.requirements import Requirement
    return Requirement


def missing_requirements(requirements: list[str]) -> list[str]:
    """The requirements that are not installed or whose installed version does not satisfy them."""
    from importlib.metadata import PackageNotFoundError, version

    Requirement = _requirement_class()
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


def top_level_modules(requirement: str) -> set[str]:
    """Import names a requirement's distribution provides (``scikit-learn`` -> ``{"sklearn"}``)."""
    from importlib.metadata import packages_distributions

    name = _requirement_class()(requirement).name
    canonical = name.lower().replace("-", "_").replace(".", "_")
    found = {module for module, dists in packages_distributions().items()
             if any(d.lower().replace("-", "_").replace(".", "_") == canonical for d in dists)}  # fmt: skip
    return found or {canonical}


def hand_install_message(what: list[str], reason: str) -> str:
    """What to do when pip could not install ``what`` (offline, a proxy, a private index ...)."""
    quoted = " ".join(f"'{r}'" for r in what)
    return (
        f"SegLens could not install {', '.join(what)}: {reason}. If this computer cannot reach the Python package "
        "index (offline, or behind a proxy or a private index that pip is not set up for), install them by hand in "
        f"Slicer's Python, e.g. PythonSlicer -m pip install {quoted} (add --index-url or --proxy as your site needs, "
        "or give wheel files), then restart Slicer."
    )


def torch_installed() -> bool:
    return importlib.util.find_spec("torch") is not None


def ensure_torch(confirm: Callable[[str], bool]) -> bool:
    """PyTorch is installed (not imported: importing it takes seconds, and the worker does it), installing it with
    SlicerPyTorch's installer first if the user agrees. Returns True when it was installed just now.

    Args:
        confirm: asks the user (``slicer.util.confirmOkCancelDisplay``); False cancels.

    Raises:
        DependencyError: the PyTorch extension is missing, the user declined, or the installer failed.
    """
    if torch_installed():
        return False
    try:
        import PyTorchUtils
    except ImportError:
        raise DependencyError(
            "SegLens needs PyTorch. Install the 'PyTorch' extension (SlicerPyTorch) from the Extensions Manager, "
            "restart Slicer, and press the button again."
        ) from None
    if not confirm(
        "SegLens needs PyTorch, which is not installed yet. Install it now? It is a large download "
        "(up to a few GB with GPU support) and can take several minutes."
    ):
        raise DependencyError("PyTorch is required; installation was cancelled.")
    what = [f"torch{TORCH_REQUIREMENT}"]
    try:
        torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False, torchVersionRequirement=TORCH_REQUIREMENT)
    except Exception as exc:  # pip's failure, whatever its cause
        raise DependencyError(hand_install_message(what, f"{type(exc).__name__}: {exc}")) from None
    if torch is None:
        raise DependencyError(hand_install_message(what, "the PyTorch installer did not finish (see the Python console)"))
    return True


def ensure_requirements(
    confirm: Callable[[str], bool],
    install: Callable[[list[str]], None],
    requirements: list[str] | None = None,
) -> tuple[list[str], list[str]]:
    """Install the panel's missing requirements (never torch: see :func:`ensure_torch`).

    Args:
        confirm: asks the user; False cancels.
        install: installs requirement strings (:func:`pip_install` in Slicer); raises when pip fails.
        requirements: defaults to ``Resources/requirements.txt``.

    Returns:
        ``(installed, restart_needed)``: what was installed, and which of those were already imported.

    Raises:
        DependencyError: declined, pip failed (the message says how to install by hand), or still missing.
    """
    add_source_to_path()
    missing = missing_requirements(read_requirements() if requirements is None else requirements)
    restart = []
    if missing:
        if not confirm("SegLens needs these Python packages in Slicer: " + ", ".join(missing) + ". Install them now?"):
            raise DependencyError("SegLens cannot run without " + ", ".join(missing) + "; installation was cancelled.")
        imported = [r for r in missing if top_level_modules(r) & set(sys.modules)]
        try:
            install(missing)
        except Exception as exc:  # pip decides whether the index is reachable; its failure is reported here
            raise DependencyError(hand_install_message(missing, f"pip failed ({type(exc).__name__}: {exc})")) from None
        importlib.invalidate_caches()
        still = missing_requirements(missing)
        if still:
            raise DependencyError(hand_install_message(still, "pip finished but did not provide them"))
        restart = imported
    if importlib.util.find_spec("SegLensLogic") is None:
        raise DependencyError(
            "the SegLensLogic package was not found beside the module; install the SegLens extension again "
            "or add the repository's SegLensExtension folder (in a full checkout) to Slicer's module paths."
        )
    return missing, restart


def pip_install(requirements: list[str]) -> None:
    """Install requirement strings into Slicer's Python (main thread only: Slicer's installer uses Qt)."""
    import shlex

    import slicer

    slicer.util.pip_install(" ".join(shlex.quote(r) for r in requirements))


def ensure_dependencies(confirm: Callable[[str], bool], install: Callable[[list[str]], None] = pip_install,
                        requirements: list[str] | None = None) -> DependencyStatus:
    """PyTorch, then the panel's requirements; see :class:`DependencyStatus`."""
    ensure_torch(confirm)
    installed, restart = ensure_requirements(confirm, install, requirements)
    return DependencyStatus(installed, restart)


def device_description() -> str:
    """Which device models run on, in words (``GPU: NVIDIA ... (CUDA 12.4)`` or ``CPU (... no CUDA GPU found)``)."""
    import torch

    if torch.cuda.is_available():
        return f"GPU: {torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"
    return f"CPU ({torch.get_num_threads()} threads; no CUDA GPU found)"
