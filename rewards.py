"""Programmatic rewards for the postflow world: an oracle that reads a clip back into its attributes,
and reward heads built on what the oracle sees.

Oracle. A clip is one object over black, so brightness alone finds it. Per frame: the brightest channel
of each pixel is its brightness a; the object's colour is the mean colour of its brightest (core) pixels,
because anti-aliased edge pixels mix the colour with black; a / max(colour) is a soft coverage map alpha
that undoes the anti-aliasing (and any flicker). The centre is a circular mean of the mask, since the
world is a torus and a plain mean of an object split across an edge lands between its halves, then
refined by a centroid of alpha taken the short way round. The shape is the template, drawn with
data.shape_sdf at that centre with the world's radius scaled by size/32, that best explains alpha.
Per clip: direction and speed come from the mean frame-to-frame displacement on the torus (jitter
telescopes away in a mean), matched to the nearest of DIRECTIONS and SPEEDS (scaled by size/32).

Heads, each in [0, 1] per clip. They mirror VideoAlign's three heads (visual quality, motion quality,
text alignment), but are exact because the world is known:
  fidelity     a crisp world render: edges match a template, black background, colour on the palette
  temporal     steady appearance and size, constant velocity, no flicker, a still background
  instruction  soft agreement with each attribute the prompt names; partly right scores in between
A head is a function (obs, want) -> (B,) registered in HEADS: obs is the oracle's dict (computed once
per batch), want the prompted attribute indices (-1 = not asked). A new head is a function and a line;
Stage II's weights and curriculum, Stage III's judge, the learned ensemble and the logs follow HEADS.
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
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data
import model as M
from stability import (ConfigError, UserError, atomic_write, check_output_path, check_ranges, claim_out_dir, claim_out_file,
                       describe, parse_config, run_cli, same_file, subcommand, write_text)

DIRS = torch.tensor([data.DIRECTIONS[d] for d in data.DIRECTION_NAMES])  # (4, 2) unit (x, y), y down
SPEED_PX = torch.tensor([data.SPEEDS[s] for s in data.SPEED_NAMES])    # (2,) pixels per frame at 32x32


def wrap(d, size):
    """Shortest signed displacement on a torus of edge `size`."""
    return (d + size / 2) % size - size / 2


# ----------------------------------------------------------------------------- oracle
def oracle(videos, world=None):
    """Read clips (B, 3, F, H, W) in [-1, 1] (square frames) back into the world's attributes.

    Per frame (B, F, ...): brightness, alpha, mask, region, rgb, frame_colour, center, area, shape_err,
    frame_shape, background. Per clip (B,): present (an object in every frame), colour, shape, direction,
    speed (indices), velocity (B, 2). Computed on the CPU: a batch of clips is small."""
    world = world or data.WorldConfig()
    B, _, Fr, H, W = videos.shape
    scale = H / 32
    r = world.radius * scale
    reach = 1.25 * r + 1.5  # every shape's anti-aliased edge lies within this distance of its centre
    rgb01 = ((videos.detach().float().cpu() + 1) / 2).clamp(0, 1).permute(0, 2, 3, 4, 1)  # (B, F, H, W, 3)
    a = rgb01.amax(-1)                                                          # (B, F, H, W)
    core = ((a >= 0.9 * a.flatten(2).amax(-1)[..., None, None]) & (a > 0.1)).float()
    rgb = (rgb01 * core[..., None]).sum((2, 3)) / core.sum((2, 3)).clamp(min=1)[..., None]  # (B, F, 3)
    alpha = (a / rgb.amax(-1).clamp(min=0.05)[..., None, None]).clamp(0, 1)   # (B, F, H, W)
    mask = alpha > 0.5

    # Circular mean of the mask: each pixel coordinate is an angle on the torus.
    pix = torch.arange(H, dtype=torch.float32) + 0.5
    ang = pix * (2 * math.pi / H)
    cs = torch.stack([ang.cos(), ang.sin()], 1)                                # (H, 2)
    mx, my = mask.float().sum(2) @ cs, mask.float().sum(3) @ cs               # (B, F, 2) each
    center = torch.stack([torch.atan2(mx[..., 1], mx[..., 0]), torch.atan2(my[..., 1], my[..., 0])], -1)
    center = (center % (2 * math.pi)) * (H / (2 * math.pi))                  # (B, F, 2) (x, y)

    def offsets(c):  # pixel offsets from c, the short way round: dx (B, F, 1, W), dy (B, F, H, 1)
        return wrap(pix - c[..., 0, None], W)[..., None, :], wrap(pix - c[..., 1, None], H)[..., :, None]

    # The circular mean is slightly off for lopsided shapes (the triangle); a local centroid of alpha is not.
    dx, dy = offsets(center)
    w = alpha * (dx ** 2 + dy ** 2 < reach ** 2)
    n = w.sum((2, 3)).clamp(min=1e-6)
    center = (center + torch.stack([(w * dx).sum((2, 3)) / n, (w * dy).sum((2, 3)) / n], -1)) % H

    dx, dy = offsets(center)
    dx, dy = dx.expand(B, Fr, H, W), dy.expand(B, Fr, H, W)
    region = dx ** 2 + dy ** 2 < reach ** 2                                   # (B, F, H, W) near the object
    # Each shape's template, drawn as the renderer draws it; misfit = L1 to alpha over the template's area.
    K = len(data.SHAPES)
    sdf = data.shape_sdf(torch.arange(K).repeat_interleave(B), dx.repeat(K, 1, 1, 1), dy.repeat(K, 1, 1, 1), r)
    t = (0.5 - sdf.view(K, B, Fr, H, W)).clamp(0, 1)                         # (K, B, F, H, W)
    shape_err = ((alpha - t).abs() * region).sum((3, 4)) / t.sum((3, 4)).clamp(min=1)
    shape_err = shape_err.permute(1, 2, 0)                                    # (B, F, K)

    steps = wrap(center[:, 1:] - center[:, :-1], H)                          # (B, F-1, 2)
    velocity = steps.mean(1) if Fr > 1 else torch.zeros(B, 2)                # (B, 2) pixels per frame
    far = (~region).float()
    return dict(
        brightness=a, alpha=alpha, mask=mask, region=region, rgb=rgb, center=center, shape_err=shape_err,
        frame_colour=torch.cdist(rgb * 2 - 1, data.PALETTE).argmin(-1),      # (B, F)
        frame_shape=shape_err.argmin(-1),                                     # (B, F)
        area=(alpha * region).sum((2, 3)),                                    # (B, F) pixels
        background=(a * far).sum((2, 3)) / far.sum((2, 3)).clamp(min=1),    # (B, F) mean brightness off-object
        colour=torch.cdist(rgb.mean(1) * 2 - 1, data.PALETTE).argmin(-1),    # (B,)
        shape=shape_err.mean(1).argmin(-1),                                   # (B,)
        velocity=velocity,
        direction=(velocity @ DIRS.T).argmax(-1),                             # (B,)
        speed=(velocity.norm(dim=-1)[:, None] - SPEED_PX * scale).abs().argmin(-1),  # (B,)
        present=(mask.sum((2, 3)) >= 0.3 * math.pi * r ** 2).all(1),         # (B,) a triangle covers 0.64 of that
        scale=scale, radius=r,
    )


def targets(prompts_or_attrs, n):
    """Prompted attribute indices: name -> (n,) long, -1 where not asked. Takes prompts or an attrs dict."""
    if isinstance(prompts_or_attrs, dict):
        return {k: torch.as_tensor(prompts_or_attrs.get(k, -1)).long().expand(n) for k in data.ATTRIBUTES}
    prompts = [prompts_or_attrs] if isinstance(prompts_or_attrs, str) else list(prompts_or_attrs)
    if len(prompts) != n:
        raise ValueError(f"{len(prompts)} prompts for {n} videos")
    parsed = [data.parse_prompt(p) for p in prompts]
    return {k: torch.tensor([p[k] for p in parsed]) for k in data.ATTRIBUTES}


def check(videos, prompts_or_attrs, world=None, obs=None):
    """Per clip, whether each prompted attribute is what the oracle sees (True where not asked): (B,) bools."""
    obs = obs if obs is not None else oracle(videos, world)
    want = targets(prompts_or_attrs, videos.shape[0])
    # An attribute cannot be right about an object that is not there.
    out = {k: (want[k] < 0) | ((obs[k] == want[k]) & obs["present"]) for k in data.ATTRIBUTES}
    out["all"] = torch.stack(list(out.values())).all(0)
    return out


# ----------------------------------------------------------------------------- reward heads
def pass_score(*penalties):
    """exp(-mean penalty): 1 when every penalty (each already divided by its tolerance) is 0."""
    return torch.exp(-torch.stack(penalties).clamp(min=0).mean(0))


def fidelity_parts(obs, want=None):
    """The fidelity head's penalties, each divided by its tolerance (0 = perfect): (B,) each."""
    return dict(edges=obs["shape_err"].amin(-1).mean(1) / 0.1,              # blur and speckle near the object
                background=obs["background"].mean(1) / 0.02,
                palette=torch.cdist(obs["rgb"] * 2 - 1, data.PALETTE).amin(-1).mean(1) / 0.15)


