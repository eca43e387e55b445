"""docs/architecture.md as rules on the code: the one direction of imports between the packages,
no import cycle, ray only in stages/, evaluation libraries only in evaluation/, no private name
imported from another module, no module over 600 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "pipeline"
# Layer of each part of the package: a module may import its own layer or a lower one only.
LAYERS = {
    "config": 0,
    "records": 0,
    "io": 1,
    "encoders": 1,
    "demo": 1,
    "core": 2,
    "api": 3,
    "stages": 3,
    "service": 3,
    "verify": 3,
    "evaluation": 4,
    "bench": 4,
    "cli": 5,
    "__main__": 5,
    "__init__": 0,
}
EVALUATION_LIBRARIES = {"matplotlib", "diffusers", "librosa", "tqdm", "scipy", "pedalboard", "noisereduce"}
MAX_LINES = 600


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


MODULES = _modules()


def _imports(path: Path, top_level_only: bool = False) -> list[tuple[str, list[str], int]]:
    """(imported module, names, line) for every import in the file (only module-level ones when
    `top_level_only`: those are what a cycle is made of)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = []
    for node in nodes:
        if isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, [alias.name for alias in node.names], node.lineno))
    return found


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _layer(module: str) -> int:
    return LAYERS[_part(module)]


def test_every_part_of_the_package_has_a_layer() -> None:
    assert {_part(m) for m in MODULES} <= set(LAYERS), {_part(m) for m in MODULES} - set(LAYERS)


def test_imports_point_one_way() -> None:
    wrong = []
    for module, path in MODULES.items():
        for imported, names, line in _imports(path):
            targets = [imported] + [f"{imported}.{n}" for n in names]
            for target in targets:
                if target in MODULES and target != "pipeline" and _layer(target) > _layer(module):
                    wrong.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert not wrong, "imports against the layer order (docs/architecture.md):\n" + "\n".join(wrong)


def test_no_import_cycle() -> None:
    graph = {m: set() for m in MODULES}
    for module, path in MODULES.items():
        for imported, names, _ in _imports(path, top_level_only=True):
            for target in (imported, *(f"{imported}.{n}" for n in names)):
                if target in MODULES and target != module:
                    graph[module].add(target)
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join([*trail[trail.index(nxt) :], nxt]))
            if nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


@pytest.mark.parametrize(
    ("libraries", "allowed"),
    [({"ray"}, ("stages", "service")), (EVALUATION_LIBRARIES, ("evaluation",))],
    ids=["ray", "evaluation-libraries"],
)
def test_heavy_libraries_stay_in_their_package(libraries: set[str], allowed: tuple[str, ...]) -> None:
    wrong = [
        f"{path.relative_to(ROOT)}:{line} imports {imported}"
        for module, path in MODULES.items()
        for imported, _, line in _imports(path)
        if imported.split(".")[0] in libraries and _part(module) not in allowed
    ]
    assert not wrong, "\n".join(wrong)


def test_no_private_name_is_imported_from_another_module() -> None:
    wrong = [
        f"{path.relative_to(ROOT)}:{line} imports {name} from {imported}"
        for path in MODULES.values()
        for imported, names, line in _imports(path)
        if imported.startswith("pipeline")
        for name in names
        if name.startswith("_") and not name.startswith("__")
    ]
    assert not wrong, "\n".join(wrong)


def test_no_module_is_over_600_lines() -> None:
    long = {str(p.relative_to(ROOT)): n for p in MODULES.values() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long
