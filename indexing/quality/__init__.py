"""The quality loop: what a version is measured on, how well it does, the setting it serves with.

Query sets (``querysets``: held-out rows, captions, the query log, files), exact ground truth and
recall (``recall``), tuning search parameters to the worst trusted set (``tune``), recall and
latency per set (``measure``), per-modality settings (``bymodality``), and the sets as the gap
report's query groups (``gapsets``). Uses only the FAISS mechanics
(:mod:`indexing.mechanics`) of the other rooms.
"""
