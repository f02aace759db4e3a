"""Start-up checks: configuration that would make tools fail later fails at start instead, with the reason.

Without them an unwritable --data-dir or a --corpus of binary junk started fine, and every tool touching them then
failed with an error the agent could do nothing about. Both checks run before the model loads (seconds, not the
minutes a large model takes) and raise a one-line SaeMcpError, which the CLI prints as `error: ...` and exits 2.

A Hugging Face dataset corpus is not read here: it is streamed and may be large or slow to reach, and its reader
already fails with what to do when it cannot be loaded.
"""

from __future__ import annotations

import os
from itertools import islice
from pathlib import Path

from sae_mcp.errors import LoadError, SaeMcpError
from sae_mcp.settings import Settings

PROBED_DOCUMENTS = 8  # a corpus whose first documents read is taken as readable; the rest is read when scanned


def check_settings(settings: Settings) -> None:
    """Every start-up check for `serve`, `call`, `index` and the dashboard."""
    check_data_dir(Path(settings.data_dir))
    if settings.corpus:
        check_corpus(settings.corpus)


def check_data_dir(path: Path) -> None:
    """The data dir exists (created when missing) and takes a file: a probe is written and removed."""
    probe = path / f".sae-mcp-write-probe-{os.getpid()}"
    if path.exists() and not path.is_dir():
        raise LoadError(f"the data dir {path} is a file, not a folder; pass --data-dir with a folder you can write "
                        "(or set SAE_MCP_DATA_DIR)")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"probe")
        probe.unlink()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise LoadError(
            f"the data dir {path} is not writable ({reason}); pass --data-dir with a folder you can write "
            "(or set SAE_MCP_DATA_DIR)"
        ) from None


def check_corpus(spec: str) -> None:
    """A local corpus file reads: its first documents parse through the readers scans use (engine/corpus.py)."""
    from sae_mcp.engine.corpus import iter_documents, resolve_corpus

    src = resolve_corpus(spec)  # a missing file or a wrong suffix: NotFound / InvalidInput, already one line
    if src.kind == "hf":
        return
    try:
        first = [text for _, text in islice(iter_documents(src), PROBED_DOCUMENTS)]
    except SaeMcpError as exc:  # e.g. a .jsonl line that is not JSON: the reader's own message
        raise LoadError(f"--corpus {spec}: {_one_line(str(exc))}") from None
    except UnicodeDecodeError:  # its position is within a buffered chunk, not the file: not worth quoting
        raise LoadError(f"--corpus {spec} is not UTF-8 text; pass a text file: .txt, .jsonl (field 'text') or "
                        ".parquet (column 'text')") from None
    except Exception as exc:  # pyarrow on a file that is no parquet, an OSError reading it...
        raise LoadError(f"--corpus {spec} cannot be read as {src.kind} ({type(exc).__name__}: "
                        f"{_one_line(str(exc))})") from None
    if not first:
        raise LoadError(f"--corpus {spec} holds no text; pass a corpus with some documents")
    if any("\x00" in text for text in first):
        raise LoadError(f"--corpus {spec} holds NUL bytes, so it looks binary; pass a text corpus")


def _one_line(text: str, most: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= most else text[:most] + "..."
