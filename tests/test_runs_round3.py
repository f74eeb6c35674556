"""What a run says about itself (issue 37): the pace and ETA on its console lines, a run that ends inside its
warm-up, the evaluation that fits its data, a run whose last.pt is unreadable (resume and msn-export), and the
model card of a run capped by optim.max_steps. One short run serves them all."""

import logging
import re
import shutil
from pathlib import Path

import pytest

from msn.cli.export import main as export_main
from msn.train.loop import _next_steps, train
from msn.train.report import duration
from msn.utils.rundir import finished_run
from msn.weights.export import model_card
from msn.weights.read import read_source
from tests.conftest import compose_config


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[tuple[int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((record.levelno, record.getMessage()))


@pytest.fixture(scope="module")
def capped_run(tmp_path_factory):
    """cpu_smoke capped at 3 steps (4 an epoch, a 4-step warm-up): checkpoints step_0000003.pt and last.pt."""
    run = tmp_path_factory.mktemp("capped") / "run"
    lines, logger = _Lines(), logging.getLogger("msn")
    logger.addHandler(lines)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        train(compose_config(["experiment=cpu_smoke", f"run_dir={run}", "logger.progress=false",
                              "optim.max_steps=3", "logger.console_every=1"]))
    finally:
        logger.removeHandler(lines)
        logger.setLevel(old_level)
    return run, lines.lines


def test_console_lines_carry_the_pace_and_the_eta(capped_run):
    _, lines = capped_run
    steps = [text for _, text in lines if text.startswith("step ")]
    assert [s.split()[1] for s in steps] == ["1/3", "2/3", "3/3"]
    for text in steps:  # the fields the line always had are still there
        assert re.search(r" loss [\d.]+ \(ce [\d.]+ me_max [\d.]+\) lr [\d.e+-]+ .* \d+ img/s", text), text
    # the pace counts from the end of the first step (whose time is mostly start-up): from step 2 on
    assert "s/step" not in steps[0] and all(re.search(r" \d+ img/s [\d.e+-]+ s/step", s) for s in steps[1:])
    assert re.search(r"s/step ETA \d+ (s|min)", steps[1]) and "ETA" not in steps[-1]
    assert duration(42.4) == "42 s" and duration(365) == "6 min 05 s" and duration(7500) == "2 h 05 min"


def test_a_run_ending_inside_its_warmup_says_so_at_start_and_end_and_suggests_a_fitting_eval(capped_run):
    run, lines = capped_run
    warnings = [text for level, text in lines if level == logging.WARNING and "warm-up" in text]
    assert len(warnings) == 1 and "3 steps (optim.max_steps=3) against 4 warm-up steps" in warnings[0]
    end = next(text for _, text in lines if text.startswith("run complete:"))
    assert "note: the run ends inside its learning-rate warm-up" in end.splitlines()[0]
    # synthetic images have no labels: the evaluation needs a labelled set, not digits by default
    assert f"msn-eval lowshot {run} --dataset LABELLED_DIR" in end and "synthetic images" in end


@pytest.mark.parametrize("data, expected", [
    (["data=digits"], "RUN               # low-shot accuracy on digits"),
    (["data=fashion_mnist"], "RUN --dataset fashion_mnist --crop-pct 1"),
    (["data=folder", "data.root=ROOT/imagenet/train"], "RUN --dataset ROOT/imagenet "),
    (["data=folder", "data.root=ROOT/flat"], "RUN --dataset LABELLED_DIR "),
    (["data=folder", "data.root=ROOT/flat", "monitor.dataset=ROOT/labelled"], "RUN --dataset ROOT/labelled "),
])
def test_the_suggested_evaluation_fits_the_data(tmp_path, data, expected):
    (tmp_path / "imagenet" / "train").mkdir(parents=True)
    (tmp_path / "imagenet" / "val").mkdir()
    cfg = compose_config([o.replace("ROOT", str(tmp_path)) for o in data])
    lines = _next_steps(Path("RUN"), 5, cfg).splitlines()
    assert lines[2].strip().startswith("msn-eval lowshot " + expected.replace("ROOT", str(tmp_path))), lines[2]
    assert "warm-up" not in lines[0]


def test_an_unreadable_last_pt_is_named_and_never_exported_in_its_place(capped_run, tmp_path, caplog, capsys):
    run = tmp_path / "run"
    shutil.copytree(capped_run[0], run)
    last = run / "checkpoints" / "last.pt"
    cfg = compose_config(["experiment=cpu_smoke", "optim.max_steps=3"])
    assert finished_run(run, cfg) is not None  # msn-pretrain's check answers "complete" without training
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    assert finished_run(run, cfg) is None  # a broken last.pt: the run itself names the checkpoint it can read
    with caplog.at_level(logging.INFO, logger="msn"):
        train(compose_config(["experiment=cpu_smoke", f"run_dir={run}", "logger.progress=false", "optim.max_steps=3"]))
    periodic = run / "checkpoints" / "step_0000003.pt"
    done = next(r.getMessage() for r in caplog.records if "is complete" in r.getMessage())
    assert f"Its checkpoint is {periodic} ({last} is missing or unreadable" in done
    assert f"msn-export {periodic} OUT" in done

    out = tmp_path / "export"
    assert export_main([str(run), str(out), "--format", "timm"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{last} is not a readable checkpoint" in err
    assert f"its newest readable checkpoint is {periodic} (step 3), to export it: msn-export {periodic} {out} " \
           "--format timm" in err
    assert not out.exists()


def test_the_model_card_of_a_capped_run_says_what_was_done(capped_run, tmp_path):
    run, _ = capped_run
    card = model_card(read_source(run), "target")
    assert "| steps / epochs | 3 of 3 steps (optim.max_steps 3; optim.epochs 2 would be 8): 0.75 of an epoch of " \
           "4 steps |" in card
    alone = tmp_path / "last.pt"  # away from its run folder: no run.json tells the epoch's length
    shutil.copy(run / "checkpoints" / "last.pt", alone)
    card = model_card(read_source(alone), "target")
    assert "| steps / epochs | 3 steps (optim.max_steps 3, optim.epochs 2) |" in card
