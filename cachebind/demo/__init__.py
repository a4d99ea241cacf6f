"""`cachebind demo`: the whole pipeline on a generated sample collection."""
