"""Tests for int8 weights, beam search, the repetition penalty and bench.py (tiny configs, no network)."""
import itertools
import json
import os

os.environ.setdefault("TIKTOKEN_CACHE_DIR", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "shared",
                                                         "tiktoken-cache"))

import pytest
import torch

from model import (GPT_CONFIG_124M, GPTModel, Int8Linear, apply_repetition_penalty, generate, generate_beam,
                   load_model, quantize_int8, sample_next_token, save_checkpoint)

TINY = dict(GPT_CONFIG_124M, n_layers=2, n_heads=2, emb_dim=32, context_length=32, drop_rate=0.0)


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return GPTModel(dict(TINY, **overrides)).eval()


# ---------------------------------------------------------------------------------------------------------------
# Int8
# ---------------------------------------------------------------------------------------------------------------

def test_int8_linear_matches_per_channel_rounding():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    q = Int8Linear.from_linear(linear)
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
        out = quantize_int8(model)(idx)
    assert all(type(m) is not torch.nn.Linear for m in model.modules())
    # Each weight moves by at most half a step (max|row| / 254), i.e. ~0.4 % of its row's largest weight; through
    # two blocks that gives logit errors around 1 % of the logits' spread. 5 % of the spread is a loose bound that a
    # wrong scale (per tensor instead of per row, a transposed scale, a missing bias) breaks by far.
    err = (out - ref).abs().max().item()
    assert err < 0.05 * ref.std().item(), err
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() > 0.95


def test_int8_checkpoint_round_trip_is_smaller(tmp_path):
    model = tiny_model(vocab_size=256)  # small vocabulary: the Linear layers hold most of the weights
    fp32_path = save_checkpoint(tmp_path / "fp32.pth", model)
    quantize_int8(model)
    int8_path = save_checkpoint(tmp_path / "int8.pth", model, quantize="int8")
    assert os.path.getsize(int8_path) < 0.5 * os.path.getsize(fp32_path)
    loaded, ckpt = load_model(str(int8_path))
    assert isinstance(loaded.out_head, Int8Linear) and ckpt["quantize"] == "int8"
    idx = torch.randint(0, 256, (1, 10))
    with torch.no_grad():
        assert torch.equal(loaded(idx), model(idx))
    # greedy decoding runs on int8 weights with the KV cache and matches recomputation
    assert torch.equal(generate(loaded, idx, 5), generate(loaded, idx, 5, use_cache=False))


def test_int8_checkpoint_with_tied_weights(tmp_path):
    model = quantize_int8(tiny_model(tie_weights=True))
    path = save_checkpoint(tmp_path / "int8.pth", model)  # bare of extras: recognised by its weight_scale keys
    loaded, _ = load_model(str(path))
    idx = torch.randint(0, TINY["vocab_size"], (1, 10))
    with torch.no_grad():
        assert torch.equal(loaded(idx), model(idx))
    assert loaded.tok_emb.weight.dtype == torch.float32 and loaded.out_head.weight.dtype == torch.int8


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
    got = generate_beam(model, prompt, 3, num_beams=216, eos_id=eos_id, length_penalty=length_penalty)
    assert got[0, 3:].tolist() == want


@pytest.mark.parametrize("seed", [8, 0, 1])
def test_beam_search_weighs_finished_against_complete_beams(seed):
    # 6 beams over 6 tokens for 2 new tokens: the best sequence is always among the 2 * 6 candidates of the last
    # step, so the search must return the brute-force best. With seed 8 the finished (eos) hypotheses fill all 6
    # places by then, and the complete beams of max_new_tokens still have to be compared with them.
    model = tiny_model(seed=seed, vocab_size=6)
    prompt = torch.tensor([[2, 5]])
    want = brute_force_best(model, prompt, 2, 0, 1.0)
    assert generate_beam(model, prompt, 2, num_beams=6, eos_id=0, length_penalty=1.0)[0, 2:].tolist() == want


