"""Stage II: reward-driven RL on the flow sampler (GRPO's group advantages), stability-constrained.

    python reward_rl.py                                     # from the shipped SFT checkpoint, to runs/rl
    torchrun --standalone --nproc_per_node=2 reward_rl.py   # the same run; each group spans the ranks
    python reward_rl.py --update=ppo --sde_window=0 --rollout_steps=10 --epochs=1 --warmup=1 \\
        --sft_weight=0 --hold=                              # vanilla Flow-GRPO

train() reads top to bottom: SAMPLING, REWARDS, ADVANTAGES, TRAINING, FLOOR. TRAINING runs one of the update
rules in RULES (awm, the default, ppo or nft): each is a loss function and a row of what it needs, and
update_policy does the backward, the curated term, the clip, the guards and the EMA for all of them. Every
iteration logs what it cost (network evaluations, rollouts, optimizer steps, seconds: Cost) and what the rule
does to the policy (the ratio's mean and spread, per SDE step for PPO; the velocity norm against the reference's).

The objective, term by term (all of it in this file unless a function elsewhere is named):
  advantage  A_i = clip(sum_h w_h z_ih * r_i, +-adv_clip): z_ih rollout i's head-h reward z-scored within
             its group (0 where the group's std is under std_floor: group_zscores), w_h the head weights
             (rewards.HEADS), r_i the learned ensemble's reliability (reliability; --reward=rm or both).
  awm        per rollout and (t, x0) draw: max(-a_i p_i, -a_i clip(p_i, 1 +- awm_clip)),
             p_i = exp(e_sampler - e_policy), e = model.flow_error on the rolled-out clip, a_i = A_i (times
             neg_scale below 0): advantage-weighted flow matching whose ratio bounds it off-policy
             (ppo_clip_loss); + kl_weight |v - v_ref|^2 at pretraining's t (model.msq_free_frames), the
             flows' KL rate to the frozen input.
  ppo        per trained SDE step: max(-A_i p_i, -A_i clip(p_i, 1 +- clip_range)),
             p_i = exp(log pi(x_k+1 | x_k) - log pi_old), fp32 mean log-probs of the Gaussian step
             (model.score_sde_step, model.sde_step); + kl_weight * the closed-form KL between the policy's
             and the reference's steps (model.gaussian_kl).
  nft        DiffusionNFT (arXiv 2509.16117), on clips the old policy (the EMA, frozen at rollout) sampled:
             per draw r_i |v+ - (x1 - x0)|^2 + (1 - r_i) |v- - (x1 - x0)|^2 over the free frames,
             v+ = (1 - nft_beta) v_old + nft_beta v, v- = (1 + nft_beta) v_old - nft_beta v,
             r_i = 1/2 + clip(A_i / nft_scale, -1, 1) / 2: bounded below by construction, trained without
             guidance; + the same KL rate as awm.
  curated    + sft_weight * the flow loss on a fresh curated batch (model.curated_loss): PPO-ptx, so a
             reward cannot buy its gain with fidelity.
  floor      --hold=h=m: held head h may fall at most m below its start level s_h (constrained RL, RCPO):
             maximise the objective above subject to J_h >= s_h - m_h, J_h the head's mean on a
             training-split probe (hold_probe prompts, fixed noise, the EMA's ODE at eval_steps; never the
             held-out clips). One Lagrange multiplier per held head by dual ascent each iteration,
             lambda_h <- max(0, lambda_h + hold_rate (s_h - hold_guard m_h - J_h) / m_h) (stability.Floor),
             turns what --hold_via names: the step, lr / (1 + sum_h lambda_h) (the default: a trust region
             that shrinks while a held head is low), the curated term's weight sft_weight (1 + sum_h
             lambda_h) (a forward KL to data, as DDRL), the KL's weight likewise, or head h's advantage
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
from checkpoint import (full_state, lineage_record, load_model, resume_run, save_checkpoint,
                        save_run_state)
from cli import (ConfigError, check_ranges, claim_out_dir, command_line, open_log, parse_config,
                 print_config, release_run_folders, run_cli)
from distributed import (average_gradients, check_ranks_agree, from_rank0, gather_rows, make_logger,
                         mean_over_ranks, memory_use, on_shard, rank_slice, rows_of_rank,
                         setup_distributed, shard, teardown)
from judge import load_reward_model, rm_score
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
    noise_level: float = 0.7      # the SDE's a: std = a * sqrt(sigma / (1 - sigma))
    cfg_scale: float = 3.0        # guidance in rollouts and training (the policy is the guided sampler)
    # ---- REWARDS and ADVANTAGES
    reward: str = "heads"         # 'heads' (programmatic), 'rm' (learned ensemble) or 'both'
    reward_model: str = "checkpoints/reward_model.safetensors"  # the ensemble for 'rm' and 'both'
    weights: tuple = ()           # advantage weights as head=value (--weights=temporal=0.5); rewards.HEADS
    std_floor: float = 0.01       # groups whose reward std is below this teach nothing: advantage 0
    adv_clip: float = 5.0         # clip the summed advantage to +- this
    # ---- FLOOR: what the targeted reward may not be bought with
    hold: tuple = ("fidelity=0.01", "temporal=0.01")  # head=margin: that head may fall at most margin
                                  # below its start; --hold= turns the floor off
    hold_rate: float = 1.0        # dual ascent: a multiplier's rise per iteration per margin below the guard
    hold_guard: float = 1.0       # the guard line, in margins below the start, under which a multiplier
                                  # rises: 1 = the floor's edge (docs/results.md, Stage II holds its floor)
    hold_probe: int = 16          # training prompts the floor measures on: fixed noise, the EMA's ODE
    # ---- TRAINING
    update: str = "awm"           # the update rule, a row of RULES: 'awm' (advantage-weighted matching),
                                  # 'ppo' (Flow-GRPO's ratio), 'nft' (DiffusionNFT)
    lr: float = 1e-4              # AdamW learning rate (constant after warmup; the floor divides it)
    warmup: int = 10              # updates of linear warmup: Adam's first steps move every weight by ~lr
    kl_weight: float = -1.0       # weight of the KL to the frozen input; -1: the rule's own (RULES)
    draws: int = 2                # awm, nft: (t, noise) draws per rollout per update, shared in a group
    draw_t_mean: float = -1.0     # awm, nft: logit-normal mean of the draws' t (median 0.27): where
                                  # motion (direction, speed) is decided
    awm_clip: float = 0.02        # awm: clip of the ratio exp(err_sampler - err); 0 = unbounded loss
    nft_beta: float = 1.0         # nft: how far the implicit policies reach, v+- = v_old +- nft_beta (v - v_old)
    nft_scale: float = 2.0        # nft: r = 1/2 + clip(A / nft_scale, -1, 1) / 2, the advantage as odds
    clip_range: float = 2e-3      # ppo: ratio clip; small because log-probs are means over pixels
    sft_weight: float = 0.5       # weight of the flow loss on a fresh curated batch in every update (PPO-ptx)
    sft_batch: int = 32           # curated clips per update for that term (the same batch on every rank)
    epochs: int = 2               # passes over each iteration's rollouts, each with fresh (t, noise) draws
    minibatches: int = 1          # optimizer updates per pass; with a noisy gradient, fewer is safer
    grad_clip: float = 1.0        # global grad-norm clip
    ema_decay: float = 0.9        # EMA of the policy per update; evaluation and the hand-off use it
    spike_factor: float = 10.0    # rollback when grad norm or KL exceeds this times its recent median
    # ---- ABLATIONS: each switch turns one idea off or swaps it (bench.py ablations runs them)
    window_start: int = 0         # first SDE step; -1 slides the window from high to low noise
    train_fraction: float = 1.0   # ppo: share of the window's steps trained each iteration (DanceGRPO: 0.6)
    shared_noise: bool = False    # one initial noise per group: members differ only by the SDE's choices
    chunks: int = 1               # >1: roll out a continuation of (chunks - 1) ODE chunks; rewards see it all
    split_instruction: bool = False  # each prompted attribute's match its own head (weighted as instruction)
    curriculum: bool = False      # self-paced: weight moves fidelity -> temporal -> instruction (HEADS' phase)
    zscore: str = "per_head"      # 'per_head': z-score each head in its group, then weigh; 'sum': z-score the sum
    uncertainty: bool = True      # scale advantages by the ensemble's agreement (reliability in [0.5, 1.5])
    neg_scale: float = 1.0        # awm: weight of the push away from below-group clips (0: winners only)
    hold_via: str = "lr"          # what the floor's multipliers turn: 'lr' (the step / (1 + their sum)),
                                  # 'curated' (its weight x (1 + their sum)), 'kl' (likewise), 'advantage'
                                  # (added to the held head's weight, RCPO)
    # ---- evaluation and bookkeeping
    eval_every: int = 10          # iterations between held-out oracle evaluations
    eval_prompts: int = 16        # per split (val combinations and unseen held-out ones)
    eval_steps: int = 20          # Euler steps for evaluation
    patience: int = 3             # evaluations of falling oracle score with rising reward before stopping
    max_minutes: float = 10.0     # stop (and hand off) before the loop would pass this; 0 = run all iters
    max_nfe: int = 0              # stop (and hand off) once the run spent this many network evaluations
    seed: int = 0                 # prompts and noise follow (seed, iteration): resumes and ranks agree
    ckpt_every: int = 5           # iterations between resumable checkpoints
    resume: bool = False          # continue the run in out_dir
    overwrite: bool = False       # replace whatever out_dir holds
    bf16: str = "auto"            # bfloat16 autocast where the rule allows; 'auto' = where native
                                  # (docs/results.md, Emulated bfloat16)
    device: str = "auto"          # 'cpu', 'cuda' or 'auto'
    parallel: str = "ddp"         # under torchrun: 'ddp' (whole copies), 'fsdp' (sharded), 'hsdp' (per node)

    # flags an earlier postflow had, refused with their new name (the README's Renamed flags)
    RENAMED = {"beta": "kl_weight", "awm_beta": "kl_weight", "awm_draws": "draws",
               "awm_t_mean": "draw_t_mean"}


def check_config(cfg, ranks):
    check_ranges(cfg,
                 at_least_one=("iters", "prompts_per_iter", "rollout_steps", "chunks", "draws",
                               "sft_batch", "epochs", "minibatches", "eval_every", "eval_prompts",
                               "eval_steps", "patience", "ckpt_every"),
                 positive=("lr", "noise_level", "clip_range", "spike_factor", "adv_clip", "grad_clip",
                           "nft_beta", "nft_scale", "hold_rate", "hold_probe"),
                 fraction=("ema_decay",),
                 non_negative=("warmup", "neg_scale", "sft_weight", "cfg_scale", "std_floor",
                               "max_minutes", "max_nfe", "hold_guard"),
                 choices=dict(update=tuple(RULES), reward=("heads", "rm", "both"),
                              bf16=("auto", "true", "false"), zscore=("per_head", "sum"),
                              hold_via=("advantage", "curated", "kl", "lr")))
    rollouts = cfg.prompts_per_iter * cfg.group_size
    window = cfg.window_start + cfg.sde_window
    checks = (
        (cfg.kl_weight < 0 and cfg.kl_weight != -1,
         f"--kl_weight must be >= 0 (or -1, the rule's own), got {cfg.kl_weight}"),
        (cfg.split_instruction and cfg.reward != "heads", "--split_instruction needs --reward=heads"),
        (not 0 <= cfg.sde_window <= cfg.rollout_steps or window > cfg.rollout_steps,
         f"SDE window {cfg.window_start}+{cfg.sde_window} does not fit {cfg.rollout_steps} steps"),
        (not 0 < cfg.train_fraction <= 1,
         f"--train_fraction must be in (0, 1], got {cfg.train_fraction}"),
        (cfg.group_size < 2, "--group_size must be at least 2: advantages are relative to the group"),
        (rollouts % ranks, f"{rollouts} rollouts per iteration do not divide over {ranks} ranks"),
        (rollouts % cfg.minibatches,
         f"{rollouts} rollouts do not split into {cfg.minibatches} minibatches"),
        (cfg.hold and cfg.hold_probe % ranks,
         f"--hold_probe={cfg.hold_probe} does not divide over {ranks} ranks"))
    for bad, why in checks:
        if bad:
            raise ConfigError(why)
    # unknown heads are refused here
    R.head_weights(cfg.weights)
    hold_margins(cfg)


def hold_margins(cfg):
    """--hold's head=margin pairs as {head: margin}; an unknown head or a margin not > 0 is one line."""
    margins = {}
    for item in cfg.hold:
        name, _, value = item.partition("=")
        if name not in R.head_names(cfg.split_instruction):
            raise ConfigError(f"--hold names an unknown head {name!r}; "
                              f"heads: {', '.join(R.head_names())}")
        try:
            margins[name] = float(value)
        except ValueError:
            raise ConfigError(f"--hold expects head=margin, got {item!r}") from None
        if not 0 < margins[name] < float("inf"):
            raise ConfigError(f"--hold: {name}'s margin must be a finite number > 0, got {value}")
    return margins


