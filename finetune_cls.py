"""Fine-tune GPT-2 to classify text: the book's spam classifier (chapter 6), or any labelled CSV.

    python finetune_cls.py                                      # SMS spam, GPT-2 124M, last block + new head
    python finetune_cls.py --predict "You won a free cruise, call now!"
    python finetune_cls.py --evaluate --quantize int8                 # test accuracy with int8 weights
    python finetune_cls.py --save_int8 runs/cls/spam_classifier-int8.pth   # a smaller classifier for --predict
    python finetune_cls.py --csv reviews.csv --text_column review --label_column stars --trainable lora
    python finetune_cls.py --init scratch --trainable all --n_layers 4 --n_heads 4 --emb_dim 128 --max_length 128 \\
        --drop_rate 0.1 --lr 5e-4 --epochs 3 --out_dir runs/cls-scratch    # no pretrained weights needed

Without --csv or --train_csv the SMS Spam Collection is downloaded, balanced (ham undersampled to the 747 spam
messages) and split 70/10/20; every split made here is written to OUT_DIR as train.csv, validation.csv, test.csv.
The classifier reads its answer off the last real token of each text (padding, id 50256, comes after it).
"""
import contextlib
import csv
import io
import math
import os
import random
import re
import sys
import time
from collections import Counter

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from checkpoints import load_classifier
from data import EOT_ID, fetch_sms_spam, get_tokenizer, read_text_file
from files import atomic_write, check_input, check_output, save_pth, write_json
from layers import Int8Linear, add_lora, merge_lora
from model import checkpoint_dict, count_parameters
from settings import (UserError, autocast, changed_settings, check_training, describe_device, entry, few, get_config,
                      note, pick_device, pick_dtype, training_settings)
from trainer import (BEST, POSITION, STOP, TRAIN_STATE, DivergenceGuard, Progress, RunFolder, StepLog, any_process,
                     batches_per_epoch, build_model, catch_signals, clip_gradients, command_line, count_steps,
                     describe_distributed, finished, grad_sync, is_main_process, last_token_logits, loader_batches,
                     local_main_first, lr_at_step, make_optimizer, plot_losses, print_dry_run, process_rank,
                     save_best, save_model, save_train_state, setup_distributed, start_position, world_size,
                     wrap_model)

DEFAULTS = dict(
    csv="",                    # one labelled CSV, balanced and split 70/10/20 here; "" = the SMS Spam Collection
    train_csv="",              # ready-made splits instead: training CSV (with --val_csv and --test_csv); "" = off
    val_csv="",                # validation CSV that goes with --train_csv
    test_csv="",               # test CSV that goes with --train_csv; with --evaluate, the CSV to evaluate on
    text_column="Text",        # CSV column holding the text (a .tsv file is read tab-separated)
    label_column="Label",      # CSV column holding the label: any strings, each distinct one a class
    balance=True,              # undersample every class to the smallest before splitting (the book's choice)
    out_dir="runs/cls",        # where split CSVs, checkpoints, metrics.json, log.csv and plots go
    checkpoint="",             # classifier that training writes and --predict reads; "" = OUT_DIR/spam_classifier.pth
                               # for the SMS data, OUT_DIR/classifier.pth for a CSV
    init="gpt2",               # gpt2 | gpt2-medium | gpt2-large | gpt2-xl | scratch | PATH.pth | PATH.safetensors
    model="gpt2",              # architecture when init=scratch: gpt2 | gpt2-medium | gpt2-large | gpt2-xl
    emb_dim=0,                 # init=scratch only; 0 = the size of --model
    n_heads=0,                 # init=scratch only; 0 = the size of --model
    n_layers=0,                # init=scratch only; 0 = the size of --model
    context_length=0,          # init=scratch only: the position table, in tokens; 0 = max_length
    drop_rate=0.0,             # dropout probability; 0 = off
    max_length=0,              # tokens per text, longer texts are cut; 0 = the longest training text (up to context)
    trainable="last_block",    # head | last_block | last_n:K | all | lora (last_block, last_n also train final_norm)
    lora_rank=16,              # rank of the adapters with --trainable lora
    lora_alpha=16.0,           # adapter scale: the low-rank update is multiplied by alpha / rank
    predict="",                # a text to classify with --checkpoint: prints label and probability; "" = off
    predict_file="",           # a text file to classify line by line with --checkpoint; "" = off
    evaluate=False,            # only evaluate --checkpoint on --test_csv (else --csv, else OUT_DIR/test.csv)
    merge_lora=False,          # fold --checkpoint's LoRA adapters into plain weights, written as NAME_merged.pth
    quantize="none",           # none | int8: --predict / --evaluate with per-channel int8 Linear weights
    save_int8="",              # write --checkpoint with int8 weights (LoRA merged) to this .pth and exit; "" = off
    force=False,               # let --save_int8 / --merge_lora replace an existing checkpoint
    **training_settings(
        batch_size=8,          # texts per micro-batch (per process under torchrun)
        epochs=5,              # passes over the training texts; 0 = only evaluate the untrained classifier
        eval_freq=50,          # log losses and accuracies every this many steps
        eval_iters=5,          # batches of each split (training, validation) per evaluation
        seed=123,              # seeds balancing, the split, the new head, dropout and data order
    ),
)

