"""Everything between files and tensors: the GPT-2 tokenizer, datasets and collate functions (pretraining text,
labelled CSVs, instructions, preferences), readers of text/CSV/JSON, verified downloads, and atomic file writes.

    from data import get_tokenizer, text_to_token_ids, create_dataloader_v1, fetch_data
    path = fetch_data("the-verdict.txt")            # downloads once, checks sha256
    loader = create_dataloader_v1(open(path).read(), batch_size=2, max_length=256, stride=256)
"""
import contextlib
import csv
import errno
import hashlib
import io
import json
import os
import random
import re
import sys
import time
import zipfile
import zlib

import numpy as np
import requests
import tiktoken
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from settings import UserError, few, note

class DownloadError(UserError):
    pass


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------------------

EOT_ID = 50256  # <|endoftext|>, also used as padding
_TOKENIZER = None


def get_tokenizer():
    """tiktoken's GPT-2 BPE (cached; set TIKTOKEN_CACHE_DIR to work offline)."""
    global _TOKENIZER
    if _TOKENIZER is None:
        try:
            _TOKENIZER = tiktoken.get_encoding("gpt2")
        except Exception as e:
            raise UserError(f"cannot load the GPT-2 tokenizer ({type(e).__name__}): connect to the internet once, "
                            f"or set TIKTOKEN_CACHE_DIR to a folder holding tiktoken's gpt2 files") from None
    return _TOKENIZER


def text_to_token_ids(text, tokenizer=None):
    """str -> (1, T) LongTensor; <|endoftext|> in the text is kept as the special token."""
    tokenizer = tokenizer or get_tokenizer()
    return torch.tensor(tokenizer.encode(text, allowed_special={"<|endoftext|>"})).unsqueeze(0)


def token_ids_to_text(token_ids, tokenizer=None):
    """(1, T) or (T,) ids -> str"""
    tokenizer = tokenizer or get_tokenizer()
    ids = token_ids.squeeze(0) if isinstance(token_ids, torch.Tensor) else token_ids
    return tokenizer.decode(list(map(int, ids)))


# ---------------------------------------------------------------------------------------------------------------
# Pretraining text
# ---------------------------------------------------------------------------------------------------------------

class GPTDatasetV1(Dataset):
    """Sliding windows over one token stream: input ids[i:i+max_length], target shifted by one, i += stride."""

    def __init__(self, txt, tokenizer, max_length, stride):
        ids = tokenizer.encode(txt, allowed_special={"<|endoftext|>"}) if isinstance(txt, str) else list(txt)
        self.token_ids = torch.tensor(ids, dtype=torch.long)
        self.max_length = max_length
        self.starts = list(range(0, len(ids) - max_length, stride))

    def __len__(self):
        return len(self.starts)

    def __getitem__(self, i):
        s = self.starts[i]
        chunk = self.token_ids[s:s + self.max_length + 1]
        return chunk[:-1], chunk[1:]


def create_dataloader_v1(txt, batch_size=4, max_length=256, stride=128, shuffle=True, drop_last=True,
                         num_workers=0, tokenizer=None, generator=None):
    """The book's loader: txt (str, or a list of token ids) -> DataLoader of (input, target) pairs (B, max_length)."""
    dataset = GPTDatasetV1(txt, tokenizer or get_tokenizer(), max_length, stride)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                      num_workers=num_workers, generator=generator)


def read_text_file(path):
    """Read a UTF-8 text file, or raise a UserError that says what is wrong with it."""
    if not os.path.exists(path):
        raise UserError(f"no file at {path}: check the path or pass --data")
    if os.path.isdir(path):
        raise UserError(f"{path} is a folder, expected a file")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise UserError(f"cannot read {path} ({e.strerror}): check its permissions") from None
    if b"\x00" in raw[:65536]:
        raise UserError(f"{path} looks binary (it holds NUL bytes): pass a UTF-8 text file")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 (bad byte at offset {e.start}): convert it, e.g. "
                        f"`iconv -f latin1 -t utf-8`") from None


def load_text(path):
    """A text file, or every .txt file in a folder (sorted, joined by <|endoftext|>)."""
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".txt"))
        if not files:
            raise UserError(f"folder {path} holds no .txt files: put text files there or pass a file to --data")
        return "<|endoftext|>".join(read_text_file(f) for f in files)
    return read_text_file(path)


