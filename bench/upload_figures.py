"""File cut → 64 MB file delivered to SFTP (OpenSSH) and S3 (moto) vs a raw upload.

The daemon is measured end to end from its own log: the time from a batch's `batch.cut`
event (file fixed on disk) to its `batch.delivered` event. To make the daemon cut exactly
one file of the wanted size, the firehose's `max_file` is set just under the queued size
of the records posted per repetition (every record has the same length, and its framed
size in the queue is computed with firehosed's own Record encoder and frame), and
`minutes_between_files` is an hour: the last POST of a repetition triggers the cut of a
file holding all of them. The first repetition is a warm-up (the channel connects).

The ceiling uploads the very bytes the daemon delivered (the file SFTP wrote, or the
object S3 holds) with the raw library, pinned to the daemon's CPU, connection set up
beforehand. When the `s3` type is not in the channel registry, the S3 row times
firehosed's `S3Channel.put` in-process on the same file instead (and says so).
"""

from __future__ import annotations

import http.client
import json
import math
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from bench import fixtures
from bench.inprocess import Ingest
from bench.procs import (
    ACCOUNT,
    PYTHON,
    REPO,
    SERVER_CPU,
    TOKEN,
    Daemon,
    event_time,
    firehose_toml,
    pinned,
    wait_until,
)
from bench.report import Figure, Series, ratios
from bench.servers import Missing, Moto, Sshd
from bench.settings import Settings
from firehosed.channels import REGISTRY
from firehosed.queue.store import SegmentStore

BUCKET = "bench"
SFTP_CIPHERS = ("", "aes128-gcm@openssh.com")
PER_POST = 1000


class Load:
    """The records posted per repetition and the `max_file` that cuts them as one file."""

    def __init__(self, size: int) -> None:
        self.template = fixtures.Template(fixtures.template_text(PER_POST))
        sample, _ = self.template.render(fixtures.new_prefix(), 0)
        lines = sample.splitlines()
        if len({len(line) for line in lines}) != 1:
            raise RuntimeError("upload records must all have one length")
        self.record_bytes = len(lines[0])
        self.records = math.ceil(size / (self.record_bytes + 1))
        self.file_bytes = self.records * (self.record_bytes + 1)
        framed = _framed_size(lines)
        self.max_file = int(self.records * framed - framed / 2)

    def bodies(self) -> list[bytes]:
        prefix, counter, out = fixtures.new_prefix(), 0, []
        while counter < self.records:
            count = min(PER_POST, self.records - counter)
            template = (
                self.template
                if count == PER_POST
                else fixtures.Template(fixtures.template_text(count))
            )
            body, counter = template.render(prefix, counter)
            out.append(body)
        return out


def _framed_size(request: list[bytes]) -> float:
    """Bytes one record takes in a firehose queue when it comes in a request like
    `request` (one block per request): route it in-process and look."""
    queue = SegmentStore(Path("/nonexistent"), "probe", 64 << 20, sync=True)  # never opened
    Ingest([("probe", queue, {})]).accept_all(request, time.time())
    return queue.staged_bytes / len(request)


def _post_all(daemon: Daemon, bodies: list[bytes]) -> float:
    """POST every body (keep-alive); the time the last 202 came back."""
    conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=60)
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/x-ndjson"}
    try:
        for body in bodies:
            conn.request("POST", f"/v1/accounts/{ACCOUNT}/signals", body, headers)
            response = conn.getresponse()
            response.read()
            if response.status != 202:
                raise RuntimeError(f"upload load: POST answered {response.status}")
    finally:
        conn.close()
    return time.time()


