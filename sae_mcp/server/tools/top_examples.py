"""top_examples: a feature's max-activating corpus examples with their context, density, histogram (a PNG on
request), and samples from activation bands; from the feature index or an on-demand scan of the corpus.

No `from __future__ import annotations`: the SDK reads the tool's annotations at registration.
"""

import base64
from collections.abc import Callable
from typing import Annotated

from mcp.server.mcpserver import Context
from mcp.types import CallToolResult, ImageContent, ToolAnnotations
from pydantic import Field

from sae_mcp.engine.corpus import resolve_corpus
from sae_mcp.engine.runtime import CancelToken, Engine
from sae_mcp.errors import SaeMcpError
from sae_mcp.index.scan import KEEP, bos_id, windows_pad_id
from sae_mcp.index.source import DEFAULT_CONTEXT, DEFAULT_SCAN_TOKENS, MAX_CONTEXT, MAX_SCAN_TOKENS
from sae_mcp.index.view import DEFAULT_PER_INTERVAL, MAX_INTERVALS, MAX_PER_INTERVAL, View
from sae_mcp.ledger import summary as ls
from sae_mcp.ledger.export.rules import AS_GIVEN, ExportRule, Redone
from sae_mcp.ledger.export.session import items, lit, md_text
from sae_mcp.ledger.rule import JSON, LedgerRule, ResolveContext
from sae_mcp.results.corpus import Example, TopExamples
from sae_mcp.server.progress import progress_reporter
from sae_mcp.server.render import histogram_png
from sae_mcp.server.text import fmt, join, tool_result, warnings_lines
from sae_mcp.server.tools.spec import ToolDeps, ToolSpec
from sae_mcp.settings import Settings


def corpus_is_remote(engine: Engine, settings: Settings) -> bool:
    """Whether a scan may stream a Hugging Face dataset: True unless every loaded SAE's corpus is a local file
    (an SAE with no usable corpus counts as remote: the hint errs on the side of saying 'may reach out')."""
    for s in engine.saes.values():
        try:
            if resolve_corpus(settings.corpus, s.dataset_path).kind == "hf":
                return True
        except SaeMcpError:
            return True
    return False


def corpus_annotations(deps: ToolDeps) -> ToolAnnotations:
    """It never modifies the model, but an on-demand scan writes its rows and windows to the SQLite index (a cache:
    the same call gives the same answer, so idempotent), and may stream a Hugging Face dataset (build_index too)."""
    return ToolAnnotations(read_only_hint=False, destructive_hint=False, idempotent_hint=True,
                           open_world_hint=corpus_is_remote(deps.engine, deps.services.settings))


def make(deps: ToolDeps) -> Callable[..., CallToolResult]:
    source, A = deps.services.examples, deps.args

    def top_examples(
        feature: Annotated[int, A.feature],
        sae: Annotated[str | None, A.sae] = None,
        k: Annotated[int, Field(ge=1, le=KEEP)] = 10,
        context: Annotated[int, Field(ge=0, le=MAX_CONTEXT, description="Tokens each side")] = DEFAULT_CONTEXT,
        max_scan_tokens: Annotated[
            int, Field(ge=1, le=MAX_SCAN_TOKENS, description="Without an index: tokens to scan")
        ] = DEFAULT_SCAN_TOKENS,
        plot: Annotated[bool, Field(description="Add a histogram PNG")] = False,
        intervals: Annotated[
            int, Field(ge=0, le=MAX_INTERVALS, description="Activation bands to sample")
        ] = 0,
        per_interval: Annotated[int, Field(ge=1, le=MAX_PER_INTERVAL)] = DEFAULT_PER_INTERVAL,
        mcp_context: Context | None = None,
    ) -> Annotated[CallToolResult, TopExamples]:
        """A feature's max-activating corpus examples, density, histogram; intervals: samples by band."""
        cancel = CancelToken()
        progress = progress_reporter(mcp_context, cancel, "tokens scanned")
        view = View(k, context, intervals, per_interval)
        res = source.top_examples(sae, feature, view, max_scan_tokens, progress=progress, cancel=cancel)
        result = tool_result(res, render)
        if plot:
            png = histogram_png(res.histogram, f"{res.sae} feature {feature}: fired on {res.n_fired:,} of "
                                f"{res.tokens_scanned:,} tokens (density {res.density:.3g}, max activation "
                                f"{res.max_activation:g})")
            result.content.append(ImageContent(type="image", data=base64.b64encode(png).decode(),
                                               mime_type="image/png"))
        return result

    return top_examples


def _example(e: Example) -> str:
    """'3.742 doc 12 @45 (x3): ...big do«g» named...' with newlines shown as ⏎."""
    shown = "".join(t if i != e.position else f"«{t}»" for i, t in enumerate(e.tokens)).replace("\n", "⏎")
    count = f" (x{e.count})" if e.count else ""
    return f"{fmt(e.activation)} doc {e.document} @{e.offset}{count}: {shown}"


def render(r: TopExamples) -> str:
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


def summary(r: JSON) -> str:
    ex = (r.get("examples") or [None])[0]
    shown = "".join(f"«{t}»" if i == ex["position"] else t for i, t in enumerate(ex["tokens"])) if ex else ""
    return (f"max {ls.fmt(r.get('max_activation'))}, density {ls.fmt(r.get('density'))} over {r.get('tokens_scanned')} "
            f"tokens ({r.get('source')})" + (f"; top: {shown!r}" if ex else ""))


