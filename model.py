"""GPT-2 in plain PyTorch: the model, a KV cache, sampling and generation, and a small load/save of .pth files.
It imports only torch and the standard library, so it can be copied alone into another project:

    from model import GPTModel, MODEL_CONFIGS, generate
    out = generate(GPTModel(MODEL_CONFIGS["gpt2"]), idx, max_new_tokens=20, temperature=0.8, top_k=50)

Names follow the book *Build a Large Language Model (From Scratch)* (tok_emb, pos_emb, trf_blocks, att.W_query,
ff.layers, norm1.scale, final_norm, out_head, ...), so its checkpoints load unchanged.
"""
import math
import os
import zipfile

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
MAX_SIZE = 1 << 24  # the most any size in a config may be (a bigger one is a damaged or hostile file)


class CheckpointError(ValueError):
    """A checkpoint (or other model file) that is missing, unreadable, or does not fit the model."""


def check_config(cfg):
    """Raise ValueError unless cfg has every key of GPT_CONFIG_124M with a value of the right type and range."""
    missing = [k for k in GPT_CONFIG_124M if k not in cfg]
    if missing:
        raise ValueError(f"model config lacks {missing}; start from a copy of GPT_CONFIG_124M")
    for k in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers"):
        if type(cfg[k]) is not int or not 1 <= cfg[k] <= MAX_SIZE:
            raise ValueError(f"model config {k} must be a whole number from 1 to {MAX_SIZE:,}, got {cfg[k]!r}")
    if cfg["emb_dim"] % cfg["n_heads"]:
        raise ValueError(f"emb_dim {cfg['emb_dim']} must be divisible by n_heads {cfg['n_heads']}")
    if type(cfg["drop_rate"]) not in (int, float) or not 0 <= cfg["drop_rate"] < 1:
        raise ValueError(f"model config drop_rate must be a number in [0, 1), got {cfg['drop_rate']!r}")
    if {type(cfg["qkv_bias"]), type(cfg.get("tie_weights", False))} != {bool}:
        raise ValueError("model config qkv_bias and tie_weights must be true or false")


