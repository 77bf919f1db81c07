"""OpenAI's GPT-2 weights (124M to 1558M): downloaded from the hub, verified, and read from the published
safetensors files by checkpoints.py's bounds-checked reader (nothing downloaded is ever unpickled); and export of our
checkpoints back to that layout: language, chat and classifier models, as a folder transformers loads with its
tokenizer.

    python load_gpt2.py --model gpt2                  # download, verify, write models/gpt2-124M.pth
    python load_gpt2.py --model gpt2-xl --verify true  # re-hash the downloaded file before converting
    python load_gpt2.py --export runs/x/model.pth --out hf_model/   # a folder transformers loads, tokenizer included
    python load_gpt2.py --model hf_cls/ --out runs/cls/from_hf.pth     # a GPT2ForSequenceClassification folder back
"""
import errno
import hashlib
import json
import os
import shutil
import sys
import tempfile

import requests
import torch

from checkpoints import (PRETRAINED, SafetensorsFile, find_files, key_pairs, load_classifier,
                         load_hf_checkpoint, load_hf_classifier, load_pth, read_json, write_safetensors)
from data import (ALPACA_INTRO, EOT_ID, JSON_MAX_BYTES, RESPONSE_HEADER, TEMPLATE_NAME, DownloadError, download,
                  get_tokenizer, sha256_of)
from files import (atomic_write, check_input, check_output, check_parent, make_folder, new_temp_dir,
                   remove_stale_temp_dirs, save_pth, write_json)
from layers import merge_lora
from model import CheckpointError, checkpoint_dict, count_parameters, read_checkpoint
from settings import UserError, entry, get_config

DEFAULTS = dict(
    model="gpt2",          # gpt2 | gpt2-medium | gpt2-large | gpt2-xl, or a local model.safetensors / folder
    models_dir="models",   # where downloads are kept and the converted .pth is written
    out="",                # without --export: the .pth to write ("" = models_dir/gpt2-124M.pth etc.); with it: a folder
    export="",             # a .pth to write out in the published GPT-2 layout, tokenizer files included ("" = off)
    force=False,           # export into a folder that already holds files, or let --out replace a checkpoint
    n_heads=0,             # heads of a checkpoint that has no config.json (0 = from the standard GPT-2 sizes)
    hub_url="",            # base URL of the hub ("" = $GPT2_HUB_URL, else https://huggingface.co)
    verify=False,          # re-hash a downloaded file even when its size and mtime match the recorded check
)

# published name -> the most bytes its model.safetensors download may bring (each file is about 7% under this)
SAFETENSORS_MAX_BYTES = {"gpt2": 600 << 20, "gpt2-medium": 1650 << 20, "gpt2-large": 3500 << 20,
                         "gpt2-xl": 6900 << 20}
HUB_URL = "https://huggingface.co"
REPO = "openai-community"

# exported tokenizer file -> (the GPT-2 file tiktoken downloads for it, its sha256); tiktoken's cache names each
# file by the sha1 of its URL
_BPE_BASE = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main"
GPT2_BPE_FILES = {
    "vocab.json": (f"{_BPE_BASE}/encoder.json", "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"),
    "merges.txt": (f"{_BPE_BASE}/vocab.bpe", "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"),
}
EOT = "<|endoftext|>"  # GPT-2's one special token (EOT_ID): bos, eos, unk and padding in the exported tokenizer
# generation_config.json: generate.py's sampling defaults, so pipeline() samples as our script does by default
GENERATION_DEFAULTS = {"do_sample": True, "temperature": 0.8, "top_k": 50, "max_new_tokens": 50}

# ---------------------------------------------------------------------------------------------------------------
# Download and verification
# ---------------------------------------------------------------------------------------------------------------

def hub_urls(model_name, hub_url=None):
    base = (hub_url or os.environ.get("GPT2_HUB_URL") or HUB_URL).rstrip("/")
    return {fn: f"{base}/{REPO}/{model_name}/resolve/main/{fn}" for fn in ("model.safetensors", "config.json")}


