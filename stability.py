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


def save_run_state(path, net, ema, opt, lineage, step):
    """A run's resumable state in one safetensors file: weights, EMA weights, AdamW moments, the step."""
    import model as M
    tensors = {**{f"model.{k}": v for k, v in net.state_dict().items()},
               **{f"ema.{k}": v for k, v in ema.model.state_dict().items()},
               **optimizer_tensors(opt, net.named_parameters())}
    M.save_checkpoint(path, tensors, net.cfg, lineage, step=step)


def load_run_state(path, net, ema, opt):
    """Restore what save_run_state wrote into net, ema and opt; returns the step to continue from."""
    import model as M
    tensors, saved_cfg, meta = M.read_checkpoint(path)
    M.check_config(saved_cfg, net.cfg, path)
    M.load_weights(net, tensors, path, prefix="model.")
    M.load_weights(ema.model, tensors, path, prefix="ema.")
    load_optimizer_tensors(opt, net.named_parameters(), tensors)
    return meta["step"]


def load_optimizer_tensors(opt, named_params, tensors):
    for name, p in named_params:
        state = {k.split(".")[-1]: v.to(p.device) for k, v in tensors.items() if k.startswith(f"opt.{name}.")
                 and k[len(f"opt.{name}."):].count(".") == 0}
        if state:
            if "step" in state:
                state["step"] = state["step"].cpu()  # AdamW keeps its step count on the CPU
            opt.state[p] = state


# ----------------------------------------------------------------------------- policy-gradient safety (Stages II, III)
def gaussian_kl(mean, mean_ref, step_std):
    """Closed-form KL between two Gaussian steps with the same std: |mean - mean_ref|^2 / (2 step_std^2),
    averaged over the non-batch dimensions (the same mean convention as the log-probs). (B,)"""
    return ((mean.float() - mean_ref.float()) ** 2).mean(dim=tuple(range(1, mean.dim()))) / (2 * step_std ** 2)


def group_advantages(scores, weights, group_size, std_floor, adv_clip):
    """scores (N, heads) for N = groups * group_size rollouts, grouped consecutively.
    Each head is z-scored within each group; groups where a head's std is under the floor get 0 for that
    head. Returns the clipped weighted sum (N,) and the fraction of (group, head) pairs that were zeroed."""
    g = scores.view(-1, group_size, scores.shape[1])                          # (groups, G, heads)
    mean, std = g.mean(1, keepdim=True), g.std(1, keepdim=True, correction=0)
    flat = std < std_floor
    z = torch.where(flat, torch.zeros_like(g), (g - mean) / (std + 1e-4))
    adv = (z * weights).sum(-1).flatten()
    return adv.clamp(-adv_clip, adv_clip), float(flat.float().mean())


def reliability(rm_std):
    """Per-rollout trust in the ensemble: 1.5 where its members agree most, 0.5 where they disagree most."""
    u = rm_std.mean(1)                                                        # (N,) over heads
    return (1 + (u.mean() - u) / (u.mean() + 1e-8)).clamp(0.5, 1.5)


def ppo_clip_loss(logp_new, logp_old, advantages, clip_range):
    """PPO's pessimistic clipped objective per sample, and the ratio and whether it was clipped. (B,) each.
    The ratio of mean log-probs moves little, so clip_range is small (1e-4 .. 1e-2)."""
    ratio = torch.exp(logp_new - logp_old)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)
    return torch.maximum(unclipped, clipped), ratio.detach(), ((ratio - 1).abs() > clip_range).detach()


def average_gradients(params, d: Dist):
    """Mean the gradients over ranks by hand: the loop calls the model several times per update (CFG halves,
    several denoising steps), which DDP's one-forward-one-backward hooks do not fit."""
    if d.world > 1:
        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= d.world


def gather_rows(x, d: Dist):
    """Every rank's x (n, ...) stacked in rank order, (world * n, ...), on every rank; x itself with one rank."""
    if d.world == 1:
        return x
    parts = [torch.zeros_like(x) for _ in range(d.world)]
    dist.all_gather(parts, x)
    return torch.cat(parts)


class SpikeGuard:
    """Rollback to the last good weights when a statistic (grad norm, KL) jumps far above its recent median.

    Call `snapshot` after a good iteration and `check` with this iteration's statistics; a spike restores the
    snapshot into the model and optimizer and returns True."""

    def __init__(self, factor=10.0, history=20, warmup=5):
        self.factor, self.history, self.warmup = factor, history, warmup
        self.seen, self.saved, self.rollbacks = {}, None, 0

    def snapshot(self, model, opt):
        self.saved = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()))

    def check(self, model, opt, **stats):
        spike = []
        for k, v in stats.items():
            past = self.seen.setdefault(k, [])
            if len(past) >= self.warmup and (not math.isfinite(v) or v > self.factor * max(sorted(past)[len(past) // 2], 1e-12)):
                spike.append(k)
        if spike and self.saved is not None:
            model.load_state_dict(self.saved[0])
            opt.load_state_dict(self.saved[1])
            self.rollbacks += 1
            return True
        for k, v in stats.items():
            self.seen[k] = (self.seen[k] + [v])[-self.history:]
        return False


class HackingMonitor:
    """Stop a stage when the held-out judge falls for `patience` evaluations in a row while the trained
    reward rises over the same span: the policy is exploiting the reward, not getting better."""

    def __init__(self, patience=3, tolerance=0.0):
        self.patience, self.tolerance, self.held_out, self.trained = patience, tolerance, [], []

    def update(self, held_out, trained):
        self.held_out.append(held_out)
        self.trained.append(trained)
        h, r = self.held_out[-self.patience - 1:], self.trained[-self.patience - 1:]
        if len(h) <= self.patience:
            return False
        falling = all(b < a - self.tolerance for a, b in zip(h, h[1:]))
        return falling and r[-1] > r[0]
