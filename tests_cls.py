"""Tests for finetune_cls.py, the labelled-text section of data.py and the LoRA section of model.py:
`python -m pytest -q tests_cls.py` (tiny configs, no network; the SMS data comes from ../shared/data)."""
import csv
import functools
import http.server
import os
import shutil
import subprocess
import sys
import threading
import zipfile

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.environ.get("GPT2_SHARED_DIR", os.path.join(HERE, "..", "shared"))
SMS_FILE = os.path.join(SHARED, "data", "SMSSpamCollection")
os.environ.setdefault("TIKTOKEN_CACHE_DIR", os.path.join(SHARED, "tiktoken-cache"))
sys.path.insert(0, HERE)

import data  # noqa: E402
import finetune_cls  # noqa: E402
import model as M  # noqa: E402
from pretrain import make_optimizer  # noqa: E402

# Tiny models on a busy 2-core machine: one thread avoids waiting on a second one for every small matmul (measured:
# this file took 193 s with torch's default 2 threads under load, 42 s with one).
torch.set_num_threads(1)
ONE_THREAD = dict(os.environ, OMP_NUM_THREADS="1")
needs_sms = pytest.mark.skipif(not os.path.isfile(SMS_FILE), reason="../shared/data/SMSSpamCollection not present")
TINY = dict(M.GPT_CONFIG_124M, context_length=32, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.0)
TINY_FLAGS = ["--init", "scratch", "--trainable", "all", "--n_layers", "2", "--n_heads", "2", "--emb_dim", "32",
              "--max_length", "32", "--device", "cpu", "--eval_freq", "1000", "--eval_iters", "1"]


def tiny_classifier(num_classes=2, seed=0):
    torch.manual_seed(seed)
    return finetune_cls.replace_head(M.GPTModel(TINY), num_classes).eval()


def write_csv(path, rows, header=("Label", "Text")):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return str(path)


