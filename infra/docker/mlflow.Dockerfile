# MLflow tracking server: PostgreSQL backend (psycopg 3), basic auth (Flask-WTF), S3/MinIO artifacts (boto3).
# The official image lacks the Postgres driver and the auth extra, hence this one.
FROM python:3.11-slim
ARG MLFLOW_VERSION=3.17.2
RUN pip install --no-cache-dir "mlflow[auth]==${MLFLOW_VERSION}" "psycopg[binary]>=3.1" "boto3>=1.34" \
    && useradd --create-home --uid 1001 mlflow
COPY docker/mlflow-entrypoint.sh /usr/local/bin/mlflow-entrypoint.sh
USER 1001
WORKDIR /home/mlflow
EXPOSE 5000
ENTRYPOINT ["sh", "/usr/local/bin/mlflow-entrypoint.sh"]
