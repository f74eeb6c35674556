"""The README's code runs as written: the Python API section's blocks (training, loading, features, an export
fine-tuned by transformers' own Trainer), and the example dataset, loss term and protocol of "Extending msn"."""

import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from msn.train import train
from tests.conftest import compose_config, metrics_rows

README = Path(__file__).resolve().parents[1] / "README.md"


def section(title: str) -> str:
    """The README's text from the heading ``title`` to the next heading of the same level."""
    text = README.read_text()
    level = re.match(r"#+", title).group(0)
    start = text.index(title + "\n")
    end = re.search(rf"^{level} ", text[start + len(title):], flags=re.M)
    return text[start:start + len(title) + end.start()] if end else text[start:]


def blocks(text: str) -> list[tuple[str, str]]:
    """The fenced code blocks of ``text``: (language, code), in order."""
    return re.findall(r"```(\w+)\n(.*?)```", text, flags=re.S)


def _images(root: Path) -> None:
    """``root/{train,validation}/{cats,dogs}/N.png``: a small ImageFolder, two colours for two classes."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 16), ("validation", 8)):
        for i in range(count):
            folder = root / split / ("cats" if i % 2 else "dogs")
            folder.mkdir(parents=True, exist_ok=True)
            pixels = rng.integers(0, 80, (40, 48, 3)).astype(np.uint8)
            pixels[..., i % 2] += 150
            Image.fromarray(pixels).save(folder / f"{i}.png")


def test_the_python_api_section_runs_as_written(tmp_path, monkeypatch, capsys, caplog):
    """The blocks in order, in one folder, as a user pastes them into a notebook (Python, in this process) or a
    shell (bash): train, load, extract, compose, create; export; fine-tune with transformers' Trainer."""
    _images(tmp_path / "my_images")
    monkeypatch.chdir(tmp_path)
    code = blocks(section("## Python API"))
    assert [language for language, _ in code] == ["python", "bash", "python"]
    for language, source in code:
        if language == "bash":
            result = subprocess.run(["bash", "-ec", source], capture_output=True, text=True, timeout=600)
            assert result.returncode == 0, f"{source}\n{result.stderr[-3000:]}"
            continue
        exec(compile(source, "README.md", "exec"), {"__name__": "__main__"})  # noqa: S102  (the README's code)
        out = capsys.readouterr().out
        if "msn.train(" in source:
            assert "torch.Size([24, 128])" in out  # the 24 images' features
            assert "outputs/cpu_smoke_optim.lr-5e-4" in out
            assert any(r.getMessage().startswith("run complete:") for r in caplog.records)
        if "Trainer(" in source:
            assert "eval_loss" in out
    assert (tmp_path / "outputs" / "cpu_smoke" / "checkpoints" / "last.pt").is_file()
    assert (tmp_path / "my-vit-msn" / "model.safetensors").is_file()
    assert any((tmp_path / "vit-msn-finetuned").glob("checkpoint-*"))


def test_the_extending_examples_train_and_evaluate(tmp_path, monkeypatch):
    """The ten-line dataset, the loss term and the protocol of "Extending msn", saved as a package of their own
    (their comments name the files), train and monitor a run."""
    extending = section("## Extending msn: your own data, loss terms and evaluations")
    package = tmp_path / "mypkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    dataset = blocks(section("### Your own dataset"))[0][1]
    assert len([line for line in dataset.splitlines() if line.strip()]) <= 12  # the "ten-line" example
    (package / "plankton.py").write_text(dataset)
    for _, source in blocks(extending):
        named = re.match(r"# (mypkg/\w+\.py)\n", source)
        if named:
            (tmp_path / named.group(1)).write_text(source)
    assert {p.name for p in package.iterdir()} == {"__init__.py", "plankton.py", "terms.py", "protocols.py"}
    monkeypatch.syspath_prepend(str(tmp_path))
    images = tmp_path / "plankton"
    _images(images)
    run = tmp_path / "run"
    train(compose_config([
        "experiment=cpu_smoke", "data=custom", f"data.dataset={{_target_:mypkg.plankton.Plankton,root:{images}}}",
        "data.global_size=32", "data.focal_size=16", "data.num_focal=2", "data.num_workers=0", "data.batch_size=8",
        "+loss.extra_terms.similarity={_target_:mypkg.terms.prototype_similarity,weight:0.1}",
        "monitor.every_steps=3", "monitor.protocol=mypkg.protocols.nearest_mean", "logger.progress=false",
        f"run_dir={run}"]))
    rows = metrics_rows(run)
    assert len(rows) == 6 and all(r["similarity"] not in ("", "nan") for r in rows)  # cpu_smoke: 6 steps
    assert 0 <= float(rows[-1]["monitor"]) <= 100


@pytest.mark.parametrize("command", [
    "msn-pretrain experiment=msn_vits16 loss=pmsn data.root=/data/train",
])
def test_the_pmsn_command_composes_as_documented(command, tmp_path):
    """``loss=pmsn`` on a paper preset: the power-law prior with the preset's other loss settings."""
    from msn.config import to_schema

    overrides = [o for o in command.split()[1:] if not o.startswith("data.root")]
    assert command in section("### PMSN: a power-law prior")
    cfg = to_schema(compose_config([*overrides, "data.root=.", f"run_dir={tmp_path}"]))
    assert (cfg.loss.prior, cfg.loss.prior_tau, cfg.loss.me_max_weight) == ("power_law", 0.25, 1.0)
    assert cfg.model.arch == "vit_small" and cfg.model.patch_size == 16


def test_the_own_images_command_fits_the_plan_the_readme_shows(tmp_path, monkeypatch):
    """The first command for one's own images is a folder and a budget; on 400 PNGs of 32 px (the README's example)
    the plan printed holds every line the README shows, and the command's run would train it. The README shows a
    machine of 2 cores: the plan is fitted to one, whatever this machine has."""
    from msn.train import fitting
    from msn.train.builder import local_process
    from msn.train.fitting import fit_composed

    monkeypatch.setattr(fitting, "cores_available", lambda: 2)
    monkeypatch.setattr(fitting.os, "cpu_count", lambda: 2)

    section_text = section("### Your own images: the recipe fitted to them")
    (command,) = [line for line in blocks(section_text)[0][1].splitlines() if line.startswith("msn-pretrain")]
    assert command.split()[1:] == ["data=folder", "data.root=~/my_images", "optim.budget=30m"]
    assert command in section("## Quick start and commands")
    root = tmp_path / "cifar_like"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(400):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3)).astype(np.uint8)).save(root / f"{i}.png")
    cfg = compose_config(["data=folder", f"data.root={root}", "optim.budget=30m", "device=cpu", f"run_dir={tmp_path}"])
    plan = fit_composed(cfg, local_process(cfg))
    printed = "\n".join(plan.lines())
    shown = blocks(section_text)[1][1].splitlines()[1:]  # after the command line
    for line in shown:
        if line.strip() != "...":
            assert line.split("(...)")[0].rstrip() in printed, line
    assert (cfg.data.global_size, cfg.model.arch, cfg.optim.budget) == (32, "vit_pico", "30m")
