"""proxy.config: flags, option file, environment, mapping files, settings JSON -> ProxySettings."""

from __future__ import annotations

import copy
import json
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import FrozenInstanceError, asdict, replace
from pathlib import Path

import pytest

from iotunnel import __version__
from iotunnel.errors import ConfigError
from iotunnel.mode import Mode
from iotunnel.secret import Secret
from proxy.config import (
    CliExit,
    Endpoint,
    ProxySettings,
    ServiceMapping,
    Tuning,
    default_settings_json,
    load,
    parse_endpoint,
    parse_mapping_list,
    read_mapping_dir,
    read_mapping_file,
)
from testbed.pki import PKI

REPO = Path(__file__).resolve().parents[2]
TOKEN = "AQGAAXiNsecretTOKENvalue/with+base64=chars"
CLIENT = "client-token-0123456789abcdef0123456789"
SECRETS = (TOKEN, CLIENT, "secretTOKENvalue")
ENV = {"AWSIOT_TUNNEL_ACCESS_TOKEN": TOKEN}
US_EAST_1 = "wss://data.tunneling.iot.us-east-1.amazonaws.com:443/tunnel?local-proxy-mode="


def ok(argv: Sequence[str], cwd: Path, env: Mapping[str, str] | None = None) -> ProxySettings:
    result = load(argv, ENV if env is None else env, cwd)
    assert isinstance(result, ProxySettings)
    assert not any(secret in repr(result) for secret in SECRETS)
    return result


