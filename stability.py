"""What keeps a postflow run stable, shared by every stage; it imports only cli.py's errors.

EMA weights, global grad-norm clipping that returns the norm, LR warmup, a guard that skips a step whose loss or
gradient is not finite (and stops a run that keeps producing them), rollback on a spike, a monitor that stops a
stage that starts hacking its reward, Stage II's floor (dual ascent on held heads), the seeded streams that make
runs reproducible, bfloat16 where it is native, and the count of what a run cost. The command line and the run
folders are cli.py's.
"""
import copy
import math
import os

import torch
import torch.distributed as dist

from cli import Diverged


# ----------------------------------------------------------------------------- bfloat16
def native_bf16():
    """A CPU that computes in bfloat16 (AVX512-BF16 or AMX) rather than emulating it, which is far slower than fp32
    (docs/results.md, Emulated bfloat16)."""
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    return "avx512_bf16" in flags or "amx_bf16" in flags


def bf16_autocast(setting, device, allowed=True):
    """bfloat16 autocast as a --bf16 setting says: 'true', 'false', or 'auto' = on GPUs and CPUs that compute it."""
    kind = torch.device(device).type
    on = {"true": True, "false": False}.get(str(setting).lower(), kind == "cuda" or native_bf16())
    return torch.autocast(kind, torch.bfloat16, enabled=on and allowed)


# ----------------------------------------------------------------------------- what a run cost
class Cost:
    """What the run has spent, counted in the loop so that update rules compare on any machine: network evaluations
    (one per clip per forward pass of the policy, the reference or the sampler, rollouts and updates alike; held-out
    evaluation and health checks excluded), rollouts, optimizer steps, and seconds of rollout and update. Saved with
    the run, so a resumed run counts on."""

    def __init__(self):
        self.nfe, self.rollouts, self.steps, self.seconds, self.counting, self.before = 0, 0, 0, 0.0, False, 0

    def watch(self, *nets):
        cores = {id(c): c for c in (getattr(getattr(n, "policy", n), "transformer", n) for n in nets)}  # an adapter's
        for core in cores.values():                                            # network, counted once
            core.register_forward_pre_hook(self.count, with_kwargs=True)

    def count(self, module, args, kwargs):
        x = next((a for a in (*args, *kwargs.values()) if torch.is_tensor(a)), None)
        self.nfe += (len(x) if x is not None and x.dim() else 1) if self.counting else 0

    def begin(self):
        """Count from here: an iteration's rollouts and updates."""
        self.before, self.counting = self.nfe, True

    def end(self, d, rollouts, seconds):
        """Stop counting; the iteration's evaluations summed over ranks (each counted its own share), its rollouts
        and rank 0's seconds added."""
        self.counting = False
        mine = torch.tensor(float(self.nfe - self.before))
        if d.ranks > 1:
            dist.all_reduce(mine)                                             # summed over ranks
        self.nfe = self.before + round(mine.item())
        self.rollouts, self.seconds = self.rollouts + rollouts, self.seconds + seconds

    def state_dict(self):
        return {"nfe": self.nfe, "rollouts": self.rollouts, "steps": self.steps, "seconds": self.seconds}

    def load_state_dict(self, s):
        self.nfe, self.rollouts, self.steps, self.seconds = s["nfe"], s["rollouts"], s["steps"], s["seconds"]


