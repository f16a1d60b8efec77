# syntax=docker/dockerfile:1.7
# Two images from one build context:
#   docker build --target operator -t ghcr.io/finetune-operator/operator:0.1.0 .
#   docker build --target trainer  -t ghcr.io/finetune-operator/trainer:0.1.0 .
# Version pins must agree with operator/finetune_operator/api/versions.py and pyproject.toml;
# tests/unit/test_dockerfile.py checks that they do.

# Patch-level tag of the official slim image: reproducible without a registry round-trip to find a digest.
# Override with a digest (python:3.11.13-slim-bookworm@sha256:...) where your policy requires one.
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm
# The official Ray image whose Ray matches versions.RAY_VERSION (the RayJob's rayVersion), CUDA variant, Python 3.11.
ARG RAY_VERSION=2.60.0
ARG RAY_IMAGE=rayproject/ray:${RAY_VERSION}-py311-gpu

# ----------------------------------------------------------------------------------------------- builder
# Builds the project wheel, plus wheels of the operator's dependencies so that the operator stage installs
# offline from /wheels (--no-index): nothing resolved there can come from an unexpected index.
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator/ operator/
COPY trainer/ trainer/
# The project wheel is named by path, never by name, so a same-named package on PyPI cannot be picked up.
RUN pip wheel --no-deps --wheel-dir /dist . \
 && pip wheel --wheel-dir /wheels "$(echo /dist/finetune_operator-*.whl)[operator]"

# ---------------------------------------------------------------------------------------------- operator
# Python, Kopf, the kubernetes client, prometheus-client and pydantic: the `[operator]` extra only.
FROM ${PYTHON_IMAGE} AS operator
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-index --find-links /wheels "finetune-operator[operator]" \
 && groupadd --system --gid 65532 finetune \
 && useradd --system --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin finetune
# Numeric UID so that the kubelet can verify runAsNonRoot; the chart's securityContext uses the same IDs.
USER 65532:65532
WORKDIR /tmp
# 8080: Prometheus /metrics (FINETUNE_OPERATOR_METRICS_PORT). 8081: Kopf's /healthz, probed by the chart.
EXPOSE 8080 8081
# handlers.main: Kopf as `kopf run --standalone` would run it, plus leader election when FINETUNE_OPERATOR_LEADER_ELECTION
# is true (no Kopf peering objects: no CRD or RBAC for them).
ENTRYPOINT ["python", "-m", "finetune_operator.handlers", "--liveness=http://0.0.0.0:8081/healthz"]
# The watch scope; the chart and the manifests replace it with --all-namespaces or one --namespace=NS each.
CMD ["--all-namespaces"]

# ----------------------------------------------------------------------------------------------- trainer
# KubeRay runs `ray start` in these containers and the RayJob entrypoint `python -m finetune_trainer`.
FROM ${RAY_IMAGE} AS trainer
ARG RAY_VERSION
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# The image's own non-root user (uid 1000) owns its Python environment, so installs need no root.
USER ray
WORKDIR /home/ray
# One resolver run with torch, torchvision and Ray pinned beside the `[trainer,cloud]` extras (cloud: s3fs and
# gcsfs for s3:// and gs:// datasets, weights and outputs): nothing can move them,
# and ray[train] resolves to the image's own Ray.
RUN --mount=type=bind,from=builder,source=/dist,target=/dist \
    pip install \
      "torch==${TORCH_VERSION}" \
      "torchvision==${TORCHVISION_VERSION}" \
      "ray[train]==${RAY_VERSION}" \
      "$(echo /dist/finetune_operator-*.whl)[trainer,cloud]"
