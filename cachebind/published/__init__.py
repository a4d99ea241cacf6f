"""The reading side of a published index: what the builders (``indexing``) write and the runtime
(``cachebind.serve``) reads.

- :mod:`~cachebind.published.layout`: the version directory and the ``CURRENT`` pointer;
- :mod:`~cachebind.published.manifest`: the typed :class:`~cachebind.published.manifest.Manifest`,
  the one place a manifest is read from and written to JSON;
- :mod:`~cachebind.published.params`: search-time parameters, set on an index or per call;
- :mod:`~cachebind.published.faissio`: reading a version's index files (on-disk lists included);
- :mod:`~cachebind.published.gpu`: the guarded GPU / torch exact search path;
- :mod:`~cachebind.published.load`: loading a version for serving, with the alignment check;
- :mod:`~cachebind.published.querylog`: the query-log file the service writes and tuning reads.

It sits below both: ``indexing`` imports it to write versions, ``cachebind.serve`` to read them,
and nothing here imports ``indexing`` or ``jobs``.
"""
