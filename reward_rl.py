"""Stage II: reward-driven RL on the flow sampler (GRPO's group advantages), stability-constrained.

    python reward_rl.py                                     # from the shipped SFT checkpoint, to runs/rl
    torchrun --standalone --nproc_per_node=2 reward_rl.py   # the same run; each group spans the ranks
    python reward_rl.py --update=ppo --sde_window=0 --rollout_steps=10 --epochs=1 --lr=1e-4 --warmup=1 --sft_weight=0

The last is vanilla Flow-GRPO. train() reads top to bottom: SAMPLING, REWARDS, ADVANTAGES, then TRAINING by one
of three sibling rules that each own their loss, KL and backward (awm_update, the default, ppo_update or
nft_update), the curated term, the clip, the guards, EMA, rollback, and a held-out check against reward hacking.
Every iteration logs what it cost (network evaluations, rollouts, optimizer steps, seconds: Cost) and what the rule
does to the policy (the ratio's mean and spread, per SDE step for PPO; the velocity norm against the reference's).

The objective, term by term (all of it in this file unless a function elsewhere is named):
  advantage  A_i = clip(sum_h w_h z_ih * r_i, +-adv_clip): z_ih rollout i's head-h reward z-scored within its group
             (0 where the group's std is under std_floor: group_zscores), w_h the head weights (rewards.HEADS, moved
             by the curriculum), r_i the learned ensemble's reliability (reliability, with --reward=rm or both).
  awm        per rollout and (t, x0) draw: max(-a_i p_i, -a_i clip(p_i, 1 +- awm_clip)), p_i = exp(e_sampler - e_policy),
             e = model.flow_error on the rolled-out clip, a_i = A_i (times neg_scale below 0): advantage-weighted flow
             matching whose ratio bounds it off-policy (ppo_clip_loss); + awm_beta |v - v_ref|^2 at pretraining's t
             (model.msq_free_frames), the flows' KL rate to the frozen input.
  ppo        per trained SDE step: max(-A_i p_i, -A_i clip(p_i, 1 +- clip_range)), p_i = exp(log pi(x_k+1 | x_k) -
             log pi_old), fp32 mean log-probs of the Gaussian step (model.score_sde_step, model.sde_step);
             + beta * the closed-form KL between the policy's and the reference's steps (model.gaussian_kl).
  nft        DiffusionNFT (arXiv 2509.16117), on clips the old policy (the EMA, frozen at rollout) sampled: per draw
             r_i |v+ - (x1 - x0)|^2 + (1 - r_i) |v- - (x1 - x0)|^2 over the free frames (model.msq_free_frames),
             v+ = (1 - nft_beta) v_old + nft_beta v, v- = (1 + nft_beta) v_old - nft_beta v, r_i = 1/2 +
             clip(A_i / nft_scale, -1, 1) / 2: bounded below by construction, trained without guidance; + the same
             KL rate as awm.
  curated    + sft_weight * the flow loss on a fresh curated batch (model.curated_loss): PPO-ptx, so a reward cannot
             buy its gain with fidelity.
  floor      --hold=h=m: held head h may fall at most m below its start level s_h (constrained RL, RCPO): maximise
             the objective above subject to J_h >= s_h - m_h, J_h the head's mean on a training-split probe (hold_probe
             prompts, fixed noise, the EMA's ODE at eval_steps; never the held-out clips). One Lagrange multiplier
             per held head by dual ascent, lambda_h <- max(0, lambda_h + hold_rate (s_h - hold_guard m_h - J_h) / m_h) each
             iteration (stability.Floor), turns what --hold_via names: the step, lr / (1 + sum_h lambda_h) (the
             default: a trust region that shrinks while a held head is low), the curated term's weight sft_weight
             (1 + sum_h lambda_h) (a forward KL to data, as DDRL), the KL's weight likewise, or head h's advantage
             weight w_h + lambda_h. docs/results.md, Stage II holds its floor, measures them.
"""
import json
import os
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, replace

import torch
from tqdm import tqdm

import data
import model as M
import rewards as R
from checkpoint import full_state, lineage_record, load_model, resume_run, save_checkpoint, save_run_state
from judge import load_reward_model, rm_score
from distributed import (all_mean, average_gradients, check_ranks_agree, from_rank0, gather_rows, make_logger,
                         memory_use, setup_distributed, shard, teardown)
from cli import (ConfigError, check_ranges, claim_out_dir, command_line, open_log, parse_config,
                 print_config, release_run_folders, run_cli)
from stability import (EMA, Cost, Floor, HackingMonitor, NonFiniteGuard, SpikeGuard, bf16_autocast,
                       check_trained, clip_gradients, linear_warmup, seeded)


