"""GGUF export: written with the `gguf` package, read back with gguf's reader and transformers' GGUF
loader (tensors, tokenizer, chat template), the LoRA adapter applied by llama.cpp, and the CLI on a
registered version (files and parity on its run, tags on the version).

The llama.cpp parts need llama-cpp-python (the `gguf` extra; it builds llama.cpp from source). Without
it they are SKIPPED WITH A REASON, unless QLORA_OPS_REQUIRE_LLAMA_CPP=1 (set it where the extra is
installed, so that a missing build fails instead):
    pip install -e '.[gguf]' && QLORA_OPS_REQUIRE_LLAMA_CPP=1 pytest -q tests/code/test_gguf.py
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from tests.code.serving_helpers import Served, qlora_ops, register_evaluated, use_tracking, write_params


@pytest.fixture
def tracking(mlflow_server, prefect_api, monkeypatch):
    restore = use_tracking(mlflow_server, monkeypatch, prefect_api)
    yield mlflow_server
    restore()


def need_llama_cpp():
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        if os.environ.get("QLORA_OPS_REQUIRE_LLAMA_CPP") == "1":
            pytest.fail("QLORA_OPS_REQUIRE_LLAMA_CPP=1 but llama-cpp-python is not installed")
        pytest.skip("llama-cpp-python not installed: pip install -e '.[gguf]' (builds llama.cpp from source, "
                    "see docs/serving.md for the measured time); QLORA_OPS_REQUIRE_LLAMA_CPP=1 makes this a failure")


@pytest.fixture(scope="module")
def written(merged_model_dir, tmp_path_factory):
    from qlora_ops.tasks.serving.gguf import write_model

    d = tmp_path_factory.mktemp("gguf")
    return {k: write_model(merged_model_dir, d / f"model-{k}.gguf", k, "tiny") for k in ("f16", "q8_0")}


def test_written_gguf_reads_back_as_the_same_model(written, merged_model_dir):
    """gguf's reader sees llama metadata, the vocabulary with llama.cpp's pre-tokenizer name and the chat
    template; transformers' GGUF loader rebuilds the same weights (q/k permutation undone) and tokenizer."""
    import gguf
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlora_ops.tasks.serving.gguf import permute_qk

    ref_tok = AutoTokenizer.from_pretrained(merged_model_dir)
    ref = AutoModelForCausalLM.from_pretrained(merged_model_dir, dtype=torch.float32).state_dict()
    for kind, path in written.items():
        r = gguf.GGUFReader(path)
        f = {k: v.contents() for k, v in r.fields.items() if not k.startswith("tokenizer.ggml.") or
             k in ("tokenizer.ggml.pre", "tokenizer.ggml.model", "tokenizer.ggml.eos_token_id")}
        assert f["general.architecture"] == "llama" and f["llama.block_count"] == 2
        assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "smollm"  # llama.cpp's name
        assert f["tokenizer.chat_template"] == ref_tok.chat_template
        assert f["tokenizer.ggml.eos_token_id"] == ref_tok.eos_token_id
        types = {t.name: t.tensor_type.name for t in r.tensors}
        assert types["blk.0.attn_norm.weight"] == "F32"
        assert types["blk.0.attn_q.weight"] == {"f16": "F16", "q8_0": "Q8_0"}[kind]
        assert "output.weight" in types  # the untied head

        if kind == "q8_0":  # its blocks dequantized by gguf itself, against the (permuted) source weights
            q = next(t for t in r.tensors if t.name == "blk.1.attn_k.weight")
            got = gguf.quants.dequantize(q.data, q.tensor_type)
            want = permute_qk(ref["model.layers.1.self_attn.k_proj.weight"].numpy(), 2)
            assert np.abs(got - want).max() < 0.01 * np.abs(want).max()
            continue
        # f16: transformers' own GGUF loader (it undoes the q/k permutation) gives back every weight and the tokenizer
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).state_dict()
        assert set(model) == set(ref)
        for k, w in ref.items():
            err = (model[k] - w).abs().max().item() / max(w.abs().max().item(), 1e-6)
            assert err < 2e-3, (kind, k, err)  # relative to the tensor's largest value: f16 rounding
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        text = "<|im_start|>system\nAnswer.<|im_end|>\n<|im_start|>user\nItem 3: wörld 1234\t ok?<|im_end|>"
        assert tok(text, add_special_tokens=False).input_ids == ref_tok(text, add_special_tokens=False).input_ids


