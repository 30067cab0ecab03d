"""Secrets (issue 10, item 7): credentials come from the environment only, and a password planted in the
tracking URI never lands anywhere a run writes or prints.

A real `mlflow server` (no auth: it ignores the basic-auth header MLflow's client builds from the URI's
user:password@), a real tiny `qlora-ops run` in a subprocess with its own Prefect server (logs shipped to
its API), then every byte of the MLflow store (SQLite file + artifacts), the Prefect database, the
workspace (including .qlora-ops/) and the captured stdout/stderr is searched for the planted password.
A params file that writes a credential is refused with exit 2, naming the key and not echoing it.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import free_port, make_workspace, start_prefect_server, stop_process_group, wait_http

PASSWORD = "S3cretPlanted"
AWS_SECRET = "AwsS3cretPlanted"  # a credential that lives only in the environment, as the docs say


def hits(root: Path, needles: tuple[str, ...]) -> list[str]:
    """Every file under root whose bytes contain a needle (raw, and as it would be URL-encoded)."""
    found = []
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink():
            data = p.read_bytes()
            found += [f"{p}: {n}" for n in needles if n.encode() in data]
    return found


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("mlflow-secret")
    port = free_port()
    with open(d / "server.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                                 "--backend-store-uri", f"sqlite:///{d}/mlflow.db", "--artifacts-destination",
                                 str(d / "artifacts"), "--workers", "1"], stdout=log, stderr=subprocess.STDOUT, cwd=d,
                                start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc)
        yield d, port
    finally:
        stop_process_group(proc)


@pytest.mark.slow
def test_planted_tracking_password_is_nowhere(tmp_path, server, tiny_model_dir):
    store, port = server
    ws = make_workspace(tmp_path / "repo")
    params = {
        "model": {"source": str(tiny_model_dir), "max_seq_len": 96},
        "data": {"prepared": "data/prepared/secret"},
        "training": {"max_steps": 2, "batch_size": 8, "eval_every": 2, "save_every": 2, "threads": 1, "warmup_steps": 1},
        "eval": {"batch_size": 32, "max_new_tokens": 4, "max_examples": 16},
        "gates": {"min_gain_over_base": -1.0, "min_retention_vs_lora": 0.0, "max_merge_disagreement": 1.0},
        "registry": {"experiment": "secret", "model_name": "secret-model"},
    }
    (ws / "params" / "secret.yaml").write_text(yaml.safe_dump(params))
    uri = f"http://qops:{PASSWORD}@127.0.0.1:{port}"
    with start_prefect_server(tmp_path / "prefect") as prefect:
        env = prefect.client_env(PYTHONPATH=str(ws), MLFLOW_TRACKING_URI=uri, AWS_SECRET_ACCESS_KEY=AWS_SECRET,
                                 AWS_ACCESS_KEY_ID="qops", PREFECT_LOGGING_TO_API_ENABLED="true",
                                 PREFECT_LOGGING_LEVEL="DEBUG")
        run = lambda *a: subprocess.run([sys.executable, "-m", "qlora_ops.flows.cli", *a, "--workspace", str(ws)],  # noqa: E731
                                        cwd=ws, env=env, capture_output=True, text=True, timeout=900)
        r = run("run", "--params", "params/secret.yaml")
        out = r.stdout + r.stderr
        assert r.returncode == 0, out[-4000:]
        assert "MLflow run " in out and f"at http://127.0.0.1:{port}" in out  # shown without its credentials
        st = run("status", "--params", "params/secret.yaml")
        assert st.returncode == 0 and "secret-model" in st.stdout, st.stdout[-2000:] + st.stderr[-2000:]
        out += st.stdout + st.stderr

        # A credential written into the params file is refused before any work, without echoing it.
        for name, body in {
            "uri.yaml": {"registry": {"tracking_uri": uri}},
            "dvc.yaml": {"storage": {"dvc_remote": f"https://qops:{PASSWORD}@127.0.0.1:1/dvc"}},
            "opts.yaml": {"storage": {"dvc_remote_options": {"password": PASSWORD}}},
        }.items():
            (ws / "params" / name).write_text(yaml.safe_dump(body))
            bad = run("run", "--params", f"params/{name}")
            assert bad.returncode == 2, bad.stdout[-2000:] + bad.stderr[-2000:]
            assert "credentials in the params file" in bad.stderr and "Traceback" not in bad.stderr
            out += bad.stdout + bad.stderr
            (ws / "params" / name).unlink()  # the test planted it there; the workspace search is for the run
        # The run reached the server: it registered the model through the URI that carried the password.
        from mlflow.tracking import MlflowClient

        assert MlflowClient(f"http://127.0.0.1:{port}").get_model_version_by_alias("secret-model", "champion")
    needles = (PASSWORD, AWS_SECRET)
    assert not [n for n in needles if n in out], [l for l in out.splitlines() if PASSWORD in l or AWS_SECRET in l][:5]
    leaks = hits(store, needles) + hits(tmp_path / "prefect", needles) + hits(ws, needles)
    assert not leaks, leaks[:20]
    # The searches can fail: the planted password is findable where it was put on purpose.
    (tmp_path / "canary.txt").write_text(uri)
    assert hits(tmp_path, (PASSWORD,)) == [f"{tmp_path / 'canary.txt'}: {PASSWORD}"]
    assert any(store.rglob("*.db")) and any((tmp_path / "prefect").rglob("prefect.db"))


def test_tracking_password_moves_to_the_environment_and_out_of_client_errors(tmp_path, monkeypatch):
    """MLflow's client puts the URL it was given into its error messages, which reach the console, Prefect's
    logs and run states: the run gives it the URL without the password and the password through
    MLFLOW_TRACKING_PASSWORD, which the client sends as the same basic auth."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from qlora_ops.tasks.core.config import Params
    from qlora_ops.tasks.core.paths import tracking_uri

    dead = free_port()
    planted = f"http://qops:{PASSWORD}@127.0.0.1:{dead}"
    for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.setenv(k, "")  # restored after the test, whatever tracking_uri writes
        monkeypatch.delenv(k)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", planted)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    uri = tracking_uri(tmp_path, Params())
    assert uri == f"http://127.0.0.1:{dead}"
    assert (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]) == ("qops", PASSWORD)
    with pytest.raises(MlflowException) as e:
        MlflowClient(uri).get_experiment_by_name("x")
    assert f"127.0.0.1:{dead}" in str(e.value) and PASSWORD not in str(e.value)
    with pytest.raises(MlflowException) as e:  # what handing MLflow the planted URI itself does
        MlflowClient(planted).get_experiment_by_name("x")
    assert PASSWORD in str(e.value)