def fidelity(obs, want):
    """Visual quality: edges as crisp as a template, a black background, colour on the world's palette."""
    return pass_score(*fidelity_parts(obs).values())


def temporal_parts(obs):
    """The temporal head's penalties, each divided by its tolerance (0 = perfect): (B,) each."""
    steps = wrap(obs["center"][:, 1:] - obs["center"][:, :-1], obs["alpha"].shape[-1])  # (B, F-1, 2)
    area = obs["area"]
    still = (~obs["region"][:, 1:] & ~obs["region"][:, :-1]).float()         # off-object in both frames
    bg = ((obs["brightness"][:, 1:] - obs["brightness"][:, :-1]).abs() * still).sum((1, 2, 3))
    return dict(
        acceleration=(steps[:, 1:] - steps[:, :-1]).norm(dim=-1).mean(1).nan_to_num(0) / obs["scale"] / 1.0,
        size=area.std(1, correction=0) / area.mean(1).clamp(min=1) / 0.1,
        morph=(obs["frame_shape"] != obs["shape"][:, None]).float().mean(1) / 0.25,  # frames read as another shape
        flicker=(obs["rgb"][:, 1:] - obs["rgb"][:, :-1]).norm(dim=-1).mean(1).nan_to_num(0) * 2 / 0.15,
        background=bg / still.sum((1, 2, 3)).clamp(min=1) / 0.02)


