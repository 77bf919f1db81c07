"""Faults, bad input and hostile files (issue 7): nothing is lost and every refusal is one clear line.

    pytest tests_faults.py                       # CI: a few kills per script (about a minute on 2 cores)
    GPT2_LONG_TESTS=1 pytest tests_faults.py     # the long variant: 20+ SIGKILLs of pretrain.py, 8 of finetune_cls.py

The bad-input table runs each case as its own process through a small fork server that has torch and the project's
modules imported once, so 60+ cases cost seconds instead of a torch import each; each forked child runs the script
as __main__ exactly as `python script.py ARGS` would (same argv, exit code, stderr).
"""
import concurrent.futures
import hashlib
import http.server
import json
import os
import random
import resource
import signal
import struct
import subprocess
import sys
import threading
import time

import pytest

ROOT = os.path.dirname(os.path.abspath(__file__))
os.environ.setdefault("TIKTOKEN_CACHE_DIR", os.path.join(ROOT, "..", "shared", "tiktoken-cache"))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import data  # noqa: E402
import model as M  # noqa: E402

LONG = os.environ.get("GPT2_LONG_TESTS") == "1"
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MPLBACKEND="Agg", PYTHONUNBUFFERED="1",
           TIKTOKEN_CACHE_DIR=os.path.abspath(os.environ["TIKTOKEN_CACHE_DIR"]))
TINY = ["--n_layers", "2", "--n_heads", "2", "--emb_dim", "32", "--device", "cpu"]
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
    for dirpath, _, files in os.walk(folder):
        for name in files:
            p = os.path.join(dirpath, name)
            out[os.path.relpath(p, folder)] = sha(p)
    return out


def max_weight_diff(a, b):
    sa, sb = M.read_checkpoint(a)["model"], M.read_checkpoint(b)["model"]
    assert sa.keys() == sb.keys()
    return max((sa[k].float() - sb[k].float()).abs().max().item() for k in sa)


# ---------------------------------------------------------------------------------------------------------------
# 1. Kill and resume
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
    return [sys.executable, os.path.join(ROOT, "pretrain.py"), "--data", data_path, "--out_dir", out_dir, *TINY,
            "--context_length", "32", "--batch_size", "2", "--drop_rate", "0.1", "--tie_weights", "true", "--epochs", str(epochs),
            "--save_every", str(save_every), "--sample_prompt", "", "--eval_freq", "5"]


@pytest.mark.parametrize("long", [pytest.param(False, id="ci"),
                                  pytest.param(True, id="long", marks=pytest.mark.skipif(
                                      not LONG, reason="set GPT2_LONG_TESTS=1 for the 20-kill variant"))])
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
    assert max_weight_diff(tmp_path / "ref" / "model.pth", tmp_path / "run" / "model.pth") <= 1e-6
    assert M.read_checkpoint(tmp_path / "run" / "model.pth")["step"] == \
        M.read_checkpoint(tmp_path / "ref" / "model.pth")["step"]
    # 4. disk full, on the finished reference run
    assert_disk_full_keeps_the_checkpoint(str(tmp_path / "ref"), _pretrain_cmd("t.txt", "ref", epochs, save_every),
                                          tmp_path)


def _cls_cmd(out_dir, save_every):
    return [sys.executable, os.path.join(ROOT, "finetune_cls.py"), "--csv", "sms.csv", "--init", "scratch",
            "--trainable", "all", *TINY, "--max_length", "16", "--batch_size", "4", "--drop_rate", "0.1",
            "--epochs", "2", "--save_every", str(save_every), "--eval_freq", "5", "--out_dir", out_dir]


def write_cls_csv(path, n=80, seed=0):
    import csv
    rng = random.Random(seed)
    spam, ham = "free win cash prize call now offer claim".split(), "hello meet lunch tomorrow see you later".split()
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Text", "Label"])
        for i in range(n):
            pool = spam if i % 2 else ham
            w.writerow([" ".join(rng.choice(pool) for _ in range(rng.randint(3, 8))), "spam" if i % 2 else "ham"])


@pytest.mark.parametrize("long", [pytest.param(False, id="ci"),
                                  pytest.param(True, id="long", marks=pytest.mark.skipif(
                                      not LONG, reason="set GPT2_LONG_TESTS=1 for the long variant"))])
