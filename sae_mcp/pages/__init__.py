"""The pages a person reads beside the agent (served with `--pages` or by `sae-mcp dashboard`).

    routes.py      the HTTP routes: feature pages, the listing and search, the test box
    feature.py     what a feature page shows (shaded examples, histogram, labels and their scores, the runs)
    listing.py     the index page: SAEs, sorting and search over features
    circuit.py     a trace_circuit graph drawn as SVG with its figures
    plots.py       SVG histogram and bars; assets.py: the CSS and the script
    links.py       page URLs put into tool results
"""