# ---------------------------------------------------------------------------------------------------------------
# Writing files: all at once or not at all
# ---------------------------------------------------------------------------------------------------------------

TMP_SUFFIX = ".tmp"


def atomic_write(path, write, mode="wb"):
    """Write path all at once or not at all; returns path.

    write(f) fills a temporary file beside path (named NAME.PID.tmp), which is flushed to disk and renamed over path,
    so a crash or a full disk never leaves half a file and any earlier file at path stays whole until the rename.
    The file gets the permissions of any new file (the umask). An OSError becomes a UserError that says what to do.
    """
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f"{os.path.basename(path)}.{os.getpid()}{TMP_SUFFIX}")
    try:
        if os.path.isdir(path):
            raise IsADirectoryError(errno.EISDIR, "is a folder", path)
        os.makedirs(folder, exist_ok=True)
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8", "newline": ""})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        # torch's zip writer reports an OSError as a RuntimeError raised while handling it: look one exception back
        err = e if isinstance(e, OSError) else e.__context__ if isinstance(e.__context__, OSError) else None
        if err is None:
            raise
        raise UserError(f"could not write {path}: {write_error_advice(path, err)}; any earlier file at that path "
                        f"is untouched") from None
    return path


def write_error_advice(path, err):
    """What an OSError from writing path means, and what to do about it."""
    code = getattr(err, "errno", None)
    if code in (errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", -1)):
        return f"{err.strerror or err}: free disk space or choose another folder"
    if code == errno.EISDIR:
        return "that path is a folder: pass a file path"
    if code in (errno.ENOTDIR, errno.EEXIST) or _parent_is_file(path):
        return "a folder on that path is a regular file: choose another path"
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{err.strerror}: choose a folder you can write to"
    return f"{err.strerror or err}: choose another path"


def _parent_is_file(path):
    parent = os.path.dirname(os.path.abspath(path))
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    return bool(parent) and not os.path.isdir(parent)


def save_pth(path, obj):
    """torch.save(obj) to path, atomically."""
    return atomic_write(path, lambda f: torch.save(obj, f))


def write_json(path, obj):
    """obj as indented JSON (UTF-8) at path, atomically."""
    return atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2, ensure_ascii=False) + "\n"), "w")


def remove_stale_tmp(folder):
    """Delete the temporary files atomic_write left in folder when its process was killed (their PID is gone)."""
    if not os.path.isdir(folder):
        return []
    removed = []
    for name in os.listdir(folder):
        m = re.fullmatch(r".+\.(\d+)" + re.escape(TMP_SUFFIX), name)
        if m and not _process_alive(int(m.group(1))):
            with contextlib.suppress(OSError):
                os.remove(os.path.join(folder, name))
                removed.append(name)
    return removed


def _process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def check_output_path(path, flag, force=False, what="file"):
    """Refuse, before any work starts, an output path that cannot be written or would replace a file without --force.

    A parent that is a regular file, a file target that is a folder, or an existing file without force each give a
    UserError naming the flag.
    """
    if not path:
        return path
    if _parent_is_file(path):
        raise UserError(f"{flag} {path}: a folder on that path is a regular file: choose another path")
    if what == "file" and os.path.isdir(path):
        raise UserError(f"{flag} {path} is a folder: pass a file path")
    if what == "folder" and os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{flag} {path} is a file, not a folder: pick a folder path (it is created if missing)")
    if what == "file" and os.path.exists(path) and not force:
        raise UserError(f"{flag} {path} already exists: pass --force to replace it, or choose another path")
    return path


# ---------------------------------------------------------------------------------------------------------------
# JSON with bounded nesting
# ---------------------------------------------------------------------------------------------------------------

MAX_JSON_DEPTH = 64


def json_depth(text):
    """How deeply the arrays and objects of a JSON text nest (strings skipped), without parsing it."""
    bare = re.sub(r'"(?:[^"\\]|\\.)*"', "", text)
    brackets = np.frombuffer(re.sub(r"[^\[\]{}]", "", bare).encode("ascii"), dtype=np.uint8)
    if not len(brackets):
        return 0
    steps = np.where((brackets == ord("[")) | (brackets == ord("{")), 1, -1)
    return int(np.cumsum(steps).max())


