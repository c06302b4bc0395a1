"""The import graph points one way: main_*.py and scripts/ use utils/ and networks/, never the reverse, and
no module of utils/ or networks/ imports itself back through others. Read from the source with ast, so
imports inside functions count as much as those at the top of a file."""
import ast

import torch

from conftest import ROOT

LIBRARIES = ("utils", "networks")


def module_name(path, root):
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def library_modules(root, packages=LIBRARIES):
    """{dotted name: path} of every module under the given top-level packages."""
    return {module_name(p, root): p for pkg in packages for p in sorted((root / pkg).rglob("*.py"))}


def imports_of(path, name, modules):
    """Every module name a file imports, anywhere in it: absolute, relative (resolved against its
    package), and for `from package import name` the submodule when `name` is one, else the package."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module
            for alias in node.names:  # a submodule, or a name defined in the module `base`
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return found


def import_graph(root, packages=LIBRARIES):
    modules = library_modules(root, packages)
    return {name: imports_of(path, name, modules) for name, path in modules.items()}


def upward_imports(graph):
    """(module, imported) for each import of a main script or of scripts/."""
    return sorted((m, i) for m, targets in graph.items() for i in targets
                  if i.split(".")[0].startswith("main_") or i.split(".")[0] == "scripts")


def find_cycle(graph):
    """One import cycle among the graph's own modules, as [a, b, ..., a], or None."""
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for t in sorted(graph[m]):
            if t not in graph or t == m:
                continue
            if state.get(t) == "open":
                return stack[stack.index(t):] + [t]
            if t not in state:
                cycle = visit(t)
                if cycle:
                    return cycle
        stack.pop()
        state[m] = "done"
        return None

    for m in sorted(graph):
        if m not in state:
            cycle = visit(m)
            if cycle:
                return cycle
    return None


def test_libraries_never_import_a_main_script_or_scripts():
    graph = import_graph(ROOT)
    assert {"utils.reporting.runs", "utils.inputs.data", "networks.detection"} <= graph.keys()
    assert upward_imports(graph) == []


def test_no_import_cycle_in_utils_and_networks():
    cycle = find_cycle(import_graph(ROOT))
    assert cycle is None, " -> ".join(cycle)


def test_the_checks_see_function_level_relative_and_package_imports(tmp_path):
    pkg = tmp_path / "utils"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text("def f():\n    from .sub import c\n")
    (pkg / "sub" / "c.py").write_text("from ..a import thing\n")
    (pkg / "d.py").write_text("import os\n\ndef g():\n    from main_coco import get_args_parser\n    import scripts.x\n")
    graph = import_graph(tmp_path, ("utils",))
    assert graph["utils.b"] == {"utils.sub.c"} and graph["utils.sub.c"] == {"utils.a"}
    assert find_cycle(graph) == ["utils.a", "utils.b", "utils.sub.c", "utils.a"]
    assert upward_imports(graph) == [("utils.d", "main_coco"), ("utils.d", "scripts.x")]
    (pkg / "sub" / "c.py").write_text("from .. import d\n")
    assert find_cycle(import_graph(tmp_path, ("utils",))) is None


def test_imagenet_loader_lets_a_dali_dataset_build_its_own_loader():
    """utils.inputs.data hands a DALI dataset to its own make_loader (it cannot import utils.inputs.dali, which imports it),
    with the trainer's arguments and the device that pin_memory names."""
    from utils.inputs.data import imagenet_loader

    class FakeDali:
        backend = "dali"

        def make_loader(self, *args, **kwargs):
            return args, kwargs

    args, kwargs = imagenet_loader(FakeDali(), 32, 2, 7, rank=1, world_size=4, train=False)
    assert args == (32, 2, 7, 1, 4) and kwargs == {"train": False, "device": torch.device("cpu")}
