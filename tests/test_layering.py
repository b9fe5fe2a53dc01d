"""DESIGN.md §2: a module imports only from its own layer or lower ones (checked with an ast scan)."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "policyflow"

# Layer of each top-level module or sub-package of policyflow.
LAYERS = {
    "types": 0, "ops": 0, "losses": 0, "advantages": 0, "rewards": 0, "metrics": 0,
    "config": 1, "config_sections": 1, "problems": 1, "model": 1, "tokens": 1, "engine": 1, "tasks": 1, "tools": 1, "agent": 1,
    "trainer": 1, "checkpoint": 1, "logging": 1, "evaluate": 1, "selfplay": 1, "threads": 1,
    "rollout": 1, "sft": 1, "session": 1, "policy": 1, "lora": 1, "rundir": 1, "yamlfile": 1, "trackers": 1,
    "buffer": 2, "weights": 2, "coordinator": 2, "runtime": 2, "pool": 2, "workers": 2,
    "cli": 4, "__main__": 4, "__init__": 4, "view": 4, "serve": 4,
}
# Modules of a package whose layer is not the package's: the self-play package holds what tasks and
# workers use (jobs, the challenger and teacher tasks, the RLT reward: layer 1) and the drivers of
# runs with roles, which step policies with `coordinator.rl_step` (layer 2).
MODULE_LAYERS = {"selfplay.driver": 2, "selfplay.rzero": 2, "selfplay.rlt": 2}
LAYERS["frozen"] = 1
# Third-party imports allowed in layer 0 (everything else there is forbidden).
LAYER0_THIRD_PARTY = {"torch"}


def _component(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    module = ".".join(rel.with_suffix("").parts)
    return module if module in MODULE_LAYERS else rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _layer(name: str) -> int:
    """The layer of a component, or of a module named policyflow.a.b..."""
    return MODULE_LAYERS[name] if name in MODULE_LAYERS else LAYERS[name.split(".")[0]]


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
            if node.module == "policyflow":
                names += [f"policyflow.{a.name}" for a in node.names]
    return names


SOURCES = sorted(p for p in PACKAGE.rglob("*.py") if not (p.parent == PACKAGE and p.stem == "__init__"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_respect_layers(path: Path) -> None:
    here = _component(path)
    assert here in LAYERS or here in MODULE_LAYERS, f"{here} has no layer in DESIGN.md §2; add it to LAYERS"
    for name in _imports(path):
        parts = name.split(".")
        if parts[0] == "policyflow" and len(parts) > 1:
            there = ".".join(parts[1:3])
            there = there if there in MODULE_LAYERS else parts[1]
            assert _layer(there) <= _layer(here), f"{path.name} (layer {_layer(here)}) imports {name} (layer {_layer(there)})"
        elif parts[0] == "ray":
            assert here == "runtime" and path.stem == "ray", f"{path.name} imports ray; only runtime/ray.py may"
        elif _layer(here) == 0 and parts[0] not in LAYER0_THIRD_PARTY:
            import sys

            assert parts[0] in sys.stdlib_module_names or parts[0] == "__future__", f"layer-0 {path.name} imports {name}"


def test_scan_sees_imports() -> None:
    """The scanner itself: it must find the policyflow imports of a known module."""
    found = _imports(PACKAGE / "trainer.py")
    assert "policyflow.losses" in found and "torch" in found


def test_agent_never_imports_tasks() -> None:
    """DESIGN.md §6: tasks and envs depend one way. A task builds its envs (`Task.group_builder`)
    and imports `agent/`; nothing in `agent/` imports `tasks/` (the records both use are in
    `problems.py`)."""
    agent = sorted((PACKAGE / "agent").rglob("*.py"))
    assert any(p.stem == "tool_env" for p in agent)
    for path in agent:
        assert not [n for n in _imports(path) if n == "policyflow.tasks" or n.startswith("policyflow.tasks.")], f"agent/{path.name} imports tasks/"
