"""postflow's tests: tiny configs, the whole suite in a few minutes on 2 CPU cores.  Run: make test

Read top down: imports, constants, helpers and fixtures first; then one banner per file in the
README's reading order (data, model, Stage I, Stage II, Stage III, rewards / judge / diagnose,
stability / checkpoint / cli); then what cuts across them: bad input, run folders, several
processes, bench and race, the report, and Wan (the extra)."""
import collections
import contextlib
import dataclasses
import hashlib
import html
import importlib.util
import io
import json
import math
import os
import random
import re
import runpy
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback
import types
import warnings
import xml.etree.ElementTree as ElementTree
from concurrent.futures import ThreadPoolExecutor

import imageio.v3 as iio
import pytest
import safetensors.torch
import torch
from safetensors.torch import load_file, save_file

import bench
import checkpoint
import cli
import data
import diagnose
import distributed
import judge
import model as M
import preference
import race
import report
import reward_rl
import rl_objective
import rewards
import sft
import stability

# adapters.py (diffusers' Wan) is the optional extra: the Wan tests import it themselves, so that
# this file imports, and its other tests run, without the extra installed

# One torch thread in this process, as in every process the tests start (OMP_NUM_THREADS=1): tiny
# models gain nothing from a second, and two OpenMP threads spin against any other busy process on
# 2 cores (the tests' own torchrun jobs beside an in-process run)
torch.set_num_threads(1)

HERE = os.path.dirname(os.path.abspath(__file__))
TINY_WORLD = data.WorldConfig(frames=4, size=16)
KILL_TRIALS = int(os.environ.get("POSTFLOW_KILL_TRIALS", "1"))   # `make killtest` runs 10 per stage
CHROMIUM = "/usr/bin/chromium"
# the report's charts: the first screen (each axis by stage, the race); Stage I, II (the floor's two
# included), III curves; drift by frame, by chunk per head; ablations; the race (accuracy against
# evaluations, gain against fidelity, five health signals)
CHARTS = 2 + 2 + 7 + 4 + 2 + len(rewards.HEADS) + 3 + 2 + 5
# the Wan tests skip without the extra (`make test` installs requirements-wan.txt); in CI they fail
HAVE_WAN = all(importlib.util.find_spec(m) for m in ("diffusers", "peft"))
needs_wan = pytest.mark.skipif(not HAVE_WAN and not os.environ.get("CI"),
                               reason="the Wan extra is not installed: pip install -r requirements-wan.txt")
# Stage II's size in the bench and race fixtures' runs, as tiny_rl's: their tables are what's tested
TINY_STAGE_II = ["--prompts_per_iter=2", "--group_size=4", "--rollout_steps=4", "--sft_batch=4",
                 "--hold_probe=2"]
# One pixel's value: a reward with spread in every group (a random tiny VAE draws much the same clip from any latent).
PIXEL = lambda clips, prompts: {"fidelity": torch.zeros(len(clips)), "temporal": torch.zeros(len(clips)),
                                "instruction": clips[:, 0, -1, 64, 64]}


# ==================================================================================================
# Helpers
# ==================================================================================================

# --- the tiny world's pieces

def tiny_model(seed=0, randomize=False):
    torch.manual_seed(seed)
    net = M.VideoDiT(M.preset("tiny"))
    if randomize:  # adaLN-Zero makes a fresh model output 0; give it a response to check conditioning
        with torch.no_grad():
            for p in net.parameters():
                if p.abs().sum() == 0:
                    p.normal_(0, 0.05)
    return net


def tiny_pairs(n=6, seed=0):
    a = data.make_batch("curated", n, seed=seed, world=TINY_WORLD)
    b = data.make_batch("web", n, seed=seed, world=TINY_WORLD, defects=data.Defects().scaled(3.0))
    return {"winner": a.videos, "loser": b.videos, "tokens": a.tokens, "weight": torch.ones(n)}


# --- tiny runs' configs, and reading what a run left

def tiny_sft(out_dir, **kw):
    base = dict(init="", data="web", preset="tiny", out_dir=str(out_dir), steps=6, batch_size=4, lr=1e-3, warmup=2,
                ckpt_every=3, log_every=2, val_clips=8, sample_steps=2, device="cpu")
    return sft.Config(**{**base, **kw})


def tiny_rl(init, out_dir, **kw):
    base = dict(init=str(init), out_dir=str(out_dir), iters=2, prompts_per_iter=2, group_size=4, rollout_steps=4,
                sde_window=2, eval_prompts=2, eval_steps=2, eval_every=100, ckpt_every=1, hold_probe=4, device="cpu",
                minibatches=1)  # one step a pass, as the tests were sized; stage_command runs the default's 2
    return reward_rl.Config(**{**base, **kw})


def wan_rl(init, out_dir, **kw):
    base = dict(init=str(init), out_dir=str(out_dir), iters=1, prompts_per_iter=1, group_size=2, rollout_steps=2,
                sde_window=1, eval_prompts=1, eval_steps=1, eval_every=100, ckpt_every=1, epochs=1, warmup=1, lr=1e-2,
                sft_weight=0.0, std_floor=1e-6, hold_probe=2, device="cpu", minibatches=1)
    return reward_rl.Config(**{**base, **kw})


def read_log(path):
    return [json.loads(line) for line in open(path)]


def state_gap(a, b):
    """The largest difference between two runs' resumable states: weights, EMA weights and AdamW moments."""
    wa, wb = (checkpoint.read_checkpoint(os.path.join(x, "state.safetensors"))[0] for x in (a, b))
    assert set(wa) == set(wb) and any(k.startswith("opt.") for k in wa)
    return max(float((wa[k].double() - wb[k].double()).abs().max()) for k in wa)


def memory_of(run):
    return [r for r in read_log(os.path.join(run, "log.jsonl")) if "memory" in r][-1]


def tree_hashes(*roots):
    """path -> sha256 of every file under the roots (the repository without its runs, caches and git)."""
    out = {}
    for root in roots:
        for folder, dirs, files in os.walk(root):
            dirs[:] = [d for d in dirs if d not in (".git", "runs", "__pycache__", ".pytest_cache")]
            for f in files:
                p = os.path.join(folder, f)
                out[p] = hashlib.sha256(open(p, "rb").read()).hexdigest() if os.path.isfile(p) else "?"
    return out


# --- Stage II's and III's insides, called directly

def awm_setup(path):
    """A policy, a second copy of it, 4 random clips (each its own group) as a Rollout, and one (t, x0, t_kl) draw."""
    (policy, _), (other, _) = checkpoint.load_model(path), checkpoint.load_model(path)
    gen = torch.Generator().manual_seed(0)
    shape = (4, policy.cfg.channels, policy.cfg.frames, policy.cfg.size, policy.cfg.size)
    clips, tokens = torch.rand(shape, generator=gen) * 2 - 1, data.tokenize(["a red circle moving left"] * 4)
    draws = [(torch.full((4,), 0.3), torch.randn(shape, generator=gen), torch.full((4,), 0.6))]  # one per group
    roll = reward_rl.Rollout(["a red circle moving left"] * 4, tokens, clips, [], torch.arange(4))
    return policy, other, roll, draws, gen


def rule_backward(cfg, policy, reference, roll, adv, draws, fresh=True, stats=None):
    """cfg's update rule backpropagated on the setup's 4 clips as one rank's whole minibatch; its loss."""
    b = reward_rl.batch_of(roll, adv, torch.arange(4), fresh)
    stats = collections.defaultdict(list) if stats is None else stats
    return reward_rl.rule_backward(cfg, policy, reference, b, draws, 1 / 4, stats)


def dpo_grads(decoupled, policy, ref, p, beta=50.0, sft_weight=0.3):
    policy.zero_grad()
    gen = torch.Generator().manual_seed(1)
    t, x0 = M.sample_t(len(p["winner"]), gen), torch.randn(p["winner"].shape, generator=gen)
    loss, z, _ = preference.dpo_step(policy, ref, p["winner"], p["loser"], p["tokens"], p["weight"], t, x0, beta,
                                     sft_weight, decoupled)
    return loss, z, [torch.zeros_like(q) if q.grad is None else q.grad.clone() for q in policy.parameters()]


# --- a fork's own parts: the README's fourth head; a text encoder (named test_all:fake_states)

def centred(obs, want):
    """A fork's fourth head, README's example: 1 with the object at the frame's centre, 0 at its edge."""
    size = obs["alpha"].shape[-1]                         # frame edge in pixels
    off = (obs["center"] - size / 2).abs().amax(-1)       # (B, F): farther axis from the centre, in pixels
    return (1 - off / (size / 2)).clamp(0, 1).nan_to_num(0).mean(1)


def fake_states(prompts):
    """A stand-in text encoder for --text=module:function: (B, 3, 16), one row per word of the first three ('' past
    the prompt's end, so the empty prompt has states too, as an encoder's end token)."""
    return torch.stack([torch.tensor([[float(len(w)), float(i), 1.0] * 5 + [0.0] for i, w in enumerate((p.split() + [""] * 3)[:3])])
                        for p in prompts])


# --- command lines: a fresh interpreter, this process, torchrun, several nodes

def run_script(*args):
    return subprocess.run([sys.executable, *args], cwd=HERE, capture_output=True, text=True, timeout=300)


def first_of_each_script(table):
    """The first case of each script in a table of command lines."""
    firsts = {}
    for case, (cmd, *_) in table.items():
        firsts.setdefault(cmd.split()[0], case)
    return set(firsts.values())


# the warnings a fresh interpreter hides by default (Python's own filters): hidden in-process too
HIDDEN_WARNINGS = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)


def run_in_process(*args):
    """run_script's result without a fresh interpreter (no ~2 s of importing torch): the script's
    own __main__ block run by runpy in this process, from the repository, with its stdout, stderr,
    the warnings a fresh interpreter would print, and its exit code (SystemExit's; 1 with the
    traceback for an uncaught exception). Then what the script's exit would do: the run folders it
    locked are released."""
    out, err, code = io.StringIO(), io.StringIO(), 0

    def show(message, category, filename, lineno, file=None, line=None):
        if not issubclass(category, HIDDEN_WARNINGS):
            err.write(warnings.formatwarning(message, category, filename, lineno, line))
    cwd, argv, on_term = os.getcwd(), sys.argv, signal.getsignal(signal.SIGTERM)
    held = set(cli._LOCKS)
    try:
        os.chdir(HERE)
        sys.argv = list(args)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            with warnings.catch_warnings():
                # printed where they happen, once per place (as a fresh interpreter does)
                warnings.simplefilter("default")
                warnings.showwarning = show
                try:
                    runpy.run_path(os.path.join(HERE, args[0]), run_name="__main__")
                except SystemExit as e:
                    if e.code is None or isinstance(e.code, int):
                        code = e.code or 0
                    else:
                        # sys.exit("text"): printed, exit code 1
                        print(e.code, file=sys.stderr)
                        code = 1
                except Exception:
                    err.write(traceback.format_exc())
                    code = 1
    finally:
        cli.release_run_folders(*(set(cli._LOCKS) - held))
        os.chdir(cwd)
        sys.argv = argv
        # run_cli installs the stages' SIGTERM handler
        signal.signal(signal.SIGTERM, on_term)
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def in_process(args, out):
    """A stage's command line run in this process (one rank): quicker than a fresh interpreter."""
    stage = {"sft.py": sft, "reward_rl.py": reward_rl, "preference.py": preference}[args[0]]
    return stage.train(cli.parse_config(stage.Config, [*args[1:], f"--out_dir={out}"]))


def stage_command(command):
    """A recommended command read back by its stage's own config parser, its --weights by the registry's."""
    python, script, *flags = shlex.split(command)
    configs = {"sft.py": sft.Config, "reward_rl.py": reward_rl.Config, "preference.py": preference.Config}
    assert python == "python" and script in configs, command
    cfg = cli.parse_config(configs[script], flags)
    rewards.head_weights(getattr(cfg, "weights", ()))                         # an unknown head is refused here
    return script, cfg


def sharding_args(stage, init, tmp_path):
    small = ["--device=cpu", "--warmup=1", "--ckpt_every=2"]
    if stage == "sft":
        return ["sft.py", f"--init={init}", "--data=curated", "--steps=4", "--batch_size=4", "--val_clips=4",
                "--sample_steps=2", "--lr=1e-2", "--log_every=2", *small]
    if stage == "dpo":
        preference.save_pairs(str(tmp_path / "pairs.safetensors"), tiny_pairs(8))
        return ["preference.py", f"--init={init}", f"--pairs={tmp_path}/pairs.safetensors", "--steps=4",
                "--batch_size=4", "--lr=1e-3", "--log_every=2", "--eval_prompts=2", "--eval_steps=2", *small]
    return ["reward_rl.py", f"--init={init}", f"--update={stage}", "--iters=3", "--prompts_per_iter=2", "--group_size=4",
            "--rollout_steps=4", "--eval_prompts=2", "--eval_steps=2", "--eval_every=2", "--lr=1e-3", "--minibatches=2",
            "--sft_batch=4", "--bf16=false", "--hold_probe=2", *small]


def torchrun(args, out, parallel="ddp", ranks=2, launcher=("--standalone",), **popen):
    """A stage's command line under torchrun on this machine (gloo): `ranks` processes per launcher."""
    cmd = [sys.executable, "-m", "torch.distributed.run", *launcher, f"--nproc_per_node={ranks}", *args,
           f"--out_dir={out}", f"--parallel={parallel}"]
    # faulthandler: a rank that aborts prints where (its Python stack, or that it had none left)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    if popen:
        return subprocess.Popen(cmd, cwd=HERE, env=env, text=True, **popen)
    r = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, why_failed(r.stderr)
    return r


def why_failed(stderr):
    """A failed job's stderr for its assertion: the lines that name a rank's abort and where it was, first (torchrun's
    long report of it comes after them and would push them out of a plain tail), then the tail."""
    marks = ("terminate", "what()", "Fatal Python", "File \"", "Error", "error:")
    said = [line for line in stderr.splitlines() if any(m in line for m in marks)]
    return "\n".join(said[:40]) + "\n...\n" + stderr[-1500:]


# torchrun(..., **PIPES) starts a job and returns at once: jobs that do not depend on each other run
# side by side (most of a tiny job is its three interpreters importing torch, one core's work each),
# then finish() waits
PIPES = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(job, timeout=300):
    """Wait for a job torchrun(..., **PIPES) started: torchrun(...)'s result, exit 0 asserted."""
    try:
        out, err = job.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        job.kill()
        job.communicate()
        raise
    assert job.returncode == 0, why_failed(err)
    return subprocess.CompletedProcess(job.args, job.returncode, out, err)


def reserved_port():
    """A free port and a socket holding it. Bound with SO_REUSEADDR and not listening, the port
    goes to no other bind(0) or connect() while a launcher starts, and the launcher's TCPStore
    (SO_REUSEADDR too) can still bind it. A port found free and let go at once can be taken
    before that."""
    held = socket.socket()
    held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    held.bind(("localhost", 0))
    return held.getsockname()[1], held