def csv_rows(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def small_csv(tmp_path_factory):
    """60 real SMS texts, 30 per class, as a CSV with the default columns."""
    rows = data.read_sms_spam(SMS_FILE)
    picked = [r for r in rows if r[1] == "spam"][:30] + [r for r in rows if r[1] == "ham"][:30]
    return write_csv(tmp_path_factory.mktemp("csv") / "small.csv", [(label, text) for text, label in picked])


@pytest.fixture(scope="module")
def small_run(small_csv, tmp_path_factory):
    """A tiny classifier trained for one epoch on small_csv: (summary, out_dir)."""
    out = str(tmp_path_factory.mktemp("small_run"))
    return finetune_cls.main(TINY_FLAGS + ["--csv", small_csv, "--epochs", "1", "--out_dir", out]), out


# ---------------------------------------------------------------------------------------------------------------
# Data: balancing, split, padding, CSV problems, the download
# ---------------------------------------------------------------------------------------------------------------

@needs_sms
def test_balancing_and_split_sizes_are_exact():
    rows = data.read_sms_spam(SMS_FILE)
    assert len(rows) == 5574 and sum(label == "spam" for _, label in rows) == 747
    balanced = data.balance_classes(rows, seed=123)
    assert len(balanced) == 1494
    assert sum(label == "ham" for _, label in balanced) == 747 == sum(label == "spam" for _, label in balanced)
    assert len({id(row) for row in balanced}) == len(balanced)  # each row at most once (the texts repeat)
    train, val, test = data.split_rows(balanced, seed=123)
    assert (len(train), len(val), len(test)) == (1045, 149, 300)
    assert sorted(train + val + test) == sorted(balanced)
    assert data.split_rows(balanced, seed=123) == (train, val, test)  # the seed fixes the split
    assert data.balance_classes(rows, seed=7) != balanced


def test_last_real_token_is_read_past_the_padding():
    texts = ["Hi", "Free entry in 2 a wkly comp to win FA Cup final tkts", "ok <|endoftext|> then"]
    ds = data.ClassificationDataset(texts, [0, 1, 0])
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
    ds = data.ClassificationDataset(["one two three four five six", "hi"], [0, 1], max_length=3)
    assert ds.truncated == 1 and ds.lengths.tolist() == [3, 1] and ds.input_ids.shape == (2, 3)


def test_csv_problems_say_what_is_wrong(tmp_path, capsys):
    good = write_csv(tmp_path / "a.csv", [("spam", "win"), ("ham", ""), ("ham", "  "), ("ham", "see you")])
    assert data.read_labelled_csv(good) == [("win", "spam"), ("see you", "ham")]
    assert "skipped 2 row(s) with empty 'Text'" in capsys.readouterr().err
    with pytest.raises(data.UserError, match=r"no column 'review'.*columns found: 'Label', 'Text'"):
        data.read_labelled_csv(good, text_column="review")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(data.UserError, match="is empty"):
        data.read_labelled_csv(str(tmp_path / "empty.csv"))
    no_label = write_csv(tmp_path / "b.csv", [("spam", "win"), ("", "who am I")])
    with pytest.raises(data.UserError, match="line 3 has text but an empty 'Label'"):
        data.read_labelled_csv(no_label)
    with pytest.raises(data.UserError, match="no CSV file"):
        data.read_labelled_csv(str(tmp_path / "missing.csv"))
    tsv = tmp_path / "c.tsv"
    tsv.write_text("text\tlabel\nhello there\tpos\n")
    assert data.read_labelled_csv(str(tsv), "text", "label") == [("hello there", "pos")]


def test_single_class_and_bad_columns_stop_training(tmp_path):
    one = write_csv(tmp_path / "one.csv", [("ham", f"text {i}") for i in range(20)])
    with pytest.raises(data.UserError, match="single class .'ham'"):
        finetune_cls.main(TINY_FLAGS + ["--csv", one, "--out_dir", str(tmp_path / "o")])
    with pytest.raises(data.UserError, match="columns found"):
        finetune_cls.main(TINY_FLAGS + ["--csv", one, "--label_column", "y", "--out_dir", str(tmp_path / "o")])


def serve(folder):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


@needs_sms
def test_sms_download_extracts_and_verifies(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    with zipfile.ZipFile(site / "sms+spam+collection.zip", "w", zipfile.ZIP_DEFLATED) as z:
        z.write(SMS_FILE, "SMSSpamCollection")
        z.writestr("readme", "the readme")
    server, url = serve(site)
    try:
        path = data.fetch_sms_spam(str(tmp_path / "d"), base_url=url)
        assert data.sha256_of(path) == data.SMS_SPAM_SHA256
        assert os.listdir(tmp_path / "d") == ["SMSSpamCollection"]  # the zip is gone
        (site / "sms+spam+collection.zip").write_bytes(b"PK\x03\x04 this is not a zip at all")
        with pytest.raises(data.DownloadError, match="not a readable zip") as e:
            data.fetch_sms_spam(str(tmp_path / "e"), base_url=url)
        assert "\n" not in str(e.value) and not os.path.exists(tmp_path / "e" / "sms_spam_collection.zip")
        # the command line: one line on stderr, exit 1
        env = dict(ONE_THREAD, GPT2_DATA_URL=url, GPT2_DATA_DIR=str(tmp_path / "f"))
        r = subprocess.run([sys.executable, os.path.join(HERE, "finetune_cls.py"), *TINY_FLAGS, "--out_dir",
                            str(tmp_path / "o")], env=env, capture_output=True, text=True, timeout=120)
        last = r.stderr.strip().splitlines()[-1]
        assert r.returncode == 1 and last.startswith("error: ") and "not a readable zip" in last
        assert "Traceback" not in r.stderr
    finally:
        server.shutdown()
    bad = tmp_path / "g"
    bad.mkdir()
    (bad / "SMSSpamCollection").write_text("ham\tchanged\n")
    with pytest.raises(data.UserError, match="does not match the expected sha256"):
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
    opt = make_optimizer(model, 1e-2, 0.1, torch.device("cpu"))
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
        M.replace_linear_with_lora(model.trf_blocks, rank=4, alpha=8)
        assert torch.equal(model(ids), base)  # B starts at zero
        layer = model.trf_blocks[0].att.W_query
        assert isinstance(layer, M.LoRALinear) and layer.weight is layer.base.weight and layer.bias is None
        assert layer.A.shape == (4, 32) and layer.B.shape == (32, 4) and layer.scaling == 2.0
        for name, p in model.named_parameters():
            if name.endswith(".B"):
                p.normal_(std=0.1)
        adapted = model(ids)
        assert not torch.allclose(adapted, base, atol=1e-3)
        M.merge_lora(model)
        assert not any(isinstance(m, M.LoRALinear) for m in model.modules())
        assert isinstance(model.trf_blocks[0].ff.layers[0], torch.nn.Linear)
        assert torch.allclose(model(ids), adapted, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# End to end: train, predict, evaluate, resume, merge, other datasets
# ---------------------------------------------------------------------------------------------------------------

@needs_sms
def test_tiny_scratch_run_on_sms_beats_chance(tmp_path, monkeypatch):
    os.makedirs(tmp_path / "data")
    shutil.copy(SMS_FILE, tmp_path / "data" / "SMSSpamCollection")
    monkeypatch.setattr(data, "DATA_DIR", str(tmp_path / "data"))
    out = str(tmp_path / "run")
    summary = finetune_cls.main(TINY_FLAGS + ["--out_dir", out, "--lr", "2e-3", "--epochs", "1", "--max_steps", "80"])
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


def test_predict_cli_prints_a_label(small_run, tmp_path):
    _, out = small_run
    ckpt = os.path.join(out, "spam_classifier.pth")
    r = subprocess.run([sys.executable, os.path.join(HERE, "finetune_cls.py"), "--predict",
                        "You won a free cruise, call now!", "--checkpoint", ckpt, "--device", "cpu"],
                       env=ONE_THREAD, capture_output=True, text=True, timeout=120)
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
    with pytest.raises(data.UserError, match=r"'maybe' \(2 rows\).*known: ham, spam"):
        finetune_cls.main(["--evaluate", "--test_csv", unknown, "--out_dir", out, "--device", "cpu"])


def test_non_classifier_checkpoints_are_refused(small_run, tmp_path):
    path = M.save_checkpoint(str(tmp_path / "model.pth"), M.GPTModel(TINY), kind="pretrain")
    with pytest.raises(data.UserError, match="'pretrain' checkpoint, not a classifier"):
        finetune_cls.main(["--predict", "hello", "--checkpoint", path])
    with pytest.raises(data.UserError, match="no classifier at"):
        finetune_cls.main(["--predict", "hello", "--checkpoint", str(tmp_path / "none.pth")])
    with pytest.raises(data.UserError, match="no LoRA adapters"):
        finetune_cls.main(["--merge_lora", "--checkpoint", os.path.join(small_run[1], "spam_classifier.pth")])


def test_init_from_a_pretrain_checkpoint_keeps_frozen_weights(small_csv, tmp_path):
    torch.manual_seed(1)
    path = M.save_checkpoint(str(tmp_path / "model.pth"), M.GPTModel(TINY), kind="pretrain")
    out = str(tmp_path / "run")
    finetune_cls.main(["--init", path, "--trainable", "last_block", "--csv", small_csv, "--max_length", "32",
                       "--max_steps", "2", "--out_dir", out, "--device", "cpu", "--eval_iters", "1"])
    start, tuned = M.read_checkpoint(path)["model"], M.read_checkpoint(os.path.join(out, "spam_classifier.pth"))
    assert torch.equal(start["tok_emb.weight"], tuned["model"]["tok_emb.weight"])
    assert torch.equal(start["trf_blocks.0.att.W_query.weight"], tuned["model"]["trf_blocks.0.att.W_query.weight"])
    assert not torch.equal(start["trf_blocks.1.att.W_query.weight"], tuned["model"]["trf_blocks.1.att.W_query.weight"])
    with pytest.raises(SystemExit) as e:  # sizes belong to scratch models only
        finetune_cls.main(["--init", path, "--n_layers", "4"])
    assert e.value.code == 2


def test_resume_equals_an_uninterrupted_run(small_csv, tmp_path):
    flags = TINY_FLAGS + ["--csv", small_csv, "--epochs", "2"]
    whole = str(tmp_path / "whole")
    finetune_cls.main(flags + ["--out_dir", whole])
    parts = str(tmp_path / "parts")
    finetune_cls.main(flags + ["--out_dir", parts, "--max_steps", "3"])
    finetune_cls.main(flags + ["--out_dir", parts, "--resume"])
    a = M.read_checkpoint(os.path.join(whole, "spam_classifier.pth"))
    b = M.read_checkpoint(os.path.join(parts, "spam_classifier.pth"))
    assert a["step"] == b["step"] == 10  # 42 training texts, batch 8 -> 5 steps per epoch
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_lora_training_and_merge_lora_cli(small_csv, tmp_path):
    out = str(tmp_path / "lora")
    summary = finetune_cls.main(TINY_FLAGS + ["--csv", small_csv, "--trainable", "lora", "--lora_rank", "4",
                                              "--max_steps", "3", "--lr", "1e-2", "--out_dir", out])
    assert summary["trainable_parameters"] < summary["parameters"] / 10
    path = os.path.join(out, "spam_classifier.pth")
    ckpt = M.read_checkpoint(path)
    assert ckpt["lora"] == {"rank": 4, "alpha": 16.0} and any(k.endswith(".B") for k in ckpt["model"])
    merged_path = finetune_cls.main(["--merge_lora", "--checkpoint", path])
    merged = M.read_checkpoint(merged_path)
    assert merged["lora"] is None and not any(k.endswith((".A", ".B")) for k in merged["model"])
    texts = ["Free entry! Text WIN to 80086", "where are you now", "ok"]
    before = finetune_cls.main(["--predict_file", _lines(tmp_path, texts), "--checkpoint", path])
    after = finetune_cls.main(["--predict_file", _lines(tmp_path, texts), "--checkpoint", merged_path])
    for x, y in zip(before, after):
        assert x["label"] == y["label"] and abs(x["probability"] - y["probability"]) < 1e-5


def _lines(tmp_path, texts):
    path = tmp_path / "texts.txt"
    path.write_text("\n".join(texts) + "\n")
    return str(path)


def test_ready_made_splits_with_three_classes_and_custom_columns(tmp_path, capsys):
    words = {"sport": "goal match team score", "food": "pizza bread soup salad", "tech": "code chip data cloud"}
    rows = [(label, f"{ws.split()[i % 4]} {i}") for i in range(12) for label, ws in words.items()]
    header = ("category", "sentence")
    paths = [write_csv(tmp_path / n, rows[s], header) for n, s in
             (("tr.csv", slice(0, 24)), ("va.csv", slice(24, 30)), ("te.csv", slice(30, 36)))]
    long_text = ("word " * 40).strip()
    paths[2] = write_csv(tmp_path / "te.csv", rows[30:36] + [("tech", long_text)], header)
    out = str(tmp_path / "run")
    summary = finetune_cls.main(TINY_FLAGS + ["--train_csv", paths[0], "--val_csv", paths[1], "--test_csv",
                                              paths[2], "--text_column", "sentence", "--label_column", "category",
                                              "--max_length", "8", "--context_length", "16", "--epochs", "1",
                                              "--out_dir", out])
    assert summary["class_names"] == ["food", "sport", "tech"]
    assert len(summary["test"]["confusion"]) == 3 and summary["test"]["examples"] == 7
    assert "1 of 7 texts in the test split are longer than 8 tokens" in capsys.readouterr().err
    ckpt = M.read_checkpoint(os.path.join(out, "spam_classifier.pth"))
    assert ckpt["class_names"] == ["food", "sport", "tech"] and ckpt["label_column"] == "category"
    with pytest.raises(data.UserError, match="exceeds the model's context_length 16"):
        finetune_cls.main(TINY_FLAGS + ["--train_csv", paths[0], "--val_csv", paths[1], "--test_csv",
                                        paths[2], "--text_column", "sentence", "--label_column", "category",
                                        "--max_length", "64", "--context_length", "16", "--out_dir", out])
    bad_val = write_csv(tmp_path / "bad_val.csv", [("music", "guitar")], header)
    with pytest.raises(data.UserError, match="'music'"):
        finetune_cls.main(TINY_FLAGS + ["--train_csv", paths[0], "--val_csv", bad_val, "--test_csv", paths[2],
                                        "--text_column", "sentence", "--label_column", "category", "--out_dir", out])


@pytest.mark.parametrize("argv", [["--trainable", "some"], ["--trainable", "last_n:0"], ["--epocs", "1"],
                                  ["--predict", "x", "--evaluate"], ["--train_csv", "a.csv"],
                                  ["--csv", "a.csv", "--train_csv", "b.csv"], ["--batch_size", "two"]])
def test_bad_flags_exit_2(argv):
    with pytest.raises(SystemExit) as e:
        finetune_cls.main(argv)
    assert e.value.code == 2
