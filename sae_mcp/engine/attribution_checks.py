"""What tells an agent when attribute's first-order numbers fail: the exact contribution of every returned entry,
integrated gradients with its completeness check, and the warnings.

Sign convention, said once: an entry's contribution is metric - metric with it zeroed, so a positive contribution
raises the metric and zeroing that feature lowers the metric by exactly that much (ablate_and_test's change is
minus the contribution).

Exact contributions. For every returned (sae, position, feature) entry, the metric with that one feature zeroed at
that one position, every SAE of the call spliced with its error term, as attribute runs: one batch row per entry
(row 0 nothing zeroed), the rows chunked so a forward holds at most ROW_ELEMENTS logits and activations. sae-lens
recomputes each SAE's error from the input that SAE actually sees (hooks off), so an SAE downstream of the zeroing
passes the change on unaltered: exact_contribution = metric_clean - metric_zeroed is the plain model's answer to
"how much does this feature here contribute". Gradient x activation is its first-order estimate: they agree when
the metric is linear in the feature.

Integrated gradients, two paths. The features' path scales every SAE's feature activations together, acts = alpha *
a (a: the clean activations; one alpha per batch row, midpoints of `steps` intervals of [0, 1]), each SAE's error
held at its clean value e; the error's path scales every error, err = alpha * e, the features held. Each SAE passes
on what SAEs before it changed in its input, x - x_clean (0 at the first):

    SAE output = decode(alpha * a) + e + (x - x_clean)      or      decode(a) + alpha * e + (x - x_clean)

so a later SAE does not screen off the earlier ones (it would without the shift: a residual SAE replaces the whole
stream, and an earlier SAE's features would get nothing), and the gradient reaches earlier SAEs as in the gradient
method. With one SAE this is textbook integrated gradients on each path. A feature's attribution is
a_f * mean_alpha(d metric / d a_f), the error's e . mean_alpha(d metric / d e); each path's attributions sum to its
metric(alpha=1) - metric(alpha=0) up to the midpoint rule's error (its endpoint difference, measured by a forward at
alpha = 1 and 0 with the same hooks). Why not one path scaling both: see integrated_gradients.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from sae_mcp.engine.metric import Metric
from sae_mcp.engine.runtime import Engine, FwdHooks
from sae_mcp.engine.saes import LoadedSAE
from sae_mcp.results import rounded
from sae_mcp.results.causal import AttributionEntry, IntegratedGradientsCheck

METHODS = ("gradient", "integrated_gradients")
MAX_STEPS = 32
IG_ROWS = 8  # interpolation points per forward/backward: bounds the activations the backward pass holds
# Exact contributions: a forward holds at most this many floats of logits [R, S, V] plus SAE activations
# [R, S, d_sae] per row (2^26 floats = 256 MB in fp32): gpt2-small with a 24576-feature SAE, a 20-token prompt gets
# ~45 rows a forward; MAX_ROWS caps tiny models.
ROW_ELEMENTS = 1 << 26
MAX_ROWS = 64

# An entry disagrees when |attribution - exact| > DISAGREE * max(|exact|, floor): sign flips always count (then
# |attribution - exact| > |exact|), and the floor keeps an entry whose exact effect is ~0 from being flagged for
# a small attribution. floor = FLOOR_OF_METRIC * |metric|, at least FLOOR_MIN logits.
DISAGREE = 0.5
FLOOR_OF_METRIC = 0.05
FLOOR_MIN = 0.01
# An SAE's attributions (features + error) "account for" the metric within a factor of 4, same sign.
IG_TOLERANCE = 0.05  # relative completeness error of integrated gradients before a warning


class MetricAt(NamedTuple):
    """The metric (engine/metric.py) at its position (non-negative)."""

    metric: Metric
    position: int

    def of(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [R, S, V] -> the metric per row [R]."""
        return self.metric.at(logits, self.position)


