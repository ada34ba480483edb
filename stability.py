"""What keeps a postflow run safe, shared by every stage. Imports nothing from the project: the floor.

Optimisation: EMA weights, global grad-norm clipping that returns the norm, LR warmup, a guard that skips
a step whose loss or gradient is not finite (and stops a run that keeps producing them), rollback on a
spike, and a monitor that stops a stage that starts hacking its reward.
Runs: typed `--key=value` configs that refuse unknown keys and out-of-range values, output folders that are never overwritten unasked
(and never before the inputs are checked), and one-line errors for every mistake a user can make.
"""
import copy
import dataclasses
import errno
import fnmatch
import json
import math
import os
import re
import shlex
import sys

import torch
import torch.distributed as dist


# ----------------------------------------------------------------------------- errors and the CLI
class UserError(Exception):
    """A mistake the user can fix (a bad flag, a missing or wrong file): one line on stderr, exit code 2."""


class ConfigError(UserError, ValueError):
    """A command line the script cannot run: unknown key, wrong type, or values that do not fit."""


class OutputExists(UserError, FileExistsError):
    """An output folder that holds another run, or a run that cannot be resumed as asked."""


class Diverged(UserError):
    """Training that keeps producing non-finite losses or gradients: the weights or the data hold NaN/Inf."""


def run_cli(main, argv):
    """Run main(argv); turn the errors a user can cause into one line on stderr and exit code 2."""
    try:
        main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS):
            raise
        print(f"error: cannot write {e.filename or 'the output'}: {e.strerror}; the last complete checkpoint "
              f"is kept", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: the last checkpoint is kept; rerun with --resume=true to continue", file=sys.stderr)
        sys.exit(130)
    except RuntimeError as e:   # a torchrun job whose peer left mid-collective (dist.DistError is one): one line
        if "RANK" not in os.environ or not any(m in str(e) for m in PEER_LOST):
            raise
        print(f"error: lost contact with another rank ({str(e).splitlines()[0][:160]}): it stopped (its own error, if "
              f"any, is above) or its node died; the last checkpoint is kept: relaunch every node with --resume=true",
              file=sys.stderr)
        sys.exit(2)


# What gloo and NCCL say when a rank's peer is gone (its process or node died, or its links went down). gloo says so
# at once; NCCL may first wait for its watchdog's timeout.
PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "NCCL communicator was aborted",
             "remote process exited or there was a network error")


def subcommand(commands, script, argv):
    """The function a script's first argument names (judge.py train ...): a missing or unknown one is a
    ConfigError, exit 2, like every other bad command line."""
    if not argv or argv[0] not in commands:
        got = f"unknown command {argv[0]!r}" if argv else "no command"
        raise ConfigError(f"{got}; usage: python {script} {{{'|'.join(commands)}}} [--key=value ...]")
    return commands[argv[0]]


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
        if kind is float and not math.isfinite(parsed):
            raise ConfigError(f"--{key} must be a finite number, got {value!r}")
        setattr(cfg, key, parsed)
    return cfg


def check_ranges(cfg, at_least_one=(), positive=(), non_negative=(), fraction=(), choices=None):
    """Refuse values outside their range, naming the key: counts >= 1, rates > 0, weights >= 0, [0, 1), and
    choices {key: allowed values}."""
    for k, allowed in (choices or {}).items():
        if str(getattr(cfg, k)).lower() not in allowed:
            raise ConfigError(f"--{k} must be one of {', '.join(allowed)}; got {getattr(cfg, k)!r}")
    for keys, ok, what in ((at_least_one, lambda v: v >= 1, "at least 1"), (positive, lambda v: v > 0, "> 0"),
                           (non_negative, lambda v: v >= 0, ">= 0"), (fraction, lambda v: 0 <= v < 1, "in [0, 1)")):
        for k in keys:
            v = getattr(cfg, k)
            if not (math.isfinite(v) and ok(v)):
                raise ConfigError(f"--{k} must be {what}, got {v}")


