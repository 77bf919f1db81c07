"""Tests of finetune_chat.py (instruction data, collate, SFT, DPO, offline scores) and generate.py --chat.

Tiny models (2 layers, 2 heads, width 32); their context is 128 tokens because the prompt template alone takes 30.
"""
import functools
import http.server
import io
import json
import math
import os
import subprocess
import sys
import threading

HERE = os.path.dirname(os.path.abspath(__file__))
os.environ.setdefault("TIKTOKEN_CACHE_DIR", os.path.join(HERE, "..", "shared", "tiktoken-cache"))
SHARED_DATA = os.path.join(HERE, "..", "shared", "data")
sys.path.insert(0, HERE)

import pytest  # noqa: E402
import torch  # noqa: E402

import data  # noqa: E402
import finetune_chat  # noqa: E402
import generate  # noqa: E402
from model import GPTModel, read_checkpoint, save_checkpoint  # noqa: E402

TINY = dict(vocab_size=50257, context_length=128, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.0, qkv_bias=False)
TINY_FLAGS = ["--init", "scratch", "--n_layers", "2", "--n_heads", "2", "--emb_dim", "32", "--context_length", "128",
              "--device", "cpu", "--dtype", "float32"]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread; on a busy 2-core machine two threads wait on each other (20x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def book_records(name="instruction-data.json", n=None):
    with open(os.path.join(SHARED_DATA, name), encoding="utf-8") as f:
        records = json.load(f)
    return records[:n] if n else records


def short_records(n):
    """n quick instruction records (about 40 tokens each with the template)."""
    return [{"instruction": f"Add {i} and {i + 2}.", "input": "", "output": f"The sum is {2 * i + 2}."}
            for i in range(n)]


def short_preferences(n):
    return [{"instruction": f"Greet person number {i}.", "input": "", "chosen": f"Hello, number {i}!",
             "rejected": "Go away."} for i in range(n)]


def write_json(path, obj):
    path.write_text(json.dumps(obj), encoding="utf-8")
    return str(path)


def tiny_checkpoint(path, kind="chat", context_length=128, seed=0):
    torch.manual_seed(seed)
    model = GPTModel({**TINY, "context_length": context_length})
    return save_checkpoint(str(path), model, kind=kind, template=data.TEMPLATE_NAME), model


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
    inputs, targets = data.custom_collate_fn([[0, 1, 2, 3, 4], [5, 6], [7, 8, 9]])
    assert inputs.tolist() == [[0, 1, 2, 3, 4], [5, 6, E, E, E], [7, 8, 9, E, E]]
    assert targets.tolist() == [[1, 2, 3, 4, E], [6, E, I, I, I], [8, 9, E, I, I]]
    # an end-of-text inside a text is a target like any token; only the padding after the appended one is ignored
    _, targets = data.custom_collate_fn([[5, E, 6], [1]])
    assert targets.tolist() == [[E, 6, E], [E, I, I]]
    inputs, targets = data.custom_collate_fn([[0, 1, 2, 3, 4], [5, 6]], allowed_max_length=3)
    assert inputs.shape == targets.shape == (2, 3)
    assert targets.tolist() == [[1, 2, 3], [6, E, I]]


def test_mask_instruction_masks_the_prompt():
    E, I = data.EOT_ID, data.IGNORE_INDEX
    # tokens 0-2 are the prompt, 3-4 the response: only targets predicting 3, 4 and the end-of-text remain
    batch = [([10, 11, 12, 13, 14], [False, False, False, True, True]), ([20, 21], [False, True])]
    inputs, targets = data.custom_collate_fn(batch)
    assert inputs.tolist() == [[10, 11, 12, 13, 14], [20, 21, E, E, E]]
    assert targets.tolist() == [[I, I, 13, 14, E], [21, E, I, I, I]]

    record = book_records(n=1)[0]
    tok = data.get_tokenizer()
    n_prompt = len(tok.encode(data.format_prompt(record)))
    n_response = len(tok.encode(record["output"]))
    masked = data.InstructionDataset([record], mask_instruction=True)
    _, targets = data.custom_collate_fn([masked[0]])
    assert (targets[0, :n_prompt - 1] == I).all()
    assert int((targets != I).sum()) == n_response + 1  # the response and the end-of-text
    _, plain = data.custom_collate_fn([data.InstructionDataset([record])[0]])
    assert int((plain != I).sum()) == n_prompt + n_response


def test_records_longer_than_allowed_max_length_are_cut_and_counted(capsys, tmp_path):
    records = book_records(n=4)
    long = {"instruction": "Repeat: " + "word " * 200, "input": "", "output": "word"}
    dataset = data.InstructionDataset(records + [long], max_length=100)
    assert (dataset.truncated, dataset.skipped, len(dataset)) == (1, 0, 5)
    masked = data.InstructionDataset(records + [long], mask_instruction=True, max_length=100)
    assert (masked.truncated, masked.skipped, len(masked)) == (0, 1, 4)  # its response lies beyond the cut
    prefs = data.PreferenceDataset([{**long, "chosen": "a", "rejected": "b"}], max_length=100)
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
    model = GPTModel(TINY)
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
    result = finetune_chat.main(TINY_FLAGS + ["--data", str(path), "--out_dir", str(out), "--lr", "2e-3",
                                              "--batch_size", "4", "--max_steps", "4", "--epochs", "3",
                                              "--eval_freq", "4", "--eval_iters", "3", "--max_new_tokens", "4",
                                              "--mask_instruction"])
    rows = result["rows"]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] - 0.1
    ckpt = read_checkpoint(result["checkpoint"])
    assert os.path.basename(result["checkpoint"]) == "scratch-sft.pth"
    assert ckpt["kind"] == "chat" and ckpt["template"] == data.TEMPLATE_NAME
    answered = json.loads((out / "instruction-data-with-response.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(answered) == metrics["test_records"] == 1 and "model_response" in answered[0]
    assert {"exact_match", "token_f1", "rouge_l", "perplexity", "val_loss"} <= set(metrics)
    assert metrics["perplexity"] > 1
    assert "metrics.json" in capsys.readouterr().out.strip().splitlines()[-1]


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_default_data_is_downloaded_and_lora_checkpoint_loads_plain(tmp_path, monkeypatch):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(_QuietHandler, directory=SHARED_DATA))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.chdir(tmp_path)
        monkeypatch.setattr(data, "DATA_DIR", str(tmp_path / "data"))
        monkeypatch.setenv("GPT2_DATA_URL", f"http://127.0.0.1:{server.server_address[1]}")
        result = finetune_chat.main(TINY_FLAGS + ["--out_dir", str(tmp_path / "run"), "--max_steps", "1",
                                                  "--eval_iters", "1", "--max_new_tokens", "0",
                                                  "--trainable", "lora", "--lora_rank", "2",
                                                  "--allowed_max_length", "40"])
    finally:
        server.shutdown()
    assert data.sha256_of(tmp_path / "data" / "instruction-data.json") == data.DATA_FILES[
        "instruction-data.json"][1]
    assert result["metrics"]["test_records"] == 110  # the 85/10/5 split of 1100 records
    ckpt = read_checkpoint(result["checkpoint"])
    assert not any("lora" in k.lower() or k.endswith((".A", ".B")) for k in ckpt["model"])
    GPTModel(ckpt["config"]).load_state_dict(ckpt["model"])  # merged: a plain model loads it strictly


# ---------------------------------------------------------------------------------------------------------------
# Chat
# ---------------------------------------------------------------------------------------------------------------

def test_chat_sends_the_first_turn_in_the_second_prompt_and_reuses_its_cache(tmp_path, monkeypatch, capsys):
    path, _ = tiny_checkpoint(tmp_path / "chat.pth")
    monkeypatch.setattr(sys, "stdin", fake_stdin(b"Name a color.\nAnd another one?\n"))
    turns = generate.main(["--chat", "--checkpoint", path, "--temperature", "0", "--max_new_tokens", "6",
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
    model, _ = generate.load_model(path)
    messages = [{"role": "user", "content": "Name a color."}, {"role": "assistant", "content": turns[0]["reply"]},
                {"role": "user", "content": "And another one?"}]
    ids, dropped = generate.chat_prompt(messages, "", 128, 6)
    assert dropped == 0
    fresh = generate.generate_reply(model, torch.tensor([ids]), 6)
    assert fresh == turns[1]["reply"]


def test_chat_reset_exit_bad_utf8_system_and_non_chat_warning(tmp_path, monkeypatch, capsys):
    path, _ = tiny_checkpoint(tmp_path / "base.pth", kind="pretrain")
    monkeypatch.setattr(sys, "stdin", fake_stdin(b"hello there\n\xff\xfe oops\n/reset\nhi again\n/exit\nnever\n"))
    turns = generate.main(["--chat", "--checkpoint", path, "--temperature", "0", "--max_new_tokens", "3",
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
    turns = generate.main(["--chat", "--checkpoint", path, "--temperature", "0", "--max_new_tokens", "5",
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
    assert read_checkpoint(result["checkpoint"])["kind"] == "chat"


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one clear message
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
    with pytest.raises(data.UserError, match=message):
        finetune_chat.main(TINY_FLAGS + ["--data", str(tmp_path / name), "--out_dir", str(tmp_path / "run")])


def test_bad_preference_data_and_missing_init(tmp_path):
    init, _ = tiny_checkpoint(tmp_path / "sft.pth")
    prefs = write_json(tmp_path / "prefs.json", [{"instruction": "a", "input": "", "chosen": "b"}])
    with pytest.raises(data.UserError, match=r"record 0 \(0-based\) has no 'rejected' field"):
        finetune_chat.main(["--method", "dpo", "--init", init, "--data", prefs, "--device", "cpu"])
    empty = write_json(tmp_path / "empty.json", [{"instruction": "a", "chosen": "b", "rejected": " "}])
    with pytest.raises(data.UserError, match=r"record 0 \(0-based\) has an empty 'rejected' response"):
        finetune_chat.main(["--method", "dpo", "--init", init, "--data", empty, "--device", "cpu"])
    with pytest.raises(data.UserError, match=r"no SFT checkpoint at .*nope.pth"):
        finetune_chat.main(["--method", "dpo", "--init", str(tmp_path / "nope.pth"), "--data", prefs])


def test_misspelled_flag_or_bad_value_exits_2(capsys):
    for argv in (["--epoch", "1"], ["--method", "ppo"], ["--trainable", "some"], ["--batch_size", "x"]):
        with pytest.raises(SystemExit) as e:
            finetune_chat.main(argv)
        assert e.value.code == 2


def test_command_line_error_is_one_line_without_traceback(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("[{", encoding="utf-8")
    proc = subprocess.run([sys.executable, os.path.join(HERE, "finetune_chat.py"), "--data", str(bad),
                           "--init", "scratch"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [f"error: {bad}, line 1, column 3: malformed JSON (Expecting "
                                                f"property name enclosed in double quotes): fix the file (a JSON "
                                                f"list of records, or one record per line)"]
