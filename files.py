"""Files written whole or not at all, and files read only when they are what they should be: every script's outputs
and inputs go through here (no user runs this file).

    from files import atomic_write, save_pth, write_json, check_output, check_input
    check_output(path, "--out", force)   # before any work: refuses a folder, a pipe, an existing file without --force
    save_pth(path, {"model": ...})       # a temporary file beside path, created exclusively, then renamed

Writes never follow a link planted at the path or at a temporary name; a process killed mid-write leaves its
temporary file behind, which remove_stale_tmp deletes on the next run, and never half a file at the path.
"""
import contextlib
import errno
import json
import os
import re
import secrets
import shutil
import signal
import stat

import numpy as np
import torch

from settings import UserError

# ---------------------------------------------------------------------------------------------------------------
# Writing files: all at once or not at all
# ---------------------------------------------------------------------------------------------------------------

TMP_SUFFIX = ".tmp"
NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)   # Windows has no links to follow here
CLOEXEC = getattr(os, "O_CLOEXEC", 0)
NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_STALE_TMP = re.compile(r".+\.(\d+)(?:\.[0-9a-f]{16})?" + re.escape(TMP_SUFFIX))  # NAME.PID[.RANDOM].tmp


def new_temp_file(path):
    """(fd, name) of a new empty file beside path, NAME.PID.RANDOM.tmp, opened for writing. It is created exclusively
    (O_EXCL: never through a link planted there, never over a file that exists), under a name nobody can predict,
    with the permissions of any new file (the umask); the PID in the name lets remove_stale_tmp tell a killed
    writer's file from a live one's."""
    folder, base = os.path.split(os.path.abspath(path))
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | NOFOLLOW | CLOEXEC | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = os.path.join(folder, f"{base}.{os.getpid()}.{secrets.token_hex(8)}{TMP_SUFFIX}")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary name", path)


def new_temp_dir(path):
    """A new empty folder beside path, NAME.PID.RANDOM.tmp, created exclusively (mkdir fails on anything already
    there, a link included), with the permissions of any new folder (the umask). Returns its path."""
    folder, base = os.path.split(os.path.abspath(path))
    for _ in range(100):
        tmp = os.path.join(folder, f"{base}.{os.getpid()}.{secrets.token_hex(8)}{TMP_SUFFIX}")
        try:
            os.mkdir(tmp, 0o777)
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary name", path)


def remove_stale_temp_dirs(path):
    """Delete the folders new_temp_dir(path) made for processes that are gone (killed midway)."""
    folder, base = os.path.split(os.path.abspath(path))
    pattern = re.compile(re.escape(base) + r"\.(\d+)\.[0-9a-f]{16}" + re.escape(TMP_SUFFIX))
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        m = pattern.fullmatch(name)
        full = os.path.join(folder, name)
        if m and not _process_alive(int(m.group(1))) and os.path.isdir(full) and not os.path.islink(full):
            shutil.rmtree(full, ignore_errors=True)


def open_lock(path):
    """The lock file at path opened for reading and writing (created if missing), for fcntl.flock. It is never
    opened through a link, never truncated on opening, and must be a regular file with no other name (a hard link
    to a file elsewhere): anything else is a UserError, so a planted link or pipe can neither be written through
    nor block."""
    why = None
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | NOFOLLOW | NONBLOCK | CLOEXEC, 0o666)
    except OSError as e:
        if e.errno == errno.ELOOP or os.path.islink(path):
            why = "a symbolic link"
        elif e.errno == errno.EISDIR:
            why = "a folder"
        else:
            raise
    else:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            why = f"{file_kind(st)}, not a regular file"
        elif st.st_nlink != 1:
            why = f"a file with {st.st_nlink} names (a hard link to a file elsewhere)"
        if why:
            os.close(fd)
        else:
            return os.fdopen(fd, "r+", encoding="utf-8")
    raise UserError(f"the lock file {path} is {why}: a lock file is made by this project; delete it and rerun")


def file_kind(st):
    """What a stat result that is not a regular file is, in words."""
    return ("a FIFO" if stat.S_ISFIFO(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode)
            else "a folder" if stat.S_ISDIR(st.st_mode) else "a device" if stat.S_ISCHR(st.st_mode)
            or stat.S_ISBLK(st.st_mode) else "not a regular file")


def unreadable(path):
    """(why path cannot be read as a text file, or None; its stat) without opening it."""
    try:
        st = os.stat(path)
    except OSError as e:
        return ("a broken link" if os.path.islink(path) else e.strerror), None
    if not stat.S_ISREG(st.st_mode):
        return f"{file_kind(st)}, not a regular file", st
    if not os.access(path, os.R_OK):
        return "permission denied (check its permissions)", st
    return None, st


def check_input(path, flag="input"):
    """Refuse, with one line naming flag, an input that is missing or is not a regular file this process may read
    (a folder, a FIFO, a socket, a device, a broken link, no permission); FIFOs are never opened. Returns path."""
    if not os.path.lexists(path):
        raise UserError(f"no file at {path}: check {flag}")
    why, _ = unreadable(path)
    if why:
        raise UserError(f"cannot read {flag} {path}: it is {why}: pass a regular file" if why.startswith("a ")
                        else f"cannot read {flag} {path}: {why}")
    return path




STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


@contextlib.contextmanager
def signals_held():
    """Hold Ctrl-C, SIGTERM and SIGHUP back while the body runs (a file being written), then let the first one
    through: a stop request during a write ends the program after the file is whole, never halfway. Signals are
    handled in the main thread only; elsewhere the body runs as it is."""
    got = []
    try:
        old = {sig: signal.signal(sig, lambda signum, frame: got.append(signum)) for sig in STOP_SIGNALS}
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        if got:
            signal.raise_signal(got[0])  # now the handler the program had runs, as if the signal came now


