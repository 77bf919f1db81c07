"""GPT-2 in plain PyTorch: the model, a KV cache, sampling, and .pth checkpoints.

This file imports only torch and the standard library, so it can be copied alone into another project:

    from model import GPTModel, MODEL_CONFIGS, generate
    model = GPTModel(MODEL_CONFIGS["gpt2"])
    out = generate(model, idx, max_new_tokens=20, context_size=1024, temperature=0.8, top_k=50)

Module and parameter names follow the book *Build a Large Language Model (From Scratch)* (tok_emb, pos_emb,
trf_blocks, att.W_query, ff.layers, norm1.scale, final_norm, out_head, ...), so its checkpoints load unchanged.
"""
import math
import os
import tempfile

import torch
import torch.nn as nn
import torch.nn.functional as F

GPT_CONFIG_124M = {
    "vocab_size": 50257,     # GPT-2 BPE vocabulary
    "context_length": 1024,  # longest sequence the position embedding covers
    "emb_dim": 768,          # width of the residual stream
    "n_heads": 12,           # attention heads per layer
    "n_layers": 12,          # transformer blocks
    "drop_rate": 0.1,        # dropout on embeddings, attention weights and residual branches; 0 = off
    "qkv_bias": False,       # bias in the query/key/value projections (OpenAI's weights have one)
}

# OpenAI's four published sizes: (emb_dim, n_layers, n_heads)
_SIZES = {"gpt2": (768, 12, 12), "gpt2-medium": (1024, 24, 16), "gpt2-large": (1280, 36, 20),
          "gpt2-xl": (1600, 48, 25)}
MODEL_CONFIGS = {name: {**GPT_CONFIG_124M, "emb_dim": d, "n_layers": L, "n_heads": h}
                 for name, (d, L, h) in _SIZES.items()}
# heads of the standard sizes, to complete a config inferred from a bare state_dict
HEADS_FOR_WIDTH = {d: h for d, _, h in _SIZES.values()}


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, or does not fit the model."""


# ---------------------------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------------------------

class LayerNorm(nn.Module):
    """Normalize each token's vector to mean 0 and variance 1, then apply a learned scale and shift."""

    def __init__(self, emb_dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x):
        # one fused kernel; the same numbers as (x - mean) / sqrt(var + eps) * scale + shift with biased variance
        return F.layer_norm(x, (x.shape[-1],), self.scale, self.shift, self.eps)


