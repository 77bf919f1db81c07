"""Pretrain GPT-2 on a text file (next-token prediction), with checkpoints, resume, logs and a loss plot.

    python pretrain.py                                   # the book's run: 124M, the-verdict.txt, 10 epochs
    python pretrain.py --data my_texts/ --n_layers 4 --emb_dim 256 --n_heads 4 --out_dir runs/small
    python pretrain.py --resume                          # continue runs/pretrain after Ctrl-C
    python pretrain.py --init gpt2 --epochs 0            # only evaluate OpenAI's GPT-2 124M on the data
    torchrun --nproc_per_node 4 pretrain.py              # 4 GPUs (or CPU processes) with DDP; add --fsdp to shard

It follows the book's chapter 5 (gpt_train.py): load the text, split it, window it into batches, train with
evaluation every few steps and a sample after each epoch, plot the losses. The training loop is `train` below,
the book's train_model_simple with what long runs need (resume, signals, several processes); trainer.py holds the
small helpers it calls, one job each.
"""
import contextlib
import math
import os
import time

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from data import (DATA_FILES, EOT_ID, RandomWindows, TokenWindows, fetch_data, split_point, text_to_token_ids,
                  token_cache, token_ids_to_text)
from model import MODEL_CONFIGS, count_parameters, generate_stream
from settings import (UserError, autocast, changed_settings, check_training, describe_device, entry, get_config,
                      pick_device, pick_dtype, training_settings)
from trainer import (BEST, POSITION, STOP, TRAIN_STATE, DivergenceGuard, Progress, RunFolder, StepLog, any_process,
                     batches_per_epoch, build_model, calc_loss_batch, catch_signals, clip_gradients, command_line,
                     count_steps, describe_distributed, evaluate_model, finished, grad_sync, loader_batches,
                     local_main_first, make_optimizer, model_config, plot_losses, print_dry_run, process_rank,
                     save_best, save_model, save_train_state, setup_distributed, start_position, world_size,
                     wrap_model)

DEFAULTS = dict(
    data="the-verdict.txt",    # a text file, or a folder of .txt/.md/.jsonl files (searched recursively);
                               # the-verdict.txt is downloaded on first use
    cache_dir="",              # where the tokenized corpus is kept; "" = data/token-cache (under $GPT2_DATA_DIR)
    text_field="text",         # the field of each .jsonl record that holds its text
    include_hidden=False,      # also read hidden files and folders (names starting with ".") of a --data folder
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
    decay="all",               # all (the book's AdamW: every weight decays) | matrices (only weight matrices and
                               # embeddings, not biases and LayerNorms, as nanoGPT)
    train_ratio=0.9,           # share of the text that trains (the first ones, by characters); the rest validates
    windows="auto",            # sliding (every --stride tokens, reshuffled each epoch, as the book) | random (at
                               # random offsets, for corpora too big to shuffle) | auto (random above 10M windows)
    stride=0,                  # tokens between sliding window starts; 0 = context_length (no overlap)
    sample_prompt="auto",      # printed continuation after each epoch; auto = the book's "Every effort moves you" on
                               # the-verdict, else the first words of the validation text; "" = off
    sample_tokens=50,          # length of that continuation
    **training_settings(
        batch_size=2,          # windows per micro-batch (per process under torchrun)
        epochs=10,             # passes over the training windows; 0 = only evaluate
        lr=4e-4,
        min_lr=4e-5,
        eval_freq=5,
        eval_iters=2,          # batches of each split (training, validation) per evaluation
    ),
)


# what this run is: --resume with another value of one of these would continue it as another run
RUN_SETTINGS = ("model", "context_length", "emb_dim", "n_heads", "n_layers", "drop_rate", "qkv_bias", "tie_weights",
                "batch_size", "grad_accum_steps", "stride", "windows", "train_ratio", "seed", "text_field",
                "include_hidden", "decay", "fsdp")
INPUTS = ("data", "init")  # settings that name files the run reads (never written over)
MAX_SHUFFLED = 10_000_000  # windows: more, and --windows auto draws random offsets instead of a permutation


def check_settings(cfg):
    check_training(cfg)
    if cfg["model"] not in MODEL_CONFIGS:
        raise UserError(f"--model must be one of {', '.join(MODEL_CONFIGS)}, got {cfg['model']!r}")
    if not cfg["data"].strip():
        raise UserError("--data is empty: name a text file or a folder of .txt, .md and .jsonl files")
    if cfg["decay"] not in ("all", "matrices"):
        raise UserError(f"--decay must be all or matrices, got {cfg['decay']!r}")
    if cfg["windows"] not in ("auto", "sliding", "random"):
        raise UserError(f"--windows must be auto, sliding or random, got {cfg['windows']!r}")


