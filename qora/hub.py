"""`qora pull REPO_ID`: fetch a Hugging Face checkpoint and convert it once; `--load REPO_ID` finds it.

The download is `huggingface_hub.snapshot_download` (already installed with `tokenizers`), so it
honours what the hub client does everywhere: HF_TOKEN for gated or private repos, HF_ENDPOINT for a
mirror, HF_HUB_CACHE / HF_HOME for where the checkpoint lives, HF_HUB_OFFLINE to use only what is
cached. Only the files a conversion reads are fetched (configs, tokenizer, chat template, top-level
safetensors), never other formats or subfolders.

The converted file lives in qora's cache ($QORA_CACHE, else ~/.cache/qora) as
hub/ORG--NAME/QUANT.qora with a manifest (repo, commit, quant) beside it. Pulling again fetches what
changed on the hub and converts only when the commit or the file changed; writes go to a fresh
temporary file (qora.safeio: mkstemp, never a predictable name) renamed into place, so an
interrupted pull never leaves a half file that looks finished and a planted symlink is never
written through.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from qora import dtypes
from qora.errors import QoraError

# What a conversion reads; anything else in a repo (other formats, ONNX exports, images) is skipped.
ALLOW_PATTERNS = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "model.safetensors.index.json",
    "*.safetensors",
]
IGNORE_PATTERNS = ["*/*"]  # top level only: subfolders hold other variants (onnx/, original/, ...)

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


_log = logging.getLogger(__name__)  # progress lines when the caller gives no `log`


def split_spec(spec: str) -> tuple[str, str | None]:
    """ "ORG/NAME" or "ORG/NAME:QUANT" -> (repo id, quant or None)."""
    repo, _, quant = spec.partition(":")
    return repo, (quant.lower() or None)


def looks_like_repo_id(spec: str) -> bool:
    """True for "ORG/NAME" (optionally ":QUANT"), the shape of a Hugging Face model id."""
    repo, quant = split_spec(spec)
    return bool(_REPO_ID.match(repo)) and not repo.endswith(".qora") and quant in (None, *dtypes.CHOICES)


def hub_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    from qora.demo import default_cache_dir

    return (Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()) / "hub"


def repo_dir(repo_id: str, cache_dir: str | os.PathLike | None = None) -> Path:
    return hub_dir(cache_dir) / repo_id.replace("/", "--")


def find_pulled(spec: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The .qora that `qora pull` made for "ORG/NAME[:QUANT]": the named quant, else the only one,
    else q4. A QoraError says how to get it when there is none."""
    repo, quant = split_spec(spec)
    folder = repo_dir(repo, cache_dir)
    have = sorted(p.stem for p in folder.glob("*.qora")) if folder.is_dir() else []
    if quant is not None:
        if quant in have:
            return folder / f"{quant}.qora"
        also = f" (pulled: {', '.join(have)})" if have else ""
        raise QoraError(f"{spec}: not pulled as {quant}{also}; run: qora pull {repo} --quant {quant}")
    if not have:
        raise QoraError(f"{spec}: no such file, and not pulled yet; run: qora pull {repo}")
    if len(have) == 1:
        return folder / f"{have[0]}.qora"
    if dtypes.DEFAULT in have:
        return folder / f"{dtypes.DEFAULT}.qora"
    raise QoraError(f"{spec} was pulled as {', '.join(have)}: say which, e.g. --load {repo}:{have[0]}")


