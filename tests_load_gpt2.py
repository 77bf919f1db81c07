"""Tests for load_gpt2.py: tiny random checkpoints in the published GPT-2 layout, written here, checked against an
independent functional GPT-2 forward pass over the raw published tensors."""
import hashlib
import http.server
import json
import math
import os
import socket
import struct
import subprocess
import sys
import threading

import pytest
import torch

from data import DownloadError, UserError
from load_gpt2 import (SafetensorsFile, export_hf, init_model, load_gpt2 as load_gpt2_fn, load_hf_checkpoint, main,
                       read_safetensors, write_safetensors)
from model import CheckpointError, GPTModel, generate, load_model, quantize_int8, save_checkpoint

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = dict(vocab_size=101, n_positions=32, n_embd=32, n_layer=2, n_head=4)


# ---------------------------------------------------------------------------------------------------------------
# Published-layout checkpoints and a reference forward pass over them
# ---------------------------------------------------------------------------------------------------------------

def published_tensors(prefix=False, masks=False, lm_head=False, seed=0, dtype=torch.float32, **size):
    """Random tensors under exactly the names and shapes of openai-community/gpt2's model.safetensors."""
    c = {**TINY, **size}
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
    c = {**TINY, **over}
    return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": c["vocab_size"],
            "n_positions": c["n_positions"], "n_ctx": c["n_positions"], "n_embd": c["n_embd"],
            "n_layer": c["n_layer"], "n_head": c["n_head"], "activation_function": "gelu_new",
            "layer_norm_epsilon": 1e-5, **{k: v for k, v in over.items() if k not in TINY}}


def write_published(folder, tensors, config=True, **config_over):
    os.makedirs(folder, exist_ok=True)
    write_safetensors(os.path.join(folder, "model.safetensors"), tensors, {"format": "pt"})
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
    model = load_hf_checkpoint(write_published(tmp_path / "m", sd)).eval()
    assert model.out_head.weight is model.tok_emb.weight  # tied, as GPT-2 is
    with torch.no_grad():
        ours = model(IDX)
    ref = reference_logits(sd, TINY["n_head"], IDX)
    assert ref.abs().max() > 1  # logits of a useful size, so 1e-4 means something
    assert (ours.double() - ref).abs().max() < 1e-4
    prompt = IDX[:1, :4]
    assert torch.equal(generate(model, prompt, 12, temperature=0.0), reference_greedy(sd, TINY["n_head"], prompt, 12))


def test_half_precision_files_load_as_float32(tmp_path):
    for dtype in (torch.bfloat16, torch.float16):
        sd = published_tensors(dtype=dtype)
        model = load_hf_checkpoint(write_published(tmp_path / str(dtype), sd) / "model.safetensors")
        assert model.tok_emb.weight.dtype == torch.float32
        with torch.no_grad():
            assert (model(IDX).double() - reference_logits(sd, TINY["n_head"], IDX)).abs().max() < 1e-4


def test_untied_lm_head_is_used(tmp_path):
    sd = published_tensors(lm_head=True)
    sd["lm_head.weight"] = torch.randn_like(sd["lm_head.weight"])
    model = load_hf_checkpoint(write_published(tmp_path / "m", sd, tie_word_embeddings=False))
    assert model.out_head.weight is not model.tok_emb.weight
    with torch.no_grad():
        ref = reference_logits(sd, TINY["n_head"], IDX, head=sd["lm_head.weight"])
        assert (model(IDX).double() - ref).abs().max() < 1e-4
    os.remove(tmp_path / "m" / "config.json")  # without config.json, a head that differs from wte is kept too
    model = load_hf_checkpoint(tmp_path / "m", n_heads=TINY["n_head"])
    assert torch.equal(model.out_head.weight, sd["lm_head.weight"])


def test_config_from_shapes_needs_n_heads_for_odd_widths(tmp_path):
    sd = published_tensors(prefix=True)
    folder = write_published(tmp_path / "m", sd, config=False)
    with pytest.raises(CheckpointError, match="n_heads"):
        load_hf_checkpoint(folder)
    model = load_hf_checkpoint(folder, drop_rate=0.1, n_heads=TINY["n_head"])
    assert model.cfg["n_layers"] == 2 and model.cfg["context_length"] == 32 and model.cfg["drop_rate"] == 0.1
    with torch.no_grad():
        assert (model.eval()(IDX).double() - reference_logits(sd, TINY["n_head"], IDX)).abs().max() < 1e-4