def _deliver_one(daemon: Daemon, load: Load, rep: int) -> tuple[dict[str, Any], float]:
    """Post one repetition's records; wait for the batch; (its delivered event, cut→delivered s)."""
    _post_all(daemon, load.bodies())
    delivered = wait_until(
        lambda: len(daemon.events("batch.delivered")) > rep and daemon.events("batch.delivered"),
        600,
        "the upload batch to be delivered",
        interval=0.05,
    )[rep]
    cut = next(e for e in daemon.events("batch.cut") if e["batch"] == delivered["batch"])
    if delivered["records"] != load.records or delivered["bytes"] != load.file_bytes:
        raise RuntimeError(f"expected one batch of {load.records} records, got {delivered}")
    return delivered, event_time(delivered) - event_time(cut)


def _raw(*args: str) -> tuple[float, str]:
    argv = pinned(SERVER_CPU, [PYTHON, "-m", "bench.upload", *args])
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=900, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{done.stderr[-3000:]}")
    seconds: float = json.loads(done.stdout.strip().splitlines()[-1])["seconds"]
    return seconds, " ".join(argv)


def _mbps(size: int, seconds: float) -> float:
    return size / seconds / 1e6


def _figure(title: str, daemon: Series, raw: Series, label: str, commands: list[str]) -> Figure:
    figure = Figure(
        title=title,
        target="≥ 0.7 x raw upload",
        result=daemon,
        ceiling=raw,
        ceiling_label=label,
        ratio=ratios(daemon, raw),
        commands=commands,
    )
    figure.passed = figure.ratio is not None and figure.ratio.median >= 0.7
    return figure


def sftp_figure(settings: Settings, load: Load) -> Figure:
    home = settings.work / "sshd"
    sshd = Sshd.start(home)
    out = home / "sftp-out"
    out.mkdir()
    tables = sshd.channel_toml("sftp", out) + (
        firehose_toml(
            "up", channel="sftp", format="ndjson", minutes_between_files=60, max_file=load.max_file
        )
    )
    daemon_mbps, raw_mbps = Series("MB/s"), Series("MB/s")
    commands: list[str] = []
    daemon = Daemon(settings.work / "upload-sftp", tables).start()
    try:
        for rep in range(settings.upload_reps + 1):
            delivered, seconds = _deliver_one(daemon, load, rep)
            raws = [
                _raw(
                    "sftp-raw",
                    "127.0.0.1",
                    str(sshd.port),
                    sshd.username,
                    str(sshd.key_file),
                    str(sshd.known_hosts_file),
                    str(out / delivered["batch"]),
                    str(out / f"raw-{rep}-{n}"),
                    cipher,
                )
                for n, cipher in enumerate(SFTP_CIPHERS)
            ]
            raw_seconds = min(seconds for seconds, _ in raws)
            commands += [command for _, command in raws]
            if rep > 0:  # rep 0 warms up both connections
                daemon_mbps.add(_mbps(load.file_bytes, seconds))
                raw_mbps.add(_mbps(load.file_bytes, raw_seconds))
            for path in out.iterdir():
                path.unlink()
        daemon.check_no_errors()
        commands.insert(0, " ".join(daemon.argv))
    finally:
        daemon.stop()
        sshd.stop()
        shutil.rmtree(daemon.root, ignore_errors=True)
        shutil.rmtree(home, ignore_errors=True)
    figure = _figure(
        f"file cut → {load.file_bytes / 1e6:.0f} MB file on SFTP (OpenSSH)",
        daemon_mbps,
        raw_mbps,
        "raw asyncssh sftp.put (faster of defaults, AES-GCM)",
        commands,
    )
    figure.notes.append(
        "Daemon: `batch.cut` → `batch.delivered` log events of `firehosed run` (sftp "
        "channel: parallel block writes to `.NAME.part`, then rename). Raw: asyncssh "
        "`sftp.put` of the delivered file, connection set up before timing, once with "
        "asyncssh's default ciphers (chacha20-poly1305 first) and once with "
        "aes128-gcm@openssh.com only; the faster counts. sshd on CPU 1."
    )
    return figure


def s3_figure(settings: Settings, load: Load) -> Figure:
    moto = Moto.start()
    try:
        moto.create_bucket(BUCKET)
        if "s3" in REGISTRY:
            return _s3_daemon(settings, load, moto)
        return _s3_channel(settings, load, moto)
    finally:
        moto.stop()


