"""The analyst's workbench over the cache: zero-shot labels, the modality-gap report, the map.

Downstream of the store and the encoder (it reads both); nothing upstream imports it.
"""
