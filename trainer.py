"""Small helpers the training scripts call from their own loops (no user runs this file). Each is one idea and
takes no callback: losses and evaluation, the optimizer, the run folder (one run at a time, settings.json), the
step log (log.csv), progress, stopping on a signal, the resumable state (save, check, load), the divergence guard,
batches from any position, several processes (DDP or FSDP2 under torchrun), the --dry_run estimate, and the model
a run starts from.

    with RunFolder(cfg, outputs, command, run_settings=RUN_SETTINGS) as run, catch_signals() as stop:
        log = StepLog(run.path("log.csv"))
        for step in range(total_steps):
            ...                                           # the script's own step: lr, forward, loss, backward
            log.append({"step": step + 1, "loss": loss})
            if stop:
                save_train_state(run.path(TRAIN_STATE), model, optimizer, device, position)
                stop.leave("saved: continue with --resume")
"""
import atexit
import contextlib
import csv
import datetime
import fcntl
import io
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

from checkpoints import init_model
from files import (append_text, atomic_write, check_input, check_parent, open_lock, remove_stale_tmp, save_pth,
                   write_json)
from model import (MODEL_CONFIGS, CheckpointError, GPTModel, checkpoint_dict, clean_state_dict, count_parameters,
                   load_state, read_checkpoint)
from settings import UserError, autocast, few, keep_freed_memory, note, pyplot

TRAIN_STATE = "model_and_optimizer.pth"  # everything --resume needs
BEST = "best.pth"                        # the model at its lowest validation loss (--save_best)
RUN_FILES = (TRAIN_STATE, BEST, "log.csv", "loss-plot.png", "settings.json")

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
    batches = progress_bar(data_loader, n, "evaluating", progress and n > 1)
    for i, (x, y) in enumerate(batches):
        if i >= n or STOP:  # a stop request ends the evaluation at once; the caller sees STOP and leaves
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


