"""Registry promotion against a REAL `mlflow server` (SQLite backend, proxied artifacts), no mocks.

A tiny random Llama (SmolLM2's real tokenizer + chat template) stands in for the merged model.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SERVING = {"system_prompt": "Answer with the label.", "max_new_tokens": 4, "batch_size": 8}  # as tiny_params evaluates




def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _log_model(model_dir: Path, experiment: str) -> str:
    import mlflow

    from qlora_ops.tasks.registry.register import log_merged_model

    exp_id = mlflow.create_experiment(experiment)
    with mlflow.start_run(experiment_id=exp_id):
        return log_merged_model(model_dir, SERVING)


def _never_called(v: int):
    raise AssertionError(f"decide must not be called (champion v{v})")


def _promote(uri, name, tmp_path, decide=_never_called, **tags):
    from qlora_ops.tasks.registry.register import register_and_promote

    return register_and_promote(model_uri=uri, model_name=name, alias="champion", challenger_alias="challenger",
                                tags={"run": "test", **tags}, decide=decide,
                                lock_path=tmp_path / "locks" / "registry.lock")


def _verdict(promote: bool, seen: list):
    def decide(v: int):
        seen.append(v)
        return promote, f"{'promote' if promote else 'keep champion'}: planted verdict vs v{v}"
    return decide


# ---------------------------------------------------------------- tests

def test_promotion_writes_tags_then_aliases(tracking, merged_model_dir, tmp_path):
    from mlflow.tracking import MlflowClient

    from qlora_ops.tasks.registry.register import champion_info

    name = _unique("reg-rules")
    assert champion_info(name, "champion") is None  # no registered model yet
    uri = _log_model(merged_model_dir, _unique("exp-rules"))
    c = MlflowClient()
    seen: list[int] = []

    r1 = _promote(uri, name, tmp_path)
    assert (r1["version"], r1["promoted"], r1["champion_version"]) == (1, True, 1)
    assert r1["previous_champion_version"] is None and "first champion" in r1["reason"]
    assert (tmp_path / "locks" / "registry.lock").is_file()

    r2 = _promote(uri, name, tmp_path, _verdict(False, seen))  # refused by the policy: registered, alias stays
    assert (r2["version"], r2["promoted"], r2["champion_version"]) == (2, False, 1) and seen == [1]
    assert c.get_model_version_by_alias(name, "challenger").version == "2"  # latest passing candidate

    r3 = _promote(uri, name, tmp_path, _verdict(True, seen))
    assert (r3["version"], r3["promoted"], r3["champion_version"], r3["previous_champion_version"]) == (3, True, 3, 1)
    assert seen == [1, 1]
    assert c.get_model_version_by_alias(name, "challenger").version == "3"

    v2, v3 = c.get_model_version(name, "2").tags, c.get_model_version(name, "3").tags
    assert v2["promoted"] == "false" and v2["status"] == "ready" and v2["run"] == "test"
    assert v2["promotion_reason"] == r2["reason"]
    assert v3["promoted"] == "true" and v3["previous_champion"] == "1" and v3["status"] == "ready"
    assert c.get_model_version(name, "1").tags["replaced_by"] == "3"
    info = champion_info(name, "champion")
    assert info["version"] == 3
    assert champion_info(name, "no-such-alias") is None


def test_retry_of_a_run_reuses_its_version(tracking, merged_model_dir, tmp_path):
    name = _unique("reg-retry")
    uri = _log_model(merged_model_dir, _unique("exp-retry"))
    a = _promote(uri, name, tmp_path, mlflow_run_id="run-1")
    b = _promote(uri, name, tmp_path, mlflow_run_id="run-1")  # a retry after a fault: no second version
    assert a["version"] == b["version"] == 1 and b["promoted"] and "earlier attempt" in b["reason"]


def test_rolled_back_fingerprint_is_never_auto_promoted(tracking, merged_model_dir, tmp_path):
    from mlflow.tracking import MlflowClient

    name = _unique("reg-rollback")
    uri = _log_model(merged_model_dir, _unique("exp-rollback"))
    _promote(uri, name, tmp_path, fingerprint="f-old")
    _promote(uri, name, tmp_path, _verdict(True, []), fingerprint="f-bad")
    MlflowClient().set_model_version_tag(name, "2", "status", "rejected")  # what `qlora-ops rollback` leaves
    r = _promote(uri, name, tmp_path, fingerprint="f-bad")  # same inputs again: decide is never asked
    assert not r["promoted"] and "was rolled back" in r["reason"] and "v2" in r["reason"]


_PREDICT_SCRIPT = textwrap.dedent("""
    import json, sys
    import mlflow.pyfunc
    import pandas as pd
    m = mlflow.pyfunc.load_model(sys.argv[1])
    prompts = json.loads(sys.argv[2])
    out = {"list": m.predict(prompts), "str": m.predict(prompts[0]),
           "df": m.predict(pd.DataFrame({"prompt": prompts[:2]}))}
    print("RESULT " + json.dumps(out))
