"""`gigafactory simulate` end to end through the real entry point (with only this command registered)."""

from __future__ import annotations

import json

import pytest

from gigafactory.cli import main as cli_main


@pytest.fixture
def run_cli(monkeypatch, capsys):
    monkeypatch.setattr(cli_main, "COMMANDS", ("simulate",))

    def run(*argv: str) -> tuple[int, str, str]:
        try:
            code = cli_main.main(["simulate", *argv])
        except SystemExit as exc:  # argparse's own usage errors (one line, exit 2)
            code = exc.code
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


def test_simulate_is_registered_in_main():
    assert "simulate" in cli_main.COMMANDS


def test_json_output_has_every_metric(run_cli):
    code, out, _ = run_cli("--gpus", "16384", "--days", "10", "--seeds", "2", "--json")
    assert code == 0
    d = json.loads(out)
    assert d["inputs"]["gpus"] == 16384 and d["inputs"]["seeds"] == [0, 1]
    for key in ("interruptions_by_cause", "mtbi_s", "ettr", "goodput_tokens_per_s", "lost_work_s", "time_s", "expected"):
        assert key in d
    assert sum(d["time_fraction"].values()) == pytest.approx(1.0)
    assert d["ettr"] == pytest.approx(d["expected"]["ettr"], rel=0.05)


def test_table_output_and_timeline_png(run_cli, tmp_path):
    png = tmp_path / "timeline.png"
    code, out, _ = run_cli("--gpus", "8192", "--days", "5", "--plot", str(png))
    assert code == 0 and "ETTR" in out and "interruptions by cause" in out and "time per state" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sweep_interval_table_json_and_curve(run_cli, tmp_path):
    png = tmp_path / "sweep.png"
    code, out, _ = run_cli("--gpus", "16384", "--days", "20", "--sweep", "checkpoint_interval=300,1200,4800", "--json", "--plot", str(png))
    assert code == 0
    d = json.loads(out)
    assert d["sweep"] == "checkpoint_interval_s" and [r["interval_s"] for r in d["rows"]] == [300, 1200, 4800]
    assert sum(r["best"] for r in d["rows"]) == 1
    assert png.stat().st_size > 1000


def test_sweep_gpus_more_gpus_more_interruptions(run_cli):
    code, out, _ = run_cli("--days", "10", "--sweep", "gpus=10000,100000", "--json")
    rows = json.loads(out)["rows"]
    assert rows[1]["interruptions"] > 5 * rows[0]["interruptions"]
    assert rows[1]["ettr"] < rows[0]["ettr"]


