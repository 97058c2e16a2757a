"""The import graph of raykd, read from the source with ``ast`` (nothing is imported): one-way imports.

- no cycle among raykd's modules (a function-level import counts as much as a top-level one: a cycle through a
  lazy import is still two modules that each need the other);
- formats, models and losses know nothing of Ray and nothing of the stages (DESIGN.md: "formats and models know
  nothing of Ray; stages use Ray"; a loss is a pure function);
- no stage imports another stage's private (underscore) names, and evaluate reads runs and qrels through
  :mod:`raykd.runs`, not through the search stage;
- outside the stages only raykd.runtime (connecting) and raykd.log (quieting Ray's loggers) import Ray, and only
  the generated CLI (raykd.cli, which jobs/*.py call) imports a stage (docs/architecture.md, "Floors").
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "raykd"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, module: str) -> set[str]:
    """Every module name ``path`` imports (absolute; relative imports resolved against ``module``)."""
    is_package = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            out.add(prefix)
            out.update(f"{prefix}.{a.name}" for a in node.names)  # `from raykd.models import tct` names a module
    return out


def import_graph() -> dict[str, set[str]]:
    """raykd module -> the raykd modules it imports (``from raykd.x import y`` -> raykd.x, or raykd.x.y when
    that is a module)."""
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for module, path in files.items():
        graph[module] = {name for name in _imports(path, module) if name in files and name != module}
    return graph


def _all_imports(prefix: str) -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {m: _imports(p, m) for m, p in files.items() if m == prefix or m.startswith(prefix + ".")}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_is_read_from_every_module():
    graph = import_graph()
    assert {"raykd.losses.tct", "raykd.models.registry", "raykd.stages.train", "raykd.stages.train_steps"} <= set(graph)
    assert "raykd.losses.registry" in graph["raykd.stages.train_steps"]
    assert "raykd.models.tct" in graph["raykd.models.registry"]


def test_the_raykd_import_graph_has_no_cycle():
    cycle = _find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_one():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_formats_models_and_losses_import_neither_ray_nor_the_stages():
    offenders = []
    for package in ("raykd.formats", "raykd.models", "raykd.losses"):
        for module, names in _all_imports(package).items():
            bad = sorted(n for n in names if n == "ray" or n.startswith(("ray.", "raykd.stages")))
            if bad:
                offenders.append(f"{module} imports {', '.join(bad)}")
    assert not offenders, "; ".join(offenders)


def _stage_of(module: str) -> str | None:
    """``raykd.stages.score.plan`` -> ``score``: a stage package's modules are one stage."""
    parts = module.split(".")
    return parts[2] if len(parts) > 2 and parts[:2] == ["raykd", "stages"] else None


def test_no_stage_imports_another_stages_private_names():
    offenders = []
    for module, names in _all_imports("raykd.stages").items():
        for name in names:
            other = _stage_of(name)
            if other and other != _stage_of(module) and any(p.startswith("_") for p in name.split(".")[3:]):
                offenders.append(f"{module} imports {name}")
    assert not offenders, "; ".join(sorted(offenders))


def test_evaluate_reads_runs_and_qrels_without_the_search_stage():
    imports = _all_imports("raykd.stages.evaluate")["raykd.stages.evaluate"]
    assert not [n for n in imports if n.startswith("raykd.stages.search")]
    assert {"raykd.runs.run_file", "raykd.runs.store_qrels"} <= imports


def test_the_private_name_check_sees_a_private_import(tmp_path):
    path = tmp_path / "evaluate.py"
    path.write_text("from raykd.stages.search import _load_scorer\nfrom .plan import _steps\n")
    names = _imports(path, "raykd.stages.evaluate")
    assert "raykd.stages.search._load_scorer" in names and _stage_of("raykd.stages.search._load_scorer") == "search"
    assert _stage_of("raykd.stages.score.plan") == "score" and _stage_of("raykd.storage") is None


# the floors of docs/architecture.md: where Ray may be imported, and what may import a stage
RAY_MODULES = ("raykd.stages", "raykd.runtime", "raykd.log")  # stages; connecting to Ray; quieting its loggers
DRIVERS = ("raykd.cli",)  # generated from the stage configs; jobs/*.py call it


def test_only_stages_runtime_and_log_import_ray_and_only_drivers_import_stages():
    offenders = []
    for module, names in _all_imports("raykd").items():
        if module.startswith("raykd.stages"):  # stages use Ray; the demo stage calls the others
            continue
        ray = [n for n in names if n == "ray" or n.startswith("ray.")]
        stages = [n for n in names if n.startswith("raykd.stages")]
        if ray and not module.startswith(RAY_MODULES):
            offenders.append(f"{module} imports {', '.join(sorted(ray))}")
        if stages and not module.startswith(DRIVERS):
            offenders.append(f"{module} imports {', '.join(sorted(stages))}")
    assert not offenders, "; ".join(sorted(offenders))
