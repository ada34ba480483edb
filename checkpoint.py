"""Checkpoints: the safetensors files stages hand each other, and a run's resumable state.

A hand-off checkpoint is one safetensors file: the policy's weights, its model config (so the file builds its own
model) and its lineage (the stage that wrote it, its parent file and that file's hash, the step, the run's config).
A model config that names a `policy` is built by the module POLICIES names (adapters.py for diffusers' Wan); the
default path never imports an adapter. A run's state (state.safetensors) adds the EMA weights, the AdamW moments as
plain tensors (no pickle), the step, every guard's history and the log's length, so a resume is exact. A pair
file (Stage III's winner and loser clips) is checked the same way before a run reads it.
Every file is written atomically; every way a file can be wrong is a one-line CheckpointError.

    python checkpoint.py --ckpt=X.safetensors --prompts="a fast red circle moving left" --out=clip.gif   # render one
"""
import hashlib
import importlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, replace

import torch

import data
import model as M
from model import ModelConfig, VideoDiT
from distributed import shaped_like, whole
from cli import (ConfigError, UserError, atomic_write, check_fits, check_ranges, claim_out_file,
                 parse_config, remove_stale_temps, run_cli)


class CheckpointError(UserError):
    """A checkpoint that cannot be used: missing, truncated, not postflow's, another model shape, or non-finite."""


def file_hash(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def lineage_record(stage, parent="", step=0, data_preset="", **extra):
    """Where a checkpoint came from: stage, parent file and its hash (several parents, "a,b": a hash each), step,
    data, time."""
    hashes = ",".join(file_hash(p) for p in str(parent).split(",") if p) if parent else ""
    return dict(stage=stage, parent=str(parent), parent_hash=hashes,
                step=step, data=data_preset, time=time.strftime("%Y-%m-%dT%H:%M:%S"), **extra)


def stage_family(stage):
    """The family of a lineage stage, the part before the first '-': every Stage II update rule
    ("rl-awm", "rl-ppo", "rl-nft", ...) is "rl"; "sft", "dpo", "pretrain" are their own."""
    return str(stage).split("-", 1)[0]


def save_checkpoint(path, tensors, cfg: ModelConfig, lineage, keep_as=None, **meta):
    """Write tensors + model config + lineage atomically (a temp file, then rename); keep_as: the file it replaces
    is moved there first, so a kill between the two renames still leaves one complete file."""
    from safetensors.torch import save_file
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    metadata = {"format": "postflow", "model_config": json.dumps(asdict(cfg)), "lineage": json.dumps(lineage)}
    metadata.update({k: json.dumps(v) for k, v in meta.items()})
    cpu = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(cpu, tmp, metadata=metadata), keep_as=keep_as)


def read_checkpoint(path):
    """Returns (tensors, ModelConfig or an adapter's config, metadata dict with JSON values decoded). One-line errors."""
    from safetensors import safe_open
    if not path:
        raise CheckpointError("no checkpoint given (an empty path)")
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path} is a folder, not a safetensors file")
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} is truncated or not a safetensors file ({type(e).__name__})") from None
    if meta.get("format") != "postflow":
        raise CheckpointError(f"checkpoint {path} has no postflow metadata (model config and lineage)")
    try:
        meta = {k: json.loads(v) for k, v in meta.items() if k != "format"}
        shape = dict(meta.pop("model_config"))
        if "policy" in shape:                             # a policy behind an adapter reads and checks its own config
            cfg = policy_module(shape["policy"]).read_config(shape)
        else:
            unknown = sorted(set(shape) - set(asdict(ModelConfig())))
            if unknown:
                raise CheckpointError(f"checkpoint {path} asks for {', '.join(unknown)}, which this postflow does not "
                                      f"build; remake it with this version")
            cfg = ModelConfig(**shape)
            bad = [f"{k}={v!r}" for k, v in asdict(cfg).items()   # numbers of the default's kind (an int for a float too)
                   if isinstance(v, bool) or not isinstance(v, type(getattr(ModelConfig, k)) if k not in FLOAT_FIELDS
                                                            else (int, float)) or not 0 < v < math.inf]
            if bad or cfg.size % cfg.patch or cfg.frames % cfg.tpatch or cfg.dim % (2 * cfg.heads):
                raise ValueError(f"model_config {', '.join(bad) or 'size/patch, frames/tpatch or dim/heads do not divide'}")
        if not isinstance(meta.get("lineage", {}), dict):
            raise ValueError(f"lineage is {type(meta['lineage']).__name__}, not an object")
    except UserError:                                     # already one line (a missing optional extra among them)
        raise
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} has broken metadata ({type(e).__name__}: {e})") from None
    return tensors, cfg, meta


FLOAT_FIELDS = ("mlp_ratio", "t_eps")


