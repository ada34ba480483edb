"""diffusers' Wan as a postflow policy: the three stages train a real video transformer.

    pip install -r requirements-wan.txt   # the optional extra (diffusers, peft); torch stays as is
    python adapters.py embed --source=Wan2.1-T2V-1.3B-Diffusers --out=prompts.safetensors
    python adapters.py --source=Wan2.1-T2V-1.3B-Diffusers --text=prompts.safetensors \\
        --text_len=512 --dtype=bfloat16 --frames=33 --size=256 --out=runs/wan/init.safetensors
    python sft.py --init=runs/wan/init.safetensors --out_dir=runs/wan_sft   # then Stages II, III

The checkpoint says `policy: wan` and holds this adapter's config, so model.load_model builds the
policy from any stage's --init: no stage knows which model it trains. --source=tiny is a random
tiny Wan (diffusers' test sizes) for the tests; a folder is read with from_pretrained.

Conventions, mapped once, here:
    postflow   x_t = (1 - t) noise + t data,       v = data - noise,   t from 0 (noise) to 1 (data)
    diffusers  x = sigma noise + (1 - sigma) data,  output u = noise - data at timestep 1000 sigma
so sigma = 1 - t and v = -u. The flow runs on the VAE's latents, normalised as Wan's pipeline does
((z - mean) / std); data is encoded to the posterior mean. Every sampler steps on model.time_grid:
equal steps in sigma, each shifted to shift sigma / (1 + (shift - 1) sigma), the `shift` of
FlowMatchEulerDiscreteScheduler.set_timesteps. --flow_shift=3.0 is Wan's pipeline's at 480p
(UniPCMultistepScheduler; 5.0 at 720p); guidance runs at every step (--cfg_until=1.0), as
WanPipeline.__call__ guides. The tiny Wan takes both, so the tests run what a real run does.

Text: --text names where the prompt states come from (wan_text.py): a safetensors file of UMT5's
(`embed` writes one), a function, fixed random words (tests) or learned ones; guidance's
unconditional half is the states of '', as WanPipeline encodes a missing negative prompt.

LoRA (peft, --lora_rank > 0): the frozen reference of Stages II and III is this policy with its
adapter disabled. So that it is the stage's input, reference() first folds the adapter trained so
far into the frozen weights (the checkpoint keeps its factors, fp32 even under bfloat16) and
restarts it at zero. --lora_rank=0 trains the whole transformer; its reference is a frozen copy.

On pixels, from scratch (`make base POLICY=wan` runs the first two):
    python adapters.py --source=pixel --text=learned --target=clean --lora_rank=0 --frames=8 \\
        --size=32 --out=runs/wan_base_init.safetensors
    python sft.py --init=runs/wan_base_init.safetensors --data=web --lr=1e-3 --out_dir=runs/wan_base
    python adapters.py --source=checkpoints/base_wan.safetensors --lora_rank=8 \\
        --out=runs/wan_lora.safetensors
--source=pixel draws WanTransformer3DModel from the seed, as diffusers initialises it, at the small
DiT's shape (WanConfig's pixel fields), 3 channels in and out, with no VAE: encode is the identity,
decode clamps as the DiT's does. --text=learned is its text encoder, a trained vector per word.
What differs from the DiT is Wan's own: one time projection modulates every block, cross-attention
reads the caption, rotary angles lie on a grid rather than a torus, context frames get timestep 0
per token rather than extra channels. Trained whole, it can be a LoRA policy's frozen --source (the
third command), named by its hash (a changed file is refused), which fixes the clip, the text, the
transformer and the target.

--target=clean reads the output as the clean clip, as the DiT predicts: v = (out - x_t) / (1 - t),
1 - t floored at t_eps. Wan's velocity target must carry every pixel's noise through the network to
cancel it: after 300 pretraining steps (batch 32, web data, lr 1e-3) its flow loss was 0.262 (the
DiT's 0.134) and its samples drew patch-sized blocks over leftover noise; with 'clean', 0.153 and
clean backgrounds. Flow shift 3 and guidance at every step stay: at step 300 the DiT's sampling
settings (equal steps, guidance stopped at 0.6) scored the same on 64 held-out clips.
"""
import copy
import html
import math
import os
import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass, fields

