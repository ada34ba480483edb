"""The pipeline's report: one self-contained HTML page and its markdown twin, from a run folder.

    python report.py --run=runs/pipeline      # writes runs/pipeline/report.html and report.md

It only reads what the run left: diagnose/{diagnostics.json, config.json, grid.gif} (the stage table, drift,
the samples), {sft,rl,dpo}/log.jsonl (training curves, the DPO win rate) and each checkpoint's metadata (its
lineage and config). The page opens offline: the GIF is a data URI, the plots are SVG drawn here, there is no
script and no link off the page. An existing report is kept unless --overwrite=true (`make pipeline` passes it,
as it does to every step, since the pipeline replaces its whole run folder).
"""
import base64
import html
import itertools
import json
import math
import os
import platform
import re
import sys
import time
from dataclasses import dataclass

import numpy
import torch

import data
from bench import ablation_rows, trained_reward
from checkpoint import read_checkpoint
from diagnose import QUALITY, DiagnoseConfig, read_diagnostics
from rewards import HEADS
from cli import RUN_MARKER, UserError, claim_out_file, parse_config, run_cli, write_text

HERE = os.path.dirname(os.path.abspath(__file__))
STAGES = (("sft", "Stage I: SFT"), ("rl", "Stage II: GRPO"), ("dpo", "Stage III: DPO"))
PALETTE = ("#4e79a7", "#f28e2b", "#e15759", "#59a14f", "#b07aa1", "#76b7b2", "#edc948", "#9c755f", "#ff9da7")
SUPER = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")
esc = html.escape


@dataclass
class Config:
    run: str = "runs/pipeline"  # a run folder holding diagnose/ and the stages' sft/, rl/, dpo/
    overwrite: bool = False     # replace an existing report.html and report.md
    ablations: str = "runs/ablations/ablations.json"  # `make ablations`' results: a section when the file exists
    race: str = "runs/race/race.json"                  # `make race`'s results: a section (and a first-screen chart)


def read_jsonl(path):
    """A log's records; a last line cut off by a kill is skipped rather than failing the whole report."""
    out = []
    for line in open(path) if os.path.exists(path) else ():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


# ----------------------------------------------------------------------------- SVG line charts
def nice_step(span, n=5):
    raw = span / n
    mag = 10 ** math.floor(math.log10(raw))
    return next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)


def fmt_tick(v, step):
    digits = max(0, -math.floor(math.log10(step) + 1e-9))
    return f"{v:.1e}" if digits > 4 or abs(v) >= 1e5 else f"{v:.{digits}f}"


