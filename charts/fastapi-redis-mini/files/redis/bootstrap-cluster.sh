#!/bin/sh
# The cluster-bootstrap sidecar beside every Redis node in cluster mode.
#
# - Pod 0 creates the cluster, once every node answers and none is in a cluster yet. The pods
#   are Ready only in a cluster whose state is ok, so `helm install --wait`, Argo CD and Flux
#   wait for this, and nothing waits on a hook.
# - A node that is in a cluster whose state is not ok meets its peers again at the addresses
#   their names resolve to now (pods that came back with new IPs), every MEET_SECONDS.
# - A node outside an existing cluster (a pod that lost its volume, a pod added by scaling)
#   is never joined by guess: the log says what to run.
#
# Runs in every Redis pod, and as is in the chart's tests.
# REDIS_NODES             "host:port ...", every node of the StatefulSet, in ordinal order
# REDIS_CLUSTER_REPLICAS  replicas per master (redis-cli --cluster-replicas)
# POD_NAME                this pod's name; its ordinal picks its own entry of REDIS_NODES
# REDIS_HOST, REDIS_PORT  where this pod's node listens (127.0.0.1, 6379)
# REDISCLI_AUTH           the password, read by redis-cli itself (never on a command line)
# BOOTSTRAP_INTERVAL      seconds between checks (5); MEET_SECONDS between MEETs (30)
# BOOTSTRAP_ONCE          "true": exit 0 once this node is in a healthy cluster (tests)
set -eu

: "${REDIS_NODES:?REDIS_NODES must list the nodes as host:port}"
: "${REDIS_CLUSTER_REPLICAS:?REDIS_CLUSTER_REPLICAS must be set}"
: "${POD_NAME:?POD_NAME must be set}"
local_node=${REDIS_HOST:-127.0.0.1}:${REDIS_PORT:-6379}
interval=${BOOTSTRAP_INTERVAL:-5}
meet_seconds=${MEET_SECONDS:-30}
ordinal=${POD_NAME##*-}
# shellcheck disable=SC2086 # one line per node
expected=$(printf '%s\n' $REDIS_NODES | wc -l | tr -d ' ')
# shellcheck disable=SC2086
self=$(printf '%s\n' $REDIS_NODES | sed -n "$((ordinal + 1))p")
said=""
last_meet=0

log() { printf 'cluster-bootstrap: %s\n' "$*"; }

# Log a message once, until a different one is due.
say() {
  if [ "$said" != "$*" ]; then
    log "$*"
    said=$*
  fi
}

cli() {
  node=$1
  shift
  redis-cli -h "${node%:*}" -p "${node##*:}" "$@"
}

# One field of CLUSTER INFO on a node (redis-cli ends its lines with \r).
info_field() {
  cli "$1" cluster info 2>/dev/null | tr -d '\r' | sed -n "s/^$2://p"
}

answers() { cli "$1" ping 2>/dev/null | grep -q PONG; }

in_a_cluster() {
  known=$(info_field "$1" cluster_known_nodes)
  assigned=$(info_field "$1" cluster_slots_assigned)
  [ "${known:-1}" -gt 1 ] || [ "${assigned:-0}" -gt 0 ]
}

# A peer that is in a cluster, or nothing.
member_peer() {
  for node in $REDIS_NODES; do
    if [ "$node" != "$self" ] && in_a_cluster "$node"; then
      printf '%s\n' "$node"
      return 0
    fi
  done
}

create() {
  for node in $REDIS_NODES; do
    if ! answers "$node"; then
      say "waiting for $node to answer before creating the cluster"
      return 1
    fi
  done
  existing=$(member_peer)
  if [ -n "$existing" ]; then
    outside "$existing"
    return 1
  fi
  log "every node answers and none is in a cluster: creating it"
  # shellcheck disable=SC2086 # one argument per node
  redis-cli --cluster create $REDIS_NODES --cluster-replicas "$REDIS_CLUSTER_REPLICAS" --cluster-yes
}

outside() {
  say "this node ($self) is not in the cluster that $1 is in, and is not joined by guess." \
    "If it lost its volume, add it as a replica:" \
    "redis-cli --cluster add-node $self $1 --cluster-slave;" \
    "if the layout changed, see the chart README (Changing the layout)"
}

# Meet every peer at the address its name resolves to now.
meet_peers() {
  now=$(date +%s)
  [ $((now - last_meet)) -ge "$meet_seconds" ] || return 0
  last_meet=$now
  for node in $REDIS_NODES; do
    [ "$node" != "$self" ] || continue
    address=$(getent hosts "${node%:*}" 2>/dev/null | awk 'NR == 1 { print $1 }')
    [ -n "$address" ] || continue
    cli "$local_node" cluster meet "$address" "${node##*:}" >/dev/null 2>&1 || true
  done
}

# One check; returns 0 when this node is in a healthy cluster.
check() {
  if ! answers "$local_node"; then
    say "waiting for the local node to answer"
    return 1
  fi
  if ! in_a_cluster "$local_node"; then
    if [ "$ordinal" = 0 ]; then
      create || return 1
    else
      existing=$(member_peer)
      if [ -n "$existing" ]; then
        outside "$existing"
      else
        say "not in a cluster yet: pod 0 creates it once every node answers"
      fi
      return 1
    fi
  fi
  state=$(info_field "$local_node" cluster_state)
  if [ "$state" != ok ]; then
    say "cluster_state is ${state:-unknown}: meeting the peers at their current addresses"
    meet_peers
    return 1
  fi
  known=$(info_field "$local_node" cluster_known_nodes)
  if [ "$known" != "$expected" ]; then
    say "cluster_state ok, but the cluster has $known nodes and the StatefulSet $expected:" \
      "slots are never moved here; see the chart README (Changing the layout)"
  else
    say "cluster_state ok with all $expected nodes"
  fi
  return 0
}

while :; do
  if check && [ "${BOOTSTRAP_ONCE:-false}" = true ]; then
    exit 0
  fi
  sleep "$interval"
done