def resolve(r: JSON, result: JSON, ctx: ResolveContext) -> JSON:
    """The corpus and its windows: context size, BOS and pad ids, tokens scanned (the windows are the corpus' first
    ones up to that many tokens, re-read from the corpus by an export)."""
    s = ctx.sae(r.get("sae"))
    if s is None:
        return {}
    return {"corpus": ctx.corpus_of(s.key) if ctx.corpus_of is not None else None,
            "context_size": result.get("context_size"), "bos_id": bos_id(ctx.engine, s),
            "pad_id": windows_pad_id(ctx.engine), "tokens_scanned": result.get("tokens_scanned"),
            "example_source": result.get("source"), "compute_dtype": result.get("compute_dtype")}


CORPUS_HELPERS = '''\
def corpus_documents(corpus):
    """(index, text) of the corpus' non-empty documents, in order, read as sae-mcp reads them (an empty document
    still counts in the index): .jsonl a `text` per non-blank line, .parquet a `text` column, .txt documents
    separated by blank lines (one per line when it has none), else a Hugging Face dataset (split train)."""
    path = Path(corpus["key"])
    if corpus["kind"] == "jsonl":
        lines = [line for line in path.read_text(encoding="utf-8").split("\\n") if line.strip()]
        texts = [str(json.loads(line)["text"]) for line in lines]
    elif corpus["kind"] == "parquet":
        texts = [t if isinstance(t, str) else "" for t in pd.read_parquet(path, columns=["text"])["text"]]
    elif corpus["kind"] == "txt":
        raw = path.read_text(encoding="utf-8")
        blocks = raw.split("\\n")
        blocks = blocks[:-1] if blocks and blocks[-1] == "" else blocks  # the file's last newline ends a line
        if any(b.strip() == "" for b in blocks):
            texts, buf = [], []
            for line in blocks:
                if line.strip() == "":
                    if buf:
                        texts.append("\\n".join(buf))
                    buf = []
                else:
                    buf.append(line)
            texts += ["\\n".join(buf)] if buf else []
        else:
            texts = blocks
    else:
        import datasets  # a dependency of sae-lens

        texts = (row["text"] or "" for row in datasets.load_dataset(corpus["key"], split="train", streaming=True))
    for index, text in enumerate(texts):
        if text and text.strip():
            yield index, text


def corpus_windows(corpus, context_size, bos_id):
    """(document, start, ids): each document tokenized alone, cut into BOS + context_size - 1 tokens."""
    step = context_size - (1 if bos_id is not None else 0)
    for document, text in corpus_documents(corpus):
        ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
        for start in range(0, len(ids), step):
            yield document, start, ([bos_id] if bos_id is not None else []) + ids[start:start + step]


def brute_force(key, feature, corpus, context_size, bos_id, budget):
    """Every positive activation of `feature` over the corpus' first windows until `budget` document tokens, one
    window per forward: {(document, offset): activation}, and the document tokens read (BOS is context only)."""
    hook, sae = hook_of(key), SAES[key]
    layer, first = int(hook.split(".")[1]), 1 if bos_id is not None else 0
    found, seen = {}, 0
    for document, start, ids in corpus_windows(corpus, context_size, bos_id):
        if seen >= budget:
            break
        tokens = torch.tensor([ids], device=DEVICE)
        _, cache = model.run_with_cache_with_saes(tokens, saes=[sae], stop_at_layer=layer + 1,
                                                  names_filter=[f"{hook}.hook_sae_acts_post"])
        acts = cache[f"{hook}.hook_sae_acts_post"][0, first:, feature].float().tolist()
        found.update({(document, start + i): a for i, a in enumerate(acts) if a > 0})
        seen += len(ids) - first
    return found, seen
'''


def cell(run: Redone) -> str:
    r, res = run.resolved, run.result
    examples = [(e["document"], e["offset"], e["activation"]) for e in items(res.get("examples"))]
    loose = (r.get("compute_dtype") or "float32") != "float32"
    return f"""\
corpus = {lit(r['corpus'], 9)}
found, seen = brute_force({r['sae']!r}, {r['feature']}, corpus, context_size={r['context_size']}, \
bos_id={r['bos_id']}, budget={r['tokens_scanned']})
atol, rtol = {'(2e-2, 2e-2)  # the scan ran in ' + str(r.get('compute_dtype')) if loose else '(ATOL, RTOL)'}
assert seen == {r['tokens_scanned']}, f"read {{seen}} document tokens, recorded {r['tokens_scanned']}"
close(max(found.values(), default=0.0), {res['max_activation']}, "max activation", atol, rtol)
n_fired = len(found)
assert abs(n_fired - {res['n_fired']}) <= {'max(2, 0.01 * ' + str(res['n_fired']) + ')' if loose else 1}, \
f"fired on {{n_fired}} tokens, recorded {res['n_fired']}"
examples = {lit(examples, 11)}  # (document, offset, activation), largest first
for document, offset, activation in examples:
    close(found.get((document, offset), 0.0), activation, f"document {{document}} offset {{offset}}", atol, rtol)
print({run.id!r}, "top_examples reproduced by brute force over", seen, "tokens")
"""


def details(r: JSON) -> list[str]:
    return [f"- {ls.fmt(e['activation'])}: " + md_text("".join(f"«{t}»" if i == e["position"] else t
                                                              for i, t in enumerate(e["tokens"])))
            for e in items(r.get("examples"))[:5]]


SPEC = ToolSpec(
    name="top_examples",
    make=make,
    result=TopExamples,
    render=render,
    annotations=corpus_annotations,
    page_in_text=True,  # a view a person opens
    resources=None,
    ledger=LedgerRule(summary=summary, volatile=(), bos="sae", resolve=resolve, features=None, keeps_runs=False,
                      looks_up=False, on_feature_page=False),
    export=ExportRule(cell=cell, helpers=(CORPUS_HELPERS,), note=None, details=details, label=None, score=None),
    replay=AS_GIVEN,
)
