"""The training machinery the training scripts share (no user runs this file): losses and evaluation, the
optimizer and its schedule, the run folder (one run at a time, settings.json, logs, plots, the best checkpoint),
the training loop with resumable checkpoints, signals and a divergence guard, several processes (DDP or FSDP2
under torchrun), and the --dry_run memory estimate.

    from trainer import RunFolder, calc_loss_batch, train_model
    with RunFolder(cfg, outputs=["model.pth"]) as run:
        rows = train_model(model, train_loader, cfg, run=run, device=device, eval_fn=...,
                           loss_fn=lambda m, batch: calc_loss_batch(*batch, m, device))
"""
import atexit
import contextlib
import csv
import datetime
import fcntl
import json
import math
import os
import platform
import re
import shlex
import signal
import sys
import time

import tiktoken
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import RandomSampler, SequentialSampler, default_collate
from tqdm import tqdm

from data import atomic_write, check_parent, open_lock, remove_stale_tmp, save_pth, write_json
from load_gpt2 import init_model
from model import (MODEL_CONFIGS, GPTModel, checkpoint_dict, clean_state_dict, count_parameters, load_state,
                   read_checkpoint)
from settings import UserError, autocast, few, keep_freed_memory, pyplot

TRAIN_STATE = "model_and_optimizer.pth"  # everything --resume needs
BEST = "best.pth"                        # the model at its lowest validation loss (--save_best)
RUN_FILES = (TRAIN_STATE, BEST, "log.csv", "loss-plot.png", "settings.json")
INPUT_SETTINGS = ("data", "csv", "train_csv", "val_csv", "test_csv", "init", "reward_model")  # files a run reads
# what a run is: --resume with another value of these would continue one run as another (its optimizer, data order
# or loss would no longer fit); steps, evaluation, saving, logging and the device may change
RUN_SETTINGS = ("method", "model", "context_length", "emb_dim", "n_heads", "n_layers", "drop_rate", "qkv_bias",
                "tie_weights", "trainable", "lora_rank", "lora_alpha", "batch_size", "grad_accum_steps", "stride",
                "windows", "train_ratio", "test_ratio", "split_seed", "seed", "max_length", "balance",
                "allowed_max_length", "mask_instruction", "text_field", "text_column", "label_column", "reward",
                "group_size", "prompts_per_step", "fsdp")

# ---------------------------------------------------------------------------------------------------------------
# Losses and evaluation (the book's chapter 5 functions)
# ---------------------------------------------------------------------------------------------------------------

def calc_loss_batch(input_batch, target_batch, model, device):
    """Mean next-token cross-entropy of one batch."""
    input_batch, target_batch = input_batch.to(device), target_batch.to(device)
    logits = model(input_batch)
    return F.cross_entropy(logits.flatten(0, 1).float(), target_batch.flatten())


def last_token_logits(model, input_ids, lengths):
    """(B, T) right-padded ids and (B,) real lengths -> (B, num_outputs): each row's logits at its last real token.

    Attention is causal, so the padding after a text never changes the outputs before it; the batch is cut to its
    longest text first, which gives the same numbers with less work.
    """
    input_ids = input_ids[:, :int(lengths.max())]
    logits = model(input_ids)                                        # (B, T, num_outputs)
    return logits[torch.arange(len(lengths), device=logits.device), lengths - 1]


@torch.no_grad()
def calc_loss_loader(data_loader, model, device, num_batches=None, dtype=torch.float32, progress=False):
    """Average batch loss over the first num_batches batches (all when None); nan for an empty loader.
    progress=True shows a bar of its own (on a terminal) while it runs."""
    n = len(data_loader) if num_batches is None else min(num_batches, len(data_loader))
    if n == 0:
        return float("nan")
    total = 0.0
    batches = tqdm(data_loader, total=n, desc="evaluating", unit="batch", leave=False,
                   disable=not (progress and n > 1 and sys.stderr.isatty()))
    for i, (x, y) in enumerate(batches):
        if i >= n:
            break
        with autocast(torch.device(device), dtype):
            total += calc_loss_batch(x, y, model, device).item()
    batches.close()
    return total / n


def evaluate_model(model, train_loader, val_loader, device, eval_iter, dtype=torch.float32, progress=False):
    """(train_loss, val_loss) over the first eval_iter batches of each (all when None), in eval mode; the model
    goes back to training mode afterwards."""
    was_training = model.training
    model.eval()
    train_loss = calc_loss_loader(train_loader, model, device, eval_iter, dtype, progress)
    val_loss = calc_loss_loader(val_loader, model, device, eval_iter, dtype, progress)
    model.train(was_training)
    return train_loss, val_loss


# ---------------------------------------------------------------------------------------------------------------
# Optimizer, schedule, random state
# ---------------------------------------------------------------------------------------------------------------

def lr_at_step(step, total_steps, lr, schedule="constant", warmup_steps=0, min_lr=0.0):
    """Learning rate for optimizer step `step` (0-based): linear warmup, then constant or cosine down to min_lr."""
    if warmup_steps and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "cosine":
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))
    return lr


def make_optimizer(model, lr, weight_decay, device):
    """AdamW over the trainable parameters; fused kernels where the device has them (much faster on CPU too)."""
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def rng_state(device):
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state, device):
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# ---------------------------------------------------------------------------------------------------------------
# The run folder: one run at a time, nothing changed before the first step, settings, logs and plots
# ---------------------------------------------------------------------------------------------------------------

def command_line(script, argv):
    """The command that started this run, as a shell would show it."""
    args = sys.argv[1:] if argv is None else list(argv)
    return " ".join(shlex.quote(str(a)) for a in ["python", os.path.basename(script), *args])