@dataclass
class Config:
    init: str = "checkpoints/sft_small.safetensors"  # the policy's start and the frozen KL reference
    out_dir: str = "runs/rl"      # ckpt.safetensors, state.safetensors, log.jsonl, samples.gif
    iters: int = 30               # rollout + update iterations
    # ---- SAMPLING
    prompts_per_iter: int = 8     # distinct training prompts per iteration, over all ranks
    group_size: int = 8           # rollouts per prompt: the group its advantages are relative to
    rollout_steps: int = 6        # denoising steps of a training rollout (evaluation uses eval_steps)
    sde_window: int = 2           # SDE steps inside the ODE trajectory; 0 = every step (vanilla Flow-GRPO)
    window_start: int = 0         # first SDE step; -1 slides the window from high to low noise over training
    train_fraction: float = 1.0   # fraction of the window's steps trained each iteration (DanceGRPO: 0.6)
    noise_level: float = 0.7      # the SDE's a: std = a * sqrt(sigma / (1 - sigma))
    shared_noise: bool = False    # one initial noise per group: members differ only by the SDE's choices
    cfg_scale: float = 3.0        # guidance in rollouts and training (the policy is the guided sampler)
    chunks: int = 1               # >1: roll out a continuation of (chunks - 1) ODE chunks; rewards see it all
    # ---- REWARDS
    reward: str = "heads"         # 'heads' (programmatic), 'rm' (learned ensemble) or 'both'
    reward_model: str = "checkpoints/reward_model.safetensors"  # the ensemble for 'rm' and 'both'
    weights: tuple = ()           # advantage weights as head=value (--weights=temporal=0.5); others: rewards.HEADS
    split_instruction: bool = False  # each prompted attribute's soft match its own head (weighted as instruction)
    curriculum: bool = False      # self-paced: move weight from fidelity to temporal to instruction (HEADS' phase)
    # ---- FLOOR: what the targeted reward may not be bought with
    hold: tuple = ("fidelity=0.01", "temporal=0.01")  # head=margin: that head may fall at most margin below its
                                  # start; --hold= turns the floor off
    hold_via: str = "lr"          # what the floor's multipliers turn: 'advantage' (added to the head's weight, RCPO),
                                  # 'curated' (the curated term's weight x (1 + their sum)), 'kl' (the KL's, likewise),
                                  # 'lr' (the step size / (1 + their sum): a trust region that shrinks)
    hold_rate: float = 1.0        # dual ascent: a multiplier's rise per iteration per margin below the guard line
    hold_guard: float = 0.5       # the guard line, in margins below the start, under which a multiplier rises
    hold_probe: int = 16          # training prompts the floor measures on: fixed noise, the EMA's ODE at eval_steps
    # ---- ADVANTAGES
    zscore: str = "per_head"      # 'per_head': z-score each head in its group, then weigh; 'sum': z-score the weighted sum
    std_floor: float = 0.01       # groups whose reward std is below this teach nothing: advantage 0
    adv_clip: float = 5.0         # clip the summed advantage to +- this
    uncertainty: bool = True      # scale advantages by ensemble agreement (reliability in [0.5, 1.5])
    # ---- TRAINING
    update: str = "awm"           # 'awm': advantage-weighted flow matching on the rollouts; 'ppo': Flow-GRPO's ratio;
                                  # 'nft': DiffusionNFT's implicit positive and negative policies
    lr: float = 1e-4              # AdamW learning rate (constant after warmup, divided by the floor's 1 + sum lambda)
    warmup: int = 10              # updates of linear warmup: Adam's first steps move every weight by ~lr
    beta: float = 0.01            # ppo: weight of the closed-form Gaussian KL per SDE step (mean-logp convention)
    awm_beta: float = 0.3         # awm, nft: weight of |v - v_ref|^2 (the flows' KL rate) at pretraining's t
    awm_draws: int = 2            # awm, nft: (t, noise) draws per rollout per update, shared within a group
    awm_t_mean: float = -1.0      # awm: logit-normal mean of t (median 0.27): where motion (direction, speed) is decided
    neg_scale: float = 1.0        # awm: weight of the push away from below-group clips (0 = pull toward winners only)
    awm_clip: float = 0.02        # awm: clip of the ratio exp(err_sampler - err) (AWM's bound); 0 = unbounded loss
    nft_beta: float = 1.0         # nft: how far the implicit policies reach, v+- = v_old +- nft_beta (v - v_old)
    nft_scale: float = 2.0        # nft: r = 1/2 + clip(A / nft_scale, -1, 1) / 2, the advantage as an optimality odds
    sft_weight: float = 0.5       # weight of the flow loss on a fresh curated batch in every update (PPO-ptx)
    sft_batch: int = 32           # curated clips per update for that term (the same batch on every rank)
    clip_range: float = 2e-3      # PPO ratio clip; small because log-probs are means over pixels
    epochs: int = 2               # passes over each iteration's rollouts, each with fresh (t, noise) draws
    minibatches: int = 1          # optimizer updates per pass; with a noisy gradient, fewer and larger is safer
    grad_clip: float = 1.0        # global grad-norm clip
    ema_decay: float = 0.9        # EMA of the policy per update; evaluation and the hand-off use it
    spike_factor: float = 10.0    # rollback when grad norm or KL exceeds this times its recent median
    # ---- evaluation and bookkeeping
    eval_every: int = 10          # iterations between held-out oracle evaluations
    eval_prompts: int = 16        # per split (val combinations and unseen held-out ones)
    eval_steps: int = 20          # Euler steps for evaluation
    patience: int = 3             # evaluations of falling oracle score with rising reward before stopping
    max_minutes: float = 10.0     # stop (and hand off) before the loop would pass this wall-clock; 0 = run all iters
    max_nfe: int = 0              # stop (and hand off) once the run has spent this many network evaluations; 0 = none
    seed: int = 0                 # prompts and noise follow (seed, iteration): resumes and rank counts agree
    ckpt_every: int = 5           # iterations between resumable checkpoints
    resume: bool = False          # continue the run in out_dir
    overwrite: bool = False       # replace whatever out_dir holds
    bf16: str = "auto"            # awm: bfloat16 autocast; 'auto' = where native (docs/results.md, Emulated bfloat16)
    device: str = "auto"          # 'cpu', 'cuda' or 'auto'
    parallel: str = "ddp"         # under torchrun: 'ddp' (whole copies), 'fsdp' (sharded), 'hsdp' (sharded per node)


