"""Teach GPT-2 to follow instructions (supervised fine-tuning), then to prefer better answers: offline from
preference pairs (DPO), or with RLHF: a reward model trained on the pairs, then online policy optimization.

    python finetune_chat.py                                  # the book's run: gpt2-medium, instruction-data.json
    python finetune_chat.py --init scratch --n_layers 4 --emb_dim 256 --n_heads 4 --context_length 256 \\
        --data my_chats.jsonl --mask_instruction --out_dir runs/chat-small    # own records or conversations
    python finetune_chat.py --method dpo --init runs/chat/gpt2-medium355M-sft.pth   # preference tuning after SFT
    python finetune_chat.py --method rm                      # reward model: the SFT model with a scalar head
    python finetune_chat.py --method grpo --reward_model runs/chat-rm/gpt2-medium355M-rm.pth   # RL against it

Then talk to the result: python generate.py --chat --checkpoint runs/chat/gpt2-medium355M-sft.pth

Records are JSON or JSONL: {"instruction", "input", "output"} like the book's, or {"messages": [{"role": "user" |
"assistant", "content"}, ...]}; DPO and reward-model records have "chosen" and "rejected" responses; grpo/rloo use
the prompts alone. The prompt template is the book's Alpaca one (data.format_input), shared with evaluation and
generate.py --chat.
"""
import copy
import json
import math
import os
import random
import re
import string
import sys
import time
from collections import Counter
from contextlib import nullcontext
from copy import deepcopy
from functools import partial

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from checkpoints import load_classifier
from data import (DATA_FILES, EOT_ID, IGNORE_INDEX, TEMPLATE_NAME, conversation_segments, cut_reply, encode_segments,
                  fetch_data, format_prompt, get_tokenizer, read_text_file, record_segments)
from files import parse_json, write_json
from layers import add_lora, merge_lora
from model import count_parameters, generate_stream
from settings import (UserError, autocast, available_memory, changed_settings, check_training, describe_device, entry,
                      get_config, pick_device, pick_dtype, training_settings)
from trainer import (BEST, POSITION, STOP, TRAIN_STATE, DivergenceGuard, Progress, RunFolder, StepLog, any_process,
                     batches_per_epoch, build_model, calc_loss_batch, calc_loss_loader, catch_signals, clip_gradients,
                     command_line, count_steps, describe_distributed, evaluate_model, finished, grad_sync, is_best,
                     is_main_process, last_token_logits, loader_batches, local_main_first, lr_at_step, make_optimizer,
                     plot_losses, print_dry_run, process_rank, progress_bar, save_best, save_model, save_train_state,
                     setup_distributed, start_position, world_size, wrap_model)

DEFAULTS = dict(
    method="sft",              # sft (learn the outputs) | dpo (prefer chosen over rejected; from SFT) | rm (a reward
                               # model from the same pairs) | grpo | rloo (online RL against --reward, from SFT)
    data="",                   # JSON or JSONL records; "" = the book's data for --method, downloaded on first use
    out_dir="",                # "" = runs/chat (sft) or runs/chat-dpo (dpo)
    init="",                   # gpt2 | gpt2-medium | ... | scratch | PATH.pth; "" = gpt2-medium (sft), else the SFT's
                               # .pth
    model="gpt2",              # architecture when init=scratch: gpt2 | gpt2-medium | gpt2-large | gpt2-xl
    context_length=1024,       # tokens in a scratch model's position table
    emb_dim=0,                 # scratch model width; 0 = the size of --model
    n_heads=0,                 # scratch model heads; 0 = the size of --model
    n_layers=0,                # scratch model blocks; 0 = the size of --model
    drop_rate=0.0,             # dropout probability while training; 0 = off (as the book fine-tunes)
    trainable="all",           # all | lora (train low-rank adapters only; merged into the weights when saved)
    lora_rank=16,              # rank of each LoRA adapter
    lora_alpha=16.0,           # LoRA scale: the low-rank update is multiplied by alpha / rank
    train_ratio=0.85,          # share of records that train (after the shuffle of --split_seed)
    test_ratio=0.10,           # share that is answered and scored after training; the rest validates
    split_seed=123,            # shuffles the records before the split; -1 = file order (the book's split)
    allowed_max_length=1024,   # longest training sequence in tokens (and at most the model's context); longer are cut
    mask_instruction=False,    # learn the responses only: prompt tokens get no loss (sft)
    beta=None,                 # pull towards the reference (SFT) model, higher = stays closer: DPO's beta, or the
                               # weight of the KL penalty in grpo/rloo; None = 0.1 (dpo), 0.04 (grpo, rloo)
    max_new_tokens=None,       # longest answer: to a test record (sft, greedy; 0 = skip answering) or per rollout
                               # (grpo/rloo); None = 256 (sft), 64 (grpo, rloo)
    reward="model",            # grpo/rloo: model (the --reward_model) | contains:WORD | max_words:N (see REWARDS)
    reward_model="",           # grpo/rloo: a reward model (--method rm's .pth) that scores the answers
    group_size=4,              # grpo/rloo: answers sampled per prompt; each is judged against its group
    prompts_per_step=4,        # grpo/rloo: prompts per batch of rollouts (per process under torchrun)
    ppo_epochs=2,              # grpo/rloo: passes over each batch of rollouts
    minibatches=1,             # grpo/rloo: updates per pass over a batch of rollouts
    clip=0.2,                  # grpo/rloo: PPO's clip range of the probability ratio pi / pi_old
    temperature=1.0,           # grpo/rloo: sampling temperature of the rollouts
    **training_settings(
        batch_size=8,          # records per micro-batch (per process under torchrun)
        epochs=None,           # passes over the training records; None = 2 (sft), 1 (the others)
        lr=None,               # peak learning rate; None = 5e-5 (sft), 5e-6 (dpo), 1e-5 (rm), 1e-6 (grpo, rloo)
        weight_decay=None,     # AdamW weight decay; None = 0.1 (sft), 0.01 (dpo), 0 (rm, grpo, rloo)
        eval_freq=None,        # evaluate every this many steps; None = 5, or 1 for grpo/rloo (their step logs)
        eval_iters=5,          # batches of each split per evaluation
    ),
)

# each method's settings where one is left at None / "": sft and dpo as the book; rm and rl start from the SFT model
_SFT = "runs/chat/gpt2-medium355M-sft.pth"
_PAIRS = "instruction-data-with-preference.json"
_RL = dict(epochs=1, lr=1e-6, weight_decay=0.0, init=_SFT, data=_PAIRS, beta=0.04, max_new_tokens=64, eval_freq=1)
METHOD_DEFAULTS = {
    "sft": dict(epochs=2, lr=5e-5, weight_decay=0.1, out_dir="runs/chat", init="gpt2-medium",
                data="instruction-data.json", beta=0.1, max_new_tokens=256, eval_freq=5),
    "dpo": dict(epochs=1, lr=5e-6, weight_decay=0.01, out_dir="runs/chat-dpo", init=_SFT, data=_PAIRS, beta=0.1,
                max_new_tokens=256, eval_freq=5),
    "rm": dict(epochs=1, lr=1e-5, weight_decay=0.0, out_dir="runs/chat-rm", init=_SFT, data=_PAIRS, beta=0.1,
               max_new_tokens=256, eval_freq=5),
    "grpo": dict(_RL, out_dir="runs/chat-grpo"),
    "rloo": dict(_RL, out_dir="runs/chat-rloo"),
}
RL_METHODS = ("grpo", "rloo")
# what this run is: --resume with another value of one of these would continue it as another run
RUN_SETTINGS = ("method", "model", "context_length", "emb_dim", "n_heads", "n_layers", "drop_rate", "trainable",
                "lora_rank", "lora_alpha", "batch_size", "grad_accum_steps", "seed", "train_ratio", "test_ratio",
                "split_seed", "allowed_max_length", "mask_instruction", "reward", "group_size", "prompts_per_step",
                "fsdp")
INPUTS = ("data", "init", "reward_model")  # settings that name files the run reads (never written over)
# output names of the book's chapter 7 for OpenAI's sizes
BOOK_NAMES = {"gpt2": "gpt2-small124M", "gpt2-medium": "gpt2-medium355M", "gpt2-large": "gpt2-large774M",
              "gpt2-xl": "gpt2-xl1558M"}


def resolve_settings(cfg):
    """cfg with the method's defaults filled in where a setting was left at None or ""."""
    if cfg["method"] not in METHOD_DEFAULTS:
        raise UserError(f"--method must be sft, dpo, rm, grpo or rloo, got {cfg['method']!r}")
    out = dict(cfg)
    for k, v in METHOD_DEFAULTS[cfg["method"]].items():
        if out[k] is None or out[k] == "":
            out[k] = v
    return out


