"""Diagnostics: every checkpoint judged side by side by the oracle on the held-out evaluation set, and the advice
that hands the weakest axis to the next stage.

    python diagnose.py --ckpt=checkpoints/base_small.safetensors --ckpt=runs/sft/ckpt.safetensors --out=runs/diagnose
    python diagnose.py advise --diagnose=runs/diagnose --stage=rl     # the flags that point Stage II at that axis

For each checkpoint: the heads and per-attribute accuracy (by split), VBench-named dimensions, each head's parts
beside the training data's own and the network's redraw (why an axis is weak), drift by frame and by chunk of long
clips, diversity across seeds, the response to guidance, image-to-video adherence, and the learned judge's gap to the
oracle; then a recommendation (which stage, which axis). A diagnosis is kept by content in --cache (the checkpoint's
bytes, the settings, the judge's bytes and the code), so a repeat is read back; the base's ships in
checkpoints/diagnoses.
"""
import hashlib
import json
import math
import os
import shlex
import sys
import time
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

import data
import model as M
import preference
import reward_rl
from checkpoint import CheckpointError, column_names, file_hash, load_model, stage_family
from judge import load_reward_model, rm_score
from rewards import (HEADS, SPEED_PX, check, eval_prompts, eval_set, fidelity, mean_se, noise_for, oracle, presence, reward_heads,
                     targets, temporal_parts, world_of, wrap)
from cli import (ConfigError, UserError, atomic_write, check_output_path, check_ranges,
                 claim_out_dir, claim_out_file, command_line, describe, parse_config,
                 release_run_folders, run_cli, same_file, write_text)


# VBench's dimension names where one fits, so video people can read the table without a legend.
QUALITY = ["subject_consistency", "background_consistency", "temporal_flickering", "motion_smoothness",
           "dynamic_degree", "imaging_quality"]


SEMANTIC = ["color", "object_class", "motion_direction", "speed"]


def vbench_dimensions(videos, prompts, obs):
    """Per-clip scores in [0, 1] named after VBench's Quality and Semantic dimensions."""
    parts = temporal_parts(obs)
    ok = check(videos, prompts, obs=obs)
    moving = obs["velocity"].norm(dim=-1) > 0.5 * SPEED_PX[0] * obs["scale"]
    return {
        # the object keeps its colour and shape from frame to frame (identity does not change)
        "subject_consistency": ((obs["frame_colour"] == obs["colour"][:, None])
                                & (obs["frame_shape"] == obs["shape"][:, None])).float().mean(1) * presence(obs),
        "background_consistency": torch.exp(-parts["background"]),
        "temporal_flickering": torch.exp(-parts["flicker"]),
        "motion_smoothness": torch.exp(-parts["acceleration"]),
        "dynamic_degree": moving.float(),
        "imaging_quality": fidelity(obs, None),
        "color": ok["colour"].float(), "object_class": ok["shape"].float(),
        "motion_direction": ok["direction"].float(), "speed": ok["speed"].float(),
    }


@dataclass
class DiagnoseConfig:
    ckpt: tuple = ("checkpoints/base_small.safetensors",)  # checkpoints to compare (repeat --ckpt=, or A,B)
    out: str = "runs/diagnose"  # diagnostics.json, diagnostics.md, config.json, grid.gif
    prompts: int = 16           # eval prompts per split (val combinations and unseen held-out ones)
    seeds: int = 2              # noise seeds per prompt
    steps: int = 20             # Euler steps
    cfg_scale: float = 3.0      # guidance weight of the main samples
    cfg_until: float = -1.0     # guidance stops at this t (1.0 = every step; -1 = the policy's own: DiT 0.6, Wan 1.0)
    long_clips: int = 4         # clips continued to 4x their length for drift_by_chunk (each costs 7 clips)
    diversity_seeds: int = 8    # seeds per prompt for the diversity spread
    probe_clips: int = 16       # clips of the main set (spread over its prompts) for the guidance sweep and image-to-video
    reward_model: str = "checkpoints/reward_model.safetensors"  # learned ensemble for proxy_reward ('' = none)
    seed: int = 0               # eval seed: the same prompts and noise for every checkpoint
    overwrite: bool = False     # replace an existing output folder
    cache: str = ""             # a folder keeping each checkpoint's diagnosis by content (file, settings, judge,
                                # heads, code): a repeat is read back, not recomputed ('' = off)
    shipped: str = "checkpoints/diagnoses"  # read-only diagnoses shipped with the checkpoints, by the same key: the


