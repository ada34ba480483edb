"""The race: Stage II's update rules on equal terms (make race).

    python race.py                                   # RACED's rules, 3 seeds, 12,000 evaluations each
    python race.py --rules=awm,awm_floor --seeds=1   # a subset; RULES names every rule it knows
    python race.py --rules= --join=runs/a/race.json,runs/b/race.json=db078ad   # earlier races' runs, one table

One SFT checkpoint, the same training prompts, the same held-out evaluation (diagnose's 64 clips, its noise and
sampler), each rule with its own settings (the short sweeps beside them in docs/results.md, Update rules raced) and
the same budget of network evaluations per run (what reward_rl's loop counts, Cost: rollouts, updates and a floor's
probe alike, so the budget holds on any machine). A run is trained in equal segments of that budget (--max_nfe),
each resumed from the last (a resume is exact, so the segments are one run), and evaluated between them. A rule is
judged on two things at each point: its gain in all-attributes accuracy and whether fidelity and temporal stayed
within FLOOR of the start. race.json holds every point; race.md the tables; report.py draws them.
"""
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from bench import bench_folder, held_out, machine, read_log
from checkpoint import load_model
from cli import ConfigError, check_ranges, parse_config, run_cli, write_text

HERE = os.path.dirname(os.path.abspath(__file__))


# reward_rl's defaults before its EMA kept the full decay from the first update (3x the lr then
# held: docs/results.md, The step's noise and the EMA); the rules raced on them keep them, and the
# later rules one optimizer step a pass (ONE_STEP), as they were raced
BEFORE = ["--lr=1e-4", "--ema_warmup=true", "--minibatches=1"]
ONE_STEP = ["--minibatches=1"]
PPO = ["--update=ppo", "--epochs=1", "--minibatches=1", "--warmup=1", "--sft_weight=0", "--hold="]
RULES = {
    # vanilla Flow-GRPO, and PPO on a 2-step SDE window
    "flow_grpo": [*BEFORE, *PPO, "--sde_window=0", "--rollout_steps=10", "--train_fraction=1.0"],
    "flow_grpo_fast": [*BEFORE, *PPO, "--sde_window=2"],
    "awm": [*BEFORE, "--update=awm", "--hold=", "--lr=3e-4"],       # the default before the floor
    "awm_floor": [*BEFORE, "--update=awm"],                          # the floor turns the lr
    "awm_floor_half": [*BEFORE, "--update=awm", "--hold_guard=0.5"],  # its guard at half a margin
    "awm_floor_short_warmup": [*BEFORE, "--update=awm", "--warmup=2"],  # lr warmed in 1 iteration
    "awm_floor_2x_lr": [*BEFORE, "--update=awm", "--lr=2e-4"],       # ... at twice the lr
    "awm_floor_1_5x_lr": [*BEFORE, "--update=awm", "--lr=1.5e-4"],   # ... at 1.5 times the lr
    "awm_floor_half_1_5x_lr": [*BEFORE, "--update=awm", "--lr=1.5e-4", "--hold_guard=0.5"],
    "awm_floor_undo_1_5x_lr": [*BEFORE, "--update=awm", "--lr=1.5e-4", "--hold_undo=true"],
    "awm_floor_t2": [*BEFORE, "--update=awm", "--draw_t_mean=-2.0"],  # draws nearer the noise
    "awm_floor_lean": [*BEFORE, "--update=awm", "--prompts_per_iter=4", "--hold_probe=8"],
    "awm_floor_undo_2x_lr": [*BEFORE, "--update=awm", "--lr=2e-4", "--hold_undo=true"],
    "awm_floor_undo_3x_lr": [*BEFORE, "--update=awm", "--lr=3e-4", "--hold_undo=true"],
    "awm_floor_undo_probe32_2x_lr": [*BEFORE, "--update=awm", "--lr=2e-4", "--hold_undo=true",
                                     "--hold_probe=32"],
    "awm_floor_sft2_2x_lr": [*BEFORE, "--update=awm", "--lr=2e-4", "--sft_weight=2.0"],  # 4x
    "awm_floor_sft2_3x_lr": [*BEFORE, "--update=awm", "--lr=3e-4", "--sft_weight=2.0"],
    "awm_floor_curated": [*BEFORE, "--update=awm", "--hold_via=curated"],  # turns DDRL's KL
    "awm_floor_kl": [*BEFORE, "--update=awm", "--hold_via=kl"],      # ... or the KL (adaptive KL)
    "nft_floor": [*BEFORE, "--update=nft", "--lr=3e-4"],             # DiffusionNFT under the floor
    "nft_floor_2x_lr": [*BEFORE, "--update=nft", "--lr=6e-4"],
    # the EMA at its full decay from the first update
    "awm_floor_ema_2x_lr": [*ONE_STEP, "--update=awm", "--lr=2e-4", "--ema_warmup=false"],
    "awm_floor_ema_3x_lr": [*ONE_STEP, "--update=awm", "--lr=3e-4",
                            "--ema_warmup=false"],                 # the default before
    "awm_floor_ema_3x_lr_every3": [*ONE_STEP, "--update=awm", "--lr=3e-4", "--ema_warmup=false",
                                   "--hold_every=3"],             # its probe every 3rd iteration
    "awm_floor_ema_3x_lr_warmup4": [*ONE_STEP, "--update=awm", "--lr=3e-4", "--ema_warmup=false",
                                    "--warmup=4"],                # its lr warmed up in 2 iterations
    # two optimizer steps a pass (half the rollouts each): the warmup and the EMA's lag in half the
    # iterations (docs/results.md, Two steps a pass)
    "awm_floor_ema_2x_lr_mb2": ["--update=awm", "--lr=2e-4", "--ema_warmup=false",
                                "--minibatches=2"],                # the default now
    "awm_floor_ema_3x_lr_mb2": ["--update=awm", "--lr=3e-4", "--ema_warmup=false", "--minibatches=2"],
}
RACED = ("awm", "awm_floor", "awm_floor_ema_2x_lr_mb2", "awm_floor_curated", "awm_floor_kl",
         "nft_floor")                                     # make race's default field