class RunFolder:
    """A training run's out_dir, held from the checks before any work until the last file is written.

    On entry it refuses an out_dir that is a file, an output path that is a folder, and a folder that already
    holds a run unless --resume (continue it) or --overwrite (start over) is given; it takes an advisory lock (the
    OS drops it when the process dies, so a killed run blocks nothing) and deletes the temporary files of killed
    writes. Nothing is written until the first training step is done (started()): then settings.json appears
    and, with --overwrite, the earlier run's files go. A run that stops before that leaves the folder as it was.
    Under torchrun only rank 0 touches the folder.

    outputs: the paths of the files the script writes besides RUN_FILES in out_dir.
    """

    def __init__(self, cfg, outputs=(), command=""):
        self.cfg, self.out_dir, self.command = cfg, cfg["out_dir"], command
        self.outputs = [os.path.join(self.out_dir, name) for name in RUN_FILES] + list(outputs)
        self.finished = False  # set by train_model when --resume finds nothing left to do
        self.is_started = False
        self.logger = None
        self._lock = None
        self._created = False

    def path(self, name):
        return os.path.join(self.out_dir, name)

    def __enter__(self):
        if not is_main_process():
            return self
        out_dir = self.out_dir
        if os.path.exists(out_dir) and not os.path.isdir(out_dir):
            raise UserError(f"--out_dir {out_dir} is a file: pass a folder")
        inputs = {k: v for k in INPUT_SETTINGS if isinstance(v := self.cfg.get(k), str) and os.path.isfile(v)}
        for path in self.outputs:
            if os.path.isdir(path) or os.path.lexists(path) and not os.path.isfile(path):
                raise UserError(f"{path} is a folder, pipe or device where the run writes a file: move it away or "
                                f"pass another --out_dir")
            check_parent(path, "output")
            for name, source in inputs.items():
                if os.path.isfile(path) and os.path.samefile(source, path):
                    raise UserError(f"{path} is the --{name} input and also a file this run writes: keep your input "
                                    f"elsewhere, or pass another --out_dir")
        self.logger = open_logger(self.cfg.get("logger", "none"), out_dir, self.cfg)  # a missing package fails now
        self._created = not os.path.exists(out_dir)
        try:
            os.makedirs(out_dir, exist_ok=True)
            self._lock = open_lock(self.path(".lock"))  # never through a link, never a pipe or folder
        except OSError as e:
            raise UserError(f"cannot use --out_dir {out_dir} ({e.strerror}): pass a folder you can write to") from None
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock.seek(0)
            other = self._lock.read().strip() or "another process"
            self._lock.close()
            self._lock = None
            raise UserError(f"{out_dir} is in use by another run ({other}): wait for it to finish, or pass another "
                            f"--out_dir") from None
        self._lock.seek(0)
        self._lock.truncate()
        self._lock.write(f"PID {os.getpid()} on {platform.node()}")
        self._lock.flush()
        remove_stale_tmp(out_dir)
        held = [os.path.basename(p) for p in self.outputs if os.path.isfile(p)]
        if held and not (self.cfg.get("resume") or self.cfg.get("overwrite")):
            self.__exit__(None, None, None)
            raise UserError(f"{out_dir} already holds a run ({', '.join(held[:3])}): pass --resume to continue it, "
                            f"--overwrite to start over, or another --out_dir")
        if self.cfg.get("resume"):
            self._check_same_run()
        return self

    def _check_same_run(self):
        """Refuse a --resume whose run-defining settings differ from those the run began with (settings.json)."""
        earlier = _read_json(self.path("settings.json"))
        began = earlier.get("settings") if isinstance(earlier, dict) else None
        if not isinstance(began, dict) or earlier.get("processes", 1) != world_size():
            return  # no readable record, or another process count: the checkpoint's own checks say so
        changed = [f"--{k} {began[k]} (now {self.cfg[k]})" for k in RUN_SETTINGS
                   if k in began and k in self.cfg and began[k] != self.cfg[k]]
        if changed:
            self.__exit__(None, None, None)
            raise UserError(f"--resume: this run began with {few(changed, 3)}: pass the same settings to continue "
                            f"it (see {self.path('settings.json')}), or --overwrite to start over")

    def started(self):
        """The first step is done: drop the earlier run's files (with --overwrite) and write settings.json."""
        if self.is_started:
            return
        self.is_started = True
        if not is_main_process():
            return
        if self.cfg.get("overwrite") and not self.cfg.get("resume"):
            for path in self.outputs:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
        start = {"command": self.command, "settings": self.cfg, "processes": world_size(),
                 "time": datetime.datetime.now().isoformat(" ", "seconds"), "torch": torch.__version__,
                 "tiktoken": tiktoken.__version__, "python": platform.python_version()}
        path = self.path("settings.json")
        earlier = _read_json(path) if self.cfg.get("resume") else None
        if isinstance(earlier, dict) and "settings" in earlier:  # a resume: keep how the run began, add this start
            write_json(path, {**earlier, "resumed": [*earlier.get("resumed", []), start]})
        else:
            write_json(path, start)

    def __exit__(self, *exc):
        if self.logger is not None:
            self.logger.close()
            self.logger = None
        if self._lock is not None:
            with contextlib.suppress(OSError):
                os.remove(self.path(".lock"))
            self._lock.close()  # closing the file drops the lock
            self._lock = None
            if self._created and not self.is_started:
                with contextlib.suppress(OSError):
                    os.rmdir(self.out_dir)  # only when still empty
        return False


def _read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def write_log(path, rows):
    """Write every logged row as CSV (columns: union of the rows' keys, in first-seen order)."""
    if not rows:
        return None
    cols = []
    for r in rows:
        cols += [k for k in r if k not in cols]

    def write(f):
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    return atomic_write(path, write, "w")


