"""Text from outside (labels, explanations, corpus text, error messages) shown on one line: what the agent reads and
the pages and exports show cannot be broken into headings, sections or reordered by what a label holds."""

from __future__ import annotations

import re

# C0/C1 controls and the bidirectional marks and overrides (U+061C, U+200E/F, U+202A-E, U+2066-9)
CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def one_line(text: str) -> str:
    """Text from a label, an explanation or a corpus as one line that cannot start a heading or a section where it
    is shown: each run of whitespace (line breaks, U+2028/2029 included) one space, each control or bidirectional
    character written out (\\x00, \\u202e) as Python writes it."""
    return CONTROLS.sub(lambda m: f"\\x{ord(m[0]):02x}" if ord(m[0]) < 0x100 else f"\\u{ord(m[0]):04x}",
                        " ".join(text.split()))


def shown(text: str, max_chars: int) -> tuple[str, int]:
    """(one_line(text) cut to max_chars, how many characters were left out)."""
    line = one_line(text)
    return (line, 0) if len(line) <= max_chars else (line[:max_chars] + "…", len(line) - max_chars)