def _download(repo_id: str, revision: str | None, log: Callable[[str], None]) -> Path:
    try:
        import huggingface_hub
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (
            GatedRepoError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError as e:
        raise QoraError(f"qora pull needs huggingface_hub ({e}): pip install 'qora[hub]'") from None

    endpoint = os.environ.get("HF_ENDPOINT") or "the Hugging Face hub"
    log(f"fetching {repo_id}{f'@{revision}' if revision else ''} from {endpoint} ...")
    try:
        folder = snapshot_download(
            repo_id, revision=revision, allow_patterns=ALLOW_PATTERNS, ignore_patterns=IGNORE_PATTERNS
        )
    except GatedRepoError:
        raise QoraError(f"{repo_id} is gated: accept its license on the hub, then set HF_TOKEN") from None
    except RevisionNotFoundError:
        raise QoraError(f"{repo_id}: no revision {revision!r} on the hub") from None
    except RepositoryNotFoundError:
        raise QoraError(f"{repo_id}: no such model on the hub (a private one needs HF_TOKEN)") from None
    except LocalEntryNotFoundError as e:
        cause = e.__cause__ or e
        detail = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
        raise QoraError(f"cannot fetch {repo_id} from {endpoint} and it is not cached: {detail}") from None
    except huggingface_hub.errors.HfHubHTTPError as e:
        raise QoraError(f"fetching {repo_id} failed: {str(e).splitlines()[0]}") from None
    except OSError as e:  # disk full, unwritable cache
        raise QoraError(f"fetching {repo_id} failed: {e}") from None
    return Path(folder)


def _fingerprint(folder: Path) -> dict:
    """Name -> size of the fetched files: with the commit, what decides whether to convert again."""
    return {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}


def pull(
    repo_id: str,
    quant: str = dtypes.DEFAULT,
    revision: str | None = None,
    embed_quant: str | None = None,
    force: bool = False,
    cache_dir: str | os.PathLike | None = None,
    log: Callable[[str], None] | None = None,
    progress: bool = True,
) -> Path:
    """Download REPO_ID's checkpoint into the hub cache, convert it to `quant`, return the .qora path."""
    log = log or _log.info
    if not _REPO_ID.match(repo_id or ""):
        raise QoraError(f"{repo_id!r} is not a Hugging Face model id (expected ORG/NAME)")
    if quant not in dtypes.CHOICES:
        raise QoraError(f"quant must be one of {', '.join(dtypes.CHOICES)}, got {quant!r}")
    folder = _download(repo_id, revision, log)
    if not (folder / "config.json").is_file():
        raise QoraError(f"{repo_id} has no config.json at its top level: not a transformers checkpoint")
    if not any(folder.glob("*.safetensors")):
        raise QoraError(
            f"{repo_id} has no .safetensors weights at its top level (qora converts safetensors checkpoints; "
            "for a GGUF repo, download the .gguf file and run qora convert on it)"
        )

    out_dir = repo_dir(repo_id, cache_dir)
    target = out_dir / f"{quant}.qora"
    manifest_path = out_dir / f"{quant}.json"
    manifest = {
        "repo_id": repo_id,
        "revision": revision or "main",
        "commit": folder.name,  # snapshot folders are named by commit hash
        "quant": quant,
        "embed_quant": embed_quant,
        "files": _fingerprint(folder),
    }
    if not force and target.is_file() and manifest_path.is_file():
        from qora.safeio import read_regular

        try:
            old = json.loads(read_regular(manifest_path, 1 << 20, error=QoraError))
        except (QoraError, ValueError):
            old = None  # unreadable: convert again
        if isinstance(old, dict) and {k: old.get(k) for k in manifest} == manifest:
            log(f"{repo_id} is up to date ({quant}, commit {folder.name[:12]})")
            return target

    from qora.convert import convert
    from qora.demo import make_cache_folder
    from qora.safeio import check_output

    make_cache_folder(out_dir)
    log(f"converting {repo_id} to {quant} ...")
    t0 = time.perf_counter()
    check_output(target)  # not a folder, device or FIFO; a symlink is replaced, not followed
    with tempfile.TemporaryDirectory(prefix="qora-pull-", dir=out_dir) as tmp:
        partial = Path(tmp) / target.name  # a fresh private folder (mkdtemp): nothing to plant there
        convert(str(folder), str(partial), quant=quant, embed_quant=embed_quant, progress=progress)
        os.replace(partial, target)
    manifest["converted"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    from qora.safeio import write_bytes

    write_bytes(manifest_path, (json.dumps(manifest, indent=1) + "\n").encode())
    log(f"wrote {target} ({target.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - t0:.1f} s")
    return target


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qora pull",
        description="Download a Hugging Face checkpoint and convert it to a cached .qora file.",
        epilog=(
            "Example: qora pull HuggingFaceTB/SmolLM3-3B && qora chat --load HuggingFaceTB/SmolLM3-3B. "
            "The hub client's settings apply: HF_TOKEN (gated or private repos), HF_ENDPOINT (a mirror), "
            "HF_HUB_CACHE (where checkpoints are kept), HF_HUB_OFFLINE=1 (cached files only)."
        ),
    )
    p.add_argument("repo_id", metavar="REPO_ID", help="the model on the hub, e.g. HuggingFaceTB/SmolLM3-3B")
    p.add_argument(
        "--quant", choices=dtypes.CHOICES, default=dtypes.DEFAULT, help=f"weight type (default {dtypes.DEFAULT})"
    )
    p.add_argument("--embed-quant", choices=dtypes.CHOICES, default=None, help="embedding / LM head type")
    p.add_argument("--revision", metavar="REV", help="branch, tag or commit (default: main)")
    p.add_argument("--force", action="store_true", help="convert again even if the cached file is current")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    path = pull(args.repo_id, args.quant, args.revision, args.embed_quant, args.force)
    print(path, flush=True)  # stdout: the path alone, for scripts
    return 0