FLOOR = {"fidelity": 0.01, "temporal": 0.01}   # what "within the floors" means on the held-out clips
# the loop's own evaluation and hacking monitor off for every rule alike: the race evaluates between segments.
# eval_steps stays: the floor's probe samples at it (a 1-step probe blinded the floor in an earlier race:
# docs/results.md, Update rules raced)
RACE_FLAGS = ["--iters=1000000", "--max_minutes=0", "--eval_every=1000000", "--eval_prompts=1",
              "--patience=1000000", "--ckpt_every=1000000"]
GAINS = (0.05, 0.10)   # all-attributes gains over the start that the table reports costs at


def main(argv):
    @dataclass
    class C:
        init: str = "checkpoints/sft_small.safetensors"   # every run starts here
        rules: tuple = RACED                               # which rules (RULES' names)
        seeds: int = 3                                     # runs per rule, seeds 0 .. seeds - 1
        nfe: int = 12000                                   # network evaluations per run (its rollouts, updates, probe)
        evals: int = 4                                     # held-out evaluations per run, after each equal segment
        heldout_prompts: int = 16                          # per split, x 2 seeds: diagnose's 64 clips
        jobs: int = 2                                      # runs at once, one thread each (2 on 2 cores)
        out: str = "runs/race"                             # one run folder per rule and seed, race.json, race.md
        join: tuple = ()                                   # earlier race.json files (PATH or PATH=LABEL) whose runs
                                                           # join the tables, as rule@LABEL where a label is given
    cfg = parse_config(C, argv)
    check_ranges(cfg, at_least_one=("seeds", "evals", "heldout_prompts", "nfe", "jobs"))
    unknown = [r for r in cfg.rules if r not in RULES]
    if unknown or not (cfg.rules or cfg.join):
        raise ConfigError(f"--rules: unknown rule {unknown[0]!r}; choose from {', '.join(RULES)}" if unknown else
                          f"--rules is empty; choose from {', '.join(RULES)}")
    earlier = [read_race(spec, cfg) for spec in cfg.join]
    load_model(cfg.init)
    bench_folder(cfg.out, [cfg.init, *(spec.partition("=")[0] for spec in cfg.join)])
    point = lambda ckpt, cost: {**cost, **{k: v[0] for k, v in held_out(ckpt, None, cfg.heldout_prompts).items()
                                           if k in ("acc_all", "fidelity", "temporal", "instruction")}}
    zero = {"nfe": 0, "rollouts": 0, "steps": 0, "seconds": 0.0}
    start = point(cfg.init, zero)
    planned = [(r, s) for r in cfg.rules for s in range(cfg.seeds)]
    joined = join_runs(earlier, start, {f"{r}_s{s}" for r, s in planned})
    env = {**os.environ, **({"OMP_NUM_THREADS": "1"} if cfg.jobs > 1 else {})}

    def race_one(rule, seed):
        run, points = os.path.join(cfg.out, f"{rule}_s{seed}"), [dict(start)]
        for k in range(cfg.evals):
            cmd = [sys.executable, os.path.join(HERE, "reward_rl.py"), f"--init={cfg.init}", f"--seed={seed}",
                   *RACE_FLAGS, f"--max_nfe={round(cfg.nfe * (k + 1) / cfg.evals)}", *RULES[rule],
                   f"--out_dir={run}", "--resume=true" if k else "--overwrite=true"]
            done = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if done.returncode:
                raise ConfigError(f"race {rule} seed {seed}: {' '.join(cmd[1:])} failed: "
                                  f"{(done.stderr.strip().splitlines() or ['no output'])[-1]}")
            last = [r for r in read_log(os.path.join(run, "log.jsonl")) if "cost_nfe" in r][-1]
            points.append(point(os.path.join(run, "ckpt.safetensors"), {k[5:]: v for k, v in last.items()
                                                                         if k.startswith("cost_")}))
            print(f"race {rule} seed {seed} segment {k + 1}/{cfg.evals}: nfe {points[-1]['nfe']}, all attributes "
                  f"{points[-1]['acc_all']:.3f} (start {start['acc_all']:.3f}), fidelity {points[-1]['fidelity']:.3f} "
                  f"({start['fidelity']:.3f})", flush=True)
        return f"{rule}_s{seed}", {"rule": rule, "seed": seed, "flags": RULES[rule], "points": points,
                                   "health": health(read_log(os.path.join(run, "log.jsonl")))}

    if cfg.jobs > 1:   # runs side by side, each on one thread (its evaluations too): the cores' share is equal
        torch.set_num_threads(1)
    with ThreadPoolExecutor(cfg.jobs) as pool:
        runs = dict(pool.map(lambda job: race_one(*job), planned))
    runs.update(joined)
    os.makedirs(cfg.out, exist_ok=True)   # a race of joined runs alone has made no run folder in it
    result = {"start": start, "init": cfg.init, "nfe": cfg.nfe, "floor": FLOOR, "machine": machine(), "runs": runs,
              "table": race_table(start, runs)}
    write_text(os.path.join(cfg.out, "race.json"), json.dumps(result, indent=1))
    write_text(os.path.join(cfg.out, "race.md"), race_markdown(result))
    print(race_markdown(result))


