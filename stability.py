"""What keeps a postflow run safe, shared by every stage. Imports nothing from the project: the floor.

Optimisation: EMA weights, global grad-norm clipping that returns the norm, LR warmup, a guard that skips
a step whose loss or gradient is not finite (and stops a run that keeps producing them), rollback on a
spike, and a monitor that stops a stage that starts hacking its reward.
Runs: typed `--key=value` configs that refuse unknown keys and out-of-range values, output folders that are never overwritten unasked
(and never before the inputs are checked), and one-line errors for every mistake a user can make.
"""
import atexit
import copy
import dataclasses
import errno
import fcntl
import json
import math
import os
import re
import shlex
import signal
import socket
import sys
import time

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


class Terminated(Exception):
    """SIGTERM (a scheduler, a `kill`, torchrun ending the ranks of a failed job), raised where the run is."""


def on_sigterm(signum, frame):
    raise Terminated()


def run_cli(main, argv):
    """Run main(argv); turn the errors a user can cause into one line on stderr and exit code 2 (SIGTERM: 143,
    Ctrl-C: 130, the signals' conventional codes)."""
    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:   # a file system that refuses a path or a write, wherever it happens
        what = f"{e.filename}: " if e.filename else ""
        print(f"error: {what}{e.strerror or e}; every file already written is whole (temp file, then rename)",
              file=sys.stderr)
        sys.exit(2)
    except Terminated:
        print("terminated (SIGTERM): the last checkpoint is kept; rerun with --resume=true to continue", file=sys.stderr)
        sys.exit(143)
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
        if key == "seed" or key.endswith("_seed"):
            check_seed(parsed, f"--{key}")
        setattr(cfg, key, parsed)
    return cfg


SEED_LIMIT = 2 ** 62   # torch's generators take [-2**63, 2**64); a stage offsets its seed by small numbers


def check_seed(seed, flag):
    if not 0 <= seed < SEED_LIMIT:
        raise ConfigError(f"{flag} must be in [0, 2**62), the range a stage can offset and still seed a generator; "
                          f"got {seed}")


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
RUN_LOCK = "postflow-run.lock"     # flock'ed by the one process that owns the folder, from its claim to its exit
RUN_FILES = ("ckpt.safetensors", "state.safetensors", "state.prev.safetensors", "log.jsonl", "samples.gif")


