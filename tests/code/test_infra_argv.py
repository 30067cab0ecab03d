"""No secret on a command line: the init scripts (infra/minio-init.sh, infra/relay/minio-events.sh,
infra/postgres-init.sh) run for real with sh, `mc` and `psql` replaced by recorders of their argv and stdin
(no Docker here). `ps` shows every process's arguments to every user of the machine."""
from __future__ import annotations

import pytest

from tests.conftest import ROOT

INFRA = ROOT / "infra"

_FAKE_MC = r'''#!/bin/sh
# argv, one call a line; stdin of the calls that take a key there
printf '%s\n' "$*" >> "$FAKE_LOG/argv"
case "$1 $2" in
  "alias set"|"admin user") [ "$2 $3" = "user info" ] || cat >> "$FAKE_LOG/stdin" ;;
esac
case "$*" in
  "admin user info"*) echo "PolicyName: qlora-ops-mlflow,qlora-ops-worker,qlora-ops-dropper" ;;
  "event list"*) echo "arn:minio:sqs::QLORA:webhook s3:ObjectCreated:* Filter: prefix=drops/" ;;
esac
'''
_FAKE_PSQL = r'''#!/bin/sh
printf '%s\n' "$*" >> "$FAKE_LOG/argv"
cat >> "$FAKE_LOG/stdin"
'''


@pytest.mark.parametrize("script", ["minio-init.sh", "relay/minio-events.sh", "postgres-init.sh"])
def test_init_scripts_put_no_secret_on_a_command_line(tmp_path, script):
    """`ps` shows every process's arguments to every user: the root login, the per-role secret keys and
    the database passwords reach mc and psql on stdin or through the environment, never in argv. Run
    for real with sh, with mc and psql replaced by recorders of their argv and stdin."""
    import os
    import subprocess

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("mc", _FAKE_MC), ("psql", _FAKE_PSQL)):
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    secrets = {"MINIO_ROOT_PASSWORD": "S3C-root-pw", "QLORA_S3_MLFLOW_SECRET_KEY": "S3C-mlflow-sk",
               "QLORA_S3_WORKER_SECRET_KEY": "S3C-worker-sk", "QLORA_S3_DROP_SECRET_KEY": "S3C-drop-sk",
               "PREFECT_DB_PASSWORD": "S3C-prefect-pw", "MLFLOW_DB_PASSWORD": "S3C-mlflow-pw"}
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_LOG": str(tmp_path), "MINIO_ROOT_USER": "root",
           "QLORA_S3_MLFLOW_ACCESS_KEY": "mlflow", "QLORA_S3_WORKER_ACCESS_KEY": "worker",
           "QLORA_S3_DROP_ACCESS_KEY": "dropper", "POSTGRES_USER": "postgres",
           "QLORA_OPS_POLICY_DIR": str(tmp_path / "policies"), **secrets}
    r = subprocess.run(["sh", str(INFRA / script)], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    argv = (tmp_path / "argv").read_text()
    stdin = (tmp_path / "stdin").read_text() if (tmp_path / "stdin").exists() else ""
    assert argv.strip(), "the fake mc/psql was never called"
    for name, value in secrets.items():
        assert value not in argv, f"{script}: ${name} on a command line:\n{argv}"
        assert value not in r.stdout + r.stderr
    used = {"minio-init.sh": ["MINIO_ROOT_PASSWORD", "QLORA_S3_MLFLOW_SECRET_KEY", "QLORA_S3_WORKER_SECRET_KEY",
                              "QLORA_S3_DROP_SECRET_KEY"],
            "relay/minio-events.sh": ["MINIO_ROOT_PASSWORD"]}.get(script, [])
    for name in used:  # still delivered: on stdin
        assert secrets[name] in stdin.splitlines(), f"{script}: ${name} never reached mc"
    if script == "postgres-init.sh":  # psql reads them from its environment, by name
        assert "\\getenv prefect_pw PREFECT_DB_PASSWORD" in stdin and "\\getenv mlflow_pw MLFLOW_DB_PASSWORD" in stdin