def test_matches_transformers_if_installed(tmp_path):
    transformers = pytest.importorskip("transformers")
    sd = published_tensors()
    folder = write_published(tmp_path / "m", sd)
    hf = transformers.GPT2LMHeadModel.from_pretrained(str(folder)).eval()
    model = load_hf_checkpoint(folder).eval()
    with torch.no_grad():
        assert (model(IDX) - hf(IDX).logits).abs().max() < 1e-4
    pth = save_checkpoint(str(tmp_path / "model.pth"), model)
    hf = transformers.GPT2LMHeadModel.from_pretrained(export_hf(pth, str(tmp_path / "exported"))).eval()
    with torch.no_grad():
        assert (model(IDX) - hf(IDX).logits).abs().max() < 1e-4


# ---------------------------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("qkv_bias,tie", [(True, True), (False, False)])
def test_export_round_trip(tmp_path, qkv_bias, tie):
    torch.manual_seed(0)
    cfg = {"vocab_size": 101, "context_length": 32, "emb_dim": 32, "n_heads": 4, "n_layers": 2, "drop_rate": 0.0,
           "qkv_bias": qkv_bias, "tie_weights": tie}
    model = GPTModel(cfg).eval()
    pth = save_checkpoint(str(tmp_path / "model.pth"), model, kind="pretrain")
    out = tmp_path / "hf"
    assert main(["--export", pth, "--out", str(out)]) == str(out)
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    back = load_hf_checkpoint(out).eval()
    with torch.no_grad():
        assert torch.equal(back(IDX), model(IDX))
        published = read_safetensors(str(out / "model.safetensors"))
        assert ("lm_head.weight" in published) == (not tie)
        head = published.get("lm_head.weight")
        ref = reference_logits(published, 4, IDX, head)  # the exported file, read the way GPT-2 reads it
        assert (model(IDX).double() - ref).abs().max() < 1e-4
    assert SafetensorsFile(str(out / "model.safetensors")).metadata == {"format": "pt"}


def test_export_of_an_int8_model_dequantizes(tmp_path):
    torch.manual_seed(0)
    model = GPTModel({"vocab_size": 101, "context_length": 32, "emb_dim": 32, "n_heads": 4, "n_layers": 1,
                      "drop_rate": 0.0, "qkv_bias": True}).eval()
    quantize_int8(model)
    pth = save_checkpoint(str(tmp_path / "int8.pth"), model)
    back = load_hf_checkpoint(export_hf(pth, str(tmp_path / "hf"))).eval()
    with torch.no_grad():
        assert (back(IDX) - model(IDX)).abs().max() < 1e-4


def test_export_refuses_a_folder_that_is_not_empty(tmp_path):
    model = GPTModel({"vocab_size": 101, "context_length": 32, "emb_dim": 32, "n_heads": 4, "n_layers": 1,
                      "drop_rate": 0.0, "qkv_bias": True})
    pth = save_checkpoint(str(tmp_path / "model.pth"), model)
    out = tmp_path / "hf"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty.*--force"):
        main(["--export", pth, "--out", str(out)])
    assert sorted(os.listdir(out)) == ["notes.txt"]
    main(["--export", pth, "--out", str(out), "--force"])
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "notes.txt"]
    with pytest.raises(UserError, match="--out"):
        export_hf(pth, "")


# ---------------------------------------------------------------------------------------------------------------
# Bad files: one clear message each
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
    with pytest.raises(CheckpointError, match=message) as e:
        read_safetensors(path)
    assert "\n" not in str(e.value) and path in str(e.value)


def test_reader_refuses_short_and_cut_files(tmp_path):
    good = write_published(tmp_path / "m", published_tensors()) / "model.safetensors"
    raw = good.read_bytes()
    cut = tmp_path / "cut.safetensors"
    for n in (0, 5, 20, len(raw) - 10):
        cut.write_bytes(raw[:n])
        with pytest.raises(CheckpointError, match="truncated"):
            load_hf_checkpoint(str(cut))


