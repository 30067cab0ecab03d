"""qlora-ops stages as plain, typed functions (Prefect wrappers live in tasks/prefect_tasks.py)."""
