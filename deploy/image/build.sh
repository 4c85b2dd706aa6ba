#!/usr/bin/env bash
# `make image`: build the ConServe image from the repository's Dockerfile with buildah, no Docker engine needed.
#
#   deploy/image/build.sh                          # conserve:<version> on the local Debian base (base.sh)
#   BASE_IMAGE=python:3.11-slim deploy/image/build.sh   # on the Dockerfile's default base, where a registry is
#
# The image lands in the local container storage (root: /var/lib/containers), where `podman run` finds it.
# The build's RUN steps use the host's network and trust the host's CA bundle (mounted read-only for the build
# only, never copied into the image), so pip reaches PyPI wherever the host does, through a proxy too.
set -euo pipefail

cd "$(dirname "$0")/../.."
START=$SECONDS
VERSION=$(sed -nE 's/^version = "([^"]+)"/\1/p' pyproject.toml | head -1)
IMAGE=${IMAGE:-conserve:$VERSION}
BASE_IMAGE=${BASE_IMAGE:-localhost/conserve-base:bookworm}
# Chroot isolation for RUN steps: it needs no OCI runtime, cgroups nor rlimits (in a sandbox crun refuses hybrid
# cgroups and runc cannot set rlimits without CAP_SYS_RESOURCE); the build is of our own Dockerfile.
export BUILDAH_ISOLATION=${BUILDAH_ISOLATION:-chroot}
BUILDAH=(buildah ${BUILDAH_STORAGE_DRIVER:+--storage-driver="$BUILDAH_STORAGE_DRIVER"})

for tool in buildah debootstrap; do
  command -v "$tool" >/dev/null || {
    echo "$tool is missing: apt-get install -y buildah podman debootstrap (as root)" >&2
    exit 1
  }
done
[ "$(id -u)" = 0 ] || { echo "deploy/image/build.sh runs as root (debootstrap, container storage)" >&2; exit 1; }

if [ "$BASE_IMAGE" = localhost/conserve-base:bookworm ]; then
  deploy/image/base.sh "$BASE_IMAGE"
  echo "base image ready after $((SECONDS - START))s"
fi

# pip in the build trusts what the host trusts (a TLS-inspecting proxy's CA included): the host's bundle and
# a pip.conf naming it, visible to RUN steps only.
VOLUMES=()
HOST_CA=/etc/ssl/certs/ca-certificates.crt
if [ -f "$HOST_CA" ]; then
  PIP_CONF=$(mktemp /tmp/conserve-image-pip.XXXXXX)
  trap 'rm -f "$PIP_CONF"' EXIT
  printf '[global]\ncert = /run/conserve-host-ca.crt\n' >"$PIP_CONF"
  chmod 644 "$PIP_CONF"
  VOLUMES=(--volume "$HOST_CA:/run/conserve-host-ca.crt:ro" --volume "$PIP_CONF:/etc/pip.conf:ro")
fi

BUILD_START=$SECONDS
PREVIOUS=$("${BUILDAH[@]}" images --quiet --no-trunc "$IMAGE" 2>/dev/null | head -1 || true)
"${BUILDAH[@]}" bud --network=host --build-arg BASE_IMAGE="$BASE_IMAGE" "${VOLUMES[@]}" \
  --tag "$IMAGE" --file Dockerfile .
# The image this build replaced, now untagged: removed, so rebuilds do not fill the disk.
if [ -n "$PREVIOUS" ] && [ "$PREVIOUS" != "$("${BUILDAH[@]}" images --quiet --no-trunc "$IMAGE" | head -1)" ]; then
  "${BUILDAH[@]}" rmi "$PREVIOUS" >/dev/null 2>&1 || true
fi
SIZE=$("${BUILDAH[@]}" images --format '{{.Size}}' "$IMAGE" | head -1)
echo "image $IMAGE: built in $((SECONDS - BUILD_START))s on $BASE_IMAGE (total $((SECONDS - START))s); size $SIZE"