def temporal(obs, want):
    """Motion quality: constant velocity, steady size, shape and colour (no flicker), a still background;
    scaled by the fraction of frames that show an object at all, so an empty clip is not 'stable'."""
    return pass_score(*temporal_parts(obs).values()) * presence(obs)


def presence(obs):
    """Fraction of frames with an object of at least 30 % of the world's object area. (B,)"""
    return (obs["mask"].sum((2, 3)) >= 0.3 * math.pi * obs["radius"] ** 2).float().mean(1)


def instruction_parts(obs, want):
    """Soft agreement with each attribute the prompt names, attribute -> (B,) in [0, 1]; NaN where not asked.
    Soft, so that a batch of all-wrong samples still ranks: colour and shape are softmaxes over the
    alternatives, direction a cosine, speed a Gaussian in log speed ratio."""
    speed = obs["velocity"].norm(dim=-1)                                     # (B,)
    slow = SPEED_PX[0] * obs["scale"]
    # Colour and shape each compete with "nothing": black, and an empty template (misfit = object area),
    # so that a blank clip matches no prompt rather than whichever colour or shape is least unlike it.
    colours = torch.cat([data.PALETTE, torch.full((1, 3), data.BACKGROUND)])
    empty = obs["area"] / (math.pi * obs["radius"] ** 2)                    # (B, F)
    soft = {
        "colour": torch.softmax(-torch.cdist(obs["rgb"].mean(1) * 2 - 1, colours) ** 2 / 0.1, -1),
        "shape": torch.softmax(-torch.cat([obs["shape_err"], empty[..., None]], -1).mean(1) / 0.05, -1),
        # the cosine, faded out for a clip that barely moves: it has no direction to agree with
        "direction": (1 + obs["velocity"] @ DIRS.T / speed[:, None].clamp(min=1e-6)) / 2
                     * (speed[:, None] / (0.5 * slow)).clamp(max=1),
        "speed": torch.exp(-torch.log((speed[:, None] + 1e-3) / (SPEED_PX * obs["scale"])) ** 2 / (2 * 0.3 ** 2)),
    }
    return {k: torch.where(want[k] >= 0, p.gather(1, want[k].clamp(min=0)[:, None])[:, 0], float("nan"))
            for k, p in soft.items()}                                         # p: (B, n_values)


