#!/usr/bin/env bash
# Publishes a chat message straight on a room's Redis channel with
# redis-cli, as any other service could: every instance subscribed to the
# room delivers it to its clients. Prints the redis-cli command it runs.
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat <<'EOF'
Usage: ./scripts/inject.sh [--redis-url URL] [--room ROOM] [--prefix PREFIX] TEXT

Publishes TEXT on the room's channel (PUBLISH PREFIX:room:{ROOM}) with
redis-cli, bypassing the servers' accept script: every instance with
clients in the room shows it to them, and it is in no history.

The message's id is made from the clock, <milliseconds>-0: a tab shows
messages in id order and drops one whose id is not past the last it has
(its history included), so a hand-written id such as 0-1 shows nothing.

  --redis-url URL   the Redis the instances use (default: $REDIS_URL; else,
                    while ./scripts/run_two.sh runs, its Redis (it leaves the
                    URL in target/run_two.redis-url); else redis://127.0.0.1:6379)
  --room ROOM       the room (default: lobby)
  --prefix PREFIX   the instances' --redis-prefix (default: $REDIS_PREFIX, or chat)
  -h, --help        show this help
EOF
}

url="${REDIS_URL:-}"
url_from="REDIS_URL"
room="lobby"
prefix="${REDIS_PREFIX:-chat}"
text=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --redis-url | --room | --prefix)
      [[ $# -ge 2 ]] || die "$1 needs a value"
      case "$1" in
        --redis-url)
          url="$2"
          url_from="--redis-url"
          ;;
        --room) room="$2" ;;
        --prefix) prefix="$2" ;;
      esac
      shift
      ;;
    -h | --help)
      usage
      exit 0
      ;;
    -*)
      usage >&2
      die "unknown option: $1"
      ;;
    *)
      [[ -z "$text" ]] || die "one TEXT only; quote it: ./scripts/inject.sh \"hello from outside\""
      text="$1"
      ;;
  esac
  shift
done
[[ -n "$text" ]] || {
  usage >&2
  die "no TEXT to publish"
}
if [[ -z "$url" ]]; then
  if [[ -r "$RUN_REDIS_URL_FILE" ]]; then
    url="$(<"$RUN_REDIS_URL_FILE")"
    url_from="./scripts/run_two.sh (${RUN_REDIS_URL_FILE#"$REPO_ROOT"/})"
  else
    url="redis://127.0.0.1:6379"
    url_from="the default: no REDIS_URL, no --redis-url, and ./scripts/run_two.sh is not running"
  fi
fi
info "Redis: the one of $url_from"
have redis-cli || die "redis-cli is missing: apt-get install redis-server (it comes with it)"

# JSON strings: a backslash and a double quote are escaped; control
# characters are refused (the servers would refuse them too).
json_string() {
  local s="$1"
  [[ "$s" != *[[:cntrl:]]* ]] || die "no control characters (newlines, tabs) in TEXT or ROOM"
  s="${s//\\/\\\\}"
  s="${s//\"/\\\"}"
  printf '"%s"' "$s"
}

now_ms="$(date +%s%3N)"
payload="{\"type\":\"message\",\"id\":\"$now_ms-0\",\"ts\":$now_ms,\"room\":$(json_string "$room"),\"from\":\"redis-cli\",\"text\":$(json_string "$text"),\"instance\":\"redis-cli\"}"
channel="$prefix:room:{$room}"

# Shown as one would type it (single quotes, unless the text has one); a
# URL with a password is shown as the variable that holds it.
shown_url="$url"
# shellcheck disable=SC2016  # the variable's name, for the reader to expand
[[ "$url" != *@* ]] || shown_url='"$REDIS_URL"'
if [[ "$channel$payload" != *"'"* ]]; then
  printf "redis-cli -u %s PUBLISH '%s' '%s'\n" "$shown_url" "$channel" "$payload"
else
  printf 'redis-cli -u %s PUBLISH %q %q\n' "$shown_url" "$channel" "$payload"
fi
receivers="$(redis-cli -u "$url" --no-auth-warning PUBLISH "$channel" "$payload")"
case "$receivers" in
  0) warn "no instance is subscribed to $channel: nobody has that room open (or another --redis-prefix is in use)" ;;
  '' | *[!0-9]*) die "redis-cli answered: $receivers" ;;
  *) info "$receivers instance(s) received it" ;;
esac
