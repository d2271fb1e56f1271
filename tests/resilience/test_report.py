"""`gigafactory report` on a synthetic run directory with one restart."""

from __future__ import annotations

import json

import pytest

from gigafactory.cli.main import main
from gigafactory.errors import UserError
from gigafactory.resilience.report import summarise
from gigafactory.resilience.report_files import build_report


def synthetic_run(run_dir):
    """10 steps of 1 s each; a SIGKILL after step 6 (checkpoint at 4) costs 2 re-run steps and 3 s of restart."""
    run_dir.mkdir()
    t0 = 1000.0
    lines, events = [], [{"time": t0, "event": "start", "rank": 0, "attempt": 0, "tokens_per_step": 100, "world_size": 2, "resumed_step": 0}]
    for step in range(1, 7):
        lines.append({"step": step, "time": t0 + step, "loss": 5.0 - 0.1 * step, "grad_norm": 1.0, "lr": 1e-3, "aux_loss": 0.0, "tokens_per_s": 100.0, "mfu": 0.1})
    lines.append({"step": 4, "time": t0 + 4.1, "eval_loss": 4.7})
    events.append({"time": t0 + 6.5, "event": "fault_injected", "rank": 1, "attempt": 0, "kind": "kill", "step": 7})
    t1 = t0 + 9.0  # restart: 2.5 s after the kill
    events.append({"time": t1, "event": "start", "rank": 0, "attempt": 1, "tokens_per_step": 100, "world_size": 2, "resumed_step": 4})
    events.append({"time": t1, "event": "restart", "rank": 0, "attempt": 1, "what": "kill", "failed_rank": 1, "last_step": 6,
                   "resumed_step": 4, "steps_lost": 2, "failed_at": t0 + 6, "detected_at": t0 + 6, "restart_at": t1, "downtime_s": 3.0})
    for step in range(5, 11):
        lines.append({"step": step, "time": t1 + step - 4, "loss": 5.0 - 0.1 * step, "grad_norm": 1.0, "lr": 1e-3, "aux_loss": 0.0, "tokens_per_s": 100.0, "mfu": 0.1})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (run_dir / "events.jsonl").write_text("".join(json.dumps(x) + "\n" for x in events) + '{"torn')


def test_summary_numbers(tmp_path):
    synthetic_run(tmp_path / "run")
    s = summarise(tmp_path / "run")
    assert s.steps == 10 and s.tokens == 1000 and s.tokens_per_step == 100
    assert s.productive_s == pytest.approx(10.0)
    assert s.wall_s == pytest.approx(15.0)  # t0 .. t1 + 6
    assert s.ettr == pytest.approx(10 / 15) and s.lost_s == pytest.approx(5.0)
    assert len(s.failures) == 1 and s.steps_lost == 2 and s.attempts == 2
    assert s.final_loss == pytest.approx(4.0) and s.final_eval_loss == pytest.approx(4.7)


def test_cli_prints_and_writes_plots(tmp_path, capsys):
    synthetic_run(tmp_path / "run")
    assert main(["report", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "ETTR: 66.7%" in out and "failures: 1" in out and "failure: kill (rank 1)" in out
    for name in ("loss.png", "throughput.png", "report.html"):
        assert (tmp_path / "run" / "report" / name).stat().st_size > 1000
    assert "ETTR 66.7%" in (tmp_path / "run" / "report" / "report.html").read_text()
    assert main(["report", str(tmp_path / "run"), "--json", "--no-plots"]) == 0
    assert json.loads(capsys.readouterr().out)["ettr"] == pytest.approx(2 / 3)


def test_missing_or_empty_run_dir_is_one_line_error(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: run directory") and err.count("\n") == 1
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no metrics.jsonl"):
        build_report(tmp_path / "empty")
