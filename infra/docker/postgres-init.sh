#!/bin/bash
# One PostgreSQL instance, one role per service, each owning only its databases:
#   prefect -> prefect;  mlflow -> mlflow, mlflow_auth (MLflow's basic-auth users, apart from tracking data).
# The superuser (POSTGRES_USER) is for administration and backups only; no service connects as it.
# Runs once, on an empty data volume (the postgres image's /docker-entrypoint-initdb.d), and on
# Kubernetes once against the managed server (infra/k8s/postgres-roles-job.yaml, PGHOST/PGPASSWORD). Passwords
# come from the environment through psql's \getenv: never on a command line.
set -euo pipefail
: "${PREFECT_DB_PASSWORD:?set PREFECT_DB_PASSWORD}"
: "${MLFLOW_DB_PASSWORD:?set MLFLOW_DB_PASSWORD}"
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres <<'SQL'
\getenv prefect_pw PREFECT_DB_PASSWORD
\getenv mlflow_pw MLFLOW_DB_PASSWORD
CREATE ROLE prefect LOGIN PASSWORD :'prefect_pw';
CREATE ROLE mlflow LOGIN PASSWORD :'mlflow_pw';
CREATE DATABASE prefect OWNER prefect;
CREATE DATABASE mlflow OWNER mlflow;
CREATE DATABASE mlflow_auth OWNER mlflow;
REVOKE ALL ON DATABASE prefect FROM PUBLIC;
REVOKE ALL ON DATABASE mlflow FROM PUBLIC;
REVOKE ALL ON DATABASE mlflow_auth FROM PUBLIC;
SQL
