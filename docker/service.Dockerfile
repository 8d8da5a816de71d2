# syntax=docker/dockerfile:1
# The model service, CPU build (onnxruntime). Build from the repository root:
#   docker build -f docker/service.Dockerfile -t sluice/service:0.1.0 .
# Runs `sluice serve`; configure it with SLUICE_* environment variables (the Helm chart does).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/sluice
WORKDIR /src
COPY pyproject.toml README.md ./
# The hash-checked versions the tests ran on (requirements/runtime.txt), then sluice itself.
COPY requirements/runtime.txt ./requirements/
COPY protos ./protos
COPY services ./services
COPY mesh ./mesh
COPY gateway ./gateway
RUN /opt/sluice/bin/pip install --require-hashes -r requirements/runtime.txt \
 && /opt/sluice/bin/pip install --no-deps .

FROM ${PYTHON_IMAGE}
COPY --from=build /opt/sluice /opt/sluice
# A fixed numeric user so that Kubernetes' runAsNonRoot can verify it; HOME on /tmp, which the
# chart mounts as an emptyDir (onnxruntime writes ~/.cache on first use; the root fs is read-only).
RUN groupadd --system --gid 10001 sluice \
 && useradd --system --uid 10001 --gid 10001 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin sluice \
 && mkdir -p /models && chown 10001:10001 /models
ENV PATH=/opt/sluice/bin:$PATH HOME=/tmp PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    SLUICE_REPO=/models SLUICE_HOST=0.0.0.0 SLUICE_METRICS_HOST=0.0.0.0 SLUICE_LOG_FORMAT=json
USER 10001:10001
# gRPC, admin (metrics and /debug on loopback unless configured), KServe v2 REST
EXPOSE 8001 8002 8003
ENTRYPOINT ["sluice"]
CMD ["serve"]
