"""Closed-form expectations for exponential failures, used to pick intervals and to check the simulation.

Notation (Daly 2006): M = mean time between job-killing failures, delta = checkpoint stall, R = restart time,
D = detection time, tau = compute time between checkpoints. Failures may strike during a checkpoint or a restart (the
restart begins again after detection); during detection the job is already dead, so a failure there adds nothing.

- Young (1974): tau = sqrt(2 delta M).
- Daly (2006), "A higher order estimate of the optimum checkpoint interval for restart dumps", FGCS 22(3):
  tau = sqrt(2 delta M) [1 + sqrt(delta/(2M))/3 + delta/(18M)] - delta   for delta < 2M, else tau = M.
- Expected wall time per segment of tau work: (M + E[recovery]) (e^{(tau+delta)/M} - 1), with
  E[recovery] = D e^{R/M} + M (e^{R/M} - 1), so ETTR = tau / ((M + D) e^{R/M} (e^{(tau+delta)/M} - 1)).
  With D = 0 this is Daly's eq. (13) per segment, M e^{R/M} (e^{(tau+delta)/M} - 1). D enters linearly, so a
  rate-weighted mean detection time over failure classes is exact.
"""

from __future__ import annotations

import math


def young_interval(delta_s: float, mtbi_s: float) -> float:
    """Young's first-order optimum compute time between checkpoints."""
    return math.sqrt(2.0 * delta_s * mtbi_s)


def daly_interval(delta_s: float, mtbi_s: float) -> float:
    """Daly's higher-order optimum compute time between checkpoints."""
    if delta_s >= 2.0 * mtbi_s:
        return mtbi_s
    x = delta_s / (2.0 * mtbi_s)
    return math.sqrt(2.0 * delta_s * mtbi_s) * (1.0 + math.sqrt(x) / 3.0 + x / 9.0) - delta_s


def expected_ettr(tau_s: float, delta_s: float, restart_s: float, mtbi_s: float, detect_s: float = 0.0) -> float:
    """Expected fraction of wall time that becomes kept training work (exponential failures, no waiting for repair)."""
    if math.isinf(mtbi_s):
        return tau_s / (tau_s + delta_s)
    seg = (mtbi_s + detect_s) * math.exp(restart_s / mtbi_s) * math.expm1((tau_s + delta_s) / mtbi_s)
    return tau_s / seg


def exact_optimum_interval(delta_s: float, restart_s: float, mtbi_s: float) -> float:
    """The tau that maximises expected_ettr (golden-section search; R and D do not move the optimum)."""
    lo, hi = 1e-6 * mtbi_s, 20.0 * mtbi_s
    lo, hi = math.log(lo), math.log(hi)
    g = (math.sqrt(5.0) - 1.0) / 2.0
    f = lambda u: -expected_ettr(math.exp(u), delta_s, restart_s, mtbi_s)  # noqa: E731
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = f(a), f(b)
    for _ in range(200):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = f(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = f(b)
    return math.exp((lo + hi) / 2.0)


def expectations(delta_s: float, restart_s: float, mtbi_s: float, tau_s: float | None = None, detect_s: float = 0.0) -> dict:
    """Young, Daly and exact optima plus the expected ETTR at tau (default: Daly's)."""
    if math.isinf(mtbi_s):
        ettr = 1.0 if tau_s is None else expected_ettr(tau_s, delta_s, restart_s, mtbi_s)
        return {"mtbi_s": None, "young_s": None, "daly_s": None, "exact_optimum_s": None, "interval_s": tau_s, "ettr": ettr}
    daly = daly_interval(delta_s, mtbi_s)
    tau = daly if tau_s is None else tau_s
    return {
        "mtbi_s": mtbi_s,
        "young_s": young_interval(delta_s, mtbi_s),
        "daly_s": daly,
        "exact_optimum_s": exact_optimum_interval(delta_s, restart_s, mtbi_s),
        "interval_s": tau,
        "detect_s": detect_s,
        "restart_s": restart_s,
        "ettr": expected_ettr(tau, delta_s, restart_s, mtbi_s, detect_s),
    }