# ---------------------------------------------------------------------------------------------------------------
# Exact contributions of one feature at one position


ERROR = -1  # a Cell's feature for the SAE's error node at that position (trace_circuit checks error nodes too)


class Cell(NamedTuple):
    """One verified entry: which SAE (its key), where, which feature (ERROR: the error node there)."""

    sae: str
    position: int
    feature: int


def _zero_hook(rows: list[int], cells: list[Cell]) -> Callable:
    """A hook for <hook>.hook_sae_acts_post zeroing, in batch row rows[i], cells[i]'s feature at its position."""

    def hook(acts: torch.Tensor, hook) -> torch.Tensor:  # acts [R, S, d_sae]
        acts = acts.clone()
        idx = [torch.tensor(v, device=acts.device) for v in (rows, [c.position for c in cells],
                                                              [c.feature for c in cells])]
        acts[idx[0], idx[1], idx[2]] = 0.0
        return acts

    return hook


def _zero_error_hook(rows: list[int], cells: list[Cell]) -> Callable:
    """A hook for <hook>.hook_sae_error zeroing, in batch row rows[i], the error at cells[i]'s position."""

    def hook(err: torch.Tensor, hook) -> torch.Tensor:  # err [R, S, d_in] (or [R, S, n_heads, d_head])
        err = err.clone()
        err[torch.tensor(rows, device=err.device), torch.tensor([c.position for c in cells], device=err.device)] = 0.0
        return err

    return hook


