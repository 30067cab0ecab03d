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
# grant (the workers' user creates the experiment and the registered model, so it manages them).
# configparser reads `%` as interpolation: the generated (hex) passwords have none.
cat > "$conf" <<INI
[mlflow]
default_permission = READ
database_uri = ${MLFLOW_AUTH_DATABASE_URI}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
INI
export MLFLOW_AUTH_CONFIG_PATH="$conf"
exec "$@"
