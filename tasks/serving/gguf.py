"""A registered version as GGUF, for people who run models locally (llama.cpp, Ollama, LM Studio).

    qlora-ops export-gguf --version 7        # model-f16.gguf, model-q8_0.gguf, adapter-f32.gguf on v7's run

The merged model is written with the maintained `gguf` package (GGUFWriter, its tensor-name maps, its
Q8_0 quantizer, SpecialVocab for merges, special tokens and the chat template), the way llama.cpp's
convert_hf_to_gguf.py writes a Llama-architecture model: q/k rows permuted to llama.cpp's rotary layout,
1-D tensors in F32, the GPT-2 BPE vocabulary with its token types. What is still written by hand here,
and why: that converter is not a package (it lives in the llama.cpp repository, with a per-architecture
class tree); the ~100 lines below cover the Llama family, which is what qlora-ops trains (SmolLM2), and
are checked by reading the files back (gguf's reader, transformers' GGUF loader) and by running them.

The QLoRA adapter becomes a GGUF LoRA adapter (general.type "adapter", adapter.lora.alpha; tensors
`<base tensor>.lora_a` / `.lora_b`, as convert_lora_to_gguf.py names them) to apply on the base model's
GGUF (llama.cpp --lora). Files go on the version's MLflow run under gguf/ with their sha256; tags on the
version point at them. Parity: llama.cpp (llama-cpp-python, the `gguf` extra) answers the version's test
rows with the same prompts and greedy decoding; its agreement with the evaluated merged model and its
metric go into gguf/parity.json and the version's tags.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from qlora_ops.tasks.core.util import MANIFEST, sha256_file, verify_manifest
from qlora_ops.tasks.model.keys import content_hash
from qlora_ops.tasks.model.prompting import format_prompt, stop_ids
from qlora_ops.tasks.serving.parity import evaluated, metric_scores
from qlora_ops.tasks.serving.server import ServingError, version_tags

ARCHS = {"LlamaForCausalLM": "LLAMA", "MistralForCausalLM": "LLAMA"}  # same tensors, same rotary layout
OUTTYPES = ("f16", "q8_0")


class GGUFExportError(RuntimeError):
    pass


def _arch(cfg: dict):
    import gguf

    archs = cfg.get("architectures") or []
    name = next((ARCHS[a] for a in archs if a in ARCHS), None)
    if name is None:
        raise GGUFExportError(f"architecture {archs}: qlora-ops writes GGUF for {sorted(ARCHS)}; convert this one "
                              "with llama.cpp's convert_hf_to_gguf.py from the merged model dir (download_hf_model)")
    if (cfg.get("rope_scaling") or {}).get("rope_type", "default") not in ("default", None):
        raise GGUFExportError(f"rope_scaling {cfg['rope_scaling']} is not written by qlora-ops' GGUF export; use "
                              "llama.cpp's convert_hf_to_gguf.py")
    return getattr(gguf.MODEL_ARCH, name)


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotate-half q/k row order -> llama.cpp's interleaved pairs (convert_hf_to_gguf LlamaModel.permute;
    `n_head` is the key/value head count for k). Works on a LoRA B too (rows = output features)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensors(model_dir: Path):
    from safetensors import safe_open

    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                yield k, st.get_tensor(k).float().numpy()


def _vocab(model_dir: Path, n_vocab: int) -> tuple[list[str], list[int], str]:
    """(tokens, token types, pre-tokenizer) as convert_hf_to_gguf's get_vocab_base makes them."""
    import gguf
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    reverse = {i: t for t, i in tok.get_vocab().items()}
    added, decoder = tok.get_added_vocab(), tok.added_tokens_decoder
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif reverse[i] in added:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.CONTROL if decoder[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types, _pre_tokenizer(tok)


# llama.cpp names a BPE pre-tokenizer by the sha256 of the token ids its probe text encodes to
# (convert_hf_to_gguf.py get_vocab_base_pre; the text and these entries copied from llama.cpp, MIT).
# Only the vocabularies of Llama-architecture models are listed; any other gets "default" (GPT-2 splits),
# whose cost the llama.cpp parity run shows.
_PROBE = '\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, \'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL'
_PRE = {"855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",      # SmolLM, SmolLM2
        "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",   # Llama 3
        "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
        "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
        "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken"}      # Mistral Nemo


def _pre_tokenizer(tok) -> str:
    import hashlib

    return _PRE.get(hashlib.sha256(str(tok.encode(_PROBE)).encode()).hexdigest(), "default")


def write_model(model_dir: Path, out: Path, outtype: str, name: str) -> Path:
    """The merged HF model dir as one GGUF file (f16 or q8_0; 1-D tensors F32), tokenizer and chat template in."""
    import gguf

    if outtype not in OUTTYPES:
        raise ValueError(f"outtype {outtype!r}: one of {OUTTYPES}")
    model_dir = Path(model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    arch = _arch(cfg)
    n_layer, n_head = cfg["num_hidden_layers"], cfg["num_attention_heads"]
    n_kv = cfg.get("num_key_value_heads") or n_head
    w = gguf.GGUFWriter(str(out), gguf.MODEL_ARCH_NAMES[arch])
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(n_layer)
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_layer_norm_rms_eps(cfg.get("rms_norm_eps", 1e-6))
    w.add_rope_freq_base(float(cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)))
    w.add_rope_dimension_count(cfg.get("head_dim") or cfg["hidden_size"] // n_head)
    w.add_vocab_size(cfg["vocab_size"])
    qtype = {"f16": gguf.GGMLQuantizationType.F16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[outtype]
    w.add_file_type({"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    tokens, types, pre = _vocab(model_dir, cfg["vocab_size"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=len(tokens))  # merges, bos/eos/pad, template
    if not special.chat_template:
        raise GGUFExportError(f"{model_dir}: no chat template in the tokenizer files; the GGUF would prompt differently")
    special.add_to_gguf(w, quiet=True)

    names = gguf.get_tensor_name_map(arch, n_layer)
    for hf_name, data in _tensors(model_dir):
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        new, data = _gguf_tensor(names, hf_name, data, n_head, n_kv, model_dir)
        if data.ndim == 1:
            w.add_tensor(new, data.astype(np.float32))
        elif qtype == gguf.GGMLQuantizationType.Q8_0 and data.shape[-1] % 32 == 0:
            w.add_tensor(new, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:  # Q8_0 needs rows in blocks of 32 (llama.cpp's converter falls back the same way)
            w.add_tensor(new, data.astype(np.float16))
    _write(w)
    return Path(out)


def write_adapter(adapter_dir: Path, base_cfg: dict, out: Path, name: str) -> Path:
    """A PEFT LoRA adapter dir as a GGUF LoRA adapter (F32) for a base of config `base_cfg`."""
    import gguf

    adapter_dir = Path(adapter_dir)
    acfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    if acfg.get("modules_to_save"):
        raise GGUFExportError(f"{adapter_dir}: modules_to_save {acfg['modules_to_save']} are full weights, not LoRA; "
                              "llama.cpp adapters hold only lora_a/lora_b")
    arch = _arch(base_cfg)
    n_layer, n_head = base_cfg["num_hidden_layers"], base_cfg["num_attention_heads"]
    n_kv = base_cfg.get("num_key_value_heads") or n_head
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for k, v in _tensors(adapter_dir):
        part = "a" if ".lora_A." in k else "b" if ".lora_B." in k else None
        if part is None:
            raise GGUFExportError(f"{adapter_dir}: tensor {k} is not a lora_A/lora_B weight")
        base = k.split(".lora_")[0].removeprefix("base_model.model.") + ".weight"
        pairs.setdefault(base, {})[part] = v
    rank = {v["a"].shape[0] for v in pairs.values()}
    if len(rank) != 1:
        raise GGUFExportError(f"{adapter_dir}: ranks {sorted(rank)} differ between modules")
    r = rank.pop()
    # llama.cpp scales by alpha / rank; PEFT by alpha / r, or alpha / sqrt(r) with rsLoRA
    scale = acfg["lora_alpha"] / (r ** 0.5 if acfg.get("use_rslora") else r)
    w = gguf.GGUFWriter(str(out), gguf.MODEL_ARCH_NAMES[arch])
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(scale * r))
    w.add_name(name)
    names = gguf.get_tensor_name_map(arch, n_layer)
    for base, ab in sorted(pairs.items()):
        # B's rows are the projection's output rows: permuted like the weight (A's input side is not)
        new, b = _gguf_tensor(names, base, ab["b"], n_head, n_kv, adapter_dir)
        a = ab["a"]
        w.add_tensor(f"{new}.lora_a", np.ascontiguousarray(a, dtype=np.float32))
        w.add_tensor(f"{new}.lora_b", np.ascontiguousarray(b, dtype=np.float32))
    _write(w)
    return Path(out)


def _gguf_tensor(names, hf_name: str, data, n_head: int, n_kv: int, where: Path):
    """(llama.cpp's name, data in llama.cpp's layout) of an HF tensor: q/k rows permuted for its RoPE."""
    if hf_name.endswith("q_proj.weight"):
        data = permute_qk(data, n_head)
    elif hf_name.endswith("k_proj.weight"):
        data = permute_qk(data, n_kv)
    new = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if new is None:
        raise GGUFExportError(f"{where}: no GGUF name for tensor {hf_name}")
    return new, data


def _write(w) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# ---------------------------------------------------------------- parity: llama.cpp answers the test rows

def llama_answers(gguf_path: Path, model_dir: Path, rows: list[dict], max_new_tokens: int,
                  default_system: str | None = None, threads: int | None = None) -> dict:
    """Greedy answers of llama.cpp (llama-cpp-python) on the GGUF for each row: the prompt rendered by the
    same chat template (tasks.model.prompting), tokenized by llama.cpp itself, decoding stopped on the template's
    turn end. Returns {"answers", "prompt_tokens_equal"} (rows whose llama.cpp tokens equal transformers')."""
    try:
        from llama_cpp import Llama
    except ImportError as e:
        raise GGUFExportError("llama-cpp-python is not installed: pip install 'qlora-ops[gguf]' (it builds "
                              f"llama.cpp from source; {e})") from None
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    stops = set(stop_ids(tok))
    llm = Llama(model_path=str(gguf_path), n_ctx=2048, n_batch=512, n_threads=threads, seed=0, verbose=False)
    answers, same_tokens = [], 0
    for r in rows:
        text = format_prompt(tok, r.get("system") or default_system or "", r["prompt"])
        ids = llm.tokenize(text.encode(), add_bos=False, special=True)
        same_tokens += ids == tok(text, add_special_tokens=False).input_ids
        out: list[int] = []
        llm.reset()
        for t in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
            if t in stops or len(out) >= max_new_tokens:
                break
            out.append(t)
            if len(out) >= max_new_tokens:
                break
        answers.append(tok.decode(out, skip_special_tokens=True).strip())
    llm.close()
    return {"answers": answers, "prompt_tokens_equal": same_tokens}


def parity(gguf_path: Path, model_dir: Path, ev: dict, confidence: float = 0.95) -> dict:
    """Agreement of llama.cpp's answers with the evaluated merged model's, and the metric on them."""
    from qlora_ops.tasks.gates.paired import agreement  # scipy and statsmodels: seconds, only for a parity run

    t0 = time.time()
    got = llama_answers(gguf_path, model_dir, ev["rows"], int(ev["max_new_tokens"]), ev["system_prompt"])
    agr = agreement(ev["answers"], got["answers"], confidence=confidence)
    metric, scores = metric_scores(ev["metric"], got["answers"], ev["references"])
    differ = [i for i, (a, b) in enumerate(zip(ev["answers"], got["answers"])) if a != b]
    return {"n": agr["n"], "differ": agr["differ"], "agreement": 1 - agr["share"], "ci_low": 1 - agr["ci_high"],
            "ci_high": 1 - agr["ci_low"], "metric": metric, "gguf_metric": sum(scores) / len(scores),
            "evaluated_metric": ev["metrics"].get(metric), "prompt_tokens_equal": got["prompt_tokens_equal"],
            "seconds": round(time.time() - t0, 1),
            "examples": [{"id": ev["ids"][i], "evaluated": ev["answers"][i], "gguf": got["answers"][i]}
                         for i in differ[:5]]}


# ---------------------------------------------------------------- a registered version, end to end

UNVERIFIED_TAG = "gguf_unverified"  # on a version exported with --allow-unverified-legacy: what was not checked


def adapter_error(adapter_dir: Path, expected: str | None) -> str | None:
    """Why the downloaded LoRA adapter is not the one the version registered (tag `adapter_digest`: its
    content hash, tasks.model.keys), or None. The manifest that came with the files is checked against
    them first (content_hash reads the manifest's hashes), and a file it does not list is refused."""
    adapter_dir = Path(adapter_dir)
    if not expected:
        return "the version has no adapter_digest tag: nothing to check the adapter's bytes against"
    if (adapter_dir / MANIFEST).is_file():
        if (bad := verify_manifest(adapter_dir)) is not None:
            return bad
        listed = set(json.loads((adapter_dir / MANIFEST).read_text())["files"])
        extra = sorted(str(f.relative_to(adapter_dir)) for f in adapter_dir.rglob("*")
                       if f.is_file() and f.name != MANIFEST and str(f.relative_to(adapter_dir)) not in listed)
        if extra:
            return f"{adapter_dir}: {extra[:3]} not in the manifest"
    if (got := content_hash(adapter_dir)) != expected:
        return (f"{adapter_dir}: content hash {got[:16]}... is not the registered adapter_digest {expected[:16]}...; "
                "the adapter was changed after registration")
    return None


def export_version(model_name: str, version: int, work: Path, *, out: Path | None = None, run_parity: bool = True,
                   confidence: float = 0.95, allow_unverified_legacy: bool = False) -> dict:
    """Write the version's GGUF files (its weights checked against weights_digest first, its adapter against
    adapter_digest), run the llama.cpp parity when llama-cpp-python is installed, log everything on the
    version's run and tag the version. A version without those digests (registered before qlora-ops recorded
    them) is refused unless `allow_unverified_legacy`; then what was not checked is named in the result,
    the output and the tag `gguf_unverified`. A digest that is there and does not match is always refused."""
    import shutil

    import mlflow
    from mlflow.tracking import MlflowClient

    # registry.register imports mlflow at its top: the CLI imports this module for every serving command
    from qlora_ops.tasks.registry.register import WEIGHTS_DIGEST, download_hf_model

    tags = version_tags(model_name, version)
    if not (run_id := tags.get("mlflow_run_id")):
        raise ServingError(f"{model_name} v{version} has no mlflow_run_id tag: nowhere to log its GGUF files")
    unverified: list[str] = []
    if not tags.get(WEIGHTS_DIGEST):
        if not allow_unverified_legacy:
            raise ServingError(f"{model_name} v{version} has no {WEIGHTS_DIGEST} tag (registered before qlora-ops "
                               "recorded digests): its weights cannot be checked; register it again, or export it "
                               "as it is with --allow-unverified-legacy (marked UNVERIFIED)")
        unverified.append(f"weights (no {WEIGHTS_DIGEST} tag)")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    adapter = None
    if tags.get("adapter_uri"):  # checked first: a refused adapter costs no conversion
        adapter = Path(mlflow.artifacts.download_artifacts(tags["adapter_uri"], dst_path=str(work / "adapter")))
        if (why := adapter_error(adapter, tags.get("adapter_digest"))) is not None:
            if tags.get("adapter_digest") or not allow_unverified_legacy:
                raise ServingError(f"{model_name} v{version}: LoRA adapter refused: {why}"
                                   + ("" if tags.get("adapter_digest") else "; --allow-unverified-legacy exports it "
                                      "anyway, marked UNVERIFIED"))
            unverified.append("adapter (no adapter_digest tag)")
    # refused if its bytes are not the registered ones
    model_dir = download_hf_model(model_name, version, work / "hf", allow_unverified=allow_unverified_legacy)
    dst = Path(out) if out else work / "gguf"
    dst.mkdir(parents=True, exist_ok=True)
    name = f"{model_name} v{version}"
    paths = {kind: write_model(model_dir, dst / f"model-{kind}.gguf", kind, name) for kind in OUTTYPES}
    if adapter is not None:
        cfg = json.loads((model_dir / "config.json").read_text())
        paths["adapter"] = write_adapter(adapter, cfg, dst / "adapter-f32.gguf", f"{name} LoRA adapter")
    files = [{"kind": k, "file": p.name, "bytes": p.stat().st_size, "sha256": sha256_file(p)} for k, p in paths.items()]
    res: dict = {"model_name": model_name, "version": int(version), "run_id": run_id, "files": files,
                 "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "parity": {}, "unverified": unverified}
    if run_parity:
        try:
            ev = evaluated(model_name, version, work / "evaluated")
            res["parity"] = {k: parity(paths[k], model_dir, ev, confidence) for k in OUTTYPES}
        except GGUFExportError as e:
            res["parity_skipped"] = str(e)
    c = MlflowClient()
    for p in paths.values():
        c.log_artifact(run_id, str(p), "gguf")
    c.log_text(run_id, json.dumps(res, indent=2, sort_keys=True), "gguf/export.json")
    vtags = {f"gguf_{f['kind']}": f"runs:/{run_id}/gguf/{f['file']}" for f in files}
    vtags["gguf_digests"] = " ".join(f"{f['file']}={f['sha256']}" for f in files)
    if unverified:
        vtags[UNVERIFIED_TAG] = "; ".join(unverified)
    if res["parity"]:
        vtags["gguf_agreement"] = " ".join(f"{k}={p['agreement']:.4f}" for k, p in res["parity"].items())
        vtags["gguf_metric"] = " ".join(f"{k}:{p['metric']}={p['gguf_metric']:.4f}" for k, p in res["parity"].items())
    for k, v in vtags.items():
        c.set_model_version_tag(model_name, str(version), k, v)
    return res


def _f(x) -> str:
    return f"{x:.4f}" if isinstance(x, (int, float)) else "?"


def explain(res: dict) -> str:
    L = [f"GGUF of {res['model_name']} v{res['version']} on run {res['run_id']} under gguf/:"]
    for f in res["files"]:
        L.append(f"  {f['file']}  {f['bytes'] / 2**20:.1f} MiB  sha256 {f['sha256'][:16]}...")
    for kind, p in (res.get("parity") or {}).items():
        L.append(f"  llama.cpp {kind}: agreement with the evaluated merged model {p['agreement']:.4f} "
                 f"[{p['ci_low']:.4f}, {p['ci_high']:.4f}] on {p['n']} rows; {p['metric']} {p['gguf_metric']:.4f} "
                 f"(evaluated {_f(p['evaluated_metric'])}); prompt tokens equal on {p['prompt_tokens_equal']}/{p['n']}")
    if res.get("parity_skipped"):
        L.append(f"  parity not run: {res['parity_skipped']}")
    if res.get("unverified"):
        L.append(f"  UNVERIFIED LEGACY EXPORT (--allow-unverified-legacy): not checked against the registry: "
                 f"{'; '.join(res['unverified'])}")
    return "\n".join(L)
