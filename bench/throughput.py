"""HTTP ingest throughput: single-signal POST, NDJSON batches, and the cost curve.

Every repetition measures the ceiling and the daemon back to back (their order
alternating between repetitions), each with the same wrk, template, connections and
pinning, so a noisy neighbour hits both. The daemon is a fresh `firehosed run` per
repetition (fresh storage dir, durability fsync); it gets a warm-up wrk run, then the
measured one. Its accepted-signal counter must cover every request wrk counted, and no
request may fail or answer other than 2xx.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench import ceilings, fixtures, profile, wrk
from bench.procs import Daemon, NoopServer, cpu_times, firehose_toml, write_bytes
from bench.report import Figure, Series, ratios
from bench.settings import Settings

NDJSON = "application/x-ndjson"
JSON = "application/json"


@dataclass(frozen=True)
class Scenario:
    """One load shape: signals per request, firehoses per account, anonymous share."""

    key: str
    batch: int
    firehoses: int = 1
    anonymous: float = 0.0
    catch_up: bool = False
    # A dedupe window shorter than the warm-up: the measured run sees it expiring.
    dedupe_window: float | None = None

    @property
    def connections(self) -> int:
        return {1: 64, 10: 64, 100: 32}.get(self.batch, 16)

    @property
    def content_type(self) -> str:
        return JSON if self.batch == 1 else NDJSON

    def label(self) -> str:
        anon = f", {self.anonymous:.0%} anonymous, catch_up on" if self.anonymous else ""
        hoses = "firehose" if self.firehoses == 1 else "firehoses"
        dedupe = ", dedupe window full and expiring" if self.dedupe_window else ""
        return f"batch {self.batch}, {self.firehoses} {hoses}{anon}{dedupe}"

    def account_keys(self, settings: Settings) -> dict[str, float]:
        if self.dedupe_window is None:
            return {}
        return {"dedupe_window": round(settings.warmup * self.dedupe_window, 3)}

    def tables(self) -> str:
        """Firehose tables: NDJSON files into a local directory, cut every 5 minutes (the
        default) or at max_file (64MiB), so file delivery runs inside the window too."""
        return "".join(
            firehose_toml(f"f{i + 1}", format="ndjson", catch_up=self.catch_up)
            for i in range(self.firehoses)
        )


SINGLE = Scenario("single", 1)
BATCH_1000 = Scenario("batch1000", 1000)
CURVE = [
    Scenario("batch10", 10),
    Scenario("batch100", 100),
    Scenario("fh4", 100, firehoses=4),
    Scenario("fh16", 100, firehoses=16),
    Scenario("anon30", 100, anonymous=0.3, catch_up=True),
    Scenario("dedupe", 100, dedupe_window=0.9),
]


@dataclass
class Measured:
    """Signals/s of the daemon and of the no-op server for one scenario, paired by rep."""

    daemon: Series = field(default_factory=lambda: Series("signals/s"))
    noop: Series = field(default_factory=lambda: Series("signals/s"))
    fsync_groups: Series = field(default_factory=lambda: Series("fsync rounds/s"))
    disk: Series = field(default_factory=lambda: Series("MB/s"))
    cpu_user: Series = field(default_factory=lambda: Series("% of a core"))
    cpu_system: Series = field(default_factory=lambda: Series("% of a core"))
    commands: list[str] = field(default_factory=list)


def template_for(scenario: Scenario, work: Path) -> Path:
    path = work / f"template-{scenario.batch}-{scenario.anonymous:g}.txt"
    if not path.exists():
        path.write_text(fixtures.template_text(scenario.batch, scenario.anonymous))
    return path


def measure(scenario: Scenario, settings: Settings, reps: int, noop: NoopServer) -> Measured:
    """`reps` paired repetitions of no-op server and daemon under the same wrk load."""
    measured = Measured()
    template = template_for(scenario, settings.work)
    for rep in range(reps):
        steps = [_noop_step, _daemon_step] if rep % 2 == 0 else [_daemon_step, _noop_step]
        for step in steps:
            step(scenario, settings, template=template, noop=noop, out=measured, rep=rep)
    return measured


def load(url: str, scenario: Scenario, template: Path, seconds: float) -> wrk.WrkResult:
    """One wrk run of `scenario`'s requests against `url`, fresh ids."""
    return wrk.run(
        url,
        template,
        seconds=seconds,
        connections=scenario.connections,
        content_type=scenario.content_type,
        prefix=fixtures.new_prefix(),
    )


