#!/usr/bin/env bash
# Runs once, after 10-modelops-databases.sh created the role mlflow: the database of MLflow's basic-auth
# app (users, permissions; docker/mlflow/basic_auth.ini), apart from its tracking store (database mlflow).
# A volume initialised before this script existed is not touched: run it by hand then
# (`docker compose exec postgres bash /docker-entrypoint-initdb.d/20-mlflow-auth.sh`).
set -euo pipefail

psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" <<'EOSQL'
CREATE DATABASE mlflow_auth OWNER mlflow;
REVOKE CONNECT ON DATABASE mlflow_auth FROM PUBLIC;
EOSQL