def parse_json(text, source):
    """json.loads after checking that the nesting is at most MAX_JSON_DEPTH deep (a deeper file is refused)."""
    if json_depth(text) > MAX_JSON_DEPTH:
        raise UserError(f"{source} nests arrays or objects more than {MAX_JSON_DEPTH} deep: not a file of ours")
    return json.loads(text)


# ---------------------------------------------------------------------------------------------------------------
# Downloads
# ---------------------------------------------------------------------------------------------------------------

_BOOK = "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main"
# name -> (url, sha256 of the file as used)
DATA_FILES = {
    "the-verdict.txt": (f"{_BOOK}/ch02/01_main-chapter-code/the-verdict.txt",
                        "b41e41a68f0398a3154ae69e2e4c0e2694e17fe0d66730536837f1b01935b31f"),
    "instruction-data.json": (f"{_BOOK}/ch07/01_main-chapter-code/instruction-data.json",
                              "7e09a9af353722ca15c18bc580f093f9c39d3178335a75177319cb1e1d163944"),
    "instruction-data-with-preference.json": (
        f"{_BOOK}/ch07/04_preference-tuning-with-dpo/instruction-data-with-preference.json",
        "305315abf14f65fa42c01a0877572f832606571c2a7d49f152ac1d758b16756e"),
}
DATA_DIR = os.environ.get("GPT2_DATA_DIR", "data")  # where downloaded corpora are kept


def sha256_of(path, chunk=1 << 20):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def download(url, path, sha256=None, retries=3, timeout=30, desc=None, progress=True):
    """Fetch url to path: streamed with a tqdm bar into path + '.part', resumed with an HTTP Range request when a
    partial file exists, checked against sha256, then renamed into place. Raises DownloadError naming the URL and
    the path where the file can be placed by hand."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    part = path + ".part"
    by_hand = f"download {url} yourself and place it at {path}"
    last = None
    for attempt in range(1, retries + 1):
        try:
            have = os.path.getsize(part) if os.path.exists(part) else 0
            headers = {"Range": f"bytes={have}-"} if have else {}
            with requests.get(url, stream=True, timeout=timeout, headers=headers) as r:
                if r.status_code == 416:  # the .part file is already complete (or bigger than the file)
                    r.close()
                else:
                    r.raise_for_status()
                    if have and r.status_code != 206:
                        have = 0  # server ignored the Range header: start over
                    total = int(r.headers.get("content-length", 0)) + have
                    # keep the bytes of a transfer cut short (urllib3 would drop them); we check the length below
                    r.raw.enforce_content_length = False
                    with open(part, "ab" if have else "wb") as f, tqdm(
                            total=total or None, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
                            desc=desc or os.path.basename(path), disable=not progress, leave=False) as bar:
                        for block in r.iter_content(1 << 16):
                            f.write(block)
                            bar.update(len(block))
                    got = os.path.getsize(part)
                    if total and got < total:
                        raise IOError(f"connection closed after {got} of {total} bytes")
            if sha256:
                digest = sha256_of(part)
                if digest != sha256:
                    os.remove(part)
                    raise DownloadError(f"checksum mismatch for {url} (got sha256 {digest[:12]}..., expected "
                                        f"{sha256[:12]}...); the partial file was deleted; rerun, or {by_hand}")
            os.replace(part, path)
            return path
        except DownloadError:
            raise
        except (requests.RequestException, OSError) as e:
            last = e
            if isinstance(e, requests.HTTPError) and e.response is not None and e.response.status_code < 500:
                break  # 404 and friends will not change on retry
            if attempt < retries:
                time.sleep(min(2 ** attempt, 10) * 0.25)
    reason = type(last).__name__ if last is not None else "unknown error"
    if isinstance(last, requests.HTTPError) and last.response is not None:
        reason = f"HTTP {last.response.status_code}"
    elif last is not None and str(last):
        reason = str(last).splitlines()[0][:120]
    raise DownloadError(f"could not download {url} ({reason}); rerun to resume, or {by_hand}")


def fetch_data(name, data_dir=None, base_url=None):
    """Path of a known corpus (DATA_FILES), downloaded and verified on first use. base_url (or the GPT2_DATA_URL
    environment variable) replaces the host folder, e.g. for a mirror."""
    url, digest = DATA_FILES[name]
    data_dir = data_dir or DATA_DIR
    path = os.path.join(data_dir, name)
    if os.path.exists(path):
        if sha256_of(path) != digest:
            raise UserError(f"{path} does not match the expected sha256 {digest[:12]}...: delete it to download "
                            f"it again")
        return path
    base_url = base_url or os.environ.get("GPT2_DATA_URL")
    if base_url:
        url = f"{base_url.rstrip('/')}/{name}"
    print(f"downloading {name} from {url}")
    return download(url, path, sha256=digest)


# ---------------------------------------------------------------------------------------------------------------
# Instructions and chat: the Alpaca prompt template (shared by training, evaluation and the chat REPL), JSON/JSONL
# records, the instruction dataset and its collate, and the preference dataset for DPO
# ---------------------------------------------------------------------------------------------------------------

TEMPLATE_NAME = "alpaca"  # stored in chat checkpoints, so generate.py --chat knows which template a model learned
ALPACA_INTRO = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
                "request.")
RESPONSE_HEADER = "\n\n### Response:\n"
NEXT_TURN_MARKERS = ("### Instruction:", "### Input:", "### Response:")  # a reply ends where one of these begins
IGNORE_INDEX = -100  # the target value cross_entropy skips


def cut_reply(text):
    """(reply, ended): text up to the first next-turn header (NEXT_TURN_MARKERS), and whether one was found."""
    found = [text.find(m) for m in NEXT_TURN_MARKERS if m in text]
    return (text[:min(found)], True) if found else (text, False)


def format_input(entry):
    """The book's prompt for one record: the intro, ### Instruction, and ### Input when the record has one."""
    text = f"{ALPACA_INTRO}\n\n### Instruction:\n{entry['instruction']}"
    if entry.get("input"):
        text += f"\n\n### Input:\n{entry['input']}"
    return text


