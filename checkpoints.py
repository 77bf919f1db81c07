"""Checkpoint files, read safely: our .pth files (checked against their config before anything is sized), the
published GPT-2 layout in safetensors files (a bounds-checked reader of our own, so nothing is unpickled) and Hugging
Face folders, classifiers, and resolving a script's --init to a model (no user runs this file).

    from checkpoints import init_model, load_classifier
    model, info = init_model("runs/pretrain/model.pth")       # or "scratch"-free paths, folders, "gpt2" ...
    model, ckpt = load_classifier("runs/cls/spam_classifier.pth")

OpenAI's weights are downloaded by load_gpt2.py, which init_model calls only when --init names them.
"""
import json
import math
import mmap
import os
import struct

import torch
import torch.nn as nn

from data import EOT_ID, JSON_MAX_BYTES
from files import atomic_write, check_input, json_depth, parse_json
from layers import add_lora, is_int8_state_dict, merge_lora, quantize_int8
from model import (GPT_CONFIG_124M, HEADS_FOR_WIDTH, MAX_SIZE, CheckpointError, GPTModel, check_config, empty_model,
                   infer_config, load_state, read_checkpoint)
from settings import UserError, few

PRETRAINED = {"gpt2": "124M", "gpt2-medium": "355M", "gpt2-large": "774M", "gpt2-xl": "1558M"}  # name -> size
INIT_HELP = "gpt2 | gpt2-medium | gpt2-large | gpt2-xl | scratch | PATH.pth | PATH.safetensors | FOLDER"

# ---------------------------------------------------------------------------------------------------------------
# safetensors: 8-byte little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets}}, then data
# ---------------------------------------------------------------------------------------------------------------

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
SAFETENSORS_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
MAX_HEADER = 100 * 2 ** 20  # bytes; GPT-2 XL's header is ~50 KB, so a bigger claim is a broken or hostile file