def plot_losses(rows, steps_per_epoch, path, keys=("train_loss", "val_loss"), ylabel="loss"):
    """Loss against epochs, with tokens seen on a second x-axis (needs matplotlib; skipped without it)."""
    plt = pyplot("plots")
    if plt is None:
        return None
    rows = [r for r in rows if all(k in r for k in keys)]
    if not rows:
        return None
    epochs = [r["step"] / max(1, steps_per_epoch) for r in rows]
    fig, ax1 = plt.subplots(figsize=(5, 3))
    for k, style in zip(keys, ("-", "-.", ":", "--")):
        ax1.plot(epochs, [r[k] for r in rows], style, label=k.replace("_", " "))
    ax1.set_xlabel("epochs")
    ax1.set_ylabel(ylabel)
    ax1.legend(loc="upper right")
    if "tokens_seen" in rows[0]:
        ax2 = ax1.twiny()
        ax2.plot([r["tokens_seen"] for r in rows], [r[keys[0]] for r in rows], alpha=0)
        ax2.set_xlabel("tokens seen")
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, dpi=120, format="png"))
    plt.close(fig)
    return path


class open_logger:
    """--logger tensorboard | wandb: every logged row also goes there. Neither package is required; asking for
    one that is not installed is an error before any work starts. Returns None for --logger none."""

    def __new__(cls, name, out_dir, cfg):
        return None if name in ("", "none") else super().__new__(cls)

    def __init__(self, name, out_dir, cfg):
        self.name = name
        try:  # optional dependencies
            if name == "tensorboard":
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(os.path.join(out_dir, "tensorboard"))
            elif name == "wandb":
                import wandb
                self.writer = wandb.init(project="gpt2-from-scratch", dir=out_dir, config=cfg,
                                         name=os.path.basename(os.path.abspath(out_dir)))
            else:
                raise UserError(f"--logger must be none, tensorboard or wandb, got {name!r}")
        except ImportError:
            raise UserError(f"--logger {name} needs the {name} package: pip install {name}, or drop --logger") from None

    def log(self, row):
        numbers = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}
        if self.name == "tensorboard":
            for k, v in numbers.items():
                self.writer.add_scalar(k, v, row["step"])
            self.writer.flush()
        else:
            self.writer.log(numbers, step=row["step"])

    def close(self):
        (self.writer.close if self.name == "tensorboard" else self.writer.finish)()


class Progress:
    """The step counter: a tqdm bar on a terminal; where stderr is a file or a pipe, a plain line at every tenth of
    the run or once a minute; nothing with --quiet. Time spent evaluating counts neither in tokens/s nor in the
    time left."""

    def __init__(self, total, initial, quiet):
        shown = not quiet and is_main_process()
        self.bar = (tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, leave=False)
                    if shown and sys.stderr.isatty() else None)
        self.plain = shown and self.bar is None
        self.total, self.every, self.last_line = total, max(1, total // 10), time.time()
        self.tokens, self.seconds, self.steps = 0, 0.0, 0

    def add(self, tokens, seconds):
        self.tokens, self.seconds, self.steps = self.tokens + tokens, self.seconds + seconds, self.steps + 1

    def tokens_per_s(self):
        return self.tokens / max(self.seconds, 1e-9)

    def update(self, step, loss, lr):
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{self.tokens_per_s():.0f}")
        elif self.plain and (step % self.every == 0 or step == self.total or time.time() - self.last_line >= 60):
            left = (self.total - step) * self.seconds / max(self.steps, 1)
            print(f"step {step}/{self.total}: loss {loss:.3f}, lr {lr:.2e}, {self.tokens_per_s():.0f} tokens/s, "
                  f"{datetime.timedelta(seconds=round(left))} left", file=sys.stderr, flush=True)
            self.last_line = time.time()

    def resume_clock(self):
        """After an evaluation or a sample: the bar's rate and time left leave out the time they took."""
        if self.bar is not None:
            self.bar.unpause()

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class _StopRequest:
    """Turns Ctrl-C and SIGTERM into a flag the loop checks after each step, so it can save before leaving."""

    def __init__(self):
        self.signal = None
        self.old = {}

    def __enter__(self):
        if hasattr(signal, "SIGTERM"):
            for sig in (signal.SIGINT, signal.SIGTERM):
                try:
                    self.old[sig] = signal.signal(sig, self._handle)
                except ValueError:  # not the main thread: leave signals alone
                    pass
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:  # a second Ctrl-C: leave at once
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc):
        for sig, handler in self.old.items():
            signal.signal(sig, handler)


# ---------------------------------------------------------------------------------------------------------------
# Several processes (torchrun): DistributedDataParallel, or FSDP2 with --fsdp. One process needs none of this.
# ---------------------------------------------------------------------------------------------------------------

_devnull = None


def torchrun_env(name):
    """torchrun's WORLD_SIZE, RANK or LOCAL_RANK as a number (1, 0, 0 where unset), refused when it is not one."""
    value = os.environ.get(name, "1" if name == "WORLD_SIZE" else "0")
    if not re.fullmatch(r"\s*[0-9]+\s*", value):
        raise UserError(f"the environment variable {name}={value!r} is not a whole number >= 0: unset it (one "
                        f"process), or start the script with torchrun, which sets it")
    return int(value)