def head_parts(obs, want, heads=HEADS):
    """Each head broken into its parts, each penalty's mean over the clips (0 = perfect): {head: {part: float}}.
    A head without a breakdown (a fork's) is one part, 1 - its score."""
    out = {}
    for name, h in heads.items():
        parts = h.parts(obs, want) if h.parts else {"1 - score": 1 - h.fn(obs, want).clamp(0, 1)}
        out[name] = {k: round(float(v.nanmean().nan_to_num(0)), 4) for k, v in parts.items()}  # NaN: never asked
    return out


def data_parts(world, seed=0, n=64):
    """head_parts on the training data itself, each clip against its own caption (a web caption may be wrong or
    leave words out: what the base learned from): where each part sits for a model that learned its data
    perfectly. No sampling, so diagnose computes it once. {"curated": {head: {part: float}}, "web": ...}"""
    batches = {split: data.make_batch(split, n, seed=seed, world=world) for split in ("curated", "web")}
    return {split: head_parts(oracle(b.videos, world), targets(b.prompts, n)) for split, b in batches.items()}


@torch.no_grad()
def redraw(net, n, seed, world):
    """The network alone, no sampler: the clean clips it predicts from n validation clips 2 % noised (t = 0.98), and
    that batch of clips. The data scores 0 on every part; what the redraw misses, the network cannot draw yet."""
    clean = data.make_batch("val", n, seed=seed + 5, world=world)
    x1 = net.encode(clean.videos)
    noised = 0.98 * x1 + 0.02 * torch.randn(x1.shape, generator=torch.Generator().manual_seed(seed))
    return net.decode(net(noised, torch.full((n,), 0.98), clean.tokens)), clean