import torch
import torch.nn as nn

import data
import model as M
from checkpoint import CheckpointError, lineage_record, save_checkpoint
from cli import (ConfigError, UserError, atomic_write, check_ranges, claim_out_file, parse_config,
                 run_cli)
from stability import seeded
from wan_text import PromptStates

SETUP = "pip install -r requirements-wan.txt"
try:
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
except ImportError:  # the default path needs none of this; a Wan checkpoint says what to install
    AutoencoderKLWan = WanTransformer3DModel = None

TINY_TRANSFORMER = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                        in_channels=4, out_channels=4, text_dim=16, freq_dim=256, ffn_dim=32,
                        num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                        rope_max_seq_len=32)
TINY_VAE = dict(base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                temperal_downsample=[False, True, True], latents_mean=[0.0] * 4,
                latents_std=[1.0] * 4)


@dataclass
class WanConfig:  # defaults: the tiny test policy, 16x16x2 latents of 4 channels, 128x128x5 pixels
    policy: str = "wan"        # selects this adapter when a checkpoint is read (model.POLICIES)
    source: str = "tiny"       # a diffusers Wan folder (transformer/, vae/), 'tiny' or 'pixel'
                               # (random, from seed), or a pixel Wan checkpoint (.safetensors)
    text: str = "tokens"       # prompt states: .safetensors, 'module:function', 'tokens', 'learned'
    text_len: int = 8          # states are zero-padded to this many rows; a folder source needs 512
                               # (Wan's max_sequence_length), what its transformer was trained on
    frames: int = 5            # pixel frames, 1 + 4k: the VAE keeps frame 0, packs 4 a latent
    size: int = 128            # pixel frame edge: latents are size / 8, tokens size / 16 per side
    channels: int = 3          # RGB
    # ---- the pixel source's transformer (a checkpoint source brings its own), the small DiT's
    # shape: 128 tokens a clip at 8x32x32, 6 blocks 192 wide, 4.03M parameters to the DiT's 4.35M
    patch: int = 8             # spatial patch edge, pixels
    tpatch: int = 1            # frames per patch
    heads: int = 6             # attention heads
    head_dim: int = 32         # Wan's rotary angles split it in frames, rows, columns: even, >= 6
    layers: int = 6            # transformer blocks
    ffn_dim: int = 768         # MLP hidden width
    text_dim: int = 192        # the prompt states' width, what the text projection takes
    source_hash: str = ""      # the checkpoint source's hash this policy was made from (not given)
    lora_rank: int = 4         # peft LoRA on lora_targets; 0 = full fine-tuning
    lora_alpha: float = 4.0    # the adapter's scale is alpha / rank
    lora_targets: str = "to_q,to_k,to_v,to_out.0"  # self- and cross-attention's projections
    dtype: str = "float32"     # weights ('bfloat16' on a GPU); LoRA weights and log-probs stay fp32
    sampler: str = "flow-grpo" # rollouts' SDE step: model.sde_step or diffusers' 'flow-match-sde'
    flow_shift: float = 3.0    # every sampler's grid shift (module docstring): Wan's at 480p
    cfg_until: float = 1.0     # guidance stops at this t: Wan's pipeline guides every step
    vae_batch: int = 4         # clips per VAE call: a batch of long clips at once does not fit
    checkpointing: bool = False  # recompute blocks in the backward: 30 blocks' activations overflow
    seed: int = 0              # the tiny source, the 'tokens' embedding and every adapter (re)start
    target: str = "velocity"   # the output: 'velocity' (Wan's u) or 'clean' (the clip, the DiT's)
    t_eps: float = 0.05        # floor on 1 - t where a 'clean' output becomes v (the DiT's)
    folded: int = 0            # adapters that earlier stages folded into the frozen weights


