"""Tests for --dry_run and torchrun (DDP) in finetune_cls.py and finetune_chat.py (tiny scratch configs, CPU, gloo):
`python -m pytest -q tests_finetune_dist.py`."""
import csv
import json
import os
import socket
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
os.environ.setdefault("TIKTOKEN_CACHE_DIR", os.path.join(HERE, "..", "shared", "tiktoken-cache"))
sys.path.insert(0, HERE)

import pytest  # noqa: E402
import torch  # noqa: E402

import finetune_chat  # noqa: E402
import finetune_cls  # noqa: E402
from model import GPTModel, count_parameters, read_checkpoint, save_checkpoint  # noqa: E402

CLS_FLAGS = ["--init", "scratch", "--trainable", "all", "--n_layers", "2", "--n_heads", "2", "--emb_dim", "32",
             "--max_length", "32", "--drop_rate", "0", "--device", "cpu", "--dtype", "float32", "--eval_freq", "1000",
             "--eval_iters", "1"]
CHAT_FLAGS = ["--init", "scratch", "--n_layers", "2", "--n_heads", "2", "--emb_dim", "32", "--context_length", "128",
              "--device", "cpu", "--dtype", "float32"]
TINY = dict(vocab_size=50257, context_length=32, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.0, qkv_bias=False)
PLAN_WORDS = ("parameters", "trainable", "weights", "gradients", "AdamW state", "activations", "tokens per step",
              "steps per epoch", "--dry_run")


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: tiny models run several times faster that way on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_cls_csv(path, n=24):
    """n texts of each of two classes, of a few different lengths."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["Label", "Text"])
        for i in range(n):
            w.writerow(["spam", f"WIN a free prize number {i} now!" + " Call 0800 today." * (i % 3)])
            w.writerow(["ham", f"See you at {i} for lunch" + ", ok?" * (i % 4)])
    return str(path)


def write_json(path, obj):
    path.write_text(json.dumps(obj), encoding="utf-8")
    return str(path)


# ---------------------------------------------------------------------------------------------------------------
# --dry_run: the plan, and nothing written
# ---------------------------------------------------------------------------------------------------------------

def test_cls_dry_run_prints_the_plan_and_writes_nothing(tmp_path, capsys):
    data = write_cls_csv(tmp_path / "texts.csv")
    out = tmp_path / "run"
    full = finetune_cls.main(CLS_FLAGS + ["--csv", data, "--out_dir", str(out), "--dry_run", "--batch_size", "4"])
    text = capsys.readouterr().out
    for word in PLAN_WORDS:
        assert word in text, word
    assert not out.exists()  # no split CSVs, no checkpoint, no metrics.json
    model = finetune_cls.replace_head(GPTModel(TINY), 2)
    assert full["total_params"] == full["trainable_params"] == count_parameters(model)
    assert full["steps_per_epoch"] == int(0.7 * 48) // 4  # 70% of 48 balanced texts train, batch 4

    last_block = [f if f != "all" else "last_block" for f in CLS_FLAGS]
    last = finetune_cls.main(last_block + ["--csv", data, "--out_dir", str(out), "--dry_run", "--batch_size", "4"])
    assert last["total_params"] == full["total_params"]
    assert last["trainable_params"] == count_parameters(model.trf_blocks[-1]) + count_parameters(
        model.final_norm) + count_parameters(model.out_head)
    assert last["optimizer"] < full["optimizer"] and last["activations"] < full["activations"]
    assert not out.exists()


def test_chat_dry_run_for_sft_and_dpo_writes_nothing(tmp_path, capsys):
    records = [{"instruction": f"Add {i} and {i + 2}.", "input": "", "output": f"The sum is {2 * i + 2}."}
               for i in range(20)]
    out = tmp_path / "sft"
    sft = finetune_chat.main(CHAT_FLAGS + ["--data", write_json(tmp_path / "data.json", records), "--out_dir",
                                           str(out), "--batch_size", "2", "--dry_run"])
    text = capsys.readouterr().out
    for word in PLAN_WORDS:
        assert word in text, word
    assert not out.exists()
    tiny = GPTModel({**TINY, "context_length": 128})
    n = count_parameters(tiny)
    assert sft["total_params"] == sft["trainable_params"] == n
    assert sft["steps_per_epoch"] == 17 // 2  # 85% of 20 records train

    init = save_checkpoint(str(tmp_path / "tiny-sft.pth"), tiny, kind="chat")
    prefs = [{"instruction": f"Greet person number {i}.", "input": "", "chosen": f"Hello, number {i}!",
              "rejected": "Go away."} for i in range(10)]
    out = tmp_path / "dpo"
    dpo = finetune_chat.main(["--method", "dpo", "--init", init, "--data", write_json(tmp_path / "prefs.json", prefs),
                              "--out_dir", str(out), "--batch_size", "2", "--device", "cpu", "--dtype", "float32",
                              "--dry_run"])
    assert dpo["total_params"] == 2 * n and dpo["trainable_params"] == n  # the frozen reference counts too
    assert "--dry_run" in capsys.readouterr().out
    assert not out.exists()
    with pytest.raises(SystemExit):  # a settings error: usage line and exit 2
        finetune_chat.main(CHAT_FLAGS + ["--trainable", "lora", "--fsdp", "--dry_run"])
    assert "--fsdp with --trainable lora is not supported" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# Two processes (gloo, started the way torchrun starts them) equal one process with the same global batch
# ---------------------------------------------------------------------------------------------------------------

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, runs, log_prefix):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    sys.stdout = open(f"{log_prefix}.{rank}", "w", buffering=1)
    for argv in runs:
        finetune_cls.main(argv)
    sys.stdout.flush()


def test_cls_two_processes_equal_one_process(tmp_path):
    data = write_cls_csv(tmp_path / "texts.csv")
    base = CLS_FLAGS + ["--csv", data, "--max_steps", "3", "--lr", "2e-4"]
    one, two, dry = tmp_path / "one", tmp_path / "two", tmp_path / "dry"
    finetune_cls.main(base + ["--out_dir", str(one), "--batch_size", "4"])

    runs = [base + ["--out_dir", str(two), "--batch_size", "2"],
            base + ["--out_dir", str(dry), "--batch_size", "2", "--dry_run"]]
    log = str(tmp_path / "stdout")
    # fork: the processes start with torch and the scripts already imported
    torch.multiprocessing.start_processes(_worker, args=(2, _free_port(), runs, log), nprocs=2, join=True,
                                          start_method="fork")

    w1 = read_checkpoint(str(one / finetune_cls.CLASSIFIER))["model"]
    w2 = read_checkpoint(str(two / finetune_cls.CLASSIFIER))["model"]
    assert w1.keys() == w2.keys()
    # 3 Adam steps move weights by ~5e-4; unaveraged gradients would leave the processes' copies that far apart.
    # Rounding (batches cut to different lengths, sums in another order) stays near 3e-6 at this lr (Adam
    # magnifies it where a gradient is almost 0; at lr 1e-3 it reached 1.4e-5)
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-5
    assert read_checkpoint(str(two / "model_and_optimizer.pth"))["step"] == 3
    for name in ("train.csv", "validation.csv", "test.csv", "metrics.json", "log.csv"):
        assert (two / name).read_text() != "", name  # written once, by rank 0
    assert json.loads((two / "metrics.json").read_text())["class_names"] == ["ham", "spam"]
    printed = open(log + ".0").read()
    assert "DDP over 2 processes (gloo)" in printed and "2 processes" in printed and "--dry_run" in printed
    assert open(log + ".1").read() == ""  # rank 1 prints nothing
    assert not dry.exists()