def _s3_tables(moto: Moto, load: Load) -> str:
    return moto.channel_toml("s3", BUCKET) + (
        firehose_toml(
            "up", channel="s3", format="ndjson", minutes_between_files=60, max_file=load.max_file
        )
    )


def _s3_daemon(settings: Settings, load: Load, moto: Moto) -> Figure:
    daemon_mbps, raw_mbps = Series("MB/s"), Series("MB/s")
    commands: list[str] = []
    daemon = Daemon(settings.work / "upload-s3", _s3_tables(moto, load)).start()
    scratch = settings.work / "s3-object"
    try:
        for rep in range(settings.upload_reps + 1):
            delivered, seconds = _deliver_one(daemon, load, rep)
            raw_seconds, command = _raw(
                "s3-raw", moto.url, BUCKET, str(scratch), f"raw-{rep}", delivered["batch"]
            )
            if rep > 0:
                daemon_mbps.add(_mbps(load.file_bytes, seconds))
                raw_mbps.add(_mbps(load.file_bytes, raw_seconds))
            commands.append(command)
        daemon.check_no_errors()
        commands.insert(0, " ".join(daemon.argv))
    finally:
        daemon.stop()
        shutil.rmtree(daemon.root, ignore_errors=True)
        scratch.unlink(missing_ok=True)
    figure = _figure(
        f"file cut → {load.file_bytes / 1e6:.0f} MB file on S3 (moto)",
        daemon_mbps,
        raw_mbps,
        "raw aiobotocore put_object, defaults",
        commands,
    )
    figure.notes.append(
        "Daemon: `batch.cut` → `batch.delivered` log events (s3 channel defaults: multipart "
        "above 16 MiB, 8 MiB parts, 4 in flight). Raw: one put_object of the same bytes "
        "(file read included), client connected before timing. moto on CPU 1."
    )
    return figure


def _s3_channel(settings: Settings, load: Load, moto: Moto) -> Figure:
    """`s3` not registered yet: firehosed's S3Channel.put vs raw put_object, same file."""
    path = settings.work / "s3-batch.ndjson"
    path.write_bytes(b"".join(load.bodies()))
    channel_mbps, raw_mbps = Series("MB/s"), Series("MB/s")
    commands: list[str] = []
    try:
        for rep in range(settings.upload_reps):
            seconds, command = _raw("s3-channel", moto.url, BUCKET, str(path), f"channel-{rep}")
            raw_seconds, raw_command = _raw("s3-raw", moto.url, BUCKET, str(path), f"raw-{rep}")
            channel_mbps.add(_mbps(load.file_bytes, seconds))
            raw_mbps.add(_mbps(load.file_bytes, raw_seconds))
            commands += [command, raw_command]
    finally:
        path.unlink(missing_ok=True)
    figure = _figure(
        f"file cut → {load.file_bytes / 1e6:.0f} MB file on S3 (moto), channel class",
        channel_mbps,
        raw_mbps,
        "raw aiobotocore put_object, defaults",
        commands,
    )
    figure.notes.append(
        "The `s3` type is not in firehosed.channels.REGISTRY yet, so the daemon cannot use "
        "it: this row times `S3Channel.put` (firehosed's own class, defaults) in a process "
        "pinned to CPU 0, after one warm-up put, on the same file as the raw put_object."
    )
    return figure


def figures(settings: Settings) -> list[Figure]:
    load = Load(settings.upload_bytes)
    out = []
    for title, build in (("SFTP", sftp_figure), ("S3", s3_figure)):
        try:
            out.append(build(settings, load))
        except Missing as exc:
            if os.environ.get("CI") == "true":
                raise
            out.append(
                Figure(
                    title=f"file cut → file on {title}",
                    target="≥ 0.7 x raw upload",
                    skipped=str(exc),
                )
            )
    return out