def err(argv: Sequence[str], cwd: Path, env: Mapping[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as caught:
        load(argv, ENV if env is None else env, cwd)
    message = str(caught.value)
    assert "\n" not in message
    assert message
    assert not any(secret in message for secret in SECRETS)
    return message


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------- value types


def test_secret_never_shows_its_value() -> None:
    secret = Secret(TOKEN)
    assert repr(secret) == str(secret) == f"{secret}" == "[secure]"
    assert secret.reveal() == TOKEN
    assert secret == Secret(TOKEN)
    assert secret != Secret("other")
    assert secret != TOKEN
    assert hash(secret) == hash(Secret(TOKEN))
    assert len({secret, Secret(TOKEN)}) == 1


def test_secret_copies_and_pickles() -> None:
    secret = Secret(TOKEN)
    assert copy.copy(secret) == copy.deepcopy(secret) == secret
    assert pickle.loads(pickle.dumps(secret)) == secret  # noqa: S301 - our own bytes


def test_settings_asdict_keeps_secrets_hidden(tmp_path: Path) -> None:
    settings = ok(["-r", "us-east-1", "-d", "22", "-i", CLIENT], tmp_path)
    shown = repr(asdict(settings))
    assert "[secure]" in shown
    assert TOKEN not in shown
    assert CLIENT not in shown


def test_secret_is_immutable() -> None:
    secret = Secret(TOKEN)
    with pytest.raises(AttributeError):
        secret._value = "x"
    with pytest.raises(AttributeError):
        del secret._value


def test_settings_repr_hides_tokens(tmp_path: Path) -> None:
    settings = ok(["-r", "us-east-1", "-d", "22", "-t", TOKEN, "-i", CLIENT], tmp_path)
    assert "[secure]" in repr(settings)
    assert settings.access_token.reveal() == TOKEN
    assert settings.client_token is not None
    assert settings.client_token.reveal() == CLIENT


@pytest.mark.parametrize(
    ("endpoint", "shown"),
    [
        (Endpoint(None, 22), "22"),
        (Endpoint("10.0.0.1", 80), "10.0.0.1:80"),
        (Endpoint("::1", 22), "[::1]:22"),
        (Endpoint(None, None, "/run/app.sock"), "/run/app.sock"),
    ],
)
def test_endpoint_str(endpoint: Endpoint, shown: str) -> None:
    assert str(endpoint) == shown


def test_settings_are_frozen(tmp_path: Path) -> None:
    settings = ok(["-r", "us-east-1", "-d", "22"], tmp_path)
    with pytest.raises(FrozenInstanceError):
        settings.url = "x"  # type: ignore[misc]


def test_tuning_defaults_and_validation() -> None:
    tuning = Tuning()
    assert tuning.read_chunk == 64512
    assert tuning.reconnect_attempts == -1
    with pytest.raises(ValueError, match="ping_interval"):
        Tuning(ping_interval=0)
    with pytest.raises(ValueError, match="read_chunk"):
        Tuning(read_chunk=64513)
    with pytest.raises(ValueError, match="reconnect_max"):
        Tuning(reconnect_base=5, reconnect_max=1)
    with pytest.raises(ValueError, match="max_connections"):
        replace(tuning, max_connections=True)


# --------------------------------------------------------------------------- endpoints


@pytest.mark.parametrize(
    ("text", "mode", "expected"),
    [
        ("22", Mode.DESTINATION, Endpoint(None, 22)),
        (" 22 ", Mode.DESTINATION, Endpoint(None, 22)),
        ("localhost:22", Mode.DESTINATION, Endpoint("localhost", 22)),
        ("10.0.0.1:80", Mode.DESTINATION, Endpoint("10.0.0.1", 80)),
        ("[::1]:22", Mode.DESTINATION, Endpoint("::1", 22)),
        ("/run/app.sock", Mode.DESTINATION, Endpoint(None, None, "/run/app.sock")),
        ("./local.sock", Mode.DESTINATION, Endpoint(None, None, "./local.sock")),
        ("5555", Mode.SOURCE, Endpoint(None, 5555)),
        ("0", Mode.SOURCE, Endpoint(None, 0)),
        ("127.0.0.2:5555", Mode.SOURCE, Endpoint("127.0.0.2", 5555)),
        ("65535", Mode.DESTINATION, Endpoint(None, 65535)),
    ],
)
def test_parse_endpoint(text: str, mode: Mode, expected: Endpoint) -> None:
    assert parse_endpoint(text, what="-d", mode=mode) == expected


@pytest.mark.parametrize(
    ("text", "mode", "problem"),
    [
        ("", Mode.DESTINATION, "empty endpoint"),
        ("0", Mode.DESTINATION, "port must be 1..65535"),
        ("65536", Mode.DESTINATION, "port must be 1..65535"),
        ("99999", Mode.SOURCE, "port must be 0..65535"),
        ("host:", Mode.DESTINATION, "port must be 1..65535"),
        ("host:ssh", Mode.DESTINATION, "port must be 1..65535"),
        ("localhost", Mode.DESTINATION, "missing port"),
        ("::1:22", Mode.DESTINATION, "brackets"),
        ("[::1", Mode.DESTINATION, "missing ']'"),
        ("[nope]:22", Mode.DESTINATION, "not an IPv6 address"),
        ("[::1]22", Mode.DESTINATION, "expected ':PORT'"),
        ("bad host:22", Mode.DESTINATION, "not a host name"),
        (":22", Mode.DESTINATION, "empty host name"),
        ("/run/app.sock", Mode.SOURCE, "only valid in destination mode"),
        ("/run/" + "x" * 200, Mode.DESTINATION, "at most 107 bytes"),
        ("/run/a\0b", Mode.DESTINATION, "NUL"),
    ],
)
def test_parse_endpoint_errors(text: str, mode: Mode, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_endpoint(text, what="-d", mode=mode)
    assert str(caught.value).startswith(f"-d: {text!r}: ")
    assert problem in str(caught.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("5555", [ServiceMapping("", Endpoint(None, 5555))]),
        ("SSH1=5555", [ServiceMapping("SSH1", Endpoint(None, 5555))]),
        (
            "HTTP1=5555, SSH1 = 3333,",
            [
                ServiceMapping("HTTP1", Endpoint(None, 5555)),
                ServiceMapping("SSH1", Endpoint(None, 3333)),
            ],
        ),
        ("a:b_c-D=1", [ServiceMapping("a:b_c-D", Endpoint(None, 1))]),
    ],
)
def test_parse_mapping_list_source(text: str, expected: list[ServiceMapping]) -> None:
    assert parse_mapping_list(text, flag="-s", mode=Mode.SOURCE) == expected


def test_parse_mapping_list_destination_forms() -> None:
    parsed = parse_mapping_list(
        "SSH1=22,SSH2=10.0.0.1:80,V6=[::1]:8022,WEB=/run/app.sock", flag="-d", mode=Mode.DESTINATION
    )
    assert [str(m.endpoint) for m in parsed] == [
        "22",
        "10.0.0.1:80",
        "[::1]:8022",
        "/run/app.sock",
    ]
    assert parse_mapping_list("[::1]:22", flag="-d", mode=Mode.DESTINATION) == [
        ServiceMapping("", Endpoint("::1", 22))
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("HTTP1=99999", "-d: 'HTTP1=99999': port must be 1..65535"),
        ("22,SSH1=23", "-d: '22': an unnamed mapping must be the only one"),
        ("SSH1=22,SSH1=23", "-d: 'SSH1=23': service ID 'SSH1' is mapped twice"),
        ("bad id=22", "-d: 'bad id=22': a service ID is 1..128 characters"),
        ("=22", "-d: '=22': a service ID is"),
        ("x" * 129 + "=22", f"-d: '{'x' * 129}=22': a service ID is 1..128"),
        ("SSH1=", "-d: 'SSH1=': empty endpoint"),
        (" , ", "-d: ' , ': no mapping given"),
    ],
)
def test_parse_mapping_list_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_mapping_list(text, flag="-d", mode=Mode.DESTINATION)
    assert str(caught.value).startswith(message)


# --------------------------------------------------------------------------- URL


@pytest.mark.parametrize(
    ("region", "host"),
    [
        ("us-east-1", "data.tunneling.iot.us-east-1.amazonaws.com"),
        ("EU-West-1", "data.tunneling.iot.eu-west-1.amazonaws.com"),
        ("us-gov-west-1", "data.tunneling.iot.us-gov-west-1.amazonaws.com"),
        ("cn-north-1", "data.tunneling.iot.cn-north-1.amazonaws.com.cn"),
        ("cn-northwest-1", "data.tunneling.iot.cn-northwest-1.amazonaws.com.cn"),
    ],
)
@pytest.mark.parametrize(("flag", "mode"), [("-s", "source"), ("-d", "destination")])
def test_region_url(tmp_path: Path, region: str, host: str, flag: str, mode: str) -> None:
    settings = ok(["-r", region, flag, "22"], tmp_path)
    assert settings.url == f"wss://{host}:443/tunnel?local-proxy-mode={mode}"


@pytest.mark.parametrize(
    ("endpoint", "url"),
    [
        ("example.com", "wss://example.com:443/tunnel?local-proxy-mode=destination"),
        (
            "Data.Tunneling.IoT.us-east-1.amazonaws.com:443",
            US_EAST_1 + "destination",
        ),
        ("localhost:8443", "wss://localhost:8443/tunnel?local-proxy-mode=destination"),
        ("[::1]:8443", "wss://[::1]:8443/tunnel?local-proxy-mode=destination"),
        ("[::1]", "wss://[::1]:443/tunnel?local-proxy-mode=destination"),
        ("wss://example.com", "wss://example.com:443/tunnel?local-proxy-mode=destination"),
        ("wss://example.com/", "wss://example.com:443/tunnel?local-proxy-mode=destination"),
        ("ws://127.0.0.1:8080", "ws://127.0.0.1:8080/tunnel?local-proxy-mode=destination"),
        ("ws://localhost", "ws://localhost:80/tunnel?local-proxy-mode=destination"),
        (
            "WSS://Example.com:9443/custom/path?x=1",
            "wss://example.com:9443/custom/path?x=1&local-proxy-mode=destination",
        ),
        (
            "wss://h/tunnel?local-proxy-mode=destination",
            "wss://h:443/tunnel?local-proxy-mode=destination",
        ),
        ("ws://[::1]:9000/t", "ws://[::1]:9000/t?local-proxy-mode=destination"),
    ],
)
def test_endpoint_url(tmp_path: Path, endpoint: str, url: str) -> None:
    assert ok(["-e", endpoint, "-d", "22"], tmp_path).url == url


@pytest.mark.parametrize(
    ("endpoint", "problem"),
    [
        ("https://example.com", "scheme must be wss:// or ws://"),
        ("wss://example.com/#frag", "fragment"),
        ("wss://example.com:0", "port must be 1..65535"),
        ("wss://example.com:99999", "not a valid URL"),
        ("wss:///tunnel", "no host"),
        ("wss://h/?local-proxy-mode=source", "local-proxy-mode=source"),
        ("example.com:0", "port must be 1..65535"),
        ("exa mple.com", "not a host name"),
        ("::1", "brackets"),
    ],
)
def test_endpoint_url_errors(tmp_path: Path, endpoint: str, problem: str) -> None:
    message = err(["-e", endpoint, "-d", "22"], tmp_path)
    assert message.startswith(f"-e: {endpoint!r}: ")
    assert problem in message


@pytest.mark.parametrize("endpoint", ["wss://user:pa55word@example.com", "user:pa55word@h"])
def test_endpoint_credentials_are_refused_and_not_echoed(tmp_path: Path, endpoint: str) -> None:
    message = err(["-e", endpoint, "-d", "22"], tmp_path)
    assert message == "-e: credentials in the endpoint URL are not allowed"
    assert "pa55word" not in message


@pytest.mark.parametrize("region", ["us east 1", "us_east_1", "us-", "", "us.east"])
def test_bad_region(tmp_path: Path, region: str) -> None:
    message = err(["-r", region, "-d", "22"], tmp_path)
    assert message.startswith("-r: ")
    assert "region" in message


# --------------------------------------------------------------------------- flags


def test_minimal_destination(tmp_path: Path) -> None:
    settings = ok(["-r", "us-east-1", "-d", "SSH1=22"], tmp_path)
    assert settings == ProxySettings(
        mode=Mode.DESTINATION,
        url=US_EAST_1 + "destination",
        access_token=Secret(TOKEN),
        client_token=None,
        mappings=(ServiceMapping("SSH1", Endpoint(None, 22)),),
        bind_address=None,
        ca_path=None,
        verify_host=True,
        verbosity=4,
        peer_version=3,
        tuning=Tuning(),
        access_token_from_argv=False,
    )


def test_long_flags(tmp_path: Path, pki: PKI) -> None:
    ca = write(tmp_path / "ca.pem", pki.ca.cert.read_text())
    settings = ok(
        [
            "--region=us-west-2",
            "--access-token",
            TOKEN,
            "--client-token",
            CLIENT,
            "--source-listen-port",
            "SSH1=5555",
            "--mode",
            "source",
            "--local-bind-address",
            "::1",
            "--capath",
            "ca.pem",
            "--no-ssl-host-verify",
            "--verbose",
            "6",
            "--destination-client-type",
            "V2",
        ],
        tmp_path,
        env={},
    )
    assert settings.mode is Mode.SOURCE
    assert settings.url.startswith("wss://data.tunneling.iot.us-west-2.amazonaws.com:443/")
    assert settings.access_token == Secret(TOKEN)
    assert settings.access_token_from_argv
    assert settings.client_token == Secret(CLIENT)
    assert settings.mappings == (ServiceMapping("SSH1", Endpoint(None, 5555)),)
    assert settings.bind_address == "::1"
    assert settings.ca_path == str(ca)
    assert not settings.verify_host
    assert settings.verbosity == 6
    assert settings.peer_version == 2


def test_short_flags_glued_values(tmp_path: Path) -> None:
    settings = ok(["-rus-east-1", "-d22", "-v5", "-k"], tmp_path)
    assert settings.url == US_EAST_1 + "destination"
    assert settings.mappings == (ServiceMapping("", Endpoint(None, 22)),)
    assert settings.verbosity == 5
    assert not settings.verify_host


@pytest.mark.parametrize(
    ("value", "mode"),
    [
        ("src", Mode.SOURCE),
        ("source", Mode.SOURCE),
        ("dst", Mode.DESTINATION),
        ("destination", Mode.DESTINATION),
        ("DST", Mode.DESTINATION),
    ],
)
def test_mode_flag(tmp_path: Path, value: str, mode: Mode) -> None:
    write(tmp_path / "config" / "m.ini", "SSH1 = 22\n")
    settings = ok(["-r", "us-east-1", "-m", value], tmp_path)
    assert settings.mode is mode
    assert settings.url.endswith(f"local-proxy-mode={mode.value}")


def test_mode_implied(tmp_path: Path) -> None:
    assert ok(["-r", "us-east-1", "-s", "5555"], tmp_path).mode is Mode.SOURCE
    assert ok(["-r", "us-east-1", "-d", "22"], tmp_path).mode is Mode.DESTINATION
    assert ok(["-r", "us-east-1", "-m", "src", "-s", "5555"], tmp_path).mode is Mode.SOURCE


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["-s", "5555", "-d", "22"], "-s and -d cannot be used together"),
        (["-s", "5555", "-m", "dst"], "-s cannot be used with -m destination"),
        (["-d", "22", "-m", "source"], "-d cannot be used with -m source"),
        ([], "cannot tell the mode: give -s (source), -d (destination) or -m src|dst"),
        (["-m", "sideways"], "-m: 'sideways': expected src, source, dst or destination"),
    ],
)
def test_mode_errors(tmp_path: Path, argv: list[str], message: str) -> None:
    assert err(["-r", "us-east-1", *argv], tmp_path) == message