@torch.no_grad()
def diagnose_checkpoint(path, cfg, bar, rm=None, ref=None):
    """Every diagnostic for one checkpoint on the fixed eval set; ref: data_parts for the parts' comparison
    (computed here if not given). Returns (metrics dict, main clips)."""
    net, meta = load_model(path)
    mc, world = net.cfg, world_of(net.cfg)
    prompts, splits, noise = eval_set(net, cfg.prompts, cfg.seeds, cfg.seed)
    tokens = data.tokenize(prompts)
    until = None if cfg.cfg_until == -1 else cfg.cfg_until
    sample = lambda tok, nz, w, **kw: M.sample(net, tok, nz, cfg.steps, w, cfg_until=until, **kw)

    videos = sample(tokens, noise, cfg.cfg_scale); bar.update()
    obs = oracle(videos, world)
    heads = reward_heads(videos, prompts, obs=obs)
    ok = check(videos, prompts, obs=obs)
    dims = vbench_dimensions(videos, prompts, obs)
    heldout = torch.tensor([s == "heldout" for s in splits])
    out = {name: mean_se(v) for name, v in heads.items()}
    out["instruction_by_attribute"] = {k: mean_se(ok[k]) for k in list(data.ATTRIBUTES) + ["all"]}
    out["instruction_by_split"] = {"val": mean_se(heads["instruction"][~heldout]),
                                   "heldout": mean_se(heads["instruction"][heldout])}
    out["vbench"] = {k: mean_se(v) for k, v in dims.items()}
    out["quality_score"] = round(float(sum(dims[k].mean() for k in QUALITY) / len(QUALITY)), 4)
    out["semantic_score"] = round(float(sum(dims[k].mean() for k in SEMANTIC) / len(SEMANTIC)), 4)
    # why: every head's parts beside the training data's own score on each (what recommendation reads)
    want = targets(prompts, len(prompts))
    ref = ref or data_parts(world, cfg.seed)
    # ... and the network's own redraw of clean clips: a part it already misses there is the network's to learn
    # (data, steps), not the sampler's or a reward's (docs/results.md, Where fidelity was lost)
    drawn, clean = redraw(net, len(prompts), cfg.seed, world)
    drawn = head_parts(oracle(drawn, world), targets(clean.prompts, len(prompts)))
    out["parts"] = {h: {p: {"model": v, "curated": ref["curated"][h][p], "web": ref["web"][h][p], "redraw": drawn[h][p]}
                        for p, v in ps.items()} for h, ps in head_parts(obs, want).items()}

    # drift: per frame, does the object still match the prompt and look like a clean render?
    ident = (obs["frame_colour"] == want["colour"][:, None]) & (obs["frame_shape"] == want["shape"][:, None])
    out["drift_by_frame"] = {"identity": [round(float(x), 4) for x in ident.float().mean(0)],
                             "edge_error": [round(float(x), 4) for x in obs["shape_err"].amin(-1).mean(0)]}
    # ... and by chunk for clips continued to 4x their length with context frames
    overlap = mc.frames // 2
    chunks = 1 + 3 * mc.frames // (mc.frames - overlap)
    n_long = min(cfg.long_clips, len(prompts))
    long = M.sample_long(net, tokens[:n_long], torch.Generator().manual_seed(cfg.seed + 1), chunks, cfg.steps,
                         cfg.cfg_scale, overlap, until); bar.update()
    by_chunk = []
    for c in range(long.shape[2] // mc.frames):
        h = reward_heads(long[:, :, c * mc.frames:(c + 1) * mc.frames], prompts[:n_long], world)
        by_chunk.append({k: round(float(v.mean()), 4) for k, v in h.items()})
    out["drift_by_chunk"] = by_chunk

    # diversity: spread across seeds for one prompt per split (collapse shows as 0)
    spread = []
    for p in (prompts[0], prompts[-1]):
        clips = sample(data.tokenize([p] * cfg.diversity_seeds), noise_for(cfg.diversity_seeds, net, cfg.seed + 2),
                       cfg.cfg_scale)
        pos = oracle(clips, world)["center"][:, 0]                                   # first-frame positions
        pix = torch.cdist(clips.flatten(1), clips.flatten(1)) / math.sqrt(clips[0].numel())
        spread.append((pix.sum() / (len(clips) ** 2 - len(clips)), pos.std(0).mean() / mc.size))
    bar.update()
    out["diversity"] = {"pixel_rms": round(float(sum(s[0] for s in spread) / 2), 4),
                        "position_std": round(float(sum(s[1] for s in spread) / 2), 4)}

    # controllability: the same noise at other guidance weights, and image-to-video from a true first frame, on a
    # spread-out subset of the main clips (each probe costs a full sampling run of its clips: a quarter of the main set's)
    probe = torch.arange(len(prompts))[:: max(1, len(prompts) // cfg.probe_clips)][:cfg.probe_clips]
    probe_prompts = [prompts[i] for i in probe]
    out["cfg_response"] = {str(cfg.cfg_scale): round(float(heads["instruction"][probe].mean()), 4)}
    for w in (1.0, 2 * cfg.cfg_scale):
        clips = sample(tokens[probe], noise[probe], w)
        out["cfg_response"][str(w)] = round(float(reward_heads(clips, probe_prompts, world)["instruction"].mean()), 4)
    bar.update()
    truth = data.make_batch("val", len(probe), seed=cfg.seed + 3, world=world)
    mask = (torch.arange(mc.frames) < 1)[None].expand(len(probe), -1)
    clips = sample(truth.tokens, noise[probe], cfg.cfg_scale, ctx=truth.videos, ctx_mask=mask)
    o = oracle(clips, world)
    kept = (o["frame_colour"][:, 1:] == truth.attrs["colour"][:, None]).all(1) & \
           (o["frame_shape"][:, 1:] == truth.attrs["shape"][:, None]).all(1)
    jump = wrap(o["center"][:, 1] - truth.centers[:, 0], mc.size).norm(dim=-1)
    out["context_adherence"] = mean_se(kept & (jump < 2 * SPEED_PX[1] * mc.size / 32 + 1)); bar.update()

    # proxy vs oracle: what the learned judge says against what is true (reward hacking shows as a gap)
    if rm is not None:
        proxy, std = rm_score(rm, videos, tokens)
        out["proxy_reward"] = {k: mean_se(proxy[k]) for k in proxy}
        out["proxy_uncertainty"] = {k: round(float(std[k].mean()), 4) for k in std}
        out["proxy_oracle_gap"] = {k: round(float((proxy[k] - heads[k]).mean()), 4) for k in proxy if k in heads}
    else:
        out["proxy_reward"] = out["proxy_oracle_gap"] = None
    out["recommendation"] = recommendation({h: out[h][0] for h in HEADS}, out["parts"], path,
                                           meta.get("lineage", {}).get("stage", ""))
    out["lineage"] = meta.get("lineage", {})
    return out, videos


MATCHED = 0.1  # within a tenth of its tolerance of the curated data's score, a part has nothing left to learn from it


RANKABLE = 0.05  # under this mean score most samples score ~0 on the head: little for a reward to rank, data first


def recommendation(axes, parts=None, ckpt="CKPT", stage=""):
    """What to run next, from what was measured. axes: head -> mean score; parts: diagnose's {head: {part: {"model",
    "curated", "web"}}}, penalties in tolerances (0 = perfect); stage: the checkpoint's lineage stage. The rule:
      axis     the weakest head with a part more than MATCHED above the curated data's score; heads whose every
               part matches it are named and passed over (a head missing from parts never matches)
      part     that head's part furthest above the curated data's score
      command  the network's own redraw of a clean clip (t = 0.98, no sampler) already shows at least half of the
               part's excess over the curated data: the network cannot draw it yet -> more Stage I SFT (or a base
               pretrained longer). The part lies between the web and the curated data's scores, nearer the web's:
               a defect learned from the pretraining data, which curated clips teach away -> more Stage I SFT.
               Otherwise the data does not explain it (worse than even the web data: the sampler adds it), so a
               reward on samples must remove it -> Stage II with the head weighted up, or for a checkpoint Stage II already made, Stage III
               with a judge weighted toward the head; unless the head is under RANKABLE, where a reward has nothing
               to rank -> SFT. Every head matched: preferences are what is left, Stage III.
    Returns {"text", "command", "axis", "part"}."""
    parts = parts or {}
    gaps = {h: {p: v["model"] - v["curated"] for p, v in parts.get(h, {}).items()} for h in axes}
    matched = [h for h in axes if gaps[h] and max(gaps[h].values()) <= MATCHED]
    axis = min((h for h in axes if h not in matched), key=axes.get, default=None)
    part = max(gaps[axis], key=gaps[axis].get) if axis and gaps[axis] else None
    rl_done = stage_family(stage) in ("rl", "dpo")                           # made by Stage II (or III after it)
    refinable = stage_family(stage) in preference.INPUT_FAMILIES  # Stage III takes it as it is
    run = lambda script, *flags: " ".join(["python", script, shlex.quote(f"--init={ckpt}"), *flags])
    if axis is None:
        return {"axis": None, "part": None, "text": "every part of every head matches the curated data: preferences "
                "are what is left to learn, Stage III DPO on on-policy pairs", "command": run(
                    "preference.py", "--out_dir=runs/next_dpo", *([] if refinable else ["--any_input=true"]))}
    text = f"weakest axis: {axis} ({axes[axis]:.3f})" + (f", after {', '.join(matched)} (matching the curated data)"
                                                        if matched else "")
    v = parts.get(axis, {}).get(part)
    web, model = (v["web"] - v["curated"], v["model"] - v["curated"]) if v else (0.0, 0.0)
    if v:
        text += f"; worst part: {part} {v['model']:.2f} (curated data {v['curated']:.2f}, web {v['web']:.2f})"
    learned_defect = web > MATCHED and web / 2 < model <= web + MATCHED
    drawn = v["redraw"] - v["curated"] if v and v.get("redraw") is not None else 0.0
    undrawn = drawn > MATCHED and drawn >= model / 2
    if undrawn or learned_defect or axes[axis] < RANKABLE:
        why = (f"the network's own redraw of a clean clip already misses it ({v['redraw']:.2f}): the network's to learn, "
               "not the sampler's or a reward's" if undrawn else
               "nearer the web data's score: a defect learned in pretraining" if learned_defect else
               "too low for a reward to rank samples by") + ", more Stage I SFT on curated clips"
        command = run("sft.py", "--data=curated", "--steps=400", "--out_dir=runs/next_sft")
    elif rl_done:
        why = f"the data does not explain it and Stage II has run: Stage III DPO with the judge weighted toward {axis}"
        command = run("preference.py", *stage_flags("dpo", axis), "--out_dir=runs/next_dpo")
    else:
        why = f"the data does not explain it: Stage II GRPO with the {axis} head weighted up" + {
            "fidelity": "", "temporal": " and rewards on continued clips",
            "instruction": ", each attribute its own advantage"}.get(axis, ", then Stage III DPO judged by it")
        command = run("reward_rl.py", *stage_flags("rl", axis), "--out_dir=runs/next_rl")
    return {"text": f"{text}; {why}", "command": command, "axis": axis, "part": part}


def stage_one_flags(stage):
    """Stage I's own loss inside the next stage, 4x that stage's default weight (read from its Config, so a changed
    default is followed): what a fixed-order pipeline can do when a diagnosis asks for Stage I."""
    return {"rl": [f"--sft_weight={4 * reward_rl.Config.sft_weight}"],
            "dpo": [f"--curated_weight={4 * preference.Config.curated_weight}"]}[stage]


def stage_flags(stage, axis, stage_one=False):
    """The flags that turn a stage toward one axis. Stage II ("rl"): the head's advantage weight at least
    instruction's default and twice its own, rewards on continued clips for temporal, one advantage per attribute
    for instruction. Stage III ("dpo"): the judge weighs the head 3:1 against each other. No axis: no flags.
    stage_one: the diagnosis asked for Stage I (the curated data teaches the part, a reward cannot): the stage's
    curated flow-loss anchor is weighted up instead (stage_one_flags), its rewards left as they are."""
    if axis is None:
        return []
    if stage_one:
        return stage_one_flags(stage)
    if stage == "dpo":
        return [f"--weights={axis}=3.0"]
    weight = max(1.0, 2 * HEADS[axis].weight if axis in HEADS else 1.0)
    return [f"--weights={axis}={weight}", *{"temporal": ["--chunks=2"], "instruction": ["--split_instruction=true"]}.get(axis, [])]


@dataclass
class AdviseConfig:
    diagnose: str = "runs/diagnose"  # a diagnose --out folder
    column: str = ""                 # which checkpoint's diagnosis ('' = the last column)
    stage: str = "rl"                # the stage to be told: rl or dpo
    out: str = ""                    # also write the decision here as JSON ('' = print only)
    overwrite: bool = False          # replace an existing --out


def advise(argv):
    """The diagnostic loop's hand-off: prints the flags that point the next stage at the axis a checkpoint's
    diagnosis names (its recommendation's axis), so `make pipeline_driven` can pass them on; the reason goes to
    stderr and, with --out, to a JSON file the report shows."""
    cfg = parse_config(AdviseConfig, argv)
    if cfg.stage not in ("rl", "dpo"):
        raise ConfigError(f"--stage must be rl or dpo, got {cfg.stage!r}")
    path = os.path.join(cfg.diagnose, "diagnostics.json")
    if cfg.out:
        claim_out_file(cfg.out, cfg.overwrite, inputs=[path])
    results = read_diagnostics(path)
    column = cfg.column or list(results)[-1]
    if column not in results:
        raise ConfigError(f"{path} has no column {column!r}; it has {', '.join(results)}")
    rec = results[column]["recommendation"]
    # the pipeline's stage order is fixed: where the diagnosis asks for Stage I, the next stage fits Stage I's
    # curated clips harder; where it asks for the other later stage, that stage is told the same axis
    recommended = rec["command"].split()[1]
    flags = stage_flags(cfg.stage, rec["axis"], stage_one=recommended == "sft.py")
    override = "" if recommended == {"rl": "reward_rl.py", "dpo": "preference.py"}[cfg.stage] else \
        f" (it recommends {recommended} next; the pipeline's next stage is {cfg.stage}: " + (
            "its curated flow-loss anchor weighted 4x)" if recommended == "sft.py" else "turned toward the same axis)")
    decision = {"from": column, "diagnose": cfg.diagnose, "stage": cfg.stage, "axis": rec["axis"], "part": rec["part"],
                "flags": flags, "why": rec["text"] + override, "recommended": rec["command"]}
    if cfg.out:
        write_text(cfg.out, json.dumps(decision, indent=1))
    print(f"{cfg.stage} from {column}'s diagnosis: {' '.join(flags) or 'the defaults'} ({decision['why']})", file=sys.stderr)
    print(" ".join(flags))


DIAGNOSIS_KEYS = ("instruction_by_attribute", "instruction_by_split", "vbench", "quality_score", "semantic_score", "parts",
                  "drift_by_frame", "drift_by_chunk", "diversity", "cfg_response", "context_adherence", "proxy_reward",
                  "proxy_oracle_gap", "recommendation", "lineage")    # what diagnose_checkpoint writes for every column


def read_diagnostics(path):
    """A diagnose folder's diagnostics.json: {column: metrics}, each column whole. One line naming what is wrong."""
    if not os.path.exists(path):
        raise UserError(f"{path} not found: run `python diagnose.py --out={os.path.dirname(path)} --ckpt=...` first")
    try:
        with open(path) as f:
            results = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is empty or truncated ({type(e).__name__}); rerun diagnose") from None
    if not isinstance(results, dict) or not results:
        raise UserError(f"{path} holds no diagnosis; rerun diagnose")
    need = (*HEADS, *DIAGNOSIS_KEYS)
    for name, metrics in results.items():
        missing = [k for k in need if not isinstance(metrics, dict) or k not in metrics]
        if missing or not isinstance(metrics["recommendation"], dict):
            raise UserError(f"{path}: column {name!r} is partial (no {describe(missing, 3) or 'recommendation'}); "
                            f"rerun diagnose")
    return results


def markdown_table(results):
    names = list(results)
    heads = [h for h in HEADS if all(h in results[n] for n in names)]     # the registry's, a fork's included
    rows = [*[(h, (lambda h: lambda r: f"{r[h][0]:.3f} ± {r[h][1]:.3f}")(h)) for h in heads],
            ("instruction, held-out combos", lambda r: f"{r['instruction_by_split']['heldout'][0]:.3f}"),
            *[(f"oracle {k} accuracy", (lambda k: lambda r: f"{r['instruction_by_attribute'][k][0]:.3f}")(k))
              for k in list(data.ATTRIBUTES) + ["all"]],
            ("Quality score (VBench dims)", lambda r: f"{r['quality_score']:.3f}"),
            *[(k, (lambda k: lambda r: f"{r['vbench'][k][0]:.3f}")(k)) for k in QUALITY],
            ("Semantic score (VBench dims)", lambda r: f"{r['semantic_score']:.3f}"),
            ("identity, first -> last frame", lambda r: f"{r['drift_by_frame']['identity'][0]:.3f} -> "
                                                         f"{r['drift_by_frame']['identity'][-1]:.3f}"),
            ("temporal, chunk 1 -> 4 (4x length)", lambda r: f"{r['drift_by_chunk'][0]['temporal']:.3f} -> "
                                                             f"{r['drift_by_chunk'][-1]['temporal']:.3f}"),
            ("instruction, chunk 1 -> 4", lambda r: f"{r['drift_by_chunk'][0]['instruction']:.3f} -> "
                                                    f"{r['drift_by_chunk'][-1]['instruction']:.3f}"),
            ("diversity (pixel rms across seeds)", lambda r: f"{r['diversity']['pixel_rms']:.3f}"),
            ("cfg response (instruction at w, probe clips)", lambda r: " / ".join(f"{w}: {v:.3f}" for w, v in sorted(
                r["cfg_response"].items(), key=lambda x: float(x[0])))),
            ("context adherence (image-to-video, probe clips)", lambda r: f"{r['context_adherence'][0]:.3f}"),
            ("proxy - oracle (learned RM gap)", lambda r: "n/a" if not r["proxy_oracle_gap"] else
             ", ".join(f"{k} {v:+.3f}" for k, v in r["proxy_oracle_gap"].items()))]
    lines = ["| metric | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    lines += [f"| {label} | " + " | ".join(fn(results[n]) for n in names) + " |" for label, fn in rows]
    # why: every head's parts, the training data's own score beside each checkpoint's (the data's are the same for all)
    parts = results[names[0]]["parts"]
    lines += ["", "| part (penalty in tolerances, 0 = perfect) | curated data | web data | " + " | ".join(names) + " |",
              "|---" * (len(names) + 3) + "|"]
    lines += [f"| {h}: {p} | {v['curated']:.2f} | {v['web']:.2f} | " + " | ".join(
        f"{results[n]['parts'][h][p]['model']:.2f}" for n in names) + " |" for h, ps in parts.items() for p, v in ps.items()]
    rec = {n: results[n]["recommendation"] for n in names}
    lines += [""] + [f"- **{n}**: {r['text']}. Next: `{r['command']}`" for n, r in rec.items()]
    return "\n".join(lines) + "\n"


def check_diagnose_inputs(cfg):
    """Every checkpoint (and the learned judge) read and checked before any sampling: a missing or broken last
    --ckpt fails in a second, not after the others were diagnosed. Returns the judge's members or None, and the
    world the checkpoints share."""
    if not cfg.ckpt:
        raise ConfigError("no checkpoints to diagnose: pass --ckpt=PATH (repeat it, or --ckpt=A,B)")
    check_ranges(cfg, at_least_one=("prompts", "seeds", "steps", "long_clips", "probe_clips"), non_negative=("cfg_scale",))
    if cfg.cfg_until != -1 and not 0 <= cfg.cfg_until:
        raise ConfigError(f"--cfg_until must be >= 0, or -1 for the policy's own, got {cfg.cfg_until}")
    if cfg.diversity_seeds < 2:
        raise ConfigError(f"--diversity_seeds must be at least 2 to measure a spread, got {cfg.diversity_seeds}")
    shapes = {}
    for path in cfg.ckpt:
        net, _ = load_model(path)                                   # missing, truncated, broken, NaN: one line
        M.check_batch_memory(net, "cpu", sampled=2 * cfg.prompts * cfg.seeds)
        shapes[path] = net.cfg
    (first, a), *rest = shapes.items()
    for path, b in rest:
        if (b.frames, b.size) != (a.frames, a.size):
            raise ConfigError(f"diagnose compares checkpoints on the same clips: {first} makes {a.frames}x{a.size}"
                              f"x{a.size} clips but {path} makes {b.frames}x{b.size}x{b.size}; diagnose them apart")
    if not cfg.reward_model:
        return None, world_of(a)
    if not os.path.isfile(cfg.reward_model):
        raise CheckpointError(f"learned judge not found: {cfg.reward_model} (pass --reward_model= to diagnose "
                                f"without it)")
    try:
        return load_reward_model(cfg.reward_model, a), world_of(a)    # one for another clip shape is refused
    except CheckpointError as e:
        raise CheckpointError(f"{e} (pass --reward_model= to diagnose without the learned judge)") from None


HERE = os.path.dirname(os.path.abspath(__file__))


def code_version():
    """The hashes of the code that samples and scores, and torch's version: a result kept under them is still true."""
    return [file_hash(os.path.join(HERE, f)) for f in ("diagnose.py", "rewards.py", "judge.py", "model.py", "checkpoint.py",
                                                       "data.py")] + [torch.__version__]


def cache_key(path, cfg):
    """What a diagnosis depends on: the checkpoint's bytes, the settings that shape the samples, the judge's bytes,
    and the code that samples and scores (an edit to any of these files is a new key)."""
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("ckpt", "out", "overwrite", "cache", "shipped",
                                                                    "reward_model")}
    judge = file_hash(cfg.reward_model) if cfg.reward_model and os.path.exists(cfg.reward_model) else ""
    text = json.dumps([file_hash(path), settings, judge, list(HEADS), code_version()], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def read_cached(folder, key):
    """(result, grid clips) of an earlier diagnosis with this key, or None (no cache, a miss, a broken entry)."""
    stem = os.path.join(folder, key)
    if not folder or not (os.path.exists(stem + ".json") and os.path.exists(stem + ".safetensors")):
        return None
    from safetensors.torch import load_file
    try:
        return json.load(open(stem + ".json")), load_file(stem + ".safetensors")["grid"]
    except Exception:                                              # truncated by a kill, any broken file: recomputed
        return None


def write_cached(folder, key, result, grid):
    if not folder:
        return
    from safetensors.torch import save_file
    os.makedirs(folder, exist_ok=True)
    stem = os.path.join(folder, key)
    atomic_write(stem + ".safetensors", lambda tmp: save_file({"grid": grid.contiguous()}, tmp))  # clips first: a result
    write_text(stem + ".json", json.dumps(result))                   # is never read without them


DIAGNOSE_FILES = ("diagnostics.json", "diagnostics.md", "config.json", "grid.gif")


def diagnose(argv):
    cfg = parse_config(DiagnoseConfig, argv)
    check_output_path(cfg.out, "--out", folder=True)
    if cfg.cache:
        check_output_path(cfg.cache, "--cache", folder=True)
        if same_file(cfg.cache, cfg.out):
            raise ConfigError(f"--cache={cfg.cache} is the --out folder; keep the cache in a folder of its own")
    rm, world = check_diagnose_inputs(cfg)
    claim_out_dir(cfg.out, False, cfg.overwrite, inputs=[*cfg.ckpt, cfg.reward_model], stage="diagnose", writes=DIAGNOSE_FILES,
                  command=command_line("diagnose.py", cfg))
    ref = None                                                         # the data's parts, once, if any column needs them
    results, grids, t0 = {}, [], time.time()
    names = column_names(cfg.ckpt)
    with tqdm(total=5 * len(cfg.ckpt), desc="diagnose") as bar:
        for name, path in zip(names, cfg.ckpt):
            key = cache_key(path, cfg)
            cached = read_cached(cfg.cache, key) or read_cached(cfg.shipped, key)
            if cached:
                results[name], grid = cached
                bar.update(5)
            else:
                ref = ref or data_parts(world, cfg.seed)                   # the same data for every checkpoint
                results[name], videos = diagnose_checkpoint(path, cfg, bar, rm, ref)
                grid = videos[:: cfg.seeds][:8]                        # seed 0 of the first 8 prompts
                write_cached(cfg.cache, key, results[name], grid)
            # the advice names the path it was given, which a cached diagnosis of the same file may not share
            results[name]["recommendation"] = recommendation({h: results[name][h][0] for h in HEADS},
                                                             results[name]["parts"], path,
                                                             results[name]["lineage"].get("stage", ""))
            grids.append(grid)
    write_text(os.path.join(cfg.out, "diagnostics.json"), json.dumps(results, indent=1))
    table = markdown_table(results)
    write_text(os.path.join(cfg.out, "diagnostics.md"), table)
    # one row per prompt, one column per checkpoint, same seeds
    side = torch.stack(grids, 1).flatten(0, 1)
    data.write_video(data.video_grid(side, len(grids[0]), len(grids)), os.path.join(cfg.out, "grid.gif"))
    write_text(os.path.join(cfg.out, "config.json"), json.dumps(   # what report.py needs to label and time it
        {"config": asdict(cfg), "columns": dict(zip(names, cfg.ckpt)), "grid_rows": eval_prompts(cfg.prompts, 1, cfg.seed)[0][:8],
         "seconds": round(time.time() - t0, 1)}, indent=1))
    print(table)
    release_run_folders(cfg.out)
    print(f"wrote {cfg.out}/diagnostics.json, diagnostics.md, config.json, grid.gif (rows: prompts, columns: "
          f"{', '.join(names)})")


if __name__ == "__main__":
    run_cli(lambda argv: advise(argv[1:]) if argv[:1] == ["advise"] else diagnose(argv), sys.argv[1:])