def setup_distributed(device):
    """Join torchrun's process group and return the device this process trains on; one process: returns device.

    torchrun sets RANK, LOCAL_RANK and WORLD_SIZE. The backend is NCCL on CUDA (each process takes GPU LOCAL_RANK)
    and gloo otherwise. Processes other than rank 0 send stdout to /dev/null, so every print and tqdm.write
    appears once; errors still reach stderr. Call it at the top of main, before the model is built.
    """
    global _devnull
    if torchrun_env("WORLD_SIZE") <= 1:
        return device
    if not dist.is_available():
        raise UserError("this torch build has no torch.distributed: run one process (python, not torchrun)")
    if device.type == "mps":
        raise UserError("torchrun with --device mps is not supported: use --device cpu or cuda")
    if device.type == "cuda":
        local_rank = torchrun_env("LOCAL_RANK")
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"process LOCAL_RANK={local_rank} has no GPU of its own ({torch.cuda.device_count()} "
                            f"visible): lower --nproc_per_node to the number of GPUs")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)  # so that .to("cuda") elsewhere lands on this process's GPU
    if not dist.is_initialized():
        try:
            if device.type == "cuda":
                dist.init_process_group("nccl", device_id=device)
            else:
                dist.init_process_group("gloo")
        except (ValueError, RuntimeError) as e:  # e.g. WORLD_SIZE set by hand without MASTER_ADDR / RANK
            raise UserError(f"cannot join the process group ({str(e).splitlines()[0]}): start several processes "
                            f"with torchrun, or unset WORLD_SIZE for one") from None
        atexit.register(_leave_process_group)
    if dist.get_rank() != 0:
        _devnull = _devnull or open(os.devnull, "w")
        sys.stdout = _devnull
    return device


def _leave_process_group():
    if dist.is_initialized():
        dist.destroy_process_group()


def _distributed():
    return dist.is_available() and dist.is_initialized()


def world_size():
    """Number of training processes (1 without torchrun)."""
    return dist.get_world_size() if _distributed() else 1


def process_rank():
    return dist.get_rank() if _distributed() else 0


def is_main_process():
    """True in rank 0, the process that logs and writes files (and in a one-process run)."""
    return process_rank() == 0


def describe_distributed(cfg):
    """', DDP over 2 processes (gloo)' and the like for the start-up line; '' in one process."""
    if world_size() == 1:
        return ""
    return f", {'FSDP' if cfg.get('fsdp') else 'DDP'} over {world_size()} processes ({dist.get_backend()})"


def any_process(flag):
    """True when flag is true in any process. Every process must call it at the same point (one tiny all-reduce);
    it keeps the processes in step when only some see a NaN loss or a Ctrl-C."""
    if not _distributed():
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


@contextlib.contextmanager
def local_main_first():
    """Run the body in the first process of each machine (LOCAL_RANK 0) before the others: downloads and caches get
    written once, then found by the rest. Every process must enter it."""
    first = torchrun_env("LOCAL_RANK") == 0
    if _distributed() and not first:
        dist.barrier()
    yield
    if _distributed() and first:
        dist.barrier()


def _grad_sync(step_model, last):
    """DDP's no_sync() for all but the last micro-batch of a step, so gradients are averaged once per step."""
    if last or not isinstance(step_model, DistributedDataParallel):
        return contextlib.nullcontext()
    return step_model.no_sync()


def shard_model(model, device):
    """FSDP2 in place: each transformer block, and the rest (embeddings, final norm, output layer) as one more group,
    keeps only 1/N of its parameters, gradients and optimizer state per process and gathers the full weights just
    for its own forward and backward."""
    mesh = init_device_mesh(device.type, (world_size(),))
    for block in model.trf_blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def is_fsdp(model):
    if not _distributed():
        return False
    return isinstance(model, FSDPModule)


def full_state_dict(model):
    """The model's weights as whole tensors without compile/DDP prefixes. For an FSDP model every process must call
    it; rank 0 gets the tensors (on the CPU), the others an empty dict."""
    if not is_fsdp(model):
        return clean_state_dict(model.state_dict())
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict  # slow import, rare path
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_model(path, model, kind="pretrain", **extra):
    """model.save_checkpoint that also works under torchrun: every process calls it, FSDP shards are gathered, and
    rank 0 writes. Returns path."""
    if not _distributed():
        return save_pth(path, checkpoint_dict(model, kind, **extra))
    state = full_state_dict(model)
    if is_main_process():
        save_pth(path, {"model": state, "config": dict(model.cfg), "kind": kind, **extra})
    dist.barrier()  # written before any process goes on
    return path


def _fsdp_train_state(model, optimizer):
    """(model, optimizer) state dicts with whole tensors, keyed by parameter name; {} outside rank 0."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,  # slow import
                                                         get_optimizer_state_dict)
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=opts), get_optimizer_state_dict(model, optimizer, options=opts)


def _load_fsdp_train_state(model, optimizer, ckpt):
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,  # slow import
                                                         set_optimizer_state_dict)
    opts = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, ckpt["model"], options=opts)
    set_optimizer_state_dict(model, optimizer, ckpt["optimizer"], options=opts)


def _processes(n, fsdp):
    return f"{n} process{'es' if n > 1 else ''}" + (" with --fsdp" if fsdp else "")


def _gathered(obj):
    """Every process's obj, gathered on rank 0 (None elsewhere)."""
    objs = [None] * world_size() if is_main_process() else None
    dist.gather_object(obj, objs, dst=0)
    return objs


# ---------------------------------------------------------------------------------------------------------------
# Batches: each process's share of each epoch, from any position, without a list of every index
# ---------------------------------------------------------------------------------------------------------------

def epoch_indices(n, shuffle, seed, epoch, rank=0, world=1):
    """This process's dataset indices for one epoch: a permutation drawn from (seed, epoch) when shuffling (a
    tensor, the one a DataLoader with a seeded RandomSampler draws), else range(n) (lazy: a corpus of 10^9 windows
    costs nothing here); dealt out in turn to `world` processes, the last few (fewer than world) dropped so that
    every process gets as many."""
    per = n // world
    if not shuffle:
        return range(rank, per * world, world)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch))
    return order[rank:per * world:world]


