"""`python -m netsim.bench render RESULT.json`: a benchmark's JSON as the Markdown block BENCHMARKS.md keeps.

So that every table in BENCHMARKS.md is produced from a JSON result, not typed by hand.
"""

from __future__ import annotations

from typing import Any


def _fmt(x: float | None, spec: str = ".2f") -> str:
    return "—" if x is None else format(x, spec)


def render(res: dict[str, Any]) -> str:
    """Markdown: command, date, revision, bounds, then one row per client."""
    lines = [
        f"`{res['command']}`",
        "",
        f"{res['date']}, revision `{res.get('revision')}`, {res['machine']['nproc']} cores (shared), "
        f"kernel {res['machine']['kernel']}.",
        "",
    ]
    if res["topology"] == "emu":
        lines += [
            f"T_min {res['t_min_s']:.2f} s nominal; {_fmt(res['t_min_measured_s'])} s with the iperf3 rate "
            f"({_fmt((res['iperf3_bps'] or 0) / 1e6, '.1f')} Mbit/s).",
            "",
            "| client | T median (min–max) s | T / T_min | T / T_min measured | seed upload / F | "
            "peak RSS MB | failed runs |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, c in sorted(res["clients"].items(), key=lambda kv: kv[1]["ratio"] or 1e9):
            lines.append(
                f"| {name} | {_fmt(c['median_s'])} ({_fmt(c['min_s'])}–{_fmt(c['max_s'])}) | "
                f"{_fmt(c['ratio'])} | {_fmt(c['ratio_measured'])} | {_fmt(c['seed_upload_F'])} | "
                f"{_fmt(c['rss_max_mb'], '.0f')} | {len(c['failures'])} of {res['runs']} |"
            )
    else:
        lines += [
            "| client | T median (min–max) s | delivered MB/s median (runs) | peak RSS MB | failed runs |",
            "|---|---|---|---|---|",
        ]
        for name, c in sorted(res["clients"].items(), key=lambda kv: -(kv[1]["agg_MBps"] or 0)):
            runs = ", ".join(f"{x:.0f}" for x in c["agg_MBps_runs"])
            lines.append(
                f"| {name} | {_fmt(c['median_s'])} ({_fmt(c['min_s'])}–{_fmt(c['max_s'])}) | "
                f"{_fmt(c['agg_MBps'], '.0f')} ({runs}) | {_fmt(c['rss_max_mb'], '.0f')} | "
                f"{len(c['failures'])} of {res['runs']} |"
            )
    if res.get("benchmark") == "pair":
        lines += [
            "",
            f"p2pd / curl: {_fmt(res.get('p2pd_vs_curl'))} (medians); run by run: "
            f"{', '.join(format(x, '.2f') for x in res.get('p2pd_vs_curl_runs') or [])}",
        ]
    lines += ["", f"Headline: {res['headline']}"]
    fails = [f"- {name}: {f}" for name, c in res["clients"].items() for f in c["failures"]]
    if fails:
        lines += ["", "Failures:", *[f[:400] for f in fails]]
    return "\n".join(lines)
