"""Pretrain GPT-2 on a text file (next-token prediction), with checkpoints, resume, logs and a loss plot.

    python pretrain.py                                   # the book's run: 124M, the-verdict.txt, 10 epochs
    python pretrain.py --data my_texts/ --n_layers 4 --emb_dim 256 --n_heads 4 --out_dir runs/small
    python pretrain.py --resume                          # continue runs/pretrain after Ctrl-C
    python pretrain.py --init gpt2 --epochs 0            # only evaluate OpenAI's GPT-2 124M on the data

The training loop (train_model) is shared by finetune_cls.py and finetune_chat.py.
"""
import csv
import math
import os
import signal
import sys
import time

import torch
import torch.nn.functional as F

from data import (UserError, autocast, changed_settings, create_dataloader_v1, entry, fetch_data, get_config,
                  get_tokenizer, load_text, pick_device, pick_dtype, text_to_token_ids, token_ids_to_text,
                  DATA_FILES)
from model import (GPTModel, MODEL_CONFIGS, atomic_save, count_parameters, generate, load_state,
                   read_checkpoint, save_checkpoint)

DEFAULTS = dict(
    data="the-verdict.txt",    # text file or folder of .txt files; the-verdict.txt is downloaded on first use
    out_dir="runs/pretrain",   # where model.pth, model_and_optimizer.pth, log.csv and loss-plot.png go
    init="scratch",            # scratch | gpt2 | gpt2-medium | gpt2-large | gpt2-xl | PATH.pth
    model="gpt2",              # architecture when init=scratch: gpt2 | gpt2-medium | gpt2-large | gpt2-xl
    context_length=256,        # tokens per training window (and the scratch model's position table)
    emb_dim=0,                 # 0 = the size of --model
    n_heads=0,                 # 0 = the size of --model
    n_layers=0,                # 0 = the size of --model
    drop_rate=0.1,             # dropout probability; 0 = off
    qkv_bias=False,            # bias in the query/key/value projections
    tie_weights=False,         # output layer shares the token embedding (as GPT-2 does)
    train_ratio=0.9,           # share of the text (by characters) used for training, the rest validates
    batch_size=2,              # windows per step
    grad_accum_steps=1,        # micro-batches summed per optimizer step
    stride=0,                  # tokens between window starts; 0 = context_length (no overlap)
    epochs=10,                 # passes over the training windows; 0 = only evaluate
    max_steps=0,               # stop after this many optimizer steps; 0 = off
    lr=4e-4,                   # peak learning rate
    weight_decay=0.1,          # AdamW decoupled weight decay
    lr_schedule="constant",    # constant | cosine (cosine decays to min_lr after warmup)
    warmup_steps=0,            # linear warmup from 0 to lr; 0 = off
    min_lr=4e-5,               # floor of the cosine schedule
    grad_clip=0.0,             # clip the global gradient norm to this; 0 = off
    eval_freq=5,               # evaluate every this many steps
    eval_iters=2,              # batches per evaluation of the training loss (the validation set is used whole)
    save_every=0,              # also checkpoint every this many steps; 0 = only at the end and on Ctrl-C/SIGTERM
    sample_prompt="Every effort moves you",  # printed continuation after each epoch; "" = off
    sample_tokens=50,          # length of that continuation
    seed=123,                  # seeds weights, dropout and data order
    device="auto",             # auto | cpu | cuda | mps
    dtype="auto",              # auto | float32 | bfloat16 | float16 (auto: bf16 on GPUs that have it, else fp32)
    compile=False,             # torch.compile the model (slow start, faster steps on GPUs)
    resume=False,              # continue from out_dir/model_and_optimizer.pth
)

TRAIN_STATE = "model_and_optimizer.pth"


