"""The stage table drives dvc.yaml, and each stage depends on every source file it runs.

A code change that can alter a stage's output must make DVC rerun that stage: the committed
dvc.yaml is the generated one, a stage's code dependencies include every module it imports
(checked against what Python actually loads), and with the real DVC, touching the dictionary
module reports train, evaluate and what follows as changed while touching an unrelated module
reports nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sae_clt.stages.code_deps import code_deps
from sae_clt.stages.dvc_yaml import render
from sae_clt.stages.table import STAGES, run_targets, tracked_sections

REPO = Path(__file__).resolve().parents[1]


def test_committed_dvc_yaml_is_the_one_the_stage_table_generates():
    assert (REPO / "dvc.yaml").read_text() == render(), "dvc.yaml is stale: run `saeclt dvc-yaml` and commit it"


@pytest.mark.parametrize("stage", [s for s in STAGES if not s.always_changed], ids=lambda s: s.name)
def test_a_stage_depends_on_every_module_python_loads_to_run_it(stage):
    code = (f"import sys, {stage.module}; "
            "print('\\n'.join(m.__file__ for n, m in list(sys.modules.items()) if n.startswith('sae_clt') and getattr(m, '__file__', None)))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    loaded = {str(Path(f).resolve().relative_to(REPO)) for f in done.stdout.split()}
    assert loaded, "nothing of sae_clt was loaded"
    missing = loaded - set(code_deps(stage.module))
    assert not missing, f"{stage.name} runs {sorted(missing)} but does not depend on them"


def test_compiled_kernel_sources_and_report_templates_are_dependencies_of_the_stages_that_use_them():
    assert any(p.startswith("sae_clt/") and "kernel" in p for p in code_deps("sae_clt.stages.train"))
    assert any("templates" in p for p in code_deps("sae_clt.stages.report"))


def test_sections_a_spec_must_write_out_come_from_the_stages_that_read_them():
    from sae_clt.spec.models import TRACKED_SECTIONS

    assert TRACKED_SECTIONS["experiments"] == ["dataset", "source", "target", "model", "train", "evaluate", "export"]
    assert TRACKED_SECTIONS["datasets"] == tracked_sections("datasets") == ["subject", "collect", "normalize"]
    assert run_targets("x") == ["train@x", "evaluate@x", "analyze@x", "report@x", "export@x"]


def _status(root: Path) -> dict:
    done = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=root, capture_output=True, text=True,
                          env=dict(os.environ, DVC_NO_ANALYTICS="1"))
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout or "{}")


def _changed_deps(status: dict, stage: str) -> set[str]:
    return {p for entry in status.get(stage, []) if isinstance(entry, dict) for p in entry.get("changed deps", {})}


def test_touching_code_a_stage_runs_makes_dvc_rerun_it_and_unrelated_code_does_not(dvc_project):
    root = dvc_project
    done = subprocess.run([sys.executable, "-m", "sae_clt", "run", "specs/tiny_sae.yaml"], cwd=root, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _status(root) == {}

    unrelated = root / "sae_clt" / "interop" / "formats.py"  # convert's formats: no stage runs it
    assert "sae_clt/interop/formats.py" not in {p for s in STAGES if not s.always_changed for p in code_deps(s.module)}
    unrelated.write_text(unrelated.read_text() + "\n# a comment\n")
    assert _status(root) == {}

    dictionary = root / "sae_clt" / "dictionaries" / "dictionary.py"
    dictionary.write_text(dictionary.read_text() + "\n# a comment\n")
    changed = {name for name, entries in _status(root).items() if any(isinstance(e, dict) for e in entries)}
    assert {"train@tiny_sae", "evaluate@tiny_sae", "export@tiny_sae"} <= changed

    evaluate_code = [p for p in code_deps("sae_clt.stages.evaluate")]
    for rel in evaluate_code:  # every module the evaluate stage runs, each touched
        path = root / rel
        path.write_text(path.read_text() + ("\n# a comment\n" if path.suffix == ".py" else "\n"))
    assert set(evaluate_code) <= _changed_deps(_status(root), "evaluate@tiny_sae")


def _import_graph() -> dict[str, set[str]]:
    from sae_clt.stages.code_deps import PACKAGE_DIR, _imported, module_name

    return {module_name(p): _imported(p, PACKAGE_DIR)[0] for p in PACKAGE_DIR.rglob("*.py")}


def test_the_package_has_no_import_cycle_even_through_function_local_imports():
    graph = _import_graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for dep in graph.get(name, ()):
            if dep not in graph or dep == name:
                continue
            assert state.get(dep) != 1, f"import cycle: {' -> '.join(path[path.index(dep):] + [name, dep]) if dep in path else name + ' -> ' + dep}"
            if dep not in state:
                visit(dep, path + [name])
        state[name] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])


def test_no_function_in_the_package_is_longer_than_80_lines():
    import ast

    from sae_clt.stages.code_deps import PACKAGE_DIR

    long = []
    for path in PACKAGE_DIR.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 80:
                long.append(f"{path.relative_to(PACKAGE_DIR)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, long


# Modules that `saeclt --help` and `saeclt validate` load: they import nothing heavy at the top
# and may defer saeclt's own torch-loading modules to the functions that need them.
LIGHT_MODULES = ("cli.py", "__main__.py", "spec/validation.py", "dictionaries/activations.py")


def test_help_and_validate_load_no_torch_at_import():
    code = "import sys, sae_clt.cli, sae_clt.spec.validation, sae_clt.spec.models; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.strip() == "False", done.stderr[-2000:]


def test_function_local_imports_are_only_of_heavy_third_party_modules():
    """An import inside a function is there to keep `saeclt --help` and `validate` fast: the light
    modules they load may defer anything, other modules only heavy third-party packages (torch,
    transformers, dvc, ...). The standard library and saeclt's own modules are imported at the
    top, where a reader sees them."""
    import ast

    from sae_clt.stages.code_deps import PACKAGE_DIR

    light = set(sys.stdlib_module_names) | {"sae_clt"}
    found = []
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        if path.relative_to(PACKAGE_DIR).as_posix() in LIGHT_MODULES:
            continue
        for fn in ast.walk(ast.parse(path.read_text())):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.ImportFrom) and (node.level > 0 or (node.module or "").split(".")[0] in light):
                    found.append(f"{path.relative_to(PACKAGE_DIR)}:{node.lineno} {ast.unparse(node)}")
                elif isinstance(node, ast.Import) and any(a.name.split(".")[0] in light for a in node.names):
                    found.append(f"{path.relative_to(PACKAGE_DIR)}:{node.lineno} {ast.unparse(node)}")
    assert not found, found
