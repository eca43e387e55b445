# syntax=docker/dockerfile:1
#
# Worker image for the protect job: used by the Ray head, the Ray workers, the
# KubeRay autoscaler sidecar and the KubeRay submitter pod.
#
#   docker build -t ghcr.io/music-unlearnable/worker:0.1.0 .
#
# CUDA: the PyPI wheel of torch 2.14.1 is the CUDA build and brings the CUDA
# runtime, cuDNN, cuBLAS and NCCL as nvidia-* wheels, so the base image only
# needs Python; the NVIDIA container toolkit on GPU nodes injects the driver
# (libcuda, nvidia-smi) because of the NVIDIA_* variables below. The same image
# runs on CPU-only nodes (cpu-dev overlay). Debian 12 + Python 3.11 is the
# environment the pins below were verified on (ENVIRONMENT.md).
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

# ffmpeg: codecs for the robustness transforms; libsndfile1: soundfile (its
# wheel bundles one too); wget: KubeRay's default readiness/liveness probes
# run wget inside the Ray container; tini: reaps Ray's child processes.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ffmpeg libsndfile1 wget ca-certificates tini \
 && rm -rf /var/lib/apt/lists/*

# HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE: laion-clap fetches tokenizers from the
# Hugging Face hub at import time and retries for minutes without network; the
# pipeline only uses the audio side, so the hub is never needed.
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

RUN python -m venv /opt/venv

# Pins (ENVIRONMENT.md): laion-clap needs numpy<2, and pyarrow 26 refuses
# numpy<2, so pyarrow<26; torch/torchvision must be this pair. ray[default] (not
# only ray[data]) is needed in the cluster: the dashboard, the job-submission
# server and the Prometheus metrics export live in the "default" extra.
RUN printf '%s\n' \
      'torch==2.14.1' \
      'torchvision==0.29.1' \
      'numpy<2' \
      'pyarrow<26' \
      'ray==2.60.0' \
      'laion-clap==1.1.7' \
      > /opt/constraints.txt \
 && pip install -c /opt/constraints.txt \
      torch torchvision numpy pyarrow "ray[default,data]" \
      laion-clap webdataset s3fs soundfile julius pyyaml prometheus-client

# The project itself (pyproject.toml at the repository root). Dependencies
# already installed above are kept; the constraints stop pip from moving them.
WORKDIR /app
COPY . /app
RUN pip install -c /opt/constraints.txt /app \
 && python -c "import numpy, pyarrow, torch, torchvision, ray; assert numpy.__version__ < '2'; print('torch', torch.__version__, 'ray', ray.__version__, 'pyarrow', pyarrow.__version__)"

# pyproject installs `jobs` as a package too; PYTHONPATH keeps
# `python -m jobs.protect_catalog` importable from any working directory (Ray's
# job supervisor does not start the driver in /app) should that ever change.
ENV PYTHONPATH=/app

# Non-root user; uid/gid 1000 match the pods' securityContext in k8s/.
RUN groupadd --gid 1000 ray \
 && useradd --uid 1000 --gid 1000 --create-home --home-dir /home/ray --shell /bin/bash ray
USER 1000:1000
ENV HOME=/home/ray

ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["unlearnable", "--help"]
