"""steer_generate: generation with features added at their SAE's hook, dose by dose beside the unsteered text
from the same seeds; calibrated coefficients, the metric and the concept readout per dose, controls, degenerate
runs flagged. The math is in engine/steering.py.

No `from __future__ import annotations`: the SDK reads the tool's annotations at registration.
"""

import logging
from collections.abc import Callable, Sequence
from typing import Annotated, Literal

from mcp.server.mcpserver import Context
from pydantic import BaseModel, Field

from sae_mcp.engine import steering
from sae_mcp.engine.controls import MAX_CONTROLS
from sae_mcp.engine.runtime import CancelToken
from sae_mcp.engine.saes import LoadedSAE
from sae_mcp.engine.steering_plan import (
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_P,
    MAX_NEW_TOKENS,
    MAX_SEED,
    MAX_SEEDS,
    MAX_STEER_FEATURES,
    MAX_STRENGTH,
    MAX_STRENGTHS,
)
from sae_mcp.errors import InvalidInput, SaeMcpError
from sae_mcp.index.source import DEFAULT_SCAN_TOKENS, ExampleSource
from sae_mcp.ledger import summary as ls
from sae_mcp.ledger.export.rules import AS_GIVEN, ExportRule, Redone
from sae_mcp.ledger.export.session import items, lit, md_text
from sae_mcp.ledger.records import Run
from sae_mcp.ledger.rule import JSON, LedgerRule, ResolveContext
from sae_mcp.results.causal import Continuation, SteerResult
from sae_mcp.server.progress import progress_reporter
from sae_mcp.server.text import controls_lines, fmt, join, warnings_lines
from sae_mcp.server.tools.spec import ToolDeps, ToolSpec, read_only

log = logging.getLogger(__name__)

Strength = Annotated[float, Field(ge=-MAX_STRENGTH, le=MAX_STRENGTH, allow_inf_nan=False)]


CALIBRATION_HINT = "start the server with --corpus (a feature index or a text corpus), or pass calibration='absolute'"


def max_activation_of(examples: ExampleSource) -> Callable[[LoadedSAE, int], tuple[float, str]]:
    """The feature index's max activation, else a bounded on-demand scan's (DEFAULT_SCAN_TOKENS), as the callable
    steering calibrates with; an error saying what to pass when neither is available."""

    def fn(sae: LoadedSAE, feature: int) -> tuple[float, str]:
        try:
            value, where = examples.max_activation(sae.key, feature, max_scan_tokens=DEFAULT_SCAN_TOKENS)
        except SaeMcpError as exc:
            raise InvalidInput(f"calibration='max_activation': feature {feature}: {exc}; {CALIBRATION_HINT}") from exc
        return float(value), str(where)

    return fn


def known_max_of(examples: ExampleSource) -> Callable[[LoadedSAE, int], float | None]:
    """A feature's max activation when the index or an earlier scan already knows it (never scans): what steering
    under calibration='absolute' compares coefficients with."""

    def fn(sae: LoadedSAE, feature: int) -> float | None:
        try:
            top = examples.cached_top_examples(sae.key, feature, k=1)
        except SaeMcpError:
            return None
        return float(top.max_activation) if top is not None and top.max_activation > 0 else None

    return fn


