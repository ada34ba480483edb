"""Stage II: reward-driven RL on the flow sampler (GRPO's group advantages), stability-constrained.

    python reward_rl.py                                    # the shipped SFT checkpoint -> runs/rl
    torchrun --standalone --nproc_per_node=2 reward_rl.py  # the same run, its groups over ranks
    python reward_rl.py --update=ppo --sde_window=0 --rollout_steps=10 --epochs=1 --warmup=1 \\
        --sft_weight=0 --hold=                             # vanilla Flow-GRPO

train() reads top to bottom: SAMPLING, REWARDS, ADVANTAGES, TRAINING, FLOOR. TRAINING runs one of
the update rules in rl_objective.RULES (awm, the default, ppo or nft), each a loss function and a
row of what it needs; update_policy does the backward, the curated term, the clip, the guards and
the EMA for all of them. Every iteration logs what it cost (network evaluations, rollouts, optimizer
steps, seconds: Cost) and what the rule does to the policy (the ratio's mean and spread, per SDE
step for PPO; the velocity norm against the reference's).

The objective, term by term, is rl_objective.py's docstring; its math (the group advantages, the
rules' losses and KLs) is there too.
"""
import json
import os
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass

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
from rl_objective import (RULES, Batch, advantages, flow_kl, held_settings, hold_margins,
                          kl_weight)
from stability import (EMA, Cost, Floor, HackingMonitor, NonFiniteGuard, Snapshot, SpikeGuard,
                       bf16_autocast, check_trained, clip_gradients, linear_warmup, seeded)