def listening(port):
    """Whether a socket on this machine listens on `port` (/proc/net/tcp and tcp6: state 0A)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        rows = open(table).read().splitlines()[1:] if os.path.exists(table) else []
        for row in rows:
            local, state = row.split()[1], row.split()[3]
            if int(local.rsplit(":", 1)[1], 16) == port and state == "0A":
                return True
    return False


def two_nodes(args, out, parallel):
    """The README's multi-node launch, as two launchers of one process each on this machine: node 0 hosts the
    rendezvous on a port held for it until it listens there (or ends), each names its node rank."""
    port, held = reserved_port()
    with held:
        nodes = []
        for n in (0, 1):
            launcher = ("--nnodes=2", f"--node_rank={n}", f"--rdzv_endpoint=localhost:{port}")
            nodes.append(torchrun(args, out, parallel, ranks=1, launcher=launcher,
                                  start_new_session=True, **PIPES))
        deadline = time.time() + 300
        while not listening(port) and nodes[0].poll() is None and time.time() < deadline:
            time.sleep(0.05)
    return nodes


def children(pid):
    """The processes whose parent is pid, from /proc."""
    kids = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(entry))
        except OSError:
            pass
    return kids


def start_holding(args, out):
    """Start a stage in a fresh interpreter, wait until it holds its folder's lock, and pause it there (SIGSTOP: a
    tiny run would end before a second interpreter starts). SIGCONT lets it go on."""
    p = subprocess.Popen([sys.executable, *args, f"--out_dir={out}"], cwd=HERE, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    lock = out / cli.RUN_LOCK
    while not (lock.exists() and lock.read_text()) and p.poll() is None:
        time.sleep(0.001)
    p.send_signal(signal.SIGSTOP)
    assert p.poll() is None, p.stderr.read()[-2000:]
    return p


def run_until_checkpointed(args, out, delay=None):
    """Start a run and wait for its first checkpoint; then kill -9 it after `delay` s (mid-write included), or let
    it finish (delay None). Returns (whether it was killed before finishing, seconds from
    checkpoint to end: for a run that ended before its kill, its own time, measured)."""
    p = subprocess.Popen([sys.executable, *args, f"--out_dir={out}"], cwd=HERE, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    while not (out / "state.safetensors").exists() and p.poll() is None:
        time.sleep(0.01)
    t0 = time.time()
    try:
        p.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        p.kill()
    return p.wait() != 0, time.time() - t0


def kill_and_resume(args, out, rng, window):
    """kill -9 a run at a random moment after its first checkpoint, then resume it to the end. A kill that came
    too late (the run had finished) is retried in a fresh folder within half the time that run
    took: its own time under the machine's load now, not the reference run's (a loaded
    machine's pace changes from run to run)."""
    for attempt in range(4):
        shutil.rmtree(out, ignore_errors=True)
        killed, took = run_until_checkpointed(args, out, rng.uniform(0, window))
        if killed:
            break
        window = took / 2
    r = subprocess.run([sys.executable, *args, f"--out_dir={out}", "--resume=true"], cwd=HERE, capture_output=True,
                       text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return killed


# ==================================================================================================
# Fixtures (module-scoped: made once, shared by the tests that name them)
# ==================================================================================================

@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    base = sft.train(tiny_sft(root / "base", steps=4))
    tuned = sft.train(tiny_sft(root / "sft", init=base, data="curated", steps=2))
    return base, tuned, root


@pytest.fixture(scope="module")
def tiny_judge(tiny_checkpoints):
    """A learned judge of 3 members fit on both tiny checkpoints' samples, and what its training
    printed: the judge's test reads both, diagnose's scores with it (one fit, and no test reads a
    file another test happened to write)."""
    base, tuned, root = tiny_checkpoints
    out = str(root / "rm.safetensors")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        judge.train_reward_model([f"--generators={base},{tuned}", "--generator_clips=4",
                                  "--members=3", "--steps=3", "--pool_clips=24", "--batch_size=8",
                                  "--eval_clips=24", "--calib_clips=4", f"--out={out}"])
    return out, printed.getvalue()


@pytest.fixture(scope="module")
def trained_tiny(tmp_path_factory):
    """A tiny base pretrained for 40 steps and tuned for 20: far enough from its init that rollouts, rewards and
    updates depend on every draw (a near-untrained net hides a shifted random stream)."""
    root = tmp_path_factory.mktemp("trained")
    base = sft.train(tiny_sft(root / "base", steps=40, batch_size=8, lr=2e-3, warmup=5, ckpt_every=40, log_every=10))
    return sft.train(tiny_sft(root / "sft", init=base, data="curated", steps=20, batch_size=8, ckpt_every=20, log_every=10))


@pytest.fixture(scope="module")
def tiny_ablations(tiny_checkpoints):
    """Two rows of make ablations (the judge with and without its stability terms), 1 iteration
    each, each row's Stage II at the tiny size of the other Stage II tests (bench.SMALL extended
    while the module's tests run: a row is redone where its command differs)."""
    base, tuned, root = tiny_checkpoints
    judge_file = root / "ablation_judge.safetensors"
    judge.train_reward_model([f"--generators={base}", "--generator_clips=4", "--calib_clips=4", "--members=2", "--steps=3",
                              "--pool_clips=24", "--batch_size=8", "--eval_clips=24", f"--out={judge_file}"])
    args = [f"--init={tuned}", f"--reward_model={judge_file}", "--iters=1", "--only=judge,judge_unguarded",
            "--heldout_prompts=2", f"--out={root / 'ablations'}"]
    with pytest.MonkeyPatch.context() as patch:
        tiny = [*TINY_STAGE_II, "--eval_prompts=2", "--eval_steps=2"]
        patch.setattr(bench, "SMALL", [*bench.SMALL, *tiny])
        bench.bench_ablations(args)
        yield root / "ablations", args


@pytest.fixture(scope="module")
def tiny_race(tiny_checkpoints):
    """make race at a tiny size: vanilla Flow-GRPO and DiffusionNFT under the floor, one seed, two segments of an
    iteration each (a budget of 2 network evaluations stops each after its first iteration)."""
    _, tuned, root = tiny_checkpoints
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as patch:
        # each run's Stage II at the tiny size of the other Stage II tests (a rule's own flags win)
        patch.setattr(race, "RACE_FLAGS", [*race.RACE_FLAGS, *TINY_STAGE_II])
        race.main([f"--init={tuned}", "--rules=flow_grpo,nft_floor", "--seeds=1", "--nfe=2",
                   "--evals=2", "--heldout_prompts=1", f"--out={root / 'race'}"])
    # race.main runs its two jobs on one thread each, this process's too: later tests get theirs
    torch.set_num_threads(threads)
    return root / "race"


@pytest.fixture(scope="module")
def tiny_run(tiny_checkpoints, tiny_ablations, tiny_race):
    """make pipeline's folder layout from tiny stages (the shipped base is the small preset), judged and reported."""
    base, _, root = tiny_checkpoints
    run = root / "run"
    sft.train(tiny_sft(run / "sft", init=base, data="curated", steps=4))
    reward_rl.train(tiny_rl(run / "sft" / "ckpt.safetensors", run / "rl", iters=2, eval_every=1, epochs=1, sft_batch=4))
    preference.train(preference.Config(init=str(run / "rl" / "ckpt.safetensors"), out_dir=str(run / "dpo"), pair_prompts=2,
                                       samples_per_prompt=3, sample_steps=2, margin=0.0, steps=2, batch_size=2, warmup=1,
                                       log_every=1, eval_prompts=2, eval_steps=2, device="cpu"))
    ckpts = [f"--ckpt={p}" for p in [base] + [run / s / "ckpt.safetensors" for s in ("sft", "rl", "dpo")]]
    diagnose.diagnose([*ckpts, f"--out={run / 'diagnose'}", "--reward_model=", "--prompts=1", "--seeds=2", "--steps=1",
                      "--long_clips=1", "--diversity_seeds=2"])
    # as make pipeline_driven leaves it: the decision sft's diagnosis handed to Stage II
    diagnose.advise([f"--diagnose={run / 'diagnose'}", "--column=sft", "--stage=rl", f"--out={run / 'advice_rl.json'}"])
    report.main([f"--run={run}", f"--ablations={tiny_ablations[0] / 'ablations.json'}", f"--race={tiny_race / 'race.json'}"])
    return run


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    """Tiny inputs a user can get wrong: checkpoints with broken metadata, a NaN, cut short, or from pretraining; a
    learned judge of another clip size; pair files of uint8 clips, NaN clips, too few captions; two previous runs."""
    root = tmp_path_factory.mktemp("bad")
    net = M.VideoDiT(M.preset("tiny"))
    sd = net.state_dict()
    checkpoint.save_checkpoint(str(root / "tiny.safetensors"), sd, net.cfg, checkpoint.lineage_record("sft"))
    checkpoint.save_checkpoint(str(root / "base.safetensors"), sd, net.cfg, checkpoint.lineage_record("pretrain"))
    save_file({k: v.contiguous() for k, v in sd.items()}, str(root / "meta.safetensors"),
              metadata={"format": "postflow", "model_config": "{not json", "lineage": "{}"})
    nan = {k: v.clone() for k, v in sd.items()}
    nan["final.weight"].view(-1)[0] = float("nan")
    checkpoint.save_checkpoint(str(root / "nan.safetensors"), nan, net.cfg, checkpoint.lineage_record("sft"))
    whole = (root / "tiny.safetensors").read_bytes()
    (root / "cut.safetensors").write_bytes(whole[: len(whole) // 2])
    judge.train_reward_model(["--generators=", "--members=2", "--steps=1", "--pool_clips=6", "--batch_size=2",  # 8x32x32
                                "--eval_clips=6", f"--out={root / 'judge.safetensors'}"])
    p = tiny_pairs(4)
    preference.save_pairs(str(root / "uint8.safetensors"), {**p, "winner": ((p["winner"] + 1) * 127.5).round().byte()})
    w = p["winner"].clone()
    w[0, 0, 0, 0, 0] = float("nan")
    preference.save_pairs(str(root / "nan_pairs.safetensors"), {**p, "winner": w})
    preference.save_pairs(str(root / "short.safetensors"), {**p, "tokens": p["tokens"][:2]})
    for run in ("prev_sft", "prev_rl", "marked"):
        (root / run).mkdir()
        shutil.copy(root / "tiny.safetensors", root / run / "ckpt.safetensors")
        (root / run / "log.jsonl").write_text("{}\n")
    (root / "marked" / cli.RUN_MARKER).write_text(json.dumps({"stage": "sft", "writes": cli.RUN_FILES}))
    (root / "marked" / "notes.txt").write_text("a user's own notes, kept beside a run")
    preference.save_pairs(str(root / "float64.safetensors"), {k: v.double() if k in ("winner", "loser") else v for k, v in p.items()})
    preference.save_pairs(str(root / "zero_weights.safetensors"), {**p, "weight": torch.zeros(4)})
    preference.save_pairs(str(root / "short_loser.safetensors"), {**p, "loser": p["loser"][:2]})
    save_file({k: v.contiguous() for k, v in sd.items()}, str(root / "deep.safetensors"),
              metadata={"format": "postflow", "model_config": json.dumps({**dataclasses.asdict(net.cfg), "depth": 10 ** 7}),
                        "lineage": "{}"})
    for name, over in (("frames", {"frames": 10 ** 9}), ("nan_ratio", {"mlp_ratio": float("nan")})):
        save_file({k: v.contiguous() for k, v in sd.items()}, str(root / f"{name}.safetensors"),
                  metadata={"format": "postflow", "model_config": json.dumps({**dataclasses.asdict(net.cfg), **over}),
                            "lineage": "{}"})
    preference.save_pairs(str(root / "no_tokens.safetensors"), {**p, "tokens": p["tokens"][:, :0]})
    (root / "dangling").symlink_to(root / "nowhere")
    (root / "state_folder" / "state.safetensors").mkdir(parents=True)
    (root / "state_folder" / cli.RUN_MARKER).write_text(json.dumps({"stage": "sft", "writes": cli.RUN_FILES}))
    for name, text in (("empty", ""), ("truncated", '{"sft": {"fidelity": [0.5, 0.0'), ("nothing", "{}"),
                       ("partial", '{"sft": {"fidelity": [0.5, 0.01]}}')):
        (root / name / "diagnose").mkdir(parents=True)
        (root / name / "diagnose" / "diagnostics.json").write_text(text)
    return root


@pytest.fixture(scope="module")
def bad_runs(bad_files, request):
    """The selected cases' command lines (BAD_INPUT). Those of FRESH_INTERPRETER run as a user's do,
    in a fresh interpreter, two at a time (each ~2 s of importing torch, then a refusal); meanwhile
    the others run in this process through the same __main__ blocks (run_in_process)."""
    chosen = [i.callspec.params["case"] for i in request.session.items
              if getattr(i, "originalname", "") == "test_bad_input_is_one_line_exit_2"]
    chosen = [c for c in chosen if not ("--device=cuda" in BAD_INPUT[c][0] and torch.cuda.is_available())]
    argv = lambda c: [a.format(r=bad_files, o=bad_files / c) for a in BAD_INPUT[c][0].split()]
    fresh = [c for c in chosen if c in FRESH_INTERPRETER]
    before = tree_hashes(bad_files, HERE)
    with ThreadPoolExecutor(2) as pool:
        started = {c: pool.submit(run_script, *argv(c)) for c in fresh}
        runs = {c: run_in_process(*argv(c)) for c in chosen if c not in started}
        runs.update({c: job.result() for c, job in started.items()})
    after = tree_hashes(bad_files, HERE)
    changed = sorted(p for p in set(before) | set(after) if before.get(p) != after.get(p))
    return runs, changed


@pytest.fixture(scope="module")
def wan_chain(tmp_path_factory):
    """init -> Stage I (1 step) -> Stage II (1 iteration, AWM and PPO) -> Stage III (1 step), each from the last's file."""
    import adapters
    root = tmp_path_factory.mktemp("wan")
    init = str(root / "init.safetensors")
    adapters.init_checkpoint([f"--out={init}", "--checkpointing=true"])          # recomputed blocks, as on a GPU
    tuned = sft.train(sft.Config(init=init, out_dir=str(root / "sft"), steps=1, batch_size=2, lr=1e-2, warmup=1, log_every=1,
                                 ckpt_every=1, val_clips=2, sample_steps=1, device="cpu"))
    rl = {u: reward_rl.train(wan_rl(tuned, root / f"rl_{u}", update=u), reward_fn=PIXEL) for u in ("awm", "ppo")}
    dpo = preference.train(preference.Config(init=rl["awm"], out_dir=str(root / "dpo"), pair_prompts=1, samples_per_prompt=2,
                                             sample_steps=1, margin=0.0, steps=1, batch_size=2, lr=1e-2, warmup=1,
                                             log_every=1, eval_prompts=1, eval_steps=1, device="cpu"))
    return dict(root=root, init=init, sft=tuned, awm=rl["awm"], ppo=rl["ppo"], dpo=dpo)


# ==================================================================================================
# data.py: the world, its attributes and splits
# ==================================================================================================

def test_batch_shapes_and_determinism():
    a = data.make_batch("web", 6, seed=3, step=5)
    b = data.make_batch("web", 6, seed=3, step=5)
    c = data.make_batch("web", 6, seed=3, step=6)
    assert a.videos.shape == (6, 3, 8, 32, 32) and a.tokens.shape == (6, data.MAX_TOKENS)
    assert a.videos.min() >= -1 and a.videos.max() <= 1
    assert torch.equal(a.videos, b.videos) and a.prompts == b.prompts
    assert not torch.equal(a.videos, c.videos)


def test_ground_truth_positions_follow_direction_and_speed():
    b = data.make_batch("curated", 32, seed=1)
    step = (b.centers[:, 1] - b.centers[:, 0] + 16) % 32 - 16       # displacement on the torus
    dirs = torch.tensor([data.DIRECTIONS[d] for d in data.DIRECTION_NAMES])[b.attrs["direction"]]
    speed = torch.tensor([data.SPEEDS[s] for s in data.SPEED_NAMES])[b.attrs["speed"]]
    assert torch.allclose(step, dirs * speed[:, None], atol=1e-4)
    # the drawn object sits at its ground-truth centre: circular mean of the lit pixels
    lit = (b.videos[:, :, 0] > -0.5).any(1).float()                 # (B, H, W), frame 0
    ang = (torch.arange(32) + 0.5) / 32 * 2 * math.pi
    cx = torch.atan2((lit * ang.sin()[None, None]).sum((1, 2)), (lit * ang.cos()[None, None]).sum((1, 2)))
    cx = (cx % (2 * math.pi)) / (2 * math.pi) * 32
    err = (cx - b.centers[:, 0, 0] + 16) % 32 - 16
    assert err.abs().max() < 0.6
    # colours come out as the palette colour of the true attribute
    inside = (b.videos + 1).sum(1) > 1.0                             # (B, F, H, W)
    mean_rgb = (b.videos * inside[:, None]).sum((2, 3, 4)) / inside[:, None].sum((2, 3, 4))
    assert torch.cdist(mean_rgb, data.PALETTE).argmin(1).tolist() == b.attrs["colour"].tolist()


def test_heldout_combinations_never_in_training_splits():
    for split in ("web", "curated", "val"):
        b = data.make_batch(split, 512, seed=7)
        seen = set(zip(b.attrs["colour"].tolist(), b.attrs["shape"].tolist(), b.attrs["direction"].tolist()))
        assert not seen & data.HELDOUT_COMBOS
    h = data.make_batch("heldout", 64, seed=7)
    assert set(zip(h.attrs["colour"].tolist(), h.attrs["shape"].tolist(), h.attrs["direction"].tolist())) <= data.HELDOUT_COMBOS


def test_web_defects_present_and_curated_clean():
    web, cur = data.make_batch("web", 400, seed=2), data.make_batch("curated", 400, seed=2)
    assert all(not v.any() for v in cur.defects.values())
    assert 0.1 < web.defects["noise"].float().mean() < 0.3
    truth = [data.caption(*(int(web.attrs[k][i]) for k in data.ATTRIBUTES)) for i in range(400)]
    wrong = sum(p != t for p, t in zip(web.prompts, truth)) / 400
    assert 0.2 < wrong < 0.6  # some captions drop or misstate attributes
    assert all(p == data.caption(*(int(cur.attrs[k][i]) for k in data.ATTRIBUTES)) for i, p in enumerate(cur.prompts))


def test_tokenizer_errors_and_parse():
    with pytest.raises(data.PromptError, match="unknown word 'purple'"):
        data.tokenize(["a purple circle"])
    with pytest.raises(data.PromptError, match="empty prompt list"):
        data.tokenize([])
    assert data.parse_prompt("a red circle moving up") == {"colour": 0, "shape": 0, "direction": 2, "speed": -1}


def test_video_grid_writes_gif(tmp_path):
    v = data.make_batch("curated", 4, world=TINY_WORLD).videos
    path = tmp_path / "g.gif"
    data.write_video(data.video_grid(v, 2, 2), path)
    assert iio.imread(path).shape[0] == 4


# ==================================================================================================
# model.py: the video DiT, the flow, the samplers
# ==================================================================================================

def test_model_shapes_and_adaln_zero_start():
    net = tiny_model()
    x = torch.randn(3, 3, 4, 16, 16)
    out = net(x, torch.rand(3), data.tokenize(["a red circle"] * 3))
    assert out.shape == x.shape and out.abs().max() == 0  # adaLN-Zero: the untrained net outputs 0


def test_joint_attention_runs_and_rotary_scores_depend_on_torus_offset():
    net = M.VideoDiT(M.preset("tiny"))
    x = torch.randn(2, 3, 4, 16, 16)
    assert net(x, torch.rand(2), data.tokenize(["a red circle"] * 2)).shape == x.shape
    if True:
        grid, hd = (4, 4, 4), 16
        ang = M.rotary_angles(grid, hd).view(*grid, hd // 2)
        q, k = torch.randn(1, 1, 1, hd), torch.randn(1, 1, 1, hd)
        score = lambda a, b: float((M.rotate(q, a.cos(), a.sin()) * M.rotate(k, b.cos(), b.sin())).sum())
        # a key at column 0 is one column right of a query at column 3, across the frame's edge: the same
        # offset as column 1 from column 0, so the same score; no offset at all scores differently
        assert abs(score(ang[1, 2, 3], ang[0, 2, 0]) - score(ang[1, 2, 0], ang[0, 2, 1])) < 1e-4
        assert abs(score(ang[1, 2, 3], ang[0, 2, 0]) - score(ang[1, 2, 1], ang[0, 2, 1])) > 1e-3


def test_flow_loss_falls_on_fixed_batch():
    net = tiny_model()
    b = data.make_batch("curated", 8, world=TINY_WORLD)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3)
    losses = []
    for i in range(40):
        gen = torch.Generator().manual_seed(0)  # same t and noise every step: a fixed regression problem
        loss, _ = M.flow_loss(net, b.videos, b.tokens, gen)
        loss.mean().backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.mean().item())
    assert losses[-1] < 0.7 * losses[0]


def test_sampler_is_deterministic_and_seeded():
    net = tiny_model(randomize=True).eval()
    tok = data.tokenize(["a red circle", "a blue square"])
    n1 = torch.randn(2, 3, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    n2 = torch.randn(2, 3, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    a, b, c = M.sample(net, tok, n1, steps=4), M.sample(net, tok, n1, steps=4), M.sample(net, tok, n2, steps=4)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_guidance_stops_at_cfg_until():
    net = tiny_model(randomize=True).eval()
    tok = data.tokenize(["a red circle", "a blue square"])
    noise = torch.randn(2, 3, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    sample = lambda w, until: M.sample(net, tok, noise, steps=4, cfg_scale=w, cfg_until=until)
    assert torch.equal(sample(3.0, 0.0), sample(1.0, 1.0))            # never guided = the conditional sampler
    everywhere, half = sample(3.0, 1.0), sample(3.0, 0.5)              # grid 0, .25, .5, .75: two steps guided
    assert (everywhere - half).abs().mean() > 1e-4 and (half - sample(1.0, 1.0)).abs().mean() > 1e-4
    assert torch.equal(sample(3.0, None), sample(3.0, M.CFG_UNTIL))   # the default is the policy's: the DiT's, CFG_UNTIL
    assert net.cfg_until == M.CFG_UNTIL and diagnose.DiagnoseConfig().cfg_until == -1   # diagnose's -1: the policy's own
    with pytest.raises(cli.ConfigError, match="-1 for the policy's own"):
        diagnose.check_diagnose_inputs(diagnose.DiagnoseConfig(cfg_until=-0.5))


def test_context_frames_condition_the_model_and_are_pinned():
    net = tiny_model(randomize=True).eval()
    tok = data.tokenize(["a red circle moving left"] * 2)
    noise = torch.randn(2, 3, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[True, False, False, False]] * 2)
    ctx_a = data.make_batch("curated", 2, seed=1, world=TINY_WORLD).videos
    ctx_b = data.make_batch("curated", 2, seed=2, world=TINY_WORLD).videos
    out_a = M.sample(net, tok, noise, steps=4, ctx=ctx_a, ctx_mask=mask)
    out_b = M.sample(net, tok, noise, steps=4, ctx=ctx_b, ctx_mask=mask)
    assert torch.equal(out_a[:, :, 0], ctx_a[:, :, 0])                # the context frame is kept
    assert (out_a[:, :, 1:] - out_b[:, :, 1:]).abs().mean() > 1e-4    # and it steers the generated frames


def test_long_clip_by_chunked_continuation():
    net = tiny_model(randomize=True).eval()
    tok = data.tokenize(["a red circle moving left"] * 2)
    a = M.sample_long(net, tok, torch.Generator().manual_seed(0), chunks=4, steps=2)
    b = M.sample_long(net, tok, torch.Generator().manual_seed(0), chunks=4, steps=2)
    assert a.shape == (2, 3, 4 + 3 * 2, 16, 16) and torch.equal(a, b)


def test_sde_step_logprob_is_gaussian_density():
    torch.manual_seed(0)
    x, v = torch.randn(3, 3, 4, 8, 8), torch.randn(3, 3, 4, 8, 8)
    x_next, mean, std, logp = M.sde_step(x, v, t=0.3, t_next=0.4, t_first=0.1)
    ref = torch.distributions.Normal(mean, std).log_prob(x_next).mean(dim=(1, 2, 3, 4))
    assert torch.allclose(logp, ref, atol=1e-5) and logp.dtype == torch.float32
    # as the noise level goes to 0 the step is the Euler ODE step
    _, mean0, _, _ = M.sde_step(x, v, t=0.3, t_next=0.4, t_first=0.1, noise_level=1e-6)
    assert torch.allclose(mean0, x + 0.1 * v, atol=1e-5)


# ==================================================================================================
# sft.py: Stage I
# ==================================================================================================

def test_sft_smoke_pretrain_then_shape(tmp_path):
    base = sft.train(tiny_sft(tmp_path / "base"))
    for f in ("ckpt.safetensors", "state.safetensors", "log.jsonl", "samples.gif"):
        assert os.path.exists(tmp_path / "base" / f)
    shaped = sft.train(tiny_sft(tmp_path / "sft", init=base, data="curated", steps=3))
    _, meta = checkpoint.load_model(shaped)
    assert meta["lineage"]["stage"] == "sft" and meta["lineage"]["parent_hash"] == checkpoint.file_hash(base)
    with pytest.raises(FileExistsError, match="already holds a run"):  # never overwrite unasked
        sft.train(tiny_sft(tmp_path / "sft", init=base, data="curated", steps=3))


def test_interrupted_sft_resumes_to_identical_weights(tmp_path):
    full = sft.train(tiny_sft(tmp_path / "full"))
    assert sft.train(tiny_sft(tmp_path / "cut"), stop_after=3) is None
    resumed = sft.train(tiny_sft(tmp_path / "cut", resume=True))
    a, b = checkpoint.read_checkpoint(full)[0], checkpoint.read_checkpoint(resumed)[0]
    assert all(torch.equal(a[k], b[k]) for k in a)


# ==================================================================================================
# reward_rl.py: Stage II
# ==================================================================================================

# --- advantages, the PPO clip, the heads it is given

def test_group_advantages_per_head_zero_variance_groups_and_clip_after_scaling():
    scores = torch.tensor([[0.1, 0.5], [0.3, 0.5], [0.5, 0.5],      # group 0: head 1 is flat
                           [0.2, 0.9], [0.2, 0.1], [0.2, 0.5]])     # group 1: head 0 is flat
    cfg = reward_rl.Config(group_size=3, std_floor=1e-3, adv_clip=5.0)
    adv, zero = reward_rl.advantages(cfg, scores, torch.zeros_like(scores), torch.tensor([1.0, 2.0]))
    z = lambda x: (x - x.mean()) / (x.std(correction=1) + 1e-4)   # Bessel-corrected, as the docstring says
    expect = torch.cat([z(torch.tensor([0.1, 0.3, 0.5])), 2 * z(torch.tensor([0.9, 0.1, 0.5]))])
    assert torch.allclose(adv, expect, atol=1e-5) and zero == 0.5
    # the ablation, one z-score of the weighted sum: a head's weight no longer scales its advantage (group 1: x1, not x2)
    summed = reward_rl.advantages(reward_rl.Config(group_size=3, std_floor=1e-3, zscore="sum"), scores,
                                  torch.zeros_like(scores), torch.tensor([1.0, 2.0]))[0]
    total = scores @ torch.tensor([1.0, 2.0])
    assert torch.allclose(summed, torch.cat([z(total[:3]), z(total[3:])]), atol=1e-5)
    assert not torch.allclose(summed, adv, atol=1e-2)
    big = torch.tensor([[0.0], [0.0], [0.0], [1.0]])                           # a lone outlier: z = 1.5, x4 -> clipped
    adv, _ = reward_rl.advantages(reward_rl.Config(group_size=4, std_floor=1e-3, adv_clip=5.0), big, big * 0, torch.tensor([4.0]))
    assert adv.max() == 5.0 and adv.min() < 0
    # the floor is compared with the same (Bessel) std: 0.01 here, where the population std would be 0.0087
    edge = torch.tensor([[0.0], [0.0], [0.0], [0.02]])
    assert reward_rl.advantages(reward_rl.Config(group_size=4, std_floor=0.0095), edge, edge * 0, torch.ones(1))[1] == 0.0
    assert reward_rl.advantages(reward_rl.Config(group_size=4, std_floor=0.0105), edge, edge * 0, torch.ones(1))[1] == 1.0
    # ensemble reliability: agreeing members weigh more, clamped to [0.5, 1.5]
    w = rl_objective.reliability(torch.tensor([[0.1], [0.2], [0.3], [0.2]]))
    assert torch.allclose(w, torch.tensor([1.5, 1.0, 0.5, 1.0]))
    assert rl_objective.reliability(torch.tensor([[0.0], [1.0]])).tolist() == [1.5, 0.5]
    # the clip comes after every scaling: reliability 1.5 on a clipped advantage stays within +-adv_clip
    rm_std = torch.tensor([[0.0], [0.1], [0.1], [0.1]])
    adv, _ = reward_rl.advantages(reward_rl.Config(group_size=4, reward="rm", adv_clip=2.0), big, rm_std, torch.tensor([4.0]))
    assert adv.abs().max() == 2.0


def test_ppo_and_kl_helpers():
    logp = torch.tensor([0.0, 0.1, -0.1])
    loss, ratio, clipped = rl_objective.ppo_clip_loss(logp - logp.clone(), torch.tensor([1.0, -1.0, 2.0]), 0.01)
    assert torch.equal(ratio, torch.ones(3)) and clipped == 0 and torch.allclose(loss, torch.tensor([-1.0, 1.0, -2.0]))
    loss, _, clipped = rl_objective.ppo_clip_loss(torch.tensor([0.5]), torch.tensor([1.0]), 0.1)
    assert clipped == 1 and torch.allclose(loss, torch.tensor([-1.1]))        # no credit beyond the trust region
    m = torch.randn(2, 3, 4)
    assert torch.equal(M.gaussian_kl(m, m, 0.3), torch.zeros(2))
    assert torch.allclose(M.gaussian_kl(m + 0.3, m, 0.3), torch.full((2,), 0.5))


def test_split_instruction_heads_and_weights():
    b = data.make_batch("val", 8, seed=0)
    a = {k: v.tolist() for k, v in b.attrs.items()}
    # clips 0-3 are asked the opposite direction; clips 4-7 are not told their speed
    flip = {0: 1, 1: 0, 2: 3, 3: 2}
    prompts = [data.caption(a["colour"][i], a["shape"][i], flip[a["direction"][i]], a["speed"][i]) for i in range(4)]
    prompts += [" ".join(w for w in b.prompts[i].split() if w not in data.SPEED_NAMES) for i in range(4, 8)]
    obs = rewards.oracle(b.videos)
    want = rewards.targets(prompts, 8)
    parts = torch.stack(list(rewards.instruction_parts(obs, want).values()), 1)  # (8, attributes)
    assert torch.allclose(rewards.instruction(obs, want), parts.nanmean(1))
    assert (parts[:4, 2] < 0.05).all() and (parts[4:, 2] > 0.95).all()     # direction
    assert parts[4:, 3].isnan().all() and (parts[:4, 3] > 0.95).all()      # speed: not asked -> NaN
    heads = rewards.reward_heads(b.videos, prompts, split_instruction=True)
    assert (heads["instruction_speed"][4:] == 1).all()                    # constant: no advantage in a group
    cfg = reward_rl.Config(split_instruction=True, weights=("fidelity=0.2", "temporal=0.3", "instruction=0.7"))
    names = rewards.head_names(cfg.split_instruction)
    assert names[:3] == list(rewards.HEADS) and len(names) == 3 + len(data.ATTRIBUTES)
    assert rewards.advantage_weights(names, cfg.weights).tolist() == pytest.approx([0.2, 0.3, 0, 0.7, 0.7, 0.7, 0.7])
    heads = list(rewards.HEADS)                                          # self-paced: fidelity early, instruction late
    assert rewards.advantage_weights(heads, (), 0.0, self_paced=True).tolist() == pytest.approx([0.25, 0.125, 0.25])
    assert rewards.advantage_weights(heads, (), 1.0, self_paced=True).tolist() == pytest.approx([0.0625, 0.125, 1.0])
    with pytest.raises(cli.ConfigError, match="split_instruction"):
        reward_rl.check_config(reward_rl.Config(split_instruction=True, reward="rm"), 1)


def test_the_floor_turns_the_lever_it_is_given():
    names = rewards.head_names()
    floor = stability.Floor({"fidelity": 0.01, "temporal": 0.01})
    floor.multiplier = {"fidelity": 2.0, "temporal": 0.5}
    weights = rewards.advantage_weights(names)
    for via in ("advantage", "curated", "kl"):
        cfg = reward_rl.Config(hold=("fidelity=0.01", "temporal=0.01"), hold_via=via)
        now, w = reward_rl.held_settings(cfg, floor, names, weights)
        assert w.tolist() == ([2.25, 0.75, 1.0] if via == "advantage" else weights.tolist())
        assert now.sft_weight == pytest.approx(cfg.sft_weight * (3.5 if via == "curated" else 1))
        assert reward_rl.kl_weight(now) == pytest.approx(reward_rl.kl_weight(cfg) * (3.5 if via == "kl" else 1))
    assert reward_rl.held_settings(reward_rl.Config(), None, names, weights)[1].tolist() == weights.tolist()


def test_ema_warms_its_decay_up_unless_told_the_model_starts_trained():
    """From scratch the first update keeps 0.1 of the EMA's weights ((1 + 0) / (10 + 0)); with warmup=False (Stage
    II's --ema_warmup=false) the full decay keeps 0.9 of the start from the first update on."""
    for warmup, kept in ((True, 0.1), (False, 0.9)):
        net = torch.nn.Linear(2, 2)
        start = [p.detach().clone() for p in net.parameters()]
        ema = stability.EMA(net, 0.9, warmup)
        with torch.no_grad():
            for p in net.parameters():
                p.add_(1.0)
        ema.update(net, 0)
        for e, p, s in zip(ema.model.parameters(), net.parameters(), start):
            torch.testing.assert_close(e, kept * s + (1 - kept) * p)
        assert not any(p.requires_grad for p in ema.model.parameters())


# --- runs

def test_grpo_first_update_is_on_policy_and_kl_starts_at_zero(tiny_checkpoints):
    _, tuned, root = tiny_checkpoints
    reward_rl.train(tiny_rl(tuned, root / "rl1", iters=1, update="ppo", epochs=1))
    rec = [r for r in read_log(root / "rl1" / "log.jsonl") if "iter" in r and "eval" not in r][0]
    assert abs(rec["ratio"] - 1) < 1e-6 and rec["clip_frac"] == 0 and abs(rec["approx_kl"]) < 1e-10
    assert rec["kl_ref"] == 0.0                                  # the policy is the reference until it is updated
    assert rec["sde_steps"] == [0, 1] and set(rec) >= {"reward_fidelity", "zero_std_frac", "grad_norm", "rollout_s"}


@pytest.mark.parametrize("update", ["ppo", "awm"])
def test_grpo_raises_a_simple_reward(tiny_checkpoints, update):
    _, tuned, root = tiny_checkpoints
    bright = lambda clips, prompts: {"fidelity": torch.zeros(len(clips)), "temporal": torch.zeros(len(clips)),
                                     "instruction": clips.mean((1, 2, 3, 4))}
    cfg = tiny_rl(tuned, root / f"bright_{update}", iters=12, lr=3e-3, kl_weight=0.0, clip_range=0.05,
                  ema_decay=0.0, sde_window=4, std_floor=1e-6, update=update, sft_weight=0.0, warmup=1)
    reward_rl.train(cfg, reward_fn=bright)
    got = [r["reward_instruction"][0] for r in read_log(root / f"bright_{update}" / "log.jsonl") if "reward_instruction" in r]
    assert sum(got[-3:]) / 3 > sum(got[:3]) / 3 + 0.01, got


def test_grpo_refuses_batches_that_do_not_divide(tiny_checkpoints):
    _, tuned, root = tiny_checkpoints
    with pytest.raises(cli.ConfigError, match="do not split"):
        reward_rl.train(tiny_rl(tuned, root / "bad", minibatches=3))
    with pytest.raises(cli.ConfigError, match="does not fit"):
        reward_rl.train(tiny_rl(tuned, root / "bad", window_start=3, sde_window=2))


# --- the update rules: AWM, DiffusionNFT, a fourth from this file

def test_awm_weights_warmup_and_curated_term(tiny_checkpoints):
    _, tuned, root = tiny_checkpoints
    policy, reference, roll, draws, gen = awm_setup(tuned)

    def grad_norm(adv, **kw):
        policy.zero_grad()
        rule_backward(reward_rl.Config(**{"kl_weight": 0.0, "bf16": False, **kw}), policy, reference, roll, adv, draws)
        return sum(float(p.grad.norm() ** 2) for p in policy.parameters() if p.grad is not None) ** 0.5

    below = -torch.ones(4)                       # every clip worse than its group
    assert grad_norm(below, neg_scale=1.0) > 0 and grad_norm(below, neg_scale=0.0) == 0
    with torch.no_grad():                        # move the policy off the reference: the KL term now pulls back
        for p in policy.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=gen))
    assert grad_norm(torch.zeros(4), kl_weight=1.0) > 0 and grad_norm(torch.zeros(4), kl_weight=0.0) == 0
    # bf16 autocast (the default for awm) keeps the gradient's direction
    def grad(bf16):
        policy.zero_grad()
        rule_backward(reward_rl.Config(bf16=bf16), policy, reference, roll, torch.linspace(-1, 1, 4), draws)
        return torch.cat([p.grad.flatten() for p in policy.parameters() if p.grad is not None])
    assert torch.nn.functional.cosine_similarity(grad(False), grad(True), dim=0) > 0.99
    # a run: the learning rate warms up linearly, and the curated (PPO-ptx) term is logged per iteration
    reward_rl.train(tiny_rl(tuned, root / "warm", iters=3, warmup=4, lr=1e-3, sft_weight=1.0, sft_batch=4, epochs=1,
                            hold=()))                                   # no floor: it would divide the lr
    recs = [r for r in read_log(root / "warm" / "log.jsonl") if "reward_instruction" in r]
    assert [r["lr"] for r in recs] == pytest.approx([2.5e-4, 5e-4, 7.5e-4])
    assert all(r["sft_loss"] > 0 for r in recs)


def test_awm_bounded_objective_saturates_off_policy(tiny_checkpoints):
    """Off the sampler, the plain advantage-weighted loss of below-group clips falls without limit; AWM's clipped
    ratio of exp(-err) surrogates stops pushing once a clip's ratio leaves 1 +- awm_clip."""
    _, tuned, _ = tiny_checkpoints
    policy, sampler, roll, draws, gen = awm_setup(tuned)
    roll.sampler = sampler
    below = -torch.ones(4)
    loss_of = lambda clip, fresh=False: rule_backward(reward_rl.Config(kl_weight=0.0, bf16=False, awm_clip=clip), policy,
                                                      sampler, roll, below, draws, fresh)
    with torch.no_grad():                                    # a policy pushed far from the sampler: err rises
        for p in policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    policy.zero_grad()
    bounded = loss_of(0.02)
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in policy.parameters())  # saturated: no more push
    assert bounded == pytest.approx(0.98, abs=1e-6)          # -A * clip(ratio) = 1 * (1 - 0.02)
    policy.zero_grad()
    unbounded = loss_of(0.0)                                 # A * err: more negative the further it goes
    assert unbounded < 0 and sum(float(p.grad.abs().sum()) for p in policy.parameters() if p.grad is not None) > 0
    policy.zero_grad()                                       # on-policy the two give the same gradient
    loss_of(0.02, fresh=True)
    g_bounded = [p.grad.clone() for p in policy.parameters() if p.grad is not None]
    policy.zero_grad()
    loss_of(0.0, fresh=True)
    g_plain = [p.grad.clone() for p in policy.parameters() if p.grad is not None]
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(g_bounded, g_plain))


def test_awm_log_ratio_is_a_free_frame_mean_whatever_the_context_share(tiny_checkpoints):
    """With --chunks=2 a trained chunk's first frames are pinned context. AWM's log-ratio err_sampler - err is the flow
    error over the free frames only (model.flow_error, as SFT's and DPO's), with one frame or half the clip as context;
    an average over every frame with context zeroed scaled it by the free share and so widened the clip."""
    _, tuned, _ = tiny_checkpoints
    policy, sampler, roll, draws, gen = awm_setup(tuned)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
    t, x0 = draws[0][0], draws[0][1]
    frames = roll.clips.shape[2]
    for context in (1, frames // 2):
        mask = (torch.arange(frames) < context)[None].expand(4, frames)
        roll.ctx, roll.ctx_mask, roll.sampler = roll.clips, mask, sampler
        stats = collections.defaultdict(list)
        rule_backward(reward_rl.Config(kl_weight=0.0, bf16=False), policy, sampler, roll, torch.ones(4), draws,
                      fresh=False, stats=stats)
        with torch.no_grad():
            per_frame = lambda net: ((M.straight_path_velocity(net, roll.clips, x0, t, roll.tokens, roll.clips, mask)
                                      - (roll.clips - x0)) ** 2).mean(dim=(1, 3, 4))            # (B, F)
            log_ratio = (per_frame(sampler) - per_frame(policy))[:, context:].mean(1)        # the free frames' mean
        assert stats["ratio"][0] == pytest.approx(float(log_ratio.exp().mean()), rel=1e-6, abs=1e-7)
        share = (frames - context) / frames                                                 # the old average's scale
        assert abs(float((share * log_ratio).exp().mean()) - stats["ratio"][0]) > 1e-6


def test_nft_points_where_advantage_weighted_matching_does_on_policy_and_is_bounded_off_it(tiny_checkpoints):
    """DiffusionNFT at v = v_old: its gradient is nft_beta times that of sum (2r - 1) err, r = 1/2 + A / (2 nft_scale),
    the plain advantage-weighted flow matching the paper derives it from. Off-policy its loss is a sum of squares: for
    clips below their group it rises as the policy moves away, where the plain weighted loss falls without limit."""
    _, tuned, _ = tiny_checkpoints
    policy, sampler, roll, draws, gen = awm_setup(tuned)
    roll.sampler, adv = sampler, torch.tensor([1.5, -0.5, 0.7, -2.5])
    cfg = reward_rl.Config(update="nft", kl_weight=0.0, bf16=False, nft_beta=0.7, nft_scale=2.0)
    grads = lambda: [p.grad.clone() for p in policy.parameters() if p.grad is not None]
    policy.zero_grad()
    rule_backward(cfg, policy, sampler, roll, adv, draws, fresh=False)
    nft = grads()
    policy.zero_grad()
    t, x0 = draws[0][0], draws[0][1]
    r = 0.5 + 0.5 * (adv / cfg.nft_scale).clamp(-1, 1)
    ((2 * r - 1) * M.flow_error(policy, roll.clips, x0, t, roll.tokens)).sum().mul(1 / 4).backward()
    plain = grads()
    assert all(torch.allclose(a, cfg.nft_beta * b, rtol=1e-4, atol=1e-8) for a, b in zip(nft, plain))
    below = -torch.ones(4)                                      # every clip below its group: r = 1/4, pushed away
    loss_at = lambda **kw: rule_backward(reward_rl.Config(kl_weight=0.0, bf16=False, **kw), policy, sampler, roll, below,
                                         draws, fresh=False)
    direction = [torch.randn(p.shape, generator=gen) for p in policy.parameters()]
    nft_losses, plain_losses = [], []
    for step in (0.0, 0.05, 0.1, 1.0):                          # the policy moved further and further from the sampler
        with torch.no_grad():
            for p, s, d in zip(policy.parameters(), sampler.parameters(), direction):
                p.copy_(s + step * d)
        nft_losses.append(loss_at(update="nft"))
        plain_losses.append(loss_at(update="awm", awm_clip=0.0))
    # r |a + b|^2 + (1 - r) |a - b|^2 >= 4 r (1 - r) |a|^2, a = v_old - target: 3/4 of the loss at v = v_old for r = 1/4
    assert min(nft_losses) >= 0.75 * nft_losses[0] * (1 - 1e-5) and nft_losses[-1] > nft_losses[0]
    assert plain_losses[-1] < plain_losses[1] < plain_losses[0]                      # falls without limit


def test_a_fourth_update_rule_trains_from_the_test_file(tiny_checkpoints, tmp_path, monkeypatch):
    """A fork's update rule is one loss function and one row of RULES, added here from the test file alone:
    reward-weighted regression (each clip's flow error times its advantage, no ratio) with the flows' KL."""
    _, tuned, _ = tiny_checkpoints

    def weighted_regression(cfg, policy, reference, b, draw):
        t, x0, _ = draw
        err = M.flow_error(policy, b.clips, x0[b.group], t[b.group], b.tokens, b.ctx, b.ctx_mask).float()
        return b.adv * err, {"toy_err": float(err.detach().mean())}
    rule = rl_objective.Rule(weighted_regression, samples="draws", old_policy=None, flow_kl=True, bf16=False,
                          kl_weight=0.1)
    monkeypatch.setitem(rl_objective.RULES, "toy", rule)
    bright = lambda clips, prompts: {"fidelity": torch.zeros(len(clips)), "temporal": torch.zeros(len(clips)),
                                     "instruction": clips.mean((1, 2, 3, 4))}
    ckpt = reward_rl.train(tiny_rl(tuned, tmp_path / "toy", update="toy", iters=2, hold=(), std_floor=1e-6),
                           reward_fn=bright)
    recs = [r for r in read_log(tmp_path / "toy" / "log.jsonl") if "reward_instruction" in r]
    assert len(recs) == 2 and recs[0]["loss"] != 0 and recs[1]["kl_ref"] > 0     # it trained, away from its input
    (after, meta), (before, _) = checkpoint.load_model(ckpt), checkpoint.load_model(tuned)
    assert meta["lineage"]["stage"] == "rl-toy"
    assert any(not torch.equal(a, b) for a, b in zip(after.state_dict().values(), before.state_dict().values()))


# --- its cost, and resuming

def test_stage_ii_counts_every_network_evaluation_and_resumes_the_count(tiny_checkpoints, tmp_path):
    """AWM, 2 iterations of 2 prompts x 4 rollouts on 4 Euler steps (guided while t < 0.6: 3 of them, 2 passes each):
    rollouts 8 x (3 x 2 + 1); the first epoch on-policy (the policy's 2 draws, the KL's policy and reference pass), the
    second also the sampler's 2 draws; each update the curated term's 4 clips; the floor's probe, 4 clips on the
    eval_steps' 2 guided steps, once at the start and once an iteration. A run stopped and resumed counts on."""
    _, tuned, _ = tiny_checkpoints
    kw = dict(prompts_per_iter=2, group_size=4, rollout_steps=4, sft_batch=4, eval_every=100)
    reward_rl.train(tiny_rl(tuned, tmp_path / "whole", iters=2, **kw))
    probe = 4 * 2 * 2
    per_iteration = 8 * (3 * 2 + 1) + (2 * 8 + 2 * 8 + 4) + (2 * 8 + 2 * 8 + 2 * 8 + 4) + probe
    costs = [r for r in read_log(tmp_path / "whole" / "log.jsonl") if "cost_nfe" in r]
    assert [r["cost_nfe"] for r in costs] == [probe + per_iteration, probe + 2 * per_iteration]
    assert [(r["cost_rollouts"], r["cost_steps"]) for r in costs] == [(8, 2), (16, 4)]
    reward_rl.train(tiny_rl(tuned, tmp_path / "cut", iters=1, **kw))
    reward_rl.train(tiny_rl(tuned, tmp_path / "cut", iters=2, resume=True, **kw))
    assert [r["cost_nfe"] for r in read_log(tmp_path / "cut" / "log.jsonl") if "cost_nfe" in r] == [
        probe + per_iteration, probe + 2 * per_iteration]


def test_stage_ii_stops_before_its_time_budget_would_pass_and_at_its_evaluation_budget():
    """--max_minutes stops when the next iteration, as long as the last, would pass it; --max_nfe once spent."""
    one = distributed.Dist()                                               # one process
    cfg = reward_rl.Config(max_minutes=1.0)
    cost = stability.Cost()
    assert not reward_rl.out_of_budget(cfg, 40.0, 15.0, cost, one)        # 55 s: another fits
    assert reward_rl.out_of_budget(cfg, 50.0, 15.0, cost, one)            # 65 s: it would not
    assert not reward_rl.out_of_budget(reward_rl.Config(max_minutes=0), 1e6, 1e6, cost, one)
    cost.nfe = 100
    assert reward_rl.out_of_budget(reward_rl.Config(max_minutes=0, max_nfe=100), 0.0, 0.0, cost, one)
    assert not reward_rl.out_of_budget(reward_rl.Config(max_minutes=0, max_nfe=101), 0.0, 0.0, cost, one)


def test_grpo_interrupted_run_resumes_to_identical_weights(tiny_checkpoints):
    _, tuned, root = tiny_checkpoints
    full = reward_rl.train(tiny_rl(tuned, root / "rl_full", iters=3))
    reward_rl.train(tiny_rl(tuned, root / "rl_cut", iters=2))               # stopped after iteration 2
    resumed = reward_rl.train(tiny_rl(tuned, root / "rl_cut", iters=3, resume=True))
    a, b = checkpoint.read_checkpoint(full)[0], checkpoint.read_checkpoint(resumed)[0]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_grpo_resumes_exactly_between_rollbacks(trained_tiny, tmp_path):
    """With the spike guard rolling back every iteration after its warmup (two and more rollbacks with no snapshot
    between) and a floor's multipliers moving, a run stopped after 6 iterations and resumed to 8 ends with the
    weights of an 8-iteration run."""
    kw = dict(prompts_per_iter=2, group_size=4, rollout_steps=4, eval_prompts=2, eval_steps=2, eval_every=2, lr=1e-3,
              warmup=1, sft_batch=4, spike_factor=1.01, hold=("fidelity=0.0001", "temporal=0.0001"), hold_probe=2)
    full = reward_rl.train(tiny_rl(trained_tiny, tmp_path / "full", iters=8, **kw))
    log = [r for r in read_log(tmp_path / "full" / "log.jsonl") if "rollbacks" in r]
    assert [r["rollbacks"] for r in log][5:8] == [1, 2, 3], log                 # iterations 6, 7, 8 each rolled back
    assert max(r["hold_multiplier"]["fidelity"] + r["hold_multiplier"]["temporal"] for r in log[6:]) > 0  # a floor acts
    reward_rl.train(tiny_rl(trained_tiny, tmp_path / "cut", iters=6, **kw))
    resumed = reward_rl.train(tiny_rl(trained_tiny, tmp_path / "cut", iters=8, resume=True, **kw))
    a, b = checkpoint.read_checkpoint(full)[0], checkpoint.read_checkpoint(resumed)[0]
    assert all(torch.equal(a[k], b[k]) for k in a)


def falling():
    """A reward whose first call (the floor's probe at the start) reads fidelity 1 and every later call 0."""
    calls = []

    def reward(clips, prompts):
        calls.append(len(clips))
        n = len(clips)
        return {"fidelity": torch.full((n,), 1.0 if len(calls) == 1 else 0.0), "temporal": torch.full((n,), 0.5),
                "instruction": clips.mean((1, 2, 3, 4))}
    return reward


def test_hold_undo_takes_back_the_step_that_broke_the_floor(tiny_checkpoints, tmp_path):
    """A probe that reads fidelity 1 at the start and 0 after the first iteration: that iteration breaks the floor.
    With --hold_undo it is taken back, so the hand-off (the EMA) is the input's weights; without, the step stays."""
    _, tuned, _ = tiny_checkpoints
    undo = reward_rl.train(tiny_rl(tuned, tmp_path / "undo", iters=1, hold_undo=True), reward_fn=falling())
    kept = reward_rl.train(tiny_rl(tuned, tmp_path / "kept", iters=1), reward_fn=falling())
    start = checkpoint.read_checkpoint(tuned)[0]
    a, b = checkpoint.read_checkpoint(undo)[0], checkpoint.read_checkpoint(kept)[0]
    assert all(torch.equal(a[k], start[k].to(a[k].dtype)) for k in start)
    assert not all(torch.equal(b[k], start[k].to(b[k].dtype)) for k in start)
    log = [r for r in read_log(tmp_path / "undo" / "log.jsonl") if "hold_undone" in r]
    assert [(r["hold_undone"], r["hold_broken"]) for r in log] == [(True, ["fidelity"])]
    with pytest.raises(cli.ConfigError, match="--hold_undo"):
        reward_rl.train(tiny_rl(tuned, tmp_path / "none", hold=(), hold_undo=True))


def test_hold_every_measures_every_kth_iteration_and_undoes_back_to_the_last_measure(tiny_checkpoints, tmp_path):
    """--hold_every=2: the probe runs after iterations 2 and 4 only (an unmeasured iteration costs the probe's
    evaluations less), and a measure that finds the floor broken takes back both steps since the last one inside:
    the hand-off is the input's weights."""
    _, tuned, _ = tiny_checkpoints
    run = reward_rl.train(tiny_rl(tuned, tmp_path / "every", iters=2, hold_every=2, hold_undo=True),
                          reward_fn=falling())
    start = checkpoint.read_checkpoint(tuned)[0]
    after = checkpoint.read_checkpoint(run)[0]
    assert all(torch.equal(after[k], start[k].to(after[k].dtype)) for k in start)
    log = [r for r in read_log(tmp_path / "every" / "log.jsonl") if "hold_measured" in r]
    assert [(r["hold_measured"], r["hold_undone"]) for r in log] == [(False, False), (True, True)]
    reward_rl.train(tiny_rl(tuned, tmp_path / "each", iters=2, hold_undo=True), reward_fn=falling())
    each = [r for r in read_log(tmp_path / "each" / "log.jsonl") if "cost_nfe" in r]
    assert each[-1]["cost_nfe"] - log[-1]["cost_nfe"] == 4 * 2 * 2   # one probe: 4 clips x 2 steps x 2 guided passes
    with pytest.raises(cli.ConfigError, match="hold_every"):
        reward_rl.train(tiny_rl(tuned, tmp_path / "none", hold_every=0))


def test_hold_undo_resumes_exactly(trained_tiny, tmp_path):
    """Floors a hair under the start, so some iterations are taken back and some kept: a run stopped after 2
    iterations and resumed to 4 ends with the weights of a 4-iteration run."""
    kw = dict(prompts_per_iter=2, group_size=4, rollout_steps=4, eval_prompts=2, eval_steps=2, lr=1e-3, warmup=1,
              sft_batch=4, hold=("fidelity=0.0001", "temporal=0.0001"), hold_probe=2, hold_undo=True)
    full = reward_rl.train(tiny_rl(trained_tiny, tmp_path / "full", iters=4, **kw))
    undone = [r["hold_undone"] for r in read_log(tmp_path / "full" / "log.jsonl") if "hold_undone" in r]
    assert True in undone and False in undone, undone
    reward_rl.train(tiny_rl(trained_tiny, tmp_path / "cut", iters=2, **kw))
    resumed = reward_rl.train(tiny_rl(trained_tiny, tmp_path / "cut", iters=4, resume=True, **kw))
    a, b = checkpoint.read_checkpoint(full)[0], checkpoint.read_checkpoint(resumed)[0]
    assert all(torch.equal(a[k], b[k]) for k in a)


# ==================================================================================================
# preference.py: Stage III
# ==================================================================================================

def test_dpo_loss_is_log2_at_start_and_decoupled_gradient_equals_joint():
    policy, ref = tiny_model(randomize=True), tiny_model(randomize=True)
    p = tiny_pairs()
    p["weight"] = torch.rand(6) + 0.5
    loss, z, _ = dpo_grads(True, policy, ref, p, sft_weight=0.0)
    assert torch.equal(z, torch.zeros(6)) and abs(loss.item() - math.log(2) * p["weight"].mean().item()) < 1e-6
    with torch.no_grad():                                  # move the policy away from the reference
        for q in policy.parameters():
            q.add_(0.01 * torch.randn_like(q))
    lj, zj, gj = dpo_grads(False, policy, ref, p)
    ld, zd, gd = dpo_grads(True, policy, ref, p)
    assert zj.abs().max() > 0 and torch.allclose(zj, zd) and abs(lj.item() - ld.item()) < 1e-6
    assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-4) for a, b in zip(gj, gd))