CLASSIFIER = "spam_classifier.pth"  # trained on the SMS Spam Collection
CSV_CLASSIFIER = "classifier.pth"   # trained on a CSV of the user's
# what a classifier checkpoint stores beside the weights, so that it can be used alone
# what this run is: --resume with another value of one of these would continue it as another run
RUN_SETTINGS = ("model", "context_length", "emb_dim", "n_heads", "n_layers", "drop_rate", "trainable", "lora_rank",
                "lora_alpha", "batch_size", "grad_accum_steps", "seed", "max_length", "balance", "text_column",
                "label_column", "fsdp")
INPUTS = ("csv", "train_csv", "val_csv", "test_csv", "init")  # settings that name files the run reads
ACCURACIES = ("train_acc", "val_acc")  # what accuracy-plot.png shows
CLS_KEYS = ("class_names", "max_length", "pad_id", "text_column", "label_column", "trainable", "lora", "step",
            "accuracy")


def parse_trainable(spec):
    """--trainable -> (mode, number of last blocks or None)."""
    if spec in ("head", "last_block", "all", "lora"):
        return spec, None
    m = re.fullmatch(r"last_n:(\d+)", spec)
    if m and int(m.group(1)) >= 1:
        return "last_n", int(m.group(1))
    raise UserError(f"--trainable must be head, last_block, last_n:K (K >= 1), all or lora, got {spec!r}")


def check_settings(cfg):
    # context_length 0 means "max_length" here, so the shared check (which wants it >= 1) skips it
    check_training({k: v for k, v in cfg.items() if k != "context_length"})
    for k in ("context_length", "max_length"):
        if cfg[k] < 0:
            raise UserError(f"--{k} must be >= 0, got {cfg[k]}")
    if cfg["lora_rank"] < 1 or not cfg["lora_alpha"] > 0:
        raise UserError(f"--lora_rank must be >= 1 and --lora_alpha > 0, got {cfg['lora_rank']} and "
                        f"{cfg['lora_alpha']}")
    parse_trainable(cfg["trainable"])
    sized = [f"--{k}" for k in ("emb_dim", "n_heads", "n_layers", "context_length") if cfg[k]]
    if sized and cfg["init"] != "scratch":
        raise UserError(f"{', '.join(sized)} only size a --init scratch model; --init {cfg['init']} brings its own")
    modes = [f"--{k}" for k in ("predict", "predict_file", "evaluate", "merge_lora", "save_int8") if cfg[k]]
    if len(modes) > 1:
        raise UserError(f"{' and '.join(modes)} cannot be combined: pick one")
    if cfg["quantize"] not in ("none", "int8"):
        raise UserError(f"--quantize must be none or int8, got {cfg['quantize']!r}")
    if cfg["quantize"] == "int8" and not (cfg["predict"] or cfg["predict_file"] or cfg["evaluate"]):
        raise UserError("--quantize int8 is for --predict, --predict_file and --evaluate (training needs float "
                        "weights); to write an int8 classifier use --save_int8 PATH")
    if cfg["text_column"] == cfg["label_column"]:
        raise UserError(f"--text_column and --label_column both name {cfg['text_column']!r}: the text and its label "
                        f"must be two different columns")
    if cfg["csv"] and cfg["train_csv"]:
        raise UserError("--csv and --train_csv cannot be combined: one CSV to split, or ready-made splits")
    if not modes:
        given = [bool(cfg[k]) for k in ("train_csv", "val_csv", "test_csv")]
        if any(given) and not all(given):
            raise UserError("ready-made splits need all of --train_csv, --val_csv and --test_csv (or pass one "
                            "--csv to split 70/10/20)")


# ---------------------------------------------------------------------------------------------------------------
# The classifier: GPT-2 with a new head, read at the last real token
# ---------------------------------------------------------------------------------------------------------------

def replace_head(model, num_classes):
    """Swap the vocabulary head for Linear(emb_dim, num_classes) (freshly initialized); returns model."""
    w = model.out_head.weight
    model.out_head = nn.Linear(model.cfg["emb_dim"], num_classes, device=w.device, dtype=w.dtype)
    model.cfg["num_classes"] = num_classes
    return model


def set_trainable(model, spec, lora_rank=16, lora_alpha=16.0):
    """Freeze the model except what --trainable names; the new head always trains. Returns model.

    head: the head alone; last_block / last_n:K: the last 1 / K transformer blocks and final_norm too; all:
    everything; lora: low-rank adapters on every Linear of the transformer blocks (their weights frozen).
    """
    mode, k = parse_trainable(spec)
    model.requires_grad_(mode == "all")
    if mode == "lora":
        add_lora(model.trf_blocks, lora_rank, lora_alpha)  # the new A and B are trainable
    elif mode in ("last_block", "last_n"):
        k = k or 1
        if k > len(model.trf_blocks):
            raise UserError(f"--trainable last_n:{k} asks for more blocks than the model's {len(model.trf_blocks)}")
        model.trf_blocks[-k:].requires_grad_(True)
        model.final_norm.requires_grad_(True)
    model.out_head.requires_grad_(True)
    return model


