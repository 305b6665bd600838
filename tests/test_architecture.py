"""The rules that keep the layout legible (docs/architecture.md), checked on every `make test`:
the import floors, no import circles, no re-exports, one table of tasks that every config and
every objective module agrees with, and every `python -m` command in the docs at a real module.
"""
import ast
import importlib
import importlib.util
import pathlib
import re
import subprocess
import sys

import grimp
import pytest

from conftest import REPO
from core.config import ConfigError, load_config_module
from lm.objectives import registry
from multimodal.commands import TASKS as MULTIMODAL
from vision.pipeline import IMAGE_TASKS

PACKAGES = ("core", "lm", "vision", "generative", "multimodal", "launch", "experiments",
            "benchmarks")


def project_files() -> list[pathlib.Path]:
    return sorted(p for package in PACKAGES for p in (REPO / package).rglob("*.py"))


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_import_contracts_hold():
    """setup.cfg's layers contracts (import-linter reads function-level imports too)."""
    done = subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import "
                           "lint_imports; sys.exit(lint_imports(no_cache=True))"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "2 kept, 0 broken" in done.stdout


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's components of more than one module (iterative: no recursion limit)."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
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
                    found.append(sorted(component))
    return found


def test_strongly_connected_finds_a_planted_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert strongly_connected(graph) == [["a", "b", "c"]]


def test_no_import_circles_anywhere():
    """Layers contracts cannot see a circle inside one floor; this looks at every module."""
    graph = grimp.build_graph(*PACKAGES, include_external_packages=False, cache_dir=None)
    edges = {m: graph.find_modules_directly_imported_by(m) for m in graph.modules}
    assert strongly_connected(edges) == []