def make(deps: ToolDeps) -> Callable[..., SteerResult]:
    engine, services, A = deps.engine, deps.services, deps.args

    class SteerSpec(BaseModel):
        feature: Annotated[int, A.feature]
        strength: Strength = Field(default=1.0, description="x max activation (the coefficient if absolute)")

    Seeds = Annotated[
        list[Annotated[int, Field(ge=0, le=MAX_SEED)]] | None,
        Field(min_length=1, max_length=MAX_SEEDS, description="One run per seed"),
    ]
    ControlStrength = Annotated[
        Strength | None,
        Field(description="Controls at this dose only"),
    ]

    def steer_generate(
        prompt: Annotated[str, A.prompt],
        features: Annotated[
            list[SteerSpec],
            Field(min_length=1, max_length=MAX_STEER_FEATURES),
        ],
        sae: Annotated[str | None, A.sae] = None,
        max_new_tokens: Annotated[int, Field(ge=1, le=MAX_NEW_TOKENS)] = 30,
        temperature: Annotated[float, Field(ge=0, le=10, allow_inf_nan=False, description="0 = greedy")] = (
            DEFAULT_TEMPERATURE),
        top_p: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] = DEFAULT_TOP_P,
        seed: Annotated[int | None, Field(ge=0, le=MAX_SEED)] = None,
        seeds: Seeds = None,
        calibration: Literal["max_activation", "absolute"] = "max_activation",
        strengths: Annotated[
            list[Strength] | None,
            Field(min_length=1, max_length=MAX_STRENGTHS, description="Doses (multipliers)"),
        ] = None,
        answer: Annotated[str, A.answer] | None = None,
        counterfactual: Annotated[str, A.answer] | None = None,
        controls: Annotated[bool, Field(description="Random features, matched norms")] = False,
        n_controls: Annotated[int, Field(ge=1, le=MAX_CONTROLS)] = 5,
        control_strength: ControlStrength = None,
        mcp_context: Context | None = None,
    ) -> SteerResult:
        """Generate with features added at their SAE's hook, dose by dose beside the unsteered text."""
        calib = max_activation_of(services.examples) if calibration == "max_activation" else None
        cancel = CancelToken()

        progress = progress_reporter(mcp_context, cancel, "tokens generated")

        request = steering.SteeringRequest(
            prompt=prompt, features=tuple((f.feature, f.strength) for f in features), sae=sae,
            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
            seeds=None if seeds is None else tuple(seeds), calibration=calibration,
            strengths=None if strengths is None else tuple(strengths), answer=answer, counterfactual=counterfactual,
            controls=controls, n_controls=n_controls, control_strength=control_strength,
        )
        return steering.steer_generate(engine, request, calib, known_max_of(services.examples), cancel=cancel,
                                       progress=progress)

    return steer_generate


def _continuation(c: Continuation, feature_names: list[str]) -> str:
    flags = [f"seed {c.seed}", f"{c.n_tokens} tokens" + (" to EOS" if c.stopped_at_eos else "")]
    if c.changed is not None:
        flags.append("changed" + (f" at token {c.first_divergent_token}" if c.changed else ": no"))
    if c.concept_readout:
        flags.append("readout " + " ".join(f"{n}={fmt(v)}" for n, v in zip(feature_names, c.concept_readout)))
    if c.degenerate:
        repetition = "n/a" if c.repetition is None else fmt(c.repetition)
        loss_ratio = "n/a" if c.loss_ratio is None else fmt(c.loss_ratio)
        flags.append(f"degenerate (repetition {repetition}, loss ratio {loss_ratio})")
    return f"  [{', '.join(flags)}] {c.text!r}"


def render(r: SteerResult) -> str:
    names = [str(f.feature) for f in r.features]
    lines = [
        f"sae {r.sae}, calibration {r.calibration}, seeds {r.seeds}, temperature {fmt(r.temperature)}, top_p "
        f"{fmt(r.top_p)}; features: " + "; ".join(
            f"{f.feature} strength {fmt(f.strength)} -> coefficient {fmt(f.coefficient)}"
            + (f" (max activation {fmt(f.max_activation)} from {f.max_activation_source})"
               if f.max_activation is not None else "") + f", decoder norm {fmt(f.decoder_norm)}" for f in r.features),
        "unsteered" + (f": metric {r.metric} = {fmt(r.unsteered_metric)}"
                       if r.metric and r.unsteered_metric is not None else "")
        + (" readout " + " ".join(f"{n}={fmt(v)}" for n, v in zip(names, r.unsteered_concept_readout))
           if r.unsteered_concept_readout else ""),
        *(_continuation(c, names) for c in r.unsteered),
    ]  # each dose line names its numbers (a legend repeated on every call was noise the agent skipped)
    for run in r.steered:
        readout = ""
        if run.concept_readout:
            std: Sequence[float | None] = run.concept_readout_std or [None] * len(run.concept_readout)
            readout = ", readout " + " ".join(
                f"{n}={fmt(m)}" + (f"±{fmt(s)}" if s is not None else "")
                for n, m, s in zip(names, run.concept_readout, std))
        answer = (f", metric {fmt(run.metric)} ({run.metric_change:+.4g})" if run.metric is not None else "")
        lines.append(f"dose {fmt(run.scale)} (coefficients {', '.join(map(fmt, run.coefficients))}): KL next token "
                     f"{fmt(run.kl_next_token)}, over the prompt {fmt(run.mean_kl_prompt)}{answer}{readout}, "
                     f"changed {fmt(run.changed_fraction)}, degenerate {fmt(run.degenerate_fraction)} of seeds")
        lines += [_continuation(c, names) for c in run.continuations]
    for c in r.controls or []:
        lines += controls_lines(c, head=f"controls at dose {'n/a' if c.scale is None else fmt(c.scale)}")
    return join(lines + warnings_lines(r.warnings))


