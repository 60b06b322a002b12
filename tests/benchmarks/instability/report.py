"""Markdown tables of a suite result."""

from __future__ import annotations


def _f(v, fmt="{:.0f}"):
    return "–" if v is None else fmt.format(v)


def markdown(result: dict) -> str:
    """The summary table (any rule), the per-rule table and the overhead table."""
    sc = result["scenarios"]
    head = ("| scenario | kind | detector | rule | exploded | detected | before onset | "
            "lead onset | lead explosion | FA/1k control | FA/1k warm-up | "
            "FA/1k pre-intervention | in-call |")
    sep = "|" + "---|" * 13
    lines = [f"Seeds per scenario: {result['seeds']}. Leads are medians over detected seeds, "
             "in steps (negative: after). in-call: time inside the detector's calls over the "
             "training step's time (median over runs). Onset: loss >= 1.25x baseline for 3 "
             "steps and >= 1.25x the matched control's loss at those steps; explosion: "
             ">= 10x baseline or not finite.", ""]
    for title, keep in (("Any rule", lambda r: r["rule"] == "any"),
                        ("Per rule", lambda r: r["rule"] != "any")):
        lines += [f"**{title}**", "", head, sep]
        for r in result["rows"]:
            if not keep(r):
                continue
            lines.append(
                f"| {r['scenario']} | {sc[r['scenario']]['kind']} | {r['detector']} | "
                f"{r['rule']} | {r['exploded']}/{r['seeds']} | "
                f"{_f(r['detection_rate'], '{:.0%}')} | {_f(r['before_onset_rate'], '{:.0%}')} | "
                f"{_f(r['median_lead_onset'])} | {_f(r['median_lead_explosion'])} | "
                f"{_f(r['fa_per_1k_control'], '{:.1f}')} | {_f(r['fa_per_1k_warmup'], '{:.1f}')} | "
                f"{_f(r['fa_per_1k_pre_intervention'], '{:.1f}')} | "
                f"{_f(r.get('call_fraction'), '{:.0%}')} |")
        lines.append("")
    for d, why in result.get("missing", {}).items():
        lines.append(f"{d}: {why}")
    if result["overhead"]:
        lines += ["**Overhead** (ms per step end to end, median of interleaved repeats)", "",
                  "| arch | variant | ms/step | overhead |", "|---|---|---|---|"]
        for arch, t in result["overhead"].items():
            for v, x in t.items():
                lines.append(f"| {arch} | {v} | {x['ms_per_step']:.1f} | "
                             f"{100 * x['overhead']:+.0f}% |")
    return "\n".join(lines)