class SafetensorsFile:
    """A .safetensors file, memory-mapped after its header was checked against the file size.

    entries: name -> (dtype, shape, start, end), start/end in bytes from the start of the file.
    tensor(name) is a view into the mapping (no copy); release(name) gives its pages back to the OS, so a loader
    that copies tensor by tensor never holds the whole file in memory.
    """

    def __init__(self, path):
        self.path = path
        if not os.path.lexists(path):
            raise CheckpointError(f"no safetensors file at {path}")
        check_input(path, "the weights file")
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            if size < 8:
                raise CheckpointError(f"{path} is truncated ({size} bytes, shorter than the 8-byte header length)")
            (n,) = struct.unpack("<Q", f.read(8))
            if n > MAX_HEADER:
                raise CheckpointError(f"{path} claims a {n}-byte header (limit {MAX_HEADER}): not a safetensors "
                                      f"file, or corrupt")
            if 8 + n > size:
                raise CheckpointError(f"{path}: header length {n} runs past the end of the file ({size} bytes): "
                                      f"the file is truncated or not a safetensors file")
            raw = f.read(n)
        self.data_start = 8 + n
        header = _parse_header(raw, path)
        self.metadata = header.pop("__metadata__", None) or {}
        self.entries = {}
        spans = []
        data_len = size - self.data_start
        for name, info in header.items():
            dtype, shape, (begin, end) = _check_entry(name, info, path)
            if end > data_len:
                raise CheckpointError(f"{path}: tensor {name} ends at data byte {end} but the file holds only "
                                      f"{data_len}: the file is truncated or corrupt; delete it and download again")
            self.entries[name] = (dtype, shape, self.data_start + begin, self.data_start + end)
            spans.append((begin, end, name))
        spans.sort()
        for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
            if b1 < e0:
                raise CheckpointError(f"{path}: tensors {n0} [{b0}, {e0}) and {n1} [{b1}, {e1}) overlap: corrupt file")
        self._mm = None
        if size > self.data_start:
            with open(path, "rb") as f:  # copy-on-write mapping: writable views for torch, the file is never changed
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)

    def tensor(self, name):
        dtype, shape, start, end = self.entries[name]
        numel = math.prod(shape)
        if numel == 0:
            return torch.empty(shape, dtype=dtype)
        itemsize = torch.empty((), dtype=dtype).element_size()
        if start % itemsize:  # unaligned data: copy it into aligned memory
            raw = torch.frombuffer(self._mm, dtype=torch.uint8, count=end - start, offset=start)
            return raw.clone().view(dtype).reshape(shape)
        return torch.frombuffer(self._mm, dtype=dtype, count=numel, offset=start).reshape(shape)

    def release(self, name):
        """Drop this tensor's pages from our memory; reading it again refaults them from the file."""
        _, _, start, end = self.entries[name]
        if self._mm is None or end <= start or not hasattr(self._mm, "madvise"):
            return
        page = mmap.PAGESIZE
        lo = start // page * page
        hi = min(-(-end // page) * page, len(self._mm))
        self._mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


def _parse_header(raw, path):
    def no_duplicates(pairs):
        seen = {}
        for k, v in pairs:
            if k in seen:
                raise CheckpointError(f"{path}: the header names tensor {k} twice: corrupt file")
            seen[k] = v
        return seen

    try:
        text = raw.decode("utf-8")
        if json_depth(text) > 3:  # {name: {dtype, shape: [...], data_offsets: [...]}} is three deep
            raise CheckpointError(f"{path}: the header nests deeper than a safetensors header does: corrupt file")
        header = json.loads(text, object_pairs_hook=no_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: the header is not valid JSON ({str(e).splitlines()[0][:80]}): not a "
                              f"safetensors file, or corrupt; delete it and download it again") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the header is a JSON {type(header).__name__}, not an object")
    meta = header.get("__metadata__")
    if meta is not None and not isinstance(meta, dict):
        raise CheckpointError(f"{path}: __metadata__ must be a JSON object of strings")
    return header


def _check_entry(name, info, path):
    """-> (torch dtype, shape tuple, (begin, end)) after checking types and that the byte count fits the shape."""
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
        raise CheckpointError(f"{path}: header entry {name} lacks dtype, shape or data_offsets")
    dtype_name, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if dtype_name not in SAFETENSORS_DTYPES:
        raise CheckpointError(f"{path}: tensor {name} has dtype {dtype_name!r}, which this reader does not support "
                              f"(supported: {', '.join(SAFETENSORS_DTYPES)})")
    if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                            for d in shape)):
        raise CheckpointError(f"{path}: tensor {name} has shape {shape!r}, expected a list of sizes >= 0")
    if not (isinstance(offsets, list) and len(offsets) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)):
        raise CheckpointError(f"{path}: tensor {name} has data_offsets {offsets!r}, expected [begin, end]")
    begin, end = offsets
    if end < begin:
        raise CheckpointError(f"{path}: tensor {name} has data_offsets [{begin}, {end}] out of order (end < begin)")
    dtype = SAFETENSORS_DTYPES[dtype_name]
    want = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if end - begin != want:
        raise CheckpointError(f"{path}: tensor {name} ({dtype_name} {shape}) needs {want} bytes but its offsets "
                              f"span {end - begin}")
    return dtype, tuple(shape), (begin, end)


def read_safetensors(path):
    """name -> tensor for every tensor of a .safetensors file; the tensors are views into a memory map."""
    f = SafetensorsFile(path)
    return {name: f.tensor(name) for name in f.entries}


def write_safetensors(path, tensors, metadata=None):
    """Write {name: tensor} as a .safetensors file (temporary file, then rename: never half a file at path)."""
    header, offset = {}, 0
    for name, t in tensors.items():
        if t.dtype not in SAFETENSORS_NAMES:
            raise ValueError(f"cannot store {name} of dtype {t.dtype} in safetensors")
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": SAFETENSORS_NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)  # pad so the data starts 8-byte aligned

    def write(f):
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for t in tensors.values():
            if t.numel():  # one tensor at a time: a transposed view costs one copy of that tensor only
                f.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return atomic_write(path, write)


# ---------------------------------------------------------------------------------------------------------------
# Published GPT-2 names <-> ours
# ---------------------------------------------------------------------------------------------------------------

