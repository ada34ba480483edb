"""A small video DiT for rectified flow, its losses and its samplers (checkpoint.py stores it).

Flow convention, used everywhere in postflow:
    x_t = (1 - t) * x0 + t * x1,   x0 ~ N(0, I) noise,  x1 data,  target velocity v = x1 - x0,
    sampling integrates t from 0 (noise) to 1 (data).
The network predicts the clean clip x1 and the velocity is derived, v = (x1_hat - x_t) / (1 - t):
in pixel space a velocity-predicting net must emit per-patch noise it cannot represent and leaves
speckles (Li & He 2025, "Back to Basics"). The loss is still taken on v, so the sampler and Stage
II's SDE see an ordinary flow model. Patches are 8x8 at 32x32, one token covering a whole object
(4x4 patches drew objects as scattered blocks). Attention is joint over space and time (8 frames x
16 tokens = 128 tokens in the small preset); positions are rotary angles in whole turns around the
frame, so a query-key score depends only on the offset on the world's torus, which is what motion
needs (factorised attention with additive positions never learned the direction words:
docs/results.md, Where fidelity was lost).

The policy interface: what a stage needs from a model, so a fork can plug in its own (adapters.py
wraps diffusers' Wan) without touching the loops:
    policy.cfg           frames, size, channels: the pixel clip (B, C, F, H, W) it makes
    policy.flow_shape    (C, F, H, W) of the flow's state per clip (the clip here; a VAE's latents)
    policy.encode(clips) clips in [-1, 1] into the flow's space (data, DPO pairs); the identity here
    policy.decode(x)     back to pixels in [-1, 1] for rewards and files; a clamp here
    policy.velocity(x_t, t, tokens, ctx=None, ctx_mask=None, drop=None) -> v like x_t: t (B,) in
                         [0, 1], tokens (B, L) from data.tokenize, ctx (like x_t) and ctx_mask
                         (B, F) pin clean context frames, drop (B,) bool = unconditional
    policy(x_t, t, ...)  the same inputs -> the clean clip (flow_loss turns it into a velocity)
    policy.reference()   the frozen KL anchor: a copy here; a LoRA policy turns its adapter off
    policy.sampler       its rollouts' stochastic step in ROLLOUT_STEPS (PPO needs 'flow-grpo')
    policy.flow_shift    every sampler's grid is time_grid(steps, flow_shift): 1.0 here
    policy.cfg_until     guidance stops at this t (CFG_UNTIL here; 1.0 = never)
    policy.state_dict()  weights, saved with config and lineage by checkpoint.py; a model_config
                         naming a `policy` is built by the module checkpoint.POLICIES names
Everything else (guidance, the Euler and SDE samplers, the losses) is written once here on top of
velocity().
"""
import copy
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import data
from cli import ConfigError, check_fits
from stability import seeded


# ----------------------------------------------------------------------------- configuration
# The defaults are the `small` preset, the 2-core CPU default (sft.py logs its parameter count).
@dataclass
class ModelConfig:
    frames: int = 8        # frames per clip
    size: int = 32         # frame height = width
    channels: int = 3      # RGB
    patch: int = 8         # spatial patch edge: one token covers an object
    tpatch: int = 1        # frames per patch
    dim: int = 192         # token width
    depth: int = 6         # transformer blocks
    heads: int = 6         # attention heads
    mlp_ratio: float = 4.0 # MLP hidden = mlp_ratio * dim
    vocab: int = len(data.VOCAB)
    max_tokens: int = data.MAX_TOKENS
    t_eps: float = 0.05    # floor on (1 - t) when turning x1_hat into a velocity


PRESETS = {
    # tests: seconds
    "tiny": dict(dim=32, depth=2, heads=2, mlp_ratio=2.0, frames=4, size=16, patch=4),
    # the 2-core CPU default
    "small": dict(),
    # one GPU
    "base": dict(dim=384, depth=12, frames=16, size=64, patch=4),
}