def available_memory(device="cpu"):
    """Bytes a run may still allocate: the GPU's free memory, or the machine's available RAM."""
    if str(device).startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def check_fits(n_bytes, what, device="cpu"):
    """Refuse, before anything is allocated, a size that cannot fit: one line naming it, not the allocator's traceback."""
    have = available_memory(device)
    if n_bytes > have:
        raise ConfigError(f"{what} needs about {n_bytes / 2 ** 30:,.1f} GiB but {device} has {have / 2 ** 30:,.1f} GiB "
                          f"available; lower it")


def print_config(cfg, log):
    log("config: " + " ".join(f"{k}={v}" for k, v in dataclasses.asdict(cfg).items()))


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


# ----------------------------------------------------------------------------- outputs: nothing lost
RUN_MARKER = "postflow-run.json"   # written first into every folder a run claims: what makes a folder a run
RUN_FILES = ("ckpt.safetensors", "state.safetensors", "state.prev.safetensors", "log.jsonl", "samples.gif")


def seeded(seed, step):
    """The generator of one step of a seeded stream: the same (seed, step) draws the same numbers on any rank and
    after any resume."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) % (2 ** 63))


def atomic_write(path, write, keep_as=None):
    """write(tmp) then rename onto path: a reader sees the old file or the new one, never half of one. The temp name
    is path + '.tmp' + pid, the only temp name postflow writes (a resume removes exactly those). A full disk is an
    OSError, also where safetensors reports it as its own error. keep_as: where the replaced file goes first."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
    except BaseException as e:  # a full disk (or a Ctrl-C) must not leave a half-written temp file behind
        if os.path.exists(tmp):
            os.remove(tmp)
        code = re.search(r"os error (\d+)", str(e)) if not isinstance(e, OSError) else None
        if code:
            raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), path) from None
        raise
    if keep_as and os.path.exists(path):
        os.replace(path, keep_as)
    os.replace(tmp, path)


def write_text(path, text):
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    atomic_write(path, write)


def check_output_path(path, flag, folder):
    """An output path that can be written: not empty, not under a file, a folder where one is meant and a file
    where a file is. One line naming the flag otherwise."""
    if not path:
        raise ConfigError(f"{flag} is empty; name a {'folder' if folder else 'file'}")
    up = os.path.dirname(os.path.abspath(path))
    while up and not os.path.exists(up):
        up = os.path.dirname(up)
    if up and not os.path.isdir(up):
        raise ConfigError(f"{flag}={path} lies under {up}, which is a file")
    if folder and os.path.isfile(path):
        raise ConfigError(f"{flag}={path} is a file; name a folder")
    if not folder and os.path.isdir(path):
        raise ConfigError(f"{flag}={path} is a folder; name a file")


def same_file(a, b):
    return bool(a) and bool(b) and os.path.realpath(a) == os.path.realpath(b)


def claim_out_file(path, overwrite, inputs=(), flag="--out"):
    """A single output file: refused if it exists (unless --overwrite=true) or is one of the command's inputs."""
    check_output_path(path, flag, folder=False)
    for f in inputs:
        if same_file(path, f):
            raise ConfigError(f"{flag}={path} is also an input of this command ({f}); write it elsewhere")
    if os.path.exists(path) and not overwrite:
        raise OutputExists(f"{path} exists; pass --overwrite=true to replace it")


def matches(name, patterns):
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def run_files(writes):
    """The names a run may leave in its folder: its own files, their temp files, and the marker."""
    return (RUN_MARKER, *writes, *(f"{w}.tmp*" for w in writes))


def command_line(script, cfg):
    """The command that runs `script` with cfg: python, the script, and each setting that differs from its default."""
    value = lambda v: ",".join(v) if isinstance(v, tuple) else str(v).lower() if isinstance(v, bool) else str(v)
    flags = [f"--{k}={value(v)}" for k, v in dataclasses.asdict(cfg).items() if v != getattr(type(cfg)(), k)]
    return " ".join(["python", script, *map(shlex.quote, flags)])


