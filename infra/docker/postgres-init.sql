-- One PostgreSQL instance, one database per consumer. Runs once, on an empty data volume.
-- mlflow_auth holds MLflow's basic-auth users and permissions apart from the tracking data.
CREATE DATABASE prefect;
CREATE DATABASE mlflow;
CREATE DATABASE mlflow_auth;
