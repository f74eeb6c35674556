"""The package's shape: layered subpackages without import cycles, thin command-line modules that no library
module imports, no print() outside them, and commands that answer --help and typos before importing torch."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import msn

PACKAGE = Path(msn.__file__).parent
# Each layer may import the layers before it, never one after it; packages in one layer never import each other
# (data and models are built side by side). docs/design.md explains the order.
LAYERS = [("errors",), ("config",), ("utils",), ("data", "models"), ("weights",), ("eval",), ("plots",), ("plan",),
          ("train",), ("sweeps",), ("benchmarks",), ("api",), ("cli",)]
# Entry points (python -m): each imports exactly its target, and no module imports them.
SHIMS = {"msn.sweep": {"msn.cli.sweep"}, "msn.train.__main__": {"msn.cli.pretrain"}}
CLI_MODULES = {"msn.cli.pretrain", "msn.cli.export", "msn.cli.evaluate", "msn.cli.bench", "msn.cli.viz",
               "msn.cli.shards", "msn.cli.sweep"}  # console scripts and python -m msn.sweep


def _module_name(path: Path) -> str:
    return ".".join(("msn", *path.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__")


def _is_module(name: str) -> bool:
    rel = Path(*name.split(".")[1:])
    return (PACKAGE / rel).with_suffix(".py").is_file() or (PACKAGE / rel / "__init__.py").is_file()


def _msn_imports(path: Path) -> set[str]:
    """The msn modules ``path`` imports, at module level or inside functions: ``from msn.a import b`` names
    ``msn.a.b`` when that is a module, else ``msn.a``."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "msn")
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "msn":
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if _is_module(sub) else node.module)
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the msn modules it imports (itself left out), for every module of the package."""
    graph = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = _module_name(path)
        graph[name] = _msn_imports(path) - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (``[a, b, ..., a]``), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def layer_of(module: str) -> tuple[int, str] | None:
    """(rank, package) of a module in :data:`LAYERS`; None for ``msn`` itself and for the shims."""
    parts = module.split(".")
    if len(parts) < 2 or module in SHIMS:
        return None
    for rank, packages in enumerate(LAYERS):
        if parts[1] in packages:
            return rank, parts[1]
    raise AssertionError(f"{module} belongs to no layer: add its package to LAYERS (and to docs/design.md)")


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    """Every import of a later layer, or of a sibling package in the same layer."""
    bad = []
    for module, imports in graph.items():
        here = layer_of(module)
        for target in imports:
            there = layer_of(target)
            if here is None or there is None:
                continue
            if there[0] > here[0] or (there[0] == here[0] and there[1] != here[1]):
                bad.append(f"{module} imports {target}")
    return sorted(bad)


def test_the_package_has_no_import_cycle():
    graph = {m: deps for m, deps in import_graph().items() if m not in SHIMS}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_no_module_imports_a_later_layer():
    assert layer_violations(import_graph()) == []


def test_the_checks_find_a_cycle_and_an_upward_import():
    """The two checks above can fail: a cycle through a function-local import, and data importing models."""
    graph = import_graph()
    graph["msn.config.schema"] = graph["msn.config.schema"] | {"msn.config.checks"}  # checks imports schema
    assert find_cycle(graph) is not None
    graph = import_graph()
    graph["msn.data.loader"] = graph["msn.data.loader"] | {"msn.models.masking"}
    graph["msn.utils.device"] = graph["msn.utils.device"] | {"msn.train.step"}
    assert layer_violations(graph) == ["msn.data.loader imports msn.models.masking",
                                       "msn.utils.device imports msn.train.step"]


def test_function_local_imports_count(tmp_path, monkeypatch):
    source = tmp_path / "mod.py"
    source.write_text("def f():\n    from msn.train import loop\n    import msn.cli.pretrain\n")
    assert _msn_imports(source) == {"msn.train.loop", "msn.cli.pretrain"}


def test_no_library_module_imports_a_cli_module_and_shims_import_only_their_target():
    graph = import_graph()
    for module, imports in graph.items():
        if module in SHIMS:
            assert imports == SHIMS[module], module
        elif not module.startswith("msn.cli"):
            assert not {i for i in imports if i.startswith("msn.cli")}, module
        assert not imports & set(SHIMS), f"{module} imports an entry point"


def test_cli_modules_import_no_other_cli_module():
    graph = import_graph()
    for module in CLI_MODULES:
        assert not (graph[module] & (CLI_MODULES - {module})), module


def test_library_modules_print_nothing():
    """Library code logs (logging.getLogger("msn....")); only the commands print. The issue's own check:
    ``grep -rn "print(" msn --include=*.py`` finds msn/cli/ alone."""
    found = [f"{path.relative_to(PACKAGE.parent)}:{n}" for path in sorted(PACKAGE.rglob("*.py"))
             if "cli" not in path.relative_to(PACKAGE).parts
             for n, line in enumerate(path.read_text().splitlines(), 1) if "print(" in line]
    assert found == []


def test_the_unreleased_aliases_are_gone_and_import_msn_offers_the_api():
    """The import aliases of the layout that was never released are gone; ``import msn`` loads no torch and offers
    what a user calls; ``msn.train`` is both the package and the function; the callbacks config.yaml names exist."""
    code = """