def svg_plot(title, series, xlabel, log=False, w=420, h=230):
    """A line chart as inline SVG. series: [(name, xs, ys)], None in ys leaves a gap; log: a log10 y axis, where
    values <= 0 cannot be drawn and are left out. Sparse series get markers, so a lone evaluation still shows.
    Series of one name share a colour and a legend entry (a rule's seeds, say)."""
    f = math.log10 if log else float
    pts = [[(x, f(y)) if y is not None and math.isfinite(y) and (y > 0 or not log) else None for x, y in zip(xs, ys)]
           for _, xs, ys in series]
    flat = [p for s in pts for p in s if p]
    L, R, T, B = 58, 14, 26, 36
    out = [f'<svg width="{w}" height="{{H}}" viewBox="0 0 {w} {{H}}" font-family="sans-serif" font-size="11">',
           f'<text x="{w / 2}" y="15" text-anchor="middle" font-size="13" font-weight="bold">{esc(title)}</text>']
    if not flat:
        out.append(f'<text x="{w / 2}" y="{h / 2}" text-anchor="middle" fill="#888">not logged in this run</text>')
        return "\n".join(out).replace("{H}", str(h)) + "</svg>"
    x0, x1 = min(p[0] for p in flat), max(p[0] for p in flat)
    y0, y1 = min(p[1] for p in flat), max(p[1] for p in flat)
    x0, x1 = (x0 - 1, x1 + 1) if x0 == x1 else (x0, x1)
    if log:  # whole decades; within two decades also 2x and 5x, labelled as plain numbers
        y0, y1 = math.floor(y0), max(math.ceil(y1), math.floor(y0) + 1)
        k = max(1, math.ceil((y1 - y0) / 6))
        label = lambda m, e: f"{m * 10.0 ** e:g}" if -3 <= e < 4 else ("" if m == 1 else f"{m}×") + "10" + str(e).translate(SUPER)
        yticks = [(e + math.log10(m), label(m, e)) for e in range(y0, y1 + 1, k)
                  for m in ((1, 2, 5) if y1 - y0 <= 2 else (1,)) if e + math.log10(m) <= y1]
    else:
        pad = abs(y0) * 0.1 or 1
        y0, y1 = (y0 - pad if y0 < 0 or y0 - pad > 0 else 0, y1 + pad) if y0 == y1 else (y0, y1)  # counts stay >= 0
        s = nice_step(y1 - y0)
        y0, y1 = math.floor(y0 / s + 1e-9) * s, math.ceil(y1 / s - 1e-9) * s
        yticks = [(y0 + i * s, fmt_tick(y0 + i * s, s)) for i in range(round((y1 - y0) / s) + 1)]
    s = max(nice_step(x1 - x0), 1 if all(float(x).is_integer() for x, _ in flat) else 0)  # steps are whole
    xticks = [(v, fmt_tick(v, s)) for v in (math.ceil(x0 / s) * s + i * s for i in range(12)) if v <= x1 + 1e-9]
    px = lambda x: L + (x - x0) / (x1 - x0) * (w - L - R)
    py = lambda y: h - B - (y - y0) / (y1 - y0) * (h - B - T)
    for y, lab in yticks:
        out.append(f'<line x1="{L}" x2="{w - R}" y1="{py(y):.1f}" y2="{py(y):.1f}" stroke="#e4e4e4"/>'
                   f'<text x="{L - 5}" y="{py(y) + 4:.1f}" text-anchor="end">{lab}</text>')
    for x, lab in xticks:
        out.append(f'<line x1="{px(x):.1f}" x2="{px(x):.1f}" y1="{h - B}" y2="{h - B + 4}" stroke="#444"/>'
                   f'<text x="{px(x):.1f}" y="{h - B + 15}" text-anchor="middle">{lab}</text>')
    out.append(f'<path d="M{L},{T} V{h - B} H{w - R}" fill="none" stroke="#444"/>'
               f'<text x="{(L + w - R) / 2}" y="{h - B + 29}" text-anchor="middle" fill="#444">{esc(xlabel)}</text>')
    lx, ly = L, h + 12
    colours = {}
    for (name, _, _), p in zip(series, pts):
        named = name in colours
        c = colours.setdefault(name, PALETTE[len(colours) % len(PALETTE)])
        segs = [[(px(x), py(y)) for x, y in run] for drawn, run in itertools.groupby(p, bool) if drawn]  # gaps split
        out += [f'<polyline points="{" ".join(f"{x:.1f},{y:.1f}" for x, y in seg)}" fill="none" stroke="{c}" '
                f'stroke-width="1.8"/>' for seg in segs]
        if sum(map(len, segs)) <= 30:
            out += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.6" fill="{c}"/>' for seg in segs for x, y in seg]
        if named:
            continue
        width = 26 + 6.4 * len(name)
        lx, ly = (L, ly + 16) if lx + width > w - R and lx > L else (lx, ly)
        out.append(f'<rect x="{lx}" y="{ly - 8}" width="14" height="4" fill="{c}"/>'
                   f'<text x="{lx + 18}" y="{ly - 3}">{esc(name)}</text>')
        lx += width
    return "\n".join(out).replace("{H}", str(ly + 8)) + "</svg>"


def chart(title, series, xlabel, log=False):
    """(svg, markdown line): the markdown twin states each series' first and last value instead of drawing it."""
    ends = []
    for name, _, ys in series:
        v = [y for y in ys if y is not None]
        ends.append(f"{name} {v[0]:.4g} -> {v[-1]:.4g}" if v else f"{name} not logged")
    return svg_plot(title, series, xlabel, log), f"- **{title}**: " + "; ".join(ends)


# ----------------------------------------------------------------------------- the stage table
def stage_rows(results, extra):
    """(label, {column: (mean, se or None) or None}) for every axis diagnose measured, in markdown_table's order,
    then `extra` rows read from the run (validation loss, DPO win rate)."""
    names, first = list(results), next(iter(results.values()))
    def row(label, *keys):  # a metric some column lacks (a diagnosis without the learned judge) is an empty cell
        vals = {}
        for n in names:
            v = results[n]
            for k in keys:
                ok = k in v if isinstance(v, dict) else isinstance(v, list) and isinstance(k, int) and -len(v) <= k < len(v)
                v = v[k] if ok else None
            vals[n] = (v[0], v[1]) if isinstance(v, list) else None if v is None else (v, None)
        return label, vals
    heads = [h for h in HEADS if all(h in r for r in results.values())]
    chunks, frames = len(first.get("drift_by_chunk", [])), len(first.get("drift_by_frame", {}).get("identity", []))
    rows = [row(f"{h} head", h) for h in heads]
    rows += [row(f"instruction head, {s} combos", "instruction_by_split", k) for s, k in (("val", "val"), ("held-out", "heldout"))]
    rows += [row(f"oracle {k} accuracy", "instruction_by_attribute", k) for k in (*data.ATTRIBUTES, "all")]
    rows += [row("Quality score (VBench dims)", "quality_score"), *(row(f"  {k}", "vbench", k) for k in QUALITY),
             row("Semantic score (VBench dims; its dims are the oracle accuracies)", "semantic_score")]
    rows += [row(f"{what}, frame {i + 1 if i >= 0 else frames}", "drift_by_frame", k, i)
             for k, what in (("identity", "identity (prompted colour and shape)"), ("edge_error", "edge error")) for i in (0, -1)]
    rows += [row(f"{h} head, chunk {c + 1 if c >= 0 else chunks} of a {chunks}x clip", "drift_by_chunk", c, h)
             for h in heads for c in (0, -1)]
    rows += [row(f"diversity, {k.replace('_', ' ')} across seeds", "diversity", k) for k in ("pixel_rms", "position_std")]
    rows += [row(f"instruction head at guidance {w}", "cfg_response", w) for w in sorted(first.get("cfg_response", {}), key=float)]
    rows += [row("context adherence (image-to-video)", "context_adherence")]
    rows += [row(f"learned judge{s}: {k}", key, k) for k in (first.get("proxy_reward") or {})
             for s, key in (("", "proxy_reward"), (" - oracle", "proxy_oracle_gap"))]
    return rows + [(label, {n: vals.get(n) for n in names}) for label, vals in extra]


