"""Generation from a trained checkpoint: cached equals uncached, sampling controls, CLI streaming."""

from __future__ import annotations

import subprocess
import sys

import pytest

from gigafactory.errors import UserError
from gigafactory.inference.generate import generate_tokens, load_for_inference
from gigafactory.inference.sampling import SamplingParams
from gigafactory.train.trainer import Trainer


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, data_cache):
    from tests.conftest import TINY_MODEL  # noqa: F401  (keeps the tiny shape in one place)
    from gigafactory.config.loader import build_config

    run_dir = tmp_path_factory.mktemp("gen") / "run"
    dotted = {f"model.{k}": v for k, v in TINY_MODEL.items()}
    dotted.update({"data.cache_dir": data_cache, "data.seq_len": 32, "training.batch_size": 4, "training.steps": 4,
                   "training.eval_every": 0, "training.dtype": "fp32", "logging.run_dir": str(run_dir),
                   "logging.tensorboard": False, "logging.progress": False})
    Trainer(build_config({}, dotted)).train()
    return run_dir


@pytest.mark.parametrize("params", [SamplingParams(temperature=0, max_tokens=20), SamplingParams(temperature=1.0, top_k=20, top_p=0.9, max_tokens=20)])
def test_kv_cached_generation_equals_uncached(trained_run, params):
    loaded = load_for_inference(trained_run)
    prompt = loaded.tokenizer.encode("And God said").ids
    cached = list(generate_tokens(loaded.model, prompt, params, seed=5, use_cache=True, stop_at_eos=False))
    uncached = list(generate_tokens(loaded.model, prompt, params, seed=5, use_cache=False, stop_at_eos=False))
    assert cached == uncached and len(cached) == 20


def test_bad_sampling_values_and_long_prompts(trained_run):
    loaded = load_for_inference(trained_run)
    for bad in (SamplingParams(temperature=-1), SamplingParams(top_p=0), SamplingParams(max_tokens=0)):
        with pytest.raises(UserError):
            list(generate_tokens(loaded.model, [5], bad))
    with pytest.raises(UserError, match="context is 64"):
        list(generate_tokens(loaded.model, [5] * 64, SamplingParams()))


def test_generate_cli_streams_text(trained_run):
    result = subprocess.run([sys.executable, "-m", "gigafactory.cli.main", "generate", "--checkpoint", str(trained_run),
                             "--prompt", "In the beginning", "--max-tokens", "10", "--temperature", "0", "--ignore-eos"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("In the beginning") and len(result.stdout) > len("In the beginning\n")


def test_loaded_model_has_zeroed_router_bias(trained_run):
    """Buffers are not in checkpoints; a meta-built model must zero them or routing silently changes."""
    loaded = load_for_inference(trained_run)
    assert all(bool((b == 0).all()) for b in loaded.model.buffers())


@pytest.mark.parametrize("extra,message", [
    (["--temperature", "nan"], "temperature=nan must be a finite number"),
    (["--temperature", "inf"], "temperature=inf must be a finite number"),
    (["--device", "bogus"], "--device 'bogus' is not a device"),
    (["--device", "cuda"], "no CUDA GPU"),
    (["--device", "mps"], "only cpu and cuda"),
    (["--prompt", "caf\udce9"], "--prompt is not valid UTF-8"),  # the bytes b"caf\xe9" as Python receives them
])
def test_generate_bad_input_is_one_line(trained_run, capsys, extra, message):
    import torch

    from gigafactory.cli.main import main

    if "cuda" in extra and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    argv = ["generate", "--checkpoint", str(trained_run), "--prompt", "In", "--max-tokens", "2", *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_generate_any_seed_and_prompt_text_stays_text(trained_run, capsys, monkeypatch):
    """A 22-digit seed works (same text twice), and "[EOS]"/"<|user|>" in the prompt are characters, not control tokens."""
    import gigafactory.inference.generate as gen
    from gigafactory.cli.main import main

    seen, real = [], gen.generate_tokens
    monkeypatch.setattr(gen, "generate_tokens", lambda model, ids, *a, **k: seen.append(list(ids)) or real(model, ids, *a, **k))
    argv = ["generate", "--checkpoint", str(trained_run), "--prompt", "[EOS]<|user|> In", "--max-tokens", "5",
            "--temperature", "1", "--seed", "1234567890123456789012", "--ignore-eos"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert main(argv) == 0
    assert capsys.readouterr().out == first and first.startswith("[EOS]<|user|> In")
    assert seen and not [i for i in seen[0] if i < 7]  # ids 0-6 are [PAD] [BOS] [EOS] [UNK] and the chat roles
