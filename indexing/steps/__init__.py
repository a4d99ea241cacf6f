"""The build steps: from a table to a staged version, for a build, an add and a re-tune.

Reading rows and what a build carries between steps (``rows``), query sets, the fitting sample
and the key for the table (``prepare``), the one place that chooses the key (``select``) and
escalates it when tuning cannot reach the target (``escalate``), the single and Ray-sharded
builds (``build``, ``shards``), an incremental add (``add``), a re-tune of the current version
(``retune``) and the staged files and manifest (``staging``). The steps use the other rooms;
no other room imports them.
"""