@pytest.mark.parametrize(("value", "level"), [("0", 0), ("4", 4), ("6", 6), ("7", 6), ("255", 6)])
def test_verbosity(tmp_path: Path, value: str, level: int) -> None:
    assert ok(["-r", "us-east-1", "-d", "22", "-v", value], tmp_path).verbosity == level


@pytest.mark.parametrize("value", ["256", "-1", "info", "", "4.5"])
def test_bad_verbosity(tmp_path: Path, value: str) -> None:
    message = err(["-r", "us-east-1", "-d", "22", "-v", value], tmp_path)
    assert message == (
        f"-v: {value!r}: expected a level 0..255 (0 off ... 4 info, 5 debug, 6 or more trace)"
    )


@pytest.mark.parametrize(("value", "version"), [("V1", 1), ("v2", 2), ("V3", 3)])
def test_destination_client_type(tmp_path: Path, value: str, version: int) -> None:
    assert ok(["-r", "us-east-1", "-s", "5555", "-y", value], tmp_path).peer_version == version


def test_destination_client_type_errors(tmp_path: Path) -> None:
    assert err(["-r", "us-east-1", "-s", "5555", "-y", "V4"], tmp_path) == (
        "-y: 'V4': expected V1 or V2 (or V3, the default)"
    )
    assert err(["-r", "us-east-1", "-d", "22", "-y", "V4"], tmp_path).startswith("-y: 'V4'")


def test_destination_client_type_is_ignored_by_a_destination(tmp_path: Path) -> None:
    # The Greengrass tunneling component starts destinations with --destination-client-type V1.
    settings = ok(["-r", "us-east-1", "-d", "22", "-y", "V1"], tmp_path)
    assert settings.peer_version == 3


@pytest.mark.parametrize("address", ["0.0.0.0", "localhost", "::1", "[::1]", "host-1.lan"])
def test_bind_address(tmp_path: Path, address: str) -> None:
    settings = ok(["-r", "us-east-1", "-s", "5555", "-b", address], tmp_path)
    assert settings.bind_address == address.strip("[]")


@pytest.mark.parametrize("address", ["bad host", "[nope]", "[::1", "1::2::3", ""])
def test_bad_bind_address(tmp_path: Path, address: str) -> None:
    assert err(["-r", "us-east-1", "-s", "5555", "-b", address], tmp_path).startswith("-b: ")


def test_capath_directory_and_missing(tmp_path: Path, pki: PKI) -> None:
    write(tmp_path / "certs" / "ca.pem", pki.ca.cert.read_text())
    settings = ok(["-r", "us-east-1", "-d", "22", "-c", "certs"], tmp_path)
    assert settings.ca_path == str(tmp_path / "certs")
    absolute = ok(["-r", "us-east-1", "-d", "22", "-c", str(tmp_path / "certs")], tmp_path)
    assert absolute.ca_path == str(tmp_path / "certs")
    message = err(["-r", "us-east-1", "-d", "22", "-c", "nope"], tmp_path)
    assert message == "-c: 'nope': no such file or directory"


@pytest.mark.parametrize(
    ("files", "given", "problem"),
    [
        ({"ca.pem": "x"}, "ca.pem", "not a PEM CA certificate"),
        ({"ca.pem": ""}, "ca.pem", "not a PEM CA certificate"),
        ({"certs/README": "x"}, "certs", "no CA certificates in the directory (*.pem, *.crt or"),
        ({"certs/a.pem": "x"}, "certs", "a.pem: not a PEM CA certificate"),
    ],
)
def test_capath_that_cannot_be_loaded(
    tmp_path: Path, files: dict[str, str], given: str, problem: str
) -> None:
    """Checked when the configuration is read, before anything connects (exit 2, not a retry)."""
    for name, text in files.items():
        write(tmp_path / name, text)
    assert err(["-r", "us-east-1", "-d", "22", "-c", given], tmp_path).startswith(
        f"-c: {given!r}: {problem}"
    )
    write(tmp_path / "proxy.conf", f"capath = {given}\n")
    assert err(["-r", "us-east-1", "-d", "22", "--config", "proxy.conf"], tmp_path).startswith(
        f"proxy.conf:1: capath: {given!r}: {problem}"
    )


def test_client_token_flag_and_errors(tmp_path: Path) -> None:
    assert ok(["-r", "us-east-1", "-d", "22", "-i", CLIENT], tmp_path).client_token == Secret(
        CLIENT
    )
    for bad in ("short", CLIENT + "!", "x" * 129, CLIENT.replace("-", "_")):
        message = err(["-r", "us-east-1", "-d", "22", "-i", bad], tmp_path)
        assert message == "-i: a client token is 32..128 characters of a-z, A-Z, 0-9 and '-'"
        assert bad not in message


def test_access_token_from_argv_only_with_t(tmp_path: Path) -> None:
    assert not ok(["-r", "us-east-1", "-d", "22"], tmp_path).access_token_from_argv
    assert ok(["-r", "us-east-1", "-d", "22", "-t", TOKEN], tmp_path, env={}).access_token_from_argv


@pytest.mark.parametrize("flag", ["-t", "--access-token"])
def test_a_value_that_starts_with_a_dash_is_a_value_as_for_the_reference(
    tmp_path: Path, flag: str
) -> None:
    """The reference takes the argument after -t as the token even when it starts with '-'
    (a random token can: 1 in 64); argparse alone took it for a flag and stopped with exit 2."""
    token = "-Qx" + TOKEN
    settings = ok(["-r", "us-east-1", "-d", "22", flag, token], tmp_path, env={})
    assert settings.access_token == Secret(token)
    assert ok(["-d", "22", "-e", "h", "-i", "-" + CLIENT[1:]], tmp_path).client_token == Secret(
        "-" + CLIENT[1:]
    )


