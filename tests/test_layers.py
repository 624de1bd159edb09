"""The house's rules (../shared/DESIGN.md, "The house"), held on every module of prefopt/ by reading its imports:

- a module imports only from its own package or a lower layer (LAYERS), never a sibling package of its layer;
- no import of prefopt hides inside a function (only the entry points may, for start-up time);
- no import circle among prefopt's modules, counting every import wherever it stands;
- at most six modules at the package root;
- `prefopt report` and `prefopt plot` (observe/) never import torch.

Each rule is also run on a planted violation, so a checker that stopped seeing would fail here too.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "prefopt"
# package -> layer; a module may import its own package and any package of a lower layer
LAYERS = {
    "conf": 0,  # the YAML config groups (no code)
    "core": 0,
    "data": 1,
    "losses": 1,
    "model": 2,
    "observe": 2,
    "train": 3,
    "recipes": 4,
    "run": 5,
    "worker": 6,  # `python -m prefopt.worker`
    "cli": 7,  # the `prefopt` command: its `worker` subcommand is worker.py's main
}
ENTRY_POINTS = {"cli", "worker"}  # may import inside functions (start-up time of `prefopt --help` and friends)
MAX_ROOT_MODULES = 6


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def prefopt_imports(path: Path, root: Path, modules: set[str]) -> list[tuple[str, int, bool]]:
    """(imported module, line, inside a function) for every import of a prefopt module in the file."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(), str(path))
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target not in modules and "." in target:
                target = target.rpartition(".")[0]
            if target in modules and target != name and target != root.name:
                found.append((target, node.lineno, id(node) not in top_level and not in_type_checking(tree, node)))
    return found


def in_type_checking(tree: ast.Module, node: ast.AST) -> bool:
    return any(
        isinstance(block, ast.If) and ast.unparse(block.test).endswith("TYPE_CHECKING") and node in ast.walk(block)
        for block in tree.body
    )


def package_of(module: str) -> str:
    """The layer package a module belongs to: prefopt.train.step -> train; prefopt.cli -> cli."""
    return module.split(".")[1]


def check_layers(root: Path) -> list[str]:
    """Every violation of the rules in the tree under root (a package dir), as 'file:line: why'."""
    files = sorted(root.rglob("*.py"))
    modules = {module_name(path, root) for path in files}
    problems, graph = [], {module: set() for module in modules}
    root_modules = [path.name for path in files if path.parent == root and path.name != "__init__.py"]
    if len(root_modules) > MAX_ROOT_MODULES:
        problems.append(f"{root}: {len(root_modules)} modules at the package root ({', '.join(root_modules)})")
    for path in files:
        name = module_name(path, root)
        if name == root.name:
            continue
        own = package_of(name)
        if own not in LAYERS:
            problems.append(f"{path}: package {own} has no layer (add it to LAYERS)")
            continue
        for target, line, inside_function in prefopt_imports(path, root, modules):
            graph[name].add(target)
            theirs = package_of(target)
            where = f"{path.relative_to(root.parent)}:{line}"
            if inside_function and own not in ENTRY_POINTS:
                problems.append(f"{where}: imports {target} inside a function")
            if theirs != own and theirs in LAYERS and LAYERS[theirs] >= LAYERS[own]:
                kind = "a sibling package" if LAYERS[theirs] == LAYERS[own] else "a higher layer"
                problems.append(f"{where}: {own}/ (L{LAYERS[own]}) imports {target}, {kind} (L{LAYERS[theirs]})")
    problems += [f"import circle: {' -> '.join(cycle)}" for cycle in cycles(graph)]
    return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected component of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component) + [sorted(component)[0]])

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_prefopt_keeps_the_layer_rules():
    problems = check_layers(PACKAGE)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    "module, source, expected",
    [
        ("core/low.py", "from prefopt.train import step\n", "core/ (L0) imports prefopt.train.step, a higher layer"),
        ("model/a.py", "from prefopt.observe import b\n", "imports prefopt.observe.b, a sibling package"),
        ("train/late.py", "def f():\n    from prefopt.core import low\n", "imports prefopt.core.low inside a function"),
        ("core/low.py", "def f():\n    from prefopt.core import other\n", "import circle"),
        ("stray/x.py", "", "package stray has no layer"),
    ],
)
def test_a_planted_violation_is_seen(tmp_path, module, source, expected):
    root = tmp_path / "prefopt"
    files = {
        "__init__.py": "",
        "core/__init__.py": "",
        "core/low.py": "",
        "core/other.py": "from prefopt.core import low\n",
        "model/__init__.py": "",
        "observe/__init__.py": "",
        "observe/b.py": "",
        "train/__init__.py": "",
        "train/step.py": "",
        module: source,
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    problems = check_layers(root)
    assert any(expected in problem for problem in problems), problems
    assert check_layers(root) and not check_layers_clean(root, module)


def check_layers_clean(root: Path, planted: str) -> list[str]:
    """The same tree without the planted module holds the rules (the checker is not just noisy)."""
    (root / planted).unlink()
    return check_layers(root)


def test_report_and_plot_start_without_torch():
    """`prefopt report` and `prefopt plot` read files: importing them, the token heatmaps (redrawn from a run dir)
    and the CLI must not pull in torch."""
    code = textwrap.dedent(
        """
        import sys
        import prefopt.cli, prefopt.observe.report, prefopt.observe.plots, prefopt.observe.token_heatmaps
        heavy = sorted(name for name in ("torch", "transformers", "deepspeed", "datasets") if name in sys.modules)
        print(",".join(heavy))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=PACKAGE.parent, check=True
    )
    assert result.stdout.strip() == "", f"imported by report/plot: {result.stdout.strip()}"
