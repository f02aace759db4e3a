"""Text sources -> BOS-started token windows, the unit every corpus scan reads.

A corpus spec is a local file or a Hugging Face dataset name:
- `.txt`: documents separated by blank lines; a file with no blank line at all is one document per line.
- `.jsonl`: one JSON object per line with a `text` field.
- `.parquet`: a `text` column (read in record batches, never whole).
- anything else: a Hugging Face dataset name, streamed (split `train`, column `text`), so memory stays bounded
  whatever its size. Offline and not cached: LoadError naming the local alternatives.

Windows: each document is tokenized on its own (no special tokens) and cut into windows of `context_size`
tokens: BOS followed by the next `context_size - 1` document tokens (the last window of a document may be
shorter). A window never spans two documents, so an example's context is always its own document's text.
An empty document has no windows but still counts: a window's `document` is its document's index in the corpus.
An activation depends on everything before it in the window, so the window is the example's whole context.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path

import torch

from sae_mcp.engine.hub import Hub
from sae_mcp.errors import InvalidInput, LoadError, NotFound

LOCAL_SUFFIXES = (".txt", ".jsonl", ".parquet")
DEFAULT_CONTEXT = 128


@dataclass(frozen=True)
class CorpusSource:
    spec: str
    """What the user gave (a path or an HF dataset name)."""
    key: str
    """Identity of the corpus for index keys: the absolute path for files, the dataset name otherwise."""
    kind: str
    """txt | jsonl | parquet | hf."""
    fingerprint: str
    """Size + mtime for files ('' for HF datasets): an index built on an older file is not reused."""

    def describe(self) -> str:
        return {
            "txt": f"{self.key} (text; documents separated by blank lines, else one per line)",
            "jsonl": f"{self.key} (jsonl, field 'text')",
            "parquet": f"{self.key} (parquet, column 'text')",
            "hf": f"Hugging Face dataset {self.key} (streamed, split train, column text)",
        }[self.kind]


def resolve_corpus(spec: str | None, dataset_path: str | None = None) -> CorpusSource:
    """--corpus SPEC, else the SAE's training dataset (metadata.dataset_path) -> CorpusSource, checked."""
    spec = spec or dataset_path
    if not spec:
        raise NotFound(
            "no corpus: this SAE's metadata names no training dataset; pass --corpus with a Hugging Face dataset "
            "name or a local .txt/.jsonl/.parquet file"
        )
    path = Path(spec).expanduser()
    looks_local = path.suffix in LOCAL_SUFFIXES or os.sep in spec and path.exists() or spec.startswith((".", "~", "/"))
    if looks_local:
        if not path.is_file():
            raise NotFound(
                f"corpus file {spec} does not exist; pass --corpus with an existing .txt/.jsonl/.parquet file"
            )
        if path.suffix not in LOCAL_SUFFIXES:
            raise InvalidInput(f"corpus file {spec}: use a .txt, .jsonl or .parquet file")
        st = path.stat()
        return CorpusSource(spec, str(path.resolve()), path.suffix[1:], f"{st.st_size}-{st.st_mtime_ns}")
    return CorpusSource(spec, spec, "hf", "")


# ---------------------------------------------------------------------------------------------------------------
# Documents


def iter_documents(src: CorpusSource, hub: Hub | None = None) -> Iterator[tuple[int, str]]:
    """Yield (index, text) of the corpus' non-empty documents in order. `index` is the document's index in the
    corpus: empty or blank documents (an empty jsonl `text`, a null parquet/HF value) are counted but not yielded,
    so it stays the jsonl line among non-blank lines, the parquet or dataset row, the .txt paragraph or line.
    `hub` is asked whether a Hugging Face dataset can be streamed (a new probe when None)."""
    if src.kind == "hf":
        docs = _hf_docs(src, hub or Hub())
    else:
        docs = {"txt": _txt_docs, "jsonl": _jsonl_docs, "parquet": _parquet_docs}[src.kind](src)
    for d, doc in enumerate(docs):
        if doc and doc.strip():
            yield d, doc


def _txt_docs(src: CorpusSource) -> Iterator[str]:
    path = Path(src.key)
    with path.open(encoding="utf-8") as f:  # one cheap pass to choose the rule, without holding the file
        paragraphs = any(line.strip() == "" for line in f)
    with path.open(encoding="utf-8") as f:
        if not paragraphs:
            for line in f:
                yield line.rstrip("\n")
            return
        buf: list[str] = []
        for line in f:
            if line.strip() == "":
                if buf:
                    yield "".join(buf).rstrip("\n")
                buf = []
            else:
                buf.append(line)
        if buf:
            yield "".join(buf).rstrip("\n")


def _jsonl_docs(src: CorpusSource) -> Iterator[str]:
    with Path(src.key).open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InvalidInput(f"corpus {src.key} line {n} is not JSON: {exc}") from None
            if not isinstance(row, dict) or "text" not in row:
                raise InvalidInput(f"corpus {src.key} line {n} has no 'text' field; each line needs {{\"text\": ...}}")
            yield str(row["text"])


def _parquet_docs(src: CorpusSource) -> Iterator[str]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(src.key)
    if "text" not in pf.schema_arrow.names:
        raise InvalidInput(f"corpus {src.key} has no 'text' column (columns: {', '.join(pf.schema_arrow.names)})")
    for batch in pf.iter_batches(batch_size=1024, columns=["text"]):
        yield from (t if t is not None else "" for t in batch.column(0).to_pylist())  # a null row still counts


