"""Package names imported on first use (PEP 562), so that the command line's help imports no torch or SciPy."""

from __future__ import annotations

from importlib import import_module
from typing import Callable


def lazy_exports(package: str, namespace: dict, exports: dict[str, str]) -> tuple[Callable, Callable]:
    """``(__getattr__, __dir__)`` for ``package`` whose ``exports`` maps each public name to its submodule; a name
    is imported from its submodule on first access and kept in the package's ``namespace``."""

    def __getattr__(name: str):
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        loaded = import_module(f".{module}", package)
        # Bind every name this submodule exports: importing it set the package attribute of its own name to the
        # submodule (e.g. ``label_mass``), which would otherwise hide a function of that name for good.
        for other, source in exports.items():
            if source == module:
                namespace[other] = getattr(loaded, other)
        return namespace[name]

    def __dir__() -> list[str]:
        return sorted({*namespace, *exports})

    return __getattr__, __dir__