def seeded(seed, step):
    """The generator of one step of a seeded stream: the same (seed, step) draws the same numbers on any rank and
    after any resume."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) % (2 ** 63))


def atomic_write(path, write, keep_as=None):
    """write(tmp) then rename onto path: a reader sees the old file or the new one, never half of one. The temp name
    is path + '.tmp' + pid, the only temp name postflow writes (a resume removes exactly those). A full disk is an
    OSError, also where safetensors reports it as its own error. keep_as: where the replaced file goes first."""
    tmp = temp_name(path)
    try:
        write(tmp)
    except BaseException as e:  # a full disk (or a Ctrl-C) must not leave a half-written temp file behind
        if os.path.exists(tmp):
            os.remove(tmp)
        code = re.search(r"os error (\d+)", str(e)) if not isinstance(e, OSError) else None
        if code:
            raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), path) from None
        if isinstance(e, OSError) and not e.filename:                        # name the file the write was for
            raise OSError(e.errno, e.strerror, path) from None
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
    if os.path.islink(path) and not os.path.exists(path):
        raise ConfigError(f"{flag}={path} is a symlink to {os.readlink(path)}, which does not exist")
    up = os.path.dirname(os.path.abspath(path))
    while up and not os.path.exists(up):
        up = os.path.dirname(up)
    if up and not os.path.isdir(up):
        raise ConfigError(f"{flag}={path} lies under {up}, which is a file")
    if folder and os.path.isfile(path):
        raise ConfigError(f"{flag}={path} is a file; name a folder")
    if not folder and os.path.isdir(path):
        raise ConfigError(f"{flag}={path} is a folder; name a file")
    check_path_length(path, flag, up or "/")


def check_path_length(path, flag, up):
    """A path the file system (the one holding `up`, its nearest existing folder) takes, with the longest name
    written there (a folder's files, a file's temp suffix)."""
    name_max, path_max = os.pathconf(up, "PC_NAME_MAX"), os.pathconf(up, "PC_PATH_MAX")
    suffix = len(".tmp") + len(str(2 ** 22))                                  # atomic_write's, with Linux's largest pid
    longest = max(len(n) for n in os.path.abspath(path).split(os.sep))
    if longest + suffix > name_max or len(os.path.abspath(path)) + 64 > path_max:
        raise ConfigError(f"{flag}={path[:60]}...: a name of {longest} characters (or a path of "
                          f"{len(os.path.abspath(path))}) is longer than the file system takes with the files written "
                          f"there ({name_max - suffix} per name, {path_max - 64} per path)")


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


def temp_name(path):
    """atomic_write's temp file for path: path + '.tmp' + the writer's pid, the only temp name postflow writes."""
    return f"{path}.tmp{os.getpid()}"


def is_temp_of(name, names):
    """Whether `name` is exactly a temp file atomic_write gives one of `names` (NAME.tmp + digits, nothing else)."""
    return any(re.fullmatch(re.escape(n) + r"\.tmp[0-9]+", name) for n in names)


def is_run_file(name, writes):
    """The names a run may leave in its folder: the marker, the lock, its own files and exactly their temp files."""
    return name in (RUN_MARKER, RUN_LOCK, *writes) or is_temp_of(name, (RUN_MARKER, *writes))


# ----------------------------------------------------------------------------- one run per folder
_LOCKS = {}   # real path of a folder -> (fd, lock file, whether this process made the folder)


def lock_run_folder(path):
    """Take the folder's lock before anything in it is read, written or removed: an exclusive flock on RUN_LOCK. The
    kernel drops a flock when its holder dies, so a killed run's lock is free to the next run, which says so; a lock
    whose holder lives is one line naming it. Held until the stage ends or this process exits (a process may claim
    its folder again); then the lock file goes, and a folder this process made and left empty goes too."""
    key = os.path.realpath(path)
    if key in _LOCKS:
        return
    made = not os.path.isdir(path)
    os.makedirs(path, exist_ok=True)
    lock = os.path.join(path, RUN_LOCK)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = lock_holder(fd)
            os.close(fd)
            raise OutputExists(f"{path} is in use by another run ({holder or 'a process starting up'}); wait for it "
                               f"to end or choose another --out_dir") from None
        try:   # its last holder may have removed the file between our open and our flock: lock the one at the path
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    left = lock_holder(fd)
    if left:
        print(f"note: {path} was last locked by {left}, which is gone (killed?); this run takes the folder over")
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv),
                              "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode(), 0)
    if not _LOCKS:
        atexit.register(release_run_folders)
    _LOCKS[key] = (fd, lock, made and path)


def lock_holder(fd):
    """Who a lock file says holds it: 'pid N on HOST since T: COMMAND', or '' for an empty or unreadable file."""
    try:
        h = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"pid {h['pid']} on {h['host']} since {h['since']}: {h['command'][:120]}" if h else ""
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def release_run_folders(*paths):
    """Drop the locks this process holds on `paths` (a stage's end), or on every folder (at exit): the lock file goes
    first, so that no one locks a removed file."""
    keys = [os.path.realpath(p) for p in paths] if paths else list(_LOCKS)
    for fd, lock, made in (_LOCKS.pop(k) for k in keys if k in _LOCKS):
        try:
            os.remove(lock)
            if made and not os.listdir(made):
                os.rmdir(made)
        except OSError:
            pass
        os.close(fd)


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
        if f and os.path.dirname(os.path.realpath(f)) == os.path.realpath(path) and is_run_file(os.path.basename(f), writes):
            raise OutputExists(f"{f}, an input of this run, is a file the run writes in {path}; copy it elsewhere or "
                               f"choose another --out_dir")
    lock_run_folder(path)
    try:
        prepare_run_folder(path, resume, overwrite, stage, writes, command)
    except BaseException:   # a refused claim leaves the folder as it found it, unlocked
        release_run_folders(path)
        raise


def prepare_run_folder(path, resume, overwrite, stage, writes, command):
    """claim_out_dir's work once the folder is locked: refuse, or clear the old run's own files, and mark it."""
    held = sorted(n for n in os.listdir(path) if n != RUN_LOCK)
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
        foreign = [n for n in held if not is_run_file(n, theirs) or not os.path.isfile(os.path.join(path, n))]
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
        if is_temp_of(name, (RUN_MARKER, *writes)):
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


class Floor:
    """Constrained RL's dual ascent (RCPO): maximise the targeted reward subject to each held head h staying within
    margin_h of its level at the start, J_h >= start_h - margin_h. One Lagrange multiplier per held head, updated once
    an iteration from the head's measured level m_h:

        lambda_h <- max(0, lambda_h + rate * (start_h - guard * margin_h - m_h) / margin_h)

    so it rises while the head sits below a guard line `guard` margins under its start (0.5: the middle of the
    allowed band, for a measure that is noisy and acts an iteration late; 1.0: the floor's edge) and relaxes
    back to 0 while the head holds. The stage decides what a multiplier turns; the first update only records the
    start. Plain floats: the state is JSON, exact across a resume."""

    def __init__(self, margins, rate=1.0, guard=0.5):
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
