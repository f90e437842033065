#!/usr/bin/env python3
"""Renders the panels of dashboards/weir-overview.json from a real Prometheus into one PNG.

Each panel's queries run through Prometheus's range API (Grafana's variables substituted) and are
plotted as Grafana would show them: one small chart per panel, in the dashboard's order. This is
how the README's picture is made from real data, without a browser.

    python3 dashboards/render.py --prometheus http://127.0.0.1:9090 --minutes 5 \
        --out dashboards/weir-overview.png

Needs matplotlib (`pip install matplotlib`). dashboards/demo-render.sh runs the whole demo.
"""
import argparse
import json
import pathlib
import time
import urllib.parse
import urllib.request

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import EngFormatter, FuncFormatter  # noqa: E402

HERE = pathlib.Path(__file__).parent


def query_range(prometheus, expr, start, end, step):
    params = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": step})
    with urllib.request.urlopen(f"{prometheus}/api/v1/query_range?{params}") as response:
        answer = json.load(response)
    if answer.get("status") != "success":
        raise SystemExit(f"{expr}: {answer}")
    return answer["data"]["result"]


def legend(template, labels):
    out = template
    for key, value in labels.items():
        out = out.replace("{{" + key + "}}", value)
    return out


def seconds(value, _pos=None):
    if value == 0:
        return "0"
    for unit, scale in (("s", 1), ("ms", 1e-3), ("µs", 1e-6)):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value * 1e6:.2g} µs"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prometheus", default="http://127.0.0.1:9090")
    parser.add_argument("--minutes", type=float, default=5)
    parser.add_argument("--rate-interval", default="30s")
    parser.add_argument("--out", default=str(HERE / "weir-overview.png"))
    args = parser.parse_args()

    dashboard = json.loads((HERE / "weir-overview.json").read_text())
    panels = [p for p in dashboard["panels"] if p["type"] == "timeseries"]
    end = time.time()
    start = end - args.minutes * 60
    step = max(1, int(args.minutes * 60 / 200))

    columns = 3
    rows = (len(panels) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(15, 2.6 * rows), dpi=72)
    fig.suptitle(f"{dashboard['title']}: rendered from Prometheus ({args.minutes:g} min of a demo run)",
                 fontsize=12, x=0.01, ha="left")
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, panel in zip(axes.flat, panels):
        unit = panel["fieldConfig"]["defaults"].get("unit")
        for target in panel["targets"]:
            expr = (target["expr"].replace("$__rate_interval", args.rate_interval)
                    .replace("$instance", ".*"))
            for series in query_range(args.prometheus, expr, start, end, step):
                points = [(float(t) - end, float(v)) for t, v in series["values"]]
                points = [(t / 60, v) for t, v in points if v == v]  # drop NaN
                if points:
                    xs, ys = zip(*points)
                    ax.plot(xs, ys, linewidth=1, label=legend(target["legendFormat"], series["metric"]))
        ax.set_title(panel["title"], fontsize=9, loc="left")
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.set_xlabel("minutes ago", fontsize=7)
        if unit == "s":
            ax.yaxis.set_major_formatter(FuncFormatter(seconds))
            ax.set_yscale("log")
        elif unit == "bytes":
            ax.yaxis.set_major_formatter(EngFormatter(unit="B"))
        elif unit == "ops":
            ax.yaxis.set_major_formatter(EngFormatter(unit="/s"))
        if ax.lines:
            ax.legend(fontsize=6, loc="upper left", ncol=2, framealpha=0.6)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="grey")
    fig.tight_layout()
    fig.savefig(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
