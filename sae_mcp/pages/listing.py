"""What the dashboard's front page lists: explanation search, each SAE's features sorted by density or by label,
and each SAE's fidelity figures when they are known.

    search(services, query) -> Found          the search search_explanations runs (ExplanationStore.search over the
                                              loaded SAEs), with store keys mapped back to the keys tools use and
                                              each hit's scores as that tool gives them
    listing(services, sae, sort) -> Listing   one SAE: counts, fidelity (never measured on the page's thread:
                                              Services.fidelity_now), and its features by density (the index) or
                                              by label (the agent's labels, alphabetically)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sae_mcp.engine.saes import LoadedSAE
from sae_mcp.results import SaeFidelity
from sae_mcp.scoring.results import brief, brief_text
from sae_mcp.services import Services

SORTS = ("label", "density")
LISTED = 100  # features per SAE on the front page
MAX_QUERY = 500  # as search_explanations' query
SEARCH_TOP = 50


@dataclass
class Hit:
    sae: str  # the key tools address the SAE by
    feature: int
    description: str
    source: str
    score: float  # the search's match score
    scored: str  # 'detection 0.85 (n=20)' per scoring method, newest first (as search_explanations); '' if never


@dataclass
class Found:
    query: str
    hits: list[Hit] = field(default_factory=list)
    ranking: str | None = None  # 'lexical' | 'lexical+semantic' | 'semantic' (no word matched)
    note: str | None = None  # why nothing was found, or what was wrong with the query


@dataclass
class Row:
    feature: int
    density: float | None
    label: str | None  # the newest label
    explanation: str | None  # the first imported explanation
    scored: str = ""  # the label's scores, as in Hit.scored; '' if never scored


@dataclass
class Listing:
    key: str
    d_sae: int
    labels: int
    imported: int
    fidelity: SaeFidelity | None
    fidelity_note: str | None
    sort: str
    rows: list[Row]
    note: str | None = None  # e.g. not indexed: no densities


def search(services: Services, query: str) -> Found:
    query = query.strip()[:MAX_QUERY]
    saes = list(services.engine.saes.values())
    store = services.explanations
    try:
        found, ranking = store.search(query, [s.store_key for s in saes], top_k=SEARCH_TOP)
    except Exception as exc:  # an empty query after stripping punctuation, a bad FTS string: say so
        return Found(query, note=str(exc))
    keys = {s.store_key: s.key for s in saes}
    scored = services.scores.latest([(e.sae, e.feature, e.description) for e in found])
    hits = [Hit(keys.get(e.sae, e.sae), e.feature, e.description, e.source, float(f"{e.score:.4g}"),
                brief_text([brief(x) for x in scored.get((e.sae, e.feature, e.description), [])])) for e in found]
    note = None if hits else "no explanation or label matched"
    if hits and ranking == "semantic":
        note = "no word of the query occurs in any explanation or label: these matches are by meaning alone"
    return Found(query, hits, ranking, note)


def listing(services: Services, s: LoadedSAE, sort: str) -> Listing:
    store = services.explanations
    counts = store.counts(s.store_key)
    fid, fid_note = services.fidelity_now(s.key)
    out = Listing(s.key, s.d_sae, counts["labels"], counts["imported"], fid, fid_note, sort, [])
    densities = services.densities(s.key)
    if sort == "density":
        if densities is None:
            out.note = "not indexed: no densities (call build_index, or run sae-mcp index)"
            return out
        k = min(LISTED, s.d_sae)
        top = densities.topk(k).indices.tolist()
        out.rows = _with_scores(services, s, [_row(services, s, f, densities) for f in top if float(densities[f]) > 0])
        return out
    features = store.labelled_features(s.store_key, limit=200)
    rows = [_row(services, s, f, densities) for f in features]
    out.rows = _with_scores(services, s, sorted(rows, key=lambda r: ((r.label or "").casefold(), r.feature))[:LISTED])
    return out


def _with_scores(services: Services, s: LoadedSAE, rows: list[Row]) -> list[Row]:
    """Each labelled row with its label's latest scores (one query for the listing)."""
    scored = services.scores.latest([(s.store_key, r.feature, r.label) for r in rows if r.label])
    for r in rows:
        r.scored = brief_text([brief(x) for x in scored.get((s.store_key, r.feature, r.label or ""), [])])
    return rows


def _row(services: Services, s: LoadedSAE, feature: int, densities) -> Row:
    found = services.explanations.for_feature(s.store_key, feature)
    label = next((e.description for e in found if e.source == "label"), None)
    imported = next((e.description for e in found if e.source != "label"), None)
    density = float(f"{float(densities[feature]):.4g}") if densities is not None else None
    return Row(feature, density, label, imported)
