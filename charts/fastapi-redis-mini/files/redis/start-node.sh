#!/bin/sh
# Start this pod's Redis. The password goes into a config file on /tmp, never onto a command
# line where ps shows it. In cluster mode the node announces its pod DNS name, and before it
# starts, nodes.conf is made to name every node at the address it has now: a pod gets a new
# IP on every restart, and a cluster whose pods all restarted at once (a kind restart, a
# node pool replaced) would otherwise dial only addresses that are gone and stay `fail`.
#
# Runs as the Redis container's command, and as is in the chart's tests.
# REDIS_PASSWORD      the password (of the default user)
# REDIS_SERVICE_USER, REDIS_SERVICE_PASSWORD    with redis.acl: the service's user, whose
#                     rules are in REDIS_ACL_DIR/service-user.acl (/etc/redis)
# REDIS_EXPORTER_USER, REDIS_EXPORTER_PASSWORD  the same for redis_exporter's user
# REDIS_CLUSTER       "true" in cluster mode
# POD_NAME, POD_IP    this pod's name and address (the downward API)
# REDIS_POD_DOMAIN    the headless Service's domain: each pod is POD_NAME.REDIS_POD_DOMAIN
# REDIS_BASE_CONFIG   the chart's redis.conf (/etc/redis/redis.conf)
# REDIS_DATA_DIR      where nodes.conf lives (/data); REDIS_RUN_DIR where the config goes (/tmp)
# RESOLVE_SECONDS     how long to wait for peers' names to resolve (30)
# Arguments are passed on to redis-server after the config file.
set -eu

: "${REDIS_PASSWORD:?REDIS_PASSWORD must be set}"
base_config=${REDIS_BASE_CONFIG:-/etc/redis/redis.conf}
data_dir=${REDIS_DATA_DIR:-/data}
run_dir=${REDIS_RUN_DIR:-/tmp}
config=$run_dir/redis.conf

log() { printf 'start-node: %s\n' "$*"; }

# The first address a name resolves to, or nothing.
resolve() {
  getent hosts "$1" 2>/dev/null | awk 'NR == 1 { print $1 }'
}

# The host names nodes.conf records for every node but this one (Redis 7: ip:port@cport,host).
peer_hosts() {
  awk 'NF >= 8 && $3 !~ /(^|,)myself(,|$)/ {
    split($2, bus, "@"); split(bus[2], fields, ",")
    if (fields[2] != "") print fields[2]
  }' "$1"
}

# Rewrite the address of this node (to POD_IP) and of every peer whose name resolves.
refresh_nodes_conf() {
  nodes_conf=$data_dir/nodes.conf
  [ -s "$nodes_conf" ] || return 0
  : "${POD_IP:?POD_IP must be set in cluster mode}"
  addresses=$run_dir/node-addresses
  : >"$addresses"
  deadline=$(($(date +%s) + ${RESOLVE_SECONDS:-30}))
  for host in $(peer_hosts "$nodes_conf"); do
    # Peers start together with this pod; give their names a moment to appear in DNS.
    until address=$(resolve "$host") && [ -n "$address" ]; do
      if [ "$(date +%s)" -ge "$deadline" ]; then
        log "$host does not resolve yet; keeping its last address"
        break
      fi
      sleep 1
    done
    [ -n "$address" ] && printf '%s %s\n' "$host" "$address" >>"$addresses"
  done
  awk -v self="$POD_IP" -v addresses="$addresses" '
    BEGIN { while ((getline line < addresses) > 0) { split(line, f, " "); now[f[1]] = f[2] } }
    NF >= 8 {
      at = index($2, "@"); address = substr($2, 1, at - 1); bus = substr($2, at)
      port = address; sub(/.*:/, "", port)
      split(bus, fields, ","); host = fields[2]
      ip = ""
      if ($3 ~ /(^|,)myself(,|$)/) ip = self
      else if (host in now) ip = now[host]
      if (ip != "") $2 = ip ":" port bus
    }
    { print }
  ' "$nodes_conf" >"$run_dir/nodes.conf.new"
  if ! cmp -s "$run_dir/nodes.conf.new" "$nodes_conf"; then
    log "nodes.conf: addresses brought up to date"
    cat "$run_dir/nodes.conf.new" >"$nodes_conf"
  fi
  rm -f "$run_dir/nodes.conf.new" "$addresses"
}

# A user line: name, password, and the rules the chart rendered for it.
add_user() {
  rules_file=${REDIS_ACL_DIR:-/etc/redis}/$3-user.acl
  [ -s "$rules_file" ] || { log "$rules_file is missing"; exit 1; }
  printf 'user "%s" reset on ">%s" %s\n' "$1" "$2" "$(cat "$rules_file")" >>"$config"
}

umask 077
printf 'include %s\nrequirepass "%s"\n' "$base_config" "$REDIS_PASSWORD" >"$config"
if [ -n "${REDIS_SERVICE_USER:-}" ]; then
  : "${REDIS_SERVICE_PASSWORD:?REDIS_SERVICE_PASSWORD must be set with REDIS_SERVICE_USER}"
  add_user "$REDIS_SERVICE_USER" "$REDIS_SERVICE_PASSWORD" service
fi
if [ -n "${REDIS_EXPORTER_USER:-}" ]; then
  : "${REDIS_EXPORTER_PASSWORD:?REDIS_EXPORTER_PASSWORD must be set with REDIS_EXPORTER_USER}"
  add_user "$REDIS_EXPORTER_USER" "$REDIS_EXPORTER_PASSWORD" exporter
fi
if [ "${REDIS_CLUSTER:-false}" = true ]; then
  : "${POD_NAME:?POD_NAME must be set in cluster mode}"
  : "${REDIS_POD_DOMAIN:?REDIS_POD_DOMAIN must be set in cluster mode}"
  # Replicas authenticate to their master; clients are sent to names that survive a new IP.
  printf 'masterauth "%s"\ncluster-announce-hostname "%s.%s"\n' \
    "$REDIS_PASSWORD" "$POD_NAME" "$REDIS_POD_DOMAIN" >>"$config"
  refresh_nodes_conf
fi
exec redis-server "$config" "$@"
