"""What every stage needs between text and tensors: the GPT-2 tokenizer, the book's GPTDatasetV1 and
create_dataloader_v1, text files, the token cache of a corpus and its training windows, verified downloads of the
corpora, and the Alpaca prompt template. Task data lives with its script (labelled CSVs in finetune_cls.py,
instruction and preference records in finetune_chat.py); writing and checking files in files.py.

    from data import get_tokenizer, text_to_token_ids, create_dataloader_v1, fetch_data
    path = fetch_data("the-verdict.txt")            # downloads once, checks sha256
    loader = create_dataloader_v1(open(path).read(), batch_size=2, max_length=256, stride=256)

    from data import token_cache, split_point, TokenWindows, RandomWindows
    tokens = token_cache("my_texts/").tokens        # tokenized once, memory-mapped on later runs
    split = split_point(cache, 0.9)                 # = token_cache("my_texts/"); tokens = cache.tokens
    train = RandomWindows(tokens, max_length=1024, end=split, seed=epoch)
    val = TokenWindows(tokens, max_length=1024, stride=1024, start=split)
"""
import codecs
import contextlib
import errno
import glob
import hashlib
import json
import mmap
import os
import re
import stat
import sys
import tempfile
import time
import zipfile
import zlib
from collections import deque, namedtuple
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import requests
import tiktoken
import torch
import urllib3
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from files import (CLOEXEC, NOFOLLOW, NONBLOCK, atomic_write, check_input, file_kind, make_folder, new_temp_file,
                   open_lock, unreadable, write_json)
from settings import UserError, cpu_count, few, get_config, note
from settings import entry as settings_entry  # "entry" names a record here

try:
    import fcntl
except ImportError:  # Windows: caches are built without a lock between processes
    fcntl = None

class DownloadError(UserError):
    pass


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------------------

EOT_ID = 50256  # <|endoftext|>, also used as padding
_TOKENIZER = None


# the files tiktoken downloads for GPT-2's BPE, and the names it caches them under (the sha1 of each URL)
TOKENIZER_FILES = {"https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe":
                   "6d1cbeee0f20b3d9449abfede4726ed8212e3aee",
                   "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json":
                   "6c7ea1a7e38e3a7f062df639a5b80947f075ffe6"}


def get_tokenizer():
    """tiktoken's GPT-2 BPE (cached; set TIKTOKEN_CACHE_DIR to work offline)."""
    global _TOKENIZER
    if _TOKENIZER is None:
        try:
            _TOKENIZER = tiktoken.get_encoding("gpt2")
        except Exception as e:
            folder = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR") or os.path.join(
                tempfile.gettempdir(), "data-gym-cache")
            files = " and ".join(f"{url} as {name}" for url, name in TOKENIZER_FILES.items())
            raise UserError(f"cannot load the GPT-2 tokenizer ({type(e).__name__}): connect to the internet once, or "
                            f"download {files} into {folder} (or into any folder that TIKTOKEN_CACHE_DIR then "
                            f"names)") from None
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


def read_text_file(path, flag="--data"):
    """Read a UTF-8 text file, or raise a UserError that says what is wrong with it (naming flag, its setting)."""
    if not os.path.exists(path):
        raise UserError(f"no file at {path}: check {flag}")
    if os.path.isdir(path):
        raise UserError(f"{flag} {path} is a folder: pass a text file")
    check_input(path, flag)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise UserError(f"cannot read {path} ({e.strerror}): check its permissions") from None
    problem = encoding_problem(path, raw[:65536])
    if problem:
        raise UserError(problem)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(not_utf8_message(path, e.start)) from None


def encoding_problem(path, head):
    """What makes a file that starts with the bytes `head` unreadable as UTF-8 text, as a UserError message; None
    when nothing is wrong with its start (a bad byte further on is found while decoding)."""
    if head.startswith((b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff")):
        return (f"{path} is UTF-32 (it starts with a UTF-32 byte-order mark): convert it to UTF-8, e.g. "
                f"`iconv -f utf-32 -t utf-8 {path} > converted.txt`")
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        return (f"{path} is UTF-16 (it starts with a UTF-16 byte-order mark): convert it to UTF-8, e.g. "
                f"`iconv -f utf-16 -t utf-8 {path} > converted.txt`")
    if b"\x00" not in head:
        return None
    # UTF-16 without a byte-order mark: mostly-ASCII text has a NUL in every other byte
    for order, nul_half, text_half in (("utf-16le", head[1::2], head[0::2]), ("utf-16be", head[0::2], head[1::2])):
        if len(head) >= 4 and nul_half.count(0) >= 0.9 * len(nul_half) and text_half.count(0) < 0.5 * len(text_half):
            return (f"{path} looks like {order.upper()} without a byte-order mark (every other byte is NUL): "
                    f"convert it to UTF-8, e.g. `iconv -f {order} -t utf-8 {path} > converted.txt`")
    return f"{path} looks binary (it holds NUL bytes): pass a UTF-8 text file"


def not_utf8_message(path, offset):
    return f"{path} is not UTF-8 (bad byte at offset {offset}): convert it, e.g. `iconv -f latin1 -t utf-8`"


def load_text(path):
    """A text file, or every .txt file in a folder (sorted, joined by <|endoftext|>)."""
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".txt"))
        if not files:
            raise UserError(f"folder {path} holds no .txt files: put text files there or pass a file to --data")
        return "<|endoftext|>".join(read_text_file(f) for f in files)
    return read_text_file(path)