def check_settings(cfg):
    cfg = resolve_settings(cfg)
    for k, default in METHOD_DEFAULTS[cfg["method"]].items():  # the settings left at None have no type of their own
        if isinstance(default, int) and not isinstance(cfg[k], int):
            raise UserError(f"--{k} must be a whole number, got {cfg[k]!r}")
        if isinstance(default, float) and not isinstance(cfg[k], (int, float)):
            raise UserError(f"--{k} must be a number, got {cfg[k]!r}")
    check_training(cfg)
    if cfg["epochs"] < 1:
        raise UserError(f"--epochs must be at least 1, got {cfg['epochs']}")
    if cfg["trainable"] not in ("all", "lora"):
        raise UserError(f"--trainable must be all or lora, got {cfg['trainable']!r}")
    if cfg["lora_rank"] < 1 or cfg["lora_alpha"] <= 0:
        raise UserError("--lora_rank must be at least 1 and --lora_alpha > 0")
    if not (0 < cfg["train_ratio"] < 1 and 0 <= cfg["test_ratio"] < 1 and cfg["train_ratio"] + cfg["test_ratio"] < 1):
        raise UserError(f"--train_ratio {cfg['train_ratio']} and --test_ratio {cfg['test_ratio']} must leave a "
                        f"share for validation: both in [0, 1) with a sum below 1")
    if cfg["allowed_max_length"] < 2:
        raise UserError(f"--allowed_max_length must be at least 2, got {cfg['allowed_max_length']}")
    if not cfg["beta"] > 0:
        raise UserError(f"--beta must be > 0, got {cfg['beta']}")
    if cfg["max_new_tokens"] < 0:
        raise UserError(f"--max_new_tokens must be >= 0 (0 = skip answering the test split), got "
                        f"{cfg['max_new_tokens']}")
    if cfg["method"] in RL_METHODS:
        check_rl_settings(cfg)
    if cfg["fsdp"] and cfg["trainable"] == "lora":
        raise UserError("--fsdp with --trainable lora is not supported (the adapters are merged into sharded "
                        "weights when saved): drop --fsdp to train the adapters with DDP")


def check_rl_settings(cfg):
    for k in ("group_size", "prompts_per_step", "ppo_epochs", "minibatches", "max_new_tokens"):
        if cfg[k] < 1:
            raise UserError(f"--{k} must be at least 1 for --method {cfg['method']}, got {cfg[k]}")
    if cfg["group_size"] < 2:
        raise UserError("--group_size must be at least 2: each answer is judged against the others to its prompt")
    if cfg["minibatches"] > cfg["group_size"] * cfg["prompts_per_step"]:
        raise UserError("--minibatches is larger than the rollouts of a step (--group_size x --prompts_per_step)")
    if not 0 < cfg["clip"] < 1 or not cfg["temperature"] > 0:
        raise UserError(f"--clip must be in (0, 1) and --temperature > 0, got {cfg['clip']} and {cfg['temperature']}")
    name = cfg["reward"].partition(":")[0]
    if cfg["reward"] != "model" and (name not in REWARDS or not cfg["reward"].partition(":")[2]):
        raise UserError(f"--reward must be model or NAME:ARGUMENT with NAME one of {', '.join(REWARDS)} (e.g. "
                        f"contains:blue), got {cfg['reward']!r}")
    if cfg["reward"].startswith("max_words:") and not re.fullmatch(r"[0-9]+", cfg["reward"][10:]):
        raise UserError(f"--reward max_words:N needs a whole number N, got {cfg['reward']!r}")
    if cfg["fsdp"]:
        raise UserError("--fsdp is not available for grpo/rloo (each process samples answers of its own length, "
                        "which sharded weights cannot follow): drop --fsdp to use DDP")


# ---------------------------------------------------------------------------------------------------------------
# Records: instructions, conversations and preference pairs (JSON or JSONL), their datasets and collate functions
# ---------------------------------------------------------------------------------------------------------------

def _parse_json_records(text, path):
    """A JSON list of records, or JSON Lines (one record per line); malformed JSON names its line and column."""
    def malformed(e, line=None):
        return UserError(f"{path}, line {line or e.lineno}, column {e.colno}: malformed JSON ({e.msg}): fix the "
                         f"file (a JSON list of records, or one record per line)")

    if not path.endswith(".jsonl"):
        try:
            records = parse_json(text, path)
        except json.JSONDecodeError as e:
            if e.msg != "Extra data":  # "Extra data" after the first value: probably JSON Lines
                raise malformed(e) from None
        else:
            if not isinstance(records, list):
                raise UserError(f"{path} holds a JSON {type(records).__name__}, expected a list of records "
                                f"[{{...}}, ...] or one record per line (JSONL)")
            return records
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                records.append(parse_json(line, f"{path}, line {n}"))
            except json.JSONDecodeError as e:
                raise malformed(e, n) from None
    return records


def _check_messages(messages, where):
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: 'messages' must be a non-empty list of {{\"role\", \"content\"}} objects")
    expected = "user"
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise UserError(f"{where}: messages[{j}] needs a 'role' and a 'content' field")
        if not isinstance(m["content"], str):
            raise UserError(f"{where}: messages[{j}].content is a {type(m['content']).__name__}, expected text")
        if j == 0 and m["role"] == "system":
            continue
        if m["role"] != expected:
            raise UserError(f"{where}: messages[{j}] has role {m['role']!r} where {expected!r} was expected: turns "
                            f"alternate user, assistant, ... (an optional system message first)")
        expected = "assistant" if expected == "user" else "user"
    if messages[-1]["role"] != "assistant":
        raise UserError(f"{where}: the last message must be the assistant's reply, the text the model learns")


def load_records(path, required=("instruction", "output"), optional=("input",), allow_messages=True):
    """Records of a JSON or JSONL file, checked: each is an object with the required text fields (or, where
    allow_messages, a "messages" conversation). Raises UserError naming the file, record index and field."""
    records = _parse_json_records(read_text_file(path), path)
    if not records:
        raise UserError(f"{path} holds no records: add some, e.g. "
                        f"{{\"instruction\": ..., \"input\": \"\", \"output\": ...}}")
    for i, r in enumerate(records):
        where = f"{path}: record {i} (0-based)"
        if not isinstance(r, dict):
            raise UserError(f"{where} is a JSON {type(r).__name__}, expected an object with "
                            f"{', '.join(required)}" + (" (or messages)" if allow_messages else ""))
        if allow_messages and "messages" in r:
            _check_messages(r["messages"], where)
            continue
        for field in required:
            if field not in r:
                raise UserError(f"{where} has no {field!r} field: every record needs {', '.join(required)}"
                                + (", or a 'messages' conversation" if allow_messages else ""))
        for field in (*required, *optional):
            if field in r and not isinstance(r[field], str):
                raise UserError(f"{where}: field {field!r} is a JSON {type(r[field]).__name__}, expected text")
    return records


def load_preference_records(path):
    """Records with instruction, chosen and rejected (input optional), as instruction-data-with-preference.json."""
    records = load_records(path, required=("instruction", "chosen", "rejected"), optional=("input", "output"),
                           allow_messages=False)
    for i, r in enumerate(records):
        for field in ("chosen", "rejected"):
            if not r[field].strip():
                raise UserError(f"{path}: record {i} (0-based) has an empty {field!r} response: DPO compares two "
                                f"non-empty answers; fill it in or drop the record")
    return records


def split_records(records, train_ratio=0.85, test_ratio=0.10, seed=None):
    """(train, test, val) lists: the book's 85/10/5 split, after a shuffle with `seed` (None keeps file order)."""
    records = list(records)
    if seed is not None:
        random.Random(seed).shuffle(records)
    n_train, n_test = int(len(records) * train_ratio), int(len(records) * test_ratio)
    return records[:n_train], records[n_train:n_train + n_test], records[n_train + n_test:]


class InstructionDataset(Dataset):
    """Instruction records (or conversations), tokenized once in the template.

    Item i is the list of token ids, or (ids, learn) with mask_instruction, where learn[j] marks response tokens.
    With max_length, records longer than that are counted in `truncated` (the collate cuts them); under
    mask_instruction, those whose response falls wholly beyond the cut teach nothing and are dropped (`skipped`).
    """

    def __init__(self, data, tokenizer=None, mask_instruction=False, max_length=None):
        tokenizer = tokenizer or get_tokenizer()
        self.mask_instruction = mask_instruction
        self.encoded_texts, self.learn = [], []
        self.truncated = self.skipped = 0
        for record in data:
            ids, learn = encode_segments(record_segments(record), tokenizer)
            if max_length and len(ids) > max_length:
                # target j predicts token j + 1; the end-of-text after the record falls beyond the cut
                if mask_instruction and not any(learn[1:max_length + 1]):
                    self.skipped += 1
                    continue
                self.truncated += 1
            self.encoded_texts.append(ids)
            self.learn.append(learn)

    def __len__(self):
        return len(self.encoded_texts)

    def __getitem__(self, i):
        if self.mask_instruction:
            return self.encoded_texts[i], self.learn[i]
        return self.encoded_texts[i]


def custom_collate_fn(batch, pad_token_id=EOT_ID, ignore_index=IGNORE_INDEX, allowed_max_length=None, device=None):
    """Token id lists (or (ids, learn) pairs) -> (inputs, targets), both (B, T) LongTensors.

    Each sequence gets one end-of-text appended and is padded with pad_token_id to the longest in the batch; the
    targets are the inputs shifted by one. The end-of-text is a target (the model learns to stop), every padding
    position after it is ignore_index, and so is every target whose learn flag is False (the prompt, under
    --mask_instruction). Then both are cut to allowed_max_length.
    """
    pairs = [item if isinstance(item, tuple) else (item, None) for item in batch]
    longest = max(len(ids) for ids, _ in pairs) + 1
    inputs, targets = [], []
    for ids, learn in pairs:
        n = len(ids)
        padded = torch.tensor(list(ids) + [pad_token_id] * (longest - n))
        x, y = padded[:-1], padded[1:].clone()  # y[j] = padded[j + 1]; y[n - 1] is the end-of-text
        y[n:] = ignore_index
        if learn is not None:
            prompt = ~torch.tensor(list(learn[1:]), dtype=torch.bool)  # targets 0..n-2 are tokens 1..n-1
            y[:n - 1][prompt] = ignore_index
        inputs.append(x)
        targets.append(y)
    inputs, targets = torch.stack(inputs), torch.stack(targets)
    if allowed_max_length is not None:
        inputs, targets = inputs[:, :allowed_max_length], targets[:, :allowed_max_length]
    if device is not None:
        inputs, targets = inputs.to(device), targets.to(device)
    return inputs, targets


class PreferenceDataset(Dataset):
    """Preference records -> dicts of token ids: prompt (template + response header), chosen and rejected (each
    the prompt followed by that response). Records whose prompt leaves no room for a response within max_length
    are dropped and counted in `skipped`; longer ones are counted in `truncated` (the collate cuts them)."""

    def __init__(self, data, tokenizer=None, max_length=None):
        tokenizer = tokenizer or get_tokenizer()
        self.encoded, self.truncated, self.skipped = [], 0, 0
        for record in data:
            prompt = tokenizer.encode(format_prompt(record), allowed_special={"<|endoftext|>"})
            chosen = prompt + tokenizer.encode(record["chosen"], allowed_special={"<|endoftext|>"})
            rejected = prompt + tokenizer.encode(record["rejected"], allowed_special={"<|endoftext|>"})
            if max_length and len(prompt) >= max_length:
                self.skipped += 1
                continue
            if max_length and max(len(chosen), len(rejected)) > max_length:
                self.truncated += 1
            self.encoded.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})

    def __len__(self):
        return len(self.encoded)

    def __getitem__(self, i):
        return self.encoded[i]