def format_prompt(entry):
    """format_input() followed by the response header: the text the model continues with its answer."""
    return format_input(entry) + RESPONSE_HEADER


def conversation_segments(messages, system=""):
    """A conversation [{"role": "user"|"assistant"|"system", "content": str}, ...] in the same template, as a list
    of (text, is_response) pieces.

    Without a system text every user message is an ### Instruction; with one (the --system flag, or a first message
    with role "system") the system text is the instruction and user messages are ### Input, so a one-turn
    conversation reads exactly like format_prompt(). There is no end-of-text between turns: the model's reply ends
    where it starts the next header (NEXT_TURN_MARKERS), or at the end-of-text the collate puts after the last one.
    """
    if messages and messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    prompt = ALPACA_INTRO + (f"\n\n### Instruction:\n{system}" if system else "")
    header = "### Input:" if system else "### Instruction:"
    segments = []
    for m in messages:
        if m["role"] == "user":
            prompt += f"\n\n{header}\n{m['content']}{RESPONSE_HEADER}"
        else:
            segments += [(prompt, False), (m["content"], True)]
            prompt = ""
    if prompt:
        segments.append((prompt, False))
    return segments


def format_conversation(messages, system=""):
    """The whole conversation as one string (see conversation_segments)."""
    return "".join(text for text, _ in conversation_segments(messages, system))


def record_segments(entry):
    """(text, is_response) pieces of one training record: an instruction record or a {"messages": [...]} one."""
    if "messages" in entry:
        return conversation_segments(entry["messages"])
    return [(format_prompt(entry), False), (entry["output"], True)]


def encode_segments(segments, tokenizer=None):
    """Tokenize each piece on its own and join them -> (ids, learn): learn[j] is True for response tokens."""
    tokenizer = tokenizer or get_tokenizer()
    ids, learn = [], []
    for text, is_response in segments:
        piece = tokenizer.encode(text, allowed_special={"<|endoftext|>"})
        ids += piece
        learn += [is_response] * len(piece)
    return ids, learn


def _parse_json_records(text, path):
    """A JSON list of records, or JSON Lines (one record per line); malformed JSON names its line and column."""
    def malformed(e, line=None):
        return UserError(f"{path}, line {line or e.lineno}, column {e.colno}: malformed JSON ({e.msg}): fix the "
                         f"file (a JSON list of records, or one record per line)")

    if not path.endswith(".jsonl"):
        try:
            records = parse_json(text, path)
        except json.JSONDecodeError as e:
            if e.msg != "Extra data":  # "Extra data" after the first value: probably JSON Lines
                raise malformed(e) from None
        else:
            if not isinstance(records, list):
                raise UserError(f"{path} holds a JSON {type(records).__name__}, expected a list of records "
                                f"[{{...}}, ...] or one record per line (JSONL)")
            return records
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                records.append(parse_json(line, f"{path}, line {n}"))
            except json.JSONDecodeError as e:
                raise malformed(e, n) from None
    return records