def summary(r: JSON) -> str:
    runs = "; ".join(f"x{ls.fmt(s['scale'])}: KL {ls.fmt(s['kl_next_token'])}, changed {ls.fmt(s['changed_fraction'])}"
                     + (f", P(answer) {ls.fmt(s['answer_probability'])}" if s.get("answer_probability") is not None
                        else "") for s in r.get("steered", [])[:4])
    text = (r.get("steered") or [{}])[0].get("continuations", [{}])[0].get("text", "")
    return f"{runs}; steered text {text[:60]!r}"


def resolve(r: JSON, result: JSON, ctx: ResolveContext) -> JSON:
    """The seeds, the doses, the exact coefficients at scale 1 (strength x the feature's max activation,
    unrounded), the control sets, the EOS id."""
    coefficients = []
    for f in result.get("features") or []:
        m = None
        if r.get("calibration") == "max_activation" and ctx.max_activation is not None:
            try:  # the same cached value steering calibrated with: the result rounds it to 6 decimals
                found = ctx.max_activation(r["sae"], f["feature"])
                m = None if found is None else float(found[0])
            except Exception as exc:
                log.debug("max activation of %s not re-read: %s", f["feature"], exc)
        coefficients.append(f["strength"] * m if m is not None else f["coefficient"])
    blocks = result.get("controls") or []
    return {"seeds": result.get("seeds"), "scales": [float(x) for x in (r.get("strengths") or [1.0])],
            "coefficients": coefficients,
            "control_sets": [run["features"] for run in blocks[0]["runs"]] if blocks else [],
            "eos_token_id": getattr(ctx.engine.model.tokenizer, "eos_token_id", None)}


STEERING_HELPERS = '''\
def steering_hook(vector):
    """Adds `vector` at every position (prompt and generated); at hook_z it is reshaped to [n_heads, d_head]."""
    def hook(act, hook):
        v = vector.to(act.dtype)
        return act + (v.reshape(act.shape[2], act.shape[3]) if act.ndim == 4 else v)

    return hook


def sample(logits, temperature, top_p, generator):
    """sae-mcp's sampler for one row: greedy below temperature 1e-4; else softmax(logits / temperature), the
    smallest nucleus of mass top_p (its first token always kept), one draw from the row's own generator."""
    if temperature < 1e-4:
        return int(logits.argmax())
    probs = (logits.float() / temperature).softmax(-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep_sorted = (sorted_p.cumsum(-1) - sorted_p) < top_p
        keep_sorted[0] = True
        probs = probs * torch.zeros_like(keep_sorted).scatter(0, order, keep_sorted)
        probs = probs / probs.sum()
    return int(torch.multinomial(probs, 1, generator=generator)[0])


def generate(key, tokens, vector, max_new_tokens, temperature, top_p, seed, eos_id):
    """One continuation (its text before EOS), `vector` added at the SAE's hook, drawn from a generator seeded with
    `seed` as sae-mcp seeds each batch row's (it uses a KV cache, this a full forward per step: the same logits up
    to float rounding, so a sampled draw can differ where two tokens' probabilities nearly tie)."""
    generator = torch.Generator(device=tokens.device).manual_seed(seed)
    seq, out = tokens, []
    with model.hooks(fwd_hooks=[(hook_of(key), steering_hook(vector))]):
        for _ in range(max_new_tokens):
            nxt = sample(model(seq, attention_mask=torch.ones_like(seq))[0, -1], temperature, top_p, generator)
            if eos_id is not None and nxt == eos_id:
                break
            out.append(nxt)
            seq = torch.cat([seq, torch.tensor([[nxt]], device=seq.device)], dim=1)
    return model.tokenizer.decode(out)
'''