def preference_collate_fn(batch, pad_token_id=EOT_ID, allowed_max_length=None, mask_prompt=True, device=None):
    """PreferenceDataset items -> dict of (B, T) tensors: chosen, rejected (padded to one common length) and
    chosen_mask, rejected_mask (True on the tokens whose log-probability counts: the response, or with
    mask_prompt=False every real token)."""
    longest = max(max(len(item["chosen"]), len(item["rejected"])) for item in batch)
    out = {"chosen": [], "rejected": [], "chosen_mask": [], "rejected_mask": []}
    for item in batch:
        n_prompt = len(item["prompt"]) if mask_prompt else 0
        for key in ("chosen", "rejected"):
            ids = item[key]
            mask = torch.zeros(longest, dtype=torch.bool)
            mask[n_prompt:len(ids)] = True
            out[key].append(torch.tensor(list(ids) + [pad_token_id] * (longest - len(ids))))
            out[key + "_mask"].append(mask)
    out = {k: torch.stack(v)[:, :allowed_max_length] for k, v in out.items()}
    if device is not None:
        out = {k: v.to(device) for k, v in out.items()}
    return out


# ---------------------------------------------------------------------------------------------------------------
# Offline scores of generated answers against reference answers (no external judge)
# ---------------------------------------------------------------------------------------------------------------

def normalize_words(text):
    """Lower-case words with punctuation removed: the unit every score below compares."""
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    return text.split()


def exact_match(prediction, reference):
    """1.0 when both have the same words (ignoring case, punctuation and spacing), else 0.0."""
    return float(normalize_words(prediction) == normalize_words(reference))


def token_f1(prediction, reference):
    """Harmonic mean of word precision and recall, counting each shared word as often as both contain it."""
    pred, ref = normalize_words(prediction), normalize_words(reference)
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def lcs_length(a, b):
    """Length of the longest common subsequence of two lists (dynamic programming, two rows)."""
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(prediction, reference):
    """ROUGE-L F1: precision and recall of the longest common word subsequence."""
    pred, ref = normalize_words(prediction), normalize_words(reference)
    if not pred or not ref:
        return float(pred == ref)
    lcs = lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def score_responses(predictions, references):
    """Mean exact match, token F1 and ROUGE-L over pairs of answers."""
    n = len(references)
    return {"exact_match": sum(map(exact_match, predictions, references)) / n,
            "token_f1": sum(map(token_f1, predictions, references)) / n,
            "rouge_l": sum(map(rouge_l, predictions, references)) / n}


@torch.no_grad()
def reference_perplexity(model, records, device, max_length, batch_size=8, dtype=torch.float32):
    """exp(mean negative log-likelihood) of the reference answers (and the end-of-text after them), given their
    prompts: how unsurprising the model finds the answers it should give."""
    dataset = InstructionDataset(records, mask_instruction=True, max_length=max_length)
    loader = DataLoader(dataset, batch_size, collate_fn=partial(custom_collate_fn, allowed_max_length=max_length))
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    for inputs, targets in loader:
        with autocast(device, dtype):
            logits = model(inputs.to(device))
        targets = targets.to(device)
        nll += F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum").item()
        count += int((targets >= 0).sum())
    model.train(was_training)
    return math.exp(nll / count) if count else float("nan")


def prompt_and_reference(record):
    """The prompt pieces a test record gives the model, and the answer it should give."""
    if "messages" in record:
        return conversation_segments(record["messages"][:-1]), record["messages"][-1]["content"]
    return [(format_prompt(record), False)], record["output"]


def sample_replies(model, prompt_ids, max_new_tokens, num_samples=1, temperature=0.0, top_k=None, top_p=None,
                   generator=None):
    """num_samples replies to one prompt (1, T) in the chat template -> list of (reply token ids, reply text).

    Each reply ends at end-of-text or where the model starts a next-turn header (data.cut_reply); the ids stop
    before the header, and end with the end-of-text when the model produced it; the text is stripped. Generation
    stops once every reply has ended.
    """
    tokenizer = get_tokenizer()
    idx = prompt_ids.expand(num_samples, -1)
    ids, done, eot = [[] for _ in range(num_samples)], [False] * num_samples, [False] * num_samples
    for next_ids in generate_stream(model, idx, max_new_tokens, model.cfg["context_length"], temperature, top_k,
                                    top_p, eos_id=EOT_ID, generator=generator):
        for row, token in enumerate(next_ids[:, 0].tolist()):
            if done[row]:
                continue
            if token == EOT_ID:
                done[row] = eot[row] = True
                continue
            ids[row].append(token)
            done[row] = cut_reply(tokenizer.decode(ids[row]))[1]
        if all(done):
            break
    return [_cut_ids(row_ids, tokenizer, ended) for row_ids, ended in zip(ids, eot)]


def _cut_ids(ids, tokenizer, eot=False):
    """(ids, text) of a reply cut before any next-turn header (the ids up to the last token wholly before it),
    the end-of-text appended to the ids when the model produced it."""
    text, ended = cut_reply(tokenizer.decode(ids).lstrip())
    if ended:
        while ids and cut_reply(tokenizer.decode(ids).lstrip())[1]:
            ids = ids[:-1]
    return ids + [EOT_ID] * eot, text.rstrip()


def answer_records(model, records, device, dtype, max_new_tokens, progress=True):
    """Greedy answers to each record's prompt, stopped at end-of-text or the next turn's header; a progress bar
    only on a terminal."""
    answers = []
    bar = tqdm(records, desc="answering the test split", unit="record", leave=False,
               disable=not (progress and sys.stderr.isatty()))
    for record in bar:
        ids, _ = encode_segments(prompt_and_reference(record)[0])
        with autocast(device, dtype):
            answers.append(sample_replies(model, torch.tensor([ids], device=device), max_new_tokens)[0][1])
    return answers


# ---------------------------------------------------------------------------------------------------------------
# Direct preference optimization (Rafailov et al. 2023), as in the book's chapter 7 bonus material
# ---------------------------------------------------------------------------------------------------------------

def sequence_logprobs(model, ids, mask):
    """Mean log-probability of the tokens where mask is True: ids, mask (B, T) -> (B,)."""
    logits = model(ids)[:, :-1]                                          # (B, T-1, vocab): predicts ids[:, 1:]
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    m = mask[:, 1:].float()
    return (logp * m).sum(-1) / m.sum(-1)


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=0.1):
    """DPO loss -log sigmoid(beta * (chosen reward - rejected reward)), averaged over the batch, with the rewards
    (B,): each response's log-probability under the policy minus under the reference (as the book, not scaled by
    beta), detached."""
    chosen_rewards = policy_chosen - ref_chosen
    rejected_rewards = policy_rejected - ref_rejected
    loss = -F.logsigmoid(beta * (chosen_rewards - rejected_rewards)).mean()
    return loss, chosen_rewards.detach(), rejected_rewards.detach()


def dpo_batch_loss(policy, reference, batch, beta, device, ref_logp=None):
    """(loss, chosen rewards, rejected rewards, reference log-probs) of one preference batch. Chosen and rejected
    share one forward; ref_logp, when given, stands in for the reference model's forward."""
    ids = torch.cat([batch["chosen"], batch["rejected"]]).to(device)       # (2B, T): chosen rows, then rejected
    mask = torch.cat([batch["chosen_mask"], batch["rejected_mask"]]).to(device)
    n = batch["chosen"].shape[0]
    policy_logp = sequence_logprobs(policy, ids, mask)
    if ref_logp is None:
        with torch.no_grad():
            ref_logp = sequence_logprobs(reference, ids, mask)
    return (*dpo_loss(policy_logp[:n], policy_logp[n:], ref_logp[:n], ref_logp[n:], beta), ref_logp)


