"""The house rules of docs/ARCHITECTURE.md, checked on the source tree: the map names every source
file, no file is over 600 lines, imports follow the layer table (lazy imports inside functions
included) and run one way (no circle)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PACKAGE = SRC / "vitkit"
MAP = ROOT / "docs" / "ARCHITECTURE.md"
MAX_LINES = 600


def source_files() -> list[Path]:
    return sorted(path for path in PACKAGE.rglob("*.py") if "__pycache__" not in path.parts)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the vitkit modules it imports anywhere in its text (functions included). `from
    package import name` counts as importing the submodule `package.name` when there is one."""
    files = {module_name(path): path for path in source_files()}
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = package.split(".")
                    base = ".".join(
                        parts[: len(parts) - node.level + 1] + ([node.module] if node.module else [])
                    )
                else:
                    base = node.module or ""
                targets = [
                    f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base
                    for alias in node.names
                ]
            for target in targets:
                while target and target not in files:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles = []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    circles.append(sorted(component))
    return circles


def test_the_circle_finder_finds_circles() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert import_circles(graph) == [["a", "b", "c"]]
    assert import_circles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle() -> None:
    circles = import_circles(import_graph())
    assert not circles, "import circles: " + "; ".join(" <-> ".join(circle) for circle in circles)


@pytest.mark.parametrize("path", source_files(), ids=lambda path: str(path.relative_to(PACKAGE)))
def test_no_source_file_over_the_limit(path: Path) -> None:
    num_lines = len(path.read_text().splitlines())
    assert num_lines <= MAX_LINES, f"{path.relative_to(ROOT)}: {num_lines} lines (at most {MAX_LINES})"


# The layer table of docs/ARCHITECTURE.md: rows `| layer | modules | may import |` between the
# markers below; a module belongs to the row naming the longest path that contains it.
LAYERS_BEGIN, LAYERS_END = "<!-- layers -->", "<!-- /layers -->"


def layer_table(text: str) -> dict[str, tuple[list[str], set[str]]]:
    """layer -> (its module paths as dotted prefixes, the layers it may import)."""
    body = text.split(LAYERS_BEGIN, 1)[1].split(LAYERS_END, 1)[0]
    table = {}
    for line in body.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[0] or set(cells[0]) <= {"-"} or cells[0] == "layer":
            continue
        paths = [module_path(path) for path in re.findall(r"`([\w/.]+)`", cells[1])]
        allowed = {name.strip() for name in cells[2].split(",") if name.strip() not in ("", "-")}
        table[cells[0]] = (paths, allowed)
    return table


def module_path(path: str) -> str:
    """`models/` -> vitkit.models, `train/optim.py` -> vitkit.train.optim, `__init__.py` -> vitkit."""
    parts = [part for part in path.removesuffix(".py").split("/") if part and part != "__init__"]
    return ".".join(["vitkit", *parts])


def layer_of(module: str, table: dict[str, tuple[list[str], set[str]]]) -> str | None:
    best, best_length = None, -1
    for layer, (paths, _) in table.items():
        for path in paths:
            # The package itself (`__init__.py`) holds only itself, not every module below it.
            inside = module == path or (path != "vitkit" and module.startswith(path + "."))
            if inside and len(path) > best_length:
                best, best_length = layer, len(path)
    return best


def layer_violations(graph: dict[str, set[str]], table: dict[str, tuple[list[str], set[str]]]) -> list[str]:
    """Each import of a module into a layer the table does not allow, and each module in no row."""
    problems = []
    for module, targets in sorted(graph.items()):
        layer = layer_of(module, table)
        if layer is None:
            problems.append(f"{module} is in no row of the layer table")
            continue
        for target in sorted(targets):
            target_layer = layer_of(target, table)
            if target_layer is not None and target_layer != layer and target_layer not in table[layer][1]:
                problems.append(f"{module} ({layer}) imports {target} ({target_layer})")
    return problems


def test_the_layer_checker_finds_a_wrong_import() -> None:
    text = f"""{LAYERS_BEGIN}
| layer | modules | may import |
|---|---|---|
| base | `models/` | - |
| top | `io.py`, `models/fast.py` | base |
{LAYERS_END}"""
    table = layer_table(text)
    assert layer_of("vitkit.models.fast", table) == "top"
    assert layer_of("vitkit.models.vit", table) == "base"
    ok = {"vitkit.io": {"vitkit.models.vit"}, "vitkit.models.vit": set()}
    assert layer_violations(ok, table) == []
    wrong = {"vitkit.models.vit": {"vitkit.io"}, "vitkit.io": set(), "vitkit.cli": set()}
    assert layer_violations(wrong, table) == [
        "vitkit.cli is in no row of the layer table",
        "vitkit.models.vit (base) imports vitkit.io (top)",
    ]


def test_imports_follow_the_layer_table() -> None:
    problems = layer_violations(import_graph(), layer_table(MAP.read_text()))
    assert not problems, "docs/ARCHITECTURE.md's layer table is broken:\n" + "\n".join(problems)