@dataclass
class Config:
    init: str = "checkpoints/sft_small.safetensors"  # the start, and the frozen KL reference
    out_dir: str = "runs/rl"      # ckpt.safetensors, state.safetensors, log.jsonl, samples.gif
    iters: int = 30               # rollout + update iterations
    # ---- SAMPLING
    prompts_per_iter: int = 8     # distinct training prompts per iteration, over all ranks
    group_size: int = 8           # rollouts per prompt: the group its advantages are relative to
    rollout_steps: int = 6        # denoising steps of a rollout (evaluation uses eval_steps)
    sde_window: int = 2           # SDE steps inside the ODE trajectory; 0 = all (vanilla Flow-GRPO)
    noise_level: float = 0.7      # the SDE's a: std = a * sqrt(sigma / (1 - sigma))
    cfg_scale: float = 3.0        # guidance in rollouts and training: the guided sampler is trained
    # ---- REWARDS and ADVANTAGES
    reward: str = "heads"         # 'heads' (programmatic), 'rm' (learned ensemble) or 'both'
    reward_model: str = "checkpoints/reward_model.safetensors"  # the ensemble for rm and both
    weights: tuple = ()           # advantage weights, head=value (--weights=temporal=0.5)
    std_floor: float = 0.01       # groups whose reward std is below this teach nothing: advantage 0
    adv_clip: float = 5.0         # clip the summed advantage to +- this
    # ---- FLOOR: what the targeted reward may not be bought with
    hold: tuple = ("fidelity=0.01", "temporal=0.01")  # head=margin: it may fall at most margin
                                  # below its start; --hold= turns the floor off
    hold_rate: float = 1.0        # dual ascent: a multiplier's rise per iteration per margin below
    hold_guard: float = 1.0       # the line a multiplier rises below, in margins under the start
                                  # (docs/results.md, Stage II holds its floor)
    hold_probe: int = 16          # training prompts the floor measures: fixed noise, the EMA's ODE
    hold_every: int = 1           # iterations between its measures (each costs about a third of
                                  # an iteration's evaluations); the multipliers move only then
    # ---- TRAINING
    update: str = "awm"           # the update rule, a row of rl_objective.RULES: awm, ppo or nft
    lr: float = 2e-4              # AdamW learning rate, constant after warmup; the floor divides it
    warmup: int = 10              # updates of linear warmup: Adam's first steps move weights by ~lr
    kl_weight: float = -1.0       # weight of the KL to the frozen input; -1: the rule's own
    draws: int = 2                # awm, nft: (t, noise) draws per rollout per update, one a group
    draw_t_mean: float = -1.0     # awm, nft: logit-normal mean of their t (median 0.27: motion)
    awm_clip: float = 0.02        # awm: clip of the ratio exp(err_sampler - err); 0: unbounded
    nft_beta: float = 1.0         # nft: implicit policies' reach, v+- = v_old +- beta (v - v_old)
    nft_scale: float = 2.0        # nft: r = 1/2 + clip(A / nft_scale, -1, 1) / 2, A as odds
    clip_range: float = 2e-3      # ppo: ratio clip; small because log-probs are means over pixels
    sft_weight: float = 0.5       # weight of the flow loss on fresh curated clips (PPO-ptx)
    sft_batch: int = 32           # curated clips per update for it (the same on every rank)
    epochs: int = 2               # passes over each iteration's rollouts, fresh draws each
    minibatches: int = 2          # optimizer updates per pass: 2 take the warmup and the EMA's lag
                                  # in half the iterations (docs/results.md: Two steps a pass)
    grad_clip: float = 1.0        # global grad-norm clip
    ema_decay: float = 0.9        # EMA of the policy per update; evaluation and hand-off use it
    ema_warmup: bool = False      # true: warm its decay up from 0.1, as from scratch; false: the
                                  # decay from the first update, which averages out the steps' noise
                                  # that costs fidelity (docs/results.md: The step's noise and
                                  # the EMA)
    spike_factor: float = 10.0    # rollback when grad norm or KL exceeds this x its recent median
    # ---- ABLATIONS: each switch turns one idea off or swaps it (bench.py ablations runs them)
    window_start: int = 0         # first SDE step; -1 slides the window from high to low noise
    train_fraction: float = 1.0   # ppo: share of the window's steps trained (DanceGRPO: 0.6)
    shared_noise: bool = False    # one initial noise per group: members differ by the SDE only
    chunks: int = 1               # >1: roll out continuations after (chunks - 1) ODE chunks
    split_instruction: bool = False  # each prompted attribute's match a head of its own
    curriculum: bool = False      # self-paced weights: fidelity, then temporal, then instruction
    zscore: str = "per_head"      # 'per_head' z-scores each head, then weighs; 'sum': the sum
    uncertainty: bool = True      # scale advantages by the ensemble's agreement (0.5 .. 1.5)
    neg_scale: float = 1.0        # awm: weight of the push from below-group clips (0: pull only)
    hold_via: str = "lr"          # the floor's lever: 'lr' (/ (1 + sum lambda)), 'curated' or 'kl'
                                  # (x (1 + sum lambda)), 'advantage' (w_h + lambda_h, RCPO)
    hold_undo: bool = False       # an iteration that leaves a held head below its floor is taken
                                  # back (policy, EMA, optimizer); its multiplier's rise stays
    # ---- evaluation and bookkeeping
    eval_every: int = 10          # iterations between held-out oracle evaluations
    eval_prompts: int = 16        # per split (val combinations and unseen held-out ones)
    eval_steps: int = 20          # Euler steps for evaluation
    patience: int = 3             # evaluations of falling oracle with rising reward before a stop
    max_minutes: float = 10.0     # stop (and hand off) before passing this; 0 = run all iters
    max_nfe: int = 0              # stop (and hand off) after this many network evaluations
    seed: int = 0                 # prompts and noise follow (seed, iteration): resumes, ranks agree
    ckpt_every: int = 5           # iterations between resumable checkpoints
    resume: bool = False          # continue the run in out_dir
    overwrite: bool = False       # replace whatever out_dir holds
    bf16: str = "auto"            # bfloat16 autocast where the rule allows; 'auto': where native
                                  # (docs/results.md, Emulated bfloat16)
    device: str = "auto"          # 'cpu', 'cuda' or 'auto'
    parallel: str = "ddp"         # under torchrun: 'ddp', 'fsdp' (sharded), 'hsdp' (per node)

    # flags an earlier postflow had, refused with their new name (the README's Renamed flags)
    RENAMED = {"beta": "kl_weight", "awm_beta": "kl_weight", "awm_draws": "draws",
               "awm_t_mean": "draw_t_mean"}