@pytest.fixture(scope="module")
def adapter_dir(merged_model_dir, tmp_path_factory):
    """A LoRA adapter on the tiny model with non-zero B (PEFT inits B to 0, which would prove nothing)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(merged_model_dir, dtype=torch.float32)
    m = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                        init_lora_weights=False, task_type="CAUSAL_LM"))
    out = tmp_path_factory.mktemp("adapter") / "qlora"
    m.save_pretrained(out)
    return out


def test_adapter_gguf_holds_the_lora_tensors(adapter_dir, merged_model_dir, tmp_path):
    import gguf
    from safetensors.torch import load_file

    from qlora_ops.tasks.serving.gguf import permute_qk, write_adapter

    cfg = json.loads((merged_model_dir / "config.json").read_text())
    path = write_adapter(adapter_dir, cfg, tmp_path / "adapter.gguf", "tiny adapter")
    r = gguf.GGUFReader(path)
    assert r.fields["general.type"].contents() == "adapter" and r.fields["adapter.type"].contents() == "lora"
    assert r.fields["adapter.lora.alpha"].contents() == pytest.approx(8.0)
    got = {t.name: np.array(t.data) for t in r.tensors}
    assert len(got) == 2 * 4 * 2  # A and B of 4 modules in 2 layers
    src = load_file(str(adapter_dir / "adapter_model.safetensors"))
    pre = "base_model.model.model.layers.1.self_attn"
    np.testing.assert_array_equal(got["blk.1.attn_v.weight.lora_a"], src[f"{pre}.v_proj.lora_A.weight"].numpy())
    np.testing.assert_array_equal(got["blk.1.attn_k.weight.lora_b"],
                                  permute_qk(src[f"{pre}.k_proj.lora_B.weight"].numpy(), cfg["num_key_value_heads"]))


def test_llama_cpp_applies_the_adapter_as_the_merge_does(adapter_dir, merged_model_dir, tmp_path):
    """llama.cpp running base + the GGUF adapter gives the logits of llama.cpp running the model merged by
    PEFT: the adapter's names, permutation and scale are what llama.cpp expects."""
    need_llama_cpp()
    import torch
    from llama_cpp import Llama
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlora_ops.tasks.serving.gguf import write_adapter, write_model
    from qlora_ops.tasks.core.util import atomic_dir

    merged = tmp_path / "merged"
    base = AutoModelForCausalLM.from_pretrained(merged_model_dir, dtype=torch.float32)
    with atomic_dir(merged) as tmp:
        PeftModel.from_pretrained(base, adapter_dir).merge_and_unload().save_pretrained(tmp)
        AutoTokenizer.from_pretrained(merged_model_dir).save_pretrained(tmp)
    cfg = json.loads((merged_model_dir / "config.json").read_text())
    base_gguf = write_model(merged_model_dir, tmp_path / "base.gguf", "f16", "base")
    merged_gguf = write_model(merged, tmp_path / "merged.gguf", "f16", "merged")
    lora = write_adapter(adapter_dir, cfg, tmp_path / "lora.gguf", "lora")

    def logits(**kw):
        llm = Llama(n_ctx=256, seed=0, verbose=False, logits_all=True, **kw)
        llm.eval(llm.tokenize(b"<|im_start|>user\nItem 3: about json. Label?<|im_end|>", add_bos=False, special=True))
        out = np.array(llm.scores[:llm.n_tokens])
        llm.close()
        return out

    with_adapter, merged_logits = logits(model_path=str(base_gguf), lora_path=str(lora)), logits(model_path=str(merged_gguf))
    without = logits(model_path=str(base_gguf))
    scale = np.abs(merged_logits).max()
    assert np.abs(without - merged_logits).max() > 0.05 * scale  # the adapter changes the model
    assert np.abs(with_adapter - merged_logits).max() < 0.02 * scale