def check_config(cfg, ranks):
    check_ranges(cfg, at_least_one=("iters", "prompts_per_iter", "rollout_steps", "chunks", "awm_draws", "sft_batch", "epochs",
                                    "minibatches", "eval_every", "eval_prompts", "eval_steps", "patience", "ckpt_every"),
                 positive=("lr", "noise_level", "clip_range", "spike_factor", "adv_clip", "grad_clip", "nft_beta", "nft_scale",
                           "hold_rate", "hold_probe"),
                 fraction=("ema_decay",),
                 non_negative=("warmup", "beta", "awm_beta", "neg_scale", "sft_weight", "cfg_scale", "std_floor", "max_minutes",
                               "max_nfe", "hold_guard"),
                 choices=dict(update=("awm", "ppo", "nft"), reward=("heads", "rm", "both"), bf16=("auto", "true", "false"),
                              zscore=("per_head", "sum"), hold_via=("advantage", "curated", "kl", "lr")))
    rollouts = cfg.prompts_per_iter * cfg.group_size
    for bad, why in ((cfg.split_instruction and cfg.reward != "heads", "--split_instruction needs --reward=heads"),
                     (not 0 <= cfg.sde_window <= cfg.rollout_steps or cfg.window_start + cfg.sde_window > cfg.rollout_steps,
                      f"SDE window {cfg.window_start}+{cfg.sde_window} does not fit {cfg.rollout_steps} steps"),
                     (not 0 < cfg.train_fraction <= 1, f"--train_fraction must be in (0, 1], got {cfg.train_fraction}"),
                     (cfg.group_size < 2, "--group_size must be at least 2: advantages are relative to the group"),
                     (rollouts % ranks, f"{rollouts} rollouts per iteration do not divide over {ranks} ranks"),
                     (rollouts % cfg.minibatches, f"{rollouts} rollouts do not split into {cfg.minibatches} minibatches"),
                     (cfg.hold and cfg.hold_probe % ranks, f"--hold_probe={cfg.hold_probe} does not divide over {ranks} ranks")):
        if bad:
            raise ConfigError(why)
    R.head_weights(cfg.weights)                                              # unknown heads are refused here
    hold_margins(cfg)


def hold_margins(cfg):
    """--hold's head=margin pairs as {head: margin}; an unknown head or a margin that is not > 0 is one line."""
    margins = {}
    for item in cfg.hold:
        name, _, value = item.partition("=")
        if name not in R.head_names(cfg.split_instruction):
            raise ConfigError(f"--hold names an unknown head {name!r}; heads: {', '.join(R.head_names())}")
        try:
            margins[name] = float(value)
        except ValueError:
            raise ConfigError(f"--hold expects head=margin, got {item!r}") from None
        if not 0 < margins[name] < float("inf"):
            raise ConfigError(f"--hold: {name}'s margin must be a finite number > 0, got {value}")
    return margins


# ----------------------------------------------------------------------------- Stage II's own settings
def window_steps(cfg, it):
    """The SDE steps of iteration `it`: the window, sliding from noise to data if window_start < 0."""
    start = cfg.window_start if cfg.window_start >= 0 else round((cfg.rollout_steps - cfg.sde_window) * it / max(1, cfg.iters - 1))
    return list(range(start, start + cfg.sde_window)) if cfg.sde_window else list(range(cfg.rollout_steps))


def bf16(cfg, device):  # AWM's and NFT's passes under bf16 autocast; PPO's ratio compares two passes' log-probs
    return bf16_autocast(cfg.bf16, device, allowed=cfg.update != "ppo")


# ----------------------------------------------------------------------------- the bands of one iteration
@dataclass
class Rollout:  # what SAMPLING hands to TRAINING: this rank's share n of the iteration's rollouts
    prompts: list                  # (n,) captions
    tokens: torch.Tensor           # (n, L)
    clips: torch.Tensor            # (n, *policy.flow_shape) the trained chunk, context frames pinned
    transitions: list              # per SDE step: (step index, x before, x after, fp32 log-prob (n,))
    group: torch.Tensor            # (n,) the global group of each rollout
    trained: list = None           # ppo: which SDE steps it trains this iteration (train_fraction of them)
    sampler: object = None         # awm, nft: a frozen copy of the weights that sampled (nft: the EMA's)
    on_policy: bool = True         # no update since sampling: the sampler's errors are the policy's
    ctx: torch.Tensor = None       # (n, C, F, H, W) clean context frames of a continuation, or None
    ctx_mask: torch.Tensor = None  # (n, F) bool


@torch.no_grad()
def sample_rollouts(cfg, policy, sampler, it, gen, train_prompts, mine, device, old=None):
    """Every rank draws the same prompts and noise, then rolls out its slice `mine`: a group spans ranks, and 1
    or N ranks roll out the same clips. old: the weights that sample (nft: the EMA), into `sampler`, else the policy.
    Returns (clips to score, Rollout)."""
    if sampler is not None:
        sampler.load_state_dict((old or policy).state_dict())
    net = sampler if old is not None else policy
    shape, rollouts = policy.flow_shape, cfg.prompts_per_iter * cfg.group_size   # noise in the flow's space
    idx = torch.randint(len(train_prompts), (cfg.prompts_per_iter,), generator=gen)
    prompts = [train_prompts[i] for i in idx.tolist() for _ in range(cfg.group_size)][mine]   # groups consecutive
    x = torch.randn(cfg.prompts_per_iter if cfg.shared_noise else rollouts, *shape, generator=gen)
    x = x.repeat_interleave(cfg.group_size, 0) if cfg.shared_noise else x     # shared: one noise per group
    sde = window_steps(cfg, it)
    eps = torch.randn(len(sde), rollouts, *shape, generator=gen)[:, mine].to(device)
    tokens, x = data.tokenize(prompts).to(device), x[mine].to(device)
    net.eval()
    with bf16(cfg, device):  # chunks > 1: earlier chunks by the ODE, then the trained chunk continues them
        prefix, ctx, ctx_mask = M.continuation_context(net, tokens, torch.Generator().manual_seed(cfg.seed + it),
                                                       cfg.chunks, cfg.rollout_steps, cfg.cfg_scale)
        x, transitions = M.sample_with_sde_window(net, x, tokens, cfg.rollout_steps, sde, eps, cfg.cfg_scale,
                                                  cfg.noise_level, ctx, ctx_mask)
    chunk, clips = M.join_continuation(prefix, ctx, ctx_mask, net.decode(x))      # the rewards see pixels
    group, chunk = torch.arange(rollouts)[mine] // cfg.group_size, policy.encode(chunk)  # AWM fits what was rewarded
    return clips, Rollout(prompts, tokens, chunk, transitions, group, ctx=ctx, ctx_mask=ctx_mask, sampler=sampler)