HELD = {"fidelity head": 0.01, "temporal head": 0.01}   # the floors Stage II and III hold (reward_rl.py --hold)


def cell(vals, names, i, label=""):
    """(html, markdown) of one stage-table cell: mean ± standard error, and the change from the column to its left,
    marked where it is beyond two standard errors of the difference (▲ / ▼, coloured) and where a held axis fell
    through its floor after the first post-training stage (floor broken, red)."""
    v, prev = vals[names[i]], vals[names[i - 1]] if i else None
    if v is None:
        return "", ""
    se = f" ± {v[1]:.3f}" if v[1] is not None else ""
    if not prev:
        return f'{v[0]:.3f}<span class="se">{se}</span>', f"{v[0]:.3f}{se}"
    d = v[0] - prev[0]
    sure = v[1] is not None and prev[1] is not None and abs(d) > 2 * math.hypot(v[1], prev[1])
    broken = label in HELD and i >= 2 and d < -HELD[label]
    mark, kind = ("▲", "up") if sure and d > 0 else ("▼", "down") if sure else ("", "")
    note = " floor broken" if broken else ""
    kind = "broken" if broken else kind
    return (f'{v[0]:.3f}<span class="se">{se}</span><br/><span class="d {kind}">{d:+.3f}{mark}{note}</span>',
            f"{v[0]:.3f}{se} ({d:+.3f}{mark}{note})")


def parts_rows(results):
    """The why-table: each head's parts (penalties in tolerances, 0 = perfect), the training data's score on each
    (the same for every column), then each checkpoint's."""
    names, first = list(results), next(iter(results.values()))["parts"]
    def cell(n, h, p):  # the samples' penalty, and the network's redraw of a clean clip beside it where measured
        v = results[n]["parts"].get(h, {}).get(p, {})
        return "" if v.get("model") is None else f"{v['model']:.2f}" + (
            f" ({v['redraw']:.2f})" if v.get("redraw") is not None else "")
    return [[f"{h}: {p}", f"{v['curated']:.2f}", f"{v['web']:.2f}", *(cell(n, h, p) for n in names)]
            for h, ps in first.items() for p, v in ps.items()]


def recommended(name, rec):
    """A column's recommendation: the sentence and the command."""
    return f"**{name}**: {rec['text']}. Next: `{rec['command']}`"


# ----------------------------------------------------------------------------- the run: logs, files, machine
def stage_curves(run):
    """{stage folder: [(svg, markdown line)]}: the curves each stage's log.jsonl holds."""
    sft, rl, dpo = (read_jsonl(os.path.join(run, s, "log.jsonl")) for s, _ in STAGES)
    sft, dpo = [r for r in sft if "step" in r], [r for r in dpo if "step" in r]
    evals, rl = [r["eval"] for r in rl if "eval" in r], [r for r in rl if "iter" in r]
    col = lambda recs, k, f=lambda v: v: [f(r[k]) if r.get(k) is not None else None for r in recs]
    step, it = col(sft, "step"), col(rl, "iter")
    bins = ["t < 0.25", "0.25-0.5", "0.5-0.75", "t >= 0.75"]
    out = {"sft": [chart("flow loss by t-bin (log scale)", [("all t", step, col(sft, "loss"))] + [
        (b, step, [r["loss_by_t"][i] for r in sft]) for i, b in enumerate(bins)], "step", log=True),
                   chart("grad norm before clipping (log scale)", [("grad_norm", step, col(sft, "grad_norm"))], "step", log=True)]}
    heads = [k for k in (rl[0] if rl else {}) if k.startswith("reward_")]
    held = list((rl[0].get("hold_level") or {}) if rl else {})                 # a floor's heads (reward_rl --hold)
    accs = [k for k in (evals[0] if evals else {}) if k.startswith("acc_")]
    ev_it = [e["iter"] for e in evals]
    out["rl"] = [chart("reward per head (rollout mean)", [(k[7:], it, col(rl, k, lambda v: v[0])) for k in heads], "iteration"),
                 chart("held-out oracle accuracy (evaluations)", [(k[4:], ev_it, [e[k] for e in evals]) for k in accs], "iteration"),
                 chart("floor: held heads on its training-split probe", [(h, it, [(r.get("hold_level") or {}).get(h)
                                                                               for r in rl]) for h in held], "iteration"),
                 chart("floor: Lagrange multipliers", [(h, it, [(r.get("hold_multiplier") or {}).get(h) for r in rl])
                                                       for h in held], "iteration"),
                 chart("KL to the reference (kl_ref, log scale)", [("kl_ref", it, col(rl, "kl_ref"))], "iteration", log=True),
                 chart("grad norm before clipping (log scale)", [("grad_norm", it, col(rl, "grad_norm"))], "iteration", log=True),
                 chart("skipped updates and rollbacks (cumulative)", [("skipped", it, col(rl, "skipped")),
                                                                       ("rollbacks", it, col(rl, "rollbacks"))], "iteration")]
    step = col(dpo, "step")
    out["dpo"] = [chart("DPO loss", [("loss", step, col(dpo, "loss"))], "step"),
                  chart("implicit accuracy (winner preferred)", [("implicit_acc", step, col(dpo, "implicit_acc"))], "step"),
                  chart("implicit reward margin", [("reward_margin", step, col(dpo, "reward_margin"))], "step"),
                  chart("grad norm before clipping (log scale)", [("grad_norm", step, col(dpo, "grad_norm"))], "step", log=True)]
    return out


