"""The one metric every causal tool scores (attribute, ablate_and_test, steer_generate's answer readout, the circuit
tools): at one position, with the first token of the answer (and of the counterfactual),

    logit[answer] - logit[counterfactual]     when a counterfactual is given (the logit difference)
    log P(answer)                             otherwise (log_softmax, not the raw logit)

Why not the raw logit alone: a logit moves with the whole distribution. Ablating a feature can raise logit[answer]
by +0.69 while P(answer) falls, because every other logit rose more; log P(answer) (the logit minus the logsumexp)
and the logit difference both cancel that shared shift. Significance (z against controls, "exceeds every control")
is stated on this metric and on KL only; raw logit changes stay plain numbers.

`Metric` is built by `metric_for` from token ids (validated there: an answer and a counterfactual that start with
the same token would score 0) and evaluated on logits [..., V] at its position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sae_mcp.errors import InvalidInput

LOGIT_DIFFERENCE = "logit_difference"
LOG_PROBABILITY = "log_probability"


@dataclass(frozen=True)
class Metric:
    answer: int  # token id (the answer's first token)
    counterfactual: int | None  # token id, or None: log P(answer)
    answer_token: str  # as shown, e.g. ' doll'
    counterfactual_token: str | None

    @property
    def kind(self) -> str:
        return LOG_PROBABILITY if self.counterfactual is None else LOGIT_DIFFERENCE

    @property
    def name(self) -> str:
        """What the number is, e.g. "logit[' doll'] - logit[' ball']" or "log P(' doll')"."""
        if self.counterfactual is None:
            return f"log P({self.answer_token!r})"
        return f"logit[{self.answer_token!r}] - logit[{self.counterfactual_token!r}]"

    def of(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [..., V] (one position) -> the metric [...], float32, differentiable."""
        logits = logits.float()
        if self.counterfactual is None:
            return logits.log_softmax(-1)[..., self.answer]
        return logits[..., self.answer] - logits[..., self.counterfactual]

    def at(self, logits: torch.Tensor, position: int) -> torch.Tensor:
        """logits [R, S, V] -> the metric at `position` [R]."""
        return self.of(logits[:, position])


def metric_for(engine, answer_ids: list[int], counterfactual_ids: list[int] | None, answer: str,
               counterfactual: str | None) -> Metric:
    """The metric for an answer (and counterfactual) as tokenized by logits.answer_token_ids; the first token of
    each is scored."""
    if counterfactual_ids and counterfactual_ids[0] == answer_ids[0]:
        raise InvalidInput(
            f"answer {answer!r} and counterfactual {counterfactual!r} start with the same token; the metric would be 0"
        )
    a_tok = engine.str_tokens(torch.tensor(answer_ids[:1]))[0]
    c_tok = engine.str_tokens(torch.tensor(counterfactual_ids[:1]))[0] if counterfactual_ids else None
    return Metric(answer_ids[0], counterfactual_ids[0] if counterfactual_ids else None, a_tok, c_tok)


def multi_token_warning(engine, what: str, ids: list[int] | None) -> str | None:
    """'the counterfactual is tokens [' h', 'im']: only the first is scored' when `what` (answer or counterfactual)
    tokenizes to several tokens, else None: the metric's name shows only the first, which reads as a typo."""
    if not ids or len(ids) == 1:
        return None
    return f"the {what} is tokens {engine.str_tokens(torch.tensor(ids))}: only the first is scored"
