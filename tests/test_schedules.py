import math

import pytest
import torch

from msn.train.schedules import Schedules


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


def test_momentum_and_temperature_use_the_float_span_lr_and_wd_the_integer_one():
    """143 steps stretched by 1.25: the original's momentum and sharpening increments divide by the float
    178.75, while its lr / wd schedulers run over ``T_max = int(178.75) = 178`` (msn_train.py)."""
    s = _schedules(total_steps=143, warmup_steps=15, stretch=1.25, sharpen_T=0.25, final_sharpen_T=0.1)
    momentum_step = (1.0 - 0.996) / (143 * 1.25)
    T_step = (0.1 - 0.25) / (143 * 1.25)
    for i in range(143):
        assert s.momentum_at(i) == pytest.approx(0.996 + momentum_step * i, abs=1e-15)
        assert s.sharpen_T_at(i) == pytest.approx(0.25 + T_step * i, abs=1e-15)
    assert abs(s.momentum_at(142) - (0.996 + 0.004 * 142 / 178)) > 1e-5  # what the integer span would give
    # lr after k = i + 1 increments: cosine over T_max - warmup = 178 - 15 steps.
    k = 143
    expected_lr = 1e-6 + (1e-3 - 1e-6) * 0.5 * (1 + math.cos(math.pi * (k - 15) / (178 - 15)))
    assert s.lr_at(142) == pytest.approx(expected_lr, abs=1e-15)
    expected_wd = 0.4 + (0.04 - 0.4) * 0.5 * (1 + math.cos(math.pi * k / 178))
    assert s.wd_at(142) == pytest.approx(expected_wd, abs=1e-15)
    hp = s.at(142)
    assert (hp.lr, hp.weight_decay, hp.momentum, hp.sharpen_T) == (s.lr_at(142), s.wd_at(142), s.momentum_at(142),
                                                                    s.sharpen_T_at(142))