def check_settings(cfg):
    positive = ["context_length", "batch_size", "grad_accum_steps", "eval_freq", "eval_iters"]
    for k in positive:
        if k in cfg and cfg[k] < 1:
            raise UserError(f"--{k} must be at least 1, got {cfg[k]}")
    for k in ["epochs", "max_steps", "warmup_steps", "save_every", "sample_tokens", "stride", "emb_dim", "n_heads",
              "n_layers", "grad_clip", "weight_decay", "min_lr"]:
        if k in cfg and cfg[k] < 0:
            raise UserError(f"--{k} must be >= 0, got {cfg[k]}")
    if "lr" in cfg and not cfg["lr"] > 0:
        raise UserError(f"--lr must be > 0, got {cfg['lr']}")
    if "drop_rate" in cfg and not 0 <= cfg["drop_rate"] < 1:
        raise UserError(f"--drop_rate must be in [0, 1), got {cfg['drop_rate']}")
    if "train_ratio" in cfg and not 0 < cfg["train_ratio"] < 1:
        raise UserError(f"--train_ratio must be between 0 and 1, got {cfg['train_ratio']}")
    if cfg.get("lr_schedule", "constant") not in ("constant", "cosine"):
        raise UserError(f"--lr_schedule must be constant or cosine, got {cfg['lr_schedule']!r}")
    if "model" in cfg and cfg["model"] not in MODEL_CONFIGS:
        raise UserError(f"--model must be one of {', '.join(MODEL_CONFIGS)}, got {cfg['model']!r}")


# ---------------------------------------------------------------------------------------------------------------
# Losses and evaluation (the book's chapter 5 functions)
# ---------------------------------------------------------------------------------------------------------------

def calc_loss_batch(input_batch, target_batch, model, device):
    """Mean next-token cross-entropy of one batch."""
    input_batch, target_batch = input_batch.to(device), target_batch.to(device)
    logits = model(input_batch)
    return F.cross_entropy(logits.flatten(0, 1).float(), target_batch.flatten())


@torch.no_grad()
def calc_loss_loader(data_loader, model, device, num_batches=None, dtype=torch.float32):
    """Average batch loss over the first num_batches batches (all when None); nan for an empty loader."""
    n = len(data_loader) if num_batches is None else min(num_batches, len(data_loader))
    if n == 0:
        return float("nan")
    total = 0.0
    for i, (x, y) in enumerate(data_loader):
        if i >= n:
            break
        with autocast(torch.device(device), dtype):
            total += calc_loss_batch(x, y, model, device).item()
    return total / n


def evaluate_model(model, train_loader, val_loader, device, eval_iter, dtype=torch.float32):
    """(train_loss, val_loss) in eval mode; the model goes back to training mode afterwards."""
    was_training = model.training
    model.eval()
    train_loss = calc_loss_loader(train_loader, model, device, eval_iter, dtype)
    val_loss = calc_loss_loader(val_loader, model, device, None, dtype)
    model.train(was_training)
    return train_loss, val_loss


def generate_and_print_sample(model, start_context, device, max_new_tokens=50, write=print):
    """Greedy continuation of start_context, printed on one line."""
    idx = text_to_token_ids(start_context).to(device)
    out = generate(model, idx, max_new_tokens, context_size=model.cfg["context_length"])
    write(token_ids_to_text(out).replace("\n", " "))


# ---------------------------------------------------------------------------------------------------------------
# The training loop, shared by the fine-tuning scripts
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