def test_reader_round_trips_dtypes_and_metadata(tmp_path):
    tensors = {"f32": torch.randn(3, 4), "bf16": torch.randn(5).bfloat16(), "f16": torch.randn(2, 2).half(),
               "i64": torch.arange(7), "bool": torch.tensor([True, False]), "scalar": torch.tensor(2.5),
               "empty": torch.zeros(0, 3), "t": torch.randn(4, 3).t()}
    path = write_safetensors(str(tmp_path / "x.safetensors"), tensors, {"format": "pt"})
    back = read_safetensors(path)
    assert set(back) == set(tensors)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    assert SafetensorsFile(path).metadata == {"format": "pt"}
    # a header whose length is not a multiple of 8 leaves the data unaligned: still read correctly
    raw_safetensors(str(tmp_path / "u.safetensors"), b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}',
                    struct.pack("<2f", 1.5, -2.0))
    assert read_safetensors(str(tmp_path / "u.safetensors"))["a"].tolist() == [1.5, -2.0]


def test_missing_and_unexpected_tensors_are_named(tmp_path):
    sd = published_tensors()
    del sd["h.1.mlp.c_fc.bias"]
    sd["h.0.attn.rotary"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match=r"missing h\.1\.mlp\.c_fc\.bias.*unexpected h\.0\.attn\.rotary"):
        load_hf_checkpoint(write_published(tmp_path / "a", sd))
    sd = published_tensors(n_layer=3)  # a layer more than config.json says
    with pytest.raises(CheckpointError, match=r"unexpected h\.2\."):
        load_hf_checkpoint(write_published(tmp_path / "b", sd, n_layer=2))
    sd = published_tensors()
    with pytest.raises(CheckpointError, match=r"missing lm_head\.weight"):
        load_hf_checkpoint(write_published(tmp_path / "c", sd, tie_word_embeddings=False))


def test_shapes_that_contradict_config_json(tmp_path):
    folder = write_published(tmp_path / "m", published_tensors(), vocab_size=100)
    with pytest.raises(CheckpointError, match=r"wte\.weight is \[101, 32\], expected \[100, 32\]"):
        load_hf_checkpoint(folder)
    folder = write_published(tmp_path / "n", published_tensors(), activation_function="relu")
    with pytest.raises(CheckpointError, match="activation_function"):
        load_hf_checkpoint(folder)
    sd = published_tensors()
    sd["h.0.ln_1.weight"] = torch.zeros(4, dtype=torch.int32)
    with pytest.raises(CheckpointError, match=r"h\.0\.ln_1\.weight is \[4\]"):
        load_hf_checkpoint(write_published(tmp_path / "o", sd))


# ---------------------------------------------------------------------------------------------------------------
# Command line and --init
# ---------------------------------------------------------------------------------------------------------------

def test_cli_unknown_model_is_one_line_and_exit_1(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(HERE, "load_gpt2.py"), "--model", "gpt3", "--models_dir",
                        str(tmp_path)], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and "gpt2-medium" in r.stderr and "gpt2-xl" in r.stderr, r.stderr
    assert os.listdir(tmp_path) == []


def test_main_converts_a_local_folder_to_pth(tmp_path):
    sd = published_tensors(prefix=True, masks=True)
    folder = write_published(tmp_path / "m", sd)
    out = main(["--model", str(folder), "--out", str(tmp_path / "tiny.pth")])
    model, ckpt = load_model(out)
    assert ckpt["kind"] == "pretrained" and ckpt["config"]["qkv_bias"]
    with torch.no_grad():
        assert (model.eval()(IDX).double() - reference_logits(sd, TINY["n_head"], IDX)).abs().max() < 1e-4


def test_init_model_sources(tmp_path):
    model, info = init_model("scratch", {"vocab_size": 101, "context_length": 16, "emb_dim": 32, "n_layers": 1,
                                         "n_heads": 4})
    assert model.cfg["context_length"] == 16 and info["checkpoint"] is None
    pth = save_checkpoint(str(tmp_path / "s.pth"), model, kind="pretrain", step=3)
    again, info = init_model(pth)
    assert info["kind"] == "pretrain" and info["checkpoint"]["step"] == 3
    assert torch.equal(again.tok_emb.weight, model.tok_emb.weight)
    folder = write_published(tmp_path / "m", published_tensors())
    hf, info = init_model(str(folder), {"drop_rate": 0.2})
    assert hf.cfg["drop_rate"] == 0.2 and info["kind"] == "pretrained"
    with pytest.raises(UserError, match="context_length=16"):
        init_model(str(folder), {"context_length": 16})
    with pytest.raises(UserError, match="gpt2-medium.*scratch"):
        init_model("gpt-2")
    with pytest.raises(UserError, match="no checkpoint"):
        init_model(str(tmp_path / "nope.pth"))


