"""Data: raw readers, the built-in samples, data sources and snapshots, DVC versioning, and prepare (validate, dedupe, split, format)."""
