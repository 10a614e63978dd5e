"""The device key in a PKCS#11 token (issue 13 #3): settings, the PIN credential, ``--check``.

The settings are parsed in process. ``--check`` runs as a real ``iotunnel-agent`` process
against a real SoftHSM token (one per test: the library reads its configuration once per
process), with the PIN handed over as systemd would: ``$CREDENTIALS_DIRECTORY/pkcs11-pin``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from agent_files import DeviceFiles

from agent.config import AgentSettings, ConfigError, load
from testbed.pki import PKI
from testbed.softhsm import SoftToken, softhsm_library, softhsm_missing

ROOT = Path(__file__).resolve().parents[2]
#: A PIN no message, file name or path would contain by chance.
PIN = "7319-pin-4826"


def pkcs11_ini(device: DeviceFiles, lib: Path, **extra: str) -> Path:
    """The device's settings with the key in a token instead of the key file."""
    lines = device.ini.read_text().replace("key = certs/device.key\n", "")
    keys = {
        "pkcs11_lib": str(lib),
        "pkcs11_token_label": "iotunnel",
        "pkcs11_key_label": "device-key",
        **extra,
    }
    lines += "".join(f"{k} = {v}\n" for k, v in keys.items() if v)
    return device.write_ini(lines)


def credentials(tmp_path: Path, pin: str = PIN + "\n") -> dict[str, str]:
    """A credentials directory as systemd makes it, holding the PIN."""
    directory = tmp_path / "credentials"
    directory.mkdir(exist_ok=True)
    (directory / "pkcs11-pin").write_text(pin)
    return {"CREDENTIALS_DIRECTORY": str(directory)}


def error(argv: list[str], environ: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load(argv, environ or {}, ROOT)
    message = str(info.value)
    assert "\n" not in message
    assert PIN not in message
    return message


# --------------------------------------------------------------------------- settings


def test_pkcs11_settings_with_the_pin_from_the_credential(
    device: DeviceFiles, tmp_path: Path
) -> None:
    ini = pkcs11_ini(device, device.cert)  # any readable file: the library is loaded later
    loaded = load(["--config", str(ini)], credentials(tmp_path), ROOT)
    assert isinstance(loaded, AgentSettings)
    key = loaded.pkcs11
    assert key is not None
    assert loaded.key is None
    assert (key.lib, key.token_label, key.slot, key.key_label) == (
        device.cert,
        "iotunnel",
        None,
        "device-key",
    )
    assert key.pin_file == tmp_path / "credentials" / "pkcs11-pin"
    assert key.pin.reveal() == PIN  # the line end is not part of it
    for text in (repr(loaded), str(loaded), repr(key), f"{key.pin}", key.describe()):
        assert PIN not in text


def test_pin_file_setting_slot_and_line_ends(device: DeviceFiles, tmp_path: Path) -> None:
    pin = tmp_path / "pin"
    pin.write_bytes(PIN.encode() + b"\r\n")
    ini = pkcs11_ini(device, device.cert, pkcs11_token_label="", pkcs11_slot="0x1F")
    env = {"IOTUNNEL_PKCS11_PIN_FILE": str(pin), **credentials(tmp_path, "other\n")}
    loaded = load(["--config", str(ini)], env, ROOT)
    assert isinstance(loaded, AgentSettings)
    assert loaded.pkcs11 is not None
    assert (loaded.pkcs11.slot, loaded.pkcs11.token_label) == (31, None)
    assert loaded.pkcs11.pin_file == pin
    assert loaded.pkcs11.pin.reveal() == PIN  # the setting wins over the credential
    loaded = load(["--config", str(ini), "--pkcs11-slot", "262657536"], env, ROOT)
    assert isinstance(loaded, AgentSettings)
    assert loaded.pkcs11 is not None
    assert loaded.pkcs11.slot == 262657536


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", "empty: the token's user PIN belongs in it"),
        (b"\n", "empty: the token's user PIN belongs in it"),
        (PIN.encode() + b"\nsecond line\n", "more than one line"),
        (b"\xff\xfe" + PIN.encode(), "not UTF-8 text"),
        (PIN.encode() * 100, "larger than 1024 bytes: not a PIN file"),
    ],
)
def test_bad_pin_files_are_named_never_quoted(
    device: DeviceFiles, tmp_path: Path, content: bytes, expected: str
) -> None:
    pin = tmp_path / "pin"
    pin.write_bytes(content)
    ini = pkcs11_ini(device, device.cert, pkcs11_pin_file=str(pin))
    message = error(["--config", str(ini)])
    assert message.startswith(f"{ini}:")
    assert f"pkcs11_pin_file: '{pin}': {expected}" in message
    assert "second line" not in message


