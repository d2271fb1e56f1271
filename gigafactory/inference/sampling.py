"""Per-row sampling: logit bias, presence/frequency penalties, a grammar's token mask, temperature, top-k, top-p, min-p;
temperature 0 is greedy.

The order follows OpenAI/vLLM: bias and penalties change the logits, then temperature scales them, then the filters
cut the tail. Temperature is applied in float64 after subtracting the maximum, so any value in (0, 2] - 1e-300 too -
gives a valid distribution (in float32, logit / 1e-300 is inf/nan). The token is drawn by inverse CDF from one uniform
number of the request's generator, so a batch of seeded rows samples with one tiny draw per row (`draw`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from gigafactory.errors import UserError


class TokenConstraint(Protocol):
    """Structured output (serve/structured.py implements it): which tokens may come next, given the tokens generated
    so far. Stateful and per sequence: it advances over the `output_ids` it has not seen yet on each call."""

    def allowed(self, output_ids: Sequence[int], vocab_size: int) -> torch.Tensor:
        """A bool mask [vocab_size]: True where the token keeps the output inside the grammar ([EOS] only once the
        grammar accepts)."""


@dataclass
class SamplingParams:
    temperature: float = 0.8
    top_k: int = 0  # 0 = no top-k filter
    top_p: float = 1.0  # 1.0 = no nucleus filter
    max_tokens: int = 100
    min_p: float = 0.0  # drop tokens below min_p x the top token's probability; 0 = off
    presence_penalty: float = 0.0  # subtracted once from every token already generated
    frequency_penalty: float = 0.0  # subtracted per occurrence in the generated tokens
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    constraint: TokenConstraint | None = None  # a grammar the output must follow (one object per sequence)

    def validate(self) -> None:
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise UserError(f"temperature={self.temperature} must be a finite number >= 0 (0 = greedy)")
        if self.top_k < 0:
            raise UserError(f"top_k={self.top_k} must be >= 0 (0 = off)")
        if not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise UserError(f"top_p={self.top_p} must be in (0, 1]")
        if not (math.isfinite(self.min_p) and 0 <= self.min_p <= 1):
            raise UserError(f"min_p={self.min_p} must be in [0, 1]")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not (math.isfinite(value) and -2 <= value <= 2):
                raise UserError(f"{name}={value} must be in [-2, 2]")
        for token, bias in self.logit_bias.items():
            if not (math.isfinite(bias) and -100 <= bias <= 100):
                raise UserError(f"logit_bias={bias} for token {token} must be in [-100, 100]")
        if self.max_tokens <= 0:
            raise UserError(f"max_tokens={self.max_tokens} must be > 0")

    @property
    def plain_greedy(self) -> bool:
        """Greedy with nothing that changes the logits: the batched argmax gives the answer."""
        return (self.temperature == 0 and not self.logit_bias and not self.presence_penalty
                and not self.frequency_penalty and self.constraint is None)


def adjusted_logits(logits_V: torch.Tensor, params: SamplingParams, output_ids: Sequence[int] = ()) -> torch.Tensor:
    """The float32 logits after logit_bias and the presence/frequency penalties."""
    logits = logits_V.float()
    if params.logit_bias:
        ids = torch.tensor(list(params.logit_bias), device=logits.device)
        logits = logits.index_add(0, ids, torch.tensor(list(params.logit_bias.values()), device=logits.device))
    if output_ids and (params.presence_penalty or params.frequency_penalty):
        counts = torch.bincount(torch.tensor(list(output_ids), device=logits.device), minlength=logits.numel())
        counts = counts[: logits.numel()].float()
        logits = logits - params.frequency_penalty * counts - params.presence_penalty * (counts > 0).float()
    return logits


def sample_next(logits_V: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None,
                output_ids: Sequence[int] = ()) -> int:
    """Pick the next token id from one row of logits (`output_ids`: the tokens generated so far, for penalties and
    the constraint). A constraint removes every token it does not allow before anything else picks."""
    logits = adjusted_logits(logits_V, params, output_ids)
    if params.constraint is not None:
        allowed = params.constraint.allowed(output_ids, logits.numel()).to(logits.device)
        logits = logits.masked_fill(~allowed, float("-inf"))
    if not bool(torch.isfinite(logits).any()):
        raise ValueError("the model produced no finite logit")
    if params.temperature == 0:
        return int(logits.argmax())
    logits = (logits.double() - logits.max().double()) / params.temperature  # max is 0: never inf - inf or 0/0
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = logits.sort(descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > params.top_p  # keep the smallest prefix reaching top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    if params.min_p:
        probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
    if not bool(torch.isfinite(probs).all()):  # a +inf logit: inf - inf
        raise ValueError("the model produced an infinite logit")
    uniform = torch.rand(1, dtype=torch.float64, generator=generator)
    return int(draw(probs.cpu()[None], uniform)[0])


def draw(probs_NV: torch.Tensor, uniform_N: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling [N]: row n's token is the first whose cumulative probability exceeds uniform_n x the row's
    total. One uniform number per row (multinomial's exponential race draws one per vocabulary entry), so rows that
    each have their own generator cost one tiny draw each in a batch; zero-probability tokens are never picked."""
    cdf_NV = probs_NV.cumsum(-1)
    total_N1 = cdf_NV[:, -1:]
    picked = torch.searchsorted(cdf_NV, uniform_N[:, None].to(cdf_NV.dtype) * total_N1, right=True)
    last_positive = (cdf_NV < total_N1).sum(-1, keepdim=True)  # where the cdf reaches its total (u * total rounding up)
    return torch.minimum(picked, last_positive)[:, 0]


def top_logprobs(logits_V: torch.Tensor, token: int, k: int) -> tuple[float, list[tuple[int, float]]]:
    """The sampled token's log-probability under the model (before bias, penalties and temperature, like vLLM's
    default) and the k most likely tokens with theirs."""
    logprobs = logits_V.float().log_softmax(-1)
    top = torch.topk(logprobs, min(k, logprobs.numel())) if k else None
    pairs = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
    return float(logprobs[token]), pairs