def _check_messages(messages, where):
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: 'messages' must be a non-empty list of {{\"role\", \"content\"}} objects")
    expected = "user"
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise UserError(f"{where}: messages[{j}] needs a 'role' and a 'content' field")
        if not isinstance(m["content"], str):
            raise UserError(f"{where}: messages[{j}].content is a {type(m['content']).__name__}, expected text")
        if j == 0 and m["role"] == "system":
            continue
        if m["role"] != expected:
            raise UserError(f"{where}: messages[{j}] has role {m['role']!r} where {expected!r} was expected: turns "
                            f"alternate user, assistant, ... (an optional system message first)")
        expected = "assistant" if expected == "user" else "user"
    if messages[-1]["role"] != "assistant":
        raise UserError(f"{where}: the last message must be the assistant's reply, the text the model learns")


def load_records(path, required=("instruction", "output"), optional=("input",), allow_messages=True):
    """Records of a JSON or JSONL file, checked: each is an object with the required text fields (or, where
    allow_messages, a "messages" conversation). Raises UserError naming the file, record index and field."""
    records = _parse_json_records(read_text_file(path), path)
    if not records:
        raise UserError(f"{path} holds no records: add some, e.g. "
                        f"{{\"instruction\": ..., \"input\": \"\", \"output\": ...}}")
    for i, r in enumerate(records):
        where = f"{path}: record {i} (0-based)"
        if not isinstance(r, dict):
            raise UserError(f"{where} is a JSON {type(r).__name__}, expected an object with "
                            f"{', '.join(required)}" + (" (or messages)" if allow_messages else ""))
        if allow_messages and "messages" in r:
            _check_messages(r["messages"], where)
            continue
        for field in required:
            if field not in r:
                raise UserError(f"{where} has no {field!r} field: every record needs {', '.join(required)}"
                                + (", or a 'messages' conversation" if allow_messages else ""))
        for field in (*required, *optional):
            if field in r and not isinstance(r[field], str):
                raise UserError(f"{where}: field {field!r} is a JSON {type(r[field]).__name__}, expected text")
    return records


def load_preference_records(path):
    """Records with instruction, chosen and rejected (input optional), as instruction-data-with-preference.json."""
    records = load_records(path, required=("instruction", "chosen", "rejected"), optional=("input", "output"),
                           allow_messages=False)
    for i, r in enumerate(records):
        for field in ("chosen", "rejected"):
            if not r[field].strip():
                raise UserError(f"{path}: record {i} (0-based) has an empty {field!r} response: DPO compares two "
                                f"non-empty answers; fill it in or drop the record")
    return records


def split_records(records, train_ratio=0.85, test_ratio=0.10, seed=None):
    """(train, test, val) lists: the book's 85/10/5 split, after a shuffle with `seed` (None keeps file order)."""
    records = list(records)
    if seed is not None:
        random.Random(seed).shuffle(records)
    n_train, n_test = int(len(records) * train_ratio), int(len(records) * test_ratio)
    return records[:n_train], records[n_train:n_train + n_test], records[n_train + n_test:]


class InstructionDataset(Dataset):
    """Instruction records (or conversations), tokenized once in the template.

    Item i is the list of token ids, or (ids, learn) with mask_instruction, where learn[j] marks response tokens.
    With max_length, records longer than that are counted in `truncated` (the collate cuts them); under
    mask_instruction, those whose response falls wholly beyond the cut teach nothing and are dropped (`skipped`).
    """

    def __init__(self, data, tokenizer=None, mask_instruction=False, max_length=None):
        tokenizer = tokenizer or get_tokenizer()
        self.mask_instruction = mask_instruction
        self.encoded_texts, self.learn = [], []
        self.truncated = self.skipped = 0
        for entry in data:
            ids, learn = encode_segments(record_segments(entry), tokenizer)
            if max_length and len(ids) > max_length:
                # target j predicts token j + 1; the end-of-text after the record falls beyond the cut
                if mask_instruction and not any(learn[1:max_length + 1]):
                    self.skipped += 1
                    continue
                self.truncated += 1
            self.encoded_texts.append(ids)
            self.learn.append(learn)

    def __len__(self):
        return len(self.encoded_texts)

    def __getitem__(self, i):
        if self.mask_instruction:
            return self.encoded_texts[i], self.learn[i]
        return self.encoded_texts[i]


def custom_collate_fn(batch, pad_token_id=EOT_ID, ignore_index=IGNORE_INDEX, allowed_max_length=None, device=None):
    """Token id lists (or (ids, learn) pairs) -> (inputs, targets), both (B, T) LongTensors.

    Each sequence gets one end-of-text appended and is padded with pad_token_id to the longest in the batch; the
    targets are the inputs shifted by one. The end-of-text is a target (the model learns to stop), every padding
    position after it is ignore_index, and so is every target whose learn flag is False (the prompt, under
    --mask_instruction). Then both are cut to allowed_max_length.
    """
    pairs = [item if isinstance(item, tuple) else (item, None) for item in batch]
    longest = max(len(ids) for ids, _ in pairs) + 1
    inputs, targets = [], []
    for ids, learn in pairs:
        n = len(ids)
        padded = torch.tensor(list(ids) + [pad_token_id] * (longest - n))
        x, y = padded[:-1], padded[1:].clone()  # y[j] = padded[j + 1]; y[n - 1] is the end-of-text
        y[n:] = ignore_index
        if learn is not None:
            prompt = ~torch.tensor(list(learn[1:]), dtype=torch.bool)  # targets 0..n-2 are tokens 1..n-1
            y[:n - 1][prompt] = ignore_index
        inputs.append(x)
        targets.append(y)
    inputs, targets = torch.stack(inputs), torch.stack(targets)
    if allowed_max_length is not None:
        inputs, targets = inputs[:, :allowed_max_length], targets[:, :allowed_max_length]
    if device is not None:
        inputs, targets = inputs.to(device), targets.to(device)
    return inputs, targets


class PreferenceDataset(Dataset):
    """Preference records -> dicts of token ids: prompt (template + response header), chosen and rejected (each
    the prompt followed by that response). Records whose prompt leaves no room for a response within max_length
    are dropped and counted in `skipped`; longer ones are counted in `truncated` (the collate cuts them)."""

    def __init__(self, data, tokenizer=None, max_length=None):
        tokenizer = tokenizer or get_tokenizer()
        self.encoded, self.truncated, self.skipped = [], 0, 0
        for entry in data:
            prompt = tokenizer.encode(format_prompt(entry), allowed_special={"<|endoftext|>"})
            chosen = prompt + tokenizer.encode(entry["chosen"], allowed_special={"<|endoftext|>"})
            rejected = prompt + tokenizer.encode(entry["rejected"], allowed_special={"<|endoftext|>"})
            if max_length and len(prompt) >= max_length:
                self.skipped += 1
                continue
            if max_length and max(len(chosen), len(rejected)) > max_length:
                self.truncated += 1
            self.encoded.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})

    def __len__(self):
        return len(self.encoded)

    def __getitem__(self, i):
        return self.encoded[i]


