"""FAISS mechanics: what a build does with a FAISS index, knowing nothing of tables or tuning.

Factory keys made into indexes and indexes into bytes (``faiss_ops``), fitting an index on a
sample (``fit``: FAISS's "training", named apart from the LLM's), search-parameter grids and
settings (``params``), and the on-disk inverted lists: planning, writing and merging shards into
a version's ``index.ivfdata`` (``ondisk``). Imports no other room of :mod:`indexing`.
"""
