"""Soak scenarios (``python -m bench --soak``): many tunnels and many connections, and what they
leave behind in memory and file descriptors.

- :func:`tunnel_churn`: tunnels opened and closed one after another through the management API
  over TLS, a few at a time. Each one: OpenTunnel, a destination and a source proxy connect, a
  small echo transfer, CloseTunnel, and both proxies must exit by themselves with status 0.
  Reports the service's RSS and open fds before, at the peak (sampled throughout) and after.
- :func:`peer_churn`: the same without proxy processes, to reach thousands of tunnels in a
  minute: both peers are WebSocket clients of this process (TLS, the current subprotocol), and
  nothing is relayed. Reports the service's RSS every few hundred tunnels and at rest.
- :func:`connection_churn`: connections through one tunnel in waves of simultaneous ones (each
  echoes 4 bytes and closes). Reports RSS and fds of both proxies and the service before and
  after.

The tunnel and peer churns run iotunnel's own proxies (or none); ``--proxy-cmd`` applies to
the connection churn.

Not part of the default run: the full sizes (200 tunnels, 2,000 peer pairs, 10,000
connections) take about two minutes on a 2-core machine (bench/RESULTS.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from websockets.typing import Subprotocol

from iotunnel.exits import ExitCode
from proxy.io.memory import TRIM_DELAY, TRIM_INTERVAL
from testbed.awsapi import ApiService, boto3_client, start_api_service
from testbed.awsapi import write_credentials as write_creds
from testbed.clients import echo_roundtrips
from testbed.harness import Proc, Stack, rss_kib
from testbed.pki import PKI

#: Exit status of a proxy whose tunnel was closed (normal end).


def open_fds(pid: int) -> int:
    """How many file descriptors a process has open, from /proc."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def usage(pid: int) -> dict[str, int]:
    """RSS (KiB) and open fds of a process now."""
    return {"rss_kib": rss_kib(pid), "fds": open_fds(pid)}


class PeakSampler:
    """Samples a process's RSS and fds in a thread, keeping the highest of each."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid = pid
        self.interval = interval
        self.peak = usage(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _sample(self) -> None:
        now = usage(self.pid)
        for key, value in now.items():
            self.peak[key] = max(self.peak[key], value)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()


def settle(procs: dict[str, Proc], baseline: dict[str, dict[str, int]], timeout: float) -> None:
    """Wait (up to ``timeout``) until each process has no more fds open than at ``baseline``:
    closing connections and exiting children finishes asynchronously."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(open_fds(p.pid) <= baseline[name]["fds"] for name, p in procs.items()):
            return
        time.sleep(0.1)


def tunnel_churn(
    workdir: Path,
    pki: PKI,
    count: int,
    *,
    parallel: int = 4,
    roundtrips: int = 20,
    rest: float = TRIM_DELAY + TRIM_INTERVAL + 1.0,
) -> dict[str, Any]:
    """``count`` tunnels through the management API, ``parallel`` at a time (see module doc).

    "after" is measured ``rest`` seconds after the last tunnel closed: the service trims its
    heap within a few seconds of the last disconnection.
    """
    stack = Stack(workdir)
    try:
        service = start_api_service(stack, pki, credentials=write_creds(workdir / "creds"))
        _, echo = stack.echo_server()
        client = boto3_client(service, pki.ca.cert)
        pid = service.proc.pid
        before = usage(pid)
        failures: list[str] = []
        clean = 0
        lock = threading.Lock()

        def one(index: int) -> None:
            nonlocal clean
            opened = client.open_tunnel(destinationConfig={"services": ["SSH1"]})
            tunnel_id = opened["tunnelId"]
            dst = stack.destination(
                opened["destinationAccessToken"],
                service.port,
                f"SSH1={echo}",
                ca=pki.ca.cert,
                name=f"t{index}-destination",
            )
            src = stack.source(
                opened["sourceAccessToken"],
                service.port,
                "SSH1=0",
                ["SSH1"],
                ca=pki.ca.cert,
                name=f"t{index}-source",
            )
            echo_roundtrips(src.ports["SSH1"], roundtrips, size=1024)
            client.close_tunnel(tunnelId=tunnel_id)
            codes = [dst.wait(60), src.proc.wait(60)]
            with lock:
                clean += sum(code == ExitCode.CLOSED for code in codes)
                if any(code != ExitCode.CLOSED for code in codes):
                    failures.append(f"tunnel {index}: proxies exited with {codes}")
            # exited: forget them, so that the stack does not grow with every tunnel
            for proc in (dst, src.proc):
                stack.procs.remove(proc)

        start = time.perf_counter()
        with PeakSampler(pid) as sampler, ThreadPoolExecutor(parallel) as pool:
            # The first one alone: the service loads botocore for its first signed request.
            first: dict[str, int] | None = None
            futures = [pool.submit(one, 0)] if count else []
            with contextlib.suppress(Exception):  # reported below
                futures[0].result()
                first = usage(pid)
            futures += [pool.submit(one, i) for i in range(1, count)]
            for future in futures:
                try:
                    future.result()
                except Exception as exc:  # report, go on with the others
                    failures.append(f"{type(exc).__name__}: {str(exc)[:300]}")
        seconds = time.perf_counter() - start
        retained = _count_tunnels(client)
        client.close()  # its kept-alive API connections, so that "after" does not count them
        settle({"service": service.proc}, {"service": before}, 10.0)
        time.sleep(rest)
        after = usage(pid)
        return {
            "tunnels": count,
            "parallel": parallel,
            "proxies": 2 * count,
            "proxies_exited_cleanly": clean,
            "failures": failures[:10],
            "seconds": round(seconds, 1),
            "service_before": before,
            "service_after_first_tunnel": first,
            "service_peak": sampler.peak,
            "service_after": after,
            "retained_closed_tunnels": retained,
        }
    finally:
        stack.close()


