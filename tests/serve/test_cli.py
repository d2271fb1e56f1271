"""`gigafactory serve` from the shell: one-line errors for bad input; a real process that reloads on SIGHUP."""

from __future__ import annotations

import os
import signal
import socket
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


@pytest.mark.parametrize("keys_file,extra,message", [
    ('[key."sk-x"]\nname = "x"\n', [], "unknown table(s) key"),  # misspelled: must not start open to anyone
    ("", [], "defines no key"),
    ('[keys."sk-x"]\nname = "x"\nrpm = 5\n', [], "unknown field(s) rpm"),
    (None, ["--rate-limit", "60"], "no key is configured"),
    (None, ["--device", "bogus"], "--device 'bogus' is not a device"),
    (None, ["--device", "cuda"], "no CUDA GPU"),
    (None, ["--trusted-proxies", "10.0.0.0/33"], "is not an IP address or network"),
    (None, ["--request-timeout", "nan"], "--request-timeout nan must be"),
    (None, ["--max-queue", "0"], "--max-queue 0 must be >= 1"),
    (None, ["--kv-blocks", "-1"], "--kv-blocks -1 must be between 0"),
    (None, ["--kv-blocks", "1"], "cannot hold one full context"),
    (None, ["--engine-threads", "-1"], "--engine-threads -1 must be >= 0"),
])
def test_bad_keys_and_flags_are_one_line(served_run, tmp_path, capsys, monkeypatch, keys_file, extra, message):
    import torch

    if "cuda" in extra and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    monkeypatch.delenv("GIGAFACTORY_API_KEYS", raising=False)
    if keys_file is not None:
        (tmp_path / "keys.toml").write_text(keys_file)
        extra = ["--api-keys", str(tmp_path / "keys.toml"), *extra]
    assert main(["serve", "--checkpoint", str(served_run), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_the_engine_runs_in_its_own_process_unless_told_otherwise(served_run):
    """The default keeps no weights in the HTTP process; --no-engine-process serves from an in-process thread."""
    from gigafactory.cli.main import build_parser
    from gigafactory.cli.serve import build_state
    from gigafactory.serve.engine import Engine
    from gigafactory.serve.engine_client import EngineClient

    def engine(*extra):
        argv = ["serve", "--checkpoint", str(served_run), *extra]
        return next(iter(build_state(build_parser(argv).parse_args(argv)).engines.values()))

    client = engine("--engine-threads", "3")
    assert isinstance(client, EngineClient) and not client.alive and client.spec.threads == 3
    assert client.vocab_size == engine("--no-engine-process").vocab_size
    assert isinstance(engine("--no-engine-process"), Engine)


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
def test_serve_process_answers_reloads_on_sighup_and_stops_despite_a_stalled_client(served_run, tmp_path):
    policy = tmp_path / "rollout.toml"
    policy.write_text('default = "on"\n[regions.GB]\nstate = "off"\n')
    port = free_port()
    proc = subprocess.Popen(CLI + ["--checkpoint", f"grok-tiny={served_run}", "--port", str(port), "--rollout", str(policy),
                                   "--log-level", "warning", "--shutdown-timeout", "1"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
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
        # a proxy on this machine sets the region and X-Forwarded-For: the trust check must see the proxy, not the client
        proxied = {"X-Region": "US", "X-Forwarded-For": "203.0.113.9"}
        assert httpx.post(url + "/v1/completions", json=body, headers=proxied).status_code == 200
        os.kill(proc.pid, signal.SIGHUP)
        deadline = time.monotonic() + 10
        while 'gigafactory_serve_rollout_reloads_total{result="ok"} 1' not in httpx.get(url + "/metrics").text:
            assert time.monotonic() < deadline, "SIGHUP did not reload the policy"
            time.sleep(0.05)
        assert proc.poll() is None  # SIGHUP reloads, it does not stop the server
        stalled = socket.create_connection(("127.0.0.1", port))  # declares a body and sends a tenth of it
        stalled.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + b"{" * 10)
        time.sleep(0.2)
        proc.terminate()
        t0 = time.monotonic()
        proc.wait(timeout=15)  # without --shutdown-timeout, SIGTERM waits for that body forever
        assert time.monotonic() - t0 < 10
        stalled.close()
    finally:
        proc.terminate()
        proc.wait(timeout=20)
