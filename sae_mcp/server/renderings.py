"""agent_text(result): the text content of a tool result, the only part a chat host shows the model.

Results that read better as lines than as JSON get a purpose-made rendering (RENDERINGS below); each says every
number of its structured content that an agent needs, once, under a header line that names the units. Any other
result is compact JSON (server/text.py). The structured content stays whole beside it either way.
"""

from __future__ import annotations

from collections.abc import Callable

from pydantic import BaseModel

from sae_mcp.engine.attribution_checks import IG_TOLERANCE
from sae_mcp.results import FeatureActs, NextToken, PromptComparison, VocabProjection
from sae_mcp.results.causal import (
    AblationResult,
    Attribution,
    Continuation,
    Controls,
    NextTokenTable,
    SteerResult,
)
from sae_mcp.results.circuits import CircuitResult, PatchCondition, PatchResult
from sae_mcp.results.corpus import Example, IndexReport, TopExamples
from sae_mcp.results.explain import (
    ExplanationSearch,
    FeatureCardResult,
    FeatureDescription,
    FeatureDescriptions,
    FeatureStats,
    LabelRecorded,
    TokenSetEnrichment,
)
from sae_mcp.results.scoring import BlindSet, ExplanationScore, ScoreExplanation
from sae_mcp.server.text import compact_json, fmt, join, tok, warnings_lines
from sae_mcp.services.score_results import brief_text


def _feature_acts(r: FeatureActs) -> str:
    lines = [f"sae {r.sae}: {len(r.tokens)} tokens; per position: index token L0 (active features), then "
             "feature=activation, largest first"]
    for p in r.positions:
        top = " ".join(f"{a.feature}={fmt(a.activation)}" for a in p.top) or "(none active)"
        lines.append(f"{p.position} {tok(p.token)} L0={p.l0}: {top}")
    for f, trace in (r.features or {}).items():
        lines.append(f"feature {f} at the positions above: " + " ".join(fmt(a) for a in trace))
    return join(lines + warnings_lines(r.warnings))


def _next_token(r: NextToken) -> str:
    lines = ["next token (probability, logit): " + ", ".join(
        f"{tok(t.token)} {fmt(t.probability)} ({fmt(t.logit)})" for t in r.top)]
    if r.answer is not None:
        a = r.answer
        lines.append(f"answer {tok(a.token)}: rank {a.rank} (0-based), probability {fmt(a.probability)}, logit "
                     f"{fmt(a.logit)}"
                     + (f"; tokens {a.answer_tokens}, only the first scored; whole answer log-probability "
                        f"{fmt(a.sequence_log_probability)}" if a.multi_token and a.sequence_log_probability is not None
                        else ""))
    lines.append("prompt tokens: " + " ".join(tok(t) for t in r.tokens))
    return join(lines + warnings_lines(r.warnings))


def _vocab_projection(r: VocabProjection) -> str:
    return join([
        f"sae {r.sae} feature {r.feature}: W_dec[f] @ W_U (token logit)",
        "promotes: " + ", ".join(f"{tok(t.token)} {fmt(t.logit)}" for t in r.top_positive),
        "suppresses: " + ", ".join(f"{tok(t.token)} {fmt(t.logit)}" for t in r.top_negative),
    ])


def _prompt_comparison(r: PromptComparison) -> str:
    if r.mode == "pair":
        head = (f"sae {r.sae}, position {r.position}: a={tok(r.token_a)} b={tok(r.token_b)}; "
                "feature: activation a, b, difference a-b")
        rows = [f"{d.feature}: {fmt(d.activation_a)}, {fmt(d.activation_b)}, {fmt(d.difference)}" for d in r.diffs]
    else:
        head = (f"sae {r.sae}, position {r.position}, {r.n_a} vs {r.n_b} prompts, sorted by {r.sort_by}; compared "
                f"tokens a: {' '.join(map(tok, r.tokens_a or []))}; b: {' '.join(map(tok, r.tokens_b or []))}\n"
                "feature: mean a, mean b, difference, Cohen's d, rank-biserial[, separated]")
        rows = [f"{d.feature}: {fmt(d.mean_a)}, {fmt(d.mean_b)}, {fmt(d.difference)}, "
                f"{'n/a' if d.effect_size is None else fmt(d.effect_size)}, {fmt(d.rank_biserial)}"
                + (", separated" if d.separated else "") for d in r.diffs]
    return join([head, *rows, *warnings_lines(r.warnings)])


