"""Benchmarks: speed and quality figures quoted in the README (never in the tests).

    python bench.py speed                     # make bench: the matmul peak, each step's share of it, a Stage II split
    python bench.py heads                     # seconds to score 64 default-preset clips with the reward heads
    python bench.py dpo_memory                # peak memory of one DPO step, joint vs decoupled backward
    python bench.py ablations                 # Stage II with one part removed at a time (make ablations)
    python bench.py fidelity --ckpt=A --ckpt=B  # where fidelity is lost: the sampler's guidance, the network's redraw
    python bench.py shard                     # each stage's memory per rank and time per step, DDP vs FSDP2 (2 ranks)
    python bench.py paired --ckpt=A --ckpt=B  # each stage's change clip for clip on diagnose's clips, paired errors
    python bench.py motion_words --ckpt=A     # how much the denoiser reads the direction word (swapped / true),
                                              # and the speed and direction its samples draw per speed word
"""
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass

import torch

import data
import model as M
import rewards as R
from checkpoint import file_hash, load_model, read_checkpoint
from diagnose import DiagnoseConfig, code_version, redraw
from judge import load_reward_model, rm_score
from distributed import PARALLEL
from cli import (ConfigError, check_output_path, check_ranges, claim_out_file, parse_config,
                 run_cli, subcommand, write_text)
from stability import native_bf16


