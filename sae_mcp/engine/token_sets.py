"""Named sets of vocabulary tokens for token-set enrichment: built-in regex sets, the caller's regexes, token lists.

Regexes are matched against each token as the tokenizer writes it (leading space kept). Built-in sets leave out
the vocabulary's special, byte-fallback and control tokens (excluded_from_builtin): SentencePiece vocabularies
(Llama, Gemma) hold 256 byte pieces <0x00>..<0xFF> that decode alone to control characters or U+FFFD, which
punctuation's [^\\w\\s] would otherwise take (218 of stories260K's 512 tokens). The caller's own regexes and token
lists are taken as given.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

import torch

from sae_mcp.engine.runtime import Engine
from sae_mcp.errors import InvalidInput

BUILTIN_SETS: dict[str, str] = {
    "starts_with_space": r"^ ",
    "capitalised": r"^ ?[A-Z]",
    "all_digits": r"^ ?[0-9]+$",
    "lowercase_word": r"^ ?[a-z]+$",
    "punctuation": r"^ ?[^\w\s]+$",
    "contains_newline": r"\n",
}
KEPT_WHITESPACE = " \t\n\r"  # byte pieces / control characters that are text: Llama's newline is <0x0A>


@dataclass(frozen=True)
class TokenSet:
    name: str
    ids: list[int]  # vocabulary ids in the set, ascending
    unmatched: list[str]  # given tokens that are not single vocabulary tokens (token lists only)


def vocab_strings(engine: Engine) -> list[str]:
    """Every token id -> its text as the tokenizer writes it (leading space kept)."""
    return engine.str_tokens(torch.arange(engine.model.cfg.d_vocab))


def excluded_from_builtin(engine: Engine, vocab: list[str]) -> frozenset[int]:
    """Token ids no built-in set may contain: special tokens (BOS, EOS, pad, unk), byte-fallback pieces
    ('<0x..>' from convert_ids_to_tokens) other than space/tab/newline/CR, and tokens whose text holds a control
    character (Unicode category C*: control, format, unassigned...) other than tab/newline/CR."""
    tok = engine.model.tokenizer
    pieces = tok.convert_ids_to_tokens(list(range(len(vocab)))) if tok is not None else [None] * len(vocab)
    special = set(getattr(tok, "all_special_ids", None) or [])
    out = set()
    for i, (text, piece) in enumerate(zip(vocab, pieces)):
        byte_piece = isinstance(piece, str) and piece.startswith("<0x") and text not in KEPT_WHITESPACE
        control = any(unicodedata.category(c).startswith("C") and c not in KEPT_WHITESPACE for c in text)
        if i in special or byte_piece or control:
            out.add(i)
    return frozenset(out)


def build_token_sets(
    vocab: list[str],
    excluded: frozenset[int],
    sets: list[str] | None = None,
    token_sets: dict[str, list[str]] | None = None,
    regex_sets: dict[str, str] | None = None,
) -> tuple[list[TokenSet], list[str]]:
    """Named sets -> (token sets, names skipped). Built-in names, token lists, or regexes.

    Built-in sets never contain `excluded` (excluded_from_builtin). sets=None with no token/regex sets means every
    built-in set; then a set that is empty (or the whole vocabulary) in this tokenizer is skipped (its name
    returned) instead of being an error."""
    lenient = sets is None and not token_sets and not regex_sets
    wanted = _wanted_sets(list(BUILTIN_SETS) if lenient else sets, token_sets, regex_sets)
    by_text: dict[str, list[int]] = {}
    for i, t in enumerate(vocab):
        by_text.setdefault(t, []).append(i)
    out, skipped = [], []
    for name, pattern, tokens, builtin in wanted:
        if pattern is not None:
            ts = TokenSet(name, _regex_ids(name, pattern, vocab, excluded if builtin else frozenset()), [])
        else:
            ts = _listed(name, tokens or [], by_text)
        if not ts.ids or len(ts.ids) >= len(vocab):
            if lenient:
                skipped.append(name)
                continue
            raise InvalidInput(
                f"token set {name!r} has {len(ts.ids)} of the {len(vocab)} vocabulary tokens; enrichment needs a set "
                "that is neither empty nor the whole vocabulary" + _unmatched_hint(ts.unmatched)
            )
        out.append(ts)
    return out, skipped


def _wanted_sets(sets, token_sets, regex_sets) -> list[tuple[str, str | None, list[str] | None, bool]]:
    """-> [(name, regex, tokens, built-in)], built-in names checked."""
    wanted = []
    for name in sets or []:
        if name not in BUILTIN_SETS:
            raise InvalidInput(f"unknown token set {name!r}; built-in sets: {', '.join(BUILTIN_SETS)}")
        wanted.append((name, BUILTIN_SETS[name], None, True))
    wanted += [(name, pattern, None, False) for name, pattern in (regex_sets or {}).items()]
    wanted += [(name, None, list(tokens), False) for name, tokens in (token_sets or {}).items()]
    if not wanted:
        raise InvalidInput(
            f"no token sets given: name built-in sets ({', '.join(BUILTIN_SETS)}), or pass token_sets / regex_sets"
        )
    return wanted


def _regex_ids(name: str, pattern: str, vocab: list[str], excluded: frozenset[int]) -> list[int]:
    try:
        rx = re.compile(pattern)
    except re.error as exc:
        raise InvalidInput(f"token set {name!r}: the regex {pattern!r} does not compile ({exc})") from None
    return [i for i, t in enumerate(vocab) if i not in excluded and rx.search(t)]


def _listed(name: str, tokens: list[str], by_text: dict[str, list[int]]) -> TokenSet:
    ids: set[int] = set()
    unmatched = []
    for t in tokens:
        hit = by_text.get(t)
        if hit:
            ids.update(hit)
        else:
            unmatched.append(t)
    return TokenSet(name, sorted(ids), unmatched)


def _unmatched_hint(unmatched: list[str]) -> str:
    if not unmatched:
        return ""
    return f" (not single tokens here: {', '.join(map(repr, unmatched[:5]))}; mind the leading space)"
