#!/usr/bin/env bash
# Runs the failover demo: N instances of pubsub-chat (a, b, c, ...) joined
# by Redis, behind one nginx that proxies the page and the WebSocket, each
# instance logging to this terminal with an [a] / [b] / ... prefix; with
# --redis-cluster, joined by a private six-node Redis Cluster instead of one
# Redis. Ctrl-C stops everything it started. See --help.
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat <<'EOF'
Usage: ./scripts/run_cluster.sh [-n N] [--port P] [--base-port B] [--redis-cluster]

Builds pubsub-chat (cargo build --release, with examples/lab.rs, which
writes the nginx configuration and runs the Redis Cluster as the tests
do), runs N instances of it (a, b,
c, ...) joined by Redis, and nginx in front of them on one address,
http://127.0.0.1:P/, that proxies the page to the instances' HTTP ports and
/ws to their WebSocket ports. Kill an instance and the tabs on it reconnect
through nginx to a survivor. Ctrl-C stops everything.

Options:
  -n N            how many instances, 1..26 (default 3; also INSTANCES=N)
  --port P        nginx's port, the one URL to open (default 8080;
                  also PROXY_PORT=P)
  --base-port B   HTTP port of instance a; b gets B+1, ... (default 5100;
                  also BASE_PORT=B). WebSocket ports are these + 10000.
  --redis-cluster join the instances by a private Redis Cluster (sharded
                  Pub/Sub) instead of one Redis: see below.
  -h, --help      Show this help.

Redis: as ./scripts/run_two.sh: if REDIS_URL is set and answers PING, it is
used; otherwise a private redis-server on a free loopback port, stopped on
exit (installed with apt-get when missing and running as root or with
password-less sudo; otherwise the script says how).

Redis Cluster (--redis-cluster; REDIS_URL is then ignored): six private
redis-server nodes on free loopback ports, joined with `redis-cli --cluster
create ... --cluster-replicas 1` into three masters with one replica each
(--cluster-node-timeout 1000), stopped on exit. The instances get
--redis-cluster with the masters as seeds. The banner lists the nodes and
which master serves room lobby: kill -9 that master and its replica takes
its slots over within a few seconds; the script says when a node exits and
which nodes are masters afterwards.

nginx: the system's (/usr/sbin/nginx), run as a foreground process of this
script with its configuration, logs and temporary files in a temporary
directory; installed with apt-get (package nginx) when missing and allowed.
EOF
}

N="${INSTANCES:-3}"
USE_REDIS_CLUSTER=0
PROXY_PORT="${PROXY_PORT:-8080}"
BASE_PORT="${BASE_PORT:-5100}"

while [[ $# -gt 0 ]]; do
  case "$1" in
    -n | --instances)
      need_value "$@"
      N="$2"
      shift
      ;;
    -n?*) N="${1#-n}" ;;
    --instances=*) N="${1#--instances=}" ;;
    --port)
      need_value "$@"
      PROXY_PORT="$2"
      shift
      ;;
    --port=*) PROXY_PORT="${1#--port=}" ;;
    --base-port)
      need_value "$@"
      BASE_PORT="$2"
      shift
      ;;
    --base-port=*) BASE_PORT="${1#--base-port=}" ;;
    --redis-cluster) USE_REDIS_CLUSTER=1 ;;
    -h | --help)
      usage
      exit 0
      ;;
    *) bad_argument "$1" ;;
  esac
  shift
done

