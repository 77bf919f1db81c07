"""Everything between files and tensors: the GPT-2 tokenizer, datasets, verified downloads, and the small
command-line helper every script uses (settings dict -> argparse).

    from data import get_tokenizer, text_to_token_ids, create_dataloader_v1, fetch_data
    path = fetch_data("the-verdict.txt")            # downloads once, checks sha256
    loader = create_dataloader_v1(open(path).read(), batch_size=2, max_length=256, stride=256)
"""
import argparse
import hashlib
import inspect
import os
import re
import sys
import time

import torch
from torch.utils.data import DataLoader, Dataset

from model import CheckpointError

# ---------------------------------------------------------------------------------------------------------------
# Errors the user can fix: scripts print them as one line and exit 1 (see entry()).
# ---------------------------------------------------------------------------------------------------------------


class UserError(Exception):
    """Bad input, with a message that says what is wrong and what to do."""


class DownloadError(UserError):
    pass


def entry(main):
    """Run main() as a command: user errors become one line on stderr and exit 1, Ctrl-C exits 130, no traceback."""
    try:
        return main()
    except (UserError, CheckpointError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("interrupted")
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        sys.exit(0)


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------------------

EOT_ID = 50256  # <|endoftext|>, also used as padding
_TOKENIZER = None


def get_tokenizer():
    """tiktoken's GPT-2 BPE (cached; set TIKTOKEN_CACHE_DIR to work offline)."""
    global _TOKENIZER
    if _TOKENIZER is None:
        import tiktoken
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
    import requests
    from tqdm import tqdm

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
# Command-line settings: DEFAULTS dict -> argparse
# ---------------------------------------------------------------------------------------------------------------

_OFF = {"none", "off", "null"}


def _parse_bool(s):
    v = s.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


def _typed(default):
    """The argparse type for a setting, taken from its default; None-like words give None where that is allowed."""
    if isinstance(default, bool):
        return _parse_bool

    def convert(s):
        if s.strip().lower() in _OFF and default is None:
            return None
        if default is None:  # no type to go by: the most specific that parses
            for t in (int, float):
                try:
                    return t(s)
                except ValueError:
                    pass
            return s
        try:
            return type(default)(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {type(default).__name__}, got {s!r}") from None
    convert.__name__ = type(default).__name__ if default is not None else "value"
    return convert


def _setting_comments(source_file):
    """name -> the comment after `name=value,  # comment` lines of the script's settings."""
    try:
        with open(source_file, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError:
        return {}
    found = {}
    for line in lines:
        m = re.match(r"^\s+(\w+)\s*=.*?#\s*(.+)$", line)
        if m:
            found.setdefault(m.group(1), m.group(2).strip())
    return found


def get_config(defaults, argv=None, doc=None, check=None):
    """Parse --name value (or --name=value) for every key of defaults; returns a dict.

    `--help` lists each setting with the comment written beside it in the script. A misspelled flag or a value of
    the wrong type exits 2 with a usage line. check(cfg) may raise UserError; it is turned into the same exit 2.
    """
    caller = inspect.stack()[1].filename
    comments = _setting_comments(caller)
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    for name, default in defaults.items():
        help_text = f"{comments.get(name, '')} (default: {default})".strip()
        kwargs = dict(default=default, type=_typed(default), help=help_text, metavar=_typed(default).__name__.upper())
        if isinstance(default, bool):
            kwargs.update(nargs="?", const=True, metavar="BOOL")
        parser.add_argument(f"--{name}", **kwargs)
    cfg = vars(parser.parse_args(argv))
    if check is not None:
        try:
            check(cfg)
        except UserError as e:
            parser.error(str(e))
    return cfg


def changed_settings(cfg, defaults):
    """The settings that differ from the defaults, as 'name=value' text for the start-up line."""
    diff = [f"{k}={cfg[k]}" for k in defaults if cfg.get(k) != defaults[k]]
    return " ".join(diff) if diff else "(defaults)"


# ---------------------------------------------------------------------------------------------------------------
# Device, dtype, seed
# ---------------------------------------------------------------------------------------------------------------

def pick_device(name="auto"):
    """auto -> cuda, then mps, then cpu."""
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but torch sees no CUDA GPU: use --device cpu")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError("--device mps asked for, but this machine has no MPS: use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}: use auto, cpu, cuda or mps") from None


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_dtype(name, device):
    """The autocast dtype ('auto' -> bf16 on GPUs that support it, else float32).

    On CPU, auto stays float32: bf16 matmuls are only fast with AVX512-BF16/AMX, and on an AVX2-only CPU we
    measured a 124M training step 40x slower in bf16. Ask for --dtype bfloat16 explicitly on a CPU that has them.
    """
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if name not in DTYPES:
        raise UserError(f"unknown dtype {name!r}: use auto, float32, bfloat16 or float16")
    if DTYPES[name] is torch.float16 and device.type != "cuda":
        raise UserError("float16 needs a CUDA GPU (it trains with a gradient scaler there): use bfloat16 or float32")
    return DTYPES[name]


def autocast(device, dtype):
    """A context manager: autocast to dtype, or nothing for float32."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not torch.float32)
