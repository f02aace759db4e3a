"""trace_circuit: a sparse feature circuit through several SAEs, as in Sparse Feature Circuits (Marks et al. 2024).

Nodes. For every traced SAE (ordered by layer) and every position after BOS: each active feature (SAE, position,
feature) and one error node (SAE, position) for what the SAE does not reconstruct. A node's attribution to the
metric (engine/metric.py) is attribute's: gradient x activation, every SAE spliced with its error term and an
identity path through each error (so every node sees the plain model's gradient), or integrated gradients
(method="integrated_gradients", the two paths of attribution_checks). Kept: |attribution| >= node_threshold, at
most max_nodes, largest first; each kept node's exact contribution (metric - metric with it alone zeroed) is
checked as attribute checks its entries. BOS is context, not a node: it is never ablated (the model uses it as
its attention sink, and an SAE is not trained to reconstruct it).

Edges, from a node u of one SAE to a node d (feature or error) of the next SAE up:

    edge(u -> d) = u . d/du [ stopgrad(dm/dd) . d ]

with dm/dd the node pass's gradient, held fixed. d is a function of u through the model: only u's SAE is spliced
(its features and error are leaves at their clean values), the next SAE's input x is read at its hook, and
d = encode(x)[f] for a feature, d = x - decode(encode(x)) for the error node, so the error node is differentiable
in u and receives edges. Nothing lies strictly between consecutive SAEs, so there is nothing to stop gradients
at. Summed over every downstream node, sum_f a_f (g . W_dec[f]) + g . e = g . (x - b_dec) with g the gradient at the
next SAE's output, so a node's out-edges sum to its own attribution (tested). One backward pass per downstream
node, batched: row r of a forward carries d_r's objective, and its gradient at the upstream leaves is d_r's edges.
Edges into the metric are the attributions of the last SAE's nodes. Weights are in metric units.

Faithfulness (Marks et al.): with zero ablation, (m(C) - m(empty)) / (m(M) - m(empty)), m(C) the metric with every
node outside the circuit zeroed at every traced SAE (the circuit's nodes recomputed from what reaches them),
m(empty) with every node zeroed (each SAE then writes its b_dec), m(M) the model; and completeness from m(M \\ C),
the circuit's nodes zeroed. With ablation='mean' (request.ablation), ablated nodes are set to their means over
corpus tokens instead (faithfulness.py: AblationMeans, asked of means_of); node attributions and exact
contributions stay zero-based ("what zeroing the node does").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from sae_mcp.circuits.faithfulness import AblationMeans, faithfulness, ratio_warning
from sae_mcp.circuits.nodes import Node
from sae_mcp.circuits.paths import METRIC, top_paths
from sae_mcp.engine import attribution_checks as checks
from sae_mcp.engine.attribution import backward_pass, resolve_saes
from sae_mcp.engine.attribution_checks import ERROR, CleanSae, MetricAt
from sae_mcp.engine.attribution_hooks import SaeCapture
from sae_mcp.engine.logits import answer_token_ids, answer_variant_warning
from sae_mcp.engine.metric import Metric, metric_for, multi_token_warning
from sae_mcp.engine.runtime import CancelToken, Engine, FwdHooks, context_warning, position_index
from sae_mcp.engine.saes import LoadedSAE
from sae_mcp.errors import InvalidInput
from sae_mcp.results import collect_warnings, rounded
from sae_mcp.results.circuits import CircuitEdge, CircuitGraph, CircuitNode, CircuitResult, Faithfulness

MAX_NODES = 256
ABLATIONS = ("zero", "mean")  # faithfulness: nodes set to 0, or to their mean over corpus tokens
MAX_TRACE_ELEMENTS = 1 << 26  # positions x features, summed over the traced SAEs (a [S, d_sae] float each)
EDGE_ELEMENTS = 1 << 26  # floats a batched edge forward may hold: rows x positions x (d_sae's + 8 d_model)
MAX_EDGE_ROWS = 64

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class CircuitRequest:
    """One trace_circuit call as asked: the prompt, the metric and where it is read, the SAEs, what is kept."""

    prompt: str  # the text traced
    answer: str  # the metric: logit[answer] - logit[counterfactual], or log P(answer)
    counterfactual: str | None = None  # the metric's other token, when given
    saes: tuple[str, ...] | None = None  # the SAEs traced, by key; None = every loaded SAE, one per hook, by layer
    node_threshold: float = 0.0  # nodes kept need |attribution| >= this
    max_nodes: int = 40  # nodes kept at most, by |attribution|
    edge_threshold: float = 0.0  # edges kept need |weight| >= this
    position: int = -1  # the position the metric is read at (negative: from the end)
    method: str = "gradient"  # 'gradient' or 'integrated_gradients'
    steps: int = 8  # integrated gradients' steps
    verify: bool = True  # each kept node's exact contribution computed (its attribution checked)
    ablation: str = "zero"  # faithfulness' ablation: 'zero' or 'mean' (over corpus tokens)

    def check(self) -> None:
        """What needs no model: the method, steps, ablation, max_nodes and the thresholds in their ranges."""
        if self.ablation not in ABLATIONS:
            raise InvalidInput(f"ablation {self.ablation!r} is unknown; pass 'zero' or 'mean'")
        if self.method not in checks.METHODS:
            raise InvalidInput(f"method {self.method!r} is unknown; pass 'gradient' or 'integrated_gradients'")
        if not 1 <= self.steps <= checks.MAX_STEPS:
            raise InvalidInput(f"steps={self.steps} is out of range; pass 1..{checks.MAX_STEPS}")
        if not 1 <= self.max_nodes <= MAX_NODES:
            raise InvalidInput(f"max_nodes={self.max_nodes} is out of range; pass 1..{MAX_NODES}")
        if self.node_threshold < 0 or self.edge_threshold < 0:
            raise InvalidInput("node_threshold and edge_threshold are magnitudes: pass values >= 0")


@dataclass(frozen=True)
class TracePlan:
    """A validated trace_circuit call: its SAEs loaded, its metric built."""

    saes: list[LoadedSAE]  # by layer, one per hook
    metric: Metric
    answer: str
    answer_ids: list[int]
    counterfactual_ids: list[int] | None
    position: int
    prepend_bos: bool
    node_threshold: float
    max_nodes: int
    edge_threshold: float
    method: str
    steps: int
    verify: bool


@dataclass(frozen=True)
class SaeState:
    """One SAE's clean values and node-pass gradients (detached), flattened at hook_z."""

    sae: LoadedSAE
    acts: torch.Tensor  # [S, d_sae]
    err: torch.Tensor  # [S, d_in]
    err_raw: torch.Tensor  # [1, S, ...]: the error as the hook sees it
    g_acts: torch.Tensor  # [S, d_sae]: d metric / d acts
    g_err: torch.Tensor  # [S, d_in]: d metric / d error (= at the SAE's output)
    attr: torch.Tensor  # [S, d_sae]: feature attributions (of the method)
    err_attr: torch.Tensor  # [S]: error node attributions (of the method)