def test_the_map_names_every_source_file() -> None:
    text = MAP.read_text()
    named = set(re.findall(r"[\w/]+\.py", text))
    missing = [
        str(path.relative_to(PACKAGE))
        for path in source_files()
        if str(path.relative_to(PACKAGE)) not in named and str(path.relative_to(SRC)) not in named
    ]
    assert not missing, f"docs/ARCHITECTURE.md does not name {missing}"
    stale = [
        name
        for name in named
        if name.count("/") and not (PACKAGE / name).exists() and not (ROOT / name).exists()
    ]
    assert not stale, f"docs/ARCHITECTURE.md names files that do not exist: {stale}"


def test_the_readme_points_to_the_map() -> None:
    assert "docs/ARCHITECTURE.md" in (ROOT / "README.md").read_text()


# models/ computes what the papers draw: no device, autograd-mode, autocast or environment branches
# (those belong to vitkit.fast and the code that runs a model). What a model module may not name:
FORBIDDEN_MODULES = ("os", "torch.cuda", "torch.backends", "torch.cpu", "torch.distributed", "torch.amp")
FORBIDDEN_ATTRIBUTES = (
    "cuda",  # torch.cuda, tensor.cuda()
    "is_cuda",
    "environ",
    "getenv",
    "is_grad_enabled",
    "is_inference_mode_enabled",
    "is_autocast_enabled",
    "is_autocast_available",
    "get_autocast_dtype",
    "is_compiling",
    "data_ptr",
    "autocast",  # a precision chosen inside the model
)
FORBIDDEN_STRINGS = ("cuda", "mps", "xpu")  # device names compared or built


def _dotted(node: ast.AST) -> str:
    """`a.b.c` for an attribute chain on a name; the chain's tail for anything else (`f().b.c`: `.b.c`)."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    parts.append(node.id if isinstance(node, ast.Name) else "")
    return ".".join(reversed(parts))


def model_violations(source: str, filename: str = "<model>") -> list[str]:
    """Each place in `source` that names a device, an autograd or autocast mode or the environment:
    an import or attribute of FORBIDDEN_MODULES, an attribute or imported name in FORBIDDEN_ATTRIBUTES,
    `device.type`, or a device-name string."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = (
                [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            )
            names = [alias.name for alias in node.names] if isinstance(node, ast.ImportFrom) else []
            for module in modules:
                if any(module == bad or module.startswith(bad + ".") for bad in FORBIDDEN_MODULES):
                    found.append(f"{where}: imports {module}")
            found += [f"{where}: imports {name}" for name in names if name in FORBIDDEN_ATTRIBUTES]
        elif isinstance(node, ast.Attribute):
            dotted = _dotted(node)
            in_module = any(dotted.startswith(module + ".") for module in FORBIDDEN_MODULES)
            if node.attr in FORBIDDEN_ATTRIBUTES or dotted.endswith("device.type") or in_module:
                found.append(f"{where}: {dotted}")
        elif isinstance(node, ast.Constant) and str(node.value).partition(":")[0] in FORBIDDEN_STRINGS:
            found.append(f"{where}: {node.value!r}")
    return found


def test_the_model_checker_catches_planted_violations() -> None:
    planted = {
        "import os": "imports os",
        "from os import environ": "imports os",
        "import torch.cuda": "imports torch.cuda",
        "from torch.backends import cudnn": "imports torch.backends",
        "from torch import is_grad_enabled": "imports is_grad_enabled",
        "x = os.environ.get('A')": "os.environ",
        "if torch.cuda.is_available(): pass": "torch.cuda",
        "y = x.cuda()": "x.cuda",
        "if x.device.type == 'cpu': pass": "x.device.type",
        "if torch.is_grad_enabled(): pass": "torch.is_grad_enabled",
        "if torch.is_autocast_enabled('cpu'): pass": "torch.is_autocast_enabled",
        "d = torch.get_autocast_dtype('cpu')": "torch.get_autocast_dtype",
        "if torch.compiler.is_compiling(): pass": "torch.compiler.is_compiling",
        "key = p.data_ptr()": "p.data_ptr",
        "with torch.autocast('cpu', enabled=False): pass": "torch.autocast",
        "amx = torch.cpu._is_amx_tile_supported()": "torch.cpu._is_amx_tile_supported",
        "torch.backends.cudnn.benchmark = True": "torch.backends.cudnn",
        "z = torch.zeros(1, device='cuda:0')": "'cuda:0'",
    }
    for source, expected in planted.items():
        found = model_violations(source)
        assert any(expected in violation for violation in found), (source, found)
    clean = (
        "y = x.to(images.device)\nz = torch.zeros(1, device=x.device, dtype=x.dtype)\nif self.training: pass"
    )
    assert model_violations(clean) == []


def test_models_know_no_device_autograd_mode_or_environment() -> None:
    found = [
        violation
        for path in source_files()
        if path.relative_to(PACKAGE).parts[0] == "models"
        for violation in model_violations(path.read_text(), str(path.relative_to(ROOT)))
    ]
    assert not found, "models/ must not branch on devices, modes or the environment:\n" + "\n".join(found)