@torch.no_grad()
def evaluate_dpo(policy, reference, loader, beta, device, num_batches=None, dtype=torch.float32, ref_cache=None,
                 progress=False):
    """Mean DPO loss, reward margin (chosen minus rejected reward) and reward accuracy (share of pairs where the
    chosen response gains more than the rejected one) over the first num_batches batches (all when None).

    The reference model never changes, so with a ref_cache dict (one per unshuffled loader) its log-probs are
    computed at the first evaluation only. progress: a bar (the first evaluation scores the reference too).
    """
    was_training = policy.training
    policy.eval()
    losses, chosen, rejected = [], [], []
    n = len(loader) if num_batches is None else min(num_batches, len(loader))
    for i, batch in enumerate(progress_bar(loader, n, "DPO scores", progress, announce=True)):
        if num_batches is not None and i >= num_batches or STOP:  # a stop request ends it at once
            break
        with autocast(device, dtype):
            loss, c, r, ref_logp = dpo_batch_loss(policy, reference, batch, beta, device,
                                                  ref_cache.get(i) if ref_cache is not None else None)
        if ref_cache is not None:
            ref_cache[i] = ref_logp
        losses.append(loss.item() * len(c))
        chosen.append(c.float())
        rejected.append(r.float())
    policy.train(was_training)
    if not chosen:  # stopped before the first batch
        return dict.fromkeys(("loss", "reward_margin", "reward_acc", "chosen_reward", "rejected_reward"), math.nan)
    chosen, rejected = torch.cat(chosen), torch.cat(rejected)
    return {"loss": sum(losses) / len(chosen), "reward_margin": (chosen - rejected).mean().item(),
            "reward_acc": (chosen > rejected).float().mean().item(), "chosen_reward": chosen.mean().item(),
            "rejected_reward": rejected.mean().item()}


# ---------------------------------------------------------------------------------------------------------------
# RLHF: a reward model trained on preference pairs (--method rm), then online policy optimization against it with
# a KL leash to the SFT model (--method grpo or rloo)
# ---------------------------------------------------------------------------------------------------------------

def add_reward_head(model):
    """Swap the vocabulary head for Linear(emb_dim, 1): the model then reads one score off a text's last token."""
    w = model.out_head.weight
    model.out_head = torch.nn.Linear(model.cfg["emb_dim"], 1, device=w.device, dtype=w.dtype)
    model.cfg["num_classes"] = 1
    return model


def last_real_positions(mask):
    """(B, T) masks that are True up to each row's last real token -> (B,) lengths (index of that token + 1)."""
    return mask.shape[1] - mask.flip(1).float().argmax(1)


def bradley_terry_loss(chosen, rejected):
    """-log sigmoid(r_chosen - r_rejected), averaged: the reward model learns to score the chosen answer higher;
    ln 2 when both score the same."""
    return -F.logsigmoid(chosen - rejected).mean()


def reward_pair_scores(reward_model, batch, device):
    """(chosen scores, rejected scores), each (B,), of a preference batch: the head at each text's last token."""
    ids = torch.cat([batch["chosen"], batch["rejected"]]).to(device)
    lengths = last_real_positions(torch.cat([batch["chosen_mask"], batch["rejected_mask"]])).to(device)
    scores = last_token_logits(reward_model, ids, lengths)[:, 0].float()
    n = batch["chosen"].shape[0]
    return scores[:n], scores[n:]


@torch.no_grad()
def evaluate_reward_model(reward_model, loader, device, num_batches=None, dtype=torch.float32, progress=False):
    """Bradley-Terry loss, pairwise accuracy (share of pairs where the chosen answer scores higher) and mean
    margin (chosen minus rejected score) over the first num_batches batches (all when None)."""
    was_training = reward_model.training
    reward_model.eval()
    chosen, rejected = [], []
    n = len(loader) if num_batches is None else min(num_batches, len(loader))
    for i, batch in enumerate(progress_bar(loader, n, "reward model scores", progress, announce=True)):
        if num_batches is not None and i >= num_batches or STOP:  # a stop request ends it at once
            break
        with autocast(device, dtype):
            c, r = reward_pair_scores(reward_model, batch, device)
        chosen.append(c)
        rejected.append(r)
    reward_model.train(was_training)
    if not chosen:  # stopped before the first batch
        return dict.fromkeys(("loss", "accuracy", "margin"), math.nan)
    chosen, rejected = torch.cat(chosen), torch.cat(rejected)
    return {"loss": bradley_terry_loss(chosen, rejected).item(), "accuracy": (chosen > rejected).float().mean().item(),
            "margin": (chosen - rejected).mean().item()}


def load_reward_model(path, device):
    """A --method rm checkpoint (kind "reward") as a frozen scorer in eval mode."""
    model, ckpt = load_classifier(path, kind="reward")
    return model.to(device).requires_grad_(False), ckpt


# Rewards for policy optimization: reward(samples) -> (N,) float tensor. A sample is a dict with the prompt and
# reply as text and as token ids. Add your own here and name it with --reward.
def word_reward(word):
    """1 for a reply that contains `word` (as a whole word, any case), else 0."""
    return lambda samples: torch.tensor([float(word.lower() in re.findall(r"\w+", s["reply"].lower()))
                                         for s in samples])


def short_reply_reward(n_words):
    """1 for a reply of at most n_words words, else 0."""
    return lambda samples: torch.tensor([float(len(s["reply"].split()) <= n_words) for s in samples])


REWARDS = {"contains": word_reward, "max_words": lambda n: short_reply_reward(int(n))}


def model_reward(reward_model, device, dtype, batch_size=8):
    """The reward model's score of each prompt + reply (the text it learned to score), in batches."""
    def reward(samples):
        scores = []
        for i in range(0, len(samples), batch_size):
            part = samples[i:i + batch_size]
            seqs = [s["prompt_ids"] + s["reply_ids"] for s in part]
            ids = torch.full((len(seqs), max(map(len, seqs))), EOT_ID, dtype=torch.long)
            for j, seq in enumerate(seqs):
                ids[j, :len(seq)] = torch.tensor(seq)
            with torch.no_grad(), autocast(device, dtype):
                lengths = torch.tensor([len(seq) for seq in seqs], device=device)
                scores.append(last_token_logits(reward_model, ids.to(device), lengths)[:, 0].float().cpu())
        return torch.cat(scores)
    return reward


def reward_function(cfg, device, dtype):
    """--reward: `model` (the --reward_model checkpoint), or one of REWARDS as NAME:ARGUMENT."""
    if cfg["reward"] == "model":
        if not cfg["reward_model"]:
            raise UserError("--method grpo/rloo needs a reward: --reward_model PATH (from --method rm), or --reward "
                            "contains:WORD / max_words:N")
        return model_reward(load_reward_model(cfg["reward_model"], device)[0], device, dtype)
    name, _, arg = cfg["reward"].partition(":")
    return REWARDS[name](arg)


def group_advantages(rewards, group_size, method="grpo"):
    """Advantages of group_size consecutive answers to each prompt, against their own group as the baseline.
    grpo: (r - mean) / std of the group (std with Bessel's correction, 0 when all are equal); rloo: r minus the
    mean of the group's other answers."""
    r = rewards.view(-1, group_size).double()
    if group_size == 1:
        return torch.zeros_like(rewards, dtype=torch.float)
    if method == "rloo":
        return (r - (r.sum(1, keepdim=True) - r) / (group_size - 1)).flatten().float()
    centred = r - r.mean(1, keepdim=True)
    return (centred / (r.std(1, keepdim=True) + 1e-6)).flatten().float()


def token_logprobs(model, ids):
    """(B, T) ids -> ((B, T - 1) log-probabilities of ids[:, 1:], (B, T - 1) logits' entropy)."""
    logp_all = torch.log_softmax(model(ids)[:, :-1].float(), dim=-1)
    logp = logp_all.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def policy_loss(logp, old_logp, ref_logp, advantages, mask, clip=0.2, beta=0.04):
    """The PPO-clip objective with a KL penalty, per response token, averaged over all of them -> (loss, stats).

    ratio = pi / pi_old of each sampled token; the policy term is -min(ratio A, clip(ratio, 1 +- clip) A), so one
    batch of rollouts can be used for several updates without moving far from the policy that sampled it. The KL
    to the frozen reference uses the estimator exp(q) - q - 1 with q = log ref - log pi: never negative, zero where
    both agree.
    """
    ratio = torch.exp(logp - old_logp)
    adv = advantages[:, None]
    surrogate = -torch.minimum(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv)
    q = ref_logp - logp
    kl = torch.exp(q) - q - 1
    mask = mask.float()
    n = mask.sum().clamp(min=1)
    loss = ((surrogate + beta * kl) * mask).sum() / n
    stats = {"kl": ((kl * mask).sum() / n).item(),
             "clip_frac": ((((ratio - 1).abs() > clip).float() * mask).sum() / n).item()}
    return loss, stats