def test_missing_pin_file(device: DeviceFiles, tmp_path: Path) -> None:
    ini = pkcs11_ini(device, device.cert)
    message = error(["--config", str(ini)])  # no setting, no credential
    assert message.startswith("pkcs11_lib is set but pkcs11_pin_file is not")
    assert "LoadCredential=pkcs11-pin:" in message
    empty = tmp_path / "empty-credentials"
    empty.mkdir()
    message = error(["--config", str(ini)], {"CREDENTIALS_DIRECTORY": str(empty)})
    assert message == (
        "pkcs11_pin_file (default: $CREDENTIALS_DIRECTORY/pkcs11-pin): "
        f"'{empty}/pkcs11-pin': no such file"
    )
    missing = tmp_path / "nope"
    message = error(["--config", str(ini), "--pkcs11-pin-file", str(missing)])
    assert message == f"--pkcs11-pin-file: '{missing}': no such file"


def test_missing_library_is_named(device: DeviceFiles, tmp_path: Path) -> None:
    ini = pkcs11_ini(device, tmp_path / "libnope.so")
    message = error(["--config", str(ini)], credentials(tmp_path))
    assert message.endswith(f"pkcs11_lib: '{tmp_path}/libnope.so': no such file")


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({"pkcs11_slot": "1"}, "pkcs11_token_label and pkcs11_slot are both set ("),
        ({"pkcs11_token_label": ""}, "neither pkcs11_token_label nor pkcs11_slot: set one"),
        ({"pkcs11_key_label": ""}, "pkcs11_lib is set but pkcs11_key_label is not"),
        ({"pkcs11_slot": "1x", "pkcs11_token_label": ""}, "pkcs11_slot: '1x': a slot id is"),
        ({"pkcs11_slot": str(1 << 64), "pkcs11_token_label": ""}, "a number 0..2^64-1"),
        ({"pkcs11_token_label": "x" * 33}, "pkcs11_token_label: 'xxx"),
        ({"pkcs11_key_label": "a\tb"}, "pkcs11_key_label: 'a\\tb': a label is 1..255 bytes"),
    ],
)
def test_bad_pkcs11_settings(
    device: DeviceFiles, tmp_path: Path, extra: dict[str, str], expected: str
) -> None:
    ini = pkcs11_ini(device, device.cert, **extra)
    assert expected in error(["--config", str(ini)], credentials(tmp_path))


def test_key_and_pkcs11_are_exclusive_and_pkcs11_keys_need_the_library(
    device: DeviceFiles, tmp_path: Path
) -> None:
    ini = pkcs11_ini(device, device.cert)
    message = error(["--config", str(ini)], {"IOTUNNEL_KEY": str(device.key)})
    assert message.startswith(f"key and pkcs11_lib are both set (IOTUNNEL_KEY; {ini}:")
    device.write_ini(device.ini.read_text().replace(f"pkcs11_lib = {device.cert}\n", ""))
    message = error(["--config", str(ini)], {"IOTUNNEL_KEY": str(device.key)})
    assert message == "pkcs11_token_label is set but pkcs11_lib is not: it would not be used"


# --------------------------------------------------------------------------- --check on a token

needs_softhsm = pytest.mark.skipif(softhsm_missing() is not None, reason=str(softhsm_missing()))


@pytest.fixture
def token(tmp_path: Path, pki: PKI) -> SoftToken:
    """A SoftHSM token holding the private key of ``pki.client``."""
    made = SoftToken.create(tmp_path / "softhsm", pin=PIN)
    made.import_key(pki.client.key)
    return made


