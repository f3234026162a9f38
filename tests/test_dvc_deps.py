"""dvc.yaml: every stage depends on every project module its script can import, so changed code re-runs it."""

import ast
from pathlib import Path

import yaml

from tests.conftest import ROOT


def _module_file(name: str) -> Path | None:
    for candidate in (ROOT / f"{name.replace('.', '/')}.py", ROOT / name.replace(".", "/") / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imported(path: Path) -> set[str]:
    """etesvs modules that ``path`` imports anywhere (also inside functions)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names if alias.name.startswith("etesvs")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("etesvs"):
            names.add(node.module)
            submodules = (f"{node.module}.{alias.name}" for alias in node.names)
            names |= {name for name in submodules if _module_file(name)}
    return names


def import_closure(script: Path) -> set[str]:
    """Project files (relative to the root) reachable from ``script`` by imports, packages' __init__ excluded."""
    seen: set[Path] = set()
    todo = [script]
    while todo:
        for name in _imported(todo.pop()):
            parts = name.split(".")
            for file in filter(None, (_module_file(".".join(parts[:i])) for i in range(1, len(parts) + 1))):
                if file not in seen:
                    seen.add(file)
                    todo.append(file)
    return {file.relative_to(ROOT).as_posix() for file in seen if file.name != "__init__.py"}


def test_every_stage_depends_on_the_code_it_imports():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        words = stage["cmd"].split()
        assert words[:2] == ["python", "-m"] and words[2].startswith("stages."), name  # see the test below
        script = words[2].replace(".", "/") + ".py"
        deps = [str(dep) for dep in stage["deps"]]
        assert script in deps, name
        missing = sorted(f for f in import_closure(ROOT / script)
                         if not any(f == dep or f.startswith(dep.rstrip("/") + "/") for dep in deps))
        assert not missing, f"{name}: dvc.yaml deps miss {missing}"


def test_a_stage_run_as_a_module_imports_the_package_beside_it(tmp_path):
    """``python -m stages.NAME`` puts the working directory first on sys.path, so a stage that DVC runs in a copy
    of the project (a queued experiment) imports that copy's etesvs, not the checkout of the editable install."""
    import subprocess
    import sys

    (tmp_path / "etesvs").mkdir()
    (tmp_path / "etesvs" / "__init__.py").write_text("COPY = True\n")
    (tmp_path / "stages").mkdir()
    (tmp_path / "stages" / "probe.py").write_text("import etesvs\nprint(etesvs.__file__)\n")
    run = lambda *command: subprocess.run([sys.executable, *command], cwd=tmp_path, capture_output=True,  # noqa: E731
                                          text=True, check=True).stdout.strip()
    assert Path(run("-m", "stages.probe")) == tmp_path / "etesvs" / "__init__.py"
    installed = Path(run("-c", "import sys; sys.path.pop(0); import etesvs; print(etesvs.__file__)"))
    assert installed != tmp_path / "etesvs" / "__init__.py"  # what `python stages/probe.py` would have imported


def test_feature_extraction_does_not_depend_on_the_temporal_models():
    closure = import_closure(ROOT / "stages" / "extract_features.py")
    assert "etesvs/models/i3d.py" in closure
    assert not any(f.startswith("etesvs/models/") and f != "etesvs/models/i3d.py" for f in closure), closure
