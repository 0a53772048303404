"""Opening files named by a user or a model folder, and writing files, without being tricked.

Reading (open_regular, read_regular): only a regular file is opened. A FIFO blocks in open() and a
device such as /dev/zero never ends, so the path is stat'ed first, then opened with O_NONBLOCK
(a FIFO swapped in after the stat cannot block the open) and fstat'ed again on the open
descriptor, which is what is actually read.

Containment (check_inside): a file of a model folder must resolve inside that folder, so a
symlinked chat_template.jinja or shard cannot pull /etc/shadow or ~/.ssh into a .qora file.

Writing (AtomicWriter, write_bytes): the output path is checked (a folder, a device, a FIFO or a
socket is refused, and so is a path that is one of the inputs, by st_dev/st_ino, so hard links and
symlinks count); data goes to a temporary file made by tempfile.mkstemp in the target folder
(O_CREAT|O_EXCL: a planted symlink or file under a predictable name is never followed or reused),
is fsync'ed and renamed over the target with os.replace, which replaces a symlink itself rather
than writing through it. A failure removes the temporary file and leaves the target untouched.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

from qora.errors import FormatError, QoraError

_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def kind_of(mode: int) -> str:
    for test, name in _KINDS:
        if test(mode):
            return name
    return "not a regular file"


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def open_regular(path, where=None, error=FormatError):
    """Open `path` for binary reading if it is a regular file (symlinks followed); else `error`."""
    where = where or path
    try:
        st = os.stat(path)
    except OSError as e:
        raise error(f"{where}: cannot read ({e.strerror or e})") from None
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{where}: is {kind_of(st.st_mode)}, not a regular file")

    def opener(name, flags):
        # the checks run inside open(): once it has the descriptor, the file object owns it, so a Ctrl-C
        # landing anywhere closes it once (an fdopen after os.open could be interrupted with the
        # descriptor owned by a half-built file object, and closed twice)
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        except OSError as e:
            raise error(f"{where}: cannot read ({e.strerror or e})") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):  # swapped between the stat and the open
                raise error(f"{where}: is {kind_of(st.st_mode)}, not a regular file")
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        return fd

    return open(path, "rb", opener=opener)


def read_regular(path, limit: int, where=None, error=FormatError) -> bytes:
    """The bytes of a regular file of at most `limit` bytes."""
    where = where or path
    with open_regular(path, where, error) as f:
        try:
            raw = f.read(limit + 1)
        except OSError as e:
            raise error(f"{where}: cannot read ({e.strerror or e})") from None
    if len(raw) > limit:
        raise error(f"{where}: larger than the {limit} byte limit")
    return raw


def check_inside(path, root, where=None) -> Path:
    """`path` with every symlink resolved, which must lie inside `root` (resolved too)."""
    real = Path(os.path.realpath(path))
    base = Path(os.path.realpath(root))
    if real != base and base not in real.parents:
        raise FormatError(f"{where or path}: resolves to {real}, outside the model folder {base}; refused")
    return real


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask would race other threads)
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_ids(paths) -> set[tuple[int, int]]:
    """(st_dev, st_ino) of each existing path (symlinks followed)."""
    ids = set()
    for p in paths:
        try:
            st = os.stat(p)
        except OSError:
            continue
        ids.add((st.st_dev, st.st_ino))
    return ids


def check_output(path, inputs=(), error=QoraError) -> Path:
    """Refuse an output path that is a folder, a device, a FIFO or a socket (or a symlink to one),
    whose folder does not exist, or that is the same file as one of `inputs` (paths or
    (st_dev, st_ino) pairs)."""
    raw = os.fspath(path)
    p = Path(raw)
    # the name as given: Path("new/") and Path("new/.") both drop what makes them name a folder
    if os.path.basename(raw) in ("", ".", "..") or (os.altsep and raw.endswith(os.altsep)):
        raise error(f"{path}: is a folder; give a file name for the output")
    try:
        st = os.stat(p)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise error(f"{path}: cannot write ({e.strerror or e})") from None
    if st is not None:
        if not stat.S_ISREG(st.st_mode):
            what = (
                "is a folder; give a file name for the output"
                if stat.S_ISDIR(st.st_mode)
                else (f"is {kind_of(st.st_mode)}; refusing to replace it")
            )
            raise error(f"{path}: {what}")
        ids = {i for i in inputs if isinstance(i, tuple)} | file_ids(i for i in inputs if not isinstance(i, tuple))
        if (st.st_dev, st.st_ino) in ids:
            raise error(f"{path}: is the input file itself (or a link to it); choose another output name")
    parent = p.parent
    if not parent.is_dir():
        raise error(f"{path}: the folder {parent} does not exist")
    return p


class Transaction:
    """A `with` block that keeps its output when the block ends normally (commit()) and throws it
    away when it raises (abort())."""

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.commit()
        else:
            self.abort()


class AtomicWriter(Transaction):
    """A binary file object writing to a fresh temporary beside `path`; commit() renames it into
    place, abort() (or an exception in a `with` block) removes it. See the module docstring."""

    def __init__(self, path, inputs=(), error=QoraError):
        self.path = check_output(path, inputs, error)
        self._inputs = inputs
        self._error = error
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        except OSError as e:
            raise error(f"{path}: cannot write ({e.strerror or e})") from None
        self.tmp_path = Path(tmp)
        try:
            os.fchmod(fd, 0o666 & ~_umask())  # what open(path, "w") would have made
        except OSError:
            pass
        self.file = os.fdopen(fd, "w+b")

    def write(self, data) -> int:
        return self.file.write(data)

    def commit(self, check=None) -> Path:
        """fsync, run check(tmp_path) if given (it may raise), then rename over the target."""
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            if check is not None:
                check(self.tmp_path)
            check_output(self.path, self._inputs, self._error)  # again, just before the rename
            os.replace(self.tmp_path, self.path)
        except BaseException:
            self.abort()
            raise
        try:  # the rename itself survives a crash once the folder is synced
            dfd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError:
            pass
        return self.path

    def abort(self) -> None:
        try:
            self.file.close()
        except OSError:
            pass
        try:
            os.unlink(self.tmp_path)
        except FileNotFoundError:
            pass


def write_bytes(path, data: bytes, inputs=(), error=QoraError) -> Path:
    """Write `data` to `path` atomically through AtomicWriter; OSError becomes `error`."""
    try:
        with AtomicWriter(path, inputs, error) as w:
            w.write(data)
    except OSError as e:
        raise error(f"{path}: cannot write ({e.strerror or e})") from None
    return Path(path)
