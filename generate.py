"""Sample text from a trained model.

    python generate.py --temperature 0.8                          # continue "Every effort moves you"
    python generate.py --prompt "The verdict was" --top_p 0.9 --num_samples 3 --stream
    echo "Once upon a time" | python generate.py --prompt - --temperature 0   # or --prompt_file story.txt
    python generate.py --init gpt2 --prompt "Hello, I am" --temperature 0   # OpenAI's GPT-2, greedy
    python generate.py --show_probs                                # next-token probabilities at three temperatures
    python generate.py --num_beams 4 --quantize int8               # beam search on int8 weights
    python generate.py --quantize int8 --save_int8 runs/pretrain/model-int8.pth   # write the int8 model, ~43 % size
    python generate.py --chat --checkpoint runs/chat/gpt2-medium355M-sft.pth   # talk to finetune_chat.py's model
"""
import contextlib
import io
import math
import os
import re
import sys

import torch

from checkpoints import init_model
from data import EOT_ID, TEMPLATE_NAME, get_tokenizer, read_text_file, text_to_token_ids
from files import atomic_write, check_output, make_folder, save_pth
from layers import quantize_int8
from model import KVCache, checkpoint_dict, count_parameters, generate_stream
from replies import Reply, chat_prompt
from settings import (UserError, autocast, available_memory, describe_device, entry, get_config, pick_device,
                      pick_dtype, pyplot)