def hub_sha256(url, timeout=30):
    """The sha256 the hub publishes for a large (LFS) file: its ETag, read from a HEAD request without following
    the redirect to the CDN. None when the server sends no sha256-shaped ETag (e.g. a plain mirror)."""
    try:
        r = requests.head(url, allow_redirects=False, timeout=timeout)
    except requests.RequestException as e:
        raise DownloadError(f"cannot reach {url} ({type(e).__name__})") from None
    if r.status_code >= 400:
        raise DownloadError(f"{url} answered HTTP {r.status_code}")
    for header in ("X-Linked-Etag", "ETag"):
        tag = r.headers.get(header, "").strip()
        tag = tag[2:] if tag.startswith("W/") else tag
        tag = tag.strip('"').lower()
        if len(tag) == 64 and all(c in "0123456789abcdef" for c in tag):
            return tag
    return None


def _record_path(path):
    return path + ".sha256"


def _write_record(path, digest):
    """Keep what was verified next to the file: its sha256, size and mtime, so later loads re-check cheaply."""
    st = os.stat(path)
    rec = {"sha256": digest, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    write_json(_record_path(path), rec)


def _check_record(path, rehash=False):
    """True when path matches its record (size and mtime, or the hash when asked or when those changed); False
    when there is no record. Raises CheckpointError when the file changed since it was verified."""
    record = _record_path(path)
    if not os.path.lexists(record):
        return False
    try:
        rec = read_json(record)
        digest, size, mtime = rec["sha256"], rec["size"], rec["mtime_ns"]
    except (CheckpointError, KeyError):
        return False
    if not (isinstance(digest, str) and type(size) is int and type(mtime) is int):
        return False
    st = os.stat(path)
    if not rehash and st.st_size == size and st.st_mtime_ns == mtime:
        return True
    if sha256_of(path) != digest:
        raise CheckpointError(f"{path} changed since it was verified (sha256 differs from {_record_path(path)}): "
                              f"delete both and rerun to download again")
    _write_record(path, digest)  # same bytes, new mtime: record it so the next load is cheap again
    return True


def ensure_downloaded(model_name, models_dir="models", hub_url=None, verify=False, progress=True):
    """models_dir/model_name, holding a verified model.safetensors (and config.json); downloads what is missing."""
    if model_name not in PRETRAINED:
        raise UserError(f"unknown model {model_name!r}: choose one of {', '.join(PRETRAINED)}")
    folder = os.path.join(models_dir, model_name)
    st, cj = os.path.join(folder, "model.safetensors"), os.path.join(folder, "config.json")
    urls = hub_urls(model_name, hub_url)
    by_hand = f"download {urls['model.safetensors']} and {urls['config.json']} by hand into {folder}/"
    if os.path.lexists(st):
        check_input(st, "the downloaded weights")  # it is hashed below: never a pipe, never unreadable
    if os.path.isfile(st) and _check_record(st, rehash=verify):
        return folder
    try:
        expected = hub_sha256(urls["model.safetensors"])
    except DownloadError as e:
        if os.path.isfile(st):  # placed by hand and we are offline: the reader's checks still apply
            print(f"warning: could not check {st} against the hub ({e}); loading it unverified", file=sys.stderr)
            return folder
        raise DownloadError(f"{e}: check the connection, or {by_hand}") from None
    if not os.path.isfile(cj):
        print(f"downloading {urls['config.json']}")
        download(urls["config.json"], cj, progress=progress, max_bytes=JSON_MAX_BYTES)
    if os.path.isfile(st):
        digest = sha256_of(st)
        if expected and digest != expected:
            raise CheckpointError(f"{st} does not match the hub's sha256 {expected[:12]}...: delete it and rerun")
    else:
        print(f"downloading {urls['model.safetensors']}" + ("" if expected else " (the server sends no sha256)"))
        download(urls["model.safetensors"], st, sha256=expected, progress=progress,
                 max_bytes=SAFETENSORS_MAX_BYTES[model_name])
        digest = expected or sha256_of(st)
    _write_record(st, digest)
    return folder


def load_gpt2(model_name, models_dir="models", drop_rate=0.0, hub_url=None, verify=False, progress=True):
    """OpenAI's GPT-2 (gpt2, gpt2-medium, gpt2-large, gpt2-xl) as a GPTModel: downloaded and verified if needed."""
    folder = ensure_downloaded(model_name, models_dir, hub_url, verify, progress)
    return load_hf_checkpoint(folder, drop_rate)


# ---------------------------------------------------------------------------------------------------------------
# Export to the published layout
# ---------------------------------------------------------------------------------------------------------------

def _float_state_dict(model):
    """model.state_dict() with int8 layers (model.quantize_int8) turned back into float weights."""
    sd = model.state_dict()
    for k in [k for k in sd if k + "_scale" in sd]:
        sd[k] = sd[k].float() * sd[k + "_scale"][:, None]
    return sd


def _published_tensors(sd, cfg, pairs):
    """Our tensors under the published names of `pairs` (c_attn fused, Conv1D [in, out]), as float32."""
    parts = {}
    for ours, theirs, transpose, part in pairs:
        if ours not in sd and part is not None and ours.endswith(".bias"):
            sd[ours] = torch.zeros(cfg["emb_dim"])  # a model built with qkv_bias=False: GPT-2's layout has one, zero
        if ours not in sd:
            raise UserError(f"the model has no {ours}: merge LoRA adapters (model.merge_lora) before exporting")
        t = sd[ours].t() if transpose else sd[ours]
        parts.setdefault(theirs, []).append(t)
    return {k: (torch.cat(v, dim=-1) if len(v) > 1 else v[0]).float() for k, v in parts.items()}


def published_state_dict(model):
    """Our language model's tensors under the published GPT-2 names and layout -> (tensors, tied)."""
    cfg, sd = model.cfg, _float_state_dict(model)
    d, V = cfg["emb_dim"], cfg["vocab_size"]
    if tuple(sd["out_head.weight"].shape) != (V, d):
        raise UserError(f"out_head is {list(sd['out_head.weight'].shape)}, not [{V}, {d}]: a classifier exports "
                        f"with published_classifier_state_dict")
    tied = torch.equal(sd["out_head.weight"], sd["tok_emb.weight"])
    return _published_tensors(sd, cfg, key_pairs(cfg["n_layers"], tied)), tied


def hf_config(cfg, tied=True):
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg["vocab_size"],
            "n_positions": cfg["context_length"], "n_ctx": cfg["context_length"], "n_embd": cfg["emb_dim"],
            "n_layer": cfg["n_layers"], "n_head": cfg["n_heads"], "n_inner": None, "activation_function": "gelu_new",
            "layer_norm_epsilon": 1e-5, "resid_pdrop": cfg["drop_rate"], "embd_pdrop": cfg["drop_rate"],
            "attn_pdrop": cfg["drop_rate"], "initializer_range": 0.02, "tie_word_embeddings": tied,
            "torch_dtype": "float32", **({"bos_token_id": EOT_ID, "eos_token_id": EOT_ID}
                                         if cfg["vocab_size"] > EOT_ID else {})}