def check_config(cfg, ranks):
    check_ranges(cfg,
                 at_least_one=("iters", "prompts_per_iter", "rollout_steps", "chunks", "draws",
                               "sft_batch", "epochs", "minibatches", "eval_every", "eval_prompts",
                               "eval_steps", "patience", "ckpt_every", "hold_every"),
                 positive=("lr", "noise_level", "clip_range", "spike_factor", "adv_clip",
                           "grad_clip", "nft_beta", "nft_scale", "hold_rate", "hold_probe"),
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
        (cfg.split_instruction and cfg.reward != "heads",
         "--split_instruction needs --reward=heads"),
        (not 0 <= cfg.sde_window <= cfg.rollout_steps or window > cfg.rollout_steps,
         f"SDE window {cfg.window_start}+{cfg.sde_window} does not fit {cfg.rollout_steps} steps"),
        (not 0 < cfg.train_fraction <= 1,
         f"--train_fraction must be in (0, 1], got {cfg.train_fraction}"),
        (cfg.group_size < 2,
         "--group_size must be at least 2: advantages are relative to the group"),
        (rollouts % ranks, f"{rollouts} rollouts per iteration do not divide over {ranks} ranks"),
        (rollouts % cfg.minibatches,
         f"{rollouts} rollouts do not split into {cfg.minibatches} minibatches"),
        (cfg.hold_undo and not cfg.hold,
         "--hold_undo takes back steps that break a floor, but --hold= names none"),
        (cfg.hold and cfg.hold_probe % ranks,
         f"--hold_probe={cfg.hold_probe} does not divide over {ranks} ranks"))
    for bad, why in checks:
        if bad:
            raise ConfigError(why)
    # unknown heads are refused here
    R.head_weights(cfg.weights)
    hold_margins(cfg)


def window_steps(cfg, it):
    """The SDE steps of iteration `it`: the window, sliding from noise to data if window_start<0."""
    if not cfg.sde_window:
        return list(range(cfg.rollout_steps))
    start = cfg.window_start
    if start < 0:
        start = round((cfg.rollout_steps - cfg.sde_window) * it / max(1, cfg.iters - 1))
    return list(range(start, start + cfg.sde_window))


def bf16(cfg, device):
    """bfloat16 autocast where the update rule allows it (not PPO's ratio of two passes)."""
    return bf16_autocast(cfg.bf16, device, allowed=RULES[cfg.update].bf16)


# ----------------------------------------------------------------------------- SAMPLING
@dataclass
class Rollout:  # what SAMPLING hands to TRAINING: this rank's share n of the iteration's rollouts
    prompts: list                  # (n,) captions
    tokens: torch.Tensor           # (n, L)
    clips: torch.Tensor            # (n, *policy.flow_shape) the trained chunk, context pinned
    transitions: list              # per SDE step: (index, x before, x after, fp32 log-prob (n,))
    group: torch.Tensor            # (n,) the global group of each rollout
    trained: list = None           # the SDE steps ppo trains this iteration (train_fraction)
    sampler: object = None         # awm, nft: a frozen copy of the weights that sampled
    ctx: torch.Tensor = None       # (n, C, F, H, W) clean context frames of a continuation
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
    roll = Rollout(prompts, tokens, chunk, transitions, group, trained, sampler, ctx, ctx_mask)
    return clips, roll


# ----------------------------------------------------------------------------- REWARDS
def reward_scores(cfg, clips, prompts, tokens, judge, reward_fn, names, world, d):
    """The training reward of this rank's clips and the ensemble's spread (zeros without it), each
    gathered over the ranks: (all ranks' clips, heads), since a group's rewards span the ranks."""
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
    return gather_rows(scores, d), gather_rows(rm_std, d)


