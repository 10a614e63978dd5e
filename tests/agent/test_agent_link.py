"""The agent's MQTT link settings: ``https_proxy`` and ``NO_PROXY``, what the proxy children get,
and what a failed connection is explained as (a proxy's refusal, a clock outside the
certificates' validity). End to end, with tinyproxy and real certificates:
tests/e2e/test_agent_link_e2e.py."""

from __future__ import annotations

import dataclasses
import datetime
import logging
from pathlib import Path

import pytest
from agent_files import DeviceFiles

from agent import cli
from agent.config import ALPN_PROTOCOL, AgentSettings, ConfigError, HttpProxy, load, summary
from agent.diagnosis import PROXY_REFUSED, clock_problem, explain, validity
from agent.proxy_runner import child_environment
from iotunnel.secret import Secret
from testbed.pki import PKI

PASSWORD = "p@ss:w0rd/secret"
URL = "http://agent:p%40ss%3Aw0rd%2Fsecret@proxy.example.net:3128"


def load_settings(device: DeviceFiles, environ: dict[str, str], *argv: str) -> AgentSettings:
    loaded = load(["--config", str(device.ini), *argv], environ, device.root)
    assert isinstance(loaded, AgentSettings)
    return loaded


def proxy_error(device: DeviceFiles, environ: dict[str, str], *argv: str) -> str:
    with pytest.raises(ConfigError) as info:
        load(["--config", str(device.ini), *argv], environ, device.root)
    message = str(info.value)
    assert "\n" not in message
    assert "w0rd" not in message
    assert "secret" not in message
    return message


# --------------------------------------------------------------------------- https_proxy


def test_https_proxy_from_the_file_with_basic_credentials(device: DeviceFiles) -> None:
    device.write_ini(device.ini.read_text() + f"https_proxy = {URL}\n")
    s = load_settings(device, {})
    proxy = s.https_proxy
    assert proxy is not None
    assert (proxy.host, proxy.port, proxy.username) == ("proxy.example.net", 3128, "agent")
    assert proxy.password == Secret(PASSWORD)  # percent-decoded
    assert proxy.url.reveal() == URL
    assert str(proxy) == "http://proxy.example.net:3128"  # no credentials
    assert PASSWORD not in repr(s)
    assert "w0rd" not in repr(s)
    assert proxy.origin.endswith("agent.ini:8: https_proxy")
    assert s.mqtt_proxy == proxy
    assert "via the HTTP proxy http://proxy.example.net:3128" in summary(s)
    assert "w0rd" not in summary(s)


def test_https_proxy_precedence_and_the_environment(device: DeviceFiles) -> None:
    env_url, file_url = "http://env.example:1", "http://file.example:2"
    assert load_settings(device, {}).https_proxy is None
    # The standard variables, lower case first (as urllib reads them); empty means unset.
    s = load_settings(device, {"HTTPS_PROXY": env_url})
    assert s.https_proxy is not None
    assert (s.https_proxy.host, s.https_proxy.port) == (
        "env.example",
        1,
    )
    assert s.https_proxy.username is None
    assert s.https_proxy.password is None
    assert s.https_proxy.origin == "HTTPS_PROXY"
    s = load_settings(device, {"HTTPS_PROXY": env_url, "https_proxy": "http://lower:3"})
    assert s.https_proxy is not None
    assert s.https_proxy.host == "lower"
    assert load_settings(device, {"HTTPS_PROXY": env_url, "https_proxy": ""}).https_proxy is None
    # The agent's own setting wins over them: file, then IOTUNNEL_HTTPS_PROXY, then the flag.
    device.write_ini(device.ini.read_text() + f"https_proxy = {file_url}\n")
    s = load_settings(device, {"HTTPS_PROXY": env_url})
    assert s.https_proxy is not None
    assert s.https_proxy.host == "file.example"
    s = load_settings(device, {"IOTUNNEL_HTTPS_PROXY": "http://iot:4"})
    assert s.https_proxy is not None
    assert s.https_proxy.host == "iot"
    s = load_settings(
        device, {"IOTUNNEL_HTTPS_PROXY": "http://iot:4"}, "--https-proxy", "http://[::1]"
    )
    assert s.https_proxy is not None
    assert (s.https_proxy.host, s.https_proxy.port) == ("::1", 80)
    assert str(s.https_proxy) == "http://[::1]:80"


