"""Stage I: supervised policy shaping, and pretraining, with one flow-matching loop.

    # SFT: shipped base -> curated data
    python sft.py
    # pretraining from scratch
    python sft.py --init= --data=web --steps=2400 --out_dir=runs/base
    # the same file, gradients averaged over gloo / nccl
    torchrun --standalone --nproc_per_node=2 sft.py
    # weights, EMA and AdamW state sharded (FSDP2)
    torchrun --standalone --nproc_per_node=2 sft.py --parallel=fsdp

From scratch on noisy web data this is pretraining; from a checkpoint on curated data it shapes a
stable, controllable reference policy for Stages II and III. Either way the loop is the same: flow
loss (logged per t-bin), warmup, global grad clipping, a guard against non-finite steps, EMA, atomic
resumable checkpoints, and at the end a hand-off checkpoint of the EMA weights plus a GIF grid of
samples.
"""
import json
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

import data
import model as M
from checkpoint import (full_state, lineage_record, load_model, resume_run, save_checkpoint,
                        save_run_state)
from distributed import (all_mean, average_gradients, check_ranks_agree, make_logger, memory_use,
                         setup_distributed, shard, teardown)
from cli import (ConfigError, check_ranges, claim_out_dir, command_line, open_log, parse_config,
                 print_config, release_run_folders, run_cli)
from stability import EMA, NonFiniteGuard, check_trained, clip_gradients, seeded, warmup_cosine


@dataclass
class Config:
    # ---- what to train
    init: str = "checkpoints/base_small.safetensors"  # start weights; '' trains from scratch
                                                      # (pretraining)
    data: str = "curated"      # 'web' (noisy pretraining data) or 'curated' (clean SFT data)
    preset: str = "small"      # model preset, used only when training from scratch
    out_dir: str = "runs/sft"  # ckpt.safetensors, state.safetensors, log.jsonl, samples.gif
    # ---- optimisation
    steps: int = 800           # optimizer steps
    batch_size: int = 32       # clips per step, summed over ranks
    lr: float = 2e-4           # peak learning rate (pretraining from scratch: 1e-3)
    warmup: int = 50           # linear warmup steps, then cosine decay to lr / 10
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    grad_clip: float = 1.0     # global grad-norm clip
    ema_decay: float = 0.998   # EMA of weights; samples and the hand-off checkpoint use the EMA
    cond_drop: float = 0.1     # caption dropout, so classifier-free guidance has an unconditional
                               # model
    ctx_prob: float = 0.5      # fraction of clips trained with context frames (first frame or first
                               # half)
    t_mean: float = -0.4       # logit-normal t: mean (negative leans toward noise)
    t_std: float = 1.0         # logit-normal t: std
    # ---- bookkeeping
    seed: int = 0              # data, noise and t are drawn from (seed, step, rank): resumes are
                               # exact
    log_every: int = 25        # steps between log lines
    ckpt_every: int = 200      # steps between resumable checkpoints
    val_clips: int = 256       # clips per split for the final validation flow loss
    sample_steps: int = 20     # Euler steps for the sample grid
    cfg_scale: float = 3.0     # guidance weight for the sample grid
    resume: bool = False       # continue the run in out_dir from its state.safetensors
    overwrite: bool = False    # replace whatever out_dir holds
    device: str = "auto"       # 'cpu', 'cuda' or 'auto'
    parallel: str = "ddp"      # under torchrun: 'ddp' (whole copies), 'fsdp' (sharded), 'hsdp'
                               # (sharded per node)


# Six training combinations, then two that no training split shows (rows of samples.gif).
SAMPLE_PROMPTS = (
    [data.caption(c, s, d, sp)
     for c, s, d, sp in [(0, 1, 1, 1), (1, 2, 3, 0), (2, 0, 3, 1), (3, 1, 0, 0), (4, 0, 2, 1),
                         (5, 1, 0, 0)]]
    + [data.caption(c, s, d, 1) for c, s, d in sorted(data.HELDOUT_COMBOS)[:2]])


@torch.no_grad()
def validation_loss(net, world, n, seed=1234):
    """Flow loss of `net` on clean held-out clips (fixed noise and t): curated val and unseen
    combos."""
    out = {}
    for split in ("val", "heldout"):
        gen = torch.Generator().manual_seed(seed)
        losses = []
        for i in range(0, n, 64):
            b = data.make_batch(split, min(64, n - i), seed=seed, step=i, world=world)
            dev = next(net.parameters()).device
            loss, _ = M.flow_loss(net, b.videos.to(dev), b.tokens.to(dev), gen, cond_drop=0.0)
            losses.append(loss)
        out[split] = float(torch.cat(losses).mean())
    return out