# (ours, published, transpose: the published Conv1D stores [in, out], our Linear [out, in],
#  part: which third (q, k, v) of the fused c_attn along its last dim, or None)
KEY_PAIRS = [
    ("tok_emb.weight", "wte.weight", False, None),
    ("pos_emb.weight", "wpe.weight", False, None),
    ("final_norm.scale", "ln_f.weight", False, None),
    ("final_norm.shift", "ln_f.bias", False, None),
]
BLOCK_KEY_PAIRS = [
    ("norm1.scale", "ln_1.weight", False, None),
    ("norm1.shift", "ln_1.bias", False, None),
    ("att.W_query.weight", "attn.c_attn.weight", True, 0),
    ("att.W_key.weight", "attn.c_attn.weight", True, 1),
    ("att.W_value.weight", "attn.c_attn.weight", True, 2),
    ("att.W_query.bias", "attn.c_attn.bias", False, 0),
    ("att.W_key.bias", "attn.c_attn.bias", False, 1),
    ("att.W_value.bias", "attn.c_attn.bias", False, 2),
    ("att.out_proj.weight", "attn.c_proj.weight", True, None),
    ("att.out_proj.bias", "attn.c_proj.bias", False, None),
    ("norm2.scale", "ln_2.weight", False, None),
    ("norm2.shift", "ln_2.bias", False, None),
    ("ff.layers.0.weight", "mlp.c_fc.weight", True, None),
    ("ff.layers.0.bias", "mlp.c_fc.bias", False, None),
    ("ff.layers.2.weight", "mlp.c_proj.weight", True, None),
    ("ff.layers.2.bias", "mlp.c_proj.bias", False, None),
]
LM_HEAD_PAIR = ("out_head.weight", "lm_head.weight", False, None)  # only when the head is not tied to wte
MASK_BUFFERS = ("attn.bias", "attn.masked_bias")  # the causal mask some files carry per layer; we build our own


def key_pairs(n_layers, tied=True):
    pairs = list(KEY_PAIRS)
    for i in range(n_layers):
        pairs += [(f"trf_blocks.{i}.{ours}", f"h.{i}.{theirs}", t, part) for ours, theirs, t, part in BLOCK_KEY_PAIRS]
    return pairs if tied else pairs + [LM_HEAD_PAIR]


def published_shapes(cfg, tied=True):
    """published name -> shape that a config implies."""
    d, V, C = cfg["emb_dim"], cfg["vocab_size"], cfg["context_length"]
    shapes = {"wte.weight": (V, d), "wpe.weight": (C, d), "ln_f.weight": (d,), "ln_f.bias": (d,)}
    per_layer = {"ln_1.weight": (d,), "ln_1.bias": (d,), "attn.c_attn.weight": (d, 3 * d), "attn.c_attn.bias": (3 * d,),
                 "attn.c_proj.weight": (d, d), "attn.c_proj.bias": (d,), "ln_2.weight": (d,), "ln_2.bias": (d,),
                 "mlp.c_fc.weight": (d, 4 * d), "mlp.c_fc.bias": (4 * d,), "mlp.c_proj.weight": (4 * d, d),
                 "mlp.c_proj.bias": (d,)}
    for i in range(cfg["n_layers"]):
        shapes.update({f"h.{i}.{k}": s for k, s in per_layer.items()})
    if not tied:
        shapes["lm_head.weight"] = (V, d)
    return shapes


def _published_view(src, transpose, part, d):
    """Our tensor's values out of a published one: take a third of the fused c_attn, undo the Conv1D layout."""
    if part is not None:
        src = src[..., part * d:(part + 1) * d]
    return src.t() if transpose else src


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------

def find_files(path):
    """-> (model.safetensors path, config.json path or None)"""
    if os.path.isdir(path):
        st = os.path.join(path, "model.safetensors")
        if not os.path.isfile(st):
            broken = " (only a broken link to one)" if os.path.islink(st) else ""
            raise CheckpointError(f"folder {path} holds no model.safetensors{broken}: pass the file, or a folder "
                                  f"with one")
        folder = path
    elif os.path.isfile(path):
        st, folder = path, os.path.dirname(path)
    else:
        raise CheckpointError(f"no model at {path}: pass a model.safetensors file or a folder holding one")
    cj = os.path.join(folder, "config.json")
    return st, (check_input(cj, "the model folder's file") if os.path.lexists(cj) else None)