def loader_batches(loader, epoch, start, seed, rank=0, world=1):
    """Batches start, start + 1, ... of `epoch` for one process, read from loader's dataset as the DataLoader would
    (its batch_size, drop_last and collate_fn; shuffled when its sampler is a RandomSampler), without reading the
    batches before start: a resumed run continues at the exact next window at once."""
    if not isinstance(loader.sampler, (RandomSampler, SequentialSampler)) or loader.batch_size is None:
        raise UserError("the training loader has its own sampler: give train_model a DataLoader with batch_size and "
                        "shuffle")
    if hasattr(loader.dataset, "set_epoch"):  # data.RandomWindows: new offsets each epoch
        loader.dataset.set_epoch(epoch)
    indices = epoch_indices(len(loader.dataset), isinstance(loader.sampler, RandomSampler), seed, epoch, rank, world)
    collate = loader.collate_fn or default_collate
    bs = loader.batch_size
    for b in range(start, batches_per_epoch(loader, world)):
        chunk = indices[b * bs:(b + 1) * bs]
        yield collate([loader.dataset[i] for i in (chunk.tolist() if torch.is_tensor(chunk) else chunk)])


def batches_per_epoch(loader, world=1):
    """Batches in one process's share of an epoch."""
    n = len(loader.dataset) // world
    return n // loader.batch_size if loader.drop_last else -(-n // loader.batch_size)


# ---------------------------------------------------------------------------------------------------------------
# The training loop
# ---------------------------------------------------------------------------------------------------------------

def train_model(model, train_loader, cfg, *, loss_fn, eval_fn, device, dtype=torch.float32, kind="pretrain",
                extra=None, run=None, on_epoch_end=None, optimizer=None, write=None,
                plots=(("loss-plot.png", ("train_loss", "val_loss"), "loss"),), best_checkpoint=None):
    """Train `model` on train_loader for cfg['epochs'] (or cfg['max_steps']) optimizer steps; returns the logged rows.

    loss_fn(model, batch) -> scalar loss; eval_fn(model) -> dict of metrics, logged every cfg['eval_freq'] steps
    and at the end to log.csv, the plots (file name, metric keys, y label) and --logger. cfg also needs out_dir,
    lr, weight_decay, grad_accum_steps, seed and epochs, and may set the other training settings (settings.TRAINING).
    `run` is the script's RunFolder (one is opened for the call when None). Writes the resumable
    model_and_optimizer.pth at --save_every steps, on Ctrl-C/SIGTERM and at the end; `extra` goes into every
    checkpoint; a loss_fn with state_dict() / load_state_dict() (state it carries between steps) is saved and
    resumed with it. With --save_best, best.pth holds best_checkpoint(model) (default: the model's checkpoint dict) at
    the lowest val_loss. A loss, gradient norm or weight that is not finite stops the run with one line before
    anything is saved. With --resume on a finished run nothing happens: run.finished is set.

    Under torchrun (after setup_distributed) every process runs this with the same arguments: each trains on its
    own share of train_loader, gradients are averaged by DDP (or reduce-scattered by FSDP2 with cfg['fsdp']),
    eval_fn and on_epoch_end run in every process on the whole data, and only rank 0 writes files. loss_fn then
    gets the DDP wrapper, which can only be called; eval_fn gets the model itself.
    """
    with contextlib.ExitStack() as stack:
        run = run or stack.enter_context(RunFolder(cfg))
        return _train(model, train_loader, cfg, loss_fn, eval_fn, device, dtype, kind, extra or {}, run,
                      on_epoch_end, optimizer, write or tqdm.write, plots, best_checkpoint)


