"""Replica-group recovery (torchft) against job restarts on the same failure draw, and its fallbacks."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gigafactory.simulate import ClusterSpec, FailureClass, JobSpec, RecoverySpec, SimConfig, SimSpec, run_once, simulate
from gigafactory.simulate.config import DAY_S
from gigafactory.simulate.engine import ALIVE


def _setup(mode: str, group_gpus: int = 64, *, gpus: int = 512, days: float = 10, spares: int = 4, nodes_affected: int = 1):
    classes = [
        FailureClass(name="gpu", rate=4e-3, per="gpu", detect_s=120.0, repair_s=DAY_S),
        FailureClass(name="hang", rate=1e-3, per="gpu", detect_s=600.0, hangs=True),
        FailureClass(name="rack", rate=2e-3, per="node", detect_s=600.0, repair_s=4 * 3600.0, nodes_affected=nodes_affected),
        FailureClass(name="storage", rate=0.2, per="job", detect_s=300.0, outage_s=1800.0),
    ]
    cfg = SimConfig(
        cluster=ClusterSpec(gpus=gpus, gpus_per_node=8, spare_nodes=spares),
        job=JobSpec(step_time_s=5.0, checkpoint_s=60.0),
        sim=SimSpec(days=days),
        recovery=RecoverySpec(recovery=mode, replica_group_gpus=group_gpus),
    )
    return cfg, classes


def test_one_replica_group_is_exactly_job_restart():
    cfg, classes = _setup("replica", group_gpus=512)
    cfg.cluster.maintenance_every_days = 3.0
    base = dataclasses.replace(cfg, recovery=RecoverySpec(recovery="job-restart"))
    assert cfg.groups == 1
    for seed in (0, 1):
        a, b = run_once(cfg, classes, 900.0, seed), run_once(base, classes, 900.0, seed)
        assert a.useful_s == pytest.approx(b.useful_s, rel=1e-12) and a.lost_s == pytest.approx(b.lost_s, rel=1e-12)
        assert (a.interruptions, a.while_down, a.job_restarts) == (b.interruptions, b.while_down, b.job_restarts)
    assert simulate(cfg, classes).expected["ettr"] == pytest.approx(simulate(base, classes).expected["ettr"], rel=1e-12)


@pytest.mark.parametrize("group_gpus,spares,nodes_affected", [(64, 4, 1), (8, 0, 3), (256, 1, 2)])
def test_replica_never_worse_than_job_restart_on_the_same_failures(group_gpus, spares, nodes_affected):
    cfg, classes = _setup("replica", group_gpus, spares=spares, nodes_affected=nodes_affected)
    base = dataclasses.replace(cfg, recovery=RecoverySpec(recovery="job-restart"))
    for seed in range(3):
        rep, job = run_once(cfg, classes, 900.0, seed), run_once(base, classes, 900.0, seed)
        assert sum(rep.arrivals.values()) == sum(job.arrivals.values())  # the same draw
        assert rep.ettr >= job.ettr


def test_block_touching_every_group_restarts_the_job_and_one_inside_a_group_does_not():
    cfg, classes = _setup("replica", 64)
    every = [FailureClass(name="power", rate=2e-2, per="node", detect_s=300.0, repair_s=3600.0, nodes_affected=cfg.cluster.nodes)]
    res = run_once(dataclasses.replace(cfg, cluster=dataclasses.replace(cfg.cluster, spare_nodes=200)), every, 900.0, 0)
    assert res.n_interruptions > 5 and res.job_restarts == res.n_interruptions and res.rejoins == 0
    inside = [dataclasses.replace(every[0], nodes_affected=1)]
    res = run_once(cfg, inside, 900.0, 0)
    assert res.n_interruptions > 5 and res.job_restarts == 0 and res.rejoins > 0


def test_spreading_faults_and_job_wide_classes_are_never_absorbed():
    cfg, classes = _setup("replica", 64)
    sdc = [FailureClass(name="sdc", rate=2e-3, per="gpu", detect_s=600.0, spreads=True)]
    res = run_once(cfg, sdc, 900.0, 0)
    assert res.n_interruptions > 5 and res.job_restarts == res.n_interruptions
    res = run_once(cfg, [dataclasses.replace(classes[3], rate=2.0)], 900.0, 0)
    assert res.job_restarts == res.n_interruptions > 0 and res.state_s["outage"] > 0


def test_a_group_without_spares_waits_for_repair_while_the_others_step():
    cfg, classes = _setup("replica", 64, spares=0)
    gpu_only = [classes[0]]
    rep = run_once(cfg, gpu_only, 900.0, 0)
    job = run_once(dataclasses.replace(cfg, recovery=RecoverySpec()), gpu_only, 900.0, 0)
    assert rep.job_restarts == 0 and rep.state_s["wait_for_nodes"] == 0 and rep.state_s["degraded"] > 0.05 * rep.horizon_s
    assert job.state_s["wait_for_nodes"] > 0.3 * job.horizon_s


@pytest.mark.parametrize("mode", ["job-restart", "replica"])
def test_failures_while_down_are_not_interruptions(mode):
    cfg, classes = _setup(mode, 64)
    cfg.sim.timeline, cfg.cluster.rate_scale = True, 5.0
    res = run_once(cfg, classes, 900.0, 3)
    phase_at = {}
    for t0, t1, phase in res.timeline:
        phase_at[t1] = phase  # a failure at t is handled after the clock reached t: the phase that ended at t
    struck_running = 0
    for t, _ in res.failures:
        struck_running += phase_at[t] in ALIVE
    assert res.while_down > 0
    assert res.n_interruptions + res.while_down == sum(res.arrivals.values())
    # every recorded failure that hit running work is an interruption; job-restart records every arrival
    assert res.n_interruptions == struck_running


@pytest.mark.parametrize("spec", [{"checkpoint_mode": "sync"}, {"checkpoint_mode": "async", "async_stall_s": 5.0}])
def test_replica_simulation_matches_its_expected_value(spec):
    cfg = SimConfig(cluster=ClusterSpec(gpus=100_000), job=JobSpec(**spec), sim=SimSpec(days=60, seeds=2),
                    recovery=RecoverySpec(recovery="replica"))
    d = simulate(cfg).to_dict()
    assert d["ettr"] == pytest.approx(d["expected"]["ettr"], abs=0.005)
    assert d["expected"]["absorbed_per_day"] > 40 and d["job_restarts"] < 0.05 * d["interruptions"]


def test_time_is_conserved_with_groups_out():
    cfg, classes = _setup("replica", 64, spares=1)
    res = run_once(cfg, classes, 700.0, 5)
    assert sum(res.state_s.values()) == pytest.approx(res.horizon_s, rel=1e-12)
    assert res.state_s["compute"] == pytest.approx(res.useful_s + res.lost_s, rel=1e-9)
    assert min(res.state_s.values()) >= 0


def test_rejoin_cost_scales_with_bytes_over_link_bandwidth():
    rec = RecoverySpec(recovery="replica", replica_group_gpus=1024, params=1e12, state_bytes_per_param=16.0,
                       peer_gbps_per_gpu=50.0, transfer_overhead_s=2.0, quorum_s=3.0, group_restart_s=100.0)
    assert rec.transfer_s() == pytest.approx(16e12 / (1024 * 50e9) + 2.0)
    parts = rec.rejoin_breakdown(class_detect_s=120.0)
    assert parts["total_s"] == pytest.approx(120.0 + 100.0 + rec.transfer_s() + 3.0) and parts["bytes"] == 16e12
    assert dataclasses.replace(rec, peer_gbps_per_gpu=25.0).transfer_s() - 2.0 == pytest.approx(2 * (rec.transfer_s() - 2.0))


@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    groups_nodes=st.sampled_from([1, 2, 4, 16]), spares=st.integers(0, 6), block=st.integers(1, 40),
    scale=st.floats(0.2, 20.0), mode=st.sampled_from(["sync", "async"]), memory=st.booleans(), seed=st.integers(0, 10_000),
    maintenance=st.sampled_from([0.0, 2.0]),
)
def test_random_configurations_keep_the_invariants(groups_nodes, spares, block, scale, mode, memory, seed, maintenance):
    """Time adds up, nothing is negative, and replica does not lose to job-restart on the same draw and interval.

    The last is not a theorem (after the survivors' pauses shift the checkpoint cycle, a later job restart can roll
    back further than the job-restart run does), but with a restart this much dearer than a rejoin it holds on every
    draw tried; the examples are derandomized so that CI sees the same ones."""
    cfg, classes = _setup("replica", 8 * groups_nodes, spares=spares, nodes_affected=block, days=4)
    cfg.cluster.rate_scale, cfg.cluster.maintenance_every_days = scale, maintenance
    cfg.job.checkpoint_mode, cfg.job.async_stall_s, cfg.job.in_memory_recovery = mode, 5.0, memory
    rep = run_once(cfg, classes, 600.0, seed)
    job = run_once(dataclasses.replace(cfg, recovery=RecoverySpec()), classes, 600.0, seed)
    for res in (rep, job):
        assert sum(res.state_s.values()) == pytest.approx(res.horizon_s, rel=1e-9)
        assert res.state_s["compute"] == pytest.approx(res.useful_s + res.lost_s, rel=1e-9, abs=1e-6)
        assert min(res.state_s.values()) >= -1e-6 and res.lost_s >= -1e-6 and 0 <= res.ettr <= 1
        assert res.n_interruptions + res.while_down + res.during_maintenance == sum(res.arrivals.values())
    assert rep.ettr >= job.ettr - 1e-9
