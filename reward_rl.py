"""Stage II: reward-driven RL, GRPO on the flow sampler, stability-constrained.

    python reward_rl.py                                     # from the shipped SFT checkpoint, to runs/rl
    torchrun --standalone --nproc_per_node=2 reward_rl.py   # the same loop; each group spans the ranks
    python reward_rl.py --update=ppo --sde_window=0 --rollout_steps=10 --epochs=1 --lr=1e-4 --warmup=1 --sft_weight=0
                                                            # vanilla Flow-GRPO

The deterministic Euler sampler has no log-probability. Inside a window of denoising steps the sampler
takes Flow-GRPO's SDE step instead (model.sde_step: same marginals, a Gaussian policy step with an fp32
log-prob); outside it stays an ODE. Each iteration reads top to bottom:
  SAMPLING    G rollouts per prompt from the current policy, storing the window's latents and log-probs
  REWARDS     the heads of rewards.py (programmatic, the learned ensemble, or both), gathered over ranks
  ADVANTAGES  per head, z-scored within each prompt's group; summed with weights in advantage space
  TRAINING    --update=ppo: Flow-GRPO's PPO-clipped ratio of the SDE steps' log-probs + beta * the closed-form
              KL to the frozen SFT reference. --update=awm (default): advantage-weighted flow matching on the
              rollouts' clips + awm_beta * |v - v_ref|^2 (same expected direction, far less noise: the SDE's
              per-pixel exploration noise drops out of the estimate). Either way: clipped gradients, EMA, a
              non-finite guard, rollback on a grad-norm or KL spike, and a held-out oracle check that stops
              the run when the policy starts hacking the reward.
"""
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

import data
import model as M
import rewards as R
from sft import context_mask
from stability import (EMA, ConfigError, HackingMonitor, NonFiniteGuard, SpikeGuard, average_gradients,
                       clip_gradients, gather_rows, gaussian_kl, load_run_state, make_logger, save_run_state,
                       group_advantages, parse_config, ppo_clip_loss, prepare_out_dir, print_config, reliability,
                       run_cli, setup_distributed, warmup_cosine)


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
    w_fidelity: float = 0.25      # advantage weight of the fidelity head
    w_temporal: float = 0.25      # advantage weight of the temporal head
    w_instruction: float = 1.0    # advantage weight of the instruction head
    split_instruction: bool = False  # z-score each prompted attribute's soft match as its own head, each weighted
                                  # w_instruction: a rare right speed is not drowned by direction's larger spread
    curriculum: bool = False      # self-paced: move weight from fidelity to temporal to instruction
    # ---- ADVANTAGES
    std_floor: float = 0.01       # groups whose reward std is below this teach nothing: advantage 0
    adv_clip: float = 5.0         # clip the summed advantage to +- this
    uncertainty: bool = True      # scale advantages by ensemble agreement (reliability in [0.5, 1.5])
    # ---- TRAINING
    update: str = "awm"           # 'awm': advantage-weighted flow matching on the rollouts; 'ppo': Flow-GRPO's ratio
    lr: float = 3e-4              # AdamW learning rate (constant after warmup)
    warmup: int = 10              # updates of linear warmup: Adam's first steps move every weight by ~lr
    beta: float = 0.01            # ppo: weight of the closed-form Gaussian KL per SDE step (mean-logp convention)
    awm_beta: float = 0.3         # awm: weight of |v - v_ref|^2, the two flows' KL rate up to a constant
    awm_draws: int = 2            # awm: (t, noise) draws per rollout per update, shared within a group
    awm_t_mean: float = -1.0      # awm: logit-normal mean of t (median 0.27): where motion (direction, speed) is decided
    kl_all_t: bool = True         # awm: take the KL term at pretraining's t instead, anchoring the steps that render detail
    neg_scale: float = 1.0        # awm: weight of the push away from below-group clips (0 = pull toward winners only)
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
    seed: int = 0                 # prompts and noise follow (seed, iteration): resumes and rank counts agree
    ckpt_every: int = 5           # iterations between resumable checkpoints
    resume: bool = False          # continue the run in out_dir
    overwrite: bool = False       # replace whatever out_dir holds
    bf16: bool = True             # awm: rollouts and training passes under bfloat16 autocast (1.7x on CPUs with
                                  # AVX512-BF16); losses, log-probs and evaluation stay fp32; ppo is all fp32
    device: str = "auto"          # 'cpu', 'cuda' or 'auto'