def atomic_write(path, write, mode="wb", exclusive=False):
    """Write path all at once or not at all; returns path.

    write(f) fills a new temporary file beside path (new_temp_file: created exclusively under a name nobody can
    predict, so a link planted beside path is never written through), which is flushed to disk and renamed over
    path, so a crash or a full disk never leaves half a file and any earlier file at path stays whole until the
    rename. The file gets the permissions of any new file (the umask). A stop signal that comes meanwhile waits for
    the write to finish (signals_held). An OSError becomes a UserError that says what to do. exclusive: the file
    must not exist when it is put in place (another command that wrote it meanwhile is not overwritten): a
    UserError says so and the new file is dropped.
    """
    with signals_held():
        return _atomic_write(path, write, mode, exclusive)


def _atomic_write(path, write, mode, exclusive):
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        if os.path.isdir(path):
            raise IsADirectoryError(errno.EISDIR, "is a folder", path)
        if os.path.lexists(path) and not os.path.isfile(path):  # never swap a file in for a pipe or a device
            raise UserError(f"could not write {path}: it is not a regular file (a pipe, a device or a broken "
                            f"link): choose another path")
        os.makedirs(folder, exist_ok=True)
        fd, tmp = new_temp_file(path)
        with open(fd, mode, **({} if "b" in mode else {"encoding": "utf-8", "newline": ""})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if exclusive:
            _link_exclusively(tmp, path)
        else:
            os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.remove(tmp)
        # torch's zip writer reports an OSError as a RuntimeError raised while handling it: look one exception back
        err = e if isinstance(e, OSError) else e.__context__ if isinstance(e.__context__, OSError) else None
        if err is None or isinstance(e, UserError):
            raise
        raise UserError(f"could not write {path}: {write_error_advice(path, err)}; any earlier file at that path "
                        f"is untouched") from None
    return path


def _link_exclusively(tmp, path):
    """Put the finished file tmp at path only if nothing is there (a hard link fails when path exists), then drop
    the temporary name; where the file system has no hard links, a check just before the rename."""
    try:
        os.link(tmp, path, follow_symlinks=False)
    except FileExistsError:
        raise UserError(f"{path} was written by another command while this one ran: pass --force to replace it, "
                        f"or choose another path") from None
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK, errno.ENOSYS):
            raise
        if os.path.lexists(path):
            raise UserError(f"{path} was written by another command while this one ran: pass --force to replace "
                            f"it, or choose another path") from None
        os.replace(tmp, path)
        return
    os.remove(tmp)


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


def make_folder(folder, what):
    """os.makedirs(folder), with an OSError turned into a UserError that names what the folder is for."""
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the folder {folder} for {what}: {write_error_advice(folder, e)}") from None
    return folder


def check_parent(path, flag):
    """Refuse a path below a regular file (e.g. afile/x.pth) before any work starts."""
    if _parent_is_file(path):
        raise UserError(f"{flag} {path}: a folder on that path is a regular file: choose another path")
    return path


def save_pth(path, obj, exclusive=False):
    """torch.save(obj) to path, atomically (exclusive: see atomic_write)."""
    return atomic_write(path, lambda f: torch.save(obj, f), exclusive=exclusive)


def write_json(path, obj):
    """obj as indented JSON (UTF-8) at path, atomically."""
    return atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2, ensure_ascii=False) + "\n"), "w")


def append_text(path, text):
    """Append text (UTF-8) to the file at path, created when missing; a link at path is refused, never followed."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | NOFOLLOW
    try:
        with os.fdopen(os.open(path, flags, 0o644), "a", encoding="utf-8") as f:
            f.write(text)
    except OSError as e:
        raise UserError(f"cannot append to {path}: {write_error_advice(path, e)}") from None


def remove_stale_tmp(folder):
    """Delete the temporary files atomic_write left in folder when its process was killed (NAME.PID.RANDOM.tmp, or
    NAME.PID.tmp from older versions, whose PID is gone); a live writer's file is kept."""
    if not os.path.isdir(folder):
        return []
    removed = []
    for name in os.listdir(folder):
        m = _STALE_TMP.fullmatch(name)
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


def check_output(path, flag, force=False, inputs=(), replaceable=False):
    """Refuse, before any work starts, an output path that cannot be written (below a regular file, a folder, a
    pipe or a device), that is one of the command's own inputs, or that holds a file already unless force (a
    checkpoint, or any other file; replaceable: the setting's default file, which every run rewrites, unless it
    holds a checkpoint). Returns path."""
    if not path:
        return path
    check_parent(path, flag)
    if os.path.isdir(path):
        raise UserError(f"{flag} {path} is a folder: pass a file path")
    if not os.path.lexists(path):
        return path
    if not os.path.isfile(path):
        raise UserError(f"{flag} {path} is not a regular file (a pipe, a device or a broken link): choose "
                        f"another path")
    if any(os.path.exists(i) and os.path.samefile(path, i) for i in inputs if i):
        raise UserError(f"{flag} {path} is this command's own input, which it never writes over: choose another "
                        f"path")
    if force:
        return path
    fix = "pass --force to replace it, or choose another path"
    if is_checkpoint_file(path):
        raise UserError(f"{flag} {path} already holds a checkpoint: {fix}")
    if not replaceable:
        raise UserError(f"{flag} {path} already exists: {fix}")
    return path


def is_checkpoint_file(path):
    """Whether path starts like a torch checkpoint (a zip or a pickle) or a safetensors file."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return head[:2] in (b"PK", b"\x80\x02") or len(head) == 9 and head[8:9] == b"{"


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