# ---------------------------------------------------------------------------------------------------------------
# Downloads from a hub on 127.0.0.1
# ---------------------------------------------------------------------------------------------------------------

class Hub(http.server.BaseHTTPRequestHandler):
    files = {}   # URL path -> bytes
    etags = {}   # URL path -> ETag value
    log = []     # (method, path, Range header)

    def do_HEAD(self):
        self._answer(body=False)

    def do_GET(self):
        self._answer(body=True)

    def _answer(self, body):
        self.log.append((self.command, self.path, self.headers.get("Range")))
        data = self.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        start = 0
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes="):
            start = int(rng[6:].split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        if self.path in self.etags:
            self.send_header("ETag", f'"{self.etags[self.path]}"')
        self.end_headers()
        if body:
            self.wfile.write(data[start:])

    def log_message(self, *args):
        pass


@pytest.fixture
def hub(tmp_path):
    sd = published_tensors()
    folder = write_published(tmp_path / "served", sd)
    st, cj = (folder / "model.safetensors").read_bytes(), (folder / "config.json").read_bytes()
    base = "/openai-community/gpt2/resolve/main/"
    Hub.files = {base + "model.safetensors": st, base + "config.json": cj}
    Hub.etags = {base + "model.safetensors": hashlib.sha256(st).hexdigest()}
    Hub.log = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", sd, st, base
    server.shutdown()
    server.server_close()


def dead_url():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_download_resumes_verifies_and_rechecks_cheaply(tmp_path, hub):
    url, sd, st_bytes, base = hub
    models = tmp_path / "models"
    (models / "gpt2").mkdir(parents=True)
    (models / "gpt2" / "model.safetensors.part").write_bytes(st_bytes[:1000])  # an interrupted download
    model = load_gpt2_fn("gpt2", str(models), hub_url=url, progress=False)
    assert ("GET", base + "model.safetensors", "bytes=1000-") in Hub.log
    st = models / "gpt2" / "model.safetensors"
    assert st.read_bytes() == st_bytes and not os.path.exists(str(st) + ".part")
    record = json.loads((models / "gpt2" / "model.safetensors.sha256").read_text())
    assert record["sha256"] == hashlib.sha256(st_bytes).hexdigest()
    with torch.no_grad():
        assert (model.eval()(IDX).double() - reference_logits(sd, TINY["n_head"], IDX)).abs().max() < 1e-4
    # later loads need no network: size and mtime match the record
    load_gpt2_fn("gpt2", str(models), hub_url=dead_url())
    os.utime(st, ns=(1, 1))  # same bytes, new mtime: re-hashed, accepted
    load_gpt2_fn("gpt2", str(models), hub_url=dead_url())
    raw = bytearray(st_bytes)
    raw[-1] ^= 1  # same size, one bit changed
    st.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="changed since it was verified"):
        load_gpt2_fn("gpt2", str(models), hub_url=dead_url())
    # the command line writes the .pth with the published size in its name
    os.remove(st)
    out = main(["--model", "gpt2", "--models_dir", str(models), "--hub_url", url])
    assert out == os.path.join(str(models), "gpt2-124M.pth") and load_model(out)[1]["kind"] == "pretrained"


def test_download_refuses_a_checksum_mismatch(tmp_path, hub):
    url, _, _, base = hub
    Hub.etags[base + "model.safetensors"] = "0" * 64
    with pytest.raises(DownloadError, match="checksum mismatch"):
        load_gpt2_fn("gpt2", str(tmp_path / "models"), hub_url=url, progress=False)
    assert sorted(os.listdir(tmp_path / "models" / "gpt2")) == ["config.json"]


def test_offline_names_url_and_where_to_put_files(tmp_path):
    url = dead_url()
    with pytest.raises(DownloadError) as e:
        load_gpt2_fn("gpt2", str(tmp_path / "models"), hub_url=url)
    msg = str(e.value)
    assert f"{url}/openai-community/gpt2/resolve/main/model.safetensors" in msg and "config.json" in msg
    assert os.path.join(str(tmp_path / "models"), "gpt2") in msg and "\n" not in msg
    assert not os.path.exists(tmp_path / "models" / "gpt2" / "model.safetensors")
    with pytest.raises(UserError, match="gpt2-large"):
        load_gpt2_fn("gpt2-small", str(tmp_path / "models"))
