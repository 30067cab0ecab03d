"""The MLflow pyfunc loader of a registered merged model: `mlflow.pyfunc.load_model` and `mlflow models
serve` import this module of the INSTALLED qlora-ops package (MLmodel: `loader_module: tasks.registry.loader`)
and call `_load_pyfunc(data_path)`. No code travels in the artifact: whoever can write the artifact store
can change weights, but not what runs when a model loads, and changed weights are refused here.

Artifact (`data/model/` of the logged model, written by tasks.registry.register.log_merged_model):
  config.json, *.safetensors, tokenizer files   the merged Hugging Face model dir
  serving.json                                  {"system_prompt", "max_new_tokens", "batch_size"}
  qlora_ops_manifest.json                       sha256 + size of every file above

Loading checks every file against the manifest, and the manifest's own sha256 against the expected
`weights_digest` (the registered version's tag, written by the registrar only): one given at load time
(`model_config={"weights_digest": ...}`) and the env var QLORA_OPS_WEIGHTS_DIGEST (how `qlora-ops serve`
and tasks.serving.load_version hand the registry's value over) must match; given neither, the registry at
the current tracking URI is asked (registered_digest). A digest in MLmodel came with the bytes and counts
for nothing. MLmodel itself is checked by load_version / `qlora-ops serve` (its `mlmodel_digest` tag), not
here: a rewritten MLmodel may name another loader_module, and then this module never runs.

Answers are made exactly as tasks.evaluate.predict makes them (same prompt formatting from tasks.model.prompting,
same greedy decoding, stop tokens and trimming), so the served model can be proven equal to the
evaluated one (`qlora-ops verify-serving`). Stands alone: stdlib, torch, transformers, tasks.model.prompting
and tasks.core.util (stdlib only); nothing from flows or the training core.

Input: a str, a list of str, or a DataFrame with a "prompt" column (and optionally "system", a
per-row system prompt replacing the default). Output: one answer (str) per prompt. With the param
`describe: true`, one JSON string saying what decides the answers (weights digest, dtype, prompt...).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from qlora_ops.tasks.model.prompting import format_prompt, stop_ids
from qlora_ops.tasks.core.util import MANIFEST, sha256_file, verify_manifest

SERVING_FILE = "serving.json"
DIGEST_ENV = "QLORA_OPS_WEIGHTS_DIGEST"
DIGEST_TAG = "weights_digest"  # the registered version's tag (tasks.registry.register.WEIGHTS_DIGEST)
# Serve in another dtype than the one evaluated (e.g. bfloat16 to halve memory). Off by default: the
# parity check (`qlora-ops verify-serving`) then tells whether the answers still match.
DTYPE_ENV = "QLORA_OPS_SERVE_DTYPE"


class WeightsRefused(RuntimeError):
    """The artifact does not match its manifest, or the manifest not the expected digest: never loaded."""


def manifest_digest(model_dir: Path) -> str:
    """sha256 of the manifest file: one digest naming every byte of the model dir (the version's
    `weights_digest` tag)."""
    return sha256_file(Path(model_dir) / MANIFEST)


def check_weights(model_dir: Path, expected: str | None = None) -> str:
    """The manifest digest of `model_dir`, after checking every file against the manifest and the
    manifest against `expected` (when given); WeightsRefused naming the file otherwise."""
    model_dir = Path(model_dir)
    if not (model_dir / MANIFEST).is_file():
        raise WeightsRefused(f"{model_dir}: no {MANIFEST}; a registered model always has one, refusing to load")
    digest = manifest_digest(model_dir)
    if expected and digest != expected:
        raise WeightsRefused(f"{model_dir / MANIFEST}: sha256 {digest[:16]}... is not the registered weights_digest "
                             f"{expected[:16]}...; the artifact was changed after registration, refusing to load")
    if (bad := verify_manifest(model_dir)) is not None:
        raise WeightsRefused(f"{bad}; refusing to load")
    listed = set(json.loads((model_dir / MANIFEST).read_text())["files"])
    extra = sorted(str(p.relative_to(model_dir)) for p in model_dir.rglob("*")
                   if p.is_file() and p.name != MANIFEST and str(p.relative_to(model_dir)) not in listed)
    if extra:  # a file slipped in beside the listed ones (e.g. a second *.safetensors) could be loaded too
        raise WeightsRefused(f"{model_dir}: {extra[:3]} not in the manifest; refusing to load")
    return digest


class MergedCausalLM:
    """What `_load_pyfunc` returns: the model, its tokenizer and its serving config."""

    def __init__(self, model_dir: Path, expected_digest: str | None = None, dtype: str | None = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model_dir = Path(model_dir)
        self.weights_digest = check_weights(model_dir, expected_digest)
        cfg = json.loads((model_dir / SERVING_FILE).read_text())
        self.system_prompt = str(cfg["system_prompt"])
        self.max_new_tokens = int(cfg["max_new_tokens"])
        self.batch_size = int(cfg.get("batch_size") or 16)
        tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        tok.padding_side = "left"  # as tasks.evaluate.predict: decoder-only batched generation pads on the left
        self.tokenizer, self.stops = tok, stop_ids(tok)
        # The dtype it was saved, evaluated and registered in (tasks.model.modeling.saved_dtype), unless asked.
        hf = json.loads((model_dir / "config.json").read_text())
        name = dtype or hf.get("dtype") or hf.get("torch_dtype") or "float32"
        self.dtype = getattr(torch, str(name).replace("torch.", ""))
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=self.dtype, use_safetensors=True,
                                                          trust_remote_code=False).eval()

    @staticmethod
    def _rows(model_input) -> list[tuple[str | None, str]]:
        """(system or None, prompt) per input row."""
        if isinstance(model_input, str):
            return [(None, model_input)]
        columns = getattr(model_input, "columns", None)
        if columns is not None:  # pandas DataFrame
            if "prompt" not in columns:
                raise ValueError(f"DataFrame input needs a 'prompt' column; got columns {list(columns)}")
            systems = model_input["system"].tolist() if "system" in columns else [None] * len(model_input)
            return [(None if s is None or s != s else str(s), str(p))  # s != s: NaN from a ragged record
                    for s, p in zip(systems, model_input["prompt"].tolist())]
        if isinstance(model_input, dict) and "prompt" in model_input:
            p = model_input["prompt"]
            return [(None, p)] if isinstance(p, str) else [(None, str(x)) for x in p]
        if hasattr(model_input, "tolist"):  # numpy array / pandas Series (the scoring server's "inputs")
            model_input = model_input.tolist()
        if isinstance(model_input, (list, tuple)) and all(isinstance(p, str) for p in model_input):
            return [(None, p) for p in model_input]
        raise TypeError("model_input must be a str, a list of str, or a DataFrame with a 'prompt' column; "
                        f"got {type(model_input).__name__}")

    def describe(self) -> dict:
        """What decides this endpoint's answers, for the parity check to name a difference it finds."""
        import hashlib

        import torch
        import transformers

        return {"weights_digest": self.weights_digest, "dtype": str(self.dtype).replace("torch.", ""),
                "system_prompt_sha256": hashlib.sha256(self.system_prompt.encode()).hexdigest(),
                "max_new_tokens": self.max_new_tokens, "batch_size": self.batch_size,
                "device": str(next(self.model.parameters()).device), "threads": torch.get_num_threads(),
                "torch": torch.__version__, "transformers": transformers.__version__}

    def predict(self, model_input, params=None) -> list[str]:
        import torch

        if (params or {}).get("describe"):  # {"params": {"describe": true}}: one JSON answer, nothing generated
            return [json.dumps(self.describe(), sort_keys=True)]
        rows = self._rows(model_input)
        out: list[str] = []
        with torch.inference_mode():
            # Chunked like tasks.evaluate.predict (eval.batch_size): a request of the test rows in order is
            # decoded in the very batches (and left padding) they were evaluated in.
            for i in range(0, len(rows), self.batch_size):
                out += self._generate(rows[i:i + self.batch_size])
        return out

    def _generate(self, chunk: list[tuple[str | None, str]]) -> list[str]:
        # The same steps as tasks.evaluate.predict._generate_batch; tests/code/test_serving.py proves them equal.
        tok, stops = self.tokenizer, self.stops
        texts = [format_prompt(tok, self.system_prompt if s is None else s, p) for s, p in chunk]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        gen = self.model.generate(**enc, max_new_tokens=self.max_new_tokens, do_sample=False, eos_token_id=stops,
                                  pad_token_id=tok.pad_token_id)
        out = []
        for g in gen[:, enc["input_ids"].shape[1]:].tolist():
            end = next((i for i, t in enumerate(g) if t in stops), None)
            out.append(tok.decode(g if end is None else g[:end], skip_special_tokens=True).strip())
        return out