def log_record(step, window, lr, skipped, elapsed, d):
    """One log line over the steps since the last: the loss (mean over ranks), the loss per quarter
    of t (minRF's t-bins: where the flow is learned), the largest grad norm. window: per step
    (loss, grad norm, t, per-sample loss)."""
    ts = torch.cat([w[2] for w in window])
    ls = torch.cat([w[3] for w in window])
    which = torch.bucketize(ts, torch.linspace(0, 1, 5)[1:-1])
    per_bin = [round(float(ls[which == i].mean()), 4) if (which == i).any() else None
               for i in range(4)]
    return dict(step=step + 1,
                loss=float(all_mean(torch.tensor(sum(w[0] for w in window) / len(window)), d)),
                loss_by_t=per_bin, grad_norm=max(w[1] for w in window), lr=lr, skipped=skipped,
                elapsed_s=round(elapsed, 1))


def check_config(cfg):
    """Refuse settings the loop cannot run, before anything is read or written."""
    if cfg.data not in ("web", "curated"):
        raise ConfigError(f"--data must be 'web' or 'curated', got {cfg.data!r}")
    check_ranges(cfg,
                 at_least_one=("steps", "batch_size", "log_every", "ckpt_every", "val_clips",
                               "sample_steps"),
                 positive=("lr", "t_std", "grad_clip"),
                 non_negative=("warmup", "weight_decay", "cfg_scale"),
                 fraction=("ema_decay", "cond_drop"))
    if not 0 <= cfg.ctx_prob <= 1:
        raise ConfigError(f"--ctx_prob must be in [0, 1], got {cfg.ctx_prob}")


def build_net(cfg, device):
    """The policy to train and its parent checkpoint's metadata: --init's, or a new DiT of --preset
    whose initial weights, like everything else, follow from the seed."""
    if cfg.init:
        return load_model(cfg.init, device)
    torch.manual_seed(cfg.seed)
    return M.VideoDiT(M.preset(cfg.preset)).to(device), {}


