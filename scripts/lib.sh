# Shared by scripts/test and scripts/run: install what is missing, make sure
# a Docker engine answers. Source it; it defines functions only.

log() { printf '== %s\n' "$*" >&2; }

APT_UPDATED=""
apt_install() {
  if [ -z "$APT_UPDATED" ]; then
    apt-get update -qq
    APT_UPDATED=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# Installs the Debian packages providing the commands given as cmd:package.
ensure_commands() {
  local need=() pair
  for pair in "$@"; do
    command -v "${pair%%:*}" >/dev/null || need+=("${pair#*:}")
  done
  if [ ${#need[@]} -gt 0 ]; then
    log "installing ${need[*]}"
    apt_install "${need[@]}"
  fi
}

# Starts dockerd if no engine answers; sets DOCKERD_PID when it started one.
# Its log goes to $1.
DOCKERD_PID=""
ensure_engine() {
  local logfile="$1"
  if timeout 10 docker info >/dev/null 2>&1; then
    return 0
  fi
  ensure_commands dockerd:docker.io
  log "no Docker engine answers: starting dockerd (log: $logfile)"
  setsid dockerd >"$logfile" 2>&1 </dev/null &
  DOCKERD_PID=$!
  local _
  for _ in $(seq 1 60); do
    timeout 5 docker info >/dev/null 2>&1 && return 0
    sleep 1
  done
  cat "$logfile" >&2
  log "dockerd did not start"
  return 1
}