""")


def test_champion_loads_in_fresh_process_and_answers_exactly_as_evaluated(tracking, merged_model_dir, evaluated_merged,
                                                                          tmp_path):
    """The registered format: a pyfunc whose loader is the installed module tasks.registry.loader (no code or
    pickle in the artifact), the manifest inside, its digest on the version; loaded through the registry
    in a fresh process, the champion gives the very answers the evaluation saved for the same rows."""
    import hashlib

    import mlflow
    import yaml
    from mlflow.tracking import MlflowClient

    from qlora_ops.tasks.registry.register import log_merged_model
    from qlora_ops.tasks.core.util import read_jsonl

    evaluated = read_jsonl(evaluated_merged["eval"] / "predictions.jsonl")  # tasks.evaluate.predict's saved answers
    rows = read_jsonl(evaluated_merged["test"])
    assert len({r["prediction"] for r in evaluated}) > 3  # answers that can differ: the comparison means something

    name = _unique("reg-serve")
    # Log via an explicit run id (no active run), the way the flow's tracking code works.
    client = MlflowClient()
    exp_id = client.create_experiment(_unique("exp-serve"))
    run_id = client.create_run(exp_id).info.run_id
    uri = log_merged_model(merged_model_dir, SERVING, run_id=run_id)
    client.set_terminated(run_id)
    assert mlflow.active_run() is None
    assert uri.startswith("models:/")
    assert _promote(uri, name, tmp_path)["promoted"]

    local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/1", dst_path=str(tmp_path / "art")))
    flavor = yaml.safe_load((local / "MLmodel").read_text())["flavors"]["python_function"]
    assert flavor["loader_module"] == "qlora_ops.tasks.registry.loader" and flavor["data"] == "data/model" and not flavor.get("code")
    assert not [f for f in local.rglob("*") if f.suffix in (".py", ".pkl")]  # nothing to execute travels
    assert "qlora-ops==" in (local / "requirements.txt").read_text()  # a managed env installs the loader
    digest = hashlib.sha256((local / "data" / "model" / "qlora_ops_manifest.json").read_bytes()).hexdigest()
    assert client.get_model_version(name, "1").tags["weights_digest"] == digest

    prompts = [r["prompt"] for r in rows]
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-c", _PREDICT_SCRIPT, f"models:/{name}@champion", json.dumps(prompts)],
                       env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]
    out = json.loads([ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")][-1][len("RESULT "):])
    assert out["list"] == [r["prediction"] for r in evaluated]  # exactly as evaluated, row by row
    assert out["str"] == out["list"][:1]
    assert len(out["df"]) == 2 and all(isinstance(a, str) for a in out["df"])


_LEGACY_SCRIPT = textwrap.dedent("""
    import json, sys
    if sys.argv[3] == "install":
        import qlora_ops.tasks.registry.legacy as legacy
        legacy.install()
    import mlflow
    m = mlflow.pyfunc.load_model(sys.argv[1])
    print("RESULT " + json.dumps(m.predict(json.loads(sys.argv[2]))))
