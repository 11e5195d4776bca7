"""How long and how often each benchmark runs: full (RESULTS.md) or quick (CI smoke)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Settings:
    """Durations in seconds (wrk's are whole seconds); `reps` measured repetitions."""

    quick: bool
    work: Path
    reps: int
    curve_reps: int
    warmup: float
    measure: float
    latency_seconds: float
    latency_warmup: float
    latency_reps: int
    upload_bytes: int
    upload_reps: int
    memory_sessions: int
    memory_reps: int
    recovery_bytes: int
    recovery_reps: int
    idle_reps: int
    profile_seconds: float
    profile: bool


def full(work: Path, profile: bool = True) -> Settings:
    return Settings(
        quick=False,
        work=work,
        reps=5,
        curve_reps=3,
        warmup=3.0,
        measure=10.0,
        latency_seconds=10.0,
        latency_warmup=2.0,
        latency_reps=3,
        upload_bytes=64 << 20,
        upload_reps=3,
        memory_sessions=1_000_000,
        memory_reps=1,  # deterministic workload; 1M sessions take long (see RESULTS)
        recovery_bytes=1 << 30,
        recovery_reps=3,
        idle_reps=3,
        profile_seconds=10.0,
        profile=profile,
    )


def quick(work: Path, profile: bool = False) -> Settings:
    return Settings(
        quick=True,
        work=work,
        reps=1,
        curve_reps=1,
        warmup=1.0,
        measure=2.0,
        latency_seconds=2.0,
        latency_warmup=0.5,
        latency_reps=1,
        upload_bytes=8 << 20,
        upload_reps=1,
        memory_sessions=50_000,
        memory_reps=1,
        recovery_bytes=50 << 20,
        recovery_reps=1,
        idle_reps=1,
        profile_seconds=3.0,
        profile=profile,
    )
