"""Stage III: preference refinement with Flow-DPO, against the frozen input checkpoint.

    # on-policy pairs from runs/rl, then DPO, to runs/dpo
    python preference.py
    python preference.py --init=checkpoints/sft_small.safetensors --out_dir=runs/dpo_sft
    # train on a saved or external pair file
    python preference.py --pairs=my_pairs.safetensors
    # the same loop; ranks split each batch
    torchrun --standalone --nproc_per_node=2 preference.py

PAIRS     N clips per prompt from the input policy (fixed seeds), scored by a judge (programmatic
          heads, the learned ensemble, or the oracle as an upper bound); pairs whose score margin
          clears a threshold become (winner, loser) and are saved as safetensors, a format anyone
          can write (human labels).
TRAINING  Diffusion-DPO written for velocity: one shared t and noise for winner and loser,
              d = |v - v_theta(x_t)|^2 - |v - v_ref(x_t)|^2,
              L = -log sigmoid(-beta / 2 * (d_w - d_l)),
          the log-sigmoid meaned over the batch, plus the flow-matching loss on a fresh batch of
          curated clips (the anchor that keeps the preference from costing fidelity), an optional
          one on winners, warmup, global grad clipping, EMA and the non-finite guard. `decoupled`
          backpropagates the winner and the loser branch one after the other with a detached
          coefficient: the same gradient, one graph at a time.
"""
import json
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

import data
import model as M
import rewards as R
from checkpoint import (full_state, lineage_record, load_model, load_pairs, resume_run,
                        save_checkpoint, save_pairs, save_run_state, stage_family)
from judge import load_reward_model, rm_score
from distributed import (all_mean, average_gradients, check_ranks_agree, make_logger, memory_use,
                         setup_distributed, shard, teardown)
from cli import (RUN_FILES, ConfigError, check_ranges, claim_out_dir, command_line,
                 open_log, parse_config, print_config, release_run_folders, run_cli)
from stability import EMA, NonFiniteGuard, check_trained, clip_gradients, seeded, warmup_cosine


@dataclass
class Config:
    init: str = "runs/rl/ckpt.safetensors"  # input policy and frozen reference (reward_rl.py's
                                            # output; SFT works)
    out_dir: str = "runs/dpo"     # ckpt.safetensors, state.safetensors, pairs.safetensors,
                                  # log.jsonl, samples.gif
    pairs: str = ""               # pair file to train on; '' makes on-policy pairs into out_dir
    # ---- PAIRS
    pair_prompts: int = 64        # training prompts sampled for pairs
    samples_per_prompt: int = 4   # clips per prompt (seeds 0..N-1 of the pair seed stream)
    judge: str = "heads"          # 'heads' (programmatic), 'rm' (learned ensemble) or 'oracle'
                                  # (upper bound)
    reward_model: str = "checkpoints/reward_model.safetensors"  # the ensemble for judge=rm
    weights: tuple = ()           # judge score = weighted mean of rewards.HEADS, equal unless
                                  # head=value given
    margin: float = 0.05          # keep a pair only if the judge's scores differ by at least this
    weight_by_margin: bool = False  # weight each pair's loss by its margin (normalised to mean 1)
    sample_steps: int = 20        # Euler steps for the pair clips
    cfg_scale: float = 3.0        # guidance for the pair clips and the evaluation
    # ---- TRAINING
    steps: int = 150              # optimizer steps
    batch_size: int = 16          # pairs per step, over all ranks
    lr: float = 1e-5              # peak learning rate (higher fit the pairs and lost fidelity:
                                  # docs/results.md, Stage III GPU sweep)
    warmup: int = 15              # linear warmup steps, then cosine decay
    beta: float = 2000.0          # DPO temperature on mean-squared velocity errors (a small lr
                                  # and a large beta)
    sft_weight: float = 0.0       # flow-matching loss on winners (the policy's own samples: it
                                  # cost fidelity here)
    curated_weight: float = 300.0  # flow loss on a fresh curated batch every step, Stage II's
                                   # PPO-ptx anchor; large because beta makes DPO's gradient
                                   # ~1000x a flow loss's (docs/results.md, Stage III curated
                                   # anchor)
    curated_batch: int = 16       # curated clips per step for that term (the same batch on every
                                  # rank)
    decoupled: bool = True        # winner and loser backpropagated one after the other (less
                                  # peak memory)
    grad_clip: float = 1.0        # global grad-norm clip
    ema_decay: float = 0.99       # EMA of weights; evaluation and the hand-off use it
    t_mean: float = -0.4          # logit-normal t, as in pretraining
    t_std: float = 1.0
    # ---- evaluation and bookkeeping
    eval_prompts: int = 32        # per split (val combinations and unseen held-out ones), fixed
                                  # seeds
    eval_steps: int = 20          # Euler steps for evaluation
    seed: int = 0                 # pairs, batches, t and noise follow from it: resumes are exact
    log_every: int = 10           # steps between log lines
    ckpt_every: int = 50          # steps between resumable checkpoints
    resume: bool = False          # continue the run in out_dir
    overwrite: bool = False       # replace whatever out_dir holds
    any_input: bool = False       # accept an --init from another stage than SFT / RL (e.g. the
                                  # base model)
    device: str = "auto"          # 'cpu', 'cuda' or 'auto'
    parallel: str = "ddp"         # under torchrun: 'ddp' (whole copies), 'fsdp' (sharded), 'hsdp'
                                  # (sharded per node)


