"""The layout's promises, checked on the source: no package imports another that imports it back
(not even inside a function), no module outside ``families/`` names a family's parts, and the
backends are listed in one place."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# folder -> package, as pyproject.toml maps them
PACKAGES = {"elastiq": "elastiq", "compressor": "elastiq.compressor", "evaluation": "elastiq.evaluation",
            "exporters": "elastiq.exporters", "families": "elastiq.families", "kernels": "elastiq.kernels",
            "modeling": "elastiq.modeling", "runtime": "elastiq.runtime"}
ENTRY_POINTS = {"elastiq.cli", "elastiq.__main__"}  # the top: they may import everything


def _modules() -> dict[str, Path]:
    out = {}
    for folder, package in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([package, *parts])] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The library modules ``name`` imports anywhere in its source (a name imported from a
    package counts as that submodule when it is one)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            found |= {f"{target}.{a.name}" if f"{target}.{a.name}" in modules else target for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return {m for m in found if m in modules and m != name}


def _package(module: str) -> str:
    if module in ENTRY_POINTS:
        return "cli"
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in PACKAGES else "elastiq"


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of ``graph`` (depth-first search), or None."""
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt, path + [nxt])):
                return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [start])):
            return found
    return None


def test_no_import_cycles_between_packages_or_modules():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    assert _cycle(graph) is None, "modules import each other: " + " -> ".join(_cycle(graph))
    packages: dict[str, set[str]] = {}
    for name, deps in graph.items():
        packages.setdefault(_package(name), set()).update(_package(d) for d in deps if _package(d) != _package(name))
    assert _cycle(packages) is None, "packages import each other: " + " -> ".join(_cycle(packages))
    assert "runtime" not in packages["compressor"] and "runtime" not in packages["exporters"]


def test_only_the_family_modules_name_a_familys_parts():
    pattern = re.compile(r"q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj|input_layernorm|self_attn")
    offenders = [f"{path.relative_to(ROOT)}:{number}" for name, path in _modules().items()
                 if not name.startswith("elastiq.families")
                 for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
                 if pattern.search(line)]
    assert offenders == []


def test_the_backends_are_listed_once():
    from elastiq.runtime.backends import BACKENDS, backend

    assert list(BACKENDS) == ["torch", "llama.cpp", "onnxruntime"]
    assert all(backend(name).name == name for name in BACKENDS)
    modules = {p.stem for p in (ROOT / "runtime" / "backends").glob("*.py")} - {"__init__", "base", "exported"}
    assert modules == set(BACKENDS.values())  # every backend module is registered, and nothing else
    listed = re.compile(r"""["']torch["'],\s*["']llama\.cpp["']""")  # a list of the names, as the CLI once had
    assert [str(p.relative_to(ROOT)) for p in _modules().values() if listed.search(p.read_text(encoding="utf-8"))] == []
