"""The package's layout rules (docs/architecture.md): every import points down the stack of packages,
no module imports a private name of another, and no import cycle exists (function-level imports
included).

Stack, lowest first: errors (the user-error classes every layer raises), models, data -> rag ->
retrieval, hf -> config -> training -> quickstart -> commands -> the top-level modules
(rag_jax/__init__, cli, __main__). A module may import from its own package and from packages below it.
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "rag_jax"
RANKS = {"errors": 0, "models": 0, "data": 0, "rag": 1, "retrieval": 2, "hf": 2, "config": 3, "training": 4, "planning": 5,
         "quickstart": 5, "commands": 6}  # fmt: skip
TOP = 7  # rag_jax/__init__.py, cli.py, __main__.py


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def rank(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1:
        return TOP
    return RANKS.get(parts[1], TOP)


def resolve(name: str) -> str:
    """The module a dotted import name refers to (``rag_jax.x.y`` may name an attribute of ``rag_jax.x``)."""
    while name not in MODULES:
        name = name.rpartition(".")[0]
    return name


def imports(module: str) -> list[tuple[str, list[str], int]]:
    """``(imported module, imported names, line)`` for every rag_jax import in ``module``, at any depth."""
    tree = ast.parse(MODULES[module].read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(resolve(a.name), [], node.lineno) for a in node.names if a.name.startswith("rag_jax")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("rag_jax") and not node.level:
            for alias in node.names:
                target = f"{node.module}.{alias.name}"
                if target in MODULES:  # `from package import submodule`
                    found.append((target, [], node.lineno))
                else:
                    found.append((resolve(node.module), [alias.name], node.lineno))
    return found


GRAPH = {m: imports(m) for m in MODULES}


def test_the_walk_sees_the_package():
    assert {"rag_jax.models.bart", "rag_jax.training.loop", "rag_jax.hf.rag", "rag_jax.config"} <= set(MODULES)
    assert any(target == "rag_jax.models.bart" for target, _, _ in GRAPH["rag_jax.rag.decoding"])


def test_imports_point_down_the_stack():
    upward = [
        f"{MODULES[m].relative_to(PACKAGE.parent)}:{line} imports {target}"
        for m, edges in GRAPH.items() for target, _, line in edges
        if rank(target) > rank(m) and not target.startswith(m + ".")  # a package's __init__ may gather its modules
    ]  # fmt: skip
    assert not upward, "\n".join(upward)


def test_no_private_names_imported_across_modules():
    private = [
        f"{MODULES[m].relative_to(PACKAGE.parent)}:{line} imports {name} from {target}"
        for m, edges in GRAPH.items() for target, names, line in edges for name in names
        if name.startswith("_") and target != m
    ]  # fmt: skip
    assert not private, "\n".join(private)


def test_no_import_cycles():
    edges = {m: {t for t, _, _ in GRAPH[m] if t != m} for m in MODULES}
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = "open"
        stack.append(m)
        for t in sorted(edges[m]):
            if state.get(t) == "open":
                return stack[stack.index(t):] + [t]
            if t not in state and (cycle := visit(t)):
                return cycle
        stack.pop()
        state[m] = "done"
        return None

    for m in sorted(MODULES):
        if m not in state and (cycle := visit(m)):
            pytest.fail("import cycle: " + " -> ".join(cycle))
