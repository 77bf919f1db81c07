"""Teach GPT-2 to follow instructions (supervised fine-tuning), then to prefer better answers (DPO), and score it.

    python finetune_chat.py                                  # the book's run: gpt2-medium, instruction-data.json
    python finetune_chat.py --init scratch --n_layers 4 --emb_dim 256 --n_heads 4 --context_length 256 \\
        --data my_chats.jsonl --mask_instruction --out_dir runs/chat-small    # own records or conversations
    python finetune_chat.py --method dpo --init runs/chat/gpt2-medium355M-sft.pth   # preference tuning after SFT

Then talk to the result: python generate.py --chat --checkpoint runs/chat/gpt2-medium355M-sft.pth

Records are JSON or JSONL: {"instruction", "input", "output"} like the book's, or {"messages": [{"role": "user" |
"assistant", "content"}, ...]}; DPO records have "chosen" and "rejected" responses. The prompt template is the
book's Alpaca one (data.format_input), shared with evaluation and generate.py --chat.
"""
import copy
import math
import os
import re
import string
import time
from collections import Counter
from contextlib import nullcontext
from functools import partial

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from tqdm import tqdm

from data import (DATA_FILES, EOT_ID, TEMPLATE_NAME, InstructionDataset, PreferenceDataset, conversation_segments,
                  custom_collate_fn, cut_reply, encode_segments, fetch_data, format_prompt, get_tokenizer,
                  load_preference_records, load_records, preference_collate_fn, split_records, write_json)
from layers import add_lora, merge_lora
from model import checkpoint_dict, count_parameters, generate_stream
from settings import (UserError, autocast, changed_settings, check_training, dtype_name, entry, get_config,
                      pick_device, pick_dtype, training_settings)
from trainer import (TRAIN_STATE, RunFolder, build_model, calc_loss_batch, command_line, describe_distributed,
                     evaluate_model, is_main_process, local_main_first, print_dry_run, save_model, setup_distributed,
                     train_model, world_size)

DEFAULTS = dict(
    method="sft",              # sft (learn the outputs) | dpo (learn to prefer chosen over rejected; from SFT)
    data="",                   # JSON or JSONL records; "" = the book's data for --method, downloaded on first use
    out_dir="",                # "" = runs/chat (sft) or runs/chat-dpo (dpo)
    init="",                   # gpt2 | gpt2-medium | ... | scratch | PATH.pth; "" = gpt2-medium (sft), the SFT's .pth (dpo)
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
    beta=0.1,                  # DPO: strength of the pull towards the reference model (higher = stays closer)
    max_new_tokens=256,        # longest answer to a test record (sft, greedy); 0 = skip answering and scoring
    **training_settings(
        batch_size=8,          # records per micro-batch (per process under torchrun)
        epochs=None,           # passes over the training records; None = 2 (sft) or 1 (dpo), as the book
        lr=None,               # peak learning rate; None = 5e-5 (sft) or 5e-6 (dpo), as the book
        weight_decay=None,     # AdamW weight decay; None = 0.1 (sft) or 0.01 (dpo), as the book
        eval_iters=5,          # batches of the training split per evaluation (validation is used whole)
    ),
)

# the book's settings for each method, used where a setting is left at None / ""
METHOD_DEFAULTS = {
    "sft": dict(epochs=2, lr=5e-5, weight_decay=0.1, out_dir="runs/chat", init="gpt2-medium",
                data="instruction-data.json"),
    "dpo": dict(epochs=1, lr=5e-6, weight_decay=0.01, out_dir="runs/chat-dpo",
                init="runs/chat/gpt2-medium355M-sft.pth", data="instruction-data-with-preference.json"),
}
# output names of the book's chapter 7 for OpenAI's sizes
BOOK_NAMES = {"gpt2": "gpt2-small124M", "gpt2-medium": "gpt2-medium355M", "gpt2-large": "gpt2-large774M",
              "gpt2-xl": "gpt2-xl1558M"}


def resolve_settings(cfg):
    """cfg with the method's defaults filled in where a setting was left at None or ""."""
    if cfg["method"] not in METHOD_DEFAULTS:
        raise UserError(f"--method must be sft or dpo, got {cfg['method']!r}")
    out = dict(cfg)
    for k, v in METHOD_DEFAULTS[cfg["method"]].items():
        if out[k] is None or out[k] == "":
            out[k] = v
    return out