# ---------------------------------------------------------------------------------------------------------------
# Classifiers (finetune_cls.py) as GPT2ForSequenceClassification
# ---------------------------------------------------------------------------------------------------------------

def fold_head_bias(weight, bias, shift):
    """ln_f's shift with the head's bias folded in: shift + delta where weight @ delta = bias.

    The final LayerNorm feeds only the head, so weight @ (x + shift + delta) = weight @ (x + shift) + bias for every
    x: a head without a bias (GPT2ForSequenceClassification's score) then gives the same logits. delta is the
    least-norm solution; it exists when the head's rows are linearly independent (a trained head with no more
    classes than emb_dim). None when no delta keeps the logits within 1e-5.
    """
    W, b = weight.double(), bias.double()
    delta = torch.linalg.pinv(W) @ b  # (emb_dim,)
    folded = (shift.double() + delta).float()
    # what the solve misses, plus the float32 rounding a large delta adds at every position
    err = (W @ (folded.double() - shift.double()) - b).abs().max() + (W.abs() @ delta.abs()).max() * 2 ** -23
    return folded if err <= 1e-5 else None


def published_classifier_state_dict(model, source="the classifier"):
    """Our classifier's tensors under GPT2ForSequenceClassification's names: the body as transformer.*, the head as
    score.weight (num_classes, emb_dim), which has no bias: out_head's bias is folded into transformer.ln_f.bias."""
    cfg, sd = model.cfg, _float_state_dict(model)
    weight = sd["out_head.weight"].float()
    tensors = _published_tensors(sd, cfg, key_pairs(cfg["n_layers"]))
    bias = sd.get("out_head.bias")
    if bias is not None and bias.any():
        tensors["ln_f.bias"] = fold_head_bias(weight, bias.float(), tensors["ln_f.bias"])
        if tensors["ln_f.bias"] is None:
            raise UserError(f"{source}: out_head's bias cannot move into ln_f (its {weight.shape[0]} rows are "
                            f"linearly dependent, e.g. more classes than emb_dim {cfg['emb_dim']}), and "
                            f"GPT2ForSequenceClassification has no bias: use the .pth with finetune_cls.py instead")
    return {**{f"transformer.{k}": v for k, v in tensors.items()}, "score.weight": weight}