def preference_collate_fn(batch, pad_token_id=EOT_ID, allowed_max_length=None, mask_prompt=True, device=None):
    """PreferenceDataset items -> dict of (B, T) tensors: chosen, rejected (padded to one common length) and
    chosen_mask, rejected_mask (True on the tokens whose log-probability counts: the response, or with
    mask_prompt=False every real token)."""
    longest = max(max(len(item["chosen"]), len(item["rejected"])) for item in batch)
    out = {"chosen": [], "rejected": [], "chosen_mask": [], "rejected_mask": []}
    for item in batch:
        n_prompt = len(item["prompt"]) if mask_prompt else 0
        for key in ("chosen", "rejected"):
            ids = item[key]
            mask = torch.zeros(longest, dtype=torch.bool)
            mask[n_prompt:len(ids)] = True
            out[key].append(torch.tensor(list(ids) + [pad_token_id] * (longest - len(ids))))
            out[key + "_mask"].append(mask)
    out = {k: torch.stack(v)[:, :allowed_max_length] for k, v in out.items()}
    if device is not None:
        out = {k: v.to(device) for k, v in out.items()}
    return out


# ---------------------------------------------------------------------------------------------------------------
# Labelled text for classification (finetune_cls.py): the SMS Spam Collection, labelled CSVs, padded datasets
# ---------------------------------------------------------------------------------------------------------------