def claim_out_dir(path, resume, overwrite, inputs=(), stage="", writes=RUN_FILES, command=""):
    """Make path ready for a run. Call it after every input has been checked: nothing is deleted before.

    --overwrite=true replaces a postflow run and nothing else: a folder is a run when it holds RUN_MARKER, and only
    the names its marker lists are removed. A folder holding anything else (sources, checkpoints no run wrote there,
    another tool's files, subfolders) is refused, naming what it holds. No input may be a file the run writes."""
    check_output_path(path, "--out_dir", folder=True)
    for f in inputs:
        if f and os.path.dirname(os.path.realpath(f)) == os.path.realpath(path) and matches(os.path.basename(f), run_files(writes)):
            raise OutputExists(f"{f}, an input of this run, is a file the run writes in {path}; copy it elsewhere or "
                               f"choose another --out_dir")
    held = sorted(os.listdir(path)) if os.path.isdir(path) else []
    if held and not (resume or overwrite):
        raise OutputExists(f"{path} already holds {'a run' if RUN_MARKER in held else 'files'}; pass --resume=true to "
                           f"continue it or --overwrite=true to replace it, or choose another --out_dir")
    if resume:
        prev = "state.prev.safetensors"
        if not any(os.path.exists(os.path.join(path, m)) for m in ("state.safetensors", prev)):
            raise OutputExists(f"--resume=true but {os.path.join(path, 'state.safetensors')} does not exist")
    elif held:
        if RUN_MARKER not in held:
            raise OutputExists(f"--overwrite=true replaces a postflow run only, and {path} is not one (no {RUN_MARKER}); "
                               f"it holds {describe(held)}: choose another --out_dir")
        theirs = read_marker(path).get("writes", [])
        foreign = [n for n in held if not matches(n, run_files(theirs)) or not os.path.isfile(os.path.join(path, n))]
        if foreign:
            raise OutputExists(f"--overwrite=true would replace the run in {path}, but the folder also holds what the run "
                               f"did not write: {describe(foreign)}; move it away or choose another --out_dir")
        for name in held:   # the old run's own files, its log included: nothing of it is left to mix with the new
            if name != RUN_MARKER:
                os.remove(os.path.join(path, name))
    os.makedirs(path, exist_ok=True)
    if not resume or RUN_MARKER not in held:
        write_text(os.path.join(path, RUN_MARKER), json.dumps({"stage": stage, "writes": list(writes),
                                                               "command": command}, indent=1))


def describe(names, n=5):
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def read_marker(path):
    try:
        with open(os.path.join(path, RUN_MARKER)) as f:
            marker = json.load(f)
        assert isinstance(marker, dict) and all(isinstance(w, str) for w in marker.get("writes", []))
        return marker
    except (OSError, ValueError, AssertionError):
        raise OutputExists(f"{os.path.join(path, RUN_MARKER)} is broken; check the folder and delete it yourself") from None


def remove_stale_temps(path):
    """After a resume's settings are checked: remove the temp files a kill left behind, exactly the names
    atomic_write gives the files this run writes (NAME.tmpPID), nothing else."""
    writes = read_marker(path).get("writes", RUN_FILES) if os.path.exists(os.path.join(path, RUN_MARKER)) else RUN_FILES
    for name in os.listdir(path):
        if matches(name, [f"{w}.tmp[0-9]*" for w in (RUN_MARKER, *writes)]):
            os.remove(os.path.join(path, name))


def open_log(path, offset=None):
    """The run's log.jsonl for appending; on resume, cut back to the checkpoint's offset first, so records
    written after the last checkpoint (and repeated by the resumed run) appear once."""
    if offset is not None and os.path.exists(path):
        with open(path, "r+b") as f:
            f.truncate(min(offset, os.path.getsize(path)))
    return open(path, "a")


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
            if p.requires_grad:  # frozen weights do not move (and a LoRA policy's copies share them)
                e.lerp_(p.detach(), 1 - decay)


def clip_gradients(params, max_norm):
    """Global grad-norm clipping; returns the norm before clipping (inf/nan pass through for the guard). Sharded
    gradients give the norm over every rank's shards."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm, error_if_nonfinite=False)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


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


class SpikeGuard:
    """Rollback to the last good weights when a statistic (grad norm, KL) jumps far above its recent median.

    Call `snapshot` after a good iteration and `check` with this iteration's statistics (the same on every
    rank: reduce them first); a spike restores the snapshot into the model and optimizer and returns True."""

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
        if spike and self.saved is not None:  # copies again: the optimizer would step the snapshot's own tensors
            model.load_state_dict(copy.deepcopy(self.saved[0]))
            opt.load_state_dict(copy.deepcopy(self.saved[1]))
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