def check_out_dir(out_dir):
    """Create out_dir or say why it cannot be used."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"--out_dir {out_dir} is a file: pass a folder")
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create --out_dir {out_dir} ({e.strerror}): pass a writable folder") from None
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise UserError(f"--out_dir {out_dir} is not writable: pass a writable folder")


def write_log(path, rows):
    """Write every logged row as CSV (columns: union of the rows' keys, in first-seen order)."""
    if not rows:
        return
    cols = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def plot_losses(rows, steps_per_epoch, path, keys=("train_loss", "val_loss"), ylabel="loss"):
    """Loss against epochs, with tokens seen on a second x-axis (needs matplotlib; skipped without it)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
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
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


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


def train_model(model, train_loader, cfg, *, loss_fn, eval_fn, device, dtype=torch.float32, kind="pretrain",
                extra=None, on_epoch_end=None, optimizer=None, write=None):
    """Train `model` on train_loader for cfg['epochs'] (or cfg['max_steps']) optimizer steps.

    loss_fn(model, batch) -> scalar loss; eval_fn(model) -> dict of metrics (logged every cfg['eval_freq'] steps
    and at the end). cfg also needs: out_dir, lr, weight_decay, lr_schedule, warmup_steps, min_lr, grad_clip,
    grad_accum_steps, seed, resume, save_every, compile. Writes out_dir/model_and_optimizer.pth (resumable),
    out_dir/log.csv, out_dir/loss-plot.png; returns the logged rows. `extra` is stored in every checkpoint.
    """
    from tqdm import tqdm
    write = write or tqdm.write
    out_dir = cfg["out_dir"]
    state_path = os.path.join(out_dir, TRAIN_STATE)
    accum = cfg.get("grad_accum_steps", 1)
    steps_per_epoch = len(train_loader) // accum
    if steps_per_epoch == 0:
        raise UserError(f"the training data gives {len(train_loader)} batches, fewer than one optimizer step "
                        f"({accum} micro-batches): add data or lower --batch_size / --grad_accum_steps")
    total_steps = cfg["epochs"] * steps_per_epoch
    if cfg.get("max_steps"):
        total_steps = min(total_steps, cfg["max_steps"])
    optimizer = optimizer or make_optimizer(model, cfg["lr"], cfg["weight_decay"], device)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype is torch.float16)
    fwd_model = torch.compile(model) if cfg.get("compile") else model

    step, epoch, batch_pos, tokens_seen, rows = 0, 0, 0, 0, []
    if cfg.get("resume"):
        if not os.path.exists(state_path):
            raise UserError(f"--resume: no {state_path} to continue from; run without --resume to start")
        ckpt = read_checkpoint(state_path)
        if "optimizer" not in ckpt:
            raise UserError(f"{state_path} holds no optimizer state, so it cannot be resumed")
        load_state(model, ckpt["model"], state_path)
        optimizer.load_state_dict(ckpt["optimizer"])
        step, epoch, batch_pos = ckpt["step"], ckpt["epoch"], ckpt["batch_pos"]
        tokens_seen, rows = ckpt["tokens_seen"], list(ckpt.get("log", []))
        set_rng_state(ckpt["rng"], device)
        write(f"resumed from {state_path} at step {step} (epoch {epoch + 1}, batch {batch_pos})")

    def save_state(path=state_path):
        atomic_save({"model": model.state_dict(), "config": dict(model.cfg), "kind": kind,
                     "optimizer": optimizer.state_dict(), "step": step, "epoch": epoch, "batch_pos": batch_pos,
                     "tokens_seen": tokens_seen, "rng": rng_state(device), "log": rows,
                     "train_settings": {k: v for k, v in cfg.items() if isinstance(v, (int, float, str, bool))},
                     **(extra or {})}, path)

    def log_eval():
        model.eval()
        with torch.no_grad(), autocast(device, dtype):
            metrics = eval_fn(fwd_model)
        model.train()
        row = {"step": step, "epoch": round(step / steps_per_epoch, 3), "tokens_seen": tokens_seen,
               **{k: round(v, 5) if isinstance(v, float) else v for k, v in metrics.items()},
               "lr": optimizer.param_groups[0]["lr"],
               "tokens_per_s": round(speed_tokens / max(speed_time, 1e-9), 1)}
        rows.append(row)
        shown = " ".join(f"{k} {v:.3f}" for k, v in metrics.items() if isinstance(v, float))
        write(f"ep {min(epoch + 1, cfg['epochs'])} (step {step:06d}): {shown}")

    model.train()
    speed_tokens, speed_time = 0, 0.0
    bar = tqdm(total=total_steps, initial=step, unit="step", dynamic_ncols=True, leave=False,
               disable=cfg.get("quiet", False))
    with _StopRequest() as stop:
        while step < total_steps:
            sampler = getattr(train_loader, "sampler", None)
            if isinstance(sampler, torch.utils.data.RandomSampler):
                # the order of each epoch depends only on (seed, epoch), so a resumed run sees the same batches
                sampler.generator = torch.Generator().manual_seed(cfg["seed"] * 1000 + epoch)
            batches = iter(train_loader)
            for _ in range(batch_pos):
                next(batches)
            while batch_pos + accum <= len(train_loader) and step < total_steps:
                t0 = time.perf_counter()
                lr = lr_at_step(step, total_steps, cfg["lr"], cfg.get("lr_schedule", "constant"),
                                cfg.get("warmup_steps", 0), cfg.get("min_lr", 0.0))
                for group in optimizer.param_groups:
                    group["lr"] = lr
                loss_sum = 0.0
                for _ in range(accum):
                    batch = next(batches)
                    with autocast(device, dtype):
                        loss = loss_fn(fwd_model, batch)
                    if not torch.isfinite(loss):
                        kept = (f"the last good checkpoint {state_path} is kept" if os.path.exists(state_path)
                                else "no checkpoint was written")
                        raise UserError(f"loss became {loss.item()} at step {step + 1}; stopped, {kept}; lower "
                                        f"--lr or set --grad_clip 1.0")
                    scaler.scale(loss / accum).backward()
                    loss_sum += loss.item() / accum
                    tokens_seen += batch_tokens(batch)
                    speed_tokens += batch_tokens(batch)
                if cfg.get("grad_clip"):
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                batch_pos += accum
                speed_time += time.perf_counter() - t0
                bar.update(1)
                bar.set_postfix(loss=f"{loss_sum:.3f}", lr=f"{lr:.2e}",
                                tok_s=f"{speed_tokens / max(speed_time, 1e-9):.0f}")
                epoch_done = batch_pos + accum > len(train_loader)
                if epoch_done:
                    epoch, batch_pos = epoch + 1, 0
                    if on_epoch_end is not None:
                        on_epoch_end(model, epoch)
                if step == 1 or step % cfg["eval_freq"] == 0 or step == total_steps:
                    log_eval()
                    write_log(os.path.join(out_dir, "log.csv"), rows)
                if stop.signal is not None:
                    save_state()
                    bar.close()
                    name = "SIGTERM" if stop.signal == getattr(signal, "SIGTERM", None) else "Ctrl-C"
                    print(f"{name} at step {step}: saved {state_path}; continue with --resume", file=sys.stderr)
                    sys.exit(130 if stop.signal == signal.SIGINT else 143)
                if cfg.get("save_every") and step % cfg["save_every"] == 0 and step < total_steps:
                    save_state()
                if epoch_done:
                    break
    bar.close()
    save_state()
    write_log(os.path.join(out_dir, "log.csv"), rows)
    plot_losses(rows, steps_per_epoch, os.path.join(out_dir, "loss-plot.png"))
    return rows


def batch_tokens(batch):
    """Tokens in a batch: the first tensor's element count."""
    first = batch[0] if isinstance(batch, (list, tuple)) else next(iter(batch.values()))
    return first.numel()


# ---------------------------------------------------------------------------------------------------------------
# Pretraining
# ---------------------------------------------------------------------------------------------------------------

def model_config(cfg):
    """The scratch model's config: --model's size with any non-zero overrides."""
    mcfg = dict(MODEL_CONFIGS[cfg["model"]])
    mcfg.update(context_length=cfg["context_length"], drop_rate=cfg["drop_rate"], qkv_bias=cfg["qkv_bias"],
                tie_weights=cfg["tie_weights"])
    for k in ("emb_dim", "n_heads", "n_layers"):
        if cfg[k]:
            mcfg[k] = cfg[k]
    if mcfg["emb_dim"] % mcfg["n_heads"]:
        raise UserError(f"--emb_dim {mcfg['emb_dim']} is not divisible by --n_heads {mcfg['n_heads']}")
    return mcfg


def build_model(cfg, device):
    """A fresh model (init=scratch) or one started from OpenAI's weights or a .pth (load_gpt2.init_model)."""
    if cfg["init"] == "scratch":
        return GPTModel(model_config(cfg)).to(device)
    from load_gpt2 import init_model
    model, _ = init_model(cfg["init"], cfg_overrides={"drop_rate": cfg["drop_rate"]}, device=device)
    if cfg["context_length"] > model.cfg["context_length"]:
        raise UserError(f"--context_length {cfg['context_length']} exceeds the model's "
                        f"{model.cfg['context_length']}: lower it")
    return model


def resolve_data(path):
    """--data as given, or the bundled corpus downloaded on first use."""
    if path in DATA_FILES and not os.path.exists(path):
        return fetch_data(path)
    return path


def make_loaders(text, cfg):
    """Split text by characters, tokenize, and window it into train and validation loaders."""
    split = int(cfg["train_ratio"] * len(text))
    tok = get_tokenizer()
    train_ids = tok.encode(text[:split], allowed_special={"<|endoftext|>"})
    val_ids = tok.encode(text[split:], allowed_special={"<|endoftext|>"})
    n = cfg["context_length"]
    stride = cfg["stride"] or n
    if len(train_ids) < n + 1:
        raise UserError(f"training text too short: need at least context_length+1 = {n + 1} tokens, got "
                        f"{len(train_ids)}; add text or lower --context_length")
    train_loader = create_dataloader_v1(train_ids, cfg["batch_size"], n, stride, shuffle=True, drop_last=True)
    val_loader = create_dataloader_v1(val_ids, cfg["batch_size"], n, stride, shuffle=False, drop_last=False)
    if len(train_loader) == 0:
        raise UserError(f"training split gives {len(train_loader.dataset)} windows, fewer than --batch_size "
                        f"{cfg['batch_size']}: lower --batch_size or --context_length")
    if len(val_loader) == 0:
        raise UserError(f"validation split too small for one batch: {len(val_ids)} tokens, need "
                        f"{n + 1}; lower --train_ratio or --context_length, or add text")
    return train_loader, val_loader


def main(argv=None):
    cfg = get_config(DEFAULTS, argv, __doc__, check=check_settings)
    torch.manual_seed(cfg["seed"])
    device = pick_device(cfg["device"])
    dtype = pick_dtype(cfg["dtype"], device)
    out_dir = cfg["out_dir"]
    text = load_text(resolve_data(cfg["data"]))
    train_loader, val_loader = make_loaders(text, cfg)
    model = build_model(cfg, device)
    print(f"device {device}, dtype {str(dtype).replace('torch.', '')}, {count_parameters(model):,} parameters, "
          f"{len(train_loader)} train / {len(val_loader)} val batches; settings: {changed_settings(cfg, DEFAULTS)}")

    def eval_fn(m):
        train_loss, val_loss = evaluate_model(m, eval_train, val_loader, device, cfg["eval_iters"])
        return {"train_loss": train_loss, "val_loss": val_loss}

    # training loss is measured on the first eval_iters batches in file order, the same ones every time
    eval_train = create_dataloader_v1(train_loader.dataset.token_ids.tolist(), cfg["batch_size"],
                                      cfg["context_length"], cfg["stride"] or cfg["context_length"], shuffle=False)
    if cfg["epochs"] == 0:
        model.eval()
        with autocast(device, dtype):
            train_loss, val_loss = evaluate_model(model, train_loader, val_loader, device, None)
        print(f"train loss {train_loss:.3f}, val loss {val_loss:.3f} (no training: --epochs 0)")
        return {"train_loss": train_loss, "val_loss": val_loss}

    check_out_dir(out_dir)

    def sample(m, epoch):
        if cfg["sample_prompt"] and cfg["sample_tokens"]:
            generate_and_print_sample(m, cfg["sample_prompt"], device, cfg["sample_tokens"], write=_tqdm_write)

    start = time.time()
    rows = train_model(model, train_loader, cfg, device=device, dtype=dtype, kind="pretrain",
                       loss_fn=lambda m, b: calc_loss_batch(b[0], b[1], m, device), eval_fn=eval_fn,
                       on_epoch_end=sample)
    path = save_checkpoint(os.path.join(out_dir, "model.pth"), model, kind="pretrain", step=rows[-1]["step"],
                           train_loss=rows[-1]["train_loss"], val_loss=rows[-1]["val_loss"])
    written = [path, os.path.join(out_dir, TRAIN_STATE), os.path.join(out_dir, "log.csv")]
    if os.path.exists(os.path.join(out_dir, "loss-plot.png")):
        written.append(os.path.join(out_dir, "loss-plot.png"))
    print(f"done in {time.time() - start:.0f} s: train loss {rows[-1]['train_loss']:.3f}, val loss "
          f"{rows[-1]['val_loss']:.3f}; wrote {', '.join(written)}")
    return rows[-1]


def _tqdm_write(s):
    from tqdm import tqdm
    tqdm.write(s)


if __name__ == "__main__":
    entry(main)