@pytest.mark.parametrize("doc, key", [
    ({"registry": {"tracking_uri": f"https://qops:{PASSWORD}@mlflow:5000"}}, "registry.tracking_uri"),
    ({"storage": {"dvc_remote": f"https://qops:{PASSWORD}@dav.example/dvc"}}, "storage.dvc_remote"),
    ({"data": {"source": f"https://h.example/drops/?sig={PASSWORD}"}}, "data.source"),
    ({"storage": {"dvc_remote_options": {"secret_access_key": PASSWORD}}}, "storage.dvc_remote_options.secret_access_key"),
    ({"storage": {"dvc_remote_options": {"password": PASSWORD}}}, "storage.dvc_remote_options.password"),
    ({"data": {"source_options": {"session_token": PASSWORD}}}, "data.source_options.session_token"),
])
def test_a_credential_in_the_params_file_is_refused_naming_the_key_not_the_value(tmp_path, doc, key):
    from qlora_ops.tasks.core.config import ParamsError, load_params

    f = tmp_path / "p.yaml"
    f.write_text(yaml.safe_dump(doc))
    with pytest.raises(ParamsError) as e:
        load_params(f)
    assert f"  {key}: " in str(e.value) and PASSWORD not in str(e.value)


def test_options_that_are_not_secrets_and_users_without_passwords_load(tmp_path):
    from qlora_ops.tasks.core.config import load_params

    f = tmp_path / "p.yaml"
    f.write_text(yaml.safe_dump({
        "registry": {"tracking_uri": "https://mlflow.example:5000"},
        "storage": {"dvc_remote": "ssh://git@host/dvc",  # a user name alone is not a secret
                    "dvc_remote_options": {"endpointurl": "http://minio:9000", "credentialpath": "/etc/gcs.json",
                                           "ask_password": "true", "auth": "basic"}},
    }))
    p = load_params(f)
    assert p.storage.dvc_remote_options["credentialpath"] == "/etc/gcs.json"


def test_a_wrong_type_error_never_echoes_a_password(tmp_path):
    from qlora_ops.tasks.core.config import ParamsError, load_params

    f = tmp_path / "p.yaml"
    f.write_text(yaml.safe_dump({"registry": {"tracking_uri": [f"http://qops:{PASSWORD}@h"]}}))
    with pytest.raises(ParamsError) as e:
        load_params(f)
    assert "registry.tracking_uri" in str(e.value) and PASSWORD not in str(e.value) and "qops:***@h" in str(e.value)