SMS_SPAM_URL = "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip"
# sha256 of the extracted SMSSpamCollection; the zip around it is not pinned, so its content is what gets checked
SMS_SPAM_SHA256 = "7d039a24a6083ed9ef0f806ebad56bbb976e3aeb8de05669173bfdc4996c239d"


def fetch_sms_spam(data_dir=None, base_url=None):
    """Path of data_dir/SMSSpamCollection (`label<TAB>text` lines). On first use the UCI zip is downloaded, the file
    is taken out of it and checked against SMS_SPAM_SHA256, and the zip is deleted. base_url (or the GPT2_DATA_URL
    environment variable) replaces the zip's host folder."""
    data_dir = data_dir or DATA_DIR
    path = os.path.join(data_dir, "SMSSpamCollection")
    if os.path.exists(path):
        if sha256_of(path) != SMS_SPAM_SHA256:
            raise UserError(f"{path} does not match the expected sha256 {SMS_SPAM_SHA256[:12]}...: delete it to "
                            f"download it again")
        return path
    url = SMS_SPAM_URL
    base_url = base_url or os.environ.get("GPT2_DATA_URL")
    if base_url:
        url = f"{base_url.rstrip('/')}/{SMS_SPAM_URL.rsplit('/', 1)[1]}"
    zip_path = os.path.join(data_dir, "sms_spam_collection.zip")
    if not os.path.exists(zip_path):
        print(f"downloading the SMS Spam Collection from {url}")
        download(url, zip_path)
    _extract_verified(zip_path, "SMSSpamCollection", path, SMS_SPAM_SHA256, url)
    os.remove(zip_path)
    return path


def _extract_verified(zip_path, member, path, sha256, url):
    """Write the zip entry named `member` (in any folder of the zip) to path if its sha256 matches. A zip that
    cannot be read, lacks the entry or holds the wrong bytes is deleted, so that a rerun downloads it again."""
    by_hand = f"download {url} yourself and place the extracted {member} at {path}"

    def refuse(why):
        os.remove(zip_path)
        return DownloadError(f"{zip_path} (from {url}) {why}; it was deleted: rerun to download it again, or "
                             f"{by_hand}")

    try:
        with zipfile.ZipFile(zip_path) as z:
            names = [n for n in z.namelist() if os.path.basename(n) == member]
            if not names:
                raise refuse(f"holds no {member} (it has {few(z.namelist())})")
            raw = z.read(names[0])
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as e:
        first = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise refuse(f"is not a readable zip ({first})") from None
    digest = hashlib.sha256(raw).hexdigest()
    if digest != sha256:
        raise refuse(f"holds a {member} with sha256 {digest[:12]}..., expected {sha256[:12]}...")
    atomic_write(path, lambda f: f.write(raw))


