"""msn.weights.checkpoint's file handling that the training runs do not reach on their own."""

from pathlib import Path

from msn.weights.checkpoint import periodic_name, prune_periodic


def _touch(folder: Path, *names: str) -> None:
    for name in names:
        (folder / name).write_bytes(b"x")


def test_prune_periodic_keeps_the_newest_up_to_the_step_and_nothing_else(tmp_path):
    others = ["last.pt", "step_final.pt", "notes.txt", f".{periodic_name(6)}.ab12.tmp"]
    _touch(tmp_path, *[periodic_name(s) for s in (1, 2, 3, 4, 5, 9)], *others)
    removed = prune_periodic(tmp_path, step=5, keep=2)
    assert sorted(p.name for p in removed) == [periodic_name(s) for s in (1, 2, 3)]
    # step 9 is later than the run's step (a rewind left it): it stays, as does every file not ours
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([periodic_name(4), periodic_name(5),
                                                                 periodic_name(9), *others])
    assert prune_periodic(tmp_path, step=9, keep=0) == []  # 0: keep everything
    assert len(list(tmp_path.iterdir())) == 7


def test_prune_periodic_orders_by_step_not_by_name(tmp_path):
    """Past step 9,999,999 the names grow a digit: ``step_10000000.pt`` sorts before ``step_9999999.pt``."""
    _touch(tmp_path, periodic_name(9_999_999), periodic_name(10_000_000))
    prune_periodic(tmp_path, step=10_000_000, keep=1)
    assert [p.name for p in tmp_path.iterdir()] == ["step_10000000.pt"]