def peer_churn(
    workdir: Path,
    pki: PKI,
    count: int,
    *,
    every: int = 500,
    rest: float = TRIM_DELAY + TRIM_INTERVAL + 1.0,
) -> dict[str, Any]:
    """``count`` tunnels opened, joined by two in-process peers and closed, one at a time."""
    stack = Stack(workdir)
    try:
        service = start_api_service(stack, pki, credentials=write_creds(workdir / "creds"))
        client = boto3_client(service, pki.ca.cert)
        pid = service.proc.pid
        before = usage(pid)
        samples: list[dict[str, int]] = []
        start = time.perf_counter()
        with PeakSampler(pid) as sampler:
            asyncio.run(_peer_pairs(service, pki, client, count, every, samples))
        seconds = time.perf_counter() - start
        client.close()
        settle({"service": service.proc}, {"service": before}, 10.0)
        time.sleep(rest)
        return {
            "tunnels": count,
            "seconds": round(seconds, 1),
            "service_before": before,
            "service_samples": samples,
            "service_peak": sampler.peak,
            "service_after": usage(pid),
        }
    finally:
        stack.close()


async def _peer_pairs(
    service: ApiService,
    pki: PKI,
    client: Any,
    count: int,
    every: int,
    samples: list[dict[str, int]],
) -> None:
    from websockets.asyncio.client import connect

    context = pki.client_context()
    url = f"wss://127.0.0.1:{service.port}/tunnel?local-proxy-mode="
    for index in range(count):
        opened = await asyncio.to_thread(
            client.open_tunnel, destinationConfig={"services": ["SSH1"]}
        )
        peers = []
        for mode in ("destination", "source"):
            peers.append(
                await connect(
                    url + mode,
                    ssl=context,
                    additional_headers={"access-token": opened[f"{mode}AccessToken"]},
                    subprotocols=[Subprotocol("aws.iot.securetunneling-3.0")],
                    compression=None,
                )
            )
        await asyncio.to_thread(client.close_tunnel, tunnelId=opened["tunnelId"])
        for ws in peers:
            async with asyncio.timeout(60):
                await ws.wait_closed()
            if ws.close_code != 1000:
                raise RuntimeError(f"tunnel {index}: peer closed with {ws.close_code}")
        if (index + 1) % every == 0:
            samples.append({"tunnels": index + 1, **usage(service.proc.pid)})


def _count_tunnels(client: Any) -> int:
    """How many tunnels ListTunnels reports (all closed by now: kept for the retention)."""
    total = 0
    extra: dict[str, str] = {}
    while True:
        page = client.list_tunnels(maxResults=100, **extra)
        total += len(page.get("tunnelSummaries", []))
        if not page.get("nextToken"):
            return total
        extra = {"nextToken": page["nextToken"]}


def connection_churn(procs: dict[str, Proc], port: int, count: int, wave: int) -> dict[str, Any]:
    """``count`` connections through a tunnel's echo service, ``wave`` at a time."""
    from bench.__main__ import load  # the load client in its own process, as elsewhere

    before = {name: usage(p.pid) for name, p in procs.items()}
    result = load("churn", port, "--count", str(count), "--wave", str(wave))
    settle(procs, before, 10.0)
    result["before"] = before
    result["after"] = {name: usage(p.pid) for name, p in procs.items()}
    return result


def table(results: dict[str, Any]) -> str:
    """The soak results as plain text."""
    lines = [f"soak — {results['machine']} — {results['date']}"]
    tc = results.get("tunnel_churn")
    if tc:
        lines.append(
            f"  {tc['tunnels']} tunnels ({tc['parallel']} at a time) in {tc['seconds']} s:"
            f" {tc['proxies_exited_cleanly']}/{tc['proxies']} proxies exited cleanly,"
            f" {tc['retained_closed_tunnels']} closed tunnels retained"
        )
        for key in ("service_before", "service_after_first_tunnel", "service_peak"):
            if tc[key] is not None:
                lines.append(f"    {key:26} {_usage(tc[key])}")
        lines.append(f"    {'service_after (at rest)':26} {_usage(tc['service_after'])}")
        for failure in tc["failures"]:
            lines.append(f"    failure: {failure}")
    pc = results.get("peer_churn")
    if pc:
        lines.append(f"  {pc['tunnels']} tunnels with in-process peers in {pc['seconds']} s:")
        lines.append(f"    {'service_before':26} {_usage(pc['service_before'])}")
        for sample in pc["service_samples"]:
            lines.append(f"    {'after ' + str(sample['tunnels']):26} {_usage(sample)}")
        lines.append(f"    {'service_peak':26} {_usage(pc['service_peak'])}")
        lines.append(f"    {'service_after (at rest)':26} {_usage(pc['service_after'])}")
    cc = results.get("connection_churn")
    if cc:
        lines.append(
            f"  {cc['count']} connections in waves of {cc['wave']}: {cc['ok']} echoed,"
            f" {cc['seconds']} s"
        )
        for name in cc["before"]:
            lines.append(
                f"    {name:12} before {_usage(cc['before'][name])};"
                f" after {_usage(cc['after'][name])}"
            )
    return "\n".join(lines)


def _usage(value: dict[str, int]) -> str:
    return f"RSS {value['rss_kib'] / 1024:.1f} MiB, {value['fds']} fds"