def config_from_json(path, drop_rate=0.0):
    """Our config dict from a Hugging Face GPT-2 config.json, refusing variants our model does not compute."""
    hf = read_json(path)
    if hf.get("model_type", "gpt2") != "gpt2":
        raise CheckpointError(f"{path} describes a {hf['model_type']!r} model, not gpt2")
    if "n_positions" not in hf and "n_ctx" in hf:
        hf["n_positions"] = hf["n_ctx"]
    sizes = ("vocab_size", "n_embd", "n_layer", "n_head", "n_positions")
    wrong = [f"{k} {hf.get(k)!r}" for k in sizes if type(hf.get(k)) is not int or not 1 <= hf[k] <= MAX_SIZE]
    if wrong:
        raise CheckpointError(f"{path}: {', '.join(wrong)}: each of {', '.join(sizes)} must be a whole number from 1 "
                              f"to {MAX_SIZE:,}")
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if hf.get(key) is not None and (type(hf[key]) is not int or not 0 <= hf[key] < hf["vocab_size"]):
            raise CheckpointError(f"{path}: {key} {hf[key]!r} is not a token id (a whole number from 0 to "
                                  f"vocab_size - 1 = {hf['vocab_size'] - 1}): use the config.json that came with "
                                  f"these weights")
    ctx = hf["n_positions"]
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise CheckpointError(f"{path}: activation_function {act!r} is not GPT-2's tanh GELU (gelu_new), which "
                              f"model.py computes")
    eps = hf.get("layer_norm_epsilon", 1e-5)
    if type(eps) not in (int, float) or not math.isclose(eps, 1e-5, rel_tol=1e-6):
        raise CheckpointError(f"{path}: layer_norm_epsilon {eps!r} differs from model.py's 1e-5")
    if hf.get("n_inner") not in (None, 4 * hf["n_embd"]):
        raise CheckpointError(f"{path}: n_inner {hf['n_inner']!r} is not 4 * n_embd, which model.py assumes")
    if hf.get("scale_attn_by_inverse_layer_idx") or not hf.get("scale_attn_weights", True):
        raise CheckpointError(f"{path}: attention scaling differs from GPT-2's 1/sqrt(head_dim)")
    if hf["n_embd"] % hf["n_head"]:
        raise CheckpointError(f"{path}: n_embd {hf['n_embd']} is not divisible by n_head {hf['n_head']}")
    if type(hf.get("tie_word_embeddings", True)) is not bool:
        raise CheckpointError(f"{path}: tie_word_embeddings must be true or false, got {hf['tie_word_embeddings']!r}")
    return {"vocab_size": hf["vocab_size"], "context_length": ctx, "emb_dim": hf["n_embd"], "n_heads": hf["n_head"],
            "n_layers": hf["n_layer"], "drop_rate": drop_rate, "qkv_bias": True,
            "tie_weights": bool(hf.get("tie_word_embeddings", True))}


def read_json(path, what="a JSON object"):
    """The JSON object in path (a regular readable file of at most JSON_MAX_BYTES), or a CheckpointError."""
    check_input(path, "the model folder's file")
    try:
        if os.path.getsize(path) > JSON_MAX_BYTES:
            raise CheckpointError(f"{path} is over {JSON_MAX_BYTES:,} bytes, too big for a GPT-2 config: use the "
                                  f"file that came with these weights")
        with open(path, encoding="utf-8") as f:
            obj = parse_json(f.read(), path)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path} as JSON ({str(e).splitlines()[0][:80]})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} is not {what}")
    return obj


def _config_from_shapes(entries, n_heads, drop_rate, path):
    for k in ("wte.weight", "wpe.weight"):
        if k not in entries or len(entries[k][1]) != 2:
            raise CheckpointError(f"{path} has no 2-D {k} (or transformer.{k}): not a GPT-2 checkpoint")
    V, d = entries["wte.weight"][1]
    numbers = {int(k.split(".")[1]) for k in entries if k.startswith("h.") and k.split(".")[1].isdigit()}
    layers = len(numbers)
    if numbers != set(range(layers)):
        raise CheckpointError(f"{path}: its layers h.N are not numbered 0 to {layers - 1}: a damaged or foreign file")
    heads = n_heads or HEADS_FOR_WIDTH.get(d)
    if not heads:
        raise CheckpointError(f"{path} has no config.json and width {d} is not a standard GPT-2 size: pass "
                              f"--n_heads")
    if d % heads:
        raise CheckpointError(f"{path}: width {d} is not divisible by n_heads {heads}")
    return {"vocab_size": V, "context_length": entries["wpe.weight"][1][0], "emb_dim": d, "n_heads": heads,
            "n_layers": layers, "drop_rate": drop_rate, "qkv_bias": True, "tie_weights": True}


def load_hf_checkpoint(path, drop_rate=0.0, n_heads=None):
    """GPTModel from a published-layout GPT-2 checkpoint: a model.safetensors file, or a folder holding one (and
    config.json, else the config comes from the shapes and n_heads or the standard sizes).

    The model is built on the meta device and each tensor copied in from the memory-mapped file, whose pages are
    released as we go: peak memory is the model plus one tensor. A classifier folder is refused: see
    load_hf_classifier.
    """
    model, _ = _load_published(path, drop_rate, n_heads)
    return model


