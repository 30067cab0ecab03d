"""The whole flow on a tiny random Llama, in a temp git + DVC repo, against a real MLflow server.

Real parts: `dvc repro` on a fresh git repo, the Prefect flow engine, an `mlflow server` on
127.0.0.1, real bitsandbytes 4-bit layers. The tiny model cannot learn the stdlib task, so the
"passing" params here use lax gates: this file proves the wiring and the registry's behaviour;
the gain on real weights is shown by the default run and tests/model/test_smollm2.py.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml

from tests.conftest import make_workspace, start_prefect_server

pytestmark = pytest.mark.slow

def write_params(ws: Path, name: str, model_dir: Path, tracking_uri: str, model_name: str, **over) -> str:
    p = {
        "model": {"source": str(model_dir), "max_seq_len": 96},
        "data": {"prepared": f"data/prepared/{name}"},
        "training": {"max_steps": 4, "batch_size": 8, "eval_every": 2, "save_every": 2, "threads": 1, "warmup_steps": 1},
        "eval": {"batch_size": 32, "max_new_tokens": 4, "max_examples": 24},
        "gates": {"min_gain_over_base": -1.0, "min_retention_vs_lora": 0.0, "max_merge_disagreement": 1.0},
        "registry": {"tracking_uri": tracking_uri, "experiment": f"exp-{model_name}", "model_name": model_name},
    }
    for k, v in over.items():
        p[k] = {**p.get(k, {}), **v}
    rel = f"params/{name}.yaml"
    (ws / rel).write_text(yaml.safe_dump(p))
    return rel


def cli(ws: Path, params_rel: str, server) -> subprocess.CompletedProcess:
    env = server.client_env(PYTHONPATH=str(ws))
    return subprocess.run([sys.executable, "-m", "qlora_ops.flows.cli", "run", "--params", params_rel, "--workspace", str(ws)],
                          cwd=ws, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("ws") / "repo")


@pytest.fixture(scope="module")
def prefect(tmp_path_factory):
    """A real `prefect server`: in-process flows and CLI subprocesses report to it."""
    with start_prefect_server(tmp_path_factory.mktemp("prefect") / "home") as server:
        with server.settings():
            yield server


@pytest.fixture(autouse=True)
def _restore_mlflow_env(monkeypatch):
    # mlflow.set_tracking_uri (called by the flow) also writes MLFLOW_TRACKING_URI into os.environ
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")


def flow_runs(server) -> list[dict]:
    """All flow runs, oldest first (the API's default order is by id: random for UUIDs)."""
    req = urllib.request.Request(f"{server.api}/flow_runs/filter", data=b'{"sort": "EXPECTED_START_TIME_ASC"}', method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def stage_result(server: str, run_id: str) -> dict:
    """The model stage's model_stage.json of a run, read back from its artifacts."""
    from mlflow.tracking import MlflowClient

    with tempfile.TemporaryDirectory() as d:
        return json.loads(Path(MlflowClient(server).download_artifacts(run_id, "model_stage.json", d)).read_text())


def test_flow_twice_registers_and_keeps_one_champion(ws, tiny_model_dir, mlflow_server, prefect, monkeypatch):
    from mlflow.tracking import MlflowClient

    from qlora_ops.flows.retrain import retrain

    # As a user's run does it: every model stage in a child process that returns (the other tests run them in
    # this process for speed: tests/conftest.py)
    monkeypatch.setenv("QLORA_STAGES_IN_PROCESS", "0")

    name = f"tiny-{uuid.uuid4().hex[:6]}"
    rel = write_params(ws, "tiny", tiny_model_dir, mlflow_server, name)
    s1 = retrain(params_path=rel, workspace=str(ws))
    assert s1["passed"] and set(s1["models"]) == {"base", "lora", "qlora", "merged"}
    r1 = s1["registry"]
    assert r1["version"] == 1 and r1["promoted"] and r1["champion_version"] == 1
    # peak memory per stage, each from its own start; each training in its own process (its own peak)
    peaks = s1["stage_peak_mb"]
    assert {"prepare", "model_stage", "register", "ms.train_qlora", "ms.train_lora", "ms.eval_base", "ms.eval_qlora",
            "ms.merge", "ms.eval_merged"} <= set(peaks) and all(v > 0 for v in peaks.values()), peaks
    from qlora_ops.flows.retrain import format_summary
    text = format_summary(s1).splitlines()
    at = next(i for i, ln in enumerate(text) if ln.startswith("stage seconds: "))
    assert text[at + 1].startswith("stage peak MiB: prepare ") and "ms.train_lora " in text[at + 1]

    # data version comes from dvc.lock of the params file's own stage
    lock = yaml.safe_load((ws / "dvc.lock").read_text())["stages"]
    assert "prepare-tiny" in lock and "sample" in lock
    assert s1["data"]["outs"] == {o["path"]: o["md5"] for o in lock["prepare-tiny"]["outs"]}
    assert "prepare-tiny" in yaml.safe_load((ws / "dvc.yaml").read_text())["stages"]

    # Nothing new (same data, params, code, base): ends in seconds as Skipped, trains and registers nothing.
    import time
    t = time.time()
    st = retrain(params_path=rel, workspace=str(ws), return_state=True)
    assert st.is_completed() and st.name == "Skipped", (st.name, st.message)
    assert "nothing new" in st.message and f"{name} v1" in st.message
    assert time.time() - t < 60

    s2 = retrain(params_path=rel, workspace=str(ws), force=True)  # --force retrains and re-evaluates anyway
    r2 = s2["registry"]
    assert r2["version"] == 2 and r2["previous_champion_version"] == 1
    assert not r2["promoted"] and r2["champion_version"] == 1  # equal accuracy does not beat the champion
    # Really retrained and re-evaluated, into new dirs: no model's scores come from a cache, both adapters
    # were trained again (fresh result.json, other run dir), and the champion was re-scored, not read back.
    assert not any(m.get("cached") for m in s2["models"].values()), s2["models"]
    ms1, ms2 = (stage_result(mlflow_server, s["mlflow_run_id"]) for s in (s1, s2))
    assert ms2["forced"] and ms2["train_key"] != ms1["train_key"]
    assert {"ms.train_qlora", "ms.train_lora", "ms.eval_base", "ms.eval_qlora"} <= set(s2["stage_seconds"])
    assert "re-evaluated" in ms2["champion"]["how"]
    # Deterministic CPU training: the new adapter has the same bytes; "new" is the work, not the weights.
    assert ms2["adapter_digests"] == ms1["adapter_digests"]

    runs = flow_runs(prefect)  # both runs were orchestrated by the real Prefect server
    assert sum(r["state_type"] == "COMPLETED" for r in runs) >= 3
    assert any(r["state_name"] == "Skipped" for r in runs)

    c = MlflowClient(mlflow_server)
    versions = c.search_model_versions(f"name='{name}'")
    assert sorted(int(v.version) for v in versions) == [1, 2]
    assert c.get_model_version_by_alias(name, "champion").version == "1"
    v1 = c.get_model_version(name, "1")
    assert v1.tags["data_version"] == s1["data"]["version"] and v1.tags["mlflow_run_id"] == s1["mlflow_run_id"]
    # Registered from the registrar's own copy in the registry experiment (no training login writes there),
    # pinned by the digests it computed (docs/deploy.md, "Least privilege in MLflow for the weights").
    copy = c.get_logged_model(v1.source.split("/")[-1])
    assert c.get_experiment(copy.experiment_id).name.endswith("-registry") and copy.model_id != v1.tags["trained_model_id"]
    assert len(v1.tags["weights_digest"]) == len(v1.tags["mlmodel_digest"]) == 64
    run = c.get_run(s1["mlflow_run_id"])
    for m in ("base", "lora", "qlora", "merged"):
        assert f"{m}.accuracy" in run.data.metrics
    assert run.data.tags["qlora_ops.data_version"] == s1["data"]["version"]
    assert run.data.params["training.max_steps"] == "4"
    children = c.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'")
    assert sorted(r.info.run_name for r in children) == ["train-lora", "train-qlora"]
    for child in children:
        assert len(c.get_metric_history(child.info.run_id, "train_loss")) == 4
        assert len(c.get_metric_history(child.info.run_id, "val_loss")) == 2
        assert child.data.metrics["peak_mem_bytes"] > 0 and child.data.metrics["weight_bytes"] > 0
    q = next(r for r in children if r.info.run_name == "train-qlora").data.metrics["weight_bytes"]
    l = next(r for r in children if r.info.run_name == "train-lora").data.metrics["weight_bytes"]
    assert q < l  # the 4-bit base is smaller

    # the champion reloads in a fresh process through the registry and answers
    code = ("import mlflow; m = mlflow.pyfunc.load_model('models:/%s@champion'); out = m.predict(['Which module?']);"
            "print(type(out).__name__, len(out), type(out[0]).__name__)" % name)
    r = subprocess.run([sys.executable, "-c", code], env={**os.environ, "MLFLOW_TRACKING_URI": mlflow_server},
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == "list 1 str"


def test_failing_gate_registers_nothing(ws, tiny_model_dir, mlflow_server, prefect):
    from mlflow.tracking import MlflowClient

    name = f"strict-{uuid.uuid4().hex[:6]}"
    rel = write_params(ws, "strict", tiny_model_dir, mlflow_server, name, gates={"min_gain_over_base": 0.5})
    r = cli(ws, rel, prefect)
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout + r.stderr  # the summary is printed inside the flow: Prefect routes it to its log stream
    assert "gain_over_base" in out and "FAIL" in out and "nothing registered" in out
    assert "report: " in out and "report.html" in out  # a rejected run gets its report too
    assert MlflowClient(mlflow_server).search_model_versions(f"name='{name}'") == []
    # A refusal is a failed run named for what happened, with the gate table as its message.
    rejected = [r for r in flow_runs(prefect) if r["state_name"] == "Rejected"]
    assert rejected and rejected[-1]["state_type"] == "FAILED"
    assert "gain_over_base" in rejected[-1]["state"]["message"] and "FAIL" in rejected[-1]["state"]["message"]


def test_bad_data_fails_before_training_naming_file_and_line(ws, tiny_model_dir, mlflow_server, prefect):
    raw = ws / "data" / "raw" / "mine.jsonl"
    raw.parent.mkdir(parents=True, exist_ok=True)
    good = json.dumps({"instruction": "Label?", "input": "x", "output": "a"})
    raw.write_text(good + "\n" + '{"instruction": "Label?", "input": "y"}\n')
    rel = write_params(ws, "badd", tiny_model_dir, mlflow_server, "badd", data={"raw": "data/raw/mine.jsonl"})
    r = cli(ws, rel, prefect)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert "data/raw/mine.jsonl:2" in r.stderr and "output" in r.stderr
    assert "[qlora]" not in r.stdout + r.stderr  # no training started


def test_a_reference_the_metric_cannot_score_fails_before_training(ws, tiny_model_dir, mlflow_server, prefect):
    """`check` refused a non-JSON reference under json_match; `run` trained first and failed at scoring."""
    raw = ws / "data" / "raw" / "extract.jsonl"
    raw.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"instruction": "Extract.", "input": f"id {i}", "output": json.dumps({"id": i})} for i in range(30)]
    raw.write_text("".join(json.dumps(r) + "\n" for r in rows + [{"instruction": "Extract.", "input": "?", "output": "n/a"}]))
    rel = write_params(ws, "badj", tiny_model_dir, mlflow_server, "badj",
                       data={"raw": "data/raw/extract.jsonl", "labels": None}, eval={"metric": "json_match"})
    r = cli(ws, rel, prefect)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert "are not JSON" in r.stderr and "'n/a'" in r.stderr
    assert "[qlora]" not in r.stdout + r.stderr  # no training started


def test_a_test_set_too_small_for_the_gates_is_refused_before_training(ws, tiny_model_dir, mlflow_server, prefect):
    """Issue 26: 3 test rows cannot pass a gain gate (an exact test's smallest p is 2/2^3): refused, exit 2,
    naming the rows needed, instead of a note and a training that could never be registered."""
    rel = write_params(ws, "tiny-n", tiny_model_dir, mlflow_server, "tiny-n", eval={"max_examples": 3},
                       gates={"min_gain_over_base": 0.2})
    r = cli(ws, rel, prefect)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert "test set too small" in r.stderr and "fewer than 6" in r.stderr and "gates.min_gain_over_base" in r.stderr
    assert "[qlora]" not in r.stdout + r.stderr  # no training started


def test_unknown_param_key_fails_naming_it(ws, tiny_model_dir, mlflow_server, prefect):
    (ws / "params" / "typo.yaml").write_text("training:\n  max_step: 3\n")
    r = cli(ws, "params/typo.yaml", prefect)
    assert r.returncode == 2 and "training.max_step: unknown key" in r.stderr, r.stderr[-2000:]


def test_divergence_stops_before_evaluation(ws, tiny_model_dir, mlflow_server, prefect):
    from mlflow.tracking import MlflowClient

    name = f"nan-{uuid.uuid4().hex[:6]}"
    rel = write_params(ws, "nan", tiny_model_dir, mlflow_server, name,
                       training={"lr": 1e30, "max_grad_norm": 1e12, "warmup_steps": 0, "max_steps": 30})
    r = cli(ws, rel, prefect)
    assert r.returncode == 3, r.stdout[-3000:] + r.stderr[-3000:]
    assert "diverged" in r.stderr and "evaluate-base" not in r.stdout + r.stderr
    assert MlflowClient(mlflow_server).search_model_versions(f"name='{name}'") == []


def test_dead_tracking_server_exits_4_in_seconds_naming_it(ws, tiny_model_dir, prefect):
    import time

    from tests.conftest import free_port

    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    rel = write_params(ws, "dead", tiny_model_dir, dead, "dead")
    t = time.time()
    r = cli(ws, rel, prefect)
    assert r.returncode == 4, r.stdout[-2000:] + r.stderr[-2000:]
    assert time.time() - t < 20
    assert f"MLflow tracking server at {dead}" in r.stderr and "Traceback" not in r.stderr


def test_experiment_with_worker_local_artifacts_is_refused_on_a_server(mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    from qlora_ops.tasks.registry import tracking
    from qlora_ops.tasks.core.config import ParamsError

    name = f"local-{uuid.uuid4().hex[:6]}"
    MlflowClient(mlflow_server).create_experiment(name, artifact_location=(tmp_path / "a").as_uri())
    import mlflow
    prev = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(mlflow_server)
    try:
        with pytest.raises(ParamsError, match="only one machine has"):
            tracking.ensure_experiment(name, None, remote=True)
        fresh = tracking.ensure_experiment(f"{name}-new", (tmp_path / "b").as_uri(), remote=True)
        loc = MlflowClient(mlflow_server).get_experiment(fresh).artifact_location
        assert loc.startswith("mlflow-artifacts:"), loc  # the server's store, never the worker-local root
    finally:
        mlflow.set_tracking_uri(prev)


def test_worker_local_experiment_is_refused_by_the_cli_with_exit_2(ws, tiny_model_dir, mlflow_server, prefect, tmp_path):
    from mlflow.tracking import MlflowClient

    name = f"strand-{uuid.uuid4().hex[:6]}"
    MlflowClient(mlflow_server).create_experiment(f"exp-{name}", artifact_location=(tmp_path / "a").as_uri())
    r = cli(ws, write_params(ws, name, tiny_model_dir, mlflow_server, name), prefect)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    lines = [l for l in r.stderr.splitlines() if l.startswith("qlora-ops: ")]
    assert len(lines) == 1 and f"registry.experiment='exp-{name}'" in lines[0] and "only one machine has" in lines[0], lines
    assert "Traceback" not in r.stdout + r.stderr
    assert not (ws / f"data/prepared/{name}").exists()  # refused before any work


def test_a_damaged_adapter_is_rebuilt_and_a_changed_one_scored_again(ws, tiny_model_dir, mlflow_server, prefect):
    """The adapter a training returns is checked against its manifest in the flow: a damaged one is rebuilt
    (docs/reliability.md), never scored or merged. And every evaluation is keyed on the content of what it
    scores: an adapter whose bytes changed under the same training inputs (a non-deterministic GPU retrain)
    is scored again, and the merge gate and the registered version carry that adapter, not an older one."""
    from mlflow.tracking import MlflowClient
    from safetensors.torch import load_file, save_file

    from qlora_ops.flows.retrain import retrain
    from qlora_ops.tasks.model.keys import content_hash
    from qlora_ops.tasks.core.util import verify_manifest, write_manifest

    name = f"rebuild-{uuid.uuid4().hex[:6]}"
    own = {"lora": {"r": 4}}  # its own train key: the other tests' adapters are not touched
    s1 = retrain(params_path=write_params(ws, "rebuild", tiny_model_dir, mlflow_server, name, **own), workspace=str(ws))
    ms1 = stage_result(mlflow_server, s1["mlflow_run_id"])
    runs = ws / ".qlora-ops" / "runs"
    lora, qlora = (runs / f"train-{k}-{ms1['train_key']}" / "adapter" for k in ("lora", "qlora"))
    w = lora / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[:-64])  # truncated on disk after the run finished
    sd = load_file(qlora / "adapter_model.safetensors")
    b = next(k for k in sd if "lora_B" in k)
    sd[b] = sd[b] + 0.05  # other valid bytes for the same training inputs
    save_file(sd, qlora / "adapter_model.safetensors", metadata={"format": "pt"})
    write_manifest(qlora)
    changed = content_hash(qlora)
    assert changed != ms1["adapter_digests"]["qlora"]

    # Another gate threshold: a new fingerprint (the run is not skipped), the same train key (adapters reused).
    rel = write_params(ws, "rebuild", tiny_model_dir, mlflow_server, name, **own, gates={"max_merge_disagreement": 0.99})
    s2 = retrain(params_path=rel, workspace=str(ws))
    ms2 = stage_result(mlflow_server, s2["mlflow_run_id"])
    assert s2["outcome"] == "registered" and ms2["train_key"] == ms1["train_key"]
    # the damaged LoRA adapter was rebuilt (from its last sound checkpoint: the same weights, so its scores stand)
    assert "ms.train_lora_rebuild" in s2["stage_seconds"] and verify_manifest(lora) is None
    assert ms2["adapter_digests"]["lora"] == ms1["adapter_digests"]["lora"] and s2["models"]["lora"].get("cached")
    # the changed QLoRA adapter was scored again; the base, unchanged, was not
    assert ms2["adapter_digests"]["qlora"] == changed
    assert not s2["models"]["qlora"].get("cached") and s2["models"]["base"].get("cached")
    c = MlflowClient(mlflow_server)
    with tempfile.TemporaryDirectory() as d:
        ev = json.loads(Path(c.download_artifacts(s2["mlflow_run_id"], "eval/qlora/evaluated.json", d)).read_text())
    assert changed in ev["content"]  # the answers the merge gate compared are this adapter's
    v = c.get_model_version(name, str(s2["registry"]["version"]))
    assert v.tags["adapter_digest"] == changed


def test_a_candidate_that_forgets_a_non_inferior_suite_is_refused_naming_it(ws, smol_tokenizer_dir, mlflow_server,
                                                                           prefect, tmp_path):
    """Issue 16's forgetting guard, on the real flow. The domain task is to answer "json" to every item: the
    tuned models learn it and the random base never says it, so the candidate passes the domain gain gate on a
    real threshold. The suite's references are what the base itself answers to general questions (a random
    Llama with its own output head answers with words), so the base is right on every row; the tuned model,
    which learned to answer the domain's way, is not. It loses more than the margin on that non_inferior
    suite: the run ends Rejected (exit 1), registers nothing, and the refusal names the suite."""
    import torch
    from mlflow.tracking import MlflowClient
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from qlora_ops.tasks.core.config import load_params
    from qlora_ops.tasks.data.prepare import prepared_rows
    from qlora_ops.tasks.evaluate.predict import evaluate_model
    from qlora_ops.tasks.evaluate.suites import data_params, eval_params

    tok = AutoTokenizer.from_pretrained(smol_tokenizer_dir)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=False)  # tied, a random Llama echoes the prompt's last token: "\n"
    torch.manual_seed(0)
    model_dir = tmp_path / "untied-llama"
    LlamaForCausalLM(cfg).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)

    raw = ws / "data" / "raw" / "always-json.jsonl"
    raw.parent.mkdir(parents=True, exist_ok=True)
    raw.write_text("".join(json.dumps({"instruction": "Which label?", "input": f"Item {i} of the catalogue.",
                                       "output": "json"}) + "\n" for i in range(80)))
    general = ws / "data" / "suites" / "general.jsonl"
    general.parent.mkdir(parents=True, exist_ok=True)
    # 80 rows: a 0.1 margin on exact match needs ~77 to be told (issue 26: smaller suites are refused)
    questions = [f"What did you do on day {i} of the trip?" for i in range(80)]
    general.write_text("".join(json.dumps({"prompt": q, "completion": "?"}) + "\n" for q in questions))
    name = f"forget-{uuid.uuid4().hex[:6]}"
    suite = {"name": "general", "path": "data/suites/general.jsonl", "role": "non_inferior", "threshold": 0.1}
    rel = write_params(ws, "forget", model_dir, mlflow_server, name, data={"raw": "data/raw/always-json.jsonl"},
                       training={"max_steps": 60, "lr": 0.03, "eval_every": 30, "save_every": 30},
                       eval={"max_new_tokens": 2, "suites": [suite]},
                       gates={"min_gain_over_base": 0.5, "min_retention_vs_lora": 0.5})
    # The base's own answers, computed exactly as the flow will (same rows, prompts, decoding), become the
    # references: the base scores 1.0 on the suite by construction.
    p = load_params(ws / rel)
    s = p.eval.suites[0]
    draft = tmp_path / "draft.jsonl"
    draft.write_text("".join(json.dumps(r) + "\n" for r in prepared_rows(general, data_params(p, s))))
    evaluate_model(eval_params(p, s), "base", model_dir, draft, tmp_path / "base-eval", metrics=["exact_match"])
    answers = [json.loads(x)["prediction"] for x in (tmp_path / "base-eval" / "predictions.jsonl").read_text().splitlines()]
    assert all(answers), answers  # words, not an empty echo: the construction holds
    general.write_text("".join(json.dumps({"prompt": q, "completion": a}) + "\n" for q, a in zip(questions, answers)))

    r = cli(ws, rel, prefect)
    out = r.stdout + r.stderr
    assert r.returncode == 1, out[-4000:]
    lines = out.splitlines()
    assert any(ln.startswith("gain_over_base") and "PASS" in ln for ln in lines), out[-4000:]  # the domain improved
    assert any(ln.startswith("general:non_inferior") and "FAIL" in ln for ln in lines), out[-4000:]
    assert "suite general: exact_match, non-inferior, margin 0.1" in out and "nothing registered" in out
    c = MlflowClient(mlflow_server)
    assert c.search_model_versions(f"name='{name}'") == []
    rejected = [x for x in flow_runs(prefect) if x["state_name"] == "Rejected"]
    assert "general:non_inferior" in rejected[-1]["state"]["message"]
    run = next(x for x in c.search_runs([c.get_experiment_by_name(f"exp-{name}").experiment_id])
               if "mlflow.parentRunId" not in x.data.tags)  # the flow's run, not a training's
    m = run.data.metrics
    assert m["suite.general.base.exact_match"] == 1.0 and m["suite.general.qlora.exact_match"] < 0.9
    assert m["gate.general.non_inferior.passed"] == 0 and m["gate.gain_over_base.passed"] == 1
    assert run.data.tags["qlora_ops.suite.general"] and run.data.tags["qlora_ops.outcome"] == "rejected"
    with tempfile.TemporaryDirectory() as d:  # the exact rows the suite was judged on travel with the run
        got = Path(c.download_artifacts(run.info.run_id, "data/suites/general.jsonl", d)).read_text()
    assert [json.loads(x)["completion"] for x in got.splitlines()] == answers
