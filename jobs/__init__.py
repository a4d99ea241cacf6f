"""Ray job entry points: ``jobs.embed`` (sources -> preprocess -> encode -> store)."""
