"""The postflow video world: procedural clips whose every attribute can be checked.

A clip shows one anti-aliased object (shape, colour) gliding in a direction at a speed over a black
background. The world is a torus: an object leaving one edge re-enters at the other, so a clip can be
continued for any length and the direction stays verifiable. Videos are (B, C, F, H, W) in [-1, 1].

Two sources, as in real post-training:
  web      pretraining data: captions that drop or misstate attributes, blur, pixel noise, flicker,
           frame jitter and colour shift at configurable rates
  curated  clean renders with complete, correct captions (Stage I SFT data)
plus `val` (curated quality, training combinations, its own seed stream) and `heldout` (colour, shape,
direction combinations that no training split ever shows). Every batch carries its ground truth, and
the same (split, seed, step) always gives the same batch: nothing is stored on disk.
"""
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from cli import ConfigError, UserError, atomic_write
from stability import seeded

# ----------------------------------------------------------------------------- the world's vocabulary
COLOURS = {  # RGB in [0, 1]; far apart so the oracle can name any object colour
    "red": (0.95, 0.15, 0.15), "green": (0.15, 0.85, 0.25), "blue": (0.2, 0.35, 1.0),
    "yellow": (0.95, 0.9, 0.15), "magenta": (0.9, 0.2, 0.9), "cyan": (0.15, 0.9, 0.95),
}
SHAPES = ["circle", "square", "triangle"]
DIRECTIONS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}  # (x, y), y down
SPEEDS = {"slow": 1.0, "fast": 2.5}  # pixels per frame at 32x32 (scaled with the frame size)
COLOUR_NAMES, DIRECTION_NAMES, SPEED_NAMES = list(COLOURS), list(DIRECTIONS), list(SPEEDS)
ATTRIBUTES = {"colour": COLOUR_NAMES, "shape": SHAPES, "direction": DIRECTION_NAMES, "speed": SPEED_NAMES}
PALETTE = torch.tensor([COLOURS[c] for c in COLOUR_NAMES]) * 2 - 1  # (6, 3) in [-1, 1]
BACKGROUND = -1.0

# A caption reads "a [speed] [colour] shape moving [direction]"; brackets mark words web captions may drop.
VOCAB = ["<pad>", "a", "moving"] + SPEED_NAMES + COLOUR_NAMES + SHAPES + DIRECTION_NAMES
WORD_TO_ID = {w: i for i, w in enumerate(VOCAB)}
MAX_TOKENS = 8