def calc_loss_batch(batch, model, device):
    ids, labels, lengths = (t.to(device) for t in batch)
    return F.cross_entropy(last_token_logits(model, ids, lengths).float(), labels)


@torch.no_grad()
def predict_loader(model, loader, device, num_batches=None):
    """Run the classifier over (the first num_batches batches of) loader -> (logits (N, C) float32, labels (N,))."""
    logits, labels = [], []
    for i, (ids, y, lengths) in enumerate(loader):
        if num_batches is not None and i >= num_batches or STOP:  # a stop request ends it at once
            break
        logits.append(last_token_logits(model, ids.to(device), lengths.to(device)).float().cpu())
        labels.append(y)
    if not logits:  # stopped before the first batch
        return torch.zeros(0, 0), torch.zeros(0, dtype=torch.long)
    return torch.cat(logits), torch.cat(labels)


def loss_and_accuracy(logits, labels):
    if len(labels) == 0:
        return math.nan, math.nan
    return F.cross_entropy(logits, labels).item(), (logits.argmax(-1) == labels).float().mean().item()


def classification_metrics(logits, labels, class_names):
    """Loss, accuracy, per-class precision/recall/F1/support and the confusion matrix (rows: true class, columns:
    predicted class). A class never predicted has precision 0."""
    n = len(class_names)
    preds = logits.argmax(-1)
    confusion = torch.zeros(n, n, dtype=torch.long)
    confusion.index_put_((labels, preds), torch.ones_like(labels), accumulate=True)
    per_class = {}
    for c, name in enumerate(class_names):
        tp, predicted, actual = confusion[c, c].item(), confusion[:, c].sum().item(), confusion[c].sum().item()
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {"precision": round(precision, 4), "recall": round(recall, 4), "f1": round(f1, 4),
                           "support": actual}
    loss, accuracy = loss_and_accuracy(logits, labels)
    return {"examples": len(labels), "loss": round(loss, 5), "accuracy": round(accuracy, 5), "per_class": per_class,
            "confusion": confusion.tolist()}


def format_metrics(split, m, class_names):
    width = max(8, *map(len, class_names))
    lines = [f"{split}: accuracy {100 * m['accuracy']:.2f}% on {m['examples']} texts, loss {m['loss']:.3f}",
             f"  {'class':<{width}}  precision  recall     f1  support"]
    for name in class_names:
        c = m["per_class"][name]
        lines.append(f"  {name:<{width}}  {c['precision']:9.3f}  {c['recall']:6.3f}  {c['f1']:5.3f}  {c['support']:7d}")
    rows = ", ".join(f"{name} {row}" for name, row in zip(class_names, m["confusion"]))
    lines.append(f"  confusion (rows true, columns predicted {', '.join(class_names)}): {rows}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------

def read_sms_spam(path):
    """SMSSpamCollection -> list of (text, label), label 'ham' or 'spam'. Lines are split at the first tab only: the
    file has no quoting, and its texts contain quote characters."""
    rows = []
    check_input(path, "the SMS Spam Collection")
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            label, tab, text = line.partition("\t")
            if not tab or not label.strip():
                raise UserError(f"{path} line {line_no} is not `label<TAB>text`: delete the file to download it "
                                f"again")
            rows.append((text, label.strip()))
    return rows


def read_labelled_csv(path, text_column="Text", label_column="Label"):
    """A CSV (a .tsv is read tab-separated) with a header row -> list of (text, label).

    Rows with empty text are skipped, with a note on stderr that counts them and names their lines; a row with text
    but no label is refused. Every problem raises a UserError that says how to fix the file or the flags.
    """
    if not os.path.lexists(path):
        raise UserError(f"no CSV file at {path}: check the path")
    check_input(path, "the CSV file")
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            content = f.read()
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 (bad byte at offset {e.start}): convert it, e.g. "
                        f"`iconv -f latin1 -t utf-8`") from None
    except OSError as e:
        raise UserError(f"cannot read {path} ({e.strerror}): check its permissions") from None
    if not content.strip():
        raise UserError(f"{path} is empty: it needs a header line naming the {label_column!r} and {text_column!r} "
                        f"columns, then one example per row")
    reader = csv.DictReader(io.StringIO(content, newline=""), delimiter="\t" if path.endswith(".tsv") else ",",
                            strict=True)  # a quote never closed is an error, not the rest of the file in one text
    rows, skipped = [], []
    try:
        found = [c for c in (reader.fieldnames or []) if c is not None]
        twice = sorted({c for c in found if found.count(c) > 1})
        if twice:  # DictReader would keep the last of them without a word
            raise UserError(f"{path} names the column(s) {', '.join(map(repr, twice))} more than once in its "
                            f"header: rename them so that each column has its own name")
        missing = [c for c in (text_column, label_column) if c not in found]
        if missing:
            raise UserError(f"{path} has no column {', '.join(map(repr, missing))} (columns found: "
                            f"{', '.join(map(repr, found)) or 'none'}): pass --text_column / --label_column")
        for r in reader:
            text, label = r.get(text_column) or "", (r.get(label_column) or "").strip()
            if not text.strip():
                skipped.append(reader.line_num)
                continue
            if not label:
                raise UserError(f"{path} line {reader.line_num} has text but an empty {label_column!r}: fill in "
                                f"its label or delete the row")
            rows.append((text, label))
    except csv.Error as e:
        fix = ("shorten that text (GPT-2 reads at most 1,024 tokens of it), or fix a quote that is never closed "
               "and runs on into the lines after it" if "field larger" in str(e) else
               "a quote opened on an earlier line is never closed: close it" if "end of data" in str(e) else
               "check its quotes and delimiters (a quoted field holds a quote as two quotes: \"\")")
        raise UserError(f"{path} line {reader.line_num} is not valid CSV ({e}): {fix}") from None
    if skipped:
        note(f"{path}: skipped {len(skipped)} row(s) with empty {text_column!r} (lines {few(skipped)})")
    if not rows:
        raise UserError(f"{path} has no rows with text in column {text_column!r}: add examples")
    return rows