def curriculum_weights(cfg, progress, names):
    """Weight of each named head at progress in [0, 1]. Self-paced: fidelity leads, then temporal, then instruction.
    With split_instruction the attribute parts carry the instruction weight and the whole head is only logged."""
    w = torch.tensor([cfg.w_fidelity, cfg.w_temporal, cfg.w_instruction])
    if cfg.curriculum:
        focus = torch.tensor([[1.0, 0.5, 0.25], [0.5, 1.0, 0.5], [0.25, 0.5, 1.0]])  # rows: early, middle, late
        pos = min(progress, 1.0) * 2
        lo = int(min(pos, 1))
        w = w * torch.lerp(focus[lo], focus[lo + 1], pos - lo)
    kinds = [["fidelity", "temporal", "instruction"].index(n.split("_")[0]) for n in names]
    return w[kinds] * torch.tensor([0.0 if cfg.split_instruction and n == "instruction" else 1.0 for n in names])


def window_steps(cfg, it):
    """The SDE steps of iteration `it`: the window, sliding from noise to data if window_start < 0."""
    if cfg.sde_window == 0:
        return list(range(cfg.rollout_steps))
    start = cfg.window_start
    if start < 0:
        start = round((cfg.rollout_steps - cfg.sde_window) * it / max(1, cfg.iters - 1))
    return list(range(start, start + cfg.sde_window))


def awm_step(cfg, policy, reference, clips, tokens, adv, draws, stats, ctx=None, ctx_mask=None):
    """Advantage-weighted matching: the flow-matching loss on each rollout's clip, weighted by its advantage
    (pull toward clips better than their group, push from worse ones), plus awm_beta * |v - v_ref|^2.
    Its expected gradient is the policy gradient's, but a fresh (t, noise) draw replaces the SDE's
    per-pixel exploration noise in the estimate, so far fewer rollouts buy the same signal. draws: one
    (t (mb,), x0 (mb, C, F, H, W), t_kl (mb,)) per draw, shared by the members of a group: with common noise
    the part of the loss that does not depend on which clip won cancels in the advantage-weighted sum.
    The reward speaks where the prompt decides the clip (t ~ 0.27: where the object's motion is laid down);
    kl_all_t takes the KL at pretraining's t instead, so the low-noise steps that draw edges stay the
    reference's. Backpropagates."""
    keep = 1.0 if ctx_mask is None else (~ctx_mask).float()[:, None, :, None, None]
    msq = lambda a, b: (((a - b) ** 2) * keep).mean((1, 2, 3, 4))           # (mb,), context frames excluded
    weight = torch.where(adv < 0, cfg.neg_scale * adv, adv)

    def flows(t, x0, need_ref):  # policy (and reference) velocity at time t on the straight path x0 -> clips
        tt = t[:, None, None, None, None]
        xt = (1 - tt) * x0 + tt * clips
        v = policy.velocity(xt, t, tokens, ctx=ctx, ctx_mask=ctx_mask)
        if not need_ref:
            return v, None
        with torch.no_grad():
            return v, reference.velocity(xt, t, tokens, ctx=ctx, ctx_mask=ctx_mask)

    for t, x0, _ in draws:
        v, v_ref = flows(t, x0, need_ref=not cfg.kl_all_t)
        err = msq(v, clips - x0)
        loss = (weight * err).mean()
        if v_ref is not None:                                                 # the KL at the same points, for free
            kl = msq(v, v_ref)
            loss = loss + cfg.awm_beta * kl.mean()
            stats["kl_ref"].append(kl.mean().item())
        (loss / len(draws)).backward()
        stats["loss"].append(loss.item())
    if cfg.kl_all_t:  # one pass per update at pretraining's t: a regulariser needs its expectation, not many draws
        v, v_ref = flows(draws[0][2], draws[0][1], need_ref=True)
        kl = msq(v, v_ref)
        (cfg.awm_beta * kl.mean()).backward()
        stats["kl_ref"].append(kl.mean().item())