# ----------------------------------------------------------------------------- TRAINING
def batch_of(roll, adv, rows, fresh):
    """The rows of this rank's rollouts a minibatch holds, as an update rule's Batch."""
    ctx = None if roll.ctx is None else roll.ctx[rows]
    ctx_mask = None if roll.ctx is None else roll.ctx_mask[rows]
    return Batch(roll.clips[rows], roll.tokens[rows], adv[rows], roll.group[rows], rows, ctx,
                 ctx_mask, roll.sampler, fresh)


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
    """The rule's loss on each sample and its KL, backpropagated; scale turns this rank's sums into
    its part of the minibatch's global mean. Per-clip metrics (tensors) are logged as such parts,
    summed over ranks later; the others as they are. Returns this rank's part of the loss."""
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
    """PPO-ptx: keep fitting real clips at every t, so the reward cannot buy words with fidelity (a
    few % of an iteration's cost; every rank fits the same batch, so 1 or N ranks step alike)."""
    with bf16(cfg, device):
        loss = M.curated_loss(policy, cfg.sft_batch, cfg.seed, n_update, world, device).mean()
    (cfg.sft_weight * loss).backward()
    stats["sft_loss"].append(loss.item())


def update_policy(cfg, policy, reference, opt, ema, guard, roll, adv, mine, it, gen, world, d,
                  cost):
    """epochs x minibatches optimizer steps on the iteration's rollouts: the rule's loss and KL, the
    curated term, the gradient average, the warmup, the clip, the non-finite guard and the EMA.
    adv: every rollout's (rollouts,). Returns the update statistics and the KL to the reference
    per update, the same on every rank: each minibatch's mean over all its clips, however the
    shuffle split them over ranks."""
    stats = defaultdict(list)
    rollouts = cfg.prompts_per_iter * cfg.group_size
    adv = adv[mine].to(d.device)                                             # this rank's (n,)
    policy.train()
    for epoch in range(cfg.epochs):
        # over all ranks: draws match any rank count
        order = torch.randperm(rollouts, generator=gen)
        samples = rule_samples(cfg, roll, gen)
        for j, chunk in enumerate(order.chunk(cfg.minibatches)):
            n_update = (it * cfg.epochs + epoch) * cfg.minibatches + j      # every optimizer step
            rows = rows_of_rank(chunk, mine)
            # a sharded rank with no row here still runs the passes (on_shard): on one of its rows
            # weighted 0, since a network may refuse an empty batch (Wan's reshape does)
            some = rows if len(rows) else torch.zeros(1, dtype=torch.long)
            b = batch_of(roll, adv, some, fresh=epoch == 0 and j == 0)
            scale = d.ranks / len(chunk) if len(rows) else 0.0
            loss = on_shard(len(rows), d, stats, lambda kept: rule_backward(
                cfg, policy, reference, b, samples, scale, kept))
            if cfg.sft_weight > 0:
                curated_term(cfg, policy, n_update, world, d.device, stats)
            average_gradients(policy.parameters(), d)
            # linear warmup, then constant
            for group in opt.param_groups:
                group["lr"] = linear_warmup(n_update, cfg.lr, cfg.warmup)
            # CLIP: global, after the all-reduce
            grad_norm = clip_gradients(policy.parameters(), cfg.grad_clip)
            stats["grad_norm"].append(grad_norm)
            if guard.ok(mean_over_ranks(loss, d), grad_norm):
                opt.step()
                ema.update(policy, n_update)                                  # EMA
            opt.zero_grad(set_to_none=True)
            cost.steps += 1
    return stats, mean_over_ranks(sum(stats["kl_ref"]), d) / (cfg.epochs * cfg.minibatches)