def write_labelled_csv(path, rows, text_column="Text", label_column="Label"):
    """Write (text, label) rows as a CSV with the columns label_column, text_column."""
    def write(f):
        w = csv.writer(f)
        w.writerow([label_column, text_column])
        w.writerows((label, text) for text, label in rows)
    return atomic_write(path, write, "w")


def class_names_of(labels):
    """The sorted distinct labels (numerically when they are all integers): position = class id."""
    names = set(labels)
    if all(re.fullmatch(r"-?\d+", n) for n in names):
        return sorted(names, key=int)
    return sorted(names)


def balance_classes(rows, seed=123):
    """Undersample every class to the size of the smallest, picking rows at random with a fixed seed (the book
    undersamples 'ham' to the 747 'spam' messages)."""
    by_class = {}
    for row in rows:
        by_class.setdefault(row[1], []).append(row)
    n = min(len(v) for v in by_class.values())
    rng = random.Random(seed)
    return [row for label in class_names_of(by_class) for row in rng.sample(by_class[label], n)]


def split_rows(rows, seed=123, train_frac=0.7, val_frac=0.1):
    """Shuffle with a fixed seed and cut into train / validation / test: int(n * 0.7), int(n * 0.1) and the rest."""
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    n_train, n_val = int(len(rows) * train_frac), int(len(rows) * val_frac)
    if n_val == 0 or len(rows) - n_train - n_val == 0:
        raise UserError(f"{len(rows)} examples are too few to split {train_frac:.0%}/{val_frac:.0%}/rest: need at "
                        f"least 10, or pass ready-made --train_csv/--val_csv/--test_csv")
    return rows[:n_train], rows[n_train:n_train + n_val], rows[n_train + n_val:]


