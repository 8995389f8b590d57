#!/bin/sh
# Refuses to start the stack on example or weak secrets. Compose runs it as the one-shot
# `preflight` service that every other service waits for; run it yourself before `up`:
#
#   sh infra/docker/check-env.sh infra/.env
#
# With a file argument it reads KEY=VALUE lines from that file (never sourced: nothing in it
# runs); without one it checks its own environment. Exit 0: fine; 1: every problem is listed.
set -u

SECRETS="POSTGRES_PASSWORD PREFECT_DB_PASSWORD MLFLOW_DB_PASSWORD MINIO_ROOT_PASSWORD MLFLOW_ADMIN_PASSWORD MLFLOW_FLASK_SERVER_SECRET_KEY PREFECT_AUTH_STRING"
MIN_LENGTH=16
file="${1:-}"
if [ -n "$file" ] && [ ! -r "$file" ]; then
    echo "check-env: cannot read $file (copy infra/.env.example to infra/.env and fill it in)" >&2
    exit 1
fi

value() {  # value NAME: the setting from the file (last assignment wins) or the environment
    if [ -n "$file" ]; then
        grep -E "^[[:space:]]*$1=" "$file" | tail -n 1 | cut -d= -f2- | sed -e 's/^"\(.*\)"$/\1/' -e "s/^'\(.*\)'$/\1/"
    else
        printenv "$1" || true
    fi
}

problems=0
fail() { echo "check-env: $1" >&2; problems=$((problems + 1)); }

for name in $SECRETS; do
    v="$(value "$name")"
    secret="$v"
    [ "$name" = PREFECT_AUTH_STRING ] && secret="${v#*:}"
    if [ -z "$v" ]; then
        fail "$name is not set"
    elif printf '%s' "$v" | grep -qi "change-me"; then
        fail "$name still holds the example value of .env.example; generate one: openssl rand -hex 24"
    elif [ "$name" = PREFECT_AUTH_STRING ] && [ "$secret" = "$v" ]; then
        fail "PREFECT_AUTH_STRING must look like user:password"
    elif [ "${#secret}" -lt "$MIN_LENGTH" ]; then
        fail "$name is shorter than $MIN_LENGTH characters"
    fi
done

# one Postgres role per service: their passwords must differ from each other and the superuser's
pg="$(value POSTGRES_PASSWORD)"; prefect_db="$(value PREFECT_DB_PASSWORD)"; mlflow_db="$(value MLFLOW_DB_PASSWORD)"
if [ -n "$prefect_db" ] && { [ "$prefect_db" = "$mlflow_db" ] || [ "$prefect_db" = "$pg" ]; }; then
    fail "PREFECT_DB_PASSWORD must differ from MLFLOW_DB_PASSWORD and POSTGRES_PASSWORD"
fi
if [ -n "$mlflow_db" ] && [ "$mlflow_db" = "$pg" ]; then
    fail "MLFLOW_DB_PASSWORD must differ from POSTGRES_PASSWORD"
fi

if [ "$problems" -gt 0 ]; then
    echo "check-env: refusing to start: $problems problem(s) in ${file:-the environment}" >&2
    exit 1
fi
echo "check-env: ${file:-environment} ok"