# ----------------------------------------------------------------------------- pairs
PAIR_KEYS = ("winner", "loser", "tokens", "score_w", "score_l", "weight")


def judge_scores(cfg, clips, prompts, world, rm=None):
    """One scalar per clip from the chosen judge. (B,)"""
    w = torch.tensor(list(R.head_weights(cfg.weights, default=1.0).values()))
    # exact: the fraction of prompted attributes the clip gets right, heads break ties
    if cfg.judge == "oracle":
        return R.oracle_preference(clips, prompts, world)
    if cfg.judge == "rm":
        mean, _ = rm_score(rm, clips, data.tokenize(prompts))
        # registry order, like reward_heads
        heads = torch.stack([mean[h] for h in R.HEADS], 1)
    else:
        heads = torch.stack(list(R.reward_heads(clips, prompts, world).values()), 1)
    return (heads * w).sum(1) / w.sum()


@torch.no_grad()
def make_pairs(net, cfg, world, log, rm=None):
    """On-policy pairs: every ordered (better, worse) pair of a prompt's clips whose margin clears
    cfg.margin.
    rm: the learned judge's members for judge=rm (loaded from cfg.reward_model when not given)."""
    train_prompts = data.train_prompts()
    gen = torch.Generator().manual_seed(cfg.seed + 555)
    idx = torch.randint(len(train_prompts), (cfg.pair_prompts,), generator=gen)
    prompts = [train_prompts[i] for i in idx.tolist()]
    if cfg.judge == "rm" and rm is None:
        rm = load_reward_model(cfg.reward_model, net.cfg)
    n = cfg.samples_per_prompt
    out = {k: [] for k in PAIR_KEYS}
    for p in tqdm(prompts, desc="pairs", leave=False):
        noise = torch.randn(n, *net.flow_shape, generator=gen)
        tok = data.tokenize([p] * n)
        dev = next(net.parameters()).device
        clips = M.sample(net, tok.to(dev), noise.to(dev), cfg.sample_steps, cfg.cfg_scale).cpu()
        s = judge_scores(cfg, clips, [p] * n, world, rm)
        for i in range(n):
            for j in range(n):
                if s[i] > s[j] and s[i] - s[j] >= cfg.margin:
                    for k, v in zip(PAIR_KEYS,
                                    (clips[i], clips[j], tok[0], s[i], s[j], s[i] - s[j])):
                        out[k].append(v)
    if not out["winner"]:
        raise ConfigError(f"no pair of the {cfg.pair_prompts} prompts clears margin {cfg.margin}: "
                          f"lower --margin or raise --samples_per_prompt")
    pairs = {k: torch.stack(v) for k, v in out.items()}
    if cfg.weight_by_margin:
        pairs["weight"] = pairs["weight"] / pairs["weight"].mean()
    else:
        pairs["weight"] = torch.ones(len(pairs["weight"]))
    log(f"pairs: {len(pairs['winner'])} of {cfg.pair_prompts * n * (n - 1) // 2} possible clear "
        f"margin {cfg.margin} (judge={cfg.judge}); mean score winner "
        f"{pairs['score_w'].mean():.3f} vs loser {pairs['score_l'].mean():.3f}")
    return pairs