def read_race(spec, cfg):
    """An earlier race to join (PATH or PATH=LABEL), checked before anything runs: it raced from --init on --nfe
    evaluations a run, so its points sit on the same axes as this race's."""
    path, _, label = spec.partition("=")
    try:
        result = json.load(open(path))
        init, nfe, runs = result["init"], result["nfe"], result["runs"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"--join: {path} is not a race.json written by race.py ({type(e).__name__})") from None
    if (init, nfe) != (cfg.init, cfg.nfe):
        raise ConfigError(f"--join: {path} raced from {init} on {nfe:,} evaluations a run; this race: "
                          f"{cfg.init} on {cfg.nfe:,}")
    named = {f"{name}@{label}" if label else name: {**run, "rule": f"{run['rule']}@{label}" if label else run["rule"]}
             for name, run in runs.items()}
    return path, result["start"], named


def join_runs(earlier, start, names):
    """The joined races' runs, each race's start equal to this one's (the same checkpoint and held-out clips give the
    same start; another code version or evaluation would not), each run's name its own: none of this race's `names`
    nor another joined run's, checked before this race runs."""
    joined = dict.fromkeys(names)
    for path, their_start, runs in earlier:
        moved = [k for k in ("acc_all", "fidelity", "temporal") if abs(their_start[k] - start[k]) > 1e-9]
        if moved:
            raise ConfigError(f"--join: {path} started at {moved[0]} {their_start[moved[0]]:.4f}, this race at "
                              f"{start[moved[0]]:.4f}: its evaluation differs")
        clash = sorted(set(joined) & set(runs))
        if clash:
            raise ConfigError(f"--join: a run named {clash[0]!r} stands in two races; give one a =LABEL")
        joined.update(runs)
    return {name: run for name, run in joined.items() if name not in names}