import importlib, sys
import msn
assert "torch" not in sys.modules, "import msn imported torch"
for gone in ("msn.step", "msn.checkpoint", "msn.cli.hydra", "msn.weights.formats", "msn.data.datasets"):
    try:
        importlib.import_module(gone)
        raise SystemExit(f"{gone} still imports")
    except ModuleNotFoundError:
        pass
import msn.config
assert not hasattr(msn.config, "CheckBeforeRun") and not hasattr(msn.config, "_MOVED")
import msn.sweep
assert not hasattr(msn.sweep, "SweepSummary")  # an entry point (python -m msn.sweep), not an alias
for name in ("load_backbone", "extract_features", "create_backbone", "train", "register_source",
             "register_protocol", "compose_config"):
    assert name in msn.__all__ and callable(getattr(msn, name)), name
from msn.train.loop import train
import msn.train
assert msn.train.train is train and callable(msn.train)
from hydra.utils import get_class
from omegaconf import OmegaConf
from msn.config import CONFIG_DIR
callbacks = OmegaConf.load(CONFIG_DIR / "config.yaml").hydra.callbacks
for node in callbacks.values():
    get_class(node._target_)
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


def test_every_help_is_plain_text_and_leads_with_our_usage(capsys):
    import re
    import subprocess

    import msn.cli.bench
    import msn.cli.evaluate
    import msn.cli.export
    import msn.cli.shards
    import msn.cli.viz

    markup = re.compile(r"``|:(func|class|meth|mod):`")
    helps = [("msn-export", msn.cli.export.main, ["--help"]), ("msn-eval", msn.cli.evaluate.main, ["--help"]),
             ("msn-shards", msn.cli.shards.main, ["--help"])]
    helps += [("msn-bench", msn.cli.bench.main, a) for a in (["--help"], *([c, "-h"] for c in ("step", "data", "e2e")))]
    helps += [("msn-viz", msn.cli.viz.main, args)
              for args in (["--help"], *([kind, "-h"] for kind in msn.cli.viz.KINDS))]
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

import zipfile

from msn.cli import bench, evaluate, export, pretrain, shards, viz

done = Path("outputs/done")  # a finished run: msn-pretrain says so and stops
done.mkdir(parents=True)
(done / "status.json").write_text('{"status": "finished", "step": 9, "total_steps": 9}')
(done / "config.yaml").write_text("optim:\n  epochs: 3\n  max_steps: null\n")
(done / "checkpoints").mkdir()
with zipfile.ZipFile(done / "checkpoints" / "last.pt", "w") as z:  # (what torch writes is a zip file)
    z.writestr("archive/version", "3")
empty = Path("empty")  # a folder that is neither a run with a checkpoint nor an hf export
empty.mkdir()

calls = [(export.main, ["--help"], None), (export.main, ["a", "b", "--format", "msn", "--encoder", "online"], None),
         (export.main, ["no_such_run", "out"], "no_such_run does not exist"),
         (export.main, ["empty", "out"], "empty is a folder without checkpoints/last.pt"),
         (evaluate.main, ["--help"], None), (evaluate.main, ["knn", "model", "--crop-pct", "0"], None),
         (evaluate.main, ["knn", "no_such_run"], "no_such_run does not exist"),
         (evaluate.main, ["knn", "empty"], "or a Hugging Face ViTMSN export"),
         (evaluate.main, ["nearest", "empty"], "protocol='nearest' is not a registered evaluation protocol"),
         (evaluate.main, ["lowshot", "empty", "--k", "5"], "k does not apply to the lowshot protocol"),
         (bench.main, ["--help"], None), (bench.main, ["step", "--steps", "0"], None),
         (viz.main, ["--help"], None), (viz.main, ["curves", "run", "--out", "curves.jpg"], None),
         (viz.main, ["attention", "no_such_run", "--out", "a.png"], "no_such_run does not exist"),
         (viz.main, ["prototypes", "no_such_run", "--out", "p.png"], "no_such_run does not exist"),
         (shards.main, ["--help"], None), (shards.main, ["no_such_folder", "out"], "SRC no_such_folder does not exist"),
         (shards.main, ["empty", "out", "--per-shard", "0"], "--per-shard 0 must be >= 1"),
         (pretrain.main, ["--help"], None), (pretrain.main, ["optim.lr=-1"], None),
         (pretrain.main, ["model.arch=vit_nano"], None),
         (pretrain.main, ["data=custom"], "data=custom needs data.dataset._target_"),
         (pretrain.main, ["data=no_such_source"], "data=no_such_source is not an option of data"),
         (pretrain.main, ["data.name=no_such_source"], "data.name='no_such_source' is not a registered data source"),
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