def temporal_misses(obs, want):
    """temporal_parts and the head's other factor, the fraction of frames with no object: diagnose's breakdown."""
    return {**temporal_parts(obs), "empty": 1 - presence(obs)}


def instruction_misses(obs, want):
    """instruction_parts as penalties, 1 - soft agreement (0 = perfect, NaN where not asked): diagnose's breakdown."""
    return {k: 1 - v for k, v in instruction_parts(obs, want).items()}


def instruction(obs, want):
    """Text alignment: the mean of instruction_parts over the attributes the prompt names (1 if none)."""
    parts = torch.stack(list(instruction_parts(obs, want).values()), 1)      # (B, attributes)
    asked = (~parts.isnan()).sum(1)
    return torch.where(asked > 0, parts.nan_to_num(0).sum(1) / asked.clamp(min=1), torch.ones(len(parts)))


@dataclass
class Head:
    fn: object           # (obs, want) -> (B,) in [0, 1]
    weight: float = 1.0  # Stage II's advantage weight (override: --weights=name=value)
    phase: int = 1       # when the self-paced curriculum leans on it: 0 early, 1 middle, 2 late
    parts: object = None  # (obs, want) -> {part: (B,) penalty, 0 = perfect}: what diagnose blames (None: 1 - score)


# The registry. A fork adds a head with one function above and one line here.
HEADS = {
    "fidelity": Head(fidelity, weight=0.25, phase=0, parts=fidelity_parts),           # visual fidelity first,
    "temporal": Head(temporal, weight=0.25, phase=1, parts=temporal_misses),          # then temporal coherence,
    "instruction": Head(instruction, weight=1.0, phase=2, parts=instruction_misses),  # then semantics (TeleBoost)
}


def head_weights(overrides=(), default=None):
    """Each head's weight: the registry's (or `default` for all), with 'name=value' overrides. Refuses unknown
    heads and negative or non-numeric weights with a one-line error."""
    w = {n: (h.weight if default is None else default) for n, h in HEADS.items()}
    for item in overrides:
        name, _, value = item.partition("=")
        if name not in HEADS:
            raise ConfigError(f"--weights names an unknown head {name!r}; heads: {', '.join(HEADS)}")
        try:
            w[name] = float(value)
        except ValueError:
            raise ConfigError(f"--weights expects head=number, got {item!r}") from None
        if not math.isfinite(w[name]) or w[name] < 0:
            raise ConfigError(f"--weights: {name}'s weight must be a finite number >= 0, got {value}")
    if not any(v > 0 for v in w.values()):
        raise ConfigError(f"--weights set every head to 0 ({', '.join(overrides)}): nothing would be rewarded")
    return w


def head_names(split_instruction=False):
    """What reward_heads returns: the heads, and with split_instruction each attribute's part of instruction."""
    return list(HEADS) + ([f"instruction_{k}" for k in data.ATTRIBUTES] if split_instruction else [])