def window_steps(cfg, it):
    """The SDE steps of iteration `it`: the window, sliding from noise to data if window_start < 0."""
    if not cfg.sde_window:
        return list(range(cfg.rollout_steps))
    start = cfg.window_start
    if start < 0:
        start = round((cfg.rollout_steps - cfg.sde_window) * it / max(1, cfg.iters - 1))
    return list(range(start, start + cfg.sde_window))


def bf16(cfg, device):
    """bfloat16 autocast where the update rule allows it (PPO's ratio compares two passes' log-probs)."""
    return bf16_autocast(cfg.bf16, device, allowed=RULES[cfg.update].bf16)


def kl_weight(cfg):
    """The KL's weight: --kl_weight, or the update rule's own where it is -1."""
    return RULES[cfg.update].kl_weight if cfg.kl_weight == -1 else cfg.kl_weight


# ----------------------------------------------------------------------------- SAMPLING
@dataclass
class Rollout:  # what SAMPLING hands to TRAINING: this rank's share n of the iteration's rollouts
    prompts: list                  # (n,) captions
    tokens: torch.Tensor           # (n, L)
    clips: torch.Tensor            # (n, *policy.flow_shape) the trained chunk, context frames pinned
    transitions: list              # per SDE step: (step index, x before, x after, fp32 log-prob (n,))
    group: torch.Tensor            # (n,) the global group of each rollout
    trained: list = None           # which SDE steps ppo trains this iteration (train_fraction of them)
    sampler: object = None         # awm, nft: a frozen copy of the weights that sampled (nft: the EMA's)
    ctx: torch.Tensor = None       # (n, C, F, H, W) clean context frames of a continuation, or None
    ctx_mask: torch.Tensor = None  # (n, F) bool