def _condition(name: str, t: NextTokenTable) -> str:
    return (f"{name}: metric {fmt(t.metric)} ({t.metric_change:+.4g}), P {fmt(t.answer_probability)} "
            f"({t.answer_probability_change:+.4g}), logit {fmt(t.answer_logit)} ({t.answer_logit_change:+.4g}), KL "
            f"{fmt(t.kl_from_baseline)}, rank {t.answer_rank}; top " + " ".join(f"{tok(x.token)} {fmt(x.probability)}"
                                                                            for x in t.top))


def _first_only(what: str, tokens: list[str] | None) -> str:
    """'; counterfactual tokens [' sa', 'd'], only the first scored' when the text is several tokens, else ''."""
    return f"; {what} tokens {tokens}, only the first scored" if tokens and len(tokens) > 1 else ""


def _ablation(r: AblationResult) -> str:
    cf = r.counterfactual
    where = "every position" if r.positions is None else f"positions {r.positions}"
    lines = [
        f"sae {r.sae}: ablated at {where}; metric {r.metric}"
        + _first_only("answer", r.answer.tokens) + (_first_only("counterfactual", cf.tokens) if cf else "")
        + "; per condition: metric (change vs baseline), P(answer) (change), raw logit (change), KL from baseline, "
        "answer rank (0-based), top tokens",
        "features: " + "; ".join(
            f"{f.feature} " + (f"fired: sum {fmt(f.activation_sum)}, max {fmt(f.max_activation)}" if f.fired
                               else "silent") for f in r.features),
    ]
    for name in ("baseline", "reconstruction_only", "ablated"):
        lines.append(_condition(name, getattr(r, name)))
    w = r.ablated_without_error_term
    lines.append(_condition("ablated_without_error_term", w) + f"; vs reconstruction_only: metric "
                 f"{w.metric_change_vs_reconstruction:+.4g}, P {w.answer_probability_change_vs_reconstruction:+.4g}, "
                 f"KL {fmt(w.kl_from_reconstruction)}")
    if r.controls is not None:
        lines += _controls_lines(r.controls)
    return join(lines + warnings_lines(r.warnings))


def _controls_lines(c: Controls, head: str = "controls") -> list[str]:
    """Control stats per metric, and the control features (their texts stay in the structured content)."""
    if not c.runs:
        return [f"{head}: none drawn ({c.note})"]
    lines = [f"{head} ({len(c.runs)} runs, seed {c.seed}): {c.matched_on}. Target vs controls mean ± std [min, max], "
             "z, |target| > every |control|"]
    for s in c.stats:
        z = "n/a" if s.z_score is None else fmt(s.z_score)
        lines.append(f"  {s.metric}: {fmt(s.target)} vs {fmt(s.control_mean)} ± {fmt(s.control_std)} "
                     f"[{fmt(s.control_min)}, {fmt(s.control_max)}], z {z}, |target| > all: "
                     f"{'yes' if s.exceeds_all_controls else 'no'}")
    lines.append("  control features: " + " ".join(str(run.features) for run in c.runs))
    return lines + [f"  note: {c.note}" if c.note else None, f"  caution: {c.caution}" if c.caution else None]