def cell(run: Redone) -> str:
    r, res = run.resolved, run.result
    ans = (r.get("answer_ids") or [None])[0]
    runs = [(s["scale"], s["kl_next_token"], s["mean_kl_prompt"], s.get("answer_probability"),
             [c["text"] for c in items(s["continuations"])]) for s in items(res["steered"])]
    unsteered = [c["text"] for c in items(res["unsteered"])]
    greedy = float(r["temperature"]) < 1e-4
    return f"""\
key, tokens = {r['sae']!r}, tokens_of({r['prompt']!r}, prepend_bos={r['prepend_bos']})
features, coefficients = {lit(r['features'] and [f['feature'] for f in r['features']])}, {lit(r['coefficients'])}
W_dec = SAES[key].W_dec
direction = torch.tensor(coefficients, dtype=W_dec.dtype, device=W_dec.device) @ W_dec[features]  # at scale 1
settings = dict(max_new_tokens={r['max_new_tokens']}, temperature={r['temperature']}, top_p={r['top_p']}, \
eos_id={r.get('eos_token_id')})
seeds, answer_id = {lit(res['seeds'])}, {ans}
plain = model(tokens, attention_mask=torch.ones_like(tokens))[0]  # the unsteered prompt's logits [seq, d_vocab]
same = total = 0
for seed, text in zip(seeds, {lit(unsteered, 22)}):
    same, total = same + (generate(key, tokens, 0 * direction, seed=seed, **settings) == text), total + 1
runs = {lit(runs, 7)}  # (scale, KL next token, mean KL over the prompt, P(answer), text per seed)
for scale, kl_next, kl_mean, p_answer, texts in runs:
    with model.hooks(fwd_hooks=[(hook_of(key), steering_hook(scale * direction))]):
        steered = model(tokens, attention_mask=torch.ones_like(tokens))[0]
    close(kl(plain[-1], steered[-1]), kl_next, f"scale {{scale}}: KL of the next token")
    close(kl(plain, steered).mean(), kl_mean, f"scale {{scale}}: mean KL over the prompt")
    if p_answer is not None:
        close(steered[-1].float().softmax(-1)[answer_id], p_answer, f"scale {{scale}}: P(answer)")
    for seed, text in zip(seeds, texts):
        same, total = same + (generate(key, tokens, scale * direction, seed=seed, **settings) == text), total + 1
{'assert same == total, f"greedy texts: {same} of {total} reproduced"' if greedy else
 '# sampled: the seed-independent numbers (KL, P(answer)) are asserted above; texts are compared, not asserted'}
print({run.id!r}, "steer_generate reproduced;", same, "of", total, "texts identical")
"""


def note(run: Run) -> str | None:
    if float((run.resolved or {}).get("temperature", 0)) < 1e-4:
        return None
    return ("Sampled: each text is drawn again from a generator seeded as recorded and compared; the "
            "seed-independent numbers (KL, P(answer)) are asserted. Controls are not re-run.")


def details(r: JSON) -> list[str]:
    return [f"- scale {ls.fmt(s['scale'])}: KL {ls.fmt(s['kl_next_token'])}, concept readout "
            f"{s.get('concept_readout')} (unsteered {r.get('unsteered_concept_readout')}), text: "
            + md_text(repr((items(s.get("continuations")) or [{}])[0].get("text", "")[:120]))
            for s in items(r.get("steered"))]


SPEC = ToolSpec(
    name="steer_generate",
    make=make,
    result=SteerResult,
    render=render,
    annotations=read_only,
    page_in_text=False,
    resources=None,
    ledger=LedgerRule(summary=summary, volatile=(), bos="sae", resolve=resolve, features=None, keeps_runs=False,
                      looks_up=True, on_feature_page=True),
    export=ExportRule(cell=cell, helpers=(STEERING_HELPERS,), note=note, details=details, label=None, score=None),
    replay=AS_GIVEN,
)
