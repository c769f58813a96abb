"""The package's layering: each part imports only the parts below it, and no two modules import each other in a circle.

Every ``import`` and ``from ... import`` in ``SegLensLogic`` counts, also those inside functions (a lazy import
still ties the modules together), except those under ``if TYPE_CHECKING:`` (type hints may name any layer).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "SegLensLogic"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """SegLensLogic modules that ``path`` imports (a ``from X import name`` counts as X.name when that is a module)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            node.body = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                root = ".".join(base + ([node.module] if node.module else []))
            else:
                root = node.module or ""
            targets = [f"{root}.{alias.name}" if f"{root}.{alias.name}" in known else root for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    known = set(files)
    return {name: imported_modules(path, known) - {"SegLensLogic"} for name, path in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


# The allowed order, bottom first: a part may import its own modules and those of every part before it. The ground
# floor (errors, storage, lazy exports, console output, where the shipped resources live) is one layer; the orchestration (the command line and every
# command, the demo, the reference build, the report, the resumable pipeline) is the top one, ``app``.
LAYERS = (
    ("errors", "storage", "lazy", "console", "resources"),
    ("data",),
    ("networks",),
    ("segmentation",),
    ("sae",),
    ("interpretation",),
    ("alignment",),
    ("steering",),
    ("bundle",),
    ("experiments",),
    ("reference",),
    ("app",),
)


def part_of(module: str) -> str:
    """The part a module belongs to: its subpackage, or its own name for a module at the package root (the root
    ``__init__`` counts as the ground floor)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "errors"


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """``importer -> imported`` for every import of a higher layer (or of a part that no layer names)."""
    level = {part: index for index, layer in enumerate(LAYERS) for part in layer}
    found = []
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            a, b = part_of(module), part_of(target)
            if a not in level or b not in level or level[b] > level[a]:
                found.append(f"{module} -> {target}")
    return found


def test_each_layer_imports_only_layers_below_it():
    found = upward_imports(import_graph())
    assert found == [], "imports against the layer order (Testing/test_architecture.py LAYERS):\n" + "\n".join(found)


def test_every_part_of_the_package_has_a_layer():
    parts = {part_of(module) for module in import_graph()}
    named = {part for layer in LAYERS for part in layer}
    assert parts <= named, f"parts with no layer in LAYERS: {sorted(parts - named)}"


def test_the_layer_check_sees_an_upward_import():
    graph = {"SegLensLogic.sae.model": {"SegLensLogic.steering.session"}, "SegLensLogic.steering.session": {"SegLensLogic.sae.model"}}
    assert upward_imports(graph) == ["SegLensLogic.sae.model -> SegLensLogic.steering.session"]


def test_no_two_modules_share_a_name():
    """A search for a file name finds one file (``__init__`` aside)."""
    seen: dict[str, list[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        if path.name != "__init__.py":
            seen.setdefault(path.stem, []).append(str(path.relative_to(PACKAGE)))
    assert {name: paths for name, paths in seen.items() if len(paths) > 1} == {}


def test_no_package_imports_the_command_line():
    graph = import_graph()
    importers = sorted(name for name, targets in graph.items() if "SegLensLogic.app.cli" in targets)
    assert importers == [], f"modules importing the CLI: {importers}"


def test_no_import_cycles():
    found = cycles(import_graph())
    assert found == [], "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_the_checker_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


SAE_WEIGHTS = {"W_enc", "b_enc", "W_dec", "b_dec", "norm_scale", "_theta"}  # (".threshold" names other things too)


def sae_weight_reads(path: Path) -> list[str]:
    """``file:line attribute`` for every read of an SAE weight by attribute name in ``path``'s code."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [f"{path.name}:{node.lineno} .{node.attr}" for node in ast.walk(tree) if isinstance(node, ast.Attribute) and node.attr in SAE_WEIGHTS]


def test_only_the_sae_package_reads_sae_weights(tmp_path):
    """Steering, diffing, experiments and the rest use the SAE through its methods (the ``SparseDictionary``
    protocol: codes of chosen latents, the activation change of a code change, latent directions), never its
    weights, so the encoding rule and the normalisation live in one place."""
    outside = [p for p in PACKAGE.rglob("*.py") if "sae" not in p.relative_to(PACKAGE).parts[:1]]
    reads = [read for path in outside for read in sae_weight_reads(path)]
    assert not reads, reads
    # the check sees such a read
    probe = tmp_path / "probe.py"
    probe.write_text("def f(sae):\n    return sae.W_dec[0] / sae.norm_scale\n", encoding="utf-8")
    assert sorted(sae_weight_reads(probe)) == ["probe.py:2 .W_dec", "probe.py:2 .norm_scale"]
