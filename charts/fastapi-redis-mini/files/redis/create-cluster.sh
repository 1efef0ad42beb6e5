#!/bin/sh
# Create the Redis Cluster once, from nodes that are all up; do nothing when it exists.
#
# Runs as the chart's post-install/post-upgrade hook Job, and as is in the chart's tests.
# REDIS_NODES           "host:port host:port ...", every node of the StatefulSet
# REDIS_CLUSTER_REPLICAS replicas per master (redis-cli --cluster-replicas)
# REDISCLI_AUTH         the password, read by redis-cli itself (never on a command line)
# CLUSTER_WAIT_SECONDS  how long to wait for the nodes, then for the cluster (default 300)
set -eu

: "${REDIS_NODES:?REDIS_NODES must list the nodes as host:port}"
: "${REDIS_CLUSTER_REPLICAS:?REDIS_CLUSTER_REPLICAS must be set}"
wait_seconds=${CLUSTER_WAIT_SECONDS:-300}

log() { printf '%s\n' "$*"; }

cli() {
  node=$1
  shift
  redis-cli -h "${node%:*}" -p "${node##*:}" "$@"
}

# One field of CLUSTER INFO on a node (redis-cli ends its lines with \r).
info_field() {
  cli "$1" cluster info 2>/dev/null | tr -d '\r' | sed -n "s/^$2://p"
}

deadline=$(($(date +%s) + wait_seconds))
in_time() { [ "$(date +%s)" -lt "$deadline" ]; }

for node in $REDIS_NODES; do
  until cli "$node" ping 2>/dev/null | grep -q PONG; do
    in_time || { log "node $node did not answer PING within ${wait_seconds}s"; exit 1; }
    sleep 2
  done
done
log "all nodes answer: $REDIS_NODES"

# A node that knows other nodes, or serves slots, is already part of a cluster.
existing=""
for node in $REDIS_NODES; do
  known=$(info_field "$node" cluster_known_nodes)
  assigned=$(info_field "$node" cluster_slots_assigned)
  if [ "${known:-1}" -gt 1 ] || [ "${assigned:-0}" -gt 0 ]; then
    existing=$node
    break
  fi
done

if [ -n "$existing" ]; then
  log "a cluster exists ($existing knows $known nodes): nothing to create"
  for node in $REDIS_NODES; do
    if [ "$(info_field "$node" cluster_known_nodes)" = 1 ]; then
      log "WARNING: $node is not in the cluster; add it by hand (redis-cli --cluster add-node), see the chart README"
    fi
  done
  # A cluster left half made (an interrupted create) is not fixed here: say so and fail.
  if ! redis-cli --cluster check "$existing" >/dev/null 2>&1; then
    redis-cli --cluster check "$existing" || true
    log "the cluster is not consistent: repair it by hand (redis-cli --cluster fix)"
    exit 1
  fi
  exit 0
fi

# shellcheck disable=SC2086 # one argument per node
redis-cli --cluster create $REDIS_NODES --cluster-replicas "$REDIS_CLUSTER_REPLICAS" --cluster-yes

for node in $REDIS_NODES; do
  until [ "$(info_field "$node" cluster_state)" = ok ]; do
    in_time || { log "node $node did not reach cluster_state:ok within ${wait_seconds}s"; exit 1; }
    sleep 1
  done
done
log "cluster created: every node reports cluster_state:ok"