def _token_set_enrichment(r: TokenSetEnrichment) -> str:
    lines = [f"sae {r.sae}, {r.n_features} features; per set: feature r (rank-biserial) z"]
    for s in r.sets:
        lines.append(f"{s.name} ({s.size} tokens, e.g. {' '.join(map(tok, s.examples[:4]))})"
                     + (f"; not single tokens: {s.unmatched}" if s.unmatched else ""))
        lines.append("  promotes: " + (", ".join(f"{e.feature} {fmt(e.score)} {fmt(e.z)}" for e in s.promoted)
                                       or "none"))
        lines.append("  suppresses: " + (", ".join(f"{e.feature} {fmt(e.score)} {fmt(e.z)}" for e in s.suppressed)
                                         or "none"))
    if r.skipped:
        lines.append(f"skipped (empty in this vocabulary): {', '.join(r.skipped)}")
    return join(lines + warnings_lines(r.warnings))


def _feature_stats(r: FeatureStats) -> str:
    has_mean = any(f.mean is not None for f in r.features)
    has_density = any(f.density is not None for f in r.features)
    cols = ["feature"] + (["mean"] if has_mean else []) + ["std", "skewness", "kurtosis"] + \
        (["density"] if has_density else [])
    lines = [f"sae {r.sae}: {r.n_features} features considered, sorted by {r.sort_by}; densities {r.densities}",
             " ".join(cols)]
    for f in r.features:
        vals = [str(f.feature)] + ([fmt(f.mean)] if has_mean else []) + [fmt(f.std), fmt(f.skewness),
                                                                          fmt(f.kurtosis)]
        lines.append(" ".join(vals + ([fmt(f.density)] if has_density and f.density is not None else [])))
    return join(lines)


def _explanation_search(r: ExplanationSearch) -> str:
    lines = [f"{len(r.matches)} matches ({r.ranking} ranking): feature (sae, source, score): description"
             + (" [scored: method balanced accuracy (contexts)]" if any(m.scored for m in r.matches) else "")]
    lines += [f"{m.feature} ({m.sae}, {m.source}, {fmt(m.score)}): {m.description}"
              + (f" [scored: {brief_text(m.scored)}]" if m.scored else "") for m in r.matches]
    return join(lines + ([f"note: {r.note}"] if r.note else []))



def _attribution(r: Attribution) -> str:
    ig = r.integrated_gradients
    method = (f"integrated gradients, {ig.steps} steps; features along their path, errors along theirs"
              if ig is not None else "gradient x activation, first order")
    lines = [f"metric {r.metric} = {fmt(r.metric_value)} ({method})"
             + (f"; answer tokens {r.answer_tokens}, only the first scored" if r.multi_token else "")
             + (f"; counterfactual tokens {r.counterfactual_tokens}, only the first scored"
                if r.counterfactual_multi_token else "")]
    for key in r.per_token:
        lines.append(f"sae {key}: error share {fmt(r.error_share[key])} over positions "
                     f"{r.error_share_positions[0]}..{r.error_share_positions[1]}; totals: features "
                     f"{fmt(r.feature_attribution_total[key])}, error {fmt(r.error_attribution[key])}")
    if ig is None:
        lines.append(f"all features + errors: {fmt(r.attribution_total)} (first order; need not equal the metric)")
    elif max(ig.relative_error, ig.error_relative_error) <= IG_TOLERANCE:  # beyond it, a warning says these numbers
        lines.append(f"path sums vs endpoint differences: features {fmt(ig.attribution_sum)} vs "
                     f"{fmt(ig.endpoint_difference)}, errors {fmt(ig.error_attribution_sum)} vs "
                     f"{fmt(ig.error_endpoint_difference)}")
    one = len(r.per_token) == 1  # one SAE: its key is said once, not on every row
    verified = any(t.exact_contribution is not None for t in r.top)
    lines.append(("top (position token feature): " if one else "top (sae position token feature): ")
                 + "activation, attribution" + (" (exact contribution)" if verified else "")
                 + "; contribution = metric - metric with it zeroed: > 0 raises the metric")
    for t in r.top:
        exact = f" ({fmt(t.exact_contribution)})" if t.exact_contribution is not None else ""
        lines.append(("" if one else f"{t.sae} ") + f"{t.position} {tok(t.token)} {t.feature}: {fmt(t.activation)}, "
                     f"{fmt(t.attribution)}{exact}")
    for key, sums in r.per_token.items():
        errs = r.error_attribution_per_token[key]
        lines.append(f"per position for {key} (token: features, error): " + "; ".join(
            f"{p} {tok(r.tokens[p])}: {fmt(f)}, {fmt(e)}" for p, (f, e) in enumerate(zip(sums, errs))))
    return join(lines + warnings_lines(r.warnings))


