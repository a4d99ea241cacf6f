"""cachebind: build and serve ImageBind feature caches."""

__version__ = "0.1.0"