def make_optimizer(model, lr, weight_decay, device, decay="all"):
    """AdamW over the trainable parameters; fused kernels where the device has them (much faster on CPU too).
    decay="all" applies weight_decay to every parameter (the book's AdamW); "matrices" only to the weight matrices
    and embeddings (2-D and up), not to biases or LayerNorm scales and shifts, which decay would pull toward 0
    for no gain in generalization (nanoGPT's grouping)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if decay == "matrices":
        params = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    elif decay != "all":
        raise ValueError(f"decay must be 'all' or 'matrices', got {decay!r}")
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

    outputs: the paths of the files the script writes besides RUN_FILES in out_dir. run_settings: the settings that
    define the run (model shape, data, batch, seed...): --resume with another value of one is refused, as it would
    continue one run as another. inputs: the settings that name files the run reads, which it never writes over.
    """

    def __init__(self, cfg, outputs=(), command="", run_settings=(), inputs=()):
        self.cfg, self.out_dir, self.command = cfg, cfg["out_dir"], command
        self.run_settings, self.inputs = run_settings, inputs
        self.outputs = [os.path.join(self.out_dir, name) for name in RUN_FILES] + list(outputs)
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
        inputs = {k: v for k in self.inputs if isinstance(v := self.cfg.get(k), str) and os.path.isfile(v)}
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
        changed = [f"--{k} {began[k]} (now {self.cfg[k]})" for k in self.run_settings
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


def progress_bar(items, total, desc, show=True, announce=False):
    """items, with a bar on stderr while they are worked through when show and stderr is a terminal; with announce,
    where stderr is a file or a pipe, one line that says what runs (for phases of more than a few seconds)."""
    shown = show and is_main_process()
    if shown and announce and not sys.stderr.isatty():
        print(f"{desc}: {total} to go", file=sys.stderr, flush=True)
    return tqdm(items, total=total, desc=desc, unit="batch", leave=False, disable=not (shown and sys.stderr.isatty()))


# ---------------------------------------------------------------------------------------------------------------
# The step log: log.csv, one row per optimizer step, appended as the run goes
# ---------------------------------------------------------------------------------------------------------------

class StepLog:
    """log.csv: one row per optimizer step, with whatever keys the loop puts in it (a new key becomes a column),
    appended as the run goes. With resume_step it continues an earlier run: the rows up to that step are kept and
    the ones a killed run logged after its last checkpoint are dropped, so the log has no gaps and no duplicates.
    Rows also go to --logger (logger). Only the main process writes; nothing is written before the first append.

        log = StepLog(run.path("log.csv"), resume_step=state["step"] if resuming else None)
        log.append({"step": step, "loss": loss, "my_value": x})
    """

    def __init__(self, path, resume_step=None, logger=None):
        self.path, self.logger = path, logger
        self.rows = []
        if resume_step is not None:
            by_step = {r["step"]: r for r in read_log(path) if r["step"] <= resume_step}  # one row per step
            self.rows = [by_step[s] for s in sorted(by_step)]
            if not self.rows and resume_step > 0 and os.path.isfile(path) and is_main_process():
                kept = f"{path}.unreadable"
                os.replace(path, kept)
                note(f"{path} holds no rows this project can read (edited?): kept as {kept}; the log starts anew")
        self.columns = _columns(self.rows)
        self._rewrite = resume_step is not None  # the file on disk may hold rows past the step: write it anew

    def append(self, row):
        self.rows.append(row)
        new = [k for k in row if k not in self.columns]
        self.columns += new
        if self.logger is not None:
            self.logger.log(row)
        if not is_main_process():
            return
        if new or self._rewrite or not os.path.isfile(self.path):
            write_log(self.path, self.rows, self.columns)
            self._rewrite = False
            return
        line = io.StringIO()
        csv.DictWriter(line, fieldnames=self.columns).writerow(row)
        append_text(self.path, line.getvalue())

    def last(self, key):
        """The latest logged value of key (None when no row has it)."""
        return next((r[key] for r in reversed(self.rows) if key in r), None)


def _columns(rows):
    cols = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    return cols


def _number(text):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def read_log(path):
    """The rows of a log.csv as dicts of numbers (empty cells left out); rows cut short by a kill are skipped, and
    a missing or unreadable file gives no rows."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            lines = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error):
        return []
    if not lines or "step" not in lines[0]:
        return []
    header, rows = lines[0], []
    for cells in lines[1:]:
        row = {k: _number(v) for k, v in zip(header, cells) if v != ""}
        if len(cells) == len(header) and isinstance(row.get("step"), int):
            rows.append(row)
    return rows


def write_log(path, rows, columns=None):
    """Write every logged row as CSV (columns: union of the rows' keys, in first-seen order)."""
    if not rows:
        return None

    def write(f):
        w = csv.DictWriter(f, fieldnames=columns or _columns(rows))
        w.writeheader()
        w.writerows(rows)
    return atomic_write(path, write, "w")


# ---------------------------------------------------------------------------------------------------------------
# Stopping on a signal: Ctrl-C, SIGTERM (a cluster preempting the job) and SIGHUP (a closed terminal)
# ---------------------------------------------------------------------------------------------------------------

class _Stop:
    """The signal that asked the run to stop, or None. Inside `with catch_signals():` Ctrl-C, SIGTERM and SIGHUP
    only set it; the loop and every long phase (evaluation, sampling, rollouts) check it, so the run stops within a
    step or a batch and saves first. A second signal while saving changes nothing: the save finishes."""

    NAMES = {signal.SIGINT: ("Ctrl-C", 130), signal.SIGTERM: ("SIGTERM", 143),
             getattr(signal, "SIGHUP", None): ("SIGHUP", 129)}

    def __init__(self):
        self.signal, self._old = None, {}

    def __bool__(self):
        return self.signal is not None

    def __enter__(self):
        self.signal = None
        for sig in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)):
            try:
                if sig is not None:
                    self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        if self.signal is None:
            self.signal = signum

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old = {}

    def leave(self, message):
        """Exit as the signal asks (130 for Ctrl-C, 143 SIGTERM, 129 SIGHUP) after one line on stderr."""
        name, code = self.NAMES.get(self.signal, ("a signal", 1))
        if is_main_process():
            print(f"{name} {message}", file=sys.stderr)
        sys.exit(code)