class GELU(nn.Module):
    """GPT-2's GELU: the tanh approximation 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""

    def forward(self, x):
        return F.gelu(x, approximate="tanh")


class FeedForward(nn.Module):
    """Position-wise MLP: widen 4x, GELU, project back."""

    def __init__(self, cfg):
        super().__init__()
        d = cfg["emb_dim"]
        self.layers = nn.Sequential(nn.Linear(d, 4 * d), GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        return self.layers(x)


class MultiHeadAttention(nn.Module):
    """Causal multi-head self-attention.

    Two paths that give the same numbers: `fused=True` (default) calls scaled_dot_product_attention, which picks a
    flash or memory-efficient kernel; `fused=False` spells every step out as in the book.
    """

    def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False):
        super().__init__()
        if d_out % num_heads != 0:
            raise ValueError(f"emb_dim {d_out} must be divisible by n_heads {num_heads}")
        self.d_out = d_out
        self.num_heads = num_heads
        self.head_dim = d_out // num_heads
        self.context_length = context_length
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)
        self.dropout = nn.Dropout(dropout)
        self.fused = True
        # The book keeps its causal mask as a saved buffer `mask`; we build masks on the fly, so drop that key
        # when a book checkpoint is loaded.
        self.register_load_state_dict_pre_hook(_drop_book_mask)

    def forward(self, x, layer_cache=None):
        B, T, _ = x.shape
        # project and split into heads: (B, T, d_out) -> (B, n_heads, T, head_dim)
        q = self.W_query(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.W_key(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.W_value(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        if layer_cache is not None:
            k, v = layer_cache.append(k, v)  # (B, n_heads, past + T, head_dim)
        if self.fused:
            ctx = self._fused_attention(q, k, v)
        else:
            ctx = self._manual_attention(q, k, v)
        # merge heads: (B, n_heads, T, head_dim) -> (B, T, d_out)
        ctx = ctx.transpose(1, 2).reshape(B, T, self.d_out)
        return self.out_proj(ctx)

    def _fused_attention(self, q, k, v):
        Tq, Tk = q.shape[-2], k.shape[-2]
        p = self.dropout.p if self.training else 0.0
        if Tq == Tk:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        if Tq == 1:  # one new token sees every cached one
            return F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        # several new tokens after a cached prefix: new token i sees the prefix and new tokens 0..i
        return F.scaled_dot_product_attention(q, k, v, attn_mask=~_future_mask(Tq, Tk, q.device), dropout_p=p)

    def _manual_attention(self, q, k, v):
        Tq, Tk = q.shape[-2], k.shape[-2]
        scores = q @ k.transpose(2, 3)                                   # (B, n_heads, Tq, Tk)
        scores = scores.masked_fill(_future_mask(Tq, Tk, q.device), float("-inf"))
        weights = torch.softmax(scores / math.sqrt(self.head_dim), dim=-1)
        weights = self.dropout(weights)
        return weights @ v                                               # (B, n_heads, Tq, head_dim)


def _future_mask(Tq, Tk, device):
    """True where a query may not look: the last Tq of Tk positions are the queries."""
    return torch.ones(Tq, Tk, dtype=torch.bool, device=device).triu(diagonal=Tk - Tq + 1)


def _drop_book_mask(module, state_dict, prefix, *args):
    state_dict.pop(prefix + "mask", None)


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block: x + attention(norm(x)), then x + MLP(norm(x))."""

    def __init__(self, cfg):
        super().__init__()
        self.att = MultiHeadAttention(cfg["emb_dim"], cfg["emb_dim"], cfg["context_length"], cfg["drop_rate"],
                                      cfg["n_heads"], cfg["qkv_bias"])
        self.ff = FeedForward(cfg)
        self.norm1 = LayerNorm(cfg["emb_dim"])
        self.norm2 = LayerNorm(cfg["emb_dim"])
        self.drop_shortcut = nn.Dropout(cfg["drop_rate"])

    def forward(self, x, layer_cache=None):
        x = x + self.drop_shortcut(self.att(self.norm1(x), layer_cache))
        x = x + self.drop_shortcut(self.ff(self.norm2(x)))
        return x


class GPTModel(nn.Module):
    """GPT-2: token + position embeddings, n_layers transformer blocks, final LayerNorm, linear head to logits."""

    def __init__(self, cfg):
        super().__init__()
        missing = [k for k in GPT_CONFIG_124M if k not in cfg]
        if missing:
            raise ValueError(f"model config lacks {missing}; start from a copy of GPT_CONFIG_124M")
        self.cfg = dict(cfg)
        self.tok_emb = nn.Embedding(cfg["vocab_size"], cfg["emb_dim"])
        self.pos_emb = nn.Embedding(cfg["context_length"], cfg["emb_dim"])
        self.drop_emb = nn.Dropout(cfg["drop_rate"])
        self.trf_blocks = nn.Sequential(*[TransformerBlock(cfg) for _ in range(cfg["n_layers"])])
        self.final_norm = LayerNorm(cfg["emb_dim"])
        self.out_head = nn.Linear(cfg["emb_dim"], cfg["vocab_size"], bias=False)
        if cfg.get("tie_weights"):
            self.out_head.weight = self.tok_emb.weight  # GPT-2 shares the output layer with the token embedding
            # nn.Embedding's N(0, 1) start would make the first logits ~sqrt(emb_dim) wide (initial loss ~25 at 124M
            # instead of ln(50257) = 10.8); GPT-2 starts its embedding at std 0.02
            nn.init.normal_(self.tok_emb.weight, std=0.02)

    def forward(self, in_idx, kv_cache=None, last_only=False):
        """in_idx: (B, T) token ids -> logits (B, T, vocab_size). With a KVCache, T new tokens follow its contents.
        last_only=True returns the last position's logits (B, 1, vocab_size), all that generation needs: the
        50257-wide output layer then runs on one row instead of T."""
        B, T = in_idx.shape
        start = kv_cache.pos if kv_cache is not None else 0
        if start + T > self.pos_emb.num_embeddings:
            raise ValueError(f"sequence of {start + T} tokens exceeds context_length {self.pos_emb.num_embeddings}")
        pos = torch.arange(start, start + T, device=in_idx.device)
        x = self.drop_emb(self.tok_emb(in_idx) + self.pos_emb(pos))  # (B, T, emb_dim)
        if kv_cache is None:
            x = self.trf_blocks(x)
        else:
            for block, layer_cache in zip(self.trf_blocks, kv_cache.layers):
                x = block(x, layer_cache)
            kv_cache.advance(in_idx)
        if last_only:
            x = x[:, -1:]
        return self.out_head(self.final_norm(x))

    def set_fused_attention(self, fused=True):
        for block in self.trf_blocks:
            block.att.fused = fused
        return self


