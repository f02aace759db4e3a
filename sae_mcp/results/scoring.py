"""Results of score_explanation and submit_predictions: a blind set (no activations), and the score of the
predictions made on it."""

from __future__ import annotations

from pydantic import BaseModel, Field

from sae_mcp.results import warnings_field


class BlindContext(BaseModel):
    id: str
    text: str = Field(description="The context's tokens joined (newlines as ⏎); fuzzing: one token marked <<so>>")


class BlindSet(BaseModel):
    challenge_id: str = Field(description="Pass it to submit_predictions, once, with the submit_secret")
    sae: str
    feature: int
    explanation: str
    method: str = Field(description="'detection' or 'fuzzing'")
    seed: int = Field(description="Same seed and index, same contexts (less any answered since)")
    min_activation: float = Field(description="Firing = the context's max reaches this fraction of the feature's max")
    expires_in_s: int = Field(description="Seconds left to submit the predictions")
    question: str = Field(description="What a prediction of true means")
    n_true: int = Field(description="Contexts whose answer is true: detection, those that fire (half); fuzzing, "
                        "those marked on the token where it fires most (a quarter: half the firing half)")
    contexts: list[BlindContext] = Field(description="Shuffled; no activations")
    warnings: list[str] | None = warnings_field()


class ScoreMetrics(BaseModel):
    balanced_accuracy: float = Field(description="(recall + specificity) / 2: 0.5 = chance, 1 = perfect")
    interval_95: list[float] = Field(description="95% interval of balanced_accuracy [low, high]")
    accuracy: float
    precision: float | None = Field(default=None, description="Absent when nothing was predicted true")
    recall: float
    specificity: float
    f1: float
    counts: dict[str, int] = Field(description="tp, fp, tn, fn")


class GroupScore(BaseModel):
    group: str = Field(description="'band k' (firing, k = 1 highest context maxima), 'decoy' (fuzzing: firing "
                       "context, marked token silent), 'near miss' (holds a top token, silent), 'silent'")
    lower: float | None = Field(default=None, description="Bands: the lowest context max in the band")
    upper: float | None = Field(default=None, description="Bands: the highest")
    n: int
    correct: int


class Misjudged(BaseModel):
    id: str
    predicted: bool
    truth: bool
    group: str
    max_activation: float = Field(description="The feature's max over the context")
    marked_activation: float | None = Field(default=None, description="Fuzzing: at the marked token")
    text: str = Field(description="The context, its max token in «» when it fires (fuzzing: the mark kept)")


class ExplanationScore(BaseModel):
    score_id: int
    challenge_id: str
    sae: str
    feature: int
    explanation: str
    method: str
    n: int
    seed: int
    min_activation: float = Field(description="Firing = the context's max reaches this fraction of the feature's max")
    scorer: str = Field(description="'agent' (submit_predictions) or 'sampling: <model>' (auto)")
    label_id: int | None = Field(default=None, description="The label of this text, when one is recorded")
    metrics: ScoreMetrics
    groups: list[GroupScore]
    misjudged: list[Misjudged]
    looked_up: list[str] | None = Field(default=None, description="Not blind: ids of the contexts whose activations "
                                        "this conversation looked up after the set was handed out; absent when none "
                                        "were (or the server keeps no ledger to tell)")
    warnings: list[str] | None = warnings_field()


class ScoreExplanation(BaseModel):
    """score_explanation: a blind set to answer with submit_predictions, or (auto) the score itself."""

    challenge: BlindSet | None = None
    submit_secret: str | None = Field(default=None, description="Pass it to submit_predictions with the challenge_id;"
                                      " shown once, never stored")
    score: ExplanationScore | None = None
    note: str | None = Field(default=None, description="Why auto did not score, and what to do")


class ScoreBrief(BaseModel):
    method: str
    balanced_accuracy: float
    n: int
    score_id: int
