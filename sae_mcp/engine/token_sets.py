"""Named sets of vocabulary tokens for token-set enrichment: built-in regex sets, the caller's regexes, token lists.

Regexes are matched against each token as the tokenizer writes it (leading space kept). Built-in sets leave out
the vocabulary's special, byte-fallback and control tokens (excluded_from_builtin): SentencePiece vocabularies
(Llama, Gemma) hold 256 byte pieces <0x00>..<0xFF> that decode alone to control characters or U+FFFD, which
punctuation's [^\\w\\s] would otherwise take (218 of stories260K's 512 tokens). The caller's own regexes and token
lists are taken as given.

Every regex runs on RE2 (google-re2), whose matching time is linear in the text: a caller's pattern cannot
backtrack exponentially (`(?:(?:.*)*)*...\x00` took Python's `re` 10 s on a 512-token vocabulary, and each more
group multiplied it). RE2 has no backreferences or lookaround; such a pattern is refused naming the construct. A
repetition count above RE2's own ceiling is refused too (RE2 would read `a{99999999999}` as literal text, Python's
re raised OverflowError). A time budget over all of a call's patterns is the last line: work is checked between
tokens, so no pattern can hold the server longer than it.
"""

from __future__ import annotations

import re
import time
import unicodedata
from dataclasses import dataclass

import re2
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
# The same sets written for RE2 where its syntax differs: RE2's \w and \s are ASCII-only, Python's are Unicode
# (these classes equal Python's on every assigned code point; tests/test_robustness.py checks it). RE2's $ is the
# end of the text, Python's also matches before a final newline: a token " 12\n" is not all digits.
RE2_SYNTAX: dict[str, str] = {"punctuation": r"^ ?[^\pL\pN_\s\pZ\x0b\x1c-\x1f\x85]+$"}
KEPT_WHITESPACE = " \t\n\r"  # byte pieces / control characters that are text: Llama's newline is <0x0A>

MAX_REPEAT = 1000  # RE2's ceiling on a counted repetition {n,m}
REPEAT_COUNT = re.compile(r"\{(\d+)(?:,(\d*))?\}")  # a counted repetition (also inside a class: refused, harmless)
REGEX_BUDGET_S = 10.0  # all of one call's regexes over the vocabulary; RE2 needs ~1 us a token and pattern
DEADLINE_EVERY = 1024  # tokens between looks at the clock
SHOWN_PATTERN = 80  # characters of a refused pattern quoted back
# (what RE2's message holds, the construct named to the caller)
UNSUPPORTED = (
    *((f"invalid escape sequence: \\{d}", f"a backreference (\\{d})") for d in "123456789"),
    ("invalid escape sequence: \\g", "a backreference (\\g<...>)"),
    ("invalid escape sequence: \\k", "a named backreference (\\k<...>)"),
    ("invalid perl operator: (?P", "a named backreference (?P=name)"),  # RE2 reads (?P<name>...) groups
    ("(?=", "lookahead (?=...)"),
    ("(?!", "negative lookahead (?!...)"),
    ("(?<=", "lookbehind (?<=...)"),
    ("(?<!", "negative lookbehind (?<!...)"),
    ("(?>", "an atomic group (?>...)"),
    ("(?(", "a conditional group (?(...)...)"),
    ("(?#", "a comment group (?#...)"),
    ("invalid escape sequence: \\Z", "\\Z (RE2 writes the end of the text as \\z)"),
    ("bad repetition operator: *+", "a possessive quantifier *+"),
    ("bad repetition operator: ++", "a possessive quantifier ++"),
    ("bad repetition operator: ?+", "a possessive quantifier ?+"),
)


def _re2_options():
    opts = re2.Options()
    opts.log_errors = False  # a refused pattern is the caller's answer, not a line on the server's stderr
    opts.never_capture = True  # only "does it match": without groups RE2 keeps to its DFA (`(.*){1000}` 28 s -> 0.2 s)
    return opts


