#!/usr/bin/env bash
# Local test servers for the storage channels, on loopback only.
#
#   scripts/services.sh start   install what is missing, start (or reuse) every server, wait until
#                               each answers, and print `export VAR=...` lines on stdout:
#                                   eval "$(scripts/services.sh start)"
#   scripts/services.sh env     print the export lines of the servers already running
#   scripts/services.sh stop    stop the servers and remove their state (data, logs, pids)
#
# Servers:
#   redis   Debian redis-server (apt-get), in-memory (no RDB/AOF)
#   s3      s3s-fs 0.14.1 (cargo install; versions >= 0.15 need a newer rustc), checks SigV4 with
#           the test credentials below, stores objects under the state directory
#   dynamo  dynalite 4.0.0 (npm), in memory
#   stun    coturn 4.6.1 (apt-get), STUN only, on 127.0.0.1 and 127.0.0.2 (same port), so that a
#           client can compare the mappings two server addresses see (FMI_TEST_STUN lists both)
#
# State lives in ${FMI_SERVICES_DIR:-/tmp/fmi-services}/run (ports, pids, logs, data); the npm
# install of dynalite lives in ${FMI_SERVICES_DIR}/npm and survives `stop`, so a restart is fast.
# Everything except the export lines goes to stderr. Every wait is bounded.
set -euo pipefail

DIR="${FMI_SERVICES_DIR:-/tmp/fmi-services}"
RUN="$DIR/run"
NPM_DIR="$DIR/npm"
S3S_VERSION="0.14.1"
DYNALITE_VERSION="4.0.0"
# Test-only credentials: s3s-fs is started with them and the SDK signs with them. They are not
# secrets and grant nothing outside this machine.
ACCESS_KEY="fmi-test-access-key"
SECRET_KEY="fmi-test-secret-key"
REGION="us-east-1"

log() { echo "services.sh: $*" >&2; }
die() {
    log "error: $*"
    exit 1
}

