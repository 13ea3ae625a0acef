# The brokers of the relay's other sinks, for scripts/env (sourced): NATS with
# JetStream, RabbitMQ and Redis. A server that already answers at its standard port
# (4222, 5672, 6379 on 127.0.0.1) is used as it is; otherwise the Debian package is
# installed and a private server started on a free port, its state under $STATE.
# Each sets <NAME>_URL for write_settings.

# Whether a NATS server with JetStream answers at 127.0.0.1:$1 (its INFO line says
# so before anything is sent).
nats_answers() {
  local line
  line=$(timeout 3 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1 && head -n 1 <&3" 2>/dev/null) || true
  [[ $line == INFO* && $line == *'"jetstream":true'* ]]
}

# Whether Redis answers PING at 127.0.0.1:$1.
redis_answers() {
  local reply
  reply=$(timeout 3 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1 && printf 'PING\r\n' >&3 && head -c 5 <&3" 2>/dev/null) || true
  [[ $reply == +PONG* ]]
}

# Whether an AMQP 0-9-1 broker answers at 127.0.0.1:$1: to the protocol header it
# replies with a method frame (type 1).
rabbitmq_answers() {
  local reply
  reply=$(timeout 3 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1 && printf 'AMQP\x00\x00\x09\x01' >&3 && head -c 1 <&3 | od -An -tu1" 2>/dev/null) || true
  [[ ${reply// /} == 1 ]]
}

# The port of the private server $1 this checkout started, if it still runs.
private_port() {
  local name=$1 pid
  [ -f "$STATE/$name.pid" ] || return 1
  pid=$(cat "$STATE/$name.pid")
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
  cat "$STATE/$name.port"
}

# Waits until `$1_answers $2` holds (the server $1 on port $2, started as pid $3).
wait_answers() {
  local name=$1 port=$2 pid=$3 waited=0
  until "${name}_answers" "$port"; do
    launched_alive "$pid" || { tail -n 20 "$STATE/$name.log" >&2; die "$name exited during start (log: $STATE/$name.log)"; }
    sleep 0.5
    waited=$((waited + 1))
    [ "$waited" -lt 120 ] || die "$name did not answer on $port within 60 s (log: $STATE/$name.log)"
  done
}

nats_up() {
  if nats_answers 4222; then
    say "NATS with JetStream answers on 127.0.0.1:4222; using it"
    NATS_URL=nats://127.0.0.1:4222
    return
  fi
  nats_private
}

# Runs this checkout's private server $1 (reused while it answers), installing
# Debian's package $2 when its program $3 is missing, on a free port from $4 up;
# the rest of the arguments are its command line, with @PORT@ and @DIR@ (its data
# folder) filled in. Sets PRIVATE_PORT.
private_server() {
  local name=$1 package=$2 program=$3 base=$4 port
  shift 4
  if port=$(private_port "$name") && "${name}_answers" "$port"; then
    say "the private $name server runs on 127.0.0.1:$port"
  else
    command -v "$program" >/dev/null 2>&1 || apt_install "$package"
    port=$(free_port $((base + $(hash_offset))))
    say "starting a private $name server on 127.0.0.1:$port"
    mkdir -p "$STATE/$name"
    local args=() arg
    for arg in "$@"; do
      arg=${arg//@PORT@/$port}
      args+=("${arg//@DIR@/$STATE/$name}")
    done
    setsid "${args[@]}" >>"$STATE/$name.log" 2>&1 </dev/null &
    local pid=$!
    printf '%s\n' "$pid" >"$STATE/$name.pid"
    printf '%s\n' "$port" >"$STATE/$name.port"
    wait_answers "$name" "$port" "$pid"
  fi
  PRIVATE_PORT=$port
}

nats_private() {
  private_server nats nats-server nats-server 24222 \
    nats-server -a 127.0.0.1 -p @PORT@ -js -sd @DIR@
  NATS_URL=nats://127.0.0.1:$PRIVATE_PORT
}

redis_up() {
  if redis_answers 6379; then
    say "Redis answers on 127.0.0.1:6379; using it"
    REDIS_URL=redis://127.0.0.1:6379
    return
  fi
  redis_private
}

redis_private() {
  private_server redis redis-server redis-server 26379 \
    redis-server --bind 127.0.0.1 --port @PORT@ --dir @DIR@ --save '' --appendonly no \
    --protected-mode no
  REDIS_URL=redis://127.0.0.1:$PRIVATE_PORT
}

rabbitmq_up() {
  if rabbitmq_answers 5672; then
    say "RabbitMQ answers on 127.0.0.1:5672; using it (guest/guest)"
    RABBITMQ_URL=amqp://guest:guest@127.0.0.1:5672/%2f
    return
  fi
  rabbitmq_private
}

# Starts (or finds) this checkout's private rabbitmq server; sets RABBITMQ_URL.
rabbitmq_private() {
  local port
  if port=$(private_port rabbitmq) && rabbitmq_answers "$port"; then
    say "the private RabbitMQ node runs on 127.0.0.1:$port"
  else
    [ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] || apt_install rabbitmq-server
    port=$(free_port $((25672 + $(hash_offset))))
    local dist
    dist=$(free_port $((port + 1000)))
    say "starting a private RabbitMQ node on 127.0.0.1:$port (an Erlang node: about 10 s)"
    local base=$STATE/rabbitmq
    mkdir -p "$base/mnesia" "$base/log"
    : >"$base/enabled_plugins"
    printf 'loopback_users = none\nlisteners.tcp.default = 127.0.0.1:%s\n' "$port" >"$base/rabbitmq.conf"
    # The package's rabbitmq-server switches to the rabbitmq user; the script
    # under /usr/lib runs the node as the caller, with its files where we say.
    setsid env HOME="$base" \
      RABBITMQ_NODENAME="outbox-$HASH@localhost" \
      RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 RABBITMQ_NODE_PORT="$port" \
      RABBITMQ_DIST_PORT="$dist" \
      RABBITMQ_CONFIG_FILE="$base/rabbitmq" \
      RABBITMQ_MNESIA_BASE="$base/mnesia" RABBITMQ_LOG_BASE="$base/log" \
      RABBITMQ_ENABLED_PLUGINS_FILE="$base/enabled_plugins" \
      RABBITMQ_PID_FILE="$base/node.pid" \
      /usr/lib/rabbitmq/bin/rabbitmq-server >>"$STATE/rabbitmq.log" 2>&1 </dev/null &
    local pid=$!
    printf '%s\n' "$pid" >"$STATE/rabbitmq.pid"
    printf '%s\n' "$port" >"$STATE/rabbitmq.port"
    wait_answers rabbitmq "$port" "$pid"
  fi
  RABBITMQ_URL=amqp://guest:guest@127.0.0.1:$port/%2f
}

brokers_up() {
  nats_up
  rabbitmq_up
  redis_up
}

# Stops the private servers this checkout started (never the shared ones).
brokers_down() {
  local name pid
  for name in nats redis rabbitmq; do
    [ -f "$STATE/$name.pid" ] || continue
    pid=$(cat "$STATE/$name.pid")
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
      say "stopping the private $name server"
      # The node's process group: the RabbitMQ script runs the Erlang VM as a child.
      kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
      local waited=0
      while kill -0 "$pid" 2>/dev/null && [ "$waited" -lt 60 ]; do
        sleep 0.25; waited=$((waited + 1))
      done
      kill -9 -- "-$pid" 2>/dev/null || kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$STATE/$name.pid"
  done
}

brokers_status() {
  local name url
  for name in nats rabbitmq redis; do
    url=$(grep "^export ${name^^}_URL=" "$SETTINGS" 2>/dev/null | cut -d"'" -f2) || true
    echo "$(printf '%-9s' "$name") ${url:-not configured (scripts/env up)}"
  done
}