""")


def test_a_version_registered_before_the_stage_packages_still_loads(tracking, merged_model_dir, evaluated_merged,
                                                                    tmp_path, monkeypatch):
    """Versions registered by the code before the move name `tasks.serving` as their pyfunc loader in MLmodel
    (the only difference in the artifact: logged here exactly so). Outside a checkout no `tasks` exists: the
    old name fails to import until qlora_ops.tasks.registry.legacy answers for it, then the version answers
    exactly as evaluated; download_hf_model (serve, export-gguf) accepts it."""
    import mlflow
    import yaml

    from qlora_ops.tasks.registry import register
    from qlora_ops.tasks.core.util import read_jsonl

    monkeypatch.setattr(register, "LOADER_MODULE", "tasks.serving")
    name = _unique("reg-legacy")
    uri = _log_model(merged_model_dir, _unique("exp-legacy"))
    assert _promote(uri, name, tmp_path)["promoted"]
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/1", dst_path=str(tmp_path / "art")))
    assert yaml.safe_load((local / "MLmodel").read_text())["flavors"]["python_function"]["loader_module"] == "tasks.serving"

    evaluated = [r["prediction"] for r in read_jsonl(evaluated_merged["eval"] / "predictions.jsonl")]
    prompts = [r["prompt"] for r in read_jsonl(evaluated_merged["test"])]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(MLFLOW_TRACKING_URI=tracking, HF_HUB_OFFLINE="1")
    away = tmp_path / "elsewhere"  # not a checkout: no tasks/ folder on the path
    away.mkdir()
    runs = {how: subprocess.run([sys.executable, "-c", _LEGACY_SCRIPT, f"models:/{name}@champion", json.dumps(prompts), how],
                                env=env, cwd=away, capture_output=True, text=True, timeout=300)
            for how in ("plain", "install")}
    assert runs["plain"].returncode != 0 and "No module named 'tasks'" in runs["plain"].stderr, runs["plain"].stderr[-2000:]
    p = runs["install"]
    assert p.returncode == 0, p.stderr[-4000:]
    assert json.loads([ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")][-1][len("RESULT "):]) == evaluated
    got = register.download_hf_model(name, 1, tmp_path / "hf")
    assert (Path(got) / "config.json").is_file()
    # `qlora-ops serve` (and verify-serving): its checked local copy names the new loader, so the scoring
    # server's plain `mlflow.pyfunc` load needs no old name
    from qlora_ops.tasks.serving.server import fetch_model

    served, _ = fetch_model(name, 1, tmp_path / "serve")
    assert yaml.safe_load((served / "MLmodel").read_text())["flavors"]["python_function"]["loader_module"] \
        == "qlora_ops.tasks.registry.loader"
    p = subprocess.run([sys.executable, "-c", _LEGACY_SCRIPT, str(served), json.dumps(prompts), "plain"],
                       env=env, cwd=away, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]
    assert json.loads([ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")][-1][len("RESULT "):]) == evaluated


def test_tampered_weights_are_refused(tracking, merged_model_dir, tmp_path, tmp_path_factory):
    """A weight file changed in the artifact store is refused by every loader: pyfunc loading (what the
    scoring server runs), download_hf_model; a manifest rewritten to match is refused against the
    version's weights_digest."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from qlora_ops.tasks.registry.register import PromotionError, download_hf_model
    from qlora_ops.tasks.registry.loader import WeightsRefused, _load_pyfunc

    name = _unique("reg-tamper")
    uri = _log_model(merged_model_dir, _unique("exp-tamper"))
    _promote(uri, name, tmp_path)
    digest = MlflowClient().get_model_version(name, "1").tags["weights_digest"]
    model_id = uri.split("/")[-1]
    stored = list({d.resolve() for d in Path(tmp_path_factory.getbasetemp()).glob(
        f"mlflow-server*/artifacts/**/{model_id}/artifacts/data/model")})  # the server's artifact store
    assert len(stored) == 1, stored
    weights = stored[0] / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of one weight
    weights.write_bytes(bytes(data))

    with pytest.raises(WeightsRefused, match="model.safetensors: sha256 differs"):
        mlflow.pyfunc.load_model(f"models:/{name}/1")
    with pytest.raises(PromotionError, match="model.safetensors"):
        download_hf_model(name, 1, tmp_path / "dl")

    # The attacker also rewrites the manifest: the files match it, the registered digest does not.
    from qlora_ops.tasks.core.util import write_manifest
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/1", dst_path=str(tmp_path / "art")))
    write_manifest(local / "data" / "model")
    with pytest.raises(WeightsRefused, match="not the registered weights_digest"):
        _load_pyfunc(str(local / "data" / "model"), {"weights_digest": digest})
    with pytest.raises(WeightsRefused, match="not the registered weights_digest"):
        mlflow.pyfunc.load_model(str(local), model_config={"weights_digest": digest})
    # Without an expectation given, the loader asks the registry for the version's tag: refused too (the code
    # before checked the manifest against itself only, and loaded this).
    with pytest.raises(WeightsRefused, match="not the registered weights_digest"):
        _load_pyfunc(str(local / "data" / "model"))


_WORKER_SCRIPT = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    from mlflow.tracking import MlflowClient
    from qlora_ops.tasks.registry.register import register_and_promote
    uri, name, metric, lock, ready, go = sys.argv[1:7]
    def decide(v):
        champ = float(MlflowClient().get_model_version(name, str(v)).tags["accuracy"])
        time.sleep(1.0)  # widen the read-compare-write window
        return float(metric) > champ, f"candidate {metric} vs champion v{v} {champ}"
    Path(ready).touch()
    while not Path(go).exists():
        time.sleep(0.01)
    r = register_and_promote(model_uri=uri, model_name=name, alias="champion", challenger_alias=None,
                             tags={"accuracy": metric}, decide=decide, lock_path=Path(lock))
    print("RESULT " + json.dumps(r))