# ---------------------------------------------------------------------------------------------------------------
# Token caches: a corpus (a file, or a folder of .txt, .md and .jsonl files) tokenized once into a file of uint16
# ids with a JSON description beside it, memory-mapped on every later start; windows over the ids for training
# ---------------------------------------------------------------------------------------------------------------

CACHE_FORMAT = 3                              # bump when the token file or its metadata changes meaning
CORPUS_SUFFIXES = (".txt", ".md", ".jsonl")   # what a --data folder is searched for
READ_BYTES = 1 << 20                          # bytes read from a source file at a time
PIECE_CHARS = 1 << 20                         # characters per tokenizer call (more only where no safe cut comes)
MAX_PIECE_CHARS = 4 << 20                     # a piece never grows past this looking for a safe cut (memory)
TOKENIZER_THREADS = None                      # threads tokenizing at once; None = every core this process may use
INDEX_TOKENS = 1 << 20                        # tokens between the (token, character) marks a file's entry keeps
EOT_TEXT = "<|endoftext|>"                    # the separator between documents, as text
GPT2_N_VOCAB = 50257

TokenCache = namedtuple("TokenCache", "tokens meta path")

# Where a text may be cut into pieces that tokenize, one by one, to the same ids as the whole text. GPT-2's
# pre-tokenizer splits text into pieces with
#     '(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+$|\s+(?!\S)|\s
# after cutting out the special tokens, and BPE never merges across pieces. A cut is safe where a piece boundary
# lies whatever text follows, and no piece before it looks past it:
# - before whitespace that follows non-whitespace ("word| next", "end.|\n"): the piece holding the non-whitespace
#   character ends there (whitespace can only be the first character of a non-whitespace piece), and the pieces
#   before it look no further. Not at the end of a whitespace run: "a  b" is "a", " ", " b", but "a  " alone ends
#   in the piece "  ". Python's \s covers every character GPT-2's \s does (and a few more), and U+180E and U+200B
#   were whitespace in older Unicode versions, so [^\s\u180e\u200b] is never whitespace to GPT-2.
# - right after <|endoftext|>: special tokens are cut out before the pre-tokenizer runs.
# - for text without whitespace (one giant line of CJK, say): before a digit or punctuation mark that follows a
#   letter, both from a few ranges whose Unicode categories never changed: the letter piece ends at the first
#   non-letter and a digit or punctuation piece starts there. Not before ' (it starts contractions, "'s") or |
#   (it sits inside <|endoftext|>).
_CUT_BEFORE_SPACE = re.compile(r"(?s).*[^\s\u180e\u200b](?=[\t\n\r ])")  # greedy: finds the last such position
_FALLBACK_LETTERS = "A-Za-z\u0410-\u044f\u3041-\u3096\u30a1-\u30fa\u4e00-\u9fa5\uac00-\ud7a3"
_FALLBACK_MARKS = "0-9" + re.escape("!\"#$%&()*+,-./:;<=>?@[\\]^_`{}~") + "\u3001\u3002\uff01\uff0c\uff1a\uff1b\uff1f"
_CUT_AFTER_LETTER = re.compile(f"(?s).*[{_FALLBACK_LETTERS}](?=[{_FALLBACK_MARKS}])")


def safe_cut(text, start=0, end=None):
    """The last position p in start < p <= end where text can be cut without changing its tokens (see above); 0 if
    there is none."""
    end = len(text) if end is None else end
    m = _CUT_BEFORE_SPACE.match(text, start, end)
    cut = m.end() if m else 0
    eot = text.rfind(EOT_TEXT, start, end)
    if eot >= 0:
        cut = max(cut, eot + len(EOT_TEXT))
    if cut == 0:
        m = _CUT_AFTER_LETTER.match(text, start, end)
        cut = m.end() if m else 0
    return cut


def safe_pieces(blocks, size=None, on_forced_cut=None, longest=None):
    """Text blocks (a file read in parts) -> pieces of at most `size` characters, cut only where safe_cut allows,
    so that tokenizing the pieces one by one gives the tokens of the whole text. Where no safe cut lies within
    `size` characters, the piece grows until one comes, up to `longest` (MAX_PIECE_CHARS) characters; text
    with no safe cut even that far (one giant "word") is cut after `size` characters anyway (never inside an
    <|endoftext|>), so memory stays bounded: the tokens at such a cut may differ from the whole text's, and
    on_forced_cut() is called at each one."""
    size = size or PIECE_CHARS
    longest = max(longest or MAX_PIECE_CHARS, size)
    parts, held, reach = [], 0, size  # reach: how far to look for a cut
    barren = 0  # no safe cut lies before this position of the joined text (so it is not searched again)
    for block in blocks:
        parts.append(block)
        held += len(block)
        if held <= reach:
            continue
        text, pos = "".join(parts), 0
        while len(text) - pos > reach:
            # search only what was not searched in vain before (from a little earlier: a <|endoftext|> may end there)
            cut = safe_cut(text, max(pos, barren - len(EOT_TEXT)), pos + reach)
            if not cut and reach >= longest:
                if len(text) < pos + size + len(EOT_TEXT):
                    break  # read on: an <|endoftext|> around the cut must be seen whole
                barren = max(barren, pos + reach)
                cut = _outside_eot(text, pos + size)
                if on_forced_cut is not None:
                    on_forced_cut()
            if cut:
                yield text[pos:cut]
                pos, reach = cut, size
            else:
                reach = min(2 * reach, longest)
        parts, held, barren = [text[pos:]], len(text) - pos, max(barren - pos, 0)
    text = "".join(parts)
    if text:
        yield text


