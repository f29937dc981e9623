"""The package layout is a contract: stages import only from lower layers, no private name crosses a
module boundary, and no two modules import each other (directly or round a longer cycle)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "cytofuse"

# Lower layers never import higher ones; a package may import itself and anything below.
LAYERS = (
    {"<root>", "errors", "runtime", "runs", "plots"},  # infrastructure: no pipeline knowledge
    {"io", "models"},  # readers and image sets; networks
    {"preprocess"},  # patches, filters, labels from a channel
    {"training"},  # the patch cache and one fit
    {"config"},  # the typed run configuration, built on the stages' settings
    {"inference", "synthetic"},  # model folders and prediction; synthetic data
    {"evaluation", "export", "bioimageio"},  # metrics, plots, baseline, explanations, report; export formats
    {"workflows"},  # cross-validation, final model, demo
    {"cli", "api", "napari"},  # the command, the Python entry points and the napari plugin
)
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _area(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "<root>"


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, child.end_lineno + 1))
    return lines


def imports() -> list[tuple[str, str, list[str], int]]:
    """(importing module, imported cytofuse module, names, line) for every run-time import in the package."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        hidden = _type_checking_lines(tree)
        module = _module_name(path)
        for node in ast.walk(tree):
            if getattr(node, "lineno", None) in hidden:
                continue
            if isinstance(node, ast.ImportFrom) and node.level:
                found.append((module, "relative", [], node.lineno))
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "cytofuse":
                found.append((module, node.module, [a.name for a in node.names], node.lineno))
            elif isinstance(node, ast.Import):
                found += [(module, a.name, [], node.lineno) for a in node.names if a.name.split(".")[0] == "cytofuse"]
    return found


def test_every_area_has_a_layer():
    areas = {_area(_module_name(p)) for p in PACKAGE.rglob("*.py")}
    assert areas - set(LAYER) == set(), "a new package or top-level module needs a place in LAYERS"


def test_imports_are_absolute_and_go_down_the_layers():
    wrong = []
    for module, target, _, line in imports():
        if target == "relative":
            wrong.append(f"{module}:{line} uses a relative import")
            continue
        src, dst = _area(module), _area(target)
        if src != dst and LAYER[dst] > LAYER[src]:
            wrong.append(f"{module}:{line} imports {target} from a higher layer ({dst} above {src})")
    assert wrong == []


def test_no_private_name_crosses_a_module_boundary():
    wrong = [f"{module}:{line} imports {name} from {target}"
             for module, target, names, line in imports() if target != module
             for name in names if name.startswith("_") and not name.startswith("__")]
    assert wrong == []


def test_no_import_cycle_between_modules():
    graph: dict[str, set[str]] = {}
    modules = {_module_name(p) for p in PACKAGE.rglob("*.py")}
    for module, target, names, _ in imports():
        # "from cytofuse.models import x" may name a submodule; an import of a package is an import of its __init__
        targets = {f"{target}.{n}" for n in names if f"{target}.{n}" in modules} or {target}
        graph.setdefault(module, set()).update(t for t in targets if t in modules and t != module)
    cycle = _find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_cycle_finder_finds_cycles():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


@pytest.mark.parametrize("area", sorted(LAYER))
def test_layers_name_real_areas(area):
    assert area == "<root>" or (PACKAGE / area).is_dir() or (PACKAGE / f"{area}.py").is_file()
