"""Tests for the whole pipeline: `python -m pytest -q test_all.py` (tiny configs, no network, a few minutes on 2 cores).

The tokenizer files and the corpora come from ../shared (TIKTOKEN_CACHE_DIR and a local HTTP server on 127.0.0.1);
tests that need them are skipped when that folder is absent.
"""
import functools
import hashlib
import http.server
import os
import shutil
import signal
import subprocess
import sys
import threading

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.environ.get("GPT2_SHARED_DIR", os.path.join(HERE, "..", "shared"))
SHARED_DATA = os.path.join(SHARED, "data")
if os.path.isdir(os.path.join(SHARED, "tiktoken-cache")):
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", os.path.join(SHARED, "tiktoken-cache"))
sys.path.insert(0, HERE)

import data  # noqa: E402
import generate as generate_script  # noqa: E402
import model as M  # noqa: E402
import pretrain  # noqa: E402

needs_shared = pytest.mark.skipif(not os.path.isdir(SHARED_DATA), reason="../shared/data not present")
TINY = dict(M.GPT_CONFIG_124M, vocab_size=50257, context_length=32, emb_dim=32, n_heads=2, n_layers=2,
            drop_rate=0.0, qkv_bias=False)
TINY_FLAGS = ["--context_length", "32", "--emb_dim", "32", "--n_heads", "2", "--n_layers", "2",
              "--drop_rate", "0", "--batch_size", "2", "--sample_tokens", "5", "--device", "cpu"]


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return M.GPTModel({**TINY, **overrides}).eval()


@pytest.fixture
def verdict(tmp_path):
    if not os.path.isdir(SHARED_DATA):
        pytest.skip("../shared/data not present")
    path = tmp_path / "the-verdict.txt"
    shutil.copy(os.path.join(SHARED_DATA, "the-verdict.txt"), path)
    return str(path)


def run_script(*args, cwd=HERE, timeout=300):
    """Run an entry script as a user would; returns CompletedProcess with text output."""
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": HERE})


