"""Start-up checks: configuration that would make tools fail later fails at start instead, with the reason.

Without them an unwritable --data-dir or a --corpus of binary junk started fine, and every tool touching them then
failed with an error the agent could do nothing about; an unwritable <data_dir>/ledger/ started with a traceback
and then answered without run ids. The checks run before the model loads (seconds, not the minutes a large model
takes) and raise a one-line SaeMcpError, which the CLI prints as `error: ...` and exits 2.

A Hugging Face dataset corpus is not read here: it is streamed and may be large or slow to reach, and its reader
already fails with what to do when it cannot be loaded.
"""

from __future__ import annotations

import os
from itertools import islice
from pathlib import Path

from sae_mcp.errors import LoadError, SaeMcpError
from sae_mcp.one_line import shown
from sae_mcp.settings import Settings

PROBED_DOCUMENTS = 8  # a corpus whose first documents read is taken as readable; the rest is read when scanned


SQLITE_HEADER = b"SQLite format 3\x00"
DATA_DIR_FIX = "pass --data-dir with a folder you can write (or set SAE_MCP_DATA_DIR)"


def check_settings(settings: Settings) -> None:
    """Every start-up check for `serve`, `call`, `index` and the dashboard."""
    check_data_dir(Path(settings.data_dir))
    check_ledger_dir(Path(settings.data_dir) / "ledger")
    if settings.corpus:
        check_corpus(settings.corpus)


def check_data_dir(path: Path) -> None:
    """The data dir exists (created when missing) and takes a file: a probe is written and removed."""
    _writable_folder(path, "the data dir", DATA_DIR_FIX, create=True)


def check_ledger_dir(path: Path) -> None:
    """The ledger's folder (ledger/recording.py writes <data_dir>/ledger/ledger.sqlite), when it exists, takes a
    file, and its ledger, when there is one, is a SQLite file the server can write. A missing folder is left to
    the first recorded call (--no-ledger creates none); the data dir check has shown it can be made."""
    fix = "make it a writable folder, move it away (a new ledger starts), or pass another --data-dir"
    if path.exists():
        _writable_folder(path, "the ledger folder", fix, create=False)
    ledger = path / "ledger.sqlite"
    if ledger.is_dir():
        raise LoadError(f"the ledger {ledger} is a folder, not a file; {fix}")
    if ledger.is_file():
        try:
            with ledger.open("r+b") as fh:  # opened for writing: the server records a row per call
                head = fh.read(len(SQLITE_HEADER))
        except OSError as exc:
            raise LoadError(f"the ledger {ledger} cannot be written ({exc.strerror or type(exc).__name__}); "
                            f"{fix}") from None
        if head and head != SQLITE_HEADER:
            raise LoadError(f"the ledger {ledger} is not a SQLite database; {fix}")


def _writable_folder(path: Path, what: str, fix: str, create: bool) -> None:
    """`path` is a folder (made when `create`) that takes a file: a probe is written and removed."""
    if path.exists() and not path.is_dir():
        raise LoadError(f"{what} {path} is a file, not a folder; {fix}")
    probe = path / f".sae-mcp-write-probe-{os.getpid()}"
    try:
        if create:
            path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"probe")
        probe.unlink()
    except OSError as exc:
        raise LoadError(f"{what} {path} is not writable ({exc.strerror or type(exc).__name__}); {fix}") from None


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
    """A library's error message on one line, cut to `most` characters (the rule the cards and exports use)."""
    return shown(text, most)[0]