# ---------------------------------------------------------------------------------------------------------------
# Validation


def _plan(engine: Engine, request: CircuitRequest) -> TracePlan:
    """The SAEs resolved (an unknown one is the first error), then request.check(), then the SAEs' BOS agreement
    and the metric's tokens."""
    loaded = resolve_saes(engine, None, request.saes)
    request.check()
    bos = {s.prepend_bos for s in loaded}
    if len(bos) > 1:
        raise InvalidInput("these SAEs disagree on prepending BOS; trace SAEs that agree (saes=[...])")
    answer, counterfactual = request.answer, request.counterfactual
    a_ids = answer_token_ids(engine, answer)
    c_ids = answer_token_ids(engine, counterfactual) if counterfactual is not None else None
    return TracePlan(saes=loaded, metric=metric_for(engine, a_ids, c_ids, answer, counterfactual), answer=answer,
                     answer_ids=a_ids, counterfactual_ids=c_ids, position=request.position, prepend_bos=bos.pop(),
                     node_threshold=request.node_threshold, max_nodes=request.max_nodes,
                     edge_threshold=request.edge_threshold, method=request.method, steps=request.steps,
                     verify=request.verify)


def _check_size(plan: TracePlan, n_tokens: int) -> None:
    size = n_tokens * sum(s.d_sae for s in plan.saes)
    if size > MAX_TRACE_ELEMENTS:
        raise InvalidInput(
            f"this trace is {n_tokens} positions x {sum(s.d_sae for s in plan.saes):,} features over "
            f"{len(plan.saes)} SAEs = {size:,} node slots, over the {MAX_TRACE_ELEMENTS:,} one call may hold: "
            "shorten the prompt or trace fewer SAEs (saes=[...])"
        )


