"""The simulation against theory: ETTR, the optimum interval, Poisson interruption counts."""

from __future__ import annotations

import numpy as np
import pytest

from gigafactory.simulate import FailureClass, analytic, run_once, simulate
from gigafactory.simulate.config import DAY_S, ClusterSpec, JobSpec, SimConfig, SimSpec


@pytest.mark.parametrize(
    "mtbi,delta,restart,detect,policy,interval",
    [
        (3600.0, 300.0, 500.0, 100.0, "daly", 0.0),  # ETTR ~ 0.55: failures dominate
        (1800.0, 60.0, 420.0, 120.0, "fixed", 600.0),  # the 100k-GPU regime, off-optimum interval
        (6 * 3600.0, 30.0, 600.0, 0.0, "young", 0.0),  # ETTR ~ 0.93
    ],
)
def test_simulated_ettr_matches_the_analytic_expectation_within_2_percent(setup, mtbi, delta, restart, detect, policy, interval):
    cfg, classes = setup(mtbi, delta, restart, detect, days=30, seeds=20)
    cfg.job.checkpoint_policy, cfg.job.checkpoint_interval_s = policy, interval or 1.0
    report = simulate(cfg, classes)
    ettr, _ = report.ettr()
    want = analytic.expected_ettr(report.interval_s, delta, restart, mtbi, detect)
    assert report.expected["ettr"] == pytest.approx(want)
    assert ettr == pytest.approx(want, rel=0.02)
    # and the simulated MTBI agrees with the input rate
    assert report.to_dict()["mtbi_s"] == pytest.approx(mtbi, rel=0.03)


def test_best_simulated_interval_is_within_10_percent_of_daly(setup):
    mtbi, delta, restart, detect = 7200.0, 120.0, 240.0, 60.0
    cfg, classes = setup(mtbi, delta, restart, detect, days=200)
    daly = analytic.daly_interval(delta, mtbi)
    taus = daly * np.exp(np.linspace(np.log(0.5), np.log(2.0), 25))
    seeds = range(10)  # the same seeds at every interval: common random numbers
    ettr = np.array([np.mean([run_once(cfg, classes, tau, s).ettr for s in seeds]) for tau in taus])
    best_grid = taus[int(np.argmax(ettr))]
    assert abs(best_grid / daly - 1) < 0.10, (best_grid, daly)
    c2, c1, _ = np.polyfit(np.log(taus), ettr, 2)  # smooth optimum of the simulated curve
    best_fit = float(np.exp(-c1 / (2 * c2)))
    assert abs(best_fit / daly - 1) < 0.10, (best_fit, daly)
    # the whole simulated curve follows the analytic one
    want = np.array([analytic.expected_ettr(t, delta, restart, mtbi, detect) for t in taus])
    assert np.max(np.abs(ettr / want - 1)) < 0.01


def test_mixed_classes_with_different_detection_times_match_theory():
    classes = [
        FailureClass(name="hw", rate=3e-4, per="gpu", detect_s=120.0),
        FailureClass(name="hang", rate=1e-4, per="gpu", detect_s=900.0),
        FailureClass(name="net", rate=2e-3, per="node", detect_s=600.0),
    ]
    cfg = SimConfig(cluster=ClusterSpec(gpus=32768, spare_nodes=0), job=JobSpec(checkpoint_s=90.0), sim=SimSpec(days=30, seeds=10))
    report = simulate(cfg, classes)
    ettr, _ = report.ettr()
    assert report.expected["detect_s"] == pytest.approx((3e-4 * 8 * 120 + 1e-4 * 8 * 900 + 2e-3 * 600) / (3e-4 * 8 + 1e-4 * 8 + 2e-3))
    assert ettr == pytest.approx(report.expected["ettr"], rel=0.02)


def _poisson_setup():
    classes = [
        FailureClass(name="gpu", rate=2e-4, per="gpu", detect_s=120.0, repair_s=3 * DAY_S),
        FailureClass(name="software", rate=5e-5, per="gpu", detect_s=600.0),
        FailureClass(name="switch", rate=3e-4, per="node", detect_s=600.0, repair_s=4 * 3600.0, nodes_affected=4),
        FailureClass(name="ecc_corrected", rate=1e-4, per="gpu", kills_job=False),
    ]
    cfg = SimConfig(cluster=ClusterSpec(gpus=16384, gpus_per_node=8, spare_nodes=-1), job=JobSpec(), sim=SimSpec(days=5, seeds=1))
    return cfg, classes


def test_interruption_counts_are_poisson_with_the_input_rates():
    cfg, classes = _poisson_setup()
    n_runs = 300
    counts = {c.name: [] for c in classes}
    for seed in range(1000, 1000 + n_runs):  # fixed seeds: the test is deterministic
        cfg.sim.seed = seed
        res = simulate(cfg, classes).runs[0]
        for c in classes:
            counts[c.name].append(res.arrivals.get(c.name, res.non_fatal.get(c.name)))
    for c in classes:
        x = np.array(counts[c.name], dtype=float)
        mu = c.rate_per_s(cfg.cluster) * cfg.sim.horizon_s
        # the mean: total count ~ Poisson(n mu)
        z_mean = (x.sum() - n_runs * mu) / np.sqrt(n_runs * mu)
        assert abs(z_mean) < 3.5, (c.name, x.mean(), mu)
        # the spread: Poisson dispersion index sum((x - mean)^2) / mean ~ chi2(n - 1)
        dispersion = ((x - x.mean()) ** 2).sum() / x.mean()
        z_disp = (dispersion - (n_runs - 1)) / np.sqrt(2 * (n_runs - 1))
        assert abs(z_disp) < 3.5, (c.name, x.var(), x.mean())


def test_weibull_arrivals_keep_the_mean_rate_but_are_overdispersed(setup):
    cfg, classes = setup(3600.0, 60.0, 300.0, days=200)
    cfg.cluster.distribution, cfg.cluster.weibull_shape = "weibull", 0.6
    res = run_once(cfg, classes, 900.0, seed=3)
    assert sum(res.arrivals.values()) == pytest.approx(200 * 24, rel=0.06)
    cfg.cluster.distribution = "exponential"
    exp_res = run_once(cfg, classes, 900.0, seed=3)
    assert sum(exp_res.arrivals.values()) == pytest.approx(200 * 24, rel=0.06)


def test_weibull_gaps_are_burstier_than_exponential():
    from gigafactory.simulate.failures import sample_arrivals

    cls = [FailureClass(name="gpu", rate=1.0, per="gpu")]
    cv = {}
    for law in ("exponential", "weibull"):
        t, _ = sample_arrivals(cls, ClusterSpec(gpus=8, distribution=law, weibull_shape=0.6), 2000 * DAY_S, seed=1)
        gaps = np.diff(t)
        assert gaps.mean() == pytest.approx(DAY_S / 8, rel=0.03)
        cv[law] = gaps.std() / gaps.mean()
    assert cv["exponential"] == pytest.approx(1.0, abs=0.05)
    assert cv["weibull"] > 1.5  # Weibull(k=0.6): CV = 1.76