def pad_rows(rows, pad=EOT_ID):
    """Lists of ids -> (N, T) right-padded LongTensor."""
    out = torch.full((len(rows), max(map(len, rows))), pad, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, :len(row)] = torch.tensor(row, dtype=torch.long)
    return out


@torch.no_grad()
def rollout(policy, reference, prompts, reward_fn, cfg, generator, device, dtype):
    """Sample group_size answers to each prompt (ids lists) with the KV cache and score them -> a dict of CPU
    tensors the update needs: ids (N, T) prompt + reply, mask (N, T - 1) on the reply's targets, rewards (N,),
    advantages (N,), and the log-probabilities of the sampled tokens under the sampling policy and the reference."""
    tokenizer = get_tokenizer()
    samples = []
    policy.eval()
    for prompt in progress_bar(prompts, len(prompts), "rollouts", show=not cfg.get("quiet")):
        if STOP:  # a stop request: leave at once, the caller saves
            policy.train()
            return None
        with autocast(device, dtype):
            replies = sample_replies(policy, torch.tensor([prompt], device=device), cfg["max_new_tokens"],
                                     cfg["group_size"], cfg["temperature"], generator=generator)
        samples += [{"prompt_ids": prompt, "reply_ids": ids, "prompt": tokenizer.decode(prompt), "reply": text}
                    for ids, text in replies]
    rewards = reward_fn(samples).float()
    ids = pad_rows([s["prompt_ids"] + s["reply_ids"] for s in samples])
    mask = torch.zeros(ids.shape[0], ids.shape[1] - 1, dtype=torch.bool)
    for i, s in enumerate(samples):  # target j is token j + 1: the reply's tokens are the targets from len(prompt)-1
        mask[i, len(s["prompt_ids"]) - 1:len(s["prompt_ids"]) + len(s["reply_ids"]) - 1] = True
    with autocast(device, dtype):
        old_logp = token_logprobs(policy, ids.to(device))[0].float().cpu()
        ref_logp = token_logprobs(reference, ids.to(device))[0].float().cpu()
    policy.train()
    return {"ids": ids, "mask": mask, "rewards": rewards, "old_logp": old_logp, "ref_logp": ref_logp,
            "advantages": group_advantages(rewards, cfg["group_size"], cfg["method"]),
            "reply_tokens": mask.sum(1).float()}


@torch.no_grad()
def evaluate_policy(policy, reference, prompts, reward_fn, cfg, device, dtype):
    """On held-out prompts, one sampled answer each from the policy and from the reference (the SFT model), with
    the same seed: mean reward of each, the policy's win rate (reward higher; ties count half), its KL to the
    reference (per answer: the summed log-ratio of its tokens) and answer length."""
    results = {}
    for name, model in (("policy", policy), ("reference", reference)):
        one = {**cfg, "group_size": 1}
        gen = torch.Generator(device=device).manual_seed(cfg["seed"])
        results[name] = rollout(model, reference, prompts, reward_fn, one, gen, device, dtype)
    p, r = results["policy"], results["reference"]
    kl = ((p["old_logp"] - p["ref_logp"]) * p["mask"]).sum(1)
    wins = (p["rewards"] > r["rewards"]).float() + 0.5 * (p["rewards"] == r["rewards"]).float()
    return {"reward": p["rewards"].mean().item(), "reference_reward": r["rewards"].mean().item(),
            "win_rate": wins.mean().item(), "kl": kl.mean().item(), "reply_len": p["reply_tokens"].mean().item()}


# ---------------------------------------------------------------------------------------------------------------
# The training loops: supervised (sft, dpo, rm) and online (grpo, rloo)
# ---------------------------------------------------------------------------------------------------------------

METRICS = {"sft": ("loss",), "dpo": ("loss", "reward_margin", "reward_acc"), "rm": ("loss", "accuracy", "margin")}
PLOTS = {"sft": [("loss-plot.png", ("train_loss", "val_loss"), "loss")],
         "dpo": [("loss-plot.png", ("train_loss", "val_loss"), "DPO loss")],
         "rm": [("loss-plot.png", ("train_loss", "val_loss"), "Bradley-Terry loss"),
                ("accuracy-plot.png", ("train_accuracy", "val_accuracy"), "pairwise accuracy")],
         "rl": [("reward-plot.png", ("reward",), "mean reward of the rollouts"),
                ("kl-plot.png", ("kl",), "KL to the SFT model, per token")]}


def get_lr(step, total_steps, cfg):
    """The learning rate of optimizer step `step`: --lr, after --warmup_steps, cosine-decayed with --lr_schedule."""
    return lr_at_step(step, total_steps, cfg["lr"], cfg["lr_schedule"], cfg["warmup_steps"], cfg["min_lr"])


def batch_loss(model, batch, cfg, device, reference=None):
    """The method's loss on one batch: next-token cross-entropy (sft), the DPO loss against the frozen reference
    (dpo), or the Bradley-Terry loss of the chosen answer's reward over the rejected one's (rm)."""
    if cfg["method"] == "dpo":
        return dpo_batch_loss(model, reference, batch, cfg["beta"], device)[0]
    if cfg["method"] == "rm":
        return bradley_terry_loss(*reward_pair_scores(model, batch, device))
    return calc_loss_batch(batch[0], batch[1], model, device)


def split_scores(model, loaders, splits, cfg, device, dtype, num_batches=None, reference=None, ref_cache=None):
    """{split: {metric: value}} on the first num_batches batches (all when None) of each split there is, in eval
    mode: the loss (sft), DPO's loss, reward margin and accuracy (dpo), or the reward model's (rm)."""
    was_training = model.training
    model.eval()
    scores = {}
    for split in (s for s in splits if s in loaders):
        if cfg["method"] == "dpo":
            scores[split] = evaluate_dpo(model, reference, loaders[split], cfg["beta"], device, num_batches, dtype,
                                         ref_cache[split], progress=not cfg["quiet"] and num_batches is None)
        elif cfg["method"] == "rm":
            scores[split] = evaluate_reward_model(model, loaders[split], device, num_batches, dtype,
                                                  progress=not cfg["quiet"] and num_batches is None)
        else:
            scores[split] = {"loss": calc_loss_loader(loaders[split], model, device, num_batches, dtype,
                                                      progress=not cfg["quiet"])}
    model.train(was_training)
    return scores


def evaluate(model, loaders, cfg, device, dtype, where, reference=None, ref_cache=None):
    """The metrics logged every --eval_freq steps (train_loss, val_loss and the method's others), printed after
    `where`."""
    scores = split_scores(model, loaders, ("train", "val"), cfg, device, dtype, cfg["eval_iters"], reference,
                          ref_cache)
    if STOP:  # cut short by a stop request: nothing to log
        return {}
    row = {f"{split}_{k}": round(scores[split][k], 5) for split in ("train", "val") for k in METRICS[cfg["method"]]}
    tqdm.write(f"{where}: " + " ".join(f"{k} {v:.3f}" for k, v in row.items()))
    return row


def train_supervised(model, train_loader, loaders, cfg, device, dtype, run, kind, extra, reference=None,
                     ref_cache=None):
    """The supervised loop of sft, dpo and rm: every step its learning rate, micro-batches of forward, the method's
    loss and backward, clipping, the optimizer step and a row in log.csv; an evaluation every --eval_freq steps.
    Saves what --resume needs at --save_every, at the end and on a signal. Returns the rows of log.csv."""
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
        save_train_state(state_path, model, optimizer, device, position, kind, cfg, **extra)
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
                        loss = batch_loss(step_model, batch, cfg, device, reference)
                    guard.loss(loss, step + 1)
                    scaler.scale(loss / accum).backward()
                loss_sum, step_tokens = loss_sum + loss.item() / accum, step_tokens + batch_tokens(batch) * world
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
            if batch_pos + accum > batches:  # the epoch is done
                epoch, batch_pos = epoch + 1, 0
                data = loader_batches(train_loader, epoch, 0, cfg["seed"], rank, world)
            if step == 1 or step % cfg["eval_freq"] == 0 or step == total_steps:
                where = f"ep {(step - 1) // steps_per_epoch + 1} (step {step:06d})"  # the epoch the step was in
                row.update(evaluate(fwd_model, loaders, cfg, device, dtype, where, reference, ref_cache))
                progress.resume_clock()
            log.append(row)
            if any_process(bool(stop)):  # every process stops at the same step
                save()
                progress.close()
                stop.leave(f"at step {step}: saved {state_path}; continue with --resume")
            if "val_loss" in row:
                for name, keys, ylabel in PLOTS[cfg["method"]]:
                    plot_losses(log.rows, steps_per_epoch, run.path(name), keys, ylabel)
                if cfg["save_best"] and is_best(log.rows):  # best.pth: the model at its lowest validation loss
                    save_best(run.path(BEST), finished_model(model, cfg, copy=True), kind, log.rows, **extra)
            if cfg["save_every"] and step % cfg["save_every"] == 0 and step < total_steps:
                save()
        progress.close()
        save()  # the last one, inside catch_signals: a signal now waits for it
    return log.rows


def batch_tokens(batch):
    """Tokens in a batch: the element count of its first tensor (inputs, or the chosen answers of a pair)."""
    first = batch[0] if isinstance(batch, (list, tuple)) else next(iter(batch.values()))
    return first.numel() if torch.is_tensor(first) else 0