def test_no_proxy_exempts_the_broker_only_as_urllib_would(device: DeviceFiles) -> None:
    base = {"HTTPS_PROXY": "http://proxy:3128"}
    for no_proxy, direct in [
        ("", False),
        ("broker.example.net", True),
        (".example.net", True),
        ("example.net", True),
        ("other.example.net,broker.example.net:8883", True),
        ("broker.example.net:443", False),
        ("*", True),
        ("xbroker.example.net", False),
    ]:
        s = load_settings(device, {**base, "NO_PROXY": no_proxy})
        assert s.https_proxy is not None
        assert (s.mqtt_proxy is None) is direct, no_proxy
        if direct:
            assert "directly (NO_PROXY), tunnels via the HTTP proxy http://proxy:3128" in summary(s)
    s = load_settings(device, {**base, "NO_PROXY": "x", "no_proxy": "broker.example.net"})
    assert s.mqtt_proxy is None  # lower case wins


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("https://agent:p%40ss%3Aw0rd%2Fsecret@proxy:3128", "not an http:// URL"),
        ("socks5://agent:w0rdsecret@proxy:1080", "not an http:// URL"),
        ("proxy.example.net:3128", "not an http:// URL"),
        ("http://agent:w0rdsecret@:3128", "no host in the URL"),
        ("http://", "no host in the URL"),
        ("http://agent:w0rdsecret@proxy:0", "a port is 1..65535"),
        ("http://agent:w0rdsecret@proxy:65536", "a port is 1..65535"),
        ("http://agent:w0rdsecret@proxy:31x8", "a port is 1..65535"),
        ("http://agent:w0rdsecret@proxy:3128/path", "a proxy URL has no path, query or fragment"),
        ("http://agent:w0rdsecret@[::1:3128", "not a valid URL"),
        ("http://agent:w0rdsecret@pro_xy!:3128", "not a host name or IP address"),
        ("http://agent@proxy:3128", "a user name without a password"),
        ("http://agent:w0rd%ffsecret@proxy:3128", "the user name or password is not UTF-8"),
    ],
)
def test_a_bad_proxy_url_is_one_line_naming_where_it_was_set(
    device: DeviceFiles, url: str, problem: str
) -> None:
    assert proxy_error(device, {"HTTPS_PROXY": url}).startswith(f"HTTPS_PROXY: {problem}")
    assert proxy_error(device, {}, "--https-proxy", url).startswith(f"--https-proxy: {problem}")
    device.write_ini(device.ini.read_text() + f"https_proxy = {url}\n")
    message = proxy_error(device, {})
    assert message.startswith(f"{device.ini}:8: https_proxy: {problem}"), message