def count_parameters(model, trainable_only=False):
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# ---------------------------------------------------------------------------------------------------------------
# KV cache and generation
# ---------------------------------------------------------------------------------------------------------------

class _LayerCache:
    """Keys and values of one attention layer, preallocated for max_len positions."""

    def __init__(self, parent, shape, device, dtype):
        self.parent = parent
        self.k = torch.empty(shape, device=device, dtype=dtype)  # (B, n_heads, max_len, head_dim)
        self.v = torch.empty(shape, device=device, dtype=dtype)

    def append(self, k, v):
        start, end = self.parent.pos, self.parent.pos + k.shape[-2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class KVCache:
    """Keys and values of every layer for the tokens seen so far, so each new token costs one position of work.

    `ids` holds the tokens the cache covers, which lets generate() reuse the longest shared prefix of a new prompt.
    """

    def __init__(self, model, batch_size=1, max_len=None, dtype=None):
        cfg = model.cfg
        self.max_len = max_len or cfg["context_length"]
        param = model.pos_emb.weight  # float even when the Linear layers hold int8 weights (quantize_int8)
        head_dim = cfg["emb_dim"] // cfg["n_heads"]
        shape = (batch_size, cfg["n_heads"], self.max_len, head_dim)
        self.layers = [_LayerCache(self, shape, param.device, dtype or param.dtype) for _ in range(cfg["n_layers"])]
        self.pos = 0
        self.ids = torch.empty(batch_size, 0, dtype=torch.long, device=param.device)

    def advance(self, new_ids):
        self.pos += new_ids.shape[1]
        self.ids = torch.cat([self.ids, new_ids], dim=1)

    def truncate(self, n):
        """Forget everything after the first n tokens."""
        self.pos = n
        self.ids = self.ids[:, :n]

    def shared_prefix(self, idx):
        """Length of the longest prefix that idx shares with the cached tokens (every row must match)."""
        n = min(self.ids.shape[1], idx.shape[1])
        if n == 0 or self.ids.shape[0] != idx.shape[0]:
            return 0
        same = (self.ids[:, :n] == idx[:, :n]).all(dim=0)
        return n if bool(same.all()) else int(same.int().argmin())


def sample_next_token(logits, temperature=0.0, top_k=None, top_p=None, generator=None, *, prev_ids=None,
                      repetition_penalty=1.0):
    """logits (B, vocab) -> next ids (B, 1). temperature 0 = greedy; top_k/top_p None or 0 = off.

    repetition_penalty > 1 makes the tokens in prev_ids (B, T) less likely (see apply_repetition_penalty); 1 = off.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    logits = logits.float()
    if repetition_penalty != 1.0 and prev_ids is not None:
        logits = apply_repetition_penalty(logits, prev_ids, repetition_penalty)
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens ranked above it already hold top_p of the mass (the first always stays)
        drop = probs.cumsum(dim=-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


def apply_repetition_penalty(logits, prev_ids, penalty):
    """Make every token that occurs in prev_ids (B, T) less likely: its logit is divided by penalty when positive
    and multiplied by it when negative (the CTRL paper's rule), so penalty > 1 always lowers it. Returns new logits
    (B, vocab); the others are unchanged."""
    if penalty <= 0:
        raise ValueError(f"repetition_penalty must be > 0 (1 = off), got {penalty}")
    seen = logits.gather(-1, prev_ids)
    seen = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits.scatter(-1, prev_ids, seen)


@torch.no_grad()
def generate_stream(model, idx, max_new_tokens, context_size=None, temperature=0.0, top_k=None, top_p=None,
                    eos_id=None, kv_cache=None, use_cache=True, generator=None, stop_ids=None, repetition_penalty=1.0):
    """Yield next-token ids (B, 1) one step at a time; the arguments are those of generate().

    Each step sees at most the last context_size tokens. While the sequence fits, the KV cache makes a step cost one
    position; once the window slides, every position moves, so the window is recomputed each step (the numbers stay
    those of full recomputation). Stops early when every row has produced eos_id (or one of stop_ids).
    """
    context_size = min(context_size or model.cfg["context_length"], model.cfg["context_length"])
    was_training = model.training
    model.eval()
    stops = set(stop_ids or ()) | ({eos_id} if eos_id is not None else set())
    finished = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
    cache = None
    if use_cache:
        cache = kv_cache if kv_cache is not None else KVCache(model, idx.shape[0], context_size)
    try:
        for _ in range(max_new_tokens):
            window = idx[:, -context_size:]
            if cache is None:
                logits = model(window, last_only=True)
            else:
                if window.shape[1] != idx.shape[1] or window.shape[1] > cache.max_len:
                    cache.truncate(0)  # the window slid: positions changed, nothing cached is valid
                    keep = 0
                else:
                    keep = cache.shared_prefix(window)
                    keep = min(keep, window.shape[1] - 1)  # always run at least the last token
                    cache.truncate(keep)
                if window.shape[1] > cache.max_len:
                    logits = model(window, last_only=True)
                else:
                    logits = model(window[:, keep:], kv_cache=cache, last_only=True)
            next_id = sample_next_token(logits[:, -1], temperature, top_k, top_p, generator, prev_ids=idx,
                                        repetition_penalty=repetition_penalty)
            idx = torch.cat([idx, next_id], dim=1)
            yield next_id
            if stops:
                finished |= torch.isin(next_id[:, 0], torch.tensor(sorted(stops), device=idx.device))
                if bool(finished.all()):
                    break
    finally:
        model.train(was_training)


def generate(model, idx, max_new_tokens, context_size=None, temperature=0.0, top_k=None, top_p=None, eos_id=None,
             use_cache=True, generator=None, repetition_penalty=1.0):
    """Extend idx (B, T) by up to max_new_tokens sampled tokens and return the longer (B, T + n) tensor.

    temperature 0 = greedy; top_k keeps the k most likely tokens; top_p keeps the smallest set holding that much
    probability (nucleus sampling); a prompt longer than context_size is cropped from the left for the model's view;
    repetition_penalty > 1 discourages tokens already in the sequence (prompt included), 1 = off.
    """
    new = list(generate_stream(model, idx, max_new_tokens, context_size, temperature, top_k, top_p, eos_id,
                               use_cache=use_cache, generator=generator, repetition_penalty=repetition_penalty))
    return torch.cat([idx, *new], dim=1) if new else idx


# ---------------------------------------------------------------------------------------------------------------
# Beam search
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
                _add_finished(finished, s / n_new ** length_penalty, done, num_beams)
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
                _add_finished(finished, s / max(max_new_tokens, 1) ** length_penalty, seq, num_beams)
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
        return log_prob / n_done ** length_penalty
    return max(log_prob / n ** length_penalty for n in (n_done + 1, max_new_tokens))


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
# Deployment: weight layout for decoding, int8 weights
# ---------------------------------------------------------------------------------------------------------------

def optimize_for_decoding(model):
    """Make batch-1 decoding on CPU faster, in place, without changing any value; returns model.

    Decoding one token reads every weight once, so its speed is how fast the matmuls stream weights from memory.
    Two changes, measured on 2-core CPUs (GB/s of weights read per token, 124M shapes):
    - memory order: the Linear layers with in_features <= out_features (attention's four, the MLP's first layer,
      out_head) store their weight column-major, i.e. as a row-major (in, out) matrix (768 -> 3072: 12.5 -> 21.3);
    - both cores: each nn.Linear becomes a DecodingLinear, which reads its weight in one slice per thread
      (768 -> 3072: 21.3 -> 30.5; 3072 -> 768: 17.9 -> 29.8; out_head: 24.4 -> 33.0). A single-row matmul runs on
      one core here, and one core cannot use all of the memory bandwidth.
    Values, shapes and state_dict keys stay the same, so checkpoints are unaffected. Training is faster in the usual
    order, so use this on models that only generate (generate.py does).
    """
    for module in list(model.modules()):
        if type(module) is nn.Linear:
            w = module.weight
            if w.device.type == "cpu" and module.in_features <= module.out_features and w.is_contiguous():
                w.data = w.data.t().contiguous().t()  # (out, in) shape, (in, out) memory
            module.__class__ = DecodingLinear  # same parameters and hooks; only forward differs
    return model


class DecodingLinear(nn.Linear):
    """An nn.Linear whose forward, for a few rows on CPU, splits the weight into one slice per thread and runs the
    slices as one batched matmul (torch spreads a batch over its threads); otherwise it is F.linear.

    A column-major weight (optimize_for_decoding) is sliced along in_features and the partial results are added; a
    row-major one along out_features and the pieces are put side by side. Same values as F.linear up to the order
    of the additions. Only for float32 weights outside autocast: bf16 matmuls of one row do not gain from it.
    """
    FEW_ROWS = 16  # more rows (prefill, evaluation): the ordinary matmul already keeps every core busy

    def forward(self, x):
        w, n = self.weight, torch.get_num_threads()
        rows = x.numel() // self.in_features
        if (x.device.type != "cpu" or rows > self.FEW_ROWS or n < 2 or w.dtype != torch.float32
                or torch.is_autocast_enabled("cpu")):
            return F.linear(x, w, self.bias)  # measured: for bf16 weights the split is slower (46 vs 53 tokens/s)
        lead = x.shape[:-1]
        x2 = x.reshape(rows, self.in_features)
        if w.t().is_contiguous() and self.in_features % n == 0:
            # (in, out) memory: n row-blocks of it, each times its slice of x; add the n partial results
            parts = torch.bmm(x2.view(rows, n, -1).transpose(0, 1), w.t().view(n, -1, self.out_features))
            y = parts.sum(0)
        elif w.is_contiguous() and self.out_features % n == 0:
            # (out, in) memory: n row-blocks of it, each gives out_features / n of the outputs
            parts = torch.bmm(x2.expand(n, rows, -1), w.view(n, -1, self.in_features).transpose(1, 2))
            y = parts.transpose(0, 1).reshape(rows, self.out_features)
        else:
            return F.linear(x, w, self.bias)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*lead, self.out_features)


class Int8Linear(nn.Module):
    """An inference-only Linear whose weight is stored as int8 with one float scale per output channel (row):
    weight[o] ~ weight_int8[o] * weight_scale[o], scale = max |weight[o]| / 127 (symmetric, so 0 stays 0).

    A quarter of fp32's bytes, and decoding at batch 1 is bound by reading the weights, so it also reads a quarter.
    state_dict: weight (out, in) int8 in nn.Linear's layout, weight_scale (out,) float32, bias as in nn.Linear.
    """
    FEW_ROWS = 16  # up to this many rows per call the int8 kernel beats converting the weights (measured on CPU)

    def __init__(self, in_features, out_features, bias=True, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        # frozen parameters rather than buffers, so parameter counts and .to(device) treat them like nn.Linear's
        w = torch.zeros(out_features, in_features, dtype=torch.int8, device=device)
        self.weight = nn.Parameter(w, requires_grad=False)
        self.weight_scale = nn.Parameter(torch.ones(out_features, device=device), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear, quantize=True):
        """The int8 version of an nn.Linear; quantize=False gives an empty one of the same shape (to load into)."""
        w = linear.weight.detach()
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, device=w.device)
        if quantize:
            w = w.float()
            scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127  # (out,); the clamp keeps all-zero rows finite
            layer.weight.copy_(torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
            layer.weight_scale.copy_(scale)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias.detach().float())
        return layer

    def forward(self, x):
        lead = x.shape[:-1]
        x = x.reshape(-1, self.in_features)
        if x.device.type == "cpu" and x.shape[0] <= self.FEW_ROWS:
            # decoding: torch's int8 kernel reads the int8 weights directly; on CPU it is fast only with bf16
            # activations (their rounding adds ~0.3 % relative error to the ~1 % of the int8 weights)
            y = torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16).contiguous(), self.weight,
                                                   self.weight_scale.to(torch.bfloat16)).to(x.dtype)
        else:
            # many rows (prefill, evaluation): converting the weights once is cheap next to the matmul
            y = (x @ self.weight.to(x.dtype).t()) * self.weight_scale.to(x.dtype)  # (x W^T) s = x (W s)^T
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*lead, self.out_features)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def quantize_int8(model, quantize=True):
    """Replace every nn.Linear in model (attention, MLP, out_head) by an Int8Linear, in place; returns model.

    quantize=False only swaps in empty int8 layers of the same shapes, to load an int8 state_dict into.
    The token and position embeddings and the LayerNorms stay float.
    """
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, Int8Linear.from_linear(child, quantize))
    return model


def is_int8_state_dict(state_dict):
    """True for a state_dict written from a quantize_int8 model."""
    return any(k.endswith(".weight_scale") for k in state_dict)


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------------

def clean_state_dict(state_dict):
    """Strip the prefixes torch.compile (`_orig_mod.`) and DDP (`module.`) put in front of parameter names."""
    out = {}
    for k, v in state_dict.items():
        for prefix in ("_orig_mod.", "module."):
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k.replace("._orig_mod.", ".")] = v
    return out


def atomic_save(obj, path):
    """torch.save to a temporary file in the same folder, then rename over path: a crash never leaves half a file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        # disk full, file too large, permissions; torch's zip writer reports these as a RuntimeError raised while
        # handling the OSError, so look one exception back as well
        err = e if isinstance(e, OSError) else e.__context__ if isinstance(e.__context__, OSError) else None
        if err is not None:
            raise CheckpointError(f"could not write {path} ({err.strerror or err}): free disk space or choose "
                                  f"another folder; any earlier file at that path is untouched") from None
        raise


def save_checkpoint(path, model, kind="pretrain", **extra):
    """Write {model, config, kind, **extra} to path atomically; returns path."""
    atomic_save({"model": clean_state_dict(model.state_dict()), "config": dict(model.cfg), "kind": kind, **extra},
                path)
    return path


def read_checkpoint(path, map_location="cpu"):
    """Load a .pth without unpickling code (weights_only=True). Returns a dict; a bare state_dict comes back as
    {"model": state_dict, "config": None, "kind": None}."""
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path}")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): the save was interrupted; delete it and rerun")
    try:
        # mmap: tensors are read from the file as they are copied into the model, not all at once
        ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=True)
    except Exception as e:  # pickle refusals, truncated zips, not-a-checkpoint files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot read {path} as a safe .pth checkpoint ({first[:200]})") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} holds a {type(ckpt).__name__}, not a checkpoint dict or state_dict")
    if "model" in ckpt and isinstance(ckpt["model"], dict):
        ckpt.setdefault("config", None)
        ckpt.setdefault("kind", None)
        return ckpt
    if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return {"model": ckpt, "config": None, "kind": None}
    raise CheckpointError(f"{path} is neither one of our checkpoints nor a state_dict")