def test_finetune_cls_survives_kills_and_matches_an_uninterrupted_run(tmp_path, long):
    write_cls_csv(tmp_path / "sms.csv")
    save_every = 1 if long else 2
    ref = subprocess.Popen(_cls_cmd("ref", save_every), cwd=tmp_path, env=ENV, stdout=subprocess.DEVNULL,
                           stderr=open(tmp_path / "ref.log", "wb"))
    plan = ["tmp", "kill"] * 4 if long else ["tmp", "kill"]
    events = run_with_faults(_cls_cmd("run", save_every), str(tmp_path / "run"), plan, 11,
                             str(tmp_path / "run.log"), tmp_path)
    assert ref.wait(timeout=300) == 0, (tmp_path / "ref.log").read_text()[-2000:]
    assert len(events) == len(plan), events
    ref_ckpt, run_ckpt = tmp_path / "ref" / "spam_classifier.pth", tmp_path / "run" / "spam_classifier.pth"
    assert max_weight_diff(ref_ckpt, run_ckpt) <= 1e-6
    ref_m, run_m = (json.load(open(tmp_path / d / "metrics.json")) for d in ("ref", "run"))
    scores = ["train", "val", "test"]
    assert scores and {k: ref_m[k] for k in scores} == {k: run_m[k] for k in scores}


# ---------------------------------------------------------------------------------------------------------------
# 4. Disk full: the failed save says so in one line and the previous checkpoint stays intact (run at the end
#    of the pretrain kill test, on its finished reference run)
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
    i = cmd.index("--epochs")
    r = subprocess.run(cmd[:i + 1] + [str(int(cmd[i + 1]) + 1)] + cmd[i + 2:] + ["--save_every", "1", "--resume"],
                       cwd=cwd, env=ENV, capture_output=True, text=True, preexec_fn=_limit_file_size(1 << 20))
    assert r.returncode == 1, r.stderr[-2000:]
    lines = [ln[ln.index("error:"):] for ln in r.stderr.replace("\r", "\n").splitlines() if "error:" in ln]
    assert "Traceback" not in r.stderr and len(lines) == 1, r.stderr[-2000:]
    assert "could not write" in lines[0] and STATE in lines[0] and "free disk space" in lines[0]
    assert tree_hashes(folder) == before  # nothing changed, no .tmp left behind
    assert M.read_checkpoint(os.path.join(folder, STATE))["step"] == step
    M.load_model(os.path.join(folder, "model.pth"))