def drift_curves(results):
    names, first = list(results), next(iter(results.values()))
    frames = range(1, len(first["drift_by_frame"]["identity"]) + 1)
    out = [chart(f"{what} by frame", [(n, frames, results[n]["drift_by_frame"][k]) for n in names], "frame")
           for k, what in (("identity", "identity"), ("edge_error", "edge error"))]
    chunks = range(1, len(first["drift_by_chunk"]) + 1)
    return out + [chart(f"{h} head by chunk", [(n, chunks, [c.get(h) for c in results[n]["drift_by_chunk"]]) for n in names],
                        "chunk of the continued clip") for h in first["drift_by_chunk"][0]]


def decision_blocks(run, results):
    """`make pipeline_driven`'s decisions (advice_rl.json, advice_dpo.json): what each diagnosis told the next stage,
    and how the axis it named moved from that stage's input column to its output column."""
    rows = []
    for stage, title in (("rl", "Stage II"), ("dpo", "Stage III")):
        path = os.path.join(run, f"advice_{stage}.json")
        if not os.path.exists(path):
            continue
        d = json.load(open(path))
        source = {"rl": "sft", "dpo": "rl"}[stage]
        axis = d["axis"]
        moved = (f"{results[source][axis][0]:.3f} -> {results[stage][axis][0]:.3f}"
                 if axis and source in results and stage in results else "")
        rows.append([title, f"{d['from']}'s diagnosis: {d['why']}", " ".join(d["flags"]) or "the defaults",
                     f"{axis}: {moved}" if axis else ""])
    if not rows:
        return []
    return [("h2", "Decisions: what each diagnosis told the next stage"),
            ("p", "This run is diagnostic-driven (`make pipeline_driven`): after each stage `diagnose.py` named "
                  "the weakest axis and its worst part, and `diagnose.py advise` turned the next stage toward it with "
                  "the flags below: its judge or reward weighted toward the axis, or, where the diagnosis asked for "
                  "Stage I (the curated data teaches the part, a reward cannot), its curated flow-loss anchor weighted "
                  "4x. The last column is that axis from the stage's input to its output (the table above); "
                  "`make pipeline` runs the same stages with fixed settings for comparison."),
            ("table", ["stage", "decided from", "flags passed", "the axis it named, input -> output"], rows, "decisions")]


def ablation_blocks(path):
    """`make ablations`' table, its commands and its curves: Stage II with one part taken out at a time."""
    if not (path and os.path.exists(path)):   # `make ablations` has not run here: no section
        return []
    result = json.load(open(path))
    if "start" not in result:
        raise UserError(f"{path} is from an older make ablations; rerun it (make ablations), or pass --ablations=")
    header, rows = ablation_rows(result)
    runs = {n: r for n, r in result.items() if n != "start"}
    logs = {n: [r for r in read_jsonl(os.path.join(os.path.dirname(path), n, "log.jsonl")) if "rollout_s" in r] for n in runs}
    evals = lambda r, k: ([e["iter"] for e in r["evals"]], [e[k] for e in r["evals"]])
    charts = [chart("trained reward (the judge's in judge rows)",
                    [(n, [r["iter"] for r in recs], [trained_reward(r) for r in recs]) for n, recs in logs.items() if recs], "iteration"),
              *[chart(f"oracle, 16 held-out clips: {label}", [(n, *evals(r, k)) for n, r in runs.items()],
                      "iteration") for k, label in (("acc_all", "all attributes"), ("fidelity", "fidelity"))]]
    return [("h2", "Ablations: why each part of Stage II exists"),
            ("p", f"From `{path}` (`make ablations`): Stage II from the same input with one part taken out at a time. "
                  f"Columns 3-5 and the judge's gap: each run's end checkpoint on {result['start']['clips']} of "
                  "diagnose's held-out clips (mean ± standard error). The verdict compares a row with its reference "
                  "(defaults, or the judge row for the other judge rows) and calls a difference under two standard "
                  "errors none."),
            ("table", header, rows, "ablations"),
            ("list", [f"**{n}**: `{r['command']}`" for n, r in runs.items()]),
            ("charts", charts)]