def test_from_plan_with_flag_precedence(run_cli, tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"results": [
        {"gpus": 10000, "step_time_s": 12.0, "tokens_per_step": 8e6, "checkpoint_time_s": 30.0},
        {"gpus": 100000, "step_time_s": 3.0, "tokens_per_step": 16e6, "checkpoint_time_s": 90.0},
    ]}))
    code, out, _ = run_cli("--from-plan", str(plan), "--gpus", "100000", "--days", "2", "--json")
    inp = json.loads(out)["inputs"]
    assert (inp["gpus"], inp["step_time_s"], inp["tokens_per_step"], inp["checkpoint_s"]) == (100000, 3.0, 16e6, 90.0)
    code, out, _ = run_cli("--from-plan", str(plan), "--checkpoint-s", "10", "--days", "2", "--json")
    inp = json.loads(out)["inputs"]
    assert (inp["gpus"], inp["checkpoint_s"]) == (10000, 10.0)


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--rate", "gpu=-1e-4"], "rate=-0.0001 must be a number >= 0"),
        (["--rate", "warp_core=1e-4"], "unknown component 'warp_core' in --rate"),
        (["--checkpoint-interval", "0"], "checkpoint interval 0.0 s must be > 0"),
        (["--gpus", "1001"], "inconsistent node size"),
        (["--sweep", "flux=1,2"], "--sweep: unknown knob 'flux'"),
        (["--sweep", "gpus=1e4,abc"], "values must be numbers"),
        (["--failure-rates", "/nonexistent.toml"], "failure-rate file '/nonexistent.toml' not found"),
        (["--from-plan", "/nonexistent.json"], "plan file '/nonexistent.json' not found"),
        (["--days", "inf"], "--days expects a finite number, got 'inf'"),
        (["--days", "nan"], "--days expects a finite number, got 'nan'"),
        (["--days", "1e9"], "days=1000000000.0 must be a number in (0, 3650]"),
        (["--recovery", "elastic"], "invalid choice: 'elastic'"),
        (["--recovery", "replica", "--replica-group-gpus", "12"], "replica_group_gpus=12 must be a positive multiple"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(run_cli, argv, needle):
    code, out, err = run_cli(*(argv if "--days" in argv else [*argv, "--days", "1"]))
    assert code == 2 and out == ""
    assert err.startswith("error: ") and needle in err and err.count("\n") == 1


def test_list_classes_shows_sources(run_cli):
    code, out, _ = run_cli("--list-classes")
    assert code == 0 and "Llama 3" in out and "hbm" in out


def test_gpus_sweep_with_a_plan_takes_each_sizes_step_time(run_cli, tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps([
        {"gpus": 10000, "step_time_s": 20.0, "tokens_per_step": 16e6, "checkpoint_time_s": 30.0},
        {"gpus": 100000, "step_time_s": 2.0, "tokens_per_step": 16e6, "checkpoint_time_s": 30.0},
    ]))
    code, out, _ = run_cli("--from-plan", str(plan), "--days", "5", "--sweep", "gpus=10000,100000", "--json")
    rows = json.loads(out)["rows"]
    # 10x the GPUs at 10x the step rate: goodput rises despite the lower ETTR
    assert rows[1]["ettr"] < rows[0]["ettr"]
    assert rows[1]["goodput_tokens_per_s"] > 4 * rows[0]["goodput_tokens_per_s"]


def test_recovery_replica_json_side_by_side_with_job_restart(run_cli):
    both = {}
    for mode in ("job-restart", "replica"):
        code, out, _ = run_cli("--gpus", "100000", "--days", "20", "--recovery", mode, "--json")
        assert code == 0
        both[mode] = json.loads(out)
    rep, job = both["replica"], both["job-restart"]
    assert rep["inputs"]["recovery"] == "replica" and rep["inputs"]["replica_groups"] == 97
    assert rep["failures"] == job["failures"]  # same seed, same failures
    assert rep["ettr"] > job["ettr"] + 0.3 and rep["job_restarts"] < 0.05 * job["job_restarts"]
    assert rep["inputs"]["peer_transfer_s"] > 0 and rep["rejoins"] > 0


def test_from_plan_reads_the_replica_group_and_model_size(run_cli, tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps([{"gpus": 16384, "step_time_s": 2.0, "tokens_per_step": 16e6, "checkpoint_time_s": 5.0,
                                 "replica_group_gpus": 512, "params": 7e10}]))
    code, out, _ = run_cli("--from-plan", str(plan), "--recovery", "replica", "--days", "2", "--json")
    inp = json.loads(out)["inputs"]
    assert code == 0 and inp["replica_group_gpus"] == 512 and inp["replica_groups"] == 32
    assert inp["group_state_bytes"] == pytest.approx(7e10 * 14)


def test_each_recovery_mode_is_priced_with_its_disk_saves_unless_told(run_cli):
    """job-restart: the trainer's default synchronous saves; replica groups: async saves (issue 20's design); an
    explicit --checkpoint-mode wins in both."""
    def mode(*argv: str) -> tuple[str, float]:
        code, out, _ = run_cli("--gpus", "16384", "--days", "5", "--json", *argv)
        assert code == 0
        d = json.loads(out)
        return d["inputs"]["checkpoint_mode"], d["ettr"]

    assert mode("--recovery", "job-restart")[0] == "sync"
    (replica_mode, replica_async), (_, replica_sync) = mode("--recovery", "replica"), mode("--recovery", "replica", "--checkpoint-mode", "sync")
    assert replica_mode == "async" and replica_async > replica_sync
    assert mode("--recovery", "job-restart", "--checkpoint-mode", "async")[0] == "async"