# ---------------------------------------------------------------------------------------------------------------
# Nodes


def _node_pass(engine: Engine, plan: TracePlan, tokens: torch.Tensor, at: MetricAt
               ) -> tuple[float, torch.Tensor, list[SaeState]]:
    """The gradient pass (every SAE spliced, identity error paths), then the method's attributions."""
    captured = [SaeCapture(s) for s in plan.saes]
    with engine.device_work():
        metric, last, grads = backward_pass(engine, captured, tokens, at)
    S = tokens.shape[1]
    if plan.method == "integrated_gradients":
        clean = [CleanSae(c.sae, c.acts.detach(), c.err.detach(), c.x.detach()) for c in captured]
        paths, _ = checks.integrated_gradients(engine, clean, tokens, at, plan.steps)
    states = []
    for i, (c, (g_a, g_e)) in enumerate(zip(captured, grads)):
        acts, err = c.acts.detach()[0].float(), c.err.detach()[0].float().reshape(S, -1)
        g_acts, g_err = g_a[0].float(), g_e[0].float().reshape(S, -1)
        if plan.method == "integrated_gradients":
            attr, err_attr = paths[i].features, paths[i].error_per_token
        else:
            attr, err_attr = acts * g_acts, (g_err * err).sum(-1)
        states.append(SaeState(sae=c.sae, acts=acts, err=err, err_raw=c.err.detach(), g_acts=g_acts, g_err=g_err,
                               attr=attr, err_attr=err_attr))
    return metric, last, states


def _candidates(states: list[SaeState], first: int) -> list[Node]:
    """Every node with a nonzero attribution (after BOS): active features and error nodes."""
    out = []
    for i, st in enumerate(states):
        for p, f in (st.attr[first:] != 0).nonzero().tolist():
            out.append(Node(i, p + first, f, float(st.attr[p + first, f])))
        for p in range(first, st.err_attr.shape[0]):
            if float(st.err_attr[p]) != 0:
                out.append(Node(i, p, ERROR, float(st.err_attr[p])))
    return out


def _kept(plan: TracePlan, candidates: list[Node]) -> list[Node]:
    ranked = sorted(candidates, key=lambda n: -abs(n.attribution))
    return [n for n in ranked if abs(n.attribution) >= plan.node_threshold][: plan.max_nodes]


# ---------------------------------------------------------------------------------------------------------------
# Edges


