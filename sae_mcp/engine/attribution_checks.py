"""What tells an agent when attribute's first-order numbers fail: exact effects of the top entries, integrated
gradients with its completeness check, and the warnings.

Exact effects. For each of the top `verify` (sae, position, feature) entries, the metric with that one feature
zeroed at that one position, every SAE of the call spliced with its error term, as attribute runs; the entries are
rows of one forward (row 0 nothing zeroed). sae-lens recomputes each SAE's error from the input that SAE actually
sees (hooks off), so an SAE downstream of the ablation passes the change on unaltered: exact_effect =
metric_clean - metric_ablated is the plain model's answer to "what does removing this feature here do".
Gradient x activation is its first-order estimate: they agree when the metric is linear in the feature.

Integrated gradients. The path scales every SAE's feature activations together, acts = alpha * a (a: the clean
activations, one alpha per batch row, midpoints of `steps` intervals of [0, 1]), each SAE's error held at its
clean value e. Each SAE passes on what SAEs before it changed in its input, x - x_clean (0 at the first):

    SAE output = decode(alpha * a) + e + (x - x_clean)

so a later SAE does not screen off the earlier ones (it would with decode(alpha * a) + e alone: a residual SAE
replaces the whole stream, and an earlier SAE's features would get nothing), and the gradient reaches earlier SAEs
as in the gradient method. With one SAE, x = x_clean and this is textbook integrated gradients. The attributions
a * mean_alpha(d metric / d acts) sum to metric(alpha=1) - metric(alpha=0) up to the midpoint rule's error:
endpoint_difference, measured by a forward at alpha = 1 and 0 with the same hooks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from sae_mcp.engine.runtime import Engine
from sae_mcp.engine.saes import LoadedSAE
from sae_mcp.results import rounded
from sae_mcp.results.causal import AttributionEntry, IntegratedGradientsCheck

METHODS = ("gradient", "integrated_gradients")
MAX_VERIFY = 10  # exact effects: one batch row each
MAX_STEPS = 32
IG_ROWS = 8  # interpolation points per forward/backward: bounds the activations the backward pass holds

# An entry disagrees when |attribution - exact| > DISAGREE * max(|exact|, floor): sign flips always count (then
# |attribution - exact| > |exact|), and the floor keeps an entry whose exact effect is ~0 from being flagged for
# a small attribution. floor = FLOOR_OF_METRIC * |metric|, at least FLOOR_MIN logits.
DISAGREE = 0.5
FLOOR_OF_METRIC = 0.05
FLOOR_MIN = 0.01
# An SAE's attributions (features + error) "account for" the metric within a factor of 4, same sign.
IG_TOLERANCE = 0.05  # relative completeness error of integrated gradients before a warning


class MetricIds(NamedTuple):
    position: int  # non-negative
    answer: int
    counterfactual: int | None


def row_metric(logits: torch.Tensor, ids: MetricIds) -> torch.Tensor:
    """logits [R, S, V] -> logit[answer] - logit[counterfactual] (or logit[answer]) at the metric position [R]."""
    at = logits[:, ids.position]  # [R, V]
    return at[:, ids.answer] - (at[:, ids.counterfactual] if ids.counterfactual is not None else 0.0)


# ---------------------------------------------------------------------------------------------------------------
# Exact effects of zeroing one feature at one position


class Cell(NamedTuple):
    """One verified entry: which SAE (its key), where, which feature."""

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


def exact_effects(
    engine: Engine, saes: Sequence[LoadedSAE], tokens: torch.Tensor, ids: MetricIds, cells: Sequence[Cell]
) -> list[float]:
    """metric_clean - metric with cells[i] zeroed, for each i: one forward of len(cells) + 1 rows. tokens [1, S]."""
    model, hooks = engine.model, []
    for s in saes:
        mine = [(i + 1, c) for i, c in enumerate(cells) if c.sae == s.key]  # row 0 is the clean run
        if mine:
            rows, own = zip(*mine)
            hooks.append((f"{s.hook_name}.hook_sae_acts_post", _zero_hook(list(rows), list(own))))
    with torch.inference_mode(), model.saes(saes=[s.sae for s in saes], use_error_term=True):
        with model.hooks(fwd_hooks=hooks):
            m = row_metric(model(tokens.expand(len(cells) + 1, -1), return_type="logits"), ids)  # [1 + n]
    return [float(m[0] - m[i + 1]) for i in range(len(cells))]


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
    """One SAE's hooks on the path: its activations alpha * a as a leaf (one alpha per batch row), its output
    decode(alpha * a) + e_clean + (x - x_clean)."""

    def __init__(self, clean: CleanSae, alphas: torch.Tensor):
        self.clean, self.alphas = clean, alphas  # alphas [R]
        self.x: torch.Tensor | None = None  # [R, S, d_in]
        self.acts: torch.Tensor | None = None  # [R, S, d_sae], a leaf

    def fwd_hooks(self) -> list[tuple[str, Callable]]:
        h = self.clean.sae.hook_name
        return [
            (f"{h}.hook_sae_input", self._keep_input),
            (f"{h}.hook_sae_acts_post", self._scaled_acts),
            (f"{h}.hook_sae_error", self._held_error),
        ]

    def _keep_input(self, x: torch.Tensor, hook) -> torch.Tensor:
        self.x = x
        return x

    def _scaled_acts(self, acts: torch.Tensor, hook) -> torch.Tensor:
        a = self.alphas.to(acts.dtype)[:, None, None] * self.clean.acts  # [R, S, d_sae]
        self.acts = a.requires_grad_(torch.is_grad_enabled())
        return self.acts

    def _held_error(self, err: torch.Tensor, hook) -> torch.Tensor:
        # called under sae-lens' torch.no_grad(); the pass-through term must carry the gradient to earlier SAEs
        with torch.enable_grad():
            shift = (self.x - self.clean.x).reshape(err.shape)  # 0 at the first SAE
            return self.clean.err.expand_as(err) + shift


def _spliced(engine: Engine, caps: list[PathCapture], tokens: torch.Tensor, ids: MetricIds) -> torch.Tensor:
    """The metric per row [R] with every SAE spliced and on the path."""
    model, n = engine.model, len(caps[0].alphas)
    with model.saes(saes=[c.clean.sae.sae for c in caps], use_error_term=True):
        with model.hooks(fwd_hooks=[h for c in caps for h in c.fwd_hooks()]):
            return row_metric(model(tokens.expand(n, -1), return_type="logits"), ids)  # [R]


def _path_gradients(
    engine: Engine, clean: list[CleanSae], tokens: torch.Tensor, ids: MetricIds, alphas: torch.Tensor
) -> list[torch.Tensor]:
    """Per SAE, d metric / d acts at alpha * a, summed over the rows: [S, d_sae] each."""
    caps = [PathCapture(c, alphas) for c in clean]
    with torch.enable_grad():
        metric = _spliced(engine, caps, tokens, ids).sum()  # rows are independent: each keeps its own gradient
        grads = torch.autograd.grad(metric, [c.acts for c in caps], allow_unused=True)
    return [(g if g is not None else torch.zeros_like(c.acts)).float().sum(0) for g, c in zip(grads, caps)]


def integrated_gradients(
    engine: Engine, clean: list[CleanSae], tokens: torch.Tensor, ids: MetricIds, steps: int
) -> tuple[list[torch.Tensor], float]:
    """Per SAE, a * mean over alphas of d metric / d acts ([S, d_sae] each), and the endpoint difference
    metric(alpha=1) - metric(alpha=0) they should sum to. tokens [1, S]."""
    alphas = (torch.arange(steps, device=tokens.device, dtype=torch.float32) + 0.5) / steps  # [steps] midpoints
    # [S, d_sae] each, summed in float32: steps gradients of a bf16/fp16 model would lose digits
    total = [torch.zeros_like(c.acts[0], dtype=torch.float32) for c in clean]
    for chunk in alphas.split(IG_ROWS):
        for t, g in zip(total, _path_gradients(engine, clean, tokens, ids, chunk)):
            t += g.float()
    with torch.inference_mode():
        ends = _spliced(engine, [PathCapture(c, alphas.new_tensor([1.0, 0.0])) for c in clean], tokens, ids)  # [2]
    return [c.acts[0].float() * t / steps for c, t in zip(clean, total)], float(ends[0] - ends[1])


def ig_check(steps: int, attribution_sum: float, endpoint_difference: float, metric: float) -> IntegratedGradientsCheck:
    # relative to the endpoint difference, floored as in `disagrees`: a path that moves the metric by ~0 is not a
    # reason to call a 0.001-logit miss 100% off
    scale = max(abs(endpoint_difference), FLOOR_OF_METRIC * abs(metric), FLOOR_MIN)
    err = abs(attribution_sum - endpoint_difference) / scale
    return IntegratedGradientsCheck(
        steps=steps, attribution_sum=rounded(attribution_sum, 6), endpoint_difference=rounded(endpoint_difference, 6),
        relative_error=rounded(err, 4),
    )


# ---------------------------------------------------------------------------------------------------------------
# Warnings: one sentence each, saying what to do


def disagrees(attribution: float, exact: float, metric: float) -> bool:
    floor = max(FLOOR_MIN, FLOOR_OF_METRIC * abs(metric))
    return abs(attribution - exact) > DISAGREE * max(abs(exact), floor)


def linearity_warning(top: Sequence[AttributionEntry], metric: float, method: str) -> str | None:
    bad = [t for t in top if t.exact_effect is not None and disagrees(t.attribution, t.exact_effect, metric)]
    if not bad:
        return None
    named = "; ".join(
        f"{t.sae} feature {t.feature} at position {t.position} ({t.token!r}): attribution {t.attribution:.4g}, "
        f"exact_effect {t.exact_effect:.4g}" for t in bad
    )
    if method == "gradient":
        return (f"gradient x activation is far from the exact effect of zeroing the feature for {named}: the metric "
                "is not linear in these features here, so rank by exact_effect, or rerun with "
                "method='integrated_gradients'")
    return (f"the integrated-gradients attribution differs from the exact effect of zeroing the feature alone for "
            f"{named}: its effect depends on the other features (integrated gradients removes them all together), "
            "so use exact_effect (or ablate_and_test) for what removing this one feature does")


def completeness_warning(check: IntegratedGradientsCheck | None) -> str | None:
    if check is None or check.relative_error <= IG_TOLERANCE:
        return None
    head = (f"integrated gradients with steps={check.steps} sums to {check.attribution_sum:.4g} but the metric moves "
            f"{check.endpoint_difference:.4g} over the path ({check.relative_error:.0%} off)")
    if check.steps < MAX_STEPS:
        return f"{head}: rerun with more steps (e.g. steps={min(2 * check.steps, MAX_STEPS)})"
    return f"{head}: the path is too curved for {MAX_STEPS} steps, so treat the attributions as approximate"