def _outside_eot(text, cut):
    """cut, or the end of an <|endoftext|> that it would split."""
    start = text.find(EOT_TEXT, max(cut - len(EOT_TEXT) + 1, 0), cut + len(EOT_TEXT) - 1)
    return start + len(EOT_TEXT) if 0 <= start < cut else cut


def _open_source(path):
    try:
        return open(path, "rb")
    except OSError as e:
        raise UserError(f"cannot read {path} ({e.strerror}): check its permissions") from None


def text_file_blocks(path, bar=None):
    """The text of a UTF-8 file in blocks of about READ_BYTES; a UserError names the first problem."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with _open_source(path) as f:
        while True:
            raw = f.read(READ_BYTES)
            if offset == 0 and (problem := encoding_problem(path, raw[:65536])):
                raise UserError(problem)
            held = len(decoder.getstate()[0])  # bytes of a character cut by the previous block
            try:
                text = decoder.decode(raw, final=not raw)
            except UnicodeDecodeError as e:
                raise UserError(not_utf8_message(path, offset - held + e.start)) from None
            offset += len(raw)
            if bar is not None:
                bar.update(len(raw))
            if text:
                yield text
            if not raw:
                return


def jsonl_blocks(path, text_field="text", bar=None):
    """The text_field of each record of a JSON Lines file, with <|endoftext|> between records. Blank lines are
    skipped; any other line that is not a JSON object with that text field is a UserError naming the line."""
    with _open_source(path) as f:
        if problem := encoding_problem(path, f.read(65536)):
            raise UserError(problem)
        f.seek(0)
        offset, first = 0, True
        for line_no, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(not_utf8_message(path, offset + e.start)) from None
            offset += len(raw)
            if bar is not None:
                bar.update(len(raw))
            if line_no == 1:
                line = line.removeprefix("\ufeff")
            if not line.strip():
                continue
            if not first:
                yield EOT_TEXT
            yield record_text(line, path, line_no, text_field)
            first = False


def record_text(line, path, line_no, text_field):
    """The text of one JSON Lines record, or a UserError that says what is wrong with the line."""
    where = f"{path} line {line_no}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{where} is not valid JSON ({e.msg}, column {e.colno}): fix or delete that line (a .jsonl "
                        f"file holds one JSON object per line)") from None
    except RecursionError:  # the parser's own limit, cheaper than measuring every line's depth first
        raise UserError(f"{where} nests its JSON too deeply to read: fix or delete that line (a record is an "
                        f"object with a {text_field!r} text field)") from None
    if not isinstance(record, dict):
        raise UserError(f"{where} is a JSON {type(record).__name__}, expected an object with a {text_field!r} "
                        f"field")
    if text_field not in record:
        raise UserError(f"{where} has no {text_field!r} field (it has {few(map(repr, record))}): pass "
                        f"--text_field with the name of the field that holds the text")
    text = record[text_field]
    if not isinstance(text, str):
        raise UserError(f"{where}: field {text_field!r} is a JSON {type(text).__name__}, expected text")
    return text


def corpus_files(data_path, include_hidden=False):
    """(root, files): the absolute path of a corpus and its files, each a dict of path (relative to a folder,
    "/"-separated; a file's own name) and its stat (STAT_KEYS). A folder is searched recursively for .txt, .md and
    .jsonl files, not following links to folders, and sorted by relative path; hidden files and folders (names that
    start with ".") are skipped unless include_hidden, with a note that says how many. Entries that cannot be read
    (FIFOs, sockets, broken links, no permission) are skipped with a note each; they are never opened, so a FIFO
    cannot block."""
    root = os.path.abspath(data_path)
    if not os.path.isdir(root):
        return root, [_single_file(data_path, root)]
    files, hidden = [], 0

    def unlistable(e):
        note(f"skipped folder {e.filename} ({e.strerror})")

    for folder, dirs, names in os.walk(root, onerror=unlistable):
        for d in [d for d in dirs if os.path.islink(os.path.join(folder, d))]:
            if not d.startswith("."):
                note(f"skipped {os.path.join(folder, d)}: a link to a folder (links to folders are not followed)")
        hidden += sum(d.startswith(".") for d in dirs) if not include_hidden else 0
        dirs[:] = [d for d in dirs if include_hidden or not d.startswith(".")]
        for name in names:
            if name.startswith(".") and not include_hidden:
                hidden += 1
                continue
            if not name.lower().endswith(CORPUS_SUFFIXES):
                continue
            full = os.path.join(folder, name)
            why, st = unreadable(full)
            if why:
                note(f"skipped {full}: {why}")
                continue
            files.append(_file_entry(os.path.relpath(full, root).replace(os.sep, "/"), st))
    if hidden:
        note(f"skipped {hidden} hidden file(s) and folder(s) in {data_path} (names starting with \".\"): pass "
             f"--include_hidden to read them too")
    if not files:
        raise UserError(f"folder {data_path} holds no readable .txt, .md or .jsonl files: put text files there or "
                        f"pass a file to --data" + (" (or --include_hidden for the hidden ones)" if hidden else ""))
    return root, sorted(files, key=lambda f: f["path"])


def _single_file(data_path, root):
    if not os.path.lexists(root):
        raise UserError(f"no file at {data_path}: check the path or pass --data")
    why, st = unreadable(root)
    if why:
        raise UserError(f"cannot read {data_path}: {why}; pass a text file or a folder")
    return _file_entry(os.path.basename(root), st)


# What a cache compares to tell that a source changed, as git does: size and mtime, and the inode number and ctime,
# which a file replaced by another of the same size and mtime (cp -p, tar -x, rsync -t) does not keep
STAT_KEYS = ("size", "mtime_ns", "ctime_ns", "ino")


def _file_entry(rel, st):
    return {"path": rel, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns,
            "ino": st.st_ino}


def cache_paths(data_path, cache_dir=None):
    """(token file, metadata file) of a corpus's cache: <cache_dir>/<name>-<hash of its absolute path>.bin and
    .json, cache_dir defaulting to the token-cache folder in DATA_DIR (GPT2_DATA_DIR)."""
    root = os.path.abspath(data_path)
    digest = hashlib.sha256(os.fsencode(root)).hexdigest()[:8]
    stem = os.path.join(cache_dir or os.path.join(DATA_DIR, "token-cache"), f"{os.path.basename(root)}-{digest}")
    return stem + ".bin", stem + ".json"


def token_cache(data_path, cache_dir=None, text_field="text", progress=True, include_hidden=False):
    """A corpus (a file, or a folder of .txt, .md and .jsonl files) as GPT-2 token ids: TokenCache(tokens, meta,
    path), tokens a read-only uint16 numpy.memmap of the cache file at path, meta its metadata (cache_meta).

    Documents (each file; each record of a .jsonl file, its text_field) are joined by <|endoftext|>, and
    "<|endoftext|>" inside a text is that special token, as in load_text + encode. The first call tokenizes the
    corpus in pieces on every core, with a progress bar on stderr; later calls only stat the sources and map the
    file. A changed or removed source rebuilds the cache; added files are tokenized and appended (after the files
    already cached, so their order is kept). The token file is complete before the metadata that vouches for it is
    written, so a killed build leaves no cache that a later call accepts. A lock file serializes processes (DDP
    ranks) that build the same cache.
    """
    root, files = corpus_files(data_path, include_hidden)
    bin_path, meta_path = cache_paths(data_path, cache_dir)
    try:
        return _cached_or_built(data_path, root, files, bin_path, meta_path, text_field, progress)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM):
            raise
        raise UserError(f"cannot write the token cache {bin_path} ({e.strerror}): free some space, or set "
                        f"GPT2_DATA_DIR to a writable folder with room for about half the corpus's size") from None


def _cached_or_built(data_path, root, files, bin_path, meta_path, text_field, progress):
    """token_cache's work, under the lock that keeps other processes from building the same cache."""
    make_folder(os.path.dirname(bin_path), "the token cache (--cache_dir, or GPT2_DATA_DIR)")
    if all(f["size"] == 0 for f in files):
        raise UserError(f"{data_path} holds no text: add some")
    with _exclusive_lock(os.path.join(os.path.dirname(bin_path), ".lock")):  # one lock for the cache folder
        meta = committed_meta(bin_path, meta_path, root, text_field)
        if meta is not None:
            gone = changed_files(meta["files"], files)
            if gone:
                note(f"{few(gone)} changed since the token cache was built: tokenizing {data_path} again")
                meta = None
        if meta is None:
            meta = _build_cache(root, files, bin_path, meta_path, text_field, progress)
        else:
            cached = {f["path"] for f in meta["files"]}
            added = [f for f in files if f["path"] not in cached]
            if added:
                meta = _extend_cache(root, meta, added, bin_path, meta_path, progress)
        if meta["n_tokens"] == 0:
            raise UserError(f"{data_path} holds no text: add some")
        tokens = np.memmap(bin_path, dtype=np.uint16, mode="r", shape=(meta["n_tokens"],))
    return TokenCache(tokens, meta, bin_path)


def cache_meta(root, text_field, files):
    """The metadata of a token cache. files: per source file its path, stat (STAT_KEYS), the offset and count of
    its tokens (the <|endoftext|> before a file belongs to neither file), its characters, and an index of
    [token, character] marks within it, about every INDEX_TOKENS tokens (split_point starts counting there)."""
    return {"format": CACHE_FORMAT, "tokenizer": "gpt2", "n_vocab": GPT2_N_VOCAB, "separator_id": EOT_ID,
            "dtype": "uint16", "n_tokens": sum(f["n_tokens"] for f in files) + max(len(files) - 1, 0),
            "source": root, "text_field": text_field, "files": files}


def committed_meta(bin_path, meta_path, root, text_field):
    """The metadata of a complete cache of root at these paths, or None (no cache, an unfinished or foreign one).
    Tokens beyond the count in the metadata (an extension that was killed) are cut off the token file. A link in
    place of either file is not a cache of ours (nothing is written through it)."""
    if os.path.islink(bin_path) or os.path.islink(meta_path):
        note(f"the token cache {bin_path} or its metadata is a link: building it again")
        return None
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
        size = os.path.getsize(bin_path)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        note(f"cannot use the token cache {meta_path} ({e}): building it again")
        return None
    fixed = {k: v for k, v in cache_meta(root, text_field, []).items() if k not in ("n_tokens", "files")}
    if not isinstance(meta, dict) or any(meta.get(k) != v for k, v in fixed.items()):
        return None  # another format, tokenizer, source or text field
    files = meta.get("files")
    consistent = (meta.get("checksum") == with_checksum(meta)["checksum"] and type(meta.get("n_tokens")) is int
                  and isinstance(files, list) and all(map(_cached_entry_ok, files))
                  and meta["n_tokens"] == cache_meta(root, text_field, files)["n_tokens"]
                  and [f["offset"] for f in files] == _offsets(files))
    if not consistent:
        note(f"the token cache {meta_path} does not add up: building it again")
        return None
    if size < 2 * meta["n_tokens"]:
        note(f"the token file {bin_path} is shorter than its metadata says: building it again")
        return None
    if size > 2 * meta["n_tokens"]:
        os.truncate(bin_path, 2 * meta["n_tokens"])
    return meta


def with_checksum(meta):
    """meta with its "checksum": the sha256 of the rest, so that metadata edited by hand is rebuilt, not trusted."""
    rest = {k: v for k, v in meta.items() if k != "checksum"}
    text = json.dumps(rest, sort_keys=True, ensure_ascii=False)
    return {**rest, "checksum": hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()}


def _offsets(files):
    """Where each file's tokens start: after the tokens of the files before it and one separator each."""
    offsets, position = [], 0
    for f in files:
        offsets.append(position)
        position += f["n_tokens"] + 1
    return offsets


def _cached_entry_ok(f):
    """Whether one file's entry in the metadata has every field, of the right type (it may have been edited)."""
    return (isinstance(f, dict) and isinstance(f.get("path"), str)
            and all(type(f.get(k)) is int for k in (*STAT_KEYS, "offset", "n_tokens", "n_chars"))
            and isinstance(f.get("index"), list)
            and all(isinstance(m, list) and len(m) == 2 and all(type(x) is int for x in m) for m in f["index"]))


def changed_files(cached, files):
    """Paths of the cached files that are gone or whose stat (STAT_KEYS) changed."""
    now = {f["path"]: [f[k] for k in STAT_KEYS] for f in files}
    return [f["path"] for f in cached if now.get(f["path"]) != [f[k] for k in STAT_KEYS]]


def _build_cache(root, files, bin_path, meta_path, text_field, progress):
    """Tokenize files into a new cache (see token_cache); returns its metadata."""
    for path in [meta_path, bin_path]:
        if os.path.lexists(path):  # the metadata first: it must not vouch for what comes next
            os.remove(path)
    _remove_leftovers(bin_path, meta_path)
    fd, tmp = new_temp_file(bin_path)
    try:
        with open(fd, "wb") as out:
            entries = tokenize_files(root, files, out, text_field, progress)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, bin_path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    meta = cache_meta(root, text_field, entries)
    assert os.path.getsize(bin_path) == 2 * meta["n_tokens"]
    meta = with_checksum(meta)
    write_json(meta_path, meta)
    return meta


def _extend_cache(root, meta, added, bin_path, meta_path, progress):
    """Append the tokens of added files to a cache; returns the new metadata. Killed midway, the old metadata still
    holds and committed_meta cuts the partial tokens off."""
    note(f"{len(added)} file(s) added since the token cache was built: tokenizing them")
    _remove_leftovers(bin_path, meta_path)
    with open(os.open(bin_path, os.O_RDWR | NOFOLLOW | CLOEXEC), "r+b") as out:  # never through a link
        out.seek(2 * meta["n_tokens"])
        entries = tokenize_files(root, added, out, meta["text_field"], progress, offset=meta["n_tokens"],
                                 after=True)
        out.flush()
        os.fsync(out.fileno())
    meta = cache_meta(root, meta["text_field"], meta["files"] + entries)
    assert os.path.getsize(bin_path) == 2 * meta["n_tokens"]
    meta = with_checksum(meta)
    write_json(meta_path, meta)
    return meta


def _remove_leftovers(bin_path, meta_path):
    """Delete the temporary files of builds that were killed (callers hold the cache's lock)."""
    for path in glob.glob(glob.escape(bin_path) + ".*.tmp") + glob.glob(glob.escape(meta_path) + ".*.tmp"):
        os.remove(path)


def tokenize_files(root, files, out, text_field, progress, offset=0, after=False):
    """Tokenize files in order and write their ids to out as uint16, <|endoftext|> between files (and before the
    first one when they come `after` files already cached, whose tokens end at `offset`). Returns the files'
    entries with the offset and count of their tokens.

    Pieces of about PIECE_CHARS characters are tokenized by a pool of threads (the tokenizer releases the GIL)
    while this thread reads on; at most two pieces per thread wait, so memory does not grow with the corpus.
    """
    tokenizer = get_tokenizer()
    assert tokenizer.name == "gpt2" and tokenizer.n_vocab == GPT2_N_VOCAB < 2 ** 16
    threads = TOKENIZER_THREADS or cpu_count()
    entries, waiting = [], deque()  # waiting: (entry, characters, future of the piece's ids), in file order
    separator = np.array([EOT_ID], dtype=np.uint16)
    name = os.path.basename(root)
    start = time.time()
    told = []

    def forced(path):  # said once per call: a corpus of such files would otherwise say it for every file
        if not told:
            told.append(path)
            note(f"{path} holds over {MAX_PIECE_CHARS:,} characters with no place where GPT-2's "
                 f"tokenizer splits text (no space, digit or punctuation): such text is cut every {PIECE_CHARS:,} "
                 f"characters to bound memory, and the few tokens at each cut may differ from the whole text's")

    def write_oldest():
        entry, chars, ids = waiting.popleft()
        ids = ids.result()
        if entry is not None:
            if entry["n_tokens"] >= entry["index"][-1][0] + INDEX_TOKENS:  # a mark to start counting from
                entry["index"].append([entry["n_tokens"], entry["n_chars"]])
            entry["n_tokens"] += len(ids)
            entry["n_chars"] += chars
        out.write(ids.tobytes())

    with ThreadPoolExecutor(threads) as pool, tqdm(
            total=sum(f["size"] for f in files), unit="B", unit_scale=True,
            desc=f"tokenizing {name}", disable=not (progress and sys.stderr.isatty()), leave=False,
            file=sys.stderr) as bar:
        for f in files:
            entry = dict(f, offset=None, n_tokens=0, n_chars=0, index=[[0, 0]])
            if after or entries:
                waiting.append((None, 0, pool.submit(lambda: separator)))
            entries.append(entry)
            path = os.path.join(root, f["path"]) if os.path.isdir(root) else root
            blocks = (jsonl_blocks(path, text_field, bar) if path.lower().endswith(".jsonl")
                      else text_file_blocks(path, bar))
            for piece in safe_pieces(blocks, on_forced_cut=lambda path=path: forced(path)):
                waiting.append((entry, len(piece), pool.submit(piece_ids, tokenizer, piece)))
                while len(waiting) > 2 * threads:
                    write_oldest()
        while waiting:
            write_oldest()
    position = offset + after
    for entry in entries:
        entry["offset"] = position
        position += entry["n_tokens"] + 1
    if progress:
        mb, seconds = sum(f["size"] for f in files) / 1e6, time.time() - start
        size = f"{mb:,.1f} MB" if mb >= 1 else f"{mb * 1000:,.1f} kB"
        print(f"tokenized {size} of {name} into {position - 1 - offset:,} tokens in {seconds:.1f} s "
              f"({mb / max(seconds, 1e-9):.1f} MB/s)")
    return entries


def piece_ids(tokenizer, text):
    """The ids of one piece of text as uint16, "<|endoftext|>" in it as the special token."""
    to_numpy = getattr(tokenizer, "encode_to_numpy", None)  # tiktoken >= 0.8: no list of Python ints on the way
    try:
        ids = to_numpy(text, allowed_special={EOT_TEXT}) if to_numpy else None
    except UnicodeEncodeError:  # lone surrogates (from JSON escapes): encode() replaces them
        ids = None
    if ids is None:
        ids = tokenizer.encode(text, allowed_special={EOT_TEXT})
    return np.asarray(ids, dtype=np.uint16)


@contextlib.contextmanager
def _exclusive_lock(path):
    """Hold an exclusive lock on path: one process builds a cache, the others wait for it. Without fcntl (Windows),
    or in a folder this process cannot write (a cache there can only be read), it goes without."""
    try:
        f = open_lock(path)
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EROFS, errno.EPERM):
            raise
        f = None
    if f is None or fcntl is None:
        yield
        return
    with f:
        deadline = time.time() + 2  # a short wait (another process reusing the cache) goes unmentioned
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.time() > deadline:
                    note(f"waiting for another process that holds {path}")
                    fcntl.flock(f, fcntl.LOCK_EX)
                    break
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def split_point(cache, train_ratio):
    """The token where validation starts: the one holding the character at train_ratio of the corpus's text (the
    separators count as the 13 characters of "<|endoftext|>"). A one-file corpus then splits where the book splits
    its text before tokenizing it, text[:int(train_ratio * len(text))]; train on [0, split), validate on the rest."""
    files, tokens = cache.meta["files"], cache.tokens
    sep = len(EOT_TEXT)
    target = int(train_ratio * (sum(f["n_chars"] for f in files) + sep * (len(files) - 1)))
    seen = 0  # characters before the current file
    for i, f in enumerate(files):
        if i:
            seen += sep
            if target < seen:
                return f["offset"] - 1  # the separator before this file
        if target < seen + f["n_chars"]:
            token, chars = max((m for m in f["index"] if m[1] <= target - seen), key=lambda m: m[0])
            return f["offset"] + token + _tokens_within(tokens[f["offset"] + token:], target - seen - chars)
        seen += f["n_chars"]
    return len(tokens)


