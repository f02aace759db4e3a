"""What the ledger stores of a call (ledger/store.py record()): bounded copies of JSON values, secrets replaced.

What is stored
    accepted calls  the arguments whole (replay and the exports redo the call from them; the tools' schemas bound
                    them), the result whole up to MAX_RESULT_CHARS of JSON, else cut (fit(): long lists to their
                    first items, long strings to their start, each cut saying how much it left out)
    rejected calls  the arguments cut as results are: each string to BOUNDED_STR characters, the whole to
                    MAX_REJECTED_CHARS (args_cut = 1; replay skips them). 165 label_feature calls with a 3.5 MB
                    label (rejected: labels take 1,000 characters) grew the ledger by 1.16 GB when they were stored
                    whole, 1.0 MB now (bench/bench_ledger.py --flood); every error message is cut to
                    MAX_ERROR_CHARS, a tool's or a client's name to MAX_NAME_CHARS
    never           a field named in SECRET_FIELDS (a blind set's submit secret), in the arguments, the result or
                    the error: its value is replaced by SECRET_MARK before anything is written
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import pydantic_core

MAX_RESULT_CHARS = 256_000  # a stored result's JSON; larger ones are cut (fit)
MAX_REJECTED_CHARS = 16_000  # a rejected call's arguments (as given, and as resolved), JSON
MAX_ERROR_CHARS = 2_000
MAX_NAME_CHARS = 200  # a tool's or a client's name as stored (a client names both, and the call is recorded)
BRIEF_CHARS = 1_000  # the listing copy of the arguments (args_line shows 60 characters of each)
BOUNDED_LIST = 32
BOUNDED_STR = 2_000
MAX_DEPTH = 24  # JSON nested deeper is cut (results nest < 10 levels; a client can send more)
CUTS = ((BOUNDED_LIST, BOUNDED_STR), (8, 200), (2, 40))
"""(items per list and keys per dict, characters per string) of fit()'s successive cuts; the first keeps every
key of a dict (a result model's fields)."""
BRIEF_CUTS = ((8, 120), (2, 40))
SECRET_FIELDS = frozenset({"submit_secret"})
SECRET_MARK = "(secret, not recorded)"
MIN_SECRET_PREFIX = 8  # an error message quoting this many leading characters of a secret has them replaced


# The walkers below take any JSON value: Any


def bounded(value: Any, max_list: int = BOUNDED_LIST, max_str: int = BOUNDED_STR, max_keys: int | None = None,
            depth: int = 0) -> Any:
    """A copy with lists cut to max_list items (then {'left_out': n}), strings to max_str characters, dicts to
    max_keys keys when given (then 'left_out_keys': n) and nesting to MAX_DEPTH."""
    if depth >= MAX_DEPTH and isinstance(value, (dict, list)):
        return {"left_out": "nested deeper"}
    if isinstance(value, dict):
        kept = list(value.items())[:max_keys] if max_keys is not None else value.items()
        out = {cut(str(k), max_str): bounded(v, max_list, max_str, max_keys, depth + 1) for k, v in kept}
        if max_keys is not None and len(value) > max_keys:
            out["left_out_keys"] = len(value) - max_keys
        return out
    if isinstance(value, list):
        kept = [bounded(v, max_list, max_str, max_keys, depth + 1) for v in value[:max_list]]
        return kept + ([{"left_out": len(value) - max_list}] if len(value) > max_list else [])
    return cut(value, max_str) if isinstance(value, str) else value


def cut(text: str, max_str: int) -> str:
    return text if len(text) <= max_str else text[:max_str] + f"... ({len(text) - max_str} characters left out)"


def fit(value: Any, max_chars: int, cuts: Sequence[tuple[int, int]] = CUTS, size: int | None = None
        ) -> tuple[Any, bool]:
    """(value, False) when its JSON (`size` characters, when known) is within max_chars; else (a bounded copy,
    True): each of `cuts` in turn until one fits, else a dict saying how large it was."""
    size = len(to_json(value) or "") if size is None else size
    if size <= max_chars:
        return value, False
    for i, (n, chars) in enumerate(cuts):
        cut = bounded(value, n, chars, max_keys=n if i else None)
        if len(to_json(cut) or "") <= max_chars:
            return cut, True
    return {"left_out": f"{size:,} characters of JSON"}, True


def scrub(value: Any) -> Any:
    """A copy with every field named in SECRET_FIELDS, at any depth, holding SECRET_MARK instead."""
    if isinstance(value, dict):
        return {k: SECRET_MARK if k in SECRET_FIELDS else scrub(v) for k, v in value.items()}
    if isinstance(value, list):
        return [scrub(v) for v in value]
    return value


def secrets_in(value: Any) -> list[str]:
    """The text values of the fields named in SECRET_FIELDS, at any depth."""
    if isinstance(value, dict):
        return [x for k, v in value.items() for x in ([str(v)] if k in SECRET_FIELDS and v else secrets_in(v))]
    if isinstance(value, list):
        return [x for v in value for x in secrets_in(v)]
    return []


def without_secrets(text: str, secrets: Iterable[str]) -> str:
    """`text` with each secret, and each of its leading parts of MIN_SECRET_PREFIX or more characters (an error
    message quotes a value's start), replaced by SECRET_MARK."""
    for secret in secrets:
        for n in range(len(secret), MIN_SECRET_PREFIX - 1, -1):
            if secret[:n] in text:
                text = text.replace(secret[:n], SECRET_MARK)
                break
    return text


def brief_of(given: dict) -> dict:
    """The listing copy of the arguments: each string cut to 120 characters, the whole to BRIEF_CHARS."""
    return fit(given, BRIEF_CHARS, BRIEF_CUTS)[0]


def to_json(value: object) -> str | None:
    """JSON text (pydantic-core writes it ~4x faster than json.dumps: this runs before every answer)."""
    return None if value is None else pydantic_core.to_json(value, fallback=str).decode()
