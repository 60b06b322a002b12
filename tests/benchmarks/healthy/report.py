"""Markdown table of a healthy-run benchmark result (see the package docstring)."""

from __future__ import annotations

from collections import Counter
from typing import Any


def _rules(counts: dict[str, int]) -> str:
    return ", ".join(f"{k}:{v}" for k, v in sorted(counts.items())) or "–"


def totals(result: dict[str, Any]) -> dict[str, Any]:
    """The total over the counted runs (healthy by the criterion, not excluded by design).

    Returns:
        ``runs`` (all), ``counted_runs``, ``warnings`` (on counted runs), ``by_rule`` (on
        counted runs), ``runs_warned`` (counted runs with at least one warning),
        ``other_warnings`` (per rule, on the runs not counted).
    """
    runs = result["runs"]
    counted = [r for r in runs if r["counted"]]
    by_rule = Counter(w["rule"] for r in counted for w in r["warnings"])
    other = Counter(w["rule"] for r in runs if not r["counted"] for w in r["warnings"])
    return {"runs": len(runs), "counted_runs": len(counted), "warnings": sum(by_rule.values()),
            "by_rule": dict(sorted(by_rule.items())),
            "runs_warned": sum(bool(r["warnings"]) for r in counted),
            "other_warnings": dict(sorted(other.items()))}


def markdown(result: dict[str, Any]) -> str:
    """The per-setup table, the total line, the warnings on healthy runs, the unhealthy runs."""
    t = totals(result)
    monitor = ("Default monitor (`Monitor(model, loss_fn, None, optimizer=opt, warn=False)`)"
               if not result.get("preset") else f"`Monitor(..., metrics={result['preset']!r})`")
    lines = [
        f"{monitor}, seeds {result['seeds']}{', --small' if result['small'] else ''}. "
        "health: one letter per seed, H healthy, u not (non-finite loss, or the 20-step "
        "rolling median of the loss >= 1.25x its running minimum, and >= 5 % of the "
        "initial loss above it, for 20 steps from step 50 on); † task changes by design, "
        "never counted. worst: largest rolling median / running minimum. Warnings: "
        "findings of severity >= warning, per rule, on all runs; 'on healthy': those on "
        "the counted runs.", "",
        "| setup | seeds | steps | health | worst | warnings (all runs) | on healthy | info "
        "| s |",
        "|" + "---|" * 9,
    ]
    for row in result["rows"]:
        worst = "–" if row["worst_ratio"] is None else f"{row['worst_ratio']:.1f}"
        mark = " †" if row["excluded"] else ""
        lines.append(
            f"| {row['setup']} | {row['seeds']} | {row['steps']} | {row['health']}{mark} | "
            f"{worst} | {_rules(row['warnings'])} | {sum(row['counted_warnings'].values())} | "
            f"{row['info']} | {row['seconds']:.0f} |")
    lines += ["", f"**Total: {t['warnings']} warnings on {t['counted_runs']} healthy runs** "
              f"({_rules(t['by_rule'])}; {t['runs_warned']} of the {t['counted_runs']} runs "
              f"warned at least once). Runs not counted: {t['runs'] - t['counted_runs']} of "
              f"{t['runs']}, their warnings {_rules(t['other_warnings'])}. "
              f"Wall time {result['seconds']:.0f} s.", ""]
    warned = [r for r in result["runs"] if r["counted"] and r["warnings"]]
    if warned:
        lines += ["Warnings on healthy runs (step rule metric):", ""]
        lines += [f"- {r['setup']} seed {r['seed']}: " + ", ".join(
            f"{w['step']} {w['rule']} {w['metric']}" for w in r["warnings"]) for r in warned]
        lines.append("")
    bad = [r for r in result["runs"] if not r["healthy"]]
    if bad:
        lines += ["Unhealthy runs:", ""]
        lines += [f"- {r['setup']} seed {r['seed']}: {r['why']}" for r in bad]
    return "\n".join(lines)