def _edge_backward(engine: Engine, up: SaeState, down: SaeState, tokens: torch.Tensor, rows: list[Node]
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row r (a downstream node d_r), the gradient of stopgrad(dm/dd_r) . d_r at the upstream SAE's feature
    and error leaves: ([R, S, d_sae], [R, S, d_in]). Only the upstream SAE is spliced; the forward stops at the
    downstream SAE's block."""
    model, R, S = engine.model, len(rows), tokens.shape[1]
    acts_leaf = up.acts[None].expand(R, -1, -1).clone().to(up.sae.sae.dtype).requires_grad_(True)  # [R, S, d_sae]
    err_leaf = up.err_raw.expand(R, *up.err_raw.shape[1:]).clone().requires_grad_(True)  # [R, S, ...]
    kept: dict[str, torch.Tensor] = {}

    def keep_input(x: torch.Tensor, hook) -> torch.Tensor:
        kept["x"] = x
        return x

    hooks: FwdHooks = [(f"{up.sae.hook_name}.hook_sae_acts_post", lambda a, hook: acts_leaf),
                       (f"{up.sae.hook_name}.hook_sae_error", lambda e, hook: err_leaf),
                       (down.sae.hook_name, keep_input)]
    with torch.enable_grad(), model.saes(saes=[up.sae.sae], use_error_term=True), model.hooks(fwd_hooks=hooks):
        model(tokens.expand(R, -1), return_type=None, stop_at_layer=down.sae.layer + 1,
              attention_mask=torch.ones((R, S), dtype=tokens.dtype, device=tokens.device))
        x = kept["x"]
        x = x.flatten(-2) if x.ndim == 4 else x  # [R, S, d_in]
        a = down.sae.sae.encode(x.to(down.sae.sae.dtype))  # [R, S, d_sae_down], differentiable in the leaves
        e = (x - down.sae.sae.decode(a).reshape(x.shape)).float()  # [R, S, d_in]
        objective = torch.zeros((), device=x.device)
        for r, d in enumerate(rows):
            if d.feature == ERROR:
                objective = objective + (down.g_err[d.position] * e[r, d.position]).sum()
            else:
                objective = objective + down.g_acts[d.position, d.feature] * a[r, d.position, d.feature].float()
        g_a, g_e = torch.autograd.grad(objective, [acts_leaf, err_leaf], allow_unused=True)
    g_a = torch.zeros_like(acts_leaf) if g_a is None else g_a
    g_e = torch.zeros_like(err_leaf) if g_e is None else g_e
    return g_a.float(), g_e.float().reshape(R, S, -1)


def _edge_rows(engine: Engine, up: SaeState, down: SaeState, S: int) -> int:
    per_row = S * (up.sae.d_sae + down.sae.d_sae + 8 * engine.model.cfg.d_model)
    return max(1, min(MAX_EDGE_ROWS, EDGE_ELEMENTS // max(per_row, 1)))


def edges_between(engine: Engine, up: SaeState, down: SaeState, tokens: torch.Tensor, sources: list[Node],
                  targets: list[Node], tick: Callable[[], None]) -> dict[tuple[Node, Node], float]:
    """edge(u -> d) for every u in sources (nodes of `up`) and d in targets (nodes of `down`); one device turn per
    chunk of targets. `tick` is called after each chunk (progress, cancel)."""
    out: dict[tuple[Node, Node], float] = {}
    per = _edge_rows(engine, up, down, tokens.shape[1])
    for i in range(0, len(targets), per):
        chunk = targets[i : i + per]
        with engine.device_work():
            g_a, g_e = _edge_backward(engine, up, down, tokens, chunk)
        for r, d in enumerate(chunk):
            for u in sources:
                if u.feature == ERROR:
                    w = float((up.err[u.position] * g_e[r, u.position]).sum())
                else:
                    w = float(up.acts[u.position, u.feature] * g_a[r, u.position, u.feature])
                out[(u, d)] = w
        tick()
    return out


# ---------------------------------------------------------------------------------------------------------------
# The call


def _node_of(n: Node, plan: TracePlan, states: list[SaeState], tokens: list[str], exact: float | None
             ) -> CircuitNode:
    s = plan.saes[n.sae]
    act = (float(states[n.sae].err[n.position].norm()) if n.feature == ERROR
           else float(states[n.sae].acts[n.position, n.feature]))
    return CircuitNode(
        node_id=n.node_id([x.key for x in plan.saes]), kind="error" if n.feature == ERROR else "feature", sae=s.key,
        layer=s.layer, feature=None if n.feature == ERROR else n.feature, position=n.position,
        token=tokens[n.position], activation=rounded(act), attribution=rounded(n.attribution, 6),
        exact_contribution=None if exact is None else rounded(exact, 6),
    )


def _warnings(engine: Engine, plan: TracePlan, last: torch.Tensor, n_tokens: int, kept: list[Node],
              exact: list[float], metric: float, faithful: Faithfulness) -> list[str] | None:
    bad = [(n, x) for n, x in zip(kept, exact) if checks.disagrees(n.attribution, x, metric)]
    keys = [s.key for s in plan.saes]
    named = "; ".join(f"{n.node_id(keys)} ({n.attribution:.3g} vs {x:.3g})" for n, x in bad[:10])
    return collect_warnings(
        answer_variant_warning(engine, last, plan.answer, plan.answer_ids),
        multi_token_warning(engine, "answer", plan.answer_ids),
        multi_token_warning(engine, "counterfactual", plan.counterfactual_ids),
        *(context_warning(s, n_tokens) for s in plan.saes),
        f"{len(bad)} kept node(s) whose attribution is far from its exact contribution (attribution vs exact): "
        f"{named}{' ...' if len(bad) > 10 else ''}; the metric is not linear in them here: rerun with "
        "method='integrated_gradients', and read their edges as estimates" if bad else None,
        "one SAE traced: the graph has nodes and their edges into the metric only; trace two or more SAEs for "
        "edges between layers" if len(plan.saes) == 1 else None,
        ratio_warning(faithful),
    )


def trace_circuit(
    engine: Engine,
    request: CircuitRequest,
    progress: Progress | None = None,
    cancel: CancelToken | None = None,
    means_of: Callable[[LoadedSAE], AblationMeans] | None = None,
) -> CircuitResult:
    """A sparse feature circuit over request.saes (default every loaded SAE, one per hook, by layer) for the metric
    at request.position: nodes, edges between consecutive SAEs, faithfulness, the strongest paths. `progress(done,
    total)` follows its steps; `cancel` stops it between them. `means_of(sae)`: its AblationMeans, asked for each
    traced SAE before any device work when request.ablation is 'mean' (required then)."""
    plan = _plan(engine, request)
    means = None
    if request.ablation == "mean":
        if means_of is None:
            raise InvalidInput("ablation='mean' needs each SAE's means over its corpus; none are available here")
        means = [means_of(s) for s in plan.saes]
    tokens = engine.to_tokens(request.prompt, prepend_bos=plan.prepend_bos)  # [1, S]
    _check_size(plan, tokens.shape[1])
    pos = position_index(plan.position, tokens.shape[1])
    at, first, keys = MetricAt(plan.metric, pos), 1 if plan.prepend_bos else 0, [s.key for s in plan.saes]
    metric, last, states = _node_pass(engine, plan, tokens, at)
    candidates = _candidates(states, first)
    kept = _kept(plan, candidates)
    pairs = [(i, i + 1) for i in range(len(plan.saes) - 1)]
    total, done = 3 + len(pairs), [0]  # the node pass, the exact contributions, each SAE pair, faithfulness

    def check() -> None:
        if cancel is not None:
            cancel.check()

    def step() -> None:
        check()
        done[0] += 1
        if progress is not None:
            progress(done[0], total)

    step()
    exact = []
    if plan.verify:
        cells = [checks.Cell(keys[n.sae], n.position, n.feature) for n in kept]
        exact = checks.exact_contributions(engine, plan.saes, tokens, at, cells, check)
    step()
    edges: dict[tuple[Node, Node], float] = {}
    for i, j in pairs:
        sources, targets = [n for n in kept if n.sae == i], [n for n in kept if n.sae == j]
        if sources and targets:
            found = edges_between(engine, states[i], states[j], tokens, sources, targets, check)
            edges.update({k: w for k, w in found.items() if abs(w) >= plan.edge_threshold})
        step()
    faithful = faithfulness(engine, plan.saes, plan.prepend_bos, tokens, at, metric, kept, means)
    step()
    str_tokens = engine.str_tokens(tokens)
    nodes = [_node_of(n, plan, states, str_tokens, x) for n, x in zip(kept, exact + [None] * len(kept))]
    links = [CircuitEdge(source=u.node_id(keys), target=d.node_id(keys), weight=rounded(w, 6))
             for (u, d), w in edges.items()]
    links += [CircuitEdge(source=n.node_id(keys), target=METRIC, weight=rounded(n.attribution, 6))
              for n in kept if n.sae == len(plan.saes) - 1]
    total_abs = sum(abs(n.attribution) for n in candidates)
    return CircuitResult(
        metric=f"{plan.metric.name} at position {pos}", metric_kind=plan.metric.kind, metric_value=rounded(metric, 6),
        saes=keys, n_nodes=len(kept), n_candidate_nodes=len(candidates), n_edges=len(links),
        attribution_kept=rounded(sum(abs(n.attribution) for n in kept) / total_abs, 4) if total_abs else 0.0,
        faithfulness=faithful,
        paths=top_paths(kept, edges, len(plan.saes), keys),
        graph=CircuitGraph(prompt=request.prompt, tokens=str_tokens, metric=plan.metric.name,
                           metric_value=rounded(metric, 6), position=pos, answer_token_id=plan.metric.answer,
                           answer_probability=rounded(float(last.float().softmax(-1)[plan.metric.answer]), 6),
                           n_layers=int(engine.model.cfg.n_layers), saes=keys,
                           nodes=nodes + [CircuitNode(node_id=METRIC, kind="metric", attribution=rounded(metric, 6))],
                           edges=links),
        warnings=_warnings(engine, plan, last, tokens.shape[1], kept, exact, metric, faithful),
    )