def read_sms_spam(path):
    """SMSSpamCollection -> list of (text, label), label 'ham' or 'spam'. Lines are split at the first tab only: the
    file has no quoting, and its texts contain quote characters."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            label, tab, text = line.partition("\t")
            if not tab or not label.strip():
                raise UserError(f"{path} line {line_no} is not `label<TAB>text`: delete the file to download it "
                                f"again")
            rows.append((text, label.strip()))
    return rows


def read_labelled_csv(path, text_column="Text", label_column="Label"):
    """A CSV (a .tsv is read tab-separated) with a header row -> list of (text, label).

    Rows with empty text are skipped, with a note on stderr that counts them and names their lines; a row with text
    but no label is refused. Every problem raises a UserError that says how to fix the file or the flags.
    """
    if not os.path.isfile(path):
        raise UserError(f"no CSV file at {path}: check the path")
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            content = f.read()
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 (bad byte at offset {e.start}): convert it, e.g. "
                        f"`iconv -f latin1 -t utf-8`") from None
    except OSError as e:
        raise UserError(f"cannot read {path} ({e.strerror}): check its permissions") from None
    if not content.strip():
        raise UserError(f"{path} is empty: it needs a header line naming the {label_column!r} and {text_column!r} "
                        f"columns, then one example per row")
    reader = csv.DictReader(io.StringIO(content, newline=""), delimiter="\t" if path.endswith(".tsv") else ",")
    rows, skipped = [], []
    try:
        found = [c for c in (reader.fieldnames or []) if c is not None]
        missing = [c for c in (text_column, label_column) if c not in found]
        if missing:
            raise UserError(f"{path} has no column {', '.join(map(repr, missing))} (columns found: "
                            f"{', '.join(map(repr, found)) or 'none'}): pass --text_column / --label_column")
        for r in reader:
            text, label = r.get(text_column) or "", (r.get(label_column) or "").strip()
            if not text.strip():
                skipped.append(reader.line_num)
                continue
            if not label:
                raise UserError(f"{path} line {reader.line_num} has text but an empty {label_column!r}: fill in "
                                f"its label or delete the row")
            rows.append((text, label))
    except csv.Error as e:
        fix = ("shorten that text (GPT-2 reads at most 1,024 tokens of it), or fix a quote that is never closed "
               "and runs on into the lines after it" if "field larger" in str(e) else "check its quotes and delimiters")
        raise UserError(f"{path} line {reader.line_num} is not valid CSV ({e}): {fix}") from None
    if skipped:
        note(f"{path}: skipped {len(skipped)} row(s) with empty {text_column!r} (lines {few(skipped)})")
    if not rows:
        raise UserError(f"{path} has no rows with text in column {text_column!r}: add examples")
    return rows


def write_labelled_csv(path, rows, text_column="Text", label_column="Label"):
    """Write (text, label) rows as a CSV with the columns label_column, text_column."""
    def write(f):
        w = csv.writer(f)
        w.writerow([label_column, text_column])
        w.writerows((label, text) for text, label in rows)
    return atomic_write(path, write, "w")


def class_names_of(labels):
    """The sorted distinct labels (numerically when they are all integers): position = class id."""
    names = set(labels)
    if all(re.fullmatch(r"-?\d+", n) for n in names):
        return sorted(names, key=int)
    return sorted(names)


def balance_classes(rows, seed=123):
    """Undersample every class to the size of the smallest, picking rows at random with a fixed seed (the book
    undersamples 'ham' to the 747 'spam' messages)."""
    by_class = {}
    for row in rows:
        by_class.setdefault(row[1], []).append(row)
    n = min(len(v) for v in by_class.values())
    rng = random.Random(seed)
    return [row for label in class_names_of(by_class) for row in rng.sample(by_class[label], n)]


def split_rows(rows, seed=123, train_frac=0.7, val_frac=0.1):
    """Shuffle with a fixed seed and cut into train / validation / test: int(n * 0.7), int(n * 0.1) and the rest."""
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    n_train, n_val = int(len(rows) * train_frac), int(len(rows) * val_frac)
    if n_val == 0 or len(rows) - n_train - n_val == 0:
        raise UserError(f"{len(rows)} examples are too few to split {train_frac:.0%}/{val_frac:.0%}/rest: need at "
                        f"least 10, or pass ready-made --train_csv/--val_csv/--test_csv")
    return rows[:n_train], rows[n_train:n_train + n_val], rows[n_train + n_val:]


class ClassificationDataset(Dataset):
    """Texts as token ids, right-padded with pad_id to max_length: item i is (ids (max_length,), label, length).

    max_length None = the longest text. Longer texts are cut to max_length tokens (`truncated` counts them).
    `length` is the number of real tokens, so a model can read its prediction off the last real token rather than
    off padding. labels None (texts to predict) gives label -1.
    """

    def __init__(self, texts, labels=None, tokenizer=None, max_length=None, pad_id=EOT_ID):
        tokenizer = tokenizer or get_tokenizer()
        encoded = [tokenizer.encode_ordinary(t) for t in texts]  # "<|endoftext|>" in a text is just text here
        self.longest = max(map(len, encoded), default=0)
        self.max_length = max_length or self.longest
        self.truncated = sum(len(ids) > self.max_length for ids in encoded)
        self.input_ids = torch.full((len(encoded), self.max_length), pad_id, dtype=torch.long)
        self.lengths = torch.zeros(len(encoded), dtype=torch.long)
        for i, ids in enumerate(encoded):
            ids = ids[:self.max_length]
            self.input_ids[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            self.lengths[i] = len(ids)
        self.labels = torch.tensor(labels if labels is not None else [-1] * len(encoded), dtype=torch.long)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.input_ids[i], self.labels[i], self.lengths[i]