def curriculum(weights, progress):
    """Self-paced weights (TeleBoost): at progress in [0, 1] the focus moves from phase 0 (fidelity) through 1
    (temporal) to 2 (semantics), and each head's weight is scaled by 0.5^(its phase's distance from the focus).
    weights: head -> weight. Returns head -> weight."""
    pos = min(progress, 1.0) * 2
    lo = int(min(pos, 1))
    focus = lambda now: torch.tensor([0.5 ** abs(now - HEADS[h].phase) for h in weights])
    scale = torch.lerp(focus(lo), focus(lo + 1), pos - lo)
    return dict(zip(weights, (torch.tensor(list(weights.values())) * scale).tolist()))


def advantage_weights(names, overrides=(), progress=0.0, self_paced=False):
    """Stage II's weight of each head in `names` (head_names') at training progress in [0, 1]: the registry's with
    overrides, moved by the curriculum when self_paced. When the instruction head is split, its attribute parts
    carry its weight and the whole head only logs (weight 0). (len(names),)"""
    base = head_weights(overrides)
    base = curriculum(base, progress) if self_paced else base
    split = any(n.startswith("instruction_") for n in names)
    return torch.tensor([0.0 if split and n == "instruction" else base[n.split("_")[0]] for n in names])


def reward_heads(videos, prompts, world=None, heads=HEADS, obs=None, split_instruction=False):
    """name -> (B,) score in [0, 1] for each head, from one oracle pass over the clips (or a given one,
    to score the same clips against other prompts). split_instruction adds instruction_<attribute>, each
    prompted attribute's soft match, 1 where not asked (the same for a whole group: no advantage)."""
    obs = obs if obs is not None else oracle(videos, world)
    want = targets(prompts, videos.shape[0])
    out = {name: head.fn(obs, want).clamp(0, 1) for name, head in heads.items()}
    if split_instruction:
        out.update({f"instruction_{k}": v.nan_to_num(1.0) for k, v in instruction_parts(obs, want).items()})
    return out


# ----------------------------------------------------------------------------- group advantages (Stage II)
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


# ----------------------------------------------------------------------------- the learned judge
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