def _tokens_within(tokens, chars):
    """How many tokens from the start of `tokens` end within its first `chars` characters."""
    counts, done = _char_counts(), 0
    for start in range(0, len(tokens), INDEX_TOKENS):
        ends = np.cumsum(counts[np.asarray(tokens[start:start + INDEX_TOKENS])])
        n = int(np.searchsorted(ends, chars - done, side="right"))
        if n < len(ends):
            return start + n
        done += int(ends[-1])
    return len(tokens)


_CHAR_COUNTS = None


def _char_counts():
    """Characters of each GPT-2 token: its UTF-8 bytes that start a character (not 10xxxxxx continuation bytes)."""
    global _CHAR_COUNTS
    if _CHAR_COUNTS is None:
        tokenizer = get_tokenizer()
        _CHAR_COUNTS = np.array([sum(b & 0xC0 != 0x80 for b in tokenizer.decode_single_token_bytes(i))
                                 for i in range(tokenizer.n_vocab)], dtype=np.int64)
    return _CHAR_COUNTS


class _TokenSpan(Dataset):
    """Windows over tokens[start:end]. A whole memory-mapped file pickles as its name, so DataLoader workers
    started by spawn or forkserver map the file instead of receiving a copy of the corpus."""

    def __init__(self, tokens, max_length, start, end):
        end = len(tokens) if end is None else end
        if not 0 <= start <= end <= len(tokens) or max_length < 1:
            raise ValueError(f"bad window range: start {start}, end {end}, max_length {max_length} over "
                             f"{len(tokens)} tokens")
        self.tokens, self.max_length, self.start, self.end = tokens, max_length, start, end

    def window(self, s):
        """(input, target) LongTensors of max_length starting at token s."""
        chunk = torch.from_numpy(np.asarray(self.tokens[s:s + self.max_length + 1], dtype=np.int64))
        return chunk[:-1], chunk[1:]

    def __getstate__(self):
        state = dict(self.__dict__)
        t = self.tokens
        if isinstance(t, np.memmap) and isinstance(t.base, mmap.mmap) and t.offset == 0 and t.ndim == 1:
            state["tokens"] = (t.filename, t.dtype.str, len(t))
        return state

    def __setstate__(self, state):
        if isinstance(state["tokens"], tuple):
            filename, dtype, n = state["tokens"]
            state["tokens"] = np.memmap(filename, dtype=dtype, mode="r", shape=(n,))
        self.__dict__.update(state)