def reward_scores(cfg, clips, prompts, tokens, judge, reward_fn, names, world):
    """The training reward of these clips, (n, heads), and the learned ensemble's spread (zeros without it)."""
    heads = reward_fn(clips.cpu(), prompts) if reward_fn else \
        R.reward_heads(clips.cpu(), prompts, world, split_instruction=cfg.split_instruction)
    scores = torch.stack([heads[h] for h in names], 1)                        # (n, heads)
    rm_std = torch.zeros_like(scores)
    if judge is not None:
        rm_mean, rm_sd = rm_score(judge, clips.cpu(), tokens.cpu())
        rm_scores, rm_std = torch.stack([rm_mean[h] for h in names], 1), torch.stack([rm_sd[h] for h in names], 1)
        scores = rm_scores if cfg.reward == "rm" else (scores + rm_scores) / 2
    return scores, rm_std


def score(cfg, clips, roll, judge, reward_fn, names, world, d):
    """Rewards (N, heads) of every rank's rollouts, and the learned ensemble's spread (zeros without it)."""
    scores, rm_std = reward_scores(cfg, clips, roll.prompts, roll.tokens, judge, reward_fn, names, world)
    return gather_rows(scores, d), gather_rows(rm_std, d)                    # a group's rewards span the ranks


def floor_probe(cfg, policy, train_prompts):
    """The floor's fixed probe: hold_probe training prompts and their starting noise, from the run's seed."""
    order = torch.randperm(len(train_prompts), generator=seeded(cfg.seed + 23, 0)).tolist()
    return [train_prompts[i] for i in order[:cfg.hold_probe]], R.noise_for(cfg.hold_probe, policy, cfg.seed + 29)


@torch.no_grad()
def probe_levels(cfg, net, probe, judge, reward_fn, names, world, d):
    """The floor's measure: each held head's mean training reward on the EMA policy's ODE samples of fixed training
    prompts from fixed noise, so that iterations compare clip for clip, at eval_steps (a 6-step probe missed the fall
    that 20 steps show: docs/results.md, Stage II holds its floor). Each rank samples its share, as with rollouts;
    rank 0's levels are the ones every rank steers by."""
    prompts, noise = probe
    share = len(prompts) // d.ranks
    mine = slice(d.rank * share, (d.rank + 1) * share)
    tokens = data.tokenize(prompts[mine]).to(d.device)
    with bf16(cfg, d.device):
        clips = M.sample(net, tokens, noise[mine].to(d.device), cfg.eval_steps, cfg.cfg_scale)
    scores = reward_scores(cfg, clips, prompts[mine], tokens, judge, reward_fn, names, world)[0]
    levels = gather_rows(scores, d).mean(0)                                   # (heads,) over the whole probe
    return {h: from_rank0(float(levels[names.index(h)]), d) for h in hold_margins(cfg)}


def held_settings(cfg, floor, names, weights):
    """This iteration's head weights and settings with the floor's multipliers applied to what --hold_via turns:
    the held heads' advantage weights (w_h + lambda_h), the curated term's or the KL's weight x (1 + sum lambda), or
    the learning rate / (1 + sum lambda)."""
    lam = floor.multiplier if floor else {}
    if cfg.hold_via == "advantage":
        return cfg, weights + torch.tensor([lam.get(n, 0.0) for n in names], dtype=weights.dtype)
    scale = 1 + sum(lam.values())
    if cfg.hold_via == "curated":
        return replace(cfg, sft_weight=cfg.sft_weight * scale), weights
    if cfg.hold_via == "lr":
        return replace(cfg, lr=cfg.lr / scale), weights
    return replace(cfg, awm_beta=cfg.awm_beta * scale, beta=cfg.beta * scale), weights


def ppo_clip_loss(log_ratio, advantages, clip_range):
    """PPO's pessimistic clipped objective per sample (B,), the ratio, and the fraction of ratios clipped. Flow-GRPO's
    ratio of mean log-probs and AWM's of exp(-err) both move little, so clip ranges are small (1e-4 .. 2e-2)."""
    ratio = torch.exp(log_ratio)
    loss = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1 - clip_range, 1 + clip_range))
    return loss, ratio.detach(), ((ratio.detach() - 1).abs() > clip_range).float().mean().item()


def group_zscores(scores, group_size, std_floor):
    """scores (N, heads), N = groups * group_size rollouts grouped consecutively -> each head z-scored within
    its group, (r - mean) / (std + 1e-4) with the Bessel-corrected std (TeleBoost's and DanceGRPO's convention),
    and 0 where that std is under the floor; and the fraction of such (group, head) pairs."""
    g = scores.view(-1, group_size, scores.shape[1])                          # (groups, G, heads)
    mean, std = g.mean(1, keepdim=True), g.std(1, keepdim=True, correction=1)
    flat = std < std_floor
    z = torch.where(flat, torch.zeros_like(g), (g - mean) / (std + 1e-4))
    return z.flatten(0, 1), float(flat.float().mean())


def reliability(rm_std):
    """Per-rollout trust in the ensemble: 1.5 where its members agree most, 0.5 where they disagree most."""
    u = rm_std.mean(1)                                                        # (N,) over heads
    return (1 + (u.mean() - u) / (u.mean() + 1e-8)).clamp(0.5, 1.5)


def advantages(cfg, scores, rm_std, weights):
    """Per-head group z-scores summed with weights (--zscore=sum: one z-score of the weighted sum), scaled by the
    ensemble's reliability, clipped after every scaling. (N,) and the fraction of zero-variance (group, head) pairs."""
    summed = (scores * weights).sum(1, keepdim=True) if cfg.zscore == "sum" else None
    z, zero_frac = group_zscores(scores if summed is None else summed, cfg.group_size, cfg.std_floor)
    adv = (z * weights).sum(-1) if summed is None else z[:, 0]
    if cfg.reward != "heads" and cfg.uncertainty:
        adv = adv * reliability(rm_std)
    return adv.clamp(-cfg.adv_clip, cfg.adv_clip), zero_frac


