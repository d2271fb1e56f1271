"""`gigafactory report` defects of issue 17 item 9: each test failed before its fix."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from gigafactory.cli.main import main
from gigafactory.resilience.report import format_summary, summarise
from gigafactory.resilience.report_files import build_report, write_plots

from .test_report import synthetic_run


def _write(run_dir, lines, events=()):
    run_dir.mkdir(exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    if events:
        (run_dir / "events.jsonl").write_text("".join(json.dumps(x) + "\n" for x in events))
    return run_dir


def _train_line(step, time, loss=4.0, **extra):
    return {"step": step, "time": time, "loss": loss, "grad_norm": 1.0, "lr": 1e-3, "aux_loss": 0.0, "tokens_per_s": 100.0, **extra}


def rollback_run(run_dir):
    """Steps 1..7; a NaN at step 8 rolls back to the step-4 checkpoint (3 steps lost); steps 5..10 re-run."""
    t0 = 1000.0
    lines = [_train_line(s, t0 + s, 5.0 - 0.1 * s) for s in range(1, 8)]
    events = [
        {"time": t0, "event": "start", "rank": 0, "attempt": 0, "tokens_per_step": 100, "world_size": 1, "resumed_step": 0},
        {"time": t0 + 8.0, "event": "nan", "rank": 0, "attempt": 0, "step": 8, "action": "rollback", "loss": "nan", "grad_norm": 1.0},
        {"time": t0 + 8.5, "event": "rollback", "rank": 0, "attempt": 0, "from_step": 8, "to_step": 4, "steps_lost": 3},
    ]
    lines += [_train_line(s, t0 + 5 + s, 5.0 - 0.1 * s + 0.05) for s in range(5, 11)]
    return _write(run_dir, lines, events)


def test_rollback_line_prints_real_steps(tmp_path):
    run = rollback_run(tmp_path / "run")
    s = build_report(run)
    text = format_summary(s)
    assert "step ?" not in text
    line = next(x for x in text.splitlines() if x.strip().startswith("rollback"))
    assert "from step 8" in line and "to step 4" in line and "3 steps lost" in line
    assert s.steps == 10 and s.steps_lost == 3
    page = (run / "report" / "report.html").read_text()
    assert "<td>rollback</td><td>0</td><td>0</td><td>8</td>" in page  # the step column of the events table


def test_rollback_with_step_field(tmp_path):
    run = rollback_run(tmp_path / "run")
    ev = [json.loads(x) for x in (run / "events.jsonl").read_text().splitlines()]
    ev[-1]["step"] = 8  # newer events also carry `step`
    (run / "events.jsonl").write_text("".join(json.dumps(x) + "\n" for x in ev))
    assert "rollback: from step 8 to step 4 (3 steps lost)" in format_summary(summarise(run))


def test_broken_pipe_exits_quietly(tmp_path):
    run = tmp_path / "run"
    synthetic_run(run)
    proc = subprocess.Popen([sys.executable, "-m", "gigafactory.cli.main", "report", str(run), "--no-plots"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # `| head -1` that has already exited: every write gets EPIPE
    err = proc.stderr.read().decode()
    rc = proc.wait(timeout=120)
    assert "Traceback" not in err and "BrokenPipe" not in err, err
    assert rc in (0, 141)


def test_file_instead_of_run_dir(tmp_path, capsys):
    synthetic_run(tmp_path / "run")
    assert main(["report", str(tmp_path / "run" / "metrics.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" not in err
    assert "is a file" in err and "run directory" in err


def _one_line_error(capsys, argv, *words):
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc != 0 and err.startswith("error: ") and err.count("\n") == 1, err
    for w in words:
        assert w in err, err
    return err


def test_run_dir_without_metrics(tmp_path, capsys):
    synthetic_run(tmp_path / "run")
    (tmp_path / "run" / "metrics.jsonl").unlink()
    _one_line_error(capsys, ["report", str(tmp_path / "run")], "metrics.jsonl")


def test_metrics_without_time(tmp_path, capsys):
    run = _write(tmp_path / "run", [{"step": 1, "loss": 4.0}, {"step": 2, "loss": 3.9}])
    _one_line_error(capsys, ["report", str(run), "--no-plots"], "time", "metrics.jsonl")


@pytest.mark.parametrize("content", [bytes(range(256)) * 8, b"\x00" * 4096, b"hello\nworld\n", b"[1, 2]\n3\n"])
def test_garbage_metrics(tmp_path, capsys, content):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_bytes(content)
    _one_line_error(capsys, ["report", str(tmp_path / "run")], "metrics.jsonl")


def test_garbage_events(tmp_path, capsys):
    synthetic_run(tmp_path / "run")
    (tmp_path / "run" / "events.jsonl").write_bytes(bytes(range(256)) * 8)
    _one_line_error(capsys, ["report", str(tmp_path / "run"), "--no-plots"], "events.jsonl")


def test_torn_metrics_line_is_tolerated(tmp_path, capsys):
    synthetic_run(tmp_path / "run")
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write('{"step": 11, "ti')
    assert main(["report", str(tmp_path / "run"), "--no-plots"]) == 0


def test_out_is_an_existing_file(tmp_path, capsys):
    synthetic_run(tmp_path / "run")
    (tmp_path / "taken").write_text("x")
    _one_line_error(capsys, ["report", str(tmp_path / "run"), "--out", str(tmp_path / "taken")], "--out", "file")
    assert (tmp_path / "taken").read_text() == "x"


def test_all_updates_skipped_in_metrics(tmp_path, capsys):
    lines = [_train_line(s, 1000.0 + s, float("nan"), skipped=True) for s in range(1, 6)]
    run = _write(tmp_path / "run", lines)
    s = summarise(run)
    assert s.all_skipped and s.skipped_steps == 5
    assert main(["report", str(run), "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert "no optimizer update was applied: all 5 steps were skipped" in out
    assert "ETTR: 100" not in out


def test_all_updates_skipped_in_events(tmp_path, capsys):
    """log_every 5: only steps 5 and 10 are in metrics.jsonl; the nan events show every step skipped."""
    t0 = 1000.0
    lines = [_train_line(s, t0 + s, 4.0, skipped=(s == 5)) for s in (5, 10)]
    lines[1]["skipped"] = True
    events = [{"time": t0, "event": "start", "rank": 0, "attempt": 0, "tokens_per_step": 100, "world_size": 1, "resumed_step": 0}]
    events += [{"time": t0 + s - 0.5, "event": "spike", "rank": 0, "attempt": 0, "step": s, "action": "skip", "loss": 9.0} for s in range(1, 11)]
    run = _write(tmp_path / "run", lines, events)
    text = format_summary(summarise(run))
    assert "no optimizer update was applied: all 10 steps were skipped" in text


def test_some_updates_skipped_is_counted_not_alarmed(tmp_path):
    t0 = 1000.0
    lines = [_train_line(s, t0 + s, 4.0, skipped=(s == 3)) for s in range(1, 6)]
    events = [{"time": t0 + 2.5, "event": "nan", "rank": 0, "attempt": 0, "step": 3, "action": "skip", "loss": "nan"}]
    s = summarise(_write(tmp_path / "run", lines, events))
    assert s.skipped_steps == 1 and not s.all_skipped
    text = format_summary(s)
    assert "no optimizer update" not in text and "skipped updates: 1" in text


def _capture_figures(monkeypatch):
    import matplotlib.figure

    figs = {}
    real = matplotlib.figure.Figure.savefig

    def savefig(self, fname, *a, **k):
        figs[str(fname).rsplit("/", 1)[-1]] = self
        return real(self, fname, *a, **k)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    return figs


def test_dashed_markers_in_legend(tmp_path, monkeypatch):
    figs = _capture_figures(monkeypatch)
    run = rollback_run(tmp_path / "run")
    write_plots(summarise(run), tmp_path / "out")
    for name in ("loss.png", "throughput.png"):
        legend = figs[name].axes[0].get_legend()
        assert legend is not None, name
        texts = [t.get_text() for t in legend.get_texts()]
        assert any("rollback" in t for t in texts) and any("nan" in t for t in texts), (name, texts)
        assert len(texts) == len(set(texts))  # one entry per kind, not one per line


def test_rerun_steps_draw_the_attempt_that_counts(tmp_path, monkeypatch):
    figs = _capture_figures(monkeypatch)
    run = rollback_run(tmp_path / "run")
    s = summarise(run)
    write_plots(s, tmp_path / "out")
    ax = figs["loss.png"].axes[0]
    train = next(line for line in ax.get_lines() if line.get_label() == "train loss")
    xs, ys = list(train.get_xdata()), list(train.get_ydata())
    assert xs == list(range(1, 11))  # no zig-zag back to step 5
    assert ys[5] == pytest.approx(5.0 - 0.6 + 0.05)  # step 6's re-run, not its first run
    assert s.steps_lost == 3 and s.rerun_records == 3


def test_rerun_steps_lost_counted_from_metrics_without_events(tmp_path):
    run = rollback_run(tmp_path / "run")
    (run / "events.jsonl").unlink()
    s = summarise(run)
    assert s.steps == 10 and s.rerun_records == 3 and s.steps_lost == 3


def test_failed_final_save_counts_unsaved_steps_as_lost(tmp_path):
    """The run ended with its final save failing: steps after the newest checkpoint are not durable (issue 17 item 4:
    such a run used to show ETTR 92%)."""
    lines = [_train_line(step, 100.0 + step, step_time=1.0) for step in range(1, 7)]
    events = [{"time": 100.0, "event": "start", "rank": 0, "attempt": 0, "tokens_per_step": 256},
              {"time": 104.5, "event": "checkpoint_saved", "rank": 0, "attempt": 0, "step": 4},
              {"time": 106.5, "event": "checkpoint_failed", "rank": 0, "attempt": 0, "step": 6, "reason": "disk full"}]
    _write(tmp_path, lines, events)
    s = summarise(tmp_path)
    assert s.unsaved_steps == 2 and s.last_checkpoint == 4 and s.skipped_steps == 0
    assert abs(s.productive_s - 4.0) < 1e-9 and s.ettr < 0.7
    assert "unfinished: 2 step(s) after the newest checkpoint (step 4)" in format_summary(s)
