"""The package's layout: imports run one way (from io up to cli), with no cycle and no
function-local import of a mimiq_deploy module outside the CLI."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "mimiq_deploy"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _target(node: ast.ImportFrom, module: str, is_package: bool) -> str | None:
    """The mimiq_deploy module an ImportFrom names, or None for another package."""
    if node.level == 0:
        return node.module if (node.module or "").split(".")[0] == "mimiq_deploy" else None
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(path: Path):
    """(imported mimiq_deploy module, whether inside a function) for every import of `path`."""
    module, tree = _module_name(path), ast.parse(path.read_text())
    is_package = path.name == "__init__.py"
    modules = {_module_name(p) for p in PACKAGE.rglob("*.py")}
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            local = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.ImportFrom):
                target = _target(child, module, is_package)
                if target:
                    # `from . import x` may name a submodule
                    names = [f"{target}.{a.name}" for a in child.names if f"{target}.{a.name}" in modules]
                    found.extend((t, in_function) for t in names or [target])
            elif isinstance(child, ast.Import):
                found.extend((a.name, in_function) for a in child.names if a.name.split(".")[0] == "mimiq_deploy")
            visit(child, local)
    visit(tree, False)
    return module, found


def _graph() -> dict:
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        module, found = _imports(path)
        graph.setdefault(module, set()).update(t for t, _ in found if t != module)
    return graph


def test_no_function_local_imports_of_the_package_outside_the_cli():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        module, found = _imports(path)
        if module != "mimiq_deploy.cli":
            offenders += [f"{module} imports {t} inside a function" for t, local in found if local]
    assert not offenders, offenders


def test_module_imports_have_no_cycle():
    graph = _graph()
    # a submodule import also runs its packages' __init__: count that edge
    for module in list(graph):
        for target in list(graph[module]):
            parts = target.split(".")
            for i in range(2, len(parts)):
                parent = ".".join(parts[:i])
                if parent in graph and parent != module and not module.startswith(parent + "."):
                    graph[module].add(parent)
    state, cycles = {}, []

    def walk(node, stack):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                walk(nxt, stack + [nxt])
        state[node] = "done"
    for node in sorted(graph):
        if node not in state:
            walk(node, [node])
    assert not cycles, [" -> ".join(c) for c in cycles]


def _string_constants(tree):
    return [n for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)]


def test_back_end_names_appear_only_in_their_own_folder():
    """A back end's name as a string is its folder's business: the stages loop over the registry instead."""
    from mimiq_deploy.backends import BACKENDS

    offenders = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).parts
        for node in _string_constants(ast.parse(path.read_text())):
            if node.value in BACKENDS and rel[:2] != ("backends", node.value):
                offenders.append(f"{'/'.join(rel)}:{node.lineno} names {node.value!r}")
    assert not offenders, offenders


def _record_fields() -> set[str]:
    """Every JSON key of a typed run-directory record: the field names of run_dir.py's Record subclasses."""
    import dataclasses

    from mimiq_deploy import run_dir

    fields = set()
    for value in vars(run_dir).values():
        if isinstance(value, type) and dataclasses.is_dataclass(value) and issubclass(value, run_dir.Record):
            fields.update(f.name for f in dataclasses.fields(value))
    return fields


def test_records_are_read_only_through_run_dir():
    """Outside run_dir.py no record is read by string key (`x["key"]` or `x.get("key")` with a record's field
    name): stages read the typed records."""
    keys = _record_fields()
    assert {"artifacts", "rows", "failed", "agreement"} <= keys  # the records the check is about exist
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "run_dir.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            key = None
            if (isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load)
                    and isinstance(node.slice, ast.Constant)):
                key = node.slice.value
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
                  and node.args and isinstance(node.args[0], ast.Constant)):
                key = node.args[0].value
            if isinstance(key, str) and key in keys:
                offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno} reads {key!r}")
    assert not offenders, offenders