def infer_config(state_dict, n_heads=None):
    """Rebuild a config from a bare state_dict's tensor shapes (drop_rate 0). n_heads cannot be read off shapes:
    it comes from the argument or the standard GPT-2 sizes."""
    sd = clean_state_dict(state_dict)
    try:
        vocab, emb = sd["tok_emb.weight"].shape
        ctx = sd["pos_emb.weight"].shape[0]
    except KeyError:
        raise CheckpointError("state_dict has no tok_emb.weight / pos_emb.weight: not a GPTModel") from None
    layers = 1 + max((int(k.split(".")[1]) for k in sd if k.startswith("trf_blocks.")), default=-1)
    heads = n_heads or HEADS_FOR_WIDTH.get(emb)
    if heads is None:
        raise CheckpointError(f"cannot tell n_heads for emb_dim {emb} from a bare state_dict: pass n_heads "
                              f"(generate.py --n_heads)")
    if emb % heads:
        raise CheckpointError(f"n_heads {heads} does not divide emb_dim {emb}: pick a number of heads that does")
    return {"vocab_size": vocab, "context_length": ctx, "emb_dim": emb, "n_heads": heads, "n_layers": layers,
            "drop_rate": 0.0, "qkv_bias": "trf_blocks.0.att.W_query.bias" in sd,
            "tie_weights": False}


