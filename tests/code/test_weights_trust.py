"""What a version serves is pinned by the registrar's registry tags, not by what came with the bytes (security
issue, item 2), against a REAL `mlflow server` (SQLite, proxied artifacts): the registrar's copy and its
`weights_digest` / `mlmodel_digest` tags; every documented load path (`load_version`, `fetch_model` under
`qlora-ops serve`, the model's own loader under a plain `mlflow.pyfunc.load_model`) refusing weights tampered
together with a rewritten manifest and MLmodel; a legacy version without tags only when asked for.
The role split itself (who may write those tags and bytes) is tests/integration/test_infra_roles.py."""
from __future__ import annotations

import hashlib
import uuid
from pathlib import Path

import pytest
import yaml

SERVING = {"system_prompt": "Answer with the label.", "max_new_tokens": 4, "batch_size": 8}


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _register(merged_model_dir: Path, tmp_path: Path, copy: bool = True) -> tuple[str, str]:
    """(registered model name, trained model URI): logged as the GPU stage does, registered as the flow does."""
    from mlflow.tracking import MlflowClient

    from qlora_ops.tasks.registry import register

    client = MlflowClient()
    exp = _unique("exp-trust")
    run_id = client.create_run(client.create_experiment(exp)).info.run_id
    uri = register.log_merged_model(merged_model_dir, SERVING, run_id=run_id)
    client.set_terminated(run_id)
    name = _unique("reg-trust")
    kw = {"registry_experiment": register.registry_experiment(exp)} if copy else {}
    register.register_and_promote(model_uri=uri, model_name=name, alias="champion", challenger_alias=None,
                                  tags={"mlflow_run_id": run_id}, decide=lambda v: (True, "test"),
                                  lock_path=tmp_path / "registry.lock", **kw)
    return name, uri


def _stored(tmp_path_factory, name: str) -> Path:
    """The server's own copy (its artifact store) of version 1's logged model: where an attacker writes."""
    from mlflow.tracking import MlflowClient

    model_id = MlflowClient().get_model_version(name, "1").source.split("/")[-1]
    found = list({d.resolve() for d in Path(tmp_path_factory.getbasetemp()).glob(
        f"mlflow-server*/artifacts/**/{model_id}/artifacts")})
    assert len(found) == 1, found
    return found[0]


def _tamper_everything(root: Path) -> str:
    """Change one weight bit, rewrite the manifest to match and MLmodel's logged digest to the new manifest:
    every check against what came with the bytes passes. Returns the forged digest."""
    from qlora_ops.tasks.core.util import MANIFEST, write_manifest

    weights = root / "data" / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    write_manifest(root / "data" / "model")
    forged = hashlib.sha256((root / "data" / "model" / MANIFEST).read_bytes()).hexdigest()
    meta = yaml.safe_load((root / "MLmodel").read_text())
    meta["flavors"]["python_function"]["config"]["weights_digest"] = forged  # as the code before this logged it
    (root / "MLmodel").write_text(yaml.safe_dump(meta, sort_keys=False))
    return forged


