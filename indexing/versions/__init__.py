"""Published versions, the writing side: a version's manifest as a build assembles it
(``manifest``), staging folders, atomic publishing through ``CURRENT``, verifying, pruning
(``publishing``), and the table versions kept for published indexes (``retention``).

The reading side (the typed ``Manifest``, the version layout, loading, the query log) is
:mod:`cachebind.published`, below both this package and the service. Imports neither the
quality loop nor the build steps.
"""
