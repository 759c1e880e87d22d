# syntax=docker/dockerfile:1
# safetynet: HL7 v2 safety-net service.
#
#   docker build -t safetynet .
#   docker run -p 2575:2575 -p 8080:8080 -v sn-var:/app/var safetynet          # the service
#   docker run --rm -v "$PWD/tests/fixtures/hl7v2:/data:ro" safetynet replay /data --format text
#
# Two stages: `build` compiles wheels for the project and every dependency (durable-rules has a
# C extension, so it needs gcc); the runtime image installs from those wheels only and has no
# compiler. Needs BuildKit (the default builder since Docker 23) for the wheel bind mount.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: wheels for the project and its dependencies ---------------------------------------
FROM ${PYTHON_IMAGE} AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY pyproject.toml ./
COPY engine ./engine
COPY adapters ./adapters
RUN pip wheel --wheel-dir /wheels .

# --- runtime ----------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    SAFETYNET_RULES=/app/rules

# From the build stage's wheels only (--no-index: nothing from the network, nothing compiled).
# A bind mount rather than COPY, so the wheels do not stay behind in an image layer.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-index --find-links=/wheels safetynet

RUN groupadd --gid 10001 safetynet \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /app \
        --shell /usr/sbin/nologin safetynet \
    && mkdir -p /app/var \
    && chown 10001:10001 /app/var

# Rules are configuration: owned by root, read-only to the service user.
COPY rules /app/rules

WORKDIR /app
USER 10001:10001
# Database (SQLite) and other state. Declared after the chown so a new volume starts out owned
# by the service user.
VOLUME ["/app/var"]

# 2575: HL7 v2 over MLLP; 8080: HTTP (/healthz, /readyz, /metrics).
EXPOSE 2575 8080

# The embedded default keeps its SQLite file in the volume; set SAFETYNET_DB for PostgreSQL.
ENV SAFETYNET_DB=sqlite:////app/var/safetynet.db

HEALTHCHECK --interval=30s --timeout=5s --start-period=30s \
    CMD ["python", "-c", "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=4).status == 200 else 1)"]

# serve handles SIGTERM itself (docker stop): it stops accepting, answers what it holds, exits 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["safetynet"]
CMD ["serve"]