PIXEL_SHAPE = ("patch", "tpatch", "heads", "head_dim", "layers", "ffn_dim", "text_dim")
# what a checkpoint source fixes: its clip, its prompt states, its transformer and what it predicts
SOURCE_SHAPE = ("frames", "size", "channels", "text", "text_len", *PIXEL_SHAPE, "target", "t_eps")


def on_pixels(cfg):
    """Whether the flow runs on pixels: a random pixel Wan, or one from a pixel Wan checkpoint."""
    return cfg.source == "pixel" or cfg.source.endswith(".safetensors")


def check(cfg):
    """Refuse a config this adapter cannot build, in one line."""
    for f in fields(WanConfig):
        v = getattr(cfg, f.name)
        if (not isinstance(v, (int, float) if f.type is float else f.type)
                or (isinstance(v, bool) and f.type is not bool)):
            raise ConfigError(f"Wan config {f.name}={v!r} is not a {f.type.__name__}")
    check_ranges(cfg, at_least_one=("text_len", "frames", "size", "vae_batch", *PIXEL_SHAPE),
                 positive=("lora_alpha", "t_eps", "flow_shift"),
                 non_negative=("lora_rank", "folded", "cfg_until"),
                 choices=dict(policy=("wan",), dtype=("float32", "bfloat16"),
                              sampler=("flow-grpo", "flow-match-sde"),
                              target=("velocity", "clean")))
    if on_pixels(cfg):
        if cfg.frames % cfg.tpatch or cfg.size % cfg.patch:
            raise ConfigError(f"a pixel Wan's {cfg.frames}x{cfg.size} clip does not split into "
                              f"patches of {cfg.tpatch}x{cfg.patch}x{cfg.patch}")
        if cfg.head_dim % 2 or cfg.head_dim < 6:
            raise ConfigError(f"--head_dim={cfg.head_dim}: Wan's rotary angles need an even "
                              f"head_dim of at least 6")
    else:
        if (cfg.frames - 1) % 4 or cfg.size % 16:
            raise ConfigError(f"a Wan clip has 1 + 4k frames and a size divisible by 16, got "
                              f"{cfg.frames}x{cfg.size}")
        moved = [f"--{k}={getattr(cfg, k)}" for k in PIXEL_SHAPE
                 if getattr(cfg, k) != getattr(WanConfig, k)]
        if moved:
            raise ConfigError(f"the pixel source's shape ({', '.join(moved)}) does not apply to "
                              f"--source={cfg.source}, which brings its own")
    if cfg.source_hash and not cfg.source.endswith(".safetensors"):
        raise ConfigError("--source_hash belongs to a checkpoint source")
    if not on_pixels(cfg) and cfg.source != "tiny" and cfg.text_len != 512:
        raise ConfigError(f"a Wan folder source takes --text_len=512 (its prompt states padded as "
                          f"its pipeline pads them), got {cfg.text_len}")
    if cfg.target == "clean" and cfg.source not in ("tiny", "pixel") and not on_pixels(cfg):
        raise ConfigError("--target=clean is for a Wan trained here: a folder's transformer was "
                          "trained to predict the velocity")
    if cfg.text in ("tokens", "learned") and cfg.text_len < data.MAX_TOKENS:
        raise ConfigError(f"--text={cfg.text} needs --text_len >= {data.MAX_TOKENS}, postflow's "
                          f"caption length")
    if cfg.folded and not cfg.lora_rank:
        raise ConfigError("folded adapters need --lora_rank > 0")


def read_config(shape):
    """model.read_checkpoint's hook: the WanConfig of a checkpoint's model_config, checked."""
    unknown = sorted(set(shape) - {f.name for f in fields(WanConfig)})
    if unknown:
        raise ValueError(f"unknown Wan config keys {unknown}")
    cfg = WanConfig(**shape)
    check(cfg)
    return cfg


