"""What every script shares around its main(): settings from the command line, one-line errors, device and dtype.

    from settings import entry, get_config, training_settings
    DEFAULTS = dict(data="the-verdict.txt",   # comment shown by --help
                    **training_settings(lr=4e-4))
    def main(argv=None):
        cfg = get_config(DEFAULTS, argv, __doc__)

A script's settings are one dict; `get_config` turns it into argparse flags, with each setting's comment (written
beside it in the script, or beside the shared training settings below) as its --help text.
"""
import argparse
import ctypes
import json
import math
import os
import re
import signal
import sys

import torch

from model import CheckpointError


# ---------------------------------------------------------------------------------------------------------------
# Errors the user can fix: one line on stderr, a non-zero exit, no traceback
# ---------------------------------------------------------------------------------------------------------------

class UserError(Exception):
    """Bad input, with a message that says what is wrong and what to do."""


class Terminated(BaseException):
    """SIGTERM, raised like Ctrl-C's KeyboardInterrupt so that cleanup code runs before the process leaves."""


def _raise_terminated(signum, frame):
    raise Terminated(signum)


class _SafeStream:
    """A stdout or stderr that nobody may read (`| head`, a full disk, a closed terminal): a write that fails is
    dropped, and so is every one after it, instead of ending the run; its file descriptor then points to
    /dev/null, so that the interpreter's last flush fails no more."""

    def __init__(self, stream):
        self._stream, self.broken = stream, False

    def write(self, text):
        if not self.broken:
            try:
                return self._stream.write(text)
            except (OSError, ValueError):
                self._drop()
        return len(text)

    def flush(self):
        if not self.broken:
            try:
                self._stream.flush()
            except (OSError, ValueError):
                self._drop()

    def _drop(self):
        self.broken = True
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), self._stream.fileno())
        except (OSError, ValueError, AttributeError):
            pass

    def __getattr__(self, name):
        return getattr(self._stream, name)