def _train(model, train_loader, cfg, loss_fn, eval_fn, device, dtype, kind, extra, run, on_epoch_end, optimizer,
           write, plots, best_checkpoint):
    state_path = run.path(TRAIN_STATE)
    accum = cfg.get("grad_accum_steps", 1)
    world, rank, fsdp = world_size(), process_rank(), bool(cfg.get("fsdp"))
    if torchrun_env("WORLD_SIZE") > 1 and not _distributed():
        raise RuntimeError("started by torchrun, but the script did not call setup_distributed() before training")
    if fsdp and world == 1:
        raise UserError("--fsdp shards the model across processes: start with "
                        "`torchrun --nproc_per_node N` (N >= 2), or drop --fsdp")
    if fsdp and dtype is torch.float16:
        raise UserError("--fsdp with float16 is not supported (no sharded gradient scaler): use --dtype bfloat16")
    if fsdp and optimizer is not None:
        raise ValueError("with fsdp, train_model builds the optimizer after sharding the model: pass optimizer=None")
    per_epoch = batches_per_epoch(train_loader, world)
    steps_per_epoch = per_epoch // accum
    if steps_per_epoch == 0:
        raise UserError(f"the training data gives {per_epoch} batches, fewer than one optimizer step "
                        f"({accum} micro-batches): add data or lower --batch_size / --grad_accum_steps")
    total_steps = cfg["epochs"] * steps_per_epoch
    if cfg.get("max_steps"):
        total_steps = min(total_steps, cfg["max_steps"])

    step, epoch, batch_pos, tokens_seen, rows, ckpt = 0, 0, 0, 0, [], None
    if cfg.get("resume"):
        ckpt = read_train_state(state_path, world, fsdp)
        step, epoch, batch_pos = ckpt["step"], ckpt["epoch"], ckpt["batch_pos"]
        tokens_seen, rows = ckpt["tokens_seen"], list(ckpt.get("log", []))
        if step >= total_steps:
            run.finished = True
            write(f"{cfg['out_dir']}: the run already finished at step {step} (of {total_steps}): nothing to do; "
                  f"raise --epochs or --max_steps to train further")
            return rows
    if device.type == "cpu":
        keep_freed_memory()  # every step re-allocates the same big buffers: reuse them instead of page-faulting anew
    if fsdp:
        shard_model(model, device)  # before the optimizer, which must hold the sharded parameters
    optimizer = optimizer or make_optimizer(model, cfg["lr"], cfg["weight_decay"], device)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype is torch.float16)
    fwd_model = torch.compile(model) if cfg.get("compile") else model
    saved_step = None  # the step of the last checkpoint that --resume can continue from
    if ckpt is not None:
        if fsdp:
            _load_fsdp_train_state(model, optimizer, ckpt)
        else:
            load_state(model, ckpt["model"], state_path)
            try:
                optimizer.load_state_dict(ckpt["optimizer"])
            except (ValueError, KeyError, RuntimeError) as e:
                raise UserError(f"{state_path}: its optimizer state does not fit this run's trainable parameters "
                                f"({str(e).splitlines()[0]}): resume with the settings the run began with, or "
                                f"--overwrite to start over") from None
        set_rng_state(ckpt["rng_per_process"][rank] if world > 1 else ckpt["rng"], device)
        if hasattr(loss_fn, "load_state_dict"):  # a loss that carries state between steps (online RL's rollouts)
            loss_fn.load_state_dict(ckpt["loss_state"][rank] if world > 1 else ckpt["loss_state"])
        saved_step = step
        write(f"resumed from {state_path} at step {step} (epoch {epoch + 1}, batch {batch_pos})")
    elif world > 1:
        torch.manual_seed(cfg["seed"] + 1 + rank)  # same initial weights, own dropout masks per process
    # the module that runs training steps: DDP averages the gradients in backward (FSDP2 does so by itself)
    step_model = fwd_model
    if world > 1 and not fsdp:
        gpu = [torch.cuda.current_device()] if device.type == "cuda" else None  # set by setup_distributed
        step_model = DistributedDataParallel(fwd_model, device_ids=gpu, gradient_as_bucket_view=True)
    best = min([r["val_loss"] for r in rows if isinstance(r.get("val_loss"), float)], default=math.inf)

    def diverged(what, at):
        kept = (f"the last good checkpoint is {state_path} (step {saved_step}): --resume continues from it"
                if saved_step is not None else "nothing was saved")
        decay = f" or the weight decay ({cfg['weight_decay']:g})" if cfg.get("weight_decay", 0) >= 1 else ""
        raise UserError(f"training diverged at step {at}: {what}; the learning rate ({cfg['lr']:g}){decay} is likely "
                        f"too high for this model and data: lower it or set --grad_clip 1.0; {kept}")

    def check_weights():
        """Every process checks its weights (its shard under FSDP) before anything is saved."""
        bad = [name for name, p in model.named_parameters() if not bool(torch.isfinite(_local(p)).all())]
        if any_process(bool(bad)):
            diverged(f"weights are not finite ({', '.join(bad[:3]) or 'in another process'})", step)

    def save_state():
        # every process calls this (gathering shards and RNG states needs them all); rank 0 writes
        nonlocal saved_step
        check_weights()
        if fsdp:
            model_state, optimizer_state = _fsdp_train_state(model, optimizer)
        else:
            model_state, optimizer_state = model.state_dict(), optimizer.state_dict()
        per_process = {"world_size": world, "fsdp": fsdp, "rng_per_process": _gathered(rng_state(device))} \
            if world > 1 else {}
        if hasattr(loss_fn, "state_dict"):
            per_process["loss_state"] = _gathered(loss_fn.state_dict()) if world > 1 else loss_fn.state_dict()
        if is_main_process():
            save_pth(state_path, {
                "model": model_state, "config": dict(model.cfg), "kind": kind, "optimizer": optimizer_state,
                "step": step, "epoch": epoch, "batch_pos": batch_pos, "tokens_seen": tokens_seen,
                "rng": rng_state(device), "log": rows,
                "train_settings": {k: v for k, v in cfg.items() if isinstance(v, (int, float, str, bool))},
                **per_process, **extra})
        if world > 1:
            dist.barrier()  # the file is there for every process (e.g. a --resume right after) once this returns
        saved_step = step

    def write_outputs():
        if is_main_process() and rows:
            write_log(run.path("log.csv"), rows)
            for name, keys, ylabel in plots:
                plot_losses(rows, steps_per_epoch, run.path(name), keys, ylabel)

    def log_eval():
        nonlocal best
        model.eval()
        with torch.no_grad(), autocast(device, dtype):
            metrics = eval_fn(fwd_model)
        model.train()
        progress.resume_clock()
        row = {"step": step, "epoch": round(step / steps_per_epoch, 3), "tokens_seen": tokens_seen,
               **{k: round(v, 5) if isinstance(v, float) else v for k, v in metrics.items()},
               "lr": optimizer.param_groups[0]["lr"], "tokens_per_s": round(progress.tokens_per_s(), 1)}
        rows.append(row)
        shown = " ".join(f"{k} {v:.3f}" for k, v in metrics.items() if isinstance(v, float))
        write(f"ep {min(epoch + 1, cfg['epochs'])} (step {step:06d}): {shown}")
        if run.logger is not None:
            run.logger.log(row)
        write_outputs()
        if cfg.get("save_best") and metrics.get("val_loss", math.inf) < best:
            best = metrics["val_loss"]
            check_weights()
            state = full_state_dict(model) if fsdp else None  # every process takes part in gathering the shards
            if is_main_process():
                best_ckpt = best_checkpoint(model) if best_checkpoint else checkpoint_dict(model, kind, **extra)
                if state is not None:
                    best_ckpt["model"] = state
                save_pth(run.path(BEST), {**best_ckpt, "step": step, "val_loss": best})

    model.train()
    progress = Progress(total_steps, step, cfg.get("quiet", False))
    try:
        with _StopRequest() as stop:
            while step < total_steps:
                batches = loader_batches(train_loader, epoch, batch_pos, cfg["seed"], rank, world)
                while batch_pos + accum <= per_epoch and step < total_steps:
                    t0 = time.perf_counter()
                    lr = lr_at_step(step, total_steps, cfg["lr"], cfg.get("lr_schedule", "constant"),
                                    cfg.get("warmup_steps", 0), cfg.get("min_lr", 0.0))
                    for group in optimizer.param_groups:
                        group["lr"] = lr
                    loss_sum, step_tokens = 0.0, 0
                    for i in range(accum):
                        batch = next(batches)
                        with _grad_sync(step_model, last=i == accum - 1):
                            with autocast(device, dtype):
                                loss = loss_fn(step_model, batch)
                            if any_process(not torch.isfinite(loss)):
                                diverged(f"the loss is {loss.item()}" if not torch.isfinite(loss) else
                                         "the loss is not finite in another process", step + 1)
                            scaler.scale(loss / accum).backward()
                        loss_sum += loss.item() / accum
                        step_tokens += batch_tokens(batch) * world
                    saves_next = step + 1 == total_steps or (cfg.get("save_every") and
                                                              (step + 1) % cfg["save_every"] == 0)
                    if cfg.get("grad_clip") or (saves_next and not scaler.is_enabled()):
                        scaler.unscale_(optimizer)
                        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.get("grad_clip") or math.inf)
                        if not scaler.is_enabled() and any_process(not torch.isfinite(norm)):
                            diverged(f"the gradient norm is {norm.item()} (loss {loss_sum:.4g})", step + 1)
                    scaler.step(optimizer)
                    scaler.update()
                    optimizer.zero_grad(set_to_none=True)
                    step += 1
                    batch_pos += accum
                    tokens_seen += step_tokens
                    progress.add(step_tokens, time.perf_counter() - t0)
                    progress.update(step, loss_sum, lr)
                    run.started()
                    epoch_done = batch_pos + accum > per_epoch
                    if epoch_done:
                        epoch, batch_pos = epoch + 1, 0
                        if on_epoch_end is not None:
                            on_epoch_end(model, epoch)
                            progress.resume_clock()
                    if step == 1 or step % cfg["eval_freq"] == 0 or step == total_steps:
                        log_eval()
                    if any_process(stop.signal is not None):  # all processes stop at the same step
                        save_state()
                        progress.close()
                        name = "SIGTERM" if stop.signal == getattr(signal, "SIGTERM", None) else "Ctrl-C"
                        if is_main_process():
                            print(f"{name} at step {step}: saved {state_path}; continue with --resume",
                                  file=sys.stderr)
                        sys.exit(130 if stop.signal == signal.SIGINT else 143)
                    if cfg.get("save_every") and step % cfg["save_every"] == 0 and step < total_steps:
                        save_state()
                    if epoch_done:
                        break
        progress.close()
        save_state()
    finally:
        progress.close()
        write_outputs()  # whatever stopped the run, its log and plots are up to date
    return rows