def health(log):
    """What a rule did to the policy, per iteration: the ratio's mean and spread (per SDE step where it has steps), the
    velocity norm against the reference's, the KL to it, the share of (group, head) pairs the std floor zeroed, and a
    floor's probe levels and multipliers."""
    its = [r for r in log if "cost_nfe" in r]
    return {k: [r.get(k) for r in its] for k in ("iter", "ratio", "ratio_std", "ratio_by_step", "v_norm_ratio", "kl_ref",
                                                 "zero_std_frac", "cost_nfe", "hold_level", "hold_multiplier")}


def within_floor(point, start):
    """Whether a held-out point kept fidelity and temporal within FLOOR of the start."""
    return all(point[h] >= start[h] - m - 1e-9 for h, m in FLOOR.items())


def reach(points, gain, floor=False):
    """The first evaluated point whose all-attributes gain over the start is at least `gain` (and, with floor, whose
    fidelity and temporal are within FLOOR of the start), and whether it was reached (else the run's last point: a
    lower bound on what reaching it costs)."""
    ok = lambda p: p["acc_all"] - points[0]["acc_all"] >= gain - 1e-9 and (not floor or within_floor(p, points[0]))
    hit = next((p for p in points[1:] if ok(p)), None)
    return (hit, True) if hit else (points[-1], False)


def race_table(start, runs):
    """{threshold: {rule: row}}: per rule the mean and spread over seeds of each cost to reach the threshold within the
    floors (and, for comparison, at any fidelity), fidelity and temporal there, and how many seeds reached it; then
    each rule's end of budget."""
    rules = sorted({r["rule"] for r in runs.values()}, key=lambda r: (list(RULES).index(r.split("@")[0]), r))
    table = {}
    for gain in GAINS:
        rows = {}
        for rule in rules:
            mine = [r["points"] for r in runs.values() if r["rule"] == rule]
            got, free = [reach(p, gain, floor=True) for p in mine], [reach(p, gain) for p in mine]
            rows[rule] = {"reached": sum(ok for _, ok in got), "seeds": len(got),
                          "reached_any_fidelity": sum(ok for _, ok in free),
                          "nfe_any_fidelity": sum(p["nfe"] for p, _ in free) / len(free),
                          **{k: sum(p[k] for p, _ in got) / len(got) for k in ("nfe", "rollouts", "steps", "seconds",
                                                                              "fidelity", "temporal")},
                          "nfe_range": [min(p["nfe"] for p, _ in got), max(p["nfe"] for p, _ in got)]}
        table[f"+{gain:.2f}"] = rows
    ends = {}
    for rule in rules:
        last = [r["points"][-1] for r in runs.values() if r["rule"] == rule]
        spread = lambda k: [round(min(p[k] - start[k] for p in last), 4), round(max(p[k] - start[k] for p in last), 4)]
        ends[rule] = {"nfe": sum(p["nfe"] for p in last) / len(last), "within_floor": sum(within_floor(p, start)
                                                                                           for p in last),
                      **{f"d_{k}": round(sum(p[k] - start[k] for p in last) / len(last), 4) for k in
                         ("acc_all", "fidelity", "temporal", "instruction")},
                      **{f"d_{k}_range": spread(k) for k in ("acc_all", "fidelity", "temporal")}}
    table["end"] = ends
    return table


