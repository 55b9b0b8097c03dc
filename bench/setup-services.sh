#!/usr/bin/env bash
# Makes the machine's services ready for cuttle-bench's baselines; idempotent, fails loudly.
# - RabbitMQ: the Web-MQTT plugin on 127.0.0.1:15675 (the load tool's baseline) and the MQTT
#   plugin's TCP listener on 127.0.0.1:1884 (not 1883, Mosquitto's; the tests' MQTT 3.1.1
#   broker and cuttle-bench's cuttle-rabbitmq target), with an open-file limit high enough for
#   20,000 clients.
# - nats-server and mosquitto: the tool starts private instances; only the binaries are needed.
set -euo pipefail
die() { printf 'setup-services: %s\n' "$*" >&2; exit 1; }

command -v nats-server >/dev/null || die "nats-server is not installed (apt-get install nats-server)"
command -v mosquitto >/dev/null || die "mosquitto is not installed (apt-get install mosquitto)"
command -v rabbitmqctl >/dev/null || die "RabbitMQ is not installed (apt-get install rabbitmq-server)"
[ -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || die "the plots need fonts-dejavu-core"

conf=/etc/rabbitmq/rabbitmq.conf
touch "$conf"
add_conf() { grep -q "^$1" "$conf" || echo "$1 = $2" >> "$conf"; }
# Earlier versions of this script turned the MQTT listener off.
sed -i '/^mqtt.listeners.tcp = none$/d' "$conf"
add_conf "mqtt.listeners.tcp.1" "127.0.0.1:1884"
add_conf "web_mqtt.tcp.ip" "127.0.0.1"
add_conf "web_mqtt.tcp.port" "15675"

web_mqtt_up() { (exec 3<>/dev/tcp/127.0.0.1/15675) 2>/dev/null; }
mqtt_up() { (exec 3<>/dev/tcp/127.0.0.1/1884) 2>/dev/null; }
fd_limit() { rabbitmqctl status 2>/dev/null | awk '/File Descriptors/{f=1} f && /limit:/{gsub(/.*limit: /,""); print; exit}'; }

# The sandbox's hard limit may be below what RabbitMQ would like; take the hard limit. `su`
# (which rabbitmq-server uses when started by root) resets the soft limit to 1024 through PAM,
# so raise it inside the rabbitmq user's shell.
want_fds=$(ulimit -Hn)
[ "$want_fds" = unlimited ] && want_fds=65536
if rabbitmqctl -q status >/dev/null 2>&1; then
  limit=$(fd_limit || echo 0)
  if [ "${limit:-0}" -lt $((want_fds / 2)) ] || ! mqtt_up || ! web_mqtt_up; then
    echo "restarting RabbitMQ with its MQTT listeners and an open-file limit of $want_fds (was ${limit:-unknown})"
    rabbitmqctl -q stop >/dev/null 2>&1 || true
    for _ in $(seq 60); do rabbitmqctl -q status >/dev/null 2>&1 || break; sleep 1; done
  fi
fi
if ! rabbitmqctl -q status >/dev/null 2>&1; then
  rabbitmq-plugins --offline enable rabbitmq_mqtt rabbitmq_web_mqtt >/dev/null
  su rabbitmq -s /bin/sh -c "ulimit -n $want_fds && cd /var/lib/rabbitmq && /usr/lib/rabbitmq/bin/rabbitmq-server -detached"
  sleep 2
  rabbitmqctl -q await_startup --timeout 120 || die "RabbitMQ did not start"
fi
if ! web_mqtt_up; then
  # A running node whose config predates the lines above: set them live, then enable.
  rabbitmqctl -q eval 'application:set_env(rabbitmq_mqtt, tcp_listeners, [{"127.0.0.1", 1884}], [{persistent, true}]), application:set_env(rabbitmq_web_mqtt, tcp_config, [{port, 15675}, {ip, "127.0.0.1"}], [{persistent, true}]).' >/dev/null
  rabbitmq-plugins -q enable rabbitmq_mqtt rabbitmq_web_mqtt >/dev/null
fi
for _ in $(seq 100); do web_mqtt_up && break; sleep 0.2; done
web_mqtt_up || die "RabbitMQ Web-MQTT is not listening on 127.0.0.1:15675"
for _ in $(seq 100); do mqtt_up && break; sleep 0.2; done
mqtt_up || die "RabbitMQ MQTT is not listening on 127.0.0.1:1884"
echo "RabbitMQ Web-MQTT on 127.0.0.1:15675, MQTT on 127.0.0.1:1884 (open-file limit $(fd_limit))"
