"""What keeps a postflow run safe, shared by every stage.

Optimisation: EMA weights, global grad-norm clipping that returns the norm, LR warmup, and a guard that
skips a step whose loss or gradient is not finite (and counts it).
Runs: typed `--key=value` configs that refuse unknown keys, DDP detected from RANK so one file runs
under `python` and `torchrun`, output folders that are never overwritten unasked, optimizer state as
plain tensors (checkpoints stay safetensors, no pickle), and one-line errors for bad input.
"""
import copy
import dataclasses
import math
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist


# ----------------------------------------------------------------------------- errors and the CLI
class ConfigError(ValueError):
    """A command line the script cannot run: unknown key, wrong type, or values that do not fit."""


def run_cli(main, argv):
    """Run main(argv); turn the errors a user can cause into one line on stderr and exit code 2."""
    from data import PromptError
    from model import CheckpointError
    try:
        main(argv)
    except (ConfigError, CheckpointError, PromptError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: the last checkpoint is kept; rerun with --resume=true to continue", file=sys.stderr)
        sys.exit(130)


def parse_config(cls, argv):
    """A dataclass instance from `--key=value` arguments, each checked against the default's type."""
    cfg = cls()
    fields = {f.name: f for f in dataclasses.fields(cls)}
    given = set()
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            raise ConfigError(f"expected --key=value, got {arg!r}")
        key, value = arg[2:].split("=", 1)
        if key not in fields:
            raise ConfigError(f"unknown config key {key!r}; known keys: {', '.join(fields)}")
        kind = type(getattr(cfg, key))
        if kind is tuple:  # a list of strings: repeat the key or separate with commas
            items = tuple(v for v in value.split(",") if v)
            setattr(cfg, key, (getattr(cfg, key) if key in given else ()) + items)
            given.add(key)
            continue
        try:
            if kind is bool:
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                parsed = value.lower() in ("true", "1")
            else:
                parsed = kind(value)
        except ValueError:
            raise ConfigError(f"--{key} expects {kind.__name__}, got {value!r}") from None
        setattr(cfg, key, parsed)
    return cfg


def print_config(cfg, log):
    log("config: " + " ".join(f"{k}={v}" for k, v in dataclasses.asdict(cfg).items()))


# ----------------------------------------------------------------------------- distributed
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: str = "cpu"

    @property
    def main(self):
        return self.rank == 0


def setup_distributed(device="auto"):
    """DDP when launched by torchrun (RANK set): gloo on CPU, nccl on GPU. Otherwise one process."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if "RANK" not in os.environ:
        return Dist(0, 1, device)
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    if device == "cuda":
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return Dist(rank, world, device)


def make_logger(d: Dist):
    from tqdm import tqdm
    return (lambda msg: tqdm.write(str(msg))) if d.main else (lambda msg: None)


def all_mean(x, d: Dist):
    """Mean of a tensor over ranks (identity on one process)."""
    if d.world > 1:
        x = x.clone()
        dist.all_reduce(x)
        x /= d.world
    return x


def prepare_out_dir(path, resume, overwrite, marker="state.safetensors"):
    """Refuse to write over another run's output unless asked."""
    if os.path.isdir(path) and os.listdir(path) and not (resume or overwrite):
        raise FileExistsError(f"{path} already holds a run; pass --resume=true to continue it "
                              f"or --overwrite=true to replace it, or choose another --out_dir")
    if resume and not os.path.exists(os.path.join(path, marker)):
        raise FileExistsError(f"--resume=true but {os.path.join(path, marker)} does not exist")
    if overwrite and not resume and os.path.isdir(path):
        for name in os.listdir(path):  # an overwritten run leaves nothing of the old one (its log included)
            if os.path.isfile(os.path.join(path, name)):
                os.remove(os.path.join(path, name))
    os.makedirs(path, exist_ok=True)


# ----------------------------------------------------------------------------- optimisation safety
class EMA:
    """An exponential moving average of the weights; sample and save from `ema.model`."""

    def __init__(self, model, decay):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model, step):
        # Warm the decay up, (1 + step) / (10 + step): a fixed 0.999 from step 0 would keep 0.999^n of the
        # initial weights (16 % after 1800 steps), and adaLN-Zero's initial model outputs nothing.
        decay = min(self.decay, (1 + step) / (10 + step))
        for e, p in zip(self.model.parameters(), model.parameters()):
            e.lerp_(p.detach(), 1 - decay)


def clip_gradients(params, max_norm):
    """Global grad-norm clipping; returns the norm before clipping (inf/nan pass through for the guard)."""
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm, error_if_nonfinite=False))


def warmup_cosine(step, base_lr, warmup, total, final_frac=0.1):
    """Linear warmup, then cosine decay to final_frac * base_lr at `total` steps."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base_lr * (final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * progress)))


class NonFiniteGuard:
    """Skip any step whose loss or grad norm is NaN/Inf instead of letting it poison the weights."""

    def __init__(self):
        self.skipped = 0

    def ok(self, loss, grad_norm):
        if math.isfinite(float(loss)) and math.isfinite(float(grad_norm)):
            return True
        self.skipped += 1
        return False


def optimizer_tensors(opt, named_params):
    """AdamW state as flat tensors keyed by parameter name, so it fits in a safetensors file."""
    out = {}
    for name, p in named_params:
        for k, v in opt.state.get(p, {}).items():
            out[f"opt.{name}.{k}"] = v if torch.is_tensor(v) else torch.tensor(float(v))
    return out


def load_optimizer_tensors(opt, named_params, tensors):
    for name, p in named_params:
        state = {k.split(".")[-1]: v.to(p.device) for k, v in tensors.items() if k.startswith(f"opt.{name}.")
                 and k[len(f"opt.{name}."):].count(".") == 0}
        if state:
            if "step" in state:
                state["step"] = state["step"].cpu()  # AdamW keeps its step count on the CPU
            opt.state[p] = state