def load_hf_classifier(path, drop_rate=0.0):
    """A GPT2ForSequenceClassification folder (export_hf of a classifier, or one trained with transformers) ->
    (our classifier, {"class_names", "max_length", "pad_id"}), as finetune_cls.load_classifier gives.

    Its score layer has no bias, so out_head's bias is zero here; an exported classifier's bias was folded into ln_f
    (fold_head_bias), so the logits are those of the classifier that was exported.
    """
    model, score = _load_published(path, drop_rate, classifier=True)
    _, cj_path = find_files(path)
    hf = read_json(cj_path)
    C, d = score.shape
    id2label = hf.get("id2label") or {}
    if C < 2:
        raise CheckpointError(f"{cj_path}: score.weight has {C} row(s), a classifier needs at least 2 classes")
    if not isinstance(id2label, dict) or set(id2label) != {str(i) for i in range(C)}:
        raise CheckpointError(f"{cj_path}: id2label must map each class 0..{C - 1} to its name (score.weight has "
                              f"{C} rows)")
    model.out_head = nn.Linear(d, C)  # unties it from tok_emb
    with torch.no_grad():
        model.out_head.weight.copy_(score)
        model.out_head.bias.zero_()
    model.cfg.update(num_classes=C, tie_weights=False)
    context = model.cfg["context_length"]
    tok_path = os.path.join(os.path.dirname(cj_path), "tokenizer_config.json")
    tok_max = read_json(tok_path) if os.path.lexists(tok_path) else {}
    max_length = tok_max.get("model_max_length")
    if type(max_length) is not int or not 0 < max_length <= context:  # transformers writes 10^30 for "no limit"
        max_length = context
    pad_id = hf.get("pad_token_id")  # range-checked by config_from_json
    return model, {"class_names": [str(id2label[str(i)]) for i in range(C)], "max_length": max_length,
                   "pad_id": pad_id if type(pad_id) is int else EOT_ID}