# ----------------------------------------------------------------------------- the loss
def dpo_step(policy, reference, win, lose, tokens, weight, t, x0, beta, sft_weight, decoupled):
    """Backpropagate one DPO batch (gradients land in policy's .grad); returns loss,
    z = -beta/2 (d_w - d_l), e_w.
    e = model.flow_error, the flow-matching error each branch's implicit reward is built from.
    Joint: one graph over both branches. Decoupled: the coefficient
    dL/de_w = beta/2 sigmoid(-z) w / B is computed first without a graph, then each branch is built,
    backpropagated and freed in turn."""
    B = len(win)
    with torch.no_grad():
        ref_w = M.flow_error(reference, win, x0, t, tokens)
        ref_l = M.flow_error(reference, lose, x0, t, tokens)
    if not decoupled:
        e_w = M.flow_error(policy, win, x0, t, tokens)
        e_l = M.flow_error(policy, lose, x0, t, tokens)
        z = -beta / 2 * ((e_w - ref_w) - (e_l - ref_l))
        loss = -(weight * F.logsigmoid(z)).mean() + sft_weight * e_w.mean()
        loss.backward()
        return loss.detach(), z.detach(), e_w.detach()
    with torch.no_grad():
        e_l = M.flow_error(policy, lose, x0, t, tokens)
    e_w = M.flow_error(policy, win, x0, t, tokens)
    z = -beta / 2 * ((e_w.detach() - ref_w) - (e_l - ref_l))
    # dL/de_w; dL/de_l = -coef
    coef = (weight * torch.sigmoid(-z) * beta / 2 / B).detach()
    # winner branch, then freed
    ((coef * e_w).sum() + sft_weight * e_w.mean()).backward()
    # loser branch
    (-(coef * M.flow_error(policy, lose, x0, t, tokens))).sum().backward()
    loss = -(weight * F.logsigmoid(z)).mean() + sft_weight * e_w.detach().mean()
    return loss, z, e_w.detach()


# ----------------------------------------------------------------------------- the loop's pieces
# what a preference stage refines, by stage family: SFT, any Stage II update rule, DPO
INPUT_FAMILIES = ("sft", "rl", "dpo")


def check_config(cfg):
    """Every setting checked before a checkpoint is read or a folder claimed: one-line errors."""
    if cfg.judge not in ("heads", "rm", "oracle"):
        raise ConfigError(f"--judge must be 'heads', 'rm' or 'oracle', got {cfg.judge!r}")
    check_ranges(cfg,
                 at_least_one=("pair_prompts", "sample_steps", "steps", "batch_size",
                               "curated_batch", "log_every", "ckpt_every", "eval_prompts",
                               "eval_steps"),
                 positive=("lr", "beta", "grad_clip", "t_std"),
                 non_negative=("margin", "warmup", "sft_weight", "curated_weight", "cfg_scale"),
                 fraction=("ema_decay",))
    if cfg.samples_per_prompt < 2:
        raise ConfigError(f"--samples_per_prompt must be at least 2 to form a pair, got "
                          f"{cfg.samples_per_prompt}")
    R.head_weights(cfg.weights)
    if not os.path.isfile(cfg.init):
        raise ConfigError(f"--init={cfg.init} not found: run reward_rl.py first (it writes "
                          f"runs/rl/ckpt.safetensors) or pass "
                          f"--init=checkpoints/sft_small.safetensors")


