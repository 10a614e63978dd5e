#!/bin/sh
# The arm64 device test's driver, run INSIDE the arm64 guest (systemd as PID 1, under
# emulation) by iotunnel-device-test.service; test_device_arm64.py puts it on the payload disk
# as "run". It installs the arm64 package, starts mosquitto with client certificates
# (mosquitto.conf made on the host by testbed.mqtt), configures the agent as README.md says and
# starts it: a running agent, ready at its broker. Report lines go to the console, each written
# at once: RESULT <check> ok|fail <detail>, LOG <line>, UPTIME, DONE.
set -u
P=/opt/iotunnel-device
OUT=/dev/ttyAMA0
UNIT=iotunnel-agent
failed=0
say() { printf '%s\n' "$*" > "$OUT"; }
result() {  # result NAME STATUS [DETAIL]
    say "RESULT $1 $2 ${3:-}"
    [ "$2" = ok ] || failed=$((failed + 1))
}
say "UPTIME start $(cut -d' ' -f1 /proc/uptime)"

cd "$P/debs" || exit 1
if apt-get install -y ./iotunnel_*_arm64.deb > /tmp/apt.log 2>&1; then
    result install ok "$(dpkg-query -W -f='${Version} ${Architecture}' iotunnel)"
else
    result install fail "apt-get exit $?"
    sed 's/^/LOG /' /tmp/apt.log | tail -n 30 > "$OUT"
fi
result enabled-not-started "$( [ "$(systemctl is-enabled $UNIT)" = enabled ] &&
    ! systemctl is-active --quiet $UNIT && echo ok || echo fail)"

mosquitto -c "$P/mosquitto.conf" > /tmp/mosquitto.log 2>&1 &
i=0
until grep -q 'mosquitto version .* running' /tmp/mosquitto.log; do
    i=$((i + 1)); [ $i -gt 600 ] && break; sleep 0.5
done
result broker "$(grep -q running /tmp/mosquitto.log && echo ok || echo fail)"

install -m 0644 "$P/pki/thing-1.pem" /etc/iotunnel/certs/device.pem.crt
install -m 0644 "$P/pki/ca.pem" /etc/iotunnel/certs/AmazonRootCA1.pem
install -m 0600 "$P/pki/thing-1.key" /etc/iotunnel/certs/private.pem.key
sed -i -e "s/^endpoint =.*/endpoint = 127.0.0.1/" -e "s/^port =.*/port = $(cat "$P/mqtt_port")/" \
    -e "s/^client_id =.*/client_id = thing-1/" /etc/iotunnel/agent.ini
if iotunnel-agent --check > /tmp/check.log 2>&1; then result agent-check ok
else result agent-check fail "$(tail -n 1 /tmp/check.log)"; fi

timeout 1200 systemctl start $UNIT
code=$?
status=$(systemctl show -p StatusText --value $UNIT)
if [ $code = 0 ] && journalctl -u $UNIT | grep -q 'ready: waiting for tunnel notifications'; then
    result agent-running ok "$status"
else
    result agent-running fail "systemctl start exit $code, $status"
fi
pid=$(systemctl show -p MainPID --value $UNIT)
result awscrt-loaded "$(grep -q _awscrt "/proc/$pid/maps" && echo ok || echo fail)" \
    "$(uname -m), MemoryDenyWriteExecute=$(systemctl show -p MemoryDenyWriteExecute --value $UNIT)"
journalctl -u $UNIT --no-pager -o short-monotonic | sed 's/^/LOG /' > "$OUT"
say "UPTIME end $(cut -d' ' -f1 /proc/uptime)"
say "DONE failed=$failed"