@pytest.mark.parametrize("following", ["-d", "-d22", "--region", "--region=us-east-1"])
def test_a_flag_after_t_is_a_flag_as_for_the_reference(tmp_path: Path, following: str) -> None:
    """... unless the argument is one of the flags: then -t has no value (the reference:
    "the required argument for option '--access-token' is missing")."""
    message = err(["-e", "h", "-t", following, "22"], tmp_path, env={})
    assert message == "argument -t/--access-token: expected one argument"


@pytest.mark.parametrize(
    ("token", "problem"),
    [
        ("", "is empty"),
        ("   ", "is empty"),
        ("two words", "has characters an HTTP header cannot carry"),
        ("line\nbreak", "has characters an HTTP header cannot carry"),
        ("caf\u00e9", "has characters an HTTP header cannot carry"),
    ],
)
def test_bad_access_token_is_not_echoed(tmp_path: Path, token: str, problem: str) -> None:
    message = err(["-r", "us-east-1", "-d", "22", "-t", token], tmp_path, env={})
    assert message == f"-t: the access token {problem}"


def test_access_token_is_stripped(tmp_path: Path) -> None:
    env = {"AWSIOT_TUNNEL_ACCESS_TOKEN": f" {TOKEN}\n"}
    assert ok(["-r", "us-east-1", "-d", "22"], tmp_path, env).access_token == Secret(TOKEN)


def test_missing_token(tmp_path: Path) -> None:
    message = err(["-r", "us-east-1", "-d", "22"], tmp_path, env={})
    assert message.startswith("no access token: set AWSIOT_TUNNEL_ACCESS_TOKEN")


def test_region_and_endpoint_required(tmp_path: Path) -> None:
    assert err(["-d", "22"], tmp_path) == (
        "give -r REGION or -e ENDPOINT (or set AWSIOT_TUNNEL_REGION or AWSIOT_TUNNEL_ENDPOINT)"
    )


def test_region_and_endpoint_exclusive(tmp_path: Path) -> None:
    assert err(["-r", "us-east-1", "-e", "h", "-d", "22"], tmp_path) == (
        "-r and -e cannot be used together"
    )
    env = {**ENV, "AWSIOT_TUNNEL_REGION": "us-east-1", "AWSIOT_TUNNEL_ENDPOINT": "h"}
    assert err(["-d", "22"], tmp_path, env) == (
        "AWSIOT_TUNNEL_REGION and AWSIOT_TUNNEL_ENDPOINT cannot be used together"
    )


# --------------------------------------------------------------------------- argparse errors


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--bogus"], "unrecognized option '--bogus'"),
        (["--bogus=" + TOKEN], "unrecognized option '--bogus'"),
        (["--acess-token", TOKEN], "unrecognized option '--acess-token'"),
        (["-x" + TOKEN], "unrecognized option '-x'"),
        ([TOKEN], "unexpected argument: every value needs a flag (see --help)"),
        (["-r", "us-east-1", "--", "-t"], "unexpected argument: every value needs a flag"),
        (["-d"], "argument -d/--destination-app: expected one argument"),
        (["-t"], "argument -t/--access-token: expected one argument"),
        (["-d", "22", "-d", "23"], "argument -d/--destination-app: given more than once"),
        (["-k=" + TOKEN], "argument -k/--no-ssl-host-verify: takes no value"),
        (["--no-ssl-host-verify=" + TOKEN], "argument -k/--no-ssl-host-verify: takes no value"),
        (["-kx"], "argument -k/--no-ssl-host-verify: takes no value"),
        (["--reg", "us-east-1"], "unrecognized option '--reg'"),
    ],
)
def test_command_line_errors(tmp_path: Path, argv: list[str], message: str) -> None:
    assert err(argv, tmp_path).startswith(message)


# --------------------------------------------------------------------------- CliExit


def test_help(tmp_path: Path) -> None:
    result = load(["-h"], {}, tmp_path)
    assert isinstance(result, CliExit)
    assert result.code == 0
    assert result.output.startswith("usage: iotunnel-proxy")
    for flag in ("--region", "--proxy-endpoint", "--destination-client-type", "--config-dir"):
        assert flag in result.output


def test_help_and_version_skip_validation(tmp_path: Path) -> None:
    assert load(["--help", "-r", "nope nope"], {}, tmp_path) == load(["--help"], {}, tmp_path)
    version = load(["-V", "-s", "5555", "-d", "22"], {}, tmp_path)
    assert version == CliExit(0, f"iotunnel-proxy {__version__}\n")
    assert load(["--version"], {}, tmp_path) == version


def test_export_default_settings(tmp_path: Path) -> None:
    result = load(["--export-default-settings", "defaults.json"], {}, tmp_path)
    assert result == CliExit(0, "")
    document = json.loads((tmp_path / "defaults.json").read_text())
    assert document == {"iotunnel": json.loads(default_settings_json())["iotunnel"]}
    assert document["iotunnel"]["local_write_buffer"] == Tuning().local_write_buffer
    # The export reads back as the defaults.
    settings = ok(["-r", "us-east-1", "-d", "22", "--settings-json", "defaults.json"], tmp_path)
    assert settings.tuning == Tuning()


def test_export_default_settings_unwritable(tmp_path: Path) -> None:
    message = err(["--export-default-settings", "missing/dir/x.json"], tmp_path)
    assert message == "--export-default-settings: 'missing/dir/x.json': No such file or directory"


# --------------------------------------------------------------------------- environment


def test_environment_variables(tmp_path: Path) -> None:
    env = {
        "AWSIOT_TUNNEL_ACCESS_TOKEN": TOKEN,
        "AWSIOT_TUNNEL_REGION": "cn-north-1",
        "AWSIOT_TUNNEL_CLIENT_TOKEN": CLIENT,
    }
    settings = ok(["-d", "22"], tmp_path, env)
    assert settings.url.startswith("wss://data.tunneling.iot.cn-north-1.amazonaws.com.cn:443/")
    assert settings.access_token == Secret(TOKEN)
    assert not settings.access_token_from_argv
    assert settings.client_token == Secret(CLIENT)
    env = {"AWSIOT_TUNNEL_ACCESS_TOKEN": TOKEN, "AWSIOT_TUNNEL_ENDPOINT": "ws://127.0.0.1:8080"}
    assert ok(["-d", "22"], tmp_path, env).url.startswith("ws://127.0.0.1:8080/tunnel?")


def test_empty_environment_variables_are_unset(tmp_path: Path) -> None:
    env = {**ENV, "AWSIOT_TUNNEL_REGION": "", "AWSIOT_TUNNEL_CLIENT_TOKEN": " "}
    settings = ok(["-e", "h", "-d", "22"], tmp_path, env)
    assert settings.client_token is None


def test_environment_errors_name_the_variable(tmp_path: Path) -> None:
    env = {**ENV, "AWSIOT_TUNNEL_REGION": "not a region"}
    assert err(["-d", "22"], tmp_path, env).startswith("AWSIOT_TUNNEL_REGION: 'not a region': ")
    env = {**ENV, "AWSIOT_TUNNEL_ENDPOINT": "https://h"}
    assert err(["-d", "22"], tmp_path, env).startswith("AWSIOT_TUNNEL_ENDPOINT: 'https://h': ")
    env = {**ENV, "AWSIOT_TUNNEL_REGION": "us-east-1", "AWSIOT_TUNNEL_CLIENT_TOKEN": "bad"}
    assert err(["-d", "22"], tmp_path, env).startswith("AWSIOT_TUNNEL_CLIENT_TOKEN: a client")
    env = {"AWSIOT_TUNNEL_ACCESS_TOKEN": "has space", "AWSIOT_TUNNEL_REGION": "us-east-1"}
    message = err(["-d", "22"], tmp_path, env)
    assert message.startswith("AWSIOT_TUNNEL_ACCESS_TOKEN: the access token")
    assert "has space" not in message


