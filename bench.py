"""Measure this machine: matmul and memory ceilings, training tokens/s and MFU, decoding and prefill tokens/s.

    python bench.py                                  # 124M, context 256, batch 2 (the book's run), one table
    python bench.py --size gpt2-medium --steps 2 --json bench.json
    python bench.py --bf16 on --compile on           # bf16 and compile entries even on a CPU without native bf16
    python bench.py --wait_idle 60                   # on a shared machine: time each run when the CPUs are idle
    python bench.py --corpus my_texts/               # the token cache and training on a corpus of your own
    python bench.py --corpus my_texts/ --nanogpt ../nanoGPT/train.py   # time-to-loss: ours against nanoGPT's
    python bench.py --serve runs/mychat/scratch-sft.pth   # serve.py's time to first token and tokens/s, and direct

Numbers, never pass/fail: each is the median of --repeats runs (--steps for training). MFU is the model's FLOPs per
second over the measured matmul ceiling of the dtype it trains in (fp32 or bf16), counting 6 FLOPs per matmul
weight per token (forward and backward) plus 12 * n_layers * emb_dim * context per token for attention. Decode
tokens/s is (n - 1) / (time(n) - time(1)) for n new tokens at batch 1, so the prompt's prefill is left out. Beside
each training and decoding speed stands its limit on this machine: training at the matmul ceiling, decoding at the
memory bandwidth (every weight read once per token). With transformers installed, its GPT-2 (random weights, same
sizes) runs beside ours.
"""
import csv
import gc
import json
import os
import socket
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

import torch
from tqdm import tqdm

from checkpoints import init_model
from data import GPTDatasetV1, TokenWindows, corpus_files, fetch_data, get_tokenizer, token_cache
from files import check_output, write_json
from layers import quantize_int8
from model import GPT_CONFIG_124M, MODEL_CONFIGS, GPTModel, KVCache, count_parameters, generate
from replies import Reply
from settings import (UserError, autocast, changed_settings, entry, get_config, has_native_bf16, keep_freed_memory,
                      pick_device)
from trainer import calc_loss_batch, make_optimizer

DEFAULTS = dict(
    size="gpt2",               # gpt2 | gpt2-medium | gpt2-large | gpt2-xl | tiny (2 layers, width 32: a smoke test)
    context_length=256,        # tokens per training window (and the model's position table)
    batch_size=2,              # windows per training step
    steps=3,                   # timed training steps per entry, after one warm-up step; 0 = skip training
    repeats=3,                 # runs per matmul, bandwidth, decode and prefill entry
    decode_tokens=32,          # new tokens per decode run; 0 = skip decoding
    prompt_tokens=16,          # prompt length of the decode runs
    matmul_size=2048,          # side of the middle one of three square matmuls that measure the FLOP/s ceiling
    bandwidth_mib=256,         # buffer size that measures memory bandwidth
    bf16="auto",               # auto | on | off: auto runs bf16 entries only where the hardware has native bf16
    compile="auto",            # auto | on | off: torch.compile training entries; auto = where bf16 is native too
    int8=True,                 # int8 decode, prefill and file size; false = off
    compare="auto",            # auto | on | off: transformers' GPT-2 beside ours; auto = when it is installed
    json="",                   # also write the results as JSON to this path; "-" = stdout; "" = off
    force=False,               # replace an existing --json file
    threads=0,                 # torch CPU threads; 0 = torch's default
    wait_idle=0.0,             # seconds each timed run may wait for other processes to leave the CPUs idle; 0 = off
    device="auto",             # auto | cpu | cuda | mps
    seed=123,                  # seeds the random weights and tokens
    corpus="",                 # instead of the above: time the token cache and a tiny model's training on this
                               # file or folder (see corpus_bench); "" = off
    corpus_steps=200,          # --corpus: training steps of the tiny model (2 layers x 64, context 64, batch 2)
    nanogpt="",                # with --corpus: race our pretrain.py against nanoGPT's train.py (this path; its
                               # folder's model.py and configurator.py are copied beside it into a scratch folder)
    race_s=180,                # --nanogpt: wall seconds each trainer gets (4 layers x 128, context 128, batch 4)
    serve="",                  # instead of the above: time the first token and tokens/s of this checkpoint through
                               # serve.py (streamed, greedy) against generating in this process; "" = off
)

SIZES = [*MODEL_CONFIGS, "tiny"]


def check_settings(cfg):
    if cfg["size"] not in SIZES:
        raise UserError(f"--size must be one of {', '.join(SIZES)}, got {cfg['size']!r}")
    for k in ("bf16", "compile", "compare"):
        if cfg[k] not in ("auto", "on", "off"):
            raise UserError(f"--{k} must be auto, on or off, got {cfg[k]!r}")
    for k in ("context_length", "batch_size", "repeats", "prompt_tokens", "matmul_size", "bandwidth_mib"):
        if cfg[k] < 1:
            raise UserError(f"--{k} must be at least 1, got {cfg[k]}")
    for k in ("steps", "decode_tokens", "threads", "wait_idle"):
        if cfg[k] < 0:
            raise UserError(f"--{k} must be >= 0, got {cfg[k]}")
    if cfg["nanogpt"] and not cfg["corpus"]:
        raise UserError("--nanogpt races on a corpus: add --corpus FILE_OR_FOLDER")
    if cfg["nanogpt"] and not os.path.isfile(cfg["nanogpt"]):
        raise UserError(f"--nanogpt: no file at {cfg['nanogpt']}: give the path of nanoGPT's train.py")
    if cfg["decode_tokens"] and cfg["prompt_tokens"] + cfg["decode_tokens"] > cfg["context_length"]:
        raise UserError(f"--prompt_tokens + --decode_tokens ({cfg['prompt_tokens'] + cfg['decode_tokens']}) must fit "
                        f"in --context_length {cfg['context_length']}")