DEFAULTS = dict(
    checkpoint="runs/pretrain/model.pth",  # what to sample from (pretrain.py writes it)
    init="",                   # gpt2 | gpt2-medium | gpt2-large | gpt2-xl | PATH: use this instead of --checkpoint
    prompt="Every effort moves you",  # text to continue; - = read it from standard input
    prompt_file="",            # read the text to continue from this file instead; "" = off
    max_new_tokens=50,         # tokens to add
    temperature=0.8,           # 0 = greedy; <1 sharper, >1 more random
    top_k=50,                  # keep the k most likely tokens; 0 = off
    top_p=1.0,                 # keep the smallest set of tokens holding this probability; 1 = off
    repetition_penalty=1.0,    # >1 makes tokens already in the text less likely; 1 = off
    num_beams=1,               # beam search over this many beams (deterministic: no temperature/top_k/top_p); 1 = off
    length_penalty=1.0,        # beam score = log-probability / length ** this; 0 = plain sum, >1 favours longer text
    quantize="none",           # none | int8: per-channel int8 weights for the Linear layers (faster decoding on CPU)
    save_int8="",              # with --quantize int8: write the int8 model to this .pth and exit ("" = off)
    force=False,               # let --save_int8 / --probs_plot replace an existing checkpoint or this run's input
    num_samples=1,             # continuations to print
    seed=123,                  # sampling seed
    stream=False,              # print tokens as they come
    show_probs=False,          # print the next-token distribution at temperatures 1, 0.1 and 5 and exit
    probs_plot="runs/temperature-plot.png",  # where --show_probs draws its chart (needs matplotlib); "" = off
    chat=False,                # talk: one message per line on standard input, replies keep the conversation
    system="",                 # --chat: a first instruction that holds for the whole conversation; "" = none
    n_heads=0,                 # heads of a bare state_dict (no config) whose width is not a GPT-2 size; 0 = from width
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
    if not cfg["prompt"].strip() and not cfg["prompt_file"]:
        raise UserError("--prompt is empty: give some text to continue")
    if cfg["repetition_penalty"] <= 0 or cfg["num_beams"] < 1:
        raise UserError("--repetition_penalty must be > 0 (1 = off) and --num_beams >= 1 (1 = off)")
    if cfg["quantize"] not in ("none", "int8"):
        raise UserError(f"--quantize must be none or int8, got {cfg['quantize']!r}")
    if cfg["n_heads"] < 0:
        raise UserError(f"--n_heads must be >= 1 (0 = from the width), got {cfg['n_heads']}")
    if cfg["show_probs"] and cfg["probs_plot"] and plot_format(cfg["probs_plot"]) not in PLOT_FORMATS:
        raise UserError(f"--probs_plot {cfg['probs_plot']} must end in one of .{', .'.join(PLOT_FORMATS)}")
    if cfg["save_int8"] and cfg["quantize"] != "int8":
        raise UserError("--save_int8 writes int8 weights: add --quantize int8")
    if cfg["num_beams"] > 1 and (cfg["stream"] or cfg["num_samples"] > 1 or cfg.get("chat")
                                 or cfg["repetition_penalty"] != 1):
        raise UserError("--num_beams gives one deterministic text at the end: drop --stream, --num_samples, "
                        "--chat and --repetition_penalty, or use --num_beams 1")
    if cfg.get("chat") and cfg["repetition_penalty"] != 1:
        raise UserError("--repetition_penalty is not available with --chat")


PLOT_FORMATS = ("png", "pdf", "svg", "jpg", "jpeg")


def plot_format(path):
    return os.path.splitext(path)[1].lower().lstrip(".")


def read_prompt(cfg, stdin=None):
    """The text to continue: --prompt, its `-` read from standard input, or the contents of --prompt_file."""
    if cfg["prompt_file"]:
        text, source = read_text_file(cfg["prompt_file"], "--prompt_file"), cfg["prompt_file"]
    elif cfg["prompt"] == "-":
        stdin = stdin or getattr(sys.stdin, "buffer", sys.stdin)
        if stdin is None:  # started with standard input closed (`<&-`)
            raise UserError("--prompt - reads standard input, which is closed: pipe the prompt in, or pass "
                            "--prompt TEXT or --prompt_file PATH")
        raw, source = stdin.read(), "standard input"
        try:
            text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        except UnicodeDecodeError as e:
            raise UserError(f"standard input is not UTF-8 (bad byte at offset {e.start}): send UTF-8 text") from None
    else:
        return cfg["prompt"]
    if not text.strip():
        raise UserError(f"the prompt from {source} is empty: give some text to continue")
    return text


def beam_memory(model, num_beams, max_new_tokens):
    """Bytes beam search holds at its peak: a KV cache row per beam over the context, and per (beam, vocabulary
    entry) the float32 logits and log-probabilities and two float64 score tables."""
    c = model.cfg
    return 2 * c["n_layers"] * num_beams * c["context_length"] * c["emb_dim"] * 4 + num_beams * c["vocab_size"] * 24


def check_limits(cfg, model, device):
    """Refuse requests that the model or the memory cannot serve, before generating anything."""
    vocab = model.cfg["vocab_size"]
    if cfg["num_beams"] > vocab:
        raise UserError(f"--num_beams {cfg['num_beams']} exceeds the vocabulary of {vocab} tokens: use fewer beams")
    need = beam_memory(model, cfg["num_beams"], cfg["max_new_tokens"]) if cfg["num_beams"] > 1 else 0
    need += 64 * cfg["max_new_tokens"]  # the growing sequence and its text, per new token
    free = available_memory(device)
    if free is not None and need > 0.8 * free:
        asked = f"--num_beams {cfg['num_beams']} with " if cfg["num_beams"] > 1 else ""
        raise UserError(f"{asked}--max_new_tokens {cfg['max_new_tokens']} needs about {need / 2**30:.1f} GiB, more "
                        f"than the {free / 2**30:.1f} GiB free: lower {'them' if asked else 'it'}")


def load_for_sampling(cfg, device):
    """(model, checkpoint dict) of the model named by --init, or of the one in --checkpoint."""
    if not cfg["init"] and not os.path.exists(cfg["checkpoint"]):
        raise UserError(f"no checkpoint at {cfg['checkpoint']}: run `python pretrain.py` first or pass "
                        f"--checkpoint (or --init gpt2)")
    overrides = {"n_heads": cfg["n_heads"]} if cfg["n_heads"] else None
    model, info = init_model(cfg["init"] or cfg["checkpoint"], overrides, device=device, int8_ok=True)
    return model, info["checkpoint"] or {"kind": info["kind"] or "pretrained"}


def save_int8(model, ckpt, path):
    """Write the int8 model with the checkpoint's other entries (template, step, ...); the scripts load it as it is."""
    keep = {k: v for k, v in ckpt.items() if k not in ("model", "config", "kind", "optimizer")}
    save_pth(path, checkpoint_dict(model, ckpt.get("kind") or "pretrain", **{**keep, "quantize": "int8"}))
    print(f"wrote {path} ({os.path.getsize(path) / 2**20:.1f} MiB, int8 weights)")
    return path


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
        plt = pyplot(plot_path)
        if plt is None:
            return
        fig, ax = plt.subplots(figsize=(6, 3))
        x = torch.arange(len(top))
        for j, t in enumerate(temps):
            ax.bar(x + j * 0.25, [probs[t][i].item() for i in top], 0.25, label=f"temperature {t}")
        ax.set_xticks(x + 0.25, [tokenizer.decode([i]) for i in top], rotation=90)
        ax.set_ylabel("probability")
        ax.legend()
        fig.tight_layout()
        make_folder(os.path.dirname(plot_path) or ".", "--probs_plot's folder")
        atomic_write(plot_path, lambda f: fig.savefig(f, dpi=120, format=plot_format(plot_path)))
        plt.close(fig)
        print(f"wrote {plot_path}")


# ---------------------------------------------------------------------------------------------------------------
# Beam search (--num_beams)
# ---------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def generate_beam(model, idx, max_new_tokens, num_beams, context_size=None, length_penalty=1.0, eos_id=None):
    """The most likely continuation of one prompt idx (1, T) by beam search -> (1, T + n), n <= max_new_tokens.

    Each step keeps the num_beams continuations with the highest summed log-probability. One that produces eos_id
    is finished (eos included in the output) and scored sum / n ** length_penalty over its n new tokens:
    length_penalty 0 compares plain sums (favours stopping early), 1 compares the mean per token, > 1 favours longer
    outputs. The search stops at max_new_tokens (unfinished beams are scored then too), or earlier once no
    unfinished beam can still beat the num_beams best finished ones. num_beams=1 follows the greedy path.
    The KV cache keeps one row per beam and is reordered as beams are kept, copied or dropped.
    """
    if idx.dim() != 2 or idx.shape[0] != 1:
        raise ValueError(f"generate_beam takes one prompt of shape (1, T), got {tuple(idx.shape)}")
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")
    context_size = min(context_size or model.cfg["context_length"], model.cfg["context_length"])
    was_training = model.training
    model.eval()
    try:
        return _beam_search(model, idx, max_new_tokens, num_beams, context_size, length_penalty, eos_id)
    finally:
        model.train(was_training)


def _beam_search(model, idx, max_new_tokens, num_beams, context_size, length_penalty, eos_id):
    finished = []  # (score, sequence (T + n,)), at most num_beams, best first
    seqs = idx.repeat(num_beams, 1)  # (num_beams, T + step)
    # every beam starts as the prompt; -inf on all but one keeps the first step from picking the same token n times
    scores = torch.full((num_beams,), float("-inf"), dtype=torch.float64, device=idx.device)
    scores[0] = 0.0
    cache = None
    for step in range(max_new_tokens):
        if seqs.shape[1] > context_size:  # the window slides: recompute it (as generate_stream does)
            cache = None
            logits = model(seqs[:, -context_size:], last_only=True)[:, -1]
        elif cache is None:  # first step: run the prompt once, then give each beam its own copy of the cache
            one = KVCache(model, 1, context_size)
            logits = model(idx, kv_cache=one, last_only=True)[:, -1].expand(num_beams, -1)
            cache = _repeat_cache(one, num_beams, model, context_size)
        else:
            logits = model(seqs[:, -1:], kv_cache=cache)[:, -1]
        total = scores[:, None] + torch.log_softmax(logits.double(), dim=-1)  # (num_beams, vocab)
        vocab = total.shape[1]
        # 2 * num_beams candidates hold at least num_beams that are not eos (each beam has one eos candidate)
        top_scores, flat = total.flatten().topk(min(2 * num_beams, total.numel()))
        n_new = step + 1
        rows, tokens, kept = [], [], []
        for s, f in zip(top_scores.tolist(), flat.tolist()):
            if s == float("-inf") or len(rows) == num_beams:
                break
            row, token = divmod(f, vocab)
            if token == eos_id:
                done = torch.cat([seqs[row], seqs.new_tensor([token])])
                _add_finished(finished, _beam_score(s, n_new, length_penalty), done, num_beams)
            else:
                rows.append(row), tokens.append(token), kept.append(s)
        if not rows:
            break
        pad = num_beams - len(rows)  # fewer live candidates than beams: fill with dead (-inf) copies
        rows, tokens, kept = rows + rows[:1] * pad, tokens + tokens[:1] * pad, kept + [float("-inf")] * pad
        rows = torch.tensor(rows, device=idx.device)
        seqs = torch.cat([seqs[rows], torch.tensor(tokens, device=idx.device)[:, None]], dim=1)
        scores = torch.tensor(kept, dtype=torch.float64, device=idx.device)
        if cache is not None:
            _reorder_cache(cache, rows)
        if len(finished) == num_beams and finished[-1][0] >= _best_possible(scores.max().item(), n_new,
                                                                            max_new_tokens, length_penalty):
            break
    else:
        for s, seq in zip(scores.tolist(), seqs):
            if s > float("-inf"):
                _add_finished(finished, _beam_score(s, max(max_new_tokens, 1), length_penalty), seq, num_beams)
    if not finished:  # max_new_tokens == 0
        return idx
    return finished[0][1][None]


def _add_finished(finished, score, seq, num_beams):
    finished.append((score, seq))
    finished.sort(key=lambda pair: -pair[0])
    del finished[num_beams:]


def _best_possible(log_prob, n_done, max_new_tokens, length_penalty):
    """Highest score a live beam with summed log_prob after n_done tokens can still reach. More tokens only lower
    the sum, so the best is at the shortest or the longest remaining length, whichever the penalty favours; at
    max_new_tokens the beam is complete and its score is final."""
    if n_done >= max_new_tokens:
        return _beam_score(log_prob, n_done, length_penalty)
    return max(_beam_score(log_prob, n, length_penalty) for n in (n_done + 1, max_new_tokens))


def _beam_score(log_prob, n, length_penalty):
    """log_prob / n ** length_penalty, by way of logs so that no penalty overflows a float (the factor saturates)."""
    return log_prob * math.exp(min(-length_penalty * math.log(n), 700.0))


def _repeat_cache(cache, n, model, max_len):
    """A cache of n rows, each a copy of the 1-row cache's contents."""
    big = KVCache(model, n, max_len, dtype=cache.layers[0].k.dtype)
    for src, dst in zip(cache.layers, big.layers):
        dst.k[:, :, :cache.pos] = src.k[:, :, :cache.pos]
        dst.v[:, :, :cache.pos] = src.v[:, :, :cache.pos]
    big.pos, big.ids = cache.pos, cache.ids.expand(n, -1).clone()
    return big


def _reorder_cache(cache, rows):
    """Row i of the cache becomes a copy of old row rows[i]."""
    for layer in cache.layers:
        layer.k[:, :, :cache.pos] = layer.k[rows, :, :cache.pos]
        layer.v[:, :, :cache.pos] = layer.v[rows, :, :cache.pos]
    cache.ids = cache.ids[rows]


# ---------------------------------------------------------------------------------------------------------------
# Chat (--chat): a conversation with an instruction-tuned model, in the template finetune_chat.py trains with
# ---------------------------------------------------------------------------------------------------------------

def read_messages(stdin, interactive):
    """Lines from the user, without the line end. A terminal gets a `you> ` prompt, where Ctrl-C clears the line
    being typed and asks again; a line that is not UTF-8 is reported on stderr and skipped."""
    def lines():
        if not interactive:
            yield from getattr(stdin, "buffer", stdin)  # bytes where there is a buffer, to check them ourselves
            return
        while True:
            try:
                yield input("you> ")
            except KeyboardInterrupt:
                print(file=sys.stderr)
            except EOFError:
                print(file=sys.stderr)
                return
            except UnicodeDecodeError as e:
                yield e.object

    for n, line in enumerate(lines(), 1):
        try:
            # a terminal may hand over undecodable bytes as surrogates (Python's UTF-8 mode): check those too
            line = line.decode("utf-8") if isinstance(line, bytes) else line.encode("utf-8").decode("utf-8")
        except UnicodeError:
            where = f"input line {n}" if not interactive else "that line"
            print(f"error: {where} is not UTF-8: skipped; send UTF-8 text", file=sys.stderr)
            continue
        yield line.rstrip("\r\n")


CHAT_HELP = """commands:
  /reset    forget the conversation and start a new one
  /history  show the conversation so far
  /help     show this list
  /exit     leave (so does Ctrl-D)
anything else is sent to the model as your message; in a terminal, Ctrl-C stops a reply (what it had written
stays in the conversation, marked as cut) or clears the line being typed"""
CUT_MARK = " [cut]"  # shown after a reply that Ctrl-C stopped


def chat_command(text, messages):
    """Run a REPL command (a line like /word) -> the conversation after it, or None for /exit."""
    command = text.split()[0]
    if command != text:
        print(f"({command} takes no arguments: ignored them)", file=sys.stderr)
    if command == "/exit":
        return None
    if command == "/reset":
        messages = []
        print("(conversation cleared)", file=sys.stderr)
    elif command == "/history":
        for m in messages:
            print(f"{m['role']}: {m['content']}{CUT_MARK if m.get('cut') else ''}", file=sys.stderr)
        print(f"({len(messages) // 2} exchanges)", file=sys.stderr)
    elif command == "/help":
        print(CHAT_HELP, file=sys.stderr)
    else:
        print(f"unknown command {text}: /help lists the commands", file=sys.stderr)
    return messages


def warn_if_not_chat(ckpt, source):
    if ckpt.get("kind") != "chat":
        print(f"warning: {source} is not an instruction-tuned chat model (kind {ckpt.get('kind')}): continuing "
              f"with the {TEMPLATE_NAME} template, but replies may not follow it; fine-tune with finetune_chat.py",
              file=sys.stderr)
    elif ckpt.get("template", TEMPLATE_NAME) != TEMPLATE_NAME:
        print(f"warning: {source} was trained with template {ckpt['template']!r}: continuing with "
              f"{TEMPLATE_NAME}", file=sys.stderr)


def chat(model, ckpt, cfg, device, dtype, stdin=None, out=None):
    """Talk with the model: one user message per line of stdin, each reply streamed to out.

    Every prompt holds the earlier turns in the template (--system first, if given); the KV cache keeps the
    unchanged prefix between turns; when the conversation outgrows the context the oldest exchanges are dropped.
    `/reset` forgets the conversation, `/history` shows it, `/help` lists the commands, `/exit` or the end of input
    leaves; an empty reply shows as (empty reply). In a terminal the standard library's readline gives line editing
    and history, and Ctrl-C stops the reply being written (its text so far stays, marked as cut) or clears the line
    being typed (read_messages) instead of ending the program. Returns the turns as dicts of user, reply, prompt
    (the text the model saw), reused (prompt tokens taken from the cache) and cut (whether Ctrl-C stopped it).
    """
    stdin, out = stdin or sys.stdin or io.StringIO(), out or sys.stdout  # a closed stdin: the input has ended
    interactive = stdin.isatty()
    warn_if_not_chat(ckpt, cfg["init"] or cfg["checkpoint"])
    tokenizer = get_tokenizer()
    ctx = model.cfg["context_length"]
    cache = KVCache(model, 1, ctx)
    gen = torch.Generator(device=device).manual_seed(cfg["seed"])
    print(f"{describe_device(device, dtype, cfg['dtype'])}, {count_parameters(model):,} parameters, context {ctx}",
          file=sys.stderr)
    if interactive:
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401  (line editing and history for input(), where the platform has it)
        print("chat: type a message; /help lists the commands, /exit (or Ctrl-D) leaves", file=sys.stderr)
    messages, turns, told = [], [], False
    for line in read_messages(stdin, interactive):
        text = line.strip()
        if not text:
            continue
        if text.split()[0] in ("/exit", "/reset", "/history", "/help") or re.fullmatch(r"/\w+", text):
            messages = chat_command(text, messages)  # a message may start with /: only /word lines are commands
            if messages is None:
                break
            continue
        ids, dropped = chat_prompt(messages + [{"role": "user", "content": text}], cfg["system"], ctx,
                                   cfg["max_new_tokens"], tokenizer)
        if len(ids) >= ctx:
            print(f"error: that message makes a prompt of {len(ids)} tokens, more than the model's context of "
                  f"{ctx} leaves room for: shorten it", file=sys.stderr)
            continue
        if dropped:
            messages = messages[2 * dropped:]
            if not told:
                print(f"(the conversation outgrew the context of {ctx} tokens: dropping the oldest turns)",
                      file=sys.stderr)
                told = True
        idx = torch.tensor([ids], device=device)
        reused = min(cache.shared_prefix(idx), len(ids) - 1)
        reply = Reply(model, idx, min(cfg["max_new_tokens"], ctx - len(ids)), cfg["temperature"], cfg["top_k"],
                      cfg["top_p"], kv_cache=cache, generator=gen, tokenizer=tokenizer)
        cut = write_reply(reply, out, device, dtype, interactive)
        messages += [{"role": "user", "content": text}, {"role": "assistant", "content": reply.text, "cut": cut}]
        turns.append({"user": text, "reply": reply.text, "prompt": tokenizer.decode(ids), "reused": reused,
                      "cut": cut})
    return turns


def write_reply(reply, out, device, dtype, interactive):
    """Stream the reply to out; True when Ctrl-C stopped it (only in a terminal: elsewhere Ctrl-C ends the program).
    """
    cut = False
    try:
        with autocast(device, dtype):
            for piece in reply:
                out.write(piece)
                out.flush()
    except KeyboardInterrupt:
        if not interactive:
            raise
        cut = True
    if cut:
        out.write(CUT_MARK)
    elif not reply.text:
        out.write("(empty reply)")
    out.write("\n\n" if interactive else "\n")
    out.flush()
    return cut


def main(argv=None):
    cfg = get_config(DEFAULTS, argv, __doc__, check=check_settings)
    torch.manual_seed(cfg["seed"])
    device = pick_device(cfg["device"])
    dtype = pick_dtype(cfg["dtype"], device)
    source = cfg["init"] or cfg["checkpoint"]
    check_output(cfg["save_int8"], "--save_int8", cfg["force"], inputs=[source])
    if cfg["show_probs"]:
        check_output(cfg["probs_plot"], "--probs_plot", cfg["force"], inputs=[source],
                     replaceable=cfg["probs_plot"] == DEFAULTS["probs_plot"])  # its default file: every run redraws it
    prompt = read_prompt(cfg) if not cfg["chat"] else ""
    model, ckpt = load_for_sampling(cfg, device)
    check_limits(cfg, model, device)
    if cfg["quantize"] == "int8":
        quantize_int8(model)  # per-channel int8 weights, computed from the loaded float ones
        if cfg["save_int8"]:
            return save_int8(model, ckpt, cfg["save_int8"])
    if cfg["chat"]:
        return chat(model, ckpt, cfg, device, dtype)
    tokenizer = get_tokenizer()
    idx = text_to_token_ids(prompt, tokenizer).to(device)
    ctx = model.cfg["context_length"]
    if idx.shape[1] > ctx:
        raise UserError(f"the prompt is {idx.shape[1]} tokens, longer than the model's context of {ctx}: shorten it")
    print(f"{describe_device(device, dtype, cfg['dtype'])}, {count_parameters(model):,} parameters, context {ctx}",
          file=sys.stderr)
    if cfg["show_probs"]:
        show_next_token_probs(model, idx, tokenizer, cfg["probs_plot"])
        return None
    gen = torch.Generator(device=device).manual_seed(cfg["seed"])
    texts = []
    for n in range(cfg["num_samples"]):
        if cfg["num_samples"] > 1:
            print(f"--- sample {n + 1}")
        streamer = TextStreamer(tokenizer, sys.stdout if cfg["stream"] else io.StringIO())
        if cfg["stream"]:
            print(prompt, end="", flush=True)
        with autocast(device, dtype):
            if cfg["num_beams"] > 1:
                best = generate_beam(model, idx, cfg["max_new_tokens"], cfg["num_beams"], ctx,
                                     cfg["length_penalty"], eos_id=EOT_ID)
                for token_id in best[0, idx.shape[1]:].tolist():
                    if token_id != EOT_ID:
                        streamer.put(token_id)
            else:
                for next_id in generate_stream(model, idx, cfg["max_new_tokens"], ctx, cfg["temperature"],
                                               cfg["top_k"] or None, cfg["top_p"], eos_id=EOT_ID, generator=gen,
                                               repetition_penalty=cfg["repetition_penalty"]):
                    if next_id.item() == EOT_ID:
                        break
                    streamer.put(next_id.item())
        text = prompt + streamer.text()
        print("" if cfg["stream"] else text)
        texts.append(text)
    return texts


if __name__ == "__main__":
    entry(main)