def _noop_step(
    scenario: Scenario,
    settings: Settings,
    *,
    template: Path,
    noop: NoopServer,
    out: Measured,
    rep: int,
) -> None:
    load(noop.signals_url, scenario, template, settings.warmup)
    result = load(noop.signals_url, scenario, template, settings.measure)
    out.noop.add(result.rate * scenario.batch)
    out.commands.append(result.command.replace(str(noop.port), "NOOP_PORT"))


def _daemon_step(
    scenario: Scenario,
    settings: Settings,
    *,
    template: Path,
    noop: NoopServer,
    out: Measured,
    rep: int,
) -> None:
    root = settings.work / f"{scenario.key}-{rep}"
    daemon = Daemon(root, scenario.tables(), account_keys=scenario.account_keys(settings)).start()
    try:
        load(daemon.signals_url, scenario, template, settings.warmup)
        before, written, cpu = daemon.metrics(), write_bytes(daemon.pid), cpu_times(daemon.pid)
        result = load(daemon.signals_url, scenario, template, settings.measure)
        after, written = daemon.metrics(), write_bytes(daemon.pid) - written
        user, system = (b - a for a, b in zip(cpu, cpu_times(daemon.pid), strict=True))
        out.disk.add(written / result.seconds / 1e6)
        out.cpu_user.add(100 * user / result.seconds)
        out.cpu_system.add(100 * system / result.seconds)
        _check_accepted(before, after, result.requests * scenario.batch)
        rounds = after["firehosed_fsync_seconds_count"] - before["firehosed_fsync_seconds_count"]
        out.daemon.add(result.rate * scenario.batch)
        out.fsync_groups.add(rounds / result.seconds)
        out.commands.append(result.command.replace(str(daemon.port), "DAEMON_PORT"))
        out.commands.append(" ".join(daemon.argv).replace(str(root), "$WORK"))
        daemon.check_no_errors()
    finally:
        daemon.stop()
        shutil.rmtree(root, ignore_errors=True)


def _check_accepted(before: dict[str, float], after: dict[str, float], expected: int) -> None:
    """Every signal wrk saw answered 202 must be counted accepted (and hence durable)."""
    key = 'firehosed_signals_accepted_total{account="bench"}'
    accepted = after.get(key, 0.0) - before.get(key, 0.0)
    if accepted < expected:
        raise RuntimeError(f"daemon accepted {accepted:.0f} signals, wrk saw {expected} 202s")


def profile_scenario(scenario: Scenario, settings: Settings, heading: str) -> list[str]:
    """py-spy the daemon under the scenario's wrk load (a separate, unmeasured run)."""
    if not profile.available():
        return [f"{heading}: py-spy not installed, no profile."]
    template = template_for(scenario, settings.work)
    root = settings.work / f"profile-{scenario.key}"
    daemon = Daemon(root, scenario.tables(), account_keys=scenario.account_keys(settings)).start()
    raw = settings.work / f"profile-{scenario.key}.txt"
    try:
        load(daemon.signals_url, scenario, template, settings.warmup)
        spy = profile.record(daemon.pid, settings.profile_seconds, raw)
        time.sleep(0.3)  # let py-spy attach before the load starts
        load(daemon.signals_url, scenario, template, settings.profile_seconds + 1.0)
        _, errors = spy.communicate(timeout=60)
        if spy.returncode != 0 or not raw.exists():
            return [f"{heading}: py-spy failed: {errors.decode(errors='replace')[-500:]}"]
        return profile.summarize(raw, heading)
    finally:
        daemon.stop()
        shutil.rmtree(root, ignore_errors=True)


# -- figures ------------------------------------------------------------------------------


