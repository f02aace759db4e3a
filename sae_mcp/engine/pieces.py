"""How one token reads, alone: its decoded text put right where decoding one token alone loses what the token is.

SentencePiece tokenizers (Llama, Gemma) drop a token's leading space when it is decoded alone; the piece keeps it as
U+2581, so the space is put back (' Lily' and 'Lily' stay distinguishable). A token holding part of a multi-byte
character decodes to U+FFFD alone; its bytes are shown instead ('<0xF0><0x9F>'), so an agent can tell the positions
of an emoji apart. A byte piece of one ASCII character that decodes to nothing alone ('<0x20>', the space, measured
on stories260K's tokenizer) is shown as that character.
"""

from __future__ import annotations


def shown_piece(text: str, piece: object) -> str:
    """(a token decoded alone, its vocabulary piece from convert_ids_to_tokens) -> the text to show for it."""
    if not isinstance(piece, str):
        return text
    if not text and (byte := _ascii_byte(piece)) is not None:
        return byte
    if "\ufffd" in text:
        return _bytes_of_piece(piece) or text
    if piece.startswith("\u2581") and not text.startswith(" "):
        return " " + text
    return text


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE writes each byte as a printable character: printable Latin-1 bytes stand for
    themselves, the other 68 bytes for code points 256 and up, in byte order. Inverse map: char -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
                 *range(ord("\xae"), ord("\xff") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table


_BYTE_LEVEL = _byte_level_alphabet()


def _ascii_byte(piece: str) -> str | None:
    """SentencePiece's byte piece '<0xNN>' of an ASCII byte -> that character; else None."""
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        try:
            value = int(piece[3:5], 16)
        except ValueError:
            return None
        return chr(value) if value < 0x80 else None
    return None


def _bytes_of_piece(piece: str) -> str | None:
    """A vocabulary piece holding raw bytes -> '<0xF0><0x9F>'; None when it is not a byte piece."""
    if piece.startswith("<0x") and piece.endswith(">"):  # SentencePiece byte fallback: already in this form
        return piece
    if piece and all(c in _BYTE_LEVEL for c in piece):  # byte-level BPE (GPT-2, Llama 3, Qwen)
        return "".join(f"<0x{_BYTE_LEVEL[c]:02X}>" for c in piece)
    return None
