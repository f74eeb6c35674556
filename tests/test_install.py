"""The package as a user installs it: the wheel carries the Hydra configs, and a user's own experiment files
outside the package compose with the shipped ones (``--config-dir`` or ``hydra.searchpath``).

.ci/run goes further: it installs the wheel without ``-e`` outside the checkout and trains and exports there.
"""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from msn.config import CONFIG_DIR

REPO = Path(__file__).resolve().parents[1]
USER_EXPERIMENT = """\
# @package _global_
defaults:
  - cpu_smoke  # a shipped experiment, extended
optim:
  max_steps: 2
model:
  num_prototypes: 24
"""


@pytest.mark.skipif(not (REPO / "pyproject.toml").is_file(), reason="needs the source tree")
def test_the_wheel_ships_every_config(tmp_path):
    source = tmp_path / "src"  # a copy, so the build leaves nothing in the checkout
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".git", "outputs", "multirun", "wandb", "build",
                                                                "dist", "*.egg-info", "__pycache__", ".gpu-site"))
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                             "-w", str(tmp_path / "dist"), str(source)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("msn-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"msn/configs/{p.relative_to(CONFIG_DIR).as_posix()}" for p in CONFIG_DIR.rglob("*.yaml")}
    assert len(shipped) >= 30 and "msn/configs/experiment/cpu_smoke.yaml" in shipped
    assert shipped <= names, sorted(shipped - names)
    assert "msn/py.typed" in names  # PEP 561: type checkers read the package's annotations
    # the Optuna sweeper Hydra finds in its hydra_plugins namespace (which must stay a namespace: no __init__.py)
    assert "hydra_plugins/msn_optuna_sweeper/__init__.py" in names and "hydra_plugins/__init__.py" not in names


def test_a_users_experiment_file_outside_the_package(tmp_path):
    (tmp_path / "my_configs" / "experiment").mkdir(parents=True)
    (tmp_path / "my_configs" / "experiment" / "my_run.yaml").write_text(USER_EXPERIMENT)
    result = subprocess.run(["msn-pretrain", "--config-dir", "my_configs", "experiment=my_run"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    run = tmp_path / "outputs" / "my_run"
    saved = OmegaConf.load(run / "config.yaml")
    assert (saved.optim.max_steps, saved.model.num_prototypes, saved.data.name) == (2, 24, "synthetic")
    assert (run / "checkpoints" / "last.pt").is_file()

    searchpath = f"hydra.searchpath=[file://{tmp_path / 'my_configs'}]"
    result = subprocess.run(["msn-pretrain", searchpath, "experiment=my_run", "--cfg", "job"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    job = OmegaConf.create(result.stdout)
    assert (job.optim.max_steps, job.model.num_prototypes) == (2, 24)
