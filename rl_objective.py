"""Stage II's objective: the group advantages and the update rules that turn them into a loss.

A rule is a loss function and a row of RULES (what it samples over, whose frozen copy it compares
with, its KL, bfloat16, the rollout sampler it needs); reward_rl.rule_backward backpropagates any.
The objective, term by term (all of it in this file unless a function elsewhere is named; the
curated term and the floor are reward_rl.py's):
  advantage  A_i = clip(sum_h w_h z_ih * r_i, +-adv_clip): z_ih rollout i's head-h reward z-scored
             within its group (0 where the group's std is under std_floor: group_zscores), w_h the
             head weights (rewards.HEADS), r_i the learned ensemble's reliability (reliability;
             --reward=rm or both).
  awm        per rollout and (t, x0) draw: max(-a_i p_i, -a_i clip(p_i, 1 +- awm_clip)), p_i =
             exp(e_sampler - e_policy), e = model.flow_error on the rolled-out clip, a_i = A_i
             (times neg_scale below 0): advantage-weighted flow matching whose ratio bounds it
             off-policy (ppo_clip_loss); + kl_weight |v - v_ref|^2 at pretraining's t
             (model.msq_free_frames), the flows' KL rate to the frozen input.
  ppo        per trained SDE step: max(-A_i p_i, -A_i clip(p_i, 1 +- clip_range)),
             p_i = exp(log pi(x_k+1 | x_k) - log pi_old), fp32 mean log-probs of the Gaussian step
             (model.score_sde_step, model.sde_step); + kl_weight * the closed-form KL between the
             policy's and the reference's steps (model.gaussian_kl).
  nft        DiffusionNFT (arXiv 2509.16117), on clips the old policy (the EMA, frozen at rollout)
             sampled: per draw r_i |v+ - (x1 - x0)|^2 + (1 - r_i) |v- - (x1 - x0)|^2 over the free
             frames, v+ = (1 - nft_beta) v_old + nft_beta v, v- = (1 + nft_beta) v_old - nft_beta v,
             r_i = 1/2 + clip(A_i / nft_scale, -1, 1) / 2: bounded below by construction, trained
             without guidance; + the same KL rate as awm.
  curated    + sft_weight * the flow loss on a fresh curated batch (model.curated_loss): PPO-ptx, so
             a reward cannot buy its gain with fidelity.
  floor      --hold=h=m: held head h may fall at most m below its start level s_h (constrained RL,
             RCPO): maximise the objective above subject to J_h >= s_h - m_h, J_h the head's mean on
             a training-split probe (hold_probe prompts, fixed noise, the EMA's ODE at eval_steps;
             never the held-out clips). One Lagrange multiplier per held head by dual ascent each
             hold_every-th iteration,
             lambda_h <- max(0, lambda_h + hold_rate (s_h - hold_guard m_h - J_h) / m_h)
             (stability.Floor), turns what --hold_via names: the step, lr / (1 + sum_h lambda_h)
             (the default: a trust region that shrinks while a held head is low), the curated term's
             weight sft_weight (1 + sum_h lambda_h) (a forward KL to data, as DDRL), the KL's weight
             likewise, or head h's advantage weight w_h + lambda_h. docs/results.md, Stage II holds
             its floor, measures them. --hold_undo also takes back an iteration whose probe ends
             below a floor (policy, EMA and optimizer restored; its multiplier's rise kept).
  ema        what is judged and handed off is not theta but its average, theta_ema <- d theta_ema +
             (1 - d) theta after each update, d = ema_decay from the first update (stability.EMA;
             --ema_warmup=true warms d up from 0.1, as from scratch): the steps' noise, which costs
             fidelity even with no reward at all, averages out around the start while the reward's
             drift passes (docs/results.md, The step's noise and the EMA).
"""
from dataclasses import dataclass, replace

import torch

import model as M
import rewards as R
from cli import ConfigError


# ----------------------------------------------------------------------------- ADVANTAGES
def group_zscores(scores, group_size, std_floor):
    """scores (N, heads), N = groups * group_size rollouts grouped consecutively -> each head
    z-scored within its group, (r - mean) / (std + 1e-4) with the Bessel-corrected std (TeleBoost's
    and DanceGRPO's convention), and 0 where that std is under the floor; and the share of such
    (group, head) pairs."""
    g = scores.view(-1, group_size, scores.shape[1])                          # (groups, G, heads)
    mean = g.mean(1, keepdim=True)
    std = g.std(1, keepdim=True, correction=1)
    flat = std < std_floor
    z = torch.where(flat, torch.zeros_like(g), (g - mean) / (std + 1e-4))
    return z.flatten(0, 1), float(flat.float().mean())