def rows_per_forward(engine: Engine, saes: Sequence[LoadedSAE], n_tokens: int) -> int:
    """How many batch rows one exact-contribution forward may hold under ROW_ELEMENTS (at least 1)."""
    per_row = n_tokens * (engine.model.cfg.d_vocab + sum(s.d_sae for s in saes) + 4 * engine.model.cfg.d_model)
    return max(1, min(MAX_ROWS, ROW_ELEMENTS // max(per_row, 1)))


def _zeroed_metrics(engine: Engine, saes: Sequence[LoadedSAE], tokens: torch.Tensor, at: MetricAt,
                    cells: Sequence[Cell | None]) -> torch.Tensor:
    """The metric per row [len(cells)] with row i's cell zeroed (None: nothing zeroed). tokens [1, S]."""
    model = engine.model
    hooks: FwdHooks = []
    for s in saes:
        mine = [(i, c) for i, c in enumerate(cells) if c is not None and c.sae == s.key and c.feature != ERROR]
        if mine:
            rows, own = zip(*mine)
            hooks.append((f"{s.hook_name}.hook_sae_acts_post", _zero_hook(list(rows), list(own))))
        errors = [(i, c) for i, c in enumerate(cells) if c is not None and c.sae == s.key and c.feature == ERROR]
        if errors:
            rows, own = zip(*errors)
            hooks.append((f"{s.hook_name}.hook_sae_error", _zero_error_hook(list(rows), list(own))))
    with torch.inference_mode(), model.saes(saes=[s.sae for s in saes], use_error_term=True):
        with model.hooks(fwd_hooks=hooks):
            return at.of(model(tokens.expand(len(cells), -1), return_type="logits"))  # [R]


def exact_contributions(
    engine: Engine, saes: Sequence[LoadedSAE], tokens: torch.Tensor, at: MetricAt, cells: Sequence[Cell],
    cancel: Callable[[], None] | None = None,
) -> list[float]:
    """metric_clean - metric with cells[i] zeroed, for each i: each cell in its own batch row, rows_per_forward
    rows a forward (the first forward's row 0 is the clean run), each forward its own device turn (calls queued
    meanwhile run between them). tokens [1, S]. `cancel` is called between forwards (raises to stop)."""
    if not cells:
        return []
    per = rows_per_forward(engine, saes, tokens.shape[1])
    rows: list[Cell | None] = [None, *cells]
    metrics: list[float] = []
    for i in range(0, len(rows), per):
        if cancel is not None and i:
            cancel()
        with engine.device_work():
            metrics += _zeroed_metrics(engine, saes, tokens, at, rows[i : i + per]).tolist()
    return [metrics[0] - m for m in metrics[1:]]


# ---------------------------------------------------------------------------------------------------------------
# Integrated gradients


@dataclass(frozen=True)
class CleanSae:
    """One SAE's values on the clean forward (detached), the path's fixed points."""

    sae: LoadedSAE
    acts: torch.Tensor  # [1, S, d_sae]
    err: torch.Tensor  # [1, S, d_in] or [1, S, n_heads, d_head] at hook_z
    x: torch.Tensor  # [1, S, d_in]: the SAE's input


class PathCapture:
    """One SAE's hooks on a path: its activations scale_a * a and its error scale_e * e as leaves (one scale per batch
    row), its output decode(scale_a * a) + scale_e * e + (x - x_clean)."""

    def __init__(self, clean: CleanSae, scale_a: torch.Tensor, scale_e: torch.Tensor, first: bool):
        self.clean, self.scale_a, self.scale_e = clean, scale_a, scale_e  # [R] each
        # The first SAE on the stream sees its clean input: its shift is exactly 0, not x - x_clean, which is float
        # noise between a batch of R rows and the clean 1-row forward (~4e-7 on the tiny test model): after a
        # LayerNorm such noise is not small when the rest of the stream is ~0.
        self.first = first

    # Kept by the hooks during the forward (read after it):
    x: torch.Tensor  # [R, S, d_in]
    acts: torch.Tensor  # [R, S, d_sae], a leaf
    err: torch.Tensor  # [R, S, d_in] ([R, S, n_heads, d_head] at hook_z), a leaf

    def fwd_hooks(self) -> FwdHooks:
        h = self.clean.sae.hook_name
        return [
            (f"{h}.hook_sae_input", self._keep_input),
            (f"{h}.hook_sae_acts_post", self._scaled_acts),
            (f"{h}.hook_sae_error", self._scaled_error),
        ]

    def _keep_input(self, x: torch.Tensor, hook) -> torch.Tensor:
        self.x = x
        return x

    def _scaled_acts(self, acts: torch.Tensor, hook) -> torch.Tensor:
        a = self.scale_a.to(acts.dtype)[:, None, None] * self.clean.acts  # [R, S, d_sae]
        self.acts = a.requires_grad_(torch.is_grad_enabled())
        return self.acts

    def _scaled_error(self, err: torch.Tensor, hook) -> torch.Tensor:
        # called under sae-lens' torch.no_grad(); the pass-through term must carry the gradient to earlier SAEs
        with torch.enable_grad():
            shift = 0.0 if self.first else (self.x - self.clean.x).reshape(err.shape)
            scale = self.scale_e.to(err.dtype).reshape(-1, *[1] * (err.ndim - 1))  # [R, 1, 1(, 1)]
            self.err = (scale * self.clean.err).requires_grad_(torch.is_grad_enabled())  # [R, S, ...]
            return self.err + shift


# Which nodes a path scales (the others are held at their clean values). Not ERROR: that is the error node's feature.
FEATURE_PATH, ERROR_PATH = "features", "error"


def _captures(clean: list[CleanSae], alphas: torch.Tensor, path: str) -> list[PathCapture]:
    """One PathCapture per SAE (clean is in layer order) scaling `path`'s nodes by alphas [R]; the first is first
    on the stream when it alone sits at the earliest layer."""
    ones = torch.ones_like(alphas)
    scale_a, scale_e = (alphas, ones) if path == FEATURE_PATH else (ones, alphas)
    layers = [c.sae.layer for c in clean]
    return [PathCapture(c, scale_a, scale_e, first=i == 0 and layers.count(layers[0]) == 1)
            for i, c in enumerate(clean)]


def _spliced(engine: Engine, caps: list[PathCapture], tokens: torch.Tensor, at: MetricAt) -> torch.Tensor:
    """The metric per row [R] with every SAE spliced and on the path."""
    model, n = engine.model, len(caps[0].scale_a)
    with model.saes(saes=[c.clean.sae.sae for c in caps], use_error_term=True):
        with model.hooks(fwd_hooks=[h for c in caps for h in c.fwd_hooks()]):
            return at.of(model(tokens.expand(n, -1), return_type="logits"))  # [R]


def _path_gradients(
    engine: Engine, clean: list[CleanSae], tokens: torch.Tensor, at: MetricAt, alphas: torch.Tensor, path: str
) -> list[torch.Tensor]:
    """Per SAE, d metric / d (its scaled nodes) summed over the rows: [S, d_sae] (features) or [S, ...] (error)."""
    caps = _captures(clean, alphas, path)
    with torch.enable_grad():
        metric = _spliced(engine, caps, tokens, at).sum()  # rows are independent: each keeps its own gradient
        leaves = [c.acts if path == FEATURE_PATH else c.err for c in caps]
        grads = torch.autograd.grad(metric, leaves, allow_unused=True)
    return [(g if g is not None else torch.zeros_like(leaf)).float().sum(0) for g, leaf in zip(grads, leaves)]


@dataclass(frozen=True)
class PathAttribution:
    """One SAE's integrated-gradients attributions."""

    features: torch.Tensor  # [S, d_sae]: a * mean_alpha(d metric / d acts), the error held
    error_per_token: torch.Tensor  # [S]: e_p . mean_alpha(d metric / d e_p), the features held


@dataclass(frozen=True)
class PathEnds:
    """metric(alpha=1) - metric(alpha=0) of each path: what its attributions sum to with many steps."""

    features: float
    error: float


def _integrate(engine: Engine, clean: list[CleanSae], tokens: torch.Tensor, at: MetricAt, steps: int, path: str
               ) -> tuple[list[torch.Tensor], float]:
    """Per SAE, (clean nodes) * mean over the midpoints of the gradient, and the path's endpoint difference. Each
    chunk of IG_ROWS points is its own device turn."""
    alphas = (torch.arange(steps, device=tokens.device, dtype=torch.float32) + 0.5) / steps  # [steps] midpoints
    nodes = [(c.acts if path == FEATURE_PATH else c.err)[0].float() for c in clean]  # [S, d_sae] or [S, d_in]
    # summed in float32: steps gradients of a bf16/fp16 model would lose digits
    totals = [torch.zeros_like(n) for n in nodes]
    for chunk in alphas.split(IG_ROWS):
        with engine.device_work():
            grads = _path_gradients(engine, clean, tokens, at, chunk, path)
        for t, g in zip(totals, grads):
            t += g
    with engine.device_work(), torch.inference_mode():
        ends = _spliced(engine, _captures(clean, alphas.new_tensor([1.0, 0.0]), path), tokens, at)  # [2]
    return [n * t / steps for n, t in zip(nodes, totals)], float(ends[0] - ends[1])


def integrated_gradients(
    engine: Engine, clean: list[CleanSae], tokens: torch.Tensor, at: MetricAt, steps: int
) -> tuple[list[PathAttribution], PathEnds]:
    """Per SAE, its features' integrated gradients (every SAE's features scaled together, the errors held) and its
    error's (every error scaled together, the features held), and each path's endpoint difference. tokens [1, S].

    Two paths, not one scaling features and error together: from an all-zero residual stream a pre-norm model is
    degenerate (LayerNorm/RMSNorm are scale-invariant, so the metric hardly moves along alpha and then jumps at 0):
    on the tiny test model such a joint path's 32-step sum was -0.48 against an endpoint difference of 1.70. Holding
    the other nodes keeps the stream away from zero on both paths."""
    feats, end_f = _integrate(engine, clean, tokens, at, steps, FEATURE_PATH)
    errs, end_e = _integrate(engine, clean, tokens, at, steps, ERROR_PATH)
    out = [PathAttribution(features=f, error_per_token=e.flatten(1).sum(-1)) for f, e in zip(feats, errs)]
    return out, PathEnds(features=end_f, error=end_e)


def _relative(attribution_sum: float, endpoint_difference: float, metric: float) -> float:
    # relative to the endpoint difference, floored as in `disagrees`: a path that moves the metric by ~0 is not a
    # reason to call a 0.001-logit miss 100% off
    scale = max(abs(endpoint_difference), FLOOR_OF_METRIC * abs(metric), FLOOR_MIN)
    return abs(attribution_sum - endpoint_difference) / scale


def ig_check(steps: int, feature_sum: float, error_sum: float, ends: PathEnds, metric: float
             ) -> IntegratedGradientsCheck:
    return IntegratedGradientsCheck(
        steps=steps, attribution_sum=rounded(feature_sum, 6), endpoint_difference=rounded(ends.features, 6),
        relative_error=rounded(_relative(feature_sum, ends.features, metric), 4),
        error_attribution_sum=rounded(error_sum, 6), error_endpoint_difference=rounded(ends.error, 6),
        error_relative_error=rounded(_relative(error_sum, ends.error, metric), 4),
    )


# ---------------------------------------------------------------------------------------------------------------
# Warnings: one sentence each, saying what to do


def disagrees(attribution: float, exact: float, metric: float) -> bool:
    floor = max(FLOOR_MIN, FLOOR_OF_METRIC * abs(metric))
    return abs(attribution - exact) > DISAGREE * max(abs(exact), floor)


def linearity_warning(top: Sequence[AttributionEntry], metric: float, method: str, one_sae: bool) -> str | None:
    """Names every entry whose attribution disagrees with its exact contribution (the `disagrees` rule)."""
    bad = [t for t in top if t.exact_contribution is not None
           and disagrees(t.attribution, t.exact_contribution, metric)]
    if not bad:
        return None
    named = "; ".join(("" if one_sae else f"{t.sae} ") + f"{t.feature} at {t.position} {t.token!r} "
                      f"({t.attribution:.3g} vs {t.exact_contribution:.3g})" for t in bad)
    if method == "gradient":
        return (f"{len(bad)} entr{'y' if len(bad) == 1 else 'ies'} where gradient x activation is far from the exact "
                f"contribution (attribution vs exact): {named}. The metric is not linear in these features here: "
                "rank by exact_contribution, or rerun with method='integrated_gradients'")
    return (f"{len(bad)} entr{'y' if len(bad) == 1 else 'ies'} where the integrated-gradients attribution differs "
            f"from the exact contribution of the feature alone (attribution vs exact): {named}. Integrated gradients "
            "removes every node together, so its share depends on the others: use exact_contribution (or "
            "ablate_and_test) for what this one feature does")


def completeness_warning(check: IntegratedGradientsCheck | None) -> str | None:
    if check is None or max(check.relative_error, check.error_relative_error) <= IG_TOLERANCE:
        return None
    if check.relative_error >= check.error_relative_error:
        got, moved, off, what = check.attribution_sum, check.endpoint_difference, check.relative_error, "features'"
    else:
        got, moved, off = check.error_attribution_sum, check.error_endpoint_difference, check.error_relative_error
        what = "errors'"
    head = (f"integrated gradients with steps={check.steps}: the {what} attributions sum to {got:.4g} but the metric "
            f"moves {moved:.4g} over their path ({off:.0%} off)")
    if check.steps < MAX_STEPS:
        return f"{head}: rerun with more steps (e.g. steps={min(2 * check.steps, MAX_STEPS)})"
    return f"{head}: the path is too curved for {MAX_STEPS} steps, so treat the attributions as approximate"