class TokenWindows(_TokenSpan):
    """Sliding windows over tokens[start:end] (a uint16 memmap, or any 1-D array of ids): window i starts at
    start + i * stride; item i is (input, target), LongTensors of max_length, the target shifted by one. The
    windows of GPTDatasetV1 over the same ids, converted one at a time instead of held as a tensor."""

    def __init__(self, tokens, max_length, stride, start=0, end=None):
        super().__init__(tokens, max_length, start, end)
        self.stride = stride
        self.n = len(range(0, self.end - self.start - max_length, stride))

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if not 0 <= i < self.n:
            raise IndexError(f"window {i} of {self.n}")
        return self.window(self.start + i * self.stride)


class RandomWindows(_TokenSpan):
    """Windows at pseudo-random offsets in tokens[start:end], for corpora too big to visit every window in order.

    Item i starts at an offset computed from (seed, i) alone: no permutation is stored, and any index gives the
    same window every time, so a sequential sampler, a DistributedSampler's share of the indices and a run resumed
    at index k all work. len = (end - start) // max_length, so one pass reads about as many tokens as the range
    holds; offsets are drawn with replacement (some windows overlap, some text is missed), and a new seed per epoch
    draws new ones.
    """

    def __init__(self, tokens, max_length, start=0, end=None, seed=0):
        super().__init__(tokens, max_length, start, end)
        self.n_starts = self.end - self.start - max_length  # a window needs max_length + 1 tokens
        self.n = (self.end - self.start) // max_length if self.n_starts > 0 else 0
        self.seed = seed
        self.key = _mix64(seed)

    def set_epoch(self, epoch):
        """Draw the offsets of another epoch (the training loop calls this before each one)."""
        self.key = _mix64(self.seed * 1000 + epoch)

    def __len__(self):
        return self.n

    def offset(self, i):
        """Where window i starts."""
        if not 0 <= i < self.n:
            raise IndexError(f"window {i} of {self.n}")
        return self.start + _mix64(self.key + i * 0x9E3779B97F4A7C15) % self.n_starts

    def __getitem__(self, i):
        return self.window(self.offset(i))


