"""Run every benchmark and write the report.

    python -m bench.harness [--quick] [--only SECTION,...] [--out FILE] [--no-profile]

Full run: bench/RESULTS.md. `--quick`: short runs, one repetition, small sizes, written
to bench/RESULTS-quick.md; never judged on timings (exit 0) but exit 1 when any
benchmark crashes, so CI keeps the harness working. Sections run in order; a crash in
one is reported in the file and on stderr, and the others still run.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from bench import (
    ceilings,
    decompose,
    hotspots,
    latency_figures,
    memory,
    recovery,
    throughput,
    upload_figures,
)
from bench.procs import LOAD_CPU, REPO, SERVER_CPU, NoopServer
from bench.report import Figure, Series, details, summary_table
from bench.settings import Settings, full, quick

LOCK = Path(tempfile.gettempdir()) / "firehosed-bench.lock"
SECTIONS = ("http", "latency", "upload", "memory", "recovery", "idle")
LIBRARIES = (
    "aiohttp",
    "uvloop",
    "msgspec",
    "structlog",
    "prometheus-client",
    "asyncssh",
    "aiobotocore",
    "botocore",
    "moto",
    "py-spy",
)


def say(message: str) -> None:
    print(f"[bench {datetime.now().strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- sections -----------------------------------------------------------------------------


class Run:
    """One harness run: its settings, figures so far, and the profiles wanted."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.figures: list[Figure] = []
        self.fsync = Series("fdatasync/s")
        self.write = Series("MB/s")
        self.crashed = 0

    def section(self, name: str, body: Callable[[], list[Figure]]) -> None:
        say(f"{name}: start")
        started = time.monotonic()
        try:
            self.figures += body()
        except Exception:
            self.crashed += 1
            error = traceback.format_exc()
            print(error, file=sys.stderr)
            self.figures.append(Figure(title=f"{name} benchmarks", target="—", error=error))
        say(f"{name}: done in {time.monotonic() - started:.0f} s")

    def http(self) -> list[Figure]:
        settings = self.settings
        seconds = str(min(settings.measure, 3))
        for _ in range(settings.reps):
            result, command = ceilings.run_pinned("fsync", str(settings.work), seconds)
            self.fsync.add(result["fsyncs_per_s"])
            result, write_command = ceilings.run_pinned("write", str(settings.work), seconds)
            self.write.add(result["mb_per_s"])
        noop = NoopServer.start()
        try:
            single, single_measured = throughput.single_post(settings, noop, self.fsync)
            batch, batch_measured = throughput.batch_1000(settings, noop)
            curve, fallen = throughput.cost_curve(settings, noop, single_measured, batch_measured)
        finally:
            noop.stop()
        fsync = Figure(
            title="ceiling (d): fdatasync of 900-byte appends in the storage file system",
            target="— (reported)",
            result=self.fsync,
            commands=[command.replace(str(settings.work), "$WORK")],
        )
        write = Figure(
            title="ceiling: sequential 4 MiB appends + fdatasync in the storage file system",
            target="— (reported)",
            result=self.write,
            commands=[write_command.replace(str(settings.work), "$WORK")],
        )
        if single.passed is False:  # a measurement, not a profiler: also in --quick
            say("decomposing: single-signal POST")
            single.profile += decompose.table(settings)
        if settings.profile:
            for figure, scenario in ((single, throughput.SINGLE), (batch, throughput.BATCH_1000)):
                if figure.passed is False:
                    say(f"profiling: {figure.title}")
                    figure.profile += [
                        *([""] if figure.profile else []),
                        *throughput.profile_scenario(scenario, settings, figure.title),
                    ]
            for scenario in fallen:
                say(f"profiling: cost curve, {scenario.label()}")
                curve.profile += [
                    "",
                    *throughput.profile_scenario(scenario, settings, f"Cliff: {scenario.label()}"),
                ]
        return [single, batch, curve, fsync, write]

    def latency(self) -> list[Figure]:
        figures = latency_figures.figures(self.settings)
        if self.settings.profile and any(f.passed is False for f in figures):
            say("profiling: latency")
            figures[0].profile = hotspots.latency(self.settings)
        return figures

    def upload(self) -> list[Figure]:
        return upload_figures.figures(self.settings)

    def memory(self) -> list[Figure]:
        figure = memory.figure(self.settings)
        if self.settings.profile and figure.passed is False:
            say("profiling: catch-up memory")
            figure.profile = hotspots.memory(
                self.settings, min(self.settings.memory_sessions, 200_000)
            )
        return [figure]

    def recovery(self) -> list[Figure]:
        figures = recovery.recovery_figure(self.settings)
        if self.settings.profile and figures[0].passed is False:
            say("profiling: recovery")
            figures[0].profile = hotspots.recovery(self.settings)
        return figures

    def idle(self) -> list[Figure]:
        return [recovery.idle_figure(self.settings)]


