"""The command line and the file system, shared by every script: what a user types and what a run writes.

Typed `--key=value` configs that refuse unknown keys and out-of-range values, one-line errors for every mistake a
user can make (run_cli), output folders that are never overwritten unasked (and never before the inputs are
checked), one run per folder (a lock), and atomic writes. Imports nothing from the project: the floor.
"""
import atexit
import dataclasses
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
    code = 0
    try:
        main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    except OSError as e:   # a file system that refuses a path or a write, wherever it happens
        what = f"{e.filename}: " if e.filename else ""
        print(f"error: {what}{e.strerror or e}; every file already written is whole (temp file, then rename)",
              file=sys.stderr)
        code = 2
    except Terminated:
        print("terminated (SIGTERM): the last checkpoint is kept; rerun with --resume=true to continue", file=sys.stderr)
        code = 143
    except KeyboardInterrupt:
        print("interrupted: the last checkpoint is kept; rerun with --resume=true to continue", file=sys.stderr)
        code = 130
    except RuntimeError as e:   # a torchrun job whose peer left mid-collective (dist.DistError is one): one line
        if "RANK" not in os.environ or not any(m in str(e) for m in PEER_LOST):
            raise
        print(f"error: lost contact with another rank ({str(e).splitlines()[0][:160]}): it stopped (its own error, if "
              f"any, is above) or its node died; the last checkpoint is kept: relaunch every node with --resume=true",
              file=sys.stderr)
        code = 2
    leave(code)


def leave(code):
    """End the process with exit status `code`. A rank of a multi-process job ends with os._exit, once its output
    is flushed and its run folders released, skipping the interpreter's teardown: an FSDP mesh keeps gloo's process
    group and its threads alive past destroy_process_group, and tearing them down while the interpreter exits
    aborted a rank now and then ("terminate called without an active exception"; docs/results.md, A rank's
    abort at exit)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        release_run_folders()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    if code:
        sys.exit(code)


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
        renamed = getattr(cls, "RENAMED", {})
        if key not in fields and key in renamed:
            raise ConfigError(f"--{key} is now --{renamed[key]} (the README's Renamed flags)")
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


# ----------------------------------------------------------------------------- outputs: nothing lost
RUN_MARKER = "postflow-run.json"   # written first into every folder a run claims: what makes a folder a run
RUN_LOCK = "postflow-run.lock"     # flock'ed by the one process that owns the folder, from its claim to its exit
RUN_FILES = ("ckpt.safetensors", "state.safetensors", "state.prev.safetensors", "log.jsonl", "samples.gif")


def atomic_write(path, write, keep_as=None):
    """write(tmp) then rename onto path: a reader sees the old file or the new one, never half of one. The temp name
    is path + '.tmp' + pid, the only temp name postflow writes (a resume removes those, and the
    one safetensors writes on its way to it: is_temp_of). A full disk is an OSError, also where
    safetensors reports it as its own error. keep_as: where the replaced file goes first."""
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


# safetensors (0.8 here) saves through a temp file of its own beside its target, '.tmp' + 6
# letters or digits (Rust's tempfile crate), then renames it onto atomic_write's NAME.tmpPID: a
# kill -9 mid-save leaves that name behind
SAFETENSORS_TEMP = r"\.tmp[0-9A-Za-z]{6}"


def is_temp_of(name, names):
    """Whether `name` is exactly a temp file atomic_write gives one of `names` (NAME.tmp + digits,
    nothing else), or, where one of them is a safetensors file, the one safetensors writes on its
    way to it."""
    if any(n.endswith(".safetensors") for n in names) and re.fullmatch(SAFETENSORS_TEMP, name):
        return True
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
