"""What a feature's page shows beyond its card (cards/data.py), and what the page's test box answers.

    gather_page(services, feature, sae) -> FeaturePage
        the card, the examples grouped as the agent gets them from top_examples (the top list, identical contexts
        once with a count, then one group per activation band, highest first), every shown token's activation
        (recomputed in one batched forward over the examples' window prefixes: the index keeps only each
        example's max activation), and the runs the agent recorded for this feature (ledger) of the tools whose
        ledger rule lists them on the page (steering, ablation)
    try_text(services, feature, sae, text) -> dict
        the test box: the text tokenised, this feature's activation at every token and the top features at each,
        from one get_feature_acts call (so the numbers are exactly the tool's)

A page never scans the corpus, and never waits long for the device: when another call holds it for more than
DEVICE_WAIT_S, the examples are shown with their max token only and the page says why.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from sae_mcp.cards.data import CardData, gather_card
from sae_mcp.engine import features as feat
from sae_mcp.engine.runtime import Engine
from sae_mcp.engine.saes import LoadedSAE
from sae_mcp.errors import Busy, InvalidInput
from sae_mcp.index.view import Context
from sae_mcp.ledger.rule import rule_of
from sae_mcp.ledger.store import ledger_path
from sae_mcp.ledger.summary import args_line, summary_of
from sae_mcp.results import rounded
from sae_mcp.results.corpus import Example, TopExamples
from sae_mcp.services import Services

log = logging.getLogger(__name__)

PAGE_TOP = 10  # top examples shown
PAGE_CONTEXT = 12  # tokens each side of the max token
PAGE_INTERVALS = 5  # activation bands
PAGE_PER_INTERVAL = 4  # examples per band (the most a band's uniform sample holds)
DEVICE_WAIT_S = 2.0  # longest a page waits for the device before showing examples without per-token shading
ENCODE_ELEMENTS = 16_000_000  # feature activations encoded at once (64 MB of float32) when shading examples
TEST_TOP_K = 10  # features listed per token in the test box
MAX_TEST_CHARS = 2000  # test box text: it travels in a GET query (same-origin GETs carry no Origin header)
SHOWN_RUNS = 10


@dataclass
class ShownExample:
    example: Example
    acts: list[float] | None  # the feature's activation at each of example.tokens; None when not computed
    bos_shown: bool = False  # example.tokens[0] is the window's BOS (context only: never scanned)


@dataclass
class ExampleGroup:
    title: str
    detail: str | None
    examples: list[ShownExample]
    merged: int | None = None  # candidates folded into identical contexts shown once


@dataclass
class RecordedRun:
    id: str
    time: float
    tool: str
    args: str
    summary: str
    ok: bool


@dataclass
class FeaturePage:
    card: CardData
    groups: list[ExampleGroup] = field(default_factory=list)
    scale: float = 1.0  # the activation a fully shaded token has (the feature's max activation)
    acts_note: str | None = None  # why the examples' tokens are not all shaded
    warnings: list[str] = field(default_factory=list)  # top_examples' warnings (too few bands, ...)
    runs: list[RecordedRun] = field(default_factory=list)
    runs_note: str | None = None


def gather_page(services: Services, feature: int, sae: str | None = None) -> FeaturePage:
    card = gather_card(services, feature, sae, n_examples=0, n_tokens=10)
    page = FeaturePage(card=card)
    s = services.engine.sae(card.sae_key)
    if card.summary is not None:
        try:
            _add_examples(page, services, s, feature)
        except Exception as exc:  # the card's own figures stand; the page says what failed
            log.warning("page examples failed for %s/%d: %s", s.key, feature, exc, exc_info=True)
            page.acts_note = f"examples unavailable ({type(exc).__name__}: {exc})"
    page.runs, page.runs_note = recorded_runs(services, s.key, feature)
    return page


def _add_examples(page: FeaturePage, services: Services, s: LoadedSAE, feature: int) -> None:
    contexts: dict[tuple[int, int], Context] = {}
    top = services.examples.cached_top_examples(s.key, feature, k=PAGE_TOP, context=PAGE_CONTEXT,
                                                intervals=PAGE_INTERVALS, per_interval=PAGE_PER_INTERVAL,
                                                contexts=contexts)
    if top is None:
        return
    page.warnings = list(top.warnings or [])
    page.groups = _groups(top)
    shown = [x for g in page.groups for x in g.examples]
    wanted = [contexts.get((x.example.document, x.example.offset)) for x in shown]
    known = [(x, c) for x, c in zip(shown, wanted) if c is not None and len(c.ids) - c.lo == len(x.example.tokens)]
    page.scale = top.max_activation if top.max_activation > 0 else 1.0
    if not known:
        if shown:
            page.acts_note = "the examples' windows are not stored: only each example's max token is marked"
        return
    engine = services.engine
    try:
        with engine.device_work(timeout_s=DEVICE_WAIT_S):
            acts = example_token_acts(engine, s, feature, [c for _, c in known])
    except Busy:
        page.acts_note = (f"the device was busy for over {DEVICE_WAIT_S:g} s: only each example's max token is "
                          "marked; reload the page to shade every token")
        return
    for (x, c), a in zip(known, acts):
        x.acts, x.bos_shown = a, c.bos_shown


def _groups(top: TopExamples) -> list[ExampleGroup]:
    if not top.examples:  # never fired: the histogram says so
        return []
    groups = [ExampleGroup("Top activations", f"the {len(top.examples)} largest, identical contexts shown once",
                           [ShownExample(e, None) for e in top.examples], top.merged_duplicates)]
    for band in top.intervals or []:
        q_lo, q_hi = band.quantiles
        groups.append(ExampleGroup(
            f"Interval {band.lower:.3g} – {band.upper:.3g}",
            f"quantiles {q_lo:.0%}–{q_hi:.0%} of its firing tokens · {band.tokens:,} tokens · uniform sample",
            [ShownExample(e, None) for e in band.examples], band.merged_duplicates))
    return groups


def example_token_acts(engine: Engine, s: LoadedSAE, feature: int, contexts: list[Context]) -> list[list[float]]:
    """The feature's activation at every shown token of each example, as get_feature_acts computes activations
    (the model as loaded up to the SAE's hook, then the SAE's encoder) on the window prefix the scan ran. Prefixes
    of similar length share a forward, right-padded (pads never reach a real token of a causal model): attention
    costs the square of the padded width, and an example near a window's start needs few tokens. The encoder runs
    in chunks so a wide SAE never holds [batch, tokens, d_sae] at once. Call inside device_work()."""
    out: list[list[float]] = [[] for _ in contexts]
    for batch in length_buckets([len(c.ids) for c in contexts]):
        width = max(len(contexts[i].ids) for i in batch)
        ids = torch.full((len(batch), width), contexts[batch[0]].ids[0], dtype=torch.long)  # [B, T]
        for row, i in enumerate(batch):
            ids[row, : len(contexts[i].ids)] = torch.tensor(contexts[i].ids)
        x = engine.forward_to_hook(ids.to(engine.device), s)  # [B, T, d_in]
        step = max(1, ENCODE_ELEMENTS // (width * s.d_sae))
        col = torch.cat([engine.encode(s, x[b : b + step])[..., feature].float().cpu()
                         for b in range(0, len(batch), step)])  # [B, T]
        for row, i in enumerate(batch):
            c = contexts[i]
            out[i] = [rounded(v) for v in col[row, c.lo : len(c.ids)].tolist()]
    return out


def length_buckets(lengths: list[int], slack: float = 1.5, min_width: int = 16) -> list[list[int]]:
    """Indices grouped by length, shortest first: a group grows while its longest is within `slack` times its
    shortest (or `min_width` tokens), so padding wastes little and there are few forwards."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups: list[list[int]] = []
    for i in order:
        if groups and lengths[i] <= max(slack * lengths[groups[-1][0]], min_width):
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def recorded_runs(services: Services, sae_key: str, feature: int) -> tuple[list[RecordedRun], str | None]:
    """The newest runs the ledger holds for this feature of this SAE, of the tools the page lists (their ledger rule
    says on_feature_page: steering, ablation); read-only: a server that never recorded has no ledger file, and
    reading does not make one."""
    if not ledger_path(services.settings.data_dir).exists():
        return [], None
    try:
        found = services.ledger.store.runs(feature=feature, sae=sae_key, newest_first=True, limit=200, light=True)
    except Exception as exc:
        log.warning("ledger unreadable for %s/%d: %s", sae_key, feature, exc)
        return [], f"the ledger could not be read ({type(exc).__name__}: {exc})"
    runs = [RecordedRun(r.id, r.time, r.tool, args_line(r.given), summary_of(r, services.tools), r.ok)
            for r in found if rule_of(services.tools, r.tool).on_feature_page]
    return runs[:SHOWN_RUNS], None


def try_text(services: Services, feature: int, sae: str | None, text: str, top_k: int = TEST_TOP_K) -> dict:
    """The test box's answer as JSON data: one get_feature_acts call (the same numbers as the tool)."""
    engine = services.engine
    s = engine.sae(sae)
    engine.check_feature(s, feature)
    if len(text) > MAX_TEST_CHARS:
        raise InvalidInput(f"the text is {len(text):,} characters; the test box takes at most {MAX_TEST_CHARS:,}")
    res = feat.get_feature_acts(engine, text, sae=s.key, top_k=top_k, features=[feature])
    try:
        summary = services.examples.feature_summary(s.key, feature)
    except Exception:  # an unreadable index only costs the scale
        summary = None
    return {
        "sae": s.key, "feature": feature, "tokens": res.tokens, "bos": s.prepend_bos,
        "acts": (res.features or {})[str(feature)],
        "top": [[[a.feature, a.activation] for a in p.top] for p in res.positions],
        "l0": [p.l0 for p in res.positions],
        "max_activation": summary.max_activation if summary is not None and summary.max_activation > 0 else None,
        "warnings": res.warnings or [],
    }