def bench_heads(argv):
    @dataclass
    class C:
        clips: int = 64   # clips per scoring call
        repeats: int = 10 # timed calls (after one warm-up)
    cfg = parse_config(C, argv)
    check_ranges(cfg, at_least_one=("clips", "repeats"))
    b = data.make_batch("web", cfg.clips, seed=0)
    R.reward_heads(b.videos, b.prompts)
    times = []
    for _ in range(cfg.repeats):
        t0 = time.perf_counter()
        R.reward_heads(b.videos, b.prompts)
        times.append(time.perf_counter() - t0)
    times.sort()
    print(json.dumps({"clips": cfg.clips, "threads": torch.get_num_threads(), "median_s": round(times[len(times) // 2], 4),
                      "min_s": round(times[0], 4)}))


MEMORY_PROBE = r"""
import sys, torch
sys.path.insert(0, {here!r})
import data, model as M, preference as P
def status(key):
    return int(next(l for l in open('/proc/self/status') if l.startswith(key)).split()[1])  # kB
torch.manual_seed(0)
policy, ref = M.VideoDiT(M.preset({preset!r})), M.VideoDiT(M.preset({preset!r}))
world = data.WorldConfig(frames=policy.cfg.frames, size=policy.cfg.size)
a, b = data.make_batch('curated', {batch}, world=world), data.make_batch('web', {batch}, world=world)
gen = torch.Generator().manual_seed(0)
t, x0 = M.sample_t({batch}, gen), torch.randn(a.videos.shape, generator=gen)
open('/proc/self/clear_refs', 'w').write('5')   # reset the peak (VmHWM) to the current resident size
before = status('VmRSS')
P.dpo_step(policy, ref, a.videos, b.videos, a.tokens, torch.ones({batch}), t, x0, 2000.0, 0.0, {decoupled})
print(status('VmHWM') - before)
"""


def bench_dpo_memory(argv):
    @dataclass
    class C:
        batch_size: int = 16   # pairs in the step
        preset: str = "small"  # model preset
    cfg = parse_config(C, argv)
    check_ranges(cfg, at_least_one=("batch_size",))
    M.preset(cfg.preset)                                      # an unknown preset is refused here, not in the probe
    # Large blocks straight from mmap and back on free, so resident memory follows what torch holds.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    here = os.path.dirname(os.path.abspath(__file__))
    peak = {}
    for decoupled in (False, True):
        code = MEMORY_PROBE.format(here=here, preset=cfg.preset, batch=cfg.batch_size, decoupled=decoupled)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
        peak["decoupled" if decoupled else "joint"] = int(out.strip().splitlines()[-1]) / 1024
    result = {"batch_pairs": cfg.batch_size, "preset": cfg.preset, "peak_mb_joint": round(peak["joint"], 1),
              "peak_mb_decoupled": round(peak["decoupled"], 1), "decoupled_over_joint": round(peak["decoupled"] / peak["joint"], 3)}
    print(json.dumps(result))
    return result


def bench_folder(folder, inputs):
    """A benchmark's --out folder: a folder (not a file, not under one) holding none of its inputs, which its runs
    (each replaced with --overwrite=true) could otherwise reach."""
    check_output_path(folder, "--out", folder=True)
    here = os.path.realpath(folder)
    for f in (f for f in inputs if f):
        if os.path.commonpath([here, os.path.realpath(f)]) == here:
            raise ConfigError(f"--out={folder} holds {f}, an input of this benchmark; choose another --out")


HERE = os.path.dirname(os.path.abspath(__file__))


def read_log(path):
    return [json.loads(line) for line in open(path)]


# Why each part exists, shown by taking it out: Stage II from the shipped SFT checkpoint at a size that takes minutes
# on 2 CPU cores (half the prompts per iteration, held-out checks every 4 iterations so the hacking monitor can act).
ABLATIONS = {
    "defaults": ([], "the reference for the rows below it on the programmatic heads"),
    "floor_off": (["--hold="], "no floor: fidelity and temporal may fall as far as the reward buys"),
    "zscore_of_sum": (["--zscore=sum"], "one z-score of the weighted sum instead of one per head"),
    "curriculum": (["--curriculum=true"], "self-paced head weights (fidelity, then temporal, then instruction)"),
    "judge": (["--reward=rm"], "the learned judge alone as the reward, every stability term on"),
    "judge_unguarded": (["--reward=rm", "--kl_weight=0", "--ema_decay=0", "--sft_weight=0"],
                        "the learned judge without the KL, the EMA and the curated term"),
    "judge_no_reliability": (["--reward=rm", "--uncertainty=false"], "the learned judge, its members' agreement ignored"),
}
SMALL = ["--prompts_per_iter=4", "--eval_every=4", "--eval_prompts=8", "--ckpt_every=4", "--max_minutes=0"]


@torch.no_grad()
def diagnose_clips(net, prompts=16, seeds=DiagnoseConfig.seeds):
    """A policy's samples of diagnose's held-out clips (its prompts, noise, steps and guidance) and the oracle's
    reading of them: (prompts, splits, clips, obs)."""
    prompts, splits, noise = R.eval_set(net, prompts, seeds, DiagnoseConfig.seed)
    clips = M.sample(net, data.tokenize(prompts), noise, DiagnoseConfig.steps, DiagnoseConfig.cfg_scale)
    return prompts, splits, clips, R.oracle(clips, R.world_of(net.cfg))


def held_out(ckpt, judge, prompts=16):
    """The oracle and the learned judge (None: the oracle alone) on diagnose's held-out clips (by default its 64: 16 val
    + 16 unseen-combination prompts x 2 seeds, its noise): per-attribute accuracy and head means with standard errors,
    and judge minus oracle per head. Training's own evaluations use 16 clips, too few to tell most rows apart."""
    net, _ = load_model(ckpt)
    prompts, _, clips, obs = diagnose_clips(net, prompts)
    heads, ok = R.reward_heads(clips, prompts, obs=obs), R.check(clips, prompts, obs=obs)
    proxy = rm_score(load_reward_model(judge, net.cfg), clips, data.tokenize(prompts))[0] if judge else {}
    return {"clips": len(prompts), **{f"acc_{k}": R.mean_se(v) for k, v in ok.items()},
            **{h: R.mean_se(v) for h, v in heads.items()},
            "judge_minus_oracle": {h: round(float((proxy[h] - heads[h]).mean()), 4) for h in proxy}}


def held_out_once(run, judge, prompts):
    """held_out of a run's checkpoint, kept beside its folder (RUN.held_out.json: the run folder holds only what the run
    wrote) with the hashes it was made from (a rerun of the table reads it back; a new checkpoint or judge computes it
    again)."""
    key = [file_hash(os.path.join(run, "ckpt.safetensors")), file_hash(judge), prompts, code_version()]
    path = run.rstrip("/") + ".held_out.json"
    if os.path.exists(path):
        kept = json.load(open(path))
        if kept.get("key") == key:
            return kept["result"]
    result = held_out(os.path.join(run, "ckpt.safetensors"), judge, prompts)
    write_text(path, json.dumps({"key": key, "result": result}))
    return result


def summarise(run, iters):
    """The trained reward's first and last 4 iterations (weighted as trained), training's own evaluations, the
    guards' counts, and whether the run stopped before its last iteration."""
    recs = [json.loads(line) for line in open(os.path.join(run, "log.jsonl"))]
    evals, steps = [r["eval"] for r in recs if "eval" in r], [r for r in recs if "rollout_s" in r]
    trained = [trained_reward(r) for r in steps]
    return {"iterations": len(steps), "stopped_early": len(steps) < iters,
            "trained_reward_first4": round(sum(trained[:4]) / len(trained[:4]), 4),
            "trained_reward_last4": round(sum(trained[-4:]) / len(trained[-4:]), 4),
            "skipped": steps[-1]["skipped"], "rollbacks": steps[-1]["rollbacks"],
            "minutes": round(sum(r["rollout_s"] + r["train_s"] for r in steps) / 60, 2), "evals": evals}


def trained_reward(rec):
    """An iteration's reward as it was trained: its heads' rollout means under that iteration's weights."""
    return sum(w * rec[k][0] for w, k in zip(rec["weights"], [k for k in rec if k.startswith("reward_")]))


def verdict(row, ref, ref_name):
    """A row against its reference on the 64 held-out clips; a difference under two standard errors is called
    no difference, whichever way it points."""
    said = []
    for k, label in (("acc_all", "all attributes"), ("fidelity", "fidelity"), ("temporal", "temporal")):
        (a, sa), (b, sb) = row["end"][k], ref["end"][k]
        d, se = a - b, (sa ** 2 + sb ** 2) ** 0.5
        said.append(f"{label} {d:+.3f} ± {se:.3f}" + (" (no difference)" if abs(d) < 2 * se else ""))
    return f"vs {ref_name}: " + "; ".join(said)  # unpaired: the rows share clips and noise, so it errs toward "none"


def bench_ablations(argv):
    @dataclass
    class C:
        init: str = "checkpoints/sft_small.safetensors"           # every variant starts here
        reward_model: str = "checkpoints/reward_model.safetensors"  # the judge of the 'judge' rows
        iters: int = 24                                           # iterations per variant
        only: tuple = ()                                          # run these variants (default: all of ABLATIONS)
        out: str = "runs/ablations"                               # one run folder per variant, ablations.{json,md}
        heldout_prompts: int = 16                                 # per split, x 2 seeds: diagnose's 64 clips
    cfg = parse_config(C, argv)
    check_ranges(cfg, at_least_one=("iters", "heldout_prompts"))
    unknown = [n for n in cfg.only if n not in ABLATIONS]
    if unknown:
        raise ConfigError(f"unknown ablation {unknown[0]!r}; choose from {', '.join(ABLATIONS)}")
    load_model(cfg.init)
    load_reward_model(cfg.reward_model)                     # inputs are checked before minutes of work
    bench_folder(cfg.out, [cfg.init, cfg.reward_model])
    result = {"start": {"command": f"the input, {cfg.init}", **held_out(cfg.init, cfg.reward_model, cfg.heldout_prompts)}}
    for name in cfg.only or ABLATIONS:
        flags, why = ABLATIONS[name]
        run = os.path.join(cfg.out, name)
        cmd = ["reward_rl.py", f"--init={cfg.init}", f"--reward_model={cfg.reward_model}", f"--iters={cfg.iters}",
               *SMALL, *flags, f"--out_dir={run}"]
        # an interrupted `make ablations` picks up where it stopped: a row begun by this command from these very
        # files (its stamp beside the folder: the command, the input's and the judge's hashes) is kept or resumed;
        # a row from other inputs or settings is redone
        stamp, stamp_path = {"command": cmd, "init": file_hash(cfg.init), "judge": file_hash(cfg.reward_model)}, \
            os.path.join(cfg.out, f"{name}.made_from.json")
        same = os.path.exists(stamp_path) and json.load(open(stamp_path)) == stamp
        if not (same and os.path.exists(os.path.join(run, "ckpt.safetensors"))):
            resume = same and os.path.exists(os.path.join(run, "state.safetensors"))
            if not same and os.path.isdir(run):
                print(f"{name}: {run} was made from other inputs or settings; it is redone")
            os.makedirs(cfg.out, exist_ok=True)
            write_text(stamp_path, json.dumps(stamp))
            subprocess.run([sys.executable, os.path.join(HERE, cmd[0]), *cmd[1:],
                            "--resume=true" if resume else "--overwrite=true"], check=True)
        result[name] = {"why": why, "command": "python " + " ".join(cmd), **summarise(run, cfg.iters),
                        "end": held_out_once(run, cfg.reward_model, cfg.heldout_prompts)}
        ref = "judge" if name.startswith("judge_") else "defaults"
        if name != ref:
            result[name]["verdict"] = verdict(result[name], result[ref], ref) if ref in result else \
                f"no reference: the {ref} row was not run (--only)"
    os.makedirs(cfg.out, exist_ok=True)
    write_text(os.path.join(cfg.out, "ablations.json"), json.dumps(result, indent=1))
    write_text(os.path.join(cfg.out, "ablations.md"), ablation_table(result))
    print(ablation_table(result))


def ablation_rows(result):
    """(header, rows) of the ablation table, shared by ablations.md and report.py: each variant's end state on the
    64 held-out clips, its trained reward, the judge's gap, the guards and the verdict against its reference."""
    pm = lambda v, f="{:.3f}": f"{f.format(v[0])} ± {f.format(v[1])}"
    start, rows = result["start"], []
    rows.append(["start (the input)", "", pm(start["acc_all"], "{:.2f}"), pm(start["fidelity"]), pm(start["temporal"]),
                 "", ", ".join(f"{h} {v:+.3f}" for h, v in start["judge_minus_oracle"].items()), "", "", ""])
    for name, r in ((n, r) for n, r in result.items() if n != "start"):
        stop = " (stopped by the hacking monitor)" if r["stopped_early"] else ""
        rows.append([name, r["why"], pm(r["end"]["acc_all"], "{:.2f}"), pm(r["end"]["fidelity"]), pm(r["end"]["temporal"]),
                     f"{r['trained_reward_first4']:.3f} -> {r['trained_reward_last4']:.3f}",
                     ", ".join(f"{h} {v:+.3f}" for h, v in r["end"]["judge_minus_oracle"].items()),
                     f"{r['iterations']}{stop}", f"{r['rollbacks']} / {r['skipped']}", r.get("verdict", "the reference")])
    return (["variant", "what changes", "all attributes", "fidelity", "temporal", "trained reward (first 4 -> last 4 its)",
             "judge - oracle", "iterations", "rollbacks / skipped", "verdict"], rows)


def ablation_table(result):
    header, rows = ablation_rows(result)
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += ["", f"Each row's end checkpoint on {result['start']['clips']} of diagnose's held-out clips (mean ± standard "
                  "error); the verdict compares it with its reference, calling a difference under two standard errors "
                  "none. Commands (each run folder holds its log.jsonl, ckpt.safetensors and samples.gif):", ""]
    lines += [f"- {name}: `{r['command']}`" for name, r in result.items() if name != "start"]
    return "\n".join(lines) + "\n"


def timed(fn, repeats):
    """Median seconds of fn() over `repeats` calls, after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def matmul_peak(dtype, repeats):
    """GFLOP/s of the best square matmul this machine runs: the median of `repeats` calls, the larger of two sizes."""
    best = 0.0
    for n in (1024, 2048):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        best = max(best, 2 * n ** 3 / timed(lambda: a @ b, repeats) / 1e9)
    return round(best, 1)


def counted_flops(fn):
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def bench_speed(argv):
    @dataclass
    class C:
        preset: str = "small"       # model preset
        batch: int = 32             # clips per train step and per sampling call
        repeats: int = 5            # timed calls per figure (median)
        out: str = "runs/bench"     # speed.json, and the Stage II iterations it times
        init: str = "checkpoints/sft_small.safetensors"  # the Stage II run's start (its preset must be `preset`)
    cfg = parse_config(C, argv)
    check_ranges(cfg, at_least_one=("batch", "repeats"))
    load_model(cfg.init, expect=M.preset(cfg.preset))
    bench_folder(cfg.out, [cfg.init])
    torch.manual_seed(0)
    net = M.VideoDiT(M.preset(cfg.preset))
    mc = net.cfg
    result = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "threads": torch.get_num_threads(),
              "preset": cfg.preset, "parameters": sum(p.numel() for p in net.parameters()), "batch": cfg.batch,
              "bf16_native": native_bf16()}
    # the ceiling: a large square matmul, the best case for every kernel below. A CPU without bf16 units emulates
    # it far slower than fp32 (docs/results.md, Emulated bfloat16): no stage runs bf16 there, so it is not timed.
    precisions = (("fp32", torch.float32), ("bf16", torch.bfloat16)) if result["bf16_native"] else (("fp32", torch.float32),)
    # Measured before and after the figures, the larger kept: one reading of 1024 x 1024 alone once came out 95 GFLOP/s
    # on a machine that reads 130-178 (a busy or slow-clocked moment), which overstated every fraction below by half.
    peaks = {name: [matmul_peak(dtype, cfg.repeats * 4)] for name, dtype in precisions}
    world = data.WorldConfig(frames=mc.frames, size=mc.size)
    batch = data.make_batch("curated", cfg.batch, world=world)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)

    def train_step(bf16=False):
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            loss, _ = M.flow_loss(net, batch.videos, batch.tokens, gen)
        loss.mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    sample = lambda: M.sample(net, batch.tokens, torch.randn(batch.videos.shape, generator=gen), 20, 3.0)
    flops_train = counted_flops(train_step)
    flops_sample = counted_flops(sample)
    figures = [("train_step_fp32", train_step, flops_train, "fp32"),
               ("guided_sampling_20_steps_fp32", sample, flops_sample, "fp32")]
    if result["bf16_native"]:
        figures.insert(1, ("train_step_bf16", lambda: train_step(True), flops_train, "bf16"))
    else:
        result["bf16"] = "not timed: this CPU has no bf16 units (no avx512_bf16 / amx_bf16), so every stage runs fp32"
    seconds = {name: timed(fn, cfg.repeats) for name, fn, _, _ in figures}
    for name, dtype in precisions:
        peaks[name].append(matmul_peak(dtype, cfg.repeats * 4))
        result[f"matmul_peak_gflops_{name}"] = max(peaks[name])
        result[f"matmul_peak_readings_{name}"] = peaks[name]
    for name, fn, flops, peak in figures:
        sec = seconds[name]
        result[name] = {"seconds": round(sec, 4), "clips_per_s": round(cfg.batch / sec, 2), "gflop": round(flops / 1e9, 2),
                        "fraction_of_peak": round(flops / sec / 1e9 / result[f"matmul_peak_gflops_{peak}"], 3)}
    # a whole Stage II iteration at the defaults: rollout and update from its log, the reward heads timed here
    run = os.path.join(cfg.out, "stage_ii")
    subprocess.run([sys.executable, os.path.join(HERE, "reward_rl.py"), f"--init={cfg.init}", "--iters=3", "--eval_every=100",
                    "--eval_prompts=1", "--max_minutes=0", f"--out_dir={run}", "--overwrite=true"], check=True,
                   capture_output=True)
    its = [json.loads(line) for line in open(os.path.join(run, "log.jsonl")) if '"rollout_s"' in line][1:]  # warm ones
    clips = data.make_batch("web", 64, seed=0, world=world)
    result["stage_ii_iteration_s"] = {"rollout": round(sum(r["rollout_s"] for r in its) / len(its), 2),
                                      "reward": round(timed(lambda: R.reward_heads(clips.videos, clips.prompts, world), 3), 3),
                                      "update": round(sum(r["train_s"] for r in its) / len(its), 2)}
    result["dpo_memory"] = bench_dpo_memory([f"--preset={cfg.preset}"])
    os.makedirs(cfg.out, exist_ok=True)
    write_text(os.path.join(cfg.out, "speed.json"), json.dumps(result, indent=1))
    print(f"{result['machine']}, {result['threads']} threads, {result['date']}; preset {cfg.preset}, {cfg.batch} clips a call")
    for k in (k for k in result if k.startswith("matmul_peak_gflops")):
        readings = " / ".join(str(r) for r in result[k.replace("gflops", "readings")])
        print(f"  {k:34s} {result[k]:8.1f} GFLOP/s (readings before / after the figures: {readings})")
    for k in (k for k in result if k.startswith(("train_step", "guided_sampling"))):
        r = result[k]
        print(f"  {k:34s} {r['seconds']:8.3f} s  {r['clips_per_s']:7.2f} clips/s  {r['fraction_of_peak']:6.1%} of peak")
    print("  stage II iteration (s)             " + ", ".join(f"{k} {v}" for k, v in result["stage_ii_iteration_s"].items()))
    print(f"  DPO memory, decoupled / joint      {result['dpo_memory']['decoupled_over_joint']:.3f}")
    print(f"wrote {cfg.out}/speed.json")


@dataclass
class FidelityConfig:
    ckpt: tuple = ("checkpoints/base_small.safetensors",)  # checkpoints to probe (repeat --ckpt=)
    out: str = "runs/bench/fidelity.json"                  # every figure, per checkpoint


@torch.no_grad()
def bench_fidelity(argv):
    """Where a checkpoint's fidelity is lost, on diagnose's 64 held-out clips (its prompts and noise): the same
    network under several guidance settings (the sampler's share), and the clean clip it predicts from a clip
    2 % noised (t = 0.98: the network's own redraw, no sampler at all; the data scores 0 on every part)."""
    cfg = parse_config(FidelityConfig, argv)
    for path in cfg.ckpt:
        read_checkpoint(path)
    claim_out_file(cfg.out, True, inputs=cfg.ckpt)     # its figures are remade each time: replaced, never an input
    dcfg = DiagnoseConfig()
    prompts, _ = R.eval_prompts(dcfg.prompts, dcfg.seeds, dcfg.seed)
    tokens, result = data.tokenize(prompts), {}
    parts = lambda obs: {k: round(float(v.mean()), 3) for k, v in R.fidelity_parts(obs).items()}  # mean per part
    settings = {"cfg 3 every step": (3.0, 1.0), f"cfg 3 until t={M.CFG_UNTIL}": (3.0, M.CFG_UNTIL),
                "cfg 4 until t=0.5": (4.0, 0.5), "cfg 1.5 every step": (1.5, 1.0)}
    for path in cfg.ckpt:
        net, _ = load_model(path)
        world, noise, rows = R.world_of(net.cfg), R.eval_set(net, dcfg.prompts, dcfg.seeds, dcfg.seed)[2], {}
        for name, (w, until) in settings.items():
            clips = M.sample(net, tokens, noise, dcfg.steps, w, cfg_until=until)
            obs = R.oracle(clips, world)
            heads, ok = R.reward_heads(clips, prompts, obs=obs), R.check(clips, prompts, obs=obs)
            rows[name] = {"all_attributes": R.mean_se(ok["all"]), **{h: R.mean_se(v) for h, v in heads.items()},
                          "fidelity_parts": parts(obs)}
        drawn, truth = redraw(net, len(prompts), dcfg.seed, world)
        rows["redraw at t=0.98"] = {"mse": round(float(((drawn - truth.videos) ** 2).mean()), 5),
                                    "fidelity_parts": parts(R.oracle(drawn, world))}
        result[path] = rows
        print(path)
        for name, r in rows.items():
            print(f"  {name:20s} " + (f"fidelity {r['fidelity'][0]:.3f}  temporal {r['temporal'][0]:.3f}  all-attributes "
                                      f"{r['all_attributes'][0]:.3f}  " if "fidelity" in r else f"mse {r['mse']:.5f}  ")
                  + "parts " + ", ".join(f"{k} {v:.2f}" for k, v in r["fidelity_parts"].items()))
    os.makedirs(os.path.dirname(cfg.out) or ".", exist_ok=True)
    write_text(cfg.out, json.dumps({"machine": machine(), "date": time.strftime("%Y-%m-%d"), "checkpoints": result}, indent=1))
    print(f"wrote {cfg.out}")


# ----------------------------------------------------------------------------- paired changes, the motion words
@dataclass
class PairedConfig:
    ckpt: tuple = ()          # checkpoints in stage order (repeat --ckpt=): each is compared with the one before
    prompts: int = 16         # diagnose's held-out set: prompts per split
    seeds: int = 2            # noise seeds per prompt


@torch.no_grad()
def bench_paired(argv):
    """Each stage's change clip for clip on diagnose's held-out clips: every checkpoint samples the same prompts
    from the same noise, so the change's standard error is the per-clip differences' (a paired test), not the two
    means' errors combined (diagnose's and the report's, which ignore that the clips are shared). Fidelity and
    temporal also per half: the trained combinations' prompts (val) and the never-trained ones (unseen); fidelity's
    penalties (edges, background, palette) each."""
    cfg = parse_config(PairedConfig, argv)
    check_ranges(cfg, at_least_one=("prompts", "seeds"))
    if len(cfg.ckpt) < 2:
        raise ConfigError("give at least two checkpoints (--ckpt=A --ckpt=B): a change needs a before and after")
    per_clip, result = [], {"changes": []}
    for path in cfg.ckpt:
        net, _ = load_model(path)
        prompts, splits, clips, obs = diagnose_clips(net, cfg.prompts, cfg.seeds)  # the same for every checkpoint
        ok = R.check(clips, prompts, obs=obs)
        heads = {h: v.float() for h, v in R.reward_heads(clips, prompts, obs=obs).items()}
        unseen = torch.tensor([s == "heldout" for s in splits])
        # the held heads on each half: trained combinations (val) and never-trained ones (unseen)
        halves = {f"{h}, {name}": heads[h][m] for h in ("fidelity", "temporal")
                  for name, m in (("val", ~unseen), ("unseen", unseen))}
        # fidelity's penalties (0 = perfect; a rise is a loss): which part of it a stage moved
        misses = {f"fidelity miss: {k}": v for k, v in R.fidelity_parts(obs).items()}
        per_clip.append({"all attributes": ok["all"].float(), "direction": ok["direction"].float(), **heads,
                         **halves, **misses})
    stages = list(zip(cfg.ckpt, per_clip))
    for (a, before), (b, after) in zip(stages, stages[1:]):
        print(f"{a} -> {b}")
        for k in before:
            d = after[k] - before[k]                                                  # (clips,)
            mean, se = float(d.mean()), float(d.std() / len(d) ** 0.5)
            row = dict(before=a, after=b, metric=k, change=round(mean, 4), paired_se=round(se, 4),
                       up=int((d > 0).sum()), down=int((d < 0).sum()))
            result["changes"].append(row)
            ses = f"{mean / se:+.1f} se" if se > 0 else "no clip changed"
            print(f"  {k:15s} {float(before[k].mean()):.3f} -> {float(after[k].mean()):.3f}  change {mean:+.4f} "
                  f"± {se:.4f} ({ses}; {row['up']} clips up, {row['down']} down)")
    return result


@dataclass
class MotionWordsConfig:
    ckpt: tuple = ()          # checkpoints to measure (repeat --ckpt=)


@torch.no_grad()
def bench_motion_words(argv):
    """How much each checkpoint's denoiser reads the direction word: its flow error on curated clips (first frame
    given as context) with the caption's direction swapped for the opposite one, over the error with the true
    caption, at four t (a ratio of 1: the word is ignored). Then what its sampler draws for each speed word on
    diagnose's held-out clips (from noise, no context): the object's speed against the asked one, and how often
    its direction is right. Returns {checkpoint: {speed word: (px per frame, asked, direction accuracy)}}."""
    cfg = parse_config(MotionWordsConfig, argv)
    if not cfg.ckpt:
        raise ConfigError("give a checkpoint (--ckpt=A, repeat for more)")
    opposite = {"left": "right", "right": "left", "up": "down", "down": "up"}
    drawn = {}
    for path in cfg.ckpt:
        net, _ = load_model(path)
        b = data.make_batch("curated", 64, seed=123, world=R.world_of(net.cfg))
        x1 = net.encode(b.videos)
        swapped = [" ".join(opposite.get(w, w) for w in p.split()) for p in b.prompts]
        captions = [data.tokenize(p) for p in (b.prompts, swapped)]
        ctx_mask = torch.arange(x1.shape[2])[None].expand(len(x1), -1) < 1             # (B, F): the first frame
        gen, ratios = torch.Generator().manual_seed(1), []
        for t in (0.2, 0.4, 0.6, 0.8):
            x0, tt = torch.randn(x1.shape, generator=gen), torch.full((len(x1),), t)
            err = [M.flow_error(net, x1, x0, tt, tokens, x1, ctx_mask).mean() for tokens in captions]
            ratios.append(f"t={t}: x{float(err[1] / err[0]):.2f}")
        print(f"{path}: direction swapped / true caption, flow error  " + ", ".join(ratios))
        prompts, _, clips, obs = diagnose_clips(net, DiagnoseConfig.prompts)
        speed, right = obs["velocity"].norm(dim=-1), R.check(clips, prompts, obs=obs)["direction"].float()
        asked = torch.tensor([data.parse_prompt(p)["speed"] for p in prompts])     # (clips,) speed word index
        drawn[path] = {w: (round(float(speed[asked == k].mean()), 3), round(float(R.SPEED_PX[k] * obs["scale"]), 3),
                           round(float(right[asked == k].mean()), 3))
                       for k, w in enumerate(data.SPEED_NAMES) if (asked == k).any()}
        print(f"{path}: drawn from noise, px per frame (asked), direction accuracy  " + ", ".join(
            f"{w} {v:.2f} ({a:.2f}), {acc:.3f}" for w, (v, a, acc) in drawn[path].items()))
    return drawn


# ----------------------------------------------------------------------------- memory and time, whole or sharded
def shard_stage_args(stage, init, out, steps):
    """A short run of one stage for bench_shard: its loop, checkpoint and hand-off, with evaluation kept small."""
    if stage == "sft":
        return ["sft.py", f"--init={init}", f"--steps={steps}", "--batch_size=16", f"--ckpt_every={steps}",
                f"--log_every={steps}", "--val_clips=16", "--sample_steps=2", "--warmup=1"]
    if stage == "rl":
        return ["reward_rl.py", f"--init={init}", f"--iters={steps}", "--eval_every=1000000", "--eval_prompts=2",
                "--eval_steps=2", f"--ckpt_every={steps}", "--max_minutes=0", "--bf16=false"]
    return ["preference.py", f"--init={init}", "--any_input=true", "--pair_prompts=4", "--samples_per_prompt=3", "--margin=0",
            "--sample_steps=2", f"--steps={steps}", "--batch_size=8", f"--ckpt_every={steps}", f"--log_every={steps}",
            "--eval_prompts=2", "--eval_steps=2", "--warmup=1"]


def seconds_per_step(stage, log):
    """The loop's own seconds per optimizer step (SFT, DPO) or per iteration (Stage II: rollouts and updates)."""
    if stage == "rl":
        its = [r for r in log if "rollout_s" in r]
        return sum(r["rollout_s"] + r["train_s"] for r in its) / len(its)
    last = [r for r in log if "step" in r][-1]
    return last["elapsed_s"] / last["step"]


def bench_shard(argv):
    @dataclass
    class C:
        policies: tuple = ("small", "wan")  # 'small': the shipped SFT DiT; 'wan': the tiny Wan with LoRA (the extra)
        parallel: tuple = ("ddp", "fsdp")   # how the ranks hold the model (stages' --parallel)
        ranks: int = 2                      # torchrun processes on this machine
        steps: int = 4                      # optimizer steps (SFT, DPO) or iterations (Stage II) per run
        out: str = "runs/shard"             # one run folder per policy, stage and setting; shard.json, shard.md
    cfg = parse_config(C, argv)
    check_ranges(cfg, at_least_one=("ranks", "steps"))
    bad = [p for p in cfg.policies if p not in ("small", "wan")] + [p for p in cfg.parallel if p not in PARALLEL]
    if bad or not cfg.policies or not cfg.parallel:
        raise ConfigError(f"--policies takes small and wan, --parallel {', '.join(PARALLEL)}; got {bad or 'none'}")
    inits = {"small": os.path.join(HERE, "checkpoints", "sft_small.safetensors"), "wan": os.path.join(cfg.out, "wan_init.safetensors")}
    bench_folder(cfg.out, [inits["small"]])
    if "wan" in cfg.policies:
        subprocess.run([sys.executable, os.path.join(HERE, "adapters.py"), f"--out={inits['wan']}", "--overwrite=true"],
                       check=True, capture_output=True)
    env, rows = {**os.environ, "OMP_NUM_THREADS": "1"}, []
    for policy in cfg.policies:
        for stage in ("sft", "rl", "dpo"):
            for parallel in cfg.parallel:
                run = os.path.join(cfg.out, f"{policy}_{stage}_{parallel}")
                args = shard_stage_args(stage, inits[policy], run, cfg.steps)
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={cfg.ranks}",
                       os.path.join(HERE, args[0]), *args[1:], f"--out_dir={run}", f"--parallel={parallel}",
                       "--overwrite=true", "--device=cpu"]
                r = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if r.returncode:
                    raise ConfigError(f"{policy} {stage} --parallel={parallel} failed: {r.stderr.strip().splitlines()[-1]}")
                log = read_log(os.path.join(run, "log.jsonl"))
                memory = next(r["memory"] for r in reversed(log) if "memory" in r)
                rows.append({"policy": policy, "stage": stage, "parallel": parallel, "ranks": cfg.ranks,
                             "s_per_step": round(seconds_per_step(stage, log), 3), **memory})
                print(json.dumps(rows[-1]))
    result = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "steps": cfg.steps, "rows": rows}
    write_text(os.path.join(cfg.out, "shard.json"), json.dumps(result, indent=1))
    lines = [f"{cfg.ranks} CPU ranks (gloo) on {result['machine']}; {cfg.steps} steps or iterations per run.", "",
             "| policy | stage | parallel | weights MB / rank | optimizer MB / rank | peak RSS MB (max over ranks) | s / step |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['policy']} | {r['stage']} | {r['parallel']} | {r['weights_mb_per_rank']} | {r['optimizer_mb_per_rank']} | "
              f"{r['peak_mb']} | {r['s_per_step']} |" for r in rows]
    write_text(os.path.join(cfg.out, "shard.md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


def machine():
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return f"{cpu}, {os.cpu_count()} cores, GPU {gpu}, torch {torch.__version__}"


COMMANDS = {"speed": bench_speed, "heads": bench_heads, "dpo_memory": bench_dpo_memory, "ablations": bench_ablations,
            "fidelity": bench_fidelity, "shard": bench_shard, "paired": bench_paired, "motion_words": bench_motion_words}

if __name__ == "__main__":
    run_cli(lambda argv: subcommand(COMMANDS, "bench.py", argv)(argv[1:]), sys.argv[1:])