@torch.no_grad()
def sample_rollouts(cfg, policy, ema, sampler, it, gen, train_prompts, mine, device):
    """Every rank draws the same prompts and noise, then rolls out its slice `mine`: a group spans
    ranks, and 1 or N ranks roll out the same clips. `sampler` (the rule's frozen copy) takes the
    weights of the rule's old policy. Returns (clips to score, Rollout)."""
    rule = RULES[cfg.update]
    old = ema.model if rule.old_policy == "ema" else policy
    if sampler is not None:
        sampler.load_state_dict(old.state_dict())
    # nft: the old policy samples
    net = sampler if rule.old_policy == "ema" else policy
    shape = policy.flow_shape                                            # noise in the flow's space
    rollouts = cfg.prompts_per_iter * cfg.group_size
    idx = torch.randint(len(train_prompts), (cfg.prompts_per_iter,), generator=gen)
    # groups are consecutive
    prompts = [train_prompts[i] for i in idx.tolist() for _ in range(cfg.group_size)][mine]
    if cfg.shared_noise:
        # one noise per group
        x = torch.randn(cfg.prompts_per_iter, *shape, generator=gen)
        x = x.repeat_interleave(cfg.group_size, 0)
    else:
        x = torch.randn(rollouts, *shape, generator=gen)
    sde = window_steps(cfg, it)
    eps = torch.randn(len(sde), rollouts, *shape, generator=gen)[:, mine].to(device)
    tokens = data.tokenize(prompts).to(device)
    x = x[mine].to(device)
    net.eval()
    with bf16(cfg, device):
        # chunks > 1: earlier chunks by the ODE, then the trained chunk continues them
        context_gen = torch.Generator().manual_seed(cfg.seed + it)
        prefix, ctx, ctx_mask = M.continuation_context(net, tokens, context_gen, cfg.chunks,
                                                       cfg.rollout_steps, cfg.cfg_scale)
        x, transitions = M.sample_with_sde_window(net, x, tokens, cfg.rollout_steps, sde, eps,
                                                  cfg.cfg_scale, cfg.noise_level, ctx, ctx_mask)
    # the rewards see pixels
    chunk, clips = M.join_continuation(prefix, ctx, ctx_mask, net.decode(x))
    group = torch.arange(rollouts)[mine] // cfg.group_size
    # AWM fits what was rewarded
    chunk = policy.encode(chunk)
    n_trained = max(1, round(cfg.train_fraction * len(sde)))
    trained = sorted(torch.randperm(len(transitions), generator=gen)[:n_trained].tolist())
    return clips, Rollout(prompts, tokens, chunk, transitions, group, trained, sampler, ctx, ctx_mask)