def _load_published(path, drop_rate=0.0, n_heads=None, classifier=False):
    """-> (GPTModel, the score head (num_labels, emb_dim) of a classifier file, else None)."""
    st_path, cj_path = find_files(path)
    f = SafetensorsFile(st_path)
    stored = {}  # published name without "transformer." -> name in the file
    for name in f.entries:
        canon = name[len("transformer."):] if name.startswith("transformer.") else name
        if canon in stored:
            raise CheckpointError(f"{st_path} holds both {stored[canon]} and {name}")
        stored[canon] = name
    entries = {canon: f.entries[name] for canon, name in stored.items()}
    if "score.weight" in entries and not classifier:
        raise CheckpointError(f"{path} is a classifier (GPT2ForSequenceClassification): convert it with `python "
                              f"load_gpt2.py --model {path} --out cls.pth` (load_hf_classifier), or pass a language "
                              f"model")
    if classifier and ("score.weight" not in entries or not cj_path):
        raise CheckpointError(f"{path} is not a GPT2ForSequenceClassification folder (it needs score.weight and "
                              f"config.json): pass the folder export_hf wrote for a classifier")

    if cj_path:
        cfg = config_from_json(cj_path, drop_rate)
        if n_heads and n_heads != cfg["n_heads"]:
            raise CheckpointError(f"n_heads {n_heads} contradicts {cj_path} (n_head {cfg['n_heads']})")
        present = _config_from_shapes(entries, cfg["n_heads"], drop_rate, st_path)  # before anything is sized by cfg
        clash = [f"{k} {cfg[k]} (the tensors: {present[k]})" for k in ("vocab_size", "context_length", "emb_dim",
                                                                         "n_layers") if cfg[k] != present[k]]
        if clash:
            raise CheckpointError(f"{cj_path} contradicts {st_path}: {', '.join(clash)}: use the config.json that "
                                  f"came with these weights")
        source = f"{cj_path}"
    else:
        cfg = _config_from_shapes(entries, n_heads, drop_rate, st_path)
        source = "the shapes of wte/wpe"
    if not cj_path and "lm_head.weight" in entries:
        cfg["tie_weights"] = _same_tensor(f, stored["wte.weight"], stored["lm_head.weight"])
    if classifier:
        cfg["tie_weights"] = True  # no lm_head: the body is loaded as a tied language model, then the head replaced

    tied = cfg["tie_weights"]
    want = published_shapes(cfg, tied)
    if classifier:
        want["score.weight"] = (*entries["score.weight"][1][:1], cfg["emb_dim"])  # (num_labels, emb_dim)
    optional = {f"h.{i}.{b}" for i in range(cfg["n_layers"]) for b in MASK_BUFFERS} | {"lm_head.weight"}
    missing = set(want) - set(entries)
    unexpected = set(entries) - set(want) - optional
    if missing or unexpected:
        parts = ([f"missing {few(sorted(missing))}"] if missing else []) + \
                ([f"unexpected {few(sorted(unexpected))}"] if unexpected else [])
        raise CheckpointError(f"{st_path} does not fit a GPT-2 with n_layers {cfg['n_layers']}: {'; '.join(parts)}")
    wrong = [f"{k} is {list(entries[k][1])}, expected {list(s)}" for k, s in want.items() if entries[k][1] != s]
    if wrong:
        raise CheckpointError(f"{st_path}: shapes contradict the config from {source}: {'; '.join(wrong[:3])}"
                              + (f" (+{len(wrong) - 3} more)" if len(wrong) > 3 else ""))
    not_float = [k for k in want if not entries[k][0].is_floating_point]
    if not_float:
        raise CheckpointError(f"{st_path}: weights {few(sorted(not_float))} are not floating point")

    with torch.device("meta"):
        model = GPTModel(cfg)  # no memory and no random init: every tensor comes from the file
    model = model.to_empty(device="cpu")
    if tied:
        model.out_head.weight = model.tok_emb.weight  # to_empty gives each name its own tensor; tie them again
    own = model.state_dict()
    uses = {}  # published name -> [(ours, transpose, part)], visited in file order so the reads are sequential
    for ours, theirs, transpose, part in key_pairs(cfg["n_layers"], tied):
        uses.setdefault(theirs, []).append((ours, transpose, part))
    filled = set()
    with torch.no_grad():
        for theirs in sorted(uses, key=lambda k: entries[k][2]):
            src = f.tensor(stored[theirs])
            for ours, transpose, part in uses[theirs]:
                own[ours].copy_(_published_view(src, transpose, part, cfg["emb_dim"]))
                filled.add(ours)
            del src
            f.release(stored[theirs])
    assert filled | ({"out_head.weight"} if tied else set()) == set(own), set(own) - filled
    score = f.tensor(stored["score.weight"]).float().clone() if classifier else None
    return model, score


def _same_tensor(f, a, b):
    same = f.entries[a][1] == f.entries[b][1] and torch.equal(f.tensor(a), f.tensor(b))
    f.release(a)
    f.release(b)
    return same




# ---------------------------------------------------------------------------------------------------------------
# Resolving --init: a scratch model, a .pth, a safetensors folder or OpenAI's weights
# ---------------------------------------------------------------------------------------------------------------

def init_model(init, cfg_overrides=None, models_dir="models", device="cpu", int8_ok=False, **download_kw):
    """The model a script starts from, for --init: a published name (downloaded), `scratch` (GPT_CONFIG_124M plus
    cfg_overrides, random weights), a checkpoint file (ours, or a bare state_dict), or a model.safetensors / a
    folder holding one.

    For pretrained weights, cfg_overrides may change drop_rate; other keys must agree with the weights. An int8
    .pth (quantize_int8) is refused unless int8_ok: its weights are for inference, not for training further.
    Returns (model, info) with info = {"init", "path", "kind", "checkpoint"} (checkpoint: the .pth dict, or None).
    """
    overrides = dict(cfg_overrides or {})
    info = {"init": init, "path": None, "kind": None, "checkpoint": None}
    if init == "scratch":
        model = GPTModel({**GPT_CONFIG_124M, **overrides})
    elif init in PRETRAINED:
        from load_gpt2 import load_gpt2  # the downloader, needed only for OpenAI's weights
        model = load_gpt2(init, models_dir, overrides.pop("drop_rate", 0.0), **download_kw)
        info.update(path=os.path.join(models_dir, init), kind="pretrained")
        _check_overrides(model.cfg, overrides, init)
    elif os.path.isdir(init) or init.endswith(".safetensors"):
        model = load_hf_checkpoint(init, overrides.pop("drop_rate", 0.0), overrides.pop("n_heads", None))
        info.update(path=init, kind="pretrained")
        _check_overrides(model.cfg, overrides, init)
    elif os.path.isfile(init):
        model, ckpt = load_pth(init, overrides, int8_ok=int8_ok)
        info.update(path=init, kind=ckpt.get("kind"), checkpoint=ckpt)
    elif init.endswith((".pth", ".pt", ".bin", ".ckpt")):
        raise UserError(f"no checkpoint at {init}: check the path, or pass --init gpt2 or scratch")
    else:
        raise UserError(f"unknown --init {init!r}: use {INIT_HELP}")
    return model.to(device), info