def awm_update(cfg, policy, reference, roll, adv, mb, share, draws, stats):
    """Advantage-weighted matching on this rank's rollouts mb: each clip's flow-matching error weighted by its advantage
    (pull toward winners, push from losers), bounded as AWM does by the PPO-clipped ratio exp(err_sampler - err): the plain
    weighted loss falls without limit off-policy. Plus the KL rate awm_beta * |v - v_ref|^2 at pretraining's t. draws:
    (t, x0, t_kl) per group, shared within it so what does not depend on the winner cancels. share: sums -> global mean."""
    clips, tokens, a, g = roll.clips[mb], roll.tokens[mb], adv[mb], roll.group[mb]
    ctx, cm = (None, None) if roll.ctx is None else (roll.ctx[mb], roll.ctx_mask[mb])
    weight, total, dev = torch.where(a < 0, cfg.neg_scale * a, a), 0.0, clips.device
    flow = lambda net, t, x0: M.straight_path_velocity(net, clips, x0[g].to(dev), t[g].to(dev), tokens, ctx, cm)
    error = lambda net, t, x0: M.flow_error(net, clips, x0[g].to(dev), t[g].to(dev), tokens, ctx, cm).float()  # (mb,)
    with bf16(cfg, clips.device):
        for t, x0, _ in draws:
            err = error(policy, t, x0)
            pg = weight * err                                                 # unbounded: falls without limit
            if cfg.awm_clip > 0:
                with torch.no_grad():
                    err_old = err.detach() if roll.on_policy else error(roll.sampler, t, x0)
                pg, ratio, clipped = ppo_clip_loss(err_old - err, weight, cfg.awm_clip)
                stats["ratio"].append(float(ratio.mean()))
                stats["ratio_std"].append(float(ratio.std()) if len(ratio) > 1 else 0.0)
                stats["clip_frac"].append(clipped)
            (pg.sum() * share / len(draws)).backward()
            total += pg.sum().item() * share / len(draws)
        flow_kl(cfg, policy, reference, flow, draws, cm, share, stats)
    stats["loss"].append(total)
    return total


def flow_kl(cfg, policy, reference, flow, draws, cm, share, stats):
    """awm_beta * |v - v_ref|^2, the flows' KL rate to the frozen reference, at pretraining's t (where the edges are
    drawn), backpropagated and logged."""
    t, x0 = draws[0][2], draws[0][1]
    with torch.no_grad():
        v_ref = flow(reference, t, x0)
    kl = M.msq_free_frames(flow(policy, t, x0), v_ref, cm)
    (cfg.awm_beta * kl.sum() * share).backward()
    stats["kl_ref"].append(kl.sum().item() * share)  # this rank's part of the minibatch's mean: summed over ranks


def nft_update(cfg, policy, reference, roll, adv, mb, share, draws, stats):
    """DiffusionNFT on this rank's rollouts mb, sampled by the old policy (roll.sampler, the EMA at rollout time):
    each clip's advantage as an optimality odds r in [0, 1]; the flow-matching error of two implicit policies mixed
    from the old velocity and the trained one, v+ toward clips with r = 1 and v- toward clips with r = 0. At
    v = v_old the gradient is nft_beta times that of sum (2r - 1) err; off-policy the loss is a sum of squares,
    bounded below. Guidance-free: the conditional velocity is what is trained. Plus the KL rate, as awm's."""
    clips, tokens, g = roll.clips[mb], roll.tokens[mb], roll.group[mb]
    ctx, cm = (None, None) if roll.ctx is None else (roll.ctx[mb], roll.ctx_mask[mb])
    r = 0.5 + 0.5 * (adv[mb] / cfg.nft_scale).clamp(-1, 1)                # (mb,) in [0, 1]
    flow = lambda net, t, x0: M.straight_path_velocity(net, clips, x0[g].to(clips.device), t[g].to(clips.device), tokens, ctx, cm)
    total, beta = 0.0, cfg.nft_beta
    with bf16(cfg, clips.device):
        for t, x0, _ in draws:
            target = clips - x0[g].to(clips.device)
            with torch.no_grad():
                v_old = flow(roll.sampler, t, x0)
            v = flow(policy, t, x0)
            positive, negative = (1 - beta) * v_old + beta * v, (1 + beta) * v_old - beta * v
            loss = (r * M.msq_free_frames(positive, target, cm) + (1 - r) * M.msq_free_frames(negative, target, cm)).float()
            (loss.sum() * share / len(draws)).backward()
            total += loss.sum().item() * share / len(draws)
            with torch.no_grad():                                  # the implied ratio exp(err_old - err), as awm's
                ratio = (M.msq_free_frames(v_old, target, cm) - M.msq_free_frames(v.detach(), target, cm)).float().exp()
            stats["ratio"].append(float(ratio.mean()))
            stats["ratio_std"].append(float(ratio.std()) if len(ratio) > 1 else 0.0)
        flow_kl(cfg, policy, reference, flow, draws, cm, share, stats)
    stats["loss"].append(total)
    return total


