"""Tests for the whole pipeline: `python -m pytest -q test_all.py` (tiny models, no network, a few minutes on 2 cores).

Contents, in pipeline order; each section opens with a banner comment:
   1. model           model.py: configs, layers, attention, causality, tied weights, .pth checkpoints
   2. data            data.py: tokenizer, text files, verified downloads, the token cache, training windows
   3. training        settings.py, trainer.py, pretrain.py: flags, learning-rate schedule, end to end, resume,
                      divergence, bf16, tied weights, gradient accumulation, --dry_run and the memory estimate
   4. weights         load_gpt2.py: published-layout files against a reference forward pass, the safetensors
                      reader, the command line and --init, downloads from a hub, export to Hugging Face and back
   5. classification  finetune_cls.py: labelled CSVs, freezing and LoRA, train, predict, evaluate, resume, --dry_run
   6. chat            finetune_chat.py and generate.py --chat: template, collate, scores, SFT, chat, DPO, bad input
   7. generation      the KV cache, sampling, generate.py, beam search, repetition penalty
   8. speed           int8 weights, the decoding layout, bench.py
   9. distributed     DDP and FSDP over 2 gloo processes, started the way torchrun starts them
  10. faults          kills and resume, disk full, bad input to every script, hostile files, stalled downloads;
                      the loop's helpers: the step log, stopping on a signal, the resumable state, unread output
  11. talk to it      the chat REPL's Ctrl-C at a pseudo-terminal; serve.py through the openai client: answers as
                      generate.py --chat gives them, bad requests, 8 clients at once, disconnects, signals; the chat
                      page in headless Chromium
  12. hostile files   links planted at locks, temporary names and downloads, pipes and unreadable inputs, endless and
                      trickling downloads, numbers read from files, races between commands, text without cuts,
                      duplicated CSV columns, sources replaced behind a cache's back

Helpers shared by several sections come first: one tiny config (tiny_cfg, tiny_model, tiny_classifier), the flags of
each entry script built from it (tiny_flags, pretrain_flags, cls_flags, chat_flags), and a local file server.

Markers: `slow` (over ~5 s each on 2 cores; the default run includes them, `-m "not slow"` leaves them out) and `long`
(the GPT2_LONG_TESTS=1 variants, skipped otherwise). The tokenizer files and the corpora come from ../shared
(TIKTOKEN_CACHE_DIR, and a local HTTP server on 127.0.0.1 for downloads): tests that need them are skipped when that
folder is absent, and the Hugging Face round trips when transformers is not installed.
"""
import base64
import contextlib
import csv
import ctypes
import fcntl
import hashlib
import http.client
import http.server
import io
import itertools
import json
import math
import os
import pickle
import pty
import random
import re
import resource
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zipfile

import numpy as np
import pytest
import tiktoken
import torch
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

import bench
import checkpoints
import data
import files
import finetune_chat
import finetune_cls
import generate as generate_script
import layers
import load_gpt2
import model as M
import pretrain
import replies
import serve as serve_script
import settings
import trainer

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED_DATA = os.path.join(os.environ.get("GPT2_SHARED_DIR", os.path.join(HERE, "..", "shared")), "data")
TIKTOKEN_CACHE = os.path.join(SHARED_DATA, "..", "tiktoken-cache")  # tiktoken's GPT-2 files, for working offline
if os.path.isdir(TIKTOKEN_CACHE):
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", TIKTOKEN_CACHE)
if os.environ.get("TIKTOKEN_CACHE_DIR"):  # README's command gives a relative path; tests that chdir still find it
    os.environ["TIKTOKEN_CACHE_DIR"] = os.path.abspath(os.environ["TIKTOKEN_CACHE_DIR"])
LONG = os.environ.get("GPT2_LONG_TESTS") == "1"

# Tiny models on a busy 2-core machine: one thread spares every small matmul a wait for the other core
torch.set_num_threads(1)


slow = pytest.mark.slow  # markers are registered in pytest.ini


def ci_and_long(what):
    """Parametrize `long`: False for the variant CI runs, True for the long one (marked long, skipped unless
    GPT2_LONG_TESTS=1)."""
    skip_unless_asked = pytest.mark.skipif(not LONG, reason=f"set GPT2_LONG_TESTS=1 for {what}")
    return pytest.mark.parametrize("long", [pytest.param(False, id="ci"),
                                            pytest.param(True, id="long", marks=[pytest.mark.long, skip_unless_asked])])


needs_shared = pytest.mark.skipif(not os.path.isdir(SHARED_DATA), reason="../shared/data not present")
SMS_FILE = os.path.join(SHARED_DATA, "SMSSpamCollection")
needs_sms = pytest.mark.skipif(not os.path.isfile(SMS_FILE), reason="../shared/data/SMSSpamCollection not present")


# ---------------------------------------------------------------------------------------------------------------
# Shared helpers: the tiny config, flags, fixtures, subprocesses, a local file server
# ---------------------------------------------------------------------------------------------------------------

TINY = dict(M.GPT_CONFIG_124M, vocab_size=50257, context_length=32, emb_dim=32, n_heads=2, n_layers=2,
            drop_rate=0.0, qkv_bias=False)


def tiny_cfg(**overrides):
    """The tiny config with overrides: tiny_cfg(context_length=128)."""
    return {**TINY, **overrides}


def tiny_model(seed=0, **overrides):
    """A GPTModel of tiny_cfg(**overrides) in eval mode, its weights drawn after torch.manual_seed(seed)."""
    torch.manual_seed(seed)
    return M.GPTModel(tiny_cfg(**overrides)).eval()


def tiny_classifier(num_classes=2, seed=0, **overrides):
    """tiny_model with the classification head finetune_cls.py puts on it."""
    return finetune_cls.replace_head(tiny_model(seed, **overrides), num_classes).eval()


def as_flags(**values):
    """Command-line flags in the order given: as_flags(n_layers=2, device="cpu") == ["--n_layers", "2", "--device",
    "cpu"]; None leaves a flag out."""
    return [item for name, value in values.items() if value is not None for item in (f"--{name}", str(value))]


def tiny_flags(**overrides):
    """The tiny config's size on the CPU in float32 (the numbers then do not depend on whether this CPU has native
    bf16), as flags every training script takes, then the overrides (in their order)."""
    return as_flags(**{"n_layers": TINY["n_layers"], "n_heads": TINY["n_heads"], "emb_dim": TINY["emb_dim"],
                       "device": "cpu", "dtype": "float32", **overrides})


def pretrain_flags(**overrides):
    """pretrain.py on the tiny config: batches of 2, no dropout, a 5-token sample after each epoch."""
    return tiny_flags(**{"context_length": TINY["context_length"], "drop_rate": 0, "batch_size": 2,
                         "sample_tokens": 5, **overrides})


def short_pretrain_flags(data_path=None, **overrides):
    """pretrain.py for runs of a few steps: one epoch in float32, no sample, evaluations of a single batch."""
    return pretrain_flags(**{"data": data_path, "sample_tokens": 0, "eval_freq": 100, "eval_iters": 1, "epochs": 1,
                             "dtype": "float32", **overrides})


def cls_flags(**overrides):
    """finetune_cls.py from a tiny scratch model, every weight trainable, texts cut at 32 tokens, no evaluation
    during training and one batch for the final one."""
    return tiny_flags(**{"init": "scratch", "trainable": "all", "max_length": TINY["context_length"],
                         "eval_freq": 1000, "eval_iters": 1, **overrides})


def chat_flags(**overrides):
    """finetune_chat.py from a tiny scratch model with a context of 128 tokens (room for a templated record)."""
    return tiny_flags(**{"init": "scratch", "context_length": 128, "dtype": "float32", **overrides})


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    """Every test runs in its own folder: the default outputs of in-process runs (runs/chat, ...), their downloads
    and token caches land there, never in the checkout, whose runs/ and data/ may hold the user's own."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(data, "DATA_DIR", str(tmp_path / "data"))


@pytest.fixture(autouse=True)
def one_thread():
    """One thread for every test, also after a test that changed it (see torch.set_num_threads above)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def verdict(tmp_path):
    """A copy of the-verdict.txt, the book's short story, in the test's folder."""
    if not os.path.isdir(SHARED_DATA):
        pytest.skip("../shared/data not present")
    path = tmp_path / "the-verdict.txt"
    shutil.copy(os.path.join(SHARED_DATA, "the-verdict.txt"), path)
    return str(path)


@pytest.fixture(scope="session")
def transformers():
    """The transformers package; tests that take it are skipped where it is not installed (CI installs it)."""
    return pytest.importorskip("transformers")


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_json(path, obj):
    path.write_text(json.dumps(obj), encoding="utf-8")
    return str(path)


def write_csv(path, rows, header=("Label", "Text")):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return str(path)


def write_spam_ham_csv(path, n=24):
    """n texts of each of two classes, of a few different lengths."""
    rows = []
    for i in range(n):
        rows.append(["spam", f"WIN a free prize number {i} now!" + " Call 0800 today." * (i % 3)])
        rows.append(["ham", f"See you at {i} for lunch" + ", ok?" * (i % 4)])
    return write_csv(path, rows)


def weights(path):
    return M.read_checkpoint(str(path))["model"]


def max_diff(a, b):
    """The largest difference between two state_dicts with the same keys."""
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


class Payload:
    """Runs `touch marker` when unpickled: a hostile checkpoint's content, which no loader may run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# Subprocesses: one thread each (the machine has 2 cores), plots without a display, output unbuffered
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MPLBACKEND="Agg", PYTHONUNBUFFERED="1",
           TIKTOKEN_CACHE_DIR=os.path.abspath(os.environ.get("TIKTOKEN_CACHE_DIR", TIKTOKEN_CACHE)))


def run_script(script, *args, cwd=None, env=None, timeout=300):
    """Run an entry script as a user would, with ENV and `env` on top, in cwd (else the test's own folder: see
    in_tmp); returns CompletedProcess with text output."""
    return subprocess.run([sys.executable, os.path.join(HERE, script), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env={**ENV, "PYTHONPATH": HERE, **(env or {})})


def assert_one_line_error(proc, *words):
    """Non-zero exit, no traceback, and a last stderr line that names the problem."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    for w in words:
        assert w.lower() in last.lower(), last


def run_main(main, args):
    """main(args) as the command line runs it (through settings.entry), in this process -> (exit code, stdout,
    stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            settings.entry(lambda: main(args))
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    return code, out.getvalue(), err.getvalue()


def assert_one_error_line(code, err, *words, after_progress=False):
    """A non-zero exit and one error line that names the problem (argparse's usage line aside; with
    after_progress, after the progress lines of a run that had started), no traceback. Returns the line."""
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if ln.strip()]
    if after_progress:
        lines = [ln for ln in lines if not ln.startswith("step ")]
    assert code not in (0, None), err
    if code == 2:
        lines = [ln for ln in lines if not ln.startswith(("usage:", " "))]
    assert len(lines) == 1 and "Traceback" not in err, err
    for w in words:
        assert w.lower() in lines[0].lower(), (w, lines[0])
    return lines[0]


def free_port():
    """A port on 127.0.0.1 that nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dead_url():
    return f"http://127.0.0.1:{free_port()}"


class FileHandler(http.server.BaseHTTPRequestHandler):
    """A quiet test file server; serve() gives each server a subclass of its own. A path in `files` ({URL path:
    bytes}) gets those bytes and its ETag from `etags`, if any; with `files` set, other paths get 404. Otherwise GET
    /NAME or /MODE/NAME answers with `body` when it is set, else with the file NAME from `folder`. MODE (default
    ok): ok - a Range request gets 206 and the rest (416 past the end), and is recorded in `ranges`; bad - the bytes
    reversed; short - half the bytes, then the connection closes; stall - half the bytes, then 3 s of silence;
    loop - a 302 redirect to the same path; endless - no Content-Length and bytes without end; trickle - one byte
    every 0.1 s. The attribute `mode`, when set, is the mode of every path. Every request is recorded in `log` as
    (method, path, Range header)."""
    folder, body, files, etags, ranges, log, mode = SHARED_DATA, None, {}, {}, [], [], None

    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self.answer(send_body=False)

    def do_GET(self):
        self.answer(send_body=True)

    def answer(self, send_body):
        rng = self.headers.get("Range")
        self.log.append((self.command, self.path, rng))
        if self.files:
            mode, body = "ok", self.files.get(self.path)
            if body is None:
                self.send_error(404)
                return
        else:
            parts = self.path.strip("/").split("/")
            mode, name = (parts[0], parts[-1]) if len(parts) > 1 else ("ok", parts[0])
            mode = self.mode or mode
            if mode == "endless":
                self.send_response(200)
                self.end_headers()
                with contextlib.suppress(OSError):
                    while send_body:  # until the client hangs up
                        self.wfile.write(b"{" * 65536)
                self.close_connection = True
                return
            if mode == "loop":
                self.send_response(302)
                self.send_header("Location", self.path)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            body = self.body
            if body is None:
                path = os.path.join(self.folder, name)
                if not os.path.isfile(path):
                    self.send_error(404)
                    return
                with open(path, "rb") as f:
                    body = f.read()
            if mode == "bad":
                body = body[::-1]
        start = 0
        if rng and mode == "ok":
            self.ranges.append(rng)
            start = int(rng.split("=")[1].split("-")[0])
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))  # short and stall promise more than they send
        if self.path in self.etags:
            self.send_header("ETag", f'"{self.etags[self.path]}"')
        self.end_headers()
        if not send_body:
            return
        if mode == "trickle":
            with contextlib.suppress(OSError):
                for i in range(len(body)):
                    self.wfile.write(body[i:i + 1])
                    self.wfile.flush()
                    time.sleep(0.1)
            self.close_connection = True
            return
        if mode in ("short", "stall"):
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            if mode == "stall":
                time.sleep(3)  # longer than the client's timeout
            self.close_connection = True
            return
        self.wfile.write(body[start:])


@pytest.fixture
def serve():
    """serve(folder=..., body=..., files=..., etags=...) starts a FileHandler server with those attributes on
    127.0.0.1 (a free port), from a daemon thread; returns (base URL, its handler class, whose `ranges` and `log`
    fill as requests come). The servers stop when the test ends."""
    servers = []

    def start(**attrs):
        attrs = {k: str(v) if k == "folder" else v for k, v in attrs.items()}
        handler = type("Files", (FileHandler,), {"files": {}, "etags": {}, "ranges": [], "log": [], **attrs})
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}", handler

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


# ===============================================================================================================
# 1. Model: model.py
# ===============================================================================================================

def test_configs_and_parameter_counts():
    assert M.GPT_CONFIG_124M == {"vocab_size": 50257, "context_length": 1024, "emb_dim": 768, "n_heads": 12,
                                 "n_layers": 12, "drop_rate": 0.1, "qkv_bias": False}
    sizes = {k: (c["emb_dim"], c["n_layers"], c["n_heads"]) for k, c in M.MODEL_CONFIGS.items()}
    assert sizes == {"gpt2": (768, 12, 12), "gpt2-medium": (1024, 24, 16), "gpt2-large": (1280, 36, 20),
                     "gpt2-xl": (1600, 48, 25)}
    with torch.device("meta"):
        m = M.GPTModel(M.GPT_CONFIG_124M)
    # the book: 163,009,536 parameters with a separate output layer, 124,412,160 without it
    assert M.count_parameters(m) == 163_009_536
    assert M.count_parameters(m) - m.out_head.weight.numel() == 124_412_160


def test_book_names_and_snippets():
    m = tiny_model()
    names = set(dict(m.named_parameters()))
    for n in ["tok_emb.weight", "pos_emb.weight", "trf_blocks.0.att.W_query.weight", "trf_blocks.0.att.W_key.weight",
              "trf_blocks.0.att.W_value.weight", "trf_blocks.0.att.out_proj.weight", "trf_blocks.0.ff.layers.0.weight",
              "trf_blocks.0.ff.layers.2.bias", "trf_blocks.0.norm1.scale", "trf_blocks.0.norm2.shift",
              "final_norm.scale", "out_head.weight"]:
        assert n in names, n
    assert isinstance(m.trf_blocks[-1].drop_shortcut, torch.nn.Dropout)
    # the classification snippets of chapter 6
    for p in m.parameters():
        p.requires_grad = False
    m.out_head = torch.nn.Linear(TINY["emb_dim"], 2)
    for p in list(m.trf_blocks[-1].parameters()) + list(m.final_norm.parameters()):
        p.requires_grad = True
    assert m(torch.tensor([[1, 2, 3]])).shape == (1, 3, 2)


def test_layer_norm_and_gelu_match_the_formulas():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 8)
    ln = M.LayerNorm(8)
    ln.scale.data.uniform_(0.5, 1.5)
    ln.shift.data.uniform_(-1, 1)
    mean, var = x.mean(-1, keepdim=True), x.var(-1, keepdim=True, unbiased=False)
    expected = (x - mean) / torch.sqrt(var + 1e-5) * ln.scale + ln.shift
    torch.testing.assert_close(ln(x), expected, atol=1e-5, rtol=1e-5)
    gelu = 0.5 * x * (1 + torch.tanh(torch.sqrt(torch.tensor(2 / torch.pi)) * (x + 0.044715 * x ** 3)))
    torch.testing.assert_close(M.GELU()(x), gelu, atol=1e-6, rtol=1e-5)


def test_causality_later_tokens_do_not_change_earlier_logits():
    m = tiny_model()
    x = torch.randint(0, 50257, (2, 20))
    y = x.clone()
    y[:, 12:] = torch.randint(0, 50257, (2, 8))
    with torch.no_grad():
        a, b = m(x), m(y)
    torch.testing.assert_close(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def set_fused(model, fused):
    for block in model.trf_blocks:
        block.att.fused = fused


def test_fused_and_manual_attention_agree():
    m = tiny_model(qkv_bias=True)
    x = torch.randint(0, 50257, (3, 25))
    with torch.no_grad():
        fused = m(x)
        set_fused(m, False)
        manual = m(x)
    torch.testing.assert_close(fused, manual, atol=1e-5, rtol=1e-5)
    # and with a cache holding a prefix (the mask then is not the square one)
    for fused_flag in (True, False):
        set_fused(m, fused_flag)
        cache = M.KVCache(m, batch_size=3)
        with torch.no_grad():
            m(x[:, :10], kv_cache=cache)
            part = m(x[:, 10:], kv_cache=cache)
        torch.testing.assert_close(part, fused[:, 10:], atol=1e-5, rtol=1e-5)


def test_last_only_logits_are_the_last_row():
    model = tiny_model()
    idx = torch.randint(0, TINY["vocab_size"], (2, 10))
    with torch.no_grad():
        full = model(idx)
        last = model(idx, last_only=True)
        assert last.shape == (2, 1, TINY["vocab_size"])
        assert torch.allclose(last, full[:, -1:], atol=1e-5)
        cache = M.KVCache(model, 2)
        model(idx[:, :6], kv_cache=cache, last_only=True)  # the cache still gets every position's keys and values
        assert cache.pos == 6
        assert torch.allclose(model(idx[:, 6:], kv_cache=cache, last_only=True), full[:, -1:], atol=1e-5)


def test_tied_model_from_scratch_starts_near_uniform_loss():
    torch.manual_seed(0)
    idx = torch.randint(0, M.GPT_CONFIG_124M["vocab_size"], (2, 16))
    uniform = math.log(M.GPT_CONFIG_124M["vocab_size"])  # 10.82: every token equally likely
    with torch.no_grad():
        for width in (32, 128):
            model = M.GPTModel(tiny_cfg(emb_dim=width, tie_weights=True)).eval()
            loss = torch.nn.functional.cross_entropy(model(idx).flatten(0, 1), idx.flatten())
            assert abs(loss.item() - uniform) < 0.5, (width, loss.item())  # N(0, 1) embeddings: 7 above at width 32


def test_tied_model_input_carries_the_tokens_as_loudly_as_the_positions():
    # the blocks see tok_emb + pos_emb: a position table 50x the tokens (N(0, 1) beside GPT-2's 0.02) hides which
    # token is where, and such a model stalls at the loss of word frequencies
    for tie in (True, False):
        model = tiny_model(tie_weights=tie, context_length=128, emb_dim=128)
        tok = model.tok_emb.weight.norm(dim=1).mean().item()
        pos = model.pos_emb.weight.norm(dim=1).mean().item()
        assert 0.5 < tok / pos < 2, (tie, tok, pos)


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints: .pth save and load
# ---------------------------------------------------------------------------------------------------------------

def test_book_state_dict_with_mask_buffers_loads(tmp_path):
    m = tiny_model(qkv_bias=False)
    sd = m.state_dict()
    for i in range(TINY["n_layers"]):  # the book's attention saves its causal mask
        sd[f"trf_blocks.{i}.att.mask"] = torch.triu(torch.ones(32, 32), diagonal=1)
    torch.save(sd, tmp_path / "model.pth")
    fresh = M.GPTModel(TINY).eval()
    fresh.load_state_dict(torch.load(tmp_path / "model.pth", weights_only=True))
    x = torch.randint(0, 50257, (1, 10))
    torch.testing.assert_close(fresh(x), m(x), rtol=0, atol=0)
    with pytest.raises(M.CheckpointError, match="n_heads"):  # not a standard width: heads cannot be inferred
        M.load_model(str(tmp_path / "model.pth"))
    loaded, ckpt = M.load_model(str(tmp_path / "model.pth"), cfg_overrides={"n_heads": 2})
    assert ckpt["config"] is None and loaded.cfg["emb_dim"] == 32


def test_checkpoint_round_trip_and_prefixes(tmp_path):
    m = tiny_model(qkv_bias=True, tie_weights=True)
    path = M.save_checkpoint(str(tmp_path / "c.pth"), m, kind="pretrain", step=7)
    assert [p for p in os.listdir(tmp_path)] == ["c.pth"]  # no temporary file left
    loaded, ckpt = M.load_model(path)
    assert ckpt["kind"] == "pretrain" and ckpt["step"] == 7
    assert loaded.out_head.weight is loaded.tok_emb.weight
    x = torch.randint(0, 50257, (2, 9))
    torch.testing.assert_close(loaded.eval()(x), m(x), rtol=0, atol=0)
    prefixed = {"_orig_mod.module." + k: v for k, v in m.state_dict().items()}
    assert set(M.clean_state_dict(prefixed)) == set(m.state_dict())


def test_load_errors_name_the_problem(tmp_path):
    m = tiny_model()
    sd = m.state_dict()
    sd.pop("final_norm.scale")
    sd["trf_blocks.0.att.W_query.weight"] = torch.zeros(5, 5)
    with pytest.raises(M.CheckpointError, match=r"missing final_norm.scale.*wrong shape trf_blocks.0.att.W_query"):
        M.load_state(M.GPTModel(TINY), sd)
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(M.CheckpointError, match="empty"):
        M.read_checkpoint(str(tmp_path / "empty.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a zip file at all")
    with pytest.raises(M.CheckpointError, match="cannot read"):
        M.read_checkpoint(str(tmp_path / "junk.pth"))
    M.save_checkpoint(str(tmp_path / "ok.pth"), m)
    raw = (tmp_path / "ok.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(M.CheckpointError):
        M.read_checkpoint(str(tmp_path / "cut.pth"))


def test_pickle_payload_is_never_run(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"model": Payload(marker)}, tmp_path / "evil.pth")
    with pytest.raises(M.CheckpointError):
        M.load_model(str(tmp_path / "evil.pth"))
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------------------
# Loading returns a model ready to use
# ---------------------------------------------------------------------------------------------------------------

def test_load_model_returns_eval_mode(tmp_path):
    path = M.save_checkpoint(str(tmp_path / "m.pth"), tiny_model(drop_rate=0.5))
    model, _ = M.load_model(path)
    idx = torch.randint(0, 50257, (1, 8))
    assert not model.training and torch.equal(model(idx), model(idx))


def test_readme_snippet_runs_with_model_py_copied_alone(tmp_path):
    """README's "Using model.py elsewhere" code, run in an empty folder that holds only model.py and a checkpoint."""
    section = open(os.path.join(HERE, "README.md"), encoding="utf-8").read().split("### Using model.py elsewhere")[1]
    snippet = section.split("```python\n", 1)[1].split("```", 1)[0]
    shutil.copy(os.path.join(HERE, "model.py"), tmp_path / "model.py")
    (tmp_path / "runs" / "pretrain").mkdir(parents=True)
    M.save_checkpoint(str(tmp_path / "runs" / "pretrain" / "model.pth"), tiny_model(drop_rate=0.5))
    check = ("\nimport sys\nours = {'data', 'settings', 'layers', 'trainer', 'load_gpt2', 'tiktoken', 'requests'}\n"
             "print(tuple(out.shape), model.training, sorted(ours & set(sys.modules)))\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", snippet + check], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[-2] == "(1, 24) False []"


# ===============================================================================================================
# 2. Data: data.py
# ===============================================================================================================

def test_tokenizer_round_trip():
    ids = data.text_to_token_ids("Hello, world. <|endoftext|> Is this-- a test?")
    assert ids.shape[0] == 1 and data.EOT_ID in ids[0].tolist()
    assert data.token_ids_to_text(ids) == "Hello, world. <|endoftext|> Is this-- a test?"


def test_load_text_folder_and_bad_files(tmp_path):
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "b.txt").write_text("beta")
    assert data.load_text(str(tmp_path)) == "alpha<|endoftext|>beta"
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(settings.UserError, match="not UTF-8"):
        data.load_text(str(tmp_path / "latin1.txt"))
    (tmp_path / "bin.txt").write_bytes(b"\x00\x01\x02")
    with pytest.raises(settings.UserError, match="binary"):
        data.load_text(str(tmp_path / "bin.txt"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(settings.UserError, match="no .txt files"):
        data.load_text(str(empty))


@needs_shared
def test_download_verifies_resumes_and_explains(serve, tmp_path):
    server, _ = serve()  # the files of ../shared/data
    name = "the-verdict.txt"
    url, digest = data.DATA_FILES[name]
    dest = str(tmp_path / name)
    # a transfer cut short leaves only the .part file; the rerun resumes it with a Range request
    with pytest.raises(data.DownloadError, match="rerun to resume"):
        data.download(f"{server}/short/{name}", dest, sha256=digest, retries=1, progress=False)
    assert not os.path.exists(dest) and os.path.getsize(dest + ".part") == 20479 // 2
    data.download(f"{server}/ok/{name}", dest, sha256=digest, progress=False)
    assert data.sha256_of(dest) == digest and not os.path.exists(dest + ".part")
    # wrong bytes: nothing left in place
    bad = str(tmp_path / "bad.txt")
    with pytest.raises(data.DownloadError, match="checksum mismatch"):
        data.download(f"{server}/bad/{name}", bad, sha256=digest, progress=False)
    assert not os.path.exists(bad) and not os.path.exists(bad + ".part")
    # server down: the message names the URL and where to put the file by hand
    down = "http://127.0.0.1:9/the-verdict.txt"
    with pytest.raises(data.DownloadError) as e:
        data.download(down, str(tmp_path / "x.txt"), retries=1, timeout=2, progress=False)
    assert down in str(e.value) and str(tmp_path / "x.txt") in str(e.value)
    # fetch_data: first use downloads from the mirror, later uses only verify
    path = data.fetch_data(name, data_dir=str(tmp_path / "d"), base_url=f"{server}/ok")
    assert data.sha256_of(path) == digest
    assert data.fetch_data(name, data_dir=str(tmp_path / "d"), base_url="http://127.0.0.1:9") == path


# ---------------------------------------------------------------------------------------------------------------
# Token cache: the tokens (a file equals tiktoken's encode, a folder equals load_text's joining, pieces equal the
# whole text)
# ---------------------------------------------------------------------------------------------------------------

def encode(text):
    """The reference: tiktoken's ids for the whole text (not through data, whose tokenizer tests replace)."""
    return tiktoken.get_encoding("gpt2").encode(text, allowed_special={"<|endoftext|>"})


def make_corpus(folder, files):
    """Write {relative path: str or bytes} under folder; returns its path as a string."""
    for rel, content in files.items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
    return str(folder)


def cached(path, tmp_path, **kw):
    return data.token_cache(str(path), cache_dir=str(tmp_path / "cache"), progress=False, **kw)


class Spy:
    """Stands in for data's tokenizer and records every text it was given; raises KeyboardInterrupt (what Ctrl-C
    raises) on the call after fail_after."""

    def __init__(self, monkeypatch, fail_after=None):
        self.texts, self.fail_after = [], fail_after
        self.tok = data.get_tokenizer()
        self.name, self.n_vocab = self.tok.name, self.tok.n_vocab
        monkeypatch.setattr(data, "get_tokenizer", lambda: self)

    def encode_to_numpy(self, text, **kw):
        if self.fail_after is not None and len(self.texts) >= self.fail_after:
            raise KeyboardInterrupt
        self.texts.append(text)
        return self.tok.encode_to_numpy(text, **kw)

    def encode(self, text, **kw):
        return self.tok.encode(text, **kw)

    @property
    def text(self):
        return "".join(self.texts)


def varied_text(rng, n):
    frags = ["the", " cat", "'s", "'ll", "'VE", "don't", "  ", "   ", "\n", "\n\n", "\r\n", "\t", " \n ", "\u00a0",
             "\u3000", "\u2028", "\x1c", "\x85", "\u200b", "123", " 4567", "3.14", "!!", "...", " (", ")", "-", "é",
             "e\u0301", "中文", "。", "，", "한국어", "русский", "😀", "<|endoftext|>", "<|endof",
             "text|>", "|", "'", " '", "\ufeff", "²", "Ⅻ", "_", "a1b2"]
    return "".join(rng.choice(frags) for _ in range(n))


def test_single_file_gives_tiktokens_ids(tmp_path, verdict):
    text = data.read_text_file(verdict)
    c = cached(verdict, tmp_path)
    assert isinstance(c.tokens, np.memmap) and c.tokens.dtype == np.uint16 and not c.tokens.flags.writeable
    assert c.tokens.tolist() == encode(text)
    assert os.path.basename(c.path).startswith("the-verdict.txt-") and c.path.endswith(".bin")
    meta = read_json(c.path[:-4] + ".json")
    assert meta == c.meta
    assert (meta["format"], meta["tokenizer"], meta["n_vocab"], meta["separator_id"], meta["dtype"]) == (
        data.CACHE_FORMAT, "gpt2", 50257, 50256, "uint16")
    assert meta["source"] == os.path.abspath(verdict) and meta["n_tokens"] == len(c.tokens)
    st = os.stat(verdict)
    assert meta["files"] == [{"path": "the-verdict.txt", "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                              "ctime_ns": st.st_ctime_ns, "ino": st.st_ino, "offset": 0, "n_tokens": len(c.tokens),
                              "n_chars": len(open(verdict).read()), "index": [[0, 0]]}]
    assert meta["checksum"] == data.with_checksum(meta)["checksum"]


def test_folder_joins_documents_like_load_text(tmp_path):
    files = {"b.txt": "beta  text\n", "a.md": "# alpha\n\nsee <|endoftext|> here", "sub/c.txt": "",
             "sub/d.jsonl": '{"text": "one", "id": 1}\n\n{"text": "two<|endoftext|>three"}\n',
             "e.jsonl": '\ufeff{"text": "bom first"}\n', "Z.TXT": "zed", "f.json": "{}", "notes.csv": "x",
             ".hidden.txt": "no", ".git/config.txt": "no"}
    c = cached(make_corpus(tmp_path / "corpus", files), tmp_path)
    documents = ["zed", files["a.md"], files["b.txt"], "bom first", "", "one", "two<|endoftext|>three"]
    assert c.tokens.tolist() == encode("<|endoftext|>".join(documents))
    assert [f["path"] for f in c.meta["files"]] == ["Z.TXT", "a.md", "b.txt", "e.jsonl", "sub/c.txt", "sub/d.jsonl"]
    for f, text in zip(c.meta["files"], ["zed", files["a.md"], files["b.txt"], "bom first", "",
                                         "one<|endoftext|>two<|endoftext|>three"]):
        assert c.tokens[f["offset"]:f["offset"] + f["n_tokens"]].tolist() == encode(text)
    # a folder of .txt files only: exactly today's load_text, tokenized
    folder = make_corpus(tmp_path / "txt", {"x.txt": "x  \n", "y.txt": "  y"})
    assert cached(folder, tmp_path).tokens.tolist() == encode(data.load_text(folder))


def test_hidden_entries_are_counted_and_read_on_request(tmp_path, capsys):
    folder = make_corpus(tmp_path / "c", {"a.txt": "alpha", ".agents/b.txt": "beta", ".agents/c/d.md": "delta",
                                          ".e.txt": "eps", "sub/.f.md": "phi"})
    root, files = data.corpus_files(folder)
    assert [f["path"] for f in files] == ["a.txt"]
    assert "skipped 3 hidden file(s) and folder(s)" in capsys.readouterr().err  # .agents, .e.txt, sub/.f.md
    root, files = data.corpus_files(folder, include_hidden=True)
    assert [f["path"] for f in files] == [".agents/b.txt", ".agents/c/d.md", ".e.txt", "a.txt", "sub/.f.md"]
    assert "hidden" not in capsys.readouterr().err
    only_hidden = make_corpus(tmp_path / "h", {".x/y.txt": "why"})
    with pytest.raises(settings.UserError, match="--include_hidden"):
        data.corpus_files(only_hidden)


def test_an_own_corpus_run_samples_from_its_validation_text(tmp_path, capsys):
    (tmp_path / "own.txt").write_text(words_text(400))
    pretrain.main(short_pretrain_flags("own.txt", sample_prompt="auto", sample_tokens=3) + ["--out_dir", "run"])
    out = capsys.readouterr().out
    cache = data.token_cache("own.txt", progress=False)
    prompt = pretrain.sample_prompt(cache, data.split_point(cache, 0.9), {"sample_prompt": "auto", "data": "own.txt"})
    start = data.token_ids_to_text(cache.tokens[data.split_point(cache, 0.9):][:40].tolist())
    assert len(prompt.split()) >= 3 and prompt in " ".join(start.split()) and prompt in out  # the sample starts so
    assert pretrain.BOOK_PROMPT not in out


def test_pieces_tokenize_like_the_whole_text(tmp_path, monkeypatch):
    rng = random.Random(1)
    tok = tiktoken.get_encoding("gpt2")
    for trial in range(400):
        text = varied_text(rng, rng.randint(1, 60))
        if trial % 4 == 0:  # no whitespace at all: the fallback cuts
            text = "".join(ch for ch in text if not ch.isspace())
        size, block = rng.randint(1, 10), rng.randint(1, 7)
        pieces = list(data.safe_pieces([text[i:i + block] for i in range(0, len(text), block)], size))
        assert "".join(pieces) == text
        assert [t for p in pieces for t in tok.encode(p, allowed_special={"<|endoftext|>"})] == encode(text), text
    assert data.safe_cut("a  ") == 1 and data.safe_cut("a\n\n") == 1  # never at the end of a whitespace run
    assert data.safe_cut("it's") == 0 and data.safe_cut("<|endoftext|>") == 13
    assert data.safe_cut("one two three", 4, 9) == 7 and data.safe_cut("one two", 3) == 0
    # through the cache, a file read a few bytes at a time and tokenized a few characters at a time
    monkeypatch.setattr(data, "READ_BYTES", 5)
    monkeypatch.setattr(data, "PIECE_CHARS", 8)
    text = varied_text(rng, 3000)
    path = tmp_path / "varied.txt"
    path.write_text(text, encoding="utf-8", newline="")
    spy = Spy(monkeypatch)
    assert cached(path, tmp_path).tokens.tolist() == encode(text)
    assert len(spy.texts) > 10 and max(map(len, spy.texts)) < 200


def test_lone_surrogates_and_older_tiktoken(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"text": "bad \\ud800 half"}\n{"text": "fine"}\n')
    assert cached(path, tmp_path).tokens.tolist() == encode("bad \ud800 half<|endoftext|>fine")

    class Old:  # tiktoken before encode_to_numpy
        encode = data.get_tokenizer().encode

    ids = data.piece_ids(Old(), "a <|endoftext|> b")
    assert ids.dtype == np.uint16 and ids.tolist() == encode("a <|endoftext|> b")


# ---------------------------------------------------------------------------------------------------------------
# Token cache: reuse and invalidation (unchanged, changed, removed and added files), where it lives, waiting
# ---------------------------------------------------------------------------------------------------------------

def test_unchanged_sources_are_not_read_again(tmp_path, monkeypatch):
    folder = make_corpus(tmp_path / "corpus", {"a.txt": "alpha", "b.jsonl": '{"text": "beta"}\n'})
    first = cached(folder, tmp_path)

    def refuse(*args, **kw):
        raise AssertionError("read or tokenized a source again")

    for name in ("get_tokenizer", "text_file_blocks", "jsonl_blocks"):
        monkeypatch.setattr(data, name, refuse)
    again = cached(folder, tmp_path)
    assert again.tokens.tolist() == first.tokens.tolist() == encode("alpha<|endoftext|>beta")
    assert again.meta == first.meta and again.path == first.path


def test_changed_or_removed_source_rebuilds(tmp_path, monkeypatch, capsys):
    folder = make_corpus(tmp_path / "corpus", {"a.txt": "alpha", "b.txt": "beta"})
    cached(folder, tmp_path)
    a = tmp_path / "corpus" / "a.txt"
    st = os.stat(a)
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))  # same size and bytes, new time: rebuilt
    spy = Spy(monkeypatch)
    assert cached(folder, tmp_path).tokens.tolist() == encode("alpha<|endoftext|>beta")
    assert "alpha" in spy.text and "a.txt" in capsys.readouterr().err
    a.write_text("ALPHA")  # same size, other bytes (and a new time)
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns + 2 * 10 ** 9))
    assert cached(folder, tmp_path).tokens.tolist() == encode("ALPHA<|endoftext|>beta")
    a.write_text("alpha, longer")
    assert cached(folder, tmp_path).tokens.tolist() == encode("alpha, longer<|endoftext|>beta")
    os.remove(tmp_path / "corpus" / "b.txt")
    c = cached(folder, tmp_path)
    assert c.tokens.tolist() == encode("alpha, longer") and [f["path"] for f in c.meta["files"]] == ["a.txt"]
    # another text field is another corpus
    make_corpus(tmp_path / "corpus", {"r.jsonl": '{"text": "t", "body": "b"}\n'})
    assert cached(folder, tmp_path, text_field="body").tokens.tolist() == encode("alpha, longer<|endoftext|>b")


def test_added_files_are_appended(tmp_path, monkeypatch):
    folder = make_corpus(tmp_path / "corpus", {"a.txt": "alpha", "c.txt": "gamma"})
    old = cached(folder, tmp_path).tokens.tolist()
    make_corpus(tmp_path / "corpus", {"b.txt": "beta", "d/e.jsonl": '{"text": "epsilon"}\n{"text": "zeta"}\n'})
    spy = Spy(monkeypatch)
    c = cached(folder, tmp_path)
    assert spy.text == "betaepsilon<|endoftext|>zeta"  # only the new files were read
    assert c.tokens.tolist() == old + [data.EOT_ID] + encode("beta<|endoftext|>epsilon<|endoftext|>zeta")
    assert [f["path"] for f in c.meta["files"]] == ["a.txt", "c.txt", "b.txt", "d/e.jsonl"]
    assert c.meta == read_json(c.path[:-4] + ".json") and os.path.getsize(c.path) == 2 * len(c.tokens)
    for f in c.meta["files"]:
        assert c.tokens[f["offset"]:f["offset"] + f["n_tokens"]].tolist() == encode(
            {"a.txt": "alpha", "c.txt": "gamma", "b.txt": "beta", "d/e.jsonl": "epsilon<|endoftext|>zeta"}[f["path"]])
    # a cached empty file is still a document: the next file comes after a separator
    empty = make_corpus(tmp_path / "empty", {"a.txt": ""})
    with pytest.raises(data.UserError, match="holds no text"):
        cached(empty, tmp_path)
    make_corpus(tmp_path / "empty", {"b.txt": "beta"})
    assert cached(empty, tmp_path).tokens.tolist() == [data.EOT_ID] + encode("beta")


def test_cache_location(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "DATA_DIR", str(tmp_path / "d"))
    folder = make_corpus(tmp_path / "my_texts", {"a.txt": "alpha"})
    bin_path, meta_path = data.cache_paths(folder + os.sep)
    assert os.path.dirname(bin_path) == str(tmp_path / "d" / "token-cache")
    assert os.path.basename(bin_path).startswith("my_texts-") and len(os.path.basename(bin_path)) == len(
        "my_texts-12345678.bin") and meta_path == bin_path[:-4] + ".json"
    other = make_corpus(tmp_path / "x" / "my_texts", {"a.txt": "alpha"})
    assert data.cache_paths(other)[0] != bin_path
    c = data.token_cache(folder, progress=False)
    assert c.path == bin_path and os.path.exists(meta_path)


def test_second_process_waits_for_the_build(tmp_path, capsys):
    folder = make_corpus(tmp_path / "corpus", {"a.txt": "alpha"})
    bin_path, _ = data.cache_paths(folder, str(tmp_path / "cache"))
    os.makedirs(tmp_path / "cache")
    result = []
    with open(os.path.join(os.path.dirname(bin_path), ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another builder holds the lock
        t = threading.Thread(target=lambda: result.append(cached(folder, tmp_path)))
        t.start()
        time.sleep(2.5)  # a wait of over 2 s is announced
        assert not result and t.is_alive()
        fcntl.flock(lock, fcntl.LOCK_UN)
    t.join(30)
    assert result[0].tokens.tolist() == encode("alpha") and "waiting for another process" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# Token cache: faults (killed builds and extensions, leftovers, full or read-only disk, unreadable entries, bad
# encodings and records)
# ---------------------------------------------------------------------------------------------------------------

def cache_folder_files(tmp_path):
    return sorted(os.listdir(tmp_path / "cache")) if (tmp_path / "cache").exists() else []


def test_interrupted_build_leaves_no_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "PIECE_CHARS", 16)
    text = "some words here\n" * 200
    folder = make_corpus(tmp_path / "corpus", {"a.txt": text, "b.txt": "beta"})
    Spy(monkeypatch, fail_after=2)
    with pytest.raises(KeyboardInterrupt):
        cached(folder, tmp_path)
    assert [n for n in cache_folder_files(tmp_path) if not n.endswith(".lock")] == []
    monkeypatch.undo()
    c = cached(folder, tmp_path)
    assert c.tokens.tolist() == encode(text + "<|endoftext|>beta")
    # a rebuild that is interrupted must not leave the old metadata vouching for anything
    (tmp_path / "corpus" / "b.txt").write_text("beta, changed")
    monkeypatch.setattr(data, "PIECE_CHARS", 16)
    Spy(monkeypatch, fail_after=2)
    with pytest.raises(KeyboardInterrupt):
        cached(folder, tmp_path)
    assert [n for n in cache_folder_files(tmp_path) if not n.endswith(".lock")] == []


def test_leftovers_of_a_killed_build_are_not_accepted(tmp_path):
    folder = make_corpus(tmp_path / "corpus", {"a.txt": "alpha"})
    bin_path, meta_path = data.cache_paths(folder, str(tmp_path / "cache"))
    os.makedirs(tmp_path / "cache")
    # a killed build: a full-size token file renamed into place, no metadata yet; and a temporary file
    np.array(encode("stale"), dtype=np.uint16).tofile(bin_path)
    with open(bin_path + ".999.tmp", "wb") as f:
        f.write(b"\x01\x02")
    with open(meta_path + ".999.tmp", "w") as f:
        f.write("{")
    c = cached(folder, tmp_path)
    assert c.tokens.tolist() == encode("alpha")
    assert sorted(os.listdir(tmp_path / "cache")) == sorted([".lock", *map(os.path.basename, (bin_path, meta_path))])
    # metadata whose token file is shorter than it says, or that is not JSON: built again
    os.truncate(bin_path, 2)
    assert cached(folder, tmp_path).tokens.tolist() == encode("alpha")
    with open(meta_path, "w") as f:
        f.write("{not json")
    assert cached(folder, tmp_path).tokens.tolist() == encode("alpha")


def test_interrupted_extension_is_cut_off(tmp_path, monkeypatch):
    folder = make_corpus(tmp_path / "corpus", {"a.txt": "alpha"})
    c = cached(folder, tmp_path)
    monkeypatch.setattr(data, "PIECE_CHARS", 16)
    make_corpus(tmp_path / "corpus", {"b.txt": "beta words\n" * 100})
    Spy(monkeypatch, fail_after=2)
    with pytest.raises(KeyboardInterrupt):
        cached(folder, tmp_path)
    assert os.path.getsize(c.path) > 2 * c.meta["n_tokens"]  # partial tokens, the old metadata
    assert read_json(c.path[:-4] + ".json") == c.meta
    monkeypatch.undo()
    os.remove(tmp_path / "corpus" / "b.txt")
    again = cached(folder, tmp_path)  # the committed prefix is served, the partial tokens cut off
    assert again.tokens.tolist() == encode("alpha") and os.path.getsize(c.path) == 2 * len(again.tokens)


def test_killed_process_leaves_no_accepted_cache(tmp_path):
    folder = make_corpus(tmp_path / "corpus", {"a.txt": "a few words\n" * 20000})
    cache_dir = str(tmp_path / "cache")
    script = (f"import sys, time; sys.path.insert(0, {HERE!r}); import data\n"
              f"data.PIECE_CHARS = 1000\n"
              f"tok = data.get_tokenizer(); real = tok.encode_to_numpy\n"
              f"def slow(*a, **k):\n    time.sleep(0.02)\n    return real(*a, **k)\n"
              f"tok.encode_to_numpy = slow\n"
              f"data.token_cache({folder!r}, cache_dir={cache_dir!r}, progress=False)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], env=dict(os.environ))
    bin_path, meta_path = data.cache_paths(folder, cache_dir)
    deadline = time.time() + 60
    while not any(n.endswith(".tmp") and os.path.getsize(os.path.join(cache_dir, n)) > 0
                  for n in (os.listdir(cache_dir) if os.path.isdir(cache_dir) else [])):
        assert proc.poll() is None and time.time() < deadline, "the build ended before it could be killed"
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    assert not os.path.exists(meta_path)
    assert data.committed_meta(bin_path, meta_path, folder, "text") is None
    assert cached(folder, tmp_path).tokens.tolist() == encode("a few words\n" * 20000)
    assert not [n for n in os.listdir(cache_dir) if n.endswith(".tmp")]


def test_full_disk_is_one_clear_error(tmp_path):
    folder = make_corpus(tmp_path / "corpus", {"a.txt": "alpha " * 5000})  # 10 kB of tokens
    code = (f"import sys; sys.path.insert(0, {HERE!r}); import data, settings\n"
            f"settings.entry(lambda: data.token_cache({folder!r}, {str(tmp_path / 'cache')!r}, progress=False))")
    proc = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=120,
                          preexec_fn=_limit_file_size(4096))  # a write past 4 kB fails as on a full disk
    assert_one_line_error(proc, "cannot write the token cache", "File too large", "GPT2_DATA_DIR")
    assert [n for n in cache_folder_files(tmp_path) if not n.endswith(".lock")] == []


def test_read_only_cache_folder(tmp_path, monkeypatch):
    folder = make_corpus(tmp_path / "corpus", {"a.txt": "alpha"})
    cached(folder, tmp_path)
    real_open = open

    def read_only(path, mode="r", **kw):
        if any(m in mode for m in "wa+"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, mode, **kw)

    monkeypatch.setattr(data, "open", read_only, raising=False)
    assert cached(folder, tmp_path).tokens.tolist() == encode("alpha")  # a complete cache is read without a lock
    make_corpus(tmp_path / "corpus", {"b.txt": "beta"})
    with pytest.raises(data.UserError, match="cannot write the token cache .*Permission denied"):
        cached(folder, tmp_path)


def test_unreadable_entries_are_skipped_without_blocking(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "corpus"
    make_corpus(folder, {"a.txt": "alpha", "secret.txt": "hidden", "sub/b.md": "beta"})
    os.mkfifo(folder / "pipe.txt")  # opening it for reading would block until a writer comes
    os.symlink(folder / "gone.txt", folder / "broken.txt")
    os.symlink(folder / "sub", folder / "link-to-sub")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(folder / "sock.txt"))
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: not str(p).endswith("secret.txt")
                        and real_access(p, mode, **kw))  # root may read anything: pretend

    def hung(*args):
        raise TimeoutError("token_cache blocked")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(30)
    try:
        c = cached(folder, tmp_path)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
        sock.close()
    assert c.tokens.tolist() == encode("alpha<|endoftext|>beta")
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note: skipped")]
    assert len(notes) == 5
    for name, why in [("pipe.txt", "FIFO"), ("broken.txt", "broken link"), ("sock.txt", "socket"),
                      ("secret.txt", "permission denied"), ("link-to-sub", "not followed")]:
        assert any(name in n and why in n for n in notes), (name, notes)
    with pytest.raises(data.UserError, match="FIFO"):
        cached(folder / "pipe.txt", tmp_path)
    with pytest.raises(data.UserError, match="no file at"):
        cached(folder / "nothing.txt", tmp_path)
    (tmp_path / "none").mkdir()
    with pytest.raises(data.UserError, match="holds no readable .txt, .md or .jsonl"):
        cached(tmp_path / "none", tmp_path)


def test_encoding_problems_are_named(tmp_path, monkeypatch):
    utf16 = tmp_path / "utf16.txt"
    utf16.write_bytes("hello world".encode("utf-16"))
    for read in (data.read_text_file, lambda p: cached(p, tmp_path)):
        with pytest.raises(data.UserError, match=r"is UTF-16 .*iconv -f utf-16 -t utf-8"):
            read(str(utf16))
    (tmp_path / "le.txt").write_bytes("hello world".encode("utf-16-le"))
    with pytest.raises(data.UserError, match="UTF-16LE without a byte-order mark.*iconv -f utf-16le"):
        cached(tmp_path / "le.txt", tmp_path)
    (tmp_path / "bin.txt").write_bytes(b"\x00\x01\x02\x03\xff")
    with pytest.raises(data.UserError, match="looks binary"):
        cached(tmp_path / "bin.txt", tmp_path)
    monkeypatch.setattr(data, "READ_BYTES", 4)  # the bad byte lies blocks after the start
    (tmp_path / "latin1.txt").write_bytes("café au lait, crème brûlée".encode("latin-1"))
    with pytest.raises(data.UserError, match=r"not UTF-8 \(bad byte at offset 3\)"):
        cached(tmp_path / "latin1.txt", tmp_path)
    (tmp_path / "split.txt").write_bytes("aéb".encode() + "ü".encode()[:1])  # a character cut off at the end
    with pytest.raises(data.UserError, match=r"offset 4\)"):
        cached(tmp_path / "split.txt", tmp_path)
    (tmp_path / "latin1.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(data.UserError, match=r"latin1.jsonl is not UTF-8 \(bad byte at offset 28\)"):
        cached(tmp_path / "latin1.jsonl", tmp_path)


@pytest.mark.parametrize("line, message", [
    ('{"text": "ok"', "line 2 is not valid JSON"),
    ('["text"]', "line 2 is a JSON list, expected an object with a 'text' field"),
    ('{"content": "x", "url": "u"}', "line 2 has no 'text' field \\(it has 'content', 'url'\\): pass --text_field"),
    ('{"text": null}', "line 2: field 'text' is a JSON NoneType, expected text"),
])
def test_bad_jsonl_lines_are_named(tmp_path, line, message):
    path = tmp_path / "records.jsonl"
    path.write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(data.UserError, match=message):
        cached(path, tmp_path)
    assert not os.path.exists(data.cache_paths(str(path), str(tmp_path / "cache"))[1])


# ---------------------------------------------------------------------------------------------------------------
# Windows: the book's sliding windows, over the cache, random ones, dealt out to processes
# ---------------------------------------------------------------------------------------------------------------

def corpus_tokens(tmp_path, n_words=600):
    rng = random.Random(0)
    text = " ".join(rng.choice(["alpha", "beta", "gamma", "delta", "7", ",", "\n"]) for _ in range(n_words))
    return text, cached(make_corpus(tmp_path / "corpus", {"a.txt": text}), tmp_path).tokens


def test_sliding_windows_match_the_book():
    ids = list(range(100))
    ds = data.GPTDatasetV1(ids, None, max_length=8, stride=5)
    assert len(ds) == len(range(0, 100 - 8, 5))
    x, y = ds[3]
    assert x.tolist() == list(range(15, 23)) and y.tolist() == list(range(16, 24))
    loader = data.create_dataloader_v1(ids, batch_size=4, max_length=8, stride=8, shuffle=False)
    xb, yb = next(iter(loader))
    assert xb.shape == (4, 8) and torch.equal(xb[:, 1:], yb[:, :-1])
    assert len(loader) == len(range(0, 92, 8)) // 4  # drop_last


def test_token_windows_equal_gpt_dataset(tmp_path):
    text, tokens = corpus_tokens(tmp_path)
    for max_length, stride in [(4, 1), (8, 5), (32, 32), (100, 7), (len(tokens) - 1, 1), (len(tokens), 1)]:
        ref = data.GPTDatasetV1(text, data.get_tokenizer(), max_length, stride)
        ours = data.TokenWindows(tokens, max_length, stride)
        assert len(ours) == len(ref)
        for i in range(len(ref)):
            x, y = ours[i]
            rx, ry = ref[i]
            assert x.dtype == torch.long and torch.equal(x, rx) and torch.equal(y, ry)
    ids = encode(text)
    part = data.TokenWindows(tokens, 8, 3, start=100, end=300)
    ref = data.GPTDatasetV1(ids[100:300], None, 8, 3)
    assert len(part) == len(ref) and all(torch.equal(part[i][0], ref[i][0]) for i in range(len(ref)))
    assert part.start + (len(part) - 1) * part.stride + 8 + 1 <= 300  # the last window ends within [start, end)
    with pytest.raises(IndexError):
        part[len(part)]


def test_random_windows(tmp_path):
    _, tokens = corpus_tokens(tmp_path)
    start, end, n = 50, 600, 16
    ds = data.RandomWindows(tokens, n, start, end, seed=3)
    assert len(ds) == (end - start) // n
    offsets = [ds.offset(i) for i in range(len(ds))]
    assert all(start <= o <= end - n - 1 for o in offsets) and len(set(offsets)) > len(ds) // 2
    assert offsets == [data.RandomWindows(tokens, n, start, end, seed=3).offset(i) for i in range(len(ds))]
    assert offsets != [data.RandomWindows(tokens, n, start, end, seed=4).offset(i) for i in range(len(ds))]
    ids = torch.tensor(tokens.astype(np.int64))
    for i in (0, 5, len(ds) - 1):
        x, y = ds[i]
        assert torch.equal(x, ids[offsets[i]:offsets[i] + n]) and torch.equal(y, ids[offsets[i] + 1:offsets[i] + n + 1])
    # offsets reach the whole range: the last possible start and the first
    wide = data.RandomWindows(tokens, 1, start, start + 3, seed=0)
    assert {data.RandomWindows(tokens, 1, start, start + 3, seed=s).offset(0) for s in range(50)} == {start, start + 1}
    assert len(wide) == 3 and len(data.RandomWindows(tokens, n, 0, n)) == 0
    # pickled (DataLoader workers under spawn): the file name travels, not the tokens
    blob = pickle.dumps(ds)
    assert len(blob) < 2000
    back = pickle.loads(blob)
    assert [back.offset(i) for i in range(len(ds))] == offsets and torch.equal(back[3][0], ds[3][0])
    tw = pickle.loads(pickle.dumps(data.TokenWindows(tokens, 8, 8)))
    assert torch.equal(tw[2][0], data.TokenWindows(tokens, 8, 8)[2][0])


def test_the_split_falls_where_the_book_splits_the_text(tmp_path, verdict, monkeypatch):
    c = cached(verdict, tmp_path)
    text, tok = open(verdict).read(), data.get_tokenizer()
    cut = int(0.9 * len(text))  # the book: train_data = text[:cut]
    split = data.split_point(c, 0.9)
    ids = c.tokens.tolist()
    assert text[:cut].startswith(tok.decode(ids[:split])) and len(tok.decode(ids[:split + 1])) > cut
    # the same over several files joined by <|endoftext|>, counting from the [token, character] marks
    monkeypatch.setattr(data, "INDEX_TOKENS", 7)
    monkeypatch.setattr(data, "PIECE_CHARS", 16)  # many pieces per file: a mark can go between them
    rng = random.Random(1)
    files = {f"{i}.txt": varied_text(rng, 40) for i in range(3)}
    c = cached(make_corpus(tmp_path / "many", files), tmp_path / "many")
    joined = "<|endoftext|>".join(files[k] for k in sorted(files))
    assert all(len(f["index"]) > 1 for f in c.meta["files"])
    ids = c.tokens.tolist()
    for ratio in (0.1, 0.33, 0.5, 0.9, 0.99):
        cut, split = int(ratio * len(joined)), data.split_point(c, ratio)
        before = len(tok.decode(ids[:split]))
        assert before <= cut < len(tok.decode(ids[:split + 1])), ratio


def test_distributed_samplers_give_disjoint_windows(tmp_path):
    _, tokens = corpus_tokens(tmp_path)
    split = int(len(tokens) * 0.9)
    for ds in (data.RandomWindows(tokens, 8, 0, split, seed=1), data.TokenWindows(tokens, 8, 8, 0, split)):
        shares = [list(DistributedSampler(ds, num_replicas=2, rank=r, shuffle=True, seed=5, drop_last=True))
                  for r in range(2)]
        assert not set(shares[0]) & set(shares[1]) and len(shares[0]) == len(shares[1]) == len(ds) // 2
        # resuming at index k of a rank's share reads the same windows as the uninterrupted pass
        loader = DataLoader(ds, batch_size=4, sampler=shares[0])
        full = torch.cat([x for x, _ in loader])
        resumed = torch.cat([x for x, _ in DataLoader(ds, batch_size=4, sampler=shares[0][8:])])
        assert torch.equal(full[8:], resumed)


# ===============================================================================================================
# 3. Training: settings.py, trainer.py, pretrain.py
# ===============================================================================================================

def test_settings_helper_types_help_and_errors(capsys):
    defaults = dict(top_k=50, lr=4e-4, name="x", resume=False, limit=None)
    cfg = settings.get_config(defaults, ["--top_k", "40", "--lr=1e-3", "--resume", "--limit", "off"])
    assert cfg == dict(top_k=40, lr=1e-3, name="x", resume=True, limit=None)
    assert settings.get_config(defaults, ["--resume", "false"])["resume"] is False
    for bad in (["--top_kk", "3"], ["--top_k", "many"], ["--resume", "maybe"]):
        with pytest.raises(SystemExit) as e:
            settings.get_config(defaults, bad)
        assert e.value.code == 2
    with pytest.raises(SystemExit):
        generate_script.main(["--help"])
    assert "0 = greedy" in capsys.readouterr().out  # the comment beside the setting


def test_pretrain_decay_flag_groups_the_optimizer_and_defines_the_run(verdict, tmp_path):
    out = str(tmp_path / "run")
    flags = pre(verdict) + ["--out_dir", out, "--max_steps", "1", "--weight_decay", "0.5"]
    pretrain.main(flags + ["--decay", "matrices"])
    groups = M.read_checkpoint(os.path.join(out, trainer.TRAIN_STATE))["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.5, 0.0]
    code, _, err = run_main(pretrain.main, flags + ["--resume", "--max_steps", "2", "--decay", "all"])
    assert_one_error_line(code, err, "--decay matrices (now all)")
    code, _, err = run_main(pretrain.main, flags + ["--decay", "bias"])
    assert code == 2 and "--decay must be all or matrices" in err


def test_weight_decay_on_matrices_only_leaves_biases_and_norms_alone():
    model = tiny_model(tie_weights=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for decay in ("all", "matrices"):
        model.load_state_dict(before)
        opt = trainer.make_optimizer(model, 0.1, 0.5, torch.device("cpu"), decay=decay)
        for p in model.parameters():
            p.grad = torch.zeros_like(p)  # no gradient: only the decay moves a weight
        opt.step()
        after = model.state_dict()
        moved = {k for k in after if not torch.equal(after[k], before[k])}
        decayed = {k for k, v in before.items() if v.any() and (decay == "all" or v.dim() >= 2)}  # 0 stays 0
        assert moved == decayed and any(v.dim() == 1 and v.any() for v in before.values()), decay
        assert torch.allclose(after["tok_emb.weight"], before["tok_emb.weight"] * (1 - 0.1 * 0.5))
    with pytest.raises(ValueError, match="'all' or 'matrices'"):
        trainer.make_optimizer(model, 0.1, 0.5, torch.device("cpu"), decay="some")


def test_lr_schedule():
    assert trainer.lr_at_step(0, 100, 1e-3, "constant") == 1e-3
    assert trainer.lr_at_step(0, 100, 1e-3, "cosine", warmup_steps=10) == pytest.approx(1e-4)
    assert trainer.lr_at_step(9, 100, 1e-3, "cosine", warmup_steps=10) == pytest.approx(1e-3)
    assert trainer.lr_at_step(10, 100, 1e-3, "cosine", 10, 1e-5) == pytest.approx(1e-3)
    assert trainer.lr_at_step(55, 100, 1e-3, "cosine", 10, 1e-5) == pytest.approx((1e-3 + 1e-5) / 2)
    assert trainer.lr_at_step(100, 100, 1e-3, "cosine", 10, 1e-5) == pytest.approx(1e-5)


@slow
def test_pretrain_end_to_end_writes_what_it_promises(verdict, tmp_path):
    out = tmp_path / "run"
    last = pretrain.main(["--data", verdict, "--out_dir", str(out), "--epochs", "2", "--lr", "1e-3",
                          "--eval_freq", "20", *pretrain_flags()])
    for f in ["model.pth", "model_and_optimizer.pth", "log.csv", "loss-plot.png"]:
        assert (out / f).exists(), f
    rows = csv_rows(out / "log.csv")  # one row per optimizer step, the evaluations in the steps they followed
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "train_loss", "val_loss"} <= set(rows[0])
    assert [int(r["step"]) for r in rows] == list(range(1, len(rows) + 1))
    evals = [r for r in rows if r["val_loss"]]
    first, final = evals[0], evals[-1]
    assert float(final["train_loss"]) < float(first["train_loss"]) - 1.0  # training lowers the loss
    assert int(final["tokens_seen"]) == int(final["step"]) * 2 * 32  # tokens seen = steps * batch * context
    model, ckpt = M.load_model(str(out / "model.pth"))
    assert ckpt["kind"] == "pretrain" and ckpt["config"]["emb_dim"] == 32 and last["step"] == int(final["step"])
    texts = generate_script.main(["--checkpoint", str(out / "model.pth"), "--max_new_tokens", "5",
                                  "--num_samples", "2", "--device", "cpu"])
    assert len(texts) == 2 and all(t.startswith("Every effort moves you") for t in texts)


def signal_when_logged(args, log_path, step, sig=signal.SIGTERM, env=None):
    """Start pretrain.py with args, send it sig once its log.csv shows `step`, and return the finished process."""
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "pretrain.py"), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**ENV, "PYTHONPATH": HERE, **(env or {})})
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline:
        if max((r["step"] for r in trainer.read_log(log_path)), default=0) >= step:
            proc.send_signal(sig)
            break
        time.sleep(0.05)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@slow
def test_resume_equals_uninterrupted_run(verdict, tmp_path):
    text = tmp_path / "short.txt"  # ~10 steps an epoch, so the run crosses an epoch boundary
    text.write_text(open(verdict).read()[:3300])
    common = ["--data", str(text), "--epochs", "2", "--eval_freq", "4", "--lr_schedule", "cosine",
              "--warmup_steps", "2", "--grad_clip", "1.0", *pretrain_flags(drop_rate=0.1)]
    pretrain.main([*common, "--out_dir", str(tmp_path / "a")])
    # the same run, stopped by a real SIGTERM once it logged step 5, then resumed
    b = tmp_path / "b"
    stopped = signal_when_logged([*common, "--out_dir", str(b)], b / "log.csv", 5)
    assert stopped.returncode == 143 and "SIGTERM at step" in stopped.stderr, stopped.stderr
    state = M.read_checkpoint(str(b / "model_and_optimizer.pth"))
    assert 5 <= state["step"] < 20 and [r["step"] for r in trainer.read_log(b / "log.csv")] == list(
        range(1, state["step"] + 1))
    pretrain.main([*common, "--out_dir", str(b), "--resume"])
    a = M.read_checkpoint(str(tmp_path / "a" / "model.pth"))["model"]
    b_weights = M.read_checkpoint(str(b / "model.pth"))["model"]
    for k in a:
        torch.testing.assert_close(a[k], b_weights[k], atol=1e-6, rtol=0)
    whole, resumed = trainer.read_log(tmp_path / "a" / "log.csv"), trainer.read_log(b / "log.csv")
    assert [r["step"] for r in resumed] == [r["step"] for r in whole]  # no gap, no duplicate
    assert [r.get("val_loss") for r in resumed] == pytest.approx([r.get("val_loss") for r in whole], abs=1e-5)


def test_divergence_stops_and_names_a_checkpoint_only_when_training_continues_from_it(verdict, tmp_path):
    for lr in ("1e30", "1e6", "300"):  # the weights stay finite for a step at the first; later ones diverge later
        out = str(tmp_path / f"lr{lr}")
        args = pre(verdict) + ["--out_dir", out, "--save_every", "1", "--max_steps", "30", "--eval_freq", "100"]
        code, _, err = run_main(pretrain.main, args + ["--lr", lr])
        assert code == 1 and "training diverged at step" in err and "lower it" in err, err
        state = M.read_checkpoint(os.path.join(out, "model_and_optimizer.pth")) if os.path.exists(
            os.path.join(out, "model_and_optimizer.pth")) else None
        assert state is None or all(torch.isfinite(v).all() for v in state["model"].values())
        if "last good checkpoint" in err:  # then a resume at a sane learning rate trains on
            assert f"(step {state['step']})" in err
            pretrain.main(args + ["--resume", "--lr", "1e-4", "--max_steps", str(state["step"] + 2)])
            assert M.read_checkpoint(os.path.join(out, "model_and_optimizer.pth"))["step"] == state["step"] + 2
        else:
            assert "nothing was saved" in err or "start over" in err, err


def test_pretrain_epochs_zero_only_evaluates(verdict, tmp_path):
    res = pretrain.main(["--data", verdict, "--epochs", "0", "--out_dir", str(tmp_path / "x"), *pretrain_flags()])
    assert 10.0 < res["train_loss"] < 11.5 and 10.0 < res["val_loss"] < 11.5  # ~ln(50257) = 10.8 untrained
    assert not (tmp_path / "x").exists()


@slow
@needs_shared
def test_pretrain_bad_input_is_one_clear_line(tmp_path, verdict):
    short = tmp_path / "short.txt"
    short.write_text("Just a few words.")
    cases = [
        (["--data", str(tmp_path / "missing.txt")], ["no file at", "--data"]),
        (["--data", str(short)], ["need at least context_length+1 = 33 tokens, got"]),
        (["--data", verdict, "--train_ratio", "0.999"], ["validation split too small"]),
        (["--data", verdict, "--out_dir", verdict], ["is a file"]),
    ]
    for args, words in cases:
        proc = run_script("pretrain.py", *args, *pretrain_flags())
        assert_one_line_error(proc, *words)
    proc = run_script("pretrain.py", "--epoch", "3")
    assert proc.returncode == 2 and "unrecognized arguments: --epoch" in proc.stderr
    proc = run_script("pretrain.py", "--lr", "fast")
    assert proc.returncode == 2 and "--lr" in proc.stderr


# ---------------------------------------------------------------------------------------------------------------
# Short runs: bf16 autocast, tied weights, gradient accumulation
# ---------------------------------------------------------------------------------------------------------------

def run_pretrain(data_path, out_dir, *extra):
    """pretrain.main for a few steps (short_pretrain_flags) into out_dir; returns its summary."""
    return pretrain.main(short_pretrain_flags(data_path) + ["--out_dir", str(out_dir), *extra])


def test_bfloat16_trains_close_to_float32(tmp_path, verdict):
    fp32 = run_pretrain(verdict, tmp_path / "fp32", "--max_steps", "4", "--lr", "2e-3")
    bf16 = run_pretrain(verdict, tmp_path / "bf16", "--max_steps", "4", "--lr", "2e-3", "--dtype", "bfloat16")
    w32, w16 = weights(tmp_path / "fp32" / "model.pth"), weights(tmp_path / "bf16" / "model.pth")
    assert all(v.dtype == torch.float32 for v in w16.values())  # autocast keeps fp32 master weights
    assert max_diff(w32, w16) > 0  # the bf16 path really ran
    for k in ("train_loss", "val_loss"):
        assert abs(fp32[k] - bf16[k]) < 0.01, (k, fp32[k], bf16[k])
    first = trainer.read_log(tmp_path / "bf16" / "log.csv")[0]
    assert first["step"] == 1 and bf16["train_loss"] < first["train_loss"]  # it learned something


def test_tie_weights_shares_the_embedding_through_training_and_checkpoints(tmp_path, verdict):
    run_pretrain(verdict, tmp_path, "--tie_weights", "--max_steps", "2")
    run_pretrain(verdict, tmp_path, "--tie_weights", "--max_steps", "3", "--resume")
    model, ckpt = M.load_model(str(tmp_path / "model.pth"))
    assert ckpt["config"]["tie_weights"] is True
    assert model.out_head.weight is model.tok_emb.weight
    assert torch.equal(ckpt["model"]["out_head.weight"], ckpt["model"]["tok_emb.weight"])
    untied = M.GPTModel({**model.cfg, "tie_weights": False})
    assert M.count_parameters(untied) - M.count_parameters(model) == model.cfg["vocab_size"] * model.cfg["emb_dim"]
    with torch.no_grad():  # one tensor: a change to the embedding is a change to the output layer
        model.tok_emb.weight[0, 0] += 1.0
    assert model.out_head.weight[0, 0] == model.tok_emb.weight[0, 0]


def test_tied_and_untied_models_learn_real_text(tmp_path, verdict):
    # a few dozen steps on the story: each loss must fall well below its start (10.8, every token equally likely)
    for tie in ("true", "false"):
        run_pretrain(verdict, tmp_path / tie, "--tie_weights", tie, "--max_steps", "30", "--lr", "3e-3",
                     "--batch_size", "4", "--eval_freq", "30", "--seed", "1")
        log = [r for r in trainer.read_log(tmp_path / tie / "log.csv") if "train_loss" in r]
        assert log[0]["train_loss"] > 9.5 and log[-1]["train_loss"] < log[0]["train_loss"] - 3, (tie, log)


def test_grad_accum_equals_one_big_batch(tmp_path, verdict):
    big = run_pretrain(verdict, tmp_path / "big", "--batch_size", "4", "--max_steps", "3", "--lr", "1e-3")
    acc = run_pretrain(verdict, tmp_path / "acc", "--batch_size", "2", "--grad_accum_steps", "2", "--max_steps", "3",
                       "--lr", "1e-3")
    assert max_diff(weights(tmp_path / "big" / "model.pth"), weights(tmp_path / "acc" / "model.pth")) < 1e-5
    assert big["tokens_seen"] == acc["tokens_seen"] == 3 * 4 * 32
    run_pretrain(verdict, tmp_path / "small", "--batch_size", "2", "--max_steps", "3", "--lr", "1e-3")
    assert max_diff(weights(tmp_path / "big" / "model.pth"), weights(tmp_path / "small" / "model.pth")) > 1e-4


# ---------------------------------------------------------------------------------------------------------------
# --dry_run and the memory estimate
# ---------------------------------------------------------------------------------------------------------------

PLAN_WORDS = ("parameters", "trainable", "weights", "gradients", "AdamW state", "activations", "tokens per step",
              "steps per epoch", "--dry_run")


def test_pretrain_dry_run_prints_the_plan_and_writes_nothing(tmp_path, capsys, verdict):
    out = tmp_path / "run"
    got = run_pretrain(verdict, out, "--dry_run", "--batch_size", "2", "--grad_accum_steps", "3")
    text = capsys.readouterr().out
    assert not out.exists()
    for word in ("parameters", "trainable", "weights", "gradients", "AdamW state", "activations",
                 "tokens per step", "steps per epoch"):
        assert word in text
    cfg = settings.get_config(pretrain.DEFAULTS, short_pretrain_flags(verdict) + ["--batch_size", "2"])
    model = M.GPTModel(trainer.model_config(cfg))
    train_loader, _ = pretrain.make_loaders(data.token_cache(verdict), cfg)
    assert got["total_params"] == got["trainable_params"] == M.count_parameters(model)
    assert got["tokens_per_step"] == 2 * 32 * 3
    assert got["steps_per_epoch"] == len(train_loader) // 3
    assert got["weights"] == 4 * M.count_parameters(model) and got["optimizer"] == 2 * got["gradients"]
    # the time: timed steps of a throwaway model, times the plan's steps; the random stream is left as it was
    assert "estimated time:" in text and got["seconds"] >= got["total_steps"] * 3 * got["step_s"] > 0
    torch.manual_seed(5)
    before = torch.rand(1)
    torch.manual_seed(5)
    trainer.estimate_time(model.cfg, cfg, 32, 10, torch.float32, torch.device("cpu"), steps=1)
    assert torch.equal(torch.rand(1), before)


def test_memory_estimate_scales_as_it_should():
    cfg = trainer.model_config(settings.get_config(pretrain.DEFAULTS, short_pretrain_flags()))
    est = lambda **kw: trainer.estimate_memory(cfg, **{"batch_size": 2, "context_length": 32, **kw})  # noqa: E731
    base = est()
    assert est(batch_size=4)["activations"] == 2 * base["activations"]
    assert est(batch_size=4)["weights"] == base["weights"]
    assert est(dtype=torch.bfloat16)["activations"] < base["activations"]
    frozen = est(trainable_params=1000, trainable_layers=1)
    assert frozen["optimizer"] == 8000 and frozen["activations"] < base["activations"]
    sharded = est(world_size=4, fsdp=True)
    assert sharded["optimizer"] == base["optimizer"] // 4 and sharded["total"] < base["total"]


# ---------------------------------------------------------------------------------------------------------------
# Run folders: one run at a time, --resume / --overwrite, settings.json, --save_best, logs
# ---------------------------------------------------------------------------------------------------------------

def pre(verdict):
    """pretrain.py for a few steps on the-verdict without a sample after each epoch."""
    return short_pretrain_flags(verdict, sample_prompt="")


def test_a_fresh_run_refuses_a_folder_with_a_run_and_overwrite_starts_over(verdict, tmp_path):
    out = str(tmp_path / "run")
    pretrain.main(pre(verdict) + ["--out_dir", out, "--max_steps", "2", "--eval_freq", "100"])
    before = tree_hashes(out)
    code, _, err = run_main(pretrain.main, pre(verdict) + ["--out_dir", out, "--max_steps", "2"])
    assert_one_error_line(code, err, "already holds a run", "--resume", "--overwrite")
    assert tree_hashes(out) == before
    settings_json = json.load(open(os.path.join(out, "settings.json")))
    assert settings_json["settings"]["max_steps"] == 2 and settings_json["torch"] == torch.__version__
    assert "pretrain.py" in settings_json["command"] and "tiktoken" in settings_json
    # --overwrite with a bad start (no such init) changes nothing; a good one replaces the run
    code, _, err = run_main(pretrain.main, pre(verdict) + ["--out_dir", out, "--overwrite", "--init", "missing.pth"])
    assert_one_error_line(code, err, "missing.pth")
    assert tree_hashes(out) == before
    pretrain.main(pre(verdict) + ["--out_dir", out, "--overwrite", "--max_steps", "3", "--eval_freq", "100"])
    assert M.read_checkpoint(os.path.join(out, trainer.TRAIN_STATE))["step"] == 3


def test_resume_of_a_finished_run_changes_nothing(verdict, tmp_path, capsys):
    out = str(tmp_path / "run")
    pretrain.main(pre(verdict) + ["--out_dir", out, "--max_steps", "2", "--eval_freq", "100"])
    before = tree_hashes(out)
    pretrain.main(pre(verdict) + ["--out_dir", out, "--max_steps", "2", "--resume"])
    assert "already finished at step 2" in capsys.readouterr().out
    assert tree_hashes(out) == before


def test_a_run_that_fails_before_its_first_step_leaves_no_folder(verdict, tmp_path):
    out = tmp_path / "new"
    code, _, err = run_main(pretrain.main, pre(verdict) + ["--out_dir", str(out), "--init", "nothing.pth"])
    assert_one_error_line(code, err, "nothing.pth")
    assert not out.exists()


def test_two_runs_cannot_share_a_folder(verdict, tmp_path):
    out = str(tmp_path / "run")
    cfg = {"out_dir": out, "logger": "none"}
    with trainer.RunFolder(cfg):
        code, _, err = run_main(pretrain.main, pre(verdict) + ["--out_dir", out, "--max_steps", "1"])
        assert_one_error_line(code, err, "in use by another run", f"PID {os.getpid()}")
    assert not os.path.exists(out)  # the holder made the folder and never started: it leaves nothing


def test_stale_temporary_files_are_removed_and_files_follow_the_umask(verdict, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    dead = out / "model.pth.999999999.tmp"  # a killed write: no process has that PID
    dead.write_bytes(b"half")
    old = os.umask(0o022)
    try:
        pretrain.main(pre(verdict) + ["--out_dir", str(out), "--max_steps", "1", "--eval_freq", "100"])
    finally:
        os.umask(old)
    assert not dead.exists()
    assert os.stat(out / "model.pth").st_mode & 0o777 == 0o644


def test_save_best_keeps_the_lowest_validation_loss_and_logs_follow_each_evaluation(verdict, tmp_path):
    out = tmp_path / "run"
    pretrain.main(pre(verdict) + ["--out_dir", str(out), "--max_steps", "6", "--eval_freq", "1", "--save_best",
                         "--lr", "3e-3"])
    rows = list(csv_rows(out / "log.csv"))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    best = M.read_checkpoint(str(out / "best.pth"))
    assert best["val_loss"] == pytest.approx(min(float(r["val_loss"]) for r in rows), abs=1e-4)
    assert best["kind"] == "pretrain" and (out / "loss-plot.png").exists()


def test_piped_progress_is_plain_lines_and_quiet_prints_evaluations_only(verdict, tmp_path):
    env = {"GPT2_DATA_DIR": str(tmp_path / "data")}
    args = [*pre(verdict), "--max_steps", "4", "--eval_freq", "2"]
    loud = run_script("pretrain.py", *args, "--out_dir", str(tmp_path / "a"), env=env)
    assert loud.returncode == 0, loud.stderr
    assert "\r" not in loud.stderr and "step 4/4: loss" in loud.stderr
    quiet = run_script("pretrain.py", *args, "--out_dir", str(tmp_path / "b"), "--quiet", env=env)
    assert quiet.returncode == 0 and "step 4/4" not in quiet.stderr
    assert "(step 000004)" in quiet.stdout and "done in" in quiet.stdout


def test_a_logger_whose_package_is_missing_is_one_line(verdict, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    code, _, err = run_main(pretrain.main, pre(verdict) + ["--out_dir", str(tmp_path / "r"), "--logger", "wandb"])
    assert_one_error_line(code, err, "pip install wandb")
    assert not (tmp_path / "r").exists()


# ===============================================================================================================
# 4. Weights: load_gpt2.py (OpenAI's published weights, safetensors, downloads, export to Hugging Face)
# ===============================================================================================================

def published_sizes(cfg):
    """A config's sizes under the names of config.json."""
    return dict(vocab_size=cfg["vocab_size"], n_positions=cfg["context_length"], n_embd=cfg["emb_dim"],
                n_layer=cfg["n_layers"], n_head=cfg["n_heads"])


# The published-layout checkpoints of these tests: the tiny config with 4 heads and a 101-token vocabulary (small
# files; IDX and the reference stay within it)
PUBLISHED = published_sizes(tiny_cfg(vocab_size=101, n_heads=4))


def published_tensors(prefix=False, masks=False, lm_head=False, seed=0, dtype=torch.float32, **size):
    """Random tensors under exactly the names and shapes of openai-community/gpt2's model.safetensors."""
    c = {**PUBLISHED, **size}
    V, C, d, L = c["vocab_size"], c["n_positions"], c["n_embd"], c["n_layer"]
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=0.3, base=0.0):
        return (base + scale * torch.randn(*shape, generator=g)).to(dtype)

    p = "transformer." if prefix else ""
    sd = {f"{p}wte.weight": rnd(V, d), f"{p}wpe.weight": rnd(C, d)}
    for i in range(L):
        h = f"{p}h.{i}."
        sd.update({h + "ln_1.weight": rnd(d, scale=0.1, base=1.0), h + "ln_1.bias": rnd(d, scale=0.1)})
        if masks:
            sd[h + "attn.bias"] = torch.ones(C, C).tril().view(1, 1, C, C).to(dtype)
            sd[h + "attn.masked_bias"] = torch.tensor(-1e4).to(dtype)
        sd.update({h + "attn.c_attn.weight": rnd(d, 3 * d), h + "attn.c_attn.bias": rnd(3 * d),
                   h + "attn.c_proj.weight": rnd(d, d), h + "attn.c_proj.bias": rnd(d),
                   h + "ln_2.weight": rnd(d, scale=0.1, base=1.0), h + "ln_2.bias": rnd(d, scale=0.1),
                   h + "mlp.c_fc.weight": rnd(d, 4 * d), h + "mlp.c_fc.bias": rnd(4 * d),
                   h + "mlp.c_proj.weight": rnd(4 * d, d), h + "mlp.c_proj.bias": rnd(d)})
    sd.update({f"{p}ln_f.weight": rnd(d, scale=0.1, base=1.0), f"{p}ln_f.bias": rnd(d, scale=0.1)})
    if lm_head:
        sd["lm_head.weight"] = sd[f"{p}wte.weight"].clone()
    return sd


def hf_config_json(**over):
    c = {**PUBLISHED, **over}
    return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": c["vocab_size"],
            "n_positions": c["n_positions"], "n_ctx": c["n_positions"], "n_embd": c["n_embd"],
            "n_layer": c["n_layer"], "n_head": c["n_head"], "activation_function": "gelu_new",
            "layer_norm_epsilon": 1e-5, **{k: v for k, v in over.items() if k not in PUBLISHED}}


def write_published(folder, tensors, config=True, **config_over):
    os.makedirs(folder, exist_ok=True)
    checkpoints.write_safetensors(os.path.join(folder, "model.safetensors"), tensors, {"format": "pt"})
    if config:
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(hf_config_json(**config_over), f)
    return folder


def reference_logits(sd, n_head, idx, head=None):
    """GPT-2 written out from the published tensors: Conv1D is x @ W + b, tanh GELU, LayerNorm eps 1e-5, float64."""
    sd = {k.removeprefix("transformer."): v.double() for k, v in sd.items()}
    B, T = idx.shape
    d = sd["wte.weight"].shape[1]
    hd = d // n_head
    n_layer = sum(1 for k in sd if k.endswith(".ln_1.weight"))

    def ln(x, name):
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + 1e-5) * sd[name + ".weight"] + sd[name + ".bias"]

    def conv1d(x, name):
        return x @ sd[name + ".weight"] + sd[name + ".bias"]

    def gelu(x):
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))

    causal = torch.ones(T, T, dtype=torch.bool).tril()
    x = sd["wte.weight"][idx] + sd["wpe.weight"][:T]
    for i in range(n_layer):
        p = f"h.{i}."
        q, k, v = conv1d(ln(x, p + "ln_1"), p + "attn.c_attn").split(d, dim=-1)
        q, k, v = (t.view(B, T, n_head, hd).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-1, -2) / math.sqrt(hd)).masked_fill(~causal, float("-inf")).softmax(-1)
        y = (att @ v).transpose(1, 2).reshape(B, T, d)
        x = x + conv1d(y, p + "attn.c_proj")
        x = x + conv1d(gelu(conv1d(ln(x, p + "ln_2"), p + "mlp.c_fc")), p + "mlp.c_proj")
    x = ln(x, "ln_f")
    return x @ (sd["wte.weight"] if head is None else head.double()).T


def reference_greedy(sd, n_head, idx, n, head=None):
    for _ in range(n):
        nxt = reference_logits(sd, n_head, idx, head)[:, -1].argmax(-1, keepdim=True)
        idx = torch.cat([idx, nxt], dim=1)
    return idx


IDX = torch.tensor([[5, 17, 3, 99, 42, 0, 7, 64], [1, 2, 3, 4, 5, 6, 7, 8]])


# ---------------------------------------------------------------------------------------------------------------
# Loading matches the reference
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prefix,masks,lm_head", [(False, False, False), (True, True, True), (True, False, False),
                                                  (False, True, True)])
def test_logits_and_greedy_text_match_reference(tmp_path, prefix, masks, lm_head):
    sd = published_tensors(prefix=prefix, masks=masks, lm_head=lm_head)
    model = checkpoints.load_hf_checkpoint(write_published(tmp_path / "m", sd)).eval()
    assert model.out_head.weight is model.tok_emb.weight  # tied, as GPT-2 is
    with torch.no_grad():
        ours = model(IDX)
    ref = reference_logits(sd, PUBLISHED["n_head"], IDX)
    assert ref.abs().max() > 1  # logits of a useful size, so 1e-4 means something
    assert (ours.double() - ref).abs().max() < 1e-4
    prompt = IDX[:1, :4]
    assert torch.equal(M.generate(model, prompt, 12, temperature=0.0),
                       reference_greedy(sd, PUBLISHED["n_head"], prompt, 12))


def test_half_precision_files_load_as_float32(tmp_path):
    for dtype in (torch.bfloat16, torch.float16):
        sd = published_tensors(dtype=dtype)
        model = checkpoints.load_hf_checkpoint(write_published(tmp_path / str(dtype), sd) / "model.safetensors")
        assert model.tok_emb.weight.dtype == torch.float32
        with torch.no_grad():
            assert (model(IDX).double() - reference_logits(sd, PUBLISHED["n_head"], IDX)).abs().max() < 1e-4


def test_untied_lm_head_is_used(tmp_path):
    sd = published_tensors(lm_head=True)
    sd["lm_head.weight"] = torch.randn_like(sd["lm_head.weight"])
    model = checkpoints.load_hf_checkpoint(write_published(tmp_path / "m", sd, tie_word_embeddings=False))
    assert model.out_head.weight is not model.tok_emb.weight
    with torch.no_grad():
        ref = reference_logits(sd, PUBLISHED["n_head"], IDX, head=sd["lm_head.weight"])
        assert (model(IDX).double() - ref).abs().max() < 1e-4
    os.remove(tmp_path / "m" / "config.json")  # without config.json, a head that differs from wte is kept too
    model = checkpoints.load_hf_checkpoint(tmp_path / "m", n_heads=PUBLISHED["n_head"])
    assert torch.equal(model.out_head.weight, sd["lm_head.weight"])


def test_config_from_shapes_needs_n_heads_for_odd_widths(tmp_path):
    sd = published_tensors(prefix=True)
    folder = write_published(tmp_path / "m", sd, config=False)
    with pytest.raises(M.CheckpointError, match="n_heads"):
        checkpoints.load_hf_checkpoint(folder)
    model = checkpoints.load_hf_checkpoint(folder, drop_rate=0.1, n_heads=PUBLISHED["n_head"])
    assert model.cfg["n_layers"] == 2 and model.cfg["context_length"] == 32 and model.cfg["drop_rate"] == 0.1
    with torch.no_grad():
        assert (model.eval()(IDX).double() - reference_logits(sd, PUBLISHED["n_head"], IDX)).abs().max() < 1e-4


def test_matches_transformers_if_installed(tmp_path, transformers):
    sd = published_tensors()
    folder = write_published(tmp_path / "m", sd)
    hf = transformers.GPT2LMHeadModel.from_pretrained(str(folder)).eval()
    model = checkpoints.load_hf_checkpoint(folder).eval()
    with torch.no_grad():
        assert (model(IDX) - hf(IDX).logits).abs().max() < 1e-4
    pth = M.save_checkpoint(str(tmp_path / "model.pth"), model)
    hf = transformers.GPT2LMHeadModel.from_pretrained(load_gpt2.export_hf(pth, str(tmp_path / "exported"))).eval()
    with torch.no_grad():
        assert (model(IDX) - hf(IDX).logits).abs().max() < 1e-4


# ---------------------------------------------------------------------------------------------------------------
# The safetensors reader: bad files get one clear message each
# ---------------------------------------------------------------------------------------------------------------

def raw_safetensors(path, header, data=b"", header_len=None):
    blob = json.dumps(header).encode() if not isinstance(header, bytes) else header
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob) if header_len is None else header_len) + blob + data)
    return path


def entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


@pytest.mark.parametrize("header,data,header_len,message", [
    ({"a": entry()}, b"\0" * 8, 1 << 40, "limit"),
    ({"a": entry()}, b"\0" * 8, 500, "past the end of the file"),
    ({"a": entry(offsets=(0, 8))}, b"\0" * 5, None, "truncated"),
    ({"a": entry(offsets=(8, 16))}, b"\0" * 8, None, "ends at data byte 16"),
    ({"a": entry(), "b": entry(offsets=(4, 12))}, b"\0" * 12, None, "overlap"),
    ({"a": entry(offsets=(8, 0))}, b"\0" * 8, None, "out of order"),
    ({"a": entry(dtype="F8_E4M3")}, b"\0" * 8, None, "dtype 'F8_E4M3'"),
    ({"a": entry(shape=(3,))}, b"\0" * 12, None, "needs 12 bytes"),
    ({"a": entry(shape=(-1,))}, b"\0" * 12, None, "shape"),
    (b"{not json", b"", None, "not valid JSON"),
    (b"[1, 2]", b"", None, "not an object"),
    (b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "a": {}}', b"\0" * 8, None, "twice"),
])
def test_reader_refuses_corrupt_files(tmp_path, header, data, header_len, message):
    path = raw_safetensors(str(tmp_path / "bad.safetensors"), header, data, header_len)
    with pytest.raises(M.CheckpointError, match=message) as e:
        checkpoints.read_safetensors(path)
    assert "\n" not in str(e.value) and path in str(e.value)


def test_reader_refuses_short_and_cut_files(tmp_path):
    good = write_published(tmp_path / "m", published_tensors()) / "model.safetensors"
    raw = good.read_bytes()
    cut = tmp_path / "cut.safetensors"
    for n in (0, 5, 20, len(raw) - 10):
        cut.write_bytes(raw[:n])
        with pytest.raises(M.CheckpointError, match="truncated"):
            checkpoints.load_hf_checkpoint(str(cut))


def test_reader_round_trips_dtypes_and_metadata(tmp_path):
    tensors = {"f32": torch.randn(3, 4), "bf16": torch.randn(5).bfloat16(), "f16": torch.randn(2, 2).half(),
               "i64": torch.arange(7), "bool": torch.tensor([True, False]), "scalar": torch.tensor(2.5),
               "empty": torch.zeros(0, 3), "t": torch.randn(4, 3).t()}
    path = checkpoints.write_safetensors(str(tmp_path / "x.safetensors"), tensors, {"format": "pt"})
    back = checkpoints.read_safetensors(path)
    assert set(back) == set(tensors)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    assert checkpoints.SafetensorsFile(path).metadata == {"format": "pt"}
    # a header whose length is not a multiple of 8 leaves the data unaligned: still read correctly
    raw_safetensors(str(tmp_path / "u.safetensors"), b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}',
                    struct.pack("<2f", 1.5, -2.0))
    assert checkpoints.read_safetensors(str(tmp_path / "u.safetensors"))["a"].tolist() == [1.5, -2.0]


def test_missing_and_unexpected_tensors_are_named(tmp_path):
    sd = published_tensors()
    del sd["h.1.mlp.c_fc.bias"]
    sd["h.0.attn.rotary"] = torch.zeros(3)
    with pytest.raises(M.CheckpointError, match=r"missing h\.1\.mlp\.c_fc\.bias.*unexpected h\.0\.attn\.rotary"):
        checkpoints.load_hf_checkpoint(write_published(tmp_path / "a", sd))
    sd = published_tensors(n_layer=3)  # a layer more than config.json says
    with pytest.raises(M.CheckpointError, match=r"n_layers 2 \(the tensors: 3\)"):
        checkpoints.load_hf_checkpoint(write_published(tmp_path / "b", sd, n_layer=2))
    sd = published_tensors()
    with pytest.raises(M.CheckpointError, match=r"missing lm_head\.weight"):
        checkpoints.load_hf_checkpoint(write_published(tmp_path / "c", sd, tie_word_embeddings=False))


def test_shapes_that_contradict_config_json(tmp_path):
    folder = write_published(tmp_path / "m", published_tensors(), vocab_size=100)
    with pytest.raises(M.CheckpointError, match=r"vocab_size 100 \(the tensors: 101\)"):
        checkpoints.load_hf_checkpoint(folder)
    folder = write_published(tmp_path / "n", published_tensors(), activation_function="relu")
    with pytest.raises(M.CheckpointError, match="activation_function"):
        checkpoints.load_hf_checkpoint(folder)
    sd = published_tensors()
    sd["h.0.ln_1.weight"] = torch.zeros(4, dtype=torch.int32)
    with pytest.raises(M.CheckpointError, match=r"h\.0\.ln_1\.weight is \[4\]"):
        checkpoints.load_hf_checkpoint(write_published(tmp_path / "o", sd))


# ---------------------------------------------------------------------------------------------------------------
# Command line and --init
# ---------------------------------------------------------------------------------------------------------------

def test_cli_unknown_model_is_one_line_and_exit_1(tmp_path):
    r = run_script("load_gpt2.py", "--model", "gpt3", "--models_dir", str(tmp_path), cwd=tmp_path, timeout=120)
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and "gpt2-medium" in r.stderr and "gpt2-xl" in r.stderr, r.stderr
    assert os.listdir(tmp_path) == []


def test_main_converts_a_local_folder_to_pth(tmp_path):
    sd = published_tensors(prefix=True, masks=True)
    folder = write_published(tmp_path / "m", sd)
    out = load_gpt2.main(["--model", str(folder), "--out", str(tmp_path / "tiny.pth")])
    model, ckpt = M.load_model(out)
    assert ckpt["kind"] == "pretrained" and ckpt["config"]["qkv_bias"]
    with torch.no_grad():
        assert (model.eval()(IDX).double() - reference_logits(sd, PUBLISHED["n_head"], IDX)).abs().max() < 1e-4


def test_init_model_sources(tmp_path):
    model, info = checkpoints.init_model("scratch", {"vocab_size": 101, "context_length": 16, "emb_dim": 32,
                                                   "n_layers": 1, "n_heads": 4})
    assert model.cfg["context_length"] == 16 and info["checkpoint"] is None
    pth = M.save_checkpoint(str(tmp_path / "s.pth"), model, kind="pretrain", step=3)
    again, info = checkpoints.init_model(pth)
    assert info["kind"] == "pretrain" and info["checkpoint"]["step"] == 3
    assert torch.equal(again.tok_emb.weight, model.tok_emb.weight)
    folder = write_published(tmp_path / "m", published_tensors())
    hf, info = checkpoints.init_model(str(folder), {"drop_rate": 0.2})
    assert hf.cfg["drop_rate"] == 0.2 and info["kind"] == "pretrained"
    with pytest.raises(settings.UserError, match="context_length=16"):
        checkpoints.init_model(str(folder), {"context_length": 16})
    with pytest.raises(settings.UserError, match="gpt2-medium.*scratch"):
        checkpoints.init_model("gpt-2")
    with pytest.raises(settings.UserError, match="no checkpoint"):
        checkpoints.init_model(str(tmp_path / "nope.pth"))


# ---------------------------------------------------------------------------------------------------------------
# Downloads from a hub on 127.0.0.1
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture
def hub(tmp_path, serve):
    """A hub serving a published-layout checkpoint: (URL, its tensors, its model.safetensors bytes, the URL path
    of its folder, the server's handler class with its request `log` and `etags`)."""
    sd = published_tensors()
    folder = write_published(tmp_path / "served", sd)
    st, cj = (folder / "model.safetensors").read_bytes(), (folder / "config.json").read_bytes()
    base = "/openai-community/gpt2/resolve/main/"
    url, handler = serve(files={base + "model.safetensors": st, base + "config.json": cj},
                         etags={base + "model.safetensors": hashlib.sha256(st).hexdigest()})
    return url, sd, st, base, handler


def test_download_resumes_verifies_and_rechecks_cheaply(tmp_path, hub):
    url, sd, st_bytes, base, handler = hub
    models = tmp_path / "models"
    (models / "gpt2").mkdir(parents=True)
    (models / "gpt2" / "model.safetensors.part").write_bytes(st_bytes[:1000])  # an interrupted download
    model = load_gpt2.load_gpt2("gpt2", str(models), hub_url=url, progress=False)
    assert ("GET", base + "model.safetensors", "bytes=1000-") in handler.log
    st = models / "gpt2" / "model.safetensors"
    assert st.read_bytes() == st_bytes and not os.path.exists(str(st) + ".part")
    record = json.loads((models / "gpt2" / "model.safetensors.sha256").read_text())
    assert record["sha256"] == hashlib.sha256(st_bytes).hexdigest()
    with torch.no_grad():
        assert (model.eval()(IDX).double() - reference_logits(sd, PUBLISHED["n_head"], IDX)).abs().max() < 1e-4
    # later loads need no network: size and mtime match the record
    load_gpt2.load_gpt2("gpt2", str(models), hub_url=dead_url())
    os.utime(st, ns=(1, 1))  # same bytes, new mtime: re-hashed, accepted
    load_gpt2.load_gpt2("gpt2", str(models), hub_url=dead_url())
    raw = bytearray(st_bytes)
    raw[-1] ^= 1  # same size, one bit changed
    st.write_bytes(bytes(raw))
    with pytest.raises(M.CheckpointError, match="changed since it was verified"):
        load_gpt2.load_gpt2("gpt2", str(models), hub_url=dead_url())
    # the command line writes the .pth with the published size in its name
    os.remove(st)
    out = load_gpt2.main(["--model", "gpt2", "--models_dir", str(models), "--hub_url", url])
    assert out == os.path.join(str(models), "gpt2-124M.pth") and M.load_model(out)[1]["kind"] == "pretrained"


def test_download_refuses_a_checksum_mismatch(tmp_path, hub):
    url, _, _, base, handler = hub
    handler.etags[base + "model.safetensors"] = "0" * 64
    with pytest.raises(data.DownloadError, match="checksum mismatch"):
        load_gpt2.load_gpt2("gpt2", str(tmp_path / "models"), hub_url=url, progress=False)
    assert sorted(os.listdir(tmp_path / "models" / "gpt2")) == ["config.json"]


def test_offline_names_url_and_where_to_put_files(tmp_path):
    url = dead_url()
    with pytest.raises(data.DownloadError) as e:
        load_gpt2.load_gpt2("gpt2", str(tmp_path / "models"), hub_url=url)
    msg = str(e.value)
    assert f"{url}/openai-community/gpt2/resolve/main/model.safetensors" in msg and "config.json" in msg
    assert os.path.join(str(tmp_path / "models"), "gpt2") in msg and "\n" not in msg
    assert not os.path.exists(tmp_path / "models" / "gpt2" / "model.safetensors")
    with pytest.raises(settings.UserError, match="gpt2-large"):
        load_gpt2.load_gpt2("gpt2-small", str(tmp_path / "models"))


# ---------------------------------------------------------------------------------------------------------------
# Export to Hugging Face: the weights
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("qkv_bias,tie", [(True, True), (False, False)])
def test_export_round_trip(tmp_path, qkv_bias, tie):
    model = tiny_model(vocab_size=101, n_heads=4, qkv_bias=qkv_bias, tie_weights=tie)
    pth = M.save_checkpoint(str(tmp_path / "model.pth"), model, kind="pretrain")
    out = tmp_path / "hf"
    assert load_gpt2.main(["--export", pth, "--out", str(out)]) == str(out)
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    back = checkpoints.load_hf_checkpoint(out).eval()
    with torch.no_grad():
        assert torch.equal(back(IDX), model(IDX))
        published = checkpoints.read_safetensors(str(out / "model.safetensors"))
        assert ("lm_head.weight" in published) == (not tie)
        head = published.get("lm_head.weight")
        # the exported file, read the way GPT-2 reads it
        ref = reference_logits(published, PUBLISHED["n_head"], IDX, head)
        assert (model(IDX).double() - ref).abs().max() < 1e-4
    assert checkpoints.SafetensorsFile(str(out / "model.safetensors")).metadata == {"format": "pt"}


def test_export_of_an_int8_model_dequantizes(tmp_path):
    model = tiny_model(vocab_size=101, n_heads=4, n_layers=1, qkv_bias=True)
    layers.quantize_int8(model)
    pth = M.save_checkpoint(str(tmp_path / "int8.pth"), model)
    back = checkpoints.load_hf_checkpoint(load_gpt2.export_hf(pth, str(tmp_path / "hf"))).eval()
    # 3 x 8 = 24 rows: above Int8Linear.FEW_ROWS, so the int8 model takes its float path (the few-row decoding
    # kernel rounds activations to bf16, which would blur the comparison)
    idx = torch.cat([IDX, IDX.flip(1)])
    assert idx.numel() > model.out_head.FEW_ROWS
    with torch.no_grad():
        assert (back(idx) - model(idx)).abs().max() < 1e-4


def test_export_refuses_a_folder_that_is_not_empty(tmp_path):
    model = M.GPTModel(tiny_cfg(vocab_size=101, n_heads=4, n_layers=1, qkv_bias=True))
    pth = M.save_checkpoint(str(tmp_path / "model.pth"), model)
    out = tmp_path / "hf"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(settings.UserError, match="not empty.*--force"):
        load_gpt2.main(["--export", pth, "--out", str(out)])
    assert sorted(os.listdir(out)) == ["notes.txt"]
    load_gpt2.main(["--export", pth, "--out", str(out), "--force"])
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "notes.txt"]
    with pytest.raises(settings.UserError, match="--out"):
        load_gpt2.export_hf(pth, "")


# ---------------------------------------------------------------------------------------------------------------
# Export to Hugging Face: the tokenizer files (tiktoken's cache, the rebuild from tiktoken's ranks, AutoTokenizer's
# ids), a language model through pipeline("text-generation"), the chat template
# ---------------------------------------------------------------------------------------------------------------

TEXTS = ["Hello world", "  leading spaces   and\t\ttabs\n\n\nnewlines   ", "naïve café — 日本語 🤖 emoji",
         "a<|endoftext|>b", "<|endoftext|>", "x <|endoftext|> y", "It's they're we'll I'd", "1234567 3.14159",
         "\u00a0nbsp\u200bzero-width", " ", "trailing \n", "\r\n\r\n", "<|endoftext", "ĠġĊ already-mapped chars",
         "spaces before , . ? ! and 's n't stay"]  # the last: decoding must not "clean up" spaces


CONVERSATIONS = [
    [{"role": "user", "content": "Name a colour."}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
     {"role": "user", "content": "Say {{ braces }} and 'quotes' and \"more\"\nover two lines."}],
    [{"role": "system", "content": "Translate to German."}, {"role": "user", "content": "good morning"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a"},
     {"role": "assistant", "content": "b"}, {"role": "user", "content": "日本語"}],
    [{"role": "user", "content": "q"}, {"role": "assistant", "content": "the last reply, learned"}],
    [{"role": "system", "content": ""}, {"role": "user", "content": "an empty system text counts as none"}],
]


@pytest.fixture(scope="module")
def lm_export(tmp_path_factory):
    """(folder, model): a tiny language model exported with tokenizer files."""
    tmp = tmp_path_factory.mktemp("lm")
    model = tiny_model(qkv_bias=True, tie_weights=True)
    pth = M.save_checkpoint(str(tmp / "model.pth"), model, kind="pretrain")
    return load_gpt2.export_hf(pth, str(tmp / "hf")), model


@pytest.fixture(scope="module")
def lm_tokenizer(lm_export, transformers):
    return transformers.AutoTokenizer.from_pretrained(lm_export[0])


def test_tiktoken_cache_dir_is_found_as_tiktoken_finds_it(monkeypatch, tmp_path):
    monkeypatch.delenv("TIKTOKEN_CACHE_DIR", raising=False)
    monkeypatch.setenv("DATA_GYM_CACHE_DIR", str(tmp_path))
    assert load_gpt2.tiktoken_cache_dir() == str(tmp_path)
    monkeypatch.delenv("DATA_GYM_CACHE_DIR")
    assert load_gpt2.tiktoken_cache_dir().endswith("data-gym-cache")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")
    assert load_gpt2.tiktoken_cache_dir() is None  # tiktoken's "caching off"


def test_export_writes_the_tokenizer_files_from_tiktokens_cache(lm_export):
    folder, _ = lm_export
    assert sorted(os.listdir(folder)) == ["config.json", "generation_config.json", "merges.txt", "model.safetensors",
                                          "special_tokens_map.json", "tokenizer_config.json", "vocab.json"]
    cache = os.environ["TIKTOKEN_CACHE_DIR"]
    for name, (url, sha) in load_gpt2.GPT2_BPE_FILES.items():
        with open(os.path.join(folder, name), "rb") as f, \
                open(os.path.join(cache, hashlib.sha1(url.encode()).hexdigest()), "rb") as g:
            assert f.read() == g.read()
    vocab = read_json(os.path.join(folder, "vocab.json"))
    assert len(vocab) == 50257 and vocab["<|endoftext|>"] == data.EOT_ID and vocab["Ġthe"] == 262
    with open(os.path.join(folder, "merges.txt"), encoding="utf-8") as f:
        merges = f.read().split("\n")
    assert merges[0].startswith("#version") and merges[1] == "Ġ t" and len(merges) == 50002


def test_the_files_rebuilt_from_tiktokens_ranks_equal_gpt2s(monkeypatch, tmp_path):
    cached = load_gpt2.gpt2_bpe_files()
    data.get_tokenizer()  # loaded once while the cache is there; the rebuild reads its ranks
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))  # an empty cache
    rebuilt = load_gpt2.gpt2_bpe_files()
    assert rebuilt != cached  # not read from the cache (formatting differs)...
    assert json.loads(rebuilt["vocab.json"]) == json.loads(cached["vocab.json"])  # ...but the same content
    assert rebuilt["merges.txt"].decode().split("\n") == cached["merges.txt"].decode().split("\n")


def test_no_cache_and_no_tiktoken_is_one_clear_line(monkeypatch, tmp_path):
    import tiktoken

    def offline(name):
        raise ConnectionError("no network")

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(data, "_TOKENIZER", None)
    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(settings.UserError, match="TIKTOKEN_CACHE_DIR") as e:
        load_gpt2.gpt2_bpe_files()
    assert "\n" not in str(e.value)
    with pytest.raises(settings.UserError) as e:
        data.get_tokenizer()
    message = str(e.value)  # the two files, where they come from, and the folder to put them in
    for url, name in data.TOKENIZER_FILES.items():
        assert url in message and name in message
    assert f"into {tmp_path}" in message and "TIKTOKEN_CACHE_DIR" in message


def test_autotokenizer_ids_equal_tiktokens(lm_tokenizer):
    tok, enc = lm_tokenizer, data.get_tokenizer()
    for text in TEXTS:
        ids = enc.encode(text, allowed_special={"<|endoftext|>"})
        assert tok(text)["input_ids"] == ids, text
        assert tok.decode(ids) == enc.decode(ids), text
    assert tok.eos_token == tok.bos_token == tok.unk_token == tok.pad_token == "<|endoftext|>"
    assert tok.eos_token_id == data.EOT_ID and tok.model_max_length == TINY["context_length"]


def test_pipeline_greedy_text_equals_ours(lm_export, transformers):
    folder, model = lm_export
    gen = read_json(os.path.join(folder, "generation_config.json"))
    assert gen["eos_token_id"] == gen["bos_token_id"] == gen["pad_token_id"] == data.EOT_ID and gen["do_sample"]
    prompt = "Every effort moves you"
    ids = data.text_to_token_ids(prompt)
    ours = M.generate(model, ids, 12, temperature=0.0)
    assert data.EOT_ID not in ours[0, ids.shape[1]:].tolist()  # else transformers would stop early
    pipe = transformers.pipeline("text-generation", model=folder, device="cpu")
    out = pipe(prompt, do_sample=False, max_new_tokens=12)[0]["generated_text"]
    assert out == data.token_ids_to_text(ours) and len(out) > len(prompt)


def test_a_toy_vocabulary_exports_no_tokenizer(tmp_path):
    pth = M.save_checkpoint(str(tmp_path / "toy.pth"), tiny_model(qkv_bias=True, vocab_size=101))
    assert sorted(os.listdir(load_gpt2.export_hf(pth, str(tmp_path / "hf")))) == ["config.json", "model.safetensors"]


def test_chat_template_gives_format_conversation(tmp_path, lm_tokenizer, transformers):
    pth = M.save_checkpoint(str(tmp_path / "chat.pth"), tiny_model(qkv_bias=True), kind="chat", template="alpaca")
    folder = load_gpt2.export_hf(pth, str(tmp_path / "hf"))
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    for messages in CONVERSATIONS:
        want = data.format_conversation(messages)
        for gen_prompt in (True, False):
            assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen_prompt) == want
    assert tok.apply_chat_template(CONVERSATIONS[0], tokenize=False).endswith(data.RESPONSE_HEADER)
    with pytest.raises(Exception, match="user or assistant"):
        tok.apply_chat_template([{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}],
                                tokenize=False)
    assert lm_tokenizer.chat_template is None  # a language model gets no template


def test_an_unknown_chat_template_is_refused(tmp_path):
    pth = M.save_checkpoint(str(tmp_path / "chat.pth"), tiny_model(qkv_bias=True), kind="chat", template="chatml")
    with pytest.raises(settings.UserError, match="chatml"):
        load_gpt2.export_hf(pth, str(tmp_path / "hf"))
    assert not os.path.exists(tmp_path / "hf")


# ---------------------------------------------------------------------------------------------------------------
# Export to Hugging Face: classifiers as GPT2ForSequenceClassification, and back
# ---------------------------------------------------------------------------------------------------------------

CLASS_NAMES = ["ham", "spam", "eggs"]


CLS_TEXTS = ["Win a free cruise now!!!", "see you at lunch", "naïve café 🤖", "short",
             "a much longer text that runs past the sixteen tokens the classifier reads, so it is cut there " * 2]


def biased_classifier(seed=0, num_classes=3, lora=False):
    """tiny_classifier (with qkv biases) whose head has a bias far from zero, so that losing it shows; lora: with an
    adapter that changes the weights, as a trained one does."""
    model = tiny_classifier(num_classes, seed, qkv_bias=True)
    with torch.no_grad():
        model.out_head.bias.copy_(torch.linspace(-2.0, 2.0, num_classes))
    if lora:
        layers.add_lora(model.trf_blocks, rank=2, alpha=4.0)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(".B"):
                    p.normal_(0, 0.2)  # a trained adapter: merging it changes the weights
    return model.eval()


def save_classifier(path, model, class_names=CLASS_NAMES, lora=None):
    return M.save_checkpoint(str(path), model, kind="cls", class_names=list(class_names), max_length=16,
                             pad_id=data.EOT_ID, lora=lora)


def our_probabilities(pth, texts):
    model, ckpt = checkpoints.load_classifier(pth)
    rows = finetune_cls.classify_texts(model, ckpt, texts, torch.device("cpu"), torch.float32)
    return torch.tensor([[probs[n] for n in ckpt["class_names"]] for _, _, probs in rows])


def hf_probabilities(transformers, folder, texts):
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    batch = tok(texts, padding=True, truncation=True, return_tensors="pt")
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        return hf(**batch).logits.softmax(-1)


@pytest.mark.parametrize("lora", [False, True])
def test_classifier_probabilities_match_transformers(tmp_path, lora, transformers):
    model = biased_classifier(lora=lora)
    adapters = {"rank": 2, "alpha": 4.0} if lora else None
    pth = save_classifier(tmp_path / "cls.pth", model, lora=adapters)
    folder = load_gpt2.export_hf(pth, str(tmp_path / "hf"))
    config = read_json(os.path.join(folder, "config.json"))
    assert config["architectures"] == ["GPT2ForSequenceClassification"] and config["num_labels"] == 3
    assert config["id2label"] == {"0": "ham", "1": "spam", "2": "eggs"} and config["label2id"]["eggs"] == 2
    assert config["pad_token_id"] == data.EOT_ID
    assert "generation_config.json" not in os.listdir(folder)
    ours = our_probabilities(pth, CLS_TEXTS)
    assert (hf_probabilities(transformers, folder, CLS_TEXTS) - ours).abs().max() < 1e-4
    with torch.no_grad():  # the test can fail: without its bias the classifier gives other probabilities
        model.out_head.bias.zero_()
    unbiased = our_probabilities(save_classifier(tmp_path / "unbiased.pth", model, lora=adapters), CLS_TEXTS)
    assert (unbiased - ours).abs().max() > 1e-2


def test_a_classifier_trained_by_finetune_cls_matches_transformers(tmp_path, transformers):
    rows = [(f"WIN a free prize number {i} now!" + " Call today." * (i % 3), "spam") for i in range(8)] + \
           [(f"See you at {i} for lunch" + ", ok?" * (i % 4), "ham") for i in range(8)] + \
           [(f"{i} eggs, scrambled" + " please" * (i % 2), "eggs") for i in range(8)]
    csv_path = finetune_cls.write_labelled_csv(str(tmp_path / "texts.csv"), rows)
    out = str(tmp_path / "run")
    finetune_cls.main(cls_flags(csv=csv_path, trainable="lora", lora_rank=2, max_length=16, lr="1e-2", epochs=1,
                                max_steps=4, batch_size=4, out_dir=out))
    pth = os.path.join(out, finetune_cls.CSV_CLASSIFIER)
    assert M.read_checkpoint(pth)["lora"]  # adapters in the file: the export merges them
    folder = load_gpt2.export_hf(pth, str(tmp_path / "hf"))
    texts = [text for text, _ in rows] + CLS_TEXTS
    assert (hf_probabilities(transformers, folder, texts) - our_probabilities(pth, texts)).abs().max() < 1e-4


def test_classifier_round_trip(tmp_path):
    pth = save_classifier(tmp_path / "cls.pth", biased_classifier(seed=1))
    folder = load_gpt2.export_hf(pth, str(tmp_path / "hf"))
    back = str(tmp_path / "back.pth")
    assert load_gpt2.main(["--model", folder, "--out", back]) == back
    ckpt = M.read_checkpoint(back)
    assert ckpt["kind"] == "cls" and ckpt["class_names"] == CLASS_NAMES and ckpt["max_length"] == 16
    assert ckpt["pad_id"] == data.EOT_ID and not ckpt["model"]["out_head.bias"].any()  # the bias now lives in ln_f
    assert (our_probabilities(back, CLS_TEXTS) - our_probabilities(pth, CLS_TEXTS)).abs().max() < 1e-5
    model, extras = checkpoints.load_hf_classifier(folder)
    assert extras == {"class_names": CLASS_NAMES, "max_length": 16, "pad_id": data.EOT_ID}
    assert model.out_head.weight.shape == (3, TINY["emb_dim"])


def test_a_classifier_folder_is_not_a_language_model(tmp_path):
    folder = load_gpt2.export_hf(save_classifier(tmp_path / "cls.pth", biased_classifier()), str(tmp_path / "hf"))
    with pytest.raises(M.CheckpointError, match="is a classifier.*--model"):
        checkpoints.load_hf_checkpoint(folder)
    with pytest.raises(M.CheckpointError, match="is a classifier"):
        checkpoints.init_model(folder)
    lm = load_gpt2.export_hf(M.save_checkpoint(str(tmp_path / "lm.pth"), tiny_model(qkv_bias=True)),
                             str(tmp_path / "lm"))
    with pytest.raises(M.CheckpointError, match="not a GPT2ForSequenceClassification"):
        checkpoints.load_hf_classifier(lm)


def test_a_bias_that_cannot_be_folded_is_refused(tmp_path, transformers):
    model = biased_classifier(num_classes=40)  # more classes than emb_dim 32: the rows cannot all be independent
    with pytest.raises(settings.UserError, match="cannot move into ln_f"):
        load_gpt2.export_hf(save_classifier(tmp_path / "cls.pth", model, [f"c{i}" for i in range(40)]),
                            str(tmp_path / "hf"))
    assert not os.path.exists(tmp_path / "hf")
    with torch.no_grad():
        model.out_head.bias.zero_()  # no bias: nothing to fold, any number of classes exports
    pth = save_classifier(tmp_path / "zero.pth", model, [f"c{i}" for i in range(40)])
    folder = load_gpt2.export_hf(pth, str(tmp_path / "zero"))
    assert (hf_probabilities(transformers, folder, CLS_TEXTS) - our_probabilities(pth, CLS_TEXTS)).abs().max() < 1e-4


# ===============================================================================================================
# 5. Classification: finetune_cls.py
# ===============================================================================================================

def csv_rows(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def write_lines(tmp_path, texts):
    path = tmp_path / "texts.txt"
    path.write_text("\n".join(texts) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def small_csv(tmp_path_factory):
    """60 real SMS texts, 30 per class, as a CSV with the default columns."""
    if not os.path.isfile(SMS_FILE):
        pytest.skip("../shared/data/SMSSpamCollection not present")
    rows = finetune_cls.read_sms_spam(SMS_FILE)
    picked = [r for r in rows if r[1] == "spam"][:30] + [r for r in rows if r[1] == "ham"][:30]
    return write_csv(tmp_path_factory.mktemp("csv") / "small.csv", [(label, text) for text, label in picked])


@pytest.fixture(scope="module")
def small_run(small_csv, tmp_path_factory):
    """A tiny classifier trained for one epoch on small_csv: (summary, out_dir)."""
    out = str(tmp_path_factory.mktemp("small_run"))
    return finetune_cls.main(cls_flags() + ["--csv", small_csv, "--epochs", "1", "--out_dir", out]), out


# ---------------------------------------------------------------------------------------------------------------
# Data: balancing, split, padding, CSV problems, the download
# ---------------------------------------------------------------------------------------------------------------

@needs_sms
def test_balancing_and_split_sizes_are_exact():
    rows = finetune_cls.read_sms_spam(SMS_FILE)
    assert len(rows) == 5574 and sum(label == "spam" for _, label in rows) == 747
    balanced = finetune_cls.balance_classes(rows, seed=123)
    assert len(balanced) == 1494
    assert sum(label == "ham" for _, label in balanced) == 747 == sum(label == "spam" for _, label in balanced)
    assert len({id(row) for row in balanced}) == len(balanced)  # each row at most once (the texts repeat)
    train, val, test = finetune_cls.split_rows(balanced, seed=123)
    assert (len(train), len(val), len(test)) == (1045, 149, 300)
    assert sorted(train + val + test) == sorted(balanced)
    assert finetune_cls.split_rows(balanced, seed=123) == (train, val, test)  # the seed fixes the split
    assert finetune_cls.balance_classes(rows, seed=7) != balanced


def test_last_real_token_is_read_past_the_padding():
    texts = ["Hi", "Free entry in 2 a wkly comp to win FA Cup final tkts", "ok <|endoftext|> then"]
    ds = finetune_cls.ClassificationDataset(texts, [0, 1, 0])
    tok = data.get_tokenizer()
    lengths = [len(tok.encode_ordinary(t)) for t in texts]
    assert ds.lengths.tolist() == lengths and ds.max_length == max(lengths)
    for i, n in enumerate(lengths):
        assert (ds.input_ids[i, n:] == data.EOT_ID).all()
        assert (ds.input_ids[i, :n] != data.EOT_ID).all()  # "<|endoftext|>" inside a text is plain text
    model = tiny_classifier()
    with torch.no_grad():
        batched = finetune_cls.last_token_logits(model, ds.input_ids, ds.lengths)
        for i, n in enumerate(lengths):
            alone = model(ds.input_ids[i:i + 1, :n])[0, -1]
            assert torch.allclose(batched[i], alone, atol=1e-5)
            padded_last = model(ds.input_ids[i:i + 1])[0, -1]
            if n < ds.max_length:
                assert not torch.allclose(batched[i], padded_last, atol=1e-4)


def test_long_texts_are_cut_and_counted():
    ds = finetune_cls.ClassificationDataset(["one two three four five six", "hi"], [0, 1], max_length=3)
    assert ds.truncated == 1 and ds.lengths.tolist() == [3, 1] and ds.input_ids.shape == (2, 3)


def test_csv_problems_say_what_is_wrong(tmp_path, capsys):
    good = write_csv(tmp_path / "a.csv", [("spam", "win"), ("ham", ""), ("ham", "  "), ("ham", "see you")])
    assert finetune_cls.read_labelled_csv(good) == [("win", "spam"), ("see you", "ham")]
    assert "skipped 2 row(s) with empty 'Text'" in capsys.readouterr().err
    with pytest.raises(settings.UserError, match=r"no column 'review'.*columns found: 'Label', 'Text'"):
        finetune_cls.read_labelled_csv(good, text_column="review")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(settings.UserError, match="is empty"):
        finetune_cls.read_labelled_csv(str(tmp_path / "empty.csv"))
    no_label = write_csv(tmp_path / "b.csv", [("spam", "win"), ("", "who am I")])
    with pytest.raises(settings.UserError, match="line 3 has text but an empty 'Label'"):
        finetune_cls.read_labelled_csv(no_label)
    with pytest.raises(settings.UserError, match="no CSV file"):
        finetune_cls.read_labelled_csv(str(tmp_path / "missing.csv"))
    tsv = tmp_path / "c.tsv"
    tsv.write_text("text\tlabel\nhello there\tpos\n")
    assert finetune_cls.read_labelled_csv(str(tsv), "text", "label") == [("hello there", "pos")]


def test_single_class_and_bad_columns_stop_training(tmp_path):
    one = write_csv(tmp_path / "one.csv", [("ham", f"text {i}") for i in range(20)])
    with pytest.raises(settings.UserError, match="single class .'ham'"):
        finetune_cls.main(cls_flags() + ["--csv", one, "--out_dir", str(tmp_path / "o")])
    with pytest.raises(settings.UserError, match="columns found"):
        finetune_cls.main(cls_flags() + ["--csv", one, "--label_column", "y", "--out_dir", str(tmp_path / "o")])


@needs_sms
def test_sms_download_extracts_and_verifies(tmp_path, serve):
    site = tmp_path / "site"
    site.mkdir()
    with zipfile.ZipFile(site / "sms+spam+collection.zip", "w", zipfile.ZIP_DEFLATED) as z:
        z.write(SMS_FILE, "SMSSpamCollection")
        z.writestr("readme", "the readme")
    url, _ = serve(folder=site)
    path = data.fetch_sms_spam(str(tmp_path / "d"), base_url=url)
    assert data.sha256_of(path) == data.SMS_SPAM_SHA256
    assert os.listdir(tmp_path / "d") == ["SMSSpamCollection"]  # the zip is gone
    (site / "sms+spam+collection.zip").write_bytes(b"PK\x03\x04 this is not a zip at all")
    with pytest.raises(data.DownloadError, match="not a readable zip") as e:
        data.fetch_sms_spam(str(tmp_path / "e"), base_url=url)
    assert "\n" not in str(e.value) and not os.path.exists(tmp_path / "e" / "sms_spam_collection.zip")
    # the command line: one line on stderr, exit 1
    r = run_script("finetune_cls.py", *cls_flags(), "--out_dir", str(tmp_path / "o"), timeout=120,
                   env=dict(GPT2_DATA_URL=url, GPT2_DATA_DIR=str(tmp_path / "f")))
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 1 and last.startswith("error: ") and "not a readable zip" in last
    assert "Traceback" not in r.stderr
    bad = tmp_path / "g"
    bad.mkdir()
    (bad / "SMSSpamCollection").write_text("ham\tchanged\n")
    with pytest.raises(settings.UserError, match="does not match the expected sha256"):
        data.fetch_sms_spam(str(bad))


# ---------------------------------------------------------------------------------------------------------------
# Freezing and LoRA
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", ["head", "last_block", "last_n:2", "lora"])
def test_frozen_parameters_stay_and_trainable_ones_move(spec):
    model = finetune_cls.set_trainable(tiny_classifier(), spec, lora_rank=4, lora_alpha=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected_prefixes = {"head": ["out_head."], "last_block": ["out_head.", "final_norm.", "trf_blocks.1."],
                         "last_n:2": ["out_head.", "final_norm.", "trf_blocks."], "lora": ["out_head."]}[spec]
    for name in trainable:
        assert any(name.startswith(p) for p in expected_prefixes) or (spec == "lora" and name[-2:] in (".A", ".B"))
    model.train()
    opt = trainer.make_optimizer(model, 1e-2, 0.1, torch.device("cpu"))
    ids = torch.randint(0, 50257, (4, 10))
    loss = torch.nn.functional.cross_entropy(
        finetune_cls.last_token_logits(model, ids, torch.tensor([10, 7, 3, 1])), torch.tensor([0, 1, 1, 0]))
    loss.backward()
    opt.step()
    after = model.state_dict()
    params = dict(model.named_parameters())
    for k, v in after.items():
        changed = not torch.equal(before[k], v)
        if k in trainable:
            # B starts at zero and A gets no gradient while B is zero: A moves only through weight decay
            assert changed, f"{k} is trainable but did not change"
        else:
            assert not changed and (k not in params or not params[k].requires_grad), f"frozen {k} changed"
    if spec == "lora":
        assert {k for k in after if "W_query" in k} == {"trf_blocks.0.att.W_query.base.weight",
                                                        "trf_blocks.0.att.W_query.A", "trf_blocks.0.att.W_query.B",
                                                        "trf_blocks.1.att.W_query.base.weight",
                                                        "trf_blocks.1.att.W_query.A", "trf_blocks.1.att.W_query.B"}


def test_lora_starts_equal_and_merges_to_equal_logits():
    model = tiny_classifier()
    ids = torch.randint(0, 50257, (2, 12))
    with torch.no_grad():
        base = model(ids)
        layers.add_lora(model.trf_blocks, rank=4, alpha=8)
        assert torch.equal(model(ids), base)  # B starts at zero
        layer = model.trf_blocks[0].att.W_query
        assert isinstance(layer, layers.LoRALinear) and layer.weight is layer.base.weight and layer.bias is None
        assert layer.A.shape == (4, 32) and layer.B.shape == (32, 4) and layer.scaling == 2.0
        for name, p in model.named_parameters():
            if name.endswith(".B"):
                p.normal_(std=0.1)
        adapted = model(ids)
        assert not torch.allclose(adapted, base, atol=1e-3)
        layers.merge_lora(model)
        assert not any(isinstance(m, layers.LoRALinear) for m in model.modules())
        assert isinstance(model.trf_blocks[0].ff.layers[0], torch.nn.Linear)
        assert torch.allclose(model(ids), adapted, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# End to end: train, predict, evaluate, int8, resume, merge, other datasets, flags, --dry_run
# ---------------------------------------------------------------------------------------------------------------

@needs_sms
def test_tiny_scratch_run_on_sms_beats_chance(tmp_path, monkeypatch):
    os.makedirs(tmp_path / "data")
    shutil.copy(SMS_FILE, tmp_path / "data" / "SMSSpamCollection")
    monkeypatch.setattr(data, "DATA_DIR", str(tmp_path / "data"))
    out = str(tmp_path / "run")
    summary = finetune_cls.main(cls_flags() + ["--out_dir", out, "--lr", "2e-3", "--epochs", "1", "--max_steps", "80"])
    sizes = [len(csv_rows(os.path.join(out, f))) for f in ("train.csv", "validation.csv", "test.csv")]
    assert sizes == [1045, 149, 300]
    assert set(csv_rows(os.path.join(out, "test.csv"))[0]) == {"Label", "Text"}
    assert summary["test"]["accuracy"] > 0.7  # the balanced test split: chance and the majority class are 50 %
    assert sum(map(sum, summary["test"]["confusion"])) == 300
    ckpt = M.read_checkpoint(os.path.join(out, "spam_classifier.pth"))
    assert ckpt["kind"] == "cls" and ckpt["class_names"] == ["ham", "spam"] and ckpt["pad_id"] == 50256
    assert ckpt["max_length"] == 32 and ckpt["model"]["out_head.weight"].shape == (2, 32)
    for f in ("metrics.json", "log.csv"):
        assert os.path.exists(os.path.join(out, f))


@slow
def test_predict_cli_prints_a_label(small_run, tmp_path):
    _, out = small_run
    ckpt = os.path.join(out, "classifier.pth")
    r = run_script("finetune_cls.py", "--predict", "You won a free cruise, call now!", "--checkpoint", ckpt,
                   "--device", "cpu", timeout=120)
    assert r.returncode == 0, r.stderr
    label, prob, text = r.stdout.strip().split("\t")
    assert label in ("ham", "spam") and 0.5 <= float(prob) <= 1 and text == "You won a free cruise, call now!"
    lines = tmp_path / "lines.txt"
    lines.write_text("Call now to claim your prize\n\nsee you at lunch\n" + "word " * 100 + "\n")
    results = finetune_cls.main(["--predict_file", str(lines), "--checkpoint", ckpt, "--device", "cpu"])
    assert len(results) == 3 and all(set(r["probabilities"]) == {"ham", "spam"} for r in results)
    assert all(abs(sum(r["probabilities"].values()) - 1) < 1e-5 for r in results)


def test_evaluate_matches_training_metrics_and_rejects_unknown_labels(small_run, tmp_path):
    summary, out = small_run
    metrics = finetune_cls.main(["--evaluate", "--out_dir", out, "--device", "cpu"])  # OUT_DIR/test.csv
    assert metrics["confusion"] == summary["test"]["confusion"]
    unknown = write_csv(tmp_path / "u.csv", [("ham", "hi"), ("maybe", "hmm"), ("maybe", "well")])
    with pytest.raises(settings.UserError, match=r"'maybe' \(2 rows\).*known: ham, spam"):
        finetune_cls.main(["--evaluate", "--test_csv", unknown, "--out_dir", out, "--device", "cpu"])


def test_int8_classifier_evaluates_predicts_and_saves_smaller(small_run, tmp_path, capsys):
    _, out = small_run
    ckpt = os.path.join(out, "classifier.pth")
    fp32 = finetune_cls.main(["--evaluate", "--out_dir", out, "--device", "cpu"])
    q = finetune_cls.main(["--evaluate", "--out_dir", out, "--device", "cpu", "--quantize", "int8"])
    assert "int8 weights" in capsys.readouterr().out
    # int8 moves each weight by at most half a step: on 60 texts at most a couple of borderline answers may flip
    assert abs(q["accuracy"] - fp32["accuracy"]) <= 2 / 60 and abs(q["loss"] - fp32["loss"]) < 0.05
    small = str(tmp_path / "int8.pth")
    finetune_cls.main(["--save_int8", small, "--checkpoint", ckpt])
    model, saved = finetune_cls.load_classifier(small)
    assert saved["quantize"] == "int8" and saved["class_names"] == ["ham", "spam"]
    assert isinstance(model.out_head, layers.Int8Linear)
    assert isinstance(model.trf_blocks[0].att.W_query, layers.Int8Linear)
    assert finetune_cls.main(["--evaluate", "--out_dir", out, "--checkpoint", small, "--device", "cpu"]) == q
    text = "You won a free cruise, call now!"
    on_the_fly = finetune_cls.main(["--predict", text, "--checkpoint", ckpt, "--quantize", "int8"])
    assert finetune_cls.main(["--predict", text, "--checkpoint", small]) == on_the_fly
    with pytest.raises(SystemExit) as e:
        finetune_cls.main(["--quantize", "int8", "--out_dir", out])
    assert e.value.code == 2 and "--quantize int8 is for --predict" in capsys.readouterr().err
    with pytest.raises(settings.UserError, match="is a classifier"):  # fine-tuning starts from a language model
        finetune_cls.main(["--init", small, "--csv", os.path.join(out, "train.csv"), "--device", "cpu",
                           "--out_dir", str(tmp_path / "o")])


def test_non_classifier_checkpoints_are_refused(small_run, tmp_path):
    path = M.save_checkpoint(str(tmp_path / "model.pth"), M.GPTModel(tiny_cfg()), kind="pretrain")
    with pytest.raises(settings.UserError, match="'pretrain' checkpoint, not a classifier"):
        finetune_cls.main(["--predict", "hello", "--checkpoint", path])
    with pytest.raises(settings.UserError, match="no classifier at"):
        finetune_cls.main(["--predict", "hello", "--checkpoint", str(tmp_path / "none.pth")])
    with pytest.raises(settings.UserError, match="no LoRA adapters"):
        finetune_cls.main(["--merge_lora", "--checkpoint", os.path.join(small_run[1], "classifier.pth")])


def test_init_from_a_pretrain_checkpoint_keeps_frozen_weights(small_csv, tmp_path):
    torch.manual_seed(1)
    path = M.save_checkpoint(str(tmp_path / "model.pth"), M.GPTModel(tiny_cfg()), kind="pretrain")
    out = str(tmp_path / "run")
    finetune_cls.main(["--init", path, "--trainable", "last_block", "--csv", small_csv, "--max_length", "32",
                       "--max_steps", "2", "--out_dir", out, "--device", "cpu", "--eval_iters", "1"])
    start, tuned = M.read_checkpoint(path)["model"], M.read_checkpoint(os.path.join(out, "classifier.pth"))
    assert torch.equal(start["tok_emb.weight"], tuned["model"]["tok_emb.weight"])
    assert torch.equal(start["trf_blocks.0.att.W_query.weight"], tuned["model"]["trf_blocks.0.att.W_query.weight"])
    assert not torch.equal(start["trf_blocks.1.att.W_query.weight"], tuned["model"]["trf_blocks.1.att.W_query.weight"])
    with pytest.raises(SystemExit) as e:  # sizes belong to scratch models only
        finetune_cls.main(["--init", path, "--n_layers", "4"])
    assert e.value.code == 2


def test_cls_resume_equals_an_uninterrupted_run(small_csv, tmp_path):
    flags = cls_flags() + ["--csv", small_csv, "--epochs", "2"]
    whole = str(tmp_path / "whole")
    finetune_cls.main(flags + ["--out_dir", whole])
    parts = str(tmp_path / "parts")
    finetune_cls.main(flags + ["--out_dir", parts, "--max_steps", "3"])
    finetune_cls.main(flags + ["--out_dir", parts, "--resume", "--max_steps", "0"])  # 0: --epochs decides again
    a = M.read_checkpoint(os.path.join(whole, "classifier.pth"))
    b = M.read_checkpoint(os.path.join(parts, "classifier.pth"))
    assert a["step"] == b["step"] == 10  # 42 training texts, batch 8 -> 5 steps per epoch
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_lora_training_and_merge_lora_cli(small_csv, tmp_path):
    out = str(tmp_path / "lora")
    summary = finetune_cls.main(cls_flags() + ["--csv", small_csv, "--trainable", "lora", "--lora_rank", "4",
                                               "--max_steps", "3", "--lr", "1e-2", "--out_dir", out])
    assert summary["trainable_parameters"] < summary["parameters"] / 10
    path = os.path.join(out, "classifier.pth")
    ckpt = M.read_checkpoint(path)
    assert ckpt["lora"] == {"rank": 4, "alpha": 16.0} and any(k.endswith(".B") for k in ckpt["model"])
    merged_path = finetune_cls.main(["--merge_lora", "--checkpoint", path])
    merged = M.read_checkpoint(merged_path)
    assert merged["lora"] is None and not any(k.endswith((".A", ".B")) for k in merged["model"])
    texts = ["Free entry! Text WIN to 80086", "where are you now", "ok"]
    before = finetune_cls.main(["--predict_file", write_lines(tmp_path, texts), "--checkpoint", path,
                                "--dtype", "float32"])
    after = finetune_cls.main(["--predict_file", write_lines(tmp_path, texts), "--checkpoint", merged_path,
                               "--dtype", "float32"])
    for x, y in zip(before, after):
        assert x["label"] == y["label"] and abs(x["probability"] - y["probability"]) < 1e-5


def test_ready_made_splits_with_three_classes_and_custom_columns(tmp_path, capsys):
    words = {"sport": "goal match team score", "food": "pizza bread soup salad", "tech": "code chip data cloud"}
    rows = [(label, f"{ws.split()[i % 4]} {i}") for i in range(12) for label, ws in words.items()]
    header = ("category", "sentence")
    paths = [write_csv(tmp_path / n, rows[s], header) for n, s in
             (("tr.csv", slice(0, 24)), ("va.csv", slice(24, 30)), ("te.csv", slice(30, 36)))]
    long_text = ("word " * 40).strip()
    paths[2] = write_csv(tmp_path / "te.csv", rows[30:36] + [("tech", long_text)], header)
    out = str(tmp_path / "run")
    summary = finetune_cls.main(cls_flags() + ["--train_csv", paths[0], "--val_csv", paths[1], "--test_csv",
                                               paths[2], "--text_column", "sentence", "--label_column", "category",
                                               "--max_length", "8", "--context_length", "16", "--epochs", "1",
                                               "--out_dir", out])
    assert summary["class_names"] == ["food", "sport", "tech"]
    assert len(summary["test"]["confusion"]) == 3 and summary["test"]["examples"] == 7
    assert "1 of 7 texts in the test split are longer than 8 tokens" in capsys.readouterr().err
    ckpt = M.read_checkpoint(os.path.join(out, "classifier.pth"))
    assert ckpt["class_names"] == ["food", "sport", "tech"] and ckpt["label_column"] == "category"
    with pytest.raises(settings.UserError, match="exceeds the model's context_length 16"):
        finetune_cls.main(cls_flags() + ["--train_csv", paths[0], "--val_csv", paths[1], "--test_csv",
                                         paths[2], "--text_column", "sentence", "--label_column", "category",
                                         "--max_length", "64", "--context_length", "16", "--out_dir", out,
                                         "--overwrite"])
    bad_val = write_csv(tmp_path / "bad_val.csv", [("music", "guitar")], header)
    with pytest.raises(settings.UserError, match="'music'"):
        finetune_cls.main(cls_flags() + ["--train_csv", paths[0], "--val_csv", bad_val, "--test_csv", paths[2],
                                         "--text_column", "sentence", "--label_column", "category", "--out_dir", out,
                                         "--overwrite"])


@pytest.mark.parametrize("argv", [["--trainable", "some"], ["--trainable", "last_n:0"], ["--epocs", "1"],
                                  ["--predict", "x", "--evaluate"], ["--train_csv", "a.csv"],
                                  ["--csv", "a.csv", "--train_csv", "b.csv"], ["--batch_size", "two"]])
def test_cls_bad_flags_exit_2(argv):
    with pytest.raises(SystemExit) as e:
        finetune_cls.main(argv)
    assert e.value.code == 2


def test_cls_dry_run_prints_the_plan_and_writes_nothing(tmp_path, capsys):
    csv_path = write_spam_ham_csv(tmp_path / "texts.csv")
    out = tmp_path / "run"
    full = finetune_cls.main(cls_flags(drop_rate=0, dtype="float32") + ["--csv", csv_path, "--out_dir", str(out),
                                                                        "--dry_run", "--batch_size", "4"])
    text = capsys.readouterr().out
    for word in PLAN_WORDS:
        assert word in text, word
    assert not out.exists()  # no split CSVs, no checkpoint, no metrics.json
    model = finetune_cls.replace_head(M.GPTModel(tiny_cfg()), 2)
    assert full["total_params"] == full["trainable_params"] == M.count_parameters(model)
    assert full["steps_per_epoch"] == int(0.7 * 48) // 4  # 70% of 48 balanced texts train, batch 4

    last_block = cls_flags(trainable="last_block", drop_rate=0, dtype="float32")
    last = finetune_cls.main(last_block + ["--csv", csv_path, "--out_dir", str(out), "--dry_run", "--batch_size", "4"])
    assert last["total_params"] == full["total_params"]
    assert last["trainable_params"] == M.count_parameters(model.trf_blocks[-1]) + M.count_parameters(
        model.final_norm) + M.count_parameters(model.out_head)
    assert last["optimizer"] < full["optimizer"] and last["activations"] < full["activations"]
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------------------
# Output names
# ---------------------------------------------------------------------------------------------------------------

def test_a_classifier_of_a_csv_is_not_named_spam(tmp_path):
    rows = [("ham", f"see you at {i} o'clock") for i in range(20)] + [("spam", f"WIN {i} cash now") for i in range(20)]
    path = tmp_path / "texts.csv"
    finetune_cls.write_labelled_csv(str(path), [(t, label) for label, t in rows])
    finetune_cls.main(["--csv", str(path), "--init", "scratch", "--trainable", "all", *tiny_flags(),
                       "--max_length", "16", "--max_steps", "1", "--out_dir", str(tmp_path / "c"),
                       "--eval_freq", "100"])
    assert (tmp_path / "c" / "classifier.pth").exists() and not (tmp_path / "c" / "spam_classifier.pth").exists()


# ===============================================================================================================
# 6. Chat: finetune_chat.py and generate.py --chat
# ===============================================================================================================

def book_records(name="instruction-data.json", n=None):
    path = os.path.join(SHARED_DATA, name)
    if not os.path.isfile(path):
        pytest.skip(f"../shared/data/{name} not present")
    with open(path, encoding="utf-8") as f:
        records = json.load(f)
    return records[:n] if n else records


def short_records(n):
    """n quick instruction records (about 40 tokens each with the template)."""
    return [{"instruction": f"Add {i} and {i + 2}.", "input": "", "output": f"The sum is {2 * i + 2}."}
            for i in range(n)]


def short_preferences(n):
    return [{"instruction": f"Greet person number {i}.", "input": "", "chosen": f"Hello, number {i}!",
             "rejected": "Go away."} for i in range(n)]


def tiny_checkpoint(path, kind="chat", context_length=128, seed=0):
    model = tiny_model(seed, context_length=context_length)
    return M.save_checkpoint(str(path), model, kind=kind, template=data.TEMPLATE_NAME), model


def fake_stdin(raw):
    """A non-terminal standard input holding raw bytes, as a pipe gives."""
    return io.TextIOWrapper(io.BytesIO(raw), encoding="utf-8")


# ---------------------------------------------------------------------------------------------------------------
# Template and collate
# ---------------------------------------------------------------------------------------------------------------

def test_template_is_the_books_and_conversations_use_it():
    entry = {"instruction": "Rewrite the sentence.", "input": "The cake was eaten.", "output": "We ate it."}
    assert data.format_input(entry) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nRewrite the sentence.\n\n### Input:\nThe cake was eaten.")
    assert "### Input" not in data.format_input({**entry, "input": ""})
    one_turn = [{"role": "user", "content": "Rewrite the sentence."}, {"role": "assistant", "content": "We ate it."}]
    assert data.format_conversation(one_turn) == data.format_prompt({**entry, "input": ""}) + "We ate it."
    # with a system text, the user message is the ### Input of that instruction
    assert data.format_conversation(one_turn[:1], system="Rewrite the sentence.") == data.format_prompt(
        {"instruction": "Rewrite the sentence.", "input": "Rewrite the sentence."})
    segments = data.record_segments({"messages": one_turn + [{"role": "user", "content": "Again."},
                                                             {"role": "assistant", "content": "Done."}]})
    assert [is_response for _, is_response in segments] == [False, True, False, True]
    assert segments[2][0] == "\n\n### Instruction:\nAgain." + data.RESPONSE_HEADER


def test_collate_pads_shifts_and_masks_padding_after_the_first_end_of_text():
    E, I = data.EOT_ID, data.IGNORE_INDEX
    inputs, targets = finetune_chat.custom_collate_fn([[0, 1, 2, 3, 4], [5, 6], [7, 8, 9]])
    assert inputs.tolist() == [[0, 1, 2, 3, 4], [5, 6, E, E, E], [7, 8, 9, E, E]]
    assert targets.tolist() == [[1, 2, 3, 4, E], [6, E, I, I, I], [8, 9, E, I, I]]
    # an end-of-text inside a text is a target like any token; only the padding after the appended one is ignored
    _, targets = finetune_chat.custom_collate_fn([[5, E, 6], [1]])
    assert targets.tolist() == [[E, 6, E], [E, I, I]]
    inputs, targets = finetune_chat.custom_collate_fn([[0, 1, 2, 3, 4], [5, 6]], allowed_max_length=3)
    assert inputs.shape == targets.shape == (2, 3)
    assert targets.tolist() == [[1, 2, 3], [6, E, I]]


def test_mask_instruction_masks_the_prompt():
    E, I = data.EOT_ID, data.IGNORE_INDEX
    # tokens 0-2 are the prompt, 3-4 the response: only targets predicting 3, 4 and the end-of-text remain
    batch = [([10, 11, 12, 13, 14], [False, False, False, True, True]), ([20, 21], [False, True])]
    inputs, targets = finetune_chat.custom_collate_fn(batch)
    assert inputs.tolist() == [[10, 11, 12, 13, 14], [20, 21, E, E, E]]
    assert targets.tolist() == [[I, I, 13, 14, E], [21, E, I, I, I]]

    record = book_records(n=1)[0]
    tok = data.get_tokenizer()
    n_prompt = len(tok.encode(data.format_prompt(record)))
    n_response = len(tok.encode(record["output"]))
    masked = finetune_chat.InstructionDataset([record], mask_instruction=True)
    _, targets = finetune_chat.custom_collate_fn([masked[0]])
    assert (targets[0, :n_prompt - 1] == I).all()
    assert int((targets != I).sum()) == n_response + 1  # the response and the end-of-text
    _, plain = finetune_chat.custom_collate_fn([finetune_chat.InstructionDataset([record])[0]])
    assert int((plain != I).sum()) == n_prompt + n_response


def test_records_longer_than_allowed_max_length_are_cut_and_counted(capsys, tmp_path):
    records = book_records(n=4)
    long = {"instruction": "Repeat: " + "word " * 200, "input": "", "output": "word"}
    dataset = finetune_chat.InstructionDataset(records + [long], max_length=100)
    assert (dataset.truncated, dataset.skipped, len(dataset)) == (1, 0, 5)
    masked = finetune_chat.InstructionDataset(records + [long], mask_instruction=True, max_length=100)
    assert (masked.truncated, masked.skipped, len(masked)) == (0, 1, 4)  # its response lies beyond the cut
    prefs = finetune_chat.PreferenceDataset([{**long, "chosen": "a", "rejected": "b"}], max_length=100)
    assert (prefs.skipped, len(prefs)) == (1, 0)


# ---------------------------------------------------------------------------------------------------------------
# Offline scores
# ---------------------------------------------------------------------------------------------------------------

def test_offline_metrics_give_known_values():
    fc = finetune_chat
    assert fc.exact_match("The cat sat.", "the  cat sat") == 1.0
    assert fc.exact_match("The cat sat.", "The cat ran.") == 0.0
    assert fc.token_f1("the cat sat", "the cat ran") == pytest.approx(2 / 3)
    assert fc.token_f1("a a b", "a b b c") == pytest.approx(2 * (2 / 3) * (2 / 4) / (2 / 3 + 2 / 4))
    assert fc.token_f1("", "") == 1.0 and fc.token_f1("x", "") == 0.0
    assert fc.lcs_length(list("abcd"), list("acde")) == 3
    assert fc.rouge_l("a b c d", "a c d e") == pytest.approx(0.75)
    assert fc.rouge_l("d c b a", "a b c d") == pytest.approx(0.25)  # one word in order out of four
    assert fc.rouge_l("x y", "a b") == 0.0
    scores = fc.score_responses(["the cat sat", "dog"], ["the cat sat", "a cat"])
    assert scores == {"exact_match": 0.5, "token_f1": 0.5, "rouge_l": 0.5}
    # a model that gives every token the same logit has perplexity vocab_size on any text
    model = M.GPTModel(tiny_cfg(context_length=128))
    with torch.no_grad():
        model.out_head.weight.zero_()
    ppl = fc.reference_perplexity(model, book_records(n=3), torch.device("cpu"), 128)
    assert ppl == pytest.approx(TINY["vocab_size"], rel=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# Supervised fine-tuning
# ---------------------------------------------------------------------------------------------------------------

def test_sft_few_steps_on_a_handful_of_records_lower_the_loss(tmp_path, capsys):
    records = short_records(14) + [
        {"messages": [{"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "Blue."},
                      {"role": "user", "content": "Another one."}, {"role": "assistant", "content": "Red."}]},
        {"messages": [{"role": "system", "content": "Answer with one word."},
                      {"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."}]}]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
    out = tmp_path / "run"
    result = finetune_chat.main(chat_flags() + ["--data", str(path), "--out_dir", str(out), "--lr", "2e-3",
                                                "--batch_size", "4", "--max_steps", "4", "--epochs", "3",
                                                "--eval_freq", "4", "--eval_iters", "3", "--max_new_tokens", "4",
                                                "--mask_instruction"])
    rows = result["rows"]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] - 0.1
    ckpt = M.read_checkpoint(result["checkpoint"])
    assert os.path.basename(result["checkpoint"]) == "scratch-sft.pth"
    assert ckpt["kind"] == "chat" and ckpt["template"] == data.TEMPLATE_NAME
    answered = json.loads((out / "instruction-data-with-response.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(answered) == metrics["test_records"] == 1 and "model_response" in answered[0]
    assert {"exact_match", "token_f1", "rouge_l", "perplexity", "val_loss"} <= set(metrics)
    assert metrics["perplexity"] > 1
    assert "metrics.json" in capsys.readouterr().out.strip().splitlines()[-1]


@needs_shared
def test_default_data_is_downloaded_and_lora_checkpoint_loads_plain(tmp_path, monkeypatch, serve):
    url, _ = serve()  # the files of ../shared/data
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(data, "DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("GPT2_DATA_URL", url)
    result = finetune_chat.main(chat_flags() + ["--out_dir", str(tmp_path / "run"), "--max_steps", "1",
                                                "--eval_iters", "1", "--max_new_tokens", "0",
                                                "--trainable", "lora", "--lora_rank", "2",
                                                "--allowed_max_length", "40"])
    assert data.sha256_of(tmp_path / "data" / "instruction-data.json") == data.DATA_FILES[
        "instruction-data.json"][1]
    assert result["metrics"]["test_records"] == 110  # the 85/10/5 split of 1100 records
    ckpt = M.read_checkpoint(result["checkpoint"])
    assert not any("lora" in k.lower() or k.endswith((".A", ".B")) for k in ckpt["model"])
    M.GPTModel(ckpt["config"]).load_state_dict(ckpt["model"])  # merged: a plain model loads it strictly


# ---------------------------------------------------------------------------------------------------------------
# Chat: generate.py --chat
# ---------------------------------------------------------------------------------------------------------------

def test_chat_sends_the_first_turn_in_the_second_prompt_and_reuses_its_cache(tmp_path, monkeypatch, capsys):
    path, _ = tiny_checkpoint(tmp_path / "chat.pth")
    monkeypatch.setattr(sys, "stdin", fake_stdin(b"Name a color.\nAnd another one?\n"))
    turns = generate_script.main(["--chat", "--checkpoint", path, "--temperature", "0", "--max_new_tokens", "6",
                                 "--device", "cpu"])
    out, err = capsys.readouterr()
    assert len(turns) == 2 and turns[0]["reply"]
    assert turns[0]["user"] in turns[1]["prompt"] and turns[0]["reply"] in turns[1]["prompt"]
    assert turns[1]["prompt"].startswith(turns[0]["prompt"])
    tok = data.get_tokenizer()
    assert turns[1]["reused"] >= len(tok.encode(turns[0]["prompt"]))  # the first prompt came from the cache
    assert out.splitlines() == [turns[0]["reply"], turns[1]["reply"]]  # no decorations when stdin is a pipe
    assert "warning" not in err

    # the reply computed with the cached prefix equals one computed from scratch
    model, _ = M.load_model(path)
    messages = [{"role": "user", "content": "Name a color."}, {"role": "assistant", "content": turns[0]["reply"]},
                {"role": "user", "content": "And another one?"}]
    ids, dropped = replies.chat_prompt(messages, "", 128, 6)
    assert dropped == 0
    fresh = replies.generate_reply(model, torch.tensor([ids]), 6)
    assert fresh == turns[1]["reply"]


def test_chat_reset_exit_bad_utf8_system_and_non_chat_warning(tmp_path, monkeypatch, capsys):
    path, _ = tiny_checkpoint(tmp_path / "base.pth", kind="pretrain")
    monkeypatch.setattr(sys, "stdin", fake_stdin(b"hello there\n\xff\xfe oops\n/reset\nhi again\n/exit\nnever\n"))
    turns = generate_script.main(["--chat", "--checkpoint", path, "--temperature", "0", "--max_new_tokens", "3",
                                 "--system", "Answer briefly.", "--device", "cpu"])
    err = capsys.readouterr().err
    assert [t["user"] for t in turns] == ["hello there", "hi again"]  # bad line skipped, nothing after /exit
    assert "hello" not in turns[1]["prompt"]  # /reset forgot the first exchange
    assert "### Instruction:\nAnswer briefly.\n\n### Input:\nhi again" in turns[1]["prompt"]
    assert "line 2 is not UTF-8" in err
    assert "not an instruction-tuned chat model" in err


def test_chat_drops_the_oldest_turns_and_says_so_once(tmp_path, monkeypatch, capsys):
    path, _ = tiny_checkpoint(tmp_path / "small.pth", context_length=64)
    lines = b"".join(f"message number {i}\n".encode() for i in range(5))
    monkeypatch.setattr(sys, "stdin", fake_stdin(lines))
    turns = generate_script.main(["--chat", "--checkpoint", path, "--temperature", "0", "--max_new_tokens", "5",
                                 "--device", "cpu"])
    err = capsys.readouterr().err
    assert len(turns) == 5
    assert err.count("dropping the oldest turns") == 1
    assert "message number 0" not in turns[-1]["prompt"] and "message number 4" in turns[-1]["prompt"]
    tok = data.get_tokenizer()
    assert all(len(tok.encode(t["prompt"])) + 5 <= 64 for t in turns)


# ---------------------------------------------------------------------------------------------------------------
# Preference tuning
# ---------------------------------------------------------------------------------------------------------------

def test_dpo_raises_the_chosen_minus_rejected_margin(tmp_path):
    init, _ = tiny_checkpoint(tmp_path / "tiny-sft.pth")
    prefs = write_json(tmp_path / "prefs.json", short_preferences(7))
    out = tmp_path / "dpo"
    result = finetune_chat.main(["--method", "dpo", "--init", init, "--data", prefs, "--out_dir", str(out),
                                 "--lr", "3e-3", "--epochs", "2", "--batch_size", "2", "--eval_freq", "100",
                                 "--device", "cpu", "--dtype", "float32"])
    before, after = result["metrics"]["before"]["train"], result["metrics"]["after"]["train"]
    assert before["reward_margin"] == 0.0 and before["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert after["reward_margin"] > 0.05 and after["loss"] < before["loss"]
    assert {"train_reward_margin", "val_reward_margin", "train_reward_acc", "val_reward_acc"} <= set(
        result["rows"][-1])
    assert "val_reward_margin" in (out / "log.csv").read_text().splitlines()[0]
    assert os.path.basename(result["checkpoint"]) == "tiny-dpo.pth"
    assert M.read_checkpoint(result["checkpoint"])["kind"] == "chat"


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one clear message; --dry_run
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, text, message", [
    ("broken.json", '[{"instruction": "a", "output": "b"},\n {"instruction": "c" "output": "d"}]',
     r"broken.json, line 2, column 22: malformed JSON"),
    ("broken.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": }\n',
     r"broken.jsonl, line 2, column 32: malformed JSON"),
    ("missing.json", '[{"instruction": "a", "output": "b"}, {"instruction": "c", "input": ""}]',
     r"record 1 \(0-based\) has no 'output' field"),
    ("empty.json", "[]", r"holds no records"),
    ("object.json", '{"instruction": "a", "output": "b"}', r"expected a list of records"),
    ("roles.jsonl", '{"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}',
     r"messages\[1\] has role 'bot'"),
    ("number.json", '[{"instruction": "a", "output": 3}]', r"field 'output' is a JSON int"),
])
def test_bad_instruction_files_name_what_is_wrong(tmp_path, name, text, message):
    (tmp_path / name).write_text(text, encoding="utf-8")
    with pytest.raises(settings.UserError, match=message):
        finetune_chat.main(chat_flags() + ["--data", str(tmp_path / name), "--out_dir", str(tmp_path / "run")])


def test_bad_preference_data_and_missing_init(tmp_path):
    init, _ = tiny_checkpoint(tmp_path / "sft.pth")
    prefs = write_json(tmp_path / "prefs.json", [{"instruction": "a", "input": "", "chosen": "b"}])
    with pytest.raises(settings.UserError, match=r"record 0 \(0-based\) has no 'rejected' field"):
        finetune_chat.main(["--method", "dpo", "--init", init, "--data", prefs, "--device", "cpu"])
    empty = write_json(tmp_path / "empty.json", [{"instruction": "a", "chosen": "b", "rejected": " "}])
    with pytest.raises(settings.UserError, match=r"record 0 \(0-based\) has an empty 'rejected' response"):
        finetune_chat.main(["--method", "dpo", "--init", init, "--data", empty, "--device", "cpu"])
    for method in ("dpo", "rm", "grpo", "rloo"):  # every method that starts from the SFT model says how to get one
        with pytest.raises(settings.UserError, match=r"no SFT checkpoint at .*nope.pth.*finetune_chat.py. \(sft\)"):
            finetune_chat.main(["--method", method, "--init", str(tmp_path / "nope.pth"), "--data", prefs,
                                "--reward", "contains:b"])


def test_chat_misspelled_flag_or_bad_value_exits_2(capsys):
    for argv in (["--epoch", "1"], ["--method", "ppo"], ["--trainable", "some"], ["--batch_size", "x"]):
        with pytest.raises(SystemExit) as e:
            finetune_chat.main(argv)
        assert e.value.code == 2


def test_chat_command_line_error_is_one_line_without_traceback(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("[{", encoding="utf-8")
    proc = run_script("finetune_chat.py", "--data", str(bad), "--init", "scratch", cwd=tmp_path, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [f"error: {bad}, line 1, column 3: malformed JSON (Expecting "
                                                f"property name enclosed in double quotes): fix the file (a JSON "
                                                f"list of records, or one record per line)"]


def test_chat_dry_run_for_sft_and_dpo_writes_nothing(tmp_path, capsys):
    out = tmp_path / "sft"
    sft = finetune_chat.main(chat_flags() + ["--data", write_json(tmp_path / "data.json", short_records(20)),
                                             "--out_dir", str(out), "--batch_size", "2", "--dry_run"])
    text = capsys.readouterr().out
    for word in PLAN_WORDS:
        assert word in text, word
    assert not out.exists()
    tiny = M.GPTModel(tiny_cfg(context_length=128))
    n = M.count_parameters(tiny)
    assert sft["total_params"] == sft["trainable_params"] == n
    assert sft["steps_per_epoch"] == 17 // 2  # 85% of 20 records train

    init = M.save_checkpoint(str(tmp_path / "tiny-sft.pth"), tiny, kind="chat")
    prefs = write_json(tmp_path / "prefs.json", short_preferences(10))
    out = tmp_path / "dpo"
    dpo = finetune_chat.main(["--method", "dpo", "--init", init, "--data", prefs, "--out_dir", str(out),
                              "--batch_size", "2", "--device", "cpu", "--dtype", "float32", "--dry_run"])
    assert dpo["total_params"] == 2 * n and dpo["trainable_params"] == n  # the frozen reference counts too
    assert "--dry_run" in capsys.readouterr().out
    assert not out.exists()
    with pytest.raises(SystemExit):  # a settings error: usage line and exit 2
        finetune_chat.main(chat_flags() + ["--trainable", "lora", "--fsdp", "--dry_run"])
    assert "--fsdp with --trainable lora is not supported" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# RLHF: the reward model, policy optimization (grpo, rloo); the chat REPL's commands
# ---------------------------------------------------------------------------------------------------------------

PAIRS_FILE = os.path.join(SHARED_DATA, "instruction-data-with-preference.json")


def test_chat_help_unknown_command_and_empty_reply(tmp_path, monkeypatch, capsys):
    path = M.save_checkpoint(str(tmp_path / "chat.pth"), tiny_model(context_length=128), kind="chat",
                             template="alpaca")
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"/help\n/whatever\n/etc/hosts?\n/exit\n")))
    turns = generate_script.main(["--chat", "--checkpoint", path, "--temperature", "0", "--max_new_tokens", "0",
                           "--device", "cpu"])  # no room for an answer: every reply is empty
    out, err = capsys.readouterr()
    assert "/reset" in err and "/exit" in err and "unknown command /whatever" in err
    assert [t["user"] for t in turns] == ["/etc/hosts?"]  # not a lone /word: a message
    assert out.strip() == "(empty reply)"


def test_bradley_terry_loss_is_ln2_at_a_zero_head():
    model = finetune_chat.add_reward_head(tiny_model())
    with torch.no_grad():
        model.out_head.weight.zero_()
        model.out_head.bias.zero_()
    model = finetune_chat.add_reward_head(tiny_model(context_length=256))
    with torch.no_grad():
        model.out_head.weight.zero_()
        model.out_head.bias.zero_()
    items = list(finetune_chat.PreferenceDataset(json.load(open(PAIRS_FILE))[:4], max_length=256))
    batch = finetune_chat.preference_collate_fn(items, allowed_max_length=256)
    chosen, rejected = finetune_chat.reward_pair_scores(model, batch, torch.device("cpu"))
    assert torch.equal(chosen, torch.zeros(4)) and torch.equal(rejected, torch.zeros(4))
    assert finetune_chat.bradley_terry_loss(chosen, rejected).item() == pytest.approx(math.log(2))
    # the score is read at each text's last real token, whatever padding follows
    assert finetune_chat.last_real_positions(batch["chosen_mask"]).tolist() == [len(x["chosen"]) for x in items]


def test_group_advantages_and_policy_loss_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0])  # two prompts, three answers each
    grpo = finetune_chat.group_advantages(rewards, 3, "grpo")
    g1 = torch.tensor([1.0, 0, 0])
    std = math.sqrt(((g1 - 1 / 3) ** 2).sum() / 2)
    assert grpo[:3].tolist() == pytest.approx([(2 / 3) / std, (-1 / 3) / std, (-1 / 3) / std], rel=1e-5)
    assert grpo[3:].tolist() == pytest.approx([-2 / 3 / math.sqrt(1 / 3), 1 / 3 / math.sqrt(1 / 3),
                                               1 / 3 / math.sqrt(1 / 3)], rel=1e-5)
    rloo = finetune_chat.group_advantages(rewards, 3, "rloo")
    assert rloo.tolist() == pytest.approx([1.0, -0.5, -0.5, -1.0, 0.5, 0.5])
    # one token per answer: ratio 1.5 with A = 1 is clipped at 1.2; ratio 0.5 with A = -1 is clipped at 0.8 (the
    # min keeps the unclipped -0.5 * -1 = 0.5 vs 0.8: max of the two penalties); KL from q = ref - logp
    logp = torch.log(torch.tensor([[0.3], [0.1]]))
    old = torch.log(torch.tensor([[0.2], [0.2]]))
    ref = torch.log(torch.tensor([[0.3], [0.2]]))
    adv = torch.tensor([1.0, -1.0])
    mask = torch.ones(2, 1, dtype=torch.bool)
    loss, stats = finetune_chat.policy_loss(logp, old, ref, adv, mask, clip=0.2, beta=0.5)
    q = ref - logp
    kl = (torch.exp(q) - q - 1).flatten()
    expected = ((-1.2 + 0.5 * kl[0]) + (0.8 + 0.5 * kl[1])) / 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert stats["clip_frac"] == 1.0 and stats["kl"] == pytest.approx(kl.mean().item(), rel=1e-5)


def test_kl_to_the_reference_is_zero_before_the_first_update():
    import copy
    policy = tiny_model(context_length=128)
    reference = copy.deepcopy(policy)
    cfg = {"max_new_tokens": 6, "group_size": 3, "temperature": 1.0, "method": "grpo", "seed": 1}
    prompts = [[50256, 15496, 11], [464, 3290]]
    reward = finetune_chat.short_reply_reward(3)
    cpu = torch.device("cpu")
    r = finetune_chat.rollout(policy, reference, prompts, reward, cfg, torch.Generator().manual_seed(0), cpu,
                              torch.float32)
    assert torch.equal(r["old_logp"] * r["mask"], r["ref_logp"] * r["mask"])
    logp, _ = finetune_chat.token_logprobs(policy, r["ids"])
    _, stats = finetune_chat.policy_loss(logp, r["old_logp"], r["ref_logp"], r["advantages"], r["mask"])
    assert stats["kl"] == 0.0 and stats["clip_frac"] == 0.0
    ev = finetune_chat.evaluate_policy(policy, reference, prompts, reward, cfg, cpu, torch.float32)
    assert ev["kl"] == 0.0 and ev["win_rate"] == 0.5


TOY_TOKENS = [262, 290, 286, 257]  # " the", " and", " of", " a"


def toy_policy(path):
    """A chat .pth whose answers are drawn from four tokens, about a quarter each (whatever the prompt): the
    final LayerNorm outputs a constant and the output layer favours those four. Small enough to learn in seconds."""
    model = tiny_model(context_length=128)
    with torch.no_grad():
        model.final_norm.scale.zero_()
        model.final_norm.shift.fill_(1.0)
        model.out_head.weight.zero_()
        model.out_head.weight[TOY_TOKENS] = 0.5
    return M.save_checkpoint(str(path), model, kind="chat", template="alpaca")


def toy_reward(samples):
    """A verifiable reward: the share of an answer's tokens that are " the"."""
    return torch.tensor([sum(t == 262 for t in s["reply_ids"]) / max(1, len(s["reply_ids"])) for s in samples])


def rl_args(out, steps, init):
    return ["--method", "grpo", "--init", init, "--device", "cpu", "--dtype", "float32", "--data", PAIRS_FILE,
            "--reward", "contains:the", "--max_new_tokens", "8", "--group_size", "4", "--prompts_per_step", "2",
            "--max_steps", str(steps), "--lr", "3e-2", "--eval_iters", "1", "--out_dir", out]


def test_policy_optimization_raises_a_toy_reward_on_a_kl_leash(tmp_path, monkeypatch):
    monkeypatch.setitem(finetune_chat.REWARDS, "contains", lambda arg: toy_reward)
    init = toy_policy(tmp_path / "toy.pth")
    loose = finetune_chat.main(rl_args(str(tmp_path / "loose"), 12, init))
    rewards = [r["reward"] for r in loose["rows"]]
    assert sum(rewards[-4:]) / 4 > sum(rewards[:4]) / 4 + 0.3, rewards  # from ~0.25 towards 1
    after = loose["metrics"]["after"]
    assert after["reward"] > loose["metrics"]["before"]["reward"] + 0.3 and after["win_rate"] > 0.75
    assert os.path.exists(tmp_path / "loose" / "reward-plot.png") and os.path.exists(tmp_path / "loose" / "kl-plot.png")
    # a stronger leash keeps the policy closer to the SFT model
    tight = finetune_chat.main(rl_args(str(tmp_path / "tight"), 12, init) + ["--beta", "2"])
    assert tight["metrics"]["after"]["kl"] < after["kl"] / 2


def test_policy_optimization_resumes_exactly(tmp_path, monkeypatch):
    monkeypatch.setitem(finetune_chat.REWARDS, "contains", lambda arg: toy_reward)
    init = toy_policy(tmp_path / "toy.pth")
    whole = finetune_chat.main(rl_args(str(tmp_path / "a"), 4, init))
    finetune_chat.main(rl_args(str(tmp_path / "b"), 3, init))  # stops inside a batch of rollouts (2 updates each)
    resumed = finetune_chat.main(rl_args(str(tmp_path / "b"), 4, init) + ["--resume"])
    a, b = whole["model"].state_dict(), resumed["model"].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["reward"] for r in whole["rows"]] == [r["reward"] for r in resumed["rows"]]


@slow
def test_a_stop_during_rollouts_is_honoured_within_seconds_and_resumes(tmp_path):
    init = toy_policy(tmp_path / "toy.pth")
    out = tmp_path / "run"
    # 16 prompts a step, 4 answers of up to 60 tokens each: a batch of rollouts takes seconds on 2 cores
    args = rl_args(str(out), 2, init) + ["--prompts_per_step", "16", "--max_new_tokens", "60", "--minibatches", "4",
                                         "--save_every", "1"]
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "finetune_chat.py"), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**ENV, "PYTHONPATH": HERE, "PYTHONUNBUFFERED": "1"})
    for line in proc.stdout:  # the held-out answers are sampled before the first step: wait past them
        if line.startswith("before:"):
            break
    time.sleep(1.0)  # the first batch of rollouts is being sampled now
    sent = time.time()
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 143 and time.time() - sent < 3.0 and "Traceback" not in err, err
    state = M.read_checkpoint(str(out / "model_and_optimizer.pth"))
    assert state["step"] == 0  # stopped inside the first step's rollouts: saved where it started


def test_each_process_samples_prompts_of_its_own():
    prompts = [[i] for i in range(40)]
    cfg = {"prompts_per_step": 4, "seed": 3}
    for epoch in (0, 1):
        seen = []
        for r in range(5):  # 40 prompts, 2 processes, 4 prompts each: 5 batches of rollouts an epoch
            rank0, rank1 = (finetune_chat.step_prompts(prompts, cfg, epoch, r, rank, world=2) for rank in (0, 1))
            assert len(rank0) == len(rank1) == 4 and not set(map(tuple, rank0)) & set(map(tuple, rank1))
            seen += rank0 + rank1
        assert sorted(seen) == prompts  # every prompt once an epoch
    assert finetune_chat.step_prompts(prompts, cfg, 0, 0) != finetune_chat.step_prompts(prompts, cfg, 1, 0)


def test_reward_model_runs_end_to_end_and_is_refused_as_a_language_model(verdict, tmp_path):
    out = str(tmp_path / "rm")
    result = finetune_chat.main(["--method", "rm", "--init", "scratch", *tiny_flags(), "--context_length", "128",
                                 "--data", PAIRS_FILE, "--max_steps", "3", "--out_dir", out, "--eval_freq", "100"])
    ckpt = M.read_checkpoint(result["checkpoint"])
    assert ckpt["kind"] == "reward" and ckpt["model"]["out_head.weight"].shape == (1, 32)
    assert 0 <= result["metrics"]["after"]["test"]["accuracy"] <= 1
    pretrain_args = pre(verdict) + ["--init", result["checkpoint"], "--out_dir", str(tmp_path / "p")]
    for main, args in ((generate_script.main, ["--checkpoint", result["checkpoint"], "--device", "cpu"]),
                       (pretrain.main, pretrain_args)):
        code, _, err = run_main(main, args)
        assert_one_error_line(code, err, "reward model")


# ===============================================================================================================
# 7. Generation: the KV cache, sampling, generate.py, beam search, repetition penalty
# ===============================================================================================================

def test_cached_greedy_generation_equals_recomputation_even_past_the_context():
    m = tiny_model()
    x = torch.randint(0, 50257, (2, 7))
    # 40 new tokens with a 32-token context: the window slides for the last 15 steps
    cached = M.generate(m, x, 40, context_size=32)
    plain = M.generate(m, x, 40, context_size=32, use_cache=False)
    assert cached.shape == (2, 47)
    assert torch.equal(cached, plain)
    # the reference: the book's loop, cropping to the context and recomputing each step
    idx = x
    for _ in range(40):
        with torch.no_grad():
            logits = m(idx[:, -32:])[:, -1]
        idx = torch.cat([idx, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(cached, idx)


def test_long_prompt_is_left_cropped():
    m = tiny_model()
    long = torch.randint(0, 50257, (1, 50))
    out = M.generate(m, long, 3, context_size=32)
    assert out.shape == (1, 53) and torch.equal(out[:, :50], long)
    assert torch.equal(M.generate(m, long[:, -32:], 3, context_size=32)[:, -3:], out[:, -3:])


def test_generate_stops_at_eos_and_sampling_filters():
    m = tiny_model()
    x = torch.randint(0, 50257, (1, 5))
    first = M.generate(m, x, 1)[0, -1].item()
    assert M.generate(m, x, 10, eos_id=first).shape[1] == 6  # stops right after emitting eos
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.5]])
    g = torch.Generator().manual_seed(0)
    assert {M.sample_next_token(logits, 1.0, top_k=1, generator=g).item() for _ in range(20)} == {1}
    # probabilities ~ [.09, .64, .24, .05]: top_p 0.7 keeps tokens 1 and 2 only
    seen = {M.sample_next_token(logits, 1.0, top_p=0.7, generator=g).item() for _ in range(300)}
    assert seen == {1, 2}
    assert {M.sample_next_token(logits, 1.0, top_p=0.5, generator=g).item() for _ in range(50)} == {1}
    with pytest.raises(ValueError):
        M.sample_next_token(logits, -1.0)
    with pytest.raises(ValueError):
        M.sample_next_token(logits, 1.0, top_p=0.0)


@slow
def test_generate_cli_errors_and_probs(tmp_path):
    m = tiny_model()
    ckpt = M.save_checkpoint(str(tmp_path / "m.pth"), m)
    proc = run_script("generate.py", "--checkpoint", str(tmp_path / "none.pth"))
    assert_one_line_error(proc, "no checkpoint at", "python pretrain.py")
    for flags, word in [(["--temperature", "-1"], "--temperature"), (["--top_p", "1.5"], "--top_p"),
                        (["--top_k", "-2"], "--top_k"), (["--prompt", " "], "--prompt")]:
        proc = run_script("generate.py", "--checkpoint", ckpt, *flags)
        assert proc.returncode == 2 and word in proc.stderr.splitlines()[-1]
    proc = run_script("generate.py", "--checkpoint", ckpt, "--prompt", "word " * 40)
    assert_one_line_error(proc, "longer than the model's context of 32")
    (tmp_path / "junk.pth").write_bytes(b"junk")
    assert_one_line_error(run_script("generate.py", "--checkpoint", str(tmp_path / "junk.pth")), "cannot read")
    proc = run_script("generate.py", "--checkpoint", ckpt, "--show_probs", "--probs_plot", str(tmp_path / "t.png"))
    assert proc.returncode == 0 and "T=0.1" in proc.stdout
    probs = [[float(v) for v in line.split()[-3:]] for line in proc.stdout.splitlines()[1:11]]
    assert probs[0][1] > probs[0][0] > probs[0][2]  # low temperature sharpens, high flattens


def test_stream_prints_the_same_text(tmp_path, capsys):
    m = tiny_model()
    ckpt = M.save_checkpoint(str(tmp_path / "m.pth"), m)
    args = ["--checkpoint", ckpt, "--max_new_tokens", "12", "--device", "cpu"]
    plain = generate_script.main(args)
    streamed = generate_script.main(args + ["--stream"])
    assert plain == streamed
    assert capsys.readouterr().out.count(plain[0]) == 2


def test_generate_n_heads_for_a_bare_state_dict_of_an_odd_width(tmp_path, capsys):
    model = tiny_model(vocab_size=256)  # width 32: no GPT-2 size, so its heads cannot be read off the shapes
    bare = str(tmp_path / "bare.pth")
    torch.save(model.state_dict(), bare)
    flags = ["--checkpoint", bare, "--prompt", "a", "--max_new_tokens", "3", "--temperature", "0", "--device", "cpu"]
    with pytest.raises(M.CheckpointError, match=r"pass n_heads \(generate.py --n_heads\)"):
        generate_script.main(flags)
    with pytest.raises(M.CheckpointError, match="n_heads 5 does not divide emb_dim 32"):
        generate_script.main(flags + ["--n_heads", "5"])
    capsys.readouterr()
    generate_script.main(flags + ["--n_heads", "2"])
    loaded, _ = M.load_model(bare, cfg_overrides={"n_heads": 2})
    idx = torch.randint(0, 256, (1, 6))
    with torch.no_grad():
        assert torch.equal(loaded(idx), model(idx))  # 2 heads, as it was trained: the same logits
        assert not torch.allclose(M.load_model(bare, cfg_overrides={"n_heads": 4})[0](idx), model(idx))
    with_config = M.save_checkpoint(str(tmp_path / "cfg.pth"), model)
    with pytest.raises(settings.UserError, match="has its own config with n_heads 2: drop --n_heads"):
        generate_script.main(["--checkpoint", with_config, "--n_heads", "4", "--device", "cpu"])


# ---------------------------------------------------------------------------------------------------------------
# Beam search
# ---------------------------------------------------------------------------------------------------------------

def brute_force_best(model, prompt, max_new, eos_id, length_penalty):
    """Score every possible continuation: those that end at eos_id early, and all of length max_new."""
    vocab, T = model.cfg["vocab_size"], prompt.shape[1]
    best = (float("-inf"), None)
    for n in range(1, max_new + 1):
        conts = [c for c in itertools.product(range(vocab), repeat=n)
                 if eos_id not in c[:-1] and (n == max_new or c[-1] == eos_id)]
        if not conts:
            continue
        seqs = torch.cat([prompt.expand(len(conts), -1), torch.tensor(conts)], dim=1)
        with torch.no_grad():
            logp = torch.log_softmax(model(seqs[:, :-1]).double(), dim=-1)[:, T - 1:]  # (N, n, vocab)
        scores = logp.gather(-1, seqs[:, T:, None])[..., 0].sum(dim=1) / n ** length_penalty
        i = int(scores.argmax())
        if scores[i] > best[0]:
            best = (scores[i].item(), list(conts[i]))
    return best[1]


@pytest.mark.parametrize("eos_id,length_penalty", [(None, 1.0), (0, 1.0), (0, 0.0), (0, 2.0), (3, -1.0)])
def test_beam_search_finds_brute_force_best(eos_id, length_penalty):
    model = tiny_model(seed=1, vocab_size=6)
    prompt = torch.tensor([[1, 2, 3]])
    want = brute_force_best(model, prompt, 3, eos_id, length_penalty)
    # 6 ** 3 beams keep every continuation alive: the search is exhaustive, so it must find the best one
    got = generate_script.generate_beam(model, prompt, 3, num_beams=216, eos_id=eos_id, length_penalty=length_penalty)
    assert got[0, 3:].tolist() == want


@pytest.mark.parametrize("seed", [8, 0, 1])
def test_beam_search_weighs_finished_against_complete_beams(seed):
    # 6 beams over 6 tokens for 2 new tokens: the best sequence is always among the 2 * 6 candidates of the last
    # step, so the search must return the brute-force best. With seed 8 the finished (eos) hypotheses fill all 6
    # places by then, and the complete beams of max_new_tokens still have to be compared with them.
    model = tiny_model(seed=seed, vocab_size=6)
    prompt = torch.tensor([[2, 5]])
    want = brute_force_best(model, prompt, 2, 0, 1.0)
    got = generate_script.generate_beam(model, prompt, 2, num_beams=6, eos_id=0, length_penalty=1.0)
    assert got[0, 2:].tolist() == want


def test_one_beam_equals_greedy():
    model = tiny_model(seed=3)
    for prompt in (torch.tensor([[5, 6, 7]]), torch.randint(0, 50257, (1, 20))):
        # 30 new tokens slide the window past context_length 32 for the longer prompt: the uncached path runs too
        assert torch.equal(generate_script.generate_beam(model, prompt, 30, num_beams=1), M.generate(model, prompt, 30))
    small = tiny_model(seed=4, vocab_size=5)
    prompt = torch.tensor([[1]])
    eos = M.generate(small, prompt, 1)[0, 1].item()  # the greedy first token, used as end-of-text: stop at once
    assert torch.equal(generate_script.generate_beam(small, prompt, 5, 1, eos_id=eos, length_penalty=0.0),
                       M.generate(small, prompt, 5, eos_id=eos))


def test_beam_search_rejects_bad_input():
    model = tiny_model()
    with pytest.raises(ValueError, match="one prompt"):
        generate_script.generate_beam(model, torch.zeros(2, 3, dtype=torch.long), 2, 2)
    with pytest.raises(ValueError, match="num_beams"):
        generate_script.generate_beam(model, torch.zeros(1, 3, dtype=torch.long), 2, 0)
    assert generate_script.generate_beam(model, torch.zeros(1, 3, dtype=torch.long), 0, 2).shape == (1, 3)


# ---------------------------------------------------------------------------------------------------------------
# Repetition penalty
# ---------------------------------------------------------------------------------------------------------------

def test_repetition_penalty_rule():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    seen = torch.tensor([[0, 1, 1]])  # tokens 0 and 1 occurred (1 twice: penalized once)
    out = M.apply_repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [[1.0, -2.0, 0.5, 3.0]]  # positive / 2, negative * 2, unseen unchanged
    assert torch.equal(M.apply_repetition_penalty(logits, seen, 1.0), logits)
    probs = torch.softmax(out, -1)[0]
    assert probs[0] < torch.softmax(logits, -1)[0, 0] and probs[3] > torch.softmax(logits, -1)[0, 3]
    with pytest.raises(ValueError):
        M.apply_repetition_penalty(logits, seen, 0.0)


def test_repetition_penalty_in_sampling_and_generate():
    logits = torch.tensor([[3.0, 2.9, 0.0]])
    assert M.sample_next_token(logits).item() == 0
    assert M.sample_next_token(logits, prev_ids=torch.tensor([[0]]), repetition_penalty=1.5).item() == 1
    assert M.sample_next_token(logits, prev_ids=torch.tensor([[0]])).item() == 0  # default 1.0 = off
    model = tiny_model(seed=5, vocab_size=8)
    prompt = torch.tensor([[1, 2]])
    plain = M.generate(model, prompt, 8)
    assert torch.equal(plain, M.generate(model, prompt, 8, repetition_penalty=1.0))
    penalized = M.generate(model, prompt, 8, repetition_penalty=3.0)
    assert not torch.equal(penalized, plain)
    # every step picks the argmax of the penalized logits, with the whole sequence so far (prompt included) as seen
    with torch.no_grad():
        for t in range(2, penalized.shape[1]):
            logits = model(penalized[:, :t])[:, -1]
            assert penalized[0, t] == M.apply_repetition_penalty(logits, penalized[:, :t], 3.0).argmax()


# ---------------------------------------------------------------------------------------------------------------
# Prompts from standard input or a file
# ---------------------------------------------------------------------------------------------------------------

def test_prompt_from_stdin_and_from_a_file(tmp_path, monkeypatch):
    path = M.save_checkpoint(str(tmp_path / "lm.pth"), tiny_model())
    base = ["--checkpoint", path, "--temperature", "0", "--max_new_tokens", "4", "--device", "cpu"]
    direct = generate_script.main(base + ["--prompt", "Once upon a time"])
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"Once upon a time")))
    assert generate_script.main(base + ["--prompt", "-"]) == direct
    (tmp_path / "p.txt").write_text("Once upon a time")
    assert generate_script.main(base + ["--prompt_file", str(tmp_path / "p.txt")]) == direct
    (tmp_path / "empty.txt").write_text("  \n")
    code, _, err = run_main(generate_script.main, base + ["--prompt_file", str(tmp_path / "empty.txt")])
    assert_one_error_line(code, err, "empty")


# ===============================================================================================================
# 8. Speed: int8 weights, the decoding layout, bench.py
# ===============================================================================================================

def test_int8_linear_matches_per_channel_rounding():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    q = layers.Int8Linear.from_linear(linear)
    assert q.weight.dtype == torch.int8 and q.weight_scale.shape == (48,)
    # symmetric per-row scales: the largest |w| of each row maps to +-127, every weight is off by at most scale / 2
    assert (q.weight.abs().amax(dim=1) == 127).all()
    dequant = q.weight.float() * q.weight_scale[:, None]
    assert ((dequant - linear.weight).abs() <= q.weight_scale[:, None] / 2 + 1e-7).all()
    x = torch.randn(4, 10, 64)  # many rows: the int8 weights are converted to float, exact up to float rounding
    assert torch.allclose(q(x), torch.nn.functional.linear(x, dequant, linear.bias), atol=1e-4)
    x = torch.randn(1, 1, 64)  # one row (decoding): the int8 kernel with bf16 activations, ~0.3 % off
    ref = torch.nn.functional.linear(x, dequant, linear.bias)
    assert q(x).shape == (1, 1, 48) and ((q(x) - ref).norm() / ref.norm()).item() < 1e-2


def test_int8_logits_close_to_fp32():
    model = tiny_model()
    idx = torch.randint(0, TINY["vocab_size"], (2, 16))
    with torch.no_grad():
        ref = model(idx)
        out = layers.quantize_int8(model)(idx)
    assert all(type(m) is not torch.nn.Linear for m in model.modules())
    # Each weight moves by at most half a step (max|row| / 254), i.e. ~0.4 % of its row's largest weight; through
    # two blocks that gives logit errors around 1 % of the logits' spread. 5 % of the spread is a loose bound that a
    # wrong scale (per tensor instead of per row, a transposed scale, a missing bias) breaks by far.
    err = (out - ref).abs().max().item()
    assert err < 0.05 * ref.std().item(), err
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() > 0.95


def test_int8_checkpoint_round_trip_is_smaller(tmp_path):
    model = tiny_model(vocab_size=256)  # small vocabulary: the Linear layers hold most of the weights
    fp32_path = M.save_checkpoint(tmp_path / "fp32.pth", model)
    layers.quantize_int8(model)
    int8_path = M.save_checkpoint(tmp_path / "int8.pth", model, quantize="int8")
    assert os.path.getsize(int8_path) < 0.5 * os.path.getsize(fp32_path)
    loaded, ckpt = checkpoints.load_pth(str(int8_path), int8_ok=True)
    assert isinstance(loaded.out_head, layers.Int8Linear) and ckpt["quantize"] == "int8"
    idx = torch.randint(0, 256, (1, 10))
    with torch.no_grad():
        assert torch.equal(loaded(idx), model(idx))
    # greedy decoding runs on int8 weights with the KV cache and matches recomputation
    assert torch.equal(M.generate(loaded, idx, 5), M.generate(loaded, idx, 5, use_cache=False))


def test_int8_checkpoint_with_tied_weights(tmp_path):
    model = layers.quantize_int8(tiny_model(tie_weights=True))
    path = M.save_checkpoint(tmp_path / "int8.pth", model)  # bare of extras: recognised by its weight_scale keys
    loaded, _ = checkpoints.load_pth(str(path), int8_ok=True)
    idx = torch.randint(0, TINY["vocab_size"], (1, 10))
    with torch.no_grad():
        assert torch.equal(loaded(idx), model(idx))
    assert loaded.tok_emb.weight.dtype == torch.float32 and loaded.out_head.weight.dtype == torch.int8


def test_generate_save_int8_writes_a_smaller_model_that_trains_nothing(tmp_path, capsys):
    model = tiny_model(vocab_size=256)
    fp32 = M.save_checkpoint(str(tmp_path / "fp32.pth"), model, kind="sft", template="alpaca", step=7)
    int8 = str(tmp_path / "int8.pth")
    generate_script.main(["--checkpoint", fp32, "--quantize", "int8", "--save_int8", int8, "--device", "cpu"])
    assert os.path.getsize(int8) < 0.5 * os.path.getsize(fp32)
    loaded, ckpt = checkpoints.load_pth(int8, int8_ok=True)
    # the other entries survive (generate.py --chat reads the template), and the weights are the quantized ones
    assert (ckpt["kind"], ckpt["template"], ckpt["step"], ckpt["quantize"]) == ("sft", "alpaca", 7, "int8")
    idx = torch.randint(0, 256, (1, 10))
    with torch.no_grad():
        assert torch.equal(loaded(idx), layers.quantize_int8(model)(idx))
    with pytest.raises(SystemExit) as e:
        generate_script.main(["--checkpoint", fp32, "--save_int8", int8])
    assert e.value.code == 2 and "--save_int8 writes int8 weights: add --quantize int8" in capsys.readouterr().err
    # the training scripts start from float weights only
    with pytest.raises(settings.UserError, match="holds int8 weights"):
        checkpoints.init_model(int8)
    assert isinstance(checkpoints.init_model(int8, int8_ok=True)[0].out_head, layers.Int8Linear)


# ---------------------------------------------------------------------------------------------------------------
# Generation leaves the model as it found it
# ---------------------------------------------------------------------------------------------------------------

def test_generate_changes_nothing_in_the_model():
    """The decode path is the model's own forward: after generate() the model has the same classes, parameters
    (values, memory layout, storage) and mode, so its training speed and its checkpoints are unaffected."""
    model = tiny_model(tie_weights=True).train()
    before = {k: (v.clone(), v.stride(), v.data_ptr()) for k, v in model.state_dict().items()}
    types = [type(m) for m in model.modules()]
    out = M.generate(model, torch.randint(0, TINY["vocab_size"], (1, 5)), 6, temperature=0.8, top_k=5,
                     generator=torch.Generator().manual_seed(0))
    assert out.shape == (1, 11) and model.training  # back in training mode
    assert [type(m) for m in model.modules()] == types
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, (value, stride, ptr) in before.items():
        assert torch.equal(after[k], value) and after[k].stride() == stride and after[k].data_ptr() == ptr, k
    assert model.out_head.weight is model.tok_emb.weight


# ---------------------------------------------------------------------------------------------------------------
# bench.py and the allocator setting it relies on
# ---------------------------------------------------------------------------------------------------------------

def test_bench_runs_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    result = bench.main(["--size", "tiny", "--context_length", "32", "--steps", "1", "--repeats", "1",
                         "--decode_tokens", "3", "--prompt_tokens", "4", "--matmul_size", "64",
                         "--bandwidth_mib", "1", "--compare", "off", "--compile", "off", "--json", str(out)])
    saved = json.loads(out.read_text())
    assert saved["results"].keys() == result["results"].keys()
    for key in ("matmul_fp32_gflops", "mem_read_gbs", "mem_copy_gbs", "train_fp32_tok_s", "train_fp32_mfu",
                "train_fp32_peak_mib", "decode_fp32_cache_tok_s", "decode_fp32_nocache_tok_s",
                "decode_int8_cache_tok_s", "prefill_fp32_tok_s", "prefill_int8_tok_s", "file_fp32_mib",
                "file_int8_mib"):
        assert saved["results"][key] > 0, key
    assert saved["results"]["file_int8_mib"] < saved["results"]["file_fp32_mib"]
    for key in ("train_fp32_compile_tok_s", "train_bf16_tok_s", "decode_bf16_cache_tok_s"):
        assert key in saved["results"] or key in saved["skipped"], key
    assert saved["transformers"] == "off"
    assert {"torch", "device", "threads", "native_bf16"} <= saved["machine"].keys()


def test_bench_rejects_bad_settings():
    with pytest.raises(SystemExit) as e:
        bench.main(["--size", "gpt3"])
    assert e.value.code == 2
    with pytest.raises(SystemExit):
        bench.main(["--context_length", "16", "--prompt_tokens", "10", "--decode_tokens", "10"])
    for bad in (["--nanogpt", "train.py"], ["--corpus", "x", "--nanogpt", "missing/train.py"]):
        with pytest.raises(SystemExit) as e:  # no race without a corpus and nanoGPT's train.py
            bench.main(bad)
        assert e.value.code != 0


def test_bench_prints_each_speed_beside_its_limit(tmp_path, capsys):
    out = tmp_path / "bench.json"
    bench.main(["--size", "tiny", "--context_length", "32", "--steps", "0", "--repeats", "1", "--decode_tokens", "3",
                "--prompt_tokens", "4", "--matmul_size", "64", "--bandwidth_mib", "1", "--compare", "off",
                "--int8", "false", "--json", str(out)])
    saved = json.loads(out.read_text())
    results, limit = saved["results"], saved["limits"]
    weights = TINY["n_layers"] * 12 * TINY["emb_dim"] ** 2 + TINY["emb_dim"] * TINY["vocab_size"]
    assert limit["decode_fp32_cache_tok_s"] == pytest.approx(results["mem_read_gbs"] * 1e9 / (4 * weights))
    assert "train_fp32_tok_s" not in results and "decode_int8_cache_tok_s" not in results
    row = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("decode fp32, KV cache"))
    share = 100 * results["decode_fp32_cache_tok_s"] / limit["decode_fp32_cache_tok_s"]
    assert f"{limit['decode_fp32_cache_tok_s']:,.1f} ({share:.0f} %)" in row


def test_bench_waits_for_idle_cpus_and_counts_runs(tmp_path):
    share = bench.others_cpu_share(0.05)
    assert 0.0 <= share <= 1.0
    out = tmp_path / "bench.json"
    bench.main(["--size", "tiny", "--context_length", "32", "--steps", "1", "--repeats", "1", "--decode_tokens", "3",
                "--prompt_tokens", "4", "--matmul_size", "64", "--bandwidth_mib", "1", "--compare", "off",
                "--int8", "false", "--bf16", "off", "--compile", "off", "--wait_idle", "0.1", "--json", str(out)])
    machine = json.loads(out.read_text())["machine"]
    # 3 matmul sizes + read + copy, 1 training step, 2 timings (1 and n tokens) for each of 2 decode entries (KV
    # cache or not), prefill
    assert machine["timed_runs"] == 5 + 1 + 2 * 2 + 1
    assert 0 <= machine["timed_runs_on_busy_cpus"] <= machine["timed_runs"]
    assert machine["load_average_before"] is None or machine["load_average_before"] >= 0


def test_keep_freed_memory_stops_big_buffers_from_going_back_to_the_system():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2
    except (OSError, AttributeError):
        pytest.skip("not glibc >= 2.33: keep_freed_memory is a no-op here")

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                          "fsmblks", "uordblks", "fordblks", "keepcost")]
    libc.mallinfo2.restype = MallInfo2

    def mmapped_growth_mib():  # a 64 MiB buffer: glibc's default is to mmap it (and unmap it when freed)
        before = libc.mallinfo2().hblkhd
        buf = torch.empty(16 * 2**20)
        grown = (libc.mallinfo2().hblkhd - before) / 2**20
        del buf
        return grown
    assert settings.keep_freed_memory() is True
    assert mmapped_growth_mib() == 0  # taken from the heap, whose freed memory stays for the next step


# ===============================================================================================================
# 9. Distributed: DDP and FSDP over 2 gloo processes, started the way torchrun starts them
# ===============================================================================================================

def distributed_worker(rank, world, port, runs, log_prefix):
    """One process of a torchrun-like launch (the same environment variables): calls main(argv) for each
    (main, argv, keep) of runs, and on rank 0 then copies keep = (file, copy) if given; stdout goes to
    log_prefix.<rank>."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    sys.stdout = open(f"{log_prefix}.{rank}", "w", buffering=1)
    for main, argv, keep in runs:
        main(argv)
        if rank == 0 and keep:
            shutil.copy(*keep)
    sys.stdout.flush()


def run_two_processes(runs, log_prefix):
    """distributed_worker in 2 processes, forked: they start with torch, the optimizer and matplotlib already
    imported, where a spawned process would import them again."""
    torch.multiprocessing.start_processes(distributed_worker, args=(2, free_port(), runs, log_prefix), nprocs=2,
                                          join=True, start_method="fork")


@slow
def test_ddp_and_fsdp_match_one_process_and_resume(tmp_path, verdict):
    # one process, batch 4: 2 steps, then resumed to 4
    one = tmp_path / "one"
    run_pretrain(verdict, one, "--batch_size", "4", "--max_steps", "2")
    one_2 = weights(one / "model.pth")
    run_pretrain(verdict, one, "--batch_size", "4", "--max_steps", "4", "--resume")
    one_4 = weights(one / "model.pth")

    # two processes, batch 2 each (same global batch): DDP and FSDP, each 2 steps then resumed to 4
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    runs = []
    for out, flags in ((ddp, []), (fsdp, ["--fsdp"])):
        base = short_pretrain_flags(verdict) + ["--out_dir", str(out), "--batch_size", "2"] + flags
        for steps in (["--max_steps", "2"], ["--max_steps", "4", "--resume"]):  # run i keeps model_<i>.pth
            runs.append((pretrain.main, base + steps, (out / "model.pth", out / f"model_{len(runs)}.pth")))
    dry_run = short_pretrain_flags(verdict) + ["--out_dir", str(tmp_path / "dry"), "--batch_size", "2", "--dry_run"]
    runs.append((pretrain.main, dry_run, None))
    log = str(tmp_path / "stdout")
    run_two_processes(runs, log)

    for out, first in ((ddp, 0), (fsdp, 2)):  # model_<i>.pth: what run i of the list wrote
        assert max_diff(weights(out / f"model_{first}.pth"), one_2) < 1e-5, out
        assert max_diff(weights(out / f"model_{first + 1}.pth"), one_4) < 1e-5, out
        state = M.read_checkpoint(str(out / trainer.TRAIN_STATE))
        assert state["step"] == 4 and state["world_size"] == 2 and len(state["rng_per_process"]) == 2
        assert not [k for k in state["model"] if k.startswith(("module.", "_orig_mod."))]
    # the same samples per step: the logs count the same global tokens
    assert M.read_checkpoint(str(ddp / trainer.TRAIN_STATE))["tokens_seen"] == \
        M.read_checkpoint(str(one / trainer.TRAIN_STATE))["tokens_seen"]

    printed = open(log + ".0").read()
    assert printed.count("DDP over 2 processes (gloo)") == 3  # the first line of each of the three runs
    assert printed.count("FSDP over 2 processes (gloo)") == 2
    assert "2 processes" in printed and "--dry_run" in printed
    assert open(log + ".1").read() == ""  # rank 1 prints nothing
    assert not (tmp_path / "dry").exists()

    # a checkpoint of 2 processes cannot be resumed by 1
    with pytest.raises(settings.UserError, match="written by 2 processes"):
        run_pretrain(verdict, ddp, "--batch_size", "4", "--max_steps", "6", "--resume")


def test_fsdp_without_torchrun_is_a_clear_error(tmp_path, verdict):
    with pytest.raises(settings.UserError, match="torchrun --nproc_per_node"):
        run_pretrain(verdict, tmp_path, "--fsdp", "--max_steps", "1")


def test_distributed_sampler_deals_out_the_one_process_order():
    # the sampler of process r takes every 2nd window of the permutation one process draws for (seed, epoch)
    items = list(range(11))
    one = list(RandomSampler(items, generator=torch.Generator().manual_seed(7 * 1000 + 3)))
    shares = []
    for r in range(2):
        s = DistributedSampler(items, num_replicas=2, rank=r, shuffle=True, seed=7 * 1000, drop_last=True)
        s.set_epoch(3)
        shares.append(list(s))
    assert shares[0] == one[0:10:2] and shares[1] == one[1:10:2]
    assert trainer.any_process(True) and not trainer.any_process(False)  # one process: the flag itself
    assert trainer.world_size() == 1 and trainer.is_main_process() and trainer.describe_distributed({}) == ""


def test_cls_two_processes_equal_one_process(tmp_path):
    csv_path = write_spam_ham_csv(tmp_path / "texts.csv")
    base = cls_flags(drop_rate=0, dtype="float32") + ["--csv", csv_path, "--max_steps", "3", "--lr", "2e-4"]
    one, two, dry = tmp_path / "one", tmp_path / "two", tmp_path / "dry"
    finetune_cls.main(base + ["--out_dir", str(one), "--batch_size", "4"])

    runs = [(finetune_cls.main, base + ["--out_dir", str(two), "--batch_size", "2"], None),
            (finetune_cls.main, base + ["--out_dir", str(dry), "--batch_size", "2", "--dry_run"], None)]
    log = str(tmp_path / "stdout")
    run_two_processes(runs, log)

    w1 = M.read_checkpoint(str(one / finetune_cls.CSV_CLASSIFIER))["model"]
    w2 = M.read_checkpoint(str(two / finetune_cls.CSV_CLASSIFIER))["model"]
    assert w1.keys() == w2.keys()
    # 3 Adam steps move weights by ~5e-4; unaveraged gradients would leave the processes' copies that far apart.
    # Rounding (batches cut to different lengths, sums in another order) stays near 3e-6 at this lr (Adam
    # magnifies it where a gradient is almost 0; at lr 1e-3 it reached 1.4e-5)
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-5
    assert M.read_checkpoint(str(two / "model_and_optimizer.pth"))["step"] == 3
    for name in ("train.csv", "validation.csv", "test.csv", "metrics.json", "log.csv"):
        assert (two / name).read_text() != "", name  # written once, by rank 0
    assert json.loads((two / "metrics.json").read_text())["class_names"] == ["ham", "spam"]
    printed = open(log + ".0").read()
    assert "DDP over 2 processes (gloo)" in printed and "2 processes" in printed and "--dry_run" in printed
    assert open(log + ".1").read() == ""  # rank 1 prints nothing
    assert not dry.exists()


# ===============================================================================================================
# 10. Faults: kill and resume, disk full, bad input, hostile files
# ===============================================================================================================

STATE = "model_and_optimizer.pth"


def words_text(n_words, seed=0):
    """Deterministic English-like text: no dependence on ../shared/data."""
    rng = random.Random(seed)
    vocab = ("the a house painter verdict moves every effort you said she he was not only but also picture never "
             "gallery morning light rich wife studio sketch brush colour looked") .split()
    lines = []
    for _ in range(n_words // 12):
        lines.append(" ".join(rng.choice(vocab) for _ in range(12)).capitalize() + ".")
    return "\n".join(lines) + "\n"


def sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def tree_hashes(folder):
    out = {}
    for dirpath, _, names in os.walk(folder):
        for name in names:
            p = os.path.join(dirpath, name)
            out[os.path.relpath(p, folder)] = sha(p) if os.path.isfile(p) else "not a regular file"  # never open a pipe
    return out


def write_random_sms_csv(path, n=80, seed=0):
    """n texts of 3-8 random words, alternately from a ham and a spam vocabulary, with the columns Text, Label."""
    rng = random.Random(seed)
    spam, ham = "free win cash prize call now offer claim".split(), "hello meet lunch tomorrow see you later".split()
    rows = []
    for i in range(n):
        pool = spam if i % 2 else ham
        rows.append([" ".join(rng.choice(pool) for _ in range(rng.randint(3, 8))), "spam" if i % 2 else "ham"])
    return write_csv(path, rows, header=("Text", "Label"))


# ---------------------------------------------------------------------------------------------------------------
# Kill and resume: SIGKILL at random moments and while a checkpoint is written, SIGTERM and SIGINT; the run ends
# with the weights of an uninterrupted one
# ---------------------------------------------------------------------------------------------------------------

def _tmp_files(out_dir):
    return [f for f in os.listdir(out_dir) if f.startswith(STATE + ".") and f.endswith(".tmp")] \
        if os.path.isdir(out_dir) else []


def _mtime(path):
    try:
        return os.stat(path).st_mtime_ns
    except FileNotFoundError:
        return None


def run_with_faults(cmd, out_dir, plan, seed, log_path, cwd):
    """Run cmd to completion, interrupting it as `plan` says, one entry per life of the process:
    'kill' (SIGKILL at a random moment after the life wrote one checkpoint), 'tmp' (SIGKILL while a checkpoint's
    .tmp file is being written), 'term' / 'int' (SIGTERM / SIGINT, which must save and exit 143 / 130).
    Before each restart the checkpoint must load. Returns a list of (event, step of the checkpoint after it)."""
    rng = random.Random(seed)
    state = os.path.join(out_dir, STATE)
    events = []
    plan = list(plan)
    while True:
        resume = os.path.exists(state)
        if resume:
            ckpt = M.read_checkpoint(state)  # every resume finds a loadable checkpoint
            assert "optimizer" in ckpt and ckpt["step"] >= (events[-1][1] if events else 0)
        with open(log_path, "ab") as log:
            p = subprocess.Popen(cmd + (["--resume"] if resume else []), cwd=cwd, env=ENV, stdout=log,
                                 stderr=subprocess.STDOUT)
        what = plan.pop(0) if plan else None
        try:
            if what is not None:
                before = _mtime(state)
                while p.poll() is None and _mtime(state) == before:  # let this life write one checkpoint
                    time.sleep(0.005)
                if what == "tmp":
                    t_end = time.time() + 20
                    while p.poll() is None and not _tmp_files(out_dir) and time.time() < t_end:
                        time.sleep(0.001)
                elif what == "kill":
                    time.sleep(rng.uniform(0.0, 0.5))
                if p.poll() is None:
                    p.send_signal({"kill": signal.SIGKILL, "tmp": signal.SIGKILL, "term": signal.SIGTERM,
                                   "int": signal.SIGINT}[what])
            rc = p.wait(timeout=120)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        if rc == 0:
            return events
        text = open(log_path, "rb").read().decode(errors="replace")
        assert "Traceback" not in text, text[-3000:]
        if what in ("term", "int"):
            assert rc == (143 if what == "term" else 130), text[-2000:]
            last = [ln for ln in text.replace("\r", "\n").splitlines() if "saved" in ln and "--resume" in ln][-1]
            step = int(last.split(" at step ")[1].split(":")[0])
            assert M.read_checkpoint(state)["step"] == step  # a loadable checkpoint at the step printed
        else:
            assert rc == -signal.SIGKILL, (rc, text[-2000:])
        events.append((what, M.read_checkpoint(state)["step"] if os.path.exists(state) else 0))


def _pretrain_cmd(data_path, out_dir, epochs, save_every):
    return [sys.executable, os.path.join(HERE, "pretrain.py"), "--data", data_path, "--out_dir", out_dir,
            *tiny_flags(context_length=32, batch_size=2, drop_rate=0.1, tie_weights="true", epochs=epochs,
                        save_every=save_every, sample_prompt="", eval_freq=5)]


@slow
@ci_and_long("the 20-kill variant")
def test_pretrain_survives_kills_and_matches_an_uninterrupted_run(tmp_path, long):
    (tmp_path / "t.txt").write_text(words_text(600))  # about 10 batches of 2 x 32 tokens per epoch
    epochs, save_every = (6, 1) if long else (2, 2)
    # the reference runs beside the faulty one (the machine has 2 cores)
    ref = subprocess.Popen(_pretrain_cmd("t.txt", "ref", epochs, save_every), cwd=tmp_path, env=ENV,
                           stdout=subprocess.DEVNULL, stderr=open(tmp_path / "ref.log", "wb"))
    if long:
        plan = ["tmp" if i % 3 == 0 else "kill" for i in range(22)] + ["term", "int"]
    else:
        plan = ["tmp", "kill", "term", "int", "tmp"]
    events = run_with_faults(_pretrain_cmd("t.txt", "run", epochs, save_every), str(tmp_path / "run"), plan, 7,
                             str(tmp_path / "run.log"), tmp_path)
    assert ref.wait(timeout=300) == 0, (tmp_path / "ref.log").read_text()[-2000:]
    kills = [e for e in events if e[0] in ("kill", "tmp")]
    assert len(kills) >= (20 if long else 3) and {e[0] for e in events} >= {"term", "int", "tmp"}, events
    assert max_diff(weights(tmp_path / "ref" / "model.pth"), weights(tmp_path / "run" / "model.pth")) <= 1e-6
    assert M.read_checkpoint(tmp_path / "run" / "model.pth")["step"] == \
        M.read_checkpoint(tmp_path / "ref" / "model.pth")["step"]
    # disk full, on the finished reference run
    assert_disk_full_keeps_the_checkpoint(str(tmp_path / "ref"), _pretrain_cmd("t.txt", "ref", epochs, save_every),
                                          tmp_path)


def _cls_cmd(out_dir, save_every):
    return [sys.executable, os.path.join(HERE, "finetune_cls.py"), "--csv", "sms.csv", "--init", "scratch",
            "--trainable", "all", *tiny_flags(), "--max_length", "16", "--batch_size", "4", "--drop_rate", "0.1",
            "--epochs", "2", "--save_every", str(save_every), "--eval_freq", "5", "--out_dir", out_dir]


@slow
@ci_and_long("the long variant")
def test_finetune_cls_survives_kills_and_matches_an_uninterrupted_run(tmp_path, long):
    write_random_sms_csv(tmp_path / "sms.csv")
    save_every = 1 if long else 2
    ref = subprocess.Popen(_cls_cmd("ref", save_every), cwd=tmp_path, env=ENV, stdout=subprocess.DEVNULL,
                           stderr=open(tmp_path / "ref.log", "wb"))
    plan = ["tmp", "kill"] * 4 if long else ["tmp", "kill"]
    events = run_with_faults(_cls_cmd("run", save_every), str(tmp_path / "run"), plan, 11,
                             str(tmp_path / "run.log"), tmp_path)
    assert ref.wait(timeout=300) == 0, (tmp_path / "ref.log").read_text()[-2000:]
    assert len(events) == len(plan), events
    ref_ckpt, run_ckpt = tmp_path / "ref" / "classifier.pth", tmp_path / "run" / "classifier.pth"
    assert max_diff(weights(ref_ckpt), weights(run_ckpt)) <= 1e-6
    ref_m, run_m = (json.load(open(tmp_path / d / "metrics.json")) for d in ("ref", "run"))
    scores = ["train", "val", "test"]
    assert scores and {k: ref_m[k] for k in scores} == {k: run_m[k] for k in scores}


# ---------------------------------------------------------------------------------------------------------------
# Disk full: the failed save says so in one line and the previous checkpoint stays intact (run at the end of the
# pretrain kill test, on its finished reference run)
# ---------------------------------------------------------------------------------------------------------------

def _limit_file_size(n_bytes):
    def preexec():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (n_bytes, n_bytes))
    return preexec


def assert_disk_full_keeps_the_checkpoint(folder, cmd, cwd):
    """Resume the finished run in `folder` for more epochs under a 1 MB file-size limit: the first checkpoint write
    fails with one clear line, and every earlier file stays as it was and loads."""
    before = tree_hashes(folder)
    step = M.read_checkpoint(os.path.join(folder, STATE))["step"]
    logged = trainer.read_log(os.path.join(folder, "log.csv"))
    i = cmd.index("--epochs")
    r = subprocess.run(cmd[:i + 1] + [str(int(cmd[i + 1]) + 1)] + cmd[i + 2:] + ["--save_every", "1", "--resume"],
                       cwd=cwd, env=ENV, capture_output=True, text=True, preexec_fn=_limit_file_size(1 << 20))
    assert r.returncode == 1, r.stderr[-2000:]
    lines = [ln[ln.index("error:"):] for ln in r.stderr.replace("\r", "\n").splitlines() if "error:" in ln]
    assert "Traceback" not in r.stderr and len(lines) == 1, r.stderr[-2000:]
    assert "could not write" in lines[0] and STATE in lines[0] and "free disk space" in lines[0]
    after = tree_hashes(folder)
    recorded = json.load(open(os.path.join(folder, "settings.json")))
    assert recorded["resumed"] and recorded["settings"]["resume"] is False  # the resume is recorded, the start kept
    after.pop("settings.json"), before.pop("settings.json")
    after.pop("log.csv"), before.pop("log.csv")  # the step log runs ahead of the state: a resume reconciles them
    assert after == before  # nothing else changed, no .tmp left behind
    assert M.read_checkpoint(os.path.join(folder, STATE))["step"] == step
    assert [r for r in trainer.read_log(os.path.join(folder, "log.csv")) if r["step"] <= step] == logged
    M.load_model(os.path.join(folder, "model.pth"))


# ---------------------------------------------------------------------------------------------------------------
# Bad input table: every entry script, one clear line, nothing earlier touched
# ---------------------------------------------------------------------------------------------------------------

# Imports torch and the project once, then forks one child per case; the child runs the script as __main__ with
# the case's argv and cwd, stdin from /dev/null and stdout/stderr to files, and exits as `python script.py` would.
FORK_SERVER = r"""
import json, os, runpy, sys, traceback
root = sys.argv[1]
sys.path.insert(0, root)
import torch, tqdm, requests, numpy
import data, model, pretrain, generate, load_gpt2, finetune_cls, finetune_chat, bench
data.get_tokenizer()
cases, workers = json.load(sys.stdin), int(sys.argv[2])
running, results = {}, {}

def child(case):
    os.chdir(case["cwd"])
    for fd, name, flags in ((0, os.devnull, os.O_RDONLY), (1, case["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                            (2, case["err"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
        os.dup2(os.open(name, flags, 0o644), fd)
    sys.argv = [case["script"]] + case["args"]
    code = 0
    try:
        runpy.run_path(os.path.join(root, case["script"]), run_name="__main__")
    except SystemExit as e:
        code = 0 if e.code is None else e.code if isinstance(e.code, int) else 1
        if not isinstance(e.code, (int, type(None))):
            print(e.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

todo = list(enumerate(cases))
while todo or running:
    while todo and len(running) < workers:
        i, case = todo.pop(0)
        pid = os.fork()
        if pid == 0:
            child(case)
        running[pid] = i
    pid, status = os.wait()
    results[running.pop(pid)] = os.waitstatus_to_exitcode(status)
json.dump([results[i] for i in range(len(cases))], sys.stdout)
"""


def run_cases(cases, cwd, tmp_path, workers=3):
    """cases: [(script, args)] -> [(returncode, stdout, stderr)], each run in its own forked process."""
    specs = [{"script": s, "args": list(a), "cwd": str(cwd), "out": str(tmp_path / f"case{i}.out"),
              "err": str(tmp_path / f"case{i}.err")} for i, (s, a) in enumerate(cases)]
    r = subprocess.run([sys.executable, "-c", FORK_SERVER, HERE, str(workers)], input=json.dumps(specs),
                       capture_output=True, text=True, env=ENV, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    codes = json.loads(r.stdout)
    return [(c, open(s["out"], errors="replace").read(), open(s["err"], errors="replace").read())
            for c, s in zip(codes, specs)]


def make_bad_inputs(w):
    """Write the table's input files into folder w; returns nothing, the names are used below."""
    w.mkdir(exist_ok=True)
    (w / "good.txt").write_text(words_text(600))
    (w / "empty.txt").write_bytes(b"")
    (w / "binary.txt").write_bytes(bytes(range(256)) * 8)
    (w / "latin1.txt").write_bytes("Caf\xe9 au lait, na\xefve r\xe9sum\xe9. ".encode("latin-1") * 20)
    (w / "notxt").mkdir()
    (w / "notxt" / "notes.csv").write_text("not,a,text,file\n")
    (w / "emptydir").mkdir()
    (w / "afile").write_text("a regular file, not a folder\n")
    write_random_sms_csv(w / "ok.csv")
    (w / "empty.csv").write_bytes(b"")
    (w / "cols.csv").write_text("message,category\nhello,ham\nwin cash,spam\n")
    (w / "header_only.csv").write_text("Text,Label\n")
    (w / "one_class.csv").write_text("Text,Label\n" + "".join(f"hello {i},ham\n" for i in range(40)))
    (w / "no_label.csv").write_text("Text,Label\nhello,ham\nwin cash,\n")
    (w / "latin1.csv").write_bytes("Text,Label\nCaf\xe9,ham\nwin,spam\n".encode("latin-1"))
    (w / "binary.csv").write_bytes(b"Text,Label\n\x00\x01\x02\xff\xfe,ham\n")
    (w / "huge_line.csv").write_text("Text,Label\n" + "x" * 300_000 + ",ham\nwin,spam\n")
    (w / "huge_line.txt").write_text("y" * 300_000)
    rec = {"instruction": "Say hi", "input": "", "output": "hi"}
    (w / "chat_ok.json").write_text(json.dumps([rec] * 30))
    (w / "chat_object.json").write_text(json.dumps({"instruction": "x"}))
    (w / "chat_strings.json").write_text(json.dumps(["a", "b"]))
    (w / "chat_no_output.json").write_text(json.dumps([{"instruction": "x", "input": ""}] * 5))
    (w / "chat_truncated.json").write_text('[{"instruction": "x", "input": ')
    (w / "chat_empty.json").write_bytes(b"")
    (w / "chat_no_records.json").write_text("[]")
    (w / "chat_number.json").write_text(json.dumps([{"instruction": 1, "input": "", "output": "y"}] * 5))
    (w / "chat_bad_messages.json").write_text(json.dumps([{"messages": [{"role": "user"}]}] * 5))
    (w / "chat_binary.json").write_bytes(b"\x00\xff\xfe\x01" * 100)
    (w / "chat_latin1.json").write_bytes('[{"instruction": "caf\xe9", "input": "", "output": "x"}]'.encode("latin-1"))
    lm = tiny_model(tie_weights=False)
    M.save_checkpoint(str(w / "lm.pth"), lm, kind="pretrain")
    cls = tiny_model(tie_weights=False)
    cls.out_head = torch.nn.Linear(32, 2)
    M.save_checkpoint(str(w / "cls.pth"), cls, kind="cls", class_names=["ham", "spam"], max_length=16)
    cls.out_head = torch.nn.Linear(32, 40)  # more classes than emb_dim: its bias cannot be folded into ln_f
    M.save_checkpoint(str(w / "cls_40.pth"), cls, kind="cls", class_names=[f"c{i}" for i in range(40)], max_length=16)
    (w / "zero.pth").write_bytes(b"")
    raw = (w / "lm.pth").read_bytes()
    (w / "truncated.pth").write_bytes(raw[: len(raw) // 2])
    (w / "text.pth").write_text("this is not a checkpoint\n")
    torch.save(torch.zeros(3), w / "tensor.pth")
    sd = lm.state_dict()
    sd["trf_blocks.0.att.W_query.weight"] = torch.zeros(16, 32)
    torch.save(sd, w / "wrong_shape.pth")  # a bare state_dict with one tensor of the wrong shape
    (w / "garbage.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    damaged = bytearray(raw)
    damaged[len(raw) // 2:len(raw) // 2 + 32] = bytes(32)  # inside a tensor: only the zip's checksums tell
    (w / "damaged.pth").write_bytes(bytes(damaged))
    (w / "nul.txt").write_bytes(bytes(4096))
    (w / "unterm.csv").write_text('Text,Label\nhello,ham\n"win cash now,spam\n' + "more,ham\n" * 30)
    os.mkfifo(w / "pipe.txt")  # opening it for reading would wait for a writer forever
    # earlier outputs of runs that the bad runs must not touch
    for name in ("pre", "noopt", "wide"):
        (w / "runs" / name).mkdir(parents=True)
    M.save_checkpoint(str(w / "runs" / "pre" / "model.pth"), lm, kind="pretrain")
    (w / "runs" / "pre" / "log.csv").write_text("step,train_loss\n1,10.9\n")
    M.save_checkpoint(str(w / "runs" / "noopt" / STATE), lm, kind="pretrain")  # no optimizer state
    wide = tiny_model(emb_dim=64, tie_weights=False)
    files.save_pth(str(w / "runs" / "wide" / STATE), {
        "model": wide.state_dict(), "config": dict(wide.cfg), "kind": "pretrain", "optimizer": {}, "step": 1,
        "epoch": 0, "batch_pos": 1, "tokens_seen": 64, "rng": torch.get_rng_state(), "log": []})


def bad_input_cases():
    """(script, args, words the one-line message must contain)"""
    P = ["--data", "good.txt", "--out_dir", "runs/new", *tiny_flags(), "--context_length", "32", "--epochs", "1",
         "--sample_prompt", ""]
    G = ["--checkpoint", "lm.pth", "--device", "cpu", "--max_new_tokens", "3"]
    C = ["--csv", "ok.csv", "--init", "scratch", "--trainable", "all", *tiny_flags(max_length=16, epochs=1),
         "--out_dir", "runs/newcls"]
    H = ["--data", "chat_ok.json", "--init", "scratch", *tiny_flags(), "--context_length", "32", "--epochs", "1",
         "--max_new_tokens", "0", "--out_dir", "runs/newchat"]
    L = ["--models_dir", "models"]
    B = ["--size", "tiny", "--steps", "1", "--repeats", "1", "--decode_tokens", "2", "--device", "cpu"]
    return [
        # pretrain.py: files
        ("pretrain.py", P + ["--data", "missing.txt"], "no file at"),
        ("pretrain.py", P + ["--data", "empty.txt"], "holds no text"),
        ("pretrain.py", P + ["--data", "binary.txt"], "binary"),
        ("pretrain.py", P + ["--data", "latin1.txt"], "not UTF-8"),
        ("pretrain.py", P + ["--data", "notxt"], "no readable .txt, .md or .jsonl files"),
        ("pretrain.py", P + ["--data", "emptydir"], "no readable .txt, .md or .jsonl files"),
        ("pretrain.py", P + ["--context_length", "4096"], "too short"),
        ("pretrain.py", P + ["--out_dir", "afile"], "is a file"),
        ("pretrain.py", P + ["--out_dir", "afile/sub"], "afile/sub"),
        # pretrain.py: settings
        ("pretrain.py", P + ["--batch_size", "0"], "--batch_size"),
        ("pretrain.py", P + ["--lr", "-1"], "--lr"),
        ("pretrain.py", P + ["--drop_rate", "1.5"], "--drop_rate"),
        ("pretrain.py", P + ["--train_ratio", "1.5"], "--train_ratio"),
        ("pretrain.py", P + ["--grad_accum_steps", "0"], "--grad_accum_steps"),
        ("pretrain.py", P + ["--lr_schedule", "linear"], "--lr_schedule"),
        ("pretrain.py", P + ["--model", "gpt5"], "--model"),
        ("pretrain.py", P + ["--emb_dim", "33"], "divisible"),
        ("pretrain.py", P + ["--epochs", "many"], "--epochs"),
        ("pretrain.py", P + ["--n_layer", "2"], "--n_layer"),
        ("pretrain.py", P + ["--device", "cuda"], "cuda"),
        ("pretrain.py", P + ["--dtype", "float8"], "dtype"),
        # pretrain.py: checkpoints
        ("pretrain.py", P + ["--init", "missing.pth"], "missing.pth"),
        ("pretrain.py", P + ["--init", "zero.pth"], "empty"),
        ("pretrain.py", P + ["--init", "truncated.pth"], "truncated.pth"),
        ("pretrain.py", P + ["--init", "text.pth"], "text.pth"),
        ("pretrain.py", P + ["--init", "tensor.pth"], "tensor.pth"),
        ("pretrain.py", P + ["--init", "wrong_shape.pth"], "n_heads"),
        ("pretrain.py", P + ["--init", "lm.pth", "--context_length", "64"], "context_length"),
        ("pretrain.py", P + ["--init", "garbage.safetensors"], "garbage.safetensors"),
        ("pretrain.py", P + ["--resume", "--out_dir", "runs/empty_run"], "--resume"),
        ("pretrain.py", P + ["--resume", "--out_dir", "runs/noopt"], "optimizer"),
        ("pretrain.py", P + ["--resume", "--out_dir", "runs/wide"], "does not fit"),
        ("pretrain.py", P + ["--data", "nul.txt"], "binary"),
        ("pretrain.py", P + ["--data", ""], "--data is empty"),
        ("pretrain.py", P + ["--init", "damaged.pth"], "damaged"),
        ("pretrain.py", P + ["--cache_dir", "afile"], "regular file"),
        ("pretrain.py", P + ["--cache_dir", "afile/cache"], "regular file"),
        ("pretrain.py", P + ["--lr", "1e-4", "--min_lr", "5", "--lr_schedule", "cosine"], "--min_lr"),
        ("pretrain.py", P + ["--seed", str(2**64)], "--seed"),
        ("pretrain.py", P + ["--data", "good.txt", "--init", "runs/pre/model.pth", "--out_dir", "runs/pre",
                             "--overwrite"], "--init input"),
        # generate.py
        ("generate.py", G + ["--checkpoint", "missing.pth"], "no checkpoint"),
        ("generate.py", G + ["--checkpoint", "zero.pth"], "empty"),
        ("generate.py", G + ["--checkpoint", "truncated.pth"], "truncated.pth"),
        ("generate.py", G + ["--checkpoint", "text.pth"], "text.pth"),
        ("generate.py", G + ["--checkpoint", "tensor.pth"], "tensor.pth"),
        ("generate.py", G + ["--checkpoint", "cls.pth"], "is a classifier"),
        ("generate.py", G + ["--checkpoint", "wrong_shape.pth"], "n_heads"),
        ("generate.py", G + ["--temperature", "-1"], "--temperature"),
        ("generate.py", G + ["--top_p", "0"], "--top_p"),
        ("generate.py", G + ["--top_k", "-3"], "--top_k"),
        ("generate.py", G + ["--max_new_tokens", "lots"], "--max_new_tokens"),
        ("generate.py", G + ["--prompt", ""], "--prompt"),
        ("generate.py", G + ["--prompt", "word " * 200, "--num_beams", "2"], "context"),
        ("generate.py", G + ["--quantize", "int4"], "--quantize"),
        ("generate.py", G + ["--num_beams", "0"], "--num_beams"),
        ("generate.py", G + ["--tempreature", "0.5"], "--tempreature"),
        ("generate.py", G + ["--init", "missing.safetensors"], "missing.safetensors"),
        ("generate.py", G + ["--checkpoint", "damaged.pth"], "damaged"),
        ("generate.py", G + ["--prompt_file", "pipe.txt"], "not a regular file"),
        ("generate.py", G + ["--prompt_file", "missing.txt"], "--prompt_file"),
        ("generate.py", G + ["--quantize", "int8", "--save_int8", "pipe.txt"], "not a regular file"),
        ("generate.py", G + ["--quantize", "int8", "--save_int8", "good.txt"], "already exists"),
        ("generate.py", G + ["--show_probs", "--probs_plot", "probs.csv"], ".png"),
        ("generate.py", G + ["--seed", "-5"], "--seed"),
        # finetune_cls.py
        ("finetune_cls.py", C + ["--csv", "missing.csv"], "no CSV file"),
        ("finetune_cls.py", C + ["--csv", "empty.csv"], "empty"),
        ("finetune_cls.py", C + ["--csv", "cols.csv"], "no column"),
        ("finetune_cls.py", C + ["--csv", "header_only.csv"], "no rows"),
        ("finetune_cls.py", C + ["--csv", "one_class.csv"], "single class"),
        ("finetune_cls.py", C + ["--csv", "no_label.csv"], "empty 'Label'"),
        ("finetune_cls.py", C + ["--csv", "latin1.csv"], "not UTF-8"),
        ("finetune_cls.py", C + ["--csv", "binary.csv"], "binary.csv"),
        ("finetune_cls.py", C + ["--csv", "huge_line.csv"], "huge_line.csv"),
        ("finetune_cls.py", C + ["--train_csv", "ok.csv", "--csv", ""], "--val_csv"),
        ("finetune_cls.py", C + ["--trainable", "everything"], "--trainable"),
        ("finetune_cls.py", C + ["--trainable", "lora", "--lora_rank", "0"], "--lora_rank"),
        ("finetune_cls.py", C + ["--out_dir", "afile"], "is a file"),
        ("finetune_cls.py", C + ["--batch_size", "eight"], "--batch_size"),
        ("finetune_cls.py", ["--predict", "hi", "--checkpoint", "lm.pth", "--device", "cpu"], "not a classifier"),
        ("finetune_cls.py", ["--predict", "hi", "--checkpoint", "zero.pth", "--device", "cpu"], "empty"),
        ("finetune_cls.py", ["--predict", "hi", "--checkpoint", "missing.pth", "--device", "cpu"], "no classifier"),
        ("finetune_cls.py", ["--predict", "   ", "--checkpoint", "cls.pth", "--device", "cpu"], "whitespace"),
        ("finetune_cls.py", ["--predict_file", "missing.txt", "--checkpoint", "cls.pth"], "no file"),
        ("finetune_cls.py", ["--predict_file", "empty.txt", "--checkpoint", "cls.pth"], "no non-empty lines"),
        ("finetune_cls.py", ["--predict_file", "binary.txt", "--checkpoint", "cls.pth"], "binary"),
        ("finetune_cls.py", ["--predict_file", "emptydir", "--checkpoint", "cls.pth"], "is a folder"),
        ("finetune_cls.py", ["--predict_file", "pipe.txt", "--checkpoint", "cls.pth"], "not a regular file"),
        ("finetune_cls.py", ["--save_int8", "ok.csv", "--checkpoint", "cls.pth"], "already exists"),
        ("finetune_cls.py", C + ["--csv", "unterm.csv"], "never closed"),
        ("finetune_cls.py", C + ["--text_column", "Label"], "two different columns"),
        ("finetune_cls.py", C + ["--checkpoint", "ok.csv"], "--csv input"),
        # finetune_chat.py
        ("finetune_chat.py", H + ["--data", "missing.json"], "missing.json"),
        ("finetune_chat.py", H + ["--data", "chat_object.json"], "list"),
        ("finetune_chat.py", H + ["--data", "chat_strings.json"], "record"),
        ("finetune_chat.py", H + ["--data", "chat_no_output.json"], "'output'"),
        ("finetune_chat.py", H + ["--data", "chat_truncated.json"], "malformed JSON"),
        ("finetune_chat.py", H + ["--data", "chat_empty.json"], "chat_empty.json"),
        ("finetune_chat.py", H + ["--data", "chat_no_records.json"], "no records"),
        ("finetune_chat.py", H + ["--data", "chat_number.json"], "expected text"),
        ("finetune_chat.py", H + ["--data", "chat_bad_messages.json"], "content"),
        ("finetune_chat.py", H + ["--data", "chat_binary.json"], "chat_binary.json"),
        ("finetune_chat.py", H + ["--data", "chat_latin1.json"], "not UTF-8"),
        ("finetune_chat.py", H + ["--method", "ppo"], "--method"),
        ("finetune_chat.py", H + ["--method", "dpo", "--init", "lm.pth"], "chosen"),
        ("finetune_chat.py", H + ["--train_ratio", "0.95", "--test_ratio", "0.1"], "--train_ratio"),
        ("finetune_chat.py", H + ["--out_dir", "afile/sub"], "afile/sub"),
        ("finetune_chat.py", H + ["--init", "zero.pth"], "empty"),
        ("finetune_chat.py", H + ["--max_new_tokens", "2.5"], "whole number"),
        ("finetune_chat.py", H + ["--split_seed", "-2"], "--split_seed"),
        ("finetune_chat.py", H + ["--init", "damaged.pth"], "damaged"),
        # load_gpt2.py
        ("load_gpt2.py", L + ["--model", "gpt5"], "unknown model"),
        ("load_gpt2.py", L + ["--model", "garbage.safetensors"], "not valid JSON"),
        ("load_gpt2.py", L + ["--export", "missing.pth", "--out", "hf"], "no checkpoint"),
        ("load_gpt2.py", L + ["--export", "lm.pth"], "--out"),
        ("load_gpt2.py", L + ["--export", "lm.pth", "--out", "afile"], "not a folder"),
        ("load_gpt2.py", L + ["--export", "cls_40.pth", "--out", "hf"], "cannot move into ln_f"),
        ("load_gpt2.py", L + ["--export", "zero.pth", "--out", "hf"], "empty"),
        ("load_gpt2.py", L + ["--export", "truncated.pth", "--out", "hf"], "truncated.pth"),
        # bench.py
        ("bench.py", B + ["--size", "huge"], "--size"),
        ("bench.py", B + ["--steps", "-1"], "--steps"),
        ("bench.py", B + ["--repeats", "0"], "--repeats"),
        ("bench.py", B + ["--bf16", "maybe"], "--bf16"),
        ("bench.py", B + ["--context_length", "8", "--prompt_tokens", "16"], "fit"),
        ("bench.py", B + ["--json", "good.txt"], "already exists"),
        ("bench.py", B + ["--json", "pipe.txt"], "not a regular file"),
    ]


FIX_WORDS = ("pass", "use", "run", "lower", "add", "check", "put", "delete", "choose", "convert", "train", "drop",
             "set", "give", "pick", "remove", "free", "start", "fix", "raise", "shorten", "fill", "expected", "need",
             "must", "usage", "rerun", "instead", "one of")


def one_clear_line(rc, err):
    """The refusal is one line (argparse adds its usage line) naming the problem and how to fix it."""
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if ln.strip()]
    if rc == 2 and lines and lines[0].startswith("usage:"):  # argparse: the usage line is the fix
        lines = [ln for ln in lines if not ln.startswith((" ", "usage:"))]
        return len(lines) == 1 and ": error:" in lines[0], lines
    return len(lines) == 1 and lines[0].startswith("error:") and any(w in lines[0].lower() for w in FIX_WORDS), lines


@slow
def test_bad_input_table(tmp_path):
    w = tmp_path / "w"
    make_bad_inputs(w)
    cases = bad_input_cases()
    assert len(cases) >= 60
    # the cases run three at a time: each new run gets a folder of its own (one folder holds one run at a time)
    cases = [(s, [f"{a}-{i}" if a.startswith("runs/new") else a for a in args], words)
             for i, (s, args, words) in enumerate(cases)]
    before = tree_hashes(w)
    results = run_cases([(s, a) for s, a, _ in cases], w, tmp_path)
    problems = []
    for (script, args, words), (rc, out, err) in zip(cases, results):
        ok, lines = one_clear_line(rc, err)
        if rc == 0 or "Traceback" in err or not ok or words.lower() not in err.lower():
            problems.append(f"{script} {' '.join(args[-4:])!r}: rc {rc}, stderr {err[-600:]!r}")
    assert not problems, "\n".join(problems)
    # every earlier file as it was, and no new file (no .tmp, no partial output); token caches of the inputs read
    # (data/token-cache) may stay: they are checked against their sources whenever they are used
    after = {k: v for k, v in tree_hashes(w).items() if not k.startswith("data/token-cache/")}
    assert after == before


# ---------------------------------------------------------------------------------------------------------------
# Hostile and corrupt files, stalled downloads
# ---------------------------------------------------------------------------------------------------------------

def test_pickle_payload_is_refused_by_every_loader(tmp_path):
    marker = tmp_path / "pwned"
    lm = tiny_model(tie_weights=False)
    torch.save({"model": lm.state_dict(), "config": dict(lm.cfg), "kind": "cls", "class_names": ["a", "b"],
                "max_length": 16, "hook": Payload(marker)}, tmp_path / "evil.pth")
    for load in (M.read_checkpoint, M.load_model):
        with pytest.raises(M.CheckpointError, match="safe"):
            load(str(tmp_path / "evil.pth"))
    cases = [("generate.py", ["--checkpoint", "evil.pth", "--device", "cpu", "--max_new_tokens", "2"]),
             ("finetune_cls.py", ["--predict", "hi", "--checkpoint", "evil.pth", "--device", "cpu"]),
             ("pretrain.py", ["--init", "evil.pth", "--data", "t.txt", "--epochs", "1", "--device", "cpu",
                              "--context_length", "16", "--out_dir", "out"]),
             ("load_gpt2.py", ["--export", "evil.pth", "--out", "hf"]),
             ("finetune_chat.py", ["--init", "evil.pth", "--data", "c.json", "--device", "cpu", "--out_dir", "o2"])]
    (tmp_path / "t.txt").write_text(words_text(300))
    (tmp_path / "c.json").write_text(json.dumps([{"instruction": "a", "input": "", "output": "b"}] * 20))
    for (script, _), (rc, out, err) in zip(cases, run_cases(cases, tmp_path, tmp_path)):
        assert rc == 1 and "Traceback" not in err and "evil.pth" in err and "safe" in err, (script, err[-500:])
    assert not marker.exists()
    # the payload is real: an unsafe load would run it
    torch.load(tmp_path / "evil.pth", weights_only=False)
    assert marker.exists()


def test_corrupt_safetensors_are_refused_without_huge_buffers(tmp_path):
    """test_reader_refuses_corrupt_files covers each corrupt header in-process; here the files, one with a 2 GB
    header claim, are read in a child process whose peak memory must stay far below that claim."""
    bad = {"short_header": struct.pack("<Q", 100) + b"{}",
           "huge_claim": struct.pack("<Q", 2 << 30) + b"{" + b" " * 64,
           "not_json": struct.pack("<Q", 8) + b"notjson!",
           "outside": (lambda h: struct.pack("<Q", len(h)) + h + b"\0" * 8)(
               json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()),
           "overlap": (lambda h: struct.pack("<Q", len(h)) + h + b"\0" * 16)(
               json.dumps({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                           "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}).encode())}
    for name, raw in bad.items():
        (tmp_path / f"{name}.safetensors").write_bytes(raw)
    code = ("import resource, sys, checkpoints, load_gpt2, model\n"
            "for p in sys.argv[1:]:\n"
            "    try:\n"
            "        checkpoints.read_safetensors(p) if hasattr(load_gpt2, 'read_safetensors') else "
            "checkpoints.init_model(p)\n"
            "        print('LOADED', p)\n"
            "    except (model.CheckpointError, load_gpt2.UserError) as e:\n"
            "        print('REFUSED', str(e).splitlines()[0])\n"
            # VmHWM: this process's own peak (ru_maxrss would carry the parent's over the exec)
            "print('maxrss_kb', [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])\n")
    r = subprocess.run([sys.executable, "-c", code, *sorted(str(p) for p in tmp_path.glob("*.safetensors"))],
                       cwd=HERE, env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    refused = [ln for ln in r.stdout.splitlines() if ln.startswith("REFUSED")]
    assert len(refused) == len(bad) and "LOADED" not in r.stdout, r.stdout
    assert int(r.stdout.split("maxrss_kb")[1]) < 1_500_000  # far below the 2 GB the header claims


def test_download_stall_and_redirect_loop_then_resume(tmp_path, serve):
    body = words_text(36000).encode()  # about 200 KB: the stall comes after a few of the client's 64 KB reads
    digest = hashlib.sha256(body).hexdigest()
    url, handler = serve(body=body)
    dest = tmp_path / "corpus.txt"
    (tmp_path / "keep.txt").write_text("earlier file")
    with pytest.raises(data.DownloadError, match="rerun to resume") as e:
        data.download(f"{url}/stall/corpus.txt", str(dest), sha256=digest, retries=1, timeout=1, progress=False)
    assert str(dest) in str(e.value) and not dest.exists()
    have = os.path.getsize(str(dest) + ".part")
    assert 0 < have <= len(body) // 2  # what arrived before the stall is kept for the rerun
    with pytest.raises(data.DownloadError, match="(?i)redirect") as e:
        data.download(f"{url}/loop/x.txt", str(tmp_path / "keep.txt"), retries=1, timeout=1, progress=False)
    assert (tmp_path / "keep.txt").read_text() == "earlier file" and len(str(e.value).splitlines()) == 1
    # the rerun continues the .part file with a Range request and verifies the whole
    data.download(f"{url}/ok/corpus.txt", str(dest), sha256=digest, progress=False)
    assert handler.ranges == [f"bytes={have}-"]
    assert dest.read_bytes() == body and not os.path.exists(str(dest) + ".part")


# ---------------------------------------------------------------------------------------------------------------
# Bad input by family: every float flag, every output flag, divergence, hostile contents, signals, limits
# ---------------------------------------------------------------------------------------------------------------

SCRIPTS = {"pretrain": pretrain, "finetune_cls": finetune_cls, "finetune_chat": finetune_chat,
           "generate": generate_script, "bench": bench, "load_gpt2": load_gpt2}


def float_flags(module):
    return [k for k, v in module.DEFAULTS.items() if isinstance(v, float) or
            (v is None and k in ("lr", "weight_decay", "beta"))]


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_every_float_flag_refuses_nan_and_inf(name, capsys):
    module = SCRIPTS[name]
    flags = float_flags(module)
    if name != "load_gpt2":
        assert flags
    for flag in flags:
        for value in ("nan", "inf", "-inf"):
            with pytest.raises(SystemExit) as e:
                settings.get_config(module.DEFAULTS, [f"--{flag}={value}"])
            assert e.value.code == 2
            assert "expected a finite number" in capsys.readouterr().err, (flag, value)


def seed_flags(module):
    return [k for k in module.DEFAULTS if k == "seed" or k.endswith("_seed")]


@pytest.mark.parametrize("name", [n for n in SCRIPTS if seed_flags(SCRIPTS[n])])
def test_every_seed_flag_refuses_values_torch_cannot_take(name, capsys):
    module = SCRIPTS[name]
    for flag in seed_flags(module):
        for value in (str(2**64), str(2**63 - 1), str(2**32), "-2"):
            with pytest.raises(SystemExit) as e:
                settings.get_config(module.DEFAULTS, [f"--{flag}={value}"])
            assert e.value.code == 2 and f"--{flag} must be a whole number" in capsys.readouterr().err
        for value in (-1, 0, 2**32 - 1):
            assert settings.get_config(module.DEFAULTS, [f"--{flag}={value}"])[flag] == value


def test_sampling_survives_extreme_settings():
    """Any temperature, top_p and repetition penalty the flags accept gives valid token ids; a vanishing
    temperature is greedy."""
    torch.manual_seed(0)
    logits = torch.randn(3, 50) * 30
    prev = torch.randint(0, 50, (3, 10))
    greedy = logits.argmax(-1, keepdim=True)
    for t in (1e-300, 5e-324, 1e-45, 1e-30):
        assert torch.equal(M.sample_next_token(logits, t), greedy)
    for kwargs in (dict(temperature=1.0, top_p=5e-324), dict(temperature=1e300), dict(temperature=1.0, top_k=1),
                   dict(temperature=0.7, repetition_penalty=1e-300), dict(temperature=0.7, repetition_penalty=1e300),
                   dict(temperature=1e-300, repetition_penalty=1e-300, top_p=1e-300, top_k=3),
                   dict(temperature=0.0, repetition_penalty=1e-300)):
        ids = M.sample_next_token(logits, prev_ids=prev, **kwargs)
        assert ids.shape == (3, 1) and bool(((ids >= 0) & (ids < 50)).all()), kwargs
    assert torch.equal(M.sample_next_token(logits, 1.0, top_p=1e-300), greedy)  # the top token always stays


@pytest.mark.parametrize("length_penalty", [1e308, -1e308, 1e3, -1e3])
def test_beam_search_takes_any_length_penalty(length_penalty):
    out = generate_script.generate_beam(tiny_model(), torch.tensor([[1, 2, 3]]), 4, 3, length_penalty=length_penalty,
                                        eos_id=5)
    assert out.shape[0] == 1 and 3 < out.shape[1] <= 7 and torch.equal(out[0, :3], torch.tensor([1, 2, 3]))


def test_chat_settings_left_at_none_keep_their_type(capsys):
    """finetune_chat's settings whose default is None (filled in per method) refuse a value of the wrong type."""
    nones = [k for k, v in finetune_chat.DEFAULTS.items() if v is None]
    assert set(nones) >= {"epochs", "lr", "max_new_tokens", "eval_freq"}
    for method in finetune_chat.METHOD_DEFAULTS:
        for k in nones:
            default = finetune_chat.METHOD_DEFAULTS[method][k]
            value = "2.5" if isinstance(default, int) else "abc" if isinstance(default, float) else None
            if value is None:
                continue
            with pytest.raises(SystemExit) as e:
                settings.get_config(finetune_chat.DEFAULTS, ["--method", method, f"--{k}", value],
                                    check=finetune_chat.check_settings)
            assert e.value.code == 2 and f"--{k} must be" in capsys.readouterr().err, (method, k)
    for reward in ("max_words:²", "max_words:٣", "max_words:-1", "max_words:1.5"):
        with pytest.raises(SystemExit):
            settings.get_config(finetune_chat.DEFAULTS, ["--method", "grpo", "--reward", reward],
                                check=finetune_chat.check_settings)
        assert "whole number" in capsys.readouterr().err, reward


def chat_records_file(path, n=24):
    rows = [{"instruction": f"Say {w}", "input": "", "output": w, "chosen": w, "rejected": w + " no"}
            for w in ("yes", "no", "maybe", "ok") * (n // 4)]
    path.write_text(json.dumps(rows))
    return str(path)


def resume_cases(tmp_path, verdict):
    """(script main, the first run's args, a run-defining change) for each training script."""
    csv_path = write_random_sms_csv(tmp_path / "texts.csv", 40)
    chats = chat_records_file(tmp_path / "chats.json")
    return [
        (pretrain.main, pre(verdict) + ["--max_steps", "1", "--save_every", "1"], ["--tie_weights"]),
        (pretrain.main, pre(verdict) + ["--max_steps", "1", "--save_every", "1"], ["--batch_size", "1"]),
        (finetune_cls.main, cls_flags(csv=csv_path, max_steps=1, save_every=1), ["--trainable", "last_n:1"]),
        (finetune_chat.main, chat_flags(data=chats, max_steps=1, save_every=1, max_new_tokens=0),
         ["--method", "dpo"]),
    ]


def test_resume_refuses_settings_that_make_another_run(tmp_path, verdict):
    """A --resume that changes what the run is (model, method, trainable layers, batch, data order) is refused
    in one line naming the setting, the folder unchanged; steps may still change."""
    for i, (main, args, change) in enumerate(resume_cases(tmp_path, verdict)):
        out = str(tmp_path / f"run{i}")
        assert run_main(main, args + ["--out_dir", out])[0] == 0
        before = tree_hashes(out)
        code, _, err = run_main(main, args + ["--out_dir", out, "--resume", "--max_steps", "2"] + change)
        assert_one_error_line(code, err, "--resume", change[0], "--overwrite")
        assert tree_hashes(out) == before
    code, _, err = run_main(pretrain.main, pre(verdict) + ["--max_steps", "2", "--out_dir", str(tmp_path / "run0"),
                                                           "--resume", "--eval_iters", "2"])
    assert code == 0, err


@pytest.mark.parametrize("env", [{"WORLD_SIZE": "abc"}, {"LOCAL_RANK": "x"}, {"WORLD_SIZE": "-1"},
                                 {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}])
def test_torchrun_variables_set_wrongly_are_one_line(env, tmp_path, verdict, monkeypatch):
    for k in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    code, _, err = run_main(pretrain.main, pre(verdict) + ["--out_dir", str(tmp_path / "r")])
    assert_one_error_line(code, err, "torchrun")
    assert not (tmp_path / "r").exists()


def test_a_closed_standard_input_is_the_end_of_input(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "stdin", None)  # what Python gives a process started with `<&-`
    lm = M.save_checkpoint(str(tmp_path / "lm.pth"), tiny_model(), kind="chat", template="alpaca")
    code, _, err = run_main(generate_script.main, ["--checkpoint", lm, "--device", "cpu", "--prompt", "-"])
    assert_one_error_line(code, err, "standard input", "closed")
    code, out, err = run_main(generate_script.main, ["--checkpoint", lm, "--device", "cpu", "--chat"])
    assert code == 0 and "Traceback" not in err and out == ""


def test_chat_commands_with_arguments_are_commands(tmp_path):
    model = tiny_model(context_length=128)
    cfg = {**generate_script.DEFAULTS, "checkpoint": "m.pth", "max_new_tokens": 3, "chat": True}
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        turns = generate_script.chat(model, {"kind": "chat"}, cfg, torch.device("cpu"), None,
                                     stdin=io.StringIO("hello\n/reset now\nagain\n/exit 3\nnever sent\n"),
                                     out=io.StringIO())
    assert [t["user"] for t in turns] == ["hello", "again"]
    assert "(conversation cleared)" in err.getvalue() and "/exit takes no arguments" in err.getvalue()


@pytest.mark.parametrize("name", ["meta", "xpu", "cuda:x", "cpu:0", "", "CPU", "cuda:99"])
def test_only_the_devices_we_support_are_taken(name):
    with pytest.raises(settings.UserError, match="--device|device"):
        settings.pick_device(name)


def test_rollouts_that_cannot_fit_in_memory_are_refused_before_work(tmp_path, monkeypatch):
    init = toy_policy(tmp_path / "toy.pth")
    args = rl_args(str(tmp_path / "rl"), 1, init)
    args[args.index("--group_size") + 1] = "1000000"
    code, _, err = run_main(finetune_chat.main, args)
    assert_one_error_line(code, err, "--group_size", "GiB")
    assert not (tmp_path / "rl").exists()


def test_a_deeply_nested_jsonl_line_is_one_line_in_training_and_bench(tmp_path, verdict):
    corpus = tmp_path / "deep"
    corpus.mkdir()
    (corpus / "a.jsonl").write_text('{"text": "fine"}\n' + "[" * 100_000 + "]" * 100_000 + "\n")
    code, _, err = run_main(pretrain.main, pre(str(corpus)) + ["--out_dir", str(tmp_path / "r")])
    assert_one_error_line(code, err, "a.jsonl line 2", "nests")
    code, _, err = run_main(bench.main, ["--corpus", str(corpus), "--corpus_steps", "1", "--device", "cpu"])
    assert_one_error_line(code, err, "--corpus measurement failed", "nests")


def test_a_hand_edited_token_cache_is_rebuilt(tmp_path, verdict):
    cache_dir = str(tmp_path / "cache")
    first = data.token_cache(str(verdict), cache_dir, progress=False)
    tokens, meta_path = np.array(first.tokens), first.path[:-4] + ".json"
    edits = [lambda m: m.update(n_tokens=float(m["n_tokens"])), lambda m: m["files"][0].pop("path"),
             lambda m: m["files"][0].update(index=[["a", 1]]), lambda m: m.update(files={"x": 1})]
    for edit in edits:
        meta = read_json(meta_path)
        edit(meta)
        with open(meta_path, "w") as f:
            json.dump(meta, f)
        again = data.token_cache(str(verdict), cache_dir, progress=False)
        assert np.array_equal(np.array(again.tokens), tokens) and read_json(meta_path)["n_tokens"] == len(tokens)


def test_a_hand_edited_classifier_folder_is_refused(tmp_path):
    folder = load_gpt2.export_hf(save_classifier(tmp_path / "cls.pth", biased_classifier()), str(tmp_path / "hf"))
    config = read_json(os.path.join(folder, "config.json"))
    for edit, words in (({"id2label": "012"}, "id2label"), ({"id2label": ["ham", "spam", "eggs"]}, "id2label"),
                        ({"id2label": {"0": "a"}}, "id2label")):
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump({**config, **edit}, f)
        code, _, err = run_main(load_gpt2.main, ["--model", folder, "--out", str(tmp_path / "back.pth")])
        assert_one_error_line(code, err, words)
    tensors = checkpoints.read_safetensors(os.path.join(folder, "model.safetensors"))
    checkpoints.write_safetensors(os.path.join(folder, "model.safetensors"),
                                {**tensors, "score.weight": tensors["score.weight"][:0]}, {"format": "pt"})
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({**config, "id2label": {}, "num_labels": 0}, f)
    code, _, err = run_main(load_gpt2.main, ["--model", folder, "--out", str(tmp_path / "back.pth")])
    assert_one_error_line(code, err, "at least 2 classes")
    assert not (tmp_path / "back.pth").exists()


@pytest.mark.parametrize("name", ["pretrain", "finetune_cls", "finetune_chat"])
def test_every_training_script_refuses_a_floor_above_the_peak_lr(name, capsys):
    module = SCRIPTS[name]
    with pytest.raises(SystemExit) as e:
        settings.get_config(module.DEFAULTS, ["--lr", "1e-4", "--min_lr", "5", "--lr_schedule", "cosine"],
                            check=module.check_settings)
    assert e.value.code == 2 and "--min_lr 5.0 is above --lr" in capsys.readouterr().err
    settings.get_config(module.DEFAULTS, ["--lr", "1e-5", "--min_lr", "1e-4"], check=module.check_settings)


def test_a_damaged_checkpoint_is_refused_wherever_it_is_read(tmp_path, verdict):
    """A few bytes changed inside a tensor: torch.load alone would load the wrong weights without a word."""
    path = M.save_checkpoint(str(tmp_path / "m.pth"), tiny_model())
    raw = bytearray(open(path, "rb").read())
    middle = len(raw) // 2
    raw[middle:middle + 64] = bytes(64)
    (tmp_path / "bad.pth").write_bytes(bytes(raw))
    with pytest.raises(M.CheckpointError, match="checksum"):
        M.read_checkpoint(str(tmp_path / "bad.pth"))
    assert M.read_checkpoint(path)["kind"] == "pretrain"
    for main, args in ((generate_script.main, ["--checkpoint", str(tmp_path / "bad.pth"), "--device", "cpu"]),
                       (pretrain.main, pre(verdict) + ["--init", str(tmp_path / "bad.pth"),
                                                       "--out_dir", str(tmp_path / "r")]),
                       (load_gpt2.main, ["--export", str(tmp_path / "bad.pth"), "--out", str(tmp_path / "hf")])):
        code, _, err = run_main(main, args)
        assert_one_error_line(code, err, "damaged")
    assert not (tmp_path / "r").exists() and not (tmp_path / "hf").exists()


def test_a_run_never_writes_over_its_own_input(tmp_path, verdict):
    """Every input setting pointed at a file the run would write into --out_dir: refused, the input kept, even
    with --overwrite."""
    out = tmp_path / "run"
    out.mkdir()
    write_random_sms_csv(out / "train.csv", 40)
    write_random_sms_csv(out / "mine.csv", 40)
    shutil.copy(verdict, out / "log.csv")
    M.save_checkpoint(str(out / "model.pth"), tiny_model())
    cases = [
        (finetune_cls.main, cls_flags(csv=str(out / "train.csv"), out_dir=str(out), max_steps=1), "--csv"),
        (finetune_cls.main, cls_flags(csv=str(out / "mine.csv"), checkpoint=str(out / "mine.csv"), out_dir=str(out),
                                      max_steps=1), "--csv"),
        (pretrain.main, pre(str(out / "log.csv")) + ["--out_dir", str(out)], "--data"),
        (pretrain.main, pre(verdict) + ["--init", str(out / "model.pth"), "--out_dir", str(out)], "--init"),
    ]
    before = tree_hashes(out)
    for main, args, flag in cases:
        for extra in ([], ["--overwrite"]):
            code, _, err = run_main(main, args + extra)
            assert_one_error_line(code, err, f"{flag} input", "--out_dir")
            assert tree_hashes(out) == before


def test_every_folder_a_script_creates_refuses_a_file_in_its_way(tmp_path, verdict):
    (tmp_path / "afile").write_text("a file, not a folder")
    lm = M.save_checkpoint(str(tmp_path / "lm.pth"), tiny_model())
    for main, args in (
            (pretrain.main, pre(verdict) + ["--cache_dir", str(tmp_path / "afile"), "--out_dir", str(tmp_path / "r")]),
            (pretrain.main, pre(verdict) + ["--cache_dir", str(tmp_path / "afile" / "c"),
                                            "--out_dir", str(tmp_path / "r")]),
            (pretrain.main, pre(verdict) + ["--out_dir", str(tmp_path / "afile" / "r")]),
            (load_gpt2.main, ["--export", lm, "--out", str(tmp_path / "afile")]),
            (load_gpt2.main, ["--export", lm, "--out", str(tmp_path / "afile" / "hf")])):
        code, _, err = run_main(main, args)
        line = assert_one_error_line(code, err, str(tmp_path / "afile"))
        assert "regular file" in line or "is a file, not a folder" in line, line
    assert (tmp_path / "afile").read_text() == "a file, not a folder"


def test_resume_of_a_run_that_saved_nothing_points_to_overwrite(tmp_path, verdict):
    """A run stopped before its first save leaves settings and a log: --resume names the way out."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "settings.json").write_text("{}")
    (out / "log.csv").write_text("step,train_loss\n")
    code, _, err = run_main(pretrain.main, pre(verdict) + ["--out_dir", str(out), "--resume"])
    assert_one_error_line(code, err, "--resume", "--overwrite")
    assert run_main(pretrain.main, pre(verdict) + ["--out_dir", str(out), "--overwrite", "--max_steps", "1"])[0] == 0


# ---------------------------------------------------------------------------------------------------------------
# The loop's helpers: the step log, stopping on a signal, the resumable state, output nobody reads
# ---------------------------------------------------------------------------------------------------------------

PERCENT_DEFAULTS = dict(
    share=0.5,                 # 50% of the data, as printf would say %d or %(x)s
)


def test_any_character_in_a_settings_comment_shows_in_help(capsys):
    with pytest.raises(SystemExit) as e:
        settings.get_config(PERCENT_DEFAULTS, ["--help"])
    assert e.value.code == 0 and "50% of the data, as printf would say %d or %(x)s" in capsys.readouterr().out


def test_max_steps_beyond_an_epoch_trains_that_many_steps(tmp_path):
    (tmp_path / "t.txt").write_text(words_text(600))  # about 10 batches of 2 x 32 tokens per epoch
    flags = short_pretrain_flags("t.txt", sample_prompt="") + ["--epochs", "1"]
    one = pretrain.main(flags + ["--out_dir", "one"])
    more = pretrain.main(flags + ["--out_dir", "more", "--max_steps", str(2 * one["step"] + 3)])
    assert more["step"] == 2 * one["step"] + 3  # more than two epochs, not capped by --epochs 1
    rows = trainer.read_log(tmp_path / "more" / "log.csv")
    assert [r["step"] for r in rows] == list(range(1, more["step"] + 1)) and rows[-1]["epoch"] > 2


def test_the_step_log_appends_rows_takes_new_columns_and_resumes_without_gaps(tmp_path):
    path = tmp_path / "log.csv"
    log = trainer.StepLog(str(path))
    assert not path.exists()  # nothing written before the first row
    for step in range(1, 5):
        log.append({"step": step, "loss": 1.0 / step, **({"val_loss": 2.5} if step % 2 == 0 else {})})
    log.append({"step": 5, "loss": 0.2, "grad_norm": 0.5})  # a key a hacker added: a new column
    rows = csv_rows(path)
    assert [r["step"] for r in rows] == ["1", "2", "3", "4", "5"] and rows[4]["grad_norm"] == "0.5"
    assert rows[1]["val_loss"] == "2.5" and rows[0]["val_loss"] == ""
    with open(path, "a") as f:  # a kill in the middle of an append leaves a cut line
        f.write("6,0.1")
    resumed = trainer.StepLog(str(path), resume_step=4)  # the state was saved at step 4
    assert [r["step"] for r in resumed.rows] == [1, 2, 3, 4] and resumed.rows[1]["val_loss"] == 2.5
    resumed.append({"step": 5, "loss": 0.3, "grad_norm": 0.7})
    assert [r["step"] for r in trainer.read_log(path)] == [1, 2, 3, 4, 5]
    assert trainer.read_log(path)[4] == {"step": 5, "loss": 0.3, "grad_norm": 0.7}


def test_resume_needs_only_the_out_dir(verdict, tmp_path, capsys):
    out = str(tmp_path / "run")
    flags = pre(verdict) + ["--max_steps", "2", "--lr", "2e-3", "--eval_freq", "100"]
    pretrain.main(flags + ["--out_dir", out])
    capsys.readouterr()
    final = pretrain.main(["--out_dir", out, "--resume", "--max_steps", "4"])  # the rest from settings.json
    assert final["step"] == 4 and "resumed from" in capsys.readouterr().out
    state = M.read_checkpoint(os.path.join(out, "model_and_optimizer.pth"))
    assert state["train_settings"]["emb_dim"] == 32 and state["train_settings"]["lr"] == 2e-3
    code, _, err = run_main(pretrain.main, ["--out_dir", out, "--resume", "--emb_dim", "64"])
    assert_one_error_line(code, err, "--emb_dim 32 (now 64)")


@slow
@pytest.mark.parametrize("sig, code, name", [(signal.SIGHUP, 129, "SIGHUP"), (signal.SIGINT, 130, "Ctrl-C")])
def test_sighup_and_ctrl_c_save_like_sigterm(verdict, tmp_path, sig, code, name):
    out = tmp_path / "run"
    proc = signal_when_logged(pre(verdict) + ["--out_dir", str(out), "--max_steps", "400"], out / "log.csv", 2, sig)
    assert proc.returncode == code and f"{name} at step" in proc.stderr and "Traceback" not in proc.stderr
    state = M.read_checkpoint(str(out / "model_and_optimizer.pth"))
    assert state["step"] == max(r["step"] for r in trainer.read_log(out / "log.csv"))


@slow
def test_a_second_signal_while_stopping_does_not_cost_the_save(verdict, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "pretrain.py"), *pre(verdict), "--out_dir", str(out),
                             "--max_steps", "400"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**ENV, "PYTHONPATH": HERE})
    deadline = time.time() + 120
    while not trainer.read_log(out / "log.csv") and time.time() < deadline:
        time.sleep(0.05)
    for _ in range(3):  # an impatient user, or a cluster that signals twice
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.01)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 143 and "saved" in err and "Traceback" not in err, err
    assert M.read_checkpoint(str(out / "model_and_optimizer.pth"))["step"] >= 1


@slow
def test_a_stop_during_a_long_evaluation_is_honoured_within_seconds(tmp_path):
    (tmp_path / "big.txt").write_text(words_text(60000))  # a long evaluation: every batch of both splits
    args = [sys.executable, os.path.join(HERE, "pretrain.py"), "--data", "big.txt", *pretrain_flags(),
            "--eval_iters", "1000000", "--max_steps", "3", "--out_dir", "run", "--sample_prompt", ""]
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**ENV, "PYTHONPATH": HERE, "PYTHONUNBUFFERED": "1"})
    for line in proc.stdout:  # the first step is done once settings.json is there; its evaluation then runs
        if "parameters" in line:
            break
    deadline = time.time() + 60
    while not (tmp_path / "run" / "settings.json").exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)
    sent = time.time()
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 143 and "saved" in err, err
    assert time.time() - sent < 3.0  # the stop, the save of a tiny model and the exit
    assert [r["step"] for r in trainer.read_log(tmp_path / "run" / "log.csv")] == [1]
    assert "val_loss" not in trainer.read_log(tmp_path / "run" / "log.csv")[0]  # a cut evaluation is not logged


@slow
def test_output_nobody_reads_does_not_end_a_run(verdict, tmp_path):
    args = [sys.executable, os.path.join(HERE, "pretrain.py"), *pre(verdict), "--max_steps", "3", "--eval_freq", "1"]
    proc = subprocess.Popen([*args, "--out_dir", str(tmp_path / "a")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**ENV, "PYTHONPATH": HERE})
    proc.stdout.close()  # `| head -c 0`: the first print meets a closed pipe
    err = proc.communicate(timeout=120)[1].decode()
    assert proc.returncode == 0 and "Traceback" not in err, err
    assert (tmp_path / "a" / "model.pth").exists()
    if os.path.exists("/dev/full"):  # stdout and stderr on a full device
        with open("/dev/full", "w") as full:
            proc = subprocess.run([*args, "--out_dir", str(tmp_path / "b")], stdout=full, stderr=full,
                                  env={**ENV, "PYTHONPATH": HERE}, timeout=120)
        assert proc.returncode == 0 and (tmp_path / "b" / "model.pth").exists()


def test_a_signal_during_a_write_waits_for_the_whole_file(tmp_path):
    code = f"""
import sys, time
sys.path.insert(0, {HERE!r})
import files, settings
def write(f):
    print("writing", flush=True)
    f.write(b"a" * 1000)
    time.sleep(1.5)  # the signals arrive now
    f.write(b"b" * 1000)
settings.entry(lambda: files.atomic_write({str(tmp_path / "out.bin")!r}, write))
print("not reached", flush=True)
"""
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    for sig in (signal.SIGTERM, signal.SIGINT):
        proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode in (130, 143) and "Traceback" not in err and "not reached" not in out, err
    assert (tmp_path / "out.bin").read_bytes() == b"a" * 1000 + b"b" * 1000  # whole, then the program left
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]  # no temporary file left


@slow
def test_a_signal_during_the_epoch_sample_stops_the_run_at_once(verdict, tmp_path):
    text = tmp_path / "short.txt"  # ~10 steps an epoch
    text.write_text(open(verdict).read()[:3300])
    args = ["--data", str(text), *pretrain_flags(sample_tokens=100000), "--epochs", "2", "--eval_freq", "100",
            "--out_dir", str(tmp_path / "run"), "--sample_prompt", "Every effort"]
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "pretrain.py"), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**ENV, "PYTHONPATH": HERE})
    deadline = time.time() + 120
    while max((r["step"] for r in trainer.read_log(tmp_path / "run" / "log.csv")), default=0) < 9:
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.05)
    time.sleep(2.0)  # the last step of the epoch is done and its sample of 100,000 tokens is being written
    sent = time.time()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and time.time() - sent < 3.0, err
    state = M.read_checkpoint(str(tmp_path / "run" / "model_and_optimizer.pth"))
    assert state["epoch"] == 1 and state["batch_pos"] == 0  # saved at the end of the first epoch
    assert "Every effort" in out  # the cut sample is still printed


def test_a_finished_run_without_its_model_file_writes_it_on_resume(verdict, tmp_path, capsys):
    out = tmp_path / "run"
    flags = pre(verdict) + ["--out_dir", str(out), "--max_steps", "2", "--eval_freq", "100"]
    pretrain.main(flags)
    first = M.read_checkpoint(str(out / "model.pth"))["model"]
    (out / "model.pth").unlink()  # as a stop right after the last save leaves it
    pretrain.main(["--out_dir", str(out), "--resume"])
    assert "already finished" in capsys.readouterr().out
    again = M.read_checkpoint(str(out / "model.pth"))["model"]
    assert all(torch.equal(first[k], again[k]) for k in first)


def test_resume_refuses_a_damaged_settings_file_and_checks_without_one(verdict, tmp_path):
    out = tmp_path / "run"
    pretrain.main(pre(verdict) + ["--out_dir", str(out), "--max_steps", "1", "--eval_freq", "100"])
    good = (out / "settings.json").read_text()
    for damaged in ("{bad", "[1, 2]", "{}", '{"settings": [1, 2]}'):
        (out / "settings.json").write_text(damaged)
        code, _, err = run_main(pretrain.main, ["--out_dir", str(out), "--resume", "--max_steps", "2"])
        assert code == 2 and "does not hold the settings the run began with" in err and "Traceback" not in err
    (out / "settings.json").unlink()  # without it the flags given are the settings; the state's checks still apply
    code, _, err = run_main(pretrain.main, ["--out_dir", str(out), "--resume", "--max_steps", "2"])
    assert_one_error_line(code, err, "model_and_optimizer.pth", "--overwrite")  # the defaults are not the run's
    pretrain.main(pre(verdict) + ["--out_dir", str(out), "--resume", "--max_steps", "2", "--eval_freq", "100"])
    assert json.loads(good)["settings"]["emb_dim"] == 32
    assert M.read_checkpoint(str(out / "model_and_optimizer.pth"))["step"] == 2


def test_the_step_log_keeps_one_row_per_step_and_an_unreadable_file_aside(tmp_path, capsys):
    path = tmp_path / "log.csv"
    path.write_text("step,loss\n1,0.5\n2,0.4\n2,0.4\n3,0.3\n")  # a duplicated row
    assert [r["step"] for r in trainer.StepLog(str(path), resume_step=3).rows] == [1, 2, 3]
    path.write_text("a,b,c\n1,2,3\n")  # a header edited by hand
    log = trainer.StepLog(str(path), resume_step=3)
    assert log.rows == [] and (tmp_path / "log.csv.unreadable").read_text() == "a,b,c\n1,2,3\n"
    assert "kept as" in capsys.readouterr().err


def test_a_hand_edited_or_outgrown_resume_state_is_refused_value_by_value(verdict, tmp_path):
    out = tmp_path / "run"
    flags = pre(verdict) + ["--out_dir", str(out), "--max_steps", "2", "--eval_freq", "100"]
    pretrain.main(flags)
    path = str(out / "model_and_optimizer.pth")
    good = torch.load(path, weights_only=True)  # read whole (not memory-mapped): the file is rewritten below
    cases = [("step", "2", "step is '2'"), ("step", -1, "step is -1"), ("batch_pos", 10**12, "batch_pos"),
             ("tokens_seen", 2.5, "tokens_seen is 2.5"), ("epoch", True, "epoch is True"),
             ("rng", "noise", "random state is damaged"), ("batches_per_epoch", 3, "the data or the batch settings")]
    for key, value, words in cases:
        torch.save({**good, key: value}, path)
        code, _, err = run_main(pretrain.main, flags + ["--resume", "--max_steps", "4"])
        assert_one_error_line(code, err, words)
    torch.save(good, path)
    small = tmp_path / "small.txt"  # the corpus shrank since: its position no longer exists
    small.write_text(open(verdict).read()[:4000])
    shrunk = short_pretrain_flags(str(small), sample_prompt="") + ["--out_dir", str(out), "--eval_freq", "100"]
    torch.save({**good, "batch_pos": 200, "batches_per_epoch": None}, path)
    code, _, err = run_main(pretrain.main, shrunk + ["--resume", "--max_steps", "4"])
    assert_one_error_line(code, err, "the training data now gives")


def test_probs_plot_redraws_its_default_file_and_refuses_other_formats(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    monkeypatch.chdir(tmp_path)
    lm = M.save_checkpoint(str(tmp_path / "lm.pth"), tiny_model())
    for _ in range(2):
        code, out, err = run_main(generate_script.main, ["--checkpoint", lm, "--show_probs", "--device", "cpu"])
        assert code == 0, err
        assert (tmp_path / "runs" / "temperature-plot.png").read_bytes()[:4] == b"\x89PNG"  # under runs/
    for name in ("plot.csv", "plot", "plot.pth"):
        code, _, err = run_main(generate_script.main, ["--checkpoint", lm, "--show_probs", "--device", "cpu",
                                                       "--probs_plot", name])
        assert_one_error_line(code, err, "--probs_plot", ".png")
        assert not (tmp_path / name).exists()


@pytest.fixture
def outputs_world(tmp_path):
    """A folder with a file, a language model, a classifier and their hashes."""
    w = tmp_path / "w"
    w.mkdir()
    (w / "afile").write_text("not a folder")
    lm = M.save_checkpoint(str(w / "lm.pth"), tiny_model())
    cls = finetune_cls.replace_head(tiny_model(), 2)
    M.save_checkpoint(str(w / "cls.pth"), cls, kind="cls", class_names=["a", "b"], max_length=16, pad_id=50256,
                      lora=None)
    M.save_checkpoint(str(w / "other.pth"), tiny_model(1))  # an existing checkpoint an output must not replace
    return w, lm


OUTPUT_FLAGS = [  # script, args before the output path, the flag, what the output replaces
    ("generate", ["--checkpoint", "lm.pth", "--quantize", "int8", "--device", "cpu"], "--save_int8"),
    ("generate", ["--checkpoint", "lm.pth", "--show_probs", "--device", "cpu"], "--probs_plot"),
    ("finetune_cls", ["--checkpoint", "cls.pth", "--device", "cpu"], "--save_int8"),
    ("load_gpt2", ["--model", "lm_hf"], "--out"),
    ("bench", ["--size", "tiny", "--steps", "1", "--repeats", "1", "--device", "cpu"], "--json"),
]


@pytest.mark.parametrize("script,args,flag", OUTPUT_FLAGS, ids=[f"{s}{f}" for s, _, f in OUTPUT_FLAGS])
def test_every_output_flag_refuses_a_path_below_a_file_and_an_existing_checkpoint(outputs_world, script, args,
                                                                                  flag, monkeypatch):
    """Also any other existing file (unless --force), and a pipe or a device, which are never opened."""
    w, lm = outputs_world
    monkeypatch.chdir(w)
    if script == "load_gpt2":
        load_gpt2.export_hf("lm.pth", "lm_hf")
    ext = {"--probs_plot": ".png", "--json": ".json"}.get(flag, ".pth")
    shutil.copy(w / "other.pth", w / f"ckpt{ext}")
    (w / f"notes{ext}").write_text("the user's own file")
    os.mkfifo(w / f"pipe{ext}")
    before = tree_hashes(w)
    for target, words in ((f"afile/out{ext}", "regular file"), (f"ckpt{ext}", "already holds a checkpoint"),
                          (f"notes{ext}", "already exists"), (f"pipe{ext}", "not a regular file"),
                          ("/dev/null", "/dev/null")):
        start = time.time()
        code, _, err = run_main(SCRIPTS[script].main, args + [flag, target])
        assert_one_error_line(code, err, flag, words)
        assert time.time() - start < 20  # refused before the work, not after it
        assert tree_hashes(w) == before


def test_an_output_never_replaces_its_own_input(outputs_world, monkeypatch):
    """Not even with --force: the input of every output flag, a file given directly or inside a folder."""
    w, lm = outputs_world
    monkeypatch.chdir(w)
    load_gpt2.export_hf("lm.pth", "lm_hf")
    before = tree_hashes(w)
    for force in ([], ["--force"]):
        for main, args in (
                (generate_script.main, ["--checkpoint", "lm.pth", "--quantize", "int8", "--device", "cpu",
                                        "--save_int8", "lm.pth"]),
                (finetune_cls.main, ["--checkpoint", "cls.pth", "--device", "cpu", "--save_int8", "cls.pth"]),
                (load_gpt2.main, ["--model", "lm_hf", "--out", "lm_hf/model.safetensors"]),
                (load_gpt2.main, ["--model", "lm_hf/model.safetensors", "--out", "lm_hf/model.safetensors"])):
            code, _, err = run_main(main, args + force)
            assert_one_error_line(code, err, "own input", "another path")
            assert tree_hashes(w) == before


def test_without_matplotlib_runs_say_once_that_they_skip_plots(verdict, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    monkeypatch.setattr(settings, "_told", set())
    out = tmp_path / "run"
    code, _, err = run_main(pretrain.main, pre(verdict) + ["--out_dir", str(out), "--max_steps", "2",
                                                           "--eval_freq", "1"])
    assert code == 0 and err.count("matplotlib is not installed") == 1, err
    assert (out / "log.csv").exists() and not (out / "loss-plot.png").exists()
    lm = M.save_checkpoint(str(tmp_path / "lm.pth"), tiny_model())
    code, _, err = run_main(generate_script.main, ["--checkpoint", lm, "--show_probs", "--device", "cpu",
                                                   "--probs_plot", str(tmp_path / "p.png")])
    assert code == 0 and "no " + str(tmp_path / "p.png") in err and not (tmp_path / "p.png").exists()


def test_a_folder_or_pipe_where_a_run_writes_a_file_is_refused_before_work(verdict, tmp_path):
    out = tmp_path / "run"
    (out / "log.csv").mkdir(parents=True)
    code, _, err = run_main(pretrain.main, pre(verdict) + ["--out_dir", str(out), "--max_steps", "1"])
    assert_one_error_line(code, err, "log.csv", "is a folder")
    out = tmp_path / "run2"
    out.mkdir()
    os.mkfifo(out / "model.pth")
    code, _, err = run_main(pretrain.main, pre(verdict) + ["--out_dir", str(out), "--max_steps", "1"])
    assert_one_error_line(code, err, "model.pth", "pipe")
    assert not (out / "log.csv").exists()


def test_divergence_is_never_saved_and_names_the_checkpoint_that_resumes(verdict, tmp_path):
    out = str(tmp_path / "run")
    args = pre(verdict) + ["--out_dir", out, "--lr", "1e6", "--save_every", "1", "--eval_freq", "100", "--epochs", "1"]
    code, _, err = run_main(pretrain.main, args)
    line = assert_one_error_line(code, err, "diverged at step", after_progress=True)
    state = os.path.join(out, trainer.TRAIN_STATE)
    step = M.read_checkpoint(state)["step"]
    # the weights are still finite after a step at this rate, but the next loss is not: the checkpoint between them
    # is named, and not as a good one
    assert f"(step {step})" in line and state in line and "start over" in line and "good" not in line
    sd = M.read_checkpoint(state)["model"]
    assert all(torch.isfinite(t).all() for t in sd.values() if t.is_floating_point())
    assert not os.path.exists(os.path.join(out, "model.pth"))
    # a resume from it loads (and diverges again, with one line)
    code, _, err = run_main(pretrain.main, args + ["--resume"])
    assert "diverged" in err and "Traceback" not in err


def test_divergence_on_the_last_step_exits_non_zero_without_a_model(verdict, tmp_path):
    out = str(tmp_path / "run")
    # at a learning rate of 1e39 the first AdamW update takes the weights past float32's largest value: the loss
    # and gradients of that step are finite, the weights after it are not
    code, _, err = run_main(pretrain.main, pre(verdict) + ["--out_dir", out, "--max_steps", "1", "--lr", "1e39"])
    assert_one_error_line(code, err, "weights are not finite", "nothing was saved", after_progress=True)
    assert not os.path.exists(os.path.join(out, "model.pth"))
    assert not os.path.exists(os.path.join(out, trainer.TRAIN_STATE))


@pytest.mark.parametrize("over,words", [
    ({"n_head": 0}, "n_head 0"), ({"n_head": -2}, "n_head -2"), ({"layer_norm_epsilon": "x"}, "layer_norm_epsilon"),
    ({"n_layer": 10 ** 9}, "n_layer 1000000000"), ({"n_embd": 1.5}, "n_embd 1.5"),
    ({"tie_word_embeddings": "yes"}, "tie_word_embeddings")])
def test_config_json_values_are_checked_before_anything_is_sized(tmp_path, over, words):
    folder = str(tmp_path / "hf")
    load_gpt2.export_hf(M.save_checkpoint(str(tmp_path / "lm.pth"), tiny_model()), folder)
    cfg = json.load(open(os.path.join(folder, "config.json")))
    json.dump({**cfg, **over}, open(os.path.join(folder, "config.json"), "w"))
    start = time.time()
    code, _, err = run_main(generate_script.main, ["--init", folder, "--device", "cpu"])
    assert_one_error_line(code, err, words)
    assert time.time() - start < 20


@pytest.mark.parametrize("ckpt,words", [
    ({"model": {}, "config": {"n_layers": 2}}, "not a GPTModel"),
    ({"config": {"n_layers": "two"}}, "n_layers must be a whole number"),
    ({"config": {"n_heads": 3}}, "divisible"),
    ({"config": {"n_layers": 5}}, "contradicts its tensors"),
    ({"config": "gpt2"}, "not a dict"),
    ({"model_args": {"n_layer": 2}, "iter_num": 5}, "nanoGPT"),
    ({"state_dict": {}, "pytorch-lightning_version": "2.0"}, "Lightning"),
])
def test_checkpoint_contents_are_checked_and_foreign_ones_named(tmp_path, ckpt, words):
    good = M.checkpoint_dict(tiny_model())
    if "config" in ckpt and isinstance(ckpt["config"], dict):
        ckpt = {**good, "config": {**good["config"], **ckpt["config"]}, **{k: v for k, v in ckpt.items()
                                                                          if k != "config"}}
    else:
        ckpt = {**good, **ckpt}
    if "state_dict" in ckpt:
        ckpt.pop("model")
    path = tmp_path / "ckpt.pt"
    torch.save(ckpt, path)
    code, _, err = run_main(generate_script.main, ["--checkpoint", str(path), "--device", "cpu"])
    assert_one_error_line(code, err, words)


def test_hugging_face_bin_is_named(verdict, tmp_path):
    folder = str(tmp_path / "hf")
    load_gpt2.export_hf(M.save_checkpoint(str(tmp_path / "lm.pth"), tiny_model()), folder)
    tensors = checkpoints.read_safetensors(os.path.join(folder, "model.safetensors"))
    torch.save({f"transformer.{k}": v for k, v in tensors.items()}, tmp_path / "pytorch_model.bin")
    code, _, err = run_main(pretrain.main, pre(verdict) + ["--init", str(tmp_path / "pytorch_model.bin"),
                                                  "--out_dir", str(tmp_path / "r")])
    assert_one_error_line(code, err, "Hugging Face's layout", "save_pretrained")


def test_deeply_nested_json_is_refused_before_parsing(tmp_path):
    deep = "[" * 100_000 + "]" * 100_000
    (tmp_path / "deep.json").write_text(deep)
    code, _, err = run_main(finetune_chat.main,
                            ["--data", str(tmp_path / "deep.json"), "--init", "scratch", *tiny_flags()])
    assert_one_error_line(code, err, "nests")
    header = ('{"a":' * 5000 + "1" + "}" * 5000).encode()
    raw = len(header).to_bytes(8, "little") + header
    (tmp_path / "deep.safetensors").write_bytes(raw)
    code, _, err = run_main(generate_script.main, ["--init", str(tmp_path / "deep.safetensors"), "--device", "cpu"])
    assert_one_error_line(code, err, "nests deeper")


def test_beams_are_bounded_by_the_vocabulary_and_memory(tmp_path):
    path = M.save_checkpoint(str(tmp_path / "lm.pth"), tiny_model())
    start = time.time()
    code, _, err = run_main(generate_script.main, ["--checkpoint", path, "--num_beams", "60000", "--device", "cpu"])
    assert_one_error_line(code, err, "exceeds the vocabulary")
    code, _, err = run_main(generate_script.main, ["--checkpoint", path, "--num_beams", "50000", "--device", "cpu",
                                            "--max_new_tokens", str(10 ** 12)])
    assert_one_error_line(code, err, "GiB")
    assert time.time() - start < 20


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signals_exit_130_and_143_outside_training(tmp_path, sig, code):
    path = M.save_checkpoint(str(tmp_path / "lm.pth"), tiny_model(context_length=1024))
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "generate.py"), "--checkpoint", path, "--device",
                             "cpu", "--max_new_tokens", "100000", "--stream", "--prompt", "hi"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**ENV, "PYTHONPATH": HERE})
    proc.stdout.read(20)  # generating
    proc.send_signal(sig)
    assert proc.wait(timeout=60) == code
    assert b"Traceback" not in proc.stderr.read()


def test_messages_that_used_to_mislead(tmp_path):
    # a folder where a file should be written is not "free disk space"
    with pytest.raises(settings.UserError, match="that path is a folder"):
        files.atomic_write(str(tmp_path), lambda f: f.write(b"x"))
    # a truncated .pth says so in our words
    raw = open(M.save_checkpoint(str(tmp_path / "lm.pth"), tiny_model()), "rb").read()
    (tmp_path / "cut.pth").write_bytes(raw[:len(raw) // 2])
    with pytest.raises(M.CheckpointError, match="damaged or truncated"):
        M.read_checkpoint(str(tmp_path / "cut.pth"))
    # UTF-16 text is called UTF-16
    (tmp_path / "u16.txt").write_bytes("hello there".encode("utf-16"))
    with pytest.raises(settings.UserError, match="UTF-16"):
        data.read_text_file(str(tmp_path / "u16.txt"))


def test_balance_says_it_dropped_rows_and_names_the_rare_class(tmp_path, capsys):
    rows = [(f"see you at {i}", "ham") for i in range(56)] + [(f"WIN {i} cash", "spam") for i in range(6)]
    path = tmp_path / "t.csv"
    finetune_cls.write_labelled_csv(str(path), rows)
    cfg = settings.get_config(finetune_cls.DEFAULTS, ["--csv", str(path)])
    finetune_cls.load_splits(cfg)
    captured = capsys.readouterr()
    assert "balanced to 6 per class by the rarest class 'spam'" in captured.out
    assert "--balance false" in captured.err


# ===============================================================================================================
# 11. Talk to it: the chat REPL at a terminal, serve.py's OpenAI-compatible API, its chat page,
# bench.py --serve
# ===============================================================================================================

def endless_checkpoint(path, context_length=4096, kind="chat"):
    """A tiny chat model whose every logit is 0: greedy decoding writes "!" (token 0) until the context is full,
    a reply long enough to interrupt."""
    model = tiny_model(context_length=context_length)
    with torch.no_grad():
        model.out_head.weight.zero_()
    return M.save_checkpoint(str(path), model, kind=kind, template=data.TEMPLATE_NAME)


class Terminal:
    """A script run at a pseudo-terminal (its controlling terminal, so ^C there is SIGINT to it): send keys, wait
    for text."""

    def __init__(self, *argv, cwd):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: become the script
            os.chdir(cwd)
            os.execve(sys.executable, [sys.executable, *argv], {**ENV, "PYTHONPATH": HERE, "TERM": "dumb"})
        self.seen, self.pos = "", 0

    def send(self, keys):
        os.write(self.fd, keys.encode())

    def expect(self, text, timeout=60):
        """Wait until text appears after what the last expect matched; returns the output in between."""
        end = time.monotonic() + timeout
        while text not in self.seen[self.pos:]:
            ready, _, _ = select.select([self.fd], [], [], max(0.0, end - time.monotonic()))
            if not ready:
                raise AssertionError(f"no {text!r} within {timeout} s; output so far:\n{self.seen}")
            try:
                self.seen += os.read(self.fd, 65536).decode("utf-8", "replace").replace("\r\n", "\n")
            except OSError:  # the child closed the terminal
                raise AssertionError(f"the script ended before {text!r}; output:\n{self.seen}") from None
        start, self.pos = self.pos, self.seen.index(text, self.pos) + len(text)
        return self.seen[start:self.pos]

    def exit_code(self, timeout=30):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with contextlib.suppress(OSError):
                os.read(self.fd, 65536)  # keep the terminal drained
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                os.close(self.fd)
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.05)
        os.kill(self.pid, signal.SIGKILL)
        raise AssertionError(f"still running after {timeout} s; output:\n{self.seen}")


@slow
def test_chat_ctrl_c_stops_the_reply_or_clears_the_line_and_keeps_the_conversation(tmp_path):
    path = endless_checkpoint(tmp_path / "endless.pth")
    argv = [os.path.join(HERE, "generate.py"), "--chat", "--checkpoint", path, "--temperature", "0",
            "--max_new_tokens", "100000", "--device", "cpu"]
    term = Terminal(*argv, cwd=tmp_path)
    term.expect("you> ")
    term.send("hello there\n")
    term.expect("!!!!!")  # mid-reply
    term.send("\x03")
    term.expect("[cut]")
    reply = term.seen.split("hello there\n", 1)[1].split("[cut]")[0]
    term.expect("you> ")  # back at the prompt, the program alive
    term.send("half a line")
    term.expect("half a line")
    term.send("\x03")
    term.expect("you> ")
    term.send("/history\n")
    history = term.expect("exchanges)")
    assert "user: hello there\n" in history and "half a line" not in history  # the cleared line was not sent
    n_cut = reply.count("!")
    assert f"assistant: {'!' * n_cut} [cut]\n" in history and 5 <= n_cut < 4000  # the cut reply was kept
    assert "(1 exchanges)" in history
    term.send("\x04")  # Ctrl-D at an empty prompt leaves
    assert term.exit_code() == 0
    assert "Traceback" not in term.seen

    term = Terminal(*argv, cwd=tmp_path)  # SIGTERM mid-reply still ends the program, with 143
    term.expect("you> ")
    term.send("hello\n")
    term.expect("!!!!!")
    os.kill(term.pid, signal.SIGTERM)
    assert term.exit_code() == 143
    assert "Traceback" not in term.seen


@pytest.fixture
def api():
    """api(checkpoint, *flags) starts serve.py's server in this process on a free port of 127.0.0.1 (a thread) ->
    (base URL, its Engine). The servers stop when the test ends."""
    servers = []

    def start(checkpoint, *flags):
        cfg = settings.get_config(serve_script.DEFAULTS, ["--checkpoint", str(checkpoint), "--device", "cpu",
                                                          "--dtype", "float32", *flags])
        engine = serve_script.load_engine(cfg, torch.device("cpu"), torch.float32)
        server = serve_script.Server(("127.0.0.1", 0), engine, cfg["api_key"], cfg["max_body"])
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}", engine

    yield start
    for server in servers:
        server.engine.stopping.set()
        server.shutdown()
        server.server_close()


def openai_client(url, key="none"):
    openai = pytest.importorskip("openai")  # CI installs it for these tests
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


def http_request(url, method, path, body=b"", headers=None):
    """(status, parsed JSON or text) of one raw request."""
    host, port = url.split("//")[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request(method, path, body=body, headers=headers or {})
    res = conn.getresponse()
    raw = res.read().decode()
    conn.close()
    return res.status, (json.loads(raw) if res.getheader("Content-Type") == "application/json" else raw)


def streamed(client, **request):
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **request))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    return text, finish, chunks[-1].usage


def test_server_answers_as_generate_chat_does_streamed_or_not_with_usage_counts(tmp_path, api, monkeypatch,
                                                                                  capsys):
    path, model = tiny_checkpoint(tmp_path / "chat.pth")
    monkeypatch.setattr(sys, "stdin", fake_stdin(b"Name a color.\nAnd another one?\n"))
    turns = generate_script.main(["--chat", "--checkpoint", path, "--temperature", "0", "--max_new_tokens", "12",
                                 "--device", "cpu", "--dtype", "float32"])
    url, _ = api(path)
    client = openai_client(url)
    assert [m.id for m in client.models.list().data] == ["chat"]
    first = [{"role": "user", "content": "Name a color."}]
    second = first + [{"role": "assistant", "content": turns[0]["reply"]},
                      {"role": "user", "content": "And another one?"}]
    for messages, turn in ((first, turns[0]), (second, turns[1])):
        answer = client.chat.completions.create(model="chat", messages=messages, temperature=0, max_tokens=12)
        assert answer.choices[0].message.content == turn["reply"] and answer.choices[0].message.role == "assistant"
        text, finish, usage = streamed(client, model="chat", messages=messages, temperature=0, max_tokens=12)
        assert text == turn["reply"] and finish == [answer.choices[0].finish_reason]
        assert usage.model_dump() == answer.usage.model_dump()
    # usage: the prompt as our tokenizer splits the templated conversation; the tokens sampled, up to max_tokens
    tok = data.get_tokenizer()
    answer = client.chat.completions.create(model="chat", messages=first, temperature=0, max_tokens=12)
    prompt = tok.encode(data.format_conversation(first))
    assert answer.usage.prompt_tokens == len(prompt)
    n = answer.usage.completion_tokens
    assert answer.usage.total_tokens == len(prompt) + n and 1 <= n <= 12
    assert (n == 12) == (answer.choices[0].finish_reason == "length")
    greedy = M.generate(model, torch.tensor([prompt]), n, temperature=0)[0, len(prompt):].tolist()
    assert answer.choices[0].message.content in tok.decode(greedy)
    # a seed makes sampling repeatable; a stop string ends the answer before it
    a, b = (client.chat.completions.create(model="chat", messages=first, temperature=1.0, seed=7, max_tokens=12)
            for _ in range(2))
    assert a.choices[0].message.content == b.choices[0].message.content
    words = a.choices[0].message.content.split()
    if len(words) > 1:
        cut = client.chat.completions.create(model="chat", messages=first, temperature=1.0, seed=7, max_tokens=12,
                                             stop=[words[1]])
        assert cut.choices[0].finish_reason == "stop" and words[1] not in cut.choices[0].message.content
    # plain continuation
    done = client.completions.create(model="chat", prompt="Every effort moves", temperature=0, max_tokens=6)
    ids = tok.encode("Every effort moves")
    expected = tok.decode(M.generate(model, torch.tensor([ids]), 6, temperature=0)[0, len(ids):].tolist())
    assert done.choices[0].text == expected.split("<|endoftext|>")[0]
    assert done.usage.prompt_tokens == len(ids)


def test_server_refuses_bad_requests_with_openai_errors_and_keeps_answering(tmp_path, api):
    path, _ = tiny_checkpoint(tmp_path / "chat.pth", context_length=64)
    url, engine = api(path, "--api_key", "secret", "--max_body", "2048")
    key = {"Authorization": "Bearer secret", "Content-Type": "application/json"}
    ok = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}

    def post(body, path="/v1/chat/completions", headers=key):
        return http_request(url, "POST", path, body if isinstance(body, bytes) else json.dumps(body).encode(),
                            headers)

    cases = [
        (post(b"{not json"), 400, "not valid JSON"),
        (post(b"\xff\xfe"), 400, "UTF-8"),
        (post(b"[" * 100 + b"]" * 100), 400, "nests"),
        (post([1, 2]), 400, "JSON object"),
        (post({"model": "chat"}), 400, "messages"),
        (post({**ok, "messages": [{"role": "bot", "content": "x"}]}), 400, "role"),
        (post({**ok, "messages": [{"role": "assistant", "content": "x"}]}), 400, "where user was expected"),
        (post({**ok, "messages": [{"role": "user", "content": 3}]}), 400, "content"),
        (post({**ok, "temperature": "hot"}), 400, "temperature"),
        (post({**ok, "temperature": 9}), 400, "temperature"),
        (post({**ok, "max_tokens": 0}), 400, "max_tokens"),
        (post({**ok, "stop": ["a", "b", "c", "d", "e"]}), 400, "stop"),
        (post({**ok, "n": 3}), 400, "n must be 1"),
        (post({**ok, "stream": "yes"}), 400, "stream"),
        (post(ok, headers={"Authorization": "Bearer wrong"}), 401, "API key"),
        (post(ok, headers={}), 401, "API key"),
        (post(ok, path="/v1/nothing"), 404, "no route"),
        (http_request(url, "GET", "/v1/nothing", headers=key), 404, "no route"),
        (post({**ok, "model": "gpt-4"}), 404, "not served here"),
        (http_request(url, "GET", "/v1/chat/completions", headers=key), 405, "POST"),
        (post(json.dumps({**ok, "pad": "x" * 5000}).encode()), 413, "limit"),
        (post({**ok, "messages": [{"role": "user", "content": "word " * 100}]}), 400, "context"),
        (post({"model": "chat", "prompt": "word " * 100}, "/v1/completions"), 400, "context"),
        (http_request(url, "DELETE", "/v1/models", headers=key), 501, "method"),
    ]
    for (status, body), expected_status, words in cases:
        assert status == expected_status, (status, body)
        assert isinstance(body, dict) and set(body["error"]) >= {"message", "type", "param", "code"}, body
        assert words.lower() in body["error"]["message"].lower(), (words, body)
        assert "Traceback" not in json.dumps(body)
        assert http_request(url, "GET", "/v1/models", headers=key)[0] == 200  # still answering
    assert cases[-3][0][1]["error"]["code"] == "context_length_exceeded"
    # a request line that is not HTTP, a body without a length
    with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))) as s:
        s.sendall(b"GARBAGE\r\n\r\n")  # no HTTP version: the answer is the bare body, as HTTP/0.9 has it
        assert json.loads(s.recv(4096))["error"]["message"].startswith("Bad request syntax")
    with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nAuthorization: Bearer secret\r\n\r\n")
        assert b" 411 " in s.recv(4096).split(b"\r\n")[0]
    client = openai_client(url, "secret")
    assert client.chat.completions.create(**ok).choices[0].finish_reason in ("stop", "length")
    openai = pytest.importorskip("openai")
    with pytest.raises(openai.AuthenticationError):
        openai_client(url, "wrong").models.list()
    # a pretrained model serves plain continuation, and says so to a chat request
    base = M.save_checkpoint(str(tmp_path / "base.pth"), tiny_model(), kind="pretrain")
    url, _ = api(base)
    with pytest.raises(openai.BadRequestError, match="not an instruction-tuned chat model.*/v1/completions"):
        openai_client(url).chat.completions.create(**{**ok, "model": "base"})
    assert openai_client(url).completions.create(model="base", prompt="Hi", max_tokens=3).usage.completion_tokens


def test_server_answers_8_clients_at_once_and_a_disconnect_frees_it(tmp_path, api):
    path, _ = tiny_checkpoint(tmp_path / "chat.pth")
    url, engine = api(path)
    client = openai_client(url)
    questions = [[{"role": "user", "content": f"Question number {i}?"}] for i in range(8)]
    alone = [client.chat.completions.create(model="chat", messages=q, temperature=1.0, seed=i, max_tokens=10)
             .choices[0].message.content for i, q in enumerate(questions)]
    answers = [None] * 8

    def ask(i):
        if i % 2:
            answers[i] = streamed(client, model="chat", messages=questions[i], temperature=1.0, seed=i,
                                  max_tokens=10)[0]
        else:
            answers[i] = client.chat.completions.create(model="chat", messages=questions[i], temperature=1.0,
                                                        seed=i, max_tokens=10).choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert answers == alone  # every client answered, each as if it had been alone

    endless = endless_checkpoint(tmp_path / "endless.pth")
    url, engine = api(endless)
    client = openai_client(url)
    stream = client.chat.completions.create(model="endless", messages=questions[0], temperature=0,
                                            max_tokens=4000, stream=True)
    assert any("!" in (c.choices[0].delta.content or "") for c in itertools.islice(stream, 5))
    stream.close()  # the client goes away mid-stream
    end = time.monotonic() + 10
    while engine.lock.locked() and time.monotonic() < end:
        time.sleep(0.05)
    assert not engine.lock.locked()
    assert engine.last.finish_reason is None and engine.last.n_tokens < 4000  # it stopped generating
    answer = client.chat.completions.create(model="endless", messages=questions[1], temperature=0, max_tokens=3)
    assert answer.choices[0].message.content == "!!!"


def start_server_process(checkpoint, *flags):
    """serve.py as a user starts it, on a free port -> (process, base URL) once it says it is serving."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "serve.py"), "--checkpoint", str(checkpoint),
                             "--port", str(port), "--device", "cpu", *flags], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**ENV, "PYTHONPATH": HERE})
    line = proc.stdout.readline()
    assert "serving" in line, line + proc.stderr.read()
    return proc, f"http://127.0.0.1:{port}"


@slow
def test_server_stops_within_a_second_on_ctrl_c_or_sigterm_even_mid_answer(tmp_path):
    path = endless_checkpoint(tmp_path / "endless.pth")
    proc, url = start_server_process(path)
    assert http_request(url, "GET", "/v1/models")[0] == 200
    start = time.monotonic()
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=5) == 130 and time.monotonic() - start < 1.0
    assert "Traceback" not in proc.stderr.read()

    proc, url = start_server_process(path, "--host", "0.0.0.0")  # a host others can reach: one warning line
    body = json.dumps({"model": "endless", "messages": [{"role": "user", "content": "go"}], "max_tokens": 4000,
                       "temperature": 0, "stream": True}).encode()
    host, port = url.split("//")[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
    res = conn.getresponse()
    assert b"!" in res.fp.readline() + res.fp.readline() + res.fp.readline()  # streaming
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=5) == 143 and time.monotonic() - start < 1.0
    conn.close()
    err = proc.stderr.read()
    assert "Traceback" not in err
    assert sum("warning: listening on 0.0.0.0" in line for line in err.splitlines()) == 1


def chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser")


class Browser:
    """Headless Chromium driven over the DevTools protocol on a pipe (--remote-debugging-pipe: JSON messages
    ending in NUL on file descriptors 3 and 4), so no package beyond the standard library is needed."""

    def __init__(self, url, profile):
        to_chrome, self.writer = os.pipe()
        self.reader, from_chrome = os.pipe()
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={profile}", "--remote-debugging-pipe", "--window-size=1000,700"]

        def fds():  # the child's fds 3 and 4 are the pipe's ends
            os.dup2(to_chrome, 3)
            os.dup2(from_chrome, 4)

        self.proc = subprocess.Popen([chromium(), *flags, "about:blank"], preexec_fn=fds, pass_fds=(3, 4),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_chrome), os.close(from_chrome)
        self.next_id, self.buffer = 0, b""
        target = self.call("Target.createTarget", url=url)["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]

    def call(self, method, session=None, **params):
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params}
        if session or getattr(self, "session", None):
            message["sessionId"] = session or self.session
        os.write(self.writer, json.dumps(message).encode() + b"\0")
        while True:
            while b"\0" not in self.buffer:
                ready, _, _ = select.select([self.reader], [], [], 30)
                assert ready, f"chromium did not answer {method}"
                self.buffer += os.read(self.reader, 1 << 20)
            raw, self.buffer = self.buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self.next_id:
                assert "error" not in reply, reply
                return reply["result"]

    def js(self, expression):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")

    def wait_for(self, expression, timeout=30):
        end = time.monotonic() + timeout
        while not self.js(f"(() => {{ try {{ return {expression}; }} catch (e) {{ return false; }} }})()"):
            assert time.monotonic() < end, f"the page never got to {expression}: {self.js('document.body.innerText')}"
            time.sleep(0.05)

    def close(self):
        self.proc.kill()
        self.proc.wait()
        os.close(self.reader), os.close(self.writer)


@slow
@pytest.mark.skipif(chromium() is None, reason="no chromium here (CI installs Debian's chromium package)")
def test_chat_page_streams_an_answer_stops_and_shows_errors_in_a_real_browser(tmp_path, api):
    path = endless_checkpoint(tmp_path / "endless.pth")
    url, engine = api(path)
    browser = Browser(f"{url}/?ask=Hello%20there&temperature=0", tmp_path / "profile")
    try:
        # /?ask= sent a message, greedy, at the page's max tokens (200): the answer came, finished at the limit
        browser.wait_for("document.body.dataset.state === 'answered'")
        assert browser.js("document.querySelector('.user').textContent") == "Hello there"
        assert browser.js("document.querySelector('.assistant').textContent") == "!" * 200
        assert "reached max tokens" in browser.js("document.body.innerText")
        # a long answer: seen growing while it streams, then the stop button keeps what came, marked as stopped
        browser.js("$('max_tokens').value = 3500; $('input').value = 'Go on'; $('form').requestSubmit()")
        lengths = []
        while len(set(lengths)) < 3:
            lengths.append(browser.js("document.querySelectorAll('.assistant')[1].textContent.length"))
            time.sleep(0.02)
        assert lengths == sorted(lengths) and browser.js("!$('stop').hidden")
        browser.js("$('stop').click()")
        browser.wait_for("document.body.dataset.state === 'idle'")
        cut = browser.js("document.querySelectorAll('.assistant')[1].className")
        assert "cut" in cut and 0 < browser.js("document.querySelectorAll('.assistant')[1].textContent.length") < 3500
        assert browser.js("messages.length") == 4  # the stopped answer stays in the conversation
        # a request the server refuses: its message, readable on the page
        browser.js("$('temperature').value = 7; $('input').value = 'Hot?'; $('form').requestSubmit()")
        browser.wait_for("document.querySelector('.error') !== null")
        assert "temperature must be a number from 0 to 2" in browser.js("document.querySelector('.error').textContent")
        png = base64.b64decode(browser.call("Page.captureScreenshot", format="png")["data"])
        (tmp_path / "chat-page.png").write_bytes(png)
        assert png.startswith(b"\x89PNG")
        if os.environ.get("GPT2_SCREENSHOT"):  # where to keep a copy to look at
            shutil.copy(tmp_path / "chat-page.png", os.environ["GPT2_SCREENSHOT"])
        # a new chat clears the page and the conversation
        browser.js("$('new').click()")
        assert browser.js("messages.length") == 0 and browser.js("document.querySelectorAll('.msg').length") == 0
    finally:
        browser.close()


# ===============================================================================================================
# 12. Hostile file system and servers: links, pipes, unreadable files, endless downloads, numbers from files, races,
# pathological text, ambiguous CSV headers, sources replaced behind a cache's back
# ===============================================================================================================

def test_files_are_never_written_through_links(tmp_path, verdict, serve):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    # a run folder's .lock: a link to a file elsewhere, a dangling link, a second name of a file elsewhere
    for i, plant in enumerate((lambda p: p.symlink_to(victim), lambda p: p.symlink_to(tmp_path / "made.txt"),
                               lambda p: os.link(victim, p))):
        out = tmp_path / f"run{i}"
        out.mkdir()
        plant(out / ".lock")
        code, _, err = run_main(pretrain.main, pre(verdict) + ["--out_dir", str(out), "--max_steps", "1"])
        assert_one_error_line(code, err, "lock file", str(out / ".lock"))
        assert victim.read_text() == "precious" and not (tmp_path / "made.txt").exists()
    # the token cache folder's .lock, and a token file that is a link
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / ".lock").symlink_to(victim)
    with pytest.raises(settings.UserError, match="symbolic link"):
        cached(verdict, tmp_path)
    os.remove(tmp_path / "cache" / ".lock")
    bin_path, meta_path = data.cache_paths(verdict, str(tmp_path / "cache"))
    os.symlink(victim, bin_path)
    assert cached(verdict, tmp_path).tokens.tolist() == encode(open(verdict).read())
    assert victim.read_text() == "precious" and not os.path.islink(bin_path)
    # links at the temporary names an atomic write used to take (NAME.PID.tmp) are never written through; its
    # own names are new each time and unpredictable
    target = tmp_path / "settings.json"
    for pid in (os.getpid(), os.getpid() + 1):
        os.symlink(victim, f"{target}.{pid}.tmp")
    files.write_json(str(target), {"a": 1})
    assert read_json(target) == {"a": 1} and not target.is_symlink() and victim.read_text() == "precious"
    for pid in (os.getpid(), os.getpid() + 1):
        os.remove(f"{target}.{pid}.tmp")
    names = set()
    for _ in range(3):
        fd, name = files.new_temp_file(str(target))
        os.close(fd)
        names.add(name)
        assert re.fullmatch(re.escape(f"{target}.{os.getpid()}.") + "[0-9a-f]{16}.tmp", name)
    assert len(names) == 3
    # stale temporary files of killed writers go, in the new and the old form; a live writer's file stays
    dead = [tmp_path / "model.pth.999999999.0123456789abcdef.tmp", tmp_path / "model.pth.999999999.tmp"]
    for p in dead:
        p.write_bytes(b"half")
    removed = files.remove_stale_tmp(str(tmp_path))
    assert sorted(removed) == sorted(p.name for p in dead) and all(os.path.exists(n) for n in names)
    # a download's .part file planted as a link
    url, _ = serve(body=b"downloaded bytes")
    dest = tmp_path / "corpus.txt"
    os.symlink(victim, str(dest) + ".part")
    with pytest.raises(data.DownloadError, match="symbolic link") as e:
        data.download(f"{url}/ok/corpus.txt", str(dest), retries=1, progress=False)
    assert len(str(e.value).splitlines()) == 1 and victim.read_text() == "precious" and not dest.exists()
    os.remove(str(dest) + ".part")
    data.download(f"{url}/ok/corpus.txt", str(dest), retries=1, progress=False)
    assert dest.read_bytes() == b"downloaded bytes" and not dest.is_symlink()


def as_nobody(tmp_path, calls):
    """Run each (script, args) of calls through settings.entry in one child process that drops to uid/gid 65534
    after its imports (root reads files of mode 000, so only another user sees a missing permission) -> a list of
    (exit code, stderr). The files it reads must lie in a folder that other users may enter."""
    code = f"""
import contextlib, io, json, os, sys
sys.path.insert(0, {HERE!r})
import data, finetune_cls, generate, load_gpt2, pretrain, settings
data.get_tokenizer()
os.setgid(65534); os.setuid(65534)
results = []
for script, args in {calls!r}:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            settings.entry(lambda: getattr(sys.modules[script], "main")(args))
            code = 0
        except SystemExit as e:
            code = e.code
        except BaseException as e:
            code, err = 99, io.StringIO(repr(e))
    results.append((code, err.getvalue()))
print(json.dumps(results))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=ENV,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


def test_inputs_that_are_not_readable_regular_files_are_one_line(tmp_path):
    # a FIFO where a model folder's tokenizer_config.json or a download's .sha256 record belongs: refused, not read
    folder = load_gpt2.export_hf(save_classifier(tmp_path / "cls.pth", biased_classifier()), str(tmp_path / "hf"))
    os.remove(os.path.join(folder, "tokenizer_config.json"))
    os.mkfifo(os.path.join(folder, "tokenizer_config.json"))
    proc = run_script("load_gpt2.py", "--model", folder, "--out", str(tmp_path / "back.pth"), timeout=120)
    assert_one_line_error(proc, "tokenizer_config.json", "FIFO")
    os.remove(os.path.join(folder, "config.json"))
    os.mkfifo(os.path.join(folder, "config.json"))
    proc = run_script("load_gpt2.py", "--model", folder, "--out", str(tmp_path / "back.pth"), timeout=120)
    assert_one_line_error(proc, "config.json", "FIFO")
    models = tmp_path / "models"
    load_gpt2.export_hf(M.save_checkpoint(str(tmp_path / "lm.pth"), tiny_model()), str(models / "gpt2"))
    os.mkfifo(models / "gpt2" / "model.safetensors.sha256")
    proc = run_script("load_gpt2.py", "--model", "gpt2", "--models_dir", str(models), "--out",
                      str(tmp_path / "g.pth"), timeout=120)
    assert_one_line_error(proc, "model.safetensors.sha256", "FIFO")
    # a run folder's .lock that is a folder or a FIFO
    for i, make in enumerate((os.mkdir, os.mkfifo)):
        out = tmp_path / f"run{i}"
        out.mkdir()
        make(out / ".lock")
        proc = run_script("pretrain.py", *short_pretrain_flags(os.path.join(SHARED_DATA, "the-verdict.txt")),
                          "--out_dir", str(out), "--max_steps", "1", timeout=120)
        assert_one_line_error(proc, "lock file", "a folder" if make is os.mkdir else "FIFO")
    # unreadable checkpoints and weights, for a user who may not read them
    if not hasattr(os, "setuid") or os.geteuid() != 0:
        pytest.skip("the unreadable-file cases drop to another user, which takes root")
    public = tempfile.mkdtemp(prefix="unreadable-", dir="/tmp")
    try:
        os.chmod(public, 0o777)  # the other user may create its run folder here
        lm = M.save_checkpoint(os.path.join(public, "lm.pth"), tiny_model())
        cls = save_classifier(os.path.join(public, "cls.pth"), biased_classifier())
        hf = load_gpt2.export_hf(lm, os.path.join(public, "hf"))
        for p in (lm, cls, os.path.join(hf, "model.safetensors")):
            os.chmod(p, 0)
        weights = os.path.join(hf, "model.safetensors")
        calls = [("generate", ["--checkpoint", lm, "--device", "cpu", "--max_new_tokens", "2"], lm),
                 ("pretrain", ["--init", lm, "--data", os.path.join(SHARED_DATA, "the-verdict.txt"), "--out_dir",
                               os.path.join(public, "run"), "--device", "cpu"], lm),
                 ("finetune_cls", ["--predict", "hello", "--checkpoint", cls, "--device", "cpu"], cls),
                 ("load_gpt2", ["--model", hf, "--out", os.path.join(public, "back.pth")], weights),
                 ("load_gpt2", ["--model", weights, "--out", os.path.join(public, "b.pth")], weights)]
        results = as_nobody(public, [call[:2] for call in calls])
    finally:
        shutil.rmtree(public, ignore_errors=True)
    for (code, err), (_, _, path) in zip(results, calls):
        assert_one_error_line(code, err, "permission denied", path)


def test_downloads_are_bounded_in_size_and_time_and_say_which_bound(tmp_path, serve):
    dest = tmp_path / "config.json"
    # a server that streams without end: cut at the cap, nothing kept
    url, _ = serve(mode="endless")
    start = time.time()
    with pytest.raises(data.DownloadError, match="cap") as e:
        data.download(f"{url}/config.json", str(dest), max_bytes=data.JSON_MAX_BYTES, progress=False)
    assert time.time() - start < 20 and len(str(e.value).splitlines()) == 1
    assert not dest.exists() and not os.path.exists(str(dest) + ".part")
    # ... also where load_gpt2 downloads a model's config.json from a hub
    code, _, err = run_main(load_gpt2.main, ["--model", "gpt2", "--models_dir", str(tmp_path / "models"),
                                             "--hub_url", url])
    last = err.replace("\r", "\n").strip().splitlines()[-1]  # after the progress bar
    assert code == 1 and "Traceback" not in err and "config.json sent more than the 1,048,576-byte cap" in last
    # a server that announces more than the cap is refused before any byte
    url, _ = serve(body=b"x" * 5000)
    with pytest.raises(data.DownloadError, match="announces 5,000 bytes"):
        data.download(f"{url}/ok/big.txt", str(dest), max_bytes=4000, progress=False)
    assert not os.path.exists(str(dest) + ".part")
    # a byte every 0.1 s: never a read timeout, but a stall, or past the deadline, whichever is set tighter
    url, _ = serve(body=b"y" * 1000, mode="trickle")
    start = time.time()
    with pytest.raises(data.DownloadError, match="stalled"):
        data.download(f"{url}/slow.txt", str(dest), retries=1, stall_s=1, progress=False)
    with pytest.raises(data.DownloadError, match="deadline of 1 s"):
        data.download(f"{url}/slow.txt", str(dest), retries=2, stall_s=30, deadline_s=1, progress=False)
    assert time.time() - start < 15 and not dest.exists()


def test_numbers_read_from_files_are_range_checked_where_they_are_read(tmp_path):
    # an exported classifier folder's config.json: token ids and sizes out of range are refused at conversion
    folder = load_gpt2.export_hf(save_classifier(tmp_path / "cls.pth", biased_classifier()), str(tmp_path / "hf"))
    config = read_json(os.path.join(folder, "config.json"))
    for edit, words in (({"pad_token_id": 10 ** 30}, "pad_token_id 10000"), ({"pad_token_id": -1}, "pad_token_id -1"),
                        ({"pad_token_id": 50257}, "pad_token_id 50257"), ({"pad_token_id": "0"}, "pad_token_id '0'"),
                        ({"eos_token_id": 2.5}, "eos_token_id 2.5"), ({"n_embd": 10 ** 30}, "n_embd 1000")):
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump({**config, **edit}, f)
        code, _, err = run_main(load_gpt2.main, ["--model", folder, "--out", str(tmp_path / "back.pth")])
        assert_one_error_line(code, err, words)
        assert not (tmp_path / "back.pth").exists()
    # a classifier checkpoint's own numbers, where finetune_cls.py reads them
    good = torch.load(tmp_path / "cls.pth", weights_only=True)
    for edit, words in (({"max_length": -1}, "max_length -1"), ({"max_length": 0}, "max_length 0"),
                        ({"max_length": 10 ** 30}, "max_length 1000"), ({"max_length": 33}, "context_length 32"),
                        ({"max_length": "16"}, "max_length '16'"), ({"pad_id": 10 ** 30}, "pad_id 1000"),
                        ({"pad_id": -5}, "pad_id -5"), ({"lora": {"rank": 10 ** 9, "alpha": 1.0}}, "lora"),
                        ({"config": {**good["config"], "n_layers": 10 ** 30}}, "n_layers must be a whole number")):
        torch.save({**good, **edit}, tmp_path / "edited.pth")
        code, _, err = run_main(finetune_cls.main, ["--predict", "hello", "--checkpoint", str(tmp_path / "edited.pth"),
                                                    "--device", "cpu"])
        assert_one_error_line(code, err, words)
    code, out, _ = run_main(finetune_cls.main, ["--predict", "hello", "--checkpoint", str(tmp_path / "cls.pth"),
                                                "--device", "cpu"])
    assert code == 0 and out.strip()


def test_two_commands_writing_one_output_do_not_both_win(tmp_path):
    lm = M.save_checkpoint(str(tmp_path / "lm.pth"), tiny_model())
    # the final step refuses what another command put in place since this one started
    out = tmp_path / "out.pth"
    out.write_bytes(b"the other command's")
    with pytest.raises(settings.UserError, match="written by another command while this one ran"):
        files.save_pth(str(out), {"x": torch.zeros(1)}, exclusive=True)
    assert out.read_bytes() == b"the other command's"
    assert sorted(os.listdir(tmp_path)) == ["lm.pth", "out.pth"]  # no temporary file left
    tmp = files.new_temp_dir(str(tmp_path / "hf"))
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    with pytest.raises(settings.UserError, match="filled by another command while this export ran"):
        load_gpt2._rename_folder_into_place(tmp, str(tmp_path / "hf"))
    os.rmdir(tmp)
    # a killed export's folder is cleaned up by the next export beside it
    dead = tmp_path / "hf2.999999999.0123456789abcdef.tmp"
    dead.mkdir()
    load_gpt2.export_hf(lm, str(tmp_path / "hf2"))
    assert not dead.exists() and os.path.isfile(tmp_path / "hf2" / "model.safetensors")
    # two exports, and two conversions, started at once: exactly one wins, the other says why
    for args in (["--export", lm, "--out", str(tmp_path / "same")],
                 ["--model", str(tmp_path / "hf2"), "--out", str(tmp_path / "same.pth")]):
        procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "load_gpt2.py"), *args], cwd=tmp_path,
                                  env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]
        results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
        assert sorted(code for code, _ in results) == [0, 1], results
        err = next(err for code, err in results if code)
        assert "Traceback" not in err and re.search("another command|not empty|already exists", err), err
    assert sorted(os.listdir(tmp_path / "same")) == sorted(os.listdir(tmp_path / "hf2"))
    assert load_gpt2.main(["--model", str(tmp_path / "hf2"), "--out", str(tmp_path / "same.pth"), "--force"])


def test_text_without_safe_cuts_keeps_memory_bounded(tmp_path, monkeypatch):
    rng = random.Random(3)
    letters = "".join(rng.choice("abcdefghij") for _ in range(5000))  # one giant "word": no safe cut anywhere
    # (letters outside the few ranges safe_cut knows give no cut either: a forced cut would land in <|endoftext|>)
    for text, longest in ((letters, 40), (letters[:997] + "<|endoftext|>" + letters[:2000], 64),
                          ("\u00e9" * 5 + "<|endoftext|>" + "\u00e9" * 30, 10)):
        forced = []
        pieces = list(data.safe_pieces([text[i:i + 7] for i in range(0, len(text), 7)], 10,
                                       on_forced_cut=lambda: forced.append(1), longest=longest))
        assert "".join(pieces) == text and max(map(len, pieces)) < longest + len(data.EOT_TEXT) and forced
        ids = [t for p in pieces for t in encode(p)]  # never cut inside <|endoftext|>: it stays the special token
        assert ids.count(data.EOT_ID) == text.count(data.EOT_TEXT) and len(ids) <= len(encode(text)) + 2 * len(forced)
    # a corpus of such text: pieces stay small, the text comes back whole, and it is said once
    monkeypatch.setattr(data, "READ_BYTES", 100)
    monkeypatch.setattr(data, "PIECE_CHARS", 64)
    monkeypatch.setattr(data, "MAX_PIECE_CHARS", 256)
    folder = make_corpus(tmp_path / "corpus", {"a.txt": letters, "b.txt": letters[::-1], "c.txt": "short text"})
    spy = Spy(monkeypatch)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        c = cached(folder, tmp_path)
    assert max(map(len, spy.texts)) <= 256 and err.getvalue().count("note:") == 1, err.getvalue()
    assert "a.txt" in err.getvalue() and "cut every 64 characters" in err.getvalue()
    whole = "<|endoftext|>".join([letters, letters[::-1], "short text"])
    assert tiktoken.get_encoding("gpt2").decode(c.tokens.tolist()) == whole
    # ordinary text is still cut only where it tokenizes as the whole
    text = words_text(3000)
    (tmp_path / "w.txt").write_text(text)
    assert cached(tmp_path / "w.txt", tmp_path).tokens.tolist() == encode(text)


def test_a_csv_header_that_names_a_column_twice_is_refused(tmp_path):
    for header, twice in (("Label,Text,Text", "'Text'"), ("Label,Label,Text", "'Label'"),
                          ("id,id,Label,Text", "'id'"), ("Text\tLabel\tText", "'Text'")):
        sep = "\t" if "\t" in header else ","
        path = tmp_path / ("t.tsv" if sep == "\t" else "t.csv")
        rows = [sep.join(["ham" if c == "Label" else f"{c} {i}" for c in header.split(sep)]) for i in range(12)]
        path.write_text("\n".join([header, *rows]) + "\n")
        with pytest.raises(settings.UserError, match=f"names the column\\(s\\) {twice} more than once"):
            finetune_cls.read_labelled_csv(str(path))
        code, _, err = run_main(finetune_cls.main, ["--csv", str(path), "--out_dir", str(tmp_path / "run")])
        assert_one_error_line(code, err, twice, "more than once")
    path = tmp_path / "fine.csv"
    path.write_text("Label,Text,Texts\nham,one,two\n")  # names that differ are fine
    assert finetune_cls.read_labelled_csv(str(path)) == [("one", "ham")]


def test_a_cache_notices_a_source_replaced_with_the_same_size_and_mtime(tmp_path):
    src = tmp_path / "corpus.txt"
    src.write_text("the first text of this corpus")
    first = cached(src, tmp_path)
    st = os.stat(src)
    meta_path = first.path[:-4] + ".json"
    meta_mtime = os.stat(meta_path).st_mtime_ns
    assert cached(src, tmp_path).tokens.tolist() == encode("the first text of this corpus")
    assert os.stat(meta_path).st_mtime_ns == meta_mtime  # unchanged: not tokenized again
    # another file of the same size and mtime put in its place (cp -p, tar -x, rsync -t), and the same file
    # rewritten in place with its mtime set back
    for n, replace in enumerate((True, False)):
        text = f"other words, of equal size: {n}"
        assert len(text) == st.st_size
        if replace:
            (tmp_path / "new.txt").write_text(text)
            os.utime(tmp_path / "new.txt", ns=(st.st_atime_ns, st.st_mtime_ns))
            os.replace(tmp_path / "new.txt", src)
        else:
            with open(src, "r+") as f:
                f.write(text)
            os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert (os.stat(src).st_size, os.stat(src).st_mtime_ns) == (st.st_size, st.st_mtime_ns)
        assert cached(src, tmp_path).tokens.tolist() == encode(text)
    # metadata edited by hand, with values of the right types, is rebuilt rather than trusted
    tokens = encode(src.read_text())
    edits = [lambda m: m["files"][0].update(mtime_ns=m["files"][0]["mtime_ns"] + 1),
             lambda m: m["files"][0].update(n_chars=1), lambda m: m.pop("checksum"),
             lambda m: m["files"][0].update(index=[[0, 0], [1, 1]]), lambda m: m.update(checksum="0" * 64)]
    for edit in edits:
        meta = read_json(meta_path)
        edit(meta)
        with open(meta_path, "w") as f:
            json.dump(meta, f)
        again = cached(src, tmp_path)
        assert again.tokens.tolist() == tokens and again.meta == data.with_checksum(again.meta)
        assert read_json(meta_path) == again.meta