def check_config(cfg, world):
    if cfg.update not in ("awm", "ppo"):
        raise ConfigError(f"--update must be 'awm' or 'ppo', got {cfg.update!r}")
    if cfg.reward not in ("heads", "rm", "both"):
        raise ConfigError(f"--reward must be 'heads', 'rm' or 'both', got {cfg.reward!r}")
    if cfg.split_instruction and cfg.reward != "heads":
        raise ConfigError("--split_instruction needs --reward=heads: the learned judge scores instruction as one head")
    if not 0 <= cfg.sde_window <= cfg.rollout_steps or cfg.window_start + cfg.sde_window > cfg.rollout_steps:
        raise ConfigError(f"SDE window {cfg.window_start}+{cfg.sde_window} does not fit {cfg.rollout_steps} steps")
    if not 0 < cfg.train_fraction <= 1:
        raise ConfigError(f"--train_fraction must be in (0, 1], got {cfg.train_fraction}")
    rollouts = cfg.prompts_per_iter * cfg.group_size
    if cfg.group_size < 2:
        raise ConfigError("--group_size must be at least 2: advantages are relative to the group")
    if rollouts % world:
        raise ConfigError(f"prompts_per_iter x group_size = {rollouts} rollouts do not divide over {world} ranks")
    if (rollouts // world) % cfg.minibatches:
        raise ConfigError(f"{rollouts // world} rollouts per rank do not split into {cfg.minibatches} minibatches")


def train(cfg: Config, reward_fn=None):
    """reward_fn(clips, prompts) -> {head: (B,)} replaces the configured judge (tests use a simple one)."""
    d = setup_distributed(cfg.device)
    log = make_logger(d)
    check_config(cfg, d.world)
    if d.main:
        prepare_out_dir(cfg.out_dir, cfg.resume, cfg.overwrite)
    state_path, ckpt_path = os.path.join(cfg.out_dir, "state.safetensors"), os.path.join(cfg.out_dir, "ckpt.safetensors")

    policy, parent_meta = M.load_model(cfg.init, d.device)
    reference, _ = M.load_model(cfg.init, d.device)                          # frozen: the KL anchor
    reference.requires_grad_(False)
    policy.train()
    mc = policy.cfg
    world = R.world_of(mc)
    judge = R.load_reward_model(cfg.reward_model) if cfg.reward in ("rm", "both") else None
    ema = EMA(policy, cfg.ema_decay)
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=0.0)
    start = 0
    if cfg.resume:
        start = load_run_state(state_path, policy, ema, opt)
        log(f"resumed {state_path} at iteration {start}")

    rollouts = cfg.prompts_per_iter * cfg.group_size
    per_rank = rollouts // d.world
    n_window = len(window_steps(cfg, 0))
    n_trained = max(1, round(cfg.train_fraction * n_window))
    log(f"batch: {cfg.prompts_per_iter} prompts x {cfg.group_size} rollouts = {rollouts} per iteration = "
        f"{d.world} rank(s) x {per_rank}; {cfg.rollout_steps} denoising steps, SDE on {n_window}, {n_trained} trained "
        f"per rollout; {cfg.epochs} epoch(s) x {cfg.minibatches} minibatch(es) = {cfg.epochs * cfg.minibatches} "
        f"updates per iteration, each over {per_rank // cfg.minibatches} rollouts x {n_trained} steps per rank")
    assert per_rank * d.world == rollouts and (per_rank // cfg.minibatches) * cfg.minibatches == per_rank
    print_config(cfg, log)

    train_prompts = data.train_prompts()
    names = R.head_names(cfg.split_instruction)
    eval_prompts, _ = R.eval_prompts(R.DiagnoseConfig(prompts=cfg.eval_prompts, seed=cfg.seed))
    eval_noise = R.noise_for(len(eval_prompts), mc, cfg.seed + 7).to(d.device)
    grid = M.time_grid(cfg.rollout_steps)
    shape = (mc.channels, mc.frames, mc.size, mc.size)
    overlap = mc.frames // 2
    ctx_mask = (torch.arange(mc.frames) < overlap)[None].expand(per_rank, -1).to(d.device) if cfg.chunks > 1 else None
    lineage = lambda it: M.lineage_record("grpo", cfg.init, it, "prompts:train_combos", config=asdict(cfg),
                                          parent_stage=parent_meta.get("lineage", {}).get("stage", ""))
    guard, spikes, monitor = NonFiniteGuard(), SpikeGuard(cfg.spike_factor), HackingMonitor(cfg.patience)
    spikes.snapshot(policy, opt)
    logf = open(os.path.join(cfg.out_dir, "log.jsonl"), "a") if d.main else None
    mine = slice(d.rank * per_rank, (d.rank + 1) * per_rank)                  # this rank's share of the rollouts
    # PPO's ratio compares log-probs from two passes, which must be computed alike: only AWM uses bf16
    fast = lambda: torch.autocast(torch.device(d.device).type, torch.bfloat16, enabled=cfg.bf16 and cfg.update == "awm")

    def evaluate(it):
        ev = R.quick_eval(ema.model, eval_prompts, eval_noise, cfg.eval_steps, cfg.cfg_scale, world)
        return {"iter": it, **{k: round(v, 4) for k, v in ev.items()}}

    if d.main and start == 0:
        rec = evaluate(0)
        logf.write(json.dumps({"eval": rec}) + "\n")
        log(f"eval @0: " + " ".join(f"{k}={v}" for k, v in rec.items() if k != "iter"))

    t_start = time.time()
    bar = tqdm(range(start, cfg.iters), initial=start, total=cfg.iters, disable=not d.main, desc="grpo")
    for it in bar:
        t0 = time.time()
        # Every rank draws the same prompts and noise for the whole iteration, then keeps its slice:
        # a group spans ranks, and 1 or N ranks roll out exactly the same clips.
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + it)
        idx = torch.randint(len(train_prompts), (cfg.prompts_per_iter,), generator=gen)
        prompts = [train_prompts[i] for i in idx.tolist() for _ in range(cfg.group_size)]
        if cfg.shared_noise:
            x = torch.randn(cfg.prompts_per_iter, *shape, generator=gen).repeat_interleave(cfg.group_size, 0)
        else:
            x = torch.randn(rollouts, *shape, generator=gen)
        sde = window_steps(cfg, it)
        eps = torch.randn(len(sde), rollouts, *shape, generator=gen)
        trained = sorted(torch.randperm(len(sde), generator=gen)[:n_trained].tolist())
        tokens = data.tokenize(prompts)[mine].to(d.device)
        x = x[mine].to(d.device)

        # ================================================================ SAMPLING
        policy.eval()
        with torch.no_grad(), fast():
            ctx, prefix = None, None
            if cfg.chunks > 1:  # earlier chunks by the ODE; the trained chunk continues them
                prefix = M.sample_long(policy, tokens, torch.Generator().manual_seed(cfg.seed + it), cfg.chunks - 1,
                                       cfg.rollout_steps, cfg.cfg_scale, overlap)
                ctx = torch.zeros_like(x)
                ctx[:, :, :overlap] = prefix[:, :, -overlap:]
            steps = []  # (step index, x before, x after, fp32 log-prob) for each SDE step
            for i in range(cfg.rollout_steps):
                t, t_next = float(grid[i]), float(grid[i + 1])
                v = M.guided_velocity(policy, x, t, tokens, cfg.cfg_scale, ctx, ctx_mask)
                if i in sde:
                    e = eps[sde.index(i)][mine].to(d.device)
                    x_next, _, _, logp = M.sde_step(x, v, t, t_next, float(grid[1]), cfg.noise_level, eps=e)
                    steps.append((i, x, x_next, logp))
                    x = x_next
                else:
                    x = x + (t_next - t) * v
            clips = chunk = x.clamp(-1, 1) if ctx is None else torch.where(ctx_mask[:, None, :, None, None], ctx, x.clamp(-1, 1))
            if ctx is not None:
                clips = torch.cat([prefix, clips[:, :, overlap:]], dim=2)
        t_rollout = time.time() - t0

        # ================================================================ REWARDS
        score_clips = reward_fn or (lambda c, p: R.reward_heads(c, p, world, split_instruction=cfg.split_instruction))
        heads = score_clips(clips.cpu(), prompts[mine])
        scores = torch.stack([heads[h] for h in names], 1)                    # (per_rank, heads)
        rm_std = torch.zeros_like(scores)
        if judge is not None:
            rm_mean, rm_sd = R.rm_score(judge, clips.cpu(), tokens.cpu())
            rm_scores = torch.stack([rm_mean[h] for h in names], 1)
            rm_std = torch.stack([rm_sd[h] for h in names], 1)
            scores = rm_scores if cfg.reward == "rm" else (scores + rm_scores) / 2
        scores, rm_std = gather_rows(scores, d), gather_rows(rm_std, d)     # a group's rewards span the ranks

        # ================================================================ ADVANTAGES
        weights = curriculum_weights(cfg, it / max(1, cfg.iters - 1), names)
        adv, zero_frac = group_advantages(scores, weights, cfg.group_size, cfg.std_floor, cfg.adv_clip)
        if judge is not None and cfg.uncertainty:
            adv = adv * reliability(rm_std)
        adv_mine = adv[mine].to(d.device)

        # ================================================================ TRAINING
        policy.train()
        t1 = time.time()
        stats = {k: [] for k in ("loss", "ratio", "clipped", "approx_kl", "kl_ref", "grad_norm", "sft_loss")}
        group_of = (torch.arange(per_rank) + d.rank * per_rank) // cfg.group_size  # global group of each rollout
        for epoch in range(cfg.epochs):
            order = torch.randperm(per_rank, generator=gen)                   # same on every rank
            # awm: (t, noise) per group and draw, drawn for all groups so that every rank draws alike
            draws = [(M.sample_t(cfg.prompts_per_iter, gen, mean=cfg.awm_t_mean),
                      torch.randn(cfg.prompts_per_iter, *shape, generator=gen), M.sample_t(cfg.prompts_per_iter, gen))
                     for _ in range(cfg.awm_draws if cfg.update == "awm" else 0)]
            for j, mb in enumerate(order.chunk(cfg.minibatches)):
                if cfg.update == "awm":
                    mine_draws = [tuple(a[group_of[mb]].to(d.device) for a in draw) for draw in draws]
                    with fast():
                        awm_step(cfg, policy, reference, chunk[mb], tokens[mb], adv_mine[mb], mine_draws, stats,
                                 None if ctx is None else ctx[mb], None if ctx is None else ctx_mask[mb])
                for k in (trained if cfg.update == "ppo" else []):  # accumulate over the trained steps
                    i, x_t, x_next, logp_old = steps[k]
                    t, t_next = float(grid[i]), float(grid[i + 1])
                    c, cm = (ctx[mb], ctx_mask[mb]) if ctx is not None else (None, None)
                    def gaussian_of(net):  # the net's SDE step at x_t, scored on the stored x_next: mean, std, logp
                        v = M.guided_velocity(net, x_t[mb], t, tokens[mb], cfg.cfg_scale, c, cm)
                        return M.sde_step(x_t[mb], v, t, t_next, float(grid[1]), cfg.noise_level, x_next=x_next[mb])[1:]
                    mean, step_std, logp = gaussian_of(policy)
                    with torch.no_grad():
                        mean_ref = gaussian_of(reference)[0]
                    policy_loss, ratio, clipped = ppo_clip_loss(logp, logp_old[mb], adv_mine[mb], cfg.clip_range)
                    kl = gaussian_kl(mean, mean_ref, step_std)                # closed form, (mb,)
                    loss = (policy_loss + cfg.beta * kl).mean() / len(trained)
                    loss.backward()
                    log_ratio = (logp - logp_old[mb]).detach()
                    stats["loss"].append(loss.item() * len(trained))
                    stats["ratio"].append(float(ratio.mean()))
                    stats["clipped"].append(float(clipped.float().mean()))
                    stats["approx_kl"].append(float((log_ratio.exp() - 1 - log_ratio).mean()))
                    stats["kl_ref"].append(kl.mean().item())
                n_update = (it * cfg.epochs + epoch) * cfg.minibatches + j          # counts every optimizer step
                if cfg.sft_weight > 0:
                    # PPO-ptx: keep fitting real clips at every t, so the reward cannot buy words with fidelity.
                    # Every rank fits the same curated batch (a few % of an iteration): 1 or N ranks step alike.
                    g_sft = torch.Generator().manual_seed(cfg.seed * 1_000_003 + n_update)
                    b = data.make_batch("curated", cfg.sft_batch, seed=cfg.seed + 1, step=n_update, world=world)
                    ctx_sft = context_mask(cfg.sft_batch, mc.frames, 0.5, g_sft).to(d.device)
                    with fast():
                        sft_loss, _ = M.flow_loss(policy, b.videos.to(d.device), b.tokens.to(d.device), g_sft, 0.1, ctx_sft)
                    (cfg.sft_weight * sft_loss.mean()).backward()
                    stats["sft_loss"].append(sft_loss.mean().item())
                average_gradients(policy.parameters(), d)
                for group in opt.param_groups:  # linear warmup, then constant
                    group["lr"] = warmup_cosine(n_update, cfg.lr, cfg.warmup, total=1, final_frac=1.0)
                grad_norm = clip_gradients(policy.parameters(), cfg.grad_clip)
                stats["grad_norm"].append(grad_norm)
                if guard.ok(stats["loss"][-1], grad_norm):
                    opt.step()
                    ema.update(policy, n_update)
                opt.zero_grad(set_to_none=True)
        mean_of = lambda k: sum(stats[k]) / len(stats[k]) if stats[k] else None
        rolled_back = spikes.check(policy, opt, grad_norm=max(stats["grad_norm"]), kl_ref=mean_of("kl_ref"))
        if not rolled_back:
            spikes.snapshot(policy, opt)
        t_train = time.time() - t1

        rec = dict(iter=it + 1, **{f"reward_{h}": [round(float(scores[:, j].mean()), 4), round(float(scores[:, j].std()), 4)]
                                   for j, h in enumerate(names)},
                   zero_std_frac=round(zero_frac, 4), adv_mean=round(float(adv.mean()), 4),
                   adv_std=round(float(adv.std()), 4), adv_absmax=round(float(adv.abs().max()), 4),
                   weights=[round(float(w), 3) for w in weights], sde_steps=sde, trained_steps=[sde[k] for k in trained],
                   ratio=mean_of("ratio"), clip_frac=mean_of("clipped"),
                   approx_kl=mean_of("approx_kl"), kl_ref=mean_of("kl_ref"), loss=mean_of("loss"), sft_loss=mean_of("sft_loss"),
                   grad_norm=round(max(stats["grad_norm"]), 4), lr=opt.param_groups[0]["lr"], skipped=guard.skipped, rollbacks=spikes.rollbacks,
                   rollout_s=round(t_rollout, 2), train_s=round(t_train, 2))
        bar.set_postfix(instr=f"{rec['reward_instruction'][0]:.3f}", kl=f"{rec['kl_ref']:.2e}",
                        gnorm=f"{rec['grad_norm']:.3f}", zero=f"{zero_frac:.2f}")
        stop = torch.zeros(1)
        # stop when another iteration like this one would overrun the budget
        out_of_time = cfg.max_minutes > 0 and time.time() - t_start + (time.time() - t0) > 60 * cfg.max_minutes
        if d.main:
            logf.write(json.dumps(rec) + "\n")
            if (it + 1) % cfg.eval_every == 0 or it + 1 == cfg.iters or out_of_time:
                ev = evaluate(it + 1)
                logf.write(json.dumps({"eval": ev}) + "\n")
                log(f"eval @{it + 1}: " + " ".join(f"{k}={v}" for k, v in ev.items() if k != "iter"))
                trained_reward = float((scores * weights).sum(1).mean())
                if monitor.update(ev["acc_all"], trained_reward):
                    log(f"stopping: held-out oracle accuracy fell {cfg.patience} evaluations in a row while the "
                        f"trained reward rose (reward hacking); keeping the last checkpoint")
                    stop[0] = 1
            if out_of_time:
                log(f"stopping: --max_minutes={cfg.max_minutes} reached after {it + 1} iterations")
                stop[0] = 1
            logf.flush()
        if d.world > 1:
            torch.distributed.broadcast(stop, 0)
        if (it + 1) % cfg.ckpt_every == 0 or it + 1 == cfg.iters or stop.item():
            if d.main:
                save_run_state(state_path, policy, ema, opt, lineage(it + 1), it + 1)
        if stop.item():
            break

    # ---- hand-off: the EMA policy, and a sample grid on the fixed eval prompts
    if d.main:
        final_it = it + 1 if cfg.iters > start else start
        M.save_checkpoint(ckpt_path, ema.model.state_dict(), mc, lineage(final_it))
        videos = M.sample(ema.model, data.tokenize(eval_prompts[:8]).to(d.device), eval_noise[:8], cfg.eval_steps,
                          cfg.cfg_scale)
        data.write_video(data.video_grid(videos, 2, 4), os.path.join(cfg.out_dir, "samples.gif"))
        log(f"done: {ckpt_path} ({guard.skipped} skipped updates, {spikes.rollbacks} rollbacks)")
        logf.close()
    if d.world > 1:
        torch.distributed.destroy_process_group()
    return ckpt_path


if __name__ == "__main__":
    run_cli(lambda argv: train(parse_config(Config, argv)), sys.argv[1:])