def preset(name, **overrides):
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; choose from {', '.join(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})


# ----------------------------------------------------------------------------- the network
def modulate(x, shift, scale):
    return x * (1 + scale) + shift


def timestep_embedding(t, dim, max_period=10000.0):
    half = dim // 2
    freqs = torch.exp(-math.log(max_period)
                      * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * 1000 * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def sincos_1d(n, dim):
    pos = torch.arange(n, dtype=torch.float32)[:, None]
    freqs = torch.exp(-math.log(10000.0) * torch.arange(dim // 2, dtype=torch.float32) / (dim // 2))
    return torch.cat([torch.sin(pos * freqs), torch.cos(pos * freqs)], dim=-1)  # (n, dim)


def rotary_angles(grid, head_dim):
    """Rotary angles (L, head_dim / 2) for the (T, h, w) token grid: a quarter of the pairs rotate
    with the frame index, the rest with the row and the column. Spatial frequencies are whole turns
    around the frame, so a query-key score depends only on their offset the short way round the
    torus, the world's own geometry: "the previous frame, one patch to the left" is the same
    question everywhere."""
    T, h, w = grid
    n_t = head_dim // 8
    n_s = (head_dim // 2 - n_t) // 2
    f, y, x = torch.meshgrid(torch.arange(T), torch.arange(h), torch.arange(w), indexing="ij")
    # slowest: one radian per clip
    freq_t = 1.0 / (T ** (torch.arange(n_t) / n_t))
    turns = lambda n, size: 2 * math.pi * (1 + torch.arange(n) % max(1, size // 2)) / size
    ang = torch.cat([f.reshape(-1, 1) * freq_t, y.reshape(-1, 1) * turns(n_s, h),
                     x.reshape(-1, 1) * turns(head_dim // 2 - n_t - n_s, w)], dim=1)
    return ang  # (L, head_dim / 2)


def rotate(x, cos, sin):  # x (N, heads, L, hd); rotate consecutive pairs by the token's angles
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, rope=None):  # x (N, L, D); rope: (cos, sin), each (L, head_dim / 2)
        N, L, D = x.shape
        q, k, v = self.qkv(x).view(N, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        if rope is not None:
            q, k = rotate(q, *rope), rotate(k, *rope)
        y = F.scaled_dot_product_attention(q, k, v)  # (N, heads, L, D/heads)
        return self.proj(y.transpose(1, 2).reshape(N, L, D))


class Block(nn.Module):
    """Joint space-time attention, then an MLP; each pre-normed and adaLN-modulated by the
    condition."""

    def __init__(self, dim, heads, mlp_ratio):
        super().__init__()
        self.norms = nn.ModuleList([nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
                                    for _ in range(2)])
        self.joint_attn = Attention(dim, heads)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    # x (B, T, S, D), c (B, D); rope: (cos, sin), each (T * S, head_dim / 2)
    def forward(self, x, c, rope):
        B, T, S, D = x.shape
        # each (B, 1, 1, D)
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = (
            self.ada(c)[:, None, None].chunk(6, dim=-1))
        h = modulate(self.norms[0](x), shift_a, scale_a).reshape(B, T * S, D)
        x = x + gate_a * self.joint_attn(h, rope).view(B, T, S, D)
        return x + gate_m * self.mlp(modulate(self.norms[1](x), shift_m, scale_m))


class VideoDiT(nn.Module):
    """Predicts the clean clip from a noisy one, the caption and optional context frames.

    Context frames (image-to-video, or the last frames of a previous clip for continuation) enter as
    extra input channels: the clean context where given, and a mask channel saying which frames it
    covers."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        c, p, tp, D = cfg.channels, cfg.patch, cfg.tpatch, cfg.dim
        assert cfg.size % p == 0 and cfg.frames % tp == 0 and D % (2 * cfg.heads) == 0
        self.grid = (cfg.frames // tp, cfg.size // p, cfg.size // p)  # (T, h, w) tokens
        self.patch_embed = nn.Conv3d(2 * c + 1, D, kernel_size=(tp, p, p), stride=(tp, p, p))
        T, h, w = self.grid
        pos_hw = torch.cat([sincos_1d(h, D // 2)[:, None].expand(h, w, D // 2),
                            sincos_1d(w, D // 2)[None].expand(h, w, D // 2)],
                           dim=-1).reshape(h * w, D)
        self.register_buffer("pos_space", pos_hw, persistent=False)    # (S, D)
        self.register_buffer("pos_time", sincos_1d(T, D), persistent=False)  # (T, D)
        self.t_embed = nn.Sequential(nn.Linear(D, D), nn.SiLU(), nn.Linear(D, D))
        # pads are masked out of the pooling
        self.word_embed = nn.Embedding(cfg.vocab, D, padding_idx=0)
        # the dropped condition of classifier-free guidance
        self.null_text = nn.Parameter(torch.zeros(D))
        self.text_mlp = nn.Sequential(nn.Linear(D, D), nn.SiLU(), nn.Linear(D, D))
        self.blocks = nn.ModuleList([Block(D, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth)])
        ang = rotary_angles(self.grid, D // cfg.heads)
        self.register_buffer("rope_cos", ang.cos(), persistent=False)         # (L, head_dim / 2)
        self.register_buffer("rope_sin", ang.sin(), persistent=False)
        self.final_norm = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(D, 2 * D))
        self.final = nn.Linear(D, tp * p * p * c)
        self.initialize()

    def initialize(self):
        """Xavier everywhere, then adaLN-Zero: every block starts as the identity and the output as
        0."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        # Unit-scale words: the pooled caption then moves the condition as much as the timestep
        # embedding does. At std 0.02 it was 50x smaller, and after 500 pretraining steps colour was
        # still at chance.
        nn.init.normal_(self.word_embed.weight, std=1.0)
        for blk in self.blocks:
            nn.init.zeros_(blk.ada[-1].weight)
            nn.init.zeros_(blk.ada[-1].bias)
        for lin in (self.final_ada[-1], self.final):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def text(self, tokens, drop=None):
        """Pooled caption embedding (B, D). drop: (B,) bool, True = unconditional."""
        mask = (tokens != 0).float()[..., None]                             # (B, L, 1)
        pooled = (self.word_embed(tokens) * mask).sum(1) / mask.sum(1).clamp(min=1)
        if drop is not None:
            pooled = torch.where(drop[:, None], self.null_text.expand_as(pooled), pooled)
        return self.text_mlp(pooled)

    def forward(self, x, t, tokens, ctx=None, ctx_mask=None, drop=None):
        """x (B, C, F, H, W) noisy clip, t (B,), tokens (B, L); ctx like x, ctx_mask (B, F) bool.
        Returns x1_hat, the predicted clean clip (B, C, F, H, W)."""
        B, C, Fr, H, W = x.shape
        if ctx is None:
            ctx = torch.zeros_like(x)
            ctx_mask = torch.zeros(B, Fr, dtype=torch.bool, device=x.device)
        m = ctx_mask.to(x.dtype)[:, None, :, None, None]                     # (B, 1, F, 1, 1)
        inp = torch.cat([x, ctx * m, m.expand(B, 1, Fr, H, W)], dim=1)       # (B, 2C+1, F, H, W)
        T, h, w = self.grid
        tok = self.patch_embed(inp).flatten(3).permute(0, 2, 3, 1)           # (B, T, S, D)
        tok = tok + self.pos_space[None, None] + self.pos_time[None, :, None]
        c = self.t_embed(timestep_embedding(t, self.cfg.dim)) + self.text(tokens, drop)  # (B, D)
        rope = (self.rope_cos, self.rope_sin)
        for blk in self.blocks:
            tok = blk(tok, c, rope)
        shift, scale = self.final_ada(c)[:, None, None].chunk(2, dim=-1)
        out = self.final(modulate(self.final_norm(tok), shift, scale))       # (B, T, S, tp*p*p*C)
        p, tp = self.cfg.patch, self.cfg.tpatch
        out = out.view(B, T, h, w, tp, p, p, C).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return out.reshape(B, C, Fr, H, W)

    def velocity(self, x, t, tokens, **kw):
        """The flow the samplers integrate. (B, C, F, H, W)"""
        return to_velocity(self(x, t, tokens, **kw), x, t, self.cfg.t_eps)

    # The rest of the policy interface: the flow runs on pixels, so data needs no encoding and a
    # sample only a clamp.
    sampler = "flow-grpo"
    # equal steps: the grid its checkpoints and the results log's figures were made on
    flow_shift = 1.0

    @property
    def cfg_until(self):
        return CFG_UNTIL

    @property
    def flow_shape(self):
        return (self.cfg.channels, self.cfg.frames, self.cfg.size, self.cfg.size)

    def encode(self, clips):
        return clips

    def decode(self, x):
        return x.clamp(-1, 1)

    def reference(self):
        return frozen_copy(self)

    def shard_units(self):
        """What FSDP2 shards as one piece (distributed.shard): each block, then the rest; the
        outermost last."""
        return [*self.blocks, self]


def frozen_copy(policy):
    """A frozen copy of a policy's weights as they are now (the KL reference, the AWM sampler)."""
    return copy.deepcopy(policy).eval().requires_grad_(False)


def to_velocity(x1_hat, x, t, t_eps):
    """v = (x1_hat - x_t) / (1 - t), with 1 - t floored at t_eps."""
    return (x1_hat - x) / (1 - t).clamp(min=t_eps)[:, None, None, None, None]


# ----------------------------------------------------------------------------- flow matching
def sample_t(n, gen, mean=-0.4, std=1.0, device="cpu"):
    """Logit-normal training times: t = sigmoid(N(mean, std)); a negative mean leans toward
    noise."""
    return torch.sigmoid(torch.randn(n, generator=gen) * std + mean).to(device)


def context_mask(n, frames, prob, gen):
    """Which frames are given as clean context: none, the first frame (image-to-video), or the first
    half (continuing a previous clip). (n, frames) bool.

    Context is also what teaches the motion words. Without it, where the object starts is uncertain
    until late in denoising and a direction word barely changes the best prediction; given the first
    frame, the direction and speed words fix the rest of the clip, so swapping "left" for "right"
    changes the best prediction (it raised the denoising error far more once models trained with
    context)."""
    kind = torch.randint(2, (n,), generator=gen)
    used = torch.rand(n, generator=gen) < prob
    k = torch.where(kind == 0, torch.ones_like(kind), torch.full_like(kind, frames // 2)) * used
    return torch.arange(frames)[None] < k[:, None]


def msq_free_frames(a, b, ctx_mask=None):
    """Mean squared difference per clip (B,) over the frames not given as clean context (every frame
    without a mask), so a clip's error does not shrink with the share of its frames that are
    context."""
    err = (a - b) ** 2                                                        # (B, C, F, H, W)
    if ctx_mask is None:
        return err.mean(dim=(1, 2, 3, 4))
    keep = (~ctx_mask).to(err.dtype)[:, None, :, None, None]
    return ((err * keep).sum(dim=(1, 2, 3, 4))
            / (keep.sum(dim=(1, 2, 3, 4)) * err[0, :, 0].numel()).clamp(min=1))


def straight_path_velocity(model, x1, x0, t, tokens, ctx=None, ctx_mask=None, drop=None):
    """The model's velocity at x_t = (1 - t) x0 + t x1 on the straight path from noise x0 to clip
    x1."""
    tt = t[:, None, None, None, None]
    return model.velocity((1 - tt) * x0 + tt * x1, t, tokens, ctx=ctx, ctx_mask=ctx_mask, drop=drop)


def flow_error(model, x1, x0, t, tokens, ctx=None, ctx_mask=None, drop=None):
    """The flow-matching error per clip (B,): |v(x_t) - (x1 - x0)|^2 over the free frames. SFT's
    loss, the curated term, AWM's advantage-weighted loss and DPO's implicit reward are all this one
    error."""
    return msq_free_frames(straight_path_velocity(model, x1, x0, t, tokens, ctx, ctx_mask, drop),
                           x1 - x0, ctx_mask)


def flow_loss(model, x1, tokens, gen, cond_drop=0.1, ctx_mask=None, t_mean=-0.4, t_std=1.0,
              rows=slice(None)):
    """Rectified-flow loss per sample at logit-normal t, and that t, for `rows` of the batch x1
    (B, ...) (all of it by default). Context frames are given clean and left out of the loss. gen: a
    CPU torch.Generator, so runs are reproducible on any device; its draws are made for the whole
    batch, so ranks that each take their rows of it train as one process on all of them does."""
    B, dev = x1.shape[0], x1.device
    t = sample_t(B, gen, t_mean, t_std)[rows].to(dev)
    x0 = torch.randn(B, *model.flow_shape, generator=gen)[rows].to(dev)
    drop = (torch.rand(B, generator=gen) < cond_drop)[rows].to(dev)
    # clips in [-1, 1] -> the flow's space; ctx_mask is over its frames
    x1 = model.encode(x1[rows])
    tokens = tokens[rows]
    ctx_mask = None if ctx_mask is None else ctx_mask[rows]
    return (flow_error(model, x1, x0, t, tokens, x1 if ctx_mask is not None else None, ctx_mask,
                       drop),
            t)


def curated_loss(net, n, seed, step, world, device):
    """The flow loss (B,) on a fresh batch of n curated clips: the anchor Stage II and III add to
    their own objective (PPO-ptx), so a reward or a preference cannot buy its gain with fidelity.
    The batch, t, noise and context follow from (seed, step) alone: every rank fits the same clips,
    and a resume the same ones."""
    g = seeded(seed, step)
    b = data.make_batch("curated", n, seed=seed + 1, step=step, world=world)
    ctx_mask = context_mask(n, net.flow_shape[1], 0.5, g).to(device)
    return flow_loss(net, b.videos.to(device), b.tokens.to(device), g, 0.1, ctx_mask)[0]


@torch.no_grad()
def velocity_norm_ratio(policy, reference, clips, tokens, gen, ctx=None, ctx_mask=None):
    """|v| / |v_ref| on clips at t = 0.5 with noise from gen: how far a policy's velocity norm has
    moved from its reference's (NormGuard's signal: some update rules inflate it)."""
    t = torch.full((len(clips),), 0.5, device=clips.device)
    x0 = torch.randn(clips.shape, generator=gen).to(clips.device)
    v = straight_path_velocity(policy, clips, x0, t, tokens, ctx, ctx_mask).float()
    v_ref = straight_path_velocity(reference, clips, x0, t, tokens, ctx, ctx_mask).float()
    return float(v.norm() / v_ref.norm().clamp(min=1e-12))


# Guidance in a limited interval (Kynkaanniemi et al. 2024): classifier-free guidance decides what a
# clip shows while t is small; applied near the data it pushes the predicted clean clip past the
# data, which shows as speckle inside the object, a halo on the background and off-palette colour
# (the fidelity head's three parts). Stopping it at t = 0.6 raised fidelity at equal attribute
# accuracy (docs/results.md, Where fidelity was lost).
CFG_UNTIL = 0.6


def guided_velocity(model, x, t, tokens, cfg_scale, ctx=None, ctx_mask=None, cfg_until=None):
    """Classifier-free guidance: v_u + w (v_c - v_u), both halves in one batch, while t < cfg_until
    (default model.cfg_until; 1.0 guides every step); the conditional velocity alone after that."""
    tvec = torch.full((x.shape[0],), float(t), device=x.device)
    if cfg_scale == 1.0 or t >= (model.cfg_until if cfg_until is None else cfg_until):
        return model.velocity(x, tvec, tokens, ctx=ctx, ctx_mask=ctx_mask)
    two = lambda a: None if a is None else torch.cat([a, a])
    drop = torch.cat([torch.zeros(x.shape[0], dtype=torch.bool),
                      torch.ones(x.shape[0], dtype=torch.bool)]).to(x.device)
    v = model.velocity(two(x), two(tvec), two(tokens), ctx=two(ctx), ctx_mask=two(ctx_mask),
                       drop=drop)
    v_c, v_u = v.chunk(2)
    return v_u + cfg_scale * (v_c - v_u)


def time_grid(steps, shift=1.0):
    """t from 0 to 1: equal steps in sigma = 1 - t, each sigma then taken to
    shift sigma / (1 + (shift - 1) sigma), as diffusers' FlowMatchEulerDiscreteScheduler(shift=...)
    does. A shift > 1 spends more steps near the noise, where a model trained on shifted times (Wan)
    expects them."""
    grid = torch.linspace(0, 1, steps + 1)
    # the equal grid itself, bit for bit: the DiT's samples do not move
    if shift == 1.0:
        return grid
    sigma = 1 - grid
    return 1 - shift * sigma / (1 + (shift - 1) * sigma)


@torch.no_grad()
def sample(model, tokens, noise, steps=20, cfg_scale=3.0, ctx=None, ctx_mask=None, cfg_until=None):
    """Euler ODE from noise (t=0) to data (t=1). noise: (B, C, F, H, W). Context frames are
    pinned."""
    x = noise
    grid = time_grid(steps, model.flow_shift)
    for i in range(steps):
        t, t_next = float(grid[i]), float(grid[i + 1])
        x = x + (t_next - t) * guided_velocity(model, x, t, tokens, cfg_scale, ctx, ctx_mask,
                                               cfg_until)
    if ctx is not None:
        x = torch.where(ctx_mask[:, None, :, None, None], ctx, x)
    return model.decode(x)


@torch.no_grad()
def sample_long(model, tokens, gen, chunks, steps=20, cfg_scale=3.0, overlap=None, cfg_until=None):
    """A clip of several chunks: each new chunk takes the previous chunk's last `overlap` frames as
    context and adds F - overlap frames. Returns (B, C, F + (chunks - 1) * (F - overlap), H, W)."""
    c = model.cfg
    # pixel frames do not map one to one onto latents
    if model.flow_shape != (c.channels, c.frames, c.size, c.size):
        raise ConfigError("continuing a clip (--chunks > 1, long-clip diagnostics) needs a policy "
                          "whose flow runs on pixels; this one runs on a VAE's latents")
    overlap = c.frames // 2 if overlap is None else overlap
    dev = tokens.device
    shape = (len(tokens), c.channels, c.frames, c.size, c.size)
    clip = sample(model, tokens, torch.randn(shape, generator=gen).to(dev), steps, cfg_scale,
                  cfg_until=cfg_until)
    mask = (torch.arange(c.frames) < overlap)[None].expand(len(tokens), -1).to(dev)
    for _ in range(chunks - 1):
        ctx = torch.zeros(shape, device=dev)
        ctx[:, :, :overlap] = clip[:, :, -overlap:]
        nxt = sample(model, tokens, torch.randn(shape, generator=gen).to(dev), steps, cfg_scale,
                     ctx, mask, cfg_until=cfg_until)
        clip = torch.cat([clip, nxt[:, :, overlap:]], dim=2)
    return clip


@torch.no_grad()
def continuation_context(model, tokens, gen, chunks, steps=20, cfg_scale=3.0):
    """What the last chunk of a `chunks`-chunk clip is sampled against: the earlier chunks (by the
    ODE), their last F // 2 frames as clean context (B, C, F, H, W), and its mask (B, F). One chunk:
    nothing (None, None, None)."""
    if chunks == 1:
        return None, None, None
    c = model.cfg
    overlap = model.cfg.frames // 2
    prefix = sample_long(model, tokens, gen, chunks - 1, steps, cfg_scale, overlap)
    mask = (torch.arange(c.frames) < overlap)[None].expand(len(tokens), -1).to(tokens.device)
    ctx = torch.zeros(len(tokens), c.channels, c.frames, c.size, c.size, device=tokens.device)
    ctx[:, :, :overlap] = prefix[:, :, -overlap:]
    return prefix, ctx, mask


def join_continuation(prefix, ctx, ctx_mask, chunk):
    """The sampled chunk with its context frames pinned, and the whole clip (prefix + its new
    frames); without a prefix both are the chunk."""
    if prefix is None:
        return chunk, chunk
    chunk = torch.where(ctx_mask[:, None, :, None, None], ctx, chunk)
    return chunk, torch.cat([prefix, chunk[:, :, ctx.shape[2] // 2:]], dim=2)


@torch.no_grad()
def sample_with_sde_window(model, x, tokens, steps, sde, eps, cfg_scale=3.0, noise_level=0.7,
                           ctx=None, ctx_mask=None):
    """Euler ODE from noise, except the steps listed in `sde`, which take the SDE step with the
    fresh noise eps[k] (Flow-GRPO-Fast's window). Returns the final x (unclamped) and, per SDE step,
    (step index, x before, x after, fp32 log-prob (B,)): what a policy-gradient update scores
    again."""
    grid = time_grid(steps, model.flow_shift)
    taken = []
    step = ROLLOUT_STEPS[model.sampler]
    for i in range(steps):
        t, t_next = float(grid[i]), float(grid[i + 1])
        v = guided_velocity(model, x, t, tokens, cfg_scale, ctx, ctx_mask)
        if i in sde:
            x_next, _, _, logp = step(x, v, t, t_next, float(grid[1]), noise_level,
                                      eps=eps[sde.index(i)])
            taken.append((i, x, x_next, logp))
            x = x_next
        else:
            x = x + (t_next - t) * v
    return x, taken


def sde_step(x, v, t, t_next, t_first, noise_level=0.7, eps=None, x_next=None):
    """One step of the SDE with the same marginals as the flow ODE (Flow-GRPO), as a Gaussian
    policy.

    Written in sigma = 1 - t (sigma = 1 is noise); v is the t-convention velocity (= minus
    Flow-GRPO's). t_first: the grid's second time, used where sigma = 1 would divide by zero.
    Returns x_next, its mean, the std of the step's noise (std * sqrt(-dsigma)), and the
    log-probability of x_next in fp32, averaged over the non-batch dimensions (a mean, not a sum:
    clip ranges and beta scale with it). Pass x_next to score a stored transition instead of
    drawing a new one."""
    x, v = x.float(), v.float()
    sigma = 1.0 - t
    # dsigma = sigma_next - sigma < 0
    dsigma = t - t_next
    std = noise_level * math.sqrt(sigma / max(1.0 - sigma, t_first))
    mean = (x * (1 + std ** 2 * dsigma / (2 * sigma))
            - v * (1 + std ** 2 * (1 - sigma) / (2 * sigma)) * dsigma)
    step_std = std * math.sqrt(-dsigma)
    if x_next is None:
        x_next = mean + step_std * (eps if eps is not None else torch.randn_like(mean))
    logp = (-((x_next.float() - mean) ** 2) / (2 * step_std ** 2) - math.log(step_std)
            - 0.5 * math.log(2 * math.pi))
    return x_next, mean, step_std, logp.mean(dim=tuple(range(1, x.dim())))


def flow_match_sde_step(x, v, t, t_next, t_first, noise_level=0.7, eps=None, x_next=None):
    """diffusers' FlowMatchEulerDiscreteScheduler step with stochastic_sampling: the clean clip
    predicted at sigma, noised afresh to sigma_next, x_next = (1 - sigma_next) x1_hat + sigma_next
    eps. Gaussian too, but not sde_step's: Stage II's PPO refuses to score it. Returns what sde_step
    returns (noise_level and t_first are unused)."""
    x, v = x.float(), v.float()
    sigma_next = 1.0 - t_next
    # x1_hat = x_t - sigma u = x_t + sigma v
    mean = (1 - sigma_next) * (x + (1.0 - t) * v)
    if x_next is None:
        x_next = mean + sigma_next * (eps if eps is not None else torch.randn_like(mean))
    # the last step is deterministic
    if sigma_next == 0:
        return x_next, mean, 0.0, torch.zeros(len(x), device=x.device)
    logp = (-((x_next.float() - mean) ** 2) / (2 * sigma_next ** 2) - math.log(sigma_next)
            - 0.5 * math.log(2 * math.pi))
    return x_next, mean, sigma_next, logp.mean(dim=tuple(range(1, x.dim())))


def score_sde_step(model, x_t, x_next, i, grid, tokens, cfg_scale=3.0, noise_level=0.7, ctx=None,
                   ctx_mask=None):
    """A stored SDE step x_t -> x_next (step i of `grid`, the rollout's
    time_grid(steps, policy.flow_shift)) scored under `model`: its mean, std and fp32 log-prob
    (B,)."""
    # a ratio of two different steps' densities looks like training but is not
    if model.sampler != "flow-grpo":
        raise ConfigError(f"this policy rolls out with the {model.sampler!r} step, but the PPO "
                          f"ratio scores sde_step's Gaussian ('flow-grpo'): set the policy's "
                          f"sampler to flow-grpo, or use --update=awm")
    t, t_next = float(grid[i]), float(grid[i + 1])
    v = guided_velocity(model, x_t, t, tokens, cfg_scale, ctx, ctx_mask)
    return sde_step(x_t, v, t, t_next, float(grid[1]), noise_level, x_next=x_next)[1:]


# The stochastic steps a rollout can take, by the name a policy gives as `policy.sampler`: the whole
# registry.
ROLLOUT_STEPS = {"flow-grpo": sde_step, "flow-match-sde": flow_match_sde_step}


def gaussian_kl(mean, mean_ref, step_std):
    """Closed-form KL between two Gaussian steps with the same std:
    |mean - mean_ref|^2 / (2 step_std^2), averaged over the non-batch dimensions (the same mean
    convention as sde_step's log-prob). (B,)"""
    return (((mean.float() - mean_ref.float()) ** 2).mean(dim=tuple(range(1, mean.dim())))
            / (2 * step_std ** 2))


def check_batch_memory(policy, device, trained=0, sampled=0, stored=0):
    """Refuse batch sizes that cannot fit, before any clip is drawn: `trained` clips through one
    training pass (each block keeps about 40 floats per token and width for backward, plus its
    attention scores), `sampled` clips denoised at once, `stored` pixel clips held. A rough upper
    bound for a one-line refusal, not an account."""
    c = policy.cfg
    # an adapter's policy: its own library reports its memory
    if not isinstance(c, ModelConfig):
        return
    tokens = (c.frames // c.tpatch) * (c.size // c.patch) ** 2
    per_clip = 4 * c.depth * tokens * (40 * c.dim + 2 * c.heads * tokens)
    check_fits(trained * per_clip + sampled * per_clip // c.depth
               + 4 * stored * c.channels * c.frames * c.size ** 2,
               f"a batch of {max(trained, sampled, stored)} clips", device)


# a library module; a command that once lived here says where it went
if __name__ == "__main__":
    import sys
    print("error: model.py takes no command since ebe19f9: render a checkpoint with `python "
          "checkpoint.py --ckpt=PATH`", file=sys.stderr)
    sys.exit(2)