# True when something accepts TCP connections on 127.0.0.1:$1.
port_open() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# A free loopback port: random in 20000..59999, checked by connecting (bounded attempts).
free_port() {
    local i p
    for i in $(seq 1 200); do
        p=$((20000 + (RANDOM * 32768 + RANDOM) % 40000))
        # Avoid ports another server of ours already took in this run.
        if grep -qx "$p" "$RUN"/*.port 2>/dev/null; then continue; fi
        if ! port_open "$p"; then
            echo "$p"
            return 0
        fi
    done
    die "no free loopback port found after 200 tries"
}

pid_alive() {
    local f="$RUN/$1.pid"
    [ -s "$f" ] && kill -0 "$(cat "$f")" 2>/dev/null
}

# The service is up when its pid lives and its port answers.
running() {
    local name="$1"
    [ -s "$RUN/$name.port" ] && pid_alive "$name" && port_open "$(cat "$RUN/$name.port")"
}

# Waits (at most $3 seconds) until probe $2 succeeds for service $1.
wait_for() {
    local name="$1" probe="$2" secs="$3" i
    for i in $(seq 1 $((secs * 10))); do
        if "$probe"; then return 0; fi
        if ! pid_alive "$name"; then
            log "$name exited; last log lines:"
            tail -n 20 "$RUN/$name.log" >&2 || true
            die "$name did not start"
        fi
        sleep 0.1
    done
    tail -n 20 "$RUN/$name.log" >&2 || true
    die "$name did not answer within ${secs}s"
}

apt_install() {
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y "$@" >&2; then
        log "apt-get install failed; running apt-get update and retrying"
        apt-get update >&2
        apt-get install -y "$@" >&2
    fi
}

# ---------------------------------------------------------------------------------------------
# redis

redis_probe() {
    local port
    port="$(cat "$RUN/redis.port")"
    [ "$(redis-cli -h 127.0.0.1 -p "$port" ping 2>/dev/null)" = "PONG" ]
}

start_redis() {
    if running redis && redis_probe; then
        log "redis already running on port $(cat "$RUN/redis.port")"
        return
    fi
    if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null; then
        log "installing redis-server (apt-get)"
        apt_install redis-server
    fi
    local port
    port="$(free_port)"
    echo "$port" >"$RUN/redis.port"
    mkdir -p "$RUN/redis-data"
    redis-server --bind 127.0.0.1 --port "$port" --save '' --appendonly no \
        --daemonize yes --dir "$RUN/redis-data" --pidfile "$RUN/redis.pid" \
        --logfile "$RUN/redis.log" >&2 9>&-
    # --daemonize writes the pid file shortly after forking.
    local i
    for i in $(seq 1 50); do
        [ -s "$RUN/redis.pid" ] && break
        sleep 0.1
    done
    wait_for redis redis_probe 20
    log "redis on 127.0.0.1:$port"
}

# ---------------------------------------------------------------------------------------------
# s3s-fs

s3s_bin() {
    if command -v s3s-fs >/dev/null; then
        command -v s3s-fs
    elif [ -x "${CARGO_HOME:-$HOME/.cargo}/bin/s3s-fs" ]; then
        echo "${CARGO_HOME:-$HOME/.cargo}/bin/s3s-fs"
    fi
}

s3_probe() {
    port_open "$(cat "$RUN/s3.port")"
}

# Starts service NAME with LAUNCH PORT on a free loopback port. A port found free can be taken
# before the service binds it (another process's ephemeral port): the service then exits at once
# with "address in use", and another port is tried, at most three times (s3s-fs hit this in CI
# as dynalite had before).
start_on_free_port() {
    local name=$1 launch=$2 port attempt
    for attempt in 1 2 3; do
        port="$(free_port)"
        echo "$port" >"$RUN/$name.port"
        "$launch" "$port"
        sleep 1
        if pid_alive "$name" || ! grep -qiE 'EADDRINUSE|address already in use' "$RUN/$name.log"; then
            return
        fi
        log "$name: port $port was taken meanwhile (attempt $attempt of 3)"
    done
}

start_s3() {
    if running s3; then
        log "s3s-fs already running on port $(cat "$RUN/s3.port")"
        return
    fi
    local bin
    bin="$(s3s_bin)"
    if [ -z "$bin" ] || ! "$bin" --version 2>/dev/null | grep -q "$S3S_VERSION"; then
        log "installing s3s-fs $S3S_VERSION (cargo install, a few minutes once)"
        command -v cargo >/dev/null || die "cargo is needed to install s3s-fs"
        cargo install "s3s-fs@$S3S_VERSION" --features binary --locked >&2
        bin="$(s3s_bin)"
        [ -n "$bin" ] || die "s3s-fs not found after cargo install"
    fi
    S3S_PRELOAD="$(build_nodelay)" S3S_BIN="$bin" start_on_free_port s3 launch_s3
    wait_for s3 s3_probe 30
    log "s3s-fs on 127.0.0.1:$(cat "$RUN/s3.port")"
}

# Builds scripts/nodelay.c (TCP_NODELAY on accepted sockets; see the file) into $RUN and prints
# its path, or nothing (and a warning) without a C compiler: s3s-fs then stalls up to 40 ms on
# GETs, which makes S3 tests slower but not wrong.
build_nodelay() {
    local src out="$RUN/nodelay.so"
    src="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/nodelay.c"
    if [ ! -f "$out" ] || [ "$src" -nt "$out" ]; then
        if ! cc -shared -fPIC -O2 -o "$out" "$src" -ldl >&2; then
            log "warning: could not build $src (no C compiler?); s3s-fs keeps Nagle's algorithm"
            return
        fi
    fi
    echo "$out"
}

launch_s3() {
    rm -rf "$RUN/s3-data"
    mkdir -p "$RUN/s3-data"
    LD_PRELOAD="${S3S_PRELOAD:-}" setsid "$S3S_BIN" --host 127.0.0.1 --port "$1" \
        --access-key "$ACCESS_KEY" --secret-key "$SECRET_KEY" "$RUN/s3-data" \
        </dev/null >"$RUN/s3.log" 2>&1 9>&- &
    echo $! >"$RUN/s3.pid"
}

# ---------------------------------------------------------------------------------------------
# dynalite

dynalite_cli() {
    echo "$NPM_DIR/node_modules/dynalite/cli.js"
}

dynamo_probe() {
    port_open "$(cat "$RUN/dynamo.port")"
}

start_dynamo() {
    if running dynamo; then
        log "dynalite already running on port $(cat "$RUN/dynamo.port")"
        return
    fi
    if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
        log "installing nodejs and npm (apt-get)"
        apt_install nodejs npm
    fi
    local installed=""
    if [ -f "$NPM_DIR/node_modules/dynalite/package.json" ]; then
        installed="$(node -p "require('$NPM_DIR/node_modules/dynalite/package.json').version" 2>/dev/null || true)"
    fi
    if [ "$installed" != "$DYNALITE_VERSION" ]; then
        log "installing dynalite $DYNALITE_VERSION (npm)"
        mkdir -p "$NPM_DIR"
        [ -f "$NPM_DIR/package.json" ] || echo '{"name":"fmi-services","private":true}' >"$NPM_DIR/package.json"
        (cd "$NPM_DIR" && npm install --no-audit --no-fund --loglevel=error "dynalite@$DYNALITE_VERSION") >&2
    fi
    start_on_free_port dynamo launch_dynamo
    wait_for dynamo dynamo_probe 30
    log "dynalite on 127.0.0.1:$(cat "$RUN/dynamo.port")"
}

launch_dynamo() {
    # Without --path dynalite keeps everything in memory; create/delete of tables are immediate.
    setsid node "$(dynalite_cli)" --host 127.0.0.1 --port "$1" \
        --createTableMs 0 --deleteTableMs 0 --updateTableMs 0 \
        </dev/null >"$RUN/dynamo.log" 2>&1 9>&- &
    echo $! >"$RUN/dynamo.pid"
}

# ---------------------------------------------------------------------------------------------
# stun (coturn)

stun_probe() {
    # coturn answers UDP; it has no TCP-only probe in STUN-only mode, so look for its socket.
    local port
    port="$(cat "$RUN/stun.port")"
    ss -uln 2>/dev/null | grep -q "127.0.0.2:$port "
}

start_stun() {
    if [ -s "$RUN/stun.port" ] && pid_alive stun && stun_probe; then
        log "stun already running on port $(cat "$RUN/stun.port")"
        return
    fi
    if ! command -v turnserver >/dev/null; then
        log "installing coturn (apt-get)"
        apt_install coturn
    fi
    local port
    port="$(free_port)"
    echo "$port" >"$RUN/stun.port"
    setsid turnserver -n --listening-ip=127.0.0.1 --listening-ip=127.0.0.2 \
        --listening-port="$port" --stun-only --no-cli --no-tls --no-dtls \
        --userdb="$RUN/stun.db" --pidfile="$RUN/stun.turnpid" --log-file=stdout \
        </dev/null >"$RUN/stun.log" 2>&1 9>&- &
    echo $! >"$RUN/stun.pid"
    wait_for stun stun_probe 20
    log "coturn (STUN) on 127.0.0.1:$port and 127.0.0.2:$port"
}

# ---------------------------------------------------------------------------------------------

print_env() {
    local missing=0
    for s in redis s3 dynamo; do
        if ! running "$s"; then
            log "$s is not running (scripts/services.sh start)"
            missing=1
        fi
    done
    if ! pid_alive stun; then
        log "stun is not running (scripts/services.sh start)"
        missing=1
    fi
    [ "$missing" = 0 ] || return 1
    echo "export FMI_TEST_REDIS_URL=redis://127.0.0.1:$(cat "$RUN/redis.port")"
    echo "export FMI_TEST_S3_ENDPOINT=http://127.0.0.1:$(cat "$RUN/s3.port")"
    echo "export FMI_TEST_DYNAMODB_ENDPOINT=http://127.0.0.1:$(cat "$RUN/dynamo.port")"
    echo "export FMI_TEST_STUN=127.0.0.1:$(cat "$RUN/stun.port"),127.0.0.2:$(cat "$RUN/stun.port")"
    echo "export AWS_ACCESS_KEY_ID=$ACCESS_KEY"
    echo "export AWS_SECRET_ACCESS_KEY=$SECRET_KEY"
    echo "export AWS_REGION=$REGION"
    # Never let the SDK's credential chain probe the EC2 metadata address from a test machine.
    echo "export AWS_EC2_METADATA_DISABLED=true"
}

stop_one() {
    local name="$1" pid i
    [ -s "$RUN/$name.pid" ] || return 0
    pid="$(cat "$RUN/$name.pid")"
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid" 2>/dev/null || true
        for i in $(seq 1 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            log "$name (pid $pid) ignored SIGTERM; sending SIGKILL"
            kill -9 "$pid" 2>/dev/null || true
        fi
        log "stopped $name (pid $pid)"
    fi
}

case "${1:-}" in
start)
    mkdir -p "$RUN"
    # A lock keeps two concurrent starts from racing over the same state. The servers are started
    # with fd 9 closed (`9>&-`), or they would hold the lock for as long as they run.
    exec 9>"$DIR/lock"
    flock -w 900 9 || die "another services.sh start holds $DIR/lock"
    start_redis
    start_s3
    start_dynamo
    start_stun
    print_env
    ;;
env)
    print_env
    ;;
stop)
    if [ -d "$RUN" ]; then
        for s in stun dynamo s3 redis; do stop_one "$s"; done
        rm -rf "$RUN"
    fi
    ;;
*)
    echo "usage: $0 start|stop|env" >&2
    exit 2
    ;;
esac
