"""The learned judge: an ensemble of small video-text scorers standing in for a real reward model.

    python judge.py train        # make reward_model: fit the ensemble, calibrated on sft_small's samples
    python judge.py calibrate --on=runs/sft/ckpt.safetensors --out=runs/judge.safetensors   # refit its level only

Training never sees the oracle directly: a real judge is a learned model with annotator noise in its labels and
blind spots off its training distribution. K small scorers, each trained on its own bootstrap of oracle-labelled
clips (renders, web renders with defects, the generators' own samples; captions right or wrong), give a mean and a
spread; Stage II down-weights advantages where the members disagree (reward_rl.reliability). Calibration sets each
head's level on the oracle's scores of the policy the next stage starts from, keeping the members' ranking.
"""
import json
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data
import model as M
from checkpoint import (CheckpointError, column_names, file_hash, lineage_record, load_model, load_weights, read_checkpoint,
                        save_checkpoint)
from rewards import HEADS, reward_heads, world_of
from cli import ConfigError, check_ranges, claim_out_file, parse_config, run_cli, subcommand


# Training never sees the oracle directly by default: a real judge is a learned model with annotator
# noise in its labels and blind spots off its training distribution. K small video-text scorers, each
# trained on its own bootstrap of the data, give a mean and a spread; the spread is the uncertainty
# that Stage II uses to down-weight advantages where the members disagree.
class RewardNet(nn.Module):
    """Video (B, C, F, H, W) + caption tokens -> (B, heads) scores, one per head it was built for (the registry's,
    in its order): a sigmoid output per head, except instruction, in [0, 1] until calibration shifts it.

    Text alignment is scored the way VQA-style judges do it: the net reads the clip into a distribution
    over each attribute's words, and the instruction score is the mean probability it gives the words the
    caption uses. A plain MLP over concatenated video and text features stayed at chance here."""

    def __init__(self, width=32, heads=None):
        super().__init__()
        self.heads = list(heads or HEADS)
        self.video = nn.Sequential(                     # per-frame detail, then motion across frames
            nn.Conv3d(3, width // 2, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)), nn.GELU(),
            nn.Conv3d(width // 2, width, (3, 3, 3), stride=(1, 2, 2), padding=1), nn.GELU(),
            nn.Conv3d(width, 2 * width, (3, 3, 3), stride=(1, 2, 2), padding=1), nn.GELU())
        self.words = [torch.tensor([data.WORD_TO_ID[w] for w in values]) for values in data.ATTRIBUTES.values()]
        n_words = sum(len(w) for w in self.words)
        self.plain = [h for h in self.heads if h != "instruction"]
        self.out = nn.Sequential(nn.Linear(4 * width, 4 * width), nn.GELU(), nn.Linear(4 * width, len(self.plain) + n_words))
        # a per-head offset, fit after training on oracle-labelled samples (calibrate): noisy labels pull a
        # regression's output toward their mean, so the raw scores rank well but sit at the wrong level
        self.register_buffer("offset", torch.zeros(len(self.heads)))

    def forward(self, videos, tokens):
        v = self.video(videos)                                              # (B, 2w, F', H', W')
        out = self.out(torch.cat([v.mean((2, 3, 4)), v.amax((2, 3, 4))], 1))  # (B, plain heads + words)
        logits, total, asked = out[:, len(self.plain):], 0, 0
        for ids in self.words:                                              # one attribute at a time
            p = torch.softmax(logits[:, : len(ids)], -1)                    # (B, values)
            said = (tokens[:, :, None] == ids[None, None]).any(1).float()   # (B, values): the caption's word
            total, asked = total + (p * said).sum(1), asked + said.amax(1)
            logits = logits[:, len(ids):]
        score = dict(zip(self.plain, torch.sigmoid(out[:, :len(self.plain)]).unbind(1)))
        score["instruction"] = torch.where(asked > 0, total / asked.clamp(min=1), torch.ones_like(total))
        return torch.stack([score[h] for h in self.heads], 1) + self.offset   # shifted: the ranking and spread are kept


@dataclass
class RewardModelConfig:
    members: int = 4            # ensemble size
    width: int = 32             # conv width of each member
    steps: int = 400            # optimizer steps per member
    pool_clips: int = 3072      # labelled clips, drawn once; each member trains on a bootstrap of them
    batch_size: int = 64        # clips per step
    lr: float = 2e-3            # AdamW learning rate
    label_noise: float = 0.08   # std of Gaussian annotator noise on each oracle label
    label_flip: float = 0.05    # fraction of labels an annotator gets entirely wrong (uniform in [0, 1])
    generators: tuple = ("checkpoints/base_small.safetensors", "checkpoints/sft_small.safetensors")  # whose samples
                                # join the training data, so the judge ranks what the stages make ('' = none)
    generator_clips: int = 256  # samples drawn from each generator (once, up front); eval_clips / 8 more held out
    calib_clips: int = 256      # samples of the last generator (the policy Stage II starts from), scored by the
                                # oracle without annotator noise: the judge's per-head offset (0 = uncalibrated)
    out: str = "checkpoints/reward_model.safetensors"
    eval_clips: int = 512       # held-out clips for the accuracy report
    seed: int = 0
    overwrite: bool = False


def mismatched_prompts(attrs, gen, p_wrong=0.5):
    """Captions of the clips, half of them with one or more attributes changed, so text alignment varies."""
    out = []
    for i in range(len(attrs["colour"])):
        a = {k: int(v[i]) for k, v in attrs.items()}
        if torch.rand(1, generator=gen).item() < p_wrong:
            for name, values in data.ATTRIBUTES.items():
                if torch.rand(1, generator=gen).item() < 0.4:
                    a[name] = int(torch.randint(len(values), (1,), generator=gen))
        out.append(data.caption(a["colour"], a["shape"], a["direction"], a["speed"]))
    return out


def generator_samples(paths, n, seed, step):
    """n guided samples (20 steps, guidance 3) of each checkpoint on val prompts, all paths together: (videos,
    attrs, prompts) or None without paths; and the world shape they share."""
    videos, attrs, prompts, shape = [], [], [], M.preset("small")
    for i, path in enumerate(p for p in paths if p):
        net, _ = load_model(path)
        if videos and (net.cfg.frames, net.cfg.size) != (shape.frames, shape.size):
            raise ConfigError(f"--generators make clips of different shapes ({path} is {net.cfg.frames}x{net.cfg.size})")
        shape = net.cfg
        b = data.make_batch("val", n, seed=seed, step=step + i, world=world_of(shape))
        noise = torch.randn(b.videos.shape, generator=torch.Generator().manual_seed(seed + 1000 * i))
        videos.append(M.sample(net, b.tokens, noise, 20, 3.0))
        attrs.append(b.attrs)
        prompts += b.prompts
    if not videos:
        return None, shape
    return (torch.cat(videos), {k: torch.cat([a[k] for a in attrs]) for k in attrs[0]}, prompts), shape


def rm_pool(cfg, n, seed, world, base_videos=None):
    """Clips a judge should rank: clean renders, web renders with defects of random strength, generator
    samples; captions right or wrong. Returns videos, prompts, oracle head scores (B, heads)."""
    gen = torch.Generator().manual_seed(seed)
    third = n // 3
    clean = data.make_batch("curated", third, seed=seed, step=1, world=world)
    strength = 2 * torch.rand(1, generator=gen).item() + 0.5
    web = data.make_batch("web", third, seed=seed, step=2, world=world, defects=data.Defects().scaled(strength))
    parts = [(clean.videos, clean.attrs), (web.videos, web.attrs)]
    if base_videos is not None:
        pick = torch.randint(len(base_videos[0]), (n - 2 * third,), generator=gen)
        parts.append((base_videos[0][pick], {k: v[pick] for k, v in base_videos[1].items()}))
    else:
        extra = data.make_batch("web", n - 2 * third, seed=seed, step=3, world=world, defects=data.Defects().scaled(3.0))
        parts.append((extra.videos, extra.attrs))
    videos = torch.cat([p[0] for p in parts])
    prompts = sum((mismatched_prompts(p[1], gen) for p in parts), [])
    scores = torch.stack(list(reward_heads(videos, prompts, world).values()), 1)
    return videos, prompts, scores


def train_reward_model(argv):
    cfg = parse_config(RewardModelConfig, argv)
    check_ranges(cfg, at_least_one=("members", "width", "steps", "pool_clips", "batch_size", "eval_clips", "generator_clips"),
                 positive=("lr",), non_negative=("label_noise", "calib_clips"), fraction=("label_flip",))
    for path in (p for p in cfg.generators if p):
        read_checkpoint(path)                                        # every input is checked before any work
    claim_out_file(cfg.out, cfg.overwrite, inputs=cfg.generators)
    t0 = time.time()
    # what the generators actually make: the judge must rank these, not only renders
    base_videos, shape = generator_samples(cfg.generators, cfg.generator_clips, cfg.seed, 99)
    # One labelled pool, scored by the oracle once; each member sees its own bootstrap of it, labelled by
    # its own noisy annotator, so the members disagree where the data leaves the judge unsure.
    videos, prompts, scores = rm_pool(cfg, cfg.pool_clips, cfg.seed, world_of(shape), base_videos)
    tokens = data.tokenize(prompts)
    members = []
    for k in tqdm(range(cfg.members), desc="reward members"):
        g = torch.Generator().manual_seed(cfg.seed * 100 + k)
        torch.manual_seed(cfg.seed * 100 + k)
        member = RewardNet(cfg.width)
        opt = torch.optim.AdamW(member.parameters(), lr=cfg.lr)
        labels = (scores + cfg.label_noise * torch.randn(scores.shape, generator=g)).clamp(0, 1)
        flip = torch.rand(scores.shape, generator=g) < cfg.label_flip
        labels = torch.where(flip, torch.rand(scores.shape, generator=g), labels)
        boot = torch.randint(len(videos), (len(videos),), generator=g)
        for step in range(cfg.steps):
            idx = boot[torch.randint(len(boot), (cfg.batch_size,), generator=g)]
            loss = F.mse_loss(member(videos[idx], tokens[idx]), labels[idx])
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(member.parameters(), 1.0)
            opt.step()
        members.append(member)
    calibrated_on = next((p for p in reversed(cfg.generators) if p), "") if cfg.calib_clips else ""
    if calibrated_on:                                   # the last generator: the policy Stage II starts from
        calibrate(members, calibrated_on, cfg.calib_clips, cfg.seed)
    tensors = member_tensors(members)
    lineage = lineage_record("reward_model", ",".join(cfg.generators), cfg.steps, "curated+web+samples", config=asdict(cfg),
                               seconds=round(time.time() - t0, 1), calibrated_on=calibrated_on)
    # the model config records the world shape (frames, size) the judge was trained for
    save_checkpoint(cfg.out, tensors, shape, lineage, members=cfg.members, width=cfg.width, heads=list(HEADS))
    held_out, _ = generator_samples(cfg.generators, max(1, cfg.eval_clips // 8), cfg.seed + 1, 199)
    report = evaluate_reward_model(load_reward_model(cfg.out), cfg, world_of(shape), held_out)
    print(json.dumps(report, indent=1))
    print(f"wrote {cfg.out} in {time.time() - t0:.0f}s")


@torch.no_grad()
def fit_calibration(members, videos, tokens, truth):
    """One offset per head, shared by the members, that moves their mean onto truth's (B, heads) mean: the level is
    set and the ranking and spread are kept. No scale: within one policy's samples fidelity varies too little for a
    slope to be fit (least squares gave 0.08, which would flatten the head below Stage II's std floor)."""
    for m in members:
        m.offset.zero_()
    raw = torch.stack([m(videos, tokens) for m in members]).mean(0)           # (B, heads)
    for m in members:
        m.offset.copy_(truth.mean(0) - raw.mean(0))


def calibrate(members, policy, clips, seed=0):
    """The judge's per-head offset, fit to the oracle's scores of `clips` samples of `policy` with their own
    captions: the level at which it should score the clips of the policy the next stage starts from."""
    gold, shape = generator_samples([policy], clips, seed + 2, 299)
    truth = torch.stack(list(reward_heads(gold[0], gold[2], world_of(shape)).values()), 1)
    fit_calibration(members, gold[0], data.tokenize(gold[2]), truth)


@dataclass
class CalibrateConfig:
    judge: str = "checkpoints/reward_model.safetensors"  # the learned judge (its members' trained weights are kept)
    on: str = "checkpoints/sft_small.safetensors"        # the policy whose samples set each head's level
    clips: int = 256            # samples of it, scored by the oracle (64 more, held out, for the printed gap)
    seed: int = 0
    out: str = ""               # where to write the recalibrated judge (not --judge: an input is never replaced)
    overwrite: bool = False


def calibrate_judge(argv):
    """A judge recalibrated for a new policy in minutes, instead of refit: when Stage II starts from another
    checkpoint than the one the judge was calibrated on."""
    cfg = parse_config(CalibrateConfig, argv)
    check_ranges(cfg, at_least_one=("clips",))
    out = cfg.out
    members = load_reward_model(cfg.judge, read_checkpoint(cfg.on)[1])  # both inputs checked before any work
    claim_out_file(out, cfg.overwrite, inputs=[cfg.judge, cfg.on])
    (videos, _, prompts), shape = generator_samples([cfg.on], 64, cfg.seed + 1, 199)
    tokens, truth = data.tokenize(prompts), reward_heads(videos, prompts, world_of(shape))
    gap = lambda: {h: round(float((rm_score(members, videos, tokens)[0][h] - truth[h]).mean()), 4) for h in HEADS}
    before = gap()
    calibrate(members, cfg.on, cfg.clips, cfg.seed)
    _, judge_shape, meta = read_checkpoint(cfg.judge)
    tensors = member_tensors(members)
    save_checkpoint(out, tensors, judge_shape, dict(meta["lineage"], calibrated_on=cfg.on, calibrated_on_hash=file_hash(cfg.on)),
                      members=meta["members"], width=meta["width"], heads=meta.get("heads", list(HEADS)))
    print(f"proxy - oracle on 64 held-out samples of {cfg.on}: before " + ", ".join(f"{h} {v:+.3f}" for h, v in before.items())
          + "; after " + ", ".join(f"{h} {v:+.3f}" for h, v in gap().items()))
    print(f"wrote {out}")


def member_tensors(members):
    """The ensemble as one flat dict of tensors, each member's under its own prefix (what load_reward_model reads)."""
    return {f"member{k}.{n}": p for k, m in enumerate(members) for n, p in m.state_dict().items()}


def load_reward_model(path, policy_cfg=None):
    """The ensemble's members. Refuses a judge trained for clips of another shape than policy_cfg's, or one
    that does not score every head of the registry."""
    tensors, shape, meta = read_checkpoint(path)
    if not isinstance(meta.get("members"), int) or not isinstance(meta.get("width"), int):
        stage = meta.get("lineage", {}).get("stage", "unknown")
        raise CheckpointError(f"{path} is not a learned judge (lineage stage {stage!r}, no ensemble members); "
                                f"train one with python judge.py train")
    if policy_cfg is not None and (shape.frames, shape.size) != (policy_cfg.frames, policy_cfg.size):
        raise CheckpointError(f"the learned judge {path} scores {shape.frames}x{shape.size}x{shape.size} clips; "
                                f"this policy makes {policy_cfg.frames}x{policy_cfg.size}x{policy_cfg.size}")
    heads = meta.get("heads")
    if not isinstance(heads, list) or any(f"member{k}.offset" not in tensors for k in range(meta["members"])):
        raise CheckpointError(f"the learned judge {path} was written before judges named their heads and were "
                              f"calibrated: refit it (make reward_model)")
    if set(HEADS) - set(heads):
        raise CheckpointError(f"the learned judge {path} scores {', '.join(heads)} but the registry also has "
                                f"{', '.join(sorted(set(HEADS) - set(heads)))}: refit it (make reward_model)")
    members = []
    for k in range(meta["members"]):
        m = RewardNet(meta["width"], heads)
        load_weights(m, tensors, path, prefix=f"member{k}.")
        members.append(m.eval())
    return members


@torch.no_grad()
def rm_score(members, videos, tokens):
    """Ensemble mean and std per head: name -> (B,)."""
    s = torch.stack([m(videos, tokens) for m in members])                  # (K, B, heads)
    names = members[0].heads
    return ({n: s[:, :, i].mean(0) for i, n in enumerate(names)}, {n: s[:, :, i].std(0) for i, n in enumerate(names)})


def evaluate_reward_model(members, cfg, world, samples=None):
    """Against the oracle on clips none of the members trained on: error, ranking agreement, whether the
    ensemble's spread flags its own mistakes, and (given held-out generator samples) its gap on those."""
    videos, prompts, scores = rm_pool(cfg, cfg.eval_clips, 10 ** 9 + cfg.seed, world)
    mean, std = rm_score(members, videos, data.tokenize(prompts))
    out = {}
    if samples is not None:  # and on each generator's own samples (equal blocks, in --generators order)
        truth = reward_heads(samples[0], samples[2], world)
        proxy, _ = rm_score(members, samples[0], data.tokenize(samples[2]))
        gap = {n: proxy[n] - truth[n] for n in HEADS}
        out["generator_samples_proxy_minus_oracle"] = {n: round(float(gap[n].mean()), 4) for n in HEADS}
        names = column_names([p for p in cfg.generators if p])
        per = len(samples[2]) // len(names)
        for i, name in enumerate(names):
            out[f"proxy_minus_oracle_on_{name}"] = {n: round(float(gap[n][i * per:(i + 1) * per].mean()), 4) for n in HEADS}
    for i, n in enumerate(HEADS):
        err = (mean[n] - scores[:, i]).abs()
        a, b = torch.triu_indices(len(err), len(err), 1)
        differ = (scores[a, i] - scores[b, i]).abs() > 0.1
        agree = ((mean[n][a] - mean[n][b]).sign() == (scores[a, i] - scores[b, i]).sign())[differ]
        out[n] = dict(mae=round(float(err.mean()), 4), pair_accuracy=round(float(agree.float().mean()), 4),
                      std_error_corr=round(float(torch.corrcoef(torch.stack([std[n], err]))[0, 1]), 4),
                      mae_most_certain_half=round(float(err[std[n] <= std[n].median()].mean()), 4),
                      mae_least_certain_half=round(float(err[std[n] > std[n].median()].mean()), 4))
    return out


COMMANDS = {"train": train_reward_model, "calibrate": calibrate_judge}

if __name__ == "__main__":
    run_cli(lambda argv: subcommand(COMMANDS, "judge.py", argv)(argv[1:]), sys.argv[1:])