def test_environment_is_only_read_from_the_argument(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWSIOT_TUNNEL_REGION", "us-east-1")
    monkeypatch.setenv("AWSIOT_TUNNEL_ACCESS_TOKEN", TOKEN)
    assert err(["-d", "22"], tmp_path, env={}).startswith("give -r REGION")


# --------------------------------------------------------------------------- --config file


def test_config_file(tmp_path: Path, pki: PKI) -> None:
    write(tmp_path / "certs" / "ca.pem", pki.ca.cert.read_text())
    write(
        tmp_path / "proxy.conf",
        "# options, as the reference reads them\n"
        "region = us-west-2\n"
        f"access-token = {TOKEN}\n"
        f"client-token = {CLIENT}\n"
        "source-listen-port = SSH1=6000\n"
        "local-bind-address = ::1\n"
        "capath = certs\n"
        "no-ssl-host-verify = true\n"
        "verbose = 5\n"
        "destination-client-type = V1\n",
    )
    settings = ok(["--config", "proxy.conf"], tmp_path, env={})
    assert settings.mode is Mode.SOURCE
    assert settings.url.startswith("wss://data.tunneling.iot.us-west-2.amazonaws.com:443/")
    assert settings.access_token == Secret(TOKEN)
    assert not settings.access_token_from_argv
    assert settings.client_token == Secret(CLIENT)
    assert settings.mappings == (ServiceMapping("SSH1", Endpoint(None, 6000)),)
    assert settings.bind_address == "::1"
    assert settings.ca_path == str(tmp_path / "certs")
    assert not settings.verify_host
    assert settings.verbosity == 5
    assert settings.peer_version == 1


def test_config_file_switch_false_and_paths(tmp_path: Path) -> None:
    write(tmp_path / "maps" / "a.ini", "SSH1 = 22\n")
    write(tmp_path / "tuning.json", '{"iotunnel.max_connections": 7}')
    write(
        tmp_path / "proxy.conf",
        "mode = dst\nno-ssl-host-verify = off\nconfig-dir = maps\nsettings-json = tuning.json\n",
    )
    settings = ok(["-r", "us-east-1", "--config", "proxy.conf"], tmp_path)
    assert settings.verify_host
    assert settings.mappings == (ServiceMapping("SSH1", Endpoint(None, 22)),)
    assert settings.tuning.max_connections == 7


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("region us-east-1\n", "proxy.conf:1: expected 'option = value'"),
        (f"\n\n{TOKEN}\n", "proxy.conf:3: unknown option"),
        ("\n\nsecretTOKENvalue\n", "proxy.conf:3: expected 'option = value'"),
        (f"{TOKEN}\n{TOKEN}\n", "proxy.conf:2: an option is set twice"),
        ("bogus = 1\n", "proxy.conf:1: unknown option 'bogus'"),
        ("r = us-east-1\n", "proxy.conf:1: unknown option 'r'"),
        ("Region = us-east-1\n", "proxy.conf:1: unknown option 'Region'"),
        ("config = other.conf\n", "proxy.conf:1: 'config' is not allowed in a --config file"),
        ("help = true\n", "proxy.conf:1: 'help' is not allowed in a --config file"),
        ("region = a\nregion = b\n", "proxy.conf:2: 'region' is set twice"),
        (f"access-token = {TOKEN}\naccess-token = x\n", "proxy.conf:2: 'access-token' is set"),
        ("[options]\nregion = us-east-1\n", "proxy.conf:1: section headers are not allowed"),
        ("verbose = loud\n", "proxy.conf:1: verbose: 'loud': expected a level 0..255"),
        ("no-ssl-host-verify = maybe\n", "proxy.conf:1: no-ssl-host-verify: 'maybe': expected"),
        ("client-token = nope\n", "proxy.conf:1: client-token: a client token is"),
    ],
)
def test_config_file_errors(tmp_path: Path, text: str, message: str) -> None:
    write(tmp_path / "proxy.conf", text)
    assert err(["-r", "us-east-1", "-d", "22", "--config", "proxy.conf"], tmp_path).startswith(
        message
    )


def test_config_file_missing_or_not_text(tmp_path: Path) -> None:
    assert err(["-d", "22", "--config", "nope.conf"], tmp_path) == (
        "nope.conf: No such file or directory"
    )
    (tmp_path / "bin.conf").write_bytes(b"\xff\xfe\x00")
    assert err(["-d", "22", "--config", "bin.conf"], tmp_path) == "bin.conf: not UTF-8 text"
    (tmp_path / "dir.conf").mkdir()
    assert err(["-d", "22", "--config", "dir.conf"], tmp_path) == "dir.conf: Is a directory"


def test_config_file_mapping_error(tmp_path: Path) -> None:
    write(tmp_path / "proxy.conf", "region = us-east-1\ndestination-app = HTTP1=99999\n")
    assert err(["--config", "proxy.conf"], tmp_path) == (
        "proxy.conf:2: destination-app: 'HTTP1=99999': port must be 1..65535"
    )


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("access-token secretTOKENvalue", "proxy.conf:1: expected 'option = value'"),
        (f"access-token {TOKEN}", "proxy.conf:1: unknown option"),  # the token has a '='
    ],
)
def test_config_file_lines_with_tokens_are_not_quoted(
    tmp_path: Path, line: str, message: str
) -> None:
    write(tmp_path / "proxy.conf", line + "\n")
    assert err(["--config", "proxy.conf"], tmp_path) == message


# --------------------------------------------------------------------------- precedence


def test_precedence_cli_over_config_over_environment(tmp_path: Path) -> None:
    env = {
        "AWSIOT_TUNNEL_ACCESS_TOKEN": "env-token",
        "AWSIOT_TUNNEL_REGION": "eu-west-1",
        "AWSIOT_TUNNEL_CLIENT_TOKEN": "e" * 32,
    }
    write(tmp_path / "c.conf", f"region = us-west-2\naccess-token = {TOKEN}\nverbose = 2\n")

    from_env = ok(["-d", "22"], tmp_path, env)
    assert "eu-west-1" in from_env.url
    assert from_env.access_token == Secret("env-token")
    assert from_env.verbosity == 4  # the default

    from_file = ok(["-d", "22", "--config", "c.conf"], tmp_path, env)
    assert "us-west-2" in from_file.url
    assert from_file.access_token == Secret(TOKEN)
    assert from_file.client_token == Secret("e" * 32)  # the file does not set it
    assert from_file.verbosity == 2

    from_cli = ok(
        ["-d", "22", "--config", "c.conf", "-r", "ap-south-1", "-t", "cli-token", "-v", "6"],
        tmp_path,
        env,
    )
    assert "ap-south-1" in from_cli.url
    assert from_cli.access_token == Secret("cli-token")
    assert from_cli.access_token_from_argv
    assert from_cli.verbosity == 6


def test_endpoint_group_follows_precedence(tmp_path: Path) -> None:
    env = {**ENV, "AWSIOT_TUNNEL_REGION": "eu-west-1"}
    assert ok(["-e", "localhost:8443", "-d", "22"], tmp_path, env).url.startswith(
        "wss://localhost:8443/"
    )
    write(tmp_path / "c.conf", "proxy-endpoint = ws://127.0.0.1:9\n")
    assert ok(["-d", "22", "--config", "c.conf"], tmp_path, env).url.startswith("ws://127.0.0.1:9/")
    assert "us-east-1" in ok(["-d", "22", "--config", "c.conf", "-r", "us-east-1"], tmp_path).url
    write(tmp_path / "both.conf", "proxy-endpoint = h\nregion = us-east-1\n")
    assert err(["-d", "22", "--config", "both.conf"], tmp_path) == (
        "both.conf:2: region and both.conf:1: proxy-endpoint cannot be used together"
    )


