"""Site-level outages under replica recovery: a site's groups fail as a unit, the other sites keep stepping."""

from __future__ import annotations

import dataclasses

import pytest

from gigafactory.errors import UserError
from gigafactory.simulate import ClusterSpec, JobSpec, RecoverySpec, SimConfig, SimSpec, run_once


def _sites(sites: int, per_site: int = 1, *, outages: float = 40.0, repair_h: float = 12.0, days: float = 3650.0, **rec) -> SimConfig:
    """`sites` x `per_site` replica groups of one node each; no node failures, free reconfigurations, so that the
    only loss is the share of the job a down site holds."""
    groups = sites * per_site
    return SimConfig(
        cluster=ClusterSpec(gpus=8 * groups, gpus_per_node=8, spare_nodes=0),
        job=JobSpec(step_time_s=1.0, checkpoint_s=0.0, checkpoint_policy="fixed", checkpoint_interval_s=60.0,
                    reschedule_s=0.0, load_s=0.0, warmup_s=0.0),
        sim=SimSpec(days=days),
        recovery=RecoverySpec(recovery="replica", replica_group_gpus=8, groups_per_site=per_site, site_outages_per_year=outages,
                              site_repair_h=repair_h, ft_detect_s=0.0, quorum_s=0.0, group_restart_s=0.0, transfer_overhead_s=0.0,
                              params=0.0, **rec),
    )


def test_goodput_is_the_mean_site_availability():
    """Closed form: each site is up 1 / (1 + rate x repair) of the time (an alternating renewal process) and trains
    its share of the job then; 4 sites x 2 groups, min_replicas 1: the job never stops as a whole in practice."""
    cfg = _sites(4, 2)
    availability = cfg.recovery.site_availability()
    assert availability == pytest.approx(1 / (1 + 40 / 8760 * 12))
    runs = [run_once(cfg, [], 60.0, seed) for seed in range(2)]
    ettr = sum(r.ettr for r in runs) / len(runs)
    print(f"site availability {availability:.4f}, simulated goodput {ettr:.4f}")
    assert ettr == pytest.approx(availability, abs=0.004)
    assert all(r.interruptions["site"] > 4 * 300 and r.rejoins >= r.interruptions["site"] * 2 - 8 for r in runs)
    assert all(r.job_restarts == 0 for r in runs)
    # Without outages the same job trains the whole time.
    assert run_once(dataclasses.replace(cfg, recovery=dataclasses.replace(cfg.recovery, site_outages_per_year=0.0)), [], 60.0, 0).ettr == pytest.approx(1.0)


def test_a_lone_site_down_stops_the_job_until_it_is_back():
    """One site holding every group (min_replicas 1): an outage stops the job for the repair time, so goodput is
    the site's availability again, reached through job restarts instead of degraded steps."""
    cfg = _sites(1, 2)
    res = run_once(cfg, [], 60.0, 0)
    assert res.job_restarts == res.interruptions["site"] > 300 and res.rejoins == 0
    assert res.ettr == pytest.approx(cfg.recovery.site_availability(), abs=0.006)
    assert res.state_s["wait_for_nodes"] == pytest.approx(res.interruptions["site"] * 12 * 3600, rel=0.02)


def test_diloco_interval_is_what_a_site_outage_discards():
    """With H inner steps between syncs a site outage throws away the interval in flight (H/2 steps on average) in
    the survivors too; at H=1 only the step in flight. 3 sites: the job as a whole (practically) never stops."""
    lost = {}
    for h in (1, 600):
        cfg = _sites(3, 1, days=365.0, sync_every=h)
        cfg.job.checkpoint_interval_s = 3600.0  # checkpoints are taken at syncs: a multiple of H steps
        res = run_once(cfg, [], 3600.0, 0)
        assert res.job_restarts == 0
        lost[h] = res.lost_s / res.interruptions["site"]
    print(f"work lost per site outage: H=1 {lost[1]:.2f} s, H=600 {lost[600]:.0f} s")
    assert lost[1] < 1.0 and 200 < lost[600] < 400  # mean of ~120 uniform draws on [0, 600) s


def test_site_outages_need_replica_recovery_and_whole_sites():
    with pytest.raises(UserError, match="site_outages_per_year needs recovery=replica"):
        RecoverySpec(site_outages_per_year=1.0).validate(64, 8)
    with pytest.raises(UserError, match="groups_per_site=3 must be a positive integer dividing the 8 replica groups"):
        RecoverySpec(recovery="replica", replica_group_gpus=8, groups_per_site=3).validate(64, 8)
