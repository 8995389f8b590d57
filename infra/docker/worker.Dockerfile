# The Prefect worker (process pool) and the flow runs it starts: the whole project installed.
# Build from the repository root: docker build -f infra/docker/worker.Dockerfile -t alignflow-worker .
# GPU hosts: the default torch wheel from PyPI is a CUDA build (the NVIDIA container runtime brings
# the driver). CPU-only: --build-arg TORCH_INDEX=--index-url=https://download.pytorch.org/whl/cpu
FROM python:3.11-slim
ARG TORCH_SPEC="torch>=2.4,<3"
ARG TORCH_INDEX=""
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    ALIGNFLOW_CODE_DIR=/opt/alignflow \
    ALIGNFLOW_HOME=/data/alignflow \
    PREFECT_HOME=/data/prefect \
    HF_HOME=/data/hf \
    # task results are JSON on the shared volume, never pickles (tasks/results.py)
    PREFECT_RESULTS_DEFAULT_SERIALIZER=json \
    # MLflow's "View run at <tracking URI>" lines would print credentials; the run summary masks them
    MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT=true
RUN apt-get update && apt-get install -y --no-install-recommends git && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 1001 alignflow \
    && mkdir -p /data && chown 1001 /data
# torch first (its own index for CPU builds), then the project; code changes rebuild only the last layers
RUN pip install ${TORCH_INDEX} "${TORCH_SPEC}"
COPY pyproject.toml README.md* /opt/alignflow/
COPY alignment /opt/alignflow/alignment
COPY tasks /opt/alignflow/tasks
COPY flows /opt/alignflow/flows
COPY configs /opt/alignflow/configs
COPY infra /opt/alignflow/infra
# editable: modules resolve to /opt/alignflow, where the deployments' pull step runs them (and configs/ is found)
RUN pip install -e /opt/alignflow
WORKDIR /opt/alignflow
USER 1001
VOLUME ["/data"]
CMD ["prefect", "worker", "start", "--pool", "alignflow-process", "--type", "process"]