def test_mode_group_follows_precedence(tmp_path: Path) -> None:
    write(tmp_path / "c.conf", "region = us-east-1\nmode = dst\ndestination-app = 22\n")
    settings = ok(["--config", "c.conf", "-s", "5555"], tmp_path)
    assert settings.mode is Mode.SOURCE
    assert settings.mappings == (ServiceMapping("", Endpoint(None, 5555)),)
    assert ok(["--config", "c.conf"], tmp_path).mode is Mode.DESTINATION
    write(tmp_path / "bad.conf", "region = us-east-1\nmode = src\ndestination-app = 22\n")
    assert err(["--config", "bad.conf"], tmp_path) == (
        "bad.conf:3: destination-app cannot be used with bad.conf:2: mode source"
    )


# --------------------------------------------------------------------------- mapping files


def test_read_mapping_file(tmp_path: Path) -> None:
    path = write(
        tmp_path / "m.ini",
        "\ufeff# comment\n; also a comment\n\n  HTTP1 = 80\nSSH1=22\nssh1 = 2222\n"
        "SSH2 = 10.0.0.1:80\nWEB = /run/app.sock\nV6 = [::1]:22\n",
    )
    assert read_mapping_file(path, mode=Mode.DESTINATION) == [
        ServiceMapping("HTTP1", Endpoint(None, 80)),
        ServiceMapping("SSH1", Endpoint(None, 22)),
        ServiceMapping("ssh1", Endpoint(None, 2222)),
        ServiceMapping("SSH2", Endpoint("10.0.0.1", 80)),
        ServiceMapping("WEB", Endpoint(None, None, "/run/app.sock")),
        ServiceMapping("V6", Endpoint("::1", 22)),
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("HTTP1 = 80\n\nSSH1 22\n", "m.ini:3: 'SSH1 22': expected 'SERVICE_ID = endpoint'"),
        ("# c\n= 22\n", "m.ini:2: '= 22': expected 'SERVICE_ID = endpoint'"),
        ("SSH 1 = 22\n", "m.ini:1: 'SSH 1 = 22': a service ID is 1..128 characters"),
        ("SSH1 = 99999\n", "m.ini:1: 'SSH1 = 99999': port must be 1..65535"),
        ("SSH1 = 22 # ssh\n", "m.ini:1: 'SSH1 = 22 # ssh': "),
        ("SSH1 =\n", "m.ini:1: 'SSH1 = ': empty endpoint"),
        ("SSH1 = 22\n  SSH1 = 23\n", "m.ini:2: 'SSH1 = 23': 'SSH1' is set twice"),
        ("[mappings]\nSSH1 = 22\n", "m.ini:1: '[mappings]': section headers are not allowed"),
        ("SSH1 = 22\n[x\n", "m.ini:2: '[x': section headers are not allowed"),
        ("SSH1 = %(x)s\n", "m.ini:1: 'SSH1 = %(x)s': "),
    ],
)
def test_mapping_file_errors(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path / "m.ini", text)
    with pytest.raises(ConfigError) as caught:
        read_mapping_file(path, mode=Mode.DESTINATION, display="m.ini")
    assert str(caught.value).startswith(message)
    assert "\n" not in str(caught.value)


def test_mapping_file_mode_rules(tmp_path: Path) -> None:
    path = write(tmp_path / "m.ini", "ANY = 0\n")
    assert read_mapping_file(path, mode=Mode.SOURCE) == [ServiceMapping("ANY", Endpoint(None, 0))]
    with pytest.raises(ConfigError, match=r"port must be 1\.\.65535"):
        read_mapping_file(path, mode=Mode.DESTINATION)
    sock = write(tmp_path / "s.ini", "WEB = /run/app.sock\n")
    with pytest.raises(ConfigError, match="only valid in destination mode"):
        read_mapping_file(sock, mode=Mode.SOURCE)


def test_read_mapping_dir(tmp_path: Path) -> None:
    write(tmp_path / "b.ini", "SSH1 = 22\n")
    write(tmp_path / "a.ini", "HTTP1 = 80\n")
    write(tmp_path / "sub" / "c.conf", "RDP = 3389\n")
    write(tmp_path / ".hidden.ini", "HIDDEN = 1\n")
    write(tmp_path / ".git" / "x.ini", "GIT = 1\n")
    write(tmp_path / "a.ini~", "BACKUP = 1\n")
    write(tmp_path / "b.ini.dpkg-old", "SSH1 = 2222\n")
    write(tmp_path / "b.ini.rpmnew", "SSH1 = 2222\n")
    (tmp_path / "empty-dir").mkdir()
    assert read_mapping_dir(tmp_path, mode=Mode.DESTINATION) == [
        ServiceMapping("HTTP1", Endpoint(None, 80)),
        ServiceMapping("SSH1", Endpoint(None, 22)),
        ServiceMapping("RDP", Endpoint(None, 3389)),
    ]


def test_mapping_dir_duplicate_across_files(tmp_path: Path) -> None:
    write(tmp_path / "maps" / "a.ini", "HTTP1 = 80\nSSH1 = 22\n")
    write(tmp_path / "maps" / "b.ini", "# device two\nSSH1 = 2222\n")
    with pytest.raises(ConfigError) as caught:
        read_mapping_dir(tmp_path / "maps", mode=Mode.DESTINATION, display="maps")
    assert str(caught.value) == (
        "maps/b.ini:2: service ID 'SSH1' is already mapped at maps/a.ini:2"
    )


def test_mapping_dir_unreadable(tmp_path: Path) -> None:
    (tmp_path / "maps").mkdir()
    (tmp_path / "maps" / "a.ini").write_bytes(b"SSH1 = \xff\n")
    with pytest.raises(ConfigError, match=r"^maps/a\.ini: not UTF-8 text$"):
        read_mapping_dir(tmp_path / "maps", mode=Mode.DESTINATION, display="maps")
    with pytest.raises(ConfigError, match=r"^maps/a\.ini: cannot read .*: Not a directory$"):
        read_mapping_dir(tmp_path / "maps" / "a.ini", mode=Mode.DESTINATION, display="maps/a.ini")


def test_config_dir_flag(tmp_path: Path) -> None:
    write(tmp_path / "maps" / "dest.ini", "HTTP1 = 80\nSSH1 = 22\n")
    settings = ok(["-r", "us-east-1", "-m", "dst", "--config-dir", "maps"], tmp_path)
    assert settings.mappings == (
        ServiceMapping("HTTP1", Endpoint(None, 80)),
        ServiceMapping("SSH1", Endpoint(None, 22)),
    )
    absolute = ok(
        ["-r", "us-east-1", "-m", "dst", "--config-dir", str(tmp_path / "maps")], tmp_path
    )
    assert absolute.mappings == settings.mappings


def test_cli_mappings_override_files(tmp_path: Path) -> None:
    write(tmp_path / "maps" / "dest.ini", "HTTP1 = 80\nSSH1 = 22\n")
    settings = ok(["-r", "us-east-1", "-d", "SSH1=2222,RDP=3389", "--config-dir", "maps"], tmp_path)
    assert settings.mappings == (
        ServiceMapping("SSH1", Endpoint(None, 2222)),
        ServiceMapping("RDP", Endpoint(None, 3389)),
        ServiceMapping("HTTP1", Endpoint(None, 80)),
    )


