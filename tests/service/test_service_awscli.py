"""The real AWS CLI (``aws iotsecuretunneling ... --endpoint-url``) against ``iotunnel-service``
run as a process over HTTPS, with throw-away credentials the service checks (SigV4).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.awsapi import (
    TEST_KEY_ID,
    ApiService,
    aws_cli,
    aws_env,
    aws_json,
    start_api_service,
    write_credentials,
)
from testbed.harness import Stack
from testbed.pki import PKI


@pytest.fixture(scope="module")
def setup(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[ApiService, dict[str, str], Path]]:
    directory = tmp_path_factory.mktemp("awscli")
    pki = PKI.create(directory / "pki")
    credentials = write_credentials(directory / "credentials")
    with Stack(directory / "run") as stack:
        service = start_api_service(stack, pki, credentials=credentials)
        yield service, aws_env(credentials, pki.ca.cert), directory
        assert service.proc.stop() == 0


def test_every_operation_through_the_cli(setup: tuple[ApiService, dict[str, str], Path]) -> None:
    service, env, _ = setup
    opened = aws_json(
        [
            "open-tunnel",
            "--description",
            "from the CLI",
            "--destination-config",
            "thingName=thing-1,services=HTTP1,SSH1",
            "--timeout-config",
            "maxLifetimeTimeoutMinutes=30",
            "--tags",
            "key=env,value=test",
        ],
        service,
        env,
    )
    assert set(opened) == {"tunnelId", "tunnelArn", "sourceAccessToken", "destinationAccessToken"}
    tunnel_id, arn = opened["tunnelId"], opened["tunnelArn"]

    tunnel = aws_json(["describe-tunnel", "--tunnel-id", tunnel_id], service, env)["tunnel"]
    assert tunnel["status"] == "OPEN"
    assert tunnel["destinationConfig"] == {"thingName": "thing-1", "services": ["HTTP1", "SSH1"]}
    assert tunnel["sourceConnectionState"]["status"] == "DISCONNECTED"
    assert tunnel["timeoutConfig"] == {"maxLifetimeTimeoutMinutes": 30}

    listed = aws_json(["list-tunnels", "--thing-name", "thing-1"], service, env)
    assert [s["tunnelId"] for s in listed["tunnelSummaries"]] == [tunnel_id]

    rotated = aws_json(
        ["rotate-tunnel-access-token", "--tunnel-id", tunnel_id, "--client-mode", "SOURCE"],
        service,
        env,
    )
    assert set(rotated) == {"tunnelArn", "sourceAccessToken"}
    assert rotated["sourceAccessToken"] != opened["sourceAccessToken"]

    aws_json(["tag-resource", "--resource-arn", arn, "--tags", "key=k2,value=v2"], service, env)
    aws_json(["untag-resource", "--resource-arn", arn, "--tag-keys", "env"], service, env)
    tags = aws_json(["list-tags-for-resource", "--resource-arn", arn], service, env)
    assert tags == {"tags": [{"key": "k2", "value": "v2"}]}

    assert aws_json(["close-tunnel", "--tunnel-id", tunnel_id], service, env) == {}
    tunnel = aws_json(["describe-tunnel", "--tunnel-id", tunnel_id], service, env)["tunnel"]
    assert tunnel["status"] == "CLOSED"
    aws_json(["close-tunnel", "--tunnel-id", tunnel_id, "--delete"], service, env)
    log = service.proc.output()
    for token in (*opened.values(), rotated["sourceAccessToken"]):
        if token not in (tunnel_id, arn):
            assert token not in log


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["describe-tunnel", "--tunnel-id", "no-such-tunnel"], "ResourceNotFoundException"),
        (
            ["open-tunnel", "--destination-config", "services=A,B,C,D"],
            "LimitExceededException",
        ),
        (["open-tunnel", "--destination-config", "services=bad!id"], "InvalidRequestException"),
        (
            ["rotate-tunnel-access-token", "--tunnel-id", "x", "--client-mode", "EVERYONE"],
            "InvalidRequestException",
        ),
    ],
)
def test_cli_prints_the_typed_error(
    setup: tuple[ApiService, dict[str, str], Path], args: list[str], error: str
) -> None:
    service, env, _ = setup
    done = aws_cli(args, service, env)
    assert done.returncode != 0
    assert f"An error occurred ({error}) when calling the" in done.stderr
    assert aws_json(["list-tunnels", "--max-results", "1"], service, env) is not None


def test_cli_with_wrong_keys_is_refused(setup: tuple[ApiService, dict[str, str], Path]) -> None:
    service, env, directory = setup
    wrong = write_credentials(directory / "wrong", TEST_KEY_ID, "not-the-secret")
    done = aws_cli(["list-tunnels"], service, {**env, "AWS_SHARED_CREDENTIALS_FILE": str(wrong)})
    assert "(InvalidSignatureException)" in done.stderr


def test_cli_without_ca_bundle_needs_no_verify_ssl(
    setup: tuple[ApiService, dict[str, str], Path],
) -> None:
    service, env, _ = setup
    without = {k: v for k, v in env.items() if k != "AWS_CA_BUNDLE"}
    done = aws_cli(["list-tunnels"], service, without)
    assert done.returncode != 0
    assert "SSL" in done.stderr or "certificate" in done.stderr
    done = aws_cli(["list-tunnels"], service, without, global_args=["--no-verify-ssl"])
    assert done.returncode == 0, done.stderr