# -- the report ---------------------------------------------------------------------------


def machine_facts(settings: Settings) -> list[str]:
    def first_line(argv: list[str]) -> str:
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
        except OSError:
            return "not installed"
        return ((done.stdout or done.stderr).strip().splitlines() or ["?"])[0]

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor() or "?",
    )
    versions = []
    for name in LIBRARIES:
        try:
            versions.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{name} (not installed)")
    commit = first_line(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    dirty = subprocess.run(
        ["git", "-C", str(REPO), "status", "--porcelain", "--", "firehosed"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    ram = next(
        line
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemTotal")
    )
    mount = first_line(
        ["findmnt", "-n", "-o", "SOURCE,FSTYPE,OPTIONS", "-T", str(settings.work.parent)]
    )
    return [
        f"- nproc: {os.cpu_count()}; CPU: {cpu}",
        f"- kernel: {platform.system()} {platform.release()} ({platform.machine()}); "
        f"{ram.split(':')[1].strip()} RAM",
        f"- Python {platform.python_version()} ({sys.executable})",
        f"- {', '.join(versions)}",
        f"- {first_line(['wrk', '-v'])}; {first_line(['ssh', '-V'])}",
        f"- firehosed at commit {commit}"
        + (" with uncommitted changes in firehosed/" if dirty else ""),
        f"- storage and temp files: under {settings.work.parent} ({mount})",
    ]


def source_fingerprint() -> str:
    """A digest of firehosed/'s sources: tells whether the daemon changed during the run."""
    digest = hashlib.sha256()
    for path in sorted((REPO / "firehosed").rglob("*.py")):
        digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def cpu_steal() -> tuple[float, float]:
    """(total, steal) jiffies from /proc/stat."""
    fields = [float(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return sum(fields), fields[7] if len(fields) > 7 else 0.0


def write_report(
    run: Run,
    out: Path,
    *,
    argv: list[str],
    began: datetime,
    seconds: float,
    load: tuple[str, str],
    steal: float,
    sources: tuple[str, str],
) -> None:
    settings = run.settings
    mode = "quick (smoke run: timings are not judged)" if settings.quick else "full"
    changed = (
        [
            f"**Warning: firehosed/ changed during this run (sources {sources[0]} → "
            f"{sources[1]}): figures mix daemon versions; rerun.**",
            "",
        ]
        if sources[0] != sources[1]
        else []
    )
    lines = [
        "# firehosed benchmark results",
        "",
        f"`{' '.join(argv)}` — {mode} run, {began.strftime('%Y-%m-%d %H:%M UTC')}, "
        f"took {seconds / 60:.1f} min, firehosed/ sources {sources[1]}. Written by the "
        "harness; rerun it rather than edit.",
        "",
        *changed,
        "Every figure is the median [min-max] over repeated runs, next to a ceiling "
        "measured in the same run on the same payloads. Ratio: result ÷ ceiling for "
        "rates; ceiling time ÷ result time for durations (1.0 = as fast as the ceiling); "
        "result ÷ budget (or floor) for memory and latency.",
        "",
        "## Summary",
        "",
        *summary_table(run.figures),
        "",
        "## Machine",
        "",
        *machine_facts(settings),
        f"- load average at start / end: {load[0]} / {load[1]}; "
        f"CPU steal during the run: {steal:.1f}%",
        "",
        "## Method",
        "",
        f"- Pinning (taskset, {os.cpu_count()} cores): the daemon, the no-op server, the "
        f"in-process ceilings and the raw upload clients on CPU {SERVER_CPU}; wrk "
        f"(`-t1`), the latency generator + webhook receiver, sshd and moto on CPU "
        f"{LOAD_CPU}. The daemon's worker threads (fsync, batch encoding) share CPU {SERVER_CPU}.",
        "- The daemon is a real `firehosed run` subprocess with a config written to a temp "
        'dir (`durability = "fsync"`, one account, NDJSON firehoses into a local '
        "directory unless said otherwise), fresh for each repetition.",
        "- Payload (`bench/fixtures.py`): a cart-abandon signal of ~845 bytes (identified) "
        'or ~820 (anonymous): ids as `{"$oid"}`, times as `{"$date"}`, a nested cart of '
        "two products; every record of every request has a distinct id (wrk: "
        "`bench/post.lua` fills a template per request); five consecutive records share "
        "a session.",
        f"- Repetitions: {settings.reps} for the headline throughput figures, "
        f"{settings.curve_reps} for the cost curve, {settings.latency_reps} for latency, "
        f"{settings.upload_reps} (+1 warm-up) for uploads, {settings.memory_reps} for "
        f"memory, {settings.recovery_reps} for recovery, {settings.idle_reps} for idle RSS; "
        f"wrk warm-up {settings.warmup:g} s, measured {settings.measure:g} s. Ceiling and "
        "daemon alternate within each repetition.",
        "",
        "## Details",
        *details(run.figures),
        "",
    ]
    out.write_text("\n".join(lines))


def _one_run_at_a_time() -> int:
    """Hold a machine-wide lock (a file descriptor): two runs at once would measure each
    other. The lock dies with the process."""
    fd = os.open(LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
        say(f"another benchmark run holds {LOCK} ({holder}): waiting for it to end")
        fcntl.flock(fd, fcntl.LOCK_EX)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} since {datetime.now().strftime('%H:%M:%S')}\n".encode(), 0)
    return fd


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short smoke run (CI)")
    parser.add_argument("--only", help=f"comma-separated sections: {','.join(SECTIONS)}")
    parser.add_argument("--out", type=Path, help="report file")
    parser.add_argument("--no-profile", action="store_true", help="do not profile misses")
    parser.add_argument("--profile", action="store_true", help="profile misses (also in --quick)")
    parser.add_argument("--keep", action="store_true", help="keep the temp work dir")
    args = parser.parse_args()
    sections = args.only.split(",") if args.only else list(SECTIONS)
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; known: {','.join(SECTIONS)}")
    if shutil.which("wrk") is None:
        parser.error("wrk is not installed (apt-get install wrk; bench/run does it as root)")
    lock = _one_run_at_a_time()
    work = Path(tempfile.mkdtemp(prefix="firehosed-bench-"))
    profile = (args.profile or not args.quick) and not args.no_profile
    settings = quick(work, profile) if args.quick else full(work, profile)
    out = args.out or REPO / "bench" / ("RESULTS-quick.md" if args.quick else "RESULTS.md")
    began, started = datetime.now(UTC), time.monotonic()
    load_start = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    sources_start = source_fingerprint()
    steal_start = cpu_steal()
    run = Run(settings)
    try:
        for name in sections:
            run.section(name, getattr(run, name))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    total, steal = (a - b for a, b in zip(cpu_steal(), steal_start, strict=True))
    load_end = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    argv = ["bench/run", *sys.argv[1:]]
    write_report(
        run,
        out,
        argv=argv,
        began=began,
        seconds=time.monotonic() - started,
        load=(load_start, load_end),
        steal=100 * steal / total if total else 0.0,
        sources=(sources_start, source_fingerprint()),
    )
    say(f"wrote {out} in {(time.monotonic() - started) / 60:.1f} min")
    os.close(lock)
    if sources_start != source_fingerprint():
        say("firehosed/ changed during the run: the figures mix daemon versions")
    if run.crashed:
        say(f"{run.crashed} benchmark section(s) CRASHED: see {out}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