def _logged_mlmodel(data_path: str) -> dict:
    """The MLmodel of the logged model whose data dir is `data_path` (parsed; {} when none is found)."""
    import yaml

    for d in list(Path(data_path).parents)[:3]:  # data_path is <model dir>/data/model
        if (d / "MLmodel").is_file():
            return yaml.safe_load((d / "MLmodel").read_text()) or {}
    return {}


def registered_digest(meta: dict, data_path: str = "") -> str:
    """The `weights_digest` tag of the registered version(s) of the logged model an MLmodel names (its
    model_id, found among the versions of its run_id), read from the registry at the current tracking URI:
    what a plain `mlflow.pyfunc.load_model` checks against when no digest is given. WeightsRefused when
    there is none, or two that differ."""
    from mlflow.tracking import MlflowClient

    model_id, run_id = str(meta.get("model_id") or ""), str(meta.get("run_id") or "")
    how = ('load it with qlora_ops.tasks.serving.load_version(name, version) or give the version\'s digest: '
           'mlflow.pyfunc.load_model(uri, model_config={"weights_digest": ...})')
    if not model_id or not run_id:
        raise WeightsRefused(f"{data_path}: its MLmodel names no model_id/run_id, so no registered version can be "
                             f"found to check the bytes against; {how}")
    try:
        found = MlflowClient().search_model_versions(f"run_id = '{run_id}'")
    except Exception as e:  # no registry at this tracking URI, no access...
        raise WeightsRefused(f"{data_path}: the registry could not be read to check the bytes against the "
                             f"version's {DIGEST_TAG} ({type(e).__name__}: {str(e)[:200]}); {how}") from None
    digests = {(mv.tags or {}).get(DIGEST_TAG) for mv in found
               if getattr(mv, "model_id", None) == model_id or str(mv.source or "").endswith(model_id)}
    if not digests or None in digests or "" in digests:
        raise WeightsRefused(f"{data_path}: no registered version of logged model {model_id} with a {DIGEST_TAG} "
                             f"tag at this tracking URI; nothing trustworthy to check the bytes against (a digest "
                             f"that came with the bytes proves nothing); {how}")
    if len(digests) > 1:
        raise WeightsRefused(f"{data_path}: the versions of logged model {model_id} disagree on {DIGEST_TAG}; "
                             "refusing to load")
    return digests.pop()