def hf_classifier_config(cfg, class_names, pad_id=EOT_ID):
    """config.json of a GPT2ForSequenceClassification: our class names as labels, and the padding id by which it
    finds each text's last real token: the rightmost token that is not padding. Padding is <|endoftext|>, so a text
    that ends in that token is read one token earlier (finetune_cls.py reads "<|endoftext|>" in a text as plain
    text, never as the token)."""
    return {**hf_config(cfg, tied=True), "architectures": ["GPT2ForSequenceClassification"],
            "num_labels": len(class_names), "id2label": {str(i): n for i, n in enumerate(class_names)},
            "label2id": {n: i for i, n in enumerate(class_names)}, "pad_token_id": pad_id,
            "problem_type": "single_label_classification"}


def is_hf_classifier(path):
    """True for a published-layout checkpoint with a classification head (score.weight)."""
    st_path, _ = find_files(path)
    return "score.weight" in SafetensorsFile(st_path).entries


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer files, generation defaults and the chat template, for transformers
# ---------------------------------------------------------------------------------------------------------------

def tiktoken_cache_dir():
    """The folder tiktoken caches downloads in, found as tiktoken finds it; None when its caching is off ("")."""
    for var in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if var in os.environ:
            return os.environ[var] or None
    return os.path.join(tempfile.gettempdir(), "data-gym-cache")


def cached_bpe_file(url, sha256):
    """The bytes tiktoken cached for url, or None when the cache holds no intact copy."""
    folder = tiktoken_cache_dir()
    path = os.path.join(folder, hashlib.sha1(url.encode()).hexdigest()) if folder else None
    if not path or not os.path.isfile(path) or not os.access(path, os.R_OK):
        return None  # none, or not one to read (a pipe, no permission): the files are rebuilt from tiktoken's ranks
    with open(path, "rb") as f:
        data = f.read()
    return data if hashlib.sha256(data).hexdigest() == sha256 else None


