#!/bin/sh
# First start of an empty Postgres data directory only (docker-entrypoint-initdb.d; mounted by
# infra/docker-compose.yml, and by infra/k8s/ from the qlora-ops-init ConfigMap, which must stay a copy
# of this file). One role per service, so a leaked MLflow password does not open Prefect's database and
# neither service holds the superuser password. mlflow_auth is MLflow's user store (basic auth), kept
# apart from its tracking tables.
: "${PREFECT_DB_PASSWORD:?PREFECT_DB_PASSWORD is not set}"
: "${MLFLOW_DB_PASSWORD:?MLFLOW_DB_PASSWORD is not set}"
# psql reads the passwords from its environment (\getenv, psql >= 15) into variables that :'name' quotes:
# they are in neither the SQL text nor the process list (`psql -v pw=...` would show them in `ps`).
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres <<'SQL'
\getenv prefect_pw PREFECT_DB_PASSWORD
\getenv mlflow_pw MLFLOW_DB_PASSWORD
CREATE ROLE prefect LOGIN PASSWORD :'prefect_pw';
CREATE DATABASE prefect OWNER prefect;
CREATE ROLE mlflow LOGIN PASSWORD :'mlflow_pw';
CREATE DATABASE mlflow OWNER mlflow;
CREATE DATABASE mlflow_auth OWNER mlflow;
SQL