STOP = _Stop()


def catch_signals():
    """`with catch_signals() as stop:` the body checks `if stop:` (any_process(bool(stop)) under torchrun)."""
    return STOP


# ---------------------------------------------------------------------------------------------------------------
# The resumable state: model, optimizer, position in the data, random state
# ---------------------------------------------------------------------------------------------------------------

POSITION = ("step", "epoch", "batch_pos", "tokens_seen")  # where a run is: optimizer steps, epoch, batch in it, tokens


def count_steps(batches, accum, epochs, max_steps):
    """(steps per epoch, total steps): --max_steps when given (as many epochs as that takes), else --epochs."""
    per_epoch = batches // accum
    if per_epoch == 0:
        raise UserError(f"the training data gives {batches} batches, fewer than one optimizer step ({accum} "
                        f"micro-batches): add data or lower --batch_size / --grad_accum_steps")
    return per_epoch, max_steps or epochs * per_epoch


def finished(step, total_steps, out_dir):
    """True (and says so) when a resumed run has no step left to train."""
    if step < total_steps:
        return False
    tqdm.write(f"{out_dir}: the run already finished at step {step} (of {total_steps}): nothing to do; raise --epochs "
               f"or --max_steps to train further")
    return True


def save_train_state(path, model, optimizer, device, position, kind="pretrain", settings=None, process_state=None,
                     **extra):
    """Write everything --resume needs to path, atomically: the weights and optimizer state (gathered whole under
    FSDP), the position (a dict of POSITION and batches_per_epoch), the random state of every process, the
    settings and, per process, process_state (what a loop carries between steps, e.g. online RL's rollouts).
    `extra` goes in as it is (kind-specific keys such as a chat model's template). Every process calls it."""
    world, fsdp = world_size(), is_fsdp(model)
    if fsdp:
        model_state, optimizer_state = _fsdp_train_state(model, optimizer)
    else:
        model_state, optimizer_state = model.state_dict(), optimizer.state_dict()
    per_process = {"world_size": world, "fsdp": fsdp, "rng_per_process": _gathered(rng_state(device))} \
        if world > 1 else {}
    if process_state is not None:
        per_process["process_state"] = _gathered(process_state) if world > 1 else process_state
    if is_main_process():
        save_pth(path, {"model": model_state, "config": dict(model.cfg), "kind": kind,
                        "optimizer": optimizer_state, **position, "rng": rng_state(device),
                        "train_settings": {k: v for k, v in (settings or {}).items()
                                           if isinstance(v, (int, float, str, bool))}, **per_process, **extra})
    if world > 1:
        dist.barrier()  # the file is there for every process (e.g. a --resume right after) once this returns
    return path


def load_train_state(path, model, optimizer, device, batches_per_epoch, fsdp=False):
    """Load the state in path into model, optimizer and the random generators, after checking every value it
    holds; returns {step, epoch, batch_pos, tokens_seen, process_state}. batches_per_epoch: this run's, which the
    saved position must fit (the data changed when it does not)."""
    ckpt = read_train_state(path, world_size(), fsdp)
    position = check_position(ckpt, path, batches_per_epoch)
    rank = process_rank()
    if fsdp:
        _load_fsdp_train_state(model, optimizer, ckpt)
    else:
        load_state(model, ckpt["model"], path)
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError, RuntimeError, TypeError) as e:
            raise UserError(f"{path}: its optimizer state does not fit this run's trainable parameters "
                            f"({str(e).splitlines()[0]}): resume with the settings the run began with, or "
                            f"--overwrite to start over") from None
    try:
        set_rng_state(ckpt["rng_per_process"][rank] if world_size() > 1 else ckpt["rng"], device)
    except (KeyError, IndexError, TypeError, RuntimeError) as e:
        raise UserError(f"{path}: its random state is damaged ({str(e).splitlines()[0]}): --overwrite to start "
                        f"over") from None
    state = ckpt.get("process_state", ckpt.get("loss_state"))  # loss_state: the name in older checkpoints
    position["process_state"] = state[rank] if world_size() > 1 and state is not None else state
    tqdm.write(f"resumed from {path} at step {position['step']} (epoch {position['epoch'] + 1}, batch "
               f"{position['batch_pos']})")
    return position