def read_train_state(path, world, fsdp):
    """The resumable state in path, checked to fit this run's process layout."""
    if not os.path.exists(path):
        raise UserError(f"--resume: no {path} to continue from: run without --resume to start (with --overwrite "
                        f"where the folder holds the files of a run that stopped before it saved one)")
    ckpt = read_checkpoint(path)
    missing = [k for k in ("optimizer", "step", "epoch", "batch_pos", "tokens_seen", "rng") if k not in ckpt]
    if missing:
        raise UserError(f"{path} holds no {missing[0]}, so it cannot be resumed: run without --resume (with "
                        f"--overwrite) to start over")
    saved_world, saved_fsdp = ckpt.get("world_size", 1), bool(ckpt.get("fsdp", False))
    if (saved_world, saved_fsdp) != (world, fsdp):
        raise UserError(f"{path} was written by {_processes(saved_world, saved_fsdp)}, this run has "
                        f"{_processes(world, fsdp)}: resume the same way (data order and steps depend on it)")
    return ckpt


def _local(p):
    return p.to_local() if hasattr(p, "to_local") else p


def batch_tokens(batch):
    """Tokens in a batch: its n_tokens entry where the loss filled one in (online RL), else the first tensor's
    element count."""
    if isinstance(batch, dict) and "n_tokens" in batch:
        return batch["n_tokens"]
    first = batch[0] if isinstance(batch, (list, tuple)) else next(iter(batch.values()))
    return first.numel() if torch.is_tensor(first) else 0


# ---------------------------------------------------------------------------------------------------------------
# Memory estimate (--dry_run in every training script)
# ---------------------------------------------------------------------------------------------------------------

def estimate_memory(model_cfg, batch_size, context_length, dtype=torch.float32, trainable_params=None,
                    total_params=None, trainable_layers=None, out_dim=None, world_size=1, fsdp=False,
                    device_type="cpu"):
    """Estimated bytes that one training process holds, as a dict: weights, gradients, optimizer, activations, total.

    weights: fp32 parameters, plus the 16-bit copies of the matmul weights autocast keeps for backward.
    gradients: fp32, one per trainable parameter. optimizer: AdamW's two fp32 moments per trainable parameter.
    activations: what backward keeps for one micro-batch, counted with saved_tensors_hooks on torch 2.13: per
    transformer block 16 values per token and channel (the two residual-stream ones stay fp32 under autocast, the
    other 14 are 16-bit), 1 byte per dropout mask, and where dropout sends CPU attention down the unfused path about
    13 bytes per attention score (B, n_heads, T, T); plus three fp32 copies of the logits (B, T, out_dim) around the
    loss. trainable_layers: blocks (counted from the top) that need backward, None = all. With fsdp the first three
    are split over world_size processes, plus the gathered weights of the non-block layers and of two blocks.
    The total is a slight overestimate (gradients and activations do not peak together); Python, torch and the CUDA
    context come on top (about 0.35 GB on CPU, 0.5-1 GB on a GPU).
    """
    if total_params is None:
        with torch.device("meta"):
            total_params = count_parameters(GPTModel(model_cfg))  # no memory, no init
    trainable = total_params if trainable_params is None else trainable_params
    d, L, h = model_cfg["emb_dim"], model_cfg["n_layers"], model_cfg["n_heads"]
    out_dim = out_dim or model_cfg["vocab_size"]
    B, T = batch_size, context_length
    half = dtype in (torch.bfloat16, torch.float16)
    act = 2 if half else 4
    block_params = 12 * d * d + 13 * d  # attention 4 d^2, MLP 8 d^2, biases and norms
    matmul_params = L * 12 * d * d + out_dim * d

    weights, gradients, optimizer = 4 * total_params, 4 * trainable, 8 * trainable
    if fsdp and world_size > 1:
        gathered = total_params - (L - 2) * block_params  # non-block layers stay whole; two blocks in flight
        weights = weights // world_size + 4 * gathered
        gradients //= world_size
        optimizer //= world_size
    weights += 2 * matmul_params if half else 0
    per_block = B * T * d * (2 * 4 + 14 * act)
    if model_cfg.get("drop_rate", 0) > 0:
        per_block += 2 * B * T * d
        if device_type == "cpu":
            per_block += 13 * B * h * T * T
    blocks = L if trainable_layers is None else min(L, trainable_layers)
    activations = blocks * per_block + 3 * 4 * B * T * out_dim
    return {"weights": weights, "gradients": gradients, "optimizer": optimizer, "activations": activations,
            "total": weights + gradients + optimizer + activations}