def _load_pyfunc(data_path: str, model_config: dict | None = None) -> MergedCausalLM:
    """MLflow's loader entry point (pyfunc `loader_module` protocol). Every expected digest given must
    match: the env var (the operator's, e.g. `qlora-ops serve`) and a weights_digest given at load time
    (`load_model(uri, model_config={"weights_digest": ...})`). The digest logged in MLmodel itself came
    with the bytes and counts for nothing: given none, the registry at the current tracking URI is
    asked for the registered version's `weights_digest` tag (registered_digest), and no version, no load."""
    cfg = model_config or {}
    meta = _logged_mlmodel(data_path)
    logged = ((meta.get("flavors") or {}).get("python_function") or {}).get("config") or {}  # MLmodel's model_config
    given = cfg.get("weights_digest")
    if given and given == logged.get("weights_digest"):
        given = None  # the MLmodel's own value (or one equal to it): not an expectation from outside
    expected = {d for d in (given, os.environ.get(DIGEST_ENV)) if d}
    if len(expected) > 1:
        raise WeightsRefused(f"{data_path}: two different expected weights digests ({DIGEST_ENV} and the model "
                             "config's weights_digest); refusing to load")
    digest = expected.pop() if expected else registered_digest(meta, data_path)
    return MergedCausalLM(Path(data_path), digest, cfg.get("dtype") or os.environ.get(DTYPE_ENV) or None)