# ----------------------------------------------------------------------------- FLOOR
def floor_probe(cfg, policy, train_prompts):
    """The floor's fixed probe: hold_probe training prompts and their starting noise, from the
    seed."""
    order = torch.randperm(len(train_prompts), generator=seeded(cfg.seed + 23, 0)).tolist()
    prompts = [train_prompts[i] for i in order[:cfg.hold_probe]]
    return prompts, R.noise_for(cfg.hold_probe, policy, cfg.seed + 29)


@torch.no_grad()
def probe_levels(cfg, net, probe, judge, reward_fn, names, world, d):
    """The floor's measure: each held head's mean training reward on the EMA policy's ODE samples of
    fixed training prompts from fixed noise, so that iterations compare clip for clip, at eval_steps
    (a 6-step probe missed the fall that 20 steps show: docs/results.md, Stage II holds its floor).
    Each rank samples its share, as with rollouts; rank 0's levels are the ones every rank steers
    by."""
    prompts, noise = probe
    mine = rank_slice(len(prompts), d)
    tokens = data.tokenize(prompts[mine]).to(d.device)
    with bf16(cfg, d.device):
        clips = M.sample(net, tokens, noise[mine].to(d.device), cfg.eval_steps, cfg.cfg_scale)
    scores = reward_scores(cfg, clips, prompts[mine], tokens, judge, reward_fn, names, world, d)[0]
    # (heads,) the whole probe
    levels = scores.mean(0)
    return {h: from_rank0(float(levels[names.index(h)]), d) for h in hold_margins(cfg)}


def hold_floor(cfg, floor, inside, held, it):
    """The FLOOR band: each hold_every-th iteration the held heads measured (held()) and the
    multipliers moved; with --hold_undo (inside: the last weights inside the floor) a step that
    left a head below its floor is taken back, since a smaller next step cannot undo a fall (what
    it buys: docs/results.md, Update rules raced). Returns the floor's part of the log line."""
    if floor is None:
        return {}
    measured = (it + 1) % cfg.hold_every == 0
    if measured:
        floor.update(held())
    undone = bool(inside and measured and floor.broken())
    if undone:
        inside.restore()
    elif inside and measured:
        inside.take()
    record = floor.record()
    if cfg.hold_every > 1:
        record["hold_measured"] = measured
    if inside:
        record["hold_undone"] = undone
    return record


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
    """One log line: each head's reward (mean, std), the advantages, every update statistic's mean,
    and the ratio's mean per SDE step where the rule has one (ppo)."""
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


def evaluate_and_decide(cfg, it, rec, scores, names, ev, monitor, out_of_time, logf, log, d):
    """The end of an iteration: rank 0 writes the log line and the held-out evaluation ev when one
    was due, and decides whether to stop (the hacking monitor, the budgets); every rank obeys."""
    stop = False
    if d.main:
        logf.write(json.dumps(rec) + "\n")
        if ev is not None:
            logf.write(json.dumps({"eval": ev}) + "\n")
            log(f"eval @{it + 1}: " + " ".join(f"{k}={v}" for k, v in ev.items() if k != "iter"))
            # proxy vs truth on the heads the eval scores, at fixed weights (a curriculum's would
            # move both)
            fixed = R.advantage_weights(names, cfg.weights).tolist()
            w = [(i, v) for i, (n, v) in enumerate(zip(names, fixed)) if n in ev]
            truth = sum(v * ev[names[i]] for i, v in w)
            proxy = sum(v * scores[:, i].mean().item() for i, v in w)
            stop = monitor.update(truth, proxy)
            if stop:
                log(f"stopping: the held-out oracle reward fell {cfg.patience} evaluations in a "
                    f"row while the trained reward overstated it more and more (reward hacking); "
                    f"keeping the last checkpoint")
        if out_of_time:
            log(f"stopping: --max_minutes={cfg.max_minutes} or --max_nfe={cfg.max_nfe} reached "
                f"after {it + 1} iterations")
        logf.flush()
        stop = stop or out_of_time
    return bool(from_rank0(stop, d))