def world_of(mcfg):
    return data.WorldConfig(frames=mcfg.frames, size=mcfg.size)


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
        net, _ = M.load_model(path)
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
        M.read_checkpoint(path)                                        # every input is checked before any work
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
    lineage = M.lineage_record("reward_model", ",".join(cfg.generators), cfg.steps, "curated+web+samples", config=asdict(cfg),
                               seconds=round(time.time() - t0, 1), calibrated_on=calibrated_on)
    # the model config records the world shape (frames, size) the judge was trained for
    M.save_checkpoint(cfg.out, tensors, shape, lineage, members=cfg.members, width=cfg.width, heads=list(HEADS))
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
    members = load_reward_model(cfg.judge, M.read_checkpoint(cfg.on)[1])  # both inputs checked before any work
    claim_out_file(out, cfg.overwrite, inputs=[cfg.judge, cfg.on])
    (videos, _, prompts), shape = generator_samples([cfg.on], 64, cfg.seed + 1, 199)
    tokens, truth = data.tokenize(prompts), reward_heads(videos, prompts, world_of(shape))
    gap = lambda: {h: round(float((rm_score(members, videos, tokens)[0][h] - truth[h]).mean()), 4) for h in HEADS}
    before = gap()
    calibrate(members, cfg.on, cfg.clips, cfg.seed)
    _, judge_shape, meta = M.read_checkpoint(cfg.judge)
    tensors = member_tensors(members)
    M.save_checkpoint(out, tensors, judge_shape, dict(meta["lineage"], calibrated_on=cfg.on, calibrated_on_hash=M.file_hash(cfg.on)),
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
    tensors, shape, meta = M.read_checkpoint(path)
    if not isinstance(meta.get("members"), int) or not isinstance(meta.get("width"), int):
        stage = meta.get("lineage", {}).get("stage", "unknown")
        raise M.CheckpointError(f"{path} is not a learned judge (lineage stage {stage!r}, no ensemble members); "
                                f"train one with python rewards.py train_rm")
    if policy_cfg is not None and (shape.frames, shape.size) != (policy_cfg.frames, policy_cfg.size):
        raise M.CheckpointError(f"the learned judge {path} scores {shape.frames}x{shape.size}x{shape.size} clips; "
                                f"this policy makes {policy_cfg.frames}x{policy_cfg.size}x{policy_cfg.size}")
    heads = meta.get("heads", ["fidelity", "temporal", "instruction"])       # judges written before the registry
    if set(HEADS) - set(heads):
        raise M.CheckpointError(f"the learned judge {path} scores {', '.join(heads)} but the registry also has "
                                f"{', '.join(sorted(set(HEADS) - set(heads)))}: refit it (make reward_model)")
    members = []
    for k in range(meta["members"]):
        m = RewardNet(meta["width"], heads)
        tensors.setdefault(f"member{k}.offset", torch.zeros(len(heads)))     # a judge from before calibration
        M.load_weights(m, tensors, path, prefix=f"member{k}.")
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


# ----------------------------------------------------------------------------- diagnostics
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


@torch.no_grad()
def quick_eval(net, prompts, noise, steps=20, cfg_scale=3.0, world=None):
    """What a stage watches while it trains: the oracle's accuracy per attribute and the heads' means on a
    fixed prompt set and fixed noise (ODE samples). Returns a flat dict of floats."""
    clips = M.sample(net, data.tokenize(prompts).to(noise.device), noise, steps, cfg_scale).cpu()
    obs = oracle(clips, world or world_of(net.cfg))
    out = {k: float(v.mean()) for k, v in reward_heads(clips, prompts, obs=obs).items()}
    out.update({f"acc_{k}": float(v.float().mean()) for k, v in check(clips, prompts, obs=obs).items()})
    return out


def oracle_win_rate(a, b, prompts, world=None):
    """Oracle pairwise comparison of clips a[i] and b[i] for prompts[i]: 1 where a is better, 0.5 for a tie.
    Better = more prompted attributes right; the heads' mean (in [0, 1]) breaks ties between equal counts. (B,)"""
    def score(clips):
        obs = oracle(clips, world)
        ok = check(clips, prompts, obs=obs)
        heads = torch.stack(list(reward_heads(clips, prompts, obs=obs).values()), 1).mean(1)
        return torch.stack([ok[k].float() for k in data.ATTRIBUTES], 1).sum(1) + heads
    sa, sb = score(a), score(b)
    return (sa > sb).float() + 0.5 * (sa == sb).float()


def mean_se(x):
    x = x.float()
    return [round(float(x.mean()), 4), round(float(x.std() / math.sqrt(max(1, len(x) - 1))), 4) if len(x) > 1 else 0.0]


@dataclass
class DiagnoseConfig:
    ckpt: tuple = ("checkpoints/base_small.safetensors",)  # checkpoints to compare (repeat --ckpt=, or A,B)
    out: str = "runs/diagnose"  # diagnostics.json, diagnostics.md, config.json, grid.gif
    prompts: int = 16           # eval prompts per split (val combinations and unseen held-out ones)
    seeds: int = 2              # noise seeds per prompt
    steps: int = 20             # Euler steps
    cfg_scale: float = 3.0      # guidance weight of the main samples
    cfg_until: float = M.CFG_UNTIL  # guidance stops at this t (1.0 = guide every step)
    long_clips: int = 4         # clips continued to 4x their length for drift_by_chunk (each costs 7 clips)
    diversity_seeds: int = 8    # seeds per prompt for the diversity spread
    probe_clips: int = 16       # clips of the main set (spread over its prompts) for the guidance sweep and image-to-video
    reward_model: str = "checkpoints/reward_model.safetensors"  # learned ensemble for proxy_reward ('' = none)
    seed: int = 0               # eval seed: the same prompts and noise for every checkpoint
    overwrite: bool = False     # replace an existing output folder
    cache: str = ""             # a folder keeping each checkpoint's diagnosis by content (file, settings, judge,
                                # heads, code): a repeat is read back, not recomputed ('' = off)
    shipped: str = "checkpoints/diagnoses"  # read-only diagnoses shipped with the checkpoints, by the same key: the
                                # base's, so a fresh clone does not redo it (`make base_diagnosis`; a code edit misses)


def eval_prompts(cfg):
    val, heldout = data.prompt_set("val", cfg.prompts, cfg.seed), data.prompt_set("heldout", cfg.prompts, cfg.seed)
    return val[0] + heldout[0], ["val"] * cfg.prompts + ["heldout"] * cfg.prompts


def noise_for(n, net, seed, frames=None):
    """Fixed starting noise in a policy's flow space (n, *net.flow_shape), or a ModelConfig's pixel clip shape;
    `frames` overrides the frame count."""
    c, f, h, w = getattr(net, "flow_shape", None) or (net.channels, net.frames, net.size, net.size)
    return torch.randn(n, c, frames or f, h, w, generator=torch.Generator().manual_seed(seed))


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
    net, meta = M.load_model(path)
    mc, world = net.cfg, world_of(net.cfg)
    prompts, splits = eval_prompts(cfg)
    prompts = [p for p in prompts for _ in range(cfg.seeds)]
    splits = [s for s in splits for _ in range(cfg.seeds)]
    tokens = data.tokenize(prompts)
    noise = noise_for(len(prompts), net, cfg.seed)
    sample = lambda tok, nz, w, **kw: M.sample(net, tok, nz, cfg.steps, w, cfg_until=cfg.cfg_until, **kw)

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
    # (data, steps), not the sampler's or a reward's (docs/results.md)
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
                         cfg.cfg_scale, overlap, cfg.cfg_until); bar.update()
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
    rl_done = stage.startswith("rl") or stage in ("grpo", "dpo")             # made by Stage II (or III after it)
    run = lambda script, *flags: " ".join(["python", script, shlex.quote(f"--init={ckpt}"), *flags])
    if axis is None:
        return {"axis": None, "part": None, "text": "every part of every head matches the curated data: preferences "
                "are what is left to learn, Stage III DPO on on-policy pairs", "command": run(
                    "preference.py", "--out_dir=runs/next_dpo", *([] if rl_done or stage == "sft" else ["--any_input=true"]))}
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