def load_source(cfg):
    """The transformer (in cfg.dtype) and the VAE (fp32; None on pixels), untouched by LoRA."""
    return build_source(cfg)[:2]


def pixel_transformer(cfg):
    """WanTransformer3DModel's arguments for a pixel Wan: cfg's channels and shape, the rest as Wan
    2.1's published configs set it (256 time frequencies, normed cross-attention, q and k
    RMS-normed across heads)."""
    return dict(patch_size=(cfg.tpatch, cfg.patch, cfg.patch), num_attention_heads=cfg.heads,
                attention_head_dim=cfg.head_dim, in_channels=cfg.channels,
                out_channels=cfg.channels, text_dim=cfg.text_dim, freq_dim=256,
                ffn_dim=cfg.ffn_dim, num_layers=cfg.layers, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6)


def build_source(cfg):
    """(transformer, VAE or None, prompt states or None): a checkpoint source brings its own prompt
    states; elsewhere the policy builds them from cfg.text."""
    if WanTransformer3DModel is None:
        raise UserError(f"this checkpoint's policy is Wan, which needs the optional extra: {SETUP}")
    dtype = getattr(torch, cfg.dtype)
    cast = lambda t: t if dtype == torch.float32 else t.to(dtype)
    if cfg.source in ("tiny", "pixel"):
        with torch.random.fork_rng(devices=[]):  # the caller's global stream is left as it was
            torch.manual_seed(cfg.seed)
            if cfg.source == "pixel":
                return cast(WanTransformer3DModel(**pixel_transformer(cfg))), None, None
            transformer = WanTransformer3DModel(**TINY_TRANSFORMER)
            return cast(transformer), AutoencoderKLWan(**TINY_VAE), None
    if cfg.source.endswith(".safetensors"):
        base = source_policy(cfg)
        return cast(base.transformer), None, base.text
    if not os.path.isdir(os.path.join(cfg.source, "transformer")):
        raise ConfigError(f"--source={cfg.source} is not a diffusers Wan folder (transformer/, "
                          f"vae/), 'tiny', 'pixel' nor a pixel Wan checkpoint (.safetensors)")
    try:
        transformer = WanTransformer3DModel.from_pretrained(cfg.source, subfolder="transformer",
                                                            torch_dtype=dtype)
        vae = AutoencoderKLWan.from_pretrained(cfg.source, subfolder="vae",
                                               torch_dtype=torch.float32)
        return transformer, vae, None
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read a Wan model from {cfg.source}: "
                          f"{str(e).splitlines()[0]}") from None


def source_policy(cfg):
    """The pixel Wan a checkpoint source holds whole (--lora_rank=0), checked against cfg; a LoRA
    checkpoint made from it rebuilds it from that file, so it stays small."""
    from checkpoint import file_hash, load_model, read_checkpoint
    if not os.path.isfile(cfg.source):
        raise ConfigError(f"--source={cfg.source}: no such checkpoint")
    if cfg.source_hash and file_hash(cfg.source) != cfg.source_hash:
        raise CheckpointError(f"{cfg.source} has changed (hash {file_hash(cfg.source)}) since "
                              f"this policy was made from it (hash {cfg.source_hash}): restore "
                              f"that file or remake the run from it")
    shape = read_checkpoint(cfg.source)[1]
    # by name: run as a script, this module's classes are __main__'s, not those checkpoint.py builds
    if getattr(shape, "policy", None) != "wan" or not on_pixels(shape) or shape.lora_rank:
        raise ConfigError(f"--source={cfg.source} is not a pixel Wan checkpoint with whole weights "
                          f"(one trained with --lora_rank=0)")
    moved = [f"--{k}={getattr(cfg, k)} (the source's: {getattr(shape, k)})" for k in SOURCE_SHAPE
             if getattr(cfg, k) != getattr(shape, k)]
    if moved:
        raise ConfigError(f"--source={cfg.source} fixes the clip, the text, the transformer and "
                          f"its target: {', '.join(moved)}")
    return load_model(cfg.source)[0]