def test_check_exits_2_on_a_bad_proxy_url_without_quoting_it(
    device: DeviceFiles,
    pki: PKI,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "ftp://agent:w0rdsecret@proxy:21")
    code = cli.main(["--config", str(device.ini), "--check"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1
    assert err.startswith("iotunnel-agent: error: HTTPS_PROXY: not an http:// URL")
    assert "w0rdsecret" not in err


def test_port_443_says_alpn_in_the_summary(device: DeviceFiles) -> None:
    assert ALPN_PROTOCOL not in summary(load_settings(device, {}))
    assert f"broker.example.net:443 (ALPN {ALPN_PROTOCOL})" in summary(
        load_settings(device, {}, "--port", "443")
    )


# --------------------------------------------------------------------------- the children


def proxy(url: str = URL) -> HttpProxy:
    return HttpProxy("proxy.example.net", 3128, "agent", Secret(PASSWORD), Secret(url), "x")


def test_children_get_the_agents_proxy_in_their_environment_only() -> None:
    base = {
        "PATH": "/usr/bin",
        "NO_PROXY": "localhost",
        "HTTPS_PROXY": "http://old:1",
        "wss_proxy": "http://wss:2",
        "SOCKS_PROXY": "socks5h://s:3",
        "IOTUNNEL_HTTPS_PROXY": URL,
    }
    env = child_environment(base, Secret("a"), Secret("c"), proxy().url)
    assert env["HTTPS_PROXY"] == env["https_proxy"] == URL
    assert env["NO_PROXY"] == "localhost"
    for gone in ("wss_proxy", "SOCKS_PROXY", "IOTUNNEL_HTTPS_PROXY"):
        assert gone not in env
    # Without a proxy setting, the environment passes as it is.
    env = child_environment(base, Secret("a"), Secret("c"))
    assert env["HTTPS_PROXY"] == "http://old:1"
    assert env["wss_proxy"] == "http://wss:2"


# --------------------------------------------------------------------------- diagnosis


def settings_for(pki: PKI, **changes: object) -> AgentSettings:
    base = AgentSettings(
        endpoint="broker.example.net",
        port=443,
        client_id="thing-1",
        thing_name="thing-1",
        cert=pki.client.cert,
        key=pki.client.key,
        root_ca=pki.ca.cert,
        mapping_dir=Path("/etc/iotunnel/destination.d"),
        tunnel_endpoint=None,
        tunnel_ca=None,
        max_tunnels=4,
        log_level=logging.INFO,
        config_file=None,
    )
    return dataclasses.replace(base, **changes)


def test_a_refused_connect_names_the_proxy_and_where_it_was_set(pki: PKI) -> None:
    s = settings_for(pki, https_proxy=proxy())
    text = explain(PROXY_REFUSED, s)
    assert text == (
        "the HTTP proxy http://proxy.example.net:3128 refused to open a tunnel to "
        "broker.example.net:443 (AWS_ERROR_HTTP_PROXY_CONNECT_FAILED): check the user and "
        "password of https_proxy (x), and that the proxy allows CONNECT to port 443"
    )
    assert "w0rd" not in text
    assert explain("AWS_IO_SOCKET_CONNECTION_REFUSED", s) == (
        "cannot reach the HTTP proxy http://proxy.example.net:3128 "
        "(AWS_IO_SOCKET_CONNECTION_REFUSED): check https_proxy (x), and that the proxy runs"
    )
    assert explain("AWS_IO_DNS_INVALID_NAME", s).startswith("cannot reach the HTTP proxy")
    # Without a proxy, or with one that NO_PROXY exempts the broker from: the name alone.
    assert explain("AWS_IO_SOCKET_TIMEOUT", settings_for(pki)) == "AWS_IO_SOCKET_TIMEOUT"
    exempt = dataclasses.replace(s, no_proxy="broker.example.net")
    assert explain("AWS_IO_SOCKET_TIMEOUT", exempt) == "AWS_IO_SOCKET_TIMEOUT"
    assert explain(PROXY_REFUSED, exempt) == PROXY_REFUSED


def test_the_clock_against_the_device_certificate_and_the_cas(pki: PKI, tmp_path: Path) -> None:
    s = settings_for(pki)
    span = validity(pki.client.cert)
    assert span is not None
    start, end = span
    tls = "AWS_IO_TLS_ERROR_NEGOTIATION_FAILURE"
    assert explain(tls, s, now=start + 60) == tls  # the clock is fine: nothing to add
    assert clock_problem(s, start + 60) is None
    before = explain(tls, s, now=start - 86400)
    assert before.startswith(f"{tls}: the system clock (")
    assert "is before the device certificate's start" in before
    assert before.endswith(
        "the broker's certificate is not yet valid either: check the system clock (NTP)"
    )
    assert explain("AWS_IO_SOCKET_TIMEOUT", s, now=start - 86400) == "AWS_IO_SOCKET_TIMEOUT"
    after = explain(tls, s, now=end + 60)
    assert "the device certificate expired on" in after
    assert "check the system clock (NTP)" in after

    # A CA bundle that starts later than a (valid) device certificate: the clock is before it.
    later = PKI.create(tmp_path / "later", starts_in=datetime.timedelta(days=1))
    mixed = settings_for(pki, root_ca=later.ca.cert)
    problem = clock_problem(mixed, start + 60)
    assert problem is not None
    assert "before the start of every certificate in root_ca" in problem
    assert clock_problem(settings_for(pki, root_ca=tmp_path), start + 60) is None  # a directory
    # Unreadable files are no diagnosis, and no crash.
    assert validity(tmp_path / "missing.pem") is None
    assert clock_problem(settings_for(pki, cert=tmp_path / "missing.pem"), start + 60) is None


def test_a_password_on_the_command_line_is_warned_about_and_redacted(
    device: DeviceFiles,
    pki: PKI,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """At start (the agent's run replaced): a warning, and the password is redacted from logs."""
    import agent.daemon

    def run(
        settings: AgentSettings,
        notifier: object,
        env: object,
        redactor: object,
        output: object,
        zygote: object,
    ) -> int:
        logging.getLogger("agent").info("a line that quotes %s by mistake", PASSWORD)
        return 0

    monkeypatch.setattr(agent.daemon, "run", run)
    tls = [
        "--cert",
        str(pki.client.cert),
        "--key",
        str(pki.client.key),
        "--root-ca",
        str(pki.ca.cert),
    ]
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        assert cli.main(["--config", str(device.ini), *tls, "--https-proxy", URL]) == 0
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    err = capsys.readouterr().err
    assert "--https-proxy holds a password, and any user can read a command line" in err
    assert "a line that quotes [secure] by mistake" in err
    assert PASSWORD not in err
