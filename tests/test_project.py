"""What a new user of the repository finds: a licence matching the dependencies, and generated files ignored."""

from __future__ import annotations

from tests.conftest import ROOT


def test_mit_licence_and_the_usual_ignores():
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    pyproject = (ROOT / "pyproject.toml").read_text().splitlines()
    assert 'license = "MIT"' in pyproject  # an SPDX expression: setuptools 77+ deprecates the {text = ...} table
    assert 'requires = ["setuptools>=77"]' in pyproject
    ignored = (ROOT / ".gitignore").read_text().splitlines()
    for pattern in (".venv/", "/data/", "/logs/", "dvc_plots/", "__pycache__/", "/.dvc/plots_page.html"):
        assert pattern in ignored, pattern
