# syntax=docker/dockerfile:1
# The ModelOps image: Airflow 3.3.2 plus the project's locked dependencies and its code. docker-compose.yaml
# runs every Python service from it (Airflow components, MLflow server, scoring gateway).
# The Airflow version here must equal the one pinned in uv.lock (tests/unit/test_compose.py checks).
FROM apache/airflow:3.3.2-python3.11

# uv only exports the lock to a requirements file; pip installs it, as the Airflow image expects
# (user site of the airflow user, PIP_USER=true).
COPY --from=ghcr.io/astral-sh/uv:0.13.8 /uv /usr/local/bin/uv

USER root
RUN mkdir -p /opt/modelops && chown airflow:0 /opt/modelops
USER airflow
WORKDIR /opt/modelops
COPY --chown=airflow:0 pyproject.toml uv.lock ./
# The exact versions of uv.lock (no dev group). The project itself is not installed: its package lives
# in plugins/, which Airflow puts on sys.path and PYTHONPATH gives to the other processes.
RUN UV_PYTHON_DOWNLOADS=never uv export --frozen --no-dev --no-emit-project --no-hashes \
        --format requirements-txt --output-file requirements.txt \
    && pip install --no-cache-dir -r requirements.txt

ARG MODELOPS_CODE_COMMIT=""
ENV PYTHONPATH=/opt/airflow/plugins \
    MODELOPS_CODE_COMMIT=${MODELOPS_CODE_COMMIT} \
    GIT_PYTHON_REFRESH=quiet

WORKDIR /opt/airflow
# modelops.settings.PROJECT_ROOT is two levels above plugins/modelops/: /opt/airflow, so include/ and
# airflow_settings.yaml sit beside plugins/ as in the repository.
COPY --chown=airflow:0 airflow_settings.yaml ./airflow_settings.yaml
COPY --chown=airflow:0 include/ ./include/
COPY --chown=airflow:0 plugins/ ./plugins/
COPY --chown=airflow:0 dags/ ./dags/
RUN mkdir -p /opt/airflow/modelops

USER airflow