def _continuation(c: Continuation, feature_names: list[str]) -> str:
    flags = [f"seed {c.seed}", f"{c.n_tokens} tokens" + (" to EOS" if c.stopped_at_eos else "")]
    if c.changed is not None:
        flags.append("changed" + (f" at token {c.first_divergent_token}" if c.changed else ": no"))
    if c.concept_readout:
        flags.append("readout " + " ".join(f"{n}={fmt(v)}" for n, v in zip(feature_names, c.concept_readout)))
    if c.degenerate:
        flags.append(f"degenerate (repetition {fmt(c.repetition)}, loss ratio {fmt(c.loss_ratio)})")
    return f"  [{', '.join(flags)}] {c.text!r}"


def _steer(r: SteerResult) -> str:
    names = [str(f.feature) for f in r.features]
    lines = [
        f"sae {r.sae}, calibration {r.calibration}, seeds {r.seeds}, temperature {fmt(r.temperature)}, top_p "
        f"{fmt(r.top_p)}; features: " + "; ".join(
            f"{f.feature} strength {fmt(f.strength)} -> coefficient {fmt(f.coefficient)}"
            + (f" (max activation {fmt(f.max_activation)} from {f.max_activation_source})"
               if f.max_activation is not None else "") + f", decoder norm {fmt(f.decoder_norm)}" for f in r.features),
        "unsteered" + (f": metric {r.metric} = {fmt(r.unsteered_metric)}" if r.metric else "")
        + (" readout " + " ".join(f"{n}={fmt(v)}" for n, v in zip(names, r.unsteered_concept_readout))
           if r.unsteered_concept_readout else ""),
        *(_continuation(c, names) for c in r.unsteered),
    ]  # each dose line names its numbers (a legend repeated on every call was noise the agent skipped)
    for run in r.steered:
        readout = ""
        if run.concept_readout:
            std = run.concept_readout_std or [None] * len(run.concept_readout)
            readout = ", readout " + " ".join(
                f"{n}={fmt(m)}" + (f"±{fmt(s)}" if s is not None else "")
                for n, m, s in zip(names, run.concept_readout, std))
        answer = (f", metric {fmt(run.metric)} ({run.metric_change:+.4g})" if run.metric is not None else "")
        lines.append(f"dose {fmt(run.scale)} (coefficients {', '.join(map(fmt, run.coefficients))}): KL next token "
                     f"{fmt(run.kl_next_token)}, over the prompt {fmt(run.mean_kl_prompt)}{answer}{readout}, "
                     f"changed {fmt(run.changed_fraction)}, degenerate {fmt(run.degenerate_fraction)} of seeds")
        lines += [_continuation(c, names) for c in run.continuations]
    for c in r.controls or []:
        lines += _controls_lines(c, head=f"controls at dose {fmt(c.scale)}")
    return join(lines + warnings_lines(r.warnings))



def _example(e: Example) -> str:
    """'3.742 doc 12 @45 (x3): ...big do«g» named...' with newlines shown as ⏎."""
    shown = "".join(t if i != e.position else f"«{t}»" for i, t in enumerate(e.tokens)).replace("\n", "⏎")
    count = f" (x{e.count})" if e.count else ""
    return f"{fmt(e.activation)} doc {e.document} @{e.offset}{count}: {shown}"