# A checkpoint whose model_config names a policy is built by that module (read_config, build), imported only then:
# the default path never imports an adapter or its dependencies.
POLICIES = {"wan": "adapters"}


def policy_module(name):
    if name not in POLICIES:
        raise CheckpointError(f"unknown policy {name!r} in a checkpoint's model_config; known: {', '.join(POLICIES)}")
    return importlib.import_module(POLICIES[name])


def build_policy(cfg):
    """An untrained policy of a config: a VideoDiT, or whatever the config's adapter builds. A VideoDiT whose weights
    cannot fit in memory (a config asking for an absurd depth or width) is refused before it is built."""
    if not isinstance(cfg, ModelConfig):
        return policy_module(cfg.policy).build(cfg)
    size = lambda m: sum(t.numel() for t in (*m.parameters(), *m.buffers()))
    with torch.device("meta"):                           # counts weights and buffers without allocating: blocks are alike
        one, two = (size(VideoDiT(replace(cfg, depth=k))) for k in (1, 2))
    check_fits(4 * (one + (cfg.depth - 1) * (two - one)), f"a model of depth {cfg.depth}, width {cfg.dim}, "
                                                          f"{cfg.frames} frames of {cfg.size}x{cfg.size}")
    return VideoDiT(cfg)


def load_weights(model, tensors, path="checkpoint", prefix=""):
    """Copy tensors[prefix + name] into the model; a shape mismatch or a NaN/Inf is a one-line error naming it."""
    own = model.state_dict()
    got = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    missing = sorted(set(own) - set(got))
    if missing:
        raise CheckpointError(f"{path} lacks {len(missing)} weights of this model (first: {missing[0]})")
    for k, v in own.items():
        if got[k].shape != v.shape:
            raise CheckpointError(f"{path}: weight {k} has shape {tuple(got[k].shape)} but this model needs "
                                  f"{tuple(v.shape)}")
        if got[k].is_floating_point() and not torch.isfinite(got[k]).all():
            raise CheckpointError(f"{path}: weight {k} holds NaN or Inf; a run that saved it diverged")
    model.load_state_dict({k: shaped_like(got[k].to(v.dtype), v) for k, v in own.items()})  # a sharded model: its shards


def check_config(cfg: ModelConfig, expected: ModelConfig, path):
    diff = [f"{k}={getattr(cfg, k)} (model has {getattr(expected, k)})"
            for k in asdict(cfg) if getattr(cfg, k) != getattr(expected, k)]
    if diff:
        raise CheckpointError(f"checkpoint {path} is for another model shape: {', '.join(diff)}")


def load_model(path, device="cpu", expect: ModelConfig = None):
    """The policy of a hand-off checkpoint (a VideoDiT unless its config names another), and the checkpoint's metadata."""
    tensors, cfg, meta = read_checkpoint(path)
    if expect is not None:
        check_config(cfg, expect, path)
    model = build_policy(cfg)
    # A run's resumable state file holds "ema.*" weights too: render those, so a run can be watched.
    load_weights(model, tensors, path, prefix="ema." if any(k.startswith("ema.") for k in tensors) else "")
    return model.to(device).eval(), meta


# ----------------------------------------------------------------------------- a run's resumable state
def full_state(net, main=True):
    """A policy's whole state dict on the main rank's CPU ({} elsewhere). Sharded, every rank calls it (each weight
    is gathered in turn) and each whole weight leaves the device before the next is gathered: a GPU never holds
    more than one whole weight beyond its shards."""
    out = {}
    for k, v in net.state_dict().items():
        v = whole(v)
        if main:
            out[k] = v.cpu()
    return out


def save_run_state(path, net, ema, opt, lineage, step, parts=None, log_file=None, main=True):
    """A run's resumable state in one safetensors file: weights, EMA weights, AdamW moments (as plain tensors:
    no pickle), the step, the JSON state of `parts` (name -> guard or monitor with state_dict()) and the
    length of log_file. The previous state is kept as state.prev.safetensors until the new one is complete.
    Every rank calls it (sharded state is gathered whole, so a run resumes on any rank count or --parallel);
    the main rank writes."""
    tensors = {**{f"model.{k}": v for k, v in full_state(net, main).items()},
               **{f"ema.{k}": v for k, v in full_state(ema.model, main).items()}}
    for name, p in net.named_parameters():
        for k, v in opt.state.get(p, {}).items():
            v = whole(v) if torch.is_tensor(v) else torch.tensor(float(v))   # as full_state's, one at a time
            if main:
                tensors[f"opt.{name}.{k}"] = v.cpu()
    if not main:
        return
    extra = {k: p.state_dict() for k, p in (parts or {}).items()}
    if log_file is not None:
        log_file.flush()
        extra["log_bytes"] = log_file.tell()
    save_checkpoint(path, tensors, net.cfg, lineage, keep_as=path.replace(".safetensors", ".prev.safetensors"),
                    step=step, extra=extra)