def test_the_registrar_registers_its_own_checked_copy_and_pins_it(tracking, merged_model_dir, tmp_path):
    """The version's source is the registrar's copy in the registry experiment (the trainer's login cannot
    write there), and its weights_digest / mlmodel_digest are the sha256 of the manifest and MLmodel uploaded."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from qlora_ops.tasks.registry.register import registry_experiment

    name, trained_uri = _register(merged_model_dir, tmp_path)
    c = MlflowClient()
    mv = c.get_model_version(name, "1")
    copy_id = mv.source.split("/")[-1]
    trained_id = trained_uri.split("/")[-1]
    assert copy_id != trained_id and mv.tags["trained_model_id"] == trained_id
    copy = c.get_logged_model(copy_id)
    assert c.get_experiment(copy.experiment_id).name.endswith(registry_experiment(""))
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/1", dst_path=str(tmp_path / "dl")))
    assert mv.tags["mlmodel_digest"] == hashlib.sha256((local / "MLmodel").read_bytes()).hexdigest()
    assert mv.tags["weights_digest"] == hashlib.sha256(
        (local / "data" / "model" / "qlora_ops_manifest.json").read_bytes()).hexdigest()
    assert yaml.safe_load((local / "MLmodel").read_text())["model_id"] == copy_id


def test_a_tampered_trained_model_is_not_registered(tracking, merged_model_dir, tmp_path, tmp_path_factory):
    """Bytes changed between the training job's log and registration (its own weights_digest tag no longer
    matches): the registrar refuses to copy or register them."""
    from mlflow.tracking import MlflowClient

    from qlora_ops.tasks.registry.register import (PromotionError, log_merged_model, register_and_promote,
                                                   registry_experiment)

    client = MlflowClient()
    exp = _unique("exp-trust")
    run_id = client.create_run(client.create_experiment(exp)).info.run_id
    uri = log_merged_model(merged_model_dir, SERVING, run_id=run_id)
    stored = list({d.resolve() for d in Path(tmp_path_factory.getbasetemp()).glob(
        f"mlflow-server*/artifacts/**/{uri.split('/')[-1]}/artifacts")})
    _tamper_everything(stored[0])
    name = _unique("reg-trust")
    with pytest.raises(PromotionError, match="not its weights_digest tag|not the registered weights_digest"):
        register_and_promote(model_uri=uri, model_name=name, alias="champion", challenger_alias=None,
                             tags={"mlflow_run_id": run_id}, decide=lambda v: (True, "test"),
                             lock_path=tmp_path / "registry.lock", registry_experiment=registry_experiment(exp))


@pytest.mark.parametrize("copy", [True, False], ids=["registrar-copy", "registered-in-place"])
def test_weights_tampered_with_a_rewritten_manifest_and_mlmodel_are_refused_by_every_load_path(
        tracking, merged_model_dir, tmp_path, tmp_path_factory, copy):
    """One weight bit changed in the artifact store, the manifest rewritten to match, MLmodel's logged digest
    rewritten to the forged manifest: a plain `mlflow.pyfunc.load_model` of the version (the model's own
    loader, which asks the registry), `load_version` and `fetch_model` (`qlora-ops serve`) all refuse."""
    import mlflow

    from qlora_ops.tasks.registry.loader import WeightsRefused
    from qlora_ops.tasks.serving.server import ServingError, fetch_model

    name, _ = _register(merged_model_dir, tmp_path, copy=copy)
    assert mlflow.pyfunc.load_model(f"models:/{name}/1").predict(["hello"])  # sound: loads and answers
    _tamper_everything(_stored(tmp_path_factory, name))

    with pytest.raises(WeightsRefused, match="not the registered weights_digest"):
        mlflow.pyfunc.load_model(f"models:/{name}/1")
    from qlora_ops.tasks.serving import load_version

    with pytest.raises(ServingError, match="mlmodel_digest|not the registered weights_digest"):
        load_version(name, 1, tmp_path / "lv")
    with pytest.raises(ServingError, match="mlmodel_digest|not the registered weights_digest"):
        fetch_model(name, 1, tmp_path / "serve")


def test_a_changed_mlmodel_is_refused_by_load_version(tracking, merged_model_dir, tmp_path, tmp_path_factory):
    """MLmodel rewritten (the weights untouched): its sha256 is not the version's mlmodel_digest. (Whoever
    rewrites MLmodel could name another loader_module; load_version checks MLmodel before anything loads.)"""
    from qlora_ops.tasks.registry.register import PromotionError, download_hf_model
    from qlora_ops.tasks.serving.server import ServingError, fetch_model

    name, _ = _register(merged_model_dir, tmp_path, copy=False)
    mlmodel = _stored(tmp_path_factory, name) / "MLmodel"
    meta = yaml.safe_load(mlmodel.read_text())
    meta["flavors"]["python_function"]["config"]["dtype"] = "bfloat16"
    mlmodel.write_text(yaml.safe_dump(meta, sort_keys=False))
    with pytest.raises(ServingError, match="mlmodel_digest"):
        fetch_model(name, 1, tmp_path / "serve")
    with pytest.raises(PromotionError, match="mlmodel_digest"):  # export-gguf, the champion's re-evaluation
        download_hf_model(name, 1, tmp_path / "hf")
    from qlora_ops.tasks.serving import load_version

    with pytest.raises(ServingError, match="mlmodel_digest"):
        load_version(name, 1, tmp_path / "lv")


def test_the_models_own_loader_refuses_without_a_registered_digest(tracking, merged_model_dir, tmp_path):
    """A logged model no version was registered from: MLmodel's own digest counts for nothing, so a plain load
    is refused, naming how to load; with the digest given at load time it loads."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from qlora_ops.tasks.registry.loader import WeightsRefused, _load_pyfunc, manifest_digest
    from qlora_ops.tasks.registry.register import log_merged_model

    client = MlflowClient()
    run_id = client.create_run(client.create_experiment(_unique("exp-trust"))).info.run_id
    uri = log_merged_model(merged_model_dir, SERVING, run_id=run_id)
    local = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(tmp_path / "dl")))
    with pytest.raises(WeightsRefused, match="no registered version.*load_version"):
        mlflow.pyfunc.load_model(uri)
    with pytest.raises(WeightsRefused, match="no registered version"):
        _load_pyfunc(str(local / "data" / "model"))
    digest = manifest_digest(local / "data" / "model")
    assert mlflow.pyfunc.load_model(uri, model_config={"weights_digest": digest}).predict(["hi"])


def test_a_legacy_version_without_digest_tags_loads_only_when_allowed(tracking, merged_model_dir, tmp_path):
    """A version registered without weights_digest (before qlora-ops recorded digests): load_version refuses it
    unless allow_unverified_legacy=True (then its bytes are checked against its own manifest only)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from qlora_ops.tasks.registry.register import log_merged_model
    from qlora_ops.tasks.serving import load_version
    from qlora_ops.tasks.serving.server import ServingError

    client = MlflowClient()
    run_id = client.create_run(client.create_experiment(_unique("exp-trust"))).info.run_id
    uri = log_merged_model(merged_model_dir, SERVING, run_id=run_id)
    name = _unique("reg-legacy")
    mlflow.register_model(uri, name)  # what older code did: no digest tag on the version
    assert "weights_digest" not in (client.get_model_version(name, "1").tags or {})
    with pytest.raises(ServingError, match="no weights_digest tag"):
        load_version(name, 1, tmp_path / "a")
    assert load_version(name, 1, tmp_path / "b", allow_unverified_legacy=True).predict(["hi"])
