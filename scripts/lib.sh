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

# What building Pipes needs: cmake (libz-ng), pkg-config, and OpenSSL's
# static libraries, linked into the static binary (.cargo/config.toml).
ensure_build_tools() {
  ensure_commands cmake:cmake pkg-config:pkg-config
  [ -f /usr/lib/x86_64-linux-gnu/libssl.a ] || apt_install libssl-dev
}

# The static release binary every way of building shares. A first build
# compiles some 280 crates as one program: about 5½ minutes on 2 cores, longer on slower
# machines; later builds take seconds.
build_pipes() {
  ensure_build_tools
  [ -x target/x86_64-unknown-linux-gnu/release/pipes ] ||
    log "building Pipes for the first time: about 5½ minutes on 2 cores (cargo shows its progress)"
  cargo build --release --bin pipes "$@"
}

# docker build with the classic builder: BuildKit needs the buildx plugin,
# which not every engine install has, and these images (FROM scratch, COPY)
# need nothing it adds. Newer CLIs print a deprecation notice for the
# classic builder on every build; that notice is dropped, errors are not.
docker_build() {
  local err status=0
  err="$(DOCKER_BUILDKIT=0 docker build -q "$@" 2>&1 >/dev/null)" || status=$?
  printf '%s\n' "$err" | grep -v -e '^$' -e 'legacy builder is deprecated' -e 'buildx component' -e 'docs.docker.com/go/buildx' \
    -e 'BuildKit is currently disabled' -e '^ *environment-variable\.$' >&2 || true
  return $status
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

# Prepares what the engine tests and benchmarks need and exports it as
# PIPES_TEST_*: engine, authenticated registry on 127.0.0.1, fixture image.
# Builds with static binaries (the fixture and the Pipes image run on scratch).
# Everything created is labelled pipes.test=$RUN and removed on exit.
setup_test_env() {
  RUN="pt$(date +%s)$$"
  WORK="$(mktemp -d /tmp/pipes-test.XXXXXX)"
  REGISTRY_PID=""
  DOCKERD_PID=""
  SWARM_INITIALIZED=""
  GWBRIDGE_CREATED=""

  cleanup() {
    local status=$?
    set +e
    log "cleaning up run $RUN"
    if docker info >/dev/null 2>&1; then
      # Services first: the swarm would replace their task containers.
      if [ "$(docker info --format '{{.Swarm.LocalNodeState}}')" = active ]; then
        docker service ls -q --filter "label=pipes.test=$RUN" | xargs -r docker service rm >/dev/null
        docker config ls -q --filter "label=pipes.test=$RUN" | xargs -r docker config rm >/dev/null
        docker secret ls -q --filter "label=pipes.test=$RUN" | xargs -r docker secret rm >/dev/null
      fi
      docker ps -aq --filter "label=pipes.test=$RUN" | xargs -r docker rm -f >/dev/null
      docker network ls -q --filter "label=pipes.test=$RUN" | xargs -r docker network rm >/dev/null 2>&1
      docker volume ls -q --filter "label=pipes.test=$RUN" | xargs -r docker volume rm >/dev/null
      # Images derived from others go first; their parents in a later pass.
      for _ in 1 2 3; do
        docker images -q --filter "label=pipes.test=$RUN" | sort -u | xargs -r docker rmi -f >/dev/null 2>&1
      done
    fi
    if [ -n "$SWARM_INITIALIZED" ]; then
      docker swarm leave --force >/dev/null
      # Leaving may keep the bridge the swarm made; it goes if the swarm was ours.
      [ -n "$GWBRIDGE_CREATED" ] && docker network rm docker_gwbridge >/dev/null 2>&1
    fi
    [ -n "$REGISTRY_PID" ] && kill "$REGISTRY_PID" 2>/dev/null
    [ -n "$DOCKERD_PID" ] && kill "$DOCKERD_PID" 2>/dev/null
    rm -rf "$WORK"
    exit $status
  }
  trap cleanup EXIT INT TERM

  # --- tools and engine -----------------------------------------------------
  ensure_build_tools
  ensure_commands docker-registry:docker-registry htpasswd:apache2-utils curl:curl docker:docker.io \
    pebble:pebble pebble-challtestsrv:pebble promtool:prometheus chromium:chromium chromedriver:chromium-driver
  ensure_engine "$WORK/dockerd.log"
  log "Docker engine $(docker version --format '{{.Server.Version}} (API {{.Server.APIVersion}})')"

  # --- single-node swarm, for the Swarm backend's tests -----------------------
  # Initialized only if the engine is in no swarm, and left on exit then.
  if [ "$(docker info --format '{{.Swarm.LocalNodeState}}')" = inactive ]; then
    docker network inspect docker_gwbridge >/dev/null 2>&1 || GWBRIDGE_CREATED=1
    docker swarm init --advertise-addr 127.0.0.1 >/dev/null
    SWARM_INITIALIZED=1
    log "initialized a single-node swarm (left again on exit)"
  fi
  if [ "$(docker info --format '{{.Swarm.ControlAvailable}}')" = true ]; then
    export PIPES_TEST_SWARM=1
  else
    log "the engine is in a swarm but not a manager: the Swarm tests are skipped"
  fi

  # --- local registry with htpasswd ------------------------------------------
  REGISTRY_PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
  REGISTRY="127.0.0.1:$REGISTRY_PORT"
  REGISTRY_USER="pipes-test"
  REGISTRY_PASSWORD="$(head -c 18 /dev/urandom | base64 | tr -d '/+=')"
  mkdir -p "$WORK/registry/data"
  htpasswd -Bbc "$WORK/registry/htpasswd" "$REGISTRY_USER" "$REGISTRY_PASSWORD" 2>/dev/null
  cat >"$WORK/registry/config.yml" <<YAML
version: 0.1
log:
  level: error
storage:
  filesystem:
    rootdirectory: $WORK/registry/data
  delete:
    enabled: true
http:
  addr: $REGISTRY
auth:
  htpasswd:
    realm: pipes-test
    path: $WORK/registry/htpasswd
YAML
  docker-registry serve "$WORK/registry/config.yml" >"$WORK/registry.log" 2>&1 &
  REGISTRY_PID=$!
  for _ in $(seq 1 50); do
    code="$(curl -s -o /dev/null -w '%{http_code}' "http://$REGISTRY/v2/" || true)"
    [ "$code" = 401 ] && break
    sleep 0.2
  done
  [ "${code:-}" = 401 ] || { cat "$WORK/registry.log" >&2; log "registry did not start"; exit 1; }
  export DOCKER_CONFIG="$WORK/docker-config"
  mkdir -p "$DOCKER_CONFIG"
  echo "$REGISTRY_PASSWORD" | docker login -u "$REGISTRY_USER" --password-stdin "$REGISTRY" >/dev/null
  log "registry at $REGISTRY (user $REGISTRY_USER)"

  # --- builds ----------------------------------------------------------------
  # Static binaries (.cargo/config.toml): the fixture and the Pipes image run on scratch.
  log "building the fixture server"
  cargo build --release -p fixture-server
  FIXTURE_IMAGE="pipes-test-fixture:$RUN"
  mkdir -p "$WORK/fixture"
  cp target/x86_64-unknown-linux-gnu/release/fixture-server tests/fixture-server/Dockerfile "$WORK/fixture/"
  docker_build --label "pipes.test=$RUN" -t "$FIXTURE_IMAGE" "$WORK/fixture"
  log "fixture image $FIXTURE_IMAGE"

  export PIPES_TEST_RUN="$RUN"
  export PIPES_TEST_REGISTRY="$REGISTRY"
  export PIPES_TEST_REGISTRY_USER="$REGISTRY_USER"
  export PIPES_TEST_REGISTRY_PASSWORD="$REGISTRY_PASSWORD"
  export PIPES_TEST_FIXTURE_IMAGE="$FIXTURE_IMAGE"
}