# ---------------------------------------------------------------------------------------------------------------
# 2. Bad input table: every entry script, one clear line, nothing earlier touched
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
    r = subprocess.run([sys.executable, "-c", FORK_SERVER, ROOT, str(workers)], input=json.dumps(specs),
                       capture_output=True, text=True, env=ENV, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    codes = json.loads(r.stdout)
    return [(c, open(s["out"], errors="replace").read(), open(s["err"], errors="replace").read())
            for c, s in zip(codes, specs)]


def tiny_model(context_length=32, emb_dim=32, seed=0):
    torch.manual_seed(seed)
    return M.GPTModel({**M.MODEL_CONFIGS["gpt2"], "n_layers": 2, "n_heads": 2, "emb_dim": emb_dim,
                       "context_length": context_length, "drop_rate": 0.0, "tie_weights": False})


def make_bad_inputs(w):
    """Write the table's input files into folder w; returns nothing, the names are used below."""
    w.mkdir(exist_ok=True)
    (w / "good.txt").write_text(words_text(600))
    (w / "empty.txt").write_bytes(b"")
    (w / "binary.txt").write_bytes(bytes(range(256)) * 8)
    (w / "latin1.txt").write_bytes("Caf\xe9 au lait, na\xefve r\xe9sum\xe9. ".encode("latin-1") * 20)
    (w / "notxt").mkdir()
    (w / "notxt" / "notes.md").write_text("# not a .txt file\n")
    (w / "emptydir").mkdir()
    (w / "afile").write_text("a regular file, not a folder\n")
    write_cls_csv(w / "ok.csv")
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
    lm = tiny_model()
    M.save_checkpoint(str(w / "lm.pth"), lm, kind="pretrain")
    cls = tiny_model()
    cls.out_head = torch.nn.Linear(32, 2)
    M.save_checkpoint(str(w / "cls.pth"), cls, kind="cls", class_names=["ham", "spam"], max_length=16)
    (w / "zero.pth").write_bytes(b"")
    raw = (w / "lm.pth").read_bytes()
    (w / "truncated.pth").write_bytes(raw[: len(raw) // 2])
    (w / "text.pth").write_text("this is not a checkpoint\n")
    torch.save(torch.zeros(3), w / "tensor.pth")
    sd = lm.state_dict()
    sd["trf_blocks.0.att.W_query.weight"] = torch.zeros(16, 32)
    torch.save(sd, w / "wrong_shape.pth")  # a bare state_dict with one tensor of the wrong shape
    (w / "garbage.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    # earlier outputs of runs that the bad runs must not touch
    for name in ("pre", "noopt", "wide"):
        (w / "runs" / name).mkdir(parents=True)
    M.save_checkpoint(str(w / "runs" / "pre" / "model.pth"), lm, kind="pretrain")
    (w / "runs" / "pre" / "log.csv").write_text("step,train_loss\n1,10.9\n")
    M.save_checkpoint(str(w / "runs" / "noopt" / STATE), lm, kind="pretrain")  # no optimizer state
    wide = tiny_model(emb_dim=64)
    M.atomic_save({"model": wide.state_dict(), "config": dict(wide.cfg), "kind": "pretrain", "optimizer": {},
                   "step": 1, "epoch": 0, "batch_pos": 1, "tokens_seen": 64, "rng": torch.get_rng_state(),
                   "log": []}, str(w / "runs" / "wide" / STATE))


def bad_input_cases():
    """(script, args, words the one-line message must contain)"""
    P = ["--data", "good.txt", "--out_dir", "runs/new", *TINY, "--context_length", "32", "--epochs", "1",
         "--sample_prompt", ""]
    G = ["--checkpoint", "lm.pth", "--device", "cpu", "--max_new_tokens", "3"]
    C = ["--csv", "ok.csv", "--init", "scratch", "--trainable", "all", *TINY, "--max_length", "16", "--epochs", "1",
         "--out_dir", "runs/newcls"]
    H = ["--data", "chat_ok.json", "--init", "scratch", *TINY, "--context_length", "32", "--epochs", "1",
         "--max_new_tokens", "0", "--out_dir", "runs/newchat"]
    L = ["--models_dir", "models"]
    B = ["--size", "tiny", "--steps", "1", "--repeats", "1", "--decode_tokens", "2", "--device", "cpu"]
    return [
        # pretrain.py: files
        ("pretrain.py", P + ["--data", "missing.txt"], "no file at"),
        ("pretrain.py", P + ["--data", "empty.txt"], "too short"),
        ("pretrain.py", P + ["--data", "binary.txt"], "binary"),
        ("pretrain.py", P + ["--data", "latin1.txt"], "not UTF-8"),
        ("pretrain.py", P + ["--data", "notxt"], "no .txt files"),
        ("pretrain.py", P + ["--data", "emptydir"], "no .txt files"),
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
        # generate.py
        ("generate.py", G + ["--checkpoint", "missing.pth"], "no checkpoint"),
        ("generate.py", G + ["--checkpoint", "zero.pth"], "empty"),
        ("generate.py", G + ["--checkpoint", "truncated.pth"], "truncated.pth"),
        ("generate.py", G + ["--checkpoint", "text.pth"], "text.pth"),
        ("generate.py", G + ["--checkpoint", "tensor.pth"], "tensor.pth"),
        ("generate.py", G + ["--checkpoint", "cls.pth"], "out_head"),
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
        # load_gpt2.py
        ("load_gpt2.py", L + ["--model", "gpt5"], "unknown model"),
        ("load_gpt2.py", L + ["--model", "garbage.safetensors"], "not valid JSON"),
        ("load_gpt2.py", L + ["--export", "missing.pth", "--out", "hf"], "no checkpoint"),
        ("load_gpt2.py", L + ["--export", "lm.pth"], "--out"),
        ("load_gpt2.py", L + ["--export", "lm.pth", "--out", "afile"], "not a folder"),
        ("load_gpt2.py", L + ["--export", "cls.pth", "--out", "hf"], "out_head"),
        ("load_gpt2.py", L + ["--export", "zero.pth", "--out", "hf"], "empty"),
        ("load_gpt2.py", L + ["--export", "truncated.pth", "--out", "hf"], "truncated.pth"),
        # bench.py
        ("bench.py", B + ["--size", "huge"], "--size"),
        ("bench.py", B + ["--steps", "-1"], "--steps"),
        ("bench.py", B + ["--repeats", "0"], "--repeats"),
        ("bench.py", B + ["--bf16", "maybe"], "--bf16"),
        ("bench.py", B + ["--context_length", "8", "--prompt_tokens", "16"], "fit"),
    ]


# clear one-line refusals that name the problem but not yet the fix (reported in the issue note, left alone)
NO_FIX_YET = {"out_head", "garbage.safetensors", "not valid JSON", "huge_line.csv", "divisible", "not a folder"}
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


def test_bad_input_table(tmp_path):
    w = tmp_path / "w"
    make_bad_inputs(w)
    cases = bad_input_cases()
    assert len(cases) >= 60
    before = tree_hashes(w)
    results = run_cases([(s, a) for s, a, _ in cases], w, tmp_path)
    problems = []
    for (script, args, words), (rc, out, err) in zip(cases, results):
        ok, lines = one_clear_line(rc, err)
        ok = ok or (not lines[1:] and words in NO_FIX_YET)
        if rc == 0 or "Traceback" in err or not ok or words.lower() not in err.lower():
            problems.append(f"{script} {' '.join(args[-4:])!r}: rc {rc}, stderr {err[-600:]!r}")
    assert not problems, "\n".join(problems)
    assert tree_hashes(w) == before  # every earlier file as it was, and no new file (no .tmp, no partial output)


# ---------------------------------------------------------------------------------------------------------------
# 3. Hostile and corrupt files
# ---------------------------------------------------------------------------------------------------------------

class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_payload_is_refused_by_every_loader(tmp_path):
    marker = tmp_path / "pwned"
    lm = tiny_model()
    torch.save({"model": lm.state_dict(), "config": dict(lm.cfg), "kind": "cls", "class_names": ["a", "b"],
                "max_length": 16, "hook": _Payload(marker)}, tmp_path / "evil.pth")
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
    """tests_load_gpt2.py covers each corrupt header in-process; here the 2 GB header claim runs in a child whose
    address space is capped at 1 GB more than the interpreter needs, so an attempt to allocate it would fail."""
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
    code = ("import resource, sys, load_gpt2, model\n"
            "for p in sys.argv[1:]:\n"
            "    try:\n"
            "        load_gpt2.read_safetensors(p) if hasattr(load_gpt2, 'read_safetensors') else "
            "load_gpt2.init_model(p)\n"
            "        print('LOADED', p)\n"
            "    except (model.CheckpointError, load_gpt2.UserError) as e:\n"
            "        print('REFUSED', str(e).splitlines()[0])\n"
            "print('maxrss_kb', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n")
    r = subprocess.run([sys.executable, "-c", code, *sorted(str(p) for p in tmp_path.glob("*.safetensors"))],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    refused = [ln for ln in r.stdout.splitlines() if ln.startswith("REFUSED")]
    assert len(refused) == len(bad) and "LOADED" not in r.stdout, r.stdout
    assert int(r.stdout.split("maxrss_kb")[1]) < 1_500_000  # far below the 2 GB the header claims


class _FaultHandler(http.server.BaseHTTPRequestHandler):
    """/ok/NAME with Range support, /stall/NAME sends half then hangs, /loop/ redirects to itself."""
    body = b""
    ranges = []

    def log_message(self, *args):
        pass

    def do_GET(self):
        mode = self.path.strip("/").split("/")[0]
        if mode == "loop":
            self.send_response(302)
            self.send_header("Location", self.path)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body, start = self.body, 0
        rng = self.headers.get("Range")
        if rng and mode == "ok":
            type(self).ranges.append(rng)
            start = int(rng.split("=")[1].split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        if mode == "stall":
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            time.sleep(3)  # longer than the client's timeout
            return
        self.wfile.write(body[start:])


def test_download_stall_and_redirect_loop_then_resume(tmp_path):
    body = words_text(36000).encode()  # about 200 KB: the stall comes after a few of the client's 64 KB reads
    digest = hashlib.sha256(body).hexdigest()
    _FaultHandler.body, _FaultHandler.ranges = body, []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FaultHandler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}"
    dest = tmp_path / "corpus.txt"
    (tmp_path / "keep.txt").write_text("earlier file")
    try:
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
        assert _FaultHandler.ranges == [f"bytes={have}-"]
        assert dest.read_bytes() == body and not os.path.exists(str(dest) + ".part")
    finally:
        httpd.shutdown()