def assert_one_line_error(proc, *words):
    """Non-zero exit, no traceback, and a last stderr line that names the problem."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    for w in words:
        assert w.lower() in last.lower(), last


# ---------------------------------------------------------------------------------------------------------------
# model.py
# ---------------------------------------------------------------------------------------------------------------

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


def test_fused_and_manual_attention_agree():
    m = tiny_model(qkv_bias=True)
    x = torch.randint(0, 50257, (3, 25))
    with torch.no_grad():
        fused = m(x)
        manual = m.set_fused_attention(False)(x)
    assert all(not b.att.fused for b in m.trf_blocks)
    torch.testing.assert_close(fused, manual, atol=1e-5, rtol=1e-5)
    # and with a cache holding a prefix (the mask then is not the square one)
    for fused_flag in (True, False):
        m.set_fused_attention(fused_flag)
        cache = M.KVCache(m, batch_size=3)
        with torch.no_grad():
            m(x[:, :10], kv_cache=cache)
            part = m(x[:, 10:], kv_cache=cache)
        torch.testing.assert_close(part, fused[:, 10:], atol=1e-5, rtol=1e-5)


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

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"model": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(M.CheckpointError):
        M.load_model(str(tmp_path / "evil.pth"))
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------------------
# data.py
# ---------------------------------------------------------------------------------------------------------------

def test_tokenizer_round_trip():
    ids = data.text_to_token_ids("Hello, world. <|endoftext|> Is this-- a test?")
    assert ids.shape[0] == 1 and data.EOT_ID in ids[0].tolist()
    assert data.token_ids_to_text(ids) == "Hello, world. <|endoftext|> Is this-- a test?"


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


def test_settings_helper_types_help_and_errors(capsys):
    defaults = dict(top_k=50, lr=4e-4, name="x", resume=False, limit=None)
    cfg = data.get_config(defaults, ["--top_k", "40", "--lr=1e-3", "--resume", "--limit", "off"])
    assert cfg == dict(top_k=40, lr=1e-3, name="x", resume=True, limit=None)
    assert data.get_config(defaults, ["--resume", "false"])["resume"] is False
    for bad in (["--top_kk", "3"], ["--top_k", "many"], ["--resume", "maybe"]):
        with pytest.raises(SystemExit) as e:
            data.get_config(defaults, bad)
        assert e.value.code == 2
    with pytest.raises(SystemExit):
        generate_script.main(["--help"])
    assert "0 = greedy" in capsys.readouterr().out  # the comment beside the setting


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves ../shared/data with Range support; /short/ sends half the bytes, /bad/ sends wrong bytes."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        parts = self.path.strip("/").split("/")
        mode, name = (parts[0], parts[-1]) if len(parts) > 1 else ("ok", parts[0])
        path = os.path.join(SHARED_DATA, name)
        if not os.path.exists(path):
            self.send_error(404)
            return
        body = open(path, "rb").read()
        if mode == "bad":
            body = body[::-1]
        start = 0
        rng = self.headers.get("Range")
        if rng and mode == "ok":
            start = int(rng.split("=")[1].split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        if mode == "short":
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body[start:])


@pytest.fixture
def server():
    if not os.path.isdir(SHARED_DATA):
        pytest.skip("../shared/data not present")
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_download_verifies_resumes_and_explains(server, tmp_path):
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


def test_load_text_folder_and_bad_files(tmp_path):
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "b.txt").write_text("beta")
    assert data.load_text(str(tmp_path)) == "alpha<|endoftext|>beta"
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(data.UserError, match="not UTF-8"):
        data.load_text(str(tmp_path / "latin1.txt"))
    (tmp_path / "bin.txt").write_bytes(b"\x00\x01\x02")
    with pytest.raises(data.UserError, match="binary"):
        data.load_text(str(tmp_path / "bin.txt"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(data.UserError, match="no .txt files"):
        data.load_text(str(empty))


# ---------------------------------------------------------------------------------------------------------------
# pretrain.py
# ---------------------------------------------------------------------------------------------------------------

def test_lr_schedule():
    assert pretrain.lr_at_step(0, 100, 1e-3, "constant") == 1e-3
    assert pretrain.lr_at_step(0, 100, 1e-3, "cosine", warmup_steps=10) == pytest.approx(1e-4)
    assert pretrain.lr_at_step(9, 100, 1e-3, "cosine", warmup_steps=10) == pytest.approx(1e-3)
    assert pretrain.lr_at_step(10, 100, 1e-3, "cosine", 10, 1e-5) == pytest.approx(1e-3)
    assert pretrain.lr_at_step(55, 100, 1e-3, "cosine", 10, 1e-5) == pytest.approx((1e-3 + 1e-5) / 2)
    assert pretrain.lr_at_step(100, 100, 1e-3, "cosine", 10, 1e-5) == pytest.approx(1e-5)


def test_pretrain_end_to_end_writes_what_it_promises(verdict, tmp_path):
    out = tmp_path / "run"
    last = pretrain.main(["--data", verdict, "--out_dir", str(out), "--epochs", "2", "--lr", "1e-3",
                          "--eval_freq", "20", *TINY_FLAGS])
    for f in ["model.pth", "model_and_optimizer.pth", "log.csv", "loss-plot.png"]:
        assert (out / f).exists(), f
    rows = (out / "log.csv").read_text().splitlines()
    assert rows[0] == "step,epoch,tokens_seen,train_loss,val_loss,lr,tokens_per_s"
    first, final = rows[1].split(","), rows[-1].split(",")
    assert float(final[3]) < float(first[3]) - 1.0  # training lowers the loss
    assert int(final[2]) == int(final[0]) * 2 * 32  # tokens seen = steps * batch * context
    model, ckpt = M.load_model(str(out / "model.pth"))
    assert ckpt["kind"] == "pretrain" and ckpt["config"]["emb_dim"] == 32 and last["step"] == int(final[0])
    texts = generate_script.main(["--checkpoint", str(out / "model.pth"), "--max_new_tokens", "5",
                                  "--num_samples", "2", "--device", "cpu"])
    assert len(texts) == 2 and all(t.startswith("Every effort moves you") for t in texts)


def test_resume_equals_uninterrupted_run(verdict, tmp_path, monkeypatch):
    text = tmp_path / "short.txt"  # ~10 steps an epoch, so the run crosses an epoch boundary
    text.write_text(open(verdict).read()[:3300])
    common = ["--data", str(text), "--epochs", "2", "--eval_freq", "4", "--lr_schedule", "cosine",
              "--warmup_steps", "2", "--grad_clip", "1.0", *TINY_FLAGS, "--drop_rate", "0.1"]
    pretrain.main([*common, "--out_dir", str(tmp_path / "a")])
    # the same run, stopped by SIGTERM in the second epoch, then resumed
    calls = {"n": 0}
    real = pretrain.calc_loss_batch

    def terminate_at_step_13(*args):
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] == 13:
                os.kill(os.getpid(), signal.SIGTERM)
        return real(*args)

    monkeypatch.setattr(pretrain, "calc_loss_batch", terminate_at_step_13)
    with pytest.raises(SystemExit) as stopped:
        pretrain.main([*common, "--out_dir", str(tmp_path / "b")])
    assert stopped.value.code == 143
    state = M.read_checkpoint(str(tmp_path / "b" / "model_and_optimizer.pth"))
    assert state["step"] == 13 and state["epoch"] == 1 and state["batch_pos"] > 0
    monkeypatch.setattr(pretrain, "calc_loss_batch", real)
    pretrain.main([*common, "--out_dir", str(tmp_path / "b"), "--resume"])
    a = M.read_checkpoint(str(tmp_path / "a" / "model.pth"))["model"]
    b = M.read_checkpoint(str(tmp_path / "b" / "model.pth"))["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)
    assert (tmp_path / "a" / "log.csv").read_text() .splitlines()[-1].split(",")[:5] == \
        (tmp_path / "b" / "log.csv").read_text().splitlines()[-1].split(",")[:5]


def test_nan_loss_stops_and_keeps_the_last_checkpoint(verdict, tmp_path, monkeypatch):
    out = tmp_path / "run"
    calls = {"n": 0}
    real = pretrain.calc_loss_batch

    def flaky(*args):
        loss = real(*args)
        if not torch.is_grad_enabled():  # evaluation
            return loss
        calls["n"] += 1
        return loss * float("nan") if calls["n"] == 4 else loss

    monkeypatch.setattr(pretrain, "calc_loss_batch", flaky)
    with pytest.raises(data.UserError, match="loss became nan at step 4.*last good checkpoint"):
        pretrain.main(["--data", verdict, "--out_dir", str(out), "--save_every", "2", "--epochs", "1", *TINY_FLAGS])
    state = M.read_checkpoint(str(out / "model_and_optimizer.pth"))
    assert state["step"] == 2 and all(torch.isfinite(v).all() for v in state["model"].values())


def test_pretrain_epochs_zero_only_evaluates(verdict, tmp_path):
    res = pretrain.main(["--data", verdict, "--epochs", "0", "--out_dir", str(tmp_path / "x"), *TINY_FLAGS])
    assert 10.0 < res["train_loss"] < 11.5 and 10.0 < res["val_loss"] < 11.5  # ~ln(50257) = 10.8 untrained
    assert not (tmp_path / "x").exists()


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
        proc = run_script("pretrain.py", *args, *TINY_FLAGS)
        assert_one_line_error(proc, *words)
    proc = run_script("pretrain.py", "--epoch", "3")
    assert proc.returncode == 2 and "unrecognized arguments: --epoch" in proc.stderr
    proc = run_script("pretrain.py", "--lr", "fast")
    assert proc.returncode == 2 and "--lr" in proc.stderr


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