# ----------------------------------------------------------------------------- REWARDS
def reward_scores(cfg, clips, prompts, tokens, judge, reward_fn, names, world):
    """The training reward of these clips, (n, heads), and the ensemble's spread (zeros without it)."""
    if reward_fn:
        heads = reward_fn(clips.cpu(), prompts)
    else:
        heads = R.reward_heads(clips.cpu(), prompts, world, split_instruction=cfg.split_instruction)
    scores = torch.stack([heads[h] for h in names], 1)                        # (n, heads)
    rm_std = torch.zeros_like(scores)
    if judge is not None:
        rm_mean, rm_sd = rm_score(judge, clips.cpu(), tokens.cpu())
        rm_scores = torch.stack([rm_mean[h] for h in names], 1)
        rm_std = torch.stack([rm_sd[h] for h in names], 1)
        scores = rm_scores if cfg.reward == "rm" else (scores + rm_scores) / 2
    return scores, rm_std


# ----------------------------------------------------------------------------- ADVANTAGES
def group_zscores(scores, group_size, std_floor):
    """scores (N, heads), N = groups * group_size rollouts grouped consecutively -> each head z-scored
    within its group, (r - mean) / (std + 1e-4) with the Bessel-corrected std (TeleBoost's and
    DanceGRPO's convention), and 0 where that std is under the floor; and the share of such
    (group, head) pairs."""
    g = scores.view(-1, group_size, scores.shape[1])                          # (groups, G, heads)
    mean = g.mean(1, keepdim=True)
    std = g.std(1, keepdim=True, correction=1)
    flat = std < std_floor
    z = torch.where(flat, torch.zeros_like(g), (g - mean) / (std + 1e-4))
    return z.flatten(0, 1), float(flat.float().mean())


def reliability(rm_std):
    """Per-rollout trust in the ensemble: 1.5 where its members agree most, 0.5 where they disagree most."""
    u = rm_std.mean(1)                                                        # (N,) over heads
    return (1 + (u.mean() - u) / (u.mean() + 1e-8)).clamp(0.5, 1.5)


def advantages(cfg, scores, rm_std, weights):
    """Per-head group z-scores summed with weights (--zscore=sum: one z-score of the weighted sum),
    scaled by the ensemble's reliability, clipped after every scaling. (N,) and the share of
    zero-variance (group, head) pairs."""
    if cfg.zscore == "sum":
        summed = (scores * weights).sum(1, keepdim=True)
        z, zero_frac = group_zscores(summed, cfg.group_size, cfg.std_floor)
        adv = z[:, 0]
    else:
        z, zero_frac = group_zscores(scores, cfg.group_size, cfg.std_floor)
        adv = (z * weights).sum(-1)
    if cfg.reward != "heads" and cfg.uncertainty:
        adv = adv * reliability(rm_std)
    return adv.clamp(-cfg.adv_clip, cfg.adv_clip), zero_frac


# ----------------------------------------------------------------------------- the update rules
@dataclass
class Batch:  # one rank's rows of a minibatch: what an update rule's loss sees
    clips: torch.Tensor            # (n, *flow_shape) the rolled-out clips
    tokens: torch.Tensor           # (n, L)
    adv: torch.Tensor              # (n,) advantages
    group: torch.Tensor            # (n,) each clip's group: the row of its (t, noise) draw
    rows: torch.Tensor             # (n,) the rows of the rank's rollouts they are (ppo slices its steps)
    ctx: torch.Tensor              # (n, C, F, H, W) context frames, or None
    ctx_mask: torch.Tensor         # (n, F) bool, or None
    sampler: object                # the frozen weights that sampled, or None
    fresh: bool                    # no optimizer step since sampling: the sampler's errors are the policy's


def batch_of(roll, adv, rows, fresh):
    ctx = None if roll.ctx is None else roll.ctx[rows]
    ctx_mask = None if roll.ctx is None else roll.ctx_mask[rows]
    return Batch(roll.clips[rows], roll.tokens[rows], adv[rows], roll.group[rows], rows, ctx, ctx_mask,
                 roll.sampler, fresh)


def ppo_clip_loss(log_ratio, advantages, clip_range):
    """PPO's pessimistic clipped objective per sample (B,), the ratio, and the share of ratios clipped.
    Flow-GRPO's ratio of mean log-probs and AWM's of exp(-err) both move little, so clip ranges are
    small (1e-4 .. 2e-2)."""
    ratio = torch.exp(log_ratio)
    clipped = ratio.clamp(1 - clip_range, 1 + clip_range)
    loss = torch.maximum(-advantages * ratio, -advantages * clipped)
    return loss, ratio.detach(), ((ratio.detach() - 1).abs() > clip_range).float().mean().item()


def velocity(net, b, t, x0):
    """net's velocity on the straight path from the draw's noise x0 to each clip, at the draw's t."""
    dev = b.clips.device
    return M.straight_path_velocity(net, b.clips, x0[b.group].to(dev), t[b.group].to(dev), b.tokens,
                                    b.ctx, b.ctx_mask)


def ratio_stats(ratio):
    return dict(ratio=float(ratio.mean()), ratio_std=float(ratio.std()) if len(ratio) > 1 else 0.0)


def awm_loss(cfg, policy, reference, b, draw):
    """Advantage-weighted matching on one (t, x0) draw: each clip's flow-matching error weighted by its
    advantage (pull toward winners, push from losers), bounded as AWM does by the PPO-clipped ratio
    exp(err_sampler - err): the plain weighted loss falls without limit off-policy."""
    t, x0, _ = draw
    dev = b.clips.device
    weight = torch.where(b.adv < 0, cfg.neg_scale * b.adv, b.adv)

    def error(net):                                                           # (n,)
        return M.flow_error(net, b.clips, x0[b.group].to(dev), t[b.group].to(dev), b.tokens, b.ctx,
                            b.ctx_mask).float()
    err = error(policy)
    if cfg.awm_clip == 0:
        return weight * err, {}
    with torch.no_grad():
        err_old = err.detach() if b.fresh else error(b.sampler)
    loss, ratio, clipped = ppo_clip_loss(err_old - err, weight, cfg.awm_clip)
    return loss, dict(**ratio_stats(ratio), clip_frac=clipped)