def ppo_update(cfg, policy, reference, roll, adv, mb, share, draws, stats):
    """Flow-GRPO: PPO's clipped ratio of each trained SDE step's log-prob now and at rollout time, plus beta * the
    closed-form KL between the policy's and the reference's Gaussian steps. No draws: the SDE steps are the samples."""
    trained, total = roll.trained, 0.0
    ctx, cm = (None, None) if roll.ctx is None else (roll.ctx[mb], roll.ctx_mask[mb])
    for k in trained:
        i, x_t, x_next, logp_old = roll.transitions[k]
        step = (x_t[mb], x_next[mb], i, M.time_grid(cfg.rollout_steps, policy.flow_shift), roll.tokens[mb], cfg.cfg_scale,
                cfg.noise_level, ctx, cm)
        mean, step_std, logp = M.score_sde_step(policy, *step)                 # the policy's Gaussian step, and
        with torch.no_grad():
            mean_ref = M.score_sde_step(reference, *step)[0]                  # the reference's, on the same step
        log_ratio = logp - logp_old[mb]
        policy_loss, ratio, clipped = ppo_clip_loss(log_ratio, adv[mb], cfg.clip_range)
        kl = M.gaussian_kl(mean, mean_ref, step_std)                            # (mb,)
        loss = (policy_loss + cfg.beta * kl).sum() * share / len(trained)
        loss.backward()
        total += loss.item()
        approx_kl = (ratio - 1 - log_ratio.detach()).mean()                    # ratio = exp(log_ratio)
        for key, value in (("ratio", ratio.mean()), ("clip_frac", clipped), ("approx_kl", approx_kl),
                           ("ratio_std", ratio.std() if len(ratio) > 1 else 0.0)):
            stats[key].append(float(value))
        stats[f"ratio_step{i}"].append(float(ratio.mean()))                     # GRPO-Guard: the mean per SDE step
        stats["kl_ref"].append(kl.detach().sum().item() * share / len(trained))  # as awm_update's: summed over ranks
    stats["loss"].append(total)
    return total


def curated_term(cfg, policy, n_update, world, device, stats):
    """PPO-ptx: keep fitting real clips at every t, so the reward cannot buy words with fidelity (a few % of an
    iteration's cost; every rank fits the same batch, so 1 or N ranks step alike)."""
    with bf16(cfg, device):
        loss = M.curated_loss(policy, cfg.sft_batch, cfg.seed, n_update, world, device).mean()
    (cfg.sft_weight * loss).backward()
    stats["sft_loss"].append(loss.item())


def update_policy(cfg, policy, reference, opt, ema, guard, update, roll, adv, mine, it, gen, world, d, cost):
    """TRAINING: epochs x minibatches optimizer steps on the iteration's rollouts, each the rule's loss and KL, the
    curated term, the all-reduce, the warmup, the clip, the non-finite guard and the EMA. adv: this rank's (n,).
    Returns the update statistics."""
    stats, groups, rollouts = defaultdict(list), cfg.prompts_per_iter, cfg.prompts_per_iter * cfg.group_size
    policy.train()
    for epoch in range(cfg.epochs):
        order = torch.randperm(rollouts, generator=gen)                      # over all ranks: draws match any rank count
        draws = [(M.sample_t(groups, gen, mean=cfg.awm_t_mean),                # AWM, NFT: (t, noise, t_kl) per group
                  torch.randn(groups, *roll.clips.shape[1:], generator=gen), M.sample_t(groups, gen))
                 for _ in range(cfg.awm_draws if cfg.update != "ppo" else 0)]
        for j, chunk in enumerate(order.chunk(cfg.minibatches)):
            n_update = (it * cfg.epochs + epoch) * cfg.minibatches + j      # counts every optimizer step
            mb = chunk[(chunk >= mine.start) & (chunk < mine.stop)] - mine.start  # this rank's share of it
            # the update rule's loss + its KL to the frozen reference, backpropagated (share: sums -> global mean)
            share = d.ranks / len(chunk)
            # a rank with no clip in this minibatch adds zeros; sharded, it still runs the passes (each gathers weights
            # with every rank) on an empty batch, and drops their statistics
            loss = 0.0
            if len(mb) or d.sharded:
                loss = update(cfg, policy, reference, roll, adv, mb, share, draws, stats if len(mb) else defaultdict(list))
            # the optimizer steps next, so later passes compare with the sampler (awm's ratio): on every rank, its
            # share of this minibatch empty or not
            roll.on_policy = False
            if cfg.sft_weight > 0:
                curated_term(cfg, policy, n_update, world, d.device, stats)  # + the curated flow loss
            average_gradients(policy.parameters(), d)
            for group in opt.param_groups:                                    # linear warmup, then constant
                group["lr"] = linear_warmup(n_update, cfg.lr, cfg.warmup)
            grad_norm = clip_gradients(policy.parameters(), cfg.grad_clip)    # CLIP: global, after the all-reduce
            stats["grad_norm"].append(grad_norm)
            if guard.ok(all_mean(torch.tensor(loss, dtype=torch.float64), d).item(), grad_norm):
                opt.step()
                ema.update(policy, n_update)                                  # EMA
            opt.zero_grad(set_to_none=True)
            cost.steps += 1
    return stats


def health(cfg, policy, reference, roll, it):
    """|v| / |v_ref| on up to 8 of the iteration's clips, with noise of its own stream (the run's draws untouched),
    measured alike for every rule."""
    n = min(8, len(roll.clips))
    ctx, cm = (None, None) if roll.ctx is None else (roll.ctx[:n], roll.ctx_mask[:n])
    return M.velocity_norm_ratio(policy, reference, roll.clips[:n], roll.tokens[:n], seeded(cfg.seed + 17, it), ctx, cm)


def record(it, names, scores, weights, zero_frac, adv, roll, stats, **extra):
    """One log line: each head's reward (mean, std), the advantages, every update statistic's mean, and the ratio's
    mean per SDE step where the rule has one (ppo)."""
    sde, r4 = [s[0] for s in roll.transitions], lambda x: round(float(x), 4)
    means = {k: sum(stats[k]) / len(stats[k]) if stats[k] else None
             for k in ("ratio", "ratio_std", "clip_frac", "approx_kl", "kl_ref", "loss", "sft_loss")}
    means["ratio_by_step"] = {k[len("ratio_step"):]: r4(sum(v) / len(v)) for k, v in stats.items() if k.startswith("ratio_step")}
    return dict(iter=it + 1, **{f"reward_{h}": [r4(scores[:, j].mean()), r4(scores[:, j].std())] for j, h in enumerate(names)},
                zero_std_frac=r4(zero_frac), adv_mean=r4(adv.mean()), adv_std=r4(adv.std()), adv_absmax=r4(adv.abs().max()),
                weights=[round(float(w), 3) for w in weights], sde_steps=sde, trained_steps=[sde[k] for k in roll.trained],
                **means, grad_norm=r4(max(stats["grad_norm"])), **extra)


