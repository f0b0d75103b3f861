"""HTML of the status pages: pure functions from plain data to text.

Every value that did not come from this file passes through :func:`e` (``html.escape``):
study UIDs, AE titles, failure messages and configuration values are all peer- or
operator-supplied. The pages carry no script at all (the server's Content-Security-Policy
forbids it), so a value that escaped escaping still could not run.
"""

from __future__ import annotations

import html
import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from ms_forecast_node import __version__
from ms_forecast_node.status.echoes import EchoResult
from ms_forecast_node.status.queries import Overview, StudyResult

DISCLAIMER = "RESEARCH FORECAST — NOT FOR DIAGNOSTIC USE"

_CSS = """
body { font-family: "DejaVu Sans", "Liberation Sans", Arial, sans-serif; margin: 0;
       color: #111; background: #fafafa; font-size: 14px; }
.banner { background: #111; color: #fff; font-weight: bold; text-align: center;
          padding: 8px; letter-spacing: 0.05em; }
nav { padding: 8px 16px; border-bottom: 1px solid #ccc; background: #fff; }
nav a { margin-right: 12px; }
main { padding: 8px 16px; }
h1 { font-size: 20px; } h2 { font-size: 16px; margin-top: 24px; }
table { border-collapse: collapse; margin: 6px 0; background: #fff; }
th, td { border: 1px solid #ccc; padding: 3px 6px; text-align: left; vertical-align: top; }
th { background: #eee; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.uid { font-family: "DejaVu Sans Mono", monospace; font-size: 12px; }
.failed, .bad { color: #a00; font-weight: bold; } .ok { color: #060; font-weight: bold; }
.muted { color: #666; }
.swatch { display: inline-block; width: 12px; height: 12px; border: 1px solid #333;
          margin-right: 4px; vertical-align: middle; }
img.montage { max-width: 100%; width: 1000px; border: 1px solid #999; }
.therapies { display: flex; flex-wrap: wrap; gap: 10px; }
figure.therapy { margin: 0; background: #fff; border: 1px solid #ccc; padding: 6px; }
figure.therapy figcaption { margin-bottom: 4px; }
.keys { display: flex; gap: 4px; }
.keys img { width: 190px; display: block; }
pre { background: #fff; border: 1px solid #ccc; padding: 8px; overflow-x: auto; }
footer { padding: 8px 16px; color: #555; border-top: 1px solid #ccc; }
"""


def e(value: object) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def when(epoch: object) -> str:
    if not isinstance(epoch, (int, float)):
        return ""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(epoch)))


def duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(int(round(seconds)), 60)
    return f"{minutes} min {rest:02d} s"


def study_href(study_uid: object, suffix: str = "") -> str:
    return "/study/" + quote(str(study_uid), safe=".") + suffix


def layout(title: str, body: str) -> str:
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{e(title)} — ms-forecast-node</title><style>{_CSS}</style></head><body>"
        f'<div class="banner">{e(DISCLAIMER)}</div>'
        f"<nav><strong>ms-forecast-node {e(__version__)}</strong> "
        '<a href="/">Overview</a><a href="/config">Configuration</a>'
        '<a href="/metrics">Metrics</a></nav>'
        f"<main><h1>{e(title)}</h1>{body}</main>"
        f"<footer>{e(DISCLAIMER)} · page generated {e(when(time.time()))}</footer>"
        "</body></html>\n"
    )


def table(headers: Iterable[str], rows: Iterable[Iterable[str]], empty: str = "none") -> str:
    """``rows`` hold ready HTML cells (already escaped by the caller)."""
    body = "".join("<tr>" + "".join(row) + "</tr>" for row in rows)
    if not body:
        return f'<p class="muted">{e(empty)}</p>'
    head = "".join(f"<th>{e(h)}</th>" for h in headers)
    return f"<table><tr>{head}</tr>{body}</table>"


def td(value: object, cls: str = "") -> str:
    return f'<td class="{cls}">{e(value)}</td>' if cls else f"<td>{e(value)}</td>"


def counts(values: Mapping[str, int]) -> str:
    return ", ".join(f"{e(k)} {int(v)}" for k, v in sorted(values.items())) or "none"


def stages(values: Mapping[str, float]) -> str:
    return " · ".join(f"{e(k.removesuffix('_s'))} {e(duration(v))}" for k, v in values.items())


@dataclass(frozen=True)
class DestinationRow:
    name: str
    ae_title: str
    host: str
    port: int
    tls: bool
    last_echo: EchoResult | None