def test_default_config_dir(tmp_path: Path) -> None:
    write(tmp_path / "config" / "SSHDestination.ini", "HTTP1 = 80\nSSH1 = 22\n")
    settings = ok(["-r", "us-east-1", "-m", "dst"], tmp_path)
    assert [m.service_id for m in settings.mappings] == ["HTTP1", "SSH1"]
    # With -s/-d on the command line the default directory is not read.
    assert ok(["-r", "us-east-1", "-d", "RDP=3389"], tmp_path).mappings == (
        ServiceMapping("RDP", Endpoint(None, 3389)),
    )
    write(tmp_path / "config" / "bad.ini", "oops\n")
    assert err(["-r", "us-east-1", "-m", "dst"], tmp_path) == (
        "destination mode needs a service mapping: give -d (e.g. -d SSH1=22) or --config-dir; "
        "the default ./config is not a mapping directory: "
        "config/bad.ini:1: 'oops': expected 'SERVICE_ID = endpoint'"
    )


def test_default_config_dir_that_is_not_mappings(tmp_path: Path) -> None:
    """A ./config of other settings (a checkout's, /etc/iotunnel's) does not stop a source,
    whose mappings are optional: it is skipped with a warning naming file:line. An explicit
    --config-dir stays strict, and -s/-d skip the default directory altogether."""
    write(tmp_path / "config" / "agent.ini", "# the agent\n[agent]\nport = 8883\n")
    write(tmp_path / "config" / "destination.d" / "SSHDestination.ini", "SSH1 = 22\n")
    settings = ok(["-r", "us-east-1", "-m", "src"], tmp_path)
    assert settings.mappings == ()
    assert settings.skipped_config_dir == (
        "not using ./config for mappings (config/agent.ini:2: '[agent]': section headers are "
        "not allowed); every service gets a free port (choose with -s or --config-dir)"
    )
    assert err(["-r", "us-east-1", "-m", "dst"], tmp_path).endswith(
        "the default ./config is not a mapping directory: "
        "config/agent.ini:2: '[agent]': section headers are not allowed"
    )
    assert err(["-r", "us-east-1", "-m", "src", "--config-dir", "config"], tmp_path) == (
        "config/agent.ini:2: '[agent]': section headers are not allowed"
    )
    assert ok(["-r", "us-east-1", "-d", "SSH1=2222"], tmp_path).skipped_config_dir is None
    # A usable default directory is read, with nothing to warn about.
    (tmp_path / "config" / "agent.ini").unlink()
    usable = ok(["-r", "us-east-1", "-m", "src"], tmp_path)
    assert usable.mappings == (ServiceMapping("SSH1", Endpoint(None, 22)),)
    assert usable.skipped_config_dir is None


def test_config_dir_errors(tmp_path: Path) -> None:
    write(tmp_path / "file", "")
    for value in ("nope", "file", ""):
        message = err(["-r", "us-east-1", "-m", "dst", "--config-dir", value], tmp_path)
        assert message == f"--config-dir: {value!r}: not a directory"
    write(tmp_path / "maps" / "a.ini", "SSH1 = 22\n")
    write(tmp_path / "maps" / "b.ini", "SSH1 = 23\n")
    assert err(["-r", "us-east-1", "-m", "dst", "--config-dir", "maps"], tmp_path) == (
        "maps/b.ini:1: service ID 'SSH1' is already mapped at maps/a.ini:1"
    )


def test_destination_needs_a_mapping_source_does_not(tmp_path: Path) -> None:
    assert err(["-r", "us-east-1", "-m", "dst"], tmp_path).startswith(
        "destination mode needs a service mapping: give -d"
    )
    (tmp_path / "maps").mkdir()
    assert err(["-r", "us-east-1", "-m", "dst", "--config-dir", "maps"], tmp_path).endswith(
        "(none found in maps)"
    )
    assert ok(["-r", "us-east-1", "-m", "src"], tmp_path).mappings == ()


def test_unnamed_mapping_cannot_mix_with_files(tmp_path: Path) -> None:
    write(tmp_path / "maps" / "a.ini", "SSH1 = 22\n")
    assert err(["-r", "us-east-1", "-d", "2222", "--config-dir", "maps"], tmp_path) == (
        "-d: an unnamed mapping cannot be combined with named ones ('SSH1' from maps/a.ini:1)"
    )


SHIPPED_DIRS = {"SSHDestination.ini": "destination.d", "SSHSource.ini": "source.d"}


@pytest.mark.parametrize(
    ("name", "mode", "expected"),
    [
        (
            "SSHDestination.ini",
            Mode.DESTINATION,
            [
                ServiceMapping("HTTP1", Endpoint(None, 80)),
                ServiceMapping("SSH1", Endpoint(None, 22)),
                ServiceMapping("SSH", Endpoint(None, 22)),  # the AWS console's quick setup
            ],
        ),
        (
            "SSHSource.ini",
            Mode.SOURCE,
            [
                ServiceMapping("HTTP1", Endpoint(None, 5555)),
                ServiceMapping("SSH1", Endpoint(None, 3333)),
            ],
        ),
    ],
)
def test_shipped_mapping_files(name: str, mode: Mode, expected: list[ServiceMapping]) -> None:
    assert read_mapping_file(REPO / "config" / SHIPPED_DIRS[name] / name, mode=mode) == expected


# --------------------------------------------------------------------------- --settings-json


def settings_from(tmp_path: Path, document: object, *argv: str) -> ProxySettings:
    write(tmp_path / "s.json", json.dumps(document))
    return ok(["-r", "us-east-1", "-d", "22", "--settings-json", "s.json", *argv], tmp_path)


def settings_error(tmp_path: Path, text: str) -> str:
    write(tmp_path / "s.json", text)
    return err(["-r", "us-east-1", "-d", "22", "--settings-json", "s.json"], tmp_path)


def test_settings_json_our_keys(tmp_path: Path) -> None:
    nested = {"iotunnel": {"ping_interval": 5, "local_write_buffer": 65536}}
    tuning = settings_from(tmp_path, nested).tuning
    assert tuning == Tuning(ping_interval=5.0, local_write_buffer=65536)
    assert isinstance(tuning.ping_interval, float)
    flat = {"iotunnel.reconnect_attempts": 3, "iotunnel.happy_eyeballs_delay": 0.1}
    assert settings_from(tmp_path, flat).tuning == Tuning(
        reconnect_attempts=3, happy_eyeballs_delay=0.1
    )


def test_settings_json_reference_export(tmp_path: Path) -> None:
    """A file exported by the reference proxy: nested, every value a string."""
    reference = {
        "tunneling": {
            "proxy": {
                "default_bind_address": "localhost",
                "message": {
                    "data_length_size": "2",
                    "max_payload_size": "32768",
                    "max_size": "65536",
                    "data_frame_max_size": "65538",
                },
                "tcp": {
                    "connection_retry_count": "5",
                    "connection_retry_delay_ms": "2500",
                    "read_buffer_size": "131076",
                    "write_buffer_size": "131076",
                    "max_active_connections": "128",
                },
                "websocket": {
                    "ping_period_ms": "5000",
                    "retry_delay_ms": "2500",
                    "connect_retry_count": "-1",
                    "reconnect_on_data_error": "true",
                    "subprotocol": "aws.iot.securetunneling-3.0",
                    "max_frame_size": "131076",
                    "write_buffer_size": "131076",
                    "read_buffer_size": "131076",
                },
                "region_endpoint_overrides": {
                    "cn-north-1": "data.tunneling.iot.cn-north-1.amazonaws.com.cn",
                    "cn-northwest-1": "data.tunneling.iot.cn-northwest-1.amazonaws.com.cn",
                },
            }
        }
    }
    settings = settings_from(tmp_path, reference)
    assert settings.tuning == Tuning(
        ping_interval=5.0,
        reconnect_base=2.5,
        reconnect_attempts=-1,
        max_connections=128,
        read_chunk=32768,
        local_write_buffer=131076,
    )
    # default_bind_address is where a source listens; a destination takes only an explicit
    # -b as the host of its port-only mappings (as the reference does).
    assert settings.bind_address is None
    source = ok(["-r", "us-east-1", "-s", "5555", "--settings-json", "s.json"], tmp_path)
    assert source.bind_address == "localhost"
    # -b still wins over default_bind_address.
    assert settings_from(tmp_path, reference, "-b", "0.0.0.0").bind_address == "0.0.0.0"