# ----------------------------------------------------------------------------- the loop
def evaluate_and_decide(cfg, it, rec, scores, names, ev, monitor, out_of_time, logf, log):
    """Rank 0's end of an iteration: the log line, the held-out evaluation ev when one was due, and whether to stop."""
    logf.write(json.dumps(rec) + "\n")
    hacked = False
    if ev is not None:
        logf.write(json.dumps({"eval": ev}) + "\n")
        log(f"eval @{it + 1}: " + " ".join(f"{k}={v}" for k, v in ev.items() if k != "iter"))
        # proxy vs truth on the heads the eval scores, at fixed weights (a curriculum's would move both)
        w = [(i, v) for i, (n, v) in enumerate(zip(names, R.advantage_weights(names, cfg.weights).tolist())) if n in ev]
        if hacked := monitor.update(sum(v * ev[names[i]] for i, v in w), sum(v * scores[:, i].mean().item() for i, v in w)):
            log(f"stopping: the held-out oracle reward fell {cfg.patience} evaluations in a row while the trained "
                f"reward overstated it more and more (reward hacking); keeping the last checkpoint")
    if out_of_time:
        log(f"stopping: --max_minutes={cfg.max_minutes} or --max_nfe={cfg.max_nfe} reached after {it + 1} iterations")
    logf.flush()
    return hacked or out_of_time


