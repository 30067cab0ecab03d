"""Serving: MLflow's scoring server for a version, the serving parity gate, the registry webhook receiver, GGUF export."""