def test_export_gguf_then_serve_it_openai_and_verify(tracking, merged_model_dir, evaluated_merged, adapter_dir, tmp_path):
    """`qlora-ops export-gguf --version N`: f16, q8_0 and the adapter on the version's run under gguf/,
    tags pointing at them with their digests, llama.cpp's agreement with the evaluated answers. Then
    `serve --openai` serves that f16 GGUF at /v1/chat/completions (llama-cpp-python's server) and
    `verify-serving` checks it: it answers exactly as the export's parity run did, its differences from
    the evaluated answers counted and named."""
    need_llama_cpp()
    from mlflow.tracking import MlflowClient

    from qlora_ops.tasks.core.util import sha256_file

    name, v = register_evaluated(merged_model_dir, evaluated_merged, tmp_path)
    c = MlflowClient()
    run_id = c.get_model_version(name, str(v)).tags["mlflow_run_id"]
    c.log_artifacts(run_id, str(adapter_dir), "adapters/qlora")
    c.set_model_version_tag(name, str(v), "adapter_uri", f"runs:/{run_id}/adapters/qlora")
    rel = write_params(tmp_path, tracking, name, merged_model_dir)
    r = qlora_ops(tmp_path, "export-gguf", "--version", str(v), "--params", rel, "--out", str(tmp_path / "out"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "llama.cpp f16: agreement with the evaluated merged model" in r.stdout, r.stdout
    t = c.get_model_version(name, str(v)).tags
    assert t["gguf_f16"] == f"runs:/{run_id}/gguf/model-f16.gguf" and t["gguf_adapter"].endswith("adapter-f32.gguf")
    digests = dict(x.split("=") for x in t["gguf_digests"].split())
    assert digests["model-q8_0.gguf"] == sha256_file(tmp_path / "out" / "model-q8_0.gguf")
    assert set(dict(x.split("=") for x in t["gguf_agreement"].split())) == {"f16", "q8_0"}
    export = json.loads(Path(c.download_artifacts(run_id, "gguf/export.json", str(tmp_path))).read_text())
    p = export["parity"]["f16"]
    assert p["n"] == 16 and p["prompt_tokens_equal"] == 16  # llama.cpp tokenizes the prompts as transformers does
    assert 0 <= p["agreement"] <= 1 and p["ci_low"] <= p["agreement"] <= p["ci_high"]
    assert {a.path for a in c.list_artifacts(run_id, "gguf")} >= {"gguf/model-f16.gguf", "gguf/model-q8_0.gguf",
                                                                  "gguf/adapter-f32.gguf", "gguf/export.json"}

    with Served(tmp_path, "--params", rel, "--version", str(v), "--openai", ready="/v1/models") as s:
        r = qlora_ops(tmp_path, "verify-serving", s.url, "--version", str(v), "--params", rel)
    assert r.returncode in (0, 1), r.stdout[-3000:] + r.stderr[-3000:]
    served = json.loads(Path(c.download_artifacts(run_id, "serving/parity.json", str(tmp_path / "p"))).read_text())
    assert served["endpoint"]["api"] == "openai" and served["n"] == 16
    assert served["differ"] == p["differ"]  # the endpoint is llama.cpp on the exported f16: the same answers
    assert (r.returncode == 0) == (served["share"] <= 0.02)
    if served["differ"]:
        assert "OpenAI-compatible endpoint" in r.stdout


def _register_with_adapter(merged_model_dir, adapter_dir, tmp_path) -> tuple[str, int, str]:
    """A version as the flow registers it (weights_digest), its QLoRA adapter (with its manifest) on the
    run and `adapter_uri`, no evaluation (the export below runs without parity). (name, version, run id)."""
    import shutil
    import uuid

    from mlflow.tracking import MlflowClient

    from qlora_ops.tasks.core.util import write_manifest
    from qlora_ops.tasks.registry.register import log_merged_model, register_and_promote

    name = f"gguf-check-{uuid.uuid4().hex[:8]}"
    c = MlflowClient()
    run_id = c.create_run(c.create_experiment(f"exp-{name}")).info.run_id
    uri = log_merged_model(merged_model_dir, {"system_prompt": "s", "max_new_tokens": 8, "batch_size": 8}, run_id=run_id)
    adapter = tmp_path / "adapter-src"
    shutil.copytree(adapter_dir, adapter)
    write_manifest(adapter)  # as the training stage leaves it
    c.log_artifacts(run_id, str(adapter), "adapters/qlora")
    c.set_terminated(run_id)
    v = register_and_promote(model_uri=uri, model_name=name, alias="champion", challenger_alias=None,
                             tags={"mlflow_run_id": run_id, "adapter_uri": f"runs:/{run_id}/adapters/qlora"},
                             decide=lambda v: (True, "test"), lock_path=tmp_path / "registry.lock")["version"]
    return name, v, str(adapter)


def test_export_gguf_checks_the_adapter_and_refuses_unverified_versions(tracking, merged_model_dir, adapter_dir,
                                                                         tmp_path, tmp_path_factory):
    """export-gguf converted the adapter without any check, and download_hf_model checked nothing for a
    version with neither a digest tag nor a manifest. Now: the adapter must match the version's
    adapter_digest, a version without digests is refused unless --allow-unverified-legacy, which the
    output and a tag name."""
    from mlflow.tracking import MlflowClient

    from qlora_ops.tasks.model.keys import content_hash
    from qlora_ops.tasks.registry.register import PromotionError, download_hf_model
    from qlora_ops.tasks.serving.gguf import UNVERIFIED_TAG, explain, export_version
    from qlora_ops.tasks.serving.server import ServingError

    name, v, adapter = _register_with_adapter(merged_model_dir, adapter_dir, tmp_path)
    c = MlflowClient()
    work = tmp_path / "work"
    with pytest.raises(ServingError, match="no adapter_digest tag"):  # no digest to check the adapter against
        export_version(name, v, work, run_parity=False)
    c.set_model_version_tag(name, str(v), "adapter_digest", "0" * 64)  # not this adapter's
    for allow in (False, True):  # a digest that does not match is refused, whatever the option
        with pytest.raises(ServingError, match="not the registered adapter_digest"):
            export_version(name, v, work, run_parity=False, allow_unverified_legacy=allow)
    c.set_model_version_tag(name, str(v), "adapter_digest", content_hash(Path(adapter)))
    res = export_version(name, v, work, run_parity=False)
    assert {f["kind"] for f in res["files"]} == {"f16", "q8_0", "adapter"} and not res["unverified"]
    assert "UNVERIFIED" not in explain(res)

    # A legacy version: no weights_digest, no adapter_digest.
    c.delete_model_version_tag(name, str(v), "weights_digest")
    c.delete_model_version_tag(name, str(v), "adapter_digest")
    with pytest.raises(ServingError, match="allow-unverified-legacy"):
        export_version(name, v, work, run_parity=False)
    res = export_version(name, v, work, run_parity=False, allow_unverified_legacy=True)
    assert "UNVERIFIED LEGACY EXPORT" in explain(res) and "weights" in explain(res) and "adapter" in explain(res)
    assert "weights" in c.get_model_version(name, str(v)).tags[UNVERIFIED_TAG]

    # Neither a digest tag nor a manifest: download_hf_model has nothing to check and refuses.
    run_id = c.get_model_version(name, str(v)).tags["mlflow_run_id"]
    model_id = c.get_model_version(name, str(v)).source.split("/")[-1]
    stored = list({d.resolve() for d in Path(tmp_path_factory.getbasetemp()).glob(
        f"mlflow-server*/artifacts/**/{model_id}/artifacts/data/model")})
    assert len(stored) == 1, (stored, run_id)
    (stored[0] / "qlora_ops_manifest.json").unlink()
    with pytest.raises(PromotionError, match="neither a weights_digest tag nor a"):
        download_hf_model(name, v, tmp_path / "dl")
    assert (download_hf_model(name, v, tmp_path / "dl2", allow_unverified=True) / "config.json").is_file()