def test_pair_margin_filter_and_file_round_trip(tmp_path):
    net = tiny_model(randomize=True)
    cfg = preference.Config(pair_prompts=3, samples_per_prompt=3, sample_steps=2, margin=0.0)
    every = preference.make_pairs(net, cfg, TINY_WORLD, print)
    assert len(every["winner"]) <= 3 * 3 and (every["score_w"] > every["score_l"]).all()
    cfg.margin = float((every["score_w"] - every["score_l"]).median())
    kept = preference.make_pairs(net, cfg, TINY_WORLD, print)
    assert 0 < len(kept["winner"]) < len(every["winner"]) and ((kept["score_w"] - kept["score_l"]) >= cfg.margin).all()
    path = str(tmp_path / "pairs.safetensors")
    preference.save_pairs(path, kept)
    back = preference.load_pairs(path, net.cfg)
    assert all(torch.equal(back[k], kept[k]) for k in kept)
    with pytest.raises(cli.ConfigError, match="shape"):
        preference.load_pairs(path, M.preset("small"))
    with pytest.raises(cli.ConfigError, match="not found"):
        preference.load_pairs(str(tmp_path / "none.safetensors"), net.cfg)


def test_dpo_run_raises_implicit_accuracy_on_fixed_pairs(tiny_checkpoints):
    _, tuned, root = tiny_checkpoints
    preference.save_pairs(str(root / "fixed.safetensors"), tiny_pairs(8))
    cfg = preference.Config(init=str(tuned), out_dir=str(root / "dpo"), pairs=str(root / "fixed.safetensors"), steps=30,
                            batch_size=8, lr=3e-3, warmup=2, beta=20.0, sft_weight=0.0, curated_weight=0.0, log_every=1,
                            eval_prompts=2, eval_steps=2, device="cpu")
    preference.train(cfg)
    recs = [r for r in read_log(root / "dpo" / "log.jsonl") if "implicit_acc" in r]
    assert recs[0]["loss"] == pytest.approx(math.log(2), abs=0.02)
    assert recs[-1]["implicit_acc"] > 0.8 and recs[-1]["loss"] < recs[0]["loss"], recs
    final = read_log(root / "dpo" / "log.jsonl")[-1]["final"]
    assert 0 <= final["win_rate"] <= 1 and "acc_all" in final["dpo"]
    # the curated anchor: the same pairs and steps, but the policy keeps fitting real clips while it fits the pairs
    preference.train(dataclasses.replace(cfg, out_dir=str(root / "dpo_anchored"), curated_weight=20.0))
    held = torch.no_grad()(lambda ckpt: float(M.curated_loss(checkpoint.load_model(str(ckpt), "cpu")[0], 32, 99, 0, TINY_WORLD, "cpu").mean()))
    free, anchored = held(root / "dpo" / "ckpt.safetensors"), held(root / "dpo_anchored" / "ckpt.safetensors")
    assert anchored < free, (anchored, free)
    assert read_log(root / "dpo_anchored" / "log.jsonl")[-2]["curated_loss"] > 0


