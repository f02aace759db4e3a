"""Scoring explanations blind: a labelled feature's explanation is scored on contexts the scorer has not seen.

    blind_set.py   drawing the blind set (detection and fuzzing, band-balanced from the interval samples)
    prompt.py      the scorer's prompt and the parsing of its answers
    runs.py        ExplanationScorer: hands out a challenge (with its submit secret) and scores the predictions
    draw.py        the blind set's contexts found: the model and SAE run over unseen windows of the index
    metrics.py     balanced accuracy, per-band recall, intervals; results.py: the result objects built from them
    store.py       ScoreStore: scores and the challenges they came from, in the explanation store's file
"""
