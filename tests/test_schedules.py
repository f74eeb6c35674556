import pytest
import torch

from msn.schedules import Schedules


def _from_reference(c: dict) -> Schedules:
    ipe, epochs = int(c["iterations_per_epoch"]), int(c["epochs"])
    return Schedules(
        total_steps=epochs * ipe, warmup_steps=int(float(c["warmup_epochs"]) * ipe), lr=float(c["lr"]),
        start_lr=float(c["start_lr"]), final_lr=float(c["final_lr"]), weight_decay=float(c["weight_decay"]),
        final_weight_decay=float(c["final_weight_decay"]), momentum=0.996, final_momentum=1.0,
        sharpen_T=0.25, final_sharpen_T=0.25, stretch=float(c["stretch"]),
    )


@pytest.mark.parametrize("case", ["schedule_vits16_like", "schedule_no_stretch"])
def test_matches_original_implementation(reference, case):
    c = reference[case]
    s = _from_reference(c)
    steps = range(s.total_steps)
    for name, fn in (("lr_per_step", s.lr_at), ("wd_per_step", s.wd_at), ("momentum_per_step", s.momentum_at)):
        ours = torch.tensor([fn(i) for i in steps], dtype=torch.float64)
        torch.testing.assert_close(ours, c[name], atol=1e-10, rtol=0, msg=name)


def _schedules(**kw) -> Schedules:
    base = dict(total_steps=100, warmup_steps=10, lr=1e-3, start_lr=2e-4, final_lr=1e-6, weight_decay=0.04,
                final_weight_decay=0.4, momentum=0.996, final_momentum=1.0, sharpen_T=0.25, final_sharpen_T=0.25)
    return Schedules(**{**base, **kw})


def test_shapes_without_stretch():
    s = _schedules()
    lrs = [s.lr_at(i) for i in range(100)]
    assert all(a < b for a, b in zip(lrs[:9], lrs[1:10], strict=True))  # linear warm-up
    assert max(lrs) == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[9:-1], lrs[10:], strict=True))  # cosine decay
    assert lrs[-1] == pytest.approx(1e-6)  # reaches the floor at the end of an unstretched run
    assert s.wd_at(99) == pytest.approx(0.4)
    assert s.momentum_at(0) == 0.996 and s.momentum_at(100) == pytest.approx(1.0)


def test_stretch_stops_short_of_final_values():
    s = _schedules(stretch=1.25)
    assert s.lr_at(99) > 5e-5  # the original's runs end with lr around 1e-4 of a 1e-3 peak
    assert s.momentum_at(99) < 1.0
    assert s.wd_at(99) < 0.4


def test_sharpening_temperature_schedule():
    s = _schedules(sharpen_T=0.25, final_sharpen_T=0.1)
    assert s.sharpen_T_at(0) == 0.25
    assert s.sharpen_T_at(50) == pytest.approx(0.175)
    assert s.sharpen_T_at(100) == pytest.approx(0.1)
    assert _schedules().sharpen_T_at(70) == 0.25


def test_schedules_are_pure_functions_of_the_step():
    a, b = _schedules(), _schedules()
    assert [a.lr_at(i) for i in (57, 3, 57)] == [b.lr_at(57), b.lr_at(3), b.lr_at(57)]