def resume_run(path, net, ema, opt, cfg, parts, log=print, main=True):
    """--resume=true: check the run's settings, restore weights, EMA, optimizer and each of `parts`; returns
    (step, the log's length at that checkpoint, to cut back to). Only then (on the main rank) are the temp files a
    kill left behind removed."""
    step, extra, lineage = load_run_state(path, net, ema, opt, warn=log)
    check_resume(lineage, cfg)
    for name, part in parts.items():
        part.load_state_dict(extra[name])
    if main:
        remove_stale_temps(os.path.dirname(path) or ".")
    log(f"resumed {path} at step {step}")
    return step, extra.get("log_bytes")


def load_run_state(path, net, ema, opt, warn=print):
    """Restore what save_run_state wrote into net, ema and opt; returns (step, extra, lineage). Falls back to
    the previous state, with a warning, when the latest is missing or damaged."""
    prev = path.replace(".safetensors", ".prev.safetensors")
    try:
        tensors, saved_cfg, meta = read_checkpoint(path)
    except CheckpointError as e:
        if not os.path.exists(prev):
            raise
        warn(f"warning: {e}; resuming from the previous state {prev}")
        tensors, saved_cfg, meta = read_checkpoint(prev)
        path = prev
    check_config(saved_cfg, net.cfg, path)
    load_weights(net, tensors, path, prefix="model.")
    load_weights(ema.model, tensors, path, prefix="ema.")
    for name, p in net.named_parameters():
        state = {k[len(f"opt.{name}."):]: v for k, v in tensors.items()
                 if k.startswith(f"opt.{name}.") and "." not in k[len(f"opt.{name}."):]}
        if state:   # the moments, laid out as the weight is (its shard when sharded); AdamW's step count on the CPU
            opt.state[p] = {k: shaped_like(v.to(p.device), p) if k != "step" else v.cpu() for k, v in state.items()}
    return meta["step"], meta.get("extra", {}), meta.get("lineage", {})


def check_resume(lineage, cfg, free=("resume", "overwrite", "out_dir", "iters", "steps", "max_minutes", "max_nfe",
                                     "device", "parallel")):
    """Refuse to resume with settings that change what the run computes (another --init, a new lr: the KL
    reference or the schedule would change mid-run). `free` keys may differ: extending a run is fine."""
    saved, now = lineage.get("config", {}), json.loads(json.dumps(asdict(cfg)))   # tuples read back as lists
    diff = [f"--{k}={now[k]} (the run used {saved[k]})" for k in now if k in saved and k not in free and saved[k] != now[k]]
    init = now.get("init")
    if init and lineage.get("parent_hash") and file_hash(init) != lineage["parent_hash"]:
        diff.append(f"--init={init} has changed since the run started (hash {file_hash(init)}, was {lineage['parent_hash']})")
    if diff:
        raise ConfigError(f"cannot resume with other settings: {'; '.join(diff)}; pass the run's settings or start "
                          f"a new --out_dir")


def export_half(src, dst):
    """Copy a hand-off checkpoint with float16 weights (half the bytes, for shipping in the repo); loading
    casts back to the model's float32. Config, lineage and other metadata are kept."""
    tensors, cfg, meta = read_checkpoint(src)
    lineage = meta.pop("lineage")
    save_checkpoint(dst, {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}, cfg, lineage,
                    stored="float16", source_hash=file_hash(src), **meta)


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


# ----------------------------------------------------------------------------- Stage III's pair files
def save_pairs(path, pairs, prompts_note=""):
    from safetensors.torch import save_file
    tensors = {k: v.contiguous() for k, v in pairs.items()}
    atomic_write(path, lambda tmp: save_file(
        tensors, tmp, metadata={"format": "postflow-pairs", "note": prompts_note}))


