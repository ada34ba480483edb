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
import math
from dataclasses import dataclass

import torch

import data
import model as M
from cli import ConfigError

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


# ----------------------------------------------------------------------------- the held-out evaluation set
def world_of(mcfg):
    return data.WorldConfig(frames=mcfg.frames, size=mcfg.size)


@torch.no_grad()
def quick_eval(net, prompts, noise, steps=20, cfg_scale=3.0, world=None):
    """What a stage watches while it trains: the oracle's accuracy per attribute and the heads' means on a
    fixed prompt set and fixed noise (ODE samples). Returns a flat dict of floats."""
    clips = M.sample(net, data.tokenize(prompts).to(noise.device), noise, steps, cfg_scale).cpu()
    obs = oracle(clips, world or world_of(net.cfg))
    out = {k: float(v.mean()) for k, v in reward_heads(clips, prompts, obs=obs).items()}
    out.update({f"acc_{k}": float(v.float().mean()) for k, v in check(clips, prompts, obs=obs).items()})
    return out


@torch.no_grad()
def oracle_verdict(ours_net, input_net, prompts, splits, noise, steps=20, cfg_scale=3.0, world=None):
    """The oracle's verdict on a policy against its input, both sampled from the same noise: the win
    rate (all, held-out combinations, val prompts), each head and attribute accuracy for both, and
    the first 8 clips of each (the input's, then the policy's)."""
    tok = data.tokenize(prompts).to(noise.device)
    ours = M.sample(ours_net, tok, noise, steps, cfg_scale).cpu()
    theirs = M.sample(input_net, tok, noise, steps, cfg_scale).cpu()
    verdict = oracle_win_rate(ours, theirs, prompts, world)
    held = torch.tensor([s == "heldout" for s in splits])
    result = {"win_rate": round(float(verdict.mean()), 4),
              "win_rate_heldout_combos": round(float(verdict[held].mean()), 4),
              "win_rate_val": round(float(verdict[~held].mean()), 4)}
    for name, clips in (("dpo", ours), ("input", theirs)):
        result[name] = {k: round(float(v.mean()), 4) for k, v in reward_heads(clips, prompts, world).items()}
        result[name].update({f"acc_{k}": round(float(v.float().mean()), 4)
                             for k, v in check(clips, prompts, world).items()})
    return result, theirs[:8], ours[:8]


def oracle_preference(clips, prompts, world=None):
    """The oracle's preference as one number per clip: the fraction of prompted attributes it gets right, with the
    heads' mean (x 0.01, in [0, 0.01]) breaking ties between equal counts. (B,)"""
    obs = oracle(clips, world)
    ok = check(clips, prompts, obs=obs)
    heads = torch.stack(list(reward_heads(clips, prompts, obs=obs).values()), 1).mean(1)
    return torch.stack([ok[k].float() for k in data.ATTRIBUTES], 1).mean(1) + 0.01 * heads


def oracle_win_rate(a, b, prompts, world=None):
    """1 where the oracle prefers clip a[i] to b[i] for prompts[i], 0.5 for a tie. (B,)"""
    sa, sb = oracle_preference(a, prompts, world), oracle_preference(b, prompts, world)
    return (sa > sb).float() + 0.5 * (sa == sb).float()


def mean_se(x):
    x = x.float()
    return [round(float(x.mean()), 4), round(float(x.std() / math.sqrt(max(1, len(x) - 1))), 4) if len(x) > 1 else 0.0]


                                # base's, so a fresh clone does not redo it (`make base_diagnosis`; a code edit misses)


def eval_prompts(prompts=16, seeds=1, seed=0):
    """The held-out evaluation prompts: `prompts` val prompts (trained combinations, unseen captions' seeds) and as
    many never-trained combinations, each `seeds` times in a row. Returns (prompts, splits)."""
    val, heldout = data.prompt_set("val", prompts, seed)[0], data.prompt_set("heldout", prompts, seed)[0]
    splits = ["val"] * prompts + ["heldout"] * prompts
    return [p for p in val + heldout for _ in range(seeds)], [s for s in splits for _ in range(seeds)]


def eval_set(policy, prompts=16, seeds=1, seed=0, noise_seed=None):
    """The one held-out evaluation set every stage, bench.py and diagnose sample: eval_prompts and fixed starting
    noise in the policy's flow space (from noise_seed, else seed). Returns (prompts, splits, noise)."""
    prompts, splits = eval_prompts(prompts, seeds, seed)
    return prompts, splits, noise_for(len(prompts), policy, seed if noise_seed is None else noise_seed)


def noise_for(n, net, seed, frames=None):
    """Fixed starting noise in a policy's flow space (n, *net.flow_shape), or a ModelConfig's pixel clip shape;
    `frames` overrides the frame count."""
    c, f, h, w = getattr(net, "flow_shape", None) or (net.channels, net.frames, net.size, net.size)
    return torch.randn(n, c, frames or f, h, w, generator=torch.Generator().manual_seed(seed))


if __name__ == "__main__":   # a library module; a command that once lived here says where it went
    import sys
    print("error: rewards.py takes no command since ebe19f9: `diagnose` and `advise` are `python "
          "diagnose.py [advise]`, `train_rm` and `calibrate` are `python judge.py "
          "train|calibrate`", file=sys.stderr)
    sys.exit(2)
