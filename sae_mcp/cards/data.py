"""Feature cards: everything known about one feature, gathered without running anything long.

    explanations   the agent's newest SHOWN_LABELS labels and the first SHOWN_IMPORTED imported explanations (the
                   explanation store), with how many more there are and the scores of their texts (score_explanation:
                   scoring/store.py). 2,000 labels of 5 kB made a 10 MB card before: a card stays a few kB
    activations    density, max activation, histogram and top examples, from the corpus index when one was built,
                   else from an on-demand top_examples scan of this feature already cached (the card says so and
                   over how many tokens); with neither the card says "not indexed": a card never starts a scan
    logit lens     the tokens W_dec[f] @ W_U promotes and suppresses most (engine/logits.py)
    statistics     mean, std, skewness and kurtosis of those logit weights (engine/stats.py)

One CardData renders to markdown for the agent (cards/text.py) and to an HTML page for a person
(pages/routes.py), so both look at the same thing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from sae_mcp.engine import logits as lg
from sae_mcp.engine.saes import LoadedSAE
from sae_mcp.errors import InvalidInput
from sae_mcp.index.source import DEFAULT_CONTEXT, ExampleSource
from sae_mcp.index.view import View
from sae_mcp.results import VocabProjection, rounded
from sae_mcp.results.corpus import Example, FeatureSummary
from sae_mcp.scoring.store import StoredScore
from sae_mcp.services import Services
from sae_mcp.store.explanations import Explanation

log = logging.getLogger(__name__)

NOT_INDEXED = "not indexed: call build_index (or run sae-mcp index)"
SHOWN_LABELS = 5  # the newest labels a card shows (the rest are counted)
SHOWN_IMPORTED = 5  # imported explanations a card shows, in import order
"""Control characters, and the bidirectional marks and overrides that reorder how a line displays."""


@dataclass
class CardData:
    sae_key: str
    hook_name: str
    feature: int
    d_sae: int
    sae_source: str
    neuronpedia: str | None  # 'model/sae/feature' on Neuronpedia, when the SAE has an id there
    explanations: list[Explanation]  # the shown ones: labels first (newest first), then imported ones
    projection: VocabProjection | None  # None when the decoder does not write to the residual stream
    moments: tuple[float, float, float, float] | None  # mean, std, skewness, kurtosis of W_dec[f] @ W_U
    lens_note: str | None = None  # why there is no logit lens
    index_note: str | None = None  # None when activations are known, else why not
    summary: FeatureSummary | None = None  # density, max activation, histogram, tokens scanned, compute dtype
    examples: list[Example] = field(default_factory=list)
    scan_note: str | None = None  # set when the activations come from a cached on-demand scan, not the index
    scores: list[StoredScore] = field(default_factory=list)  # scores of explanations (score_explanation), newest first
    more_labels: int = 0  # older labels not in `explanations`
    more_imported: int = 0  # imported explanations not in `explanations`
    recorded: set[str] = field(default_factory=set)  # the text of every label and explanation, shown or not

    def scores_of(self, text: str) -> list[StoredScore]:
        """The newest score per method of the explanation with this text, newest first."""
        out: list[StoredScore] = []
        for sc in self.scores:
            if sc.explanation == text and all(o.method != sc.method for o in out):
                out.append(sc)
        return out

    def scored_unrecorded(self) -> tuple[list[str], int]:
        """(the newest SHOWN_LABELS texts scored but never recorded as a label or an explanation, how many more)."""
        texts = list(dict.fromkeys(sc.explanation for sc in self.scores if sc.explanation not in self.recorded))
        return texts[:SHOWN_LABELS], max(0, len(texts) - SHOWN_LABELS)


def gather_card(services: Services, feature: int, sae: str | None = None, n_examples: int = 5,
                n_tokens: int = 8) -> CardData:
    engine = services.engine
    s = engine.sae(sae)
    engine.check_feature(s, feature)
    projection, moments, lens_note = _logit_lens(services, s, feature, n_tokens)
    found = services.explanations.for_feature(s.store_key, feature)
    labels = [x for x in found if x.source == "label"]
    imported = [x for x in found if x.source != "label"]
    card = CardData(
        sae_key=s.key,
        hook_name=s.hook_name,
        feature=feature,
        d_sae=s.d_sae,
        sae_source=s.source,
        neuronpedia=f"{s.neuronpedia_id}/{feature}" if s.neuronpedia_id else None,
        explanations=labels[:SHOWN_LABELS] + imported[:SHOWN_IMPORTED],
        more_labels=max(0, len(labels) - SHOWN_LABELS),
        more_imported=max(0, len(imported) - SHOWN_IMPORTED),
        recorded={x.description for x in found},
        projection=projection,
        moments=moments,
        lens_note=lens_note,
    )
    try:
        card.scores = services.scores.for_feature(s.store_key, feature)
    except Exception as exc:  # an unreadable score table must not break the card either
        log.warning("scores unavailable for %s/%d: %s", s.key, feature, exc)
    try:
        _add_activations(card, services.examples, s, feature, n_examples)
    except Exception as exc:  # an unreadable index must not break the card: the card says so instead
        log.warning("index read failed for %s/%d: %s", s.key, feature, exc)
        card.index_note = f"index unavailable ({type(exc).__name__}: {exc}); call build_index or run sae-mcp index"
    return card


def _logit_lens(services: Services, s: LoadedSAE, feature: int, n_tokens: int
                ) -> tuple[VocabProjection | None, tuple[float, float, float, float] | None, str | None]:
    """(projection, moments rounded as feature_stats rounds them, None) or (None, None, why not)."""
    engine = services.engine
    try:
        projection = lg.project_to_vocab(engine, feature, sae=s.key, top_k=n_tokens)
        # Weight-only, like the projection: one [1, d_vocab] row of W_dec[f] @ W_U, no forward and no hooks, so
        # no device lock (see lg.project_to_vocab): a card never waits behind a generation or a scan.
        m = [rounded(v) for v in services.stats.moments(s, [feature])[0].tolist()]
    except InvalidInput as exc:  # e.g. an SAE on hook_mlp_pre: no direct path to the unembedding
        return None, None, f"no logit lens: {exc}"
    return projection, (m[0], m[1], m[2], m[3]), None  # rounded: a centred mean reads 0, not float noise


def _add_activations(card: CardData, examples: ExampleSource, s: LoadedSAE, feature: int, n_examples: int) -> None:
    """The index's summary and top examples; else a cached on-demand scan's; else NOT_INDEXED. Never scans."""
    summary = examples.feature_summary(s.key, feature)
    top = None
    if summary is None:
        top = examples.cached_top_examples(s.key, feature, k=max(n_examples, 1))
        if top is None:
            card.index_note = NOT_INDEXED
            return
        summary = top
        card.scan_note = (
            f"from an on-demand top_examples scan of this feature over {top.tokens_scanned:,} tokens "
            "(not indexed: build_index or `sae-mcp index` covers every feature)"
        )
    card.summary = summary
    if n_examples:
        if top is None:
            top = examples.top_examples(s.key, feature, View(n_examples, DEFAULT_CONTEXT))
        card.examples = list(top.examples)[:n_examples]