def race_charts(result):
    """The race's pictures: all-attributes accuracy against network evaluations, and its gain against the change in
    fidelity (the thesis: a gain not bought with fidelity lies right of the floor's line), a line per run in its
    rule's colour (the spread over seeds is the lines' spread), a mark per evaluation."""
    runs, start = result["runs"], result["start"]
    series = [(r["rule"], [p["nfe"] for p in r["points"]], [p["acc_all"] for p in r["points"]])
              for r in runs.values()]
    trade = [(r["rule"], [p["fidelity"] - start["fidelity"] for p in r["points"]],
              [p["acc_all"] - start["acc_all"] for p in r["points"]]) for r in runs.values()]
    floor = -result.get("floor", {}).get("fidelity", 0.01)
    trade.append((f"fidelity floor ({floor:+.2f})", [floor, floor], [min(min(ys) for _, _, ys in trade),
                                                                     max(max(ys) for _, _, ys in trade)]))
    return [chart("all attributes (64 held-out clips) vs network evaluations", series, "network evaluations"),
            chart("all-attributes gain vs fidelity change (held-out)", trade, "fidelity change from the start")]


def race_blocks(path):
    """`make race`'s tables (a rule's cost to each gain within the floors, its end of budget), its pictures, and each
    rule's health signals."""
    if not (path and os.path.exists(path)):   # `make race` has not run here: no section
        return []
    result = json.load(open(path))
    if "nfe" not in result:                  # a race from before equal budgets: its tables differ
        return [("h2", "Update rules raced"), ("p", f"`{path}` is from an older `make race`; run it again.")]
    floor = ", ".join(f"{h} within {m}" for h, m in result["floor"].items())
    blocks = [("h2", "Update rules raced"),
              ("p", f"From `{path}` (`make race`): Stage II's update rules from `{result['init']}` (all attributes "
                    f"{result['start']['acc_all']:.3f}, fidelity {result['start']['fidelity']:.3f}), the same training "
                    f"prompts, {result['nfe']:,} network evaluations per run, evaluated on diagnose's held-out clips "
                    f"between equal segments; a gain counts with {floor} of the start. Machine: {result['machine']}."),
              ("charts", race_charts(result))]
    head = ["rule", "reached", "network evaluations", "minutes", "fidelity there", "temporal there",
            "at any fidelity: reached, evaluations"]
    for label, rows in ((k, v) for k, v in result["table"].items() if k != "end"):
        bound = lambda r: "" if r["reached"] == r["seeds"] else ">= "
        blocks += [("h3", f"Gain {label} in all-attributes accuracy within the floors"),
                   ("table", head, [[rule, f"{r['reached']}/{r['seeds']}", f"{bound(r)}{r['nfe']:,.0f}",
                                     f"{bound(r)}{r['seconds'] / 60:.2f}", f"{r['fidelity']:.3f}", f"{r['temporal']:.3f}",
                                     f"{r['reached_any_fidelity']}/{r['seeds']}, {r['nfe_any_fidelity']:,.0f}"]
                                    for rule, r in rows.items()], "race")]
    pm = lambda e, k: f"{e[f'd_{k}']:+.3f} [{e[f'd_{k}_range'][0]:+.3f}, {e[f'd_{k}_range'][1]:+.3f}]"
    blocks += [("h3", "End of budget (change from the start, mean [min, max] over seeds)"),
               ("table", ["rule", "all attributes", "fidelity", "temporal", "ends within floors"],
                [[rule, pm(e, "acc_all"), pm(e, "fidelity"), pm(e, "temporal"), str(e["within_floor"])]
                 for rule, e in result["table"]["end"].items()], "race")]
    health = {n: r["health"] for n, r in result["runs"].items()}
    line = lambda k: [(n, h["cost_nfe"], h[k]) for n, h in health.items()]
    blocks += [("h3", "What each rule does to the policy"),
               ("charts", [chart("importance ratio, mean", line("ratio"), "network evaluations"),
                           chart("importance ratio, spread (std)", line("ratio_std"), "network evaluations", log=True),
                           chart("|v| / |v_ref| (NormGuard)", line("v_norm_ratio"), "network evaluations"),
                           chart("KL to the reference", line("kl_ref"), "network evaluations", log=True),
                           chart("share of groups the std floor zeroes", line("zero_std_frac"), "network evaluations")])]
    return blocks


def stage_axes_chart(results, names):
    """The first picture: each axis by stage, so the run reads before any table does."""
    axes = [("fidelity", lambda r: r["fidelity"][0]), ("temporal", lambda r: r["temporal"][0]),
            ("instruction", lambda r: r["instruction"][0]),
            ("all attributes", lambda r: r["instruction_by_attribute"]["all"][0])]
    return chart(f"each axis by stage: {', '.join(f'{i} {n}' for i, n in enumerate(names))}",
                 [(a, list(range(len(names))), [f(results[n]) for n in names]) for a, f in axes], "stage")


