"""The scaling bootstrap's range is the 16th-84th percentile of its draws (README, `lmpipe
scaling`): checked on draws whose values are known, the fit replaced by a counter."""

from __future__ import annotations

import math

import numpy as np
import pytest

import lmpipe.train.scaling as scaling
from lmpipe.train.scaling import PowerLaw, bootstrap


def test_bootstrap_reports_the_16th_and_84th_percentiles_of_its_draws(monkeypatch):
    # The k-th resample's fit (k = 1..101) is a = e^k, b = k, c = k / 100. Over 1..101, numpy's
    # linear percentile q sits at 1 + q: 17 and 85; the sample std (ddof 1) of 1..n is
    # sqrt(n (n + 1) / 12) = sqrt(858.5).
    fits = iter(range(1, 102))

    def counter(flops, loss):
        k = next(fits)
        return PowerLaw(a=math.exp(k), b=float(k), c=k / 100)

    monkeypatch.setattr(scaling, "fit_power_law", counter)
    flops = np.logspace(18, 22, 20)  # 20 distinct budgets: every resample has 3 or more
    spread = bootstrap(flops, np.linspace(3.0, 2.0, 20), samples=101)
    assert (spread["samples"], spread["used"]) == (101, 101)
    assert spread["b"] == pytest.approx({"std": math.sqrt(858.5), "p16": 17.0, "p84": 85.0})
    assert spread["c"] == pytest.approx({"std": math.sqrt(858.5) / 100, "p16": 0.17, "p84": 0.85})
    assert spread["a"] == pytest.approx(
        {"log_std": math.sqrt(858.5), "p16": math.exp(17), "p84": math.exp(85)}
    )