def defined_names(path: pathlib.Path) -> set[str]:
    """Names a module defines itself (functions, classes, assignments), not ones it imports."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
        elif isinstance(node, (ast.If, ast.Try)):
            for sub in ast.walk(node):
                if isinstance(sub, (ast.FunctionDef, ast.ClassDef)):
                    names.add(sub.name)
                elif isinstance(sub, ast.Assign):
                    names.update(n.id for t in sub.targets for n in ast.walk(t)
                                 if isinstance(n, ast.Name))
    return names


def test_names_are_imported_from_where_they_are_defined():
    """No re-exports: `from X import name` and `X.name` take a name X defines, or a submodule."""
    files = {module_name(p): p for p in project_files()}
    files.update({module_name(p): p for p in (REPO / "tests").glob("*.py")})
    defined = {name: defined_names(path) for name, path in files.items()}
    wrong = []
    for path in [*project_files(), *(REPO / "tests").glob("*.py")]:
        tree, aliases = ast.parse(path.read_text()), {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in files:
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    if full in files:
                        aliases[alias.asname or alias.name] = full
                    elif alias.name not in defined[node.module]:
                        wrong.append(f"{path.relative_to(REPO)}:{node.lineno} imports "
                                     f"{alias.name} from {node.module}, which does not define it")
            elif isinstance(node, ast.Import):
                aliases.update({a.asname: a.name for a in node.names if a.asname and a.name in files})
        rebound = {n.id for n in ast.walk(tree)
                   if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
        for name in rebound:  # a local variable of the same name: not the module
            aliases.pop(name, None)
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in aliases):
                module = aliases[node.value.id]
                if (node.attr not in defined[module] and f"{module}.{node.attr}" not in files
                        and not node.attr.startswith("__")):
                    wrong.append(f"{path.relative_to(REPO)}:{node.lineno} uses {module}."
                                 f"{node.attr}, which {module} does not define")
    assert not wrong, "\n".join(sorted(set(wrong)))


def config_files() -> list[pathlib.Path]:
    return sorted(p for p in (REPO / "experiments/configs").rglob("*.py")
                  if "def get_config" in p.read_text())


def named_tasks(path: pathlib.Path) -> set[str]:
    """The tasks a config sets (`config.task = "..."`), and the one its default arguments give
    where it builds without arguments (distill.py needs a teacher run)."""
    tasks = set(re.findall(r"config\.task = \"(\w+)\"", path.read_text()))
    module, _, _ = load_config_module(str(path))
    try:
        tasks.add(module.get_config("").task)
    except ConfigError:
        pass
    return tasks


@pytest.mark.parametrize("path", config_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_config_names_a_task_of_one_of_the_three_tables(path):
    tasks = named_tasks(path)
    assert tasks and tasks <= set(registry.OBJECTIVES) | set(IMAGE_TASKS) | set(MULTIMODAL), tasks


@pytest.mark.parametrize("task", sorted(registry.OBJECTIVES))
def test_every_objective_module_has_what_the_registry_promises(task):
    module = registry.objective(task)
    assert any(hasattr(module, name) for name in registry.BUILDERS), module.__name__
    assert hasattr(module, "scores") == hasattr(module, "SCORES_FILE")
    assert hasattr(module, "encode_prompt") == hasattr(module, "render_output")
    assert not hasattr(module, "generate") or hasattr(module, "encode_prompt")
    hooks = {name for name in registry.HOOKS if hasattr(module, name)}
    # Old per-objective commands must not creep back: lm/commands.py holds them once.
    assert not {"train", "evaluate", "sample"} & set(vars(module)), module.__name__
    assert hooks <= set(registry.HOOKS)


@pytest.mark.parametrize("task", sorted(IMAGE_TASKS))
def test_every_image_task_module_builds_its_task(task):
    assert callable(importlib.import_module(IMAGE_TASKS[task]).build_task)


@pytest.mark.parametrize("task", sorted(MULTIMODAL))
def test_every_multimodal_task_module_builds_its_setup(task):
    assert callable(importlib.import_module(MULTIMODAL[task]).build)


def documented_commands() -> list[str]:
    """Every `python -m X` in the README, docs, Makefile, configs and docstrings of the code."""
    texts = [REPO / "README.md", REPO / "Makefile", *(REPO / "docs").rglob("*.md"),
             *project_files(), *(REPO / "tests").glob("*.py")]
    found = set()
    for path in texts:
        found.update(re.findall(r"python3? -m ([A-Za-z_][\w.]*\w)", path.read_text()))
    return sorted(m for m in found if m.split(".")[0] in PACKAGES)


def test_the_collector_finds_the_documented_entry_points():
    commands = documented_commands()
    assert {"experiments.main", "lm.eval.evaluate_tasks", "lm.data.corpora"} <= set(commands)


@pytest.mark.parametrize("module", documented_commands())
def test_every_documented_command_runs_at_its_path(module):
    """Each `python -m` module exists and imports (the move into wings left none behind)."""
    assert importlib.util.find_spec(module) is not None, f"python -m {module}: no such module"
    spec = importlib.util.find_spec(module)
    path = pathlib.Path(spec.origin)
    if path.name == "__init__.py":
        path = path.with_name("__main__.py")
    assert "__main__" in path.read_text(), f"python -m {module} has no __main__ block"
    importlib.import_module(module)


def entry_points() -> list[pathlib.Path]:
    """Modules with a `__main__` block (benchmarks print JSON for people, not commands)."""
    return [p for p in project_files() if 'if __name__ == "__main__":' in p.read_text()
            and not module_name(p).startswith("benchmarks.")]


def test_the_entry_point_collector_finds_the_commands():
    names = {module_name(p) for p in entry_points()}
    assert {"experiments.main", "lm.eval.evaluate_tasks", "launch.__main__"} <= names


@pytest.mark.parametrize("path", entry_points(), ids=module_name)
def test_every_entry_point_follows_the_error_convention(path):
    """core/cli.py: user errors end as one `error:` line and exit 2 only if every command ends in
    cli.main_entry(main) and parses with cli.ArgumentParser (argparse's own prints usage too)."""
    text = path.read_text()
    assert text.rstrip().endswith('if __name__ == "__main__":\n    cli.main_entry(main)'), (
        f"{path}: end with `cli.main_entry(main)`")
    assert "argparse.ArgumentParser(" not in text, f"{path}: use cli.ArgumentParser"
    assert not re.search(r"(sys\.exit|SystemExit)\(f?[\"']error", text), (
        f"{path}: raise a core.config.UserError instead of exiting with a message")