def wall_times(run, diag_seconds):
    """Per stage: the loop time its log records, and the span by file times from the previous stage's last file
    to its own (the pipeline runs them back to back, so this also counts loading, evaluation and sample grids)."""
    sft, rl, dpo = (read_jsonl(os.path.join(run, s, "log.jsonl")) for s, _ in STAGES)
    last = lambda recs: next((r["elapsed_s"] for r in reversed(recs) if "elapsed_s" in r), None)
    loop = {"sft": last(sft), "rl": sum(r.get("rollout_s", 0) + r.get("train_s", 0) for r in rl if "iter" in r) or None,
            "dpo": last(dpo), "diagnose": diag_seconds}
    for folder in ("diagnose_sft", "diagnose_rl"):             # the diagnoses the next stage was decided from
        config = os.path.join(run, folder, "config.json")
        loop[folder] = json.load(open(config)).get("seconds") if os.path.exists(config) else None
    started = os.path.join(run, "started_at")               # both pipeline targets write their start time there
    rows, prev = [], float(open(started).read()) if os.path.exists(started) else None
    start = prev
    for folder in ("sft", "diagnose_sft", "rl", "diagnose_rl", "dpo", "diagnose"):
        path = os.path.join(run, folder)
        if folder.startswith("diagnose_") and not os.path.isdir(path):
            continue
        end = max((os.path.getmtime(os.path.join(path, f)) for f in os.listdir(path)), default=None) if os.path.isdir(path) else None
        span = end - prev if end and prev and end > prev else None
        rows.append((folder, loop[folder], span))
        prev = end
    if start and prev:
        rows.append(("the whole pipeline", None, prev - start))
    return rows


def machine():
    info = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    cpu = next((l.split(":", 1)[1].strip() for l in info.splitlines() if l.startswith("model name")), platform.processor())
    gpu = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) or "none"
    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__,
            "os": platform.platform(), "CPU": f"{cpu or 'unknown'}, {os.cpu_count()} cores "
            f"({len(os.sched_getaffinity(0))} usable by this process)", "GPU": gpu}


def run_commands(run):
    """The command each step of the run was started with, as its folder's run marker recorded it, in pipeline order."""
    lines = []
    for folder in ("sft", "diagnose_sft", "rl", "diagnose_rl", "dpo", "diagnose"):
        marker = os.path.join(run, folder, RUN_MARKER)
        if os.path.exists(marker):
            lines.append(json.load(open(marker)).get("command") or f"{folder}: not recorded")
    return lines


def diagnose_command(dcfg):
    """The diagnose command that made the table: its checkpoints, then the settings it changed from the defaults."""
    c = dcfg.get("config", {})
    args = [f"--ckpt={p}" for p in c.get("ckpt", [])] + [f"--{k}={str(v).lower() if isinstance(v, bool) else v}"
                                                          for k, v in c.items() if k != "ckpt" and v != getattr(DiagnoseConfig, k, v)]
    return "python diagnose.py " + " ".join(args) if c else "not recorded (diagnose/config.json is missing)"


# ----------------------------------------------------------------------------- the page
CSS = """body{font-family:system-ui,sans-serif;margin:24px auto;max-width:1320px;color:#222;padding:0 16px}
h2{border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:32px}h2 code,h3 code{font-size:.8em;background:none}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ddd;padding:3px 8px;vertical-align:top}
table.stages td:not(:first-child){text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
th{background:#f4f4f4}.se{color:#888}.d{color:#3a6ea5;font-size:11px}.d.up{color:#1a7f37;font-weight:bold}.d.down{color:#c2410c;font-weight:bold}
.d.broken{color:#fff;background:#b91c1c;padding:0 3px;font-weight:bold}.charts{display:flex;flex-wrap:wrap;gap:14px}
.charts svg{border:1px solid #eee;background:#fff}code,pre{font-size:12px;background:#f6f6f6}pre{padding:8px;white-space:pre-wrap}
.kv{column-width:300px;font-size:12px}.kv div{break-inside:avoid}.grid{position:relative;margin:8px 0}
.grid img{position:absolute;image-rendering:pixelated}.grid div{position:absolute;font-size:12px}"""


def gif_grid(path, rows, cols):
    """The GIF with its prompts beside each row and checkpoint names above each column: video_grid's cells are
    equal with a 2-pixel pad, so the label positions follow from the file's own size."""
    raw = open(path, "rb").read()
    w, h = int.from_bytes(raw[6:8], "little"), int.from_bytes(raw[8:10], "little")
    scale, lw, top = 1.5, 260, 20
    ch, cw = (h - 2) / max(1, len(rows)) * scale, (w - 2) / max(1, len(cols)) * scale
    out = [f'<div class="grid" style="width:{lw + w * scale:.0f}px;height:{top + h * scale:.0f}px">',
           f'<img style="left:{lw}px;top:{top}px" width="{w * scale:.0f}" height="{h * scale:.0f}" alt="samples" '
           f'src="data:image/gif;base64,{base64.b64encode(raw).decode()}"/>']
    out += [f'<div style="left:{lw + i * cw:.0f}px;top:0;width:{cw:.0f}px;text-align:center"><b>{esc(c)}</b></div>'
            for i, c in enumerate(cols)]
    out += [f'<div style="left:0;top:{top + i * ch + ch / 2 - 8:.0f}px;width:{lw - 8}px;text-align:right">{esc(r)}</div>'
            for i, r in enumerate(rows)]
    return "\n".join(out) + "</div>"


