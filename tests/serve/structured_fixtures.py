"""A server on an untrained model with a 512-token context (room for tool definitions in the prompt), for the
structured-output and tool-call tests: constrained decoding must make even random weights produce valid JSON."""

from __future__ import annotations

import contextlib

import torch
from tokenizers import Tokenizer

from gigafactory.models import GrokModel
from gigafactory.models.config import ModelConfig
from gigafactory.serve.api_server import ServerState
from gigafactory.serve.engine import Engine
from gigafactory.serve.metrics import Metrics
from tests.conftest import TINY_MODEL
from tests.serve.conftest import running_server


@contextlib.contextmanager
def random_model_server(tokenizer: Tokenizer):
    """Yields the base URL of a server on a randomly initialised tiny model named grok-tiny."""
    torch.manual_seed(0)
    model = GrokModel(ModelConfig(**{**TINY_MODEL, "max_seq_len": 512}))
    model.init_weights(0)
    metrics = Metrics()
    engine = Engine(model.eval(), tokenizer, "grok-tiny", n_slots=4, metrics=metrics)
    with running_server(ServerState({"grok-tiny": engine}, "grok-tiny", metrics)) as url:
        yield url