def gpt2_bpe_files():
    """{"vocab.json": GPT-2's encoder.json, "merges.txt": its vocab.bpe} as bytes, from tiktoken's cache (checked
    against their sha256); rebuilt from tiktoken's gpt2 ranks when the cache lacks them."""
    files = {name: cached_bpe_file(url, sha) for name, (url, sha) in GPT2_BPE_FILES.items()}
    if all(files.values()):
        return files
    vocab, merges = bpe_files_from_encoding(get_tokenizer())  # one clear line when tiktoken cannot load gpt2
    return {"vocab.json": json.dumps(vocab, ensure_ascii=False).encode("utf-8"),
            "merges.txt": "".join(line + "\n" for line in ["#version: 0.2", *merges]).encode("utf-8")}


def gpt2_byte_chars():
    """byte -> the character GPT-2's files write it as: itself when printable and not a space, else chr(256 + n)
    for the n-th byte that is not."""
    chars, n = {}, 0
    for b in range(256):
        if chr(b).isprintable() and chr(b) != " ":
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + n)
            n += 1
    return chars


def bpe_files_from_encoding(enc):
    """(vocab {token text: id}, merges ["left right", ...] in rank order) of a tiktoken byte-level BPE (gpt2), in
    the text form of GPT-2's encoder.json and vocab.bpe.

    tiktoken keeps each token's bytes and rank only; the merge that made a token is what BPE leaves of its bytes
    when it may use only the merges ranked below it: exactly two parts.
    """
    ranks = {t: enc.encode_single_token(t) for t in enc.token_byte_values()}
    char = gpt2_byte_chars()

    def text(token):
        return "".join(char[b] for b in token)

    vocab = {text(t): r for t, r in ranks.items()}
    vocab.update({s: enc.encode_single_token(s) for s in enc.special_tokens_set})
    merges = [" ".join(map(text, _last_merge(t, r, ranks)))
              for t, r in sorted(ranks.items(), key=lambda kv: kv[1]) if len(t) > 1]
    return vocab, merges


def _last_merge(token, rank, ranks):
    """The two parts BPE leaves of token's bytes using only the merges ranked below `rank`."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        best, i = min((ranks.get(a + b, rank), i) for i, (a, b) in enumerate(zip(parts, parts[1:])))
        if best >= rank:
            raise UserError(f"cannot rebuild merges.txt: tiktoken's token {token!r} is not made by lower-ranked "
                            f"merges; set TIKTOKEN_CACHE_DIR to a folder holding GPT-2's encoder.json and vocab.bpe")
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts


def tokenizer_config(model_max_length, chat_template=None):
    """tokenizer_config.json: GPT-2's BPE with <|endoftext|> as every special token, no prefix space, no clean-up
    on decode, right padding: ids and text equal tiktoken's encode(text, allowed_special={EOT}) and decode."""
    return {"tokenizer_class": "GPT2Tokenizer", "add_prefix_space": False, "add_bos_token": False,
            "errors": "replace", "bos_token": EOT, "eos_token": EOT, "unk_token": EOT, "pad_token": EOT,
            "padding_side": "right", "clean_up_tokenization_spaces": False, "model_max_length": model_max_length,
            **({"chat_template": chat_template} if chat_template else {})}


def alpaca_chat_template():
    """data.conversation_segments as a Jinja chat template: apply_chat_template gives format_conversation's text.

    A first system message becomes the ### Instruction and user turns ### Input, else user turns are ### Instruction.
    Each user turn ends with the response header, as in training, so add_generation_prompt changes nothing; there is
    no end-of-text between turns. Roles other than user and assistant (after the first) are refused.
    """
    def lit(text):  # a Jinja string literal: Jinja reads JSON's escapes of ASCII text as Python's
        return json.dumps(text)

    return "".join([
        "{% if messages and messages[0]['role'] == 'system' %}",
        "{% set system = messages[0]['content'] %}{% set turns = messages[1:] %}",
        "{% else %}{% set system = '' %}{% set turns = messages %}{% endif %}",
        "{{ " + lit(ALPACA_INTRO) + " }}",
        "{% if system %}{{ " + lit("\n\n### Instruction:\n") + " ~ system }}{% endif %}",
        "{% set header = " + lit("\n\n### Input:\n") + " if system else " + lit("\n\n### Instruction:\n") + " %}",
        "{% for m in turns %}",
        "{% if m['role'] == 'user' %}{{ header ~ m['content'] ~ " + lit(RESPONSE_HEADER) + " }}",
        "{% elif m['role'] == 'assistant' %}{{ m['content'] }}",
        "{% else %}{{ raise_exception('after an optional first system message, roles must be user or assistant') }}",
        "{% endif %}{% endfor %}",
    ])