def race_markdown(result):
    """The race as markdown: one table per gain (rule rows), the end of budget, then each run's health in a line."""
    start, floor = result["start"], ", ".join(f"{h} within {m}" for h, m in result["floor"].items())
    lines = [f"Start: `{result['init']}`, all attributes {start['acc_all']:.3f}, fidelity {start['fidelity']:.3f}, "
             f"temporal {start['temporal']:.3f}; {result['nfe']:,} network evaluations per run; floors: {floor} of "
             f"the start; {result['machine']}.", ""]
    for label, rows in ((k, v) for k, v in result["table"].items() if k != "end"):
        lines += [f"Gain {label} in all-attributes accuracy with {floor}:", "",
                  "| rule | reached | network evaluations (range) | minutes | fidelity there | temporal there | "
                  "at any fidelity: reached, evaluations |", "| --- | --- | --- | --- | --- | --- | --- |"]
        for rule, row in rows.items():
            bound = "" if row["reached"] == row["seeds"] else ">= "
            lines.append(f"| {rule} | {row['reached']}/{row['seeds']} | {bound}{row['nfe']:,.0f} ({row['nfe_range'][0]:,}"
                         f"-{row['nfe_range'][1]:,}) | {bound}{row['seconds'] / 60:.2f} | {row['fidelity']:.3f} | "
                         f"{row['temporal']:.3f} | {row['reached_any_fidelity']}/{row['seeds']}, "
                         f"{'' if row['reached_any_fidelity'] == row['seeds'] else '>= '}{row['nfe_any_fidelity']:,.0f} |")
        lines.append("")
    lines += ["End of budget, change from the start (mean over seeds, [min, max]):", "",
              "| rule | network evaluations | all attributes | fidelity | temporal | instruction | ends within floors |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    pm = lambda e, k: f"{e[f'd_{k}']:+.3f} [{e[f'd_{k}_range'][0]:+.3f}, {e[f'd_{k}_range'][1]:+.3f}]"
    for rule, e in result["table"]["end"].items():
        seeds = sum(r["rule"] == rule for r in result["runs"].values())
        lines.append(f"| {rule} | {e['nfe']:,.0f} | {pm(e, 'acc_all')} | {pm(e, 'fidelity')} | {pm(e, 'temporal')} | "
                     f"{e['d_instruction']:+.3f} | {e['within_floor']}/{seeds} |")
    lines += ["", "A `>=` cost: some seed never reached the gain within the floors in its budget (its last point "
              "counts, a lower bound).", "", "Per run, each evaluation: network evaluations: all-attributes gain / "
              "fidelity change / temporal change (* outside a floor):", ""]
    for name, run in result["runs"].items():
        cells = [f"{p['nfe']:,}: {p['acc_all'] - start['acc_all']:+.3f} / {p['fidelity'] - start['fidelity']:+.3f} / "
                 f"{p['temporal'] - start['temporal']:+.3f}{'' if within_floor(p, start) else ' *'}"
                 for p in run["points"][1:]]
        lines.append(f"- {name}: " + "; ".join(cells))
    lines.append("")
    for name, run in result["runs"].items():
        h = {k: [v for v in vals if v is not None] for k, vals in run["health"].items() if k != "ratio_by_step"}
        mean = lambda k: sum(h[k]) / len(h[k]) if h[k] else float("nan")
        lam = h["hold_multiplier"][-1] if h["hold_multiplier"] else {}
        lines.append(f"- {name}: ratio mean {mean('ratio'):.5f} (spread {mean('ratio_std'):.2e}); |v|/|v_ref| "
                     f"{h['v_norm_ratio'][-1] if h['v_norm_ratio'] else float('nan'):.4f} at the end; KL to the reference "
                     f"{h['kl_ref'][-1] if h['kl_ref'] else float('nan'):.2e}; std floor zeroed {mean('zero_std_frac'):.2f}"
                     + (f"; floor multipliers at the end {lam}" if lam else ""))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