def test_dpo_takes_any_stage_two_checkpoint_by_its_family(tiny_checkpoints):
    """Stage III accepts a Stage II checkpoint of any update rule (stage family rl) without --any_input: an NFT
    checkpoint trains, and its DPO checkpoint's lineage names it; a pretrained base is still refused."""
    base, tuned, root = tiny_checkpoints
    assert [checkpoint.stage_family(s) for s in ("rl-nft", "rl-awm", "sft", "dpo", "pretrain", "")] == [
        "rl", "rl", "sft", "dpo", "pretrain", ""]
    nft = reward_rl.train(tiny_rl(tuned, root / "rl_nft", update="nft", iters=1))
    assert checkpoint.read_checkpoint(nft)[2]["lineage"]["stage"] == "rl-nft"
    preference.save_pairs(str(root / "nft_pairs.safetensors"), tiny_pairs(4))
    cfg = preference.Config(init=str(nft), out_dir=str(root / "dpo_nft"), pairs=str(root / "nft_pairs.safetensors"),
                            steps=2, batch_size=4, warmup=1, curated_batch=2, log_every=1, ckpt_every=2, eval_prompts=2,
                            eval_steps=2, device="cpu")
    lineage = checkpoint.read_checkpoint(preference.train(cfg))[2]["lineage"]
    assert (lineage["stage"], lineage["parent"], lineage["parent_stage"]) == ("dpo", str(nft), "rl-nft")
    assert lineage["parent_hash"] == checkpoint.file_hash(str(nft))
    with pytest.raises(cli.ConfigError, match="is a pretrain checkpoint"):
        preference.train(dataclasses.replace(cfg, init=str(base), out_dir=str(root / "dpo_base")))


# ==================================================================================================
# rewards.py, judge.py, diagnose.py: what the stages are rewarded and judged by
# ==================================================================================================

# --- rewards.py: the oracle and the heads

def test_oracle_recovers_curated_attributes():
    b = data.make_batch("curated", 512, seed=11)
    obs = rewards.oracle(b.videos)
    ok = rewards.check(b.videos, b.attrs, obs=obs)
    assert ok["all"].float().mean() >= 0.99, {k: v.float().mean().item() for k, v in ok.items()}
    assert rewards.check(b.videos, b.prompts, obs=obs)["all"].float().mean() >= 0.99  # captions read the same
    assert rewards.wrap(obs["center"] - b.centers, 32).abs().max() < 0.3    # circular mean across the edges


def test_oracle_on_heldout_and_small_frames():
    h = data.make_batch("heldout", 256, seed=12)
    assert rewards.check(h.videos, h.attrs)["all"].float().mean() >= 0.99
    t = data.make_batch("curated", 256, seed=13, world=TINY_WORLD)    # 16x16: radius and speeds scale by 1/2
    assert rewards.check(t.videos, t.attrs, world=TINY_WORLD)["all"].float().mean() >= 0.99


def test_reward_heads_shapes_and_ranges():
    b = data.make_batch("web", 16, seed=14)
    blank = torch.full((2, 3, 8, 32, 32), -1.0)                        # no object at all
    noise = torch.rand(2, 3, 8, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    videos = torch.cat([b.videos, blank, noise])
    prompts = b.prompts + ["a red circle", "moving up", "a fast blue square moving left", "a triangle"]
    heads = rewards.reward_heads(videos, prompts)
    assert set(heads) == set(rewards.HEADS) >= {"fidelity", "temporal", "instruction"}
    for name, v in heads.items():
        assert v.shape == (20,) and torch.isfinite(v).all() and v.min() >= 0 and v.max() <= 1, name
    assert heads["fidelity"][16:].max() < 0.2 and heads["instruction"][16:18].max() < 0.2  # nothing to reward
    ok = rewards.check(videos, prompts)
    assert set(ok) == {*data.ATTRIBUTES, "all"} and ok["all"].shape == (20,) and not ok["all"][16:18].any()


def test_reward_fidelity_and_temporal_fall_as_defects_grow():
    # One seed for every level: the same draws decide which clips carry a defect, so each level's
    # defects contain the previous level's, clip by clip. Scale 100 saturates every rate at 1.0.
    means = []
    for s in (0, 0.5, 1, 2, 100):
        b = data.make_batch("web", 128, seed=15, defects=data.Defects().scaled(s))
        heads = rewards.reward_heads(b.videos, b.prompts)
        means.append({k: v.mean().item() for k, v in heads.items()})
        if s == 2:  # rates 0.3 to 0.6: each head answers to its own defects, with the others mixed in
            for defect, head in [("blur", "fidelity"), ("noise", "fidelity"), ("colour_shift", "fidelity"),
                                 ("flicker", "temporal"), ("jitter", "temporal"), ("noise", "temporal")]:
                has = b.defects[defect]
                assert heads[head][has].mean() < heads[head][~has].mean() - 0.08, (defect, head)
    for head in ("fidelity", "temporal"):
        m = [x[head] for x in means]
        assert all(a > b + 0.03 for a, b in zip(m, m[1:])), (head, m)
        assert m[0] > 0.9 and m[-1] < 0.3, (head, m)


def test_reward_instruction_prefers_matching_prompt():
    b = data.make_batch("curated", 128, seed=17)
    a = {k: v.tolist() for k, v in b.attrs.items()}
    wrong = [data.caption((c + 1) % 6, (s + 1) % 3, (d + 1) % 4, 1 - v)
             for c, s, d, v in zip(a["colour"], a["shape"], a["direction"], a["speed"])]
    obs = rewards.oracle(b.videos)
    right = rewards.reward_heads(b.videos, b.prompts, obs=obs)["instruction"]
    assert right.min() > 0.9 and (right > rewards.reward_heads(b.videos, wrong, obs=obs)["instruction"]).all()
    assert not rewards.check(b.videos, wrong, obs=obs)["all"].any()


def test_reward_instruction_is_soft_for_partly_wrong_prompts():
    b = data.make_batch("curated", 128, seed=18)
    c, s, d, v = (b.attrs[k].tolist() for k in ("colour", "shape", "direction", "speed"))
    colour, shape, wrong_dir = data.COLOUR_NAMES, data.SHAPES, data.DIRECTION_NAMES
    # right colour and shape, wrong direction, speed unsaid (so skipped); then the shape wrong too; then all
    part = [f"a {colour[c[i]]} {shape[s[i]]} moving {wrong_dir[(d[i] + 1) % 4]}" for i in range(128)]
    less = [f"a {colour[c[i]]} {shape[(s[i] + 1) % 3]} moving {wrong_dir[(d[i] + 1) % 4]}" for i in range(128)]
    wrong = [data.caption((c[i] + 1) % 6, (s[i] + 1) % 3, (d[i] + 1) % 4, 1 - v[i]) for i in range(128)]
    obs = rewards.oracle(b.videos)
    score = [rewards.reward_heads(b.videos, p, obs=obs)["instruction"] for p in (b.prompts, part, less, wrong)]
    assert ((score[0] > score[1]) & (score[1] > score[2]) & (score[2] > score[3])).float().mean() >= 0.95
    assert 0.5 < score[1].mean() < 0.9 and 0.2 < score[2].mean() < 0.6 and score[3].mean() < 0.2
    ok = rewards.check(b.videos, part, obs=obs)
    assert ok["colour"].all() and ok["speed"].all() and not ok["direction"].any()


# --- judge.py: the learned judge

def test_reward_model_ensemble_mean_and_std(tiny_checkpoints, tiny_judge, capsys):
    base, tuned, root = tiny_checkpoints
    out, printed = tiny_judge
    assert "pair_accuracy" in printed and "generator_samples_proxy_minus_oracle" in printed   # its gap on samples
    assert '"proxy_minus_oracle_on_base"' in printed and '"proxy_minus_oracle_on_sft"' in printed  # and per generator
    members = judge.load_reward_model(out)
    assert len(checkpoint.read_checkpoint(out)[2]["lineage"]["parent_hash"].split(",")) == 2        # both generators
    b = data.make_batch("curated", 5)
    mean, std = judge.rm_score(members, b.videos, b.tokens)
    each = torch.stack([m(b.videos, b.tokens) for m in members])               # (K, B, heads)
    for i, head in enumerate(rewards.HEADS):
        assert torch.allclose(mean[head], each[:, :, i].mean(0)) and torch.allclose(std[head], each[:, :, i].std(0))
    assert std["fidelity"].max() > 0                                             # bootstrapped members disagree
    assert not torch.equal(members[0].offset, torch.zeros_like(members[0].offset))     # calibrated, one shift for all
    assert all(torch.equal(m.offset, members[0].offset) for m in members)
    # recalibrated on another policy's samples: the trained weights kept, the level refit, the judge replaced only if asked
    with pytest.raises(cli.ConfigError, match="--out is empty"):      # never written over its own input
        judge.calibrate_judge([f"--judge={out}", f"--on={base}", "--clips=4"])
    with pytest.raises(cli.ConfigError, match="is also an input of this command"):
        judge.calibrate_judge([f"--judge={out}", f"--on={base}", "--clips=4", f"--out={out}", "--overwrite=true"])
    judge.calibrate_judge([f"--judge={out}", f"--on={base}", "--clips=4", f"--out={root / 'rm_base.safetensors'}"])
    assert "proxy - oracle on 64 held-out samples" in capsys.readouterr().out
    again = judge.load_reward_model(str(root / "rm_base.safetensors"))
    for old, new in zip(members, again):
        assert torch.equal(old.out[0].weight, new.out[0].weight) and not torch.equal(old.offset, new.offset)
    with pytest.raises(FileExistsError):
        judge.train_reward_model([f"--out={out}", "--generators="])


def test_judge_calibration_sets_each_heads_level_on_the_members_mean_and_keeps_their_ranking():
    torch.manual_seed(0)
    members = [judge.RewardNet(8) for _ in range(3)]
    b = data.make_batch("web", 32, seed=3, world=TINY_WORLD)
    raw = [m(b.videos, b.tokens) for m in members]
    truth = torch.rand(32, len(rewards.HEADS))
    judge.fit_calibration(members, b.videos, b.tokens, truth)
    fitted = [m(b.videos, b.tokens) for m in members]
    assert torch.allclose(torch.stack(fitted).mean(0).mean(0), truth.mean(0), atol=1e-5)     # the level: truth's
    shift = [f - r for f, r in zip(fitted, raw)]
    assert all(torch.allclose(x, shift[0][:1].expand_as(x), atol=1e-6) for x in shift)  # one shift, every clip and member


def test_a_judge_or_checkpoint_from_an_older_postflow_is_refused_naming_what_to_remake(tmp_path):
    net, path = judge.RewardNet(8), str(tmp_path / "old_judge.safetensors")
    tensors = {f"member0.{k}": v for k, v in net.state_dict().items() if k != "offset"}    # no calibration
    checkpoint.save_checkpoint(path, tensors, M.preset("tiny"), checkpoint.lineage_record("reward_model"), members=1,
                               width=8, heads=list(rewards.HEADS))
    with pytest.raises(checkpoint.CheckpointError, match="refit it"):
        judge.load_reward_model(path)
    policy = M.VideoDiT(M.preset("tiny"))
    save_file(policy.state_dict(), str(tmp_path / "factorised.safetensors"), metadata={   # a layout no longer built
        "format": "postflow", "lineage": "{}",
        "model_config": json.dumps({**dataclasses.asdict(policy.cfg), "attention": "factorised"})})
    with pytest.raises(checkpoint.CheckpointError, match="asks for attention, which this postflow does not build"):
        checkpoint.load_model(str(tmp_path / "factorised.safetensors"))


# --- diagnose.py: checkpoints side by side, the recommendation, advise

def test_diagnose_writes_every_metric(tiny_checkpoints, tiny_judge):
    base, tuned, root = tiny_checkpoints
    out = root / "diag"
    diagnose.diagnose([f"--ckpt={base}", f"--ckpt={tuned}", f"--out={out}", "--prompts=2", "--seeds=2", "--steps=2",
                      "--long_clips=2", "--diversity_seeds=3", "--reward_model=" + tiny_judge[0]])
    result = json.load(open(out / "diagnostics.json"))
    assert list(result) == ["base", "sft"]
    for r in result.values():
        assert {"fidelity", "temporal", "instruction", "instruction_by_attribute", "drift_by_frame", "drift_by_chunk",
                "diversity", "cfg_response", "context_adherence", "proxy_reward", "proxy_oracle_gap",
                "recommendation", "quality_score", "semantic_score", "vbench"} <= set(r)
        assert len(r["drift_by_chunk"]) == 4 and len(r["drift_by_frame"]["identity"]) == 4
        assert set(r["vbench"]) == set(diagnose.QUALITY + diagnose.SEMANTIC)
        # why: every head in parts, each beside the training data's own score on it, penalties >= 0 (0 = perfect)
        parts = r["parts"]
        assert list(parts) == list(rewards.HEADS) and set(parts["instruction"]) == set(data.ATTRIBUTES)
        assert set(parts["fidelity"]) == {"edges", "background", "palette"}
        assert set(parts["temporal"]) == {"acceleration", "size", "morph", "flicker", "background", "empty"}
        for head, ps in parts.items():
            for v in ps.values():
                assert set(v) == {"model", "curated", "web", "redraw"} and all(math.isfinite(x) and x >= 0 for x in v.values())
                assert head != "instruction" or max(v.values()) <= 1                         # 1 - agreement
        for head in ("fidelity", "temporal"):   # curated clips are the clean renders the web clips are noisy copies of
            assert sum(v["curated"] for v in parts[head].values()) < sum(v["web"] for v in parts[head].values())
        rec = r["recommendation"]
        assert rec["axis"] in rewards.HEADS and rec["part"] in parts[rec["axis"]] and rec["part"] in rec["text"]
        assert stage_command(rec["command"])[1].init in (str(base), str(tuned))
    assert result["base"]["parts"]["fidelity"]["edges"]["web"] == result["sft"]["parts"]["fidelity"]["edges"]["web"]
    table = (out / "diagnostics.md").read_text()
    assert "| fidelity: edges |" in table and result["sft"]["recommendation"]["command"] in table
    assert (out / "grid.gif").exists()


def test_diagnose_reads_a_repeat_back_and_advise_hands_the_axis_to_the_next_stage(tiny_checkpoints, tmp_path, monkeypatch,
                                                                                    capsys):
    base, tuned, _ = tiny_checkpoints
    tiny = ["--prompts=1", "--seeds=2", "--steps=1", "--long_clips=1", "--diversity_seeds=2", "--reward_model=",
            f"--cache={tmp_path / 'cache'}"]
    diagnose.diagnose([f"--ckpt={base}", f"--ckpt={tuned}", f"--out={tmp_path / 'a'}", *tiny])
    first = json.load(open(tmp_path / "a" / "diagnostics.json"))
    # the same files and settings again, here under other names: nothing is sampled
    copy = tmp_path / "copy.safetensors"
    shutil.copy(tuned, copy)
    monkeypatch.setattr(diagnose, "diagnose_checkpoint", lambda *a: pytest.fail("recomputed a cached diagnosis"))
    diagnose.diagnose([f"--ckpt={base}", f"--ckpt={copy}", f"--out={tmp_path / 'b'}", *tiny])
    again = json.load(open(tmp_path / "b" / "diagnostics.json"))
    assert again["copy"]["fidelity"] == first["sft"]["fidelity"] and again["base"] == first["base"]
    assert str(copy) in again["copy"]["recommendation"]["command"]                 # the advice names the path given
    shutil.copytree(tmp_path / "cache", tmp_path / "shipped")                         # the folder shipped with a clone
    diagnose.diagnose([f"--ckpt={base}", f"--out={tmp_path / 'd'}", *tiny[:-1], f"--shipped={tmp_path / 'shipped'}"])
    assert json.load(open(tmp_path / "d" / "diagnostics.json"))["base"] == first["base"]
    with pytest.raises(pytest.fail.Exception, match="recomputed"):                    # another setting is a miss
        diagnose.diagnose([f"--ckpt={base}", f"--out={tmp_path / 'c'}", *tiny[:2], "--steps=2", *tiny[3:]])
    # advise: the flags that point the next stage at the diagnosed axis, parsed by that stage's own config
    capsys.readouterr()
    for stage, module in (("rl", reward_rl), ("dpo", preference)):
        diagnose.advise([f"--diagnose={tmp_path / 'a'}", f"--stage={stage}", f"--out={tmp_path / stage}.json"])
        flags = capsys.readouterr().out.split()
        decision = json.load(open(f"{tmp_path / stage}.json"))
        rec = first["sft"]["recommendation"]
        stage_one = shlex.split(rec["command"])[1] == "sft.py"
        assert decision["from"] == "sft" and decision["axis"] == rec["axis"] and decision["flags"] == flags
        assert flags == diagnose.stage_flags(stage, rec["axis"], stage_one)
        # either way the stage's own parser reads the flags, and they turn it: toward the axis, or toward Stage I's data
        for one in (False, True):
            cfg, default = cli.parse_config(module.Config, diagnose.stage_flags(stage, rec["axis"], one)), module.Config()
            anchor = {"rl": "sft_weight", "dpo": "curated_weight"}[stage]
            if one:
                assert getattr(cfg, anchor) == 4 * getattr(default, anchor) and cfg.weights == default.weights
            else:
                assert rewards.head_weights(cfg.weights)[rec["axis"]] > rewards.head_weights(())[rec["axis"]] or stage == "dpo"
                assert cfg.weights and getattr(cfg, anchor) == getattr(default, anchor)
    with pytest.raises(cli.ConfigError, match="no column 'rl'"):
        diagnose.advise([f"--diagnose={tmp_path / 'a'}", "--column=rl"])


def test_head_parts_rebuild_each_head():
    """diagnose's breakdown is the heads' own arithmetic: each head is rebuilt from its parts, clip by clip."""
    b = data.make_batch("web", 16, seed=2, world=TINY_WORLD, defects=data.Defects().scaled(3.0))
    obs, want = rewards.oracle(b.videos, TINY_WORLD), rewards.targets(b.prompts, 16)
    f, t, i = (h.parts(obs, want) for h in rewards.HEADS.values())
    assert torch.allclose(rewards.fidelity(obs, want), rewards.pass_score(*f.values()))
    still = rewards.pass_score(*(v for k, v in t.items() if k != "empty")) * (1 - t["empty"])
    assert torch.allclose(rewards.temporal(obs, want), still)
    misses = torch.stack(list(i.values()), 1)                                 # NaN where the caption leaves it out
    assert misses.isnan().any() and torch.allclose(rewards.instruction(obs, want), 1 - misses.nanmean(1))
    assert min(v.min() for v in (*f.values(), *t.values())) >= 0 and f["edges"].max() > 0.5   # defects show


def test_recommendation_follows_the_worst_part_and_parses(monkeypatch):
    axes, ckpt = {"fidelity": 0.3, "temporal": 0.5, "instruction": 0.7}, "runs/my run/ckpt.safetensors"
    part = lambda model, web=1.0: {"model": model, "curated": 0.0, "web": web}
    measured = lambda edges=0.0, flicker=0.0, direction=0.0: {
        "fidelity": {"edges": part(edges), "background": part(0.05)}, "temporal": {"flicker": part(flicker),
                                                                                    "size": part(0.0)},
        "instruction": {"direction": part(direction, web=0.05), "colour": part(0.0, web=0.05)}}
    sft_like, worse_than_web = (diagnose.recommendation(axes, measured(edges=e), ckpt, "sft") for e in (0.8, 3.0))
    fid_matched = diagnose.recommendation(axes, measured(edges=0.05, flicker=2.0), ckpt, "sft")
    after_rl = diagnose.recommendation(axes, measured(edges=3.0), ckpt, "rl-awm")
    all_matched = diagnose.recommendation(axes, measured(), ckpt, "pretrain")
    words = diagnose.recommendation({**axes, "instruction": 0.1}, measured(direction=0.5), ckpt, "sft")
    # edges nearer the web data's score than the curated's: a pretraining defect -> more SFT on curated clips
    assert (sft_like["axis"], sft_like["part"]) == ("fidelity", "edges")
    assert stage_command(sft_like["command"])[1].data == "curated"
    # worse than even the web data: a reward must fix it -> Stage II with fidelity weighted up (0.25 -> 1)
    script, cfg = stage_command(worse_than_web["command"])
    assert script == "reward_rl.py" and cfg.weights == ("fidelity=1.0",) and cfg.init == ckpt
    # ... unless the head scores so low that GRPO's groups have nothing to rank: data first
    # ... unless the network's own redraw of a clean clip already misses it: no reward or sampler fixes that, data does
    undrawn = measured(edges=3.0)
    undrawn["fidelity"]["edges"]["redraw"] = 1.6
    undrawn = diagnose.recommendation(axes, undrawn, ckpt, "rl-awm")
    assert stage_command(undrawn["command"])[0] == "sft.py" and "redraw of a clean clip already misses it (1.60)" in undrawn["text"]
    hopeless = diagnose.recommendation({**axes, "fidelity": 0.01}, measured(edges=3.0), ckpt, "sft")
    assert stage_command(hopeless["command"])[0] == "sft.py" and "too low" in hopeless["text"]
    # fidelity matches the curated data: said, and the next weakest head's worst part decides
    assert (fid_matched["axis"], fid_matched["part"]) == ("temporal", "flicker") and "after fidelity" in fid_matched["text"]
    assert stage_command(fid_matched["command"])[1].weights == ("temporal=1.0",)
    # the same measurement on Stage II's output: Stage III with the judge weighted toward fidelity
    script, cfg = stage_command(after_rl["command"])
    assert script == "preference.py" and rewards.head_weights(cfg.weights, default=1.0)["fidelity"] == 3.0
    # nothing left to learn from the data: Stage III, which refines a base only with --any_input
    script, cfg = stage_command(all_matched["command"])
    assert all_matched["axis"] is None and script == "preference.py" and cfg.any_input
    # ... and SFT, DPO or any Stage II rule's output (stage family rl) without it
    for stage in ("sft", "rl-nft", "rl-awm", "dpo"):
        assert not stage_command(diagnose.recommendation(axes, measured(), ckpt, stage)["command"])[1].any_input
    script, cfg = stage_command(words["command"])
    assert words["part"] == "direction" and cfg.split_instruction and cfg.weights == ("instruction=2.0",)
    assert len({r["command"] for r in (sft_like, worse_than_web, fid_matched, after_rl, all_matched, words)}) == 6
    # a fork's head without parts still gets a command that names it (and parses: it is in the registry)
    monkeypatch.setitem(rewards.HEADS, "centred", rewards.Head(centred, weight=0.5, phase=1))
    fork = diagnose.recommendation({**axes, "centred": 0.1}, measured(), ckpt)
    assert fork["axis"] == "centred" and stage_command(fork["command"])[1].weights == ("centred=1.0",)


def test_diagnose_checks_inputs_first_and_names_columns_apart(tiny_checkpoints, bad_files, tmp_path):
    base, tuned, _ = tiny_checkpoints
    for run in ("pipeline", "other"):                                     # two pipeline runs, both with an rl stage
        (tmp_path / run / "rl").mkdir(parents=True)
        shutil.copy(tuned, tmp_path / run / "rl" / "ckpt.safetensors")
    a, b = (str(tmp_path / run / "rl" / "ckpt.safetensors") for run in ("pipeline", "other"))
    assert checkpoint.column_names([a, b, base, base]) == ["pipeline/rl", "other/rl", "base", "base#2"]
    assert checkpoint.column_names([base, str(tuned)]) == ["base", "sft"]
    tiny = ["--prompts=1", "--seeds=1", "--steps=1", "--long_clips=1", "--diversity_seeds=2"]
    diagnose.diagnose([f"--ckpt={a}", f"--ckpt={b}", f"--out={tmp_path / 'diag'}", "--reward_model=", *tiny])
    assert list(json.load(open(tmp_path / "diag" / "diagnostics.json"))) == ["pipeline/rl", "other/rl"]
    assert "| metric | pipeline/rl | other/rl |" in (tmp_path / "diag" / "diagnostics.md").read_text()
    # refused before anything is sampled or written: a judge for other clips, a policy passed as the judge
    for judge_file, needle in (("judge.safetensors", "scores 8x32x32 clips; this policy makes 4x16x16"),
                               ("tiny.safetensors", "not a learned judge")):
        with pytest.raises(checkpoint.CheckpointError, match=needle):
            diagnose.diagnose([f"--ckpt={a}", f"--out={tmp_path / 'no'}", f"--reward_model={bad_files / judge_file}", *tiny])
    with pytest.raises(cli.ConfigError, match="same clips"):
        diagnose.diagnose([f"--ckpt={a}", "--ckpt=checkpoints/sft_small.safetensors", f"--out={tmp_path / 'no'}", *tiny])
    assert not (tmp_path / "no").exists()


# --- a fourth head, through every stage and diagnose

def test_a_fourth_head_reaches_stage_ii_stage_iii_and_diagnose(tiny_checkpoints, monkeypatch, tmp_path):
    _, tuned, _ = tiny_checkpoints
    old_judge = str(tmp_path / "judge.safetensors")                       # a learned judge from before the head
    checkpoint.save_checkpoint(old_judge, {f"member0.{k}": v for k, v in judge.RewardNet(8).state_dict().items()},
                      M.preset("tiny"), checkpoint.lineage_record("reward_model"), members=1, width=8, heads=list(rewards.HEADS))
    monkeypatch.setitem(rewards.HEADS, "centred", rewards.Head(centred, weight=0.5, phase=1))  # undone after the test

    # Stage II: logged, weighted, and given its weight by the curriculum (phase 1: the middle of the run)
    reward_rl.train(tiny_rl(tuned, tmp_path / "rl", iters=3, curriculum=True, epochs=1, sft_weight=0.0))
    recs = [r for r in read_log(tmp_path / "rl" / "log.jsonl") if "reward_instruction" in r]
    assert all("reward_centred" in r and len(r["weights"]) == 4 for r in recs)
    assert [r["weights"][3] for r in recs] == pytest.approx([0.25, 0.5, 0.25])  # 0.5 x 0.5^|phase - focus|
    # Stage III: its judge weighs the head like any other, and a run on on-policy pairs goes through
    b = data.make_batch("curated", 6, seed=3, world=TINY_WORLD)
    only = preference.Config(weights=("fidelity=0", "temporal=0", "instruction=0", "centred=1"))
    heads = rewards.reward_heads(b.videos, b.prompts, TINY_WORLD)
    assert torch.allclose(preference.judge_scores(only, b.videos, b.prompts, TINY_WORLD), heads["centred"])
    assert not torch.allclose(preference.judge_scores(preference.Config(), b.videos, b.prompts, TINY_WORLD),
                              preference.judge_scores(preference.Config(weights=("centred=5",)), b.videos, b.prompts,
                                                      TINY_WORLD))
    dpo = dict(init=str(tuned), pair_prompts=2, samples_per_prompt=3, sample_steps=2, margin=0.0, steps=2,
               batch_size=2, warmup=1, log_every=1, eval_prompts=2, eval_steps=2, device="cpu")
    preference.train(preference.Config(out_dir=str(tmp_path / "dpo"), **dpo))
    assert "win_rate" in read_log(tmp_path / "dpo" / "log.jsonl")[-1]["final"]
    # a learned judge that does not score the head is refused by name, before any output folder is made
    with pytest.raises(checkpoint.CheckpointError, match="also has centred"):
        judge.load_reward_model(old_judge)
    with pytest.raises(checkpoint.CheckpointError, match="also has centred"):
        preference.train(preference.Config(out_dir=str(tmp_path / "dpo_rm"), judge="rm", reward_model=old_judge, **dpo))
    with pytest.raises(checkpoint.CheckpointError, match="also has centred"):
        reward_rl.train(tiny_rl(tuned, tmp_path / "rl_rm", reward="rm", reward_model=old_judge))
    assert not (tmp_path / "dpo_rm").exists() and not (tmp_path / "rl_rm").exists()
    # diagnose: a row, a metric, and a recommendation for a head RECOMMEND does not know
    diagnose.diagnose([f"--ckpt={tuned}", f"--out={tmp_path / 'diag'}", "--reward_model=", "--prompts=1", "--seeds=1",
                      "--steps=1", "--long_clips=1", "--diversity_seeds=2"])
    table = (tmp_path / "diag" / "diagnostics.md").read_text()
    assert "| centred |" in table and "| centred: 1 - score |" in table
    assert "--weights=centred=" in diagnose.recommendation({"fidelity": 0.9, "temporal": 0.9, "instruction": 0.9,
                                                            "centred": 0.1})["command"]


# ==================================================================================================
# stability.py, checkpoint.py, cli.py: what every stage shares
# ==================================================================================================

# --- stability.py: the floor, the guards, the hacking monitor

def test_the_floor_tightens_while_a_held_head_is_below_it_and_relaxes_while_it_holds():
    """Dual ascent on a synthetic stream of a held head's levels: the first level is the start; within half a margin
    of it nothing moves; below the guard line the multiplier rises every iteration (and the floor reads broken below
    start - margin); back above, it relaxes to 0. Its state is plain JSON, exact across a resume."""
    edge = stability.Floor({"fidelity": 0.01})                 # the default guard line: the floor's edge
    for level in (0.60, 0.594, 0.585):
        edge.update({"fidelity": level})
    assert edge.multiplier["fidelity"] == pytest.approx(0.5)    # 0.594 moved nothing, 0.585 is half a margin below
    floor = stability.Floor({"fidelity": 0.01}, rate=1.0, guard=0.5)
    floor.update({"fidelity": 0.60, "instruction": 0.8})
    for level in (0.60, 0.597):
        floor.update({"fidelity": level})
    assert floor.multiplier == {"fidelity": 0.0} and floor.broken() == []
    rising = []
    for level in (0.588, 0.588, 0.594):
        floor.update({"fidelity": level})
        rising.append(floor.multiplier["fidelity"])
    assert rising == pytest.approx([0.7, 1.4, 1.5]) and floor.broken() == []
    floor.update({"fidelity": 0.585})
    assert floor.broken() == ["fidelity"]
    copy = stability.Floor({"fidelity": 0.01}, guard=0.5)
    copy.load_state_dict(json.loads(json.dumps(floor.state_dict())))
    assert copy.state_dict() == floor.state_dict()
    falling = []
    for _ in range(6):
        floor.update({"fidelity": 0.605})
        falling.append(floor.multiplier["fidelity"])
    assert falling == sorted(falling, reverse=True) and falling[-1] == 0.0


def test_spike_guard_rollbacks_restore_the_snapshot_however_often():
    """Two rollbacks with no snapshot between them restore the same weights and optimizer moments: the steps after
    the first cannot reach the snapshot's tensors."""
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(net.parameters(), lr=0.1)
    step = lambda: (net(torch.randn(8, 4)).pow(2).mean().backward(), opt.step(), opt.zero_grad())
    step()
    guard = stability.SpikeGuard(factor=2.0, warmup=1)
    guard.snapshot(net, opt)
    want_w = {k: v.clone() for k, v in net.state_dict().items()}
    want_m = {k: v.clone() for k, v in opt.state[net.weight].items()}
    assert not guard.check(net, opt, grad_norm=1.0)
    for _ in range(2):                                   # a spike, a good step without a snapshot, another spike
        step()
        assert guard.check(net, opt, grad_norm=100.0)
        assert all(torch.equal(net.state_dict()[k], v) for k, v in want_w.items())
        assert all(torch.equal(opt.state[net.weight][k], v) for k, v in want_m.items())
    assert guard.rollbacks == 2


def test_non_finite_steps_stop_the_run_and_a_full_disk_is_one_line(tmp_path, monkeypatch, capsys):
    guard = stability.NonFiniteGuard(limit=3)
    assert guard.ok(1.0, 1.0) and not guard.ok(float("nan"), 1.0) and not guard.ok(1.0, float("inf"))
    assert guard.ok(1.0, 1.0) and guard.in_a_row == 0 and guard.skipped == 2          # a stray step is skipped
    with pytest.raises(cli.Diverged, match="3 steps in a row"):
        for _ in range(3):
            guard.ok(float("nan"), 1.0)
    def full_disk(tensors, path, metadata=None):   # as safetensors 0.8 reports it (seen on a full tmpfs): its own error
        open(path, "wb").write(b"partial")
        raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    net = tiny_model()
    with pytest.raises(SystemExit) as stop:
        cli.run_cli(lambda argv: checkpoint.save_checkpoint(str(tmp_path / "a.safetensors"), net.state_dict(), net.cfg, {}), [])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and "No space left" in err[0], err
    assert os.listdir(tmp_path) == []                                                 # no half-written temp file


def test_hacking_monitor_stops_when_the_oracle_falls_while_the_trained_reward_rises(tiny_checkpoints, tmp_path,
                                                                                     monkeypatch):
    monitor = stability.HackingMonitor(patience=3)
    assert not any(monitor.update(h, r) for h, r in ((1.0, 0.1), (0.9, 0.2), (0.9, 0.3), (0.8, 0.4), (0.7, 0.5)))
    assert monitor.update(0.6, 0.6)                        # a tie broke the run of falls; 0.9 > 0.8 > 0.7 > 0.6 does it
    assert not stability.HackingMonitor(patience=2).update(0.5, 0.0) and not any(
        stability.HackingMonitor(patience=1).update(h, 1.0) for h in (1.0, 1.1))   # the oracle rising is no hacking
    both_fall = stability.HackingMonitor(patience=2)                                 # nor a proxy that falls alike
    assert not any(both_fall.update(v, v + 0.1) for v in (1.0, 0.9, 0.8))
    # in Stage II: a judge whose score climbs every iteration while every oracle head falls at each evaluation
    _, tuned, _ = tiny_checkpoints
    calls, evals = [0], [0]
    def judge(clips, prompts):
        calls[0] += 1
        return {h: torch.rand(len(clips)) * 0.1 + 0.1 * calls[0] for h in rewards.HEADS}
    def oracle_falls(*a, **k):
        evals[0] += 1
        return {**{h: 1.0 - 0.1 * evals[0] for h in rewards.HEADS}, "acc_all": 0.5}  # accuracy flat: not what it reads
    monkeypatch.setattr(rewards, "quick_eval", oracle_falls)
    out = tmp_path / "hacked"
    reward_rl.train(tiny_rl(tuned, out, iters=8, eval_every=1), reward_fn=judge)
    steps = [r for r in read_log(out / "log.jsonl") if "rollout_s" in r]
    assert len(steps) == 4 and os.path.exists(out / "ckpt.safetensors")            # 4 evaluations: 3 falls, then stop


# --- checkpoint.py and cli.py: files, configs, one-line errors

def test_checkpoint_round_trip_and_errors(tmp_path):
    net = tiny_model(randomize=True).eval()
    path = str(tmp_path / "a.safetensors")
    checkpoint.save_checkpoint(path, net.state_dict(), net.cfg, checkpoint.lineage_record("test", step=3))
    loaded, meta = checkpoint.load_model(path)
    x, tok = torch.randn(1, 3, 4, 16, 16), data.tokenize(["a red circle"])
    assert torch.equal(loaded(x, torch.tensor([0.5]), tok), net(x, torch.tensor([0.5]), tok))
    assert meta["lineage"]["stage"] == "test" and meta["lineage"]["step"] == 3
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]     # the temp file was renamed away

    with pytest.raises(checkpoint.CheckpointError, match="another model shape: dim=32"):
        checkpoint.load_model(path, expect=M.preset("tiny", dim=48))
    other = M.VideoDiT(M.preset("tiny", dim=48))
    with pytest.raises(checkpoint.CheckpointError, match="has shape"):
        checkpoint.load_weights(other, checkpoint.read_checkpoint(path)[0], path)
    with pytest.raises(checkpoint.CheckpointError, match="not found"):
        checkpoint.load_model(str(tmp_path / "missing.safetensors"))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(open(path, "rb").read()[:1000])
    with pytest.raises(checkpoint.CheckpointError, match="truncated"):
        checkpoint.load_model(str(cut))