CHAT_TEMPLATES = {TEMPLATE_NAME: alpaca_chat_template}  # a chat checkpoint's `template` -> its Jinja version


def hf_side_files(cfg, ckpt, model_max_length, source):
    """name -> bytes of what transformers reads beside the weights: for a model with GPT-2's vocabulary, the
    tokenizer files (with the chat template for a chat model) and, for a language model, generation_config.json."""
    if cfg["vocab_size"] <= EOT_ID:
        return {}  # a toy vocabulary: GPT-2's tokenizer would give ids the model does not have
    template = None
    if ckpt.get("kind") == "chat":
        name = ckpt.get("template", TEMPLATE_NAME)
        if name not in CHAT_TEMPLATES:
            raise UserError(f"{source} was trained with chat template {name!r}, which has no Jinja version here "
                            f"(known: {', '.join(CHAT_TEMPLATES)}): add one to load_gpt2.CHAT_TEMPLATES")
        template = CHAT_TEMPLATES[name]()
    files = dict(gpt2_bpe_files())
    files["tokenizer_config.json"] = _json_bytes(tokenizer_config(model_max_length, template))
    files["special_tokens_map.json"] = _json_bytes({k: EOT for k in ("bos_token", "eos_token", "unk_token",
                                                                     "pad_token")})
    if ckpt.get("kind") != "cls":
        files["generation_config.json"] = _json_bytes({"bos_token_id": EOT_ID, "eos_token_id": EOT_ID,
                                                       "pad_token_id": EOT_ID, **GENERATION_DEFAULTS})
    return files


def _json_bytes(obj):
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def export_hf(pth_path, out_dir, force=False):
    """Write out_dir in the layout transformers loads from one of our .pth files: model.safetensors and config.json
    (GPT2LMHeadModel, or GPT2ForSequenceClassification for a finetune_cls.py classifier), and for GPT-2's vocabulary
    the tokenizer files (vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json; a chat model's
    template inside) and, for language models, generation_config.json. Returns out_dir."""
    if not out_dir:
        raise UserError("--export needs --out FOLDER: where to write model.safetensors, config.json and the rest")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"--out {out_dir} is a file, not a folder: pick a folder path (it is created if missing)")
    check_parent(out_dir, "--out")
    if os.path.islink(out_dir):
        raise UserError(f"--out {out_dir} is a symbolic link: pass the folder it points to, or a new folder")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not force:
        raise UserError(f"{out_dir} exists and is not empty: pick a new folder or pass --force")
    if not os.path.isfile(pth_path):
        raise UserError(f"no checkpoint at {pth_path}: pass the .pth written by a training run")
    check_input(pth_path, "--export")
    if read_checkpoint(pth_path, verify=False).get("kind") == "cls":  # a peek: the loaders below verify the file
        model, ckpt = load_classifier(pth_path)
        merge_lora(model)
        tensors = published_classifier_state_dict(model, pth_path)
        config = hf_classifier_config(model.cfg, list(ckpt["class_names"]), ckpt.get("pad_id", EOT_ID))
        max_length = ckpt.get("max_length") or model.cfg["context_length"]  # where finetune_cls.py cuts texts
    else:
        model, ckpt = load_pth(pth_path, int8_ok=True)
        tensors, tied = published_state_dict(model)
        config = hf_config(model.cfg, tied)
        max_length = model.cfg["context_length"]
    files = {"config.json": _json_bytes(config), **hf_side_files(model.cfg, ckpt, max_length, pth_path)}
    make_folder(os.path.dirname(os.path.abspath(out_dir)), "the export (--out)")
    remove_stale_temp_dirs(out_dir)
    # a new folder is filled beside out_dir and renamed into place at the end, which fails when out_dir is no longer
    # missing or empty: an export that another command finished meanwhile is not replaced; --force writes into it
    target = out_dir if force and os.path.isdir(out_dir) else new_temp_dir(out_dir)
    try:
        write_safetensors(os.path.join(target, "model.safetensors"), tensors, {"format": "pt"})
        for name, content in files.items():
            atomic_write(os.path.join(target, name), lambda f, content=content: f.write(content))
        if target != out_dir:
            _rename_folder_into_place(target, out_dir)
    except BaseException:
        if target != out_dir:
            shutil.rmtree(target, ignore_errors=True)
        raise
    return out_dir