def nft_loss(cfg, policy, reference, b, draw):
    """DiffusionNFT on one (t, x0) draw of clips the old policy (the EMA at rollout time) sampled: each
    advantage as an optimality odds r in [0, 1]; the flow-matching error of two implicit policies
    mixed from the old velocity and the trained one, v+ toward clips with r = 1 and v- toward clips
    with r = 0. At v = v_old its gradient is nft_beta times that of sum (2r - 1) err; off-policy the
    loss is a sum of squares, bounded below. Guidance-free: the conditional velocity is trained."""
    t, x0, _ = draw
    r = 0.5 + 0.5 * (b.adv / cfg.nft_scale).clamp(-1, 1)                    # (n,) in [0, 1]
    beta = cfg.nft_beta
    target = b.clips - x0[b.group].to(b.clips.device)
    with torch.no_grad():
        v_old = velocity(b.sampler, b, t, x0)
    v = velocity(policy, b, t, x0)
    positive = (1 - beta) * v_old + beta * v
    negative = (1 + beta) * v_old - beta * v
    loss = (r * M.msq_free_frames(positive, target, b.ctx_mask)
            + (1 - r) * M.msq_free_frames(negative, target, b.ctx_mask)).float()
    with torch.no_grad():
        # the implied ratio exp(err_old - err), as awm's
        err_old = M.msq_free_frames(v_old, target, b.ctx_mask)
        ratio = (err_old - M.msq_free_frames(v.detach(), target, b.ctx_mask)).float().exp()
    return loss, ratio_stats(ratio)


def ppo_loss(cfg, policy, reference, b, step):
    """Flow-GRPO on one trained SDE step: PPO's clipped ratio of the step's log-prob now and at rollout
    time, plus kl_weight * the closed-form KL between the policy's and the reference's Gaussian steps."""
    i, x_t, x_next, logp_old = step
    grid = M.time_grid(cfg.rollout_steps, policy.flow_shift)
    args = (x_t[b.rows], x_next[b.rows], i, grid, b.tokens, cfg.cfg_scale, cfg.noise_level, b.ctx,
            b.ctx_mask)
    # the policy's Gaussian step, and the reference's on the same step
    mean, step_std, logp = M.score_sde_step(policy, *args)
    with torch.no_grad():
        mean_ref = M.score_sde_step(reference, *args)[0]
    log_ratio = logp - logp_old[b.rows]
    policy_loss, ratio, clipped = ppo_clip_loss(log_ratio, b.adv, cfg.clip_range)
    kl = M.gaussian_kl(mean, mean_ref, step_std)                             # (n,)
    approx_kl = (ratio - 1 - log_ratio.detach()).mean()                      # ratio = exp(log_ratio)
    metrics = dict(ratio=float(ratio.mean()), clip_frac=float(clipped), approx_kl=float(approx_kl),
                   ratio_std=float(ratio.std() if len(ratio) > 1 else 0.0))
    # GRPO-Guard: the ratio's mean per SDE step
    metrics[f"ratio_step{i}"] = float(ratio.mean())
    metrics["kl_ref"] = kl.detach()
    return policy_loss + kl_weight(cfg) * kl, metrics


def flow_kl(policy, reference, b, draw):
    """|v - v_ref|^2 over the free frames, the flows' KL rate to the frozen reference, at the draw's
    pretraining t (where the edges are drawn). (n,)"""
    _, x0, t = draw
    with torch.no_grad():
        v_ref = velocity(reference, b, t, x0)
    return M.msq_free_frames(velocity(policy, b, t, x0), v_ref, b.ctx_mask)


@dataclass(frozen=True)
class Rule:
    loss: object          # (cfg, policy, reference, Batch, sample) -> (loss per clip (n,), metrics)
    samples: str          # what the loss is taken over: 'draws' ((t, noise) per group) or 'sde_steps'
    old_policy: str       # whose frozen copy samples and is compared with: 'policy', 'ema' or None
    flow_kl: bool         # + kl_weight |v - v_ref|^2 at pretraining's t (else its loss holds its KL)
    bf16: bool            # may run under bfloat16 autocast
    kl_weight: float      # the KL's weight where --kl_weight=-1
    sampler: str = ""     # the rollout sampler it needs ('flow-grpo': sde_step's Gaussian), '' any


# A new rule is one loss function and one row (test_a_fourth_update_rule_trains_from_the_test_file).
RULES = {
    "awm": Rule(awm_loss, samples="draws", old_policy="policy", flow_kl=True, bf16=True, kl_weight=0.3),
    "ppo": Rule(ppo_loss, samples="sde_steps", old_policy=None, flow_kl=False, bf16=False,
                kl_weight=0.01, sampler="flow-grpo"),
    "nft": Rule(nft_loss, samples="draws", old_policy="ema", flow_kl=True, bf16=True, kl_weight=0.3),
}


# ----------------------------------------------------------------------------- TRAINING
def rule_samples(cfg, roll, gen):
    """What the rule's loss is averaged over this epoch: (t, noise, t_kl) draws per group, or the
    rollout's trained SDE steps. Drawn over all ranks: any rank count draws alike."""
    if RULES[cfg.update].samples == "sde_steps":
        return [roll.transitions[k] for k in roll.trained]
    groups = cfg.prompts_per_iter
    return [(M.sample_t(groups, gen, mean=cfg.draw_t_mean),
             torch.randn(groups, *roll.clips.shape[1:], generator=gen), M.sample_t(groups, gen))
            for _ in range(cfg.draws)]


def rule_backward(cfg, policy, reference, b, samples, scale, stats):
    """The rule's loss on each sample and its KL, backpropagated; scale turns this rank's sums into its
    part of the minibatch's global mean. Per-clip metrics (tensors) are logged as such parts, summed
    over ranks later; the others as they are. Returns this rank's part of the loss."""
    rule = RULES[cfg.update]
    total = 0.0
    with bf16(cfg, b.clips.device):
        for sample in samples:
            loss, metrics = rule.loss(cfg, policy, reference, b, sample)
            (loss.sum() * scale / len(samples)).backward()
            total += loss.sum().item() * scale / len(samples)
            for key, value in metrics.items():
                per_clip = torch.is_tensor(value)
                stats[key].append(value.sum().item() * scale / len(samples) if per_clip else value)
        if rule.flow_kl:
            kl = flow_kl(policy, reference, b, samples[0])
            (kl_weight(cfg) * kl.sum() * scale).backward()
            stats["kl_ref"].append(kl.sum().item() * scale)
    stats["loss"].append(total)
    return total