""")


def test_concurrent_registrations_are_serialized(tracking, merged_model_dir, tmp_path):
    from mlflow.tracking import MlflowClient

    name = _unique("reg-race")
    uri = _log_model(merged_model_dir, _unique("exp-race"))
    assert _promote(uri, name, tmp_path, accuracy="0.1")["champion_version"] == 1
    lock = tmp_path / "race.lock"
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking, "PYTHONPATH": str(ROOT)}
    procs = []
    for i, metric in enumerate((0.5, 0.8)):
        procs.append(subprocess.Popen(
            [sys.executable, "-c", _WORKER_SCRIPT, uri, name, str(metric), str(lock),
             str(tmp_path / f"ready{i}"), str(tmp_path / "go")],
            env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    deadline = time.time() + 120
    while not all((tmp_path / f"ready{i}").exists() for i in range(2)):
        assert time.time() < deadline and all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        time.sleep(0.05)
    (tmp_path / "go").touch()
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-4000:]
        results.append(json.loads([ln for ln in out.splitlines() if ln.startswith("RESULT ")][-1][7:]))

    first, second = sorted(results, key=lambda r: r["version"])
    assert (first["version"], second["version"]) == (2, 3)
    # Serialized: the second saw the state the first left.
    assert first["previous_champion_version"] == 1 and first["promoted"]
    assert second["previous_champion_version"] == first["version"]
    c = MlflowClient()
    champ = int(c.get_model_version_by_alias(name, "champion").version)
    by_metric = {float(c.get_model_version(name, str(r["version"])).tags["accuracy"]): r["version"] for r in results}
    assert champ == by_metric[0.8]
    assert set(c.get_registered_model(name).aliases) == {"champion", "challenger"}


def test_planted_candidates_never_move_the_champion(tracking, merged_model_dir, tmp_path):
    """Worse than the champion, or equal to it, on the same 500 rows: the paired policy keeps the
    champion, says why with its numbers, and `champion` never moves; a truly better one does move it."""
    import numpy as np
    from mlflow.tracking import MlflowClient

    from qlora_ops.tasks.gates.policy import PromotionPolicy, decide

    rng = np.random.default_rng(0)
    champ = rng.random(500) < 0.70

    def planted(flip_to_wrong: int, flip_to_right: int):
        c = champ.copy()
        c[np.flatnonzero(champ)[:flip_to_wrong]] = False
        c[np.flatnonzero(~champ)[:flip_to_right]] = True
        return lambda v: (lambda d: (d["promote"], d["reason"]))(decide(PromotionPolicy(), c, champ))

    name = _unique("reg-planted")
    uri = _log_model(merged_model_dir, _unique("exp-planted"))
    _promote(uri, name, tmp_path)  # v1 champion
    c = MlflowClient()
    for label, d in (("worse", planted(25, 0)), ("equal", planted(20, 20)), ("slightly better", planted(0, 3))):
        r = _promote(uri, name, tmp_path, d)
        assert not r["promoted"] and r["reason"].startswith("keep champion"), (label, r["reason"])
        assert c.get_model_version_by_alias(name, "champion").version == "1", label
    r = _promote(uri, name, tmp_path, planted(0, 40))  # +8 points on 500 rows: significant
    assert r["promoted"] and r["reason"].startswith("promote") and r["champion_version"] == r["version"]


def test_a_version_left_incomplete_by_a_killed_run_is_abandoned_never_champion(tracking, merged_model_dir, tmp_path):
    """A run killed between version create and `status=ready` leaves an incomplete version without an
    alias; the next registration (under the lock: that writer is dead) tags it abandoned, and the skip
    check does not count it as a decision."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from qlora_ops.tasks.registry.tracking import find_fingerprint

    name = _unique("reg-killed")
    uri = _log_model(merged_model_dir, exp := _unique("exp-killed"))
    half = mlflow.register_model(uri, name, tags={"status": "incomplete", "fingerprint": "fp-1", "mlflow_run_id": "dead"})
    exp_id = mlflow.get_experiment_by_name(exp).experiment_id
    assert find_fingerprint(name, exp_id, "fp-1") is None  # decided nothing
    res = _promote(uri, name, tmp_path, mlflow_run_id="next", fingerprint="fp-1")
    c = MlflowClient()
    t = c.get_model_version(name, half.version).tags
    assert t["status"] == "abandoned" and "abandoned" in t["promotion_reason"] and "next" in t["promotion_reason"]
    assert res["version"] == int(half.version) + 1 and res["champion_version"] == res["version"]
    assert not c.get_model_version(name, half.version).aliases
    assert find_fingerprint(name, exp_id, "fp-1").startswith(f"{name} v{res['version']} ")  # only the complete one counts
    # a retry of the run that owns an incomplete version keeps it (it finishes it instead)
    own = mlflow.register_model(uri, name, tags={"status": "incomplete", "mlflow_run_id": "retry"})
    assert _promote(uri, name, tmp_path, decide=_verdict(False, []), mlflow_run_id="retry")["version"] == int(own.version)
    assert c.get_model_version(name, own.version).tags["status"] == "ready"
