"""Corpus sources and windows: what a document is in each format, and windows = BOS + the next
context_size - 1 tokens of one document (never two). Checked against plain computations."""

from __future__ import annotations

import json

import pytest

from sae_mcp.engine.corpus import iter_documents, iter_windows, resolve_corpus, window_context
from sae_mcp.errors import InvalidInput, LoadError, NotFound

from helpers.models import STORIES_CORPUS, STORIES_HF, stories_texts


def docs(path) -> list[str]:
    return [text for _, text in iter_documents(resolve_corpus(str(path)))]


def test_txt_with_blank_lines_is_one_document_per_paragraph(tmp_path):
    p = tmp_path / "c.txt"
    p.write_text("first line\nstill first\n\nsecond\n\n\nthird\n", encoding="utf-8")
    assert docs(p) == ["first line\nstill first", "second", "third"]


def test_txt_without_blank_lines_is_one_document_per_line(tmp_path):
    p = tmp_path / "c.txt"
    p.write_text("one\ntwo\nthree\n", encoding="utf-8")
    assert docs(p) == ["one", "two", "three"]


def test_jsonl_and_parquet_read_the_text_field(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = ["a story", "another story", "a third"]
    j = tmp_path / "c.jsonl"
    j.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)), encoding="utf-8")
    q = tmp_path / "c.parquet"
    pq.write_table(pa.table({"text": texts, "id": [0, 1, 2]}), q)
    assert docs(j) == texts
    assert docs(q) == texts


def test_jsonl_without_text_field_says_which_line(tmp_path):
    j = tmp_path / "c.jsonl"
    j.write_text('{"text": "ok"}\n{"body": "no"}\n', encoding="utf-8")
    with pytest.raises(InvalidInput, match="line 2 has no 'text' field"):
        docs(j)


def test_missing_corpus_file_is_not_found(tmp_path):
    with pytest.raises(NotFound, match="does not exist"):
        resolve_corpus(str(tmp_path / "nope.jsonl"))


def test_no_corpus_and_no_dataset_path_asks_for_corpus():
    with pytest.raises(NotFound, match="pass --corpus"):
        resolve_corpus(None, None)


def test_offline_hf_dataset_fails_with_local_alternatives():
    src = resolve_corpus("someone/some-dataset-that-is-not-cached")
    assert src.kind == "hf"
    with pytest.raises(LoadError, match="local .txt"):
        next(iter_documents(src))


def test_window_length_is_sae_context_else_128_capped_by_model():
    assert window_context(None, 1024) == 128
    assert window_context(64, 1024) == 64
    assert window_context(256, 128) == 128


def test_windows_are_bos_plus_next_tokens_of_one_document():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(STORIES_HF)
    ctx, bos = 16, 1
    windows = list(iter_windows(resolve_corpus(str(STORIES_CORPUS)), tok, ctx, bos, skip_windows=0))
    # Plain: every document's ids in chunks of ctx - 1, each behind BOS, in order.
    expected = []
    for d, text in enumerate(stories_texts()):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        expected += [(d, s, [bos] + ids[s : s + ctx - 1]) for s in range(0, len(ids), ctx - 1)]
    assert [(w.document, w.start, w.ids) for w in windows] == expected
    assert [w.index for w in windows] == list(range(len(expected)))
    assert all(len(w.ids) <= ctx and w.ids[0] == bos for w in windows)
    resumed = list(iter_windows(resolve_corpus(str(STORIES_CORPUS)), tok, ctx, bos, skip_windows=100))
    assert [(w.index, w.ids) for w in resumed[:3]] == [(w.index, w.ids) for w in windows[100:103]]


def test_empty_documents_count_so_document_is_the_index_in_the_file(tmp_path, tiny_loaded):
    """An empty (or blank) text is still a document: it gets no windows, but the documents after it keep their
    index in the file (the jsonl line among non-blank lines, the parquet row)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tok = tiny_loaded.model.tokenizer
    rows = ["the cat sat", "", "the dog ran", "   ", "Lily saw a ball"]
    j = tmp_path / "c.jsonl"
    j.write_text("".join(json.dumps({"text": t}) + "\n" + ("\n" if i == 0 else "") for i, t in enumerate(rows)),
                 encoding="utf-8")  # a blank line after the first row is not a document
    q = tmp_path / "c.parquet"
    pq.write_table(pa.table({"text": ["the cat sat", None, "the dog ran", "   ", "Lily saw a ball"]}), q)
    for path in (j, q):
        windows = list(iter_windows(resolve_corpus(str(path)), tok, 8, 1))
        assert [(w.document, w.ids) for w in windows] == [
            (d, [1] + tok(rows[d], add_special_tokens=False)["input_ids"]) for d in (0, 2, 4)
        ], path.suffix
        assert [w.index for w in windows] == [0, 1, 2]