def single_post(settings: Settings, noop: NoopServer, fsync: Series) -> tuple[Figure, Measured]:
    measured = measure(SINGLE, settings, settings.reps, noop)
    routed = noop_variant(SINGLE, settings, settings.reps, app=True)
    figure = Figure(
        title="single-signal POST, durable 202 (fsync), 1 firehose",
        target="≥ 0.8 x no-op handler",
        result=measured.daemon,
        ceiling=measured.noop,
        ceiling_label="no-op aiohttp+uvloop handler (low-level web.Server, as the daemon)",
        ratio=ratios(measured.daemon, measured.noop),
        commands=measured.commands,
    )
    figure.passed = figure.ratio is not None and figure.ratio.median >= 0.8
    figure.notes += [
        f"wrk -t1 -c{SINGLE.connections}, one ~845-byte cart-abandon JSON object per request, "
        "fresh ids per request; warm-up then measured run; daemon fresh per repetition.",
        f"Group commit: {measured.fsync_groups.text()} (fdatasync rounds of the committer) vs "
        f"the storage dir's raw fdatasync ceiling of {fsync.text()}; "
        f"≈ {_per_round(measured):.1f} requests per fsync round.",
        _cpu_note(measured),
        f"The same no-op handler behind an aiohttp Application and its router (the usual "
        f"way, and this figure's ceiling until the daemon moved to the low-level server): "
        f"{routed.text()}; the daemon is {measured.daemon.median / routed.median:.2f} x that.",
    ]
    return figure, measured


def _cpu_note(measured: Measured) -> str:
    user, system = measured.cpu_user.median, measured.cpu_system.median
    per = (user + system) / 100 / measured.daemon.median * 1e6
    return (
        f"Daemon process CPU during the measured run (all threads): {user:.0f}% user + "
        f"{system:.0f}% system of one core, ≈ {per:.1f} µs of CPU per signal."
    )


def _per_round(measured: Measured) -> float:
    rounds = measured.fsync_groups.median
    return measured.daemon.median / rounds if rounds else 0.0


def batch_1000(settings: Settings, noop: NoopServer) -> tuple[Figure, Measured]:
    measured = measure(BATCH_1000, settings, settings.reps, noop)
    decode = Series("records/s")
    template = template_for(BATCH_1000, settings.work)
    commands = []
    for _ in range(settings.reps):
        result, command = ceilings.run_pinned("decode", str(template), str(settings.measure))
        decode.add(result["records_per_s"])
        commands.append(command.replace(str(settings.work), "$WORK"))
    durable = durable_noop(BATCH_1000, settings, settings.reps)
    figure = Figure(
        title="NDJSON batch of 1000, durable 202",
        target="≥ 0.9 x full-Struct decode",
        result=measured.daemon,
        ceiling=decode,
        ceiling_label="msgspec full-Struct decode_lines, in-process",
        ratio=ratios(measured.daemon, decode),
        commands=measured.commands + commands,
    )
    figure.passed = figure.ratio is not None and figure.ratio.median >= 0.9
    figure.notes += [
        f"wrk -t1 -c{BATCH_1000.connections}, 1000 records (~838 KB NDJSON) per request, "
        "fresh ids per request.",
        f"The no-op HTTP server (reads, decodes all 1000 into Structs, 202) does "
        f"{measured.noop.text()} on the same load: the HTTP ceiling is "
        f"{measured.noop.median / decode.median:.2f} x the decode ceiling.",
        f"The same no-op server, durable (`--journal`: each body appended to a file and "
        f"group-committed with fdatasync before the 202) does {durable.text()}: "
        f"{durable.median / decode.median:.2f} x the decode ceiling: what an aiohttp "
        f"handler reaches here once it writes each body to disk before answering.",
        _cpu_note(measured),
    ]
    return figure, measured


def durable_noop(scenario: Scenario, settings: Settings, reps: int) -> Series:
    """signals/s of the no-op server that fdatasyncs each body before its 202."""
    return noop_variant(scenario, settings, reps, journal=settings.work / "journal")


def noop_variant(
    scenario: Scenario,
    settings: Settings,
    reps: int,
    *,
    journal: Path | None = None,
    app: bool = False,
) -> Series:
    """signals/s of a variant of the no-op server (`NoopServer.start`'s options); the
    journal, if any, is removed after each repetition (NDJSON bodies fill gigabytes)."""
    rates = Series("signals/s")
    template = template_for(scenario, settings.work)
    for _ in range(reps):
        noop = NoopServer.start(journal=journal, app=app)
        try:
            load(noop.signals_url, scenario, template, settings.warmup)
            result = load(noop.signals_url, scenario, template, settings.measure)
            rates.add(result.rate * scenario.batch)
        finally:
            noop.stop()
            if journal is not None:
                journal.unlink(missing_ok=True)
    return rates