def load_state(model, state_dict, source="checkpoint"):
    """load_state_dict(strict=True) with an error that names the keys and shapes that do not fit."""
    sd = clean_state_dict(state_dict)
    sd = {k: v for k, v in sd.items() if not k.endswith("att.mask")}
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    wrong = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own
             if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected {_few(unexpected)}")
        if wrong:
            parts.append(f"wrong shape {_few(wrong)}")
        try:
            fits = infer_config(sd)
            hint = f"; a config that fits it: {fits}"
        except CheckpointError:
            hint = ""
        raise CheckpointError(f"{source} does not fit the model: {'; '.join(parts)}{hint}")
    model.load_state_dict(sd, strict=True)
    return model


def _few(names, n=4):
    return ", ".join(names[:n]) + (f" (+{len(names) - n} more)" if len(names) > n else "")


def load_model(path, device="cpu", cfg_overrides=None):
    """Build a GPTModel from a .pth (ours or a bare state_dict) -> (model, checkpoint dict)."""
    ckpt = read_checkpoint(path)
    cfg = dict(ckpt["config"] or infer_config(ckpt["model"], (cfg_overrides or {}).get("n_heads")))
    cfg.update(cfg_overrides or {})
    with torch.device("meta"):
        model = GPTModel(cfg)  # no memory, no random init: every tensor comes from the file
    model = model.to_empty(device="cpu")
    if cfg.get("tie_weights"):
        model.out_head.weight = model.tok_emb.weight  # to_empty gave each its own storage
    if is_int8_state_dict(ckpt["model"]):
        quantize_int8(model, quantize=False)  # written by quantize_int8: give the model the same int8 layers
    load_state(model, ckpt["model"], path)
    return model.to(device), ckpt