def model_config(size, context_length):
    base = dict(GPT_CONFIG_124M, emb_dim=32, n_layers=2, n_heads=2) if size == "tiny" else MODEL_CONFIGS[size]
    return dict(base, context_length=context_length)


# ---------------------------------------------------------------------------------------------------------------
# Timing and memory helpers
# ---------------------------------------------------------------------------------------------------------------

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


IDLE = dict(max_wait=0.0, runs=0, busy_runs=0)  # --wait_idle, and how many timed runs started on a busy machine


def others_cpu_share(window=0.2):
    """Share of all CPUs used over `window` seconds while this process sleeps, i.e. by other processes (Linux's
    /proc/stat; 0 elsewhere)."""
    def busy_and_total():
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:]]
        return sum(ticks) - ticks[3] - ticks[4], sum(ticks)  # minus idle and iowait
    try:
        busy0, total0 = busy_and_total()
        time.sleep(window)
        busy1, total1 = busy_and_total()
    except (OSError, ValueError, IndexError):
        return 0.0
    return (busy1 - busy0) / max(total1 - total0, 1)


def wait_for_idle():
    """Wait up to IDLE["max_wait"] seconds for other processes to leave the CPUs (nearly) idle; count the runs that
    start on a busy machine anyway. On a shared machine this keeps other work out of most measurements."""
    if IDLE["max_wait"] <= 0:
        return
    deadline = time.time() + IDLE["max_wait"]
    busy = others_cpu_share() > 0.1
    while busy and time.time() < deadline:
        busy = others_cpu_share() > 0.1
    IDLE["runs"] += 1
    IDLE["busy_runs"] += busy


def timed(fn, device):
    """Seconds for one fn() call, started once the CPUs are idle."""
    wait_for_idle()
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def median_time(fn, repeats, device, warmup=1):
    """Median wall time of fn() in seconds over repeats runs, after warmup untimed runs."""
    for _ in range(warmup):
        fn()
    sync(device)
    return statistics.median(timed(fn, device) for _ in range(repeats))


def reset_peak_memory(device):
    """Start a new high-water mark (Linux: /proc/self/clear_refs; CUDA: the allocator's peak)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # elsewhere the peak covers the whole process so far


def peak_memory_mib(device):
    """Peak memory since reset_peak_memory: CUDA allocations on a GPU, else the process's resident set (RSS)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def load_average():
    """The 1-minute load average (None where the OS has none): other work on the machine lowers every number."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------------------
# Machine ceilings
# ---------------------------------------------------------------------------------------------------------------

def matmul_gflops(n, dtype, device, repeats):
    """The ceiling: the best median GFLOP/s of square matmuls of sides n/2, n and 3n/2 (kernels favour some sizes)."""
    best = 0.0
    for side in (n // 2, n, 3 * n // 2):
        a = torch.randn(side, side, device=device).to(dtype)
        b = torch.randn(side, side, device=device).to(dtype)
        best = max(best, 2 * side**3 / median_time(lambda: a @ b, repeats, device) / 1e9)
    return best


def memory_bandwidth(mib, device, repeats):
    """(read GB/s from summing a buffer, copy GB/s counting bytes read plus bytes written)"""
    a = torch.rand(mib * 2**20 // 4, device=device)
    b = torch.empty_like(a)
    nbytes = a.numel() * 4
    read = nbytes / median_time(lambda: a.sum(), repeats, device) / 1e9
    copy = 2 * nbytes / median_time(lambda: b.copy_(a), repeats, device) / 1e9
    return read, copy


# ---------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------

def train_flops_per_token(mcfg, context_length):
    """6 per matmul weight (forward 2, backward 4) plus attention's scores and weighted sums."""
    d, layers, vocab = mcfg["emb_dim"], mcfg["n_layers"], mcfg["vocab_size"]
    matmul_weights = layers * 12 * d * d + d * vocab  # q, k, v, out (4 d^2) and the MLP (8 d^2) per layer; out_head
    return 6 * matmul_weights + 12 * layers * d * context_length


def train_step_time(make_step, steps, device):
    """(median seconds per step, peak memory MiB) over steps timed steps after one warm-up (which compiles)."""
    reset_peak_memory(device)
    step_fn = make_step()
    step_fn()
    sync(device)
    times = [timed(step_fn, device) for _ in range(steps)]
    return statistics.median(times), peak_memory_mib(device)


def our_train_step(mcfg, batch, device, dtype, compiled):
    def make():
        model = GPTModel(dict(mcfg, drop_rate=0.1)).to(device)
        optimizer = make_optimizer(model, 4e-4, 0.1, device)
        run = torch.compile(model) if compiled else model
        x, y = batch

        def step():
            with autocast(device, dtype):
                loss = calc_loss_batch(x, y, run, device)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return step
    return make


