"""describe_features: the evidence to explain a feature in one read, for several features in one call.

Per feature: density and max activation, its top examples (max token marked), samples from its activation bands by
quantile (a feature that fires weakly on one thing and strongly on another shows both), the logit lens (top and
bottom tokens of W_dec[f] @ W_U, special and byte tokens left out) and its newest labels. Everything comes from the
corpus index (or a scan of the feature already cached) and the weights: nothing here scans or runs the model.

Blind scoring never draws a context from a window holding an entry the index keeps of the feature (its top
examples and every interval sample: scoring/blind_set.py), and these views show only such entries, so what this
shows is never in a blind set (tested with the other views).
"""

from __future__ import annotations

import logging

from sae_mcp.cards.data import NOT_INDEXED
from sae_mcp.engine import logits as lg
from sae_mcp.errors import SaeMcpError
from sae_mcp.one_line import shown
from sae_mcp.results.explain import FeatureDescription
from sae_mcp.services import Services

log = logging.getLogger(__name__)
LABEL_CHARS = 200  # a label as shown here (the card and the pages show more)
SHOWN_LABELS = 2


def describe_feature(services: Services, sae_key: str, feature: int, examples: int, bands: int, per_band: int,
                     context: int, tokens: int) -> FeatureDescription:
    engine = services.engine
    s = engine.sae(sae_key)
    engine.check_feature(s, feature)
    notes = []
    d = FeatureDescription(feature=feature)
    try:
        top = services.examples.cached_top_examples(s.key, feature, k=max(examples, 1), context=context,
                                                    intervals=bands, per_interval=per_band)
    except SaeMcpError as exc:
        top, notes = None, [f"examples unavailable: {exc}"]
    if top is None:
        notes.append(NOT_INDEXED)
    else:
        d.density, d.max_activation = top.density, top.max_activation
        d.top = top.examples[:examples]
        shown_above = {(e.document, e.offset) for e in d.top}  # a band sample that is also a top example: once
        d.bands = [b.model_copy(update={"examples": [e for e in b.examples
                                                     if (e.document, e.offset) not in shown_above]})
                   for b in top.intervals or []]  # highest first, as top_examples lists them
    try:
        lens = lg.project_to_vocab(engine, feature, sae=s.key, top_k=tokens, exclude=services.stats.builtin_excluded())
        d.promotes, d.suppresses = lens.top_positive, lens.top_negative
    except SaeMcpError as exc:  # an SAE whose decoder does not write to the residual stream
        notes.append(f"no logit lens: {exc}")
    labels = [x for x in services.explanations.for_feature(s.store_key, feature) if x.source == "label"]
    d.labels = [shown(x.description, LABEL_CHARS)[0] for x in labels[:SHOWN_LABELS]]
    d.note = "; ".join(notes) or None
    return d