def out_of_budget(cfg, elapsed, last, cost, d):
    """--max_minutes on rank 0's clock, or --max_nfe on the evaluation count every rank shares.
    elapsed: seconds so far; last: the iteration just done, as the next one's likely length, so
    the run stops before it would pass the limit rather than after."""
    projected = elapsed + last
    out_of_time = bool(from_rank0(cfg.max_minutes > 0 and projected > 60 * cfg.max_minutes, d))
    return out_of_time or 0 < cfg.max_nfe <= cost.nfe


# ----------------------------------------------------------------------------- the loop
def build_nets(cfg, d):
    """The run's nets: the policy from --init, its frozen reference (the KL anchor), its EMA, the
    frozen sampler copy a rule that scores an old policy needs, and the judge; sharded by
    --parallel=fsdp/hsdp, a shard each."""
    rule = RULES[cfg.update]
    policy, parent = load_model(cfg.init, d.device)
    if rule.sampler and policy.sampler != rule.sampler:
        # the solver contract: PPO rescores the rollout's own Gaussian steps
        raise ConfigError(f"--update={cfg.update} scores rollouts with {rule.sampler!r} steps, but "
                          f"{cfg.init} rolls out with {policy.sampler!r}; use --update=awm or nft "
                          f"(they score clips), or that policy's sampler set to {rule.sampler}")
    reference = policy.reference()
    judge = load_reward_model(cfg.reward_model, policy.cfg) if cfg.reward != "heads" else None
    ema = EMA(policy, cfg.ema_decay, cfg.ema_warmup)
    sampler = M.frozen_copy(policy) if rule.old_policy else None
    shard(d, policy, ema.model, reference, sampler)
    return policy, parent, reference, ema, sampler, judge