def _top_examples(r: TopExamples) -> str:
    h = r.histogram
    lines = [
        f"sae {r.sae} feature {r.feature}: max {fmt(r.max_activation)}, density {fmt(r.density)} ({r.n_fired} of "
        f"{r.tokens_scanned} tokens, {r.source}{', ' + r.compute_dtype if r.compute_dtype else ''})",
        "histogram (bin lower edge: tokens): " + " ".join(f"{fmt(e)}:{c}" for e, c in zip(h.edges, h.counts))
        + (f" (top edge {fmt(h.edges[-1])})" if h.edges else ""),
        "top examples (activation, document @ token offset, firing token in «»)"
        + (f"; {r.merged_duplicates} identical contexts merged" if r.merged_duplicates else "") + ":",
        *(_example(e) for e in r.examples),
    ]
    for band in r.intervals or []:
        lines.append(f"band [{fmt(band.lower)}, {fmt(band.upper)}) quantiles {fmt(band.quantiles[0])}-"
                     f"{fmt(band.quantiles[1])}, {band.tokens} tokens"
                     + (f", {band.merged_duplicates} merged" if band.merged_duplicates else "") + ":")
        lines += [f"  {_example(e)}" for e in band.examples]
    return join(lines + warnings_lines(r.warnings))



def _index(r: IndexReport) -> str:
    """build_index without its file's path and the corpus (model_info says which corpus; both stay structured)."""
    how = "reused a finished index" if r.reused else f"{fmt(r.seconds)} s, {fmt(r.tokens_per_second)} tokens/s"
    end = "; the corpus ended before the token budget" if r.exhausted else ""
    return f"indexed sae {r.sae}: {r.tokens_scanned:,} tokens in {r.windows:,} windows ({how}){end}"


def _blind_set(b: BlindSet, secret: str | None) -> str:
    return join([
        f"challenge {b.challenge_id}: {b.method} of {b.explanation!r} for feature {b.feature} (sae {b.sae}), "
        f"{len(b.contexts)} contexts (firing: max >= {b.min_activation:g} x its max activation), seed {b.seed}; "
        f"expires in {b.expires_in_s // 60} min",
        f"submit_secret {secret} (shown once: pass it with the challenge_id)" if secret else None,
        f"{b.question}. Judge from the explanation alone, then submit_predictions once: "
        '{"1": true, "2": false, ...}',
        *(f"{c.id}: {c.text}" for c in b.contexts),
        *warnings_lines(b.warnings),
    ])


def _score(r: ExplanationScore) -> str:
    m = r.metrics
    precision = "n/a" if m.precision is None else fmt(m.precision)
    lines = [
        f"score {r.score_id} of {r.explanation!r}: feature {r.feature} (sae {r.sae}), {r.method}, {r.n} contexts, "
        f"seed {r.seed}, firing at max >= {r.min_activation:g} x its max, scorer {r.scorer}"
        + (f", label {r.label_id}" if r.label_id is not None else "") + (", NOT BLIND" if r.looked_up else ""),
        f"balanced accuracy {fmt(m.balanced_accuracy)} (95% {fmt(m.interval_95[0])}-{fmt(m.interval_95[1])}), "
        f"accuracy {fmt(m.accuracy)}, precision {precision}, recall {fmt(m.recall)}, specificity "
        f"{fmt(m.specificity)}, F1 {fmt(m.f1)} (" + " ".join(f"{k} {v}" for k, v in m.counts.items()) + ")",
        "per group, right/contexts: " + ", ".join(
            f"{g.group}" + (f" [{fmt(g.lower)}, {fmt(g.upper)}]" if g.lower is not None else "") + f" {g.correct}/{g.n}"
            for g in r.groups),
    ]
    if r.misjudged:
        lines.append("misjudged (id: said -> truth, group, max activation[, at the mark]: context, max token in «»):")
        lines += [f"  {x.id}: {str(x.predicted).lower()} -> {str(x.truth).lower()}, {x.group}, {fmt(x.max_activation)}"
                  + (f", {fmt(x.marked_activation)}" if x.marked_activation is not None else "") + f": {x.text}"
                  for x in r.misjudged]
    return join(lines + warnings_lines(r.warnings))


