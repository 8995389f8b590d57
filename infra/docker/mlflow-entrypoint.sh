#!/bin/sh
# Renders MLflow's basic-auth config from the environment (the auth database URL holds a password,
# so it is not baked into the image), then starts the server with the arguments given.
# Needs: MLFLOW_AUTH_DATABASE_URI, MLFLOW_AUTH_ADMIN_USERNAME, MLFLOW_AUTH_ADMIN_PASSWORD,
#        MLFLOW_FLASK_SERVER_SECRET_KEY. Optional: MLFLOW_AUTH_DEFAULT_PERMISSION (default READ).
set -eu
: "${MLFLOW_AUTH_DATABASE_URI:?set MLFLOW_AUTH_DATABASE_URI}"
: "${MLFLOW_AUTH_ADMIN_USERNAME:?set MLFLOW_AUTH_ADMIN_USERNAME}"
: "${MLFLOW_AUTH_ADMIN_PASSWORD:?set MLFLOW_AUTH_ADMIN_PASSWORD}"
: "${MLFLOW_FLASK_SERVER_SECRET_KEY:?set MLFLOW_FLASK_SERVER_SECRET_KEY}"
ini="${TMPDIR:-/tmp}/mlflow-basic-auth.ini"
umask 077
cat > "$ini" <<INI
[mlflow]
default_permission = ${MLFLOW_AUTH_DEFAULT_PERMISSION:-READ}
database_uri = ${MLFLOW_AUTH_DATABASE_URI}
admin_username = ${MLFLOW_AUTH_ADMIN_USERNAME}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
INI
export MLFLOW_AUTH_CONFIG_PATH="$ini"
exec mlflow server --app-name basic-auth "$@"
