"""Young's and Daly's formulas and the expected-ETTR expression, checked against hand values and each other."""

import math

import pytest

from gigafactory.simulate import analytic


def test_young_is_sqrt_two_delta_m():
    assert analytic.young_interval(60.0, 3600.0) == pytest.approx(math.sqrt(2 * 60 * 3600))


def test_daly_hand_value():
    # delta = 120 s, M = 7200 s: x = delta / 2M = 1/120
    x = 120 / 14400
    want = math.sqrt(2 * 120 * 7200) * (1 + math.sqrt(x) / 3 + x / 9) - 120
    assert analytic.daly_interval(120.0, 7200.0) == pytest.approx(want)
    assert analytic.daly_interval(120.0, 7200.0) == pytest.approx(1235.75, abs=0.01)


def test_daly_caps_at_m_when_checkpoints_are_expensive():
    assert analytic.daly_interval(500.0, 200.0) == 200.0


@pytest.mark.parametrize("delta,mtbi", [(10.0, 3600.0), (60.0, 1800.0), (300.0, 86400.0), (120.0, 7200.0)])
def test_daly_matches_the_exact_optimum_of_the_ettr_expression(delta, mtbi):
    exact = analytic.exact_optimum_interval(delta, 600.0, mtbi)
    assert analytic.daly_interval(delta, mtbi) == pytest.approx(exact, rel=0.01)
    # Young is first order: further from the optimum than Daly, on the high side
    assert abs(analytic.young_interval(delta, mtbi) - exact) > abs(analytic.daly_interval(delta, mtbi) - exact)


def test_expected_ettr_limits():
    # no failures: only the checkpoint stall costs time
    assert analytic.expected_ettr(900.0, 100.0, 600.0, math.inf) == pytest.approx(0.9)
    # rare failures: ETTR -> tau / (tau + delta) from below
    rare = analytic.expected_ettr(900.0, 100.0, 600.0, 1e12)
    assert rare < 0.9 and rare == pytest.approx(0.9, rel=1e-6)
    # first order in 1/M: ETTR ~ tau / (tau + delta) * (1 - (tau + delta) / (2M) - R/M)
    tau, delta, r, m = 600.0, 30.0, 120.0, 360000.0
    approx = tau / (tau + delta) * (1 - (tau + delta) / (2 * m) - r / m)
    assert analytic.expected_ettr(tau, delta, r, m) == pytest.approx(approx, abs=1e-4)


def test_detection_enters_linearly_and_zero_detection_is_daly_eq13():
    tau, delta, r, m, d = 900.0, 60.0, 300.0, 3600.0, 200.0
    daly_eq13 = m * math.exp(r / m) * math.expm1((tau + delta) / m)
    assert analytic.expected_ettr(tau, delta, r, m) == pytest.approx(tau / daly_eq13)
    # E[recovery] = D e^{R/M} + M (e^{R/M} - 1): the segment time grows by D e^{R/M} (e^{(tau+delta)/M} - 1)
    with_d = tau / analytic.expected_ettr(tau, delta, r, m, d)
    assert with_d - daly_eq13 == pytest.approx(d * math.exp(r / m) * math.expm1((tau + delta) / m))