def start_position(path, model, optimizer, device, batches_per_epoch, resume, seed, fsdp=False):
    """Where a run starts: with resume, the state saved in path, loaded into model, optimizer and the random
    generators (load_train_state); else step 0 of epoch 0, where under torchrun each process reseeds its random
    stream after the shared initial weights, so that it draws dropout masks of its own."""
    if resume:
        return load_train_state(path, model, optimizer, device, batches_per_epoch, fsdp)
    if world_size() > 1:
        torch.manual_seed(seed + 1 + process_rank())
    return {"step": 0, "epoch": 0, "batch_pos": 0, "tokens_seen": 0, "process_state": None}


def check_position(ckpt, path, batches_per_epoch):
    """The saved position, each value checked for type and range before it is used."""
    position = {}
    for key in POSITION:
        value = ckpt[key]
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**62:
            raise UserError(f"{path}: its {key} is {value!r}, not a whole number >= 0: the file was edited or "
                            f"damaged; --overwrite to start over")
        position[key] = value
    saved = ckpt.get("batches_per_epoch")
    if saved is not None and (isinstance(saved, bool) or not isinstance(saved, int) or saved < 1):
        raise UserError(f"{path}: its batches_per_epoch is {saved!r}, not a whole number >= 1: the file was edited "
                        f"or damaged; --overwrite to start over")
    if isinstance(saved, int) and position["batch_pos"] > saved:
        raise UserError(f"{path}: its batch_pos is {position['batch_pos']}, past the end of an epoch of {saved} "
                        f"batches: the file was edited or damaged; --overwrite to start over")
    if saved is not None and saved != batches_per_epoch or position["batch_pos"] > batches_per_epoch:
        was = f"{saved} batches an epoch" if saved is not None else f"batch {position['batch_pos']} of an epoch"
        raise UserError(f"{path} was saved at {was}, and the training data now gives {batches_per_epoch}: the data "
                        f"or the batch settings changed since; resume on the same data, or --overwrite to start over")
    return position


def read_train_state(path, world, fsdp):
    """The resumable state in path, checked to fit this run's process layout."""
    if not os.path.exists(path):
        raise UserError(f"--resume: no {path} to continue from: run without --resume to start (with --overwrite "
                        f"where the folder holds the files of a run that stopped before it saved one)")
    check_input(path, "the resumable state")
    try:
        ckpt = read_checkpoint(path)
    except CheckpointError as e:
        raise UserError(f"{e}; it cannot be resumed: --overwrite to start over") from None
    missing = [k for k in ("optimizer", "step", "epoch", "batch_pos", "tokens_seen", "rng") if k not in ckpt]
    if missing:
        raise UserError(f"{path} holds no {missing[0]}, so it cannot be resumed: run without --resume (with "
                        f"--overwrite) to start over")
    saved_world, saved_fsdp = ckpt.get("world_size", 1), bool(ckpt.get("fsdp", False))
    if (saved_world, saved_fsdp) != (world, fsdp):
        raise UserError(f"{path} was written by {_processes(saved_world, saved_fsdp)}, this run has "
                        f"{_processes(world, fsdp)}: resume the same way (data order and steps depend on it)")
    return ckpt


# ---------------------------------------------------------------------------------------------------------------
# The divergence guard: a loss, gradient or weight that is not finite stops the run before it is saved
# ---------------------------------------------------------------------------------------------------------------