def generate_and_print_sample(model, start_context, device, max_new_tokens=50, write=print):
    """Greedy continuation of start_context, printed on one line (the book's chapter 5 function); a stop request
    (Ctrl-C, SIGTERM) ends it at the next token."""
    idx = text_to_token_ids(start_context).to(device)
    new = []
    for token in generate_stream(model, idx, max_new_tokens, context_size=model.cfg["context_length"]):
        new.append(token)
        if STOP:
            break
    write(token_ids_to_text(torch.cat([idx, *new], dim=1)).replace("\n", " "))



def load_cache(cfg):
    """The corpus as a token cache (ids in a uint16 memory map), tokenized on the first run, read from it after."""
    path = cfg["data"]
    with local_main_first():  # under torchrun one process per machine downloads, the others then find the file
        if path in DATA_FILES and not os.path.exists(path):
            path = fetch_data(path)
        cache = token_cache(path, cfg["cache_dir"] or None, cfg["text_field"], not cfg["quiet"], cfg["include_hidden"])
    print(f"data: {path}, {len(cache.tokens):,} tokens in {len(cache.meta['files'])} file(s), cached in {cache.path}")
    return cache


BOOK_PROMPT = "Every effort moves you"  # the book's sample prompt, a line of the-verdict


def sample_prompt(cache, split, cfg):
    """--sample_prompt auto: the book's prompt on the-verdict; on any other corpus the start of its validation text
    (its first 6 tokens, from the first whole word), which a prompt written for the-verdict would not fit."""
    if cfg["sample_prompt"] != "auto":
        return cfg["sample_prompt"]
    if os.path.basename(cfg["data"]) == "the-verdict.txt":
        return BOOK_PROMPT
    ids = [int(t) for t in cache.tokens[split:split + 12] if int(t) != EOT_ID]
    words = token_ids_to_text(ids).split()
    return " ".join(words[1:7] if len(words) > 2 else words)  # the first piece may be the end of a word


def make_loaders(cache, cfg):
    """Split the tokens at train_ratio of the text and window them into train and validation loaders."""
    tokens, split, n = cache.tokens, split_point(cache, cfg["train_ratio"]), cfg["context_length"]
    stride = cfg["stride"] or n
    if split < n + 1:
        raise UserError(f"training text too short: need at least context_length+1 = {n + 1} tokens, got {split}; "
                        f"add text or lower --context_length")
    train = TokenWindows(tokens, n, stride, 0, split)
    if cfg["windows"] == "random" or cfg["windows"] == "auto" and len(train) > MAX_SHUFFLED:
        train = RandomWindows(tokens, n, 0, split, cfg["seed"])
    val = TokenWindows(tokens, n, stride, split)
    train_loader = DataLoader(train, cfg["batch_size"], shuffle=isinstance(train, TokenWindows), drop_last=True)
    val_loader = DataLoader(val, cfg["batch_size"], shuffle=False, drop_last=False)
    if len(train_loader) == 0:
        raise UserError(f"training split gives {len(train)} windows, fewer than --batch_size {cfg['batch_size']}: "
                        f"lower --batch_size or --context_length")
    if len(val_loader) == 0:
        raise UserError(f"validation split too small for one batch: {len(tokens) - split} tokens, need {n + 1}; "
                        f"lower --train_ratio or --context_length, or add text")
    return train_loader, val_loader


