#!/usr/bin/env bash
# `make image-check`: build deploy/Dockerfile as a CPU image, run it the way the Kubernetes manifests do, and check
# that it serves and drains (deploy/image_check.py does the running and the checks). Not part of `make test`.
#
#   bash deploy/image_check.sh            (from the repository root, with glmserve installed in $PYTHON)
#
# What it uses, each picked from what the machine has:
#   builder   `docker buildx`, else podman, else buildah (Debian's docker.io has no buildx; its podman and buildah
#             build this Dockerfile)
#   runtime   docker with a reachable daemon; as root, a dockerd that is installed but not running is started for
#             the check and stopped after it. An image built by podman/buildah is handed over with `save | docker load`.
#   base      $BASE_IMAGE if set; else a Debian bookworm base made here with debootstrap from Debian's packages
#             (for machines that reach no container registry), kept as localhost/glmserve-base:bookworm; else
#             ubuntu:22.04 from the registry.
#   torch     the CPU build: from $TORCH_INDEX_URL (default: PyTorch's CPU index), or from a folder of wheels
#             ($TORCH_WHEELS, default: a folder on pip's find-links that holds a CPU torch wheel), which is served
#             to the build over loopback. $TORCH_PIN (the Makefile's TORCH_CPU) picks the version.
# Environment: IMAGE (default localhost/glmserve:image-check), PYTHON, OUT (a JSON report, default results/image_check.json).
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${IMAGE:-localhost/glmserve:image-check}
PYTHON=${PYTHON:-python3}
TORCH_PIN=${TORCH_PIN:-torch==2.13.0}
OUT=${OUT:-results/image_check.json}
BASE_TAG=localhost/glmserve-base:bookworm
started=$(date +%s)
cleanup=()
trap 'for c in "${cleanup[@]}"; do eval "$c" || true; done' EXIT

say() { echo "image-check: $*"; }
die() { echo "image-check: error: $*" >&2; exit 1; }

# ---- the builder ---------------------------------------------------------------------------------------------
if docker buildx version >/dev/null 2>&1; then
    builder=docker
elif command -v podman >/dev/null 2>&1; then
    builder=podman
elif command -v buildah >/dev/null 2>&1; then
    builder=buildah
else
    die "no image builder: install Docker with buildx, or podman or buildah (Debian: apt-get install podman buildah)"
fi

# ---- the runtime: docker, started here if need be ------------------------------------------------------------
if ! docker info >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v dockerd >/dev/null 2>&1; then
        say "starting dockerd for the check (stopped again at the end)"
        dockerd >/tmp/glmserve-image-check-dockerd.log 2>&1 &
        dockerd_pid=$!
        cleanup+=("kill $dockerd_pid; wait $dockerd_pid")
        for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
    fi
    docker info >/dev/null 2>&1 || die "no Docker daemon to run the image (Debian: apt-get install docker.io, then dockerd)"
fi

image_exists() {
    case $builder in
        docker) docker image inspect "$1" >/dev/null 2>&1 ;;
        *) "$builder" image exists "$1" 2>/dev/null || "$builder" inspect "$1" >/dev/null 2>&1 ;;
    esac
}

# ---- the base image ------------------------------------------------------------------------------------------
if [ -z "${BASE_IMAGE:-}" ]; then
    if image_exists "$BASE_TAG"; then
        BASE_IMAGE=$BASE_TAG
    elif command -v debootstrap >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        say "making $BASE_TAG with debootstrap (Debian bookworm, minbase)"
        rootfs=$(mktemp -d /tmp/glmserve-rootfs.XXXXXX)
        cleanup+=("rm -rf $rootfs")
        debootstrap --variant=minbase bookworm "$rootfs" http://deb.debian.org/debian >/dev/null
        rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
        case $builder in
            docker) tar -C "$rootfs" -c . | docker import - "$BASE_TAG" >/dev/null ;;
            *) tar -C "$rootfs" -c . | "$builder" import - "$BASE_TAG" >/dev/null ;;
        esac
        BASE_IMAGE=$BASE_TAG
    else
        BASE_IMAGE=ubuntu:22.04
    fi
fi
say "base image $BASE_IMAGE, builder $builder"

# ---- where the CPU torch comes from ---------------------------------------------------------------------------
TORCH_VERSION=${TORCH_PIN#torch}
TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}
TORCH_FIND_LINKS=""
host_network=""
if [ -z "${TORCH_WHEELS:-}" ]; then
    for dir in ${PIP_FIND_LINKS:-} $("$PYTHON" -m pip config get global.find-links 2>/dev/null || true); do
        if compgen -G "$dir/torch-*+cpu-*.whl" >/dev/null; then TORCH_WHEELS=$dir; break; fi
    done
fi
if [ -n "${TORCH_WHEELS:-}" ]; then
    port=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    "$PYTHON" -m http.server --bind 127.0.0.1 --directory "$TORCH_WHEELS" "$port" >/dev/null 2>&1 &
    cleanup+=("kill $!")
    TORCH_FIND_LINKS=http://127.0.0.1:$port/
    TORCH_INDEX_URL=https://pypi.org/simple   # torch's own dependencies; the +cpu wheel outranks PyPI's torch
    host_network=1                            # the build's RUN steps reach the wheel server on the host's loopback
    say "torch$TORCH_VERSION from $TORCH_WHEELS (served to the build on $TORCH_FIND_LINKS)"
fi

# ---- build -----------------------------------------------------------------------------------------------------
build_args=(-f deploy/Dockerfile -t "$IMAGE"
            --build-arg "BASE_IMAGE=$BASE_IMAGE" --build-arg "TORCH_INDEX_URL=$TORCH_INDEX_URL"
            --build-arg "TORCH_FIND_LINKS=$TORCH_FIND_LINKS" --build-arg "TORCH_VERSION=$TORCH_VERSION")
if [ -n "$host_network" ]; then build_args+=(--network host); fi
# pip's own CA bundle (a proxy that re-signs TLS needs its CA), passed as a build secret that no layer keeps.
pip_ca=${PIP_CERT:-$("$PYTHON" -m pip config get global.cert 2>/dev/null || true)}
if [ -n "$pip_ca" ] && [ -f "$pip_ca" ]; then
    build_args+=(--secret "id=pip-ca,src=$pip_ca")
fi
build_started=$(date +%s)
case $builder in
    docker) docker buildx build --load "${build_args[@]}" . ;;
    podman) podman build --isolation chroot --ignorefile deploy/Dockerfile.dockerignore "${build_args[@]}" . ;;
    buildah) buildah bud --isolation chroot --ignorefile deploy/Dockerfile.dockerignore "${build_args[@]}" . ;;
esac
build_s=$(( $(date +%s) - build_started ))
if [ "$builder" != docker ]; then
    say "handing the image to docker ($builder save | docker load)"
    "$builder" save "$IMAGE" | docker load >/dev/null
fi

# ---- run it as the manifests do, and check -------------------------------------------------------------------
"$PYTHON" deploy/image_check.py --image "$IMAGE" --build-seconds "$build_s" --out "$OUT"
say "done in $(( $(date +%s) - started )) s (build ${build_s} s)"