class DivergenceGuard:
    """Stops a run whose loss, gradient norm or weights stop being finite, with one line that says what happened
    and which checkpoint --resume can continue from. A checkpoint counts as good once a step computed from it had
    a finite loss: one saved just before the loss became nan (say at an absurd learning rate, where the weights
    are still finite but the next step is not) is named as such, not as a place to continue from.
    Under torchrun every process calls each check at the same point, so a nan in one process stops all."""

    def __init__(self, state_path, lr, weight_decay=0.0, saved_step=None):
        self.state_path, self.lr, self.weight_decay = state_path, lr, weight_decay
        self.saved_step, self.verified = saved_step, saved_step is not None

    def loss(self, loss, step):
        bad = not bool(torch.isfinite(loss))
        if any_process(bad):
            self.fail(f"the loss is {loss.item()}" if bad else "the loss is not finite in another process", step)

    def grad_norm(self, norm, loss, step, scaler=None):
        """A gradient norm that is not finite stops the run, except under float16's scaler, which skips that step
        and lowers its scale by itself."""
        if scaler is not None and scaler.is_enabled():
            return
        if any_process(not math.isfinite(norm)):
            self.fail(f"the gradient norm is {norm} (loss {loss:.4g})", step)

    def weights(self, model, step):
        bad = [name for name, p in model.named_parameters() if not bool(torch.isfinite(_local(p)).all())]
        if any_process(bool(bad)):
            self.fail(f"weights are not finite ({', '.join(bad[:3]) or 'in another process'})", step)

    def step_done(self, step):
        """Step `step` had a finite loss: the checkpoint saved just before it is one training continues from."""
        if self.saved_step is not None and step > self.saved_step:
            self.verified = True

    def saved(self, step):
        self.saved_step, self.verified = step, False

    def fail(self, what, step):
        if self.saved_step is None:
            kept = "nothing was saved"
        elif self.verified:
            kept = f"the last good checkpoint is {self.state_path} (step {self.saved_step}): --resume continues from it"
        else:
            kept = (f"{self.state_path} (step {self.saved_step}) was saved just before and diverges the same way: "
                    f"start over with --overwrite")
        decay = f" or the weight decay ({self.weight_decay:g})" if self.weight_decay >= 1 else ""
        raise UserError(f"training diverged at step {step}: {what}; the learning rate ({self.lr:g}){decay} is likely "
                        f"too high for this model and data: lower it or set --grad_clip 1.0; {kept}")


def clip_gradients(model, optimizer, scaler, max_norm):
    """Unscale the gradients (float16), clip their global norm to max_norm (0 = no clipping) and return the norm
    before clipping as a float. Every process calls it."""
    scaler.unscale_(optimizer)
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if max_norm:  # without clipping the gradients are left as they are (no pass that multiplies them by 1)
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP: the norm over every shard
    return float(norm)


def is_best(rows):
    """True when the last of the logged rows has a val_loss below every earlier one."""
    losses = [r["val_loss"] for r in rows if "val_loss" in r]
    return bool(losses) and "val_loss" in rows[-1] and min(losses[:-1], default=math.inf) > losses[-1]


def save_best(path, model, kind, rows, **extra):
    """--save_best: when the last of the logged rows has the lowest val_loss so far (is_best), write the model to
    path with its step and val_loss (and extra); returns whether it did. Every process calls it (FSDP gathers the
    shards); rank 0 writes."""
    if not is_best(rows):
        return False
    save_model(path, model, kind, step=rows[-1]["step"], val_loss=rows[-1]["val_loss"], **extra)
    return True


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


def wrap_model(model, device, dtype=torch.float32, fsdp=False, compile=False):
    """(model, step_model) for a training loop: model sharded in place with FSDP2 (call it before building the
    optimizer, which must hold the shards) and torch.compile'd with compile; step_model is what the training steps
    call, wrapped in DDP when several processes train without FSDP (it averages the gradients in backward).
    Evaluate and generate with model; it is left in training mode. On the CPU, freed memory is kept for the next
    step (settings.keep_freed_memory)."""
    if torchrun_env("WORLD_SIZE") > 1 and not _distributed():
        raise RuntimeError("started by torchrun, but the script did not call setup_distributed() before training")
    if fsdp and world_size() == 1:
        raise UserError("--fsdp shards the model across processes: start with `torchrun --nproc_per_node N` (N >= 2), "
                        "or drop --fsdp")
    if fsdp and dtype is torch.float16:
        raise UserError("--fsdp with float16 is not supported (no sharded gradient scaler): use --dtype bfloat16")
    if device.type == "cpu":
        keep_freed_memory()  # every step re-allocates the same big buffers: reuse them instead of page-faulting anew
    if fsdp:
        shard_model(model, device)
    model.train()
    fwd_model = torch.compile(model) if compile else model
    if world_size() > 1 and not fsdp:
        gpu = [torch.cuda.current_device()] if device.type == "cuda" else None  # set by setup_distributed
        return fwd_model, DistributedDataParallel(fwd_model, device_ids=gpu, gradient_as_bucket_view=True)
    return fwd_model, fwd_model


