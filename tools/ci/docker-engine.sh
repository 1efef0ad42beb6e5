#!/usr/bin/env bash
# Make a Docker engine answer on this machine, installing it first if needed.
#
# Idempotent: installs Debian's docker.io, docker-compose and debootstrap only when
# missing, and starts dockerd only when no engine answers. The daemon gets no bridge
# and no iptables rules, so every build and container uses the host network and all
# traffic stays on loopback.
#
# Environment:
#   DOCKER_ENGINE_WAIT  seconds to wait for `docker info` after starting dockerd (default 60)
#   DOCKERD_LOG         where dockerd writes its log (default /var/log/dockerd.log)
set -euo pipefail

wait_seconds=${DOCKER_ENGINE_WAIT:-60}
log_file=${DOCKERD_LOG:-/var/log/dockerd.log}

say() { printf 'docker-engine: %s\n' "$*" >&2; }

engine_answers() {
    timeout 10 docker info --format '{{.ServerVersion}}' >/dev/null 2>&1
}

missing=()
command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
# A docker CLI may exist without a daemon, so the daemon binary decides for docker.io.
command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)

if ((${#missing[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        say "need root to install: ${missing[*]}"
        exit 1
    fi
    say "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # Keep the package from starting its own dockerd (with a bridge and iptables rules);
    # this script starts the one it wants below.
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    # A stale package list makes install fail with 404s; refresh once, bounded.
    timeout 300 apt-get update -q >/dev/null
    timeout 600 apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi

if engine_answers; then
    say "engine already answering ($(docker info --format '{{.ServerVersion}}' 2>/dev/null))"
    exit 0
fi

if pgrep -x dockerd >/dev/null 2>&1; then
    say "dockerd is running but not answering yet; waiting"
else
    # A pid file left by a dockerd that did not exit cleanly keeps a new one from starting.
    rm -f /var/run/docker.pid
    say "starting dockerd (log: $log_file)"
    mkdir -p "$(dirname "$log_file")"
    # setsid detaches it from this shell so it outlives the caller.
    setsid dockerd --bridge=none --iptables=false --ip-masq=false \
        </dev/null >>"$log_file" 2>&1 &
fi

started=$SECONDS
deadline=$((SECONDS + wait_seconds))
while ((SECONDS < deadline)); do
    if engine_answers; then
        say "engine answering after $((SECONDS - started))s ($(docker info --format '{{.ServerVersion}} {{.Driver}}' 2>/dev/null))"
        exit 0
    fi
    sleep 1
done

say "no engine answered within ${wait_seconds}s; last lines of $log_file:"
tail -n 20 "$log_file" >&2 || true
exit 1