def test_config_parsing():
    cfg = cli.parse_config(sft.Config, ["--steps=7", "--lr=0.5", "--resume=true", "--init="])
    assert (cfg.steps, cfg.lr, cfg.resume, cfg.init) == (7, 0.5, True, "")
    with pytest.raises(cli.ConfigError, match="unknown config key 'stpes'"):
        cli.parse_config(sft.Config, ["--stpes=7"])
    with pytest.raises(cli.ConfigError, match="expects int"):
        cli.parse_config(sft.Config, ["--steps=many"])


def test_cli_errors_are_one_line(tmp_path):
    for args, needle in [(["sft.py", "--bogus=1"], "unknown config key 'bogus'"),
                         (["sft.py", f"--init={tmp_path}/none.safetensors", f"--out_dir={tmp_path}/o"], "not found"),
                         (["checkpoint.py", "--prompts=a purple circle", f"--out={tmp_path}/x.gif"], "unknown word"),
                         (["checkpoint.py", "--prompts=;", f"--out={tmp_path}/x.gif"], "empty prompt list")]:
        # one in a fresh interpreter, as a user runs it; the others through the same __main__ here
        r = (run_script if args[1] == "--bogus=1" else run_in_process)(*args)
        assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1


# ==================================================================================================
# Bad input: one line, exit 2, nothing touched
# ==================================================================================================

