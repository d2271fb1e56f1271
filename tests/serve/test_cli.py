"""`gigafactory serve` from the shell: one-line errors for bad input; a real process that reloads on SIGHUP."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from gigafactory.cli.main import main
from tests.serve.conftest import free_port

CLI = [sys.executable, "-m", "gigafactory.cli.main", "serve"]


@pytest.mark.parametrize("extra,message", [
    (["--slots", "0"], "--slots 0 must be >= 1"),
    (["--rate-limit", "-1"], "--rate-limit -1.0 must be >= 0"),
    (["--rollout", "/nonexistent.toml"], "--rollout /nonexistent.toml: file not found"),
    (["--api-keys", "/nonexistent.toml"], "--api-keys /nonexistent.toml: file not found"),
])
def test_bad_cli_input_is_one_line(served_run, capsys, extra, message):
    assert main(["serve", "--checkpoint", str(served_run), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_missing_checkpoint_and_abbreviations_are_refused(tmp_path, capsys):
    assert main(["serve", "--checkpoint", str(tmp_path / "nope")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--check", str(tmp_path)])
    assert exit_.value.code == 2


def test_rollout_naming_an_unserved_model_is_refused(served_run, tmp_path, capsys):
    policy = tmp_path / "rollout.toml"
    policy.write_text('default = "on"\n[regions.DE]\nstate = "on"\nmodel = "grok-huge"\n')
    assert main(["serve", "--checkpoint", str(served_run), "--rollout", str(policy)]) == 2
    assert "grok-huge" in capsys.readouterr().err


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="SIGHUP is POSIX only")
def test_serve_process_answers_and_reloads_the_rollout_on_sighup(served_run, tmp_path):
    policy = tmp_path / "rollout.toml"
    policy.write_text('default = "on"\n[regions.GB]\nstate = "off"\n')
    port = free_port()
    proc = subprocess.Popen(CLI + ["--checkpoint", f"grok-tiny={served_run}", "--port", str(port), "--rollout", str(policy),
                                   "--log-level", "warning"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() is not None else "timeout"
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        body = {"prompt": "In", "max_tokens": 2}
        assert httpx.post(url + "/v1/completions", json=body, headers={"X-Region": "GB"}).status_code == 403
        assert httpx.post(url + "/v1/completions", json=body, headers={"X-Region": "US"}).status_code == 200
        os.kill(proc.pid, signal.SIGHUP)
        deadline = time.monotonic() + 10
        while 'gigafactory_serve_rollout_reloads_total{result="ok"} 1' not in httpx.get(url + "/metrics").text:
            assert time.monotonic() < deadline, "SIGHUP did not reload the policy"
            time.sleep(0.05)
        assert proc.poll() is None  # SIGHUP reloads, it does not stop the server
    finally:
        proc.terminate()
        proc.wait(timeout=20)