def load_pth(path, cfg_overrides=None, int8_ok=False, allow_classifier=False):
    """A language model (in eval mode) from one of our .pth files or a bare state_dict -> (model, checkpoint).

    Every check runs before any tensor is allocated: another project's checkpoint is named, the config is checked
    against the tensors, and a classifier (unless allow_classifier) or an int8 model (unless int8_ok) is refused.
    """
    if os.path.lexists(path):
        check_input(path, "the checkpoint")  # a file this user may not read is one line, not a traceback
    ckpt = read_checkpoint(path, check=lambda raw: refuse_foreign(raw, path))
    if ckpt.get("kind") == "reward":
        raise UserError(f"{path} is a reward model (finetune_chat.py --method rm), which scores answers rather than "
                        f"writing them: use a language model's .pth, or pass it as --reward_model")
    heads = (cfg_overrides or {}).get("n_heads")
    if heads and isinstance(ckpt["config"], dict) and ckpt["config"].get("n_heads") != heads:
        raise UserError(f"{path} has its own config with n_heads {ckpt['config'].get('n_heads')}: drop --n_heads "
                        f"(it is only for bare state_dicts)")
    if ckpt.get("kind") == "cls" and not allow_classifier:
        raise UserError(f"{path} is a classifier (finetune_cls.py): use a language model's .pth, e.g. "
                        f"runs/pretrain/model.pth, or finetune_cls.py --predict / --evaluate")
    int8 = is_int8_state_dict(ckpt["model"])
    if int8 and not int8_ok:
        raise UserError(f"{path} holds int8 weights (--quantize int8), which cannot be trained: start from the "
                        f"float checkpoint it was made from")
    model = empty_model(checkpoint_config(ckpt, path, cfg_overrides))
    if int8:
        quantize_int8(model, quantize=False)  # written from a quantize_int8 model: the same int8 layers to load into
    load_state(model, ckpt["model"], path)
    return model.eval(), ckpt


def checkpoint_config(ckpt, source, overrides=None):
    """The model config of a read_checkpoint() dict, type- and range-checked and checked against its tensors'
    shapes before anything is allocated (a config of 10^9 layers is refused, not built)."""
    overrides = overrides or {}
    if ckpt["config"] is None:
        cfg = {**infer_config(ckpt["model"], overrides.get("n_heads")), **overrides}
    elif not isinstance(ckpt["config"], dict):
        raise CheckpointError(f"{source}: its config is a {type(ckpt['config']).__name__}, not a dict")
    else:
        cfg = {**ckpt["config"], **overrides}
    try:
        check_config(cfg)
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from None
    shapes = infer_config(ckpt["model"], n_heads=1)  # one head divides any width: only the shapes matter here
    wrong = [f"{k} {cfg[k]} (tensors: {shapes[k]})" for k in ("vocab_size", "context_length", "emb_dim", "n_layers")
             if cfg[k] != shapes[k]]
    if wrong:
        raise CheckpointError(f"{source}: its config contradicts its tensors: {', '.join(wrong)}")
    return cfg


def refuse_foreign(raw, path):
    """Name a checkpoint of another project (nanoGPT, PyTorch Lightning, Hugging Face's .bin) and say what to do."""
    if not isinstance(raw, dict):
        return
    sd = raw.get("model") if isinstance(raw.get("model"), dict) else raw
    keys = [str(k) for k in sd]
    if "model_args" in raw or "iter_num" in raw:
        what = ("a nanoGPT checkpoint (model, model_args, iter_num): export it to a Hugging Face folder "
                "(model.safetensors + config.json) and pass that folder as --init")
    elif "pytorch-lightning_version" in raw or "state_dict" in raw and "model" not in raw:
        what = ("a PyTorch Lightning checkpoint: save the GPTModel's own state_dict with "
                "torch.save(model.state_dict(), 'model.pth') and pass that file")
    elif any(k.startswith(("transformer.h.", "h.0.", "wte.")) for k in keys):
        what = ("GPT-2 weights in Hugging Face's layout (pytorch_model.bin): save them as safetensors with "
                "model.save_pretrained(folder) and pass the folder as --init")
    else:
        return
    raise UserError(f"{path} is {what}")


