"""Models registered before the stage packages (qlora-ops <= 0.1, until 2026-12) name `tasks.serving` as their
pyfunc loader in MLmodel; the loader is now `qlora_ops.tasks.registry.loader`. `install()` makes the old name
resolve to the new loader, so those versions keep loading with `mlflow.pyfunc.load_model` and
`mlflow models serve`:

    import qlora_ops.tasks.registry.legacy as legacy; legacy.install()   # before mlflow.pyfunc.load_model

`qlora-ops serve` and `verify-serving` rewrite the name in their own downloaded copy instead
(tasks/serving/server.py check_mlmodel). The finder goes LAST on sys.meta_path: any
other `tasks` on the path (invoke's tasks.py, a Celery app, a checkout's tasks/ folder) is found first and
keeps its name; then only `tasks.serving` is answered, from inside that `tasks`' search, when it lacks one.
From a qlora-ops checkout's root, `tasks` is that folder and `tasks.serving` its serving package, which
re-exports the loader for the same reason (tasks/serving/__init__.py).
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys

LEGACY_LOADER_MODULE = "tasks.serving"
LOADER_MODULE = "qlora_ops.tasks.registry.loader"


class _Alias(importlib.abc.Loader):
    """A module named `tasks.serving` holding the loader's names (a module of its own, so the real loader
    keeps its own name and spec)."""

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        if module.__name__ == LEGACY_LOADER_MODULE:
            real = importlib.import_module(LOADER_MODULE)
            module.__dict__.update({k: v for k, v in vars(real).items() if not k.startswith("__")})


class _LegacyFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "tasks":  # reached only when nothing else on the path is called `tasks`
            return importlib.machinery.ModuleSpec(name, _Alias(), is_package=True)
        if name == LEGACY_LOADER_MODULE:
            return importlib.machinery.ModuleSpec(name, _Alias())
        return None


def install() -> None:
    """Resolve `tasks.serving` to the loader where nothing else answers for it (idempotent)."""
    if not any(isinstance(f, _LegacyFinder) for f in sys.meta_path):
        sys.meta_path.append(_LegacyFinder())