def _mix64(x):
    """splitmix64's finalizer: a cheap 64-bit hash whose outputs look independent for consecutive inputs."""
    x &= 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


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


DOWNLOAD_STALL_S = 60                # seconds: a download that brings under DOWNLOAD_MIN_BYTES in that long stalled
DOWNLOAD_MIN_BYTES = 64 << 10        # bytes each DOWNLOAD_STALL_S must bring (a trickle of bytes is a stall too)
DOWNLOAD_DEADLINE_S = 12 * 3600      # seconds one download may take in all, its retries included
DOWNLOAD_MAX_BYTES = 100 << 20       # size cap of a download that names none (the corpora and the SMS zip)
JSON_MAX_BYTES = 1 << 20             # size cap of a downloaded JSON file (config.json)


class _TooBig(DownloadError):
    pass


def download(url, path, sha256=None, retries=3, timeout=30, desc=None, progress=True, max_bytes=None,
             stall_s=None, deadline_s=None):
    """Fetch url to path: streamed with a tqdm bar into path + '.part', resumed with an HTTP Range request when a
    partial file exists, checked against sha256, then renamed into place. Raises DownloadError naming the URL and
    the path where the file can be placed by hand.

    Bounded: at most max_bytes (DOWNLOAD_MAX_BYTES if None; a server that announces a larger size, or sends more,
    is refused), a stall when a window of stall_s seconds (DOWNLOAD_STALL_S) brings under DOWNLOAD_MIN_BYTES, and
    deadline_s (DOWNLOAD_DEADLINE_S) in all; the error says which bound was hit. The .part file is never opened
    through a link, and a link, pipe or folder there is refused."""
    make_folder(os.path.dirname(os.path.abspath(path)), f"the download of {url}")
    part = path + ".part"
    by_hand = f"download {url} yourself and place it at {path}"
    max_bytes = max_bytes or DOWNLOAD_MAX_BYTES
    stall_s = stall_s or DOWNLOAD_STALL_S
    deadline = time.monotonic() + (deadline_s or DOWNLOAD_DEADLINE_S)
    last = None
    for attempt in range(1, retries + 1):
        try:
            have = _part_size(part, by_hand)
            headers = {"Range": f"bytes={have}-"} if have else {}
            with requests.get(url, stream=True, timeout=(timeout, min(timeout, stall_s)), headers=headers) as r:
                if r.status_code == 416:  # the .part file is already complete (or bigger than the file)
                    r.close()
                else:
                    r.raise_for_status()
                    if have and r.status_code != 206:
                        have = 0  # server ignored the Range header: start over
                    total = int(r.headers.get("content-length", 0)) + have
                    if total > max_bytes:
                        raise _TooBig(f"{url} announces {total:,} bytes, over the {max_bytes:,}-byte cap for this "
                                      f"file")
                    # keep the bytes of a transfer cut short (urllib3 would drop them); we check the length below
                    r.raw.enforce_content_length = False
                    with _open_part(part, have, by_hand) as f, tqdm(
                            total=total or None, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
                            desc=desc or os.path.basename(path), disable=not progress, leave=False) as bar:
                        _stream(r, f, bar, have, min(total or max_bytes, max_bytes), url, stall_s,
                                (deadline, deadline_s or DOWNLOAD_DEADLINE_S))
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
        except _TooBig as e:
            with contextlib.suppress(OSError):
                os.remove(part)
            raise DownloadError(f"{e}; nothing was kept: check the URL or mirror, or {by_hand}") from None
        except DownloadError:
            raise
        except (requests.RequestException, OSError) as e:
            last = e
            if isinstance(e, requests.HTTPError) and e.response is not None and e.response.status_code < 500:
                break  # 404 and friends will not change on retry
            if time.monotonic() >= deadline:
                break
            if attempt < retries:
                time.sleep(min(2 ** attempt, 10) * 0.25)
    reason = type(last).__name__ if last is not None else "unknown error"
    if isinstance(last, requests.HTTPError) and last.response is not None:
        reason = f"HTTP {last.response.status_code}"
    elif last is not None and str(last):
        reason = str(last).splitlines()[0][:120]
    raise DownloadError(f"could not download {url} ({reason}); rerun to resume, or {by_hand}")