class WanPolicy(nn.Module):
    """model.py's policy interface over diffusers' WanTransformer3DModel and AutoencoderKLWan."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.sampler = cfg.sampler
        self.flow_shift = cfg.flow_shift
        self.cfg_until = cfg.cfg_until
        self.transformer, self.vae, text = build_source(cfg)
        tc = self.transformer.config
        if self.vae is None:   # pixels: the flow's state is the clip itself
            self.flow_shape = (cfg.channels, cfg.frames, cfg.size, cfg.size)
        else:
            self.latent_space(cfg, tc)
        self.text = text if text is not None else PromptStates(cfg, tc.text_dim)
        # learned words train with the whole model; beside an adapter they stay the base's
        self.text.requires_grad_(not cfg.lora_rank)
        if cfg.lora_rank:
            try:
                from peft import LoraConfig
            except ImportError:
                raise UserError(f"--lora_rank > 0 needs peft, part of the optional extra: "
                                f"{SETUP}") from None
            self.transformer.add_adapter(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
                                                    target_modules=cfg.lora_targets.split(",")))
            # peft gives them the base's dtype; bf16 would round small updates away
            for m in self.lora_layers().values():
                m.lora_A.float()
                m.lora_B.float()
            self.restart_adapter()
        else:
            self.transformer.requires_grad_(True)
        if cfg.checkpointing:
            self.transformer.enable_gradient_checkpointing()
        self.trained = {n for n, p in self.named_parameters() if p.requires_grad}
        # factors folded by earlier stages: placeholders loading fills, then adds into the weights
        self.history = [{n: (torch.zeros_like(a), torch.zeros_like(b))
                         for n, (a, b) in self.factors().items()}
                        for _ in range(cfg.folded)]
        self.history_in_weights = cfg.folded == 0

    def latent_space(self, cfg, tc):
        """flow_shape and the latents' normalisation, from the VAE's config."""
        self.vae.requires_grad_(False).eval()
        vc = self.vae.config
        s = vc.scale_factor_spatial
        if cfg.size % (s * tc.patch_size[1]) or vc.z_dim != tc.in_channels:
            raise ConfigError(f"--size={cfg.size} does not patch into {s}x VAE latents, or the "
                              f"VAE's {vc.z_dim} channels are not the transformer's "
                              f"{tc.in_channels}")
        frames = 1 + (cfg.frames - 1) // vc.scale_factor_temporal
        self.flow_shape = (vc.z_dim, frames, cfg.size // s, cfg.size // s)
        mean, std = (torch.tensor(v).view(1, -1, 1, 1, 1)
                     for v in (vc.latents_mean, vc.latents_std))
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)

    # ---------------------------------------------------------- the flow, in postflow's convention
    def velocity(self, x, t, tokens, ctx=None, ctx_mask=None, drop=None):
        """v at x_t through diffusers' call: timestep 1000 (1 - t), v = -u. Context latents are
        pinned clean and their tokens get timestep 0, the way Wan 2.2's TI2V conditions on a first
        frame. Under --target=clean the output is the clean clip and v is derived from it."""
        timestep = 1000 * (1 - t.float())   # (B,)
        if ctx is not None:
            x = torch.where(ctx_mask[:, None, :, None, None], ctx, x)
            pt, ph, pw = self.transformer.config.patch_size
            per_frame = (x.shape[3] // ph) * (x.shape[4] // pw)
            frame_timestep = torch.where(ctx_mask[:, ::pt], 0.0, timestep[:, None])   # (B, frames)
            timestep = frame_timestep.repeat_interleave(per_frame, 1)                 # (B, tokens)
        dtype = self.transformer.dtype
        out = self.transformer(x.to(dtype), timestep, self.text(tokens, drop).to(dtype),
                               return_dict=False)[0].float()
        if self.cfg.target == "clean":   # the output is the clean clip (a pixel Wan's option)
            return M.to_velocity(out, x, t, self.cfg.t_eps)
        return -out   # u = noise - data, as Wan's pipeline reads it

    def forward(self, x, t, tokens, **kw):
        """The interface's prediction, the clean clip: x_t + (1 - t) v, Wan's x0 = x - sigma u."""
        return x + (1 - t)[:, None, None, None, None] * self.velocity(x, t, tokens, **kw)

    @torch.no_grad()
    def encode(self, clips):
        """Pixels (B, 3, F, H, W) in [-1, 1] -> normalised latents (B, *flow_shape): the posterior's
        mean, no draw. A pixel Wan's flow takes the clips as they are."""
        if self.vae is None:
            return clips
        with torch.autocast(clips.device.type, enabled=False):
            z = torch.cat([self.vae.encode(c.float()).latent_dist.mean
                           for c in clips.split(self.cfg.vae_batch)])
        return (z - self.mean) / self.std

    @torch.no_grad()
    def decode(self, x):
        if self.vae is None:   # as the DiT's: an overshooting sample is clipped to pixels
            return x.clamp(-1, 1)
        with torch.autocast(x.device.type, enabled=False):
            z = x.float() * self.std + self.mean
            clips = torch.cat([self.vae.decode(c).sample for c in z.split(self.cfg.vae_batch)])
            return clips.clamp(-1, 1)

    def train(self, mode=True):
        super().train(mode)
        if self.vae is not None:
            self.vae.eval()
        return self

    # ---------------------------------------------------------- the reference, LoRA's bookkeeping
    def reference(self):
        if not self.cfg.lora_rank:
            return M.frozen_copy(self)
        self.fold()
        return AdapterOff(self)

    def shard_units(self):
        """FSDP2's pieces (distributed.shard): each block, then the transformer; every rank keeps
        the small VAE and frozen prompt states whole. Learned words that train are a unit of their
        own, so their gradient is reduced over the ranks as every other weight's is."""
        learned = any(n.startswith("text.") for n in self.trained)   # copies too (EMA: frozen)
        return [*self.transformer.blocks, *([self.text] if learned else []), self.transformer]

    @contextmanager
    def adapter_off(self):
        self.transformer.disable_adapters()
        try:
            yield
        finally:
            self.transformer.enable_adapters()

    def factors(self):
        """Each LoRA layer's (A (r, in), B (out, r)), by layer name."""
        return {n: (m.lora_A["default"].weight, m.lora_B["default"].weight)
                for n, m in self.lora_layers().items()}

    def lora_layers(self):
        from peft.tuners.lora import LoraLayer
        return {n: m for n, m in self.transformer.named_modules() if isinstance(m, LoraLayer)}

    @torch.no_grad()
    def add_into_weights(self, factors):
        for name, m in self.lora_layers().items():
            a, b = (f.to(m.base_layer.weight.device) for f in factors[name])
            w = m.base_layer.weight
            w.copy_((w.float() + m.scaling["default"] * (b.float() @ a.float())).to(w.dtype))

    @torch.no_grad()
    def restart_adapter(self):
        """B = 0, so the policy is unchanged; A as peft draws it (kaiming-uniform), from a generator
        seeded by the number of folds: a stage starts alike on every rank and on resume."""
        gen = seeded(self.cfg.seed, self.cfg.folded)
        for a, b in self.factors().values():
            a.copy_((torch.rand(a.shape, generator=gen) * 2 - 1) / math.sqrt(a.shape[1]))
            b.zero_()

    @torch.no_grad()
    def fold(self):
        """The adapter trained so far joins the frozen weights; a fresh one trains from here."""
        current = {n: (a.detach().clone(), b.detach().clone())
                   for n, (a, b) in self.factors().items()}
        self.add_into_weights(current)
        self.history.append(current)
        self.cfg.folded += 1
        self.restart_adapter()

    def state_dict(self, *args, **kwargs):
        """What trains (the adapter, or the whole transformer and learned words without one) and the
        folded factors; the frozen rest is rebuilt from cfg.source, so a LoRA checkpoint holds
        megabytes, not the model."""
        sd = {k: v for k, v in super().state_dict(*args, **kwargs).items() if k in self.trained}
        for i, factors in enumerate(self.history):
            for name, (a, b) in factors.items():
                # clones: copies of the policy share the folded factors
                sd[f"folded.{i}.{name}.lora_A"] = a.clone()
                sd[f"folded.{i}.{name}.lora_B"] = b.clone()
        return sd

    def load_state_dict(self, state_dict, strict=True, assign=False):
        """state_dict's counterpart. The folded factors enter the frozen weights once, on a
        fresh build; a later load (resume, rollback, the AWM sampler's refresh) brings the same."""
        for i, factors in enumerate(self.history):
            for name, (a, b) in factors.items():
                new = (state_dict[f"folded.{i}.{name}.lora_A"],
                       state_dict[f"folded.{i}.{name}.lora_B"])
                if not self.history_in_weights:
                    a.copy_(new[0])
                    b.copy_(new[1])
                elif not (torch.equal(a, new[0].to(a)) and torch.equal(b, new[1].to(b))):
                    raise CheckpointError("these weights continue another chain of stages "
                                          "(other folded adapters)")
        if not self.history_in_weights:
            for factors in self.history:
                self.add_into_weights(factors)
            self.history_in_weights = True
        rest = {k: v for k, v in state_dict.items() if not k.startswith("folded.")}
        result = super().load_state_dict(rest, strict=False, assign=assign)
        if result.unexpected_keys or self.trained - set(rest):
            raise CheckpointError(f"Wan weights do not match this policy "
                                  f"({len(result.unexpected_keys)} unexpected, "
                                  f"{len(self.trained - set(rest))} missing)")
        return result

    def __deepcopy__(self, memo):
        """Copies (EMA, the AWM sampler, a full fine-tuning reference) share what is frozen and
        copy only what trains."""
        trained = {id(p) for n, p in self.named_parameters() if n in self.trained}
        for t in [*self.parameters(), *self.buffers(),
                  *(f for fs in self.history for ab in fs.values() for f in ab)]:
            if id(t) not in trained:
                memo[id(t)] = t
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        new.__dict__.update({k: copy.deepcopy(v, memo) for k, v in self.__dict__.items()})
        return new


