"""`GET /`: the status page, one server-rendered HTML document (no script, no build
step, nothing fetched from elsewhere), readable on a phone, refreshing itself.

Per firehose: channel, state, backlog, oldest queued age, last delivery, last error,
and for a daily archive its open day and last day delivered;
the disk budget and catch-up memory as gauges; accepted and delivered per second over
the last hour as inline SVG. Every string that comes from config, a destination or a
client (names, errors with hosts and paths) is HTML-escaped on its way in.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from html import escape
from typing import TYPE_CHECKING, Any

from aiohttp import web

from firehosed import metrics
from firehosed.admin import view
from firehosed.admin.history import History

if TYPE_CHECKING:
    from firehosed.admin.app import AdminApi

REFRESH = 5  # seconds
CHART_POINTS = 360  # a point per 10 s of the hour
CHART_W, CHART_H = 600, 80

STYLE = """
body{font:15px/1.4 system-ui,sans-serif;margin:0;padding:1em;background:#f6f7f9;color:#222}
h1{font-size:1.3em;margin:0 0 .2em}h2{font-size:1.05em;margin:1.2em 0 .4em}
.muted{color:#666;font-size:.9em}
.grid{display:grid;gap:.8em;grid-template-columns:repeat(auto-fill,minmax(min(100%,22em),1fr))}
.card{background:#fff;border:1px solid #ddd;border-left:6px solid #2a2;border-radius:6px;
padding:.6em .8em}
.card.plain{border-left-color:#bbb}.card.warn{border-left-color:#d90}.card.bad{border-left-color:#c22;background:#fff6f6}
.card h3{margin:0;font-size:1.05em;word-break:break-all}
.state{font-weight:600}.ok .state{color:#161}.warn .state{color:#850}.bad .state{color:#a11}
dl{display:grid;grid-template-columns:auto 1fr;gap:.1em .8em;margin:.4em 0 0}
dt{color:#666}dd{margin:0;word-break:break-word}
.error{color:#a11;font-family:ui-monospace,monospace;font-size:.85em;white-space:pre-wrap;
word-break:break-word;margin:.4em 0 0}
.gauge{background:#e4e6ea;border-radius:4px;height:.8em;overflow:hidden}
.gauge>div{background:#37c;height:100%}.gauge.high>div{background:#c22}
svg{width:100%;height:auto;background:#fff;border:1px solid #ddd;border-radius:6px}
"""


class Page:
    """The rendered page, rendered again at most once a second (what it shows changes by
    the second): a thousand requests a second cost the event loop, which also serves
    ingest, one render (about a millisecond), not a thousand."""

    def __init__(self, status: Callable[[], dict[str, Any]], history: History) -> None:
        self._status = status
        self._history = history
        self._body = b""
        self._rendered = -1.0  # time.monotonic() of the last render

    def body(self) -> bytes:
        now = time.monotonic()
        if now - self._rendered >= 1.0 or self._rendered < 0:
            self._body = render(self._status(), self._history, time.time()).encode()
            self._rendered = now
        return self._body


async def get_page(api: AdminApi, request: web.BaseRequest, name: str) -> web.Response:
    """The status page."""
    metrics.requests_with(200).inc()
    return web.Response(
        body=api.page.body(),
        content_type="text/html",
        charset="utf-8",
        headers={"Cache-Control": "no-store", "X-Frame-Options": "DENY"},
    )


def _cluster(cluster: dict[str, Any] | None) -> str:
    """With the JetStream backend: the deployment's processes and who owns what."""
    if cluster is None:
        return ""
    me = cluster["process"]
    owned: dict[str, list[str]] = {member: [] for member in cluster["members"]}
    for partition, owner in sorted(cluster["partitions"].items(), key=lambda p: int(p[0])):
        owned.setdefault(owner, []).append(f"partition {partition}")
    for firehose, owner in sorted(cluster["cutters"].items()):
        owned.setdefault(owner, []).append(f"cuts {firehose}")
    rows = "".join(
        f"<tr><td>{escape(member)}{' (this process)' if member == me else ''}</td>"
        f"<td>{escape(', '.join(work) or '-')}</td></tr>"
        for member, work in sorted(owned.items())
    )
    state = "connected" if cluster["connected"] else "NOT connected"
    return (
        f'<h2>Cluster</h2><p class="muted" id="cluster">{len(cluster["members"])} processes,'
        f" this one {state}</p><table><tr><th>process</th><th>owns</th></tr>{rows}</table>"
    )


def render(status: dict[str, Any], history: History, now: float) -> str:
    """The whole page for a `/v1/status` document."""
    firehoses = status["firehoses"]
    failing = sum(1 for f in firehoses.values() if view.state(f, now)[1] is view.Level.BAD)
    accepting = "accepting signals" if status["accepting"] else "NOT accepting signals"
    summary = f"{len(firehoses)} firehoses, {failing} failing, {accepting}"
    cards = "".join(_card(n, f, now) for n, f in firehoses.items()) or "<p>No firehoses.</p>"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width,initial-scale=1">
<meta http-equiv="refresh" content="{REFRESH}">
<link rel="icon" href="data:,">
<title>firehosed{" - " + str(failing) + " failing" if failing else ""}</title>
<style>{STYLE}</style></head>
<body>
<h1>firehosed</h1>
<p class="muted" id="summary">{escape(summary)} · {escape(view.clock_epoch(now))} UTC</p>
{_cluster(status.get("cluster"))}
<h2>Firehoses</h2>
<div class="grid">{cards}</div>
<h2>Resources</h2>
<div class="grid">
{_gauge("Disk budget (max_disk)", "disk", _budget_used(firehoses), status["storage_max_bytes"])}
{_gauge("Catch-up memory", "catchup", status["catch_up_bytes"], status["catch_up_max_bytes"])}
</div>
<h2>Last hour</h2>
<div class="grid">
{_chart("Accepted signals / s", "accepted", history.accepted.values())}
{_chart("Delivered records / s", "delivered", history.delivered.values())}
</div>
</body></html>
"""


def _budget_used(firehoses: dict[str, Any]) -> int:
    """What counts against max_disk: queued records plus dead letters and quarantine."""
    return sum(f["queued_bytes"] + f["dead_letter_bytes"] for f in firehoses.values())


def _card(name: str, firehose: dict[str, Any], now: float) -> str:
    state, level = view.state(firehose, now)
    queued = firehose["queued_records"]
    rows = [
        ("channel", escape(firehose["channel"])),
        ("queued", f"{queued} records, {escape(view.size(firehose['queued_bytes']))}"),
        ("oldest", escape(view.age(firehose["oldest_queued_age_seconds"]) if queued else "-")),
        ("last delivery", escape(view.ago(firehose["last_delivery"], now))),
    ]
    if firehose["dead_letter_bytes"]:
        rows.append(("dead letters", escape(view.size(firehose["dead_letter_bytes"]))))
    if (days := view.archive(firehose)) is not None:
        rows.append(("archive", escape(days)))
    details = "".join(f"<dt>{k}</dt><dd class='{k.replace(' ', '-')}'>{v}</dd>" for k, v in rows)
    error = firehose["last_error"]
    error_html = (
        f'<p class="error" title="{escape(error["time"])}">'
        f"{escape(view.ago(error, now))}: {escape(error['error'])}</p>"
        if error
        else ""
    )
    return (
        f'<section class="card {level.value}" data-firehose="{escape(name)}">'
        f"<h3>{escape(name)}</h3>"
        f'<div class="state">{escape(state)}</div>'
        f"<dl>{details}</dl>{error_html}</section>"
    )


def _gauge(label: str, key: str, used: int, limit: int) -> str:
    share = min(1.0, used / limit) if limit else 0.0
    high = " high" if share >= 0.9 else ""
    return (
        f'<div class="card plain" id="gauge-{key}"><h3>{escape(label)}</h3>'
        f'<p class="muted">{escape(view.size(used))} of {escape(view.size(limit))} '
        f"({share:.1%})</p>"
        f'<div class="gauge{high}" role="meter" aria-valuenow="{used}" aria-valuemin="0" '
        f'aria-valuemax="{limit}" aria-label="{escape(label)}">'
        f'<div style="width:{share * 100:.2f}%"></div></div></div>'
    )


def _chart(label: str, key: str, values: list[float]) -> str:
    """An SVG line of `values` (one per second), averaged down to CHART_POINTS points."""
    step = max(1, len(values) // CHART_POINTS)
    points = [sum(values[i : i + step]) / step for i in range(0, len(values), step)]
    top = max(points, default=0.0) or 1.0
    dx = CHART_W / max(1, len(points) - 1)
    line = " ".join(
        f"{i * dx:.1f},{CHART_H - 2 - v / top * (CHART_H - 4):.1f}" for i, v in enumerate(points)
    )
    latest = sum(values[-10:]) / 10 if values else 0.0
    return (
        f'<div class="card plain" id="chart-{key}"><h3>{escape(label)}</h3>'
        f'<p class="muted">now {latest:.1f}/s · peak {max(values, default=0):.0f}/s</p>'
        f'<svg viewBox="0 0 {CHART_W} {CHART_H}" role="img" aria-label="{escape(label)}">'
        f'<polyline fill="none" stroke="#37c" stroke-width="1.5" points="{line}"/></svg></div>'
    )
