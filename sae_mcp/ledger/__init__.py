"""The ledger: every tool call recorded, read back, exported and replayed.

    store.py       LedgerStore: runs, sessions and environments in SQLite, bounded (the oldest uncited runs pruned)
    records.py     Run, Session, Pruned: the store's rows as objects
    bounds.py      what is stored of a call: bounded copies of its arguments and result, secrets replaced
    recording.py   Ledger: a call begun and finished under a plain session id; secrets never stored
    env.py         the environment a run ran against (model, SAEs, versions, device)
    rule.py        LedgerRule: what the ledger knows of a tool (each tool states it in sae_mcp/server/tools/<tool>.py)
    resolve.py     a run's arguments resolved (defaults, the drawn seed) so it can be redone exactly
    summary.py     one line per run for listings and pages
    export/        a session as a script, a notebook or a markdown report; replay (`sae-mcp ledger replay`)
"""
