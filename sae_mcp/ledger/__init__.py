"""The ledger: every tool call recorded, read back, exported and replayed.

    store.py       LedgerStore: runs, sessions and environments in SQLite, bounded (the oldest uncited runs pruned)
    recording.py   Ledger: a call begun and finished under a plain session id; secrets never stored
    env.py         the environment a run ran against (model, SAEs, versions, device)
    rule.py        LedgerRule: what the ledger knows of a tool (each tool states it in sae_mcp/server/tools/<tool>.py)
    resolve.py     a run's arguments resolved (defaults, the drawn seed) so it can be redone exactly
    summary.py     one line per run for listings and pages
    export/        a session as a script, a notebook or a markdown report; replay (`sae-mcp ledger replay`)
"""