def train(cfg: Config, reward_fn=None):
    """reward_fn(clips, prompts) -> {head: (B,)} replaces the configured judge (tests use a simple
    one)."""
    d = setup_distributed(cfg.device, cfg.parallel)
    log = make_logger(d)
    check_config(cfg, d.ranks)
    policy, parent, reference, ema, sampler, judge = build_nets(cfg, d)
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
    # at a checkpoint the last good weights are the current ones
    spikes.snapshot(policy, opt)
    # --hold_undo: the last weights inside the floor (the probe measures the EMA, so it too)
    inside = Snapshot(policy, ema.model, opt) if cfg.hold_undo else None
    n_window = len(window_steps(cfg, 0))
    n_trained = max(1, round(cfg.train_fraction * n_window))
    log(f"batch: {cfg.prompts_per_iter} prompts x {cfg.group_size} rollouts = {rollouts} per "
        f"iteration = {d.ranks} rank(s) x {per_rank}; {cfg.rollout_steps} denoising steps, SDE on "
        f"{n_window}, {n_trained} trained per rollout; {cfg.epochs} epoch(s) x {cfg.minibatches} "
        f"minibatch(es) = {cfg.epochs * cfg.minibatches} updates per iteration")
    print_config(cfg, log)
    train_prompts = data.train_prompts()
    names = R.head_names(cfg.split_instruction)
    eval_prompts, _, eval_noise = R.eval_set(policy, cfg.eval_prompts, seed=cfg.seed,
                                             noise_seed=cfg.seed + 7)
    eval_noise = eval_noise.to(d.device)

    def evaluate(n):
        scores = R.quick_eval(ema.model, eval_prompts, eval_noise, cfg.eval_steps, cfg.cfg_scale,
                              world)
        return {"iter": n, **{k: round(v, 4) for k, v in scores.items()}}

    def lineage(n):
        return lineage_record(f"rl-{cfg.update}", cfg.init, n, "prompts:train_combos",
                              config=asdict(cfg),
                              parent_stage=parent.get("lineage", {}).get("stage", ""))

    # the EMA's passes count too: the floor's probe
    cost.watch(*(net for net in (policy, reference, sampler, ema.model) if net is not None))
    mine = rank_slice(rollouts, d)                                          # this rank's rollouts
    logf = open_log(os.path.join(cfg.out_dir, "log.jsonl"), log_offset) if d.main else None
    probe = floor_probe(cfg, policy, train_prompts) if floor else None

    def held():
        return probe_levels(cfg, ema.model, probe, judge, reward_fn, names, world, d)
    # what is held: the start
    if floor and start == 0:
        cost.begin()
        floor.update(held())
        cost.end(d, 0, 0.0)
        held_at = [f"{h} {floor.start[h]:.4f} - {m}" for h, m in floor.margins.items()]
        log("floor: " + ", ".join(held_at))
    # every rank samples an evaluation
    first = evaluate(0) if start == 0 else None
    if d.main and first:
        logf.write(json.dumps({"eval": first}) + "\n")
    t_start = time.time()
    bar = tqdm(range(start, cfg.iters), initial=start, total=cfg.iters, disable=not d.main,
               desc=f"rl-{cfg.update}")
    for it in bar:
        t0 = time.time()
        # this iteration's draws, every rank
        gen = seeded(cfg.seed, it)
        # ================================================================ SAMPLING
        cost.begin()
        clips, roll = sample_rollouts(cfg, policy, ema, sampler, it, gen, train_prompts, mine,
                                      d.device)
        t_roll = time.time() - t0
        # ================================================================ REWARDS
        # (rollouts, heads): every rank's rollouts
        scores, rm_std = reward_scores(cfg, clips, roll.prompts, roll.tokens, judge, reward_fn,
                                       names, world, d)
        # ================================================================ ADVANTAGES
        progress = it / max(1, cfg.iters - 1)
        weights = R.advantage_weights(names, cfg.weights, progress, cfg.curriculum)
        now, weights = held_settings(cfg, floor, names, weights)          # the floor's multipliers
        adv, zero_frac = advantages(now, scores, rm_std, weights)
        # ================================================================ TRAINING
        t1 = time.time()
        stats, kl_ref = update_policy(now, policy, reference, opt, ema, guard, roll, adv, mine, it,
                                      gen, world, d, cost)
        # ================================================================ FLOOR
        held_log = hold_floor(cfg, floor, inside, held, it)
        # the iteration's cost, all ranks
        cost.end(d, rollouts, time.time() - t0)
        # ROLLBACK on a spike, decided on statistics every rank shares and any rank count gives
        # alike (the grad norm is global, the KL reduced)
        if not spikes.check(policy, opt, grad_norm=max(stats["grad_norm"]), kl_ref=kl_ref):
            spikes.snapshot(policy, opt)
        rec = record(it, names, scores, weights, zero_frac, adv, roll, stats, kl_ref=kl_ref,
                     lr=opt.param_groups[0]["lr"], **held_log, skipped=guard.skipped,
                     rollbacks=spikes.rollbacks, rollout_s=round(t_roll, 2),
                     train_s=round(time.time() - t1, 2),
                     v_norm_ratio=round(health(cfg, policy, reference, roll, it), 5),
                     **{f"cost_{k}": v for k, v in cost.state_dict().items()})
        bar.set_postfix(instr=f"{rec['reward_instruction'][0]:.3f}", kl=f"{rec['kl_ref']:.2e}",
                        gnorm=f"{rec['grad_norm']:.3f}", zero=f"{zero_frac:.2f}")
        # ---- EVALUATION, the hacking monitor and the budgets: decided on rank 0, obeyed by all
        out_of_time = out_of_budget(cfg, time.time() - t_start, time.time() - t0, cost, d)
        due = (it + 1) % cfg.eval_every == 0 or it + 1 == cfg.iters or out_of_time
        ev = evaluate(it + 1) if due else None
        stop = evaluate_and_decide(cfg, it, rec, scores, names, ev, monitor, out_of_time, logf, log,
                                   d)
        if (it + 1) % cfg.ckpt_every == 0 or it + 1 == cfg.iters or stop:
            save_run_state(state_path, policy, ema, opt, lineage(it + 1), it + 1, parts, logf,
                           d.main)
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
