# syntax=docker/dockerfile:1
#
# natserve: one image for the registry and the workers; the command picks the role:
#   docker run natserve registry          docker run --gpus all natserve worker --device cuda:0
#
# torch comes from PyTorch's own index, so the build arg TORCH_VARIANT picks the build:
#   docker build -t natserve .                                    # cpu: small, for the registry
#   docker build -t natserve:cu124 --build-arg TORCH_VARIANT=cu124 .   # CUDA 12.4, GPU workers
# CUDA builds carry their own CUDA runtime; a GPU host needs only the NVIDIA driver and the
# NVIDIA Container Toolkit. TORCH_VERSION pins torch (empty: the newest of that index).
#
# State: Hugging Face downloads go to /data/hf (HF_HOME; mount a volume there so models are
# fetched once), natserve's own home is /data/natserve. The process runs as the unprivileged
# user `natserve` (uid 10001). deploy/healthcheck.py is at /opt/natserve/healthcheck.py for the
# containers' health checks (see compose.yaml).

# ---------------------------------------------------------------------------- build
FROM python:3.11-slim AS build

ARG TORCH_VARIANT=cpu
ARG TORCH_VERSION=

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# A virtual environment is one folder to copy into the runtime stage.
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# torch first, in a layer of its own: the largest download, and it changes least often.
# Without this, natserve's "torch>=2.4" would pull the default (CUDA) wheels from PyPI.
RUN pip install "torch${TORCH_VERSION:+==${TORCH_VERSION}}" \
        --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}"

WORKDIR /src
# Only what the distribution is built from (pyproject names README.md as its readme).
COPY pyproject.toml README.md ./
COPY broker_client ./broker_client
COPY registry_service ./registry_service
COPY workers ./workers
COPY natserve ./natserve
COPY migrations ./migrations
# The gateway extra: the same image runs `natserve gateway` (compose.yaml's gateway service).
RUN pip install ".[gateway]"

# ---------------------------------------------------------------------------- runtime
FROM python:3.11-slim AS runtime

ARG TORCH_VARIANT=cpu
LABEL org.opencontainers.image.title="natserve" \
      org.opencontainers.image.description="LLM inference worker pool driven by NATS" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.natserve.torch-variant="${TORCH_VARIANT}"

RUN groupadd --system --gid 10001 natserve \
    && useradd --system --uid 10001 --gid natserve --home-dir /data --shell /usr/sbin/nologin natserve \
    && mkdir -p /data/hf /data/natserve /opt/natserve \
    && chown -R natserve:natserve /data

COPY --from=build /opt/venv /opt/venv
COPY deploy/healthcheck.py /opt/natserve/healthcheck.py

# NVIDIA_DRIVER_CAPABILITIES tells the NVIDIA Container Toolkit which driver libraries to mount.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HOME=/data/hf \
    NATSERVE_HOME=/data/natserve \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

USER natserve
WORKDIR /data

ENTRYPOINT ["natserve"]
CMD ["--help"]
