#!/usr/bin/env bash
# Runs once, when the postgres container starts on an empty data volume (docker-entrypoint-initdb.d).
# POSTGRES_USER / POSTGRES_DB (airflow / airflow) are created by the image itself; this adds one role and
# database per other tenant of the instance, each role owning its own databases only:
#   mlflow     -> database mlflow                  (MLflow tracking + model registry backend)
#   modelops   -> databases modelops_audit         (AuditHook, connection modelops_audit)
#                           modelops_predictions   (gateway + PredictionLogHook, connection modelops_predictions)
# Passwords come from the container environment; psql variables (:'name') quote them safely.
# A volume that was initialised before this script existed is not touched: run it by hand then
# (`docker compose exec postgres bash /docker-entrypoint-initdb.d/10-modelops-databases.sh`).
set -euo pipefail

: "${MLFLOW_DB_PASSWORD:?set MLFLOW_DB_PASSWORD for the postgres service}"
: "${MODELOPS_DB_PASSWORD:?set MODELOPS_DB_PASSWORD for the postgres service}"

psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    -v mlflow_password="$MLFLOW_DB_PASSWORD" \
    -v modelops_password="$MODELOPS_DB_PASSWORD" <<'EOSQL'
CREATE ROLE mlflow LOGIN PASSWORD :'mlflow_password';
CREATE ROLE modelops LOGIN PASSWORD :'modelops_password';
CREATE DATABASE mlflow OWNER mlflow;
CREATE DATABASE modelops_audit OWNER modelops;
CREATE DATABASE modelops_predictions OWNER modelops;
-- Only the owners (and the superuser) may connect.
REVOKE CONNECT ON DATABASE mlflow FROM PUBLIC;
REVOKE CONNECT ON DATABASE modelops_audit FROM PUBLIC;
REVOKE CONNECT ON DATABASE modelops_predictions FROM PUBLIC;
EOSQL