def _hf_docs(src: CorpusSource, hub: Hub) -> Iterator[str]:
    online = hub.reachable
    try:
        import datasets

        # Online: streamed (bounded memory). Offline: only a cached copy can load; it is memory-mapped Arrow.
        with hub.fail_fast():
            ds = datasets.load_dataset(src.key, split="train", streaming=online)
    except Exception as exc:  # offline, unknown name, gated: all mean "cannot read it"
        raise LoadError(
            f"cannot read the corpus {src.key!r} as a Hugging Face dataset ({type(exc).__name__}: {exc}). "
            + ("" if online else "The hub is unreachable and the dataset is not cached. ")
            + "Pass --corpus with a local .txt (documents separated by blank lines, or one per line), "
            ".jsonl (field 'text') or .parquet (column 'text') file."
        ) from None
    for row in ds:
        if not isinstance(row, dict) or "text" not in row:
            raise InvalidInput(f"dataset {src.key} has no 'text' column (columns: {', '.join(row)})")
        yield row["text"] or ""  # a null row still counts as a document


# ---------------------------------------------------------------------------------------------------------------
# Windows


@dataclass(frozen=True)
class Window:
    index: int
    """Sequence number of the window in the corpus stream (0, 1, 2, ...)."""
    document: int
    """Index of its document in the corpus."""
    start: int
    """Offset of its first document token in the document's token stream."""
    ids: list[int]
    """[BOS] + up to context_size - 1 document tokens (no BOS when the SAE was trained without one)."""


def iter_windows(
    src: CorpusSource, tokenizer, context_size: int, bos_id: int | None, skip_windows: int = 0, hub: Hub | None = None,
    from_document: tuple[int, int] = (0, 0),
) -> Iterator[Window]:
    """Documents -> windows, in order. `skip_windows` resumes a scan (documents are re-tokenized, not re-run).
    `from_document` (document index, its first window's index): documents before it are dropped untokenized, for a
    reader that knows where a window range starts (a Ray shard's cursor).
    `tokenizer`: one no other thread reconfigures while this runs (a server passes Engine.corpus_tokenizer)."""
    if context_size < 2:
        raise InvalidInput(f"context_size {context_size} is too small; windows need BOS plus at least one token")
    step = context_size - (1 if bos_id is not None else 0)
    head = [bos_id] if bos_id is not None else []
    first_doc, w = from_document
    docs = ((d, text) for d, text in iter_documents(src, hub) if d >= first_doc)
    for d, ids in tokenized_documents(docs, tokenizer):  # d counts empty documents too
        for start in range(0, len(ids), step):
            if w >= skip_windows:
                yield Window(w, d, start, head + ids[start : start + step])
            w += 1


TOKENIZE_DOCS = 64  # documents per tokenizer call


def tokenized_documents(documents: Iterator[tuple[int, str]], tokenizer) -> Iterator[tuple[int, list[int]]]:
    """(index, text) -> (index, ids), TOKENIZE_DOCS documents per tokenizer call. A fast tokenizer encodes a list
    in one Rust call, over the machine's cores unless TOKENIZERS_PARALLELISM=false. Measured on an H200 box with
    one call per document: tokenizing was the index's largest CPU cost (~0.9 s per 1M tokens, one core), as much
    as the GPU's scan. The ids are the same as one call per text."""
    chunk: list[tuple[int, str]] = []
    for doc in documents:
        chunk.append(doc)
        if len(chunk) == TOKENIZE_DOCS:
            yield from _encode(chunk, tokenizer)
            chunk = []
    if chunk:
        yield from _encode(chunk, tokenizer)


def _encode(chunk: list[tuple[int, str]], tokenizer) -> Iterator[tuple[int, list[int]]]:
    ids = tokenizer([text for _, text in chunk], add_special_tokens=False)["input_ids"]
    return zip((d for d, _ in chunk), ids)


def private_tokenizer(tokenizer):
    """A copy of a fast tokenizer for reading the corpus (Engine.corpus_tokenizer, made once at start). A fast (Rust)
    tokenizer holds padding and truncation as state that every call sets: a prompt tokenized on another thread
    (transformer-lens' to_tokens asks padding=True) between that and the encoding of a batch of documents pads the
    documents to the batch's longest with pad ids, and the index would scan them (measured: 61 of 64 documents of a
    batch changed). The copy is only ever called with the corpus' settings, so its state never changes and
    concurrent scans can share it. Other tokenizers hold no such state: the tokenizer itself."""
    if tokenizer is None or getattr(tokenizer, "_tokenizer", None) is None:  # none, or not a fast tokenizer
        return tokenizer
    return deepcopy(tokenizer)


def bos_token_id(tokenizer) -> int:
    """The id windows and prompts start with: the tokenizer's BOS, else its EOS (GPT-2 uses <|endoftext|> as both)."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def pad_windows(windows: Sequence[Window], pad_id: int, bos: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows -> (ids [B, T] right-padded with pad_id, scanned [B, T] bool: the document tokens, i.e. neither
    the leading BOS nor padding). T is the longest window. Right padding is safe for a causal model: pads never
    reach a real token."""
    T = max(len(w.ids) for w in windows)
    first = 1 if bos else 0
    ids = torch.full((len(windows), T), pad_id, dtype=torch.long)  # [B, T]
    scanned = torch.zeros((len(windows), T), dtype=torch.bool)  # [B, T]
    for i, w in enumerate(windows):
        ids[i, : len(w.ids)] = torch.tensor(w.ids)
        scanned[i, first : len(w.ids)] = True
    return ids, scanned


def window_context(sae_context_size: int | None, n_ctx: int) -> int:
    """The window length: the SAE's training context size, else 128; never longer than the model's context."""
    return min(int(sae_context_size or DEFAULT_CONTEXT), int(n_ctx))
