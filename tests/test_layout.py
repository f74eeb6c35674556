"""The package's shape: command-line modules are thin shells that no library module imports."""

import ast
from pathlib import Path

import msn

CLI_MODULES = {"msn.pretrain", "msn.export", "msn.evaluate", "msn.bench", "msn.viz"}  # console scripts
# msn.train.main hands over to msn-pretrain: python -m msn.train, and scripts installed when it was the entry point.
ENTRY_SHIMS = {"msn.train": {"msn.pretrain"}}
PACKAGE = Path(msn.__file__).parent


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)  # "from msn import evaluate"
    return names


def test_no_library_module_imports_a_cli_module():
    offenders = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(("msn", *path.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__")
        if module in CLI_MODULES:
            continue
        bad = _imports(path) & (CLI_MODULES - ENTRY_SHIMS.get(module, set()))
        if bad:
            offenders[module] = sorted(bad)
    assert not offenders, offenders


def test_cli_modules_import_no_other_cli_module():
    for module in CLI_MODULES:
        path = PACKAGE / f"{module.removeprefix('msn.')}.py"
        if path.is_file():
            assert not (_imports(path) & (CLI_MODULES - {module})), module


def test_every_help_is_plain_text_and_leads_with_our_usage(capsys):
    import re
    import subprocess

    import pytest

    import msn.bench
    import msn.evaluate
    import msn.export
    import msn.viz

    markup = re.compile(r"``|:(func|class|meth|mod):`")
    helps = [("msn-export", msn.export.main, ["--help"]), ("msn-eval", msn.evaluate.main, ["--help"])]
    helps += [("msn-bench", msn.bench.main, a) for a in (["--help"], *([c, "-h"] for c in ("step", "data", "e2e")))]
    helps += [("msn-viz", msn.viz.main, args) for args in (["--help"], *([kind, "-h"] for kind in msn.viz.KINDS))]
    for name, main, args in helps:
        with pytest.raises(SystemExit) as exit_:
            main(args)
        text = capsys.readouterr().out
        assert exit_.value.code == 0 and text.startswith(f"usage: {name}"), name
        assert not markup.search(text), (name, markup.search(text))
    result = subprocess.run(["msn-pretrain", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    assert result.stdout.startswith("msn-pretrain: self-supervised MSN pretraining of a Vision Transformer")
    assert "Where outputs go: outputs/RUN_NAME/" in result.stdout and "powered by Hydra" not in result.stdout
    assert not markup.search(result.stdout)


# Run in a fresh interpreter (pytest's own has torch loaded): each command's --help, a refused argument and a
# MODEL that does not exist, msn-pretrain on a finished run, then which of the heavy packages got imported.
_CHEAP_PATHS = r"""
import contextlib, io, sys
from pathlib import Path

from msn import bench, evaluate, export, pretrain, viz

done = Path("outputs/done")  # a finished run: msn-pretrain says so and stops
done.mkdir(parents=True)
(done / "status.json").write_text('{"status": "finished", "step": 9, "total_steps": 9}')
(done / "config.yaml").write_text("optim:\n  epochs: 3\n  max_steps: null\n")
empty = Path("empty")  # a folder that is neither a run with a checkpoint nor an hf export
empty.mkdir()

calls = [(export.main, ["--help"], None), (export.main, ["a", "b", "--format", "msn", "--encoder", "online"], None),
         (export.main, ["no_such_run", "out"], "no_such_run does not exist"),
         (export.main, ["empty", "out"], "empty is a folder without checkpoints/last.pt"),
         (evaluate.main, ["--help"], None), (evaluate.main, ["knn", "model", "--crop-pct", "0"], None),
         (evaluate.main, ["knn", "no_such_run"], "no_such_run does not exist"),
         (evaluate.main, ["knn", "empty"], "or a Hugging Face ViTMSN export"),
         (bench.main, ["--help"], None), (bench.main, ["step", "--steps", "0"], None),
         (viz.main, ["--help"], None), (viz.main, ["curves", "run", "--out", "curves.jpg"], None),
         (viz.main, ["attention", "no_such_run", "--out", "a.png"], "no_such_run does not exist"),
         (viz.main, ["prototypes", "no_such_run", "--out", "p.png"], "no_such_run does not exist"),
         (pretrain.main, ["--help"], None), (pretrain.main, ["optim.lr=-1"], None),
         (pretrain.main, ["model.arch=vit_nano"], None),
         (pretrain.main, ["run_name=done", "optim.epochs=3"], "outputs/done is complete (step 9 of 9)")]
for main, args, says in calls:
    sys.argv = ["msn", *args]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(args) if main is not pretrain.main else main()
        except SystemExit as e:
            code = e.code
    said = out.getvalue() + err.getvalue() + (code if isinstance(code, str) else "")
    answered = "--help" in args or "is complete" in (says or "")  # the rest are refused
    assert (code in (0, None)) == answered, (main.__module__, args, code)
    assert says is None or says in said, (args, said)
print(sorted({m.split(".")[0] for m in sys.modules} & {"torch", "torchvision", "timm", "transformers", "wandb"}))
"""


def test_help_and_refused_arguments_answer_without_importing_torch(tmp_path):
    """Every command checks its arguments (and msn-pretrain its config) before importing torch, torchvision
    and timm, which take about ten seconds on a 2-core CPU: ``--help`` and a typo answer in about one."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", _CHEAP_PATHS], capture_output=True, text=True, timeout=120,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"