def inline(text):
    """The markdown twin's inline marks, `code` and **bold**, as HTML."""
    return re.sub(r"\*\*([^*]*)\*\*", r"<b>\1</b>", re.sub(r"`([^`]*)`", r"<code>\1</code>", esc(text, quote=False)))


def render(blocks):
    """(html, markdown) of blocks ("h1".."h3" | "p" | "list" | "pre" | "table" | "charts" | "raw", ...): the page and
    its twin are written once. Table cells are text or (html, markdown) pairs."""
    h, md = [], []
    pick = lambda c, i: c[i] if isinstance(c, tuple) else inline(str(c)) if i == 0 else str(c)
    for kind, *a in blocks:
        if kind[0] == "h":
            h, md = h + [f"<{kind}>{inline(a[0])}</{kind}>"], md + ["#" * int(kind[1]) + " " + a[0]]
        elif kind == "p":
            h, md = h + [f"<p>{inline(a[0])}</p>"], md + [a[0]]
        elif kind == "list":
            h, md = h + ["<ul>" + "".join(f"<li>{inline(x)}</li>" for x in a[0]) + "</ul>"], md + [f"- {x}" for x in a[0]]
        elif kind == "pre":
            h, md = h + [f"<pre>{esc(chr(10).join(a[0]))}</pre>"], md + ["```", *a[0], "```"]
        elif kind == "table":
            tr = lambda row, tag: "<tr>" + "".join(f"<{tag}>{pick(c, 0)}</{tag}>" for c in row) + "</tr>"
            h.append(f'<table class="{a[2]}">' + tr(a[0], "th") + "".join(tr(r, "td") for r in a[1]) + "</table>")
            md += [" | ".join(["", *(pick(c, 1).strip() for c in row), ""]).strip() for row in (a[0], ["---"] * len(a[0]), *a[1])]
        elif kind == "charts":
            h, md = h + ['<div class="charts">', *(svg for svg, _ in a[0]), "</div>"], md + [line for _, line in a[0]]
        else:
            h, md = h + [a[0]], md + [a[1]]
        md.append("")
    return "\n".join(h), "\n".join(md)