def hf_config(mcfg):
    import transformers  # optional: the comparison runs only where it is installed
    from transformers import GPT2Config
    transformers.logging.set_verbosity_error()
    return GPT2Config(vocab_size=mcfg["vocab_size"], n_positions=mcfg["context_length"], n_embd=mcfg["emb_dim"],
                      n_layer=mcfg["n_layers"], n_head=mcfg["n_heads"], resid_pdrop=0.1, embd_pdrop=0.1,
                      attn_pdrop=0.1)


def hf_train_step(mcfg, batch, device, dtype):
    def make():
        from transformers import GPT2LMHeadModel
        model = GPT2LMHeadModel(hf_config(mcfg)).to(device).train()
        optimizer = make_optimizer(model, 4e-4, 0.1, device)
        x, _ = batch

        def step():
            with autocast(device, dtype):
                loss = model(input_ids=x, labels=x).loss  # shifts the labels itself
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return step
    return make


# ---------------------------------------------------------------------------------------------------------------
# Inference
# ---------------------------------------------------------------------------------------------------------------

def decode_rate(generate_n, n, repeats, device):
    """Tokens/s of the decode phase: (n - 1) / (time for n new tokens - time for 1), both medians."""
    t1 = median_time(lambda: generate_n(1), repeats, device)
    tn = median_time(lambda: generate_n(n), repeats, device)
    return (n - 1) / max(tn - t1, 1e-9)


def our_decode(model, prompt, use_cache, dtype=torch.float32):
    def generate_n(n):
        with autocast(prompt.device, dtype):
            return generate(model, prompt, n, use_cache=use_cache)
    return generate_n


def hf_decode(model, prompt, use_cache):
    def generate_n(n):
        return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, use_cache=use_cache, pad_token_id=0)
    return generate_n


def prefill_rate(model, tokens, repeats, device, **last_only):
    """Prompt tokens/s of generation's first pass: every position through the blocks, logits for the last only."""
    with torch.no_grad():
        return tokens.numel() / median_time(lambda: model(tokens, **last_only), repeats, device)


def file_mib(model):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.pth")
        torch.save(model.state_dict(), path)
        return os.path.getsize(path) / 2**20


# ---------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------

ROWS = [  # key, label, unit
    ("matmul_fp32_gflops", "matmul fp32", "GFLOP/s"),
    ("matmul_bf16_gflops", "matmul bf16", "GFLOP/s"),
    ("mem_read_gbs", "memory read", "GB/s"),
    ("mem_copy_gbs", "memory copy (read + write)", "GB/s"),
    ("train_fp32_tok_s", "train fp32", "tokens/s"),
    ("train_fp32_mfu", "train fp32 MFU", "%"),
    ("train_fp32_peak_mib", "train fp32 peak memory", "MiB"),
    ("train_fp32_compile_tok_s", "train fp32 + compile", "tokens/s"),
    ("train_fp32_compile_mfu", "train fp32 + compile MFU", "%"),
    ("train_bf16_tok_s", "train bf16", "tokens/s"),
    ("train_bf16_mfu", "train bf16 MFU (of bf16 matmul)", "%"),
    ("train_bf16_peak_mib", "train bf16 peak memory", "MiB"),
    ("train_bf16_compile_tok_s", "train bf16 + compile", "tokens/s"),
    ("decode_fp32_cache_tok_s", "decode fp32, KV cache (batch 1)", "tokens/s"),
    ("decode_fp32_nocache_tok_s", "decode fp32, no cache (batch 1)", "tokens/s"),
    ("decode_bf16_cache_tok_s", "decode bf16 weights, KV cache", "tokens/s"),
    ("decode_int8_cache_tok_s", "decode int8 weights, KV cache", "tokens/s"),
    ("prefill_fp32_tok_s", "prefill fp32 (batch 1, full context)", "tokens/s"),
    ("prefill_int8_tok_s", "prefill int8", "tokens/s"),
    ("file_fp32_mib", "weights file fp32", "MiB"),
    ("file_int8_mib", "weights file int8", "MiB"),
]


def plan(cfg, device):
    """Which entries run, and why the others do not: (flags, {key: reason})."""
    native_bf16 = has_native_bf16(device)
    skipped = {}
    bf16 = cfg["bf16"] == "on" or (cfg["bf16"] == "auto" and native_bf16)
    if not bf16:
        why = "--bf16 off" if cfg["bf16"] == "off" else "no native bf16 here (--bf16 on to force)"
        skipped.update({k: why for k, _, _ in ROWS if "bf16" in k})
    # compiling takes a minute or more on a CPU and gains little on one without native bf16: off there by default
    compiled = cfg["compile"] == "on" or (cfg["compile"] == "auto" and native_bf16)
    if not compiled:
        why = "--compile off" if cfg["compile"] == "off" else "off where bf16 is not native (--compile on)"
        skipped.update({k: why for k, _, _ in ROWS if "compile" in k})
    if not cfg["steps"]:
        skipped.update({k: "--steps 0" for k, _, _ in ROWS if k.startswith("train")})
    if not cfg["decode_tokens"]:
        skipped.update({k: "--decode_tokens 0" for k, _, _ in ROWS if k.startswith("decode")})
    if not cfg["int8"]:
        skipped.update({k: "--int8 false" for k, _, _ in ROWS if "int8" in k})
    if device.type != "cpu":
        skipped.update({k: "int8 kernels are measured on CPU" for k, _, _ in ROWS if "int8" in k and "file" not in k})
    compare = None
    if cfg["compare"] != "off":
        try:
            import transformers
            compare = transformers.__version__
        except ImportError:
            if cfg["compare"] == "on":
                raise UserError("--compare on needs transformers: pip install transformers, or --compare auto")
    return dict(bf16=bf16, native_bf16=native_bf16, compiled=compiled, compare=compare), skipped