def _destinations(rows: list[DestinationRow], outbox: Mapping[str, Mapping[str, int]]) -> str:
    cells = []
    for d in rows:
        echo = d.last_echo
        if echo is None:
            echo_html = '<td class="muted">not tested since start</td>'
        else:
            cls = "ok" if echo.ok else "bad"
            echo_html = (
                f'<td><span class="{cls}">{"OK" if echo.ok else "FAILED"}</span> '
                f'{e(echo.message)} <span class="muted">({e(when(echo.at))}, '
                f"{e(duration(echo.seconds))})</span></td>"
            )
        button = (
            f'<td><form method="post" action="/echo/{e(quote(d.name, safe=""))}">'
            '<button type="submit">C-ECHO</button></form></td>'
        )
        cells.append(
            [
                td(d.name),
                td(f"{d.ae_title}@{d.host}:{d.port}"),
                td("yes" if d.tls else "no"),
                td(counts(outbox.get(d.name, {}))),
                echo_html,
                button,
            ]
        )
    headers = ["name", "AE@host:port", "TLS", "outbox", "last C-ECHO", ""]
    return table(headers, cells, "no destinations configured")


def _job_rows(jobs: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for j in jobs:
        state = str(j["state"])
        rows.append(
            [
                td(j["id"], "num"),
                f'<td class="uid"><a href="{e(study_href(j["study_uid"]))}">'
                f"{e(j['study_uid'])}</a></td>",
                td(j["version"], "num"),
                td(state, "failed" if state == "failed" else ""),
                td(j["runs"], "num"),
                td(when(j["updated_at"])),
                f"<td>{stages(j['stages'])}</td>",
                td(f"[{j['reason']}] {j['message'] or ''}" if j["reason"] else ""),
            ]
        )
    return rows


def overview_page(
    data: Overview,
    destinations: list[DestinationRow],
    refusals: Mapping[str, int],
    failures_since_start: Mapping[str, int],
) -> str:
    """``refusals`` and ``failures_since_start``: counts by reason from the metrics (memory
    only: refusals have no database row, the audit log holds each one)."""
    studies = [
        [
            f'<td class="uid"><a href="{e(study_href(s["study_uid"]))}">{e(s["study_uid"])}</a>'
            "</td>",
            td(s["calling_ae"]),
            td(s["n_instances"], "num"),
            td(s["latest_version"], "num"),
            td("receiving" if s["dirty"] else ""),
            td(when(s["last_received_at"])),
        ]
        for s in data.studies
    ]
    failures = [
        [
            td(j["id"], "num"),
            f'<td class="uid"><a href="{e(study_href(j["study_uid"]))}">'
            f"{e(j['study_uid'])}</a></td>",
            td(j["reason"], "failed"),
            td(j["message"]),
            td(when(j["updated_at"])),
        ]
        for j in data.failures
    ]
    dead = [
        [
            td(d["id"], "num"),
            td(d["job_id"], "num"),
            f'<td class="uid">{e(d["sop_instance_uid"])}</td>',
            td(d["destination"]),
            td(d["attempts"], "num"),
            td(d["last_error"]),
        ]
        for d in data.dead_letters
    ]
    body = (
        f"<p>Studies {data.n_studies} · jobs: {counts(data.job_counts)} · "
        f"outbox: {counts(data.outbox_counts)}</p>"
        '<h2 id="destinations">Destinations</h2>'
        + _destinations(destinations, data.outbox_by_destination)
        + f"<h2>Studies (latest {len(data.studies)} of {data.n_studies})</h2>"
        + table(
            ["study", "from", "instances", "version", "", "last received"],
            studies,
            "no study received yet",
        )
        + "<h2>Jobs</h2>"
        + table(
            ["job", "study", "version", "state", "runs", "updated", "stage timings", "reason"],
            _job_rows(data.jobs),
            "no jobs yet",
        )
        + f"<h2>Failures</h2><p>Failed jobs by reason: {counts(data.failure_reasons)}</p>"
        + f"<p>Since the node started — failures by reason: {counts(failures_since_start)}; "
        f"refused C-STORE requests by reason: {counts(refusals)} (details in audit.jsonl)</p>"
        + table(["job", "study", "reason", "message", "when"], failures, "no failed jobs")
        + "<h2>Outbox dead letters</h2>"
        + table(
            ["row", "job", "SOP instance", "destination", "attempts", "last error"],
            dead,
            "no dead letters",
        )
    )
    return layout("Status", body)


def config_page(redacted: Mapping[str, Any]) -> str:
    import yaml

    # YAML, as in the configuration file and `ms-forecast-node config check`.
    text = yaml.safe_dump(dict(redacted), sort_keys=False, allow_unicode=True)
    body = (
        "<p>The effective configuration (file, environment overrides and defaults), "
        "secrets masked — the same as <code>ms-forecast-node config check</code> prints.</p>"
        f"<pre>{e(text)}</pre>"
    )
    return layout("Configuration", body)


@dataclass(frozen=True)
class TherapyLook:
    """How a therapy is shown: label and colour from the output templates."""

    label: str
    rgb: tuple[int, int, int] | None


def _swatch(look: TherapyLook | None) -> str:
    if look is None or look.rgb is None:
        return ""
    r, g, b = look.rgb
    return f'<span class="swatch" style="background: rgb({r}, {g}, {b})"></span>'


def _comparison(ranked: list[dict[str, Any]], looks: Mapping[str, TherapyLook]) -> str:
    rows = []
    for t in ranked:
        code = str(t.get("therapy", ""))
        look = looks.get(code)
        interval = list(t.get("count_interval_90") or [])
        lo, hi = (interval[0], interval[1]) if len(interval) == 2 else ("?", "?")
        rows.append(
            [
                td(t.get("rank"), "num"),
                f"<td>{_swatch(look)}{e(look.label if look else code)} "
                f'<span class="muted">({e(code)})</span></td>',
                td(f"{float(t.get('expected_net2_count', 0.0)):.2f}", "num"),
                td(f"{lo}–{hi}", "num"),
                td(t.get("count_median"), "num"),
                td(f"{100 * float(t.get('probability_of_activity', 0.0)):.0f}%", "num"),
                td(f"{float(t.get('volume_mm3_mean', 0.0)):.0f}", "num"),
                td(t.get("forecast_mask_lesions_native"), "num"),
            ]
        )
    headers = [
        "rank",
        "therapy",
        "expected NET2 count",
        "90% interval",
        "median",
        "P(activity)",
        "mean volume (mm³)",
        "lesions in SEG",
    ]
    return table(headers, rows, "no therapy in the summary")


def study_page(
    result: StudyResult,
    looks: Mapping[str, TherapyLook],
    key_images: Mapping[str, int],
) -> str:
    """``key_images``: how many key images each therapy has on disk (0 or absent: none)."""
    uid = str(result.study["study_uid"])
    job, summary = result.job, result.summary
    versions = " · ".join(
        f'<a href="{e(study_href(uid, "?version=" + str(int(j["version"]))))}">'
        f"v{int(j['version'])}</a> {e(j['state'])}"
        for j in result.jobs
    )
    body = (
        f'<p class="uid">Study {e(uid)}</p>'
        f"<p>From {e(result.study['calling_ae'])} · {e(result.study['n_instances'])} instances "
        f"· last received {e(when(result.study['last_received_at']))} · versions: "
        f"{versions or 'none yet'}</p>"
    )
    if job is None or summary is None:
        state = f"job state {job['state']}" if job else "no job yet"
        reason = f" [{job['reason']}] {job['message'] or ''}" if job and job["reason"] else ""
        body += f'<p class="muted">No forecast to show ({e(state)}{e(reason)}).</p>'
        return layout("Result", body)
    version = int(job["version"])
    model = summary.get("model") or {}
    sampler = summary.get("sampler") or {}
    query = f"?version={version}"
    body += (
        f"<p>Version {version}: job {e(job['id'])} {e(job['state'])} · model "
        f"{e(model.get('name'))} {e(model.get('version'))} · horizon "
        f"{e(summary.get('horizon_weeks'))} weeks · sampler {e(json.dumps(sampler))}</p>"
        f"<p>Stage timings: {stages(job['stages'])}</p>"
        "<h2>Comparison of therapies (ranked by expected NET2 count)</h2>"
        + _comparison(list(summary.get("therapies_ranked") or []), looks)
        + "<h2>Reference slice, every therapy</h2>"
        f'<img class="montage" id="montage" src="{e(study_href(uid, "/montage.png" + query))}" '
        'alt="forecast overlays of every therapy on one reference slice">'
        "<h2>Key slices per therapy</h2>"
        '<p class="muted">Each therapy\'s forecast lesions (its colour) on the slices where '
        "it forecasts the most lesion voxels, as sent to the PACS.</p>"
        '<div class="therapies">'
    )
    for t in summary.get("therapies_ranked") or []:
        code = str(t.get("therapy", ""))
        look = looks.get(code)
        key_href = study_href(uid, "/key/" + quote(code, safe=""))
        images = "".join(
            f'<img class="key" data-therapy="{e(code)}" src="{e(key_href)}/{n}.png{e(query)}" '
            f'alt="{e(code)} key image {n}">'
            for n in range(1, key_images.get(code, 0) + 1)
        )
        body += (
            f'<figure class="therapy" data-therapy="{e(code)}">'
            f"<figcaption>{_swatch(look)}<strong>{e(t.get('rank'))}. "
            f"{e(look.label if look else code)}</strong></figcaption>"
            f'<div class="keys">{images or "<p class=muted>no key images</p>"}</div></figure>'
        )
    body += "</div>"
    return layout("Result", body)


def error_page(status: int, message: str) -> str:
    return layout(f"{status}", f"<p>{e(message)}</p>")