def step_batch(cfg, step, d, n_pairs, flow_shape):
    """This rank's slice of step `step`'s pairs, t and noise: drawn whole from one seed on every
    rank, so 1 or N ranks (and a resume) train on the same batch. Returns (pair indices, t, x0)."""
    gen = seeded(cfg.seed, step)
    mine = slice(d.rank * cfg.batch_size // d.ranks, (d.rank + 1) * cfg.batch_size // d.ranks)
    idx = torch.randint(n_pairs, (cfg.batch_size,), generator=gen)[mine]
    t = M.sample_t(cfg.batch_size, gen, cfg.t_mean, cfg.t_std)[mine]
    return idx, t, torch.randn(cfg.batch_size, *flow_shape, generator=gen)[mine]


def log_record(step, window, anchors, skipped, elapsed):
    """One log line over the steps since the last: DPO's loss per t-bin, implicit accuracy
    (d_w < d_l), margin."""
    ts = torch.cat([w[2] for w in window])
    zs = torch.cat([w[3] for w in window])
    which = torch.bucketize(ts, torch.linspace(0, 1, 5)[1:-1])
    per_bin = [round(float(-F.logsigmoid(zs[which == i]).mean()), 4) if (which == i).any() else None
               for i in range(4)]
    return dict(step=step + 1, loss=sum(w[0] for w in window) / len(window), loss_by_t=per_bin,
                implicit_acc=round(float((zs > 0).float().mean()), 4),
                reward_margin=round(float(zs.mean()), 4),
                grad_norm=round(max(w[1] for w in window), 4), skipped=skipped,
                curated_loss=round(sum(anchors) / len(anchors), 5) if anchors else None,
                elapsed_s=round(elapsed, 1))


# ----------------------------------------------------------------------------- the loop
def train(cfg: Config):
    check_config(cfg)
    d = setup_distributed(cfg.device, cfg.parallel)
    log = make_logger(d)
    if cfg.batch_size % d.ranks:
        raise ConfigError(f"batch_size {cfg.batch_size} does not divide over {d.ranks} ranks")
    paths = {k: os.path.join(cfg.out_dir, f"{k}.safetensors") for k in ("state", "ckpt", "pairs")}
    policy, parent_meta = load_model(cfg.init, d.device)
    stage = parent_meta.get("lineage", {}).get("stage", "")
    if stage_family(stage) not in INPUT_FAMILIES and not cfg.any_input:
        raise ConfigError(f"--init={cfg.init} is a {stage or 'unknown'} checkpoint; Stage III "
                          f"refines a policy of stage family {', '.join(INPUT_FAMILIES)} (rl: "
                          f"any Stage II update rule): pass --any_input=true to use it anyway")
    # frozen: the input policy
    reference = policy.reference()
    mc = policy.cfg
    world = R.world_of(policy.cfg)
    if cfg.pairs:
        # checked before anything is replaced
        load_pairs(cfg.pairs, mc)
    # the judge of on-policy pairs too: one for another clip shape, or without a registry head, is
    # refused now
    new_pairs = not cfg.pairs and not (cfg.resume and os.path.exists(paths["pairs"]))
    rm = load_reward_model(cfg.reward_model, mc) if cfg.judge == "rm" and new_pairs else None
    # on-policy pairs: at most every ordered pair of each prompt's clips, held at once
    n = cfg.samples_per_prompt
    M.check_batch_memory(policy, d.device,
                         trained=2 * cfg.batch_size // d.ranks + cfg.curated_batch,
                         sampled=max(n, 2 * cfg.eval_prompts),
                         stored=cfg.pair_prompts * n * (n - 1) if new_pairs else 0)
    if d.main:
        claim_out_dir(cfg.out_dir, cfg.resume, cfg.overwrite,
                      inputs=[cfg.init, cfg.pairs, cfg.reward_model], stage="dpo",
                      writes=(*RUN_FILES, "pairs.safetensors"),
                      command=command_line("preference.py", cfg))

    # ================================================================ PAIRS
    pair_path = cfg.pairs or paths["pairs"]
    if not cfg.pairs and d.main and not os.path.exists(pair_path):
        save_pairs(pair_path, make_pairs(policy, cfg, world, log, rm),
                   f"on-policy from {cfg.init}, judge={cfg.judge}")
    if d.ranks > 1:
        # rank 0 made the pairs
        torch.distributed.barrier()
    pairs = load_pairs(pair_path, mc)
    n_pairs = len(pairs["winner"])

    policy.train()
    ema = EMA(policy, cfg.ema_decay)
    # --parallel=fsdp/hsdp: a shard of each
    shard(d, policy, ema.model, reference)
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=0.0)
    guard = NonFiniteGuard()
    if cfg.resume:
        start, log_offset = resume_run(paths["state"], policy, ema, opt, cfg, {"guard": guard},
                                       log, d.main)
    else:
        start, log_offset = 0, None
    log(f"dpo: {n_pairs} pairs from {pair_path}; {d.ranks} rank(s) x "
        f"{cfg.batch_size // d.ranks} pairs = {cfg.batch_size} per step, {cfg.steps} steps "
        f"(~{cfg.steps * cfg.batch_size / n_pairs:.1f} epochs); "
        f"beta={cfg.beta}, {'decoupled' if cfg.decoupled else 'joint'} backward")
    print_config(cfg, log)
    lineage = lambda step: lineage_record("dpo", cfg.init, step, f"pairs:{pair_path}",
                                          config=asdict(cfg), parent_stage=stage)

    # ================================================================ TRAINING
    window, anchors = [], []
    logf = open_log(os.path.join(cfg.out_dir, "log.jsonl"), log_offset) if d.main else None
    t0 = time.time()
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not d.main,
               desc="dpo")
    for step in bar:
        # ---- BATCH: this rank's pairs, t and noise (pairs are pixels; the policy's flow may run on
        # latents)
        idx, t, x0 = step_batch(cfg, step, d, n_pairs, policy.flow_shape)
        dev = lambda x: x.to(d.device)
        enc = lambda clips: policy.encode(clips.to(d.device))
        for group in opt.param_groups:
            group["lr"] = warmup_cosine(step, cfg.lr, cfg.warmup, cfg.steps)
        # ---- LOSS: DPO against the frozen input, and the curated anchor
        loss, z, e_w = dpo_step(policy, reference, enc(pairs["winner"][idx]),
                                enc(pairs["loser"][idx]), dev(pairs["tokens"][idx]),
                                dev(pairs["weight"][idx]), dev(t), dev(x0),
                                cfg.beta, cfg.sft_weight, cfg.decoupled)
        # the preference may not buy its gain with fidelity: keep fitting real clips
        if cfg.curated_weight:
            anchor = M.curated_loss(policy, cfg.curated_batch, cfg.seed + 31, step, world,
                                    d.device).mean()
            (cfg.curated_weight * anchor).backward()
            anchors.append(anchor.item())
        # ---- STEP: averaged over ranks, clipped, skipped if non-finite, then the EMA
        average_gradients(policy.parameters(), d)
        grad_norm = clip_gradients(policy.parameters(), cfg.grad_clip)
        # every rank decides alike
        if guard.ok(all_mean(loss.detach().double(), d).item(), grad_norm):
            opt.step()
            ema.update(policy, step)
        opt.zero_grad(set_to_none=True)
        window.append((loss.item(), grad_norm, t, z.cpu()))
        # ---- LOG and CHECKPOINT
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            rec = log_record(step, window, anchors, guard.skipped, time.time() - t0)
            window, anchors = [], []
            bar.set_postfix(loss=f"{rec['loss']:.4f}", acc=f"{rec['implicit_acc']:.2f}",
                            margin=f"{rec['reward_margin']:.3f}")
            if d.main:
                logf.write(json.dumps(rec) + "\n")
                logf.flush()
        if (step + 1) % cfg.ckpt_every == 0 or step + 1 == cfg.steps:
            save_run_state(paths["state"], policy, ema, opt, lineage(step + 1), step + 1,
                           {"guard": guard}, logf, d.main)

    # before anything is handed off
    check_ranks_agree(policy, d)
    # ================================================================ HAND-OFF: EMA weights, and
    # the oracle's verdict
    weights = full_state(ema.model, d.main)
    memory = memory_use(d, [policy, ema.model, reference], opt)
    # every rank: they may be sharded
    prompts, splits, noise = R.eval_set(ema.model, cfg.eval_prompts, seed=cfg.seed,
                                        noise_seed=cfg.seed + 7)
    result, theirs, ours = R.oracle_verdict(ema.model, reference, prompts, splits,
                                            noise.to(d.device), cfg.eval_steps, cfg.cfg_scale, world)
    if d.main:
        save_checkpoint(paths["ckpt"], weights, mc, lineage(cfg.steps))
        data.write_video(data.video_grid(torch.stack([theirs, ours], 1).flatten(0, 1), 8, 2),
                         os.path.join(cfg.out_dir, "samples.gif"))
        logf.write(json.dumps({"final": result, "memory": memory, "parallel": cfg.parallel,
                               "ranks": d.ranks}) + "\n")
        logf.close()
        log(f"done: {paths['ckpt']}; oracle win rate vs input {result['win_rate']:.3f} (held-out "
            f"combos {result['win_rate_heldout_combos']:.3f}); samples.gif columns: input, dpo")
    teardown(d)
    release_run_folders(cfg.out_dir)
    check_trained(guard.skipped, cfg.steps, paths["ckpt"])
    return paths["ckpt"]


if __name__ == "__main__":
    run_cli(lambda argv: train(parse_config(Config, argv)), sys.argv[1:])