# ---------------------------------------------------------------------------------------------------------------
# LoRA: low-rank adapters for nn.Linear layers (finetune_cls.py --trainable lora)
# ---------------------------------------------------------------------------------------------------------------

class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update: y = base(x) + (alpha / rank) * (x A^T) B^T.

    A (rank, in_features) starts random and B (out_features, rank) starts at zero, so a new adapter leaves the
    layer's output unchanged until training moves B. `weight`, `bias`, `in_features` and `out_features` are the
    base layer's, so code that reads them keeps working. merge() folds the update into a plain nn.Linear.
    """

    def __init__(self, linear, rank=16, alpha=16):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {rank}")
        self.base = linear.requires_grad_(False)
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank
        w = linear.weight
        self.A = nn.Parameter(torch.empty(rank, linear.in_features, device=w.device, dtype=w.dtype))
        self.B = nn.Parameter(torch.zeros(linear.out_features, rank, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # the init nn.Linear gives its own weight

    @property
    def weight(self):
        return self.base.weight

    @property
    def bias(self):
        return self.base.bias

    @property
    def in_features(self):
        return self.base.in_features

    @property
    def out_features(self):
        return self.base.out_features

    def forward(self, x):
        return self.base(x) + F.linear(F.linear(x, self.A), self.B) * self.scaling

    @torch.no_grad()
    def merge(self):
        """A plain nn.Linear with weight W + (alpha / rank) B A: the same outputs, no adapter."""
        w = self.base.weight
        merged = nn.Linear(self.in_features, self.out_features, bias=self.base.bias is not None, device=w.device,
                           dtype=w.dtype)
        merged.weight.copy_(w + self.scaling * (self.B @ self.A).to(w.dtype))
        if self.base.bias is not None:
            merged.bias.copy_(self.base.bias)
        return merged

    def extra_repr(self):
        return f"rank={self.rank}, alpha={self.alpha}"


def replace_linear_with_lora(model, rank=16, alpha=16):
    """Wrap every nn.Linear inside model (at any depth, in place) in a LoRALinear; returns model.

    The wrapped weights are frozen; other parameters (embeddings, LayerNorms) keep their requires_grad, so call
    model.requires_grad_(False) first to train the adapters alone.
    """
    for name, child in model.named_children():
        if isinstance(child, nn.Linear):
            setattr(model, name, LoRALinear(child, rank, alpha))
        elif not isinstance(child, LoRALinear):
            replace_linear_with_lora(child, rank, alpha)
    return model


def merge_lora(model):
    """Replace every LoRALinear inside model by its merged nn.Linear (in place); returns model."""
    for name, child in model.named_children():
        if isinstance(child, LoRALinear):
            setattr(model, name, child.merge())
        else:
            merge_lora(child)
    return model