def load_pairs(path, mc):
    """A pair file: winner/loser (P, C, F, H, W) in [-1, 1], tokens (P, L); score_w, score_l,
    weight optional."""
    from safetensors import safe_open
    if not os.path.isfile(path):
        raise ConfigError(f"pair file not found: {path}")
    try:
        with safe_open(path, framework="pt") as f:
            pairs = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise ConfigError(f"pair file {path} is truncated or not safetensors "
                          f"({type(e).__name__})") from None
    for k in ("winner", "loser", "tokens"):
        if k not in pairs:
            raise ConfigError(f"pair file {path} lacks '{k}' (needs winner, loser, tokens)")
    want = (mc.channels, mc.frames, mc.size, mc.size)
    if tuple(pairs["winner"].shape[1:]) != want or tuple(pairs["loser"].shape[1:]) != want:
        raise ConfigError(f"pair file {path} holds clips of shape "
                          f"{tuple(pairs['winner'].shape[1:])} and "
                          f"{tuple(pairs['loser'].shape[1:])}; this model makes {want}")
    if len(pairs["loser"]) != len(pairs["winner"]):
        raise ConfigError(f"pair file {path} holds {len(pairs['winner'])} winner clips but "
                          f"{len(pairs['loser'])} loser clips: one loser per winner")
    n = len(pairs["winner"])
    if n == 0:
        raise ConfigError(f"pair file {path} holds no pairs")
    for k in ("winner", "loser"):
        v = pairs[k]
        if v.dtype != torch.float32:
            raise ConfigError(f"pair file {path}: {k} clips are {v.dtype}; postflow clips are "
                              f"float32 in [-1, 1] (convert with .float(); uint8 frames with "
                              f"x / 127.5 - 1)")
        if not torch.isfinite(v).all() or v.min() < -1 - 1e-3 or v.max() > 1 + 1e-3:
            raise ConfigError(f"pair file {path}: {k} clips must be finite and in [-1, 1], got "
                              f"[{float(v.nan_to_num().min()):.3g}, "
                              f"{float(v.nan_to_num().max()):.3g}]"
                              f"{' with NaN/Inf' if not torch.isfinite(v).all() else ''}")
    tok = pairs["tokens"]
    if tok.dim() >= 1 and len(tok) != n:
        raise ConfigError(f"pair file {path} holds {n} winner/loser pairs but {len(tok)} rows of "
                          f"tokens: one caption per pair")
    if (tok.dtype != torch.long or tok.dim() != 2 or len(tok) != n or tok.numel() == 0
            or tok.min() < 0 or tok.max() >= len(data.VOCAB)):
        raise ConfigError(f"pair file {path}: tokens must be ({n}, L) int64 ids from "
                          f"data.tokenize, got {tuple(tok.shape)} {tok.dtype}")
    for k in ("score_w", "score_l", "weight"):
        if k in pairs and (pairs[k].shape != (n,) or not torch.isfinite(pairs[k]).all()):
            raise ConfigError(f"pair file {path}: {k} must be ({n},) finite numbers, got "
                              f"{tuple(pairs[k].shape)}")
    if "weight" in pairs and ((pairs["weight"] < 0).any() or not (pairs["weight"] > 0).any()):
        raise ConfigError(f"pair file {path}: weights must be >= 0 and not all 0 (a pair of "
                          f"weight 0 teaches nothing)")
    pairs.update({k: pairs[k].float() for k in ("score_w", "score_l", "weight") if k in pairs})
    pairs.setdefault("weight", torch.ones(n))
    pairs.setdefault("score_w", torch.ones(n))
    pairs.setdefault("score_l", torch.zeros(n))
    return pairs


# ----------------------------------------------------------------------------- render any checkpoint
def main(argv):
    @dataclass
    class RenderConfig:
        ckpt: str = "checkpoints/base_small.safetensors"  # hand-off checkpoint, or a run's state.safetensors (EMA)
        prompts: str = "a fast red circle moving right;a slow green square moving up"  # ';'-separated
        seeds: int = 4            # clips per prompt (seeds 0..seeds-1)
        steps: int = 20           # Euler steps
        cfg_scale: float = 3.0    # classifier-free guidance weight
        out: str = "render.gif"   # .gif, or .mp4 with imageio-ffmpeg installed
        seed: int = 0             # noise seed
        overwrite: bool = False   # replace an existing output file

    cfg = parse_config(RenderConfig, argv)
    check_ranges(cfg, at_least_one=("seeds", "steps"), non_negative=("cfg_scale",))
    claim_out_file(cfg.out, cfg.overwrite, inputs=[cfg.ckpt])
    if not cfg.out.endswith((".gif", ".mp4")):
        raise ConfigError(f"--out must end in .gif or .mp4, got {cfg.out!r}")
    prompts = [p.strip() for p in cfg.prompts.split(";") if p.strip()]
    tokens = data.tokenize(prompts).repeat_interleave(cfg.seeds, 0)
    model, _ = load_model(cfg.ckpt)
    gen = torch.Generator().manual_seed(cfg.seed)
    noise = torch.randn(len(tokens), *model.flow_shape, generator=gen)
    videos = M.sample(model, tokens, noise, cfg.steps, cfg.cfg_scale)
    if not torch.isfinite(videos).all():   # finite weights can still overflow: a GIF of NaN is no render
        raise CheckpointError(f"{cfg.ckpt} draws non-finite pixels (its weights overflow); nothing was written")
    os.makedirs(os.path.dirname(os.path.abspath(cfg.out)), exist_ok=True)
    data.write_video(data.video_grid(videos, len(prompts), cfg.seeds), cfg.out)
    print(f"wrote {cfg.out}: {len(prompts)} prompts (rows) x {cfg.seeds} seeds (columns)")


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