def run_all(cfg, device, flags, skipped):
    """Every entry not in skipped -> (ours {key: value}, transformers {key: value})."""
    torch.manual_seed(cfg["seed"])
    mcfg = model_config(cfg["size"], cfg["context_length"])
    ours, theirs, todo = {}, {}, []
    want = lambda key: key not in skipped  # noqa: E731
    ceiling = {}

    def ceilings():
        ours["matmul_fp32_gflops"] = ceiling["fp32"] = matmul_gflops(cfg["matmul_size"], torch.float32, device,
                                                                      cfg["repeats"])
        if want("matmul_bf16_gflops"):
            ours["matmul_bf16_gflops"] = ceiling["bf16"] = matmul_gflops(cfg["matmul_size"], torch.bfloat16, device,
                                                                          cfg["repeats"])
        ours["mem_read_gbs"], ours["mem_copy_gbs"] = memory_bandwidth(cfg["bandwidth_mib"], device, cfg["repeats"])
    todo.append(("machine ceilings", ceilings))

    tokens = cfg["batch_size"] * cfg["context_length"]
    flops = train_flops_per_token(mcfg, cfg["context_length"]) * tokens
    data = torch.randint(0, mcfg["vocab_size"], (cfg["batch_size"], cfg["context_length"] + 1), device=device)
    batch = (data[:, :-1], data[:, 1:])

    def train_entry(prefix, make_step, out):
        def run():
            seconds, peak = train_step_time(make_step, cfg["steps"], device)
            out[f"{prefix}_tok_s"] = tokens / seconds
            # against the matmul ceiling of the dtype the matmuls run in
            out[f"{prefix}_mfu"] = 100 * flops / seconds / 1e9 / ceiling["bf16" if "bf16" in prefix else "fp32"]
            out[f"{prefix}_peak_mib"] = peak
            free()
        return run

    for dtype_name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        key = f"train_{dtype_name}"
        if want(f"{key}_tok_s"):
            todo.append((f"train {dtype_name}", train_entry(key, our_train_step(mcfg, batch, device, dtype, False),
                                                            ours)))
            if flags["compare"]:
                todo.append((f"transformers train {dtype_name}",
                             train_entry(key, hf_train_step(mcfg, batch, device, dtype), theirs)))
        if want(f"{key}_compile_tok_s"):
            todo.append((f"train {dtype_name} + compile",
                         train_entry(f"{key}_compile", our_train_step(mcfg, batch, device, dtype, True), ours)))

    prompt = data[:1, :cfg["prompt_tokens"]]
    full = data[:1, :cfg["context_length"]]
    n, repeats = cfg["decode_tokens"], cfg["repeats"]

    def inference():
        model = GPTModel(dict(mcfg, drop_rate=0.0)).to(device).eval()
        if want("decode_fp32_cache_tok_s"):
            ours["decode_fp32_cache_tok_s"] = decode_rate(our_decode(model, prompt, True), n, repeats, device)
            ours["decode_fp32_nocache_tok_s"] = decode_rate(our_decode(model, prompt, False), n, repeats, device)
        ours["prefill_fp32_tok_s"] = prefill_rate(model, full, repeats, device, last_only=True)
        if want("file_fp32_mib"):
            ours["file_fp32_mib"] = file_mib(model)
        if want("decode_bf16_cache_tok_s"):
            model.to(torch.bfloat16)
            ours["decode_bf16_cache_tok_s"] = decode_rate(our_decode(model, prompt, True), n, repeats, device)
            model.float()
        if cfg["int8"]:
            quantize_int8(model)
            ours["file_int8_mib"] = file_mib(model)
            if want("decode_int8_cache_tok_s"):
                ours["decode_int8_cache_tok_s"] = decode_rate(our_decode(model, prompt, True), n, repeats, device)
            if want("prefill_int8_tok_s"):
                ours["prefill_int8_tok_s"] = prefill_rate(model, full, repeats, device, last_only=True)
        del model
        free()
    todo.append(("decode and prefill", inference))

    def hf_inference():
        from transformers import GPT2LMHeadModel
        model = GPT2LMHeadModel(hf_config(dict(mcfg))).to(device).eval()
        model.generation_config.eos_token_id = None  # random weights: never stop early
        if want("decode_fp32_cache_tok_s"):
            theirs["decode_fp32_cache_tok_s"] = decode_rate(hf_decode(model, prompt, True), n, repeats, device)
            theirs["decode_fp32_nocache_tok_s"] = decode_rate(hf_decode(model, prompt, False), n, repeats, device)
        theirs["prefill_fp32_tok_s"] = prefill_rate(model, full, repeats, device, logits_to_keep=1)
        del model
        free()
    if flags["compare"]:
        todo.append(("transformers decode and prefill", hf_inference))

    bar = tqdm(todo, desc="bench", unit="entry", file=sys.stderr)
    for name, fn in bar:
        bar.set_postfix_str(name)
        fn()
    return ours, theirs


