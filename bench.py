"""Benchmarks: speed and quality figures quoted in the README (never in the tests).

    python bench.py heads                     # seconds to score 64 default-preset clips with the reward heads
    python bench.py dpo_memory                # peak memory of one DPO step, joint vs decoupled backward
    python bench.py grpo --minutes=8          # cost-cutting GRPO vs vanilla Flow-GRPO for equal wall-clock
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
from stability import check_ranges, parse_config, run_cli


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
    print(json.dumps({"batch_pairs": cfg.batch_size, "preset": cfg.preset,
                      "peak_mb_joint": round(peak["joint"], 1), "peak_mb_decoupled": round(peak["decoupled"], 1),
                      "decoupled_over_joint": round(peak["decoupled"] / peak["joint"], 3)}))


def bench_grpo(argv):
    @dataclass
    class C:
        minutes: float = 8.0                              # wall-clock per variant
        init: str = "checkpoints/sft_small.safetensors"   # both start here
        out: str = "runs/bench_grpo"                      # one run folder per variant, and grpo.json
    cfg = parse_config(C, argv)
    check_ranges(cfg, positive=("minutes",))
    M.load_model(cfg.init)                                    # a missing or broken init is refused before any run
    variants = {
        "postflow_default": [],
        # every step an SDE step and trained, one update per rollout batch, no warmup, fp32, no curated term
        "vanilla_flow_grpo": ["--update=ppo", "--sde_window=0", "--rollout_steps=10", "--train_fraction=1.0", "--lr=1e-4",
                              "--epochs=1", "--minibatches=1", "--warmup=1", "--sft_weight=0"],
    }
    result = {}
    for name, flags in variants.items():
        run = os.path.join(cfg.out, name)
        subprocess.run([sys.executable, "reward_rl.py", f"--init={cfg.init}", f"--out_dir={run}", "--overwrite=true",
                        "--iters=1000", f"--max_minutes={cfg.minutes}", *flags], check=True)
        evals = [json.loads(l)["eval"] for l in open(os.path.join(run, "log.jsonl")) if '"eval"' in l]
        iters = [json.loads(l) for l in open(os.path.join(run, "log.jsonl")) if '"rollout_s"' in l]
        minutes = sum(r["rollout_s"] + r["train_s"] for r in iters) / 60
        first, last = evals[0], evals[-1]
        result[name] = {"flags": flags, "iterations": len(iters), "train_minutes": round(minutes, 2),
                        **{f"{k}_start": first[k] for k in ("acc_all", "instruction", "fidelity", "temporal")},
                        **{f"{k}_end": last[k] for k in ("acc_all", "instruction", "fidelity", "temporal")},
                        "acc_all_gain_per_minute": round((last["acc_all"] - first["acc_all"]) / minutes, 4),
                        "instruction_gain_per_minute": round((last["instruction"] - first["instruction"]) / minutes, 4)}
    with open(os.path.join(cfg.out, "grpo.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))


COMMANDS = {"heads": bench_heads, "dpo_memory": bench_dpo_memory, "grpo": bench_grpo}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        sys.exit(f"usage: python bench.py {{{'|'.join(COMMANDS)}}} [--key=value ...]")
    run_cli(COMMANDS[sys.argv[1]], sys.argv[2:])