def _size(n):
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def print_dry_run(model_cfg, cfg, train_batches, dtype, device=None, total_params=None, trainable_params=None,
                  context_length=None, write=print, **estimate_kw):
    """What --dry_run prints: parameters, estimated memory per process, tokens per step and steps per epoch.

    cfg supplies batch_size, grad_accum_steps, epochs, max_steps and fsdp; train_batches is len(train_loader) in one
    process; context_length defaults to cfg['context_length']; estimate_kw goes to estimate_memory (trainable_layers,
    out_dim). Trains nothing and writes nothing; returns the numbers as a dict.
    """
    device = device or torch.device("cpu")
    if total_params is None:
        with torch.device("meta"):
            total_params = count_parameters(GPTModel(model_cfg))
    trainable = total_params if trainable_params is None else trainable_params
    T = context_length or cfg.get("context_length") or model_cfg["context_length"]
    world, accum = world_size(), cfg.get("grad_accum_steps", 1)
    est = estimate_memory(model_cfg, cfg["batch_size"], T, dtype, trainable, total_params, world_size=world,
                          fsdp=cfg.get("fsdp", False), device_type=device.type, **estimate_kw)
    steps_per_epoch = train_batches // world // accum
    total_steps = cfg.get("epochs", 1) * steps_per_epoch
    if cfg.get("max_steps"):
        total_steps = min(total_steps, cfg["max_steps"])
    tokens_per_step = cfg["batch_size"] * T * accum * world
    dtype_name = str(dtype).replace("torch.", "")
    write(f"dry run: {total_params:,} parameters ({trainable:,} trainable), {_shape(model_cfg)}, device "
          f"{device}, dtype {dtype_name}, {world} process{'es' if world > 1 else ''}"
          f"{' with FSDP' if cfg.get('fsdp') and world > 1 else ''}")
    write(f"estimated memory per process: weights {_size(est['weights'])}, gradients {_size(est['gradients'])}, "
          f"AdamW state {_size(est['optimizer'])}, activations {_size(est['activations'])} (micro-batch "
          f"{cfg['batch_size']} x {T} tokens); total {_size(est['total'])} plus the framework's own")
    write(f"tokens per step {tokens_per_step:,} ({cfg['batch_size']} x {T} x {accum} micro-batches x {world} "
          f"process{'es' if world > 1 else ''}), {steps_per_epoch} steps per epoch, {total_steps} steps in all; "
          f"nothing trained or written (--dry_run)")
    return {**est, "total_params": total_params, "trainable_params": trainable, "tokens_per_step": tokens_per_step,
            "steps_per_epoch": steps_per_epoch, "total_steps": total_steps}


def _shape(model_cfg):
    return f"{model_cfg['n_layers']} layers x {model_cfg['emb_dim']} wide, {model_cfg['n_heads']} heads"



# ---------------------------------------------------------------------------------------------------------------
# Building the model a run starts from
# ---------------------------------------------------------------------------------------------------------------

def model_config(cfg, **sizes):
    """A scratch model's config from the settings (sizes override them): --model's architecture with the run's
    context_length and drop_rate, qkv_bias / tie_weights where the script has them, and any non-zero emb_dim,
    n_heads, n_layers."""
    cfg = {**cfg, **sizes}
    mcfg = dict(MODEL_CONFIGS[cfg["model"]], context_length=cfg["context_length"], drop_rate=cfg["drop_rate"],
                qkv_bias=cfg.get("qkv_bias", False), tie_weights=cfg.get("tie_weights", False))
    for k in ("emb_dim", "n_heads", "n_layers"):
        if cfg[k]:
            mcfg[k] = cfg[k]
    if mcfg["emb_dim"] % mcfg["n_heads"]:
        fits = next(h for h in range(mcfg["n_heads"], 0, -1) if mcfg["emb_dim"] % h == 0)
        raise UserError(f"--emb_dim {mcfg['emb_dim']} is not divisible by --n_heads {mcfg['n_heads']}: every head "
                        f"gets emb_dim / n_heads dimensions, so pick e.g. --n_heads {fits} or an --emb_dim that "
                        f"{mcfg['n_heads']} divides")
    return mcfg


def build_model(cfg, device="cpu", **sizes):
    """(model, info) for --init: a fresh model sized by the settings and `sizes` (scratch), or the weights --init
    names (load_gpt2.init_model: OpenAI's, a .pth, a safetensors folder) with the run's drop_rate."""
    overrides = model_config(cfg, **sizes) if cfg["init"] == "scratch" else {"drop_rate": cfg["drop_rate"]}
    with local_main_first():  # under torchrun one process per machine downloads, the others then find the files
        return init_model(cfg["init"], cfg_overrides=overrides, device=device)