def _stream(r, f, bar, have, cap, url, stall_s, deadline):
    """Copy the body of response r into f until it ends, refusing more than cap bytes in all, a window of stall_s
    seconds with under DOWNLOAD_MIN_BYTES, and deadline: (its time.monotonic(), its length in seconds)."""
    read = getattr(r.raw, "read1", None)  # urllib3 >= 2: returns what has come, so a trickle is seen as it comes
    blocks = iter(lambda: read(1 << 16, decode_content=True), b"") if read else r.iter_content(1 << 16)
    got, window_start, window_got = have, time.monotonic(), 0
    while True:
        try:
            block = next(blocks, b"")
        except urllib3.exceptions.HTTPError as e:  # what requests' iter_content would raise as its own errors
            raise requests.ConnectionError(str(e).rsplit(": ", 1)[-1] or type(e).__name__) from None
        if not block:
            return
        got += len(block)
        if got > cap:
            raise _TooBig(f"{url} sent more than the {cap:,}-byte cap for this file")
        f.write(block)
        bar.update(len(block))
        now, window_got = time.monotonic(), window_got + len(block)
        if now > deadline[0]:
            raise IOError(f"the download passed its deadline of {deadline[1]:g} s (got {got:,} bytes)")
        if now - window_start > stall_s:
            if window_got < DOWNLOAD_MIN_BYTES:
                raise IOError(f"the download stalled: {window_got:,} bytes in {now - window_start:.0f} s (under "
                              f"{DOWNLOAD_MIN_BYTES:,} per {stall_s:g} s)")
            window_start, window_got = now, 0