def step_prompts(prompts, cfg, epoch, r, rank=0, world=1):
    """The prompts of batch r of rollouts in `epoch` for process `rank` of `world`: --prompts_per_step of them, from
    a shuffle of all the prompts drawn from (seed, epoch); every process takes prompts of its own."""
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(cfg["seed"] * 1000 + epoch))
    n = cfg["prompts_per_step"]
    first = (r * world + rank) * n
    return [prompts[j] for j in order[first:first + n].tolist()]


def rollouts_for(policy, reference, prompts, reward_fn, cfg, epoch, r, device, dtype):
    """This process's rollouts for batch r of prompts in `epoch`, sampled from a generator seeded by (seed, epoch,
    r, rank), never from the global random stream; None when a stop request came while sampling."""
    rank, world = process_rank(), world_size()
    seed = ((cfg["seed"] * 1000 + epoch) * 100_003 + r) * 1009 + rank
    return rollout(policy, reference, step_prompts(prompts, cfg, epoch, r, rank, world), reward_fn, cfg,
                   torch.Generator(device=device).manual_seed(seed), device, dtype)


def ppo_step(model, rollouts, m, cfg, device):
    """The PPO-clip loss with the KL penalty on minibatch m of the rollouts -> (loss, its statistics, tokens)."""
    n = rollouts["ids"].shape[0]
    rows = slice(m * n // cfg["minibatches"], (m + 1) * n // cfg["minibatches"])
    part = {k: v[rows].to(device) for k, v in rollouts.items()}
    logp, entropy = token_logprobs(model, part["ids"])
    loss, stats = policy_loss(logp, part["old_logp"], part["ref_logp"], part["advantages"], part["mask"],
                              cfg["clip"], cfg["beta"])
    stats = {"reward": rollouts["rewards"].mean().item(), **stats, "reply_len": rollouts["reply_tokens"].mean().item(),
             "entropy": ((entropy * part["mask"]).sum() / part["mask"].sum().clamp(min=1)).item(),
             "rl_loss": loss.item()}
    return loss, stats, int(part["ids"].numel())


def train_policy(policy, reference, prompts, reward_fn, cfg, device, dtype, run, extra):
    """Online policy optimization (grpo, rloo): for each batch of prompts, rollouts (answers sampled and scored), then
    --ppo_epochs passes of --minibatches PPO-clip updates on them with the KL penalty to the frozen reference; a
    row in log.csv per optimizer step. The rollouts in use are saved with the state, so a resume continues them."""
    accum, world = cfg["grad_accum_steps"], world_size()
    per_rollout = cfg["ppo_epochs"] * cfg["minibatches"]  # updates on each batch of rollouts
    units = len(prompts) // (cfg["prompts_per_step"] * world) * per_rollout  # updates per epoch
    steps_per_epoch, total_steps = count_steps(units, accum, cfg["epochs"], cfg["max_steps"])
    _, step_model = wrap_model(policy, device, dtype, cfg["fsdp"], cfg["compile"])
    optimizer = make_optimizer(policy, cfg["lr"], cfg["weight_decay"], device)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype is torch.float16)
    state_path = run.path(TRAIN_STATE)
    start = start_position(state_path, policy, optimizer, device, units, cfg["resume"], cfg["seed"], cfg["fsdp"])
    step, epoch, unit, tokens_seen = (start[k] for k in POSITION)
    saved = start["process_state"] or {}  # the batch of rollouts in use when the state was saved
    key, rollouts, stats = saved.get("key"), saved.get("rollouts"), {}
    log = StepLog(run.path("log.csv"), step if cfg["resume"] else None, run.logger)
    guard = DivergenceGuard(state_path, cfg["lr"], cfg["weight_decay"], step if cfg["resume"] else None)

    def save():  # every process calls it (gathering shards and random states needs them all)
        guard.weights(policy, step)
        position = dict(zip(POSITION, (step, epoch, unit, tokens_seen)), batches_per_epoch=units)
        save_train_state(state_path, policy, optimizer, device, position, "chat", cfg,
                         {"key": key, "rollouts": rollouts, "stats": stats}, **extra)
        guard.saved(step)

    if finished(step, total_steps, cfg["out_dir"]):
        return log.rows
    progress = Progress(total_steps, step, cfg["quiet"])
    with catch_signals() as stop:
        while step < total_steps:
            t0 = time.perf_counter()
            lr = get_lr(step, total_steps, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum, step_tokens = 0.0, 0
            for i in range(accum):
                r, k = divmod(unit + i, per_rollout)
                if key != [epoch, r] or rollouts is None:  # a new batch of prompts: sample and score
                    new = rollouts_for(policy, reference, prompts, reward_fn, cfg, epoch, r, device, dtype)
                    if new is None:  # a stop request while sampling: this step starts over after --resume
                        break
                    key, rollouts = [epoch, r], new
                with grad_sync(step_model, last=i == accum - 1):
                    with autocast(device, dtype):
                        loss, stats, n_tokens = ppo_step(step_model, rollouts, k % cfg["minibatches"], cfg, device)
                    guard.loss(loss, step + 1)
                    scaler.scale(loss / accum).backward()
                loss_sum, step_tokens = loss_sum + loss.item() / accum, step_tokens + n_tokens * world
            if any_process(bool(stop)):  # every process stops at the same step, before it is taken
                optimizer.zero_grad(set_to_none=True)
                save()
                progress.close()
                stop.leave(f"at step {step}: saved {state_path}; continue with --resume")
            norm = clip_gradients(policy, optimizer, scaler, cfg["grad_clip"])
            guard.grad_norm(norm, loss_sum, step + 1, scaler)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step, unit, tokens_seen = step + 1, unit + accum, tokens_seen + step_tokens
            guard.step_done(step)
            progress.add(step_tokens, time.perf_counter() - t0)
            progress.update(step, loss_sum, lr)
            run.started()
            row = {"step": step, "epoch": round(step / steps_per_epoch, 3), "tokens_seen": tokens_seen,
                   "loss": round(loss_sum, 5), "lr": lr, "grad_norm": round(norm, 5),
                   "tokens_per_s": round(progress.tokens_per_s(), 1), **stats}
            if unit + accum > units:  # every prompt was used: a new epoch reshuffles them
                epoch, unit = epoch + 1, 0
            log.append(row)
            if step == 1 or step % cfg["eval_freq"] == 0 or step == total_steps:
                tqdm.write(f"ep {(step - 1) // steps_per_epoch + 1} (step {step:06d}): " + " ".join(
                    f"{k} {v:.3f}" for k, v in stats.items()))
                for name, keys, ylabel in PLOTS["rl"]:
                    plot_losses(log.rows, steps_per_epoch, run.path(name), keys, ylabel)
            if cfg["save_every"] and step % cfg["save_every"] == 0 and step < total_steps:
                save()
        progress.close()
        save()  # the last one, inside catch_signals: a signal now waits for it
    return log.rows


# ---------------------------------------------------------------------------------------------------------------
# The runs
# ---------------------------------------------------------------------------------------------------------------

def resolve_data(cfg):
    """--data as given, or the book's file for --method, downloaded on first use."""
    path = cfg["data"]
    with local_main_first():  # under torchrun one process per machine downloads, the others then find the file
        if path in DATA_FILES and not os.path.exists(path):
            return fetch_data(path)
    return path


def build_policy(cfg, device):
    """The model training starts from: a scratch model or the one --init names."""
    if cfg["dry_run"] or (cfg["fsdp"] and world_size() > 1):
        # with --fsdp the whole model stays in CPU memory; wrap_model moves only this process's shard to the GPU
        device = torch.device("cpu")
    model, info = build_model(cfg, device)
    if cfg["method"] == "dpo" and info["kind"] not in ("chat", None):
        print(f"warning: --init {cfg['init']} is not an instruction-tuned model (kind {info['kind']}); DPO is "
              f"meant to start from finetune_chat.py's SFT checkpoint")
    return model


def output_path(cfg):
    """OUT_DIR/NAME-sft.pth or NAME-dpo.pth, NAME from --init (gpt2-medium355M for gpt2-medium, as the book)."""
    name = "scratch" if cfg["init"] == "scratch" else (
        BOOK_NAMES.get(cfg["init"]) or os.path.splitext(os.path.basename(cfg["init"].rstrip("/")))[0])
    return os.path.join(cfg["out_dir"], f"{re.sub(r'-sft$', '', name)}-{cfg['method']}.pth")


def add_adapters(model, cfg):
    """Freeze the model and wrap its linear layers in trainable low-rank adapters (--trainable lora)."""
    model.requires_grad_(False)
    return add_lora(model, cfg["lora_rank"], cfg["lora_alpha"])


def finished_model(model, cfg, copy=False):
    """The model to save: LoRA adapters merged into plain linear layers (of a copy, with copy=True, so that training
    goes on with the adapters)."""
    if cfg["trainable"] != "lora":
        return model
    return merge_lora(deepcopy(model) if copy else model)


def split_data(records, cfg):
    seed = None if cfg["split_seed"] < 0 else cfg["split_seed"]
    train, test, val = split_records(records, cfg["train_ratio"], cfg["test_ratio"], seed)
    if not train or not val:
        raise UserError(f"{len(records)} records split {len(train)} train / {len(test)} test / {len(val)} "
                        f"validation: each of train and validation needs at least one; add records or change "
                        f"--train_ratio / --test_ratio")
    return train, test, val


def preference_loaders(train, val, test, cfg, max_len):
    """({split: DataLoader in file order}, the shuffled training DataLoader) of preference pairs; the test split may
    be empty, the others may not."""
    collate = partial(preference_collate_fn, allowed_max_length=max_len)
    loaders = {}
    for split, records in (("train", train), ("val", val), ("test", test)):
        dataset = PreferenceDataset(records, max_length=max_len)
        report_cut(f"{split} split", dataset, max_len)
        if len(dataset) == 0 and split != "test":
            raise UserError(f"the {split} split has no usable record: raise --allowed_max_length or add records")
        if len(dataset):
            loaders[split] = DataLoader(dataset, cfg["batch_size"], shuffle=False, collate_fn=collate)
    train_loader = DataLoader(loaders["train"].dataset, cfg["batch_size"], shuffle=True, drop_last=True,
                              collate_fn=collate)
    return loaders, train_loader


def report_cut(name, dataset, max_length):
    if dataset.truncated or dataset.skipped:
        print(f"{name}: {dataset.truncated} records longer than {max_length} tokens are cut to it"
              + (f", {dataset.skipped} with no response token within it are skipped" if dataset.skipped else ""))


def startup_line(cfg, device, dtype, model, counts):
    trainable = count_parameters(model, trainable_only=True)
    print(f"{count_parameters(model):,} parameters ({trainable:,} trainable), {counts}; settings: {cfg['changed']}")


def run_sft(cfg, device, dtype, run):
    path = resolve_data(cfg)
    train, test, val = split_data(load_records(path), cfg)
    model = build_policy(cfg, device)
    max_len = min(cfg["allowed_max_length"], model.cfg["context_length"])
    datasets = {}
    for split, records in (("train", train), ("val", val)):
        datasets[split] = InstructionDataset(records, mask_instruction=cfg["mask_instruction"], max_length=max_len)
        report_cut(f"{split} split", datasets[split], max_len)
        if len(datasets[split]) == 0:
            raise UserError(f"the {split} split has no usable record: raise --allowed_max_length or add records")
    collate = partial(custom_collate_fn, allowed_max_length=max_len)
    train_loader = DataLoader(datasets["train"], cfg["batch_size"], shuffle=True, drop_last=True, collate_fn=collate)
    eval_train = DataLoader(datasets["train"], cfg["batch_size"], shuffle=False, collate_fn=collate)
    val_loader = DataLoader(datasets["val"], cfg["batch_size"], shuffle=False, collate_fn=collate)
    if cfg["trainable"] == "lora":
        add_adapters(model, cfg)
    if cfg["dry_run"]:
        return print_dry_run(model.cfg, cfg, len(train_loader), dtype, device, total_params=count_parameters(model),
                             trainable_params=count_parameters(model, True), context_length=max_len)
    startup_line(cfg, device, dtype, model, f"{len(train)} train / {len(test)} test / {len(val)} val records "
                                            f"from {path}")

    start = time.time()
    loaders = {"train": eval_train, "val": val_loader}
    rows = train_supervised(model, train_loader, loaders, cfg, device, dtype, run, "chat",
                            {"template": TEMPLATE_NAME, "method": "sft"})
    if not run.is_started and os.path.isfile(output_path(cfg)):  # --resume of a finished run, nothing to do
        return {"rows": rows}
    train_time = time.time() - start
    model = finished_model(model, cfg)
    out_dir = cfg["out_dir"]
    last = next((r for r in reversed(rows) if "val_loss" in r), None)
    if last is None:  # a run stopped before its last evaluation: evaluate now
        last = {"step": max((r["step"] for r in rows), default=0),
                **evaluate(model, loaders, cfg, device, dtype, "final")}
    if cfg["full_eval"]:
        last["val_loss_full"] = evaluate_model(model, eval_train, val_loader, device, 0, dtype, True)[1]
    # every process calls save_model (FSDP gathers the shards), rank 0 writes
    ckpt_path = save_model(output_path(cfg), model, kind="chat", template=TEMPLATE_NAME, method="sft",
                           step=last["step"], train_loss=last["train_loss"], val_loss=last["val_loss"])
    metrics = {"train_loss": last["train_loss"], "val_loss": last["val_loss"],
               "train_seconds": round(train_time, 1), "test_records": len(test)}
    written = [ckpt_path, os.path.join(out_dir, TRAIN_STATE), os.path.join(out_dir, "log.csv")]
    if test and cfg["max_new_tokens"]:
        answers = answer_records(model, test, device, dtype, cfg["max_new_tokens"], progress=not cfg["quiet"])
        references = [prompt_and_reference(r)[1] for r in test]
        metrics.update(score_responses(answers, references))
        metrics["perplexity"] = reference_perplexity(model, test, device, max_len, cfg["batch_size"], dtype)
        responses_path = os.path.join(out_dir, "instruction-data-with-response.json")
        if is_main_process():
            write_json(responses_path, [{**r, "model_response": a} for r, a in zip(test, answers)])
        written.append(responses_path)
        print(f"test split ({len(test)} records): exact match {metrics['exact_match']:.3f}, token F1 "
              f"{metrics['token_f1']:.3f}, ROUGE-L {metrics['rouge_l']:.3f}, perplexity of the references "
              f"{metrics['perplexity']:.2f}")
    metrics_path = os.path.join(out_dir, "metrics.json")
    if is_main_process():
        write_json(metrics_path, metrics)
    written.append(metrics_path)
    print(f"done in {train_time:.0f} s of training: train loss {metrics['train_loss']:.3f}, val loss "
          f"{metrics['val_loss']:.3f}; wrote {', '.join(written)}")
    return {"rows": rows, "metrics": metrics, "checkpoint": ckpt_path, "model": model}


def run_dpo(cfg, device, dtype, run):
    path = resolve_data(cfg)
    train, test, val = split_data(load_preference_records(path), cfg)
    policy = build_policy(cfg, device)
    # the frozen reference, a copy of the policy as built; under --fsdp it is not sharded: whole on this device
    reference_params = count_parameters(policy)
    reference = None if cfg["dry_run"] else copy.deepcopy(policy).to(device).eval().requires_grad_(False)
    max_len = min(cfg["allowed_max_length"], policy.cfg["context_length"])
    loaders, train_loader = preference_loaders(train, val, test, cfg, max_len)
    if cfg["trainable"] == "lora":
        add_adapters(policy, cfg)
    if cfg["dry_run"]:
        return print_dry_run(policy.cfg, cfg, len(train_loader), dtype, device,
                             total_params=count_parameters(policy) + reference_params,
                             trainable_params=count_parameters(policy, True), context_length=max_len)
    startup_line(cfg, device, dtype, policy, f"{len(train)} train / {len(test)} test / {len(val)} val preference "
                                             f"pairs from {path}, beta {cfg['beta']}")

    ref_cache = {split: {} for split in loaders}

    def evaluate(m):
        """DPO scores on every split, whole."""
        return split_scores(m, loaders, ("train", "val", "test"), cfg, device, dtype, None, reference, ref_cache)

    # before training the policy equals the reference; under --fsdp the policy is whole on the CPU until
    # train shards it, so its twin, already on this device, is scored instead
    before = evaluate(reference if cfg["fsdp"] and world_size() > 1 else policy)
    print("before: " + ", ".join(f"{split} loss {v['loss']:.3f} margin {v['reward_margin']:.3f}"
                                 for split, v in before.items()))
    start = time.time()
    extra = {"template": TEMPLATE_NAME, "method": "dpo", "beta": cfg["beta"]}
    rows = train_supervised(policy, train_loader, loaders, cfg, device, dtype, run, "chat", extra, reference,
                            ref_cache)
    if not run.is_started and os.path.isfile(output_path(cfg)):  # --resume of a finished run, nothing to do
        return {"rows": rows}
    train_time = time.time() - start
    after = evaluate(policy)
    policy = finished_model(policy, cfg)
    out_dir = cfg["out_dir"]
    # every process calls save_model (FSDP gathers the shards), rank 0 writes
    ckpt_path = save_model(output_path(cfg), policy, kind="chat",
                           template=TEMPLATE_NAME, method="dpo", beta=cfg["beta"], step=rows[-1]["step"] if rows else 0,
                           val_loss=after["val"]["loss"], val_reward_margin=after["val"]["reward_margin"])
    metrics = {"before": before, "after": after, "beta": cfg["beta"], "train_seconds": round(train_time, 1)}
    metrics_path = os.path.join(out_dir, "metrics.json")
    if is_main_process():
        write_json(metrics_path, metrics)
    for split in after:
        print(f"{split}: loss {before[split]['loss']:.3f} -> {after[split]['loss']:.3f}, reward margin "
              f"{before[split]['reward_margin']:.3f} -> {after[split]['reward_margin']:.3f}, reward accuracy "
              f"{before[split]['reward_acc']:.3f} -> {after[split]['reward_acc']:.3f}")
    print(f"done in {train_time:.0f} s of training; wrote {ckpt_path}, {os.path.join(out_dir, TRAIN_STATE)}, "
          f"{os.path.join(out_dir, 'log.csv')}, {metrics_path}")
    return {"rows": rows, "metrics": metrics, "checkpoint": ckpt_path, "model": policy}


def run_rm(cfg, device, dtype, run):
    """A reward model: the SFT model with a scalar head, trained with the Bradley-Terry loss on preference pairs."""
    path = resolve_data(cfg)
    train, test, val = split_data(load_preference_records(path), cfg)
    model = add_reward_head(build_policy(cfg, device))
    max_len = min(cfg["allowed_max_length"], model.cfg["context_length"])
    loaders, train_loader = preference_loaders(train, val, test, cfg, max_len)
    if cfg["trainable"] == "lora":
        add_adapters(model, cfg)
        model.out_head.requires_grad_(True)  # the new head always trains
    if cfg["dry_run"]:
        return print_dry_run(model.cfg, cfg, len(train_loader), dtype, device, total_params=count_parameters(model),
                             trainable_params=count_parameters(model, True), context_length=max_len, out_dim=1)
    startup_line(cfg, device, dtype, model, f"{len(train)} train / {len(test)} test / {len(val)} val preference "
                                            f"pairs from {path}")

    before = split_scores(model, loaders, ("val",), cfg, device, dtype)
    start = time.time()
    extra = {"template": TEMPLATE_NAME, "method": "rm", "class_names": ["reward"], "max_length": max_len,
             "pad_id": EOT_ID}
    rows = train_supervised(model, train_loader, loaders, cfg, device, dtype, run, "reward", extra)
    if not run.is_started and os.path.isfile(output_path(cfg)):  # --resume of a finished run, nothing to do
        return {"rows": rows}
    train_time = time.time() - start
    after = split_scores(model, loaders, ("val", "test"), cfg, device, dtype)
    model = finished_model(model, cfg)
    ckpt_path = save_model(output_path(cfg), model, kind="reward", **extra, step=rows[-1]["step"] if rows else 0,
                           accuracy={split: v["accuracy"] for split, v in after.items()})
    metrics = {"before": before, "after": after, "train_seconds": round(train_time, 1)}
    if is_main_process():
        write_json(run.path("metrics.json"), metrics)
    for split, v in after.items():
        print(f"{split}: pairwise accuracy {v['accuracy']:.3f} (chance 0.5), margin {v['margin']:.3f}, loss "
              f"{v['loss']:.3f}")
    print(f"done in {train_time:.0f} s of training; wrote {ckpt_path}, {run.path(TRAIN_STATE)}, "
          f"{run.path('log.csv')}, {run.path('metrics.json')}")
    return {"rows": rows, "metrics": metrics, "checkpoint": ckpt_path, "model": model}


def prompt_ids_of(records, max_len):
    """Each record's prompt in the template, as token ids; prompts that leave no room for an answer are dropped."""
    prompts = [encode_segments(prompt_and_reference(r)[0])[0] for r in records]
    return [p for p in prompts if len(p) < max_len]


def check_rollout_memory(model_cfg, cfg, longest, device):
    """Refuse, before any work, a step of rollouts that cannot fit in memory: the KV cache of every answer while
    sampling, and the logits (with their log-softmax and gradient) of a minibatch of them while learning."""
    rows, seq = cfg["group_size"] * cfg["prompts_per_step"], min(longest, model_cfg["context_length"])
    kv = 2 * model_cfg["n_layers"] * rows * seq * model_cfg["emb_dim"] * 4
    need = kv + 3 * -(-rows // cfg["minibatches"]) * seq * model_cfg["vocab_size"] * 4
    free = available_memory(device)
    if free is not None and need > 0.8 * free:
        raise UserError(f"--group_size {cfg['group_size']} x --prompts_per_step {cfg['prompts_per_step']} = {rows} "
                        f"answers a step need about {need / 2**30:.1f} GiB, more than the {free / 2**30:.1f} GiB "
                        f"free: lower them, or raise --minibatches")


def run_rl(cfg, device, dtype, run):
    """Online policy optimization (GRPO or RLOO) of the SFT model against a reward, with a KL penalty to it."""
    path = resolve_data(cfg)
    records = load_records(path, required=("instruction",), optional=("input", "output", "chosen", "rejected"))
    train, test, val = split_data(records, cfg)
    policy = build_policy(cfg, device)
    max_len = policy.cfg["context_length"] - cfg["max_new_tokens"]
    prompts = {"train": prompt_ids_of(train, max_len), "val": prompt_ids_of(val, max_len)}
    # updates in an epoch, over every process: each batch of rollouts gets ppo_epochs x minibatches of them
    units = len(prompts["train"]) // (cfg["prompts_per_step"] * world_size()) * world_size() * cfg["ppo_epochs"] * \
        cfg["minibatches"]
    if units == 0:
        raise UserError(f"{len(prompts['train'])} training prompts fit the context with --max_new_tokens "
                        f"{cfg['max_new_tokens']}, fewer than --prompts_per_step {cfg['prompts_per_step']} per "
                        f"process: add records or lower --prompts_per_step / --max_new_tokens")
    check_rollout_memory(policy.cfg, cfg, max(map(len, prompts["train"])) + cfg["max_new_tokens"], device)
    if cfg["dry_run"]:
        return print_dry_run(policy.cfg, cfg, units, dtype, device, context_length=max_len,
                             total_params=2 * count_parameters(policy), trainable_params=count_parameters(policy))
    reference = copy.deepcopy(policy).to(device).eval().requires_grad_(False)  # the frozen SFT model
    reward_fn = reward_function(cfg, device, dtype)
    if cfg["trainable"] == "lora":
        add_adapters(policy, cfg)
    startup_line(cfg, device, dtype, policy, f"{len(prompts['train'])} train / {len(prompts['val'])} held-out prompts "
                                             f"from {path}, {cfg['group_size']} answers each, reward {cfg['reward']}")
    held_out = prompts["val"][:cfg["eval_iters"] * cfg["prompts_per_step"]]
    if not cfg["quiet"]:
        print(f"sampling answers of the policy and of the SFT model to {len(held_out)} held-out prompts")
    before = evaluate_policy(policy, reference, held_out, reward_fn, cfg, device, dtype)
    print("before: " + ", ".join(f"{k} {v:.3f}" for k, v in before.items()))
    start = time.time()
    rows = train_policy(policy, reference, prompts["train"], reward_fn, cfg, device, dtype, run,
                        {"template": TEMPLATE_NAME, "method": cfg["method"], "beta": cfg["beta"]})
    if not run.is_started and os.path.isfile(output_path(cfg)):  # --resume of a finished run, nothing to do
        return {"rows": rows}
    train_time = time.time() - start
    after = evaluate_policy(policy, reference, held_out, reward_fn, cfg, device, dtype)
    policy = finished_model(policy, cfg)
    ckpt_path = save_model(output_path(cfg), policy, kind="chat", template=TEMPLATE_NAME, method=cfg["method"],
                           beta=cfg["beta"], step=rows[-1]["step"] if rows else 0, reward=after["reward"])
    metrics = {"before": before, "after": after, "train_seconds": round(train_time, 1), "reward": cfg["reward"]}
    if is_main_process():
        write_json(run.path("metrics.json"), metrics)
    print(f"held-out prompts ({len(held_out)}): reward {before['reward']:.3f} -> {after['reward']:.3f} (the SFT model "
          f"{after['reference_reward']:.3f}), win rate against the SFT model {after['win_rate']:.3f}, KL "
          f"{after['kl']:.3f}, answer length {before['reply_len']:.1f} -> {after['reply_len']:.1f} tokens")
    print(f"done in {train_time:.0f} s of training; wrote {ckpt_path}, {run.path(TRAIN_STATE)}, "
          f"{run.path('log.csv')}, {run.path('metrics.json')}")
    return {"rows": rows, "metrics": metrics, "checkpoint": ckpt_path, "model": policy}


def main(argv=None):
    given = get_config(DEFAULTS, argv, __doc__, check=check_settings)
    cfg = {**resolve_settings(given), "changed": changed_settings(given, DEFAULTS)}
    torch.manual_seed(cfg["seed"])
    device = setup_distributed(pick_device(cfg["device"]))  # under torchrun: join the group, take this GPU
    dtype = pick_dtype(cfg["dtype"], device)
    print(describe_device(device, dtype, cfg["dtype"]) + describe_distributed(cfg))
    outputs = [output_path(cfg)] + [os.path.join(cfg["out_dir"], name) for name in
                                     ("metrics.json", "instruction-data-with-response.json", "accuracy-plot.png",
                                      "reward-plot.png", "kl-plot.png")]
    run_method = {"sft": run_sft, "dpo": run_dpo, "rm": run_rm, "grpo": run_rl, "rloo": run_rl}[cfg["method"]]
    if cfg["method"] != "sft" and cfg["init"].endswith(".pth") and not os.path.isfile(cfg["init"]):
        raise UserError(f"no SFT checkpoint at {cfg['init']}: --method {cfg['method']} starts from an instruction-"
                        f"tuned model, so run `python finetune_chat.py` (sft) first, or pass --init PATH of one")
    folder = RunFolder(cfg, outputs, command_line(__file__, argv), RUN_SETTINGS, INPUTS) if not cfg["dry_run"] else None
    with folder or nullcontext() as run:
        return run_method(cfg, device, dtype, run)


if __name__ == "__main__":
    entry(main)
