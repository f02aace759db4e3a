"""The feature index: one pass over the corpus keeps, per SAE feature, its top-K activating windows, density, a
log-spaced activation histogram and interval samples per activation band.

    scan.py        the scan: windows read ahead and batched by length, forward to the SAE's hook, encode
    firing.py      a batch's firing entries (activations > 0), found inside the encode a block of rows at a time
    state.py       ScanState and update_state: each batch folded into the running top-K, counts and histogram
    samples.py     interval samples: fine bins per band, kept by a position hash (a fair sample without storing all)
    merge.py       merging two states (shards, resumed scans) exactly as one pass would have kept them
    store.py       IndexStore: the scanned state in SQLite, checkpointed and resumable
    source.py      ExampleSource: builds, resumes and reads the index; on-demand scans for a feature not indexed
    view.py        what top_examples shows of a stored scan (contexts, intervals, merged identical contexts)
    shards.py, ray_driver.py, ray_worker.py   the same index built by Ray workers over shards
    fidelity.py    an SAE's fidelity (explained variance, loss recovered) on a sample of the corpus windows
"""