class ClassificationDataset(Dataset):
    """Texts as token ids, right-padded with pad_id to max_length: item i is (ids (max_length,), label, length).

    max_length None = the longest text. Longer texts are cut to max_length tokens (`truncated` counts them).
    `length` is the number of real tokens, so a model can read its prediction off the last real token rather than
    off padding. labels None (texts to predict) gives label -1.
    """

    def __init__(self, texts, labels=None, tokenizer=None, max_length=None, pad_id=EOT_ID):
        tokenizer = tokenizer or get_tokenizer()
        encoded = [tokenizer.encode_ordinary(t) for t in texts]  # "<|endoftext|>" in a text is just text here
        self.longest = max(map(len, encoded), default=0)
        self.max_length = max_length or self.longest
        self.truncated = sum(len(ids) > self.max_length for ids in encoded)
        self.input_ids = torch.full((len(encoded), self.max_length), pad_id, dtype=torch.long)
        self.lengths = torch.zeros(len(encoded), dtype=torch.long)
        for i, ids in enumerate(encoded):
            ids = ids[:self.max_length]
            self.input_ids[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            self.lengths[i] = len(ids)
        self.labels = torch.tensor(labels if labels is not None else [-1] * len(encoded), dtype=torch.long)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.input_ids[i], self.labels[i], self.lengths[i]


def check_two_classes(rows, source):
    names = class_names_of(label for _, label in rows)
    if len(names) < 2:
        raise UserError(f"{source} holds a single class ({names[0]!r}, {len(rows)} rows): a classifier needs at "
                        f"least two; check the data or --label_column")
    return names


def label_ids(rows, class_names, source, known_by="the training data"):
    """Labels -> class ids; a label outside class_names is refused, naming it."""
    index = {name: i for i, name in enumerate(class_names)}
    unknown = Counter(label for _, label in rows if label not in index)
    if unknown:
        listed = ", ".join(f"{name!r} ({n} row{'s' * (n > 1)})" for name, n in unknown.most_common(5))
        raise UserError(f"{source} has labels {known_by} does not know: {listed}; known: {', '.join(class_names)}")
    return [index[label] for _, label in rows]


def load_splits(cfg):
    """(train, val, test) lists of (text, label): ready-made CSVs, or one CSV (or the SMS data) balanced and split
    70/10/20 with the seed, the splits written to out_dir."""
    tc, lc = cfg["text_column"], cfg["label_column"]
    if cfg["train_csv"]:
        splits = [read_labelled_csv(cfg[k], tc, lc) for k in ("train_csv", "val_csv", "test_csv")]
        print(f"data: {len(splits[0])} train / {len(splits[1])} val / {len(splits[2])} test texts from "
              f"{cfg['train_csv']}, {cfg['val_csv']}, {cfg['test_csv']}")
        return splits
    if cfg["csv"]:
        source, rows = cfg["csv"], read_labelled_csv(cfg["csv"], tc, lc)
    else:
        with local_main_first():  # under torchrun one process per machine downloads, the others then find the file
            source, rows = "the SMS Spam Collection", read_sms_spam(fetch_sms_spam())
    check_two_classes(rows, source)
    counts = Counter(label for _, label in rows)
    described = f"{len(rows)} texts from {source} ({', '.join(f'{n} {k}' for k, n in sorted(counts.items()))})"
    if cfg["balance"]:
        rarest, n = min(counts.items(), key=lambda kv: (kv[1], kv[0]))
        rows = balance_classes(rows, cfg["seed"])
        described += f", balanced to {n} per class by the rarest class {rarest!r}"
        if len(rows) < sum(counts.values()) / 2:
            note(f"--balance keeps {len(rows)} of the {sum(counts.values())} texts ({n} per class, as many as the "
                 f"rarest class {rarest!r} has): pass --balance false to train on all of them")
    splits = split_rows(rows, cfg["seed"])
    print(f"data: {described}; split {' / '.join(str(len(s)) for s in splits)}")
    return splits


def make_dataset(rows, class_names, max_length, source, known_by="the training data"):
    ds = ClassificationDataset([text for text, _ in rows], label_ids(rows, class_names, source, known_by),
                               max_length=max_length)
    report_truncated(ds, source)
    return ds


def report_truncated(ds, source):
    if ds.truncated:
        note(f"{ds.truncated} of {len(ds)} texts in {source} are longer than {ds.max_length} tokens and were cut "
             f"to their first {ds.max_length} (raise --max_length to keep more)")


# ---------------------------------------------------------------------------------------------------------------
# Building, saving and loading classifiers
# ---------------------------------------------------------------------------------------------------------------

def classify_texts(model, ckpt, texts, device, dtype, batch_size=8):
    """texts -> list of (label, probability of that label, {class: probability})."""
    ds = ClassificationDataset(texts, max_length=ckpt["max_length"], pad_id=ckpt.get("pad_id", EOT_ID))
    report_truncated(ds, "the input")
    with autocast(device, dtype):
        logits, _ = predict_loader(model, DataLoader(ds, batch_size=batch_size), device)
    probs = torch.softmax(logits, dim=-1)
    names = ckpt["class_names"]
    return [(names[int(p.argmax())], p.max().item(), dict(zip(names, p.tolist()))) for p in probs]


# ---------------------------------------------------------------------------------------------------------------
# The four things the script does: train, predict, evaluate, merge LoRA
# ---------------------------------------------------------------------------------------------------------------

def main(argv=None):
    cfg = get_config(DEFAULTS, argv, __doc__, check=check_settings)
    torch.manual_seed(cfg["seed"])
    device = setup_distributed(pick_device(cfg["device"]))  # under torchrun: join the group, take this GPU
    dtype = pick_dtype(cfg["dtype"], device)
    predicts = bool(cfg["predict"] or cfg["predict_file"])
    if not predicts:  # --predict's output is one line per text; it names the device on stderr once it runs
        print(describe_device(device, dtype, cfg["dtype"]) + describe_distributed(cfg))
    checkpoint = cfg["checkpoint"] or default_checkpoint(cfg)
    if predicts:
        return run_predict(cfg, checkpoint, device, dtype)
    if cfg["evaluate"]:
        return run_evaluate(cfg, checkpoint, device, dtype)
    if cfg["merge_lora"]:
        return run_merge(checkpoint, check_output(merged_path(checkpoint), "--merge_lora", cfg["force"]))
    if cfg["save_int8"]:
        return run_save_int8(checkpoint, check_output(cfg["save_int8"], "--save_int8", cfg["force"], [checkpoint]))
    return run_training(cfg, checkpoint, device, dtype, command_line(__file__, argv))


def default_checkpoint(cfg):
    """OUT_DIR/classifier.pth for a CSV's classifier, OUT_DIR/spam_classifier.pth for the SMS data's; to predict or
    evaluate without training, the one that exists."""
    spam, csv = os.path.join(cfg["out_dir"], CLASSIFIER), os.path.join(cfg["out_dir"], CSV_CLASSIFIER)
    if cfg["csv"] or cfg["train_csv"]:
        return csv
    trains = not any(cfg[k] for k in ("predict", "predict_file", "evaluate", "merge_lora", "save_int8"))
    return spam if trains or os.path.exists(spam) or not os.path.exists(csv) else csv


def run_predict(cfg, checkpoint, device, dtype):
    if cfg["predict"]:
        texts = [cfg["predict"]]
        if not texts[0].strip():
            raise UserError("--predict got only whitespace: pass the text to classify")
    else:
        path = cfg["predict_file"]
        lines = read_text_file(path, "--predict_file").splitlines()
        texts = [line for line in lines if line.strip()]
        if not texts:
            raise UserError(f"{path} has no non-empty lines: put one text per line")
        if len(texts) < len(lines):
            note(f"skipped {len(lines) - len(texts)} empty line(s) of {path}")
    model, ckpt = load_classifier(checkpoint, cfg["quantize"])
    model.to(device)
    print(describe_device(device, dtype, cfg["dtype"]), file=sys.stderr)
    results = classify_texts(model, ckpt, texts, device, dtype, cfg["batch_size"])
    for text, (label, prob, _) in zip(texts, results):
        print(f"{label}\t{prob:.4f}\t{text}")
    return [{"text": t, "label": label, "probability": p, "probabilities": ps} for t, (label, p, ps) in
            zip(texts, results)]


def run_evaluate(cfg, checkpoint, device, dtype):
    path = cfg["test_csv"] or cfg["csv"] or os.path.join(cfg["out_dir"], "test.csv")
    if not os.path.exists(path):
        raise UserError(f"no CSV to evaluate at {path}: pass --test_csv (train first to get {path})")
    model, ckpt = load_classifier(checkpoint, cfg["quantize"])
    model.to(device)
    rows = read_labelled_csv(path, cfg["text_column"], cfg["label_column"])
    ds = make_dataset(rows, ckpt["class_names"], ckpt["max_length"], path, known_by="the classifier")
    with autocast(device, dtype):
        logits, labels = predict_loader(model, DataLoader(ds, batch_size=cfg["batch_size"]), device)
    metrics = classification_metrics(logits, labels, ckpt["class_names"])
    int8 = ", int8 weights" if any(isinstance(m, Int8Linear) for m in model.modules()) else ""
    print(f"classifier {checkpoint} ({', '.join(ckpt['class_names'])}, max_length {ckpt['max_length']}{int8})")
    print(format_metrics(path, metrics, ckpt["class_names"]))
    return metrics


def merged_path(checkpoint):
    return (checkpoint[:-4] if checkpoint.endswith(".pth") else checkpoint) + "_merged.pth"


def run_merge(checkpoint, out):
    model, ckpt = load_classifier(checkpoint)
    if not ckpt.get("lora"):
        raise UserError(f"{checkpoint} has no LoRA adapters (trained with --trainable {ckpt.get('trainable')}): "
                        f"nothing to merge")
    merge_lora(model)
    keep = {**{k: ckpt[k] for k in CLS_KEYS if k in ckpt}, "lora": None, "merged_from": checkpoint}
    save_pth(out, checkpoint_dict(model, "cls", **keep))
    print(f"folded the rank-{ckpt['lora']['rank']} adapters into the weights of {checkpoint}; wrote {out}")
    return out


def run_save_int8(checkpoint, out):
    model, ckpt = load_classifier(checkpoint, quantize="int8")
    save_pth(out, checkpoint_dict(model, "cls", **{**{k: ckpt[k] for k in CLS_KEYS if k in ckpt}, "lora": None},
                                  quantize="int8", quantized_from=checkpoint))
    print(f"wrote {out} ({os.path.getsize(out) / 2**20:.1f} MiB, int8 weights; {checkpoint}: "
          f"{os.path.getsize(checkpoint) / 2**20:.1f} MiB)")
    return out


SPLITS = ("train.csv", "validation.csv", "test.csv")


def run_training(cfg, checkpoint, device, dtype, command=""):
    outputs = [checkpoint] + [os.path.join(cfg["out_dir"], name) for name in
                              ("metrics.json", "accuracy-plot.png", *(SPLITS if not cfg["train_csv"] else ()))]
    folder = RunFolder(cfg, outputs, command, RUN_SETTINGS, INPUTS) if not cfg["dry_run"] else None
    with folder or contextlib.nullcontext() as run:
        return train_classifier(cfg, checkpoint, device, dtype, run)


def get_lr(step, total_steps, cfg):
    """The learning rate of optimizer step `step`: --lr, after --warmup_steps, cosine-decayed with --lr_schedule."""
    return lr_at_step(step, total_steps, cfg["lr"], cfg["lr_schedule"], cfg["warmup_steps"], cfg["min_lr"])


def evaluate(model, eval_loaders, cfg, device, dtype, where, epoch_end=False):
    """Loss and accuracy on the first --eval_iters batches of the training and validation splits, printed after
    `where`; at an epoch's end (what the book prints then) logged as epoch_train_loss and so on."""
    was_training = model.training
    model.eval()
    metrics = {}
    with autocast(device, dtype):
        for split in ("train", "val"):
            loss, acc = loss_and_accuracy(*predict_loader(model, eval_loaders[split], device, cfg["eval_iters"]))
            metrics.update({f"{split}_loss": round(loss, 5), f"{split}_acc": round(acc, 5)})
    model.train(was_training)
    if STOP:  # cut short by a stop request: nothing to log
        return {}
    m = metrics
    if epoch_end:
        tqdm.write(f"{where}: train loss {m['train_loss']:.3f}, val loss {m['val_loss']:.3f}, train acc "
                   f"{100 * m['train_acc']:.2f}%, val acc {100 * m['val_acc']:.2f}%")
        return {f"epoch_{k}": v for k, v in metrics.items()}
    tqdm.write(f"{where}: " + " ".join(f"{k} {m[k]:.3f}" for k in ("train_loss", "val_loss", "train_acc", "val_acc")))
    return metrics


def epoch_metrics(rows):
    """metrics.json's per-epoch entries, from the log rows of the steps that ended an epoch."""
    return [{"epoch": round(r["epoch"]), **{k[len("epoch_"):]: r[k] for k in r if k.startswith("epoch_")}}
            for r in rows if "epoch_val_acc" in r]


def train(model, train_loader, eval_loaders, cfg, device, dtype, run, extra):
    """The book's train_classifier_simple with resume, signals and several processes: every step its learning rate,
    micro-batches of forward, loss and backward, clipping, the optimizer step and a row in log.csv; losses and
    accuracies every --eval_freq steps, and on the whole splits after each epoch. Returns the rows of log.csv."""
    accum, world, rank = cfg["grad_accum_steps"], world_size(), process_rank()
    batches = batches_per_epoch(train_loader, world)
    steps_per_epoch, total_steps = count_steps(batches, accum, cfg["epochs"], cfg["max_steps"])
    fwd_model, step_model = wrap_model(model, device, dtype, cfg["fsdp"], cfg["compile"])
    optimizer = make_optimizer(model, cfg["lr"], cfg["weight_decay"], device)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype is torch.float16)
    state_path = run.path(TRAIN_STATE)
    start = start_position(state_path, model, optimizer, device, batches, cfg["resume"], cfg["seed"], cfg["fsdp"])
    step, epoch, batch_pos, tokens_seen = (start[k] for k in POSITION)
    log = StepLog(run.path("log.csv"), step if cfg["resume"] else None, run.logger)
    guard = DivergenceGuard(state_path, cfg["lr"], cfg["weight_decay"], step if cfg["resume"] else None)

    def save():  # every process calls it (gathering shards and random states needs them all)
        guard.weights(model, step)
        position = dict(zip(POSITION, (step, epoch, batch_pos, tokens_seen)), batches_per_epoch=batches)
        save_train_state(state_path, model, optimizer, device, position, "cls", cfg, **extra)
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
                batch = next(data)
                with grad_sync(step_model, last=i == accum - 1):
                    with autocast(device, dtype):
                        loss = calc_loss_batch(batch, step_model, device)
                    guard.loss(loss, step + 1)
                    scaler.scale(loss / accum).backward()
                loss_sum, step_tokens = loss_sum + loss.item() / accum, step_tokens + batch[0].numel() * world
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
            if batch_pos + accum > batches:  # the epoch is done: the book reports both splits whole here
                epoch, batch_pos = epoch + 1, 0
                data = loader_batches(train_loader, epoch, 0, cfg["seed"], rank, world)
                row.update(evaluate(fwd_model, eval_loaders, cfg, device, dtype, f"epoch {epoch}", epoch_end=True))
            if step == 1 or step % cfg["eval_freq"] == 0 or step == total_steps:
                where = f"ep {(step - 1) // steps_per_epoch + 1} (step {step:06d})"  # the epoch the step was in
                row.update(evaluate(fwd_model, eval_loaders, cfg, device, dtype, where))
            progress.resume_clock()
            log.append(row)
            if any_process(bool(stop)):  # every process stops at the same step
                save()
                progress.close()
                stop.leave(f"at step {step}: saved {state_path}; continue with --resume")
            if "val_loss" in row:
                plot_losses(log.rows, steps_per_epoch, run.path("loss-plot.png"))
                plot_losses(log.rows, steps_per_epoch, run.path("accuracy-plot.png"), ACCURACIES, "accuracy")
                if cfg["save_best"]:  # best.pth: the model at its lowest validation loss so far
                    save_best(run.path(BEST), model, "cls", log.rows, **extra)
            if cfg["save_every"] and step % cfg["save_every"] == 0 and step < total_steps:
                save()
        progress.close()
        save()  # the last one, inside catch_signals: a signal now waits for it
    return log.rows