# --- Building blocks --------------------------------------------------------------------------------------------------

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
    """Causal multi-head self-attention, by two paths that give the same numbers: fused=True (default) calls
    scaled_dot_product_attention's flash or memory-efficient kernels; fused=False spells every step out as the book."""

    def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False):
        super().__init__()
        assert d_out % num_heads == 0, "d_out must be divisible by num_heads"
        self.d_out, self.num_heads, self.head_dim = d_out, num_heads, d_out // num_heads
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)
        self.dropout = nn.Dropout(dropout)
        self.fused = True
        # the book saves its causal mask as a buffer `mask`; ours is built on the fly, so a loaded one is dropped
        self.register_load_state_dict_pre_hook(_drop_book_mask)

    def forward(self, x, layer_cache=None):
        B, T, _ = x.shape
        # project and split into heads: (B, T, d_out) -> (B, n_heads, T, head_dim)
        q = self.W_query(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.W_key(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.W_value(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        if layer_cache is not None:
            k, v = layer_cache.append(k, v)  # (B, n_heads, past + T, head_dim)
        ctx = self._fused_attention(q, k, v) if self.fused else self._manual_attention(q, k, v)
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
        return x + self.drop_shortcut(self.ff(self.norm2(x)))


class GPTModel(nn.Module):
    """GPT-2: token + position embeddings, n_layers transformer blocks, final LayerNorm, linear head to logits."""

    def __init__(self, cfg):
        super().__init__()
        check_config(cfg)
        self.cfg = dict(cfg)
        self.tok_emb = nn.Embedding(cfg["vocab_size"], cfg["emb_dim"])
        self.pos_emb = nn.Embedding(cfg["context_length"], cfg["emb_dim"])
        self.drop_emb = nn.Dropout(cfg["drop_rate"])
        self.trf_blocks = nn.Sequential(*[TransformerBlock(cfg) for _ in range(cfg["n_layers"])])
        self.final_norm = LayerNorm(cfg["emb_dim"])
        self.out_head = nn.Linear(cfg["emb_dim"], cfg["vocab_size"], bias=False)
        if cfg.get("tie_weights"):
            self.out_head.weight = self.tok_emb.weight  # GPT-2 shares the output layer with the token embedding
            # both at std 0.02 as GPT-2: at N(0, 1) the logits start sqrt(emb_dim) wide and positions drown tokens
            nn.init.normal_(self.tok_emb.weight, std=0.02)
            nn.init.normal_(self.pos_emb.weight, std=0.02)

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


def count_parameters(model, trainable_only=False):
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# --- KV cache and generation ------------------------------------------------------------------------------------------

class _LayerCache:
    """Keys and values of one attention layer, preallocated for max_len positions."""

    def __init__(self, parent, shape, device, dtype):
        self.parent = parent
        self.k, self.v = (torch.empty(shape, device=device, dtype=dtype) for _ in range(2))  # (B, heads, len, hd)

    def append(self, k, v):
        start, end = self.parent.pos, self.parent.pos + k.shape[-2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class KVCache:
    """Keys and values of every layer for the tokens seen so far, so each new token costs one position of work;
    `ids` holds those tokens, which lets generate() reuse the longest prefix a new prompt shares with them."""

    def __init__(self, model, batch_size=1, max_len=None, dtype=None):
        cfg = model.cfg
        self.max_len = max_len or cfg["context_length"]
        param = model.pos_emb.weight  # float even when the Linear layers hold int8 weights (quantize_int8)
        shape = (batch_size, cfg["n_heads"], self.max_len, cfg["emb_dim"] // cfg["n_heads"])  # per layer, k and v
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
    """logits (B, vocab) -> next ids (B, 1). temperature 0 = greedy; top_k/top_p None or 0 = off; repetition_penalty
    > 1 makes the tokens in prev_ids (B, T) less likely (apply_repetition_penalty), 1 = off."""
    if not (temperature >= 0 and (top_p is None or 0 < top_p <= 1) and (top_k is None or top_k >= 0)):
        raise ValueError(f"need temperature >= 0, top_p in (0, 1], top_k >= 0; got {temperature}, {top_p}, {top_k}")
    logits = logits.float()
    if repetition_penalty != 1.0 and prev_ids is not None:
        logits = apply_repetition_penalty(logits, prev_ids, repetition_penalty)
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    # the largest logit shifted to 0 first (softmax is unchanged), so no temperature can overflow to inf - inf
    logits = (logits - logits.max(dim=-1, keepdim=True).values) / max(temperature, torch.finfo(logits.dtype).tiny)
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens ranked above it already hold top_p of the mass (the first always stays)
        drop = probs.cumsum(dim=-1) - probs >= top_p
        drop[:, 0] = False
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


def apply_repetition_penalty(logits, prev_ids, penalty):
    """Make every token in prev_ids (B, T) less likely (the CTRL paper's rule): its logit is divided by penalty when
    positive and multiplied by it when negative. Returns new logits (B, vocab)."""
    if not penalty > 0:
        raise ValueError(f"repetition_penalty must be > 0 (1 = off), got {penalty}")
    seen = logits.gather(-1, prev_ids)
    limit = torch.finfo(seen.dtype).max  # an extreme penalty saturates instead of reaching inf
    seen = torch.where(seen > 0, seen / penalty, seen * penalty).clamp(-limit, limit)
    return logits.scatter(-1, prev_ids, seen)


@torch.no_grad()
def generate_stream(model, idx, max_new_tokens, context_size=None, temperature=0.0, top_k=None, top_p=None,
                    eos_id=None, kv_cache=None, use_cache=True, generator=None, stop_ids=None, repetition_penalty=1.0):
    """Yield next-token ids (B, 1) one step at a time; the arguments are those of generate(). Each step sees the last
    context_size tokens: while the sequence fits, the KV cache makes a step cost one position; once the window slides
    every position moves, so it is recomputed. Stops once every row has produced eos_id (or one of stop_ids)."""
    context_size = min(context_size or model.cfg["context_length"], model.cfg["context_length"])
    was_training = model.training
    model.eval()
    stops = torch.tensor(sorted(set(stop_ids or ()) | ({eos_id} if eos_id is not None else set())),
                         dtype=torch.long, device=idx.device)
    finished = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
    cache = (kv_cache if kv_cache is not None else KVCache(model, idx.shape[0], context_size)) if use_cache else None
    try:
        for _ in range(max_new_tokens):
            window = idx[:, -context_size:]
            cached = cache is not None and window.shape[1] <= cache.max_len
            keep = 0
            if cached and window.shape[1] == idx.shape[1]:  # the window has not slid: reuse the shared prefix
                keep = min(cache.shared_prefix(window), window.shape[1] - 1)  # always run at least the last token
            if cached:
                cache.truncate(keep)  # once the window slides every position moves: nothing cached stays valid
            logits = model(window[:, keep:], kv_cache=cache if cached else None, last_only=True)
            next_id = sample_next_token(logits[:, -1], temperature, top_k, top_p, generator, prev_ids=idx,
                                        repetition_penalty=repetition_penalty)
            idx = torch.cat([idx, next_id], dim=1)
            yield next_id
            finished |= torch.isin(next_id[:, 0], stops)
            if len(stops) and bool(finished.all()):
                break
    finally:
        model.train(was_training)


def generate(model, idx, max_new_tokens, context_size=None, temperature=0.0, top_k=None, top_p=None, eos_id=None,
             use_cache=True, generator=None, repetition_penalty=1.0):
    """Extend idx (B, T) by up to max_new_tokens sampled tokens -> (B, T + n). temperature 0 = greedy; top_k keeps the
    k most likely tokens; top_p the smallest set holding that much probability (nucleus); a prompt longer than
    context_size is cropped from the left; repetition_penalty > 1 discourages tokens already in the text."""
    new = list(generate_stream(model, idx, max_new_tokens, context_size, temperature, top_k, top_p, eos_id,
                               use_cache=use_cache, generator=generator, repetition_penalty=repetition_penalty))
    return torch.cat([idx, *new], dim=1) if new else idx


# --- Checkpoints: {"model": state_dict, "config": dict, "kind": str, ...}, or a bare state_dict as the book saves -----

def clean_state_dict(state_dict):
    """Strip the prefixes torch.compile (`_orig_mod.`) and DDP (`module.`) put in front of parameter names."""
    out = {}
    for k, v in state_dict.items():
        for prefix in ("_orig_mod.", "module."):
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k.replace("._orig_mod.", ".")] = v
    return out


def checkpoint_dict(model, kind="pretrain", **extra):
    return {"model": clean_state_dict(model.state_dict()), "config": dict(model.cfg), "kind": kind, **extra}


def save_checkpoint(path, model, kind="pretrain", **extra):
    """Write {model, config, kind, **extra} to path through a temporary file under a name nobody can predict (so never
    half a file, and never through a link planted beside path); returns path."""
    tmp = f"{path}.{os.getpid()}.{os.urandom(8).hex()}.tmp"
    with open(tmp, "xb") as f:  # a file object: the records are named archive/..., not after the temporary name
        torch.save(checkpoint_dict(model, kind, **extra), f)
    os.replace(tmp, path)
    return path


def read_checkpoint(path, check=None, verify=True):
    """Load a .pth without unpickling code (weights_only=True), tensors memory-mapped -> dict; a bare state_dict is
    {"model": sd, "config": None, "kind": None}. check(loaded) may refuse it; verify=False skips the checksums."""
    if not os.path.isfile(path):  # nor a folder, nor a FIFO (a read would block); the scripts check readability first
        raise CheckpointError(f"no checkpoint at {path}" if not os.path.exists(path) else f"{path} is not a file")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): the save was interrupted; delete it and rerun")
    try:  # torch.load does not check each record's CRC-32: a damaged byte would load as a wrong weight
        with zipfile.ZipFile(path) as z:
            damaged = verify and z.testzip()  # reads the whole file: once per load, not for a peek
    except (zipfile.BadZipFile, OSError):  # not a zip (the old pickle format) or truncated: torch.load tells
        damaged = None
    if damaged:
        raise CheckpointError(f"cannot read {path}: it is damaged ({damaged} fails its checksum); save it again")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # pickle refusals, truncated zips, files of other kinds
        with open(path, "rb") as f:
            magic = f.read(2)
        why = ("holds Python objects that a safe load refuses to run" if "weights_only" in str(e) else
               "is damaged or truncated" if magic in (b"PK", b"\x80\x02") else "is not a PyTorch checkpoint")
        raise CheckpointError(f"cannot read {path}: it {why} ({type(e).__name__}); use a .pth written by torch.save "
                              f"of tensors and plain values") from None
    if check is not None:
        check(ckpt)
    if isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict):
        return {"config": None, "kind": None, **ckpt}
    if isinstance(ckpt, dict) and ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return {"model": ckpt, "config": None, "kind": None}
    raise CheckpointError(f"{path} is neither one of our checkpoints nor a state_dict")


def infer_config(state_dict, n_heads=None):
    """A config for a bare state_dict, read off its tensors' shapes (drop_rate 0). n_heads cannot be read off
    shapes: it comes from the argument or from the standard GPT-2 sizes."""
    sd = clean_state_dict(state_dict)
    if getattr(sd.get("tok_emb.weight"), "dim", lambda: 0)() != 2 or "pos_emb.weight" not in sd:
        raise CheckpointError("the state_dict has no 2-D tok_emb.weight and pos_emb.weight: not a GPTModel")
    vocab, emb = sd["tok_emb.weight"].shape
    heads = n_heads or HEADS_FOR_WIDTH.get(emb)
    if heads is None or emb % heads:
        raise CheckpointError(f"n_heads {heads} does not divide emb_dim {emb}: pick one that does" if heads else
                              f"cannot tell n_heads for emb_dim {emb} from a bare state_dict: pass n_heads "
                              f"(generate.py --n_heads)")
    return {"vocab_size": vocab, "context_length": sd["pos_emb.weight"].shape[0], "emb_dim": emb, "n_heads": heads,
            "n_layers": len({k.split(".")[1] for k in sd if k.startswith("trf_blocks.")}), "drop_rate": 0.0,
            "qkv_bias": "trf_blocks.0.att.W_query.bias" in sd, "tie_weights": False}


def empty_model(cfg, device="cpu"):
    """A GPTModel with uninitialized weights (built on the meta device: no memory, no random init), to load into."""
    with torch.device("meta"):
        model = GPTModel(cfg)
    model = model.to_empty(device=device)
    if cfg.get("tie_weights"):
        model.out_head.weight = model.tok_emb.weight  # to_empty gave each its own storage
    return model


def load_state(model, state_dict, source="checkpoint"):
    """load_state_dict(strict=True) with an error that names the keys and shapes that do not fit."""
    sd = {k: v for k, v in clean_state_dict(state_dict).items() if not k.endswith("att.mask")}
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    wrong = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own
             if k in sd and sd[k].shape != own[k].shape]
    parts = [f"{what} {', '.join(names[:4])}" + (f" (+{len(names) - 4} more)" if len(names) > 4 else "")
             for what, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if names]
    if parts:
        raise CheckpointError(f"{source} does not fit the model: {'; '.join(parts)}")
    model.load_state_dict(sd, strict=True)
    return model


def load_model(path, device="cpu", cfg_overrides=None):
    """A GPTModel in eval mode from a .pth (ours, or a bare state_dict) -> (model, checkpoint dict).
    Call model.train() to train it further."""
    ckpt, overrides = read_checkpoint(path), cfg_overrides or {}
    cfg = {**(ckpt["config"] or infer_config(ckpt["model"], overrides.get("n_heads"))), **overrides}
    model = empty_model(cfg)
    load_state(model, ckpt["model"], path)
    return model.to(device).eval(), ckpt
