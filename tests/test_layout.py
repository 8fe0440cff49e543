"""The package's layout: every import points down the stages, no import circle, modules readable in
one sitting, empty `__init__.py` files, and the modules that must load without TensorFlow do."""

import ast
import pathlib
import subprocess
import sys

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "trainer"

# From the ground up: a module may import its own layer (without a circle) and the layers below,
# never a later one. Stages come in the order a model is made: prepare -> data -> train -> serve
# (the exported model and how it is loaded) -> evaluate (scores the model as served) -> release.
LAYERS = [
    ("trainer", "trainer.errors"),
    ("trainer.infra",),
    ("trainer.formats",),
    ("trainer.config",),
    ("trainer.prepare",),
    ("trainer.data",),
    ("trainer.train",),
    ("trainer.serve",),
    ("trainer.evaluate",),
    ("trainer.release",),
    ("trainer.cli",),
]
MAX_LINES = 400
# What answers before TensorFlow loads (`--help`, flag errors, planning, promotion).
TENSORFLOW_FREE = ["trainer.cli", "trainer.config", "trainer.errors", "trainer.infra.storage", "trainer.infra.cas",
                   "trainer.infra.folders", "trainer.infra.faults", "trainer.infra.tfstart", "trainer.infra.localgcs",
                   "trainer.formats.manifest", "trainer.formats.jobdir", "trainer.formats.lease",
                   "trainer.formats.modeldir", "trainer.formats.production", "trainer.formats.tfrecord",
                   "trainer.formats.imagefiles", "trainer.formats.timestamps", "trainer.prepare.run",
                   "trainer.prepare.plan", "trainer.prepare.catalog", "trainer.formats.labelfile",
                   "trainer.prepare.shards", "trainer.prepare.runners", "trainer.prepare.preview",
                   "trainer.evaluate.gate", "trainer.release.promote", "trainer.release.registry",
                   "trainer.infra.figures", "trainer.infra.tracking", "trainer.infra.devices", "trainer.infra.beam"]


def module_name(path):
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules():
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imports(path, known):
    """The package's modules that `path` imports, anywhere in the file (inside functions too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "trainer":
            # `from trainer.evaluate import gate` imports a module; `from trainer.errors import UserError` a name.
            names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in known else node.module
                     for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def layer_of(name):
    for index, prefixes in enumerate(LAYERS):
        if any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes if prefix != "trainer") \
                or name == "trainer":
            return index
    raise AssertionError(f"{name} is on no layer of LAYERS: add its package there")


def test_every_import_points_down_the_stages_and_none_runs_in_a_circle():
    known = modules()
    graph = {name: imports(path, known) - {name} for name, path in known.items()}
    upward = [f"{name} -> {target}" for name, targets in graph.items() for target in targets
              if layer_of(target) > layer_of(name)]
    assert not upward, f"imports of a later stage: {upward}"
    assert circles(graph) == []


def circles(graph):
    """The modules of `graph` ({module: imported modules}) that reach themselves through imports."""
    found = []
    for start in graph:
        seen, frontier = set(), set(graph[start])
        while frontier:
            current = frontier.pop()
            if current == start:
                found.append(start)
                break
            if current not in seen:
                seen.add(current)
                frontier |= graph.get(current, set())
    return found


def test_the_checker_sees_an_upward_import_and_a_circle(tmp_path):
    # The rule above would pass vacuously if `imports` found nothing: it must see these.
    late = tmp_path / "late.py"
    late.write_text("from trainer.release import promote\n\ndef f():\n    from trainer.cli import main\n")
    known = modules()
    assert imports(late, known) == {"trainer.release.promote", "trainer.cli"}
    assert layer_of("trainer.data.pipeline") > layer_of("trainer.formats.manifest")
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c"]


def test_modules_are_readable_in_one_sitting_and_init_files_are_empty():
    long = {name: len(path.read_text().splitlines()) for name, path in modules().items()}
    assert {name: lines for name, lines in long.items() if lines > MAX_LINES} == {}
    faces = [path for path in PACKAGE.rglob("__init__.py") if path.parent != PACKAGE]
    assert faces and all(path.read_text() == "" for path in faces)


def test_the_tensorflow_free_modules_load_without_tensorflow():
    code = (f"import sys; import {', '.join(TENSORFLOW_FREE)}; "
            "heavy = [name for name in ('tensorflow', 'tf_keras', 'keras', 'sklearn', 'matplotlib') "
            "if name in sys.modules]; print(heavy); sys.exit(bool(heavy))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("command", ["prepare", "train", "evaluate", "predict", "promote", "tflite"])
def test_help_and_flag_errors_answer_without_tensorflow(command):
    for argument, exit_code in (("--help", 0), ("--no_such_flag=1", 1)):
        code = (f"import sys; from trainer import cli\ntry:\n    cli.main(['trainer', {command!r}, {argument!r}])\n"
                f"except SystemExit as end:\n    assert end.code == {exit_code}, end.code\n"
                "assert 'tensorflow' not in sys.modules\n")
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        shown = result.stdout if exit_code == 0 else result.stderr
        assert f"trainer {command}" in shown, shown