def test_one_beam_equals_greedy():
    model = tiny_model(seed=3)
    for prompt in (torch.tensor([[5, 6, 7]]), torch.randint(0, 50257, (1, 20))):
        # 30 new tokens slide the window past context_length 32 for the longer prompt: the uncached path runs too
        assert torch.equal(generate_beam(model, prompt, 30, num_beams=1), generate(model, prompt, 30))
    small = tiny_model(seed=4, vocab_size=5)
    prompt = torch.tensor([[1]])
    eos = generate(small, prompt, 1)[0, 1].item()  # the greedy first token, used as end-of-text: stop at once
    assert torch.equal(generate_beam(small, prompt, 5, 1, eos_id=eos, length_penalty=0.0),
                       generate(small, prompt, 5, eos_id=eos))


def test_beam_search_rejects_bad_input():
    model = tiny_model()
    with pytest.raises(ValueError, match="one prompt"):
        generate_beam(model, torch.zeros(2, 3, dtype=torch.long), 2, 2)
    with pytest.raises(ValueError, match="num_beams"):
        generate_beam(model, torch.zeros(1, 3, dtype=torch.long), 2, 0)
    assert generate_beam(model, torch.zeros(1, 3, dtype=torch.long), 0, 2).shape == (1, 3)


# ---------------------------------------------------------------------------------------------------------------
# Repetition penalty
# ---------------------------------------------------------------------------------------------------------------

def test_repetition_penalty_rule():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    seen = torch.tensor([[0, 1, 1]])  # tokens 0 and 1 occurred (1 twice: penalized once)
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [[1.0, -2.0, 0.5, 3.0]]  # positive / 2, negative * 2, unseen unchanged
    assert torch.equal(apply_repetition_penalty(logits, seen, 1.0), logits)
    probs = torch.softmax(out, -1)[0]
    assert probs[0] < torch.softmax(logits, -1)[0, 0] and probs[3] > torch.softmax(logits, -1)[0, 3]
    with pytest.raises(ValueError):
        apply_repetition_penalty(logits, seen, 0.0)


def test_repetition_penalty_in_sampling_and_generate():
    logits = torch.tensor([[3.0, 2.9, 0.0]])
    assert sample_next_token(logits).item() == 0
    assert sample_next_token(logits, prev_ids=torch.tensor([[0]]), repetition_penalty=1.5).item() == 1
    assert sample_next_token(logits, prev_ids=torch.tensor([[0]])).item() == 0  # default 1.0 = off
    model = tiny_model(seed=5, vocab_size=8)
    prompt = torch.tensor([[1, 2]])
    plain = generate(model, prompt, 8)
    assert torch.equal(plain, generate(model, prompt, 8, repetition_penalty=1.0))
    penalized = generate(model, prompt, 8, repetition_penalty=3.0)
    assert not torch.equal(penalized, plain)
    # every step picks the argmax of the penalized logits, with the whole sequence so far (prompt included) as seen
    with torch.no_grad():
        for t in range(2, penalized.shape[1]):
            logits = model(penalized[:, :t])[:, -1]
            assert penalized[0, t] == apply_repetition_penalty(logits, penalized[:, :t], 3.0).argmax()


# ---------------------------------------------------------------------------------------------------------------
# bench.py
# ---------------------------------------------------------------------------------------------------------------

def test_bench_runs_and_writes_json(tmp_path):
    import bench
    out = tmp_path / "bench.json"
    result = bench.main(["--size", "tiny", "--context_length", "32", "--steps", "1", "--repeats", "1",
                         "--decode_tokens", "3", "--prompt_tokens", "4", "--matmul_size", "64",
                         "--bandwidth_mib", "1", "--compare", "off", "--json", str(out)])
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
    import bench
    with pytest.raises(SystemExit) as e:
        bench.main(["--size", "gpt3"])
    assert e.value.code == 2
    with pytest.raises(SystemExit):
        bench.main(["--context_length", "16", "--prompt_tokens", "10", "--decode_tokens", "10"])