def main(argv=None):
    cfg = get_config(DEFAULTS, argv, __doc__, check=check_settings)
    torch.manual_seed(cfg["seed"])
    device = setup_distributed(pick_device(cfg["device"]))  # under torchrun: join the group, take this GPU
    dtype = pick_dtype(cfg["dtype"], device)
    print(describe_device(device, dtype, cfg["dtype"]) + describe_distributed(cfg))
    if cfg["init"] == "scratch":
        model_config(cfg)  # a shape that cannot be built is refused before any download or tokenizing
    trains = not (cfg["dry_run"] or cfg["epochs"] == 0)  # the other two only print
    outputs = [os.path.join(cfg["out_dir"], "model.pth")]
    folder = RunFolder(cfg, outputs, command_line(__file__, argv), RUN_SETTINGS, INPUTS) if trains else None
    with folder or contextlib.nullcontext() as run:
        cache = load_cache(cfg)
        train_loader, val_loader = make_loaders(cache, cfg)
        if cfg["dry_run"]:
            model_cfg = model_config(cfg) if cfg["init"] == "scratch" else build_model(cfg)[0].cfg
            return print_dry_run(model_cfg, cfg, len(train_loader), dtype, device, time_steps=3)
        # with --fsdp the whole model stays in CPU memory; wrap_model moves only this process's shard to the GPU
        model, _ = build_model(cfg, torch.device("cpu") if cfg["fsdp"] and world_size() > 1 else device)
        if cfg["context_length"] > model.cfg["context_length"]:
            raise UserError(f"--context_length {cfg['context_length']} exceeds the model's "
                            f"{model.cfg['context_length']}: lower it")
        print(f"{count_parameters(model):,} parameters, {len(train_loader)} train / {len(val_loader)} val batches; "
              f"settings: {changed_settings(cfg, DEFAULTS)}")
        if not trains:
            train_loss, val_loss = evaluate_model(model, train_loader, val_loader, device, None, progress=True)
            print(f"train loss {train_loss:.3f}, val loss {val_loss:.3f} (no training: --epochs 0)")
            return {"train_loss": train_loss, "val_loss": val_loss}
        cfg["sample_prompt"] = sample_prompt(cache, split_point(cache, cfg["train_ratio"]), cfg)  # auto: resolved
        return pretrain(model, train_loader, val_loader, cfg, device, dtype, run)


def get_lr(step, total_steps, cfg):
    """Learning rate of optimizer step `step` (0-based): a linear warmup over --warmup_steps, then --lr (constant)
    or a cosine decay from --lr down to --min_lr at the last step."""
    lr, warmup = cfg["lr"], cfg["warmup_steps"]
    if warmup and step < warmup:
        return lr * (step + 1) / warmup
    if cfg["lr_schedule"] == "cosine":
        progress = (step - warmup) / max(1, total_steps - warmup)
        return cfg["min_lr"] + 0.5 * (lr - cfg["min_lr"]) * (1 + math.cos(math.pi * min(1.0, progress)))
    return lr


def evaluate(model, eval_loaders, cfg, device, where):
    """Losses on the first --eval_iters batches of each split, printed after `where`; in float32 whatever --dtype
    says: a few batches, so exact losses cost little and runs in different dtypes report comparable numbers."""
    train_loss, val_loss = evaluate_model(model, *eval_loaders, device, cfg["eval_iters"], progress=True)
    if STOP:  # cut short by a stop request: nothing to log
        return {}
    tqdm.write(f"{where}: train_loss {train_loss:.3f} val_loss {val_loss:.3f}")
    return {"train_loss": round(train_loss, 5), "val_loss": round(val_loss, 5)}


def sample(model, cfg, device):
    """The book's sample after each epoch: --sample_tokens greedy tokens after --sample_prompt."""
    if cfg["sample_prompt"] and cfg["sample_tokens"] and not cfg["quiet"]:
        generate_and_print_sample(model, cfg["sample_prompt"], device, cfg["sample_tokens"], write=tqdm.write)