# Stage I's own loss inside the next stage, 4x each stage's default weight (reward_rl.Config.sft_weight 0.5,
# preference.Config.curated_weight 300): what a fixed-order pipeline can do when a diagnosis asks for Stage I
STAGE_ONE_FLAGS = {"rl": ["--sft_weight=2.0"], "dpo": ["--curated_weight=1200.0"]}


def stage_flags(stage, axis, stage_one=False):
    """The flags that turn a stage toward one axis. Stage II ("rl"): the head's advantage weight at least
    instruction's default and twice its own, rewards on continued clips for temporal, one advantage per attribute
    for instruction. Stage III ("dpo"): the judge weighs the head 3:1 against each other. No axis: no flags.
    stage_one: the diagnosis asked for Stage I (the curated data teaches the part, a reward cannot): the stage's
    curated flow-loss anchor is weighted up instead (STAGE_ONE_FLAGS), its rewards left as they are."""
    if axis is None:
        return []
    if stage_one:
        return list(STAGE_ONE_FLAGS[stage])
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
        raise UserError(f"{path} not found: run `python rewards.py diagnose --out={os.path.dirname(path)} --ckpt=...` first")
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


def column_names(paths):
    """One unique column name per checkpoint: its file name, or its run folder's for a run's ckpt.safetensors;
    where two share a name (two runs' rl/ckpt.safetensors), as many parent folders as tell them apart
    (pipeline/rl, other/rl); where none do (the same file twice), a number (rl, rl#2)."""
    parts = []
    for p in paths:
        full = os.path.abspath(p)
        folders = full.split(os.sep)[1:-1]                            # outermost first
        stem = os.path.splitext(os.path.basename(full))[0]
        parts.append((folders[:-1], folders[-1]) if stem == "ckpt" and folders else (folders, stem))
    depth = [0] * len(paths)
    name = lambda i: "/".join(parts[i][0][len(parts[i][0]) - depth[i]:] + [parts[i][1]])
    while True:                      # deepen every name of a clash between different files, while folders remain
        groups = {}
        for i in range(len(paths)):
            groups.setdefault(name(i), []).append(i)
        deeper = [i for g in groups.values() if len({str(parts[j]) for j in g}) > 1 for i in g
                  if depth[i] < len(parts[i][0])]
        if not deeper:
            break
        for i in deeper:
            depth[i] += 1
    out = []
    for i in range(len(paths)):      # still the same name (the same file twice): numbered
        n, k = name(i), 1
        while (n if k == 1 else f"{n}#{k}") in out:
            k += 1
        out.append(n if k == 1 else f"{n}#{k}")
    return out