def grad_sync(step_model, last):
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
        raise UserError("the training loader has its own sampler: give loader_batches a DataLoader with batch_size and "
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


def _local(p):
    return p.to_local() if hasattr(p, "to_local") else p


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
                  context_length=None, write=print, time_steps=0, **estimate_kw):
    """What --dry_run prints: parameters, estimated memory per process, tokens per step and steps per epoch, and with
    time_steps > 0 the run's estimated time from that many timed steps here (estimate_time).

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
    plan = {**est, "total_params": total_params, "trainable_params": trainable, "tokens_per_step": tokens_per_step,
            "steps_per_epoch": steps_per_epoch, "total_steps": total_steps}
    if time_steps:
        plan.update(estimate_time(model_cfg, cfg, T, total_steps, dtype, device, time_steps))
        write(f"estimated time: {_duration(plan['seconds'])} ({plan['step_s']:.3g} s per micro-batch step, timed "
              f"over {time_steps} steps of a throwaway copy of the model here, and {plan['evals']} evaluations)")
    return plan


def estimate_time(model_cfg, cfg, context_length, total_steps, dtype, device, steps=3):
    """Seconds a run of total_steps would take here, from `steps` timed training steps (forward, backward, AdamW) of
    a freshly built model on random tokens, after one untimed step, plus the forward passes of its evaluations
    (2 x eval_iters batches every eval_freq steps). The global random state is left as it was."""
    B, T, accum = cfg["batch_size"], context_length, cfg.get("grad_accum_steps", 1)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        model = GPTModel({**model_cfg, "context_length": max(T, model_cfg["context_length"])}).to(device)
        optimizer = make_optimizer(model, 1e-4, 0.0, device)
        x = torch.randint(0, model_cfg["vocab_size"], (B, T + 1), device=device)
        if device.type == "cpu":
            keep_freed_memory()  # as the training loop does
        times = []
        for _ in range(steps + 1):  # the first step warms allocators and kernels up
            sync()
            start = time.perf_counter()
            with autocast(device, dtype):
                loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1).float(), x[:, 1:].flatten())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sync()
            times.append(time.perf_counter() - start)
        model.eval()
        with torch.no_grad(), autocast(device, dtype):
            start = time.perf_counter()
            model(x[:, :-1])
            sync()
            forward_s = time.perf_counter() - start
    step_s = sorted(times[1:])[len(times[1:]) // 2]  # the median: robust to one step slowed by a neighbour
    evals = total_steps // max(1, cfg.get("eval_freq", total_steps or 1)) + 1
    seconds = total_steps * accum * step_s + evals * 2 * cfg.get("eval_iters", 1) * forward_s
    return {"seconds": seconds, "step_s": step_s, "evals": evals}


def _duration(seconds):
    return (f"{seconds / 3600:.1f} h" if seconds >= 5400 else f"{seconds / 60:.0f} min" if seconds >= 90 else
            f"{seconds:.0f} s")


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
    names (checkpoints.init_model: OpenAI's, a .pth, a safetensors folder) with the run's drop_rate."""
    overrides = model_config(cfg, **sizes) if cfg["init"] == "scratch" else {"drop_rate": cfg["drop_rate"]}
    with local_main_first():  # under torchrun one process per machine downloads, the others then find the files
        return init_model(cfg["init"], cfg_overrides=overrides, device=device)