def check(
    ini: Path, token: SoftToken, environ: dict[str, str], *args: str
) -> subprocess.CompletedProcess[str]:
    """``iotunnel-agent --config INI --check``, a process of its own, with the token's conf."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": str(ROOT),
        **token.env,
        **environ,
    }
    argv = [sys.executable, "-m", "agent", "--config", str(ini), "--check", *args]
    return subprocess.run(
        argv, env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL
    )


def check_error(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert PIN not in done.stderr
    return done.stderr.removeprefix("iotunnel-agent: error: ").rstrip("\n")


def token_ini(device: DeviceFiles, pki: PKI, token: SoftToken, **extra: str) -> Path:
    """Settings for the token, in a file of their own."""
    keys = {
        "endpoint": "broker.example.net",
        "client_id": "thing-1",
        "cert": str(pki.client.cert),
        "root_ca": str(pki.ca.cert),
        "mapping_dir": str(device.mappings),
        "pkcs11_lib": str(token.lib),
        "pkcs11_token_label": token.label,
        "pkcs11_key_label": "device-key",
        **extra,
    }
    ini = device.root / "pkcs11.ini"
    ini.write_text("[agent]\n" + "".join(f"{k} = {v}\n" for k, v in keys.items() if v))
    return ini


@needs_softhsm
def test_check_logs_in_to_the_token_and_finds_the_key(
    device: DeviceFiles, pki: PKI, token: SoftToken, tmp_path: Path
) -> None:
    ini = token_ini(device, pki, token)
    done = check(ini, token, credentials(tmp_path))
    assert done.returncode == 0, done.stderr
    assert "key 'device-key' in PKCS#11 token 'iotunnel'" in done.stdout
    assert PIN not in done.stdout + done.stderr
    # The slot instead of the label.
    ini = token_ini(device, pki, token, pkcs11_token_label="", pkcs11_slot=str(token.slot))
    done = check(ini, token, credentials(tmp_path))
    assert done.returncode == 0, done.stderr
    assert f"in PKCS#11 slot {token.slot}" in done.stdout


@needs_softhsm
def test_check_reports_a_wrong_pin(
    device: DeviceFiles, pki: PKI, token: SoftToken, tmp_path: Path
) -> None:
    ini = token_ini(device, pki, token)
    env = credentials(tmp_path, "0000\n")
    message = check_error(check(ini, token, env))
    pin_file = tmp_path / "credentials" / "pkcs11-pin"
    assert message == (
        f"pkcs11_pin_file: {pin_file}: the token did not take the PIN in it (CKR_PIN_INCORRECT)"
    )


@needs_softhsm
def test_check_reports_a_missing_key_label_token_or_slot(
    device: DeviceFiles, pki: PKI, token: SoftToken, tmp_path: Path
) -> None:
    ini = token_ini(device, pki, token, pkcs11_key_label="no-such-key")
    message = check_error(check(ini, token, credentials(tmp_path)))
    assert message.startswith("pkcs11_key_label: 'no-such-key': not exactly one private key")
    ini = token_ini(device, pki, token)
    message = check_error(check(ini, token, credentials(tmp_path), "--pkcs11-token-label=nope"))
    assert message.startswith("pkcs11_token_label: 'nope': not exactly one such token")
    ini = token_ini(device, pki, token, pkcs11_token_label="", pkcs11_slot=str(token.slot + 1000))
    message = check_error(check(ini, token, credentials(tmp_path)))
    assert message.startswith(f"pkcs11_slot: {token.slot + 1000}: no token in this slot")


@needs_softhsm
def test_check_reports_a_missing_pin_file_and_library(
    device: DeviceFiles, pki: PKI, token: SoftToken, tmp_path: Path
) -> None:
    ini = token_ini(device, pki, token)
    message = check_error(check(ini, token, {}))
    assert message.startswith("pkcs11_lib is set but pkcs11_pin_file is not")
    env = credentials(tmp_path)
    message = check_error(check(ini, token, env, f"--pkcs11-lib={tmp_path}/libnope.so"))
    assert message == f"--pkcs11-lib: '{tmp_path}/libnope.so': no such file"
    # A file that is there but is no PKCS#11 library.
    message = check_error(check(ini, token, env, f"--pkcs11-lib={pki.ca.cert}"))
    assert message == (
        f"pkcs11_lib: {pki.ca.cert}: cannot load it as a PKCS#11 library "
        "(SHARED_LIBRARY_LOAD_FAILURE)"
    )


def test_softhsm_library_is_found_when_installed() -> None:
    if softhsm_missing() is None:
        assert softhsm_library() is not None