def entry(main):
    """Run main() as a command: a user error is one `error:` line and exit 1, Ctrl-C exits 130, SIGTERM 143 and
    SIGHUP (a closed terminal) 129. Output that cannot be written (a closed pipe, a full disk) never ends a run."""
    for sig in ("SIGTERM", "SIGHUP"):
        try:
            signal.signal(getattr(signal, sig), _raise_terminated)
        except (ValueError, AttributeError):  # not the main thread, or no such signal on this OS
            pass
    streams = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = (s if s is None or isinstance(s, _SafeStream) else _SafeStream(s) for s in streams)
    try:
        return main()
    except (UserError, CheckpointError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Terminated as e:
        print("terminated", file=sys.stderr)
        sys.exit(129 if e.args and e.args[0] == getattr(signal, "SIGHUP", None) else 143)
    finally:
        for s in (sys.stdout, sys.stderr):
            if s is not None:
                s.flush()
        sys.stdout, sys.stderr = streams


def note(message):
    print(f"note: {message}", file=sys.stderr)


_told = set()


def pyplot(what):
    """matplotlib.pyplot (headless), or None with a note, once per process, that `what` is skipped without it."""
    try:  # optional dependency
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        if what not in _told:
            _told.add(what)
            note(f"matplotlib is not installed, so no {what}: `pip install matplotlib` to get it")
        return None


def few(names, n=4):
    """'a, b, c, d (+3 more)': the first n of names for a message; 'nothing' when there are none."""
    names = [str(x) for x in names]
    if not names:
        return "nothing"
    return ", ".join(names[:n]) + (f" (+{len(names) - n} more)" if len(names) > n else "")


# ---------------------------------------------------------------------------------------------------------------
# Settings: a DEFAULTS dict -> argparse
# ---------------------------------------------------------------------------------------------------------------

# The settings every training script has; each script takes them through training_settings() with its own values.
TRAINING = dict(
    batch_size=8,              # examples per micro-batch (per process under torchrun)
    grad_accum_steps=1,        # micro-batches summed per optimizer step
    epochs=1,                  # passes over the training data
    max_steps=0,               # train exactly this many optimizer steps, over as many epochs as needed; 0 = --epochs
    lr=5e-5,                   # peak learning rate
    weight_decay=0.1,          # AdamW decoupled weight decay
    lr_schedule="constant",    # constant | cosine (cosine decays to min_lr after warmup)
    warmup_steps=0,            # linear warmup from 0 to lr; 0 = off
    min_lr=0.0,                # floor of the cosine schedule
    grad_clip=0.0,             # clip the global gradient norm to this; 0 = off
    eval_freq=5,               # evaluate every this many steps
    eval_iters=5,              # batches of each split per evaluation
    save_every=0,              # also checkpoint every this many steps; 0 = only at the end and on Ctrl-C/SIGTERM
    seed=123,                  # seeds weights, dropout and data order
    device="auto",             # auto | cpu | cuda | mps
    dtype="auto",              # auto | float32 | bfloat16 | float16 (auto: bf16 where the hardware has it, else fp32)
    compile=False,             # torch.compile the model (slow start, faster steps on GPUs)
    resume=False,              # continue the run in OUT_DIR from its model_and_optimizer.pth
    overwrite=False,           # start over in an OUT_DIR that holds an earlier run (its files go at the first step)
    save_best=False,           # also keep OUT_DIR/best.pth: the model at its lowest validation loss
    full_eval=False,           # after training, evaluate once more on the whole validation split
    quiet=False,               # print only the evaluations and the summary: no progress bar or lines
    logger="none",             # none | tensorboard | wandb: also log every evaluation there (needs that package)
    fsdp=False,                # under torchrun: shard weights, gradients and optimizer state (FSDP2); off = DDP
    dry_run=False,             # print parameters, estimated memory, tokens per step, steps per epoch (and in
                               # pretrain.py the estimated time, from a few timed steps), then exit
)


def training_settings(**values):
    """TRAINING with this script's values (same keys, same order)."""
    unknown = set(values) - set(TRAINING)
    if unknown:
        raise KeyError(f"not shared training settings: {sorted(unknown)}")
    return {**TRAINING, **values}


_OFF = {"none", "off", "null"}


def _parse_bool(s):
    v = s.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


def _finite(x, s):
    if isinstance(x, float) and not math.isfinite(x):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {s!r}")
    return x


def _typed(default):
    """The argparse type for a setting, taken from its default; None-like words give None where that is allowed.
    Numbers must be finite: nan and inf are refused like any other value out of range."""
    if isinstance(default, bool):
        return _parse_bool

    def convert(s):
        if s.strip().lower() in _OFF and default is None:
            return None
        if default is None:  # no type to go by: the most specific that parses
            for t in (int, float):
                try:
                    return _finite(t(s), s)
                except ValueError:
                    pass
            return s
        try:
            return _finite(type(default)(s), s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {type(default).__name__}, got {s!r}") from None
    convert.__name__ = type(default).__name__ if default is not None else "value"
    return convert


def setting_comments(source_file):
    """name -> the comment of each `name=value,  # comment` line (keyword style, as in a dict(...) of settings),
    with the comment-only lines right below it that continue it."""
    try:
        with open(source_file, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, TypeError):
        return {}
    found, last = {}, None
    for line in lines:
        m = re.match(r"^\s+(\w+)=.*?#\s*(.+)$", line)
        more = re.match(r"^\s+#\s*(.+)$", line)
        if m:
            last = m.group(1) if m.group(1) not in found else None
            if last:
                found[last] = m.group(2).strip()
        elif more and last:
            found[last] += " " + more.group(1).strip()
        else:
            last = None
    return found


def get_config(defaults, argv=None, doc=None, check=None):
    """Parse --name value (or --name=value) for every key of defaults; returns a dict.

    `--help` lists each setting with its comment: the one beside it in the calling script, else the one beside the
    shared TRAINING settings here. A misspelled flag, a value of the wrong type, a non-finite number, or a value
    that check(cfg) refuses with a UserError exits 2 with a usage line.
    """
    script = sys._getframe(1).f_globals.get("__file__")  # the module whose DEFAULTS these are
    comments = {**setting_comments(__file__), **setting_comments(script)}
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    for name, default in defaults.items():
        # argparse expands %-formats in help texts: a literal % in a comment must reach it as %%
        help_text = f"{comments.get(name, '')} (default: {default})".strip().replace("%", "%%")
        kwargs = dict(default=default, type=_typed(default), help=help_text, metavar=_typed(default).__name__.upper())
        if isinstance(default, bool):
            kwargs.update(nargs="?", const=True, metavar="BOOL")
        parser.add_argument(f"--{name}", **kwargs)
    cfg = vars(parser.parse_args(argv))
    if cfg.get("resume"):
        resumed_settings(cfg, defaults, argv, parser)
    for name, value in cfg.items():  # every seed: what torch.manual_seed and numpy take, with room for offsets
        if (name == "seed" or name.endswith("_seed")) and not -1 <= value < 2**32:
            parser.error(f"--{name} must be a whole number from -1 to {2**32 - 1}, got {value}")
    if check is not None:
        try:
            check(cfg)
        except UserError as e:
            parser.error(str(e))
    return cfg


RESUME_KEEPS = ("resume", "overwrite", "dry_run", "force")  # never taken from the run being resumed


def resumed_settings(cfg, defaults, argv, parser):
    """--resume: every setting not given on the command line takes the value the run began with (its out_dir's
    settings.json), so that `--out_dir DIR --resume` alone continues it; the ones given stay as given (RunFolder
    then refuses those that would make another run). No settings.json: nothing changes."""
    args = sys.argv[1:] if argv is None else list(argv)
    given = {a[2:].split("=", 1)[0] for a in args if isinstance(a, str) and a.startswith("--")}
    path = os.path.join(str(cfg.get("out_dir") or ""), "settings.json")
    if not cfg.get("out_dir") or not os.path.lexists(path):  # the state file's own checks refuse a mismatch
        return cfg
    began = None
    try:
        with open(path, encoding="utf-8") as f:
            began = json.load(f).get("settings")
    except (OSError, ValueError, AttributeError):
        pass
    if not isinstance(began, dict):
        parser.error(f"--resume: {path} does not hold the settings the run began with (damaged or edited): "
                     f"restore it, delete it and pass every setting the run began with, or --overwrite to start "
                     f"over")
    for name, value in began.items():
        default = defaults.get(name, ...)
        if name in given or name in RESUME_KEEPS or default is ...:
            continue
        if default is None or type(value) is type(default) or isinstance(default, float) and type(value) is int:
            cfg[name] = value
        else:
            parser.error(f"{path}: --{name} is {value!r}, not a {type(default).__name__}: fix or remove the file")
    return cfg


def changed_settings(cfg, defaults):
    """The settings that differ from the defaults, as 'name=value' text for the start-up line."""
    diff = [f"{k}={cfg[k]}" for k in defaults if cfg.get(k) != defaults[k]]
    return " ".join(diff) if diff else "(defaults)"


def check_training(cfg):
    """Range checks of the settings the training scripts share (each checked where the script has it)."""
    for k in ("context_length", "batch_size", "grad_accum_steps", "eval_freq", "eval_iters"):
        if k in cfg and cfg[k] < 1:
            raise UserError(f"--{k} must be at least 1, got {cfg[k]}")
    for k in ("epochs", "max_steps", "warmup_steps", "save_every", "sample_tokens", "stride", "emb_dim", "n_heads",
              "n_layers", "grad_clip", "weight_decay", "min_lr"):
        if k in cfg and cfg[k] < 0:
            raise UserError(f"--{k} must be >= 0, got {cfg[k]}")
    if "lr" in cfg and not cfg["lr"] > 0:
        raise UserError(f"--lr must be > 0, got {cfg['lr']}")
    if "drop_rate" in cfg and not 0 <= cfg["drop_rate"] < 1:
        raise UserError(f"--drop_rate must be in [0, 1), got {cfg['drop_rate']}")
    if cfg.get("lr_schedule") == "cosine" and cfg.get("min_lr", 0) > cfg["lr"]:
        raise UserError(f"--min_lr {cfg['min_lr']} is above --lr {cfg['lr']}: the cosine schedule decays from --lr "
                        f"down to --min_lr, so pass a --min_lr below --lr")
    if "train_ratio" in cfg and not 0 < cfg["train_ratio"] < 1:
        raise UserError(f"--train_ratio must be between 0 and 1, got {cfg['train_ratio']}")
    if cfg.get("lr_schedule", "constant") not in ("constant", "cosine"):
        raise UserError(f"--lr_schedule must be constant or cosine, got {cfg['lr_schedule']!r}")
    if cfg.get("logger", "none") not in ("none", "tensorboard", "wandb"):
        raise UserError(f"--logger must be none, tensorboard or wandb, got {cfg['logger']!r}")
    if cfg.get("resume") and cfg.get("overwrite"):
        raise UserError("--resume continues the earlier run and --overwrite replaces it: pass one of them")


# ---------------------------------------------------------------------------------------------------------------
# Device and dtype
# ---------------------------------------------------------------------------------------------------------------

def pick_device(name="auto"):
    """auto -> cuda, then mps, then cpu."""
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if mps else "cpu"
    if not re.fullmatch(r"cpu|mps|cuda(:\d+)?", name):  # other torch devices (xpu, meta, ...) are not supported
        raise UserError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but torch sees no CUDA GPU: use --device cpu")
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        raise UserError(f"--device {name}: torch sees {torch.cuda.device_count()} GPU(s), numbered from 0")
    if name == "mps" and not mps:
        raise UserError("--device mps asked for, but this machine has no MPS: use --device cpu")
    return torch.device(name)


def available_memory(device):
    """Bytes that can still be allocated on device (None where it cannot be told)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def has_native_bf16(device):
    """Whether bf16 matmuls run at hardware speed: AVX512-BF16 or AMX on x86 CPUs, bf16 support on CUDA GPUs."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    cpu = getattr(torch, "cpu", None)
    flags = [getattr(cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(f() for f in flags if f is not None)


def pick_dtype(name, device):
    """The autocast dtype. 'auto' is bf16 where the hardware multiplies bf16 natively (a CUDA GPU that supports
    it, a CPU with AVX512-BF16 or AMX) and float32 elsewhere (bf16 without that support is slower than fp32).
    The weights, and so the checkpoints, stay float32 either way."""
    if name == "auto":
        return torch.bfloat16 if has_native_bf16(device) else torch.float32
    if name not in DTYPES:
        raise UserError(f"unknown dtype {name!r}: use auto, float32, bfloat16 or float16")
    if DTYPES[name] is torch.float16 and device.type != "cuda":
        raise UserError("float16 needs a CUDA GPU (it trains with a gradient scaler there): use bfloat16 or float32")
    return DTYPES[name]


def describe_device(device, dtype, asked="auto"):
    """The start-up line's first words: the device and the dtype, with why 'auto' chose that dtype."""
    why = ""
    if asked == "auto":
        where = "GPU" if device.type == "cuda" else "CPU" if device.type == "cpu" else device.type
        why = (f" (auto: this {where} multiplies bf16 natively; --dtype float32 to keep fp32)"
               if dtype is torch.bfloat16 else f" (auto: this {where} has no native bf16 matmuls)")
    return f"device {device}, dtype {dtype_name(dtype)}{why}"


def dtype_name(dtype):
    return str(dtype).replace("torch.", "")


def autocast(device, dtype):
    """A context manager: autocast to dtype, or nothing for float32."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not torch.float32)


def keep_freed_memory():
    """Ask glibc's malloc to keep freed memory for reuse instead of returning it to the system; True if it could.

    A training step frees and re-allocates the same big buffers every time (gradients, bf16 copies of the weights,
    the logits). glibc hands buffers over 32 MiB back to the system when they are freed, and the next step then
    pays a page fault for every 4 KiB it touches again. Kept, the memory is reused; the price is fragmentation (a
    higher peak, and the process does not shrink after it). For CPU training; elsewhere (macOS, musl) a no-op.
    """
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's malloc.h
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def cpu_count():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