def curated_term(cfg, policy, n_update, world, device, stats):
    """PPO-ptx: keep fitting real clips at every t, so the reward cannot buy words with fidelity (a few
    % of an iteration's cost; every rank fits the same batch, so 1 or N ranks step alike)."""
    with bf16(cfg, device):
        loss = M.curated_loss(policy, cfg.sft_batch, cfg.seed, n_update, world, device).mean()
    (cfg.sft_weight * loss).backward()
    stats["sft_loss"].append(loss.item())


def update_policy(cfg, policy, reference, opt, ema, guard, roll, adv, mine, it, gen, world, d, cost):
    """epochs x minibatches optimizer steps on the iteration's rollouts: the rule's loss and KL, the
    curated term, the gradient average, the warmup, the clip, the non-finite guard and the EMA.
    adv: this rank's (n,). Returns the update statistics."""
    stats = defaultdict(list)
    rollouts = cfg.prompts_per_iter * cfg.group_size
    policy.train()
    for epoch in range(cfg.epochs):
        # over all ranks: draws match any rank count
        order = torch.randperm(rollouts, generator=gen)
        samples = rule_samples(cfg, roll, gen)
        for j, chunk in enumerate(order.chunk(cfg.minibatches)):
            n_update = (it * cfg.epochs + epoch) * cfg.minibatches + j      # every optimizer step
            rows = rows_of_rank(chunk, mine)
            b = batch_of(roll, adv, rows, fresh=epoch == 0 and j == 0)
            scale = d.ranks / len(chunk)
            loss = on_shard(len(rows), d, stats, lambda kept: rule_backward(
                cfg, policy, reference, b, samples, scale, kept))
            if cfg.sft_weight > 0:
                curated_term(cfg, policy, n_update, world, d.device, stats)
            average_gradients(policy.parameters(), d)
            for group in opt.param_groups:                                    # linear warmup, then constant
                group["lr"] = linear_warmup(n_update, cfg.lr, cfg.warmup)
            # CLIP: global, after the all-reduce
            grad_norm = clip_gradients(policy.parameters(), cfg.grad_clip)
            stats["grad_norm"].append(grad_norm)
            if guard.ok(mean_over_ranks(loss, d), grad_norm):
                opt.step()
                ema.update(policy, n_update)                                  # EMA
            opt.zero_grad(set_to_none=True)
            cost.steps += 1
    return stats


# ----------------------------------------------------------------------------- FLOOR
def floor_probe(cfg, policy, train_prompts):
    """The floor's fixed probe: hold_probe training prompts and their starting noise, from the seed."""
    order = torch.randperm(len(train_prompts), generator=seeded(cfg.seed + 23, 0)).tolist()
    prompts = [train_prompts[i] for i in order[:cfg.hold_probe]]
    return prompts, R.noise_for(cfg.hold_probe, policy, cfg.seed + 29)


@torch.no_grad()
def probe_levels(cfg, net, probe, judge, reward_fn, names, world, d):
    """The floor's measure: each held head's mean training reward on the EMA policy's ODE samples of
    fixed training prompts from fixed noise, so that iterations compare clip for clip, at eval_steps
    (a 6-step probe missed the fall that 20 steps show: docs/results.md, Stage II holds its floor).
    Each rank samples its share, as with rollouts; rank 0's levels are the ones every rank steers by."""
    prompts, noise = probe
    mine = rank_slice(len(prompts), d)
    tokens = data.tokenize(prompts[mine]).to(d.device)
    with bf16(cfg, d.device):
        clips = M.sample(net, tokens, noise[mine].to(d.device), cfg.eval_steps, cfg.cfg_scale)
    scores = reward_scores(cfg, clips, prompts[mine], tokens, judge, reward_fn, names, world)[0]
    levels = gather_rows(scores, d).mean(0)                                 # (heads,) the whole probe
    return {h: from_rank0(float(levels[names.index(h)]), d) for h in hold_margins(cfg)}


def held_settings(cfg, floor, names, weights):
    """This iteration's head weights and settings with the floor's multipliers applied to what
    --hold_via turns: the held heads' advantage weights (w_h + lambda_h), the curated term's or the
    KL's weight x (1 + sum lambda), or the learning rate / (1 + sum lambda)."""
    lam = floor.multiplier if floor else {}
    if cfg.hold_via == "advantage":
        return cfg, weights + torch.tensor([lam.get(n, 0.0) for n in names], dtype=weights.dtype)
    scale = 1 + sum(lam.values())
    if cfg.hold_via == "curated":
        return replace(cfg, sft_weight=cfg.sft_weight * scale), weights
    if cfg.hold_via == "lr":
        return replace(cfg, lr=cfg.lr / scale), weights
    return replace(cfg, kl_weight=kl_weight(cfg) * scale), weights


# ----------------------------------------------------------------------------- LOG
def health(cfg, policy, reference, roll, it):
    """|v| / |v_ref| on up to 8 of the iteration's clips, with noise of its own stream (the run's
    draws untouched), measured alike for every rule."""
    n = min(8, len(roll.clips))
    ctx = None if roll.ctx is None else roll.ctx[:n]
    ctx_mask = None if roll.ctx is None else roll.ctx_mask[:n]
    return M.velocity_norm_ratio(policy, reference, roll.clips[:n], roll.tokens[:n],
                                 seeded(cfg.seed + 17, it), ctx, ctx_mask)


