"""The layering of the library, read from the code: every import points down (or within its own
layer), and the packages and modules form no cycle. The layers, top to bottom: stage scripts and
``scripts/``; ``cli/``; ``methods/`` (with its add-ons); ``sets/``; ``pretrained/``; ``evaluation/``;
the bottom modules (networks, augmentation, data, precision, distributed, and the small helpers)."""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

STAGES = ("distill", "evaluate", "buffer", "train_original")
LAYERS = {
    "scripts": 6, **{name: 6 for name in STAGES},
    "cli": 5,
    "methods": 4,
    "sets": 3,
    "pretrained": 2,
    "evaluation": 1,
    **{name: 0 for name in ("networks", "augment", "data", "precision", "distributed", "utils", "progress",
                            "chunked", "storage", "pictures", "tables", "flag_types")},
}


def _units():
    """``{unit: [python files]}``: a unit is a top-level package or module of the library."""
    units = {}
    for name in sorted(os.listdir(ROOT)):
        path = os.path.join(ROOT, name)
        if name.endswith(".py") and os.path.isfile(path):
            units[name[:-3]] = [path]
        elif os.path.isfile(os.path.join(path, "__init__.py")) and name != "tests":
            units[name] = [os.path.join(folder, f) for folder, _, names in os.walk(path)
                           for f in names if f.endswith(".py")]
    return units


def _imports(path):
    """Top-level names of the modules ``path`` imports (absolute imports)."""
    with open(path, encoding="utf-8") as handle:
        tree = ast.parse(handle.read(), path)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def _graph():
    units = _units()
    return {unit: {name for path in paths for name in _imports(path) if name in units and name != unit}
            for unit, paths in units.items()}


def test_every_library_unit_has_a_layer():
    assert set(_units()) - set(LAYERS) == set(), "give the new module or package a layer in LAYERS"


def test_no_import_points_up():
    upward = [f"{unit} (layer {LAYERS[unit]}) imports {name} (layer {LAYERS[name]})"
              for unit, names in _graph().items() for name in sorted(names)
              if unit in LAYERS and name in LAYERS and LAYERS[name] > LAYERS[unit]]
    assert upward == []


def test_no_import_cycle_between_units():
    graph = _graph()
    cycles = []

    def visit(unit, trail):
        for name in sorted(graph.get(unit, ())):
            if name in trail:
                cycles.append(" -> ".join(trail[trail.index(name):] + [name]))
            elif len(trail) < len(graph):
                visit(name, trail + [name])

    for unit in graph:
        visit(unit, [unit])
    assert cycles == []


@pytest.mark.parametrize("module,limit", [("utils.py", 300), ("evaluate.py", 80)])
def test_rooms_stay_small(module, limit):
    with open(os.path.join(ROOT, module), encoding="utf-8") as handle:
        assert len(handle.read().splitlines()) <= limit