# (command line, what its one stderr line says, files that must survive); {r} is bad_files' folder, {o} the case's
# output folder. Every case fails before any model work, before {o} is made, and without touching an old run.
BAD_INPUT = {
    "render_missing_ckpt": ("checkpoint.py --ckpt=missing.safetensors --out={o}/x.gif", "checkpoint not found: missing"),
    "sft_zero_steps": ("sft.py --steps=0", "--steps must be at least 1"),
    "rl_zero_minibatches": ("reward_rl.py --minibatches=0", "--minibatches must be at least 1"),
    "rl_negative_lr": ("reward_rl.py --lr=-1", "--lr must be > 0"),
    "rl_negative_noise_level": ("reward_rl.py --noise_level=-0.5", "--noise_level must be > 0"),
    "dpo_negative_beta": ("preference.py --beta=-1", "--beta must be > 0"),
    "judge_zero_members": ("judge.py train --members=0 --out={o}/rm.safetensors", "--members must be at least 1"),
    "bench_zero_clips": ("bench.py heads --clips=0", "--clips must be at least 1"),
    "sft_unknown_preset": ("sft.py --init= --preset=huge --out_dir={o}", "unknown model preset 'huge'"),
    "sft_cuda_without_gpu": ("sft.py --device=cuda --out_dir={o}", "no usable CUDA GPU"),
    "sft_nan_lr": ("sft.py --lr=nan", "--lr must be a finite number"),
    "broken_metadata": ("sft.py --init={r}/meta.safetensors --out_dir={o}", "has broken metadata"),
    "nan_weights": ("reward_rl.py --init={r}/nan.safetensors --out_dir={o}", "holds NaN"),
    "truncated_ckpt": ("sft.py --init={r}/cut.safetensors --out_dir={o}", "truncated"),
    "judge_of_another_size": ("reward_rl.py --init={r}/tiny.safetensors --reward=rm --reward_model={r}/judge.safetensors "
                              "--out_dir={o}", "scores 8x32x32 clips; this policy makes 4x16x16"),
    "pairs_uint8": ("preference.py --init={r}/tiny.safetensors --pairs={r}/uint8.safetensors --out_dir={o}",
                    "winner clips are torch.uint8"),
    "pairs_nan": ("preference.py --init={r}/tiny.safetensors --pairs={r}/nan_pairs.safetensors --out_dir={o}",
                  "with NaN"),
    "pairs_few_tokens": ("preference.py --init={r}/tiny.safetensors --pairs={r}/short.safetensors --out_dir={o}",
                         "holds 4 winner/loser pairs but 2 rows of tokens"),
    "dpo_from_base": ("preference.py --init={r}/base.safetensors --out_dir={o}", "is a pretrain checkpoint"),
    "diagnose_no_ckpt": ("diagnose.py --ckpt= --out={o}", "no checkpoints to diagnose"),
    "diagnose_missing_last": ("diagnose.py --ckpt={r}/tiny.safetensors --ckpt={r}/gone.safetensors --out={o}",
                              "checkpoint not found: {r}/gone.safetensors"),
    "overwrite_keeps_run_on_bad_init": ("sft.py --init=checkpoints/sft_smal.safetensors --out_dir={r}/prev_sft "
                                        "--overwrite=true", "not found",
                                        ("prev_sft/ckpt.safetensors", "prev_sft/log.jsonl")),
    "overwrite_refuses_own_input": ("reward_rl.py --init={r}/prev_rl/ckpt.safetensors --out_dir={r}/prev_rl "
                                    "--overwrite=true", "an input of this run", ("prev_rl/ckpt.safetensors",)),
    # --overwrite=true replaces a run and nothing else: the repository, the shipped checkpoints, /, a run plus a user's file
    "overwrite_the_repository": ("sft.py --init={r}/tiny.safetensors --out_dir=. --overwrite=true",
                                 "--overwrite=true replaces a postflow run only, and . is not one"),
    "overwrite_checkpoints": ("sft.py --out_dir=checkpoints --overwrite=true", "and checkpoints is not one"),
    "overwrite_root": ("sft.py --init={r}/tiny.safetensors --out_dir=/ --overwrite=true", "and / is not one"),
    "overwrite_a_run_beside_a_users_file": ("sft.py --init={r}/tiny.safetensors --out_dir={r}/marked --overwrite=true",
                                            "also holds what the run did not write: notes.txt", ("marked/ckpt.safetensors",)),
    "overwrite_a_folder_of_checkpoints": ("sft.py --init={r}/tiny.safetensors --out_dir={r}/prev_sft --overwrite=true",
                                          "is not one (no postflow-run.json); it holds ckpt.safetensors, log.jsonl"),
    # no output is one of its command's inputs
    "calibrate_over_its_policy": ("judge.py calibrate --on=checkpoints/sft_small.safetensors "
                                  "--out=checkpoints/sft_small.safetensors --overwrite=true", "is also an input of this command"),
    "calibrate_without_out": ("judge.py calibrate", "--out is empty; name a file"),
    "train_rm_over_a_generator": ("judge.py train --generators={r}/tiny.safetensors --out={r}/tiny.safetensors "
                                  "--overwrite=true", "is also an input of this command"),
    "render_over_its_checkpoint": ("checkpoint.py --ckpt={r}/tiny.safetensors --out={r}/tiny.safetensors --overwrite=true",
                                   "is also an input of this command"),
    # output paths that cannot be written
    "out_dir_empty": ("sft.py --init={r}/tiny.safetensors --out_dir=", "--out_dir is empty; name a folder"),
    "out_dir_is_a_file": ("sft.py --init={r}/tiny.safetensors --out_dir={r}/tiny.safetensors", "is a file; name a folder"),
    "out_dir_under_a_file": ("reward_rl.py --init={r}/tiny.safetensors --out_dir={r}/tiny.safetensors/run",
                             "tiny.safetensors, which is a file"),
    "render_out_empty": ("checkpoint.py --ckpt={r}/tiny.safetensors --out=", "--out is empty; name a file"),
    "diagnose_out_empty": ("diagnose.py --ckpt={r}/tiny.safetensors --out=", "--out is empty; name a folder"),
    "diagnose_cache_is_a_file": ("diagnose.py --ckpt={r}/tiny.safetensors --reward_model= --out={o} "
                                 "--cache={r}/tiny.safetensors", "--cache={r}/tiny.safetensors is a file"),
    "advise_out_is_a_folder": ("diagnose.py advise --diagnose={r}/partial/diagnose --out={r}", "is a folder; name a file"),
    "adapters_out_is_a_folder": ("adapters.py --out={r}", "is a folder; name a file"),
    "bench_out_under_a_file": ("race.py --out={r}/tiny.safetensors/bench", "which is a file"),
    # values nothing checked
    "dpo_zero_curated_batch": ("preference.py --curated_batch=0", "--curated_batch must be at least 1"),
    "dpo_negative_curated_batch": ("preference.py --curated_batch=-4", "--curated_batch must be at least 1"),
    "pairs_float64": ("preference.py --init={r}/tiny.safetensors --pairs={r}/float64.safetensors --out_dir={o}",
                      "winner clips are torch.float64"),
    "pairs_zero_weights": ("preference.py --init={r}/tiny.safetensors --pairs={r}/zero_weights.safetensors --out_dir={o}",
                           "not all 0"),
    "pairs_short_loser": ("preference.py --init={r}/tiny.safetensors --pairs={r}/short_loser.safetensors --out_dir={o}",
                          "holds 4 winner clips but 2 loser clips"),
    "rl_every_weight_zero": ("reward_rl.py --weights=fidelity=0,temporal=0,instruction=0", "set every head to 0"),
    "dpo_every_weight_zero": ("preference.py --weights=fidelity=0,temporal=0,instruction=0", "set every head to 0"),
    "advise_empty_diagnosis": ("diagnose.py advise --diagnose={r}/empty/diagnose", "is empty or truncated"),
    "advise_truncated_diagnosis": ("diagnose.py advise --diagnose={r}/truncated/diagnose", "is empty or truncated"),
    "report_empty_diagnosis": ("report.py --run={r}/nothing", "holds no diagnosis"),
    "report_partial_diagnosis": ("report.py --run={r}/partial", "column 'sft' is partial"),
    "diagnose_misspelled_judge": ("diagnose.py --ckpt={r}/tiny.safetensors --reward_model={r}/judg.safetensors "
                                  "--out={o}", "learned judge not found: {r}/judg.safetensors"),
    # sizes that cannot fit, refused before anything is allocated
    "sft_batch_cannot_fit": ("sft.py --init={r}/tiny.safetensors --batch_size=100000000 --out_dir={o}", "needs about"),
    "rl_group_cannot_fit": ("reward_rl.py --init={r}/tiny.safetensors --group_size=100000000 --out_dir={o}", "needs about"),
    "dpo_pair_prompts_cannot_fit": ("preference.py --init={r}/tiny.safetensors --pair_prompts=100000000 --out_dir={o}",
                                    "needs about"),
    "diagnose_prompts_cannot_fit": ("diagnose.py --ckpt={r}/tiny.safetensors --prompts=100000000 --out={o}",
                                    "needs about"),
    "absurd_depth": ("reward_rl.py --init={r}/deep.safetensors --out_dir={o}", "a model of depth 10000000"),
    # the classes issue 32 found: seeds, configs that cannot be built or fit, writes and paths the system refuses
    "sft_seed_past_the_generators": ("sft.py --seed=18446744073709551616", "--seed must be in [0, 2**62)"),
    "rl_seed_negative": ("reward_rl.py --seed=-9223372036854775809", "--seed must be in [0, 2**62)"),
    "dpo_seed_offset_past_the_generators": ("preference.py --seed=4611686018427387904", "--seed must be in [0, 2**62)"),
    "diagnose_seed_too_big": ("diagnose.py --seed=18446744073709551615 --out={o}", "--seed must be in [0, 2**62)"),
    "buffers_cannot_fit": ("reward_rl.py --init={r}/frames.safetensors --out_dir={o}", "1000000000 frames of 16x16 needs"),
    "nan_in_model_config": ("sft.py --init={r}/nan_ratio.safetensors --out_dir={o}", "model_config mlp_ratio=nan"),
    "gif_write_refused": ("checkpoint.py --ckpt={r}/tiny.safetensors --out=/sys/postflow.gif --seeds=1 "
                          "--steps=1", "/sys/postflow.gif.tmp"),
    "name_too_long": ("sft.py --init={r}/tiny.safetensors --out_dir={r}/" + "n" * 250,
                      "longer than the file system takes"),
    "out_dir_dangling_symlink": ("sft.py --init={r}/tiny.safetensors --out_dir={r}/dangling",
                                 "is a symlink to {r}/nowhere, which does not exist"),
    "state_is_a_folder": ("sft.py --init={r}/tiny.safetensors --out_dir={r}/state_folder --resume=true",
                          "state.safetensors is a folder, not a safetensors file"),
    "pair_tokens_of_length_0": ("preference.py --init={r}/tiny.safetensors --pairs={r}/no_tokens.safetensors "
                                "--out_dir={o}", "tokens must be (4, L) int64 ids"),
    "hold_unknown_head": ("reward_rl.py --hold=fidelty=0.01", "--hold names an unknown head 'fidelty'"),
    "hold_zero_margin": ("reward_rl.py --hold=fidelity=0", "fidelity's margin must be a finite number > 0"),
    # commands, and where the ones that moved went
    "rewards_diagnose_moved": ("rewards.py diagnose --ckpt={r}/tiny.safetensors", "`python diagnose.py [advise]`"),
    "model_render_moved": ("model.py --ckpt={r}/tiny.safetensors", "`python checkpoint.py --ckpt=PATH`"),
    "judge_no_command": ("judge.py", "no command; usage: python judge.py"),
    "bench_unknown_command": ("bench.py speeed", "unknown command 'speeed'"),
}
# The cases run in a fresh interpreter, as a user runs them: the first of each of the 12 scripts, so
# that every __main__ block (a subcommand is dispatched inside it), and the exit a shell sees, is
# checked that way. The rest run in this process (bad_runs): the same __main__ blocks and checks.
FRESH_INTERPRETER = first_of_each_script(BAD_INPUT)


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_line_exit_2(bad_files, bad_runs, case):
    cmd, needle, kept = (*BAD_INPUT[case], ())[:3]
    runs, changed = bad_runs
    if case not in runs:
        pytest.skip("this machine has a GPU")
    r = runs[case]
    assert not changed, f"a refused command changed files: {changed}"    # hashes of the folder and the repository
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and "Traceback" not in r.stderr, (case, r.returncode, r.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error:") and needle.format(r=bad_files) in lines[0], (case, r.stderr)
    assert all((bad_files / f).exists() for f in kept), case
    assert not (bad_files / case).exists(), f"{case} made its output folder before refusing"


def test_a_stage_that_skipped_every_step_fails_naming_what_it_kept(tmp_path):
    """Finite but huge weights: every step's loss is non-finite, so Stage I and Stage III skip all of them (fewer
    than the guard's 5 in a row) and end in one line, exit 2, instead of a silent success."""
    net = tiny_model()
    huge = {k: v * 1e30 + 1e30 if v.is_floating_point() else v for k, v in net.state_dict().items()}
    checkpoint.save_checkpoint(str(tmp_path / "huge.safetensors"), huge, net.cfg, checkpoint.lineage_record("sft"))
    preference.save_pairs(str(tmp_path / "pairs.safetensors"), tiny_pairs(4))
    for args in (["sft.py", "--data=curated", "--steps=3", "--batch_size=4", "--val_clips=4", "--sample_steps=2"],
                 ["preference.py", f"--pairs={tmp_path}/pairs.safetensors", "--steps=3", "--batch_size=4",
                  "--eval_prompts=2", "--eval_steps=2"]):
        out = tmp_path / args[0]
        # Stage I in a fresh interpreter, as a user runs it; Stage III through its __main__ here
        run = run_script if args[0] == "sft.py" else run_in_process
        r = run(*args, f"--init={tmp_path}/huge.safetensors", f"--out_dir={out}", "--device=cpu")
        last = r.stderr.strip().splitlines()[-1]                              # after the progress bar
        assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.count("error:") == 1, r.stderr[-2000:]
        assert last.startswith("error: all 3 steps were skipped") and str(out / "ckpt.safetensors") in last
    render = run_in_process("checkpoint.py", f"--ckpt={tmp_path}/huge.safetensors",
                            f"--out={tmp_path}/huge.gif", "--steps=2")
    assert render.returncode == 2 and "draws non-finite pixels" in render.stderr and not (tmp_path / "huge.gif").exists()


# ==================================================================================================
# Run folders: resume, overwrite, one run a folder, signals, kill -9
# ==================================================================================================

def test_resume_falls_back_cleans_up_and_refuses_other_settings(tmp_path):
    full = sft.train(tiny_sft(tmp_path / "full", steps=6, ckpt_every=2))
    sft.train(tiny_sft(tmp_path / "cut", steps=6, ckpt_every=2), stop_after=4)   # state at 4, previous state at 2
    cut = tmp_path / "cut"
    (cut / "state.safetensors.tmp999").write_bytes(b"half a checkpoint")           # a kill during a write
    (cut / "my.tmp.pairs.safetensors").write_bytes(b"a user's file")               # temp-like names no writer gives
    (cut / "log.jsonl.tmp-mine").write_bytes(b"another")
    data_ = (cut / "state.safetensors").read_bytes()
    (cut / "state.safetensors").write_bytes(data_[: len(data_) // 2])              # the latest state damaged
    with pytest.raises(cli.ConfigError, match="lr=0.005"):
        sft.train(tiny_sft(cut, steps=6, ckpt_every=2, lr=5e-3, resume=True))
    with pytest.raises(cli.ConfigError, match="--init="):                      # another KL reference / start
        sft.train(tiny_sft(cut, steps=6, ckpt_every=2, init=full, resume=True))
    assert (cut / "state.safetensors.tmp999").exists()                             # nothing removed before the checks
    resumed = sft.train(tiny_sft(cut, steps=6, ckpt_every=2, resume=True))         # warns, resumes from step 2
    a, b = checkpoint.read_checkpoint(full)[0], checkpoint.read_checkpoint(resumed)[0]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(f for f in os.listdir(cut) if ".tmp" in f) == ["log.jsonl.tmp-mine", "my.tmp.pairs.safetensors"]
    steps = [r["step"] for r in read_log(cut / "log.jsonl") if "step" in r]
    assert steps == [2, 4, 6]                                                      # step 4 written once


def test_overwrite_replaces_a_run_and_only_the_names_it_wrote(tmp_path):
    """A stage's folder carries the run marker; --overwrite=true over it removes the old run's files (its log too) and
    writes the new run; a run folder that gained another file, or a folder with no marker, is refused untouched."""
    out = tmp_path / "run"
    sft.train(tiny_sft(out, steps=2, ckpt_every=1))
    marker = json.loads((out / cli.RUN_MARKER).read_text())
    assert marker["stage"] == "pretrain" and "ckpt.safetensors" in marker["writes"]
    first = sorted(os.listdir(out))
    (out / "state.prev.safetensors").rename(out / "state.prev.safetensors.tmp4242")  # a kill's leftover: also the run's
    sft.train(tiny_sft(out, steps=1, ckpt_every=1, overwrite=True))
    assert sorted(os.listdir(out)) == sorted(set(first) - {"state.prev.safetensors"})
    assert [r["step"] for r in read_log(out / "log.jsonl") if "step" in r] == [1]       # the old log went with its run
    (out / "mine.py").write_text("print('mine')")
    before = tree_hashes(out)
    with pytest.raises(cli.OutputExists, match="did not write: mine.py"):
        sft.train(tiny_sft(out, steps=1, overwrite=True))
    assert tree_hashes(out) == before
    (out / cli.RUN_MARKER).unlink()
    (out / "mine.py").unlink()
    with pytest.raises(cli.OutputExists, match="is not one"):
        sft.train(tiny_sft(out, steps=1, overwrite=True))


def test_clean_up_removes_only_the_run_s_own_temp_files_and_a_resume_finds_its_folder_however_named(tmp_path):
    """User files whose names a pattern would match survive a resume and an overwrite (refused, naming them); a kill's
    temp file (NAME.tmp + pid) goes; a resume spelled with a trailing slash, or of a moved folder, continues."""
    full = sft.train(tiny_sft(tmp_path / "full", steps=6, ckpt_every=2))
    cut = tmp_path / "cut"
    sft.train(tiny_sft(cut, steps=6, ckpt_every=2), stop_after=2)
    cli.release_run_folders(cut)                                       # as a process that ended would
    mine = ["ckpt.safetensors.tmp2-backup", "log.jsonl.tmp-mine", "samples.gif.tmpl"]
    for name in mine:
        (cut / name).write_text("a user's file")
    (cut / "state.safetensors.tmp31337").write_text("half a checkpoint")
    with pytest.raises(cli.OutputExists, match="did not write: ckpt.safetensors.tmp2-backup, log.jsonl.tmp-mine"):
        sft.train(tiny_sft(cut, steps=6, ckpt_every=2, overwrite=True))
    sft.train(tiny_sft(str(cut) + "/", steps=6, ckpt_every=2, resume=True), stop_after=4)   # a trailing slash
    assert all((cut / n).read_text() == "a user's file" for n in mine)
    assert not (cut / "state.safetensors.tmp31337").exists()
    cli.release_run_folders(cut)
    moved = tmp_path / "elsewhere" / "moved"
    moved.parent.mkdir()
    cut.rename(moved)
    resumed = sft.train(tiny_sft(moved, steps=6, ckpt_every=2, resume=True))
    a, b = checkpoint.read_checkpoint(full)[0], checkpoint.read_checkpoint(resumed)[0]
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(cli.ConfigError, match="lr=0.005"):              # other settings still refuse
        sft.train(tiny_sft(moved, steps=6, ckpt_every=2, lr=5e-3, resume=True))


def test_a_kill_mid_save_leaves_safetensors_own_temp_file_and_a_resume_removes_it(tmp_path):
    """safetensors saves through a temp file of its own, '.tmp' + 6 letters or digits beside its
    target, renamed when whole: a kill -9 mid-save leaves it (what the kill -9 test met once in a
    while). A resume removes it with postflow's own temp files and an overwrite counts it as the
    run's; a name that is not exactly one is a user's, kept."""
    out = tmp_path / "run"
    sft.train(tiny_sft(out, steps=4, ckpt_every=2), stop_after=2)
    cli.release_run_folders(out)
    (out / ".tmpAb3dE9").write_bytes(b"half a state")          # as a kill mid-save leaves it
    (out / ".tmpAb3dE9.bak").write_text("a user's file")
    sft.train(tiny_sft(out, steps=4, ckpt_every=2, resume=True))
    assert not (out / ".tmpAb3dE9").exists() and (out / ".tmpAb3dE9.bak").exists()
    (out / ".tmpAb3dE9.bak").unlink()
    (out / ".tmpQw3rTy").write_bytes(b"half a checkpoint")
    sft.train(tiny_sft(out, steps=2, ckpt_every=2, overwrite=True))
    assert not (out / ".tmpQw3rTy").exists()

def test_a_run_folder_belongs_to_one_run(tmp_path):
    """A second run on a held folder, --overwrite or --resume, is one line naming the holder and exit 2, and the first
    ends bitwise as it would alone; a killed run's lock is taken over with a line; the lock goes at the end."""
    args = ["sft.py", "--init=", "--data=web", "--preset=tiny", "--steps=40", "--batch_size=4", "--ckpt_every=4",
            "--log_every=4", "--val_clips=4", "--sample_steps=2", "--device=cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # the run alone, beside the rest
    alone = subprocess.Popen([sys.executable, *args, f"--out_dir={tmp_path / 'alone'}"], cwd=HERE,
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    out = tmp_path / "shared"
    first = start_holding(args, out)
    # the second runs through sft.py's __main__ in this process: a pid other than the first's
    for flag in ("--overwrite=true", "--resume=true"):
        second = run_in_process(*args, f"--out_dir={out}", flag)
        line = second.stderr.strip().splitlines()
        assert second.returncode == 2 and len(line) == 1, second.stderr[-2000:]
        assert f"is in use by another run (pid {first.pid} on" in line[0] and "sft.py" in line[0], line
    first.send_signal(signal.SIGCONT)
    assert first.wait(timeout=300) == 0
    assert alone.wait(timeout=300) == 0, alone.stderr.read()[-2000:]
    want, got = (checkpoint.read_checkpoint(d / "ckpt.safetensors")[0] for d in (tmp_path / "alone", out))
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert not (out / cli.RUN_LOCK).exists()                          # released at the end
    # the other order: a resumed run holds the folder and an overwrite is refused
    holder = start_holding([*args[:4], "--steps=80", *args[5:], "--resume=true"], out)
    refused = run_in_process(*args, f"--out_dir={out}", "--overwrite=true")
    assert refused.returncode == 2 and f"pid {holder.pid}" in refused.stderr
    holder.kill()                                                            # kill -9: its lock file stays behind
    holder.wait()
    assert (out / cli.RUN_LOCK).exists()
    taken = run_in_process(*args[:4], "--steps=80", *args[5:], f"--out_dir={out}", "--resume=true")
    assert taken.returncode == 0 and f"was last locked by pid {holder.pid}" in taken.stdout, taken.stderr[-2000:]
    assert not (out / cli.RUN_LOCK).exists()


def test_sigterm_ends_a_stage_in_one_line_with_143_and_its_folder_unlocked(tmp_path):
    args = ["sft.py", "--init=", "--data=web", "--preset=tiny", "--steps=400", "--batch_size=4", "--ckpt_every=4",
            "--val_clips=4", "--sample_steps=2", "--device=cpu"]
    p = start_holding(args, tmp_path / "run")
    p.send_signal(signal.SIGTERM)
    p.send_signal(signal.SIGCONT)
    assert p.wait(timeout=60) == 143
    err = p.stderr.read()
    assert err.strip().splitlines()[-1].startswith("terminated (SIGTERM)") and "Traceback" not in err, err[-2000:]
    assert not (tmp_path / "run" / cli.RUN_LOCK).exists()


def kill_trials(stage, init, root):
    """Interrupted anywhere, a stage resumes to bitwise the weights of an uninterrupted run, with each log record
    written once and no temp file left; the RL run rolls back often (its guards' histories are state). Returns the
    line the test prints."""
    root.mkdir(parents=True)
    preference.save_pairs(str(root / "pairs.safetensors"), tiny_pairs(8))
    args = {"sft": ["sft.py", "--init=", "--data=web", "--preset=tiny", "--steps=24", "--batch_size=4", "--ckpt_every=2",
                    "--log_every=2", "--val_clips=4", "--sample_steps=2", "--device=cpu"],
            "rl": ["reward_rl.py", f"--init={init}", "--iters=8", "--prompts_per_iter=2", "--group_size=4",
                   "--rollout_steps=4", "--eval_prompts=2", "--eval_steps=2", "--eval_every=2", "--ckpt_every=1",
                   "--lr=1e-3", "--warmup=1", "--spike_factor=1.01", "--sft_batch=4", "--device=cpu",
                   "--hold=fidelity=0.0001,temporal=0.0001", "--hold_probe=2"],          # a floor that acts
            "dpo": ["preference.py", f"--init={init}", f"--pairs={root}/pairs.safetensors", "--steps=40",
                    "--batch_size=4", "--ckpt_every=2", "--log_every=2", "--eval_prompts=2", "--eval_steps=2",
                    "--device=cpu"]}[stage]
    failed, window = run_until_checkpointed(args, root / "ref")
    assert not failed
    if stage == "rl":                                          # rollbacks in a row, with no snapshot between them
        log = [r for r in read_log(root / "ref" / "log.jsonl") if "rollbacks" in r]
        assert [r["rollbacks"] for r in log][-3:] == [1, 2, 3] and max(sum(r["hold_multiplier"].values()) for r in log)
    want = checkpoint.read_checkpoint(root / "ref" / "ckpt.safetensors")[0]
    rng, hits = random.Random(stage), 0
    for trial in range(KILL_TRIALS):
        out = root / f"kill{trial}"
        hits += kill_and_resume(args, out, rng, window)
        got = checkpoint.read_checkpoint(out / "ckpt.safetensors")[0]
        assert all(torch.equal(want[k], got[k]) for k in want), f"trial {trial} differs"
        steps = [r.get("step", r.get("iter")) for r in read_log(out / "log.jsonl") if "step" in r or "iter" in r]
        assert len(steps) == len(set(steps)) and steps == sorted(steps), steps      # each record once, in order
        assert not [f for f in os.listdir(out) if ".tmp" in f]
    assert hits == KILL_TRIALS                                 # every kill landed before the run ended
    return f"{stage}: {KILL_TRIALS} of {KILL_TRIALS} bitwise equal ({hits} killed mid-run)"


@pytest.fixture(scope="module")
def killed_runs(trained_tiny, tmp_path_factory, request):
    """The selected stages' kill trials, two stages at a time: each is a fresh interpreter after another on one
    thread, so two of them use both cores. stage -> its future: the test takes its result or its failure."""
    chosen = [i.callspec.params["stage"] for i in request.session.items
              if getattr(i, "originalname", "") == "test_kill_minus_9_then_resume_gives_the_same_weights"]
    root = tmp_path_factory.mktemp("kill")
    with ThreadPoolExecutor(2) as pool:
        return {stage: pool.submit(kill_trials, stage, trained_tiny, root / stage) for stage in dict.fromkeys(chosen)}


@pytest.mark.parametrize("stage", ["sft", "rl", "dpo"])
def test_kill_minus_9_then_resume_gives_the_same_weights(stage, killed_runs):
    print(killed_runs[stage].result())                     # kill_trials' assertions fail here, in their stage's test


# ==================================================================================================
# Several processes (distributed.py): DDP and FSDP2 ranks, several nodes, under torchrun
# ==================================================================================================

@pytest.fixture(scope="module")
def ranked_runs(trained_tiny, tmp_path_factory):
    """Stage II with its guards acting, on 1 rank, 2 DDP ranks and 2 FSDP ranks side by side: the spike guard, set
    tight so that it rolls back, and a floor a hair under the start, which takes steps back. Exit 0 includes: every
    rank ended with the same weights; sharded, the rollbacks and the floor's undos restore shards. Returns the
    folder, the command line, and the DDP job's result."""
    root = tmp_path_factory.mktemp("ranks")
    args = ["reward_rl.py", f"--init={trained_tiny}", "--iters=6", "--prompts_per_iter=2", "--group_size=4",
            "--rollout_steps=4", "--eval_prompts=2", "--eval_steps=2", "--eval_every=4", "--device=cpu", "--lr=1e-3",
            "--warmup=1", "--minibatches=2", "--spike_factor=1.5", "--sft_batch=4", "--bf16=false",  # bf16 rounds by batch
            "--hold=fidelity=0.0001,temporal=0.0001", "--hold_probe=2", "--hold_undo=true", "--ckpt_every=1"]
    ddp = torchrun(args, root / "r2", **PIPES)
    fsdp = torchrun(args, root / "r2_fsdp", "fsdp", **PIPES)
    in_process(args, root / "r1")
    two = finish(ddp)
    finish(fsdp)
    return root, args, two


def test_grpo_one_and_two_ranks_agree(ranked_runs):
    """The same run on 1 and 2 ranks: same draws, same rollouts and rewards, the same decisions (the spike guard
    decides on reduced statistics; the floor steps back on rank 0's levels), and the same weights on every rank."""
    runs, _, two = ranked_runs
    assert "2 rank(s) x 4" in two.stdout + two.stderr and "terminate called" not in two.stderr
    a, b = [[r for r in read_log(runs / d / "log.jsonl") if "reward_instruction" in r] for d in ("r1", "r2")]
    assert len(a) == len(b) == 6 and a[-1]["rollbacks"] > 0, a[-1]     # the guard acts (from the 6th)
    for ra, rb in zip(a, b):
        assert ra["reward_instruction"] == pytest.approx(rb["reward_instruction"], abs=1e-4)
        assert ra["grad_norm"] == pytest.approx(rb["grad_norm"], rel=1e-3) and ra["rollbacks"] == rb["rollbacks"]
        assert ra["hold_undone"] == rb["hold_undone"]
        # a multiplier adds up each level's shortfall over its margin (1e-4 here), and with it the
        # levels' float rounding across rank layouts (~1e-7): ~1e-3 an iteration, on hundreds
        assert ra["hold_multiplier"] == pytest.approx(rb["hold_multiplier"], rel=1e-4, abs=1e-3)
    for name in ("ckpt.safetensors", "state.safetensors"):
        wa, wb = checkpoint.read_checkpoint(runs / "r1" / name)[0], checkpoint.read_checkpoint(runs / "r2" / name)[0]
        assert max(float((wa[k] - wb[k]).abs().max()) for k in wa if k.startswith(("model.", "ema.")) or "." in k) < 1e-4
    assert state_gap(runs / "r1", runs / "r2_fsdp") < 1e-4
    sharded = [r for r in read_log(runs / "r2_fsdp" / "log.jsonl") if "rollbacks" in r]
    assert [r["rollbacks"] for r in sharded] == [r["rollbacks"] for r in a]
    assert [r["hold_undone"] for r in sharded] == [r["hold_undone"] for r in a]
    assert {r["hold_undone"] for r in a} == {True, False}                  # both decisions were taken


@pytest.mark.parametrize("stage", ["sft", "ppo", "nft", "dpo"])
def test_a_stage_trains_alike_on_one_rank_and_two_fsdp_ranks(stage, trained_tiny, tmp_path):
    """--parallel=fsdp shards the policy, its EMA, the frozen reference and AdamW's moments over the ranks (each holds
    about half); gathered into the state file they equal one process's whole copies to float rounding (the
    reductions sum in another order). DDP splits each batch as FSDP does and differs only in averaging the gradients
    itself (distributed.average_gradients, one function for every stage): it runs Stage II's AWM
    (test_grpo_one_and_two_ranks_agree, with rollbacks and the floor's undos) and on two nodes."""
    args = sharding_args(stage, trained_tiny, tmp_path)
    job = torchrun(args, tmp_path / "fsdp", "fsdp", **PIPES)                 # beside "one"
    in_process(args, tmp_path / "one")
    fsdp = finish(job)
    assert "2 rank(s)" in fsdp.stdout + fsdp.stderr and "terminate called" not in fsdp.stderr
    moved = checkpoint.read_checkpoint(tmp_path / "one" / "ckpt.safetensors")[0]
    start = checkpoint.read_checkpoint(trained_tiny)[0]
    assert max(float((moved[k] - start[k]).abs().max()) for k in start) > 1e-3        # the runs did train
    assert state_gap(tmp_path / "one", tmp_path / "fsdp") < 1e-4
    whole, sharded = memory_of(tmp_path / "one")["memory"], memory_of(tmp_path / "fsdp")["memory"]
    for k in ("weights_mb_per_rank", "optimizer_mb_per_rank"):
        assert sharded[k] < 0.6 * whole[k], (k, sharded, whole)


def test_an_fsdp_run_killed_and_resumed_gives_the_weights_of_an_uninterrupted_one(ranked_runs, tmp_path):
    """kill -9 of the whole job (the launcher and its two ranks) mid-run; the resumed run, sharded again from the gathered
    state file, ends bitwise where the uninterrupted FSDP run of ranked_runs does, rollbacks and undos included."""
    runs, args, _ = ranked_runs
    for delay in (1.0, 0.3, 0.0):                                  # a later kill can miss the end of a fast run
        shutil.rmtree(tmp_path / "kill", ignore_errors=True)
        p = torchrun(args, tmp_path / "kill", "fsdp", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while not (tmp_path / "kill" / "state.safetensors").exists() and p.poll() is None:
            time.sleep(0.01)
        time.sleep(delay)
        for pid in [p.pid, *children(p.pid)]:
            os.kill(pid, signal.SIGKILL)
        p.wait()
        if not (tmp_path / "kill" / "ckpt.safetensors").exists():
            break
    assert not (tmp_path / "kill" / "ckpt.safetensors").exists()    # it was killed before its hand-off
    log = [r for r in read_log(runs / "r2_fsdp" / "log.jsonl") if "rollbacks" in r]
    assert max(r["rollbacks"] for r in log) > 0 and any(r["hold_undone"] for r in log)
    torchrun(args + ["--resume=true"], tmp_path / "kill", "fsdp")
    want, got = (checkpoint.read_checkpoint(run / "ckpt.safetensors")[0] for run in (runs / "r2_fsdp", tmp_path / "kill"))
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_replicas_that_end_apart_refuse_to_hand_off(tmp_path):
    """HSDP on two 'nodes' of one rank (a 2 x 1 mesh): both hold the same shard, so the hand-off compares them; one
    moved on its own is caught, as under DDP."""
    script = tmp_path / "apart.py"
    script.write_text(f"""
import os, sys
sys.path.insert(0, {HERE!r})
os.environ["LOCAL_WORLD_SIZE"] = "1"                     # one rank per node: replicas across the two
import torch, model as M, distributed, cli
d = distributed.setup_distributed("cpu", "hsdp")
torch.manual_seed(0)                                     # every rank builds the same weights, as a checkpoint gives
net = M.VideoDiT(M.preset("tiny"))
distributed.shard(d, net)
distributed.check_ranks_agree(net, d)                      # equal: passes
if d.rank == 1:
    with torch.no_grad():
        net.final.bias.to_local().add_(1.0)
try:
    distributed.check_ranks_agree(net, d)
except cli.Diverged as e:                           # each rank's own file: printed lines interleave
    open(f"{{sys.argv[1]}}/caught{{d.rank}}", "w").write(str(e))
distributed.teardown(d)
cli.leave(0)                                             # as a stage's rank ends: see cli.leave
""")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
                        str(tmp_path)], cwd=HERE, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"})
    assert r.returncode == 0, why_failed(r.stderr)
    for rank in (0, 1):
        assert "the ranks ended with different weights" in (tmp_path / f"caught{rank}").read_text()


def test_two_nodes_train_as_one_node_does(trained_tiny, tmp_path):
    """HSDP on two nodes of one process each (a 2 x 1 mesh: replicas across nodes) ends where one process does."""
    args = sharding_args("awm", trained_tiny, tmp_path)
    nodes = two_nodes(args, tmp_path / "two_nodes", "hsdp")
    in_process(args, tmp_path / "one_node")                      # while the two nodes run
    for p in nodes:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    assert state_gap(tmp_path / "one_node", tmp_path / "two_nodes") < 1e-4


def test_a_node_that_dies_ends_the_job_on_the_other_within_a_minute(trained_tiny, tmp_path):
    """Node 1 is killed whole (kill -9 of its launcher and rank) once the run has checkpointed; node 0's rank finds
    its peer gone at the next collective and ends with one line naming what happened, not a hang or a traceback."""
    args = [a for a in sharding_args("awm", trained_tiny, tmp_path) if not a.startswith(("--iters", "--ckpt_every"))]
    args += ["--ckpt_every=1", "--iters=200"]
    node0, node1 = two_nodes(args, tmp_path / "run", "ddp")
    while not (tmp_path / "run" / "state.safetensors").exists() and node0.poll() is None:
        time.sleep(0.05)
    for pid in [node1.pid, *children(node1.pid)]:                   # torchrun starts each rank in a session of its own
        os.kill(pid, signal.SIGKILL)
    t0 = time.time()
    _, err = node0.communicate(timeout=120)
    assert time.time() - t0 < 60 and node0.returncode != 0
    assert "error: lost contact with another rank" in err, err[-3000:]
    assert not (tmp_path / "run" / "ckpt.safetensors").exists()    # the last state is kept for --resume=true


# ==================================================================================================
# bench.py and race.py: the fidelity probe, the ablations, the update-rule race
# ==================================================================================================

def test_fidelity_probe_separates_the_samplers_share_from_the_networks(tiny_checkpoints, tmp_path, capsys):
    base, tuned, _ = tiny_checkpoints
    bench.bench_fidelity([f"--ckpt={base},{tuned}", f"--out={tmp_path}/f.json"])
    rows = json.load(open(tmp_path / "f.json"))["checkpoints"][tuned]
    every, interval = rows["cfg 3 every step"], rows[f"cfg 3 until t={M.CFG_UNTIL}"]
    assert every["instruction"] != interval["instruction"]                  # guidance's share is measured
    assert set(every["fidelity_parts"]) == {"edges", "background", "palette"}
    assert rows["redraw at t=0.98"]["mse"] > 0 and "redraw at t=0.98" in capsys.readouterr().out


def test_paired_changes_are_clip_for_clip_on_diagnoses_clips(tiny_checkpoints, capsys):
    """bench.py paired: a checkpoint against itself changes no clip; against another, each change is the two means'
    difference with the per-clip differences' error, counted clip by clip; one checkpoint alone is refused."""
    base, tuned, _ = tiny_checkpoints
    small = ["--prompts=2", "--seeds=2"]
    same = bench.bench_paired([f"--ckpt={base}", f"--ckpt={base}", *small])["changes"]
    assert same and all(r["change"] == 0 and r["paired_se"] == 0 and r["up"] == r["down"] == 0 for r in same)
    rows = {r["metric"]: r for r in bench.bench_paired([f"--ckpt={base}", f"--ckpt={tuned}", *small])["changes"]}
    halves = {f"{h}, {half}" for h in ("fidelity", "temporal") for half in ("val", "unseen")}
    misses = {f"fidelity miss: {k}" for k in ("edges", "background", "palette")}
    assert set(rows) == {"all attributes", "direction", *rewards.HEADS, *halves, *misses}
    whole, val, unseen = (rows[k]["change"] for k in ("fidelity", "fidelity, val", "fidelity, unseen"))
    assert abs(whole - (val + unseen) / 2) < 1e-3                           # two equal halves make the whole
    moved = rows["instruction"]
    assert moved["paired_se"] > 0 and moved["up"] + moved["down"] <= 8 and moved["change"] != 0
    printed = capsys.readouterr().out
    before, after = (float(x) for x in re.search(r"instruction +([\d.]+) -> ([\d.]+)", printed.split(tuned)[-1]).groups())
    assert abs(after - before - moved["change"]) < 2e-3
    with pytest.raises(cli.ConfigError, match="at least two checkpoints"):
        bench.bench_paired([f"--ckpt={base}"])


def test_motion_words_reads_the_word_and_what_the_sampler_draws_per_speed(tiny_checkpoints, capsys):
    """bench.py motion_words: the denoiser's reading of the direction word at four t, then per speed word the drawn
    object's speed beside the asked one (the world's, scaled to the clip) and its direction accuracy."""
    base, _, _ = tiny_checkpoints
    drawn = bench.bench_motion_words([f"--ckpt={base}"])[base]
    scale = M.preset("tiny").size / 32
    assert set(drawn) == set(data.SPEED_NAMES)
    assert [drawn[w][1] for w in data.SPEED_NAMES] == [round(data.SPEEDS[w] * scale, 3) for w in data.SPEED_NAMES]
    assert all(v >= 0 and 0 <= acc <= 1 for v, _, acc in drawn.values())
    printed = capsys.readouterr().out
    assert "t=0.2: x" in printed and f"slow {drawn['slow'][0]:.2f} ({drawn['slow'][1]:.2f})" in printed
    with pytest.raises(cli.ConfigError, match="give a checkpoint"):
        bench.bench_motion_words([])


def test_ablations_table_names_each_command_and_keeps_finished_rows(tiny_ablations):
    out, args = tiny_ablations
    table = (out / "ablations.md").read_text()
    assert "| judge |" in table and "| start (the input) |" in table and "python reward_rl.py" in table
    assert "--reward=rm --kl_weight=0" in table
    result = json.load(open(out / "ablations.json"))
    assert result["start"]["clips"] == 8 and result["judge"]["iterations"] == 1
    assert set(result["judge"]["end"]["judge_minus_oracle"]) == set(rewards.HEADS)
    assert result["judge_unguarded"]["verdict"].startswith("vs judge: all attributes")
    stamp = os.path.getmtime(out / "judge" / "ckpt.safetensors")
    bench.bench_ablations(args)                                               # a finished row is kept, not rerun
    assert os.path.getmtime(out / "judge" / "ckpt.safetensors") == stamp
    # ... but a row made from another input, here the same path with other bytes, is redone
    init, tensors, mc, meta = out.parent / "ablation_init.safetensors", *checkpoint.read_checkpoint(args[0][len("--init="):])
    checkpoint.save_checkpoint(str(init), tensors, mc, meta["lineage"])
    moved = [f"--init={init}", *args[1:3], "--only=judge", args[4], f"--out={out.parent / 'ablations_moved'}"]
    made = lambda: os.path.getmtime(out.parent / "ablations_moved" / "judge" / "ckpt.safetensors")
    bench.bench_ablations(moved)
    first = made()
    bench.bench_ablations(moved)
    assert made() == first
    checkpoint.save_checkpoint(str(init), {k: v + 1e-3 for k, v in tensors.items()}, mc, meta["lineage"])
    bench.bench_ablations(moved)
    assert made() != first
    with pytest.raises(cli.ConfigError, match="unknown ablation 'kl'"):
        bench.bench_ablations(["--only=kl"])
    # the verdict calls a difference under two standard errors none, and names one beyond them with its sign
    end = lambda acc, se: {"end": {"acc_all": [acc, se], "fidelity": [0.3, 0.01], "temporal": [0.5, 0.01]}}
    assert "all attributes +0.100 ± 0.071 (no difference)" in bench.verdict(end(0.6, 0.05), end(0.5, 0.05), "defaults")
    assert "all attributes -0.300 ± 0.028;" in bench.verdict(end(0.2, 0.02), end(0.5, 0.02), "defaults")


def test_race_reports_each_rules_cost_to_each_gain_within_the_floors_from_resumed_segments(tiny_race):
    result = json.load(open(tiny_race / "race.json"))
    for name in ("flow_grpo_s0", "nft_floor_s0"):
        points = result["runs"][name]["points"]
        assert len(points) == 3 and points[0]["nfe"] == 0 and 0 < points[1]["nfe"] < points[2]["nfe"]
        assert len(result["runs"][name]["health"]["v_norm_ratio"]) == 2         # one iteration per segment
    assert result["runs"]["nft_floor_s0"]["health"]["hold_multiplier"][-1].keys() == {"fidelity", "temporal"}
    assert set(result["table"]["+0.05"]) == set(result["table"]["end"]) == {"flow_grpo", "nft_floor"}
    text = (tiny_race / "race.md").read_text()
    assert "| nft_floor |" in text and "fidelity within 0.01" in text
    points = result["runs"]["nft_floor_s0"]["points"]                          # each run's points, in a line
    assert f"- nft_floor_s0: {points[1]['nfe']:,}: " in text and f"; {points[2]['nfe']:,}: " in text
    start = {"acc_all": 0.5, "fidelity": 0.6, "temporal": 0.7}                 # a gain bought with fidelity is no gain
    bought = [start, {**start, "nfe": 10, "acc_all": 0.6, "fidelity": 0.58}, {**start, "nfe": 20, "acc_all": 0.6}]
    assert race.reach(bought, 0.05)[0]["nfe"] == 10 and race.reach(bought, 0.05, floor=True)[0]["nfe"] == 20


def test_race_joins_an_earlier_race_from_the_same_start_and_refuses_one_from_another(tiny_race, tiny_checkpoints,
                                                                                      tmp_path):
    """--join puts an earlier race's runs in this one's tables (named rule@LABEL); one raced from another budget,
    or a file that is no race, is refused before anything runs."""
    _, tuned, _ = tiny_checkpoints
    threads = torch.get_num_threads()
    args = [f"--init={tuned}", "--rules=", "--nfe=2", "--evals=2", "--heldout_prompts=1"]
    race.main([*args, f"--join={tiny_race / 'race.json'}=before", f"--out={tmp_path / 'joined'}"])
    torch.set_num_threads(threads)
    result = json.load(open(tmp_path / "joined" / "race.json"))
    assert set(result["runs"]) == {"flow_grpo_s0@before", "nft_floor_s0@before"}
    assert set(result["table"]["end"]) == {"flow_grpo@before", "nft_floor@before"}
    earlier = json.load(open(tiny_race / "race.json"))["runs"]["nft_floor_s0"]["points"]
    assert result["runs"]["nft_floor_s0@before"]["points"] == earlier
    assert "| nft_floor@before |" in (tmp_path / "joined" / "race.md").read_text()
    # a rule's seeds: one colour, one legend entry, a line each (and the floor's line)
    again = {**result["runs"], "seed1": result["runs"]["nft_floor_s0@before"]}
    trade = report.race_charts({**result, "runs": again})[1][0]
    assert trade.count(">nft_floor@before</text>") == 1 and trade.count("<polyline") == 4
    with pytest.raises(cli.ConfigError, match="on 2 evaluations a run; this race: .* on 3"):
        race.main([*args[:2], "--nfe=3", f"--join={tiny_race / 'race.json'}", f"--out={tmp_path / 'other'}"])
    with pytest.raises(cli.ConfigError, match="is not a race.json"):
        race.main([*args, f"--join={tuned}", f"--out={tmp_path / 'other'}"])
    assert not (tmp_path / "other").exists()


# ==================================================================================================
# report.py: one offline page
# ==================================================================================================

def test_report_is_one_offline_page_with_the_table_curves_and_samples(tiny_run, capsys):
    page = (tiny_run / "report.html").read_text()
    root = ElementTree.fromstring(page.split("\n", 1)[1])   # well-formed after the doctype: every tag closed
    assert "http://" not in page and "https://" not in page and root.find(".//script") is None
    assert all(v.startswith("data:") for e in root.iter() for k, v in e.attrib.items() if k in ("src", "href"))
    assert len(list(root.iter("svg"))) == CHARTS and all(len(list(s.iter("polyline"))) for s in root.iter("svg"))
    (img,) = root.iter("img")
    assert img.get("src").startswith("data:image/gif;base64,R0lGOD")                # GIF89a, embedded
    table = ElementTree.tostring(root.find(".//table[@class='stages']"), encoding="unicode")
    for needle in ("base", "sft", "rl-awm", "dpo", "oracle colour accuracy", "oracle all accuracy", "± ", "DPO win rate"):
        assert needle in table, needle
    ablations = ElementTree.tostring(root.find(".//table[@class='ablations']"), encoding="unicode")
    assert "judge_unguarded" in ablations and "vs judge: all attributes" in ablations and "start (the input)" in ablations
    decisions = ElementTree.tostring(root.find(".//table[@class='decisions']"), encoding="unicode")
    advice = json.load(open(tiny_run / "advice_rl.json"))
    assert "Stage II" in decisions and " ".join(advice["flags"]) in decisions and f"{advice['axis']}: " in decisions
    assert advice["flags"] and advice["flags"][0].startswith(("--weights=", "--sft_weight="))
    twin = (tiny_run / "report.md").read_text()
    assert "| metric | base (pretrain) | sft (sft) | rl (rl-awm) | dpo (dpo) |" in twin and "kl_ref" in twin
    # why: the parts beside the training data's, and each column's next command (code on the page)
    assert "| part | curated data | web data | base | sft | rl | dpo |" in twin and "| fidelity: edges |" in twin
    rec = json.load(open(tiny_run / "diagnose" / "diagnostics.json"))["rl"]["recommendation"]
    assert f"<code>{html.escape(rec['command'], quote=False)}</code>" in page and f"Next: `{rec['command']}`" in twin
    # refuses to replace a report unasked, and a missing run is one line, exit code 2
    for args, needle in (([f"--run={tiny_run}"], "report.html exists"), ([f"--run={tiny_run}/none"], "not found")):
        with pytest.raises(SystemExit) as exit_:
            cli.run_cli(report.main, args)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and needle in err and len(err.strip().splitlines()) == 1, err


def test_report_refuses_a_diagnosis_that_is_partial_in_one_line(tiny_run, tmp_path):
    """A diagnosis from an older diagnose (no parts) or cut short: the report names what is missing and what to rerun,
    and writes nothing."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run / "diagnose", run / "diagnose")
    results = json.load(open(run / "diagnose" / "diagnostics.json"))
    for r in results.values():
        del r["parts"]
    json.dump(results, open(run / "diagnose" / "diagnostics.json", "w"))
    r = run_in_process("report.py", f"--run={run}")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "is partial (no parts); rerun diagnose" in r.stderr, r.stderr
    assert not (run / "report.html").exists()


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs Debian's chromium (apt-get install chromium)")
def test_report_renders_in_headless_chromium_without_console_errors(tiny_run, tmp_path):
    """The page in a real browser: a frame around it counts what rendered (the GIF decoded, each chart drawn) and
    logs it; any other console line is an error of the page's own. Then a screenshot that is not blank."""
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
             "--disable-background-networking", "--disable-component-update", "--enable-logging=stderr", "--v=0"]
    browse = lambda *a: subprocess.run([CHROMIUM, *flags, f"--user-data-dir={tmp_path / 'profile'}", *a],
                                       capture_output=True, text=True, timeout=120)
    (tmp_path / "frame.html").write_text(
        f'<iframe id="r" src="file://{tiny_run}/report.html"></iframe><script>'
        'document.getElementById("r").onload = function () { var d = this.contentDocument;'
        'var svgs = Array.from(d.querySelectorAll("svg")), imgs = Array.from(d.images);'
        'console.log("RENDERED " + JSON.stringify({images: imgs.length, decoded: imgs.filter(function (i) {'
        'return i.complete && i.naturalWidth > 0; }).length, svgs: svgs.length, drawn: svgs.filter(function (s) {'
        'var b = s.getBBox(); return b.width > 100 && b.height > 100; }).length})); };</script>')
    r = browse("--allow-file-access-from-files", "--dump-dom", f"file://{tmp_path}/frame.html")
    console = re.findall(r'CONSOLE[^\]]*\] "(.*)", source: (\S+)', r.stderr)
    assert len(console) == 1 and console[0][0].startswith("RENDERED "), console
    assert json.loads(console[0][0][9:]) == {"images": 1, "decoded": 1, "svgs": CHARTS, "drawn": CHARTS}
    r = browse("--hide-scrollbars", f"--screenshot={tmp_path / 'shot.png'}", "--window-size=1400,2000",
               f"file://{tiny_run}/report.html")
    shot = iio.imread(tmp_path / "shot.png")[..., :3]
    assert shot.shape[:2] == (2000, 1400) and (shot.min(-1) < 200).mean() > 0.03, r.stderr[-500:]   # ink on it


# ==================================================================================================
# adapters.py: Wan through the policy interface (the optional extra)
# ==================================================================================================

def test_make_pipeline_takes_the_policy_and_refuses_an_unknown_one():
    """`make pipeline POLICY=wan` runs the same stages from the pixel Wan's base into its own folder; the default
    stays the DiT's; another name is refused before anything runs."""
    plan = lambda *a: subprocess.run(["make", "-n", "pipeline", *a], cwd=HERE, capture_output=True, text=True)
    wan, dit, bad = plan("POLICY=wan"), plan(), plan("POLICY=unet")
    assert "sft.py --init=checkpoints/base_wan.safetensors --out_dir=runs/pipeline_wan/sft" in wan.stdout
    assert "diagnose.py --ckpt=checkpoints/base_wan.safetensors" in wan.stdout and "base_small" not in wan.stdout
    assert "sft.py --init=checkpoints/base_small.safetensors --out_dir=runs/pipeline/sft" in dit.stdout
    # Stage II's step is the policy's: the Wan's as it was measured, the DiT's the default
    assert "--max_minutes=0 --iters=15 --lr=3e-4 --draw_t_mean=-2.0 --ema_warmup=true --minibatches=1" in wan.stdout
    assert "--max_minutes=0 --iters=13\n" in dit.stdout and "--lr=" not in dit.stdout
    assert "wan" not in dit.stdout.replace("requirements-wan", "")
    assert bad.returncode != 0 and "POLICY=unet: choose dit" in bad.stderr and "sft.py" not in bad.stdout


# A random tiny Wan (2 layers, 2 heads of 12, 4 latent channels, 16x16x2 latents = 128x128x5
# pixels) behind the policy interface, through the real stage entry points (wan_chain runs each
# stage from the last one's file).


@needs_wan
def test_wan_euler_step_and_sde_logprob_match_diffusers(tmp_path):
    """The convention mapping (sigma = 1 - t, timestep = 1000 sigma, v = -u) against diffusers' own scheduler and call:
    a whole guided sample on the policy's own grid (shift 3) and guidance interval (every step)."""
    import adapters
    from diffusers import FlowMatchEulerDiscreteScheduler
    policy = adapters.WanPolicy(adapters.WanConfig())
    gen = torch.Generator().manual_seed(0)
    x, tokens = torch.randn(2, *policy.flow_shape, generator=gen), data.tokenize(["a fast red circle moving left"] * 2)
    states, empty = policy.text(tokens), policy.text(tokens, drop=torch.ones(2, dtype=torch.bool))
    assert policy.flow_shift == 3.0 and policy.cfg_until == 1.0
    grid = M.time_grid(3, policy.flow_shift)
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(sigmas=torch.linspace(1, 0, 4)[:-1].tolist())          # equal sigmas, shifted by the scheduler
    assert torch.allclose(sched.timesteps, 1000 * (1 - grid[:-1]))
    u_of = lambda x, ts, s: policy.transformer(x, ts.expand(len(x)), s, return_dict=False)[0]   # diffusers' call
    with torch.no_grad():
        xd = x
        for i, ts in enumerate(sched.timesteps):              # an Euler step each, guided (w = 3) at every step as Wan's pipeline does
            u = u_of(xd, ts, empty) + 3.0 * (u_of(xd, ts, states) - u_of(xd, ts, empty))
            ours = xd + float(grid[i + 1] - grid[i]) * M.guided_velocity(policy, xd, float(grid[i]), tokens, 3.0)
            xd = sched.step(u, ts, xd).prev_sample
            assert torch.allclose(ours, xd, atol=1e-5) and (u.abs().mean() > 0.1), i
        assert torch.allclose(M.sample(policy, tokens, x, 3, 3.0), policy.decode(xd), atol=1e-4)
        assert torch.allclose(M.sample_with_sde_window(policy, x, tokens, 3, [], [], 3.0)[0], xd, atol=1e-5)   # rollouts
        # the SDE step's log-prob through the adapter is the Gaussian density of Flow-GRPO's step, written in sigma and u
        i, sigma, sigma_next = 1, 1 - float(grid[1]), 1 - float(grid[2])
        u, dsigma = u_of(x, sched.timesteps[1], states), sigma_next - sigma
        std = 0.7 * math.sqrt(sigma / (1 - sigma))
        mean = x * (1 + std ** 2 * dsigma / (2 * sigma)) + u * (1 + std ** 2 * (1 - sigma) / (2 * sigma)) * dsigma
        x_next = mean + std * math.sqrt(-dsigma) * torch.randn(x.shape, generator=gen)
        got_mean, got_std, logp = M.score_sde_step(policy, x, x_next, i, grid, tokens, cfg_scale=1.0)
        density = torch.distributions.Normal(mean, std * math.sqrt(-dsigma)).log_prob(x_next).mean((1, 2, 3, 4))
        assert torch.allclose(got_mean, mean, atol=1e-5) and torch.allclose(logp, density, atol=1e-4)
        # the other rollout step is diffusers' stochastic Euler step, the same draw given the same noise
        noisy = FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)
        noisy.set_timesteps(sigmas=(1 - grid[:-1]).tolist())             # shift 1: the grid's sigmas, already shifted
        theirs = noisy.step(u, noisy.timesteps[1], x, generator=torch.Generator().manual_seed(5)).prev_sample
        eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
        step = M.flow_match_sde_step(x, -u, float(grid[1]), float(grid[2]), float(grid[1]), eps=eps)
        assert torch.allclose(step[0], theirs, atol=1e-5)
        # ...whose density is not sde_step's: on-policy, a PPO ratio of the two would sit 50 clip ranges from 1 (refused)
        log_ratio = M.sde_step(x, -u, float(grid[1]), float(grid[2]), float(grid[1]), x_next=step[0])[3] - step[3]
        assert log_ratio.abs().min() > 50 * reward_rl.Config().clip_range
    # a diffusers folder (from_pretrained) gives the same policy as the seeded tiny source
    tiny = adapters.load_source(adapters.WanConfig())
    tiny[0].save_pretrained(tmp_path / "transformer")
    tiny[1].save_pretrained(tmp_path / "vae")
    folder = adapters.WanPolicy(adapters.read_config(dict(source=str(tmp_path), text_len=512)))  # what a folder takes
    t = torch.full((2,), 0.3)
    assert torch.equal(folder.velocity(x, t, tokens),
                       adapters.WanPolicy(adapters.WanConfig(text_len=512)).velocity(x, t, tokens))


@needs_wan
def test_wan_time_grid_shift_is_diffusers_and_each_policy_brings_its_own():
    """time_grid(steps, shift) is FlowMatchEulerDiscreteScheduler(shift)'s sigmas as t; shift 1 is the DiT's equal grid,
    bit for bit; the DiT keeps shift 1 and guidance until CFG_UNTIL, Wan (and its reference) shift 3 and every step."""
    import adapters
    from diffusers import FlowMatchEulerDiscreteScheduler
    for steps in (1, 3, 20):
        assert torch.equal(M.time_grid(steps), torch.linspace(0, 1, steps + 1))
        for shift in (1.0, 3.0, 5.0):
            sched = FlowMatchEulerDiscreteScheduler(shift=shift)
            sched.set_timesteps(sigmas=torch.linspace(1, 0, steps + 1)[:-1].tolist())
            assert torch.allclose(M.time_grid(steps, shift), 1 - sched.sigmas, atol=1e-6), (steps, shift)
    assert (M.time_grid(20, 3.0)[1:-1] < M.time_grid(20)[1:-1]).all()       # more of the steps near the noise
    dit, wan = tiny_model(), adapters.WanPolicy(adapters.WanConfig())
    assert (dit.flow_shift, dit.cfg_until) == (1.0, M.CFG_UNTIL) and (wan.flow_shift, wan.cfg_until) == (3.0, 1.0)
    assert (wan.reference().flow_shift, wan.reference().cfg_until) == (3.0, 1.0)
    custom = adapters.WanPolicy(adapters.WanConfig(flow_shift=5.0, cfg_until=0.5))
    assert (custom.flow_shift, custom.cfg_until) == (5.0, 0.5)
    noise, tokens = torch.randn(1, *wan.flow_shape), data.tokenize(["a red circle"])
    assert not torch.allclose(M.sample(wan, tokens, noise, 2, 3.0), M.sample(custom, tokens, noise, 2, 3.0))


@needs_wan
def test_wan_bf16_keeps_the_lora_factors_fp32_and_trains():
    import adapters
    policy = adapters.WanPolicy(adapters.WanConfig(dtype="bfloat16"))
    lora = {n: p for n, p in policy.transformer.named_parameters() if "lora_" in n}
    base = [p for n, p in policy.transformer.named_parameters() if "lora_" not in n]
    assert len(lora) == 32 and all(p.dtype == torch.float32 and p.requires_grad for p in lora.values())
    assert all(p.dtype == torch.bfloat16 for p in base)
    x, tokens = torch.randn(2, *policy.flow_shape), data.tokenize(["a fast red circle moving left"] * 2)
    v = policy.velocity(x, torch.full((2,), 0.4), tokens)
    v.float().pow(2).mean().backward()
    grads = [p.grad for n, p in lora.items() if "lora_B" in n]
    assert v.dtype == torch.float32 and all(g is not None and g.dtype == torch.float32 and g.isfinite().all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0                  # B = 0 at the start: its gradient is what trains
    policy.reference()                                                   # a fold restarts the adapter: still fp32
    assert all(p.dtype == torch.float32 for n, p in policy.transformer.named_parameters() if "lora_" in n)


@needs_wan
def test_wan_stages_run_from_each_others_files_and_change_the_weights(wan_chain):
    c = wan_chain
    read = lambda path: checkpoint.read_checkpoint(path)[0]
    init, tuned, awm, ppo, dpo = (read(c[k]) for k in ("init", "sft", "awm", "ppo", "dpo"))
    lora_b = [k for k in init if "lora_B" in k and not k.startswith("folded.")]
    assert len(lora_b) == 16 and all(init[k].abs().sum() == 0 for k in lora_b)            # a fresh adapter: B = 0
    assert all(tuned[k].abs().sum() > 0 for k in lora_b)                                     # Stage I trained it
    for name, out, parent, n in (("awm", awm, tuned, 1), ("ppo", ppo, tuned, 1), ("dpo", dpo, awm, 2)):
        # each later stage folded its input's adapter into the frozen weights (kept as factors) and trained a new one
        assert checkpoint.read_checkpoint(c[name])[1].folded == n
        assert all(torch.equal(out[f"folded.{n - 1}.{k[len('transformer.'):].replace('.default.weight', '')}"], parent[k])
                   for k in parent if "lora_" in k and not k.startswith("folded."))
        assert all(torch.equal(out[k], parent[k]) for k in parent if k.startswith("folded."))
        # the new adapter starts at B = 0; at its first update the policy is its reference (no KL gradient) and there is
        # no curated term (sft_weight=0), so a B that moved is the reward's doing
        assert all(out[k].abs().sum() > 0 for k in lora_b), name
    recs = [[r for r in read_log(c["root"] / f"rl_{u}" / "log.jsonl") if "reward_instruction" in r][0] for u in ("awm", "ppo")]
    assert all(r["adv_absmax"] > 0.5 and r["kl_ref"] == 0 for r in recs)
    final = read_log(c["root"] / "dpo" / "log.jsonl")[-1]["final"]
    assert 0 <= final["win_rate"] <= 1


@needs_wan
def test_wan_lora_reference_is_the_input_policy_and_kl_is_zero_at_the_first_update(wan_chain):
    """The reference is the policy with its adapter off, after the input's adapter was folded in: the stage's input."""
    policy, _ = checkpoint.load_model(wan_chain["sft"])
    x, t, tokens = torch.randn(2, *policy.flow_shape), torch.full((2,), 0.4), data.tokenize(["a slow blue square moving up"] * 2)
    with torch.no_grad():
        before = policy.velocity(x, t, tokens)
        with policy.adapter_off():                         # without the fold, the adapter off would be the base model
            assert (policy.velocity(x, t, tokens) - before).abs().max() > 1e-4
        reference = policy.reference()
        assert torch.allclose(policy.velocity(x, t, tokens), before, atol=1e-5)
        assert torch.equal(reference.velocity(x, t, tokens), policy.velocity(x, t, tokens))
    assert not list(reference.parameters()) and sum(p.requires_grad for p in policy.parameters()) == 32   # no copy
    rec = [r for r in read_log(wan_chain["root"] / "rl_ppo" / "log.jsonl") if "reward_instruction" in r][0]
    assert rec["kl_ref"] == 0.0 and rec["ratio"] == 1.0 and rec["approx_kl"] == 0.0


@needs_wan
def test_wan_save_load_round_trip_and_an_interrupted_stage_ii_resumes_to_the_same_weights(wan_chain):
    c = wan_chain
    policy, meta = checkpoint.load_model(c["dpo"])                          # two folds re-applied from the file's factors
    assert meta["lineage"]["stage"] == "dpo" and policy.cfg.folded == 2
    path = str(c["root"] / "again.safetensors")
    checkpoint.save_checkpoint(path, policy.state_dict(), policy.cfg, meta["lineage"])
    again, _ = checkpoint.load_model(path)
    x, t, tokens = torch.randn(2, *policy.flow_shape), torch.full((2,), 0.7), data.tokenize(["a fast cyan circle moving down"] * 2)
    with torch.no_grad():
        assert torch.equal(again.velocity(x, t, tokens), policy.velocity(x, t, tokens))
    full = reward_rl.train(wan_rl(c["sft"], c["root"] / "rl_full", iters=2), reward_fn=PIXEL)
    reward_rl.train(wan_rl(c["sft"], c["root"] / "rl_cut", iters=1), reward_fn=PIXEL)
    resumed = reward_rl.train(wan_rl(c["sft"], c["root"] / "rl_cut", iters=2, resume=True), reward_fn=PIXEL)
    a, b = checkpoint.read_checkpoint(full)[0], checkpoint.read_checkpoint(resumed)[0]
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@needs_wan
def test_wan_full_fine_tuning_and_one_line_refusals(wan_chain, monkeypatch, capsys):
    import adapters
    full = adapters.WanPolicy(adapters.WanConfig(lora_rank=0))      # no LoRA: the reference is a frozen copy
    reference = full.reference()
    shared = lambda a, b: all(p is q for p, q in zip(a.parameters(), b.parameters()))
    assert shared(reference.vae, full.vae) and not shared(reference.transformer, full.transformer)   # frozen: shared
    assert set(full.state_dict()) == {f"transformer.{k}" for k in full.transformer.state_dict()}
    # PPO cannot score rollouts drawn by another step than sde_step's
    other = str(wan_chain["root"] / "other.safetensors")
    adapters.init_checkpoint([f"--out={other}", "--sampler=flow-match-sde"])
    folder = wan_chain["root"] / "folder"                                   # a real source: the tiny Wan as files
    for part, module in zip(("transformer", "vae"), adapters.load_source(adapters.WanConfig())):
        module.save_pretrained(folder / part)
    for run, needle in ((lambda: reward_rl.train(wan_rl(other, wan_chain["root"] / "rl_other", update="ppo"), reward_fn=PIXEL),
                         "flow-match-sde"),
                        (lambda: adapters.init_checkpoint([f"--out={other}", "--overwrite=true", "--frames=6"]), "1 + 4k"),
                        (lambda: adapters.init_checkpoint([f"--out={other}", "--overwrite=true", f"--source={folder}"]),
                         "--text_len=512"),
                        (lambda: M.sample_long(checkpoint.load_model(other)[0], data.tokenize(["a red circle"]), torch.Generator(), 2),
                         "latents")):
        with pytest.raises(SystemExit) as exit_:
            cli.run_cli(lambda argv: run(), [])
        err = capsys.readouterr().err                              # progress bars may stand before the error
        errors = [line for line in err.splitlines() if line.startswith("error: ")]
        assert exit_.value.code == 2 and len(errors) == 1 and needle in errors[0] and "Traceback" not in err, err
    assert not (wan_chain["root"] / "rl_other").exists()       # the solver contract refused at startup, before any work
    monkeypatch.setattr(adapters, "WanTransformer3DModel", None)                # as without the extra
    with pytest.raises(cli.UserError, match="requirements-wan.txt"):
        checkpoint.load_model(wan_chain["init"])


@needs_wan
def test_wan_prompt_states_from_a_file_or_a_callable(tmp_path):
    import adapters
    prompts = ["a fast red circle moving left", "a slow blue square moving up"]
    states = {p: torch.randn(3 + i, 16) for i, p in enumerate(prompts)} | {"": torch.full((1, 16), 0.5)}
    save_file(states, str(tmp_path / "states.safetensors"))
    text = adapters.WanPolicy(adapters.WanConfig(text=str(tmp_path / "states.safetensors"))).text
    got = text(data.tokenize(prompts), drop=torch.tensor([False, True]))
    assert got.shape == (2, 8, 16) and torch.equal(got[0, :3], states[prompts[0]]) and got[0, 3:].abs().sum() == 0
    assert torch.equal(got[1, :1], states[""][0:1]) and got[1, 1:].abs().sum() == 0     # guidance's empty prompt
    with pytest.raises(cli.UserError, match="no entry for 'a red circle'"):
        text(data.tokenize(["a red circle"]))
    text = adapters.WanPolicy(adapters.WanConfig(text="test_all:fake_states")).text
    assert torch.equal(text(data.tokenize(prompts))[:, :3], fake_states(prompts))
    # guidance's unconditional half is the states of '' from every source: the function's, padded like any prompt...
    got = text(data.tokenize(prompts), drop=torch.tensor([False, True]))
    assert torch.equal(got[1, :3], fake_states([""])[0]) and got[1, 3:].abs().sum() == 0 and got[1].abs().sum() > 0
    # ...and for the tokens embedding, an empty caption: all pads
    text = adapters.WanPolicy(adapters.WanConfig()).text
    assert torch.equal(text(data.tokenize(prompts), drop=torch.ones(2, dtype=torch.bool)), text(torch.zeros(2, data.MAX_TOKENS, dtype=torch.long)))
    # a states file without '' is refused when the policy is built, not at the first guided step
    save_file({p: s for p, s in states.items() if p}, str(tmp_path / "no_empty.safetensors"))
    with pytest.raises(cli.ConfigError, match="no states for ''"):
        adapters.WanPolicy(adapters.WanConfig(text=str(tmp_path / "no_empty.safetensors")))


@needs_wan
def test_wan_embed_cleans_prompts_as_wan_pipeline_does(tmp_path, monkeypatch):
    """adapters.clean_prompt is diffusers' WanPipeline prompt_clean on its branch without ftfy, and embed tokenizes the
    cleaned prompt but keys its states by the caption as postflow spells it."""
    import transformers
    from diffusers.pipelines.wan import pipeline_wan
    import adapters
    monkeypatch.setattr(pipeline_wan, "is_ftfy_available", lambda: False)
    for text in ["a red  circle", "  a &amp;amp; b\n\tc  ", "x&lt;y&gt;\u3000z\xa0w", "\x1cq\x1fr\u2028s \x1d",
                 "&#39;fast&#39;\r\n&quot;blue&quot; ", "", " \t "]:
        assert adapters.clean_prompt(text) == pipeline_wan.prompt_clean(text), repr(text)
    seen = []
    tokenizer = lambda text, return_tensors: seen.append(text) or {"input_ids": torch.tensor([[len(text), 1]])}
    encoder = lambda input_ids: types.SimpleNamespace(last_hidden_state=input_ids[..., None].float().expand(-1, -1, 16))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: tokenizer)
    monkeypatch.setattr(transformers.UMT5EncoderModel, "from_pretrained",
                        lambda *a, **k: types.SimpleNamespace(eval=lambda: encoder))
    monkeypatch.setattr(data, "caption", lambda *a: " a  fast &amp;amp; red circle ")
    (tmp_path / "text_encoder").mkdir()
    adapters.embed([f"--source={tmp_path}", f"--out={tmp_path / 'states.safetensors'}"])
    states = load_file(str(tmp_path / "states.safetensors"))
    assert set(seen) == {"", "a fast & red circle"} and set(states) == {"", " a  fast &amp;amp; red circle "}
    assert states[" a  fast &amp;amp; red circle "][0, 0] == len("a fast & red circle")


@needs_wan
def test_wan_lora_stage_ii_runs_sharded_and_matches_one_process(tmp_path):
    """The tiny Wan with LoRA, its transformer in bf16 and its factors in fp32, an AWM iteration of Stage II under
    FSDP2 on 2 ranks: each transformer block a unit, the reference the policy's own blocks with the adapter off, one
    rank with no rollout in a minibatch (2 rollouts, 2 minibatches). It ends where one process does, only the adapter
    moved, and its factors stay fp32."""
    import adapters
    init = f"{tmp_path}/bf16.safetensors"
    adapters.init_checkpoint([f"--out={init}", "--dtype=bfloat16"])
    args = ["reward_rl.py", f"--init={init}", "--iters=1", "--prompts_per_iter=1", "--group_size=2",
            "--rollout_steps=2", "--sde_window=1", "--eval_prompts=2", "--eval_steps=1", "--ckpt_every=1", "--epochs=1",
            "--warmup=1", "--lr=1e-2", "--sft_batch=2", "--std_floor=1e-6", "--bf16=false", "--device=cpu"]
    fsdp = torchrun(args, tmp_path / "fsdp", "fsdp", **PIPES)              # beside "one"
    in_process(args, tmp_path / "one")
    finish(fsdp)
    # bf16 activations round at 2^-8 of a value, and the two layouts round differently (3e-4 measured); a rank's
    # rows left out of the reduction flip the signs of Adam's first step, 2e-2 at this lr
    assert state_gap(tmp_path / "one", tmp_path / "fsdp") < 1e-3
    before, after = (checkpoint.read_checkpoint(p)[0] for p in (init, tmp_path / "fsdp" / "ckpt.safetensors"))
    moved = [k for k in after if k in before and not torch.equal(before[k], after[k])]
    assert moved and all("lora" in k for k in moved)
    assert all(after[k].dtype == torch.float32 for k in moved)


WAN_BASE = os.path.join(HERE, "checkpoints", "base_wan.safetensors")   # make base POLICY=wan


@needs_wan
def test_the_shipped_wan_base_draws_the_world_and_trains(tmp_path):
    """The pixel Wan's shipped base against a random pixel Wan of its shape: its samples score above the random
    one's on the oracle, and its flow loss on a fixed batch of curated clips falls under a few AdamW steps."""
    import adapters
    base, _ = checkpoint.load_model(WAN_BASE)
    adapters.init_checkpoint(["--source=pixel", "--text=learned", "--target=clean", "--lora_rank=0",
                              f"--frames={base.flow_shape[1]}", f"--size={base.flow_shape[-1]}",
                              f"--out={tmp_path / 'random.safetensors'}"])
    random_wan, _ = checkpoint.load_model(tmp_path / "random.safetensors")
    prompts, _, noise = rewards.eval_set(base, 4, seed=0, noise_seed=7)
    ours, theirs = (rewards.quick_eval(net, prompts, noise, steps=6) for net in (base, random_wan))
    assert ours["fidelity"] > theirs["fidelity"] + 0.1 and ours["instruction"] > theirs["instruction"] + 0.1
    assert ours["acc_colour"] > theirs["acc_colour"], (ours, theirs)
    batch = data.make_batch("curated", 4, seed=0, world=rewards.world_of(base.cfg))
    opt = torch.optim.AdamW(base.parameters(), lr=1e-4)
    losses = []
    for _ in range(4):
        loss = M.flow_loss(base, batch.videos, batch.tokens, torch.Generator().manual_seed(0), cond_drop=0.0)[0].mean()
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < 0.9 * losses[0], losses


# a tiny pixel Wan (16 tokens a frame) predicting the clean clip, as the base does
PIXEL_WAN = ["--source=pixel", "--text=learned", "--target=clean", "--lora_rank=0", "--frames=4",
             "--size=16", "--patch=4", "--heads=2", "--head_dim=8", "--layers=2", "--ffn_dim=64",
             "--text_dim=16"]


@needs_wan
def test_wan_on_pixels_learns_from_scratch_and_its_checkpoint_is_a_lora_base(tmp_path):
    """diffusers' transformer on RGB patches with learned words, from a random init: encode is the
    identity, decode a clamp, '' all pads, the output read as the clean clip; Stage I lowers its
    held-out flow loss and trains the words; the result is then the frozen base of a LoRA policy,
    which starts as that base and holds only its adapter."""
    import adapters
    init, lora = str(tmp_path / "init.safetensors"), str(tmp_path / "lora.safetensors")
    adapters.init_checkpoint([*PIXEL_WAN, f"--out={init}"])
    fresh, _ = checkpoint.load_model(init)
    clips = data.make_batch("val", 2, seed=0, world=TINY_WORLD).videos
    assert fresh.flow_shape == (3, 4, 16, 16) and torch.equal(fresh.encode(clips), clips)
    assert torch.equal(fresh.decode(3 * clips), (3 * clips).clamp(-1, 1))
    tokens = data.tokenize(["a fast red circle moving left", "a slow blue square moving up"])
    empty = fresh.text(tokens, drop=torch.ones(2, dtype=torch.bool))
    assert empty.shape == (2, data.MAX_TOKENS, 16) and empty.abs().sum() == 0
    frozen = M.frozen_copy(fresh)    # an EMA's copy is frozen, yet FSDP2 must shard its words alike
    assert frozen.text in frozen.shard_units() and fresh.text in fresh.shard_units()
    x, t = torch.randn(2, *fresh.flow_shape), torch.full((2,), 0.4)
    with torch.no_grad():            # diffusers' call, its output taken as the clean clip
        out = fresh.transformer(x, 1000 * (1 - t), fresh.text(tokens), return_dict=False)[0]
        assert torch.allclose(fresh(x, t, tokens), out, atol=1e-5)
    before = sft.validation_loss(fresh, TINY_WORLD, 16)
    tuned = sft.train(sft.Config(init=init, out_dir=str(tmp_path / "sft"), steps=30, batch_size=8,
                                 lr=3e-3, warmup=2, ema_decay=0.9, log_every=10, ckpt_every=30,
                                 val_clips=16, sample_steps=1, device="cpu"))
    weights, _, meta = checkpoint.read_checkpoint(tuned)
    assert meta["val_loss"]["val"] < 0.8 * before["val"], (before, meta["val_loss"])
    words = checkpoint.read_checkpoint(init)[0]["text.words.weight"]
    assert not torch.equal(weights["text.words.weight"], words)
    adapters.init_checkpoint([f"--source={tuned}", "--lora_rank=2", f"--out={lora}"])  # its shape
    base, adapted = checkpoint.load_model(tuned)[0], checkpoint.load_model(lora)[0]
    with torch.no_grad():            # B = 0: the base itself
        assert torch.equal(base.velocity(x, t, tokens), adapted.velocity(x, t, tokens))
    assert all("lora_" in k for k in checkpoint.read_checkpoint(lora)[0])
    sft.train(sft.Config(init=lora, out_dir=str(tmp_path / "sft_lora"), steps=1, batch_size=2,
                         warmup=1, log_every=1, val_clips=2, sample_steps=1, device="cpu"))