def _check_overrides(cfg, overrides, source):
    clash = [f"{k}={v} (the weights have {cfg.get(k)})" for k, v in overrides.items() if cfg.get(k) != v]
    if clash:
        raise UserError(f"{source} fixes {', '.join(clash)}: drop those settings, or use --init scratch")


def load_classifier(path, quantize="none", kind="cls"):
    """A finetune_cls.py classifier .pth -> (model in eval mode, checkpoint dict): GPT-2 with its Linear(emb_dim,
    num_classes) head and any LoRA adapters as saved. quantize="int8" merges the adapters and stores every Linear
    as int8 (layers.quantize_int8); a checkpoint written with --save_int8 comes back int8 whatever quantize says.
    kind="reward" loads finetune_chat.py's reward model (--method rm), a head with one output, the same way."""
    if not os.path.exists(path):
        raise UserError(f"no classifier at {path}: train one with `python finetune_cls.py`, or pass --checkpoint")
    check_input(path, "the checkpoint")
    ckpt = read_checkpoint(path, check=lambda raw: refuse_foreign(raw, path))
    names, sd = ckpt.get("class_names"), ckpt["model"]
    if ckpt.get("kind") != kind or not isinstance(names, (list, tuple)) or not names \
            or not all(isinstance(n, str) for n in names):
        what = f"a {ckpt['kind']!r} checkpoint" if ckpt.get("kind") else "a bare state_dict"
        made_by = ("`python finetune_chat.py --method rm`" if kind == "reward" else "`python finetune_cls.py`")
        raise UserError(f"{path} is {what}, not a {'reward model' if kind == 'reward' else 'classifier'}: train one "
                        f"with {made_by} and pass the .pth it writes")
    cfg = checkpoint_config(ckpt, path)
    check_classifier_fields(ckpt, cfg, path)
    with torch.device("meta"):  # no memory, no random init: every tensor comes from the file
        model = GPTModel(cfg)
        model.out_head = nn.Linear(cfg["emb_dim"], len(names), bias="out_head.bias" in sd)
        model.cfg["num_classes"] = len(names)
        if ckpt.get("lora"):
            add_lora(model.trf_blocks, ckpt["lora"]["rank"], ckpt["lora"]["alpha"])
        if is_int8_state_dict(sd):
            quantize_int8(model, quantize=False)  # written by --save_int8: the same int8 layers, to load into
    model = model.to_empty(device="cpu")
    load_state(model, sd, path)
    if quantize == "int8":
        quantize_int8(merge_lora(model))  # only swaps layers that are still float
    return model.eval(), ckpt


def check_classifier_fields(ckpt, cfg, path):
    """Refuse a classifier checkpoint whose own numbers are out of range (an edited or foreign file): max_length
    (None, or 1..context_length), pad_id (a token id), and the LoRA rank (its adapters') and alpha (finite)."""
    max_length, pad_id, lora = ckpt.get("max_length"), ckpt.get("pad_id", EOT_ID), ckpt.get("lora")
    fix = "a damaged or edited checkpoint: use the .pth that finetune_cls.py wrote"
    if max_length is not None and (type(max_length) is not int or not 1 <= max_length <= cfg["context_length"]):
        raise CheckpointError(f"{path}: max_length {max_length!r} is not a whole number from 1 to the model's "
                              f"context_length {cfg['context_length']}: {fix}")
    if type(pad_id) is not int or not 0 <= pad_id < cfg["vocab_size"]:
        raise CheckpointError(f"{path}: pad_id {pad_id!r} is not a token id (0 to {cfg['vocab_size'] - 1}): {fix}")
    if not lora:
        return
    ranks = {tuple(v.shape)[0] for k, v in ckpt["model"].items() if k.endswith(".A") and v.dim() == 2}
    if not (isinstance(lora, dict) and type(lora.get("rank")) is int and ranks == {lora["rank"]}
            and type(lora.get("alpha")) in (int, float) and math.isfinite(lora["alpha"])):
        raise CheckpointError(f"{path}: its lora settings {str(lora)[:80]} are not the rank of its adapters "
                              f"({few(sorted(ranks)) or 'none'}) and a finite alpha: {fix}")
