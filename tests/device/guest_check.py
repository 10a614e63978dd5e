"""The device test's driver, run INSIDE the guest (systemd as PID 1) by
``iotunnel-device-test.service``; ``tests/device/test_device.py`` puts it on the payload disk.

It installs the package, sets up a broker with client certificates, the tunnel service with its
management API, sshd and a web server (``testbed``'s helpers, as the end-to-end tests use them),
configures the agent as README.md says, and checks what systemd, journald and dpkg show. Each
check is one line on the report port (the second serial port): ``RESULT <name> ok|fail
<detail>``; ``LOG`` lines carry diagnostics; ``DONE`` ends a run that got to its end.

Usage (in the guest): python3 guest_check.py PAYLOAD_DIR REPORT_DEVICE
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

from testbed.awsapi import aws_env, aws_json, start_api_service, write_credentials
from testbed.clients import http_get
from testbed.harness import Stack
from testbed.pki import PKI, CertPair
from testbed.sshd import ssh_command

UNIT = "iotunnel-agent"
THING = "thing-1"
CERTS = Path("/etc/iotunnel/certs")
INI = Path("/etc/iotunnel/agent.ini")
MAPPINGS = Path("/etc/iotunnel/destination.d/SSHDestination.ini")
#: sha256sum of 100000 zero bytes, computed by the ssh session through the tunnel.
ZEROS_SHA256 = "9192c25b734fcbadbe32dadc28089c60db0e39f90cc20ce2e5733f57261acc0c"
#: Generous: the guest may run under TCG emulation on a loaded machine.
WAIT = 240.0


class Report:
    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.failed = 0

    def line(self, text: str) -> None:
        self.out.write(text.replace("\n", " | ") + "\n")
        self.out.flush()

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.line(f"RESULT {name} {'ok' if ok else 'fail'} {detail}".rstrip())
        self.failed += not ok
        return ok

    def log(self, text: str) -> None:
        for line in text.splitlines()[-80:]:
            self.line(f"LOG {line}")


def sh(argv: Sequence[str | Path], timeout: float = WAIT) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["DEBIAN_FRONTEND"] = "noninteractive"
    return subprocess.run(
        [str(a) for a in argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        stdin=subprocess.DEVNULL,
        env=env,
    )


def apt(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """apt-get, offline (the guest has no network), in ``cwd`` (``./FILE.deb`` is relative)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["DEBIAN_FRONTEND"] = "noninteractive"
    return subprocess.run(
        ["apt-get", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=600,
        check=False,
        stdin=subprocess.DEVNULL,
        env=env,
    )


def show(*props: str) -> dict[str, str]:
    out = sh(["systemctl", "show", UNIT, *(f"--property={p}" for p in props)]).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def comm(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


def process_tree(agent: int) -> tuple[str, list[str]] | None:
    """The name of the agent's one child (the launcher, forked from it) and its children's
    names (a proxy per tunnel); None when the agent has no child or more than one."""
    try:
        [launcher] = children(agent)
        return comm(launcher), sorted(comm(pid) for pid in children(launcher))
    except (ValueError, OSError):
        return None


def journal(*extra: str) -> str:
    return sh(["journalctl", "--no-pager", "-u", UNIT, *extra]).stdout


def wait_until(what: str, condition: Callable[[], bool], timeout: float = WAIT) -> bool:
    """Poll ``condition`` (systemd and journald state has no event to await from here)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.5)
    return False


def running_again(old_pid: str) -> Callable[[], bool]:
    def check() -> bool:
        state = show("MainPID", "ActiveState", "SubState")
        return (
            state.get("ActiveState") == "active"
            and state.get("SubState") == "running"
            and state.get("MainPID") not in ("0", old_pid)
        )

    return check


def http_until_ok(port: int, path: str, expected: bytes, timeout: float = WAIT) -> str:
    """GET through the tunnel until it answers with ``expected`` (after a restart the agent's
    resumed proxy reconnects first); the last error, or '' once it did."""
    last = "no attempt"

    def attempt() -> bool:
        nonlocal last
        try:
            status, body = http_get(port, path, timeout=30)
        except OSError as exc:
            last = f"{type(exc).__name__}: {exc}"
            return False
        last = f"HTTP {status}, {len(body)} bytes"
        return status == 200 and body == expected

    return "" if wait_until("http", attempt, timeout) else last


def set_keys(path: Path, values: dict[str, object]) -> None:
    """Edit ``key = value`` lines of the installed conffile in place (as an administrator)."""
    text = path.read_text()
    for key, value in values.items():
        text, count = re.subn(rf"(?m)^{key} =.*$", f"{key} = {value}", text)
        assert count == 1, f"{key} not in {path}"
    path.write_text(text)


def run(payload: Path, report: Report) -> None:
    debs = sorted(payload.glob("debs/iotunnel_*_amd64.deb"))
    versions = json.loads((payload / "debs/versions.json").read_text())
    first, second = (payload / "debs" / versions[0], payload / "debs" / versions[1])
    report.line(f"LOG packages: {[d.name for d in debs]}")
    pki_dir = payload / "pki"
    pki = PKI(
        pki_dir,
        CertPair(pki_dir / "ca.pem", pki_dir / "ca.key"),
        CertPair(pki_dir / "server.pem", pki_dir / "server.key"),
        CertPair(pki_dir / "client.pem", pki_dir / "client.key"),
    )
    thing = CertPair(pki_dir / f"{THING}.pem", pki_dir / f"{THING}.key")
    service_client = CertPair(pki_dir / "iotunnel-service.pem", pki_dir / "iotunnel-service.key")

    # -- install: the README's promises before any configuration
    done = apt("install", "-y", f"./{first.name}", cwd=first.parent)
    if not report.check("install", done.returncode == 0, f"apt-get exit {done.returncode}"):
        report.log(done.stdout + done.stderr)
        return
    user = sh(["getent", "passwd", "iotunnel"]).stdout.strip().split(":")
    report.check(
        "system-user",
        len(user) == 7 and int(user[2]) < 1000 and user[6].endswith("nologin"),
        ":".join(user),
    )
    enabled = sh(["systemctl", "is-enabled", UNIT]).stdout.strip()
    active = sh(["systemctl", "is-active", UNIT]).stdout.strip()
    report.check(
        "enabled-not-started",
        enabled == "enabled" and active == "inactive",
        f"is-enabled={enabled} is-active={active}",
    )
    sh(["systemctl", "start", UNIT])
    state = show("ActiveState", "ConditionResult")
    report.check(
        "skipped-without-key",
        state.get("ActiveState") == "inactive" and state.get("ConditionResult") == "no",
        json.dumps(state),
    )
    conffiles = sh(["dpkg-query", "-W", "-f=${Conffiles}", "iotunnel"]).stdout
    report.check(
        "conffiles",
        str(INI) in conffiles and str(MAPPINGS) in conffiles,
        " ".join(line.split()[0] for line in conffiles.strip().splitlines()),
    )

    # -- the device's other parts: broker, tunnel service + API, sshd, web server
    with Stack(Path("/root/run")) as stack:
        broker, mqtt_port = stack.mosquitto(pki)
        credentials = write_credentials(Path("/root/run/api-credentials"))
        service = start_api_service(
            stack, pki, credentials=credentials, mqtt_port=mqtt_port, mqtt_client=service_client
        )
        _, ssh_port, ssh_setup = stack.sshd()
        www = Path("/root/www")
        www.mkdir()
        blob = bytes(range(256)) * 1024  # 256 KiB
        (www / "blob.bin").write_bytes(blob)
        _, http_port = stack.http_server(www)
        report.line(
            f"LOG mqtt {mqtt_port} wss {service.port} api {service.api_port} "
            f"ssh {ssh_port} http {http_port}"
        )

        # -- configure as README.md says, then start
        for source, name, mode in (
            (thing.cert, "device.pem.crt", 0o644),
            (pki.ca.cert, "AmazonRootCA1.pem", 0o644),
            (thing.key, "private.pem.key", 0o600),
        ):
            sh(["install", "-m", oct(mode)[2:], source, CERTS / name])
        set_keys(
            INI,
            {
                "endpoint": "127.0.0.1",
                "port": mqtt_port,
                "client_id": THING,
                "tunnel_endpoint": f"wss://127.0.0.1:{service.port}",
                "tunnel_ca": CERTS / "AmazonRootCA1.pem",
            },
        )
        MAPPINGS.write_text(f"SSH1 = {ssh_port}\nHTTP1 = {http_port}\n")
        edited_ini = INI.read_text()
        done = sh(["iotunnel-agent", "--check"])
        report.check("agent-check", done.returncode == 0, done.stderr.strip()[-300:])
        done = sh(["systemctl", "start", UNIT], timeout=WAIT)
        ready = wait_until("ready", lambda: "ready: waiting for tunnel notifications" in journal())
        report.check(
            "started",
            done.returncode == 0 and ready,
            f"systemctl start exit {done.returncode}, {show('ActiveState')}",
        )
        if not ready:
            report.log(journal())
            return

        # -- a tunnel with the AWS CLI; HTTP and SSH through it at the same time
        env = aws_env(credentials, pki.ca.cert)
        opened = aws_json(
            ["open-tunnel", "--destination-config", f"thingName={THING},services=HTTP1,SSH1"],
            service,
            env,
        )
        tokens = [opened["sourceAccessToken"], opened["destinationAccessToken"]]
        connected = wait_until(
            "destination",
            lambda: re.search(r"\[t1\].*connected to the tunnel service", journal()) is not None,
        )
        report.check("tunnel-destination", connected, opened["tunnelId"])
        tree = process_tree(int(show("MainPID")["MainPID"]))
        report.check(
            "process-tree",
            tree == ("iotunnel-zygote", ["iotunnel-proxy"]),
            f"the agent's children and grandchildren: {tree}",
        )
        source = stack.source(
            opened["sourceAccessToken"],
            service.port,
            "HTTP1=0,SSH1=0",
            ["HTTP1", "SSH1"],
            ca=pki.ca.cert,
            program=["/usr/bin/iotunnel-proxy"],
        )
        results: dict[str, Any] = {}

        def over_ssh() -> None:
            results["ssh"] = sh(
                ssh_command(
                    ssh_setup, source.ports["SSH1"], "sleep 2; head -c 100000 /dev/zero | sha256sum"
                )
            )

        ssh_thread = threading.Thread(target=over_ssh)
        ssh_thread.start()
        http_error = http_until_ok(source.ports["HTTP1"], "/blob.bin", blob)
        ssh_thread.join(WAIT)
        ssh = results.get("ssh")
        ssh_ok = ssh is not None and ssh.returncode == 0 and ssh.stdout.startswith(ZEROS_SHA256)
        ssh_detail = ssh and (ssh.returncode, ssh.stdout[:70], ssh.stderr[-200:])
        report.check(
            "http-and-ssh",
            not http_error and ssh_ok,
            f"http: {http_error or 'ok'}; ssh: {ssh_detail}",
        )

        # -- systemctl status: the live STATUS= line
        status = ""

        def has_status() -> bool:
            nonlocal status
            status = sh(["systemctl", "status", "--no-pager", UNIT]).stdout
            return re.search(r'Status: "MQTT connected; 1 tunnel', status) is not None

        report.check(
            "status-line",
            wait_until("status", has_status, 60),
            (re.findall(r"Status: .*", status) or ["no Status line"])[0],
        )

        # -- journald: priorities, tags, no token
        unmapped = aws_json(
            ["open-tunnel", "--destination-config", f"thingName={THING},services=VNC1"],
            service,
            env,
        )
        tokens += [unmapped["sourceAccessToken"], unmapped["destinationAccessToken"]]
        rejected = wait_until("rejected", lambda: "VNC1" in journal("-p", "warning"), 60)
        records = [
            json.loads(line) for line in journal("-o", "json").splitlines() if line.startswith("{")
        ]
        priorities = {
            str(r.get("MESSAGE", ""))[:60]: r.get("PRIORITY")
            for r in records
            if "ready: waiting" in str(r.get("MESSAGE")) or "VNC1" in str(r.get("MESSAGE"))
        }
        report.check(
            "journal-priorities",
            rejected
            and any(p == "6" and "ready" in m for m, p in priorities.items())
            and any(p == "4" and "VNC1" in m for m, p in priorities.items())
            and not any(str(r.get("MESSAGE", "")).startswith("<") for r in records),
            json.dumps(priorities),
        )
        tagged = [
            str(r.get("MESSAGE")) for r in records if str(r.get("MESSAGE")).startswith("[t1]")
        ]
        report.check("journal-tags", len(tagged) >= 2, f"{len(tagged)} lines tagged [t1]")

        # -- the hardening at run time
        pid = show("MainPID")["MainPID"]
        proc_status = Path(f"/proc/{pid}/status").read_text()
        fields = dict(
            (k, v.strip()) for k, _, v in (line.partition(":") for line in proc_status.splitlines())
        )
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        key_var = next((e.decode() for e in environ if e.startswith(b"IOTUNNEL_KEY=")), "")
        maps = Path(f"/proc/{pid}/maps").read_text()
        props = show("MemoryDenyWriteExecute", "User", "LoadCredential")
        report.check(
            "hardening-runtime",
            fields.get("NoNewPrivs") == "1"
            and fields.get("Seccomp") == "2"
            and fields.get("CapEff") == "0000000000000000"
            and fields.get("Uid", "").split()[0] == user[2]
            and props.get("MemoryDenyWriteExecute") == "yes"
            and "_awscrt" in maps,
            f"NoNewPrivs={fields.get('NoNewPrivs')} Seccomp={fields.get('Seccomp')} "
            f"CapEff={fields.get('CapEff')} Uid={fields.get('Uid')} awscrt={'_awscrt' in maps}",
        )
        report.check(
            "credential",
            key_var == "IOTUNNEL_KEY=/run/credentials/iotunnel-agent.service/device.key",
            key_var,
        )
        # The installed unit as this systemd reads it: no unknown or bad settings.
        verify = sh(["systemd-analyze", "verify", f"{UNIT}.service"])
        complaints = [line for line in (verify.stdout + verify.stderr).splitlines() if UNIT in line]
        report.check(
            "systemd-analyze-verify",
            not complaints,
            f"exit {verify.returncode} {complaints}",
        )
        security = sh(["systemd-analyze", "security", "--no-pager", UNIT])
        overall = re.search(r"Overall exposure level for \S+: ([\d.]+) (\w+)", security.stdout)
        report.check(
            "systemd-analyze-security",
            overall is not None and float(overall.group(1)) <= 2.0 and overall.group(2) == "OK",
            overall.group(0) if overall else security.stdout[-300:] + security.stderr[-300:],
        )

        # -- the watchdog: a frozen agent is killed and restarted
        os.kill(int(pid), signal.SIGSTOP)
        came_back = wait_until("watchdog", running_again(pid), 30 + 30 + 5 + WAIT)
        timeout_line = re.findall(
            r".*[Ww]atchdog timeout.*", sh(["journalctl", "--no-pager", "-b"]).stdout
        )
        report.check(
            "watchdog",
            came_back and bool(timeout_line),
            (timeout_line or ["no watchdog timeout in the journal"])[0][-120:],
        )
        error = http_until_ok(source.ports["HTTP1"], "/blob.bin", blob)
        report.check("tunnel-after-watchdog", not error, error)

        # -- a crash: back under Restart=
        before = show("MainPID", "NRestarts")
        os.kill(int(before["MainPID"]), signal.SIGSEGV)
        came_back = wait_until("crash", running_again(before["MainPID"]), 5 + WAIT)
        after = show("MainPID", "NRestarts")
        report.check(
            "restart-after-crash",
            came_back and int(after["NRestarts"]) > int(before["NRestarts"]),
            f"{before} -> {after}",
        )

        # -- upgrade to a higher version with the tunnel open
        wait_until(
            "ready again",
            lambda: show("StatusText").get("StatusText", "").startswith("MQTT connected"),
        )
        pid = show("MainPID")["MainPID"]
        done = apt("install", "-y", f"./{second.name}", cwd=second.parent)
        version = sh(["dpkg-query", "-W", "-f=${Version}", "iotunnel"]).stdout
        report.check(
            "upgrade",
            done.returncode == 0 and second.name.split("_")[1] == version,
            f"apt-get exit {done.returncode}, installed {version}",
        )
        if done.returncode != 0:
            report.log(done.stdout + done.stderr)
        kept = MAPPINGS.read_text() == f"SSH1 = {ssh_port}\nHTTP1 = {http_port}\n"
        report.check("upgrade-keeps-settings", INI.read_text() == edited_ini and kept)
        report.check(
            "upgrade-restarts",
            wait_until("upgrade restart", running_again(pid)),
            json.dumps(show("MainPID", "ActiveState")),
        )
        error = http_until_ok(source.ports["HTTP1"], "/blob.bin", blob)
        report.check("tunnel-after-upgrade", not error, error)

        # -- no token anywhere in the journal (every field of every record)
        everything = subprocess.run(
            ["journalctl", "--no-pager", "-b", "-o", "export"],
            capture_output=True,
            timeout=WAIT,
            check=False,
            stdin=subprocess.DEVNULL,
        ).stdout  # bytes: the export format has binary fields
        leaked = [i for i, token in enumerate(tokens) if token.encode() in everything]
        report.check(
            "journal-no-token",
            not leaked and len(everything) > 0,
            f"{len(tokens)} tokens, {len(everything)} bytes of journal, leaked {leaked}",
        )
        report.log(journal("-o", "short-monotonic"))
        source.proc.stop()

        # -- purge
        done = apt("purge", "-y", "iotunnel")
        gone = [
            p
            for p in (
                "/etc/iotunnel",
                "/var/lib/iotunnel",
                "/opt/iotunnel",
                "/lib/systemd/system/iotunnel-agent.service",
                "/usr/bin/iotunnel-agent",
            )
            if os.path.lexists(p)
        ]
        agent_left = sh(["pgrep", "-u", "iotunnel"]).stdout.split()
        report.check(
            "purge",
            done.returncode == 0 and not gone and not agent_left,
            f"exit {done.returncode}, left: {gone}, processes: {agent_left}",
        )
        report.check("purge-keeps-user", bool(sh(["getent", "passwd", "iotunnel"]).stdout))
        del broker


def uptime() -> float:
    """Seconds since the guest's kernel started."""
    return float(Path("/proc/uptime").read_text().split()[0])


def main(argv: list[str]) -> int:
    payload, device = Path(argv[1]), argv[2]
    with open(device, "w") as out:
        report = Report(out)
        report.line(f"UPTIME start {uptime():.1f}")
        try:
            run(payload, report)
        except Exception:
            report.check("driver", False, "exception")
            report.log(traceback.format_exc())
            report.log(journal())
        report.line(f"UPTIME end {uptime():.1f}")
        report.line(f"DONE failed={report.failed}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
