"""lm-evaluation-harness (PyPI `lm-eval`) over a Gigafactory checkpoint: its LM interface (loglikelihood,
loglikelihood_rolling, generate_until), so every harness task can score our models.

    gigafactory eval --checkpoint runs/pre-sft --harness-tasks my_task --harness-include tasks/   # run_harness below

lm-eval is optional: without it GrokLM is a plain class with the same methods (requests are objects with `.args`,
as the harness's Instance), so the scoring is tested here either way. Text is encoded with the plain-text encoder
(a task's "[EOS]" stays characters); a document boundary ([EOS], as pre-training's data ends each document) is the
prefix of an empty context. Contexts longer than the model's window keep their end.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from gigafactory.data.tokenizer import EOS_ID, plain_text_encoder
from gigafactory.errors import UserError
from gigafactory.inference.generate import generate_tokens, load_for_inference
from gigafactory.inference.sampling import SamplingParams

try:  # the harness's base class when it is installed (it only needs tqdm to import)
    from lm_eval.api.model import LM as _Base
except ImportError:  # pragma: no cover - exercised where lm-eval is absent
    _Base = object


class GrokLM(_Base):
    def __init__(self, checkpoint: str, device: str = "cpu", max_gen_toks: int = 256):
        if _Base is not object:
            super().__init__()
        loaded = load_for_inference(checkpoint, device)
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        self.encoder = plain_text_encoder(loaded.tokenizer)
        self.max_length, self.max_gen_toks = loaded.model.cfg.max_seq_len, max_gen_toks
        self._device = next(self.model.parameters()).device  # the harness exposes it as the read-only .device

    def _encode(self, text: str) -> list[int]:
        return self.encoder.encode(text).ids if text else []

    @torch.no_grad()
    def _token_logps(self, inputs: list[int], targets: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """log p(targets[i] | inputs[:i+1]) for one window, and whether each target is the argmax."""
        logits = self.model(torch.tensor([inputs], device=self._device))[0].float()
        logp = F.log_softmax(logits, -1)
        t = torch.tensor(targets, device=self._device)
        return logp.gather(1, t[:, None]).squeeze(1), logits.argmax(-1) == t

    def _continuation(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids) split as the harness does: encode the whole, then the context alone,
        with the context's trailing spaces moved to the continuation (so a merge across the boundary is kept)."""
        n_spaces = len(context) - len(context.rstrip(" "))
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        whole, ctx = self._encode(context + continuation), self._encode(context)
        return [EOS_ID] + whole[:len(ctx)], whole[len(ctx):]

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), whether greedy decoding would produce it) per request."""
        out = []
        for req in requests:
            ctx, cont = self._continuation(*req.args[:2])
            ids = (ctx + cont)[-(self.max_length + 1):]
            logps, greedy = self._token_logps(ids[:-1], ids[1:])
            out.append((float(logps[-len(cont):].sum()), bool(greedy[-len(cont):].all())))
        return out

    def loglikelihood_rolling(self, requests) -> list[float]:
        """Log-likelihood of each whole string: disjoint windows of max_length predicted tokens, each predicted
        from the tokens before it in its window ([EOS] before the first), as the harness's rolling windows."""
        out = []
        for req in requests:
            seq = [EOS_ID] + self._encode(req.args[0])
            total = 0.0
            for start in range(0, len(seq) - 1, self.max_length):
                window = seq[start:start + self.max_length + 1]
                total += float(self._token_logps(window[:-1], window[1:])[0].sum())
            out.append(total)
        return out

    def generate_until(self, requests) -> list[str]:
        """Continue each context (greedy unless do_sample) until a stop string, [EOS] or max_gen_toks."""
        out = []
        for req in requests:
            context, kwargs = req.args[0], dict(req.args[1]) if len(req.args) > 1 else {}
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            budget = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
            prompt = ([EOS_ID] + self._encode(context))[-max(1, self.max_length - budget):]
            params = SamplingParams(temperature=temperature, max_tokens=budget)
            ids, text = [], ""
            for token in generate_tokens(self.model, prompt, params, seed=int(kwargs.get("seed", 0))):
                ids.append(token)
                text = self.tokenizer.decode(ids)
                if any(s in text for s in until):
                    break
            cut = min([text.index(s) for s in until if s in text], default=len(text))
            out.append(text[:cut])
        return out


def run_harness(model: GrokLM | str, tasks: list[str], include_path: str = "", limit: int | None = None,
                device: str = "cpu", log_samples: bool = False) -> dict:
    """lm_eval.simple_evaluate over our model: harness tasks by name, with task YAML files from include_path
    (local `dataset_path: json` files run without a download). Returns the harness's output (results, samples)."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UserError("--harness-tasks needs lm-evaluation-harness: pip install lm-eval") from None
    if not tasks:
        raise UserError("--harness-tasks names no task; e.g. --harness-tasks arc_easy, or a task of --harness-include DIR")
    if limit is not None and limit < 1:
        raise UserError(f"--harness-limit {limit} must be >= 1 documents per task (0 = all)")
    if include_path and not Path(include_path).expanduser().is_dir():
        raise UserError(f"--harness-include '{include_path}' is not a directory of task YAML files")
    local = str(Path(include_path).expanduser()) if include_path else None
    manager = TaskManager(include_path=local, include_defaults=False) if local else None  # indexing the built-ins takes seconds
    if manager is None or any(t not in manager.all_tasks for t in tasks):
        manager = TaskManager(include_path=local)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise UserError(f"unknown lm-eval task(s): {', '.join(unknown)}; name tasks of the harness or of --harness-include DIR")
    lm = GrokLM(model, device) if isinstance(model, str) else model
    try:
        return lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, bootstrap_iters=0, log_samples=log_samples)
    except ConnectionError as err:  # a built-in task's dataset, on a machine without the Hub or a cached copy
        raise UserError(f"lm-eval could not fetch the data of {', '.join(tasks)} ({err}); offline, point a task YAML at "
                        "local files (dataset_path: json) and pass its directory with --harness-include DIR") from None