# Held-out (colour, shape, direction) triples: one per colour, spread so that every shape and direction
# is still seen in training with every colour through the other triples.
HELDOUT_COMBOS = {(c, c % 3, (c + 2 * (c // 3)) % 4) for c in range(len(COLOUR_NAMES))}
ALL_COMBOS = [(c, s, d) for c in range(len(COLOUR_NAMES)) for s in range(len(SHAPES)) for d in range(len(DIRECTIONS))]
TRAIN_COMBOS = [x for x in ALL_COMBOS if x not in HELDOUT_COMBOS]
SPLITS = {"web": 0, "curated": 1, "val": 2, "heldout": 3}


class PromptError(UserError, ValueError):
    """A prompt the world cannot read (empty list, unknown word)."""


@dataclass
class WorldConfig:
    frames: int = 8     # frames per clip
    size: int = 32      # frame height = width, pixels
    radius: float = 5.0 # object radius at size 32 (scaled with size)


@dataclass
class Defects:
    """Per-sample rates of the web source's defects (all 0 = curated)."""
    caption_drop: float = 0.3   # drop one or more of the speed / colour / direction words
    caption_wrong: float = 0.1  # misstate one attribute word
    blur: float = 0.2           # 3x3 spatial blur
    noise: float = 0.2          # additive pixel noise, std 0.15
    flicker: float = 0.15       # per-frame brightness change up to +-30 %
    jitter: float = 0.15        # per-frame position jitter, std 1.5 px
    colour_shift: float = 0.15  # object colour pushed off the palette

    @staticmethod
    def none():
        return Defects(**{k: 0.0 for k in Defects.__dataclass_fields__})

    def scaled(self, s):
        return Defects(**{k: min(1.0, getattr(self, k) * s) for k in Defects.__dataclass_fields__})


@dataclass
class Batch:
    videos: torch.Tensor    # (B, C, F, H, W) in [-1, 1]
    prompts: list           # B captions (web captions may be wrong: attrs are the truth)
    tokens: torch.Tensor    # (B, MAX_TOKENS)
    attrs: dict             # name -> (B,) long: the true colour, shape, direction, speed indices
    centers: torch.Tensor   # (B, F, 2) object centre (x, y) in pixels, on the torus
    defects: dict = field(default_factory=dict)  # defect name -> (B,) bool: which samples carry it


# ----------------------------------------------------------------------------- tokenizer
def tokenize(prompts):
    """Word-level ids over the fixed vocabulary, padded to MAX_TOKENS. (B, MAX_TOKENS) long."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if len(prompts) == 0:
        raise PromptError("empty prompt list: give at least one prompt")
    out = torch.zeros(len(prompts), MAX_TOKENS, dtype=torch.long)
    for i, p in enumerate(prompts):
        words = p.lower().split()
        if not words:
            raise PromptError(f"prompt {i} is empty")
        if len(words) > MAX_TOKENS:
            raise PromptError(f"prompt {p!r} has {len(words)} words; at most {MAX_TOKENS}")
        for j, w in enumerate(words):
            if w not in WORD_TO_ID or w == "<pad>":
                raise PromptError(f"unknown word {w!r} in prompt {p!r}; the world knows: {' '.join(VOCAB[1:])}")
            out[i, j] = WORD_TO_ID[w]
    return out


def parse_prompt(prompt):
    """The attributes a prompt asks for: name -> index, -1 where the prompt does not say."""
    tokenize([prompt])  # same errors as the tokenizer
    words = prompt.lower().split()
    return {name: next((values.index(w) for w in words if w in values), -1) for name, values in ATTRIBUTES.items()}


def caption(colour, shape, direction, speed):
    return f"a {SPEED_NAMES[speed]} {COLOUR_NAMES[colour]} {SHAPES[shape]} moving {DIRECTION_NAMES[direction]}"


# ----------------------------------------------------------------------------- rendering
def shape_sdf(shape, dx, dy, r):
    """Signed distance (pixels, negative inside) of each shape, centred at the origin. shape: (B,) long."""
    circle = torch.sqrt(dx ** 2 + dy ** 2) - r
    square = torch.maximum(dx.abs(), dy.abs()) - 0.85 * r      # same visual area as the circle
    tri_in = 0.62 * r                                            # inradius of an upward equilateral triangle
    triangle = torch.maximum(dy, torch.maximum(0.866 * dx - 0.5 * dy, -0.866 * dx - 0.5 * dy)) - tri_in
    triangle = torch.maximum(triangle, dy - tri_in)              # flat bottom edge (y points down)
    s = shape.view(-1, *([1] * (dx.dim() - 1)))
    return torch.where(s == 0, circle, torch.where(s == 1, square, triangle))


def render(attrs, world, gen, start=None, jitter=None, colour_rgb=None):
    """Draw clips on the torus. Returns videos (B, 3, F, H, W) and centres (B, F, 2).

    start: (B, 2) first-frame centres (uniform if None); jitter: (B, F, 2) per-frame offsets;
    colour_rgb: (B, 3) object colours in [-1, 1] (the palette colour if None)."""
    B, Fr, S = attrs["colour"].shape[0], world.frames, world.size
    scale = S / 32
    if start is None:
        start = torch.rand(B, 2, generator=gen) * S
    dirs = torch.tensor([DIRECTIONS[d] for d in DIRECTION_NAMES])[attrs["direction"]]   # (B, 2)
    speed = torch.tensor([SPEEDS[s] for s in SPEED_NAMES])[attrs["speed"]] * scale     # (B,)
    steps = torch.arange(Fr, dtype=torch.float32)
    centers = start[:, None] + steps[None, :, None] * (speed[:, None, None] * dirs[:, None])  # (B, F, 2)
    drawn = centers + (jitter if jitter is not None else 0)
    pix = torch.arange(S, dtype=torch.float32) + 0.5
    # Shortest displacement on the torus, so an object straddling an edge is drawn on both sides.
    dx = (pix[None, None, None, :] - drawn[..., 0, None, None] + S / 2) % S - S / 2   # (B, F, 1, W)
    dy = (pix[None, None, :, None] - drawn[..., 1, None, None] + S / 2) % S - S / 2   # (B, F, H, 1)
    dx, dy = dx.expand(B, Fr, S, S), dy.expand(B, Fr, S, S)
    alpha = (0.5 - shape_sdf(attrs["shape"], dx, dy, world.radius * scale)).clamp(0, 1)  # (B, F, H, W)
    rgb = PALETTE[attrs["colour"]] if colour_rgb is None else colour_rgb              # (B, 3)
    videos = BACKGROUND + alpha[:, None] * (rgb[:, :, None, None, None] - BACKGROUND)
    return videos, centers % S


def sample_attributes(n, gen, split):
    combos = torch.tensor(sorted(HELDOUT_COMBOS) if split == "heldout" else TRAIN_COMBOS)
    pick = combos[torch.randint(len(combos), (n,), generator=gen)]
    speed = torch.randint(len(SPEED_NAMES), (n,), generator=gen)
    return {"colour": pick[:, 0], "shape": pick[:, 1], "direction": pick[:, 2], "speed": speed}


def web_caption(a, gen, defects):
    """A caption as scraped from the web: sometimes incomplete, sometimes wrong."""
    words = {k: int(a[k]) for k in ATTRIBUTES}
    if torch.rand(1, generator=gen).item() < defects.caption_wrong:
        name = ["colour", "direction", "speed", "shape"][int(torch.randint(4, (1,), generator=gen))]
        k = len(ATTRIBUTES[name])
        words[name] = (words[name] + 1 + int(torch.randint(k - 1, (1,), generator=gen))) % k
    text = caption(words["colour"], words["shape"], words["direction"], words["speed"]).split()
    if torch.rand(1, generator=gen).item() < defects.caption_drop:
        # word positions: a(0) speed(1) colour(2) shape(3) moving(4) direction(5)
        groups = [g for g in ({1}, {2}, {4, 5}) if torch.rand(1, generator=gen).item() < 0.5] or [{1}]
        drop = set().union(*groups)
        text = [w for i, w in enumerate(text) if i not in drop]
    return " ".join(text)


def blur3(videos):
    B, C, Fr, H, W = videos.shape
    x = videos.permute(0, 2, 1, 3, 4).reshape(B * Fr, C, H, W)
    k = torch.tensor([1.0, 2.0, 1.0])
    k = (k[:, None] * k[None, :] / 16).expand(C, 1, 3, 3)
    x = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="circular"), k, groups=C)
    return x.view(B, Fr, C, H, W).permute(0, 2, 1, 3, 4)


def make_batch(split, n, seed=0, step=0, world=None, defects=None):
    """n clips of a split. The same (split, seed, step) always gives the same clips.

    defects: a Defects for the web split (default rates if None); other splits are clean unless given."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {list(SPLITS)}")
    world = world or WorldConfig()
    if defects is None:
        defects = Defects() if split == "web" else Defects.none()
    gen = seeded(seed, SPLITS[split] * 7919 + step)
    attrs = sample_attributes(n, gen, split)
    has = {k: torch.rand(n, generator=gen) < getattr(defects, k) for k in Defects.__dataclass_fields__}
    jitter = torch.randn(n, world.frames, 2, generator=gen) * 1.5 * (world.size / 32) * has["jitter"][:, None, None]
    shift = (torch.rand(n, 3, generator=gen) * 0.8 - 0.4) * has["colour_shift"][:, None]
    videos, centers = render(attrs, world, gen, jitter=jitter, colour_rgb=PALETTE[attrs["colour"]] + shift)
    videos = torch.where(has["blur"][:, None, None, None, None], blur3(videos), videos)
    flick = 1 + (torch.rand(n, 1, world.frames, 1, 1, generator=gen) * 0.6 - 0.3) * has["flicker"][:, None, None, None, None]
    videos = (videos + 1) * flick - 1
    videos = videos + torch.randn(videos.shape, generator=gen) * 0.15 * has["noise"][:, None, None, None, None]
    prompts = [web_caption({k: v[i] for k, v in attrs.items()}, gen, defects) if split == "web" else
               caption(*(int(attrs[k][i]) for k in ATTRIBUTES)) for i in range(n)]
    return Batch(videos.clamp(-1, 1), prompts, tokenize(prompts), attrs, centers, has)


def train_prompts():
    """Every complete caption of a training combination (what Stages II and III roll out), sorted."""
    return sorted(caption(c, s, d, sp) for c, s, d in TRAIN_COMBOS for sp in range(len(SPEED_NAMES)))


def prompt_set(split, n, seed=0):
    """n (prompt, attrs) pairs for evaluation: complete, correct captions of a split's combinations."""
    b = make_batch("heldout" if split == "heldout" else "val", n, seed=seed, step=10_000)
    return b.prompts, b.attrs


# ----------------------------------------------------------------------------- video files
def to_uint8(videos):
    """(B, C, F, H, W) in [-1, 1] -> (B, F, H, W, C) uint8 numpy."""
    return ((videos.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 4, 1).cpu().numpy()


def video_grid(videos, rows, cols, pad=2, upscale=2):
    """Tile B = rows * cols clips into one clip: (F, H', W', C) uint8."""
    v = to_uint8(videos).repeat(upscale, axis=2).repeat(upscale, axis=3)  # (B, F, H, W, C)
    B, Fr, H, W, C = v.shape
    grid = np.full((Fr, rows * (H + pad) + pad, cols * (W + pad) + pad, C), 255, np.uint8)
    for i in range(min(B, rows * cols)):
        r, c = divmod(i, cols)
        grid[:, pad + r * (H + pad): pad + r * (H + pad) + H, pad + c * (W + pad): pad + c * (W + pad) + W] = v[i]
    return grid


def write_bytes(path, blob):
    with open(path, "wb") as f:
        f.write(blob)


def write_video(frames, path, fps=6):
    """Write (F, H, W, C) uint8 frames as .gif (always) or .mp4 (needs an ffmpeg plugin for imageio), atomically."""
    import imageio.v3 as iio
    path = str(path)
    if path.endswith(".gif"):
        gif = iio.imwrite("<bytes>", list(frames), extension=".gif", duration=int(1000 / fps), loop=0)
        atomic_write(path, lambda tmp: write_bytes(tmp, gif))       # encoded in memory: a failed write is one error
    elif path.endswith(".mp4"):
        try:
            atomic_write(path, lambda tmp: iio.imwrite(tmp, frames, extension=".mp4", fps=fps, codec="libx264"))
        except Exception as e:  # imageio without imageio-ffmpeg / pyav cannot encode mp4
            raise ConfigError(f"cannot write {path}: MP4 needs imageio-ffmpeg (pip install imageio-ffmpeg); "
                               f"or write a .gif ({type(e).__name__})") from None
    else:
        raise ConfigError(f"unknown video extension for {path}: use .gif or .mp4")


if __name__ == "__main__":   # a library module; a command that once lived here says where it went
    import sys
    print("error: data.py takes no command: it is the world the stages import (run sft.py, "
          "reward_rl.py or preference.py)", file=sys.stderr)
    sys.exit(2)