def train_classifier(cfg, checkpoint, device, dtype, run):
    train_rows, val_rows, test_rows = splits = load_splits(cfg)
    class_names = check_two_classes(train_rows, "the training split")
    train_texts, train_labels = [t for t, _ in train_rows], label_ids(train_rows, class_names, "the training split")
    train_ds = ClassificationDataset(train_texts, train_labels, max_length=cfg["max_length"] or None)
    model, _ = build_model(cfg, context_length=cfg["context_length"] or train_ds.max_length, qkv_bias=False,
                           tie_weights=False)
    context = model.cfg["context_length"]
    if train_ds.max_length > context:
        if cfg["max_length"]:
            raise UserError(f"--max_length {cfg['max_length']} exceeds the model's context_length {context}: lower "
                            f"it")
        train_ds = ClassificationDataset(train_texts, train_labels, max_length=context)
    max_length = train_ds.max_length
    report_truncated(train_ds, "the training split")
    val_ds = make_dataset(val_rows, class_names, max_length, "the validation split")
    test_ds = make_dataset(test_rows, class_names, max_length, "the test split")

    replace_head(model, len(class_names))
    set_trainable(model, cfg["trainable"], cfg["lora_rank"], cfg["lora_alpha"])
    if cfg["init"] == "scratch" and cfg["trainable"] != "all":
        note(f"--init scratch with --trainable {cfg['trainable']} leaves most random weights frozen: pass "
             f"--trainable all")

    train_loader = DataLoader(train_ds, batch_size=cfg["batch_size"], shuffle=True, drop_last=True)
    eval_loaders = {name: DataLoader(ds, batch_size=cfg["batch_size"]) for name, ds in
                    (("train", train_ds), ("val", val_ds), ("test", test_ds))}
    if cfg["dry_run"]:
        mode, k = parse_trainable(cfg["trainable"])
        blocks = {"head": 0, "last_block": 1, "last_n": k}.get(mode)  # blocks that need backward; None = all
        return print_dry_run(model.cfg, cfg, len(train_loader), dtype, device, total_params=count_parameters(model),
                             trainable_params=count_parameters(model, True), context_length=max_length,
                             trainable_layers=blocks, out_dim=len(class_names))
    # with --fsdp the whole model stays in CPU memory; wrap_model moves only this process's shard to the GPU
    model.to(torch.device("cpu") if cfg["fsdp"] and world_size() > 1 else device)
    print(f"{count_parameters(model):,} parameters, {count_parameters(model, trainable_only=True):,} trainable "
          f"(--trainable {cfg['trainable']}); {len(class_names)} classes ({', '.join(class_names)}), max_length "
          f"{max_length}; {len(train_ds)} train / {len(val_ds)} val / {len(test_ds)} test texts; "
          f"settings: {changed_settings(cfg, DEFAULTS)}")

    extra = {"class_names": class_names, "max_length": max_length, "pad_id": EOT_ID,
             "text_column": cfg["text_column"], "label_column": cfg["label_column"], "trainable": cfg["trainable"],
             "lora": ({"rank": cfg["lora_rank"], "alpha": cfg["lora_alpha"]} if cfg["trainable"] == "lora"
                      else None)}
    start = time.time()
    rows = []
    if cfg["epochs"]:
        rows = train(model, train_loader, eval_loaders, cfg, device, dtype, run, extra)
        if not run.is_started and os.path.isfile(checkpoint):  # --resume of a finished run, nothing to do
            return {}
    run.started()  # --epochs 0 writes its metrics and splits too
    train_time = time.time() - start

    model.eval()
    results = {}
    for name, loader in eval_loaders.items():
        with autocast(device, dtype):
            results[name] = classification_metrics(*predict_loader(model, loader, device), class_names)
        print(format_metrics(name, results[name], class_names))
    summary = {"class_names": class_names, "max_length": max_length, "train_time_s": round(train_time, 1),
               "parameters": count_parameters(model), "trainable_parameters": count_parameters(model, True),
               "settings": cfg, "epochs": epoch_metrics(rows), **results}
    written = [run.path("metrics.json")]
    if is_main_process():
        write_json(written[0], summary)
        if not cfg["train_csv"]:  # the splits made here, for --evaluate and for a look
            for name, part in zip(SPLITS, splits):
                written.append(write_labelled_csv(run.path(name), part, cfg["text_column"], cfg["label_column"]))
    if not cfg["epochs"]:
        print(f"no training (--epochs 0); wrote {', '.join(written)}")
        return summary
    accuracy = {name: m["accuracy"] for name, m in results.items()}
    # every process calls save_model (FSDP gathers the shards), rank 0 writes
    written.insert(0, save_model(checkpoint, model, kind="cls", **extra, step=rows[-1]["step"] if rows else 0,
                                 accuracy=accuracy))
    written += [p for p in (run.path("log.csv"), run.path("loss-plot.png"), run.path("accuracy-plot.png"))
                if os.path.exists(p)]
    print(f"done in {train_time:.0f} s of training: accuracy train {100 * accuracy['train']:.2f}%, val "
          f"{100 * accuracy['val']:.2f}%, test {100 * accuracy['test']:.2f}%; wrote {', '.join(written)}")
    return summary


if __name__ == "__main__":
    entry(main)
