"""The package's layout is its architecture: the adapter library imports nothing of the training application or
the server, and no module imports another that imports it back (at module level or inside a function)."""

import ast
from pathlib import Path

import adakron

PACKAGE = Path(adakron.__file__).parent


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """adakron module -> the adakron modules it imports anywhere in its source."""
    modules = {_module(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, *([base] if base else [])])
                candidates = [base] + [f"{base}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                candidates = [a.name for a in node.names]
            else:
                continue
            found |= {c for c in candidates if c in modules and c != name}
        graph[name] = found
    return graph


def test_the_adapter_library_imports_nothing_of_training_serving_or_the_cli():
    for name, imported in _imports().items():
        if name.startswith("adakron.adapters"):
            outside = {m for m in imported if not m.startswith("adakron.adapters") and m != "adakron._version"}
            assert not outside, f"{name} imports {outside}"


def test_no_module_imports_itself_back_through_others():
    graph = _imports()
    # A package's __init__ re-exports its modules: an edge into one's own package is not a cycle of code.
    edges = {n: {m for m in deps if not n.startswith(m + ".")} for n, deps in graph.items()}
    state: dict[str, int] = {}

    def visit(node, path):
        state[node] = 1
        for nxt in edges.get(node, ()):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*path, node, nxt]))
            if nxt not in state:
                visit(nxt, [*path, node])
        state[node] = 2

    for node in edges:
        if node not in state:
            visit(node, [])


def test_every_default_of_the_adapter_is_written_once():
    from dataclasses import fields

    from adakron import AdaKronConfig
    from adakron.cli import build_parser, train_args
    from adakron.training.recipes import TrainArgs

    config = {f.name: f.default for f in fields(AdaKronConfig)}
    args = {f.name: f.default for f in fields(TrainArgs)}
    assert (args["rank"], args["kron_factor"], args["placement"]) == (config["rank"], config["kron_factor"],
                                                                      config["placement"])
    train = train_args(build_parser().parse_args(["train", "--task", "rte"]))
    assert (train.rank, train.kron_factor, train.placement, train.num_experts, train.experts) == (
        config["rank"], config["kron_factor"], config["placement"], config["num_experts"], config["experts"])


def test_the_promises_page_names_only_tests_that_exist():
    import re

    tests = Path(__file__).parent
    page = (tests.parent / "docs" / "promises.md").read_text()
    named = 0
    for line in page.splitlines():
        current = None
        for file, name in re.findall(r"`(?:(test_\w+\.py))?::(test_\w+)`", line):
            current = file or current
            assert current, line
            assert f"def {name}(" in (tests / current).read_text(), f"{current}::{name} is not a test"
            named += 1
    assert named >= 40


def test_every_subpackage_is_a_real_package_so_a_wheel_ships_it():
    from setuptools import find_packages

    found = set(find_packages(str(PACKAGE.parent)))
    folders = {_module(p) for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"}
    assert {m.rpartition(".")[0] for m in folders} <= found
