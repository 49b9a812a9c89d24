# syntax=docker/dockerfile:1
# The FluxKV image: fluxkv-server by default; fluxkv, fluxkv-cdc, fluxkv-bench and fluxkv-gateway are installed too
# (docker run --entrypoint fluxkv-cdc ...). deploy/docker-compose.yml runs the local stack from it.

# Wheels of FluxKV and of every dependency. They all publish binary wheels, so no compiler is needed.
FROM python:3.11-slim AS builder
WORKDIR /src
COPY pyproject.toml README.md ./
COPY fluxkv ./fluxkv
RUN pip wheel --no-cache-dir --disable-pip-version-check --wheel-dir /wheels .

# The runtime: those wheels installed from a bind mount, so they never become a layer of the image. It sets no
# FLUX_* variable, as fluxkv-cdc runs from it too: give a node FLUX_SERVER_HOST=0.0.0.0 to reach it from outside.
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-cache-dir --disable-pip-version-check --root-user-action=ignore \
        --no-index --find-links=/wheels fluxkv \
    && useradd --system --user-group --uid 10001 --home-dir /data --no-create-home \
        --shell /usr/sbin/nologin fluxkv \
    && install -d -o fluxkv -g fluxkv -m 0750 /data
# The append-only file (FLUX_AOF_FILENAME=/data/fluxkv.aof) and fluxkv-cdc's output go here; a named volume
# mounted on /data starts with this ownership.
VOLUME ["/data"]
WORKDIR /data
USER fluxkv
# gRPC (FLUX_SERVER_PORT) and the admin HTTP port: /metrics, /healthz, /readyz (FLUX_ADMIN_PORT); fluxkv-gateway's
# HTTP API (FLUX_GATEWAY_PORT).
EXPOSE 50052 6060 8080
# Asks the node's grpc.health.v1 service on FLUX_SERVER_PORT, read from the container's environment.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-m", "fluxkv.server.healthcheck"]
ENTRYPOINT ["fluxkv-server"]