def _rename_folder_into_place(tmp, out_dir):
    """Rename the finished folder tmp to out_dir, which must be missing or an empty folder (checked by rename
    itself, so two exports that ran at once cannot both win)."""
    try:
        os.rename(tmp, out_dir)
    except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise
        raise UserError(f"{out_dir} was filled by another command while this export ran: pass --force to write "
                        f"into it, or pick a new folder") from None


# ---------------------------------------------------------------------------------------------------------------

def _converted_from(path):
    """The source a converted .pth names, or None (any other file, or one that cannot be read)."""
    try:
        return read_checkpoint(path).get("source")
    except CheckpointError:
        return None


def main(argv=None):
    cfg = get_config(DEFAULTS, argv, __doc__)
    if cfg["export"]:
        out = export_hf(cfg["export"], cfg["out"], cfg["force"])
        print(f"wrote {out}: {', '.join(sorted(os.listdir(out)))}")
        return out
    name = cfg["model"]
    if name in PRETRAINED:
        out = cfg["out"] or os.path.join(cfg["models_dir"], f"gpt2-{PRETRAINED[name]}.pth")
    elif os.path.exists(name):
        stem = os.path.basename(os.path.abspath(name if os.path.isdir(name) else os.path.dirname(name) or "."))
        out = cfg["out"] or os.path.join(cfg["models_dir"], f"{stem}.pth")
    else:
        raise UserError(f"unknown model {name!r}: choose one of {', '.join(PRETRAINED)}, or pass a local "
                        f"model.safetensors or folder")
    if not cfg["out"] and not cfg["force"] and os.path.isfile(out) and _converted_from(out) == name:
        print(f"{out} already holds {name}, converted earlier: nothing to do (--force converts it again)")
        return out
    folder_files = [os.path.join(name, f) for f in ("model.safetensors", "config.json")] if os.path.isdir(name) else []
    check_output(out, "--out", cfg["force"], inputs=[name, *folder_files])  # before any download
    folder = ensure_downloaded(name, cfg["models_dir"], cfg["hub_url"] or None, cfg["verify"]) \
        if name in PRETRAINED else name
    if is_hf_classifier(folder):  # GPT2ForSequenceClassification: a classifier .pth for finetune_cls.py
        model, extras = load_hf_classifier(folder)
        print(f"loaded classifier {name}: {count_parameters(model) / 1e6:.1f}M parameters, classes "
              f"{', '.join(extras['class_names'])}")
        save_pth(out, checkpoint_dict(model, "cls", source=name, **extras), exclusive=not cfg["force"])
    else:
        model = load_hf_checkpoint(folder, n_heads=cfg["n_heads"] or None)
        print(f"loaded {name}: {count_parameters(model) / 1e6:.1f}M parameters")
        save_pth(out, checkpoint_dict(model, "pretrained", source=name), exclusive=not cfg["force"])
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    entry(main)