RE2_OPTIONS = _re2_options()


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
        kept = len(text) == 1 and text in KEPT_WHITESPACE  # whole text: '' is `in` every string
        byte_piece = isinstance(piece, str) and piece.startswith("<0x") and not kept
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
    deadline = time.monotonic() + REGEX_BUDGET_S
    encoded: list[bytes] = []  # the vocabulary as UTF-8, once per call: RE2 matches bytes (str is re-encoded each time)
    for name, rx, tokens, builtin in wanted:
        if rx is not None:
            encoded = encoded or [t.encode("utf-8", "surrogatepass") for t in vocab]
            ts = TokenSet(name, _regex_ids(name, rx, encoded, excluded if builtin else frozenset(), deadline), [])
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


def _wanted_sets(sets, token_sets, regex_sets) -> list[tuple[str, object | None, list[str] | None, bool]]:
    """-> [(name, compiled regex, tokens, built-in)], built-in names checked and every regex compiled before any
    is matched (a bad last pattern fails at once)."""
    wanted: list[tuple[str, object | None, list[str] | None, bool]] = []
    for name in sets or []:
        if name not in BUILTIN_SETS:
            raise InvalidInput(f"unknown token set {name!r}; built-in sets: {', '.join(BUILTIN_SETS)}")
        wanted.append((name, compile_pattern(name, RE2_SYNTAX.get(name, BUILTIN_SETS[name])), None, True))
    wanted += [(name, compile_pattern(name, pattern), None, False) for name, pattern in (regex_sets or {}).items()]
    wanted += [(name, None, list(tokens), False) for name, tokens in (token_sets or {}).items()]
    if not wanted:
        raise InvalidInput(
            f"no token sets given: name built-in sets ({', '.join(BUILTIN_SETS)}), or pass token_sets / regex_sets"
        )
    return wanted


def _regex_ids(name: str, rx, vocab: list[bytes], excluded: frozenset[int], deadline: float) -> list[int]:
    """Ids of the tokens the RE2 regex `rx` matches anywhere in their text; past `deadline` (time.monotonic())
    the call is refused rather than left running."""
    hits = []
    for i, t in enumerate(vocab):
        if i % DEADLINE_EVERY == 0 and time.monotonic() > deadline:
            raise InvalidInput(
                f"token set {name!r}: matching the regexes took over {REGEX_BUDGET_S:g} s on this {len(vocab)}-token "
                "vocabulary; pass simpler or fewer regex_sets, or token_sets listing the tokens"
            )
        if i not in excluded and rx.search(t):
            hits.append(i)
    return hits


def compile_pattern(name: str, pattern: str):
    """pattern -> a compiled RE2 regex, or InvalidInput naming what RE2 cannot run or what is too large."""
    shown = pattern if len(pattern) <= SHOWN_PATTERN else pattern[:SHOWN_PATTERN] + "..."
    where = f"token set {name!r}: the regex {shown!r} does not compile"
    for m in REPEAT_COUNT.finditer(pattern):
        if any(int(n) > MAX_REPEAT for n in m.groups() if n):
            raise InvalidInput(f"{where}: the repetition {m.group(0)} is above {MAX_REPEAT}; use a smaller count, "
                               "or + or * for any number")
    try:
        return re2.compile(pattern, RE2_OPTIONS)
    except UnicodeEncodeError:
        raise InvalidInput(f"{where}: it holds a lone surrogate (half a UTF-16 pair); send whole characters") from None
    except re2.error as exc:
        raise InvalidInput(f"{where}: {_unsupported(exc)}") from None


def _unsupported(exc: Exception) -> str:
    """RE2's reason -> what to change, naming the construct when it is one RE2 leaves out by design."""
    reason = exc.args[0].decode("utf-8", "replace") if exc.args and isinstance(exc.args[0], bytes) else str(exc)
    for needle, construct in UNSUPPORTED:
        if needle in reason:
            return (f"{construct} is not supported (token sets run on RE2, which matches in linear time and has no "
                    "backreferences or lookaround); rewrite the pattern without it")
    return f"{reason} (RE2 syntax: https://github.com/google/re2/wiki/Syntax)"


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