class AdapterOff(nn.Module):
    """A LoRA policy with its adapter disabled: the frozen reference, on the policy's modules."""

    def __init__(self, policy):
        super().__init__()
        # not a submodule: freezing or moving the view leaves the policy alone
        self.__dict__["policy"] = policy
        self.cfg, self.flow_shape, self.sampler = policy.cfg, policy.flow_shape, policy.sampler
        self.flow_shift, self.cfg_until = policy.flow_shift, policy.cfg_until
        self.encode, self.decode = policy.encode, policy.decode

    def velocity(self, *args, **kw):
        with self.policy.adapter_off():
            return self.policy.velocity(*args, **kw)

    def forward(self, *args, **kw):
        with self.policy.adapter_off():
            return self.policy(*args, **kw)


build = WanPolicy  # what checkpoint.build_policy calls for a config whose policy is 'wan'


# ----------------------------------------------------------------------------- command line
@dataclass
class InitConfig(WanConfig):
    out: str = "runs/wan/init.safetensors"  # the checkpoint every stage takes as --init
    overwrite: bool = False                 # replace an existing file


def init_checkpoint(argv):
    """Write a Wan policy's starting checkpoint: its config, and its adapter (or transformer)
    weights. A checkpoint source fixes the clip, the text and the transformer (SOURCE_SHAPE): they
    are read from it, and a flag that asks for another value is refused."""
    cli = parse_config(InitConfig, argv)
    cfg = WanConfig(**{f.name: getattr(cli, f.name) for f in fields(WanConfig)})
    if cfg.source_hash:
        raise ConfigError("--source_hash is written from --source, not given")
    if cfg.source.endswith(".safetensors"):
        from checkpoint import file_hash, read_checkpoint
        if not os.path.isfile(cfg.source):
            raise ConfigError(f"--source={cfg.source}: no such checkpoint")
        shape = read_checkpoint(cfg.source)[1]
        given = {a[2:].partition("=")[0] for a in argv}
        for k in SOURCE_SHAPE:
            if k not in given and getattr(shape, "policy", None) == "wan":
                setattr(cfg, k, getattr(shape, k))
        cfg.source_hash = file_hash(cfg.source)
    check(cfg)
    if cfg.folded:
        raise ConfigError("--folded is written by the stages, not given")
    claim_out_file(cli.out, cli.overwrite, inputs=[cfg.source, cfg.text])
    policy = WanPolicy(cfg)
    parent = cfg.source if cfg.source_hash else ""
    lineage = lineage_record("wan-init", parent, source=cfg.source)
    save_checkpoint(cli.out, policy.state_dict(), cfg, lineage)
    trained = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    total = sum(p.numel() for m in (policy.transformer, policy.text) for p in m.parameters())
    print(f"wrote {cli.out}: Wan from {cfg.source}, {trained / 1e6:.3f}M trained of "
          f"{total / 1e6:.2f}M (transformer and text), flow shape {policy.flow_shape}, "
          f"{tokens_per_clip(policy)} tokens a clip")