def record(it, names, scores, weights, zero_frac, adv, roll, stats, **extra):
    """One log line: each head's reward (mean, std), the advantages, every update statistic's mean, and
    the ratio's mean per SDE step where the rule has one (ppo)."""
    def r4(x):
        return round(float(x), 4)
    sde = [s[0] for s in roll.transitions]
    means = {k: sum(stats[k]) / len(stats[k]) if stats[k] else None
             for k in ("ratio", "ratio_std", "clip_frac", "approx_kl", "loss", "sft_loss")}
    means["ratio_by_step"] = {k[len("ratio_step"):]: r4(sum(v) / len(v))
                              for k, v in stats.items() if k.startswith("ratio_step")}
    rewards = {f"reward_{h}": [r4(scores[:, j].mean()), r4(scores[:, j].std())]
               for j, h in enumerate(names)}
    return dict(iter=it + 1, **rewards, zero_std_frac=r4(zero_frac), adv_mean=r4(adv.mean()),
                adv_std=r4(adv.std()), adv_absmax=r4(adv.abs().max()),
                weights=[round(float(w), 3) for w in weights], sde_steps=sde,
                trained_steps=[sde[k] for k in roll.trained], **means,
                grad_norm=r4(max(stats["grad_norm"])), **extra)


def evaluate_and_decide(cfg, it, rec, scores, names, ev, monitor, out_of_time, logf, log):
    """Rank 0's end of an iteration: the log line, the held-out evaluation ev when one was due, and
    whether to stop."""
    logf.write(json.dumps(rec) + "\n")
    hacked = False
    if ev is not None:
        logf.write(json.dumps({"eval": ev}) + "\n")
        log(f"eval @{it + 1}: " + " ".join(f"{k}={v}" for k, v in ev.items() if k != "iter"))
        # proxy vs truth on the heads the eval scores, at fixed weights (a curriculum's would move both)
        fixed = R.advantage_weights(names, cfg.weights).tolist()
        w = [(i, v) for i, (n, v) in enumerate(zip(names, fixed)) if n in ev]
        truth = sum(v * ev[names[i]] for i, v in w)
        proxy = sum(v * scores[:, i].mean().item() for i, v in w)
        hacked = monitor.update(truth, proxy)
        if hacked:
            log(f"stopping: the held-out oracle reward fell {cfg.patience} evaluations in a row while "
                f"the trained reward overstated it more and more (reward hacking); keeping the last "
                f"checkpoint")
    if out_of_time:
        log(f"stopping: --max_minutes={cfg.max_minutes} or --max_nfe={cfg.max_nfe} reached after "
            f"{it + 1} iterations")
    logf.flush()
    return hacked or out_of_time


