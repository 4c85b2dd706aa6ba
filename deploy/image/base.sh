#!/usr/bin/env bash
# A local base image for the Dockerfile's BASE_IMAGE, made from Debian packages only: where no registry can be
# pulled from (no Docker Hub), `debootstrap` Debian 12 (bookworm) with Python 3.11 from the Debian mirror apt
# already uses, and import the root filesystem with buildah. It stands in for python:3.11-slim: `python` and
# `python3` on PATH, venv/ensurepip, CA certificates, groupadd/useradd.
#
#   deploy/image/base.sh [IMAGE]        # default localhost/conserve-base:bookworm
#
# Cached twice: in buildah's local storage (reused as is) and as an OCI archive under
# $CONSERVE_CACHE_DIR/image (default ~/.cache/conserve/image), named by this script's hash, so a machine whose
# container storage is fresh but whose cache directory is kept skips debootstrap. Needs root.
set -euo pipefail

IMAGE=${1:-localhost/conserve-base:bookworm}
SUITE=bookworm
PACKAGES=(python3.11 python3.11-venv python-is-python3 ca-certificates)
HERE=$(cd "$(dirname "$0")" && pwd)
CACHE_DIR=${CONSERVE_CACHE_DIR:-$HOME/.cache/conserve}/image
ARCHIVE="$CACHE_DIR/base-$SUITE-$(sha256sum "$HERE/base.sh" | cut -c1-12).oci.tar"
BUILDAH=(buildah ${BUILDAH_STORAGE_DRIVER:+--storage-driver="$BUILDAH_STORAGE_DRIVER"})

# The mirror apt uses here (deb822 or one-line sources), else Debian's default.
mirror() {
  local uri
  uri=$(grep -hsE '^(URIs:|deb) ' /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list \
          /etc/apt/sources.list | grep -E 'debian/?( |$)' | grep -v security | head -1 |
        sed -E 's/^URIs: *//; s/^deb (\[[^]]*\] )?//; s/ .*//')
  echo "${DEBIAN_MIRROR:-${uri:-http://deb.debian.org/debian}}"
}

if "${BUILDAH[@]}" inspect --type image "$IMAGE" >/dev/null 2>&1; then
  echo "base image $IMAGE: in local storage"
  exit 0
fi
if [ -f "$ARCHIVE" ]; then
  echo "base image $IMAGE: from the cache $ARCHIVE"
  id=$("${BUILDAH[@]}" pull --quiet "oci-archive:$ARCHIVE" | tail -1)
  "${BUILDAH[@]}" tag "$id" "$IMAGE"
  exit 0
fi

WORK=$(mktemp -d /var/tmp/conserve-base.XXXXXX)
cleanup() {
  umount "$WORK/rootfs/proc" 2>/dev/null || true
  rm -rf --one-file-system "$WORK"
  "${BUILDAH[@]}" rm conserve-base-work >/dev/null 2>&1 || true
}
trap cleanup EXIT
ROOTFS="$WORK/rootfs"
MIRROR=$(mirror)
echo "debootstrap $SUITE from $MIRROR, then ${PACKAGES[*]}"
debootstrap --variant=minbase "$SUITE" "$ROOTFS" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 ||
  { tail -30 "$WORK/debootstrap.log" "$ROOTFS/debootstrap/debootstrap.log"; exit 1; }
# Then the point releases and security updates, and Python with apt's dependency resolution (debootstrap's
# --include resolves too little: python3.11-venv fails to configure).
SECURITY=${MIRROR%/debian}/debian-security
[ "$SECURITY" != "$MIRROR/debian-security" ] || SECURITY=http://deb.debian.org/debian-security
printf 'deb %s %s main\ndeb %s %s-updates main\ndeb %s %s-security main\n' \
  "$MIRROR" "$SUITE" "$MIRROR" "$SUITE" "$SECURITY" "$SUITE" >"$ROOTFS/etc/apt/sources.list"
cp /etc/resolv.conf "$ROOTFS/etc/resolv.conf"
mount -t proc proc "$ROOTFS/proc"
in_root() { chroot "$ROOTFS" /usr/bin/env DEBIAN_FRONTEND=noninteractive LANG=C.UTF-8 "$@" >>"$WORK/apt.log" 2>&1; }
{ in_root apt-get update -qq && in_root apt-get upgrade -y -qq &&
  in_root apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" && in_root apt-get clean; } ||
  { tail -30 "$WORK/apt.log"; exit 1; }
umount "$ROOTFS/proc"
: >"$ROOTFS/etc/resolv.conf"
# What a slim image leaves out: package caches and lists, documentation, manuals, locales but C.
rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/log/* \
       "$ROOTFS"/usr/share/doc/* "$ROOTFS"/usr/share/man/* "$ROOTFS"/usr/share/info/*
find "$ROOTFS"/usr/share/locale -mindepth 1 -maxdepth 1 ! -name 'locale.alias' -exec rm -rf {} +
tar --numeric-owner -C "$ROOTFS" -cf "$WORK/rootfs.tar" .

"${BUILDAH[@]}" from --name conserve-base-work scratch >/dev/null
"${BUILDAH[@]}" add conserve-base-work "$WORK/rootfs.tar" / >/dev/null
"${BUILDAH[@]}" config \
  --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --env LANG=C.UTF-8 \
  --cmd python3 \
  --label org.opencontainers.image.description="Debian $SUITE with Python 3.11 (debootstrap; ConServe's local base)" \
  conserve-base-work
"${BUILDAH[@]}" commit --quiet --rm conserve-base-work "$IMAGE" >/dev/null
mkdir -p "$CACHE_DIR"
"${BUILDAH[@]}" push --quiet "$IMAGE" "oci-archive:$ARCHIVE.tmp:$IMAGE" && mv "$ARCHIVE.tmp" "$ARCHIVE"
echo "base image $IMAGE: built ($(du -h "$ARCHIVE" | cut -f1) archive in $ARCHIVE)"
