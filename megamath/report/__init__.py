"""`megamath report`: one self-contained HTML page (or a Markdown table) from one or more run folders.

runs.py reads a run (metrics.jsonl, config.yaml, run_info.json); summary.py computes the numbers of the
summary table; notes.py flags what a person should look at; figures.py draws the plots as embedded
PNGs; html.py assembles the page. Every number comes from metrics.jsonl, the run's source of truth.
"""