def cost_curve(
    settings: Settings, noop: NoopServer, single: Measured, batch: Measured
) -> tuple[Figure, list[Scenario]]:
    """The curve's table, and the scenarios that fell off a cliff (to profile)."""
    rows: list[tuple[Scenario, Measured]] = [(SINGLE, single)]
    measured: dict[str, Measured] = {}
    failures: list[str] = []
    for scenario in CURVE:
        try:
            measured[scenario.key] = measure(scenario, settings, settings.curve_reps, noop)
        except RuntimeError as exc:
            # A row that breaks under load is a finding (a cliff), not a harness crash.
            measured[scenario.key] = Measured()
            failures.append(f"{scenario.label()}: FAILED under load: {str(exc)[:600]}")
    rows += [(CURVE[0], measured["batch10"]), (CURVE[1], measured["batch100"])]
    rows += [(BATCH_1000, batch)]
    rows += [(s, measured[s.key]) for s in CURVE[2:]]
    table = [
        "| load | daemon signals/s | no-op signals/s | daemon / no-op | queue appends/s "
        "| daemon disk writes |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for scenario, m in rows:
        if not m.daemon.values:
            table.append(f"| {scenario.label()} | failed (see below) | | | | |")
            continue
        ratio = ratios(m.daemon, m.noop)
        table.append(
            f"| {scenario.label()} | {m.daemon.text()} | {m.noop.text()} | {ratio.text(2)} "
            f"| {m.daemon.median * scenario.firehoses:,.0f} | {m.disk.text()} |"
        )
    cliffs = failures + _cliffs([m for _, m in rows[:4]], [s for s, _ in rows[:4]])
    cliffs += _cliffs([measured["batch100"], measured["fh4"], measured["fh16"]], CURVE[1:4])
    base = measured["batch100"].daemon.median if measured["batch100"].daemon.values else 0.0
    for key in ("anon30", "dedupe"):
        if not measured[key].daemon.values:
            continue
        other = measured[key].daemon.median
        if other < 0.5 * base:
            cliffs.append(f"{_by_key(key).label()}: {other:,.0f} vs {base:,.0f} signals/s")
    figure = Figure(
        title="cost curve: signals/s vs batch size, firehoses, anonymous share",
        target=(
            "table; no cliff (no step < 0.5 x the previous; across firehose counts, in "
            "queue appends/s)"
        ),
        passed=not cliffs,
        tables=table,
        commands=[c for m in measured.values() for c in m.commands],
    )
    figure.notes += [
        "Batch sizes at 1 firehose; firehoses and anonymous share at batch 100 "
        "(rows for batch 1 and 1000 are the two figures above).",
        "4/16 firehoses: every signal is appended to every firehose's queue (same account, "
        "no `types` filter); queue appends/s = signals/s x firehoses. Each firehose stores, "
        "encodes and delivers its own copy, so the work per signal grows with the number "
        "of firehoses: a cliff along that axis is a step where queue appends/s (the work "
        "done) fall below 0.5 x the previous. Daemon disk writes = "
        "the daemon process's /proc/PID/io write_bytes over the measured run (queue "
        "segments, and batch files once a queue reaches max_file, 64 MiB); compare with "
        "the storage write ceiling below.",
        "30% anonymous: catch_up on, anonymous signals in their own sessions (buffered in "
        "the rings, never identified later).",
        f"Dedupe expiring: the account's `dedupe_window` is {0.9 * settings.warmup:g} s, "
        "shorter than the warm-up, so during the measured run every accepted id also "
        "expires an old one (the steady state of any daemon running longer than its "
        "window, 10 min by default).",
        *(f"cliff: {c}" for c in cliffs),
    ]
    fallen = [
        scenario
        for scenario in CURVE[2:]
        if not measured[scenario.key].daemon.values
        or measured[scenario.key].daemon.median * scenario.firehoses < 0.5 * base
    ]
    return figure, fallen


def _by_key(key: str) -> Scenario:
    return next(s for s in CURVE if s.key == key)


def _cliffs(series: list[Measured], scenarios: list[Scenario]) -> list[str]:
    found = []
    for (prev, a), (cur, b) in zip(
        zip(scenarios, series, strict=True),
        zip(scenarios[1:], series[1:], strict=True),
        strict=False,
    ):
        if not (a.daemon.values and b.daemon.values):
            continue
        # Work done: each firehose stores and delivers its own copy of every signal.
        before, after = a.daemon.median * prev.firehoses, b.daemon.median * cur.firehoses
        if after < 0.5 * before:
            unit = "queue appends/s" if cur.firehoses != prev.firehoses else "signals/s"
            found.append(f"{prev.label()} → {cur.label()}: {before:,.0f} → {after:,.0f} {unit}")
    return found
