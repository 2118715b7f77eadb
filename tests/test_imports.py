"""The project's imports form layers without loops. `bench` (the commands) sits on top of `modules` and
`datamodules`, which build on `bench.core.batches` and on the few `bench` modules that import nothing of
theirs (errors, model specs, sampling). Imports inside functions count: one that only keeps two modules
from importing each other at load time still ties them into one knot."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("bench", "datamodules", "modules", "sweeps")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


FILES = {module_name(path): path for package in PACKAGES for path in sorted((REPO / package).rglob("*.py"))}


def imports_of(path: Path, module_level_only: bool = False) -> set[str]:
    """The project modules `path` imports. `from bench.reports import figures` imports the module bench.reports.figures."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if module_level_only else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {name for name in names if name in FILES}
    return found - {module_name(path)}


def import_graph(module_level_only: bool = False) -> dict[str, set[str]]:
    return {name: imports_of(path, module_level_only) for name, path in FILES.items()}


def loops(graph: dict[str, set[str]]) -> list[str]:
    """One path per back edge of a depth-first search: empty exactly when the graph has no cycle."""
    state: dict[str, str] = {}
    found = []

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for target in sorted(graph[name]):
            if state.get(target) == "open":
                found.append(" -> ".join([*path[path.index(target):], target]))
            elif target not in state:
                visit(target, [*path, target])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    return found


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for target in graph[todo.pop()] - seen:
            seen.add(target)
            todo.append(target)
    return seen


def test_the_graph_sees_the_imports():
    graph = import_graph()
    assert {"bench.core.errors", "bench.core.batches", "modules.logps"} <= graph["modules.base"]
    assert "bench.reports.figures" in graph["bench.reports.table"]  # `from bench import figures`
    assert "bench.reports.figures" in graph["bench.experiments.sweep"]


def test_imports_form_no_loop():
    assert not loops(import_graph()), "import loops:\n" + "\n".join(loops(import_graph()))


LAYERS = ["bench.core", "bench.sampling", "datamodules", "modules", "bench.runs", "bench.evaluation", "bench.reports",
          "bench.experiments", "bench.cli"]  # bottom to top


def layer_of(module: str) -> int:
    """The index of the module's folder in LAYERS; `bench` itself (an empty package) is the foundation."""
    found = [i for i, folder in enumerate(LAYERS) if module == folder or module.startswith(folder + ".")]
    assert module == "bench" or found, f"{module} is in no layer: put it in one of {LAYERS}"
    return found[0] if found else 0


def test_every_module_sits_in_a_layer_folder_and_imports_none_above_it():
    graph = import_graph()
    upward = [f"{name} ({LAYERS[layer_of(name)]}) imports {target} ({LAYERS[layer_of(target)]})"
              for name in sorted(graph) if not name.startswith("sweeps")
              for target in sorted(graph[name]) if layer_of(target) > layer_of(name)]
    assert not upward, "imports of a layer above:\n" + "\n".join(upward)
    assert not [p for p in (REPO / "bench").glob("*.py") if p.name != "__init__.py"], "bench/ holds only its layers"


def test_the_layer_rule_can_fail():
    # the rule, on a graph with one upward import
    graph = {"bench.core.errors": {"bench.runs.training"}}
    assert [t for n in graph for t in graph[n] if layer_of(t) > layer_of(n)] == ["bench.runs.training"]


@pytest.mark.parametrize("package", PACKAGES)
@pytest.mark.slow  # over 3 s: left out of `make test-fast`
def test_every_module_imports_on_its_own(package):
    """Each module imported first, in a fresh interpreter state of this project's modules (third-party ones
    stay loaded: they cannot make a project import fail, and reloading torch per module would be slow)."""
    names = sorted(name for name in FILES if name.split(".")[0] == package)
    script = (
        "import importlib, sys, traceback\n"
        f"failed = []\n"
        f"for name in {names!r}:\n"
        f"    for loaded in [m for m in sys.modules if m.split('.')[0] in {PACKAGES!r}]:\n"
        "        del sys.modules[loaded]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception:\n"
        "        failed.append(name + ': ' + traceback.format_exc().strip().splitlines()[-1])\n"
        "print('\\n'.join(failed))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert not result.stdout.strip(), "modules that fail to import first:\n" + result.stdout
