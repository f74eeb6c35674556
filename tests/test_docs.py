"""The documentation site builds with warnings as errors: a page that names a function that no longer exists
(``::: msn.api.load_backbone`` in docs/api.md), a broken link or a missing anchor fails the suite."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not (REPO / "mkdocs.yml").is_file(), reason="needs the source tree")
def test_the_documentation_site_builds_strictly(tmp_path):
    source = tmp_path / "src"  # a copy: the build writes nothing into the checkout
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".git", "outputs", "multirun", "wandb", "build",
                                                                "dist", "site", "*.egg-info", "__pycache__",
                                                                ".gpu-site", "tests"))
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                            cwd=source, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    for name in ("load_backbone", "extract_features", "register_source", "register_protocol", "LossInputs"):
        assert name in api, name
    assert (tmp_path / "site" / "readme" / "index.html").is_file()  # the README is the site's guide

    (source / "docs" / "api.md").write_text("# API\n\n::: msn.api.no_such_function\n")  # the check can fail
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site2")],
                            cwd=source, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "msn.api.no_such_function" in result.stdout + result.stderr
