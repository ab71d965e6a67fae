"""The shape of the code: a method is one object, dependencies point one way, no import circles."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import run

from fl_maestro.methods import METHODS, Method, Planning, budget_ranks, get_method, methods_table
from fl_maestro.models import build_model

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fl_maestro", "strategies", "simulations")


# --------------------------------------------------------------------------- a method is one object


def test_a_toy_method_registered_in_a_few_lines_runs_in_federation(tmp_path, monkeypatch):
    """Every device that affords it trains the 0.4 tier's prefix: registering the object is all."""
    toy = Method("prefix-0.4", "factors", "every device trains the 0.4 tier's prefix", "none",
                 plan=lambda model, budget, p: budget_ranks(model, 0.4, p),
                 takes_part=lambda budget: budget >= 0.4)
    monkeypatch.setitem(METHODS, toy.name, toy)
    store = run(tmp_path, strategy=toy.name, **{"clients-per-round": 2})
    clients = store.read("clients")
    assert set(clients["budget"]) == {1.0} and len(clients) == 4  # the 0.25 devices sit out
    model = build_model("cnn", (1, 8, 8), 10, device="meta")
    shapes = model.slice_shapes(budget_ranks(model, 0.4, Planning((0.25, 1.0))))
    prefix = 4 * sum(int(np.prod(s)) for s in shapes.values())  # float32 bytes of the 0.4 prefix
    assert prefix < 4 * sum(int(np.prod(s)) for s in model.slice_shapes(model.max_ranks()).values())
    assert set(clients["bytes-down"]) == {prefix}
    tiers = store.read("evaluation").query("kind == 'tier' and metric == 'dense-relative-macs'")
    assert tiers["value"].nunique() == 1 and 0.3 < tiers["value"].iloc[0] <= 0.4  # one plan


def test_an_unknown_method_or_family_is_refused_naming_what_is_allowed():
    with pytest.raises(ValueError, match=r"strategy 'nope' is not allowed.*rankwise"):
        get_method("nope")
    with pytest.raises(ValueError, match=r"family 'conv' is not allowed.*factors"):
        Method("x", "conv", "", "", plan=budget_ranks)


def test_every_method_has_a_summary_a_paper_and_a_known_family():
    for method in METHODS.values():
        assert method.summary and method.paper and method.model_family.name == method.family


# --------------------------------------------------------------------------- the import graph


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, wherever the import statement stands."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def import_graph() -> dict[str, set[str]]:
    """Project module -> the project modules it imports."""
    files = {_module(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    graph = {}
    for module, path in files.items():
        names = _imports(path)
        # importing a.b from outside package a runs a/__init__.py first
        names |= {n.rsplit(".", 1)[0] for n in names if "." in n
                  and not module.startswith(n.rsplit(".", 1)[0])}
        graph[module] = {n for n in names if n in files and n != module}
    return graph


def _reach(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for n in graph[todo.pop()]:
            if n not in seen:
                seen.add(n)
                todo.append(n)
    return seen


def test_the_graph_sees_real_imports():
    graph = import_graph()
    assert "fl_maestro.methods" in graph["fl_maestro.config"]
    assert "strategies.rankwise" in graph["fl_maestro.federation"]


def test_there_is_no_import_circle():
    graph = import_graph()
    circles = sorted(m for m in graph if m in _reach(graph, m))
    assert not circles, f"modules on an import circle: {circles}"


def test_strategies_import_nothing_from_fl_maestro_or_simulations():
    graph = import_graph()
    for module in (m for m in graph if m.startswith("strategies")):
        upward = {n for n in _reach(graph, module) if not n.startswith("strategies")}
        assert not upward, f"{module} imports {sorted(upward)}"


def test_fl_maestro_core_never_reaches_the_flower_strategy():
    graph = import_graph()
    # the Flower adapters and the federation's rounds talk to the strategy; nothing else does
    adapters = {"fl_maestro.federation", "fl_maestro.rounds", "fl_maestro.server_app",
                "fl_maestro.client_app"}
    for module in (m for m in graph if m.startswith("fl_maestro") and m not in adapters):
        reached = _reach(graph, module)
        assert "strategies.rankwise" not in reached, module
        assert not any(n.startswith("simulations") for n in reached), module


def test_importing_the_config_and_the_world_loads_no_flower_server():
    code = ("import sys, fl_maestro.config, fl_maestro.world, fl_maestro.methods, "
            "fl_maestro.training; assert 'flwr.serverapp' not in sys.modules, 'flwr.serverapp'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_the_readme_method_table_is_the_registry():
    from_registry = methods_table()
    assert from_registry.count("\n| `") == len(METHODS)
    assert from_registry in (ROOT / "README.md").read_text()