if ! [[ "$N" =~ ^[0-9]{1,2}$ ]] || ((10#$N < 1 || 10#$N > 26)); then
  die "bad number of instances '$N': use 1..26 (they are named a..z)"
fi
N=$((10#$N))
if ! [[ "$PROXY_PORT" =~ ^[0-9]{1,5}$ ]] || ((10#$PROXY_PORT < 1 || 10#$PROXY_PORT > 65535)); then
  die "bad --port '$PROXY_PORT': use 1..65535"
fi
PROXY_PORT=$((10#$PROXY_PORT))
if ! [[ "$BASE_PORT" =~ ^[0-9]{1,5}$ ]] || ((10#$BASE_PORT < 1 || 10#$BASE_PORT + N - 1 > 45535)); then
  die "bad --base-port '$BASE_PORT': the instances use it .. it+$((N - 1)), each WebSocket port is that + 10000 and each admin port that + 20000 (at most 65535)"
fi
BASE_PORT=$((10#$BASE_PORT))
if ((PROXY_PORT < 1024)) && [[ "$(id -u)" -ne 0 ]]; then
  die "port $PROXY_PORT needs root; pick one above 1023, e.g. --port 8080"
fi

IDS=()        # a, b, c, ...
HTTP_PORTS=() # 5100, 5101, ...
WS_PORTS=()   # 15100, 15101, ...
ADMIN_PORTS=() # 25100, 25101, ... (on 127.0.0.1: metrics, stats, readiness)
letters=abcdefghijklmnopqrstuvwxyz
for ((i = 0; i < N; i++)); do
  IDS+=("${letters:i:1}")
  HTTP_PORTS+=($((BASE_PORT + i)))
  WS_PORTS+=($((BASE_PORT + i + 10000)))
  ADMIN_PORTS+=($((BASE_PORT + i + 20000)))
done
for ((i = 0; i < N; i++)); do
  if ((HTTP_PORTS[i] == PROXY_PORT || WS_PORTS[i] == PROXY_PORT)); then
    die "nginx's port $PROXY_PORT is also instance ${IDS[i]}'s port; pick another --port or --base-port"
  fi
  for ((j = 0; j < N; j++)); do
    ((WS_PORTS[i] != HTTP_PORTS[j])) ||
      die "instance ${IDS[i]}'s WebSocket port ${WS_PORTS[i]} is instance ${IDS[j]}'s HTTP port; pick another --base-port"
  done
done

cd "$REPO_ROOT"

# ----------------------------------------------------------- fail early

specs=("$PROXY_PORT:nginx, the address to open")
for ((i = 0; i < N; i++)); do
  specs+=("${HTTP_PORTS[i]}:page of instance ${IDS[i]}" "${WS_PORTS[i]}:WebSocket of instance ${IDS[i]}"
    "${ADMIN_PORTS[i]}:admin listener of instance ${IDS[i]}")
done
refuse_ports_in_use "  ./scripts/run_cluster.sh --port 8081 --base-port 5200
      (or PROXY_PORT=8081 BASE_PORT=5200 ./scripts/run_cluster.sh)" "${specs[@]}"

have cargo || die "cargo is not installed: install Rust from https://rustup.rs, then run this again"

NGINX=""
find_nginx() {
  if [[ -x /usr/sbin/nginx ]]; then
    NGINX=/usr/sbin/nginx
  elif have nginx; then
    NGINX="$(command -v nginx)"
  else
    return 1
  fi
}
if ! find_nginx; then
  if can_apt_install; then
    step "nginx is not installed; installing it: ${SUDO:+sudo }apt-get update && ${SUDO:+sudo }apt-get install -y nginx"
    apt_install nginx
    find_nginx || die "nginx is still missing after installing it (looked for /usr/sbin/nginx and nginx on PATH)"
    # The package starts a system nginx on port 80; this script does not use it.
  else
    cat >&2 <<'EOF'
error: nginx is not installed. Install it, then run this again:
  Debian/Ubuntu:  sudo apt-get update && sudo apt-get install -y nginx
  macOS:          brew install nginx
EOF
    exit 1
  fi
fi

if ((USE_REDIS_CLUSTER)); then
  # Always private: a cluster is not something to borrow from REDIS_URL.
  NEED_PRIVATE_REDIS=1
  ensure_redis_server "./scripts/run_cluster.sh --redis-cluster"
  have redis-cli || die "redis-cli is missing (it makes the cluster); Debian: apt-get install redis-tools"
else
  choose_redis
  ensure_redis_server ./scripts/run_cluster.sh
fi

# ------------------------------------------------- processes and cleanup

TMP_DIR=""
BUILD_PID=""
NGINX_PID=""
CLUSTER_PID="" # examples/lab.rs, which holds the Redis Cluster's nodes
PIDS=()     # the instances, in the order of IDS
GONE=()     # GONE[i]=1 once instance i has exited and been reaped
LOG_PIDS=() # their [a] / [b] / ... prefixers

cleanup() {
  local rc=$?
  # Finish the cleanup whatever happens: no more signals, no set -e (a
  # printf to a closed terminal must not stop it halfway).
  trap '' INT TERM HUP PIPE
  set +e
  stop_build
  local running=()
  if [[ -n "$NGINX_PID" ]]; then running+=("$NGINX_PID"); fi
  for i in "${!PIDS[@]}"; do
    # Not the reaped ones: their PIDs may belong to someone else by now.
    if [[ -z "${GONE[i]:-}" ]]; then running+=("${PIDS[i]}"); fi
  done
  if ((${#running[@]})); then
    printf '\nStopping nginx and instances %s...\n' "${IDS[*]}"
    # nginx stops its workers itself on SIGTERM, before it exits.
    stop_pids "${running[@]}"
  fi
  if [[ -n "$CLUSTER_PID" ]]; then
    printf 'Stopping the private Redis Cluster...\n'
    stop_pids "$CLUSTER_PID"
  fi
  stop_private_services
  if ((${#running[@]})); then printf 'Stopped.\n'; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 0' INT TERM
trap 'exit 1' HUP PIPE

# ------------------------------------------------------------------ build

# The nginx configuration and the Redis Cluster come from the tests' own
# set-ups, through examples/lab.rs.
build_release --bins --example lab
LAB="$(dirname "$BIN")/examples/lab"

TMP_DIR="$(mktemp -d "${TMPDIR:-/tmp}/pubsub-chat-cluster.XXXXXX")"

# start_private_redis_cluster DIR: the lab's Redis Cluster (six nodes on
# free loopback ports, three masters with a replica each, their files in
# DIR); waits until it serves every slot and sets REDIS_CLUSTER_SEEDS. In
# a session of its own, like the private redis-server: Ctrl-C does not
# reach it, it is stopped after the instances. Its lines start with
# [redis-cluster].
start_private_redis_cluster() {
  local dir="$1" setsid="" i
  if have setsid; then setsid=setsid; fi
  mkdir -p "$dir"
  $setsid "$LAB" redis-cluster "$dir" </dev/null &
  CLUSTER_PID=$!
  for ((i = 0; i < 900; i++)); do
    if [[ -s "$dir/seeds" ]]; then
      REDIS_CLUSTER_SEEDS="$(<"$dir/seeds")"
      return 0
    fi
    if ! kill -0 "$CLUSTER_PID" 2>/dev/null; then
      CLUSTER_PID=""
      die "the private Redis Cluster did not start (its reasons are above)"
    fi
    sleep 0.1
  done
  die "the private Redis Cluster does not serve every slot after 90 s"
}

if ((USE_REDIS_CLUSTER)); then
  step "Starting a private Redis Cluster (six nodes: three masters, one replica each)"
  start_private_redis_cluster "$TMP_DIR/redis-cluster"
  BROKER_ARGS=(--redis-cluster "$REDIS_CLUSTER_SEEDS")
else
  provide_redis ./scripts/run_cluster.sh
  # In the environment, not on the command line (ps shows arguments to
  # every user): the URL may hold a password.
  export REDIS_URL="$REDIS_URL_TO_USE"
  BROKER_ARGS=()
fi

step "Starting instances ${IDS[*]} (HTTP ports ${HTTP_PORTS[*]})"
# --public-ws-url /ws: a page loaded through nginx opens its WebSocket on
# its own host (nginx), never on an instance's port.
for ((i = 0; i < N; i++)); do
  start_instance "${IDS[i]}" --port "${HTTP_PORTS[i]}" --ws-port "${WS_PORTS[i]}" \
    --admin-addr "127.0.0.1:${ADMIN_PORTS[i]}" --broker redis "${BROKER_ARGS[@]}" --public-ws-url /ws
done

# ------------------------------------------------------------------ nginx

NGINX_DIR="$TMP_DIR/nginx"
mkdir -p "$NGINX_DIR"
# As root, nginx's workers run as an unprivileged user: let them reach
# their temporary directories (mktemp made $TMP_DIR private).
chmod 755 "$TMP_DIR" "$NGINX_DIR"

BACKENDS=()
for ((i = 0; i < N; i++)); do BACKENDS+=("${HTTP_PORTS[i]}:${WS_PORTS[i]}"); done
"$LAB" nginx-config "$PROXY_PORT" "$NGINX_DIR" "${BACKENDS[@]}" >"$NGINX_DIR/nginx.conf" ||
  die "cannot write the nginx configuration"

# -e (nginx 1.19.5+) keeps a non-root nginx from complaining that it cannot
# open the system's error log before it reads this configuration.
NGINX_ARGS=(-c "$NGINX_DIR/nginx.conf" -p "$NGINX_DIR/")
if "$NGINX" -h 2>&1 | grep -q -- '-e filename'; then
  NGINX_ARGS+=(-e "$NGINX_DIR/error.log")
fi

# nginx_failed WHY: prints nginx's own words, then stops everything.
nginx_failed() {
  warn "$1"
  for f in "$NGINX_DIR/stderr.log" "$NGINX_DIR/error.log"; do
    if [[ -s "$f" ]]; then
      printf -- '--- %s ---\n' "${f##*/}" >&2
      tail -n 20 "$f" >&2
    fi
  done
  printf 'configuration: %s (removed on exit)\n' "$NGINX_DIR/nginx.conf" >&2
  exit 1
}

step "Starting nginx on 127.0.0.1:$PROXY_PORT ($NGINX)"
if ! "$NGINX" -t -q "${NGINX_ARGS[@]}" >"$NGINX_DIR/stderr.log" 2>&1; then
  nginx_failed "nginx rejects its configuration"
fi
"$NGINX" "${NGINX_ARGS[@]}" </dev/null >"$NGINX_DIR/stderr.log" 2>&1 &
NGINX_PID=$!

# ----------------------------------------------------------- wait ready

deadline=$((SECONDS + 30))
for ((i = 0; i < N; i++)); do
  wait_instance_ready "$i" "${HTTP_PORTS[i]}" /readyz "$deadline"
done
until [[ "$(http_status "$PROXY_PORT" /readyz)" == 200 ]]; do
  if ! kill -0 "$NGINX_PID" 2>/dev/null; then
    rc=0
    wait "$NGINX_PID" || rc=$?
    NGINX_PID=""
    nginx_failed "nginx exited (status $rc) before it answered"
  fi
  ((SECONDS < deadline)) ||
    nginx_failed "nginx does not answer after 30 s (GET http://127.0.0.1:$PROXY_PORT/readyz is not 200)"
  sleep 0.2
done

# ---------------------------------------------------------------- banner

URL="http://127.0.0.1:$PROXY_PORT/?name=alice&room=lobby"
RULE="================================================================================"
{
  printf '\n%s\n' "$RULE"
  joined_by="Redis"
  if ((USE_REDIS_CLUSTER)); then joined_by="a Redis Cluster"; fi
  printf '  pubsub-chat is running: %d instances joined by %s, behind nginx\n\n' "$N" "$joined_by"
  printf '  Open this URL (in several tabs; change name= in each):\n'
  printf '    %s\n\n' "$URL"
  printf '  Instances (nginx sends each new connection to the next one):\n'
  for ((i = 0; i < N; i++)); do
    printf '    %s  pid %-8s http 127.0.0.1:%s  ws 127.0.0.1:%s  admin 127.0.0.1:%s\n' \
      "${IDS[i]}" "${PIDS[i]}" "${HTTP_PORTS[i]}" "${WS_PORTS[i]}" "${ADMIN_PORTS[i]}"
  done
  printf '  (admin: /metrics, /stats, /readyz with its reasons; never behind nginx)\n'
  printf '  nginx:  pid %s, configuration %s\n' "$NGINX_PID" "$NGINX_DIR/nginx.conf"
  if ((USE_REDIS_CLUSTER)); then
    printf '  Redis Cluster (private; the instances have --redis-cluster %s):\n' "$REDIS_CLUSTER_SEEDS"
    cat "$TMP_DIR/redis-cluster/nodes.txt"
    # The room's channel, history and id counter share the slot of its
    # hash tag {lobby}.
    read -r slot lobby_master lobby_pid lobby_replica <"$TMP_DIR/redis-cluster/lobby.txt"
    printf '\n  Redis failover demo: room lobby (chat:room:{lobby}, slot %s) is served by\n' "$slot"
    printf '  master 127.0.0.1:%s. Kill it:\n' "$lobby_master"
    printf '    kill -9 %s\n' "$lobby_pid"
    printf '  and within a few seconds its replica 127.0.0.1:%s takes over (this\n' "$lobby_replica"
    printf '  script says so; or watch: redis-cli -p %s CLUSTER NODES). Messages\n' "$lobby_replica"
    printf '  sent meanwhile are delayed or refused (unavailable), then the room\n'
    printf '  goes on. Any master works the same for the rooms in its slots\n'
    printf '  (redis-cli -p PORT CLUSTER KEYSLOT '"'"'chat:room:{ROOM}'"'"').\n\n'
  else
    printf '  Redis:  %s\n\n' "$REDIS_SHOWN"
  fi
  printf '  Failover demo: open two tabs on the URL (each shows "you are on\n'
  # shellcheck disable=SC2016  # backquotes to show a command, not to run one
  printf '  instance ..."), then `kill -9 <pid of the instance shown in a tab>`:\n'
  printf '  the tab reconnects through nginx to a survivor and shows what was\n'
  printf '  said meanwhile in the other tab.\n\n'
  printf '  (An instance'"'"'s own http port works too, for debugging; a tab opened\n'
  printf '  there stays on that instance and cannot fail over.)\n\n'
  printf '  Ctrl-C stops everything.\n'
  printf '%s\n\n' "$RULE"
}

# --------------------------------------------------------------- monitor

# A killed instance is the demo, not a reason to stop: say so and go on.
redis_warned=0
while true; do
  for ((i = 0; i < N; i++)); do
    [[ -z "${GONE[i]:-}" ]] || continue
    if ! kill -0 "${PIDS[i]}" 2>/dev/null; then
      rc=0
      wait "${PIDS[i]}" || rc=$?
      GONE[i]=1
      how="status $rc"
      if ((rc == 137)); then
        how="SIGKILL"
      elif ((rc > 128)); then
        how="signal $((rc - 128))"
      fi
      warn "instance ${IDS[i]} (pid ${PIDS[i]}) exited ($how); nginx sends its clients to the others"
    fi
  done
  gone=0
  for ((i = 0; i < N; i++)); do
    if [[ -n "${GONE[i]:-}" ]]; then gone=$((gone + 1)); fi
  done
  if ((gone == N)); then
    warn "every instance has exited; stopping"
    exit 1
  fi
  if ! kill -0 "$NGINX_PID" 2>/dev/null; then
    rc=0
    wait "$NGINX_PID" || rc=$?
    NGINX_PID=""
    nginx_failed "nginx exited (status $rc); stopping everything"
  fi
  if [[ -n "$REDIS_PID" && "$redis_warned" -eq 0 ]] && ! kill -0 "$REDIS_PID" 2>/dev/null; then
    warn "the private redis-server has exited; the instances keep running and retry it"
    redis_warned=1
  fi
  if [[ -n "$CLUSTER_PID" ]] && ! kill -0 "$CLUSTER_PID" 2>/dev/null; then
    CLUSTER_PID=""
    warn "the private Redis Cluster's keeper (examples/lab.rs) has exited, and its nodes with it; the instances keep running and retry"
  fi
  sleep 0.5
done