def train(cfg: Config, stop_after=None):
    """Run the loop; stop_after ends it early after that step's checkpoint (tests use it to
    interrupt)."""
    check_config(cfg)
    d = setup_distributed(cfg.device, cfg.parallel)
    log = make_logger(d)
    if cfg.batch_size % d.ranks:
        raise ConfigError(f"batch_size {cfg.batch_size} does not divide over {d.ranks} ranks")
    state_path = os.path.join(cfg.out_dir, "state.safetensors")
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.safetensors")

    # ---- model: from a parent checkpoint, from scratch, or resumed from this run's own state
    net, parent_meta = build_net(cfg, d.device)
    mcfg = net.cfg
    M.check_batch_memory(net, d.device, trained=cfg.batch_size // d.ranks,
                         sampled=max(cfg.val_clips, 12))
    # web data is pretraining, from scratch or from an --init (a fresh policy from adapters.py)
    stage = "sft" if cfg.init and cfg.data == "curated" else "pretrain"
    # every input is checked: only now may an old run be replaced
    if d.main:
        claim_out_dir(cfg.out_dir, cfg.resume, cfg.overwrite, inputs=[cfg.init], stage=stage,
                      command=command_line("sft.py", cfg))
    if d.ranks > 1:
        torch.distributed.barrier()
    net.train()
    world = data.WorldConfig(frames=mcfg.frames, size=mcfg.size)
    ema = EMA(net, cfg.ema_decay)
    # --parallel=fsdp/hsdp: a shard of each
    shard(d, net, ema.model)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    guard = NonFiniteGuard()
    if cfg.resume:
        start, log_offset = resume_run(state_path, net, ema, opt, cfg, {"guard": guard}, log,
                                       d.main)
    else:
        start, log_offset = 0, None
    per_rank = cfg.batch_size // d.ranks
    # this rank's rows of every batch
    mine = slice(d.rank * per_rank, (d.rank + 1) * per_rank)
    lineage = lambda step: lineage_record(
        stage, cfg.init, step, cfg.data, config=asdict(cfg),
        parent_stage=parent_meta.get("lineage", {}).get("stage", ""))
    log(f"{stage}: {sum(p.numel() for p in net.parameters()) / 1e6:.2f}M params, "
        f"{d.ranks} rank(s) x {per_rank} clips = {cfg.batch_size} per step, {cfg.steps} steps, "
        f"data={cfg.data}, device={d.device}")
    print_config(cfg, log)

    logf = open_log(os.path.join(cfg.out_dir, "log.jsonl"), log_offset) if d.main else None
    t0 = time.time()
    window = []
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not d.main,
               desc=stage)
    for step in bar:
        # ---- BATCH: clips, context frames and the lr of this step. Everything random in a step
        # comes from (seed, step), drawn for the whole batch on every rank, and each rank trains on
        # its rows: a resumed run repeats it exactly, and 1 or N ranks take the same step.
        gen = seeded(cfg.seed, step)
        b = data.make_batch(cfg.data, cfg.batch_size, seed=cfg.seed, step=step, world=world)
        # a mask over the flow's frames
        ctx_mask = M.context_mask(cfg.batch_size, net.flow_shape[1], cfg.ctx_prob, gen).to(d.device)
        lr = warmup_cosine(step, cfg.lr, cfg.warmup, cfg.steps)
        for group in opt.param_groups:
            group["lr"] = lr
        # ---- LOSS: the flow loss on this rank's rows
        per_sample, t = M.flow_loss(net, b.videos.to(d.device), b.tokens.to(d.device), gen,
                                    cfg.cond_drop, ctx_mask, cfg.t_mean, cfg.t_std, rows=mine)
        loss = per_sample.mean()
        loss.backward()
        # ---- STEP: averaged over ranks (every rank steps alike), clipped, skipped if non-finite,
        # then the EMA
        average_gradients(net.parameters(), d)
        grad_norm = clip_gradients(net.parameters(), cfg.grad_clip)
        if guard.ok(all_mean(loss.detach(), d).item(), grad_norm):
            opt.step()
            ema.update(net, step)
        opt.zero_grad(set_to_none=True)
        window.append((loss.item(), grad_norm, t.detach().cpu(), per_sample.detach().cpu()))

        # ---- LOG and CHECKPOINT
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            rec = log_record(step, window, lr, guard.skipped, time.time() - t0, d)
            window = []
            bar.set_postfix(loss=f"{rec['loss']:.4f}", gnorm=f"{rec['grad_norm']:.2f}",
                            skipped=guard.skipped)
            if d.main:
                logf.write(json.dumps(rec) + "\n")
                logf.flush()
        if (step + 1) % cfg.ckpt_every == 0 or step + 1 == cfg.steps:
            save_run_state(state_path, net, ema, opt, lineage(step + 1), step + 1,
                           {"guard": guard}, logf, d.main)
        if stop_after is not None and step + 1 >= stop_after:
            return None

    # before anything is handed off
    check_ranks_agree(net, d)
    # ---- hand-off: EMA weights, validation loss, a sample grid (every rank computes: a sharded
    # EMA needs them all)
    val = validation_loss(ema.model, world, cfg.val_clips)
    weights = full_state(ema.model, d.main)
    seconds = round(time.time() - t0, 1)
    tokens = data.tokenize(SAMPLE_PROMPTS).repeat_interleave(4, 0).to(d.device)
    noise = torch.randn(len(tokens), *net.flow_shape,
                        generator=torch.Generator().manual_seed(0)).to(d.device)
    videos = M.sample(ema.model, tokens, noise, cfg.sample_steps, cfg.cfg_scale)
    memory = memory_use(d, [net, ema.model], opt)
    if d.main:
        save_checkpoint(ckpt_path, weights, mcfg, lineage(cfg.steps), val_loss=val,
                        train_seconds=seconds)
        data.write_video(data.video_grid(videos, len(SAMPLE_PROMPTS), 4),
                         os.path.join(cfg.out_dir, "samples.gif"))
        log(f"done in {time.time() - t0:.0f}s: {ckpt_path}; validation flow loss "
            f"val={val['val']:.4f} heldout={val['heldout']:.4f}; {guard.skipped} skipped steps; "
            f"samples.gif rows: " + " | ".join(SAMPLE_PROMPTS))
        logf.write(json.dumps(dict(final=True, val_loss=val, skipped=guard.skipped,
                                   memory=memory, parallel=cfg.parallel, ranks=d.ranks)) + "\n")
        logf.close()
    teardown(d)
    release_run_folders(cfg.out_dir)
    check_trained(guard.skipped, cfg.steps, ckpt_path, sum(val.values()))
    return ckpt_path


if __name__ == "__main__":
    run_cli(lambda argv: train(parse_config(Config, argv)), sys.argv[1:])
