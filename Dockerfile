# syntax=docker/dockerfile:1.7
# One image for every role of a run (`python -m services.guidance_cache | rollout | learner | controller`), in two
# targets:
#
#   docker build --target cpu  -t npo:cpu  .   # python:3.11-slim, CPU torch, transformers rollout, DeepSpeed on gloo
#   docker build --target cuda -t npo:cuda .   # CUDA: vLLM (its CUDA torch), DeepSpeed with NCCL
#
# Both: the project installed (not editable) in the virtualenv /opt/npo (on PATH, so `python` and `npo` are its),
# the non-root user npo (uid 10001, HOME=/home/npo, where the model cache ~/.cache/npo and DeepSpeed's JIT cache
# live), /data owned by npo (run folders, checkpoints, published weights: mount one volume there for every role),
# the presets of configs/ under /etc/npo/configs. No weights are downloaded at build or run time (the tiny preset
# is built and warmed on first use, under model.cache_dir).
#
# HEALTHCHECK: grpc.health.v1 at $NPO_HEALTH_ADDRESS (default 127.0.0.1:50051; set it to the role's port, e.g.
# 127.0.0.1:50053 for the learner). The controller serves HTTP: give it its own check (GET /healthz), as
# docker-compose.yml does.

ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.9.1-runtime-ubuntu24.04
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG VLLM_VERSION=0.32.0
ARG DEEPSPEED_VERSION=0.19.8

# ---------------------------------------------------------------------------------------------------------------
# cpu: build the virtualenv, then copy it into a clean slim image.
FROM ${PYTHON_IMAGE} AS cpu-build
ARG TORCH_VERSION
ARG TORCH_INDEX_URL
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PATH=/opt/npo/bin:$PATH
RUN python -m venv /opt/npo
# The CPU torch first, pinned: PyPI's torch for Linux is the multi-GB CUDA build.
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY constraints/ constraints/
COPY npo/ npo/
COPY services/ services/
# constraints/cpu.txt is the lock of the CPU install (its torch==2.13.0 is met by 2.13.0+cpu). DS_BUILD_OPS=0: no
# DeepSpeed op is compiled here; the one the CPU engine needs is JIT-compiled on its first start (g++ below).
RUN DS_BUILD_OPS=0 pip install -c constraints/cpu.txt ".[deepspeed]"

FROM ${PYTHON_IMAGE} AS cpu
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*
RUN useradd --uid 10001 --create-home --home-dir /home/npo --shell /usr/sbin/nologin npo \
    && mkdir -p /data /home/npo/.cache/npo /etc/npo \
    && chown -R npo:npo /data /home/npo
COPY --from=cpu-build /opt/npo /opt/npo
COPY configs/ /etc/npo/configs/
ENV PATH=/opt/npo/bin:$PATH \
    HOME=/home/npo \
    PYTHONUNBUFFERED=1 \
    DS_BUILD_OPS=0 \
    NPO_HEALTH_ADDRESS=127.0.0.1:50051
WORKDIR /home/npo
USER npo
VOLUME ["/data"]
EXPOSE 50051 50052 50053 9400 8080
HEALTHCHECK --interval=10s --timeout=5s --start-period=180s --retries=3 CMD python -c "import os, sys, grpc; \
from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; \
r = g.HealthStub(grpc.insecure_channel(os.environ['NPO_HEALTH_ADDRESS'])).Check(h.HealthCheckRequest(), timeout=4); \
sys.exit(r.status != h.HealthCheckResponse.SERVING)"
CMD ["npo", "--help"]

# ---------------------------------------------------------------------------------------------------------------
# cuda: vLLM pins its own CUDA torch and transformers; DeepSpeed and the project are installed next to them (the
# project's dependencies are ranges, so pip keeps what vLLM installed). The torch wheel carries its CUDA libraries;
# the base image gives the CUDA runtime and the NVIDIA container variables. The host driver must support the CUDA
# version of vLLM's torch.
FROM ${CUDA_IMAGE} AS cuda-build
ARG VLLM_VERSION
ARG DEEPSPEED_VERSION
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PATH=/opt/npo/bin:$PATH DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev g++ \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/npo
RUN pip install "vllm==${VLLM_VERSION}"
RUN DS_BUILD_OPS=0 pip install "deepspeed==${DEEPSPEED_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY npo/ npo/
COPY services/ services/
RUN DS_BUILD_OPS=0 pip install "."

FROM ${CUDA_IMAGE} AS cuda
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 g++ \
    && rm -rf /var/lib/apt/lists/*
RUN useradd --uid 10001 --create-home --home-dir /home/npo --shell /usr/sbin/nologin npo \
    && mkdir -p /data /home/npo/.cache/npo /etc/npo \
    && chown -R npo:npo /data /home/npo
COPY --from=cuda-build /opt/npo /opt/npo
COPY configs/ /etc/npo/configs/
ENV PATH=/opt/npo/bin:$PATH \
    HOME=/home/npo \
    PYTHONUNBUFFERED=1 \
    DS_BUILD_OPS=0 \
    NPO_HEALTH_ADDRESS=127.0.0.1:50051
WORKDIR /home/npo
USER npo
VOLUME ["/data"]
EXPOSE 50051 50052 50053 9400 8080
HEALTHCHECK --interval=10s --timeout=5s --start-period=300s --retries=3 CMD python -c "import os, sys, grpc; \
from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; \
r = g.HealthStub(grpc.insecure_channel(os.environ['NPO_HEALTH_ADDRESS'])).Check(h.HealthCheckRequest(), timeout=4); \
sys.exit(r.status != h.HealthCheckResponse.SERVING)"
CMD ["npo", "--help"]