def check_settings(cfg):
    cfg = resolve_settings(cfg)
    for k in ("epochs", "lr", "weight_decay"):
        if not isinstance(cfg[k], (int, float)):
            raise UserError(f"--{k} must be a number, got {cfg[k]!r}")
    if not isinstance(cfg["epochs"], int):
        raise UserError(f"--epochs must be a whole number, got {cfg['epochs']}")
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
    if cfg["beta"] <= 0:
        raise UserError(f"--beta must be > 0, got {cfg['beta']}")
    if cfg["max_new_tokens"] < 0:
        raise UserError(f"--max_new_tokens must be >= 0 (0 = skip answering the test split), got "
                        f"{cfg['max_new_tokens']}")
    if cfg["fsdp"] and cfg["trainable"] == "lora":
        raise UserError("--fsdp with --trainable lora is not supported (the adapters are merged into sharded "
                        "weights when saved): drop --fsdp to train the adapters with DDP")


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
    there too, and the text is stripped. Generation stops once every reply has ended.
    """
    tokenizer = get_tokenizer()
    idx = prompt_ids.expand(num_samples, -1)
    ids, done = [[] for _ in range(num_samples)], [False] * num_samples
    for next_ids in generate_stream(model, idx, max_new_tokens, model.cfg["context_length"], temperature, top_k,
                                    top_p, eos_id=EOT_ID, generator=generator):
        for row, token in enumerate(next_ids[:, 0].tolist()):
            if done[row]:
                continue
            if token == EOT_ID:
                done[row] = True
                continue
            ids[row].append(token)
            done[row] = cut_reply(tokenizer.decode(ids[row]))[1]
        if all(done):
            break
    return [_cut_ids(row_ids, tokenizer) for row_ids in ids]


def _cut_ids(ids, tokenizer):
    """(ids, text) of a reply cut before any next-turn header (the ids up to the last token wholly before it)."""
    text, ended = cut_reply(tokenizer.decode(ids).lstrip())
    if ended:
        while ids and cut_reply(tokenizer.decode(ids).lstrip())[1]:
            ids = ids[:-1]
    return ids, text.rstrip()


def answer_records(model, records, device, dtype, max_new_tokens):
    """Greedy answers to each record's prompt, stopped at end-of-text or the next turn's header."""
    answers = []
    for record in tqdm(records, desc="answering the test split", unit="record", leave=False):
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
def evaluate_dpo(policy, reference, loader, beta, device, num_batches=None, dtype=torch.float32, ref_cache=None):
    """Mean DPO loss, reward margin (chosen minus rejected reward) and reward accuracy (share of pairs where the
    chosen response gains more than the rejected one) over the first num_batches batches (all when None).

    The reference model never changes, so with a ref_cache dict (one per unshuffled loader) its log-probs are
    computed at the first evaluation only.
    """
    was_training = policy.training
    policy.eval()
    losses, chosen, rejected = [], [], []
    for i, batch in enumerate(loader):
        if num_batches is not None and i >= num_batches:
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
    chosen, rejected = torch.cat(chosen), torch.cat(rejected)
    return {"loss": sum(losses) / len(chosen), "reward_margin": (chosen - rejected).mean().item(),
            "reward_acc": (chosen > rejected).float().mean().item(), "chosen_reward": chosen.mean().item(),
            "rejected_reward": rejected.mean().item()}


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
        # with --fsdp the whole model stays in CPU memory; train_model moves only this process's shard to the GPU
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


def finished_model(model, cfg):
    """The model to save: LoRA adapters merged into plain linear layers."""
    return merge_lora(model) if cfg["trainable"] == "lora" else model


def split_data(records, cfg):
    seed = None if cfg["split_seed"] < 0 else cfg["split_seed"]
    train, test, val = split_records(records, cfg["train_ratio"], cfg["test_ratio"], seed)
    if not train or not val:
        raise UserError(f"{len(records)} records split {len(train)} train / {len(test)} test / {len(val)} "
                        f"validation: each of train and validation needs at least one; add records or change "
                        f"--train_ratio / --test_ratio")
    return train, test, val


def report_cut(name, dataset, max_length):
    if dataset.truncated or dataset.skipped:
        print(f"{name}: {dataset.truncated} records longer than {max_length} tokens are cut to it"
              + (f", {dataset.skipped} with no response token within it are skipped" if dataset.skipped else ""))


def startup_line(cfg, device, dtype, model, counts):
    trainable = count_parameters(model, trainable_only=True)
    print(f"device {device}, dtype {dtype_name(dtype)}, {count_parameters(model):,} parameters "
          f"({trainable:,} trainable), {counts}{describe_distributed(cfg)}; settings: {cfg['changed']}")


def best_checkpoint_of(cfg, **extra):
    """What --save_best keeps: the model as the run will save it (LoRA adapters merged into a copy)."""
    def best(model):
        if cfg["trainable"] == "lora":
            model = merge_lora(copy.deepcopy(model))
        return checkpoint_dict(model, "chat", template=TEMPLATE_NAME, method=cfg["method"], **extra)
    return best


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

    def eval_fn(m):
        train_loss, val_loss = evaluate_model(m, eval_train, val_loader, device, cfg["eval_iters"], dtype,
                                              progress=not cfg["quiet"])
        return {"train_loss": train_loss, "val_loss": val_loss}

    start = time.time()
    rows = train_model(model, train_loader, cfg, device=device, dtype=dtype, kind="chat", run=run,
                       extra={"template": TEMPLATE_NAME, "method": "sft"},
                       loss_fn=lambda m, b: calc_loss_batch(b[0], b[1], m, device), eval_fn=eval_fn,
                       best_checkpoint=best_checkpoint_of(cfg))
    if run.finished:
        return {"rows": rows}
    train_time = time.time() - start
    model = finished_model(model, cfg)
    out_dir = cfg["out_dir"]
    if cfg["full_eval"]:
        rows[-1]["val_loss_full"] = evaluate_model(model, eval_train, val_loader, device, 0, dtype, True)[1]
    # every process calls save_model (FSDP gathers the shards), rank 0 writes
    ckpt_path = save_model(output_path(cfg), model, kind="chat",
                           template=TEMPLATE_NAME, method="sft", step=rows[-1]["step"],
                           train_loss=rows[-1]["train_loss"], val_loss=rows[-1]["val_loss"])
    metrics = {"train_loss": rows[-1]["train_loss"], "val_loss": rows[-1]["val_loss"],
               "train_seconds": round(train_time, 1), "test_records": len(test)}
    written = [ckpt_path, os.path.join(out_dir, TRAIN_STATE), os.path.join(out_dir, "log.csv")]
    if test and cfg["max_new_tokens"]:
        answers = answer_records(model, test, device, dtype, cfg["max_new_tokens"])
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
    if cfg["init"].endswith(".pth") and not os.path.isfile(cfg["init"]):
        raise UserError(f"no SFT checkpoint at {cfg['init']}: run `python finetune_chat.py` first, or pass "
                        f"--init PATH of one")
    path = resolve_data(cfg)
    train, test, val = split_data(load_preference_records(path), cfg)
    policy = build_policy(cfg, device)
    # the frozen reference, a copy of the policy as built; under --fsdp it is not sharded: whole on this device
    reference_params = count_parameters(policy)
    reference = None if cfg["dry_run"] else copy.deepcopy(policy).to(device).eval().requires_grad_(False)
    max_len = min(cfg["allowed_max_length"], policy.cfg["context_length"])
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
    if cfg["trainable"] == "lora":
        add_adapters(policy, cfg)
    if cfg["dry_run"]:
        return print_dry_run(policy.cfg, cfg, len(train_loader), dtype, device,
                             total_params=count_parameters(policy) + reference_params,
                             trainable_params=count_parameters(policy, True), context_length=max_len)
    startup_line(cfg, device, dtype, policy, f"{len(train)} train / {len(test)} test / {len(val)} val preference "
                                             f"pairs from {path}, beta {cfg['beta']}")

    ref_cache = {split: {} for split in loaders}

    def evaluate(m, splits=("train", "val", "test"), num_batches=None):
        """DPO scores per split, over the first num_batches batches of each (all when None)."""
        return {split: evaluate_dpo(m, reference, loaders[split], cfg["beta"], device, num_batches, dtype,
                                    ref_cache[split])
                for split in splits if split in loaders}

    def eval_fn(m):
        scores = evaluate(m, ("train", "val"), cfg["eval_iters"])
        return {f"{split}_{k}": scores[split][k] for k in ("loss", "reward_margin", "reward_acc")
                for split in ("train", "val")}

    # before training the policy equals the reference; under --fsdp the policy is whole on the CPU until
    # train_model shards it, so its twin, already on this device, is scored instead
    before = evaluate(reference if cfg["fsdp"] and world_size() > 1 else policy)
    print("before: " + ", ".join(f"{split} loss {v['loss']:.3f} margin {v['reward_margin']:.3f}"
                                 for split, v in before.items()))
    start = time.time()
    rows = train_model(policy, train_loader, cfg, device=device, dtype=dtype, kind="chat", run=run,
                       extra={"template": TEMPLATE_NAME, "method": "dpo", "beta": cfg["beta"]},
                       loss_fn=lambda m, b: dpo_batch_loss(m, reference, b, cfg["beta"], device)[0],
                       eval_fn=eval_fn, best_checkpoint=best_checkpoint_of(cfg, beta=cfg["beta"]))
    if run.finished:
        return {"rows": rows}
    train_time = time.time() - start
    after = evaluate(policy)
    policy = finished_model(policy, cfg)
    out_dir = cfg["out_dir"]
    # every process calls save_model (FSDP gathers the shards), rank 0 writes
    ckpt_path = save_model(output_path(cfg), policy, kind="chat",
                           template=TEMPLATE_NAME, method="dpo", beta=cfg["beta"], step=rows[-1]["step"],
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


def main(argv=None):
    given = get_config(DEFAULTS, argv, __doc__, check=check_settings)
    cfg = {**resolve_settings(given), "changed": changed_settings(given, DEFAULTS)}
    torch.manual_seed(cfg["seed"])
    device = setup_distributed(pick_device(cfg["device"]))  # under torchrun: join the group, take this GPU
    dtype = pick_dtype(cfg["dtype"], device)
    outputs = [output_path(cfg)] + [os.path.join(cfg["out_dir"], name) for name in
                                     ("metrics.json", "instruction-data-with-response.json")]
    run_method = run_dpo if cfg["method"] == "dpo" else run_sft
    with RunFolder(cfg, outputs, command_line(__file__, argv)) if not cfg["dry_run"] else nullcontext() as run:
        return run_method(cfg, device, dtype, run)


if __name__ == "__main__":
    entry(main)