def seeded(seed, step):
    """The generator of one step of a seeded stream: the same (seed, step) draws the same numbers on any rank and
    after any resume."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) % (2 ** 63))


# ----------------------------------------------------------------------------- optimisation safety
class EMA:
    """An exponential moving average of the weights; sample and save from `ema.model`."""

    def __init__(self, model, decay, warmup=True):
        self.decay, self.warmup = decay, warmup
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model, step):
        # Warm the decay up, (1 + step) / (10 + step): a fixed 0.999 from step 0 would keep 0.999^n of the
        # initial weights (16 % after 1800 steps), and adaLN-Zero's initial model outputs nothing. A model
        # that starts trained (warmup=False) is worth keeping: the full decay from the first step averages
        # the steps' noise out around it.
        decay = min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay
        for e, p in zip(self.model.parameters(), model.parameters()):
            if p.requires_grad:  # frozen weights do not move (and a LoRA policy's copies share them)
                e.lerp_(p.detach(), 1 - decay)


def clip_gradients(params, max_norm):
    """Global grad-norm clipping; returns the norm before clipping (inf/nan pass through for the guard). Sharded
    gradients give the norm over every rank's shards."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm, error_if_nonfinite=False)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def linear_warmup(step, base_lr, warmup):
    """Linear warmup over `warmup` steps, then constant."""
    return base_lr * (step + 1) / warmup if step < warmup else base_lr