def _part_size(part, by_hand):
    """Bytes of an earlier partial download at part (0 when none); a link, pipe or folder there is refused."""
    try:
        st = os.lstat(part)
    except FileNotFoundError:
        return 0
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        what = ("a symbolic link" if stat.S_ISLNK(st.st_mode) else file_kind(st) if not stat.S_ISREG(st.st_mode)
                else "a hard link to another file")
        raise DownloadError(f"{part} is {what}, not a partial download: delete it and rerun, or {by_hand}")
    return st.st_size


def _open_part(part, have, by_hand):
    """The partial download file for appending (emptied unless have > 0), never opened through a link."""
    try:
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | NOFOLLOW | NONBLOCK | CLOEXEC, 0o666)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
            raise DownloadError(f"{part} is not a regular file (a link, folder or pipe was put there): delete it "
                                f"and rerun, or {by_hand}") from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        os.close(fd)
        raise DownloadError(f"{part} is not a partial download of ours: delete it and rerun, or {by_hand}")
    if not have:
        os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_END)
    return open(fd, "ab")


def fetch_data(name, data_dir=None, base_url=None):
    """Path of a known corpus (DATA_FILES), downloaded and verified on first use. base_url (or the GPT2_DATA_URL
    environment variable) replaces the host folder, e.g. for a mirror."""
    url, digest = DATA_FILES[name]
    data_dir = data_dir or DATA_DIR
    path = os.path.join(data_dir, name)
    if os.path.lexists(path):
        if sha256_of(check_input(path, f"the {name} download")) != digest:
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
    if os.path.lexists(path):
        if sha256_of(check_input(path, "the SMS Spam Collection")) != SMS_SPAM_SHA256:
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


# ---------------------------------------------------------------------------------------------------------------
# python data.py: fetch the corpora ahead of time
# ---------------------------------------------------------------------------------------------------------------

def main(argv=None):
    """python data.py --fetch all: download (and check) every corpus the scripts use, e.g. before going offline;
    without --fetch, list them and whether each is here. The scripts also fetch each one on first use."""
    cfg = get_config(dict(fetch=""), argv, "Download the corpora the scripts use.\n\n" + main.__doc__)
    names = [*DATA_FILES, "SMSSpamCollection"]
    if cfg["fetch"] not in ("", "all", *names):
        raise UserError(f"--fetch must be all or one of {', '.join(names)}, got {cfg['fetch']!r}")
    for name in names:
        if cfg["fetch"] in ("all", name):
            print(f"{name}: {fetch_sms_spam() if name == 'SMSSpamCollection' else fetch_data(name)}")
        elif not cfg["fetch"]:
            here = os.path.isfile(os.path.join(DATA_DIR, name))
            print(f"{name}: {'in ' + DATA_DIR if here else 'not downloaded yet'}")
    return names


if __name__ == "__main__":
    settings_entry(main)