def limits(ours, mcfg, context_length):
    """The speed each training and decoding entry could reach at most on this machine, in tokens/s: training at the
    measured matmul ceiling of its dtype (all its FLOPs in matmuls at that rate), batch-1 decoding at the measured
    memory read bandwidth (each token reads every matmul weight once: 4, 2 or 1 bytes per weight)."""
    out = {}
    flops = train_flops_per_token(mcfg, context_length)
    for dtype in ("fp32", "bf16"):
        if f"matmul_{dtype}_gflops" in ours:
            for key in (f"train_{dtype}_tok_s", f"train_{dtype}_compile_tok_s"):
                out[key] = ours[f"matmul_{dtype}_gflops"] * 1e9 / flops
    weights = mcfg["n_layers"] * 12 * mcfg["emb_dim"] ** 2 + mcfg["emb_dim"] * mcfg["vocab_size"]
    for key, size in (("decode_fp32_cache_tok_s", 4), ("decode_bf16_cache_tok_s", 2), ("decode_int8_cache_tok_s", 1)):
        out[key] = ours.get("mem_read_gbs", 0) * 1e9 / (weights * size)
    return out


def format_table(ours, theirs, skipped, compare, limit, missing="not installed"):
    header = ["", "unit", "ours", "limit (share reached)", f"transformers {compare}" if compare else "transformers"]
    lines = []
    for key, label, unit in ROWS:
        def cell(results, is_ours):
            if key in results:
                return f"{results[key]:,.1f}"
            if is_ours or key not in skipped:
                return skipped.get(key, "-") if is_ours else "-"
            return "-"
        bound = f"{limit[key]:,.1f} ({100 * ours[key] / limit[key]:.0f} %)" if key in limit and key in ours else ""
        other = cell(theirs, False) if compare else missing
        lines.append([label, unit, cell(ours, True), bound, other])
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(5)]
    fmt = lambda row: "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *map(fmt, lines)])


# ---------------------------------------------------------------------------------------------------------------
# --corpus: the token cache and training on a corpus of the user's size
# ---------------------------------------------------------------------------------------------------------------

# Each measurement runs in a child process of its own, which reports the seconds its work took (after its imports)
# and its peak memory (VmHWM).
CHILD = """
import atexit, json, os, sys, time
atexit.register(lambda: print("PEAK_KIB", open("/proc/self/status").read().split("VmHWM:")[1].split()[0],
                              file=sys.stderr))
sys.path.insert(0, {root!r})
import data, tiktoken
enc = tiktoken.get_encoding("gpt2")
start = time.perf_counter()
{body}
print("SECONDS", time.perf_counter() - start, file=sys.stderr)
"""

TIKTOKEN_BASELINE = """
from data import corpus_files, jsonl_blocks, safe_pieces, text_file_blocks
root, files = corpus_files(sys.argv[1])
batch, size, tokens = [], 0, 0
def flush():
    global batch, size, tokens
    tokens += sum(map(len, enc.encode_batch(batch, num_threads=os.cpu_count(), allowed_special="all")))
    batch, size = [], 0
for f in files:
    path = os.path.join(root, f["path"]) if os.path.isdir(root) else root
    blocks = jsonl_blocks(path) if path.endswith(".jsonl") else text_file_blocks(path)
    for piece in safe_pieces(blocks):
        batch.append(piece)
        size += len(piece)
        if size > 8 << 20:
            flush()
flush()
print("TOKENS", tokens, file=sys.stderr)
"""

TOKEN_CACHE = """
c = data.token_cache(sys.argv[1], sys.argv[2], progress=False)
print("TOKENS", len(c.tokens), file=sys.stderr)
"""

