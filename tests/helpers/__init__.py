"""Plain helpers the tests share, imported by name (`from helpers.models import engine_on`); the fixtures stay in
tests/conftest.py, where pytest finds them.

    models    the bundled stories260K paths, generated tiny tokenizers and SAE folders, engines over them
    servers   settings, services and MCP servers over an engine with a data dir; subprocess environments, the CLI
    plain     independent reference computations (the tutorial's way, hooks written plainly) and their comparisons
    index     the feature index's brute-force reference, the sample hash, an index file of the old format
    session   the recorded investigation the ledger and export tests replay
    browser   headless Chromium and the pages served for it
"""
