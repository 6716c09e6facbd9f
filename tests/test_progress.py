"""Progress lines (cfg.progress) and the one log format (cfg.log), with a fake clock: no timed assertions."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cfg.progress import Progress, fmt_rate, fmt_seconds
from tests.conftest import ROOT


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def make(total=100, every_s=0.0, **kw):
    clock, lines = Clock(), []
    return (
        Progress("train", total, "steps", every_s=every_s, log=lines.append, clock=clock, **kw),
        clock,
        lines,
    )


def test_first_line_is_warm_up_then_the_eta_comes_from_the_smoothed_rate():
    p, clock, lines = make(total=100, smoothing=0.5)
    clock.t += 30  # a slow start: compilation, data loading
    first = p.update(10)
    assert first == "10% 10/100 steps, 0m30s elapsed, ETA after warm-up"
    clock.t += 2  # 10 steps in 2 s
    assert p.update(20) == "20% 20/100 steps, 0m32s elapsed, 5.00 steps/s, ETA 0m16s"
    clock.t += 1  # 10 steps in 1 s: EMA 0.5·10 + 0.5·5 = 7.5 steps/s, 70 steps left
    assert p.update(30, "loss 0.25") == "30% 30/100 steps, 0m33s elapsed, 7.50 steps/s, ETA 0m09s, loss 0.25"
    assert p.rate == pytest.approx(7.5) and p.eta_s(30) == pytest.approx(70 / 7.5)
    clock.t += 10
    assert p.update(100) == "100% 100/100 steps, 0m43s elapsed, 2.33 steps/s overall"
    assert len(lines) == 4 and lines[0] == first


def test_the_start_up_does_not_make_the_first_eta_too_long():
    """The stage of the issue: a slow first interval, then steady running. The ETA after warm-up is the true
    time left, where an average from the start would overestimate it."""
    p, clock, _ = make(total=800, smoothing=0.3)
    clock.t += 60  # the first 50 steps take a minute
    p.update(50)
    for step in range(100, 800, 50):  # then 50 steps every 5 s
        clock.t += 5
        p.update(step)
        # the mean rate since the start would say 455 s at step 100, not 70 s
        assert p.eta_s(step) == pytest.approx((800 - step) / 10)


def test_lines_are_throttled_but_the_last_unit_always_shows():
    p, clock, lines = make(total=10, every_s=5.0)
    for step in range(1, 11):
        clock.t += 1
        p.update(step)
    # t = 1 (first), 6 (five seconds later) and the last
    assert [line.split(",")[0] for line in lines] == ["10% 1/10 steps", "60% 6/10 steps", "100% 10/10 steps"]


def test_a_total_learnt_late_and_a_resumed_start():
    p, clock, lines = make(total=0, start=40)
    clock.t += 3
    p.update(50, total=100)
    clock.t += 1
    p.update(60)
    clock.t += 2
    p.update(100)
    assert lines[0].startswith("50% 50/100 steps") and "10.0 steps/s" in lines[1]
    assert lines[-1].endswith("10.0 steps/s overall")  # 60 steps of this run in 6 s, not 100


def test_slow_loops_show_seconds_per_unit():
    p, clock, lines = make(total=15)
    for epoch in range(1, 4):
        clock.t += 25.6
        p.update(epoch)
    assert lines[-1] == "20% 3/15 steps, 1m17s elapsed, 25.6 s/step, ETA 5m07s"


def test_rates_keep_three_digits_and_times_are_readable():
    assert [fmt_rate(r) for r in (1234.5, 29.43, 5, 1.234, 0.0512)] == [
        "1,234",
        "29.4",
        "5.00",
        "1.23",
        "0.0512",
    ]
    assert [fmt_seconds(s) for s in (0, 12.4, 537, 3725)] == ["0m00s", "0m12s", "8m57s", "1h02m"]


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"total": -1}, "total must be >= 0 steps, got -1"),
        ({"smoothing": 0}, r"smoothing must lie in \(0, 1\], got 0"),
    ],
)
def test_bad_settings_are_refused_with_the_value(kw, message):
    with pytest.raises(ValueError, match=message):
        Progress("x", **{"total": 1, "unit": "steps", **kw})


LOGGING = """
import logging, optuna
from cfg.log import get_logger, setup
from cfg.search.worker import quiet_optuna
setup()
quiet_optuna()
get_logger("train p_uncond=0.1").info("hello")
get_logger("evaluate").warning("a degenerate cell")
logging.getLogger("mlflow.tracking").info("View run cell at http://...")
logging.getLogger("mlflow.store").warning("mlflow warns")
study = optuna.create_study()
study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
logging.getLogger("optuna.study").warning("optuna warns")
"""


def test_one_log_format_and_quiet_libraries():
    out = subprocess.run(
        [sys.executable, "-c", LOGGING], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    lines = out.stderr.strip().splitlines()
    shown = [line.split(" ", 1)[1] for line in lines]  # without the HH:MM:SS time
    assert all(line[:2].isdigit() and line[2] == ":" for line in lines), lines
    assert shown == [
        "[train p_uncond=0.1] hello",
        "[evaluate] WARNING: a degenerate cell",
        "[mlflow.store] WARNING: mlflow warns",
        "[optuna.study] WARNING: optuna warns",
    ]
    assert "Trial 0 finished" not in out.stderr and "A new study created" not in out.stderr
