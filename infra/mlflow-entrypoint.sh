#!/bin/sh
# MLflow's basic-auth app finds its user store only through an ini file (MLFLOW_AUTH_CONFIG_PATH), and
# that store is a Postgres URI with a password in it. So the file is written here, at start, from the
# environment, inside the container: no password in the repository or in the image.
# The admin user comes from MLFLOW_AUTH_ADMIN_USERNAME / MLFLOW_AUTH_ADMIN_PASSWORD: created on the first
# start against an empty store (MLflow ships no default password and refuses to start without one).
set -eu
: "${MLFLOW_AUTH_DATABASE_URI:?MLFLOW_AUTH_DATABASE_URI is not set}"
conf="${MLFLOW_AUTH_CONFIG_PATH:-/tmp/mlflow-auth/basic_auth.ini}"
umask 077
mkdir -p "$(dirname "$conf")"
# default_permission READ: every team member with a login reads every run and model; writing needs a
# grant, which infra/mlflow-setup.py gives per role (workers EDIT, promoters MANAGE).
# auth_cache_ttl_seconds: every request checks a PBKDF2 password hash, which costs CPU per request; a
# positive TTL caches a successful check for that long per server worker process, so a changed or
# revoked password may still be accepted for up to that long. Off (0) unless MLFLOW_AUTH_CACHE_TTL_SECONDS says.
# configparser reads `%` as interpolation: the generated (hex) passwords have none.
cat > "$conf" <<INI
[mlflow]
default_permission = READ
database_uri = ${MLFLOW_AUTH_DATABASE_URI}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
auth_cache_ttl_seconds = ${MLFLOW_AUTH_CACHE_TTL_SECONDS:-0}
INI
export MLFLOW_AUTH_CONFIG_PATH="$conf"
exec "$@"
