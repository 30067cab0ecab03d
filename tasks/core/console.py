"""What the console shows. Quiet by default: our stage lines, progress and the summary; third-party
warnings, progress bars and Prefect's engine chatter ("Finished in state Completed()") are not shown.
`verbose` brings all of it back; `debug` also keeps full tracebacks (without it a failure is one
paragraph). Prefect's API handler still receives every run log: only the console is quieter.

Entry points call `configure()` (the CLI, `python -m qlora_ops.tasks.train`); nothing happens at import. The
choice travels to child processes in the environment (QLORA_OPS_VERBOSE, QLORA_OPS_DEBUG, and the
third-party variables set here), so a training subprocess is as quiet as its parent.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import logging
import os
import sys
import warnings
from typing import Callable

VERBOSE_ENV = "QLORA_OPS_VERBOSE"
DEBUG_ENV = "QLORA_OPS_DEBUG"

# Third-party knobs read from the environment (by this process's libraries and by child processes).
QUIET_ENV = {
    "PYTHONWARNINGS": "ignore",                       # FutureWarning/UserWarning from transformers, mlflow, ...
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",              # also transformers' own tqdm bars
    "TQDM_DISABLE": "1",                              # bare tqdm bars ("Converting and de-quantizing GGUF tensors")
    "MLFLOW_LOGGING_LEVEL": "WARNING",                # "Creating initial MLflow database tables..."
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # "Downloading artifacts" bars
}
QUIET_LOGGERS = {"bitsandbytes": logging.ERROR,       # "Failed to load CPU gemm_4bit_forward from kernels-community"
                 "transformers": logging.ERROR, "accelerate": logging.ERROR, "peft": logging.ERROR,
                 "urllib3": logging.ERROR, "alembic": logging.WARNING}


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def is_verbose() -> bool:
    return _flag(VERBOSE_ENV) or _flag(DEBUG_ENV)


def is_debug() -> bool:
    return _flag(DEBUG_ENV)


def configure(verbose: bool | None = None, debug: bool | None = None) -> None:
    """Set up this process's console (and, through the environment, its children's). None = inherit
    the parent's choice from QLORA_OPS_VERBOSE / QLORA_OPS_DEBUG. `debug` implies `verbose`."""
    debug = is_debug() if debug is None else debug
    verbose = debug or (is_verbose() if verbose is None else verbose)
    os.environ[VERBOSE_ENV] = "1" if verbose else "0"
    os.environ[DEBUG_ENV] = "1" if debug else "0"
    if not verbose:
        for k, v in QUIET_ENV.items():
            os.environ.setdefault(k, v)
        warnings.simplefilter("ignore")
        # Some libraries re-enable their own warnings inside catch_warnings() (MLflow's "add type hints"
        # UserWarning at class definition): nothing third-party is shown in quiet mode, whatever the filter.
        warnings.showwarning = _no_warning
        for name, level in QUIET_LOGGERS.items():
            logging.getLogger(name).setLevel(level)
        when_imported("mlflow", _quiet_mlflow_prints)
    root = logging.getLogger()
    handler = next((h for h in root.handlers if isinstance(h, ConsoleHandler)), None)
    if handler is None:
        handler = ConsoleHandler()
        root.addHandler(handler)
    handler.verbose, handler.debug = verbose, debug
    if root.level == logging.NOTSET or root.level > logging.WARNING:
        root.setLevel(logging.WARNING)
    logging.getLogger("qlora_ops").setLevel(logging.INFO)


def _no_warning(*args, **kwargs) -> None:
    return None


def when_imported(name: str, then: Callable[[], None]) -> None:
    """Call `then` once the top-level module `name` has been imported: now if it is, else right after its
    import, wherever that happens. configure() must not import MLflow itself: 3-4 s of imports in every
    process, and most never log to it (a training child, `qlora-ops init`)."""
    if name in sys.modules:
        then()
        return

    class _Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path, target=None):
            if fullname != name:
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(fullname)  # the real finders: this one is gone
            if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
                exec_module = spec.loader.exec_module

                def exec_then(module):
                    exec_module(module)
                    then()

                spec.loader.exec_module = exec_then  # this module's own loader object: no other module sees it
            return spec

    sys.meta_path.insert(0, _Finder())


def _quiet_mlflow_prints() -> None:
    """MLflow writes "Successfully registered model ..." / "Created version ..." straight to its own
    stream, not through a logger level; mute that stream and send MLflow's warnings and errors through
    the root logger instead. (Its disable_logging() is not enough: MLflow re-enables the stream after
    every model logging call.)"""
    try:
        from mlflow.utils import logging_utils
    except ImportError:
        return
    logging_utils.MLFLOW_LOGGING_STREAM.write = lambda text: None
    lg = logging.getLogger("mlflow")
    lg.handlers = []
    lg.propagate = True
    lg.setLevel(logging.WARNING)


def _prefect_dir() -> str | None:
    mod = sys.modules.get("prefect")
    f = getattr(mod, "__file__", None)
    return os.path.dirname(f) + os.sep if f else None


class ConsoleHandler(logging.StreamHandler):
    """The root logger's stderr handler: message only; quiet unless `verbose`; tracebacks only with `debug`.

    Quiet drops records written by Prefect's own code: every record of the flow/task run loggers
    (state changes: the CLI says how the run ended) and Prefect's other INFO lines ("Starting temporary
    server ..."). What our code prints inside a flow (log_prints routes it through Prefect's run logger)
    is kept: the record's source file is ours.
    """

    def __init__(self) -> None:
        super().__init__()  # sys.stderr at emit time (StreamHandler keeps the stream it was given)
        self.setFormatter(logging.Formatter("%(message)s"))
        self.verbose, self.debug = False, False

    @property
    def stream(self):  # follow sys.stderr as it is when a record is written (pytest capture, redirection)
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass

    def filter(self, record: logging.LogRecord) -> bool:
        if not super().filter(record):
            return False
        if self.verbose:
            return True
        pdir = _prefect_dir()
        if pdir and record.pathname.startswith(pdir):
            if record.name.startswith(("prefect.flow_runs", "prefect.task_runs")):
                return False
            return record.levelno >= logging.WARNING
        return True

    def format(self, record: logging.LogRecord) -> str:
        if self.debug or not (record.exc_info or record.stack_info):
            return super().format(record)
        plain = logging.makeLogRecord(record.__dict__)  # other handlers (Prefect's API) keep the traceback
        plain.exc_info, plain.exc_text, plain.stack_info = None, None, None
        return super().format(plain)