def train(model, train_loader, eval_loaders, cfg, device, dtype, run):
    """Train for --epochs (or exactly --max_steps optimizer steps), a row in log.csv per step, an evaluation every
    --eval_freq steps, a sample per epoch; saves what --resume needs at --save_every, the end and on a signal."""
    accum, world, rank = cfg["grad_accum_steps"], world_size(), process_rank()
    batches = batches_per_epoch(train_loader, world)
    steps_per_epoch, total_steps = count_steps(batches, accum, cfg["epochs"], cfg["max_steps"])
    fwd_model, step_model = wrap_model(model, device, dtype, cfg["fsdp"], cfg["compile"])
    optimizer = make_optimizer(model, cfg["lr"], cfg["weight_decay"], device, cfg["decay"])
    scaler = torch.amp.GradScaler("cuda", enabled=dtype is torch.float16)
    state_path = run.path(TRAIN_STATE)
    start = start_position(state_path, model, optimizer, device, batches, cfg["resume"], cfg["seed"], cfg["fsdp"])
    step, epoch, batch_pos, tokens_seen = (start[k] for k in POSITION)
    log = StepLog(run.path("log.csv"), step if cfg["resume"] else None, run.logger)
    guard = DivergenceGuard(state_path, cfg["lr"], cfg["weight_decay"], step if cfg["resume"] else None)

    def save():  # every process calls it (gathering shards and random states needs them all)
        guard.weights(model, step)
        save_train_state(state_path, model, optimizer, device, dict(zip(POSITION, (step, epoch, batch_pos,
                         tokens_seen)), batches_per_epoch=batches), "pretrain", cfg)
        guard.saved(step)

    if finished(step, total_steps, cfg["out_dir"]):
        return log.rows
    progress = Progress(total_steps, step, cfg["quiet"])
    data = loader_batches(train_loader, epoch, batch_pos, cfg["seed"], rank, world)
    with catch_signals() as stop:
        while step < total_steps:
            t0 = time.perf_counter()
            lr = get_lr(step, total_steps, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum, step_tokens = 0.0, 0
            for i in range(accum):
                x, y = next(data)
                with grad_sync(step_model, last=i == accum - 1):
                    with autocast(device, dtype):
                        loss = calc_loss_batch(x, y, step_model, device)
                    guard.loss(loss, step + 1)
                    scaler.scale(loss / accum).backward()
                loss_sum, step_tokens = loss_sum + loss.item() / accum, step_tokens + x.numel() * world
            norm = clip_gradients(model, optimizer, scaler, cfg["grad_clip"])
            guard.grad_norm(norm, loss_sum, step + 1, scaler)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step, batch_pos, tokens_seen = step + 1, batch_pos + accum, tokens_seen + step_tokens
            guard.step_done(step)
            progress.add(step_tokens, time.perf_counter() - t0)
            progress.update(step, loss_sum, lr)
            run.started()
            row = {"step": step, "epoch": round(step / steps_per_epoch, 3), "tokens_seen": tokens_seen,
                   "loss": round(loss_sum, 5), "lr": lr, "grad_norm": round(norm, 5),
                   "tokens_per_s": round(progress.tokens_per_s(), 1)}
            if batch_pos + accum > batches:  # the epoch is done: the book prints a sample here
                epoch, batch_pos = epoch + 1, 0
                data = loader_batches(train_loader, epoch, 0, cfg["seed"], rank, world)
                sample(model, cfg, device)
            if step == 1 or step % cfg["eval_freq"] == 0 or step == total_steps:
                where = f"ep {(step - 1) // steps_per_epoch + 1} (step {step:06d})"  # the epoch the step was in
                row.update(evaluate(fwd_model, eval_loaders, cfg, device, where))
                progress.resume_clock()
            log.append(row)
            if any_process(bool(stop)):  # every process stops at the same step
                save()
                progress.close()
                stop.leave(f"at step {step}: saved {state_path}; continue with --resume")
            if "val_loss" in row:
                plot_losses(log.rows, steps_per_epoch, run.path("loss-plot.png"))
                if cfg["save_best"]:  # best.pth: the model at its lowest validation loss so far
                    save_best(run.path(BEST), model, "pretrain", log.rows)
            if cfg["save_every"] and step % cfg["save_every"] == 0 and step < total_steps:
                save()
        progress.close()
        save()  # the last one, inside catch_signals: a signal now waits for it
    return log.rows


def pretrain(model, train_loader, val_loader, cfg, device, dtype, run):
    """Train (the loss measured on the first eval_iters training batches in file order, the same ones every
    time), then write model.pth and say what was written."""
    eval_train = DataLoader(train_loader.dataset, cfg["batch_size"], shuffle=False, drop_last=True)
    start = time.time()
    rows = train(model, train_loader, (eval_train, val_loader), cfg, device, dtype, run)
    final = next((dict(r) for r in reversed(rows) if "val_loss" in r), {"step": 0})
    if not run.is_started and os.path.isfile(run.path("model.pth")):  # --resume of a finished run, nothing to do
        return final
    if "train_loss" not in final:  # a finished run stopped before its last evaluation: evaluate now
        step = max((r["step"] for r in rows), default=0)
        final.update(evaluate(model, (eval_train, val_loader), cfg, device, "final"), step=step)
    if cfg["full_eval"]:
        final["val_loss_full"] = evaluate_model(model, eval_train, val_loader, device, None, progress=True)[1]
        print(f"validation loss over the whole split: {final['val_loss_full']:.3f}")
    path = save_model(run.path("model.pth"), model, kind="pretrain", step=final["step"],
                      train_loss=final["train_loss"], val_loss=final["val_loss"])
    written = [path, run.path(TRAIN_STATE), run.path("log.csv")]
    if os.path.exists(run.path("loss-plot.png")):
        written.append(run.path("loss-plot.png"))
    print(f"done in {time.time() - start:.0f} s: train loss {final['train_loss']:.3f}, val loss "
          f"{final['val_loss']:.3f}; wrote {', '.join(written)}")
    return final


if __name__ == "__main__":
    entry(main)
