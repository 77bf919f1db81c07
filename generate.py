"""Sample text from a trained model.

    python generate.py --temperature 0.8                          # continue "Every effort moves you"
    python generate.py --prompt "The verdict was" --top_p 0.9 --num_samples 3 --stream
    python generate.py --init gpt2 --prompt "Hello, I am" --temperature 0   # OpenAI's GPT-2, greedy
    python generate.py --show_probs                                # next-token probabilities at three temperatures
"""
import os
import sys

import torch

from data import (EOT_ID, UserError, autocast, entry, get_config, get_tokenizer, pick_device, pick_dtype,
                  text_to_token_ids)
from model import count_parameters, generate_stream, load_model

DEFAULTS = dict(
    checkpoint="runs/pretrain/model.pth",  # what to sample from (pretrain.py writes it)
    init="",                   # gpt2 | gpt2-medium | gpt2-large | gpt2-xl | PATH: use this instead of --checkpoint
    prompt="Every effort moves you",  # text to continue
    max_new_tokens=50,         # tokens to add
    temperature=0.8,           # 0 = greedy; <1 sharper, >1 more random
    top_k=50,                  # keep the k most likely tokens; 0 = off
    top_p=1.0,                 # keep the smallest set of tokens holding this probability; 1 = off
    num_samples=1,             # continuations to print
    seed=123,                  # sampling seed
    stream=False,              # print tokens as they come
    show_probs=False,          # print the next-token distribution at temperatures 1, 0.1 and 5 and exit
    probs_plot="temperature-plot.png",  # where --show_probs draws its chart (needs matplotlib); "" = off
    device="auto",             # auto | cpu | cuda | mps
    dtype="auto",              # auto | float32 | bfloat16 | float16
)


def check_settings(cfg):
    if cfg["temperature"] < 0:
        raise UserError(f"--temperature must be >= 0 (0 = greedy), got {cfg['temperature']}")
    if not 0 < cfg["top_p"] <= 1:
        raise UserError(f"--top_p must be in (0, 1] (1 = off), got {cfg['top_p']}")
    if cfg["top_k"] < 0:
        raise UserError(f"--top_k must be >= 0 (0 = off), got {cfg['top_k']}")
    if cfg["max_new_tokens"] < 0 or cfg["num_samples"] < 1:
        raise UserError("--max_new_tokens must be >= 0 and --num_samples >= 1")
    if not cfg["prompt"].strip():
        raise UserError("--prompt is empty: give some text to continue")


def load_for_sampling(cfg, device):
    """The model named by --init, or the one in --checkpoint."""
    if cfg["init"]:
        from load_gpt2 import init_model
        model, _ = init_model(cfg["init"], device=device)
        return model, {"kind": "pretrained"}
    if not os.path.exists(cfg["checkpoint"]):
        raise UserError(f"no checkpoint at {cfg['checkpoint']}: run `python pretrain.py` first or pass "
                        f"--checkpoint (or --init gpt2)")
    model, ckpt = load_model(cfg["checkpoint"], device)
    if ckpt.get("kind") == "cls":
        raise UserError(f"{cfg['checkpoint']} is a classifier (kind cls): sample from a language model, e.g. "
                        f"runs/pretrain/model.pth, or use finetune_cls.py --predict")
    return model, ckpt


class TextStreamer:
    """Decode ids incrementally and print only complete characters (a UTF-8 character can span tokens)."""

    def __init__(self, tokenizer, out=sys.stdout):
        self.tokenizer, self.out = tokenizer, out
        self.ids, self.printed = [], 0

    def put(self, token_id):
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        if not text.endswith("\ufffd"):
            self.out.write(text[self.printed:])
            self.out.flush()
            self.printed = len(text)

    def text(self):
        return self.tokenizer.decode(self.ids)


def show_next_token_probs(model, idx, tokenizer, plot_path, k=10):
    """The top-k next tokens with their probabilities at temperatures 1, 0.1 and 5 (the book's temperature plot)."""
    with torch.no_grad():
        logits = model(idx[:, -model.cfg["context_length"]:])[0, -1].float()
    temps = (1.0, 0.1, 5.0)
    probs = {t: torch.softmax(logits / t, dim=-1) for t in temps}
    top = torch.topk(probs[1.0], k).indices.tolist()
    print(f"{'token':>16} " + " ".join(f"T={t:<6}" for t in temps))
    for i in top:
        print(f"{tokenizer.decode([i])!r:>16} " + " ".join(f"{probs[t][i].item():8.4f}" for t in temps))
    if plot_path:
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return
        fig, ax = plt.subplots(figsize=(6, 3))
        x = torch.arange(len(top))
        for j, t in enumerate(temps):
            ax.bar(x + j * 0.25, [probs[t][i].item() for i in top], 0.25, label=f"temperature {t}")
        ax.set_xticks(x + 0.25, [tokenizer.decode([i]) for i in top], rotation=90)
        ax.set_ylabel("probability")
        ax.legend()
        fig.tight_layout()
        fig.savefig(plot_path, dpi=120)
        plt.close(fig)
        print(f"wrote {plot_path}")


def main(argv=None):
    cfg = get_config(DEFAULTS, argv, __doc__, check=check_settings)
    torch.manual_seed(cfg["seed"])
    device = pick_device(cfg["device"])
    dtype = pick_dtype(cfg["dtype"], device)
    model, ckpt = load_for_sampling(cfg, device)
    model.eval()
    tokenizer = get_tokenizer()
    idx = text_to_token_ids(cfg["prompt"], tokenizer).to(device)
    ctx = model.cfg["context_length"]
    if idx.shape[1] > ctx:
        raise UserError(f"the prompt is {idx.shape[1]} tokens, longer than the model's context of {ctx}: shorten it")
    print(f"device {device}, {count_parameters(model):,} parameters, context {ctx}", file=sys.stderr)
    if cfg["show_probs"]:
        show_next_token_probs(model, idx, tokenizer, cfg["probs_plot"])
        return None
    gen = torch.Generator(device=device).manual_seed(cfg["seed"])
    texts = []
    for n in range(cfg["num_samples"]):
        if cfg["num_samples"] > 1:
            print(f"--- sample {n + 1}")
        streamer = TextStreamer(tokenizer, sys.stdout if cfg["stream"] else open(os.devnull, "w"))
        if cfg["stream"]:
            print(cfg["prompt"], end="", flush=True)
        with autocast(device, dtype):
            for next_id in generate_stream(model, idx, cfg["max_new_tokens"], ctx, cfg["temperature"],
                                           cfg["top_k"] or None, cfg["top_p"], eos_id=EOT_ID, generator=gen):
                if next_id.item() == EOT_ID:
                    break
                streamer.put(next_id.item())
        text = cfg["prompt"] + streamer.text()
        print("" if cfg["stream"] else text)
        texts.append(text)
    return texts


if __name__ == "__main__":
    entry(main)