def check_diagnose_inputs(cfg):
    """Every checkpoint (and the learned judge) read and checked before any sampling: a missing or broken last
    --ckpt fails in a second, not after the others were diagnosed. Returns the judge's members or None, and the
    world the checkpoints share."""
    if not cfg.ckpt:
        raise ConfigError("no checkpoints to diagnose: pass --ckpt=PATH (repeat it, or --ckpt=A,B)")
    check_ranges(cfg, at_least_one=("prompts", "seeds", "steps", "long_clips", "probe_clips"), non_negative=("cfg_scale", "cfg_until"))
    if cfg.diversity_seeds < 2:
        raise ConfigError(f"--diversity_seeds must be at least 2 to measure a spread, got {cfg.diversity_seeds}")
    shapes = {}
    for path in cfg.ckpt:
        net, _ = M.load_model(path)                                   # missing, truncated, broken, NaN: one line
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
        raise M.CheckpointError(f"learned judge not found: {cfg.reward_model} (pass --reward_model= to diagnose "
                                f"without it)")
    try:
        return load_reward_model(cfg.reward_model, a), world_of(a)    # one for another clip shape is refused
    except M.CheckpointError as e:
        raise M.CheckpointError(f"{e} (pass --reward_model= to diagnose without the learned judge)") from None


HERE = os.path.dirname(os.path.abspath(__file__))


def code_version():
    """The hashes of the code that samples and scores, and torch's version: a result kept under them is still true."""
    return [M.file_hash(os.path.join(HERE, f)) for f in ("rewards.py", "model.py", "data.py")] + [torch.__version__]


def cache_key(path, cfg):
    """What a diagnosis depends on: the checkpoint's bytes, the settings that shape the samples, the judge's bytes,
    and the code that samples and scores (an edit to any of these files is a new key)."""
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("ckpt", "out", "overwrite", "cache", "shipped",
                                                                    "reward_model")}
    judge = M.file_hash(cfg.reward_model) if cfg.reward_model and os.path.exists(cfg.reward_model) else ""
    text = json.dumps([M.file_hash(path), settings, judge, list(HEADS), code_version()], sort_keys=True)
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
    claim_out_dir(cfg.out, False, cfg.overwrite, inputs=[*cfg.ckpt, cfg.reward_model], stage="diagnose", writes=DIAGNOSE_FILES)
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
        {"config": asdict(cfg), "columns": dict(zip(names, cfg.ckpt)), "grid_rows": eval_prompts(cfg)[0][:8],
         "seconds": round(time.time() - t0, 1)}, indent=1))
    print(table)
    print(f"wrote {cfg.out}/diagnostics.json, diagnostics.md, config.json, grid.gif (rows: prompts, columns: "
          f"{', '.join(names)})")


COMMANDS = {"diagnose": diagnose, "advise": advise, "train_rm": train_reward_model, "calibrate": calibrate_judge}

if __name__ == "__main__":
    run_cli(lambda argv: subcommand(COMMANDS, "rewards.py", argv)(argv[1:]), sys.argv[1:])
