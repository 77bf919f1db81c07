"""Pretrain GPT-2 on a text file (next-token prediction), with checkpoints, resume, logs and a loss plot.

    python pretrain.py                                   # the book's run: 124M, the-verdict.txt, 10 epochs
    python pretrain.py --data my_texts/ --n_layers 4 --emb_dim 256 --n_heads 4 --out_dir runs/small
    python pretrain.py --resume                          # continue runs/pretrain after Ctrl-C
    python pretrain.py --init gpt2 --epochs 0            # only evaluate OpenAI's GPT-2 124M on the data
    torchrun --nproc_per_node 4 pretrain.py              # 4 GPUs (or CPU processes) with DDP; add --fsdp to shard

It follows the book's chapter 5 (gpt_train.py): load the text, split it, window it into batches, train with
evaluation every few steps and a sample after each epoch, plot the losses. The loop itself is trainer.train_model,
which the fine-tuning scripts share.
"""
import contextlib
import os
import time

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from data import (DATA_FILES, RandomWindows, TokenWindows, fetch_data, split_point, text_to_token_ids, token_cache,
                  token_ids_to_text)
from model import MODEL_CONFIGS, count_parameters, generate
from settings import (UserError, changed_settings, check_training, describe_device, entry, get_config,
                      pick_device, pick_dtype, training_settings)
from trainer import (TRAIN_STATE, RunFolder, build_model, calc_loss_batch, command_line, describe_distributed,
                     evaluate_model, local_main_first, model_config, print_dry_run, save_model, setup_distributed,
                     train_model, world_size)

DEFAULTS = dict(
    data="the-verdict.txt",    # a text file, or a folder of .txt/.md/.jsonl files (searched recursively);
                               # the-verdict.txt is downloaded on first use
    cache_dir="",              # where the tokenized corpus is kept; "" = data/token-cache (under $GPT2_DATA_DIR)
    text_field="text",         # the field of each .jsonl record that holds its text
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
    train_ratio=0.9,           # share of the text that trains (the first ones, by characters); the rest validates
    windows="auto",            # sliding (every --stride tokens, reshuffled each epoch, as the book) | random (at
                               # random offsets, for corpora too big to shuffle) | auto (random above 10M windows)
    stride=0,                  # tokens between sliding window starts; 0 = context_length (no overlap)
    sample_prompt="Every effort moves you",  # printed continuation after each epoch; "" = off
    sample_tokens=50,          # length of that continuation
    **training_settings(
        batch_size=2,          # windows per micro-batch (per process under torchrun)
        epochs=10,             # passes over the training windows; 0 = only evaluate
        lr=4e-4,
        min_lr=4e-5,
        eval_freq=5,
        eval_iters=2,          # training batches per evaluation (the validation set is used whole)
    ),
)


MAX_SHUFFLED = 10_000_000  # windows: more, and --windows auto draws random offsets instead of a permutation


def check_settings(cfg):
    check_training(cfg)
    if cfg["model"] not in MODEL_CONFIGS:
        raise UserError(f"--model must be one of {', '.join(MODEL_CONFIGS)}, got {cfg['model']!r}")
    if not cfg["data"].strip():
        raise UserError("--data is empty: name a text file or a folder of .txt, .md and .jsonl files")
    if cfg["windows"] not in ("auto", "sliding", "random"):
        raise UserError(f"--windows must be auto, sliding or random, got {cfg['windows']!r}")


def generate_and_print_sample(model, start_context, device, max_new_tokens=50, write=print):
    """Greedy continuation of start_context, printed on one line (the book's chapter 5 function)."""
    idx = text_to_token_ids(start_context).to(device)
    out = generate(model, idx, max_new_tokens, context_size=model.cfg["context_length"])
    write(token_ids_to_text(out).replace("\n", " "))



def load_cache(cfg):
    """The corpus as a token cache (ids in a uint16 memory map), tokenized on the first run, read from it after."""
    path = cfg["data"]
    with local_main_first():  # under torchrun one process per machine downloads, the others then find the file
        if path in DATA_FILES and not os.path.exists(path):
            path = fetch_data(path)
        cache = token_cache(path, cfg["cache_dir"] or None, cfg["text_field"], progress=not cfg["quiet"])
    print(f"data: {path}, {len(cache.tokens):,} tokens in {len(cache.meta['files'])} file(s), cached in {cache.path}")
    return cache


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
    trains = not (cfg["dry_run"] or cfg["epochs"] == 0)  # the other two only print
    outputs = [os.path.join(cfg["out_dir"], "model.pth")]
    with RunFolder(cfg, outputs, command_line(__file__, argv)) if trains else contextlib.nullcontext() as run:
        train_loader, val_loader = make_loaders(load_cache(cfg), cfg)
        if cfg["dry_run"]:
            model_cfg = model_config(cfg) if cfg["init"] == "scratch" else build_model(cfg)[0].cfg
            return print_dry_run(model_cfg, cfg, len(train_loader), dtype, device, time_steps=3)
        # with --fsdp the whole model stays in CPU memory; train_model moves only this process's shard to the GPU
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
        return pretrain(model, train_loader, val_loader, cfg, device, dtype, run)


def pretrain(model, train_loader, val_loader, cfg, device, dtype, run):
    """The book's train_model_simple, through the shared loop: train, evaluate every eval_freq steps on the first
    eval_iters batches of each split, print a sample after each epoch, then write model.pth."""
    # the training loss is measured on the first eval_iters batches in file order, the same ones every time
    eval_train = DataLoader(train_loader.dataset, cfg["batch_size"], shuffle=False, drop_last=True)

    def eval_fn(m):
        # in float32 whatever --dtype says (the default of evaluate_model): a few batches, so exact losses cost little
        # and runs in different dtypes report comparable numbers
        train_loss, val_loss = evaluate_model(m, eval_train, val_loader, device, cfg["eval_iters"], progress=True)
        return {"train_loss": train_loss, "val_loss": val_loss}

    def sample(m, epoch):
        if cfg["sample_prompt"] and cfg["sample_tokens"] and not cfg["quiet"]:
            generate_and_print_sample(m, cfg["sample_prompt"], device, cfg["sample_tokens"], write=tqdm.write)

    start = time.time()
    rows = train_model(model, train_loader, cfg, device=device, dtype=dtype, kind="pretrain", run=run,
                       loss_fn=lambda m, b: calc_loss_batch(b[0], b[1], m, device), eval_fn=eval_fn,
                       on_epoch_end=sample)
    if run.finished:
        return rows[-1] if rows else {}
    final = dict(rows[-1])
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
