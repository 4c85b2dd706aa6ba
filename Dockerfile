# syntax=docker/dockerfile:1
# The ConServe image: one image, two commands.
#   docker build -t conserve:0.1.0 .
#   docker run --rm conserve:0.1.0 operator --help      # the Kopf operator
#   docker run --rm conserve:0.1.0 extender --help      # the kube-scheduler extender
# The Helm chart (charts/conserve) runs it as `conserve operator ...` and `conserve extender ...`.
#
# BASE_IMAGE: any Debian-like image with Python 3.11 (`python`, venv, groupadd/useradd). Where Docker Hub cannot
# be reached, `make image` builds one from Debian packages and passes it here (deploy/image/README.md).
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# Only what the package needs to build; see .dockerignore.
COPY pyproject.toml README.md ./
COPY operator/ operator/
# A wheel first, then install it into a virtual environment that the runtime stage copies whole.
RUN python -m venv /opt/conserve \
 && /opt/conserve/bin/pip install --upgrade pip \
 && /opt/conserve/bin/pip wheel --no-deps --wheel-dir /wheels . \
 && /opt/conserve/bin/pip install /wheels/conserve-*.whl

FROM ${BASE_IMAGE}
LABEL org.opencontainers.image.title="conserve" \
      org.opencontainers.image.description="ConServe: conversation-level disaggregated LLM serving on Kubernetes" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/conserve/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
COPY --from=build /opt/conserve /opt/conserve
# A fixed non-root user, matching the chart's runAsUser; no home directory to write to, as the chart mounts the
# root filesystem read-only (and an emptyDir on /tmp).
RUN groupadd --system --gid 10001 conserve \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin conserve
USER 10001:10001
WORKDIR /tmp
EXPOSE 8080 8888 9100
ENTRYPOINT ["conserve"]
CMD ["operator", "--all-namespaces"]
