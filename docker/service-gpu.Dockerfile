# syntax=docker/dockerfile:1
# The model service, GPU build (onnxruntime-gpu on CUDA 12 + cuDNN 9). Build from the repository root:
#   docker build -f docker/service-gpu.Dockerfile -t sluice/service:0.1.0-gpu .
# Needs the NVIDIA container toolkit on the node; the chart requests nvidia.com/gpu for `runtime: gpu`.
# onnxruntime and onnxruntime-gpu install into the same package folder: only the gpu extra here.
ARG CUDA_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04

FROM ${CUDA_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/sluice
WORKDIR /src
COPY pyproject.toml README.md ./
# The hash-checked versions the tests ran on (requirements/runtime-gpu.txt), then sluice itself.
COPY requirements/runtime-gpu.txt ./requirements/
COPY protos ./protos
COPY services ./services
COPY mesh ./mesh
COPY gateway ./gateway
RUN /opt/sluice/bin/pip install --require-hashes -r requirements/runtime-gpu.txt \
 && /opt/sluice/bin/pip install --no-deps .

FROM ${CUDA_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 sluice \
 && useradd --system --uid 10001 --gid 10001 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin sluice \
 && mkdir -p /models && chown 10001:10001 /models
COPY --from=build /opt/sluice /opt/sluice
ENV PATH=/opt/sluice/bin:$PATH HOME=/tmp PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    SLUICE_REPO=/models SLUICE_HOST=0.0.0.0 SLUICE_METRICS_HOST=0.0.0.0 SLUICE_LOG_FORMAT=json
USER 10001:10001
# gRPC, admin (metrics and /debug on loopback unless configured), KServe v2 REST
EXPOSE 8001 8002 8003
ENTRYPOINT ["sluice"]
CMD ["serve"]