def reliability(rm_std):
    """Per-rollout trust in the ensemble: 1.5 where its members agree most, 0.5 where they disagree
    most."""
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
    rows: torch.Tensor             # (n,) the rows of the rank's rollouts they are (ppo slices its
                                   # steps)
    ctx: torch.Tensor              # (n, C, F, H, W) context frames, or None
    ctx_mask: torch.Tensor         # (n, F) bool, or None
    sampler: object                # the frozen weights that sampled, or None
    fresh: bool                    # no optimizer step since sampling: the sampler's errors are the
                                   # policy's


def ppo_clip_loss(log_ratio, advantages, clip_range):
    """PPO's pessimistic clipped objective per sample (B,), the ratio, and the share of ratios
    clipped. Flow-GRPO's ratio of mean log-probs and AWM's of exp(-err) both move little, so clip
    ranges are small (1e-4 .. 2e-2)."""
    ratio = torch.exp(log_ratio)
    clipped = ratio.clamp(1 - clip_range, 1 + clip_range)
    loss = torch.maximum(-advantages * ratio, -advantages * clipped)
    return loss, ratio.detach(), ((ratio.detach() - 1).abs() > clip_range).float().mean().item()


def velocity(net, b, t, x0):
    """net's velocity on the straight path from the draw's noise x0 to each clip, at the draw's
    t."""
    dev = b.clips.device
    return M.straight_path_velocity(net, b.clips, x0[b.group].to(dev), t[b.group].to(dev), b.tokens,
                                    b.ctx, b.ctx_mask)


def ratio_stats(ratio):
    return dict(ratio=float(ratio.mean()), ratio_std=float(ratio.std()) if len(ratio) > 1 else 0.0)


def awm_loss(cfg, policy, reference, b, draw):
    """Advantage-weighted matching on one (t, x0) draw: each clip's flow-matching error weighted by
    its advantage (pull toward winners, push from losers), bounded as AWM does by the PPO-clipped
    ratio exp(err_sampler - err): the plain weighted loss falls without limit off-policy."""
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
    """DiffusionNFT on one (t, x0) draw of clips the old policy (the EMA at rollout time) sampled:
    each advantage as an optimality odds r in [0, 1]; the flow-matching error of two implicit
    policies mixed from the old velocity and the trained one, v+ toward clips with r = 1 and v-
    toward clips with r = 0. At v = v_old its gradient is nft_beta times that of sum (2r - 1) err;
    off-policy the loss is a sum of squares, bounded below. Guidance-free: the conditional velocity
    is trained."""
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
    """Flow-GRPO on one trained SDE step: PPO's clipped ratio of the step's log-prob now and at
    rollout time, plus kl_weight * the closed-form KL between the policy's and the reference's
    Gaussian steps."""
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
    # ratio = exp(log_ratio)
    approx_kl = (ratio - 1 - log_ratio.detach()).mean()
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
    samples: str          # what the loss is taken over: 'draws' ((t, noise) per group) or
                          # 'sde_steps'
    old_policy: str       # whose frozen copy samples and is compared with: 'policy', 'ema' or None
    flow_kl: bool         # + kl_weight |v - v_ref|^2 at pretraining's t (else its loss holds its
                          # KL)
    bf16: bool            # may run under bfloat16 autocast
    kl_weight: float      # the KL's weight where --kl_weight=-1
    sampler: str = ""     # the rollout sampler it needs ('flow-grpo': sde_step's Gaussian), '' any


# A new rule is one loss function and one row (test_a_fourth_update_rule_trains_from_the_test_file).
RULES = {
    "awm": Rule(awm_loss, samples="draws", old_policy="policy", flow_kl=True, bf16=True,
                kl_weight=0.3),
    "ppo": Rule(ppo_loss, samples="sde_steps", old_policy=None, flow_kl=False, bf16=False,
                kl_weight=0.01, sampler="flow-grpo"),
    "nft": Rule(nft_loss, samples="draws", old_policy="ema", flow_kl=True, bf16=True,
                kl_weight=0.3),
}


def kl_weight(cfg):
    """The KL's weight: --kl_weight, or the update rule's own where it is -1."""
    return RULES[cfg.update].kl_weight if cfg.kl_weight == -1 else cfg.kl_weight


# ----------------------------------------------------------------------------- the floor's terms
def hold_margins(cfg):
    """--hold's head=margin pairs as {head: margin}; an unknown head or a margin not > 0 is one
    line."""
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