def write_report(cfg):
    run = cfg.run.rstrip("/")
    diag = os.path.join(run, "diagnose")
    if not os.path.isdir(run):
        raise UserError(f"run folder {run} not found; make one with `make pipeline RUN={run}`")
    results = read_diagnostics(os.path.join(diag, "diagnostics.json"))    # one line if missing, empty or partial
    html_path, md_path = os.path.join(run, "report.html"), os.path.join(run, "report.md")
    for path in (html_path, md_path):
        claim_out_file(path, cfg.overwrite, flag="the report")
    try:  # config.json: the columns' paths, the grid's prompts, diagnose's settings and time
        dcfg = json.load(open(f"{diag}/config.json"))
        names, paths, grid_rows = list(results), dcfg["columns"], dcfg["grid_rows"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{diag}/config.json is missing or broken ({type(e).__name__}); rerun diagnose") from None
    # each column's metadata from its checkpoint where it still exists, else the lineage diagnose copied
    meta = {n: read_checkpoint(paths[n])[2] if os.path.exists(paths.get(n, "")) else
            {"lineage": results[n].get("lineage", {})} for n in names}
    stages = {n: meta[n]["lineage"].get("stage", "?") for n in names}
    extra = [(f"validation flow loss, {s} (Stage I's checkpoint)", {n: (meta[n]["val_loss"][k], None) for n in names
              if "val_loss" in meta[n]}) for s, k in (("val", "val"), ("held-out", "heldout"))]
    wins = {n: next((r["final"] for r in read_jsonl(os.path.join(os.path.dirname(paths[n]), "log.jsonl"))
                     if isinstance(r.get("final"), dict) and "win_rate" in r["final"]), None) for n in paths}
    extra += [(f"DPO win rate vs its input{s} (oracle; the DPO run's own eval)",
               {n: (w[f"win_rate{k}"], None) for n, w in wins.items() if w}) for s, k in
              (("", ""), (", held-out combos", "_heldout_combos"))]
    table = [[label, *(cell(v, names, i, label) for i in range(len(names)))] for label, v in stage_rows(results, extra)]
    curves, all_acc = stage_curves(run), [r["instruction_by_attribute"]["all"][0] for r in results.values()]
    glance = (f"Oracle accuracy on every prompted attribute: {' -> '.join(f'{n} {a:.3f}' for n, a in zip(names, all_acc))}"
              + "".join(f"; DPO win rate vs its input {w['win_rate']:.0%}" for w in wins.values() if w) + ".")
    grid = os.path.join(diag, "grid.gif")
    minutes = lambda s: f"{s / 60:.1f} min" if s else "not recorded"
    target = "pipeline_driven" if os.path.exists(os.path.join(run, "advice_rl.json")) else "pipeline"
    blocks = [("h1", f"postflow report: {run}"),
              ("p", f"Written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `python report.py --run={run}` "
                    f"from the run's own files. {glance}"),
              ("charts", [stage_axes_chart(results, names), *(race_charts(json.load(open(cfg.race)))[:1]
                                                              if cfg.race and os.path.exists(cfg.race) else [])]),
              ("h2", "Stages side by side"),
              ("p", "Each cell: mean ± standard error over the held-out clips (no ± where the metric is one number), and "
                    "the change from the column to its left: ▲ / ▼ where it is beyond two standard errors of the "
                    "difference, **floor broken** where fidelity or temporal fell more than 0.01 in Stage II or III. "
                    f"Diagnostics: `{diagnose_command(dcfg)}`."),
              ("table", ["metric", *((f"{n}<br/><small>{esc(stages[n])}</small>", f"{n} ({stages[n]})") for n in names)],
               table, "stages")]
    why = parts_rows(results)
    blocks += [("h3", "Why: each head's parts beside the training data's own"),
               ("p", "Each part is a penalty over its tolerance, 0 = perfect (instruction: 1 - the soft agreement with "
                     "the prompted attribute); curated and web: the same parts on the training data's clips, each "
                     "against its own caption. In brackets: the network's own redraw of clean clips 2 % noised "
                     "(t = 0.98, no sampler), what it cannot draw yet. The recommendation reads this table."),
               ("table", ["part", "curated data", "web data", *names], why, "stages parts")] if why else []
    blocks += [("list", [recommended(n, r["recommendation"]) for n, r in results.items()]),
               ("h2", "Samples: the same prompts and noise through every stage"),
               ("raw", gif_grid(grid, grid_rows, names) if os.path.exists(grid) else "<p>diagnose/grid.gif not found.</p>",
                "![same prompts and noise through every stage](diagnose/grid.gif)\n\nRows: " + "; ".join(grid_rows)
                + ". Columns: " + ", ".join(names) + ".")]
    for folder, title in STAGES:  # a stage stopped early (--max_minutes, the hacking monitor) ran fewer steps than asked
        ckpt = f"{run}/{folder}/ckpt.safetensors"
        lin = next((meta[n]["lineage"] for n in names if os.path.exists(ckpt) and os.path.exists(paths.get(n, ""))
                    and os.path.samefile(paths[n], ckpt)), {})
        asked = lin.get("config", {}).get("iters" if folder == "rl" else "steps")
        ran = f"; {lin['step']} of {asked} {'iterations' if folder == 'rl' else 'steps'}" if asked and "step" in lin else ""
        blocks += [("h2", f"{title} training (`{folder}/log.jsonl`{ran})"), ("charts", curves[folder])]
    blocks += [("h2", "Drift: by frame, and by chunk of clips continued to 4x their length"),
               ("charts", drift_curves(results)), *decision_blocks(run, results), *ablation_blocks(cfg.ablations),
               *race_blocks(cfg.race),
               ("h2", "How it was made"),
               ("p", f"`make {target}` ran these commands (as each step's folder recorded them); the settings each "
                     "stage actually ran with are its config, below."), ("pre", run_commands(run)),
               ("h3", "Wall time per stage"),
               ("table", ["stage", "loop time (its log)", "end to end (file times)"],
                [(f, minutes(loop), minutes(span)) for f, loop, span in wall_times(run, dcfg.get("seconds"))], ""),
               ("p", "Loop time: the last `elapsed_s` of sft's and dpo's logs, the sum of `rollout_s + train_s` over rl's, "
                     "diagnose's own timer. End to end: from the previous stage's newest file to this stage's newest "
                     "(Stage I's from the pipeline's start, where `started_at` records it)."),
               ("h3", "Versions and machine"),
               ("p", "Of the machine that wrote this report (`make pipeline` runs every stage on it)."),
               ("table", ["what", "here"], list(machine().items()), "")]
    for n in names:  # each checkpoint's lineage, then the config of the run that made it
        lin = dict(meta[n]["lineage"])
        conf = lin.pop("config", {})
        kv = [*lin.items(), *conf.items()]
        blocks += [("h3", f"{n}: {stages[n]} (`{paths.get(n, 'path not recorded')}`)"),
                   ("raw", '<div class="kv">' + "".join(f"<div><code>{esc(str(k))}</code> = {esc(json.dumps(v))}</div>"
                                                       for k, v in kv) + "</div>",
                    "```\n" + "\n".join(f"{k} = {json.dumps(v)}" for k, v in kv) + "\n```")]
    page, twin = render(blocks)
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"/><title>postflow report: {esc(run)}</title>'
            f"<style>{CSS}</style></head><body>\n{page}\n</body></html>\n")
    for path, text in ((html_path, page), (md_path, twin)):  # atomic, like every output of the project
        write_text(path, text)
    print(f"wrote {html_path} ({os.path.getsize(html_path) / 1e3:.0f} kB) and {md_path}")


def main(argv):
    write_report(parse_config(Config, argv))


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
