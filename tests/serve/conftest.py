"""A tiny trained checkpoint and a real uvicorn server on a free localhost port, shared by the serve tests."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import pytest

from gigafactory.inference.generate import load_for_inference
from gigafactory.serve.access import RateLimiter
from gigafactory.serve.api_server import ServerState, create_app
from gigafactory.serve.engine import Engine
from gigafactory.serve.metrics import Metrics


@pytest.fixture(scope="session")
def served_run(tmp_path_factory, data_cache):
    from gigafactory.config.loader import build_config
    from gigafactory.train.trainer import Trainer
    from tests.conftest import TINY_MODEL

    run_dir = tmp_path_factory.mktemp("serve") / "run"
    dotted = {f"model.{k}": v for k, v in TINY_MODEL.items()}
    # Enough steps that greedy text is real words (stop-string tests need decodable text), still ~3 s.
    dotted.update({"data.cache_dir": data_cache, "data.seq_len": 32, "training.batch_size": 4, "training.steps": 30,
                   "optimizer.lr": 1e-2, "optimizer.warmup_steps": 5,
                   "training.eval_every": 0, "training.dtype": "fp32", "logging.run_dir": str(run_dir),
                   "logging.tensorboard": False, "logging.progress": False})
    Trainer(build_config({}, dotted)).train()
    return run_dir


@pytest.fixture(scope="session")
def loaded(served_run):
    return load_for_inference(served_run)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(state: ServerState):
    """Serve the state's app with uvicorn in a thread; yields the base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(state), host="127.0.0.1", port=port, log_level="warning", http="h11"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def make_state(loaded, n_slots=8, names=("grok-tiny",), **kw) -> ServerState:
    metrics = Metrics()
    engines = {n: Engine(loaded.model, loaded.tokenizer, n, n_slots=n_slots, metrics=metrics) for n in names}
    kw.setdefault("limiter", RateLimiter())
    return ServerState(engines, names[0], metrics, **kw)


@pytest.fixture(scope="module")
def server(loaded):
    """An open server (no keys, no rollout) on one tiny model; yields (base_url, state)."""
    state = make_state(loaded)
    with running_server(state) as url:
        yield url, state


def make_process_engine(served_run, metrics: Metrics, n_slots: int = 8, name: str = "grok-tiny", **spec):
    """An EngineClient: the model's engine in its own (spawned) process, started; stop() it when done."""
    from gigafactory.inference.generate import load_checkpoint_files
    from gigafactory.serve.engine_client import EngineClient
    from gigafactory.serve.engine_core import CoreSpec

    tokenizer, config, ckpt = load_checkpoint_files(str(served_run))
    return EngineClient(CoreSpec(str(ckpt), name, n_slots=n_slots, **spec), tokenizer, config.model, metrics).start()


@pytest.fixture(scope="session")
def process_server(served_run):
    """An open server whose engine runs in its own process (`gigafactory serve`'s default); yields (url, state)."""
    metrics = Metrics()
    engine = make_process_engine(served_run, metrics)
    state = ServerState({"grok-tiny": engine}, "grok-tiny", metrics, limiter=RateLimiter())
    try:
        with running_server(state) as url:
            yield url, state
    finally:
        engine.stop()