def warmup_cosine(step, base_lr, warmup, total, final_frac=0.1):
    """Linear warmup, then cosine decay to final_frac * base_lr at `total` steps."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base_lr * (final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * progress)))


class NonFiniteGuard:
    """Skip any step whose loss or grad norm is NaN/Inf instead of letting it poison the weights; stop the run
    when `limit` steps in a row are skipped, since then the weights or the data are broken, not one batch."""

    def __init__(self, limit=5):
        self.skipped, self.in_a_row, self.limit = 0, 0, limit

    def ok(self, loss, grad_norm):
        if math.isfinite(float(loss)) and math.isfinite(float(grad_norm)):
            self.in_a_row = 0
            return True
        self.skipped += 1
        self.in_a_row += 1
        if self.in_a_row >= self.limit:
            raise Diverged(f"{self.in_a_row} steps in a row had a non-finite loss or gradient; the last checkpoint "
                           f"is kept. Check the input weights and data, or lower --lr")
        return False

    def state_dict(self):
        return {"skipped": self.skipped, "in_a_row": self.in_a_row}

    def load_state_dict(self, s):
        self.skipped, self.in_a_row = s["skipped"], s["in_a_row"]


def check_trained(skipped, steps, kept, val_loss=None):
    """The end of a stage: a run that skipped every step it took, or whose weights give a non-finite validation loss,
    trained nothing usable, and says so in one line naming the checkpoint it kept instead of exiting 0."""
    if steps and skipped >= steps:
        raise Diverged(f"all {steps} steps were skipped (a non-finite loss or gradient each time): nothing was trained; "
                       f"{kept} holds the input's weights. Check the input weights and data, or lower --lr")
    if val_loss is not None and not math.isfinite(val_loss):
        raise Diverged(f"the validation flow loss is {val_loss}: the weights give non-finite output; {kept} is not "
                       f"usable. Check the input weights, or lower --lr")


class Snapshot:
    """Copies of the state of modules and optimizers, to return to: the last weights a run judged good."""

    def __init__(self, *parts):   # anything with state_dict / load_state_dict
        self.parts = parts
        self.take()

    def take(self):
        self.saved = [copy.deepcopy(p.state_dict()) for p in self.parts]

    def restore(self):            # copies again: the optimizer would step the snapshot's own tensors
        for part, saved in zip(self.parts, self.saved):
            part.load_state_dict(copy.deepcopy(saved))


class SpikeGuard:
    """Rollback to the last good weights when a statistic (grad norm, KL) jumps far above its recent median.

    Call `snapshot` after a good iteration and `check` with this iteration's statistics (the same on every
    rank: reduce them first); a spike restores the snapshot into the model and optimizer and returns True."""

    def __init__(self, factor=10.0, history=20, warmup=5):
        self.factor, self.history, self.warmup = factor, history, warmup
        self.seen, self.saved, self.rollbacks = {}, None, 0

    def snapshot(self, model, opt):
        self.saved = Snapshot(model, opt)

    def check(self, model, opt, **stats):
        spike = []
        for k, v in stats.items():
            past = self.seen.setdefault(k, [])
            if len(past) >= self.warmup and (not math.isfinite(v) or v > self.factor * max(sorted(past)[len(past) // 2], 1e-12)):
                spike.append(k)
        if spike and self.saved is not None:
            self.saved.restore()
            self.rollbacks += 1
            return True
        for k, v in stats.items():
            self.seen[k] = (self.seen[k] + [v])[-self.history:]
        return False

    def state_dict(self):  # the snapshot is the weights themselves at every checkpoint: not stored twice
        return {"seen": self.seen, "rollbacks": self.rollbacks}

    def load_state_dict(self, s):
        self.seen, self.rollbacks = {k: list(v) for k, v in s["seen"].items()}, s["rollbacks"]


class HackingMonitor:
    """Stop a stage when the held-out oracle score falls for `patience` evaluations in a row while the trained
    reward overstates it more at the end of that span than at its start (rising, or falling less): the gap between
    proxy and truth widens, so the policy is exploiting the reward, not getting better. Both are the same heads under
    the same weights, the trained one on rollouts, the held-out one on fixed prompts and noise."""

    def __init__(self, patience=3, tolerance=0.0):
        self.patience, self.tolerance, self.held_out, self.trained = patience, tolerance, [], []

    def update(self, held_out, trained):
        self.held_out.append(held_out)
        self.trained.append(trained)
        h, r = self.held_out[-self.patience - 1:], self.trained[-self.patience - 1:]
        if len(h) <= self.patience:
            return False
        falling = all(b < a - self.tolerance for a, b in zip(h, h[1:]))
        return falling and r[-1] - h[-1] > r[0] - h[0]

    def state_dict(self):
        return {"held_out": self.held_out, "trained": self.trained}

    def load_state_dict(self, s):
        self.held_out, self.trained = list(s["held_out"]), list(s["trained"])


class Floor:
    """Constrained RL's dual ascent (RCPO): maximise the targeted reward subject to each held head h staying within
    margin_h of its level at the start, J_h >= start_h - margin_h. One Lagrange multiplier per held head, updated once
    an iteration from the head's measured level m_h:

        lambda_h <- max(0, lambda_h + rate * (start_h - guard * margin_h - m_h) / margin_h)

    so it rises while the head sits below a guard line `guard` margins under its start and relaxes back to 0
    while the head holds. The default line is the floor's edge: one at half a margin acted on the probe's noise
    and shrank Stage II's step to a fifth while the held-out clips held (docs/results.md, Stage II holds its
    floor). The stage decides what a multiplier turns; the first update only records the
    start. Plain floats: the state is JSON, exact across a resume."""

    def __init__(self, margins, rate=1.0, guard=1.0):
        self.margins, self.rate, self.guard = dict(margins), rate, guard
        self.start, self.level = {}, {}
        self.multiplier = {h: 0.0 for h in self.margins}

    def update(self, levels):
        self.level = {h: float(levels[h]) for h in self.margins}
        if not self.start:
            self.start = dict(self.level)
            return
        for h, margin in self.margins.items():
            below_guard = (self.start[h] - self.guard * margin - self.level[h]) / margin
            self.multiplier[h] = max(0.0, self.multiplier[h] + self.rate * below_guard)

    def record(self):
        """The floor's part of an iteration's log line: each held head's level, multiplier, and the broken ones."""
        return dict(hold_level={h: round(v, 4) for h, v in self.level.items()},
                    hold_multiplier={h: round(v, 4) for h, v in self.multiplier.items()}, hold_broken=self.broken())

    def broken(self):
        """The held heads whose last measured level is below their floor."""
        return [h for h, m in self.margins.items() if self.level and self.level[h] < self.start[h] - m]

    def state_dict(self):
        return {"start": self.start, "level": self.level, "multiplier": self.multiplier}

    def load_state_dict(self, s):
        self.start, self.level, self.multiplier = dict(s["start"]), dict(s["level"]), dict(s["multiplier"])


if __name__ == "__main__":   # a library module; a command that once lived here says where it went
    import sys
    print("error: stability.py takes no command: the stages import it (run sft.py, reward_rl.py "
          "or preference.py)", file=sys.stderr)
    sys.exit(2)