def tokens_per_clip(policy):
    """The transformer's sequence length for one clip of its flow's shape."""
    pt, ph, pw = policy.transformer.config.patch_size
    _, f, h, w = policy.flow_shape
    return (f // pt) * (h // ph) * (w // pw)


def clean_prompt(text):
    """A prompt as WanPipeline's prompt_clean hands it to its tokenizer where ftfy is not installed,
    the branch diffusers takes then (ftfy would repair mojibake; postflow's captions have none):
    HTML entities unescaped twice (a caption escaped twice over comes back whole), every run of
    whitespace one space, none at the ends. Whitespace is Unicode's White_Space, what the `regex`
    module's \\s there matches: str.split would also split at the separators \\x1c-\\x1f, which it
    keeps inside a prompt (str.strip drops them at the ends in both)."""
    return re.sub(r"[^\S\x1c-\x1f]+", " ", html.unescape(html.unescape(text))).strip()


def embed(argv):
    """The UMT5 states of '' and of every caption of the world, from a Wan folder's tokenizer/ and
    text_encoder/."""
    @dataclass
    class EmbedConfig:
        source: str = ""                  # a diffusers Wan folder
        out: str = "prompts.safetensors"  # the file --text takes
        overwrite: bool = False           # replace an existing --out

    cfg = parse_config(EmbedConfig, argv)
    if not os.path.isdir(os.path.join(cfg.source, "text_encoder")):
        raise ConfigError(f"--source={cfg.source!r} is not a diffusers Wan folder with tokenizer/ "
                          f"and text_encoder/")
    claim_out_file(cfg.out, cfg.overwrite, inputs=[cfg.source])
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, UMT5EncoderModel
    tok = AutoTokenizer.from_pretrained(cfg.source, subfolder="tokenizer")
    encoder = UMT5EncoderModel.from_pretrained(cfg.source, subfolder="text_encoder").eval()
    prompts = ["", *sorted(data.caption(c, s, d, sp) for c, s, d in data.ALL_COMBOS
                           for sp in range(len(data.SPEEDS)))]
    # one prompt at a time keeps its own tokens; the policy pads with zeros, as Wan's pipeline does
    with torch.no_grad():
        states = {p: encoder(**tok(clean_prompt(p), return_tensors="pt"))
                  .last_hidden_state[0].float().contiguous() for p in prompts}
    atomic_write(cfg.out, lambda tmp: save_file(states, tmp))
    print(f"wrote {cfg.out}: the states of {len(prompts) - 1} captions and ''")


if __name__ == "__main__":
    args = sys.argv[1:]
    run_cli(embed, args[1:]) if args[:1] == ["embed"] else run_cli(init_checkpoint, args)