def _score_explanation(r: ScoreExplanation) -> str:
    return join([_score(r.score) if r.score else None,
                 _blind_set(r.challenge, r.submit_secret) if r.challenge else None,
                 f"note: {r.note}" if r.note else None])


def _tokens_line(name: str, c: PatchCondition) -> str:
    return f"{name}: " + ", ".join(f"{tok(t.token)} {fmt(t.probability)}" for t in c.top)


def _patch(r: PatchResult) -> str:
    gap = r.source.metric - r.clean.metric
    pairs = " ".join(f"{p}:{q}" if p != q else str(p) for p, q in r.positions)
    lines = [f"sae {r.sae}, metric {r.metric}: clean {fmt(r.clean.metric)}, source {fmt(r.source.metric)} (difference "
             f"{gap:+.4g}); positions patched (prompt:source) {pairs}; {r.n_differing} features differ there"]
    if r.patched is not None:
        lines.append(f"patched together: metric {fmt(r.patched.metric)}, effect {r.effect:+.4g}, recovered "
                     f"{'n/a' if r.recovered is None else fmt(r.recovered)} of the difference, KL {fmt(r.kl)}")
        lines.append("features (clean -> source activation, summed over the positions): " + "; ".join(
            f"{f.feature} {fmt(f.clean_activation)} -> {fmt(f.source_activation)}" for f in r.features or []))
    if r.sweep is not None:
        lines.append(f"each differing feature patched alone ({r.n_swept} of {r.n_differing}), by |effect|: feature: "
                     "effect, recovered, KL, clean -> source activation")
        lines += [f"{e.feature}: {e.effect:+.4g}, {'n/a' if e.recovered is None else fmt(e.recovered)}, {fmt(e.kl)}, "
                  f"{fmt(e.clean_activation)} -> {fmt(e.source_activation)}" for e in r.sweep]
    lines += [_tokens_line("next token clean", r.clean), _tokens_line("source", r.source)]
    if r.patched is not None:
        lines.append(_tokens_line("patched", r.patched))
    if r.controls is not None:
        lines += _controls_lines(r.controls)
    return join(lines + warnings_lines(r.warnings))


def _circuit(r: CircuitResult) -> str:
    layer_of = {n.sae: n.layer for n in r.graph.nodes if n.sae}
    short = {key: f"L{layer_of.get(key, i)}" for i, key in enumerate(r.saes)}
    nodes = {n.node_id: n for n in r.graph.nodes}

    def name(node_id: str) -> str:
        n = nodes.get(node_id)
        if n is None or n.kind == "metric":
            return "metric"
        what = "err" if n.kind == "error" else str(n.feature)
        return f"{short[n.sae]}/{what}@{n.position} {tok(n.token)}"

    f = r.faithfulness
    lines = [
        f"metric {r.metric} = {fmt(r.metric_value)}; SAEs " + ", ".join(f"{short[k]} = {k}" for k in r.saes)
        + f"; {r.n_nodes} of {r.n_candidate_nodes} nodes kept ({r.attribution_kept:.0%} of |attribution|), "
        f"{r.n_edges} edges",
        f"faithfulness ({f.ablation} ablation) {'n/a' if f.faithfulness is None else fmt(f.faithfulness)}, "
        f"completeness {'n/a' if f.completeness is None else fmt(f.completeness)}: metric of the model "
        f"{fmt(f.metric_full)}, circuit alone {fmt(f.metric_circuit)}, without it {fmt(f.metric_without_circuit)}, "
        f"nothing {fmt(f.metric_empty)}",
        "top paths (weight in metric units: layer/feature@position token -> ... -> metric):",
        *(f"{p.weight:+.4g}: " + " -> ".join(name(x) for x in p.nodes) for p in r.paths),
        "nodes (attribution (exact contribution)[, label]; contribution = metric - metric with it zeroed):",
    ]
    for n in r.graph.nodes:
        if n.kind == "metric":
            continue
        exact = f" ({fmt(n.exact_contribution)})" if n.exact_contribution is not None else ""
        label = f", {n.label[:80]!r}" if n.label else ""
        lines.append(f"  {name(n.node_id)}: {fmt(n.attribution)}{exact}{label}")
    lines.append("the whole graph (nodes, edges with weights) is in the structured content")
    return join(lines + warnings_lines(r.warnings))