def test_settings_json_reference_numbers_and_dotted_keys(tmp_path: Path) -> None:
    document = {"tunneling.proxy.websocket.ping_period_ms": 30000}
    assert settings_from(tmp_path, document).tuning.ping_interval == 30.0


def test_settings_json_endpoint_overrides(tmp_path: Path) -> None:
    document = {"tunneling.proxy.region_endpoint_overrides.us-east-1": "Tunnel.Example.com:8443"}
    assert settings_from(tmp_path, document).url == (
        "wss://tunnel.example.com:8443/tunnel?local-proxy-mode=destination"
    )
    document = {"tunneling.proxy.endpoint_format": "tunnel.%s.example.com"}
    assert settings_from(tmp_path, document).url == (
        "wss://tunnel.us-east-1.example.com:443/tunnel?local-proxy-mode=destination"
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"iotunnel.bogus": 1}', "s.json: iotunnel.bogus: unknown setting"),
        ('{"iotunnel": {"bogus": 1}}', "s.json: iotunnel.bogus: unknown setting"),
        ('{"tunneling.proxy.nope": "1"}', "s.json: tunneling.proxy.nope: unknown setting"),
        ('{"colour": "blue"}', "s.json: colour: unknown setting"),
        ('{"iotunnel.read_chunk": "1024"}', "s.json: iotunnel.read_chunk: must be an integer"),
        ('{"iotunnel.read_chunk": 64513}', "iotunnel.read_chunk: must be an integer 1..64512"),
        ('{"iotunnel.read_chunk": 1.5}', "iotunnel.read_chunk: must be an integer 1..64512"),
        ('{"iotunnel.max_connections": true}', "iotunnel.max_connections: must be an integer"),
        ('{"iotunnel.ping_interval": 0}', "iotunnel.ping_interval: must be a number > 0, not 0"),
        ('{"iotunnel.reconnect_attempts": -2}', "must be an integer >= -1, not -2"),
        ('{"iotunnel.connect_timeout": [1]}', "iotunnel.connect_timeout: must be a number"),
        ('{"iotunnel.ping_interval": NaN}', "s.json: NaN is not a valid setting value"),
        ('{"iotunnel.ping_interval": Infinity}', "s.json: Infinity is not a valid setting"),
        (
            '{"tunneling.proxy.websocket.ping_period_ms": "often"}',
            "s.json: tunneling.proxy.websocket.ping_period_ms: expected an integer, not 'often'",
        ),
        (
            '{"tunneling.proxy.websocket.ping_period_ms": "0"}',
            "ping_period_ms: as ping_interval: must be a number > 0, not 0.0",
        ),
        (
            '{"tunneling.proxy.websocket.subprotocol": "aws.iot.securetunneling-1.0"}',
            "subprotocol: only 'aws.iot.securetunneling-3.0' is supported; use -y V1|V2",
        ),
        ('{"tunneling.proxy.tcp.read_buffer_size": [1]}', "expected a string, number or"),
        ('{"tunneling.proxy.default_bind_address": ""}', "expected a non-empty string"),
        ('{"tunneling.proxy.default_bind_address": "a b"}', "is not a host name"),
        ('{"tunneling.proxy.endpoint_format": "x.com"}', "must contain '%s' (the region) once"),
        ('{"tunneling.proxy.endpoint_format": "a b.%s"}', "'a b.us-east-1' is not a host name"),
        (
            '{"tunneling.proxy.region_endpoint_overrides.us-east-1": "h:0"}',
            "overrides.us-east-1: port must be 1..65535",
        ),
        (
            '{"iotunnel.ping_interval": 1, "tunneling.proxy.websocket.ping_period_ms": 2}',
            "ping_period_ms: sets ping_interval again (already set by iotunnel.ping_interval)",
        ),
        ('{"iotunnel": {"read_chunk": 1}, "iotunnel.read_chunk": 2}', "iotunnel.read_chunk: set"),
        ('{"iotunnel.read_chunk": 1, "iotunnel.read_chunk": 2}', "'iotunnel.read_chunk' appears"),
        (
            '{"iotunnel.reconnect_base": 90}',
            "s.json: reconnect_max (60) is below reconnect_base (90)",
        ),
        ("[1, 2]", "s.json: expected a JSON object at the top level"),
        ('{\n"iotunnel.read_chunk": 1,\n}', "s.json: not valid JSON: "),
        ('{\n"iotunnel.read_chunk": 1,\n}', "(line 3, column 1)"),
        ("[" * 100_000, "s.json: nested more than 32 levels deep"),
        ('{"iotunnel.read_chunk": "' + "x" * 2_000_000 + '"}', "s.json: too large: "),
    ],
)
def test_settings_json_errors(tmp_path: Path, text: str, message: str) -> None:
    found = settings_error(tmp_path, text)
    assert message in found
    assert found.startswith("s.json")


def test_settings_json_missing(tmp_path: Path) -> None:
    assert err(["-r", "us-east-1", "-d", "22", "--settings-json", "nope.json"], tmp_path) == (
        "--settings-json: 'nope.json': no such file or directory"
    )


def test_default_settings_json_lists_every_knob() -> None:
    document = json.loads(default_settings_json())
    assert set(document["iotunnel"]) == set(Tuning.__dataclass_fields__)


# --------------------------------------------------------------------------- secrets


@pytest.mark.parametrize(
    "argv",
    [
        ["-t", TOKEN, "-i", CLIENT, "-r", "us-east-1"],
        ["-t", TOKEN, "-i", CLIENT, "-r", "us-east-1", "-d", "22", "-e", "h"],
        ["-t", TOKEN, "-i", CLIENT, "-d", "22", "-y", "V9", "-r", "us-east-1"],
        ["-t", TOKEN, "-i", CLIENT + "!", "-d", "22", "-r", "us-east-1"],
        ["-t", TOKEN, "-d", "SSH1=99999", "-r", "us-east-1"],
        ["-t", TOKEN, "-d", "22", "-r", "nope nope"],
        ["-t", TOKEN, "-d", "22", "-t", TOKEN],
        ["--access-token=" + TOKEN, "--access-token=" + TOKEN],
        ["-t" + TOKEN, TOKEN],
        ["--access-tokn=" + TOKEN],
        ["-k" + TOKEN],
        ["-t", TOKEN + " with space", "-d", "22", "-r", "us-east-1"],
    ],
)
def test_tokens_never_appear_in_errors(tmp_path: Path, argv: list[str]) -> None:
    env = {"AWSIOT_TUNNEL_ACCESS_TOKEN": TOKEN, "AWSIOT_TUNNEL_CLIENT_TOKEN": CLIENT}
    err(argv, tmp_path, env)  # err() asserts that no secret is in the message


@pytest.mark.parametrize(
    "line",
    [
        "access-token = " + "A" * 64,  # an option file's line in the mapping directory
        "AQGAAXiQ" + "x" * 60,  # a token pasted alone
        "SSH1 = " + "t" * 64,
    ],
)
def test_mapping_file_errors_never_quote_a_long_line(tmp_path: Path, line: str) -> None:
    """A mapping error names file and line; a line that may be a pasted token is not shown."""
    path = write(tmp_path / "m.ini", f"HTTP1 = 80\n{line}\n")
    with pytest.raises(ConfigError) as caught:
        read_mapping_file(path, mode=Mode.DESTINATION, display="m.ini")
    assert str(caught.value).startswith("m.ini:2: ")
    assert line[-40:] not in str(caught.value)
