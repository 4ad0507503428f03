# syntax=docker/dockerfile:1
#
# GPU inference worker: NVIDIA Triton Inference Server 2.51 (NGC 24.10, the version the tests run)
# with the bridge (Redis queue -> Triton -> Supabase) as the container's process.
#
#   docker build -t gpu-worker .
#   docker run --gpus all --shm-size=2g -v /workspace:/workspace -p 7861:7861 --env-file worker.env gpu-worker
#
# The image's own Python is 3.10; the package needs 3.11, and Triton's Python-backend stub must be
# built for the interpreter the models run in. So: Python 3.11 from the deadsnakes PPA in a venv,
# the image's tritonserver and its Python backend (libtriton_python.so), and the 3.11 stub that
# NVIDIA ships prebuilt inside the nvidia-pytriton 0.7.0 wheel (same Triton release, 2.51/24.10),
# installed with --no-deps only for that file. bridge.launcher assembles a fresh backend directory
# from the two on every start (see find_tritonserver) and puts the venv first on the stub's PATH.
FROM nvcr.io/nvidia/tritonserver:24.10-py3

ARG PYTHON_VERSION=3.11
# The torch release the tests ran (constraints.txt), as the CUDA 12.6 build: it runs on the image's
# CUDA 12.6 user space (the wheel brings its own CUDA libraries) and covers compute capability
# 7.0-9.0. Change TORCH_INDEX_URL, not TORCH_SPEC, if that index lacks the build.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126
ARG TORCH_SPEC=torch==2.13.0
ARG PYTRITON_SPEC=nvidia-pytriton==0.7.0

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

# Python 3.11 with its shared libpython (the stub links libpython3.11.so.1.0); tini reaps orphans
# (model stubs) and forwards SIGTERM; redis-server serves local mode when REDIS_URL is unset.
RUN apt-get update \
 && apt-get install -y --no-install-recommends software-properties-common gpg-agent \
 && add-apt-repository -y ppa:deadsnakes/ppa \
 && apt-get update \
 && apt-get install -y --no-install-recommends \
        python${PYTHON_VERSION} python${PYTHON_VERSION}-venv python${PYTHON_VERSION}-dev \
        libpython${PYTHON_VERSION} tini redis-server \
 && apt-get purge -y --auto-remove software-properties-common gpg-agent \
 && rm -rf /var/lib/apt/lists/*

RUN python${PYTHON_VERSION} -m venv /opt/venv
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# CUDA torch first, pinned for everything installed after it (nothing may swap it for a CPU build).
RUN pip install --upgrade pip setuptools wheel \
 && pip install --index-url ${TORCH_INDEX_URL} ${TORCH_SPEC} \
 && pip freeze | grep -i '^torch==' > /opt/venv/constraints.txt \
 && cat /opt/venv/constraints.txt

WORKDIR /app

# Dependencies in their own layer: install the project with empty packages, then the real code.
# constraints.txt: every version the test suite ran with, so the image runs the same diffusers,
# transformers, tritonclient ... as CI.
COPY pyproject.toml constraints.txt /app/
RUN mkdir -p bridge model_kit && touch bridge/__init__.py model_kit/__init__.py \
 && pip install -c /opt/venv/constraints.txt -c /app/constraints.txt "/app[gpu]" \
 && pip install --no-deps ${PYTRITON_SPEC} \
 && rm -rf /app/bridge /app/model_kit /app/build /app/*.egg-info \
 && python -c "import pathlib, importlib.util as u; \
root = pathlib.Path(next(iter(u.find_spec('pytriton').submodule_search_locations))); \
stub = root / 'tritonserver/python_backend_stubs/${PYTHON_VERSION}/triton_python_backend_stub'; \
assert stub.exists(), stub; print('python backend stub:', stub)"

COPY bridge /app/bridge
COPY model_kit /app/model_kit
RUN pip install --no-deps --force-reinstall /app && rm -rf /app/build /app/*.egg-info
# The secret-args shim (bridge/native/secret_args.c): keeps TRITON_API_KEY off tritonserver's
# command line (docs/DEPLOY.md, "Secrets"). Built here; the compiler does not stay in the image.
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
 && mkdir -p /opt/gpu-worker \
 && gcc -shared -fPIC -O2 -o /opt/gpu-worker/secret_args.so /app/bridge/native/secret_args.c \
 && apt-get purge -y --auto-remove gcc libc6-dev && rm -rf /var/lib/apt/lists/*
ENV SECRET_ARGS_SHIM=/opt/gpu-worker/secret_args.so
COPY model_repository /app/model_repository
COPY docker/start.sh /app/docker/start.sh
RUN chmod 0755 /app/docker/start.sh

# Triton listens on 127.0.0.1 only (TRITON_HOST); the bridge API is the one public port.
# REQUIRE_GPU=1: start-up checks fail on a machine without a visible GPU (set 0 for a CPU smoke test).
ENV TRITONSERVER_BIN=/opt/tritonserver/bin/tritonserver \
    MODEL_REPOSITORY=/app/model_repository \
    MODELS_DIR=/workspace/models \
    OUTPUT_DIR=/workspace/outputs \
    HF_HUB_CACHE=/workspace/models/huggingface_cache \
    HF_HUB_OFFLINE=1 \
    TRITON_HOST=127.0.0.1 \
    API_HOST=0.0.0.0 \
    API_PORT=7861 \
    DEVICE=auto \
    REQUIRE_GPU=1

EXPOSE 7861

# Loading 30 GB of weights takes minutes: failures only count after the start period.
# http://127.0.0.1:7861/health, following API_PORT when it is changed.
HEALTHCHECK --interval=30s --timeout=10s --start-period=600s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('API_PORT', '7861') + '/health', timeout=8)" || exit 1

# NVIDIA's entrypoint (banner, CUDA compatibility setup) under tini, then our start-up script.
ENTRYPOINT ["/usr/bin/tini", "--", "/opt/nvidia/nvidia_entrypoint.sh"]
CMD ["/app/docker/start.sh"]