def train(cfg: Config, reward_fn=None):
    """reward_fn(clips, prompts) -> {head: (B,)} replaces the configured judge (tests use a simple one)."""
    d = setup_distributed(cfg.device, cfg.parallel)
    log = make_logger(d)
    check_config(cfg, d.ranks)
    policy, parent = load_model(cfg.init, d.device)
    if cfg.update == "ppo" and policy.sampler != "flow-grpo":  # the solver contract: PPO rescores rollout steps
        raise ConfigError(f"--update=ppo scores rollouts with sde_step's Gaussian ('flow-grpo'), but {cfg.init} rolls out "
                          f"with {policy.sampler!r}; use --update=awm or nft (they score clips), or that policy's "
                          f"sampler set to flow-grpo")
    reference = policy.reference()                                            # frozen: the KL anchor
    judge = load_reward_model(cfg.reward_model, policy.cfg) if cfg.reward != "heads" else None
    per_rank = cfg.prompts_per_iter * cfg.group_size // d.ranks
    M.check_batch_memory(policy, d.device, trained=per_rank + cfg.sft_batch, sampled=max(per_rank, 2 * cfg.eval_prompts),
                         stored=per_rank * (cfg.rollout_steps + 2))
    if d.main:  # every input is checked: only now may an old run be replaced
        claim_out_dir(cfg.out_dir, cfg.resume, cfg.overwrite, inputs=[cfg.init, cfg.reward_model], stage="rl",
                      command=command_line("reward_rl.py", cfg))
    state_path, ckpt_path = os.path.join(cfg.out_dir, "state.safetensors"), os.path.join(cfg.out_dir, "ckpt.safetensors")
    mc, world = policy.cfg, R.world_of(policy.cfg)
    ema = EMA(policy, cfg.ema_decay)
    sampler = M.frozen_copy(policy) if cfg.update == "nft" or cfg.update == "awm" and cfg.awm_clip > 0 else None
    shard(d, policy, ema.model, reference, sampler)                          # --parallel=fsdp/hsdp: a shard of each
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=0.0)
    guard, spikes, monitor = NonFiniteGuard(), SpikeGuard(cfg.spike_factor), HackingMonitor(cfg.patience)
    cost = Cost()
    floor = Floor(hold_margins(cfg), cfg.hold_rate, cfg.hold_guard) if cfg.hold else None    # --hold: a multiplier per held head
    parts = dict(guard=guard, spikes=spikes, monitor=monitor, cost=cost)  # every decision's history: saved, restored
    if floor:
        parts["floor"] = floor
    start, log_offset = resume_run(state_path, policy, ema, opt, cfg, parts, log, d.main) if cfg.resume else (0, None)
    spikes.snapshot(policy, opt)                    # at a checkpoint the last good weights are the current ones
    n_window, rollouts = len(window_steps(cfg, 0)), cfg.prompts_per_iter * cfg.group_size
    per_rank, n_trained = rollouts // d.ranks, max(1, round(cfg.train_fraction * n_window))
    log(f"batch: {cfg.prompts_per_iter} prompts x {cfg.group_size} rollouts = {rollouts} per iteration = {d.ranks} "
        f"rank(s) x {per_rank}; {cfg.rollout_steps} denoising steps, SDE on {n_window}, {n_trained} trained per rollout; "
        f"{cfg.epochs} epoch(s) x {cfg.minibatches} minibatch(es) = {cfg.epochs * cfg.minibatches} updates per iteration")
    print_config(cfg, log)
    train_prompts, names = data.train_prompts(), R.head_names(cfg.split_instruction)
    eval_prompts, _, eval_noise = R.eval_set(policy, cfg.eval_prompts, seed=cfg.seed, noise_seed=cfg.seed + 7)
    eval_noise = eval_noise.to(d.device)
    evaluate = lambda n: {"iter": n, **{k: round(v, 4) for k, v in R.quick_eval(
        ema.model, eval_prompts, eval_noise, cfg.eval_steps, cfg.cfg_scale, world).items()}}
    lineage = lambda n: lineage_record(f"rl-{cfg.update}", cfg.init, n, "prompts:train_combos", config=asdict(cfg),
                                         parent_stage=parent.get("lineage", {}).get("stage", ""))
    update = {"awm": awm_update, "ppo": ppo_update, "nft": nft_update}[cfg.update]
    cost.watch(*(net for net in (policy, reference, sampler, ema.model) if net is not None))  # the EMA: the probe
    mine = slice(d.rank * per_rank, (d.rank + 1) * per_rank)                  # this rank's share of the rollouts
    logf = open_log(os.path.join(cfg.out_dir, "log.jsonl"), log_offset) if d.main else None
    probe = floor_probe(cfg, policy, train_prompts) if floor else None
    held = lambda: probe_levels(cfg, ema.model, probe, judge, reward_fn, names, world, d)
    if floor and start == 0:                                                  # the start's levels: what is held
        cost.begin()
        floor.update(held())
        cost.end(d, 0, 0.0)
        log("floor: " + ", ".join(f"{h} {floor.start[h]:.4f} - {m}" for h, m in floor.margins.items()))
    first = evaluate(0) if start == 0 else None                              # every rank samples an evaluation
    if d.main and first:
        logf.write(json.dumps({"eval": first}) + "\n")
    t_start = time.time()
    bar = tqdm(range(start, cfg.iters), initial=start, total=cfg.iters, disable=not d.main, desc=f"rl-{cfg.update}")
    for it in bar:
        t0 = time.time()
        gen = seeded(cfg.seed, it)                                           # this iteration's draws, on every rank
        # ================================================================ SAMPLING
        cost.begin()
        clips, roll = sample_rollouts(cfg, policy, sampler, it, gen, train_prompts, mine, d.device,
                                      ema.model if cfg.update == "nft" else None)       # nft: the old policy samples
        roll.trained = sorted(torch.randperm(len(roll.transitions), generator=gen)[:n_trained].tolist())
        t_roll = time.time() - t0
        # ================================================================ REWARDS
        scores, rm_std = score(cfg, clips, roll, judge, reward_fn, names, world, d)  # (rollouts, heads), every rank
        # ================================================================ ADVANTAGES
        weights = R.advantage_weights(names, cfg.weights, it / max(1, cfg.iters - 1), cfg.curriculum)
        now, weights = held_settings(cfg, floor, names, weights)             # the floor's multipliers applied
        adv, zero_frac = advantages(now, scores, rm_std, weights)
        adv_mine = adv[mine].to(d.device)
        # ================================================================ TRAINING
        t1 = time.time()
        stats = update_policy(now, policy, reference, opt, ema, guard, update, roll, adv_mine, mine, it, gen, world, d, cost)
        # ================================================================ FLOOR: the held heads measured, multipliers moved
        if floor:
            floor.update(held())
        cost.end(d, rollouts, time.time() - t0)                              # what the iteration cost, over all ranks
        # ROLLBACK on a spike, decided on statistics every rank shares and any rank count gives alike (grad norm is
        # global; the KL is each minibatch's mean over all its clips, however the shuffle split them over ranks)
        kl_ref = all_mean(torch.tensor(sum(stats["kl_ref"]), dtype=torch.float64), d).item() / (cfg.epochs * cfg.minibatches)
        stats["kl_ref"] = [kl_ref]                                            # logged as decided
        if not spikes.check(policy, opt, grad_norm=max(stats["grad_norm"]), kl_ref=kl_ref):
            spikes.snapshot(policy, opt)
        held_log = floor.record() if floor else {}
        rec = record(it, names, scores, weights, zero_frac, adv, roll, stats, lr=opt.param_groups[0]["lr"], **held_log,
                     skipped=guard.skipped, rollbacks=spikes.rollbacks, rollout_s=round(t_roll, 2),
                     train_s=round(time.time() - t1, 2), v_norm_ratio=round(health(cfg, policy, reference, roll, it), 5),
                     **{f"cost_{k}": v for k, v in cost.state_dict().items()})
        bar.set_postfix(instr=f"{rec['reward_instruction'][0]:.3f}", kl=f"{rec['kl_ref']:.2e}",
                        gnorm=f"{rec['grad_norm']:.3f}", zero=f"{zero_frac:.2f}")
        # ---- EVALUATION, the hacking monitor and the time budget: decided on rank 0, obeyed by all
        out_of_time = cfg.max_minutes > 0 and time.time() - t_start + (time.time() - t0) > 60 * cfg.max_minutes
        out_of_time = bool(from_rank0(out_of_time, d))                       # rank 0's clock: all evaluate alike
        out_of_time = out_of_time or 0 < cfg.max_nfe <= cost.nfe             # the same count on every rank
        due = (it + 1) % cfg.eval_every == 0 or it + 1 == cfg.iters or out_of_time
        ev = evaluate(it + 1) if due else None
        stop = d.main and evaluate_and_decide(cfg, it, rec, scores, names, ev, monitor, out_of_time, logf, log)
        stop = bool(from_rank0(stop, d))
        if (it + 1) % cfg.ckpt_every == 0 or it + 1 == cfg.iters or stop:
            save_run_state(state_path, policy, ema, opt, lineage(it + 1), it + 1, parts, logf, d.main)
        if stop:
            break

    check_ranks_agree(policy, d)              # ---- hand-off, once the ranks agree: the EMA policy and a sample grid
    weights = full_state(ema.model, d.main)
    memory = memory_use(d, [net for net in (policy, ema.model, reference, sampler) if net is not None], opt)
    videos = M.sample(ema.model, data.tokenize(eval_prompts[:8]).to(d.device), eval_noise[:8], cfg.eval_steps,
                      cfg.cfg_scale)                                          # every rank: the EMA may be sharded
    if d.main:
        save_checkpoint(ckpt_path, weights, mc, lineage(it + 1 if cfg.iters > start else start))
        data.write_video(data.video_grid(videos, 2, 4), os.path.join(cfg.out_dir, "samples.gif"))
        logf.write(json.dumps(dict(memory=memory, parallel=cfg.parallel, ranks=d.ranks)) + "\n")
        log(f"done: {ckpt_path} ({guard.skipped} skipped updates, {spikes.rollbacks} rollbacks)")
        logf.close()
    teardown(d)
    release_run_folders(cfg.out_dir)
    check_trained(guard.skipped, cost.steps, ckpt_path)
    return ckpt_path


if __name__ == "__main__":
    run_cli(lambda argv: train(parse_config(Config, argv)), sys.argv[1:])