DESCRIBE_HEAD = ("per feature: density, max activation, newest labels; top examples and band samples "
                 "(activation: context, max token in «»), highest band first; logit lens (+ promoted, - suppressed)")


def _context(e: Example) -> str:
    return "".join(t if i != e.position else f"«{t}»" for i, t in enumerate(e.tokens)).replace("\n", "⏎")


def describe_text(d: FeatureDescription) -> str:
    """One feature of describe_features, compactly (the tool keeps the whole answer within its budget)."""
    head = f"feature {d.feature}: " + (f"density {fmt(d.density)}, max {fmt(d.max_activation)}"
                                      if d.density is not None else "not indexed")
    lines = [head + ("; labels: " + " | ".join(repr(x) for x in d.labels) if d.labels else "")]
    lines += [f"  {fmt(e.activation)}: {_context(e)}" for e in d.top]
    for b in d.bands:
        lines.append(f"  band [{fmt(b.lower)}, {fmt(b.upper)}) q{fmt(b.quantiles[0])}-{fmt(b.quantiles[1])}: "
                     + ("; ".join(f"{fmt(e.activation)}: {_context(e)}" for e in b.examples) or "(top examples)"))
    if d.promotes or d.suppresses:
        lines.append("  lens + " + ", ".join(f"{tok(t.token)} {fmt(t.logit)}" for t in d.promotes) + "; - "
                     + ", ".join(f"{tok(t.token)} {fmt(t.logit)}" for t in d.suppresses))
    return join(lines + ([f"  note: {d.note}"] if d.note else []))


def describe_text_head(sae: str) -> str:
    return f"sae {sae}; {DESCRIBE_HEAD}"


def _describe(r: FeatureDescriptions) -> str:
    return join([describe_text_head(r.sae), *(describe_text(d) for d in r.features),
                 f"left out (over the character budget): {r.left_out}" if r.left_out else None,
                 *warnings_lines(r.warnings)])


def _label(r: LabelRecorded) -> str:
    scored = f"; scored {brief_text(r.scored)}" if r.scored else ""
    head = f"label {r.label_id} recorded for feature {r.feature} (sae {r.sae}; {r.labels_for_feature} labels){scored}"
    return join([head, _blind_set(r.challenge, r.submit_secret) if r.challenge else None, *warnings_lines(r.warnings)])


def _feature_card(r: FeatureCardResult) -> str:
    return f"{r.markdown}\n(also the resource {r.uri})"


RENDERINGS: dict[type, Callable] = {
    FeatureActs: _feature_acts,
    NextToken: _next_token,
    VocabProjection: _vocab_projection,
    PromptComparison: _prompt_comparison,
    AblationResult: _ablation,
    Attribution: _attribution,
    SteerResult: _steer,
    TopExamples: _top_examples,
    FeatureCardResult: _feature_card,
    TokenSetEnrichment: _token_set_enrichment,
    FeatureStats: _feature_stats,
    ExplanationSearch: _explanation_search,
    ScoreExplanation: _score_explanation,
    ExplanationScore: _score,
    PatchResult: _patch,
    CircuitResult: _circuit,
    FeatureDescriptions: _describe,
    IndexReport: _index,
    LabelRecorded: _label,
}


def agent_text(result: BaseModel) -> str:
    """The text content for a result: its purpose-made rendering, else compact JSON of the whole result."""
    render = RENDERINGS.get(type(result))
    return render(result) if render else compact_json(result.model_dump(mode="json"))
