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
  CLUSTER_UP=""

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
    [ -n "${CLUSTER_UP:-}" ] && scripts/cluster down
    [ -n "${DEBIAN_IMAGE:-}" ] && docker rmi -f "$DEBIAN_IMAGE" >/dev/null 2>&1
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

  build_service_images

  export PIPES_TEST_RUN="$RUN"
  export PIPES_TEST_REGISTRY="$REGISTRY"
  export PIPES_TEST_REGISTRY_USER="$REGISTRY_USER"
  export PIPES_TEST_REGISTRY_PASSWORD="$REGISTRY_PASSWORD"
  export PIPES_TEST_FIXTURE_IMAGE="$FIXTURE_IMAGE"
}

# A three-node swarm for the tests and benchmarks of a real cluster
# (scripts/cluster: engines in network namespaces of their own), pulling
# from this run's registry, whose storage it serves on the cluster's bridge;
# taken down on exit. Exports PIPES_TEST_CLUSTER when it is up.
setup_cluster() {
  CLUSTER_UP=1
  if PIPES_CLUSTER_REGISTRY_STORAGE="$WORK/registry/data" PIPES_CLUSTER_REGISTRY_HTPASSWD="$WORK/registry/htpasswd" \
    scripts/cluster up >"$WORK/cluster.txt"; then
    export PIPES_TEST_CLUSTER="${PIPES_CLUSTER_ROOT:-/var/lib/pipes-cluster}"
    log "three-node swarm up (scripts/cluster)"
  else
    log "scripts/cluster up failed: the cluster tests are skipped"
  fi
}

# The Debian mirror the machine's apt sources name first.
apt_mirror() {
  local uri
  uri="$(grep -h -m1 '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -1 | awk '{print $2}')"
  [ -n "$uri" ] || uri="$(grep -h -m1 '^deb ' /etc/apt/sources.list 2>/dev/null | awk '{print $2}')"
  printf '%s\n' "${uri:-http://deb.debian.org/debian}"
}

# Real services for the services tests: Postgres, Redis, and a Python app
# that reads and writes both by service name, on one Debian root file system
# made with debootstrap from the machine's mirror and imported into the
# engine. The root file system is cached under target/ by its package list
# (about a minute to make); the images are made per run and exported as
# PIPES_TEST_{POSTGRES,REDIS,APP}_IMAGE.
SERVICE_PACKAGES="postgresql-15,redis-server,python3,python3-psycopg2,python3-redis"
build_service_images() {
  local cache tar suite root
  cache="${CARGO_TARGET_DIR:-target}/test-images"
  tar="$cache/debian-$(printf '%s' "$SERVICE_PACKAGES" | sha256sum | cut -c1-12).tar"
  if [ ! -s "$tar" ]; then
    ensure_commands debootstrap:debootstrap
    suite="$(. /etc/os-release && echo "$VERSION_CODENAME")"
    root="$WORK/rootfs"
    log "making a Debian $suite root file system for the services tests from $(apt_mirror) (about a minute)"
    if ! debootstrap --variant=minbase --include="$SERVICE_PACKAGES" "$suite" "$root" "$(apt_mirror)" >"$WORK/debootstrap.log" 2>&1; then
      tail -20 "$WORK/debootstrap.log" >&2
      return 1
    fi
    # The packages' caches and the cluster the package made are not needed:
    # the image's entrypoint makes its cluster in the volume.
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/usr/share/doc "$root"/usr/share/man "$root"/var/lib/postgresql/15
    mkdir -p "$root/var/lib/postgresql/data" "$root/data"
    chroot "$root" chown postgres:postgres /var/lib/postgresql/data
    chroot "$root" chown redis:redis /data
    chmod 700 "$root/var/lib/postgresql/data"
    mkdir -p "$cache"
    tar -C "$root" -cf "$tar.part" . && mv "$tar.part" "$tar"
    rm -rf "$root"
  fi
  DEBIAN_IMAGE="pipes-test-debian:$RUN"
  docker import "$tar" "$DEBIAN_IMAGE" >/dev/null
  local ctx="$WORK/services"
  mkdir -p "$ctx/postgres" "$ctx/redis" "$ctx/app"
  cp tests/services/pg-entry "$ctx/postgres/"
  cp tests/services/app.py "$ctx/app/"
  cat >"$ctx/postgres/Dockerfile" <<DOCKERFILE
FROM $DEBIAN_IMAGE
COPY pg-entry /usr/local/bin/pg-entry
USER postgres
ENV PGDATA=/var/lib/postgresql/data
EXPOSE 5432
ENTRYPOINT ["/usr/local/bin/pg-entry"]
DOCKERFILE
  cat >"$ctx/redis/Dockerfile" <<DOCKERFILE
FROM $DEBIAN_IMAGE
USER redis
EXPOSE 6379
ENTRYPOINT ["redis-server", "--protected-mode", "no", "--bind", "0.0.0.0", "--dir", "/data", "--appendonly", "yes"]
DOCKERFILE
  cat >"$ctx/app/Dockerfile" <<DOCKERFILE
FROM $DEBIAN_IMAGE
COPY app.py /app/app.py
USER nobody
EXPOSE 8000
ENTRYPOINT ["python3", "/app/app.py"]
DOCKERFILE
  local name
  for name in postgres redis app; do
    docker_build --label "pipes.test=$RUN" -t "pipes-test-$name:$RUN" "$ctx/$name"
  done
  export PIPES_TEST_POSTGRES_IMAGE="pipes-test-postgres:$RUN"
  export PIPES_TEST_REDIS_IMAGE="pipes-test-redis:$RUN"
  export PIPES_TEST_APP_IMAGE="pipes-test-app:$RUN"
  log "service images from Debian $(. /etc/os-release && echo "$VERSION_CODENAME"): postgres, redis, app"
}
