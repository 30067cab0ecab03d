"""The MLflow registry: run bookkeeping, registering and promoting, manual operations, the pyfunc loader of a registered model."""
