"""Published runs never used for calibration (docs/plan.md, validation table): every case prices and fits."""

import pytest

from gigafactory.plan.validation import CASES, price


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_validation_case_prices_on_its_published_layout(case):
    est, value = price(case)
    assert est.fits and est.layout.world <= 16384
    assert value > 0
    # not a tuned band: a wide sanity bound that a broken mechanism (2x off) fails
    assert 0.5 < value / case.published < 1.5, (case.name, value, case.published)
