"""Serving: MLflow's scoring server for a version, the serving parity gate, the registry webhook receiver, GGUF export.

From a checkout's root the old pyfunc loader name `tasks.serving` (MLmodel of models registered before the
stage packages) is this package: it answers with the loader (tasks/registry/legacy.py says the rest)."""
from qlora_ops.tasks.registry.loader import _load_pyfunc  # noqa: F401
from qlora_ops.tasks.serving.server import load_version  # noqa: F401  (documented: docs/deploy.md)
