"""The task suites of the [eval] config section, scored on the model being trained (train/evaluation.py decides when
and where the numbers go). Each suite calls the functions `gigafactory eval` calls on a loaded checkpoint, on the
trainer's module instead, so a score logged at step N equals `gigafactory eval --limit L --pref-limit L`'s (L =
eval.limit) on the checkpoint saved at step N.

    kjv             the KJV task's held-out items (tasks.py): answer log-likelihood per token and token accuracy,
                    preference accuracy and margin for each rejected-answer construction (near, far misses;
                    task_metrics.py); exact match by greedy decoding with eval.exact_match (slow: one generation
                    per item)
    harness:<task>  an lm-evaluation-harness task through GrokLM (harness.py), its YAML from eval.harness_include
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer
from torch import nn

from gigafactory.config.job import EVAL_SUITES, JobConfig
from gigafactory.data.chat import ChatTemplate
from gigafactory.data.tokenizer import plain_text_encoder
from gigafactory.errors import UserError
from gigafactory.inference.generate import LoadedModel
from gigafactory.posttrain.evaluate import task_scores, write_results
from gigafactory.posttrain.harness import GrokLM, run_harness
from gigafactory.posttrain.task_metrics import answer_scores, preference_scores
from gigafactory.posttrain.tasks import REJECTED, build_task
from gigafactory.train.evaluation import SuiteResult, TaskSuites


class KJVSuite:
    name = "kjv"

    def __init__(self, cfg: JobConfig, tokenizer: Tokenizer):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.template = ChatTemplate(tokenizer, plain_text_encoder(tokenizer))
        # the held-out items `gigafactory eval --limit L --pref-limit L` scores: the first L for exact match and the
        # answer scores, a seeded draw of L for the preferences (one pair per item and rejected-answer construction)
        self.items = build_task()["test"][:cfg.eval.limit]
        self.pref_items = build_task(max_test=cfg.eval.limit)["test"]

    def run(self, model: nn.Module) -> SuiteResult:
        if self.cfg.eval.exact_match:  # exactly `gigafactory eval`'s section, greedy decoding included
            section = task_scores(LoadedModel(model, self.tokenizer, self.cfg, Path()), self.items, pref_items=self.pref_items, rejected=REJECTED)
        else:  # its teacher-forced scores alone, as that section holds them
            section = {"items": len(self.items), **answer_scores(model, self.template, self.items),
                       "preference": {style: preference_scores(model, self.template, self.pref_items, rejected=style) for style in REJECTED}}
        scores = {"answer_loglik": section["answer_logp_per_token"], "answer_token_acc": section["answer_token_accuracy"]}
        for style, pref in (section["preference"] or {}).items():
            if pref:  # None without chat role tokens in the tokenizer, or when no pair fits the context
                scores.update({f"preference_acc_{style}": pref["preference_accuracy"], f"preference_margin_{style}": pref["preference_margin"]})
        if "exact_match" in section:
            scores["exact_match"] = section["exact_match"]
        return SuiteResult("kjv_task", section, scores)


class TrainingModelLM(GrokLM):
    """GrokLM over the trainer's module rather than a checkpoint read from disk (the same scoring methods)."""

    def __init__(self, model: nn.Module, tokenizer: Tokenizer, max_gen_toks: int = 256):
        super(GrokLM, self).__init__()  # the harness's LM base (or object), without GrokLM's checkpoint loading
        self.model, self.tokenizer = model, tokenizer
        self.encoder = plain_text_encoder(tokenizer)
        self.max_length, self.max_gen_toks = model.cfg.max_seq_len, max_gen_toks
        self._device = next(model.parameters()).device


class HarnessSuite:
    def __init__(self, task: str, cfg: JobConfig, tokenizer: Tokenizer):
        self.name, self.task, self.cfg, self.tokenizer = f"harness:{task}", task, cfg, tokenizer
        check_harness_task(task, cfg.eval.harness_include)

    def run(self, model: nn.Module) -> SuiteResult:
        e = self.cfg.eval
        out = run_harness(TrainingModelLM(model, self.tokenizer), [self.task], e.harness_include, e.limit)
        # lm-eval returns results where LOCAL_RANK is 0 only; the other ranks ran the same forwards (FSDP gathers
        # need them) and have nothing to log (rank 0 logs). Kept as `gigafactory eval --harness-tasks` keeps them:
        # each task's (and group's) numeric metrics.
        section = {task: {k: v for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
                   for task, m in (out["results"] if out else {}).items()}
        scores = {("" if task == self.task else f"{task}/") + metric.removesuffix(",none").replace(",", "_"): value
                  for task, m in section.items() for metric, value in m.items()}  # a group's subtasks by name
        return SuiteResult("harness", section, scores)


def check_harness_task(task: str, include: str) -> None:
    """Fail before training, in one line, when lm-eval is missing or does not know the task (else the first eval
    point would, after the model is built and maybe a reference pass is done)."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UserError(f"eval.tasks harness:{task} needs lm-evaluation-harness: pip install lm-eval") from None
    local = Path(include).expanduser() if include else None
    if local is not None and not local.is_dir():
        raise UserError(f"eval.harness_include={include!r} is not a directory of lm-eval task YAML files")
    if local is not None and task in TaskManager(include_path=str(local), include_defaults=False).all_tasks:
        return
    if task not in TaskManager(include_path=str(local) if local else None).all_tasks:  # the harness's own tasks
        raise UserError(f"eval.tasks: harness:{task} is not an lm-eval task, built in or in eval.harness_include={include!r}")


def build_task_suites(cfg: JobConfig, tokenizer_json: str) -> TaskSuites:
    """The suites eval.tasks names (config/job.py has already refused unknown names), over the run's tokenizer."""
    tokenizer = Tokenizer.from_str(tokenizer_json)
    suites = []
    for name in cfg.eval.tasks:
        if name == "kjv":
            suites.append(KJVSuite(cfg, tokenizer))
        elif name.startswith("harness:"):
            suites.append(HarnessSuite(name.removeprefix("harness:").strip(), cfg, tokenizer))
        else:
            raise UserError(f"eval.tasks: unknown suite {name!r}; known suites: {', '.join(EVAL_SUITES)}")
    return TaskSuites(suites, write_results)


def attach_task_suites(trainer) -> None:
    """Give a Trainer (pre-training, SFT or DPO) the suites of its eval.tasks; called by the command building it."""
    if trainer.cfg.eval.tasks:
        trainer.task_suites = build_task_suites(trainer.cfg, trainer.tokenizer_json)