# ----------------------------------------------------------------------------- the loop
def train(cfg: Config, reward_fn=None):
    """reward_fn(clips, prompts) -> {head: (B,)} replaces the configured judge (tests use a simple one)."""
    d = setup_distributed(cfg.device, cfg.parallel)
    log = make_logger(d)
    check_config(cfg, d.ranks)
    rule = RULES[cfg.update]
    policy, parent = load_model(cfg.init, d.device)
    if rule.sampler and policy.sampler != rule.sampler:
        # the solver contract: PPO rescores the rollout's own Gaussian steps
        raise ConfigError(f"--update={cfg.update} scores rollouts with {rule.sampler!r} steps, but "
                          f"{cfg.init} rolls out with {policy.sampler!r}; use --update=awm or nft "
                          f"(they score clips), or that policy's sampler set to {rule.sampler}")
    reference = policy.reference()                                            # frozen: the KL anchor
    judge = load_reward_model(cfg.reward_model, policy.cfg) if cfg.reward != "heads" else None
    rollouts = cfg.prompts_per_iter * cfg.group_size
    per_rank = rollouts // d.ranks
    M.check_batch_memory(policy, d.device, trained=per_rank + cfg.sft_batch,
                         sampled=max(per_rank, 2 * cfg.eval_prompts),
                         stored=per_rank * (cfg.rollout_steps + 2))
    if d.main:  # every input is checked: only now may an old run be replaced
        claim_out_dir(cfg.out_dir, cfg.resume, cfg.overwrite, inputs=[cfg.init, cfg.reward_model],
                      stage="rl", command=command_line("reward_rl.py", cfg))
    state_path = os.path.join(cfg.out_dir, "state.safetensors")
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.safetensors")
    world = R.world_of(policy.cfg)
    ema = EMA(policy, cfg.ema_decay)
    sampler = M.frozen_copy(policy) if rule.old_policy else None
    shard(d, policy, ema.model, reference, sampler)                 # --parallel=fsdp/hsdp: a shard each
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=0.0)
    guard = NonFiniteGuard()
    spikes = SpikeGuard(cfg.spike_factor)
    monitor = HackingMonitor(cfg.patience)
    cost = Cost()
    # --hold: a multiplier per held head
    floor = Floor(hold_margins(cfg), cfg.hold_rate, cfg.hold_guard) if cfg.hold else None
    # every decision's history: saved, restored
    parts = dict(guard=guard, spikes=spikes, monitor=monitor, cost=cost)
    if floor:
        parts["floor"] = floor
    start, log_offset = 0, None
    if cfg.resume:
        start, log_offset = resume_run(state_path, policy, ema, opt, cfg, parts, log, d.main)
    spikes.snapshot(policy, opt)                # at a checkpoint the last good weights are the current ones
    n_window = len(window_steps(cfg, 0))
    n_trained = max(1, round(cfg.train_fraction * n_window))
    log(f"batch: {cfg.prompts_per_iter} prompts x {cfg.group_size} rollouts = {rollouts} per iteration "
        f"= {d.ranks} rank(s) x {per_rank}; {cfg.rollout_steps} denoising steps, SDE on {n_window}, "
        f"{n_trained} trained per rollout; {cfg.epochs} epoch(s) x {cfg.minibatches} minibatch(es) = "
        f"{cfg.epochs * cfg.minibatches} updates per iteration")
    print_config(cfg, log)
    train_prompts = data.train_prompts()
    names = R.head_names(cfg.split_instruction)
    eval_prompts, _, eval_noise = R.eval_set(policy, cfg.eval_prompts, seed=cfg.seed,
                                             noise_seed=cfg.seed + 7)
    eval_noise = eval_noise.to(d.device)

    def evaluate(n):
        scores = R.quick_eval(ema.model, eval_prompts, eval_noise, cfg.eval_steps, cfg.cfg_scale, world)
        return {"iter": n, **{k: round(v, 4) for k, v in scores.items()}}

    def lineage(n):
        return lineage_record(f"rl-{cfg.update}", cfg.init, n, "prompts:train_combos", config=asdict(cfg),
                              parent_stage=parent.get("lineage", {}).get("stage", ""))

    # the EMA's passes count too: the floor's probe
    cost.watch(*(net for net in (policy, reference, sampler, ema.model) if net is not None))
    mine = rank_slice(rollouts, d)                                          # this rank's rollouts
    logf = open_log(os.path.join(cfg.out_dir, "log.jsonl"), log_offset) if d.main else None
    probe = floor_probe(cfg, policy, train_prompts) if floor else None

    def held():
        return probe_levels(cfg, ema.model, probe, judge, reward_fn, names, world, d)
    if floor and start == 0:                                                  # what is held: the start
        cost.begin()
        floor.update(held())
        cost.end(d, 0, 0.0)
        log("floor: " + ", ".join(f"{h} {floor.start[h]:.4f} - {m}" for h, m in floor.margins.items()))
    first = evaluate(0) if start == 0 else None                      # every rank samples an evaluation
    if d.main and first:
        logf.write(json.dumps({"eval": first}) + "\n")
    t_start = time.time()
    bar = tqdm(range(start, cfg.iters), initial=start, total=cfg.iters, disable=not d.main,
               desc=f"rl-{cfg.update}")
    for it in bar:
        t0 = time.time()
        gen = seeded(cfg.seed, it)                                   # this iteration's draws, every rank
        # ================================================================ SAMPLING
        cost.begin()
        clips, roll = sample_rollouts(cfg, policy, ema, sampler, it, gen, train_prompts, mine, d.device)
        t_roll = time.time() - t0
        # ================================================================ REWARDS
        # (rollouts, heads) on every rank: a group's rewards span the ranks
        scores, rm_std = reward_scores(cfg, clips, roll.prompts, roll.tokens, judge, reward_fn, names,
                                       world)
        scores = gather_rows(scores, d)
        rm_std = gather_rows(rm_std, d)
        # ================================================================ ADVANTAGES
        progress = it / max(1, cfg.iters - 1)
        weights = R.advantage_weights(names, cfg.weights, progress, cfg.curriculum)
        now, weights = held_settings(cfg, floor, names, weights)          # the floor's multipliers
        adv, zero_frac = advantages(now, scores, rm_std, weights)
        # ================================================================ TRAINING
        t1 = time.time()
        stats = update_policy(now, policy, reference, opt, ema, guard, roll, adv[mine].to(d.device),
                              mine, it, gen, world, d, cost)
        # ================================================================ FLOOR
        # the held heads measured, the multipliers moved
        if floor:
            floor.update(held())
        cost.end(d, rollouts, time.time() - t0)                     # the iteration's cost, all ranks
        # ROLLBACK on a spike, decided on statistics every rank shares and any rank count gives alike
        # (grad norm is global; the KL is each minibatch's mean over all its clips, however the
        # shuffle split them over ranks)
        kl_ref = mean_over_ranks(sum(stats["kl_ref"]), d) / (cfg.epochs * cfg.minibatches)
        if not spikes.check(policy, opt, grad_norm=max(stats["grad_norm"]), kl_ref=kl_ref):
            spikes.snapshot(policy, opt)
        held_log = floor.record() if floor else {}
        rec = record(it, names, scores, weights, zero_frac, adv, roll, stats, kl_ref=kl_ref,
                     lr=opt.param_groups[0]["lr"], **held_log, skipped=guard.skipped,
                     rollbacks=spikes.rollbacks, rollout_s=round(t_roll, 2),
                     train_s=round(time.time() - t1, 2),
                     v_norm_ratio=round(health(cfg, policy, reference, roll, it), 5),
                     **{f"cost_{k}": v for k, v in cost.state_dict().items()})
        bar.set_postfix(instr=f"{rec['reward_instruction'][0]:.3f}", kl=f"{rec['kl_ref']:.2e}",
                        gnorm=f"{rec['grad_norm']:.3f}", zero=f"{zero_frac:.2f}")
        # ---- EVALUATION, the hacking monitor and the budgets: decided on rank 0, obeyed by all
        elapsed = time.time() - t_start + (time.time() - t0)
        out_of_time = cfg.max_minutes > 0 and elapsed > 60 * cfg.max_minutes
        out_of_time = bool(from_rank0(out_of_time, d))                # rank 0's clock
        out_of_time = out_of_time or 0 < cfg.max_nfe <= cost.nfe     # the same count on every rank
        due = (it + 1) % cfg.eval_every == 0 or it + 1 == cfg.iters or out_of_time
        ev = evaluate(it + 1) if due else None
        stop = d.main and evaluate_and_decide(cfg, it, rec, scores, names, ev, monitor, out_of_time,
                                              logf, log)
        stop = bool(from_rank0(stop, d))
        if (it + 1) % cfg.ckpt_every == 0 or it + 1 == cfg.iters or stop:
            save_run_state(state_path, policy, ema, opt, lineage(it + 1), it + 1, parts, logf, d.main)
        if stop:
            break

    # ---- hand-off, once the ranks agree: the EMA policy and a sample grid
    check_ranks_agree(policy, d)
    weights = full_state(ema.model, d.main)
    nets = [net for net in (policy, ema.model, reference, sampler) if net is not None]
    memory = memory_use(d, nets, opt)
    # every rank samples: the EMA may be sharded
    videos = M.sample(ema.model, data.tokenize(eval_prompts[:8]).to(d.device), eval_noise[:8],
                      cfg.eval_steps, cfg.cfg_scale)
    if d.main:
        save_checkpoint(ckpt_path, weights, policy.cfg,
                        lineage(it + 1 if cfg.iters > start else start))
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