TRAIN = """
import runpy
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_child(body, *args, watch=None):
    """Run CHILD with body in a new Python -> (its report {SECONDS, PEAK_KIB, TOKENS}, seconds from start until the
    file `watch` appeared (None without watch), stderr)."""
    code = CHILD.format(root=os.path.dirname(os.path.abspath(__file__)), body=body)
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    seen = None
    while watch and proc.poll() is None and seen is None:
        if os.path.exists(watch):
            seen = time.perf_counter() - start
        time.sleep(0.02)
    err = proc.communicate()[1]
    if proc.returncode:
        told = [ln for ln in err.splitlines() if ln.strip() and ln.split()[0] not in ("SECONDS", "PEAK_KIB", "TOKENS")]
        why = told[-1].removeprefix("error: ") if told else f"exit code {proc.returncode}"  # the child's own reason
        raise UserError(f"a --corpus measurement failed: {why}")
    report = {k: float(v) for k, v in (ln.split()[:2] for ln in err.splitlines() if ln.split()[:1] and
                                       ln.split()[0] in ("SECONDS", "PEAK_KIB", "TOKENS"))}
    return report, seen, err


def corpus_bench(cfg):
    """Time the token cache on cfg["corpus"] against tiktoken's own batch encoding of the same text, its reuse,
    and a tiny model's training on it (time to the first step, tokens/s, peak memory), beside the same model on
    the-verdict; the loaders' own speed, memory map against GPTDatasetV1's in-memory tensor."""
    corpus = cfg["corpus"]
    mb = sum(f["size"] for f in corpus_files(corpus)[1]) / 1e6
    work = tempfile.mkdtemp(prefix="bench-corpus-")
    rows = {}
    base, _, _ = run_child(TIKTOKEN_BASELINE, corpus)
    rows["tiktoken encode_batch"] = (base["SECONDS"], base["PEAK_KIB"], f"{base['TOKENS']:,.0f} tokens")
    build, _, _ = run_child(TOKEN_CACHE, corpus, os.path.join(work, "cache"))
    rows["token cache, first run"] = (build["SECONDS"], build["PEAK_KIB"],
                                      f"{build['SECONDS'] / base['SECONDS']:.2f}x tiktoken's time")
    reuse, _, _ = run_child(TOKEN_CACHE, corpus, os.path.join(work, "cache"))
    rows["token cache, reused"] = (reuse["SECONDS"], reuse["PEAK_KIB"], "")
    verdict = fetch_data("the-verdict.txt")
    for name, data_path in (("corpus", corpus), ("the-verdict", verdict)):
        out = os.path.join(work, f"run-{name}")
        args = ["--data", data_path, "--cache_dir", os.path.join(work, "cache"), "--out_dir", out, "--n_layers", "2",
                "--emb_dim", "64", "--n_heads", "2", "--context_length", "64", "--batch_size", "2", "--max_steps",
                str(cfg["corpus_steps"]), "--eval_freq", str(cfg["corpus_steps"]), "--eval_iters", "10",
                "--sample_prompt", "", "--quiet", "--dtype", "float32", "--device", "cpu"]
        train, first, _ = run_child(TRAIN, os.path.join(os.path.dirname(os.path.abspath(__file__)), "pretrain.py"),
                                    *args, watch=os.path.join(out, "settings.json"))
        with open(os.path.join(out, "log.csv"), newline="") as f:
            last = list(csv.DictReader(f))[-1]
        rows[f"train on {name}: start to first step"] = (first, train["PEAK_KIB"],
                                                         f"{float(last['tokens_per_s']):,.0f} tokens/s of training")
    tokens = token_cache(verdict, os.path.join(work, "cache"), progress=False).tokens
    for name, dataset in (("memory map (TokenWindows)", TokenWindows(tokens, 64, 64)),
                          ("in-memory tensor (GPTDatasetV1)", GPTDatasetV1(tokens.tolist(), None, 64, 64))):
        loader = torch.utils.data.DataLoader(dataset, batch_size=2, shuffle=True, drop_last=True)
        seconds = median_time(lambda: sum(1 for _ in loader), 5, torch.device("cpu"))
        rows[f"loader alone, {name}"] = (seconds / len(loader), None, f"{2 * 64 * len(loader) / seconds:,.0f} tokens/s")
    shutil.rmtree(work, ignore_errors=True)
    print(f"\n{corpus}: {mb:,.1f} MB\n")
    width = max(map(len, rows))
    print(f"{'':{width}}  {'seconds':>10}  {'peak RSS':>10}")
    for name, (seconds, peak, note_text) in rows.items():
        peak_text = f"{peak / 1024:,.0f} MiB" if peak else ""
        print(f"{name:{width}}  {seconds:>10.3f}  {peak_text:>10}  {note_text}")
    return {name: {"seconds": s, "peak_mib": p and p / 1024, "note": n} for name, (s, p, n) in rows.items()}


# --nanogpt: time-to-loss against nanoGPT's train.py, the same model size on the same tokens for the same wall time

RACE_MODEL = dict(n_layers=4, n_heads=4, emb_dim=128, context_length=128, batch_size=4)
RACE_STEPS = 100_000  # the schedules' length: more than either reaches in the race, so both stay near peak lr


def timed_evaluations(cmd, cwd, seconds, pattern):
    """Run cmd for `seconds` of wall time (then stop it) -> [(seconds since start, val loss)] read from its output
    lines matching pattern (a regex whose last group is the validation loss), each stamped when it was printed."""
    import re
    start, rows, tail = time.perf_counter(), [], []
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    timer = __import__("threading").Timer(seconds, proc.terminate)
    timer.start()
    for line in proc.stdout:
        tail = [*tail[-4:], line.strip()]
        m = re.search(pattern, line)
        if m:
            rows.append((time.perf_counter() - start, float(m.groups()[-1])))
    proc.wait()
    timer.cancel()
    if not rows:
        raise UserError(f"--nanogpt: no evaluation within --race_s {seconds} from {cmd[1]}, whose last lines were: "
                        + " | ".join(tail))
    return rows


def time_to(rows, loss):
    """Seconds at the first evaluation at or below loss; None if never."""
    return next((t for t, v in rows if v <= loss), None)


def race_nanogpt(cfg):
    """Train the same model size on the same tokens for the same wall time with our pretrain.py and with nanoGPT's
    train.py (a copy in a scratch folder, reading the uint16 token files our cache's split writes), each at the
    settings that suit a CPU; report each one's last validation loss and the time each took to reach the other's."""
    import numpy as np
    from data import split_point
    work = tempfile.mkdtemp(prefix="bench-nanogpt-")
    src = os.path.dirname(os.path.abspath(cfg["nanogpt"]))
    for name in ("train.py", "model.py", "configurator.py"):
        if not os.path.isfile(os.path.join(src, name)):
            raise UserError(f"--nanogpt: no {name} beside {cfg['nanogpt']}: point it at nanoGPT's train.py")
        shutil.copy(os.path.join(src, name), work)
    cache = token_cache(cfg["corpus"], os.path.join(work, "cache"), progress=False)
    split = split_point(cache, 0.9)
    os.makedirs(os.path.join(work, "data", "ours"))
    np.asarray(cache.tokens[:split], dtype=np.uint16).tofile(os.path.join(work, "data", "ours", "train.bin"))
    np.asarray(cache.tokens[split:], dtype=np.uint16).tofile(os.path.join(work, "data", "ours", "val.bin"))
    r, every, iters = RACE_MODEL, 40, 8
    ours = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "pretrain.py"),
            "--data", cfg["corpus"], "--cache_dir", os.path.join(work, "cache"), "--out_dir", os.path.join(work, "o"),
            "--n_layers", str(r["n_layers"]), "--n_heads", str(r["n_heads"]), "--emb_dim", str(r["emb_dim"]),
            "--context_length", str(r["context_length"]), "--batch_size", str(r["batch_size"]), "--lr", "2e-3",
            "--lr_schedule", "cosine", "--warmup_steps", "20", "--min_lr", "2e-4", "--grad_clip", "1.0",
            "--max_steps", str(RACE_STEPS), "--epochs", "1000", "--windows", "random", "--eval_freq", str(every),
            "--eval_iters", str(iters), "--tie_weights", "--drop_rate", "0", "--sample_prompt", "", "--quiet",
            "--dtype", "float32", "--device", "cpu"]
    theirs = [sys.executable, "train.py", "--dataset=ours", "--device=cpu", "--compile=False", "--dtype=float32",
              f"--n_layer={r['n_layers']}", f"--n_head={r['n_heads']}", f"--n_embd={r['emb_dim']}",
              f"--block_size={r['context_length']}", f"--batch_size={r['batch_size']}",
              "--gradient_accumulation_steps=1", "--learning_rate=2e-3", "--min_lr=2e-4", "--warmup_iters=20",
              f"--max_iters={RACE_STEPS}", f"--lr_decay_iters={RACE_STEPS}", f"--eval_interval={every}",
              f"--eval_iters={iters}", "--dropout=0.0", "--bias=False", "--always_save_checkpoint=False",
              "--log_interval=1000000"]
    rows = {"ours": timed_evaluations(ours, work, cfg["race_s"], r"val_loss ([0-9.]+)"),
            "nanoGPT": timed_evaluations(theirs, work, cfg["race_s"], r"^step (\d+):.*val loss ([0-9.]+)")}
    shutil.rmtree(work, ignore_errors=True)
    final = {k: v[-1][1] for k, v in rows.items()}
    result = {k: {"val_loss": final[k], "evaluations": v, "seconds_to_other_final": time_to(v, final[other])}
              for (k, v), other in zip(rows.items(), ("nanoGPT", "ours"))}
    print(f"\n{cfg['corpus']}: {len(cache.tokens):,} tokens; {r['n_layers']} layers x {r['emb_dim']}, context "
          f"{r['context_length']}, batch {r['batch_size']}, {cfg['race_s']} s each, {torch.get_num_threads()} threads, "
          f"evaluation every {every} steps on {iters} batches (load average {load_average()})\n")
    for k, v in result.items():
        other = "nanoGPT" if k == "ours" else "ours"
        t = v["seconds_to_other_final"]
        print(f"{k:8} last val loss {v['val_loss']:.3f}; reached {other}'s {final[other]:.3f} "
              + (f"after {t:.0f} s" if t is not None else "never"))
    t = result["ours"]["seconds_to_other_final"]
    if t is not None:
        print(f"ours reached nanoGPT's final loss in {t / rows['nanoGPT'][-1][0]:.2f}x nanoGPT's time")
    return result

SERVE_PROMPT = "Every effort moves you"


def streamed_times(pieces):
    """(seconds to the first piece, seconds from the first piece to the last) of an iterator of text pieces."""
    start = time.perf_counter()
    first = last = None
    for _ in pieces:
        last = time.perf_counter()
        first = first or last
    return first - start, last - first


def server_pieces(url, body):
    """The text pieces of one streamed /v1/completions answer, as they arrive; the usage lands in body["usage"]."""
    request = urllib.request.Request(f"{url}/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as res:
        for line in res:
            if line.startswith(b"data: {"):
                event = json.loads(line[6:])
                if event.get("usage"):
                    body["usage"] = event["usage"]
                elif event["choices"][0]["text"]:
                    yield event["choices"][0]["text"]


def serve_bench(cfg, device):
    """Time to first token and decode tokens/s of cfg["serve"] through serve.py (a child process, streamed over
    HTTP) and generating in this process the way generate.py does (a Reply on the same KV cache settings), greedy,
    cfg["decode_tokens"] new tokens after SERVE_PROMPT, medians of cfg["repeats"] after one warm-up each."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    threads = str(torch.get_num_threads())
    proc = subprocess.Popen([sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "serve.py"),
                             "--checkpoint", cfg["serve"], "--port", str(port), "--device", str(device)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": threads})
    try:
        if "serving" not in proc.stdout.readline():
            raise UserError(f"serve.py did not start on {cfg['serve']}: run `python serve.py --checkpoint "
                            f"{cfg['serve']}` to see why")
        url, n = f"http://127.0.0.1:{port}", cfg["decode_tokens"]
        body = {"prompt": SERVE_PROMPT, "max_tokens": n, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}
        served = [streamed_times(server_pieces(url, body)) for _ in range(cfg["repeats"] + 1)][1:]
        served_tokens = body["usage"]["completion_tokens"]
    finally:
        proc.terminate()
        proc.wait()
    model, _ = init_model(cfg["serve"], device=device, int8_ok=True)
    ids = torch.tensor([get_tokenizer().encode(SERVE_PROMPT)], device=device)
    cache = KVCache(model.eval(), 1, model.cfg["context_length"])
    runs = [Reply(model, ids, n, kv_cache=cache, chat=False) for _ in range(cfg["repeats"] + 1)]
    direct = [streamed_times(r) for r in runs][1:]
    rows = {}
    for name, times, tokens in (("serve.py, streamed over HTTP", served, served_tokens),
                                ("in process, as generate.py", direct, runs[-1].n_tokens)):
        ttft = statistics.median(t for t, _ in times)
        rate = (tokens - 1) / statistics.median(d for _, d in times)
        rows[name] = {"ttft_ms": 1000 * ttft, "tokens_per_s": rate, "tokens": tokens}
    print(f"\n{cfg['serve']}: {n} new tokens after {SERVE_PROMPT!r}, greedy, {threads} threads, medians of "
          f"{cfg['repeats']}\n")
    print(f"{'':30}  {'first token':>12}  {'tokens/s':>10}")
    for name, row in rows.items():
        print(f"{name:30}  {row['ttft_ms']:>9.1f} ms  {row['tokens_per_s']:>10.1f}")
    a, b = rows.values()
    print(f"{'server / in process':30}  {a['ttft_ms'] / b['ttft_ms']:>11.2f}x  "
          f"{a['tokens_per_s'] / b['tokens_per_s']:>9.2f}x")
    return rows


def main(argv=None):
    cfg = get_config(DEFAULTS, argv, __doc__, check=check_settings)
    torch.manual_seed(cfg["seed"])
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    device = pick_device(cfg["device"])
    if device.type == "cpu":
        keep_freed_memory()  # as the training scripts do (trainer.wrap_model); it applies to transformers too
    check_output(cfg["json"] if cfg["json"] != "-" else "", "--json", cfg["force"])  # before the long work
    if cfg["corpus"] or cfg["serve"]:
        if cfg["serve"]:
            results = serve_bench(cfg, device)
        else:
            results = race_nanogpt(cfg) if cfg["nanogpt"] else corpus_bench(cfg)
        result = {"corpus" if cfg["corpus"] else "serve": cfg["corpus"] or cfg["serve"], "settings": cfg,
                  "results": results}
        if cfg["json"] == "-":
            print(json.dumps(result, indent=1))
        elif cfg["json"]:
            write_json(cfg["json"], result)
        return result
    flags, skipped = plan(cfg, device)
    mcfg = model_config(cfg["size"], cfg["context_length"])
    with torch.device("meta"):
        n_params = count_parameters(GPTModel(mcfg))  # shapes only, no memory
    machine = dict(platform=platform.platform(), processor=platform.processor() or platform.machine(),
                   torch=torch.__version__, device=str(device), threads=torch.get_num_threads(),
                   cpu_capability=torch.backends.cpu.get_cpu_capability(), native_bf16=flags["native_bf16"],
                   transformers=flags["compare"])
    print(f"device {device} ({machine['threads']} threads, {machine['cpu_capability']}, native bf16: "
          f"{'yes' if flags['native_bf16'] else 'no'}), {cfg['size']}: {n_params:,} parameters; "
          f"settings: {changed_settings(cfg, DEFAULTS)}")
    machine["load_average_before"] = load_average()
    IDLE.update(max_wait=cfg["wait_idle"] if device.type == "cpu" else 0.0, runs=0, busy_runs=0)
    ours, theirs = run_all(cfg, device, flags, skipped)
    machine["load_average_after"] = load_average()
    machine["timed_runs"], machine["timed_runs_on_busy_cpus"] = IDLE["runs"], IDLE["busy_runs"]
    print(f"\n{cfg['size']}, context {cfg['context_length']}, batch {cfg['batch_size']}; medians of {cfg['steps']} "
          f"training steps and {cfg['repeats']} runs otherwise\n")
    if IDLE["busy_runs"]:
        print(f"note: {IDLE['busy_runs']} of {IDLE['runs']} timed runs started while other processes used the CPUs "
              f"(waited up to {cfg['wait_idle']:g} s each): those numbers are low\n")
    elif not IDLE["runs"]:
        load = max(machine["load_average_before"] or 0, machine["load_average_after"] or 0)
        if load > 0.5 * (os.cpu_count() or 1):
            print(f"note: 1-minute load average up to {load:.1f} on {os.cpu_count()} CPUs: other processes shared "
                  f"the machine, so these numbers are low\n")
    limit = limits(ours, mcfg, cfg["context_length"])
    print(format_table(ours, theirs, skipped, flags["compare"], limit,
                       "off" if cfg["compare"] == "off" else "not installed"))
    result = dict(machine=machine, settings=cfg, parameters=n_params, results=ours, limits=limit,
                  transformers=theirs if flags["compare"] else "not installed" if cfg["compare"] == "auto" else "off",
                  skipped={k: v for k, v in skipped.items()})
    if cfg["json"] == "-":
        print(json.dumps(result, indent=1))
    elif cfg["json"]:
        write_json(cfg["json"], result)
        print(f"wrote {cfg['json']}")
    else:
        print("nothing written (--json PATH saves the numbers)")
    return result


if __name__ == "__main__":
    entry(main)
