"""CPU engine: the C forward pass over weights memory-mapped from a .qora file.

Design: Python resolves everything that is policy (ISA path, thread count,
context size, RoPE frequencies incl. YaRN) and hands the C engine plain
numbers and pointers; the C side runs one forward per call with no allocation.
Also here: the ISA table, what the CPU offers (`cpu_info`), and `FileGuard`, which keeps a model
file changed under its memory map from crashing the process.
"""

from __future__ import annotations

import os
import platform
import threading

import numpy as np

from qora import limits, system
from qora.engine.base import (
    batch_entries,
    check_tokens,
    default_context,
    kv_cache_dtype,
    rope_parameters,
    slot_request,
)
from qora.errors import ModelFileChangedError, QoraError
from qora.system import default_threads, physical_cores

# The CPU kernel paths: the Python side of the C enum qora_isa (include/qora/cpu_features.h), in its
# order (index = enum value). The enum is per architecture (aarch64 has its own paths); the compiled core
# takes its names from here; tests/test_engine_protocol.py checks them against the C enum and kernel tables.
ISA_NAMES_BY_ARCH = {
    "x86_64": ("scalar", "avx2", "avx2vnni", "avx512"),
    "aarch64": ("scalar", "neon", "dotprod", "i8mm"),
}
# what the running interpreter (and so its compiled core) is built for; other CPUs build the x86 enum's
# list with only the scalar kernels compiled in
MACHINE = "aarch64" if platform.machine().lower() in ("aarch64", "arm64") else "x86_64"
ISA_NAMES = ISA_NAMES_BY_ARCH[MACHINE]

# How one-token (decode) products walk the blocks of a repacked Q4 group: the Python side of the C enum
# of include/qora/repack.h, in its order. Same operations, same numbers; only the memory access differs:
# "seq" one sequential stream per thread with software prefetch ahead, "seg4" the four segments of
# common.h at once (four streams), "stream" one stream with the hardware prefetchers alone. Which is
# fastest depends on the CPU's prefetchers (kernel_for_cpu).
DECODE_WALKS = ("seq", "seg4", "stream")
# vendor -> decode walk, measured: AMD Zen 3 (EPYC, 1 thread) reads weights at 84-101% of the read
# bandwidth with "seq" against 55-69% with "seg4" (bench/matvec_bench.c); on the 16-core Sapphire Rapids
# host the whole 3B model decodes 6-9% faster with "seq" than "seg4" at 1 and 16 threads (walks
# alternated in one process, bench/NOTES.md). Other vendors get "seq" too.
KERNEL_TABLE = {"amd": "seq", "intel": "seq"}
# AMD from Zen 4 on (family 0x19 outside Zen 3's models, family 0x1a and later): the software prefetches
# of "seq" cost the stream more than they bring (Zen 4, 1 thread: weights read at 21-25 GB/s with them,
# 27-30 without; bench/NOTES.md). Zen 3 (measured with "seq") is family 0x19 models 0x00-0x0f, 0x20-0x2f
# and 0x40-0x5f; Zen 2 and older are family 0x17 and below.
ZEN3_MODELS = (range(0x00, 0x10), range(0x20, 0x30), range(0x40, 0x60))


def kernel_for_cpu(vendor: str, family: int, model: int) -> str:
    """The decode walk the table gives this CPU."""
    if vendor == "amd" and (family > 0x19 or (family == 0x19 and not any(model in r for r in ZEN3_MODELS))):
        return "stream"
    return KERNEL_TABLE.get(vendor, "seq")


# The arithmetic of the matrix products: "q8" rounds each product's activations to 8 bits (Q8_0 blocks for
# the 32-element weight types, Q8_K for the K types, as llama.cpp does: integer dot products, fastest);
# "f32" keeps them as floats and dequantizes the weights block by block (no activation rounding: slower
# on big models, and what a small model needs where its answer hangs on a near tie).
PRECISIONS = ("q8", "f32")
# Models up to this many weights default to "f32" (SmolLM2-135M's first answer token is a 0.09-logit tie
# that 8-bit activations flip; at this size float arithmetic costs little).
F32_PRECISION_MAX_PARAMS = 1_000_000_000


def model_params(cfg: dict) -> int:
    """Weights of the layers and the embedding (the LM head counted once), from the normalized config."""
    d, h, q = int(cfg["dim"]), int(cfg["hidden_dim"]), int(cfg["n_heads"]) * int(cfg["head_dim"])
    kv = int(cfg["n_kv_heads"]) * int(cfg["head_dim"])
    return int(cfg["n_layers"]) * (2 * d * q + 2 * d * kv + 3 * d * h) + int(cfg["vocab_size"]) * d


def check_precision(precision: str | None) -> str | None:
    """A precision a caller names (qora.load(precision=), --precision): one of PRECISIONS, or None."""
    if precision is not None and precision not in PRECISIONS:
        raise QoraError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def default_precision(cfg: dict, requested: str | None = None) -> str:
    """The product arithmetic: `requested`, else QORA_PRECISION, else "f32" for models up to
    F32_PRECISION_MAX_PARAMS weights and "q8" above."""
    want = (requested or os.environ.get("QORA_PRECISION", "")).strip().lower()
    if want:
        if want not in PRECISIONS:
            raise QoraError(f"precision {want!r} is not one of {', '.join(PRECISIONS)}")
        return want
    return "f32" if model_params(cfg) <= F32_PRECISION_MAX_PARAMS else "q8"


# Prefill is split into calls of this many tokens so Ctrl-C is honoured
# between chunks (the C loop runs without the GIL and cannot be interrupted).
_PREFILL_CHUNK = 64


def _core():
    try:
        from qora._core import _cpu
    except ImportError as e:  # a source checkout that was never built
        raise QoraError(f"qora's compiled core is missing ({e}); reinstall qora (pip install .)") from e
    return _cpu


def resolve_isa(requested: str | None = None) -> tuple[int, str]:
    """Pick the kernel path: QORA_ISA (or `requested`) if this CPU and build allow it, else the best one.

    Returns (isa index, reason). A forced path the CPU cannot run is an error, never SIGILL.
    """
    feats = _core().cpu_features()
    usable = [i for i, name in enumerate(ISA_NAMES) if name in feats["cpu_supports"] and name in feats["compiled"]]
    want = (requested or os.environ.get("QORA_ISA", "")).strip().lower()
    if want:
        if want not in ISA_NAMES:
            other = [m for m, names in ISA_NAMES_BY_ARCH.items() if want in names]
            if other:
                raise QoraError(
                    f"QORA_ISA={want} is an {other[0]} path; this {MACHINE} build runs {', '.join(ISA_NAMES)}"
                )
            raise QoraError(f"QORA_ISA={want!r} is not one of {', '.join(ISA_NAMES)}")
        i = ISA_NAMES.index(want)
        if want not in feats["cpu_supports"]:
            raise QoraError(f"QORA_ISA={want}: this CPU (or its OS) does not support {want}")
        if want not in feats["compiled"]:
            best = max(j for j in usable if j < i)
            return best, f"QORA_ISA={want}: not compiled into this build, using {ISA_NAMES[best]}"
        return i, f"forced by QORA_ISA={want}"
    best = max(usable)
    return best, "best available"


def resolve_kernel(requested: str | None = None) -> tuple[str, str]:
    """The decode walk (DECODE_WALKS): QORA_KERNEL (or `requested`), else KERNEL_TABLE by CPU vendor.
    Returns (walk, reason)."""
    want = (requested or os.environ.get("QORA_KERNEL", "")).strip().lower()
    if want:
        if want not in DECODE_WALKS:
            raise QoraError(f"QORA_KERNEL={want!r} is not one of {', '.join(DECODE_WALKS)}")
        return want, f"forced by QORA_KERNEL={want}"
    feats = _core().cpu_features()
    vendor = feats.get("vendor", "other")
    cpu = f"{vendor} family {feats.get('family', 0):#x} model {feats.get('model', 0):#x}"
    return kernel_for_cpu(vendor, feats.get("family", 0), feats.get("model", 0)), f"table: {cpu}"


def cpu_info() -> dict:
    """What the CPU engine runs with: ISA path (and why), decode kernel (and why), CPU features, OpenMP
    threads."""
    from qora import __version__

    core = _core()
    feats = core.cpu_features()
    try:
        isa, why = resolve_isa()
        isa_name = ISA_NAMES[isa]
    except QoraError as e:
        isa_name, why = None, str(e)
    try:
        kernel, kernel_why = resolve_kernel()
    except QoraError as e:
        kernel, kernel_why = None, str(e)
    return {
        "version": __version__,
        "isa": isa_name,
        "isa_reason": why,
        "kernel": kernel,
        "kernel_reason": kernel_why,
        "cpu_supports": feats["cpu_supports"],
        "compiled": feats["compiled"],
        "openmp": feats["openmp"],
        "openmp_wait": system.openmp_wait,
        "threads": default_threads(),
        "physical_cores": physical_cores(),
        "features": sorted(k for k, v in feats["flags"].items() if v),
        # the mode an engine would get here (asking is what finds out whether the OS allows it)
        "amx": core.set_amx(amx_request()) if isa_name == "avx512" else "off",
    }


def amx_request() -> str:
    """AMX mode to ask for: QORA_AMX=0/off disables it, QORA_AMX=emulate runs the software model of the
    tile instructions (slow; for checking the code path), anything else means the hardware where it exists."""
    want = os.environ.get("QORA_AMX", "").strip().lower()
    if want in ("0", "off", "no", "false"):
        return "off"
    if want == "emulate":
        return "emulate"
    return "hw"


class FileGuard:
    """The model file under an engine. A .qora file is read through a memory map, so a file changed
    on disk under a running engine is a change of the weights themselves: truncated, a read past
    the new end would raise SIGBUS and kill the process (include/qora/mapguard.h turns that read
    into zeros and marks the mapping poisoned); rewritten in place, the weights silently change.

    check() raises ModelFileChangedError when either happened: a read faulted, or the file at the
    path is still the mapped one (same device and inode) but its size or mtime moved since it was
    mapped. A file replaced by rename or deleted is not a change: the mapping keeps the old inode
    and its bytes. Once raised, it is raised on every later call: the engine is never trusted again.
    """

    def __init__(
        self,
        mm,
        path,
        st: os.stat_result | None = None,
        size: int | None = None,
        what: str = "model file",
        advice: str = "reload it",
    ):
        self.path = str(path)
        self._abspath = os.path.abspath(self.path)  # stat() after a chdir still finds it
        self.what, self.advice = what, advice
        self.changed = False
        st = st if st is not None else os.stat(self._abspath)
        self._inode = (st.st_dev, st.st_ino)
        self._stamp = (st.st_size, st.st_mtime_ns)
        core = _core()
        if core.GUARD_SLOTS != limits.MAX_MAPPED_FILES:  # the C table and the budget are one number
            raise QoraError(f"qora's compiled core is stale (guard table {core.GUARD_SLOTS}); rebuild it")
        try:
            self._guard = core.MapGuard(mm)
        except MemoryError:
            raise QoraError(
                f"{self.path}: cannot open: more than {limits.MAX_MAPPED_FILES} model files are open at once"
            ) from None
        except OSError as e:
            raise QoraError(f"{self.path}: cannot load: {e.strerror or e}") from None
        # the mapping is as long as the file was when it was mapped; the header was checked against
        # `size`: a file that changed between the two is refused now
        if size is not None and (len(mm) != size or st.st_size != size):
            self.changed = True
            self.check()

    @property
    def poisoned(self) -> bool:
        """A read of the mapping faulted (or check() found the file changed): cheap, no stat."""
        if not self.changed and self._guard.poisoned:
            self.changed = True
        return self.changed

    def error(self) -> ModelFileChangedError:
        return ModelFileChangedError(
            f"{self.what} {self.path} changed on disk while in use (truncated or rewritten); {self.advice}"
        )

    def check(self) -> None:
        """ModelFileChangedError if the mapped file changed since it was loaded; else keep the SIGBUS
        handler on top (something may have replaced it since)."""
        if not self.changed:
            if self._guard.poisoned:
                self.changed = True
            else:
                try:
                    st = os.stat(self._abspath)
                except OSError:  # deleted or renamed away: the mapping still holds the old inode
                    st = None
                if (
                    st is not None
                    and (st.st_dev, st.st_ino) == self._inode
                    and (st.st_size, st.st_mtime_ns) != self._stamp
                ):
                    self.changed = True
        if self.changed:
            raise self.error()
        self._guard.ensure()

    def release(self) -> None:
        self._guard.release()


def guard_mapping(mm, path, st: os.stat_result | None = None, size: int | None = None, **kw) -> FileGuard:
    """A FileGuard over `mm`, the mmap of the file at `path` (`st`: its fstat when it was mapped;
    `size`: the size its header was checked against; `what`, `advice`: the error's words)."""
    return FileGuard(mm, path, st, size, **kw)


def file_guard(qfile) -> FileGuard:
    """The guard of a QoraFile's mapping (made by read_qora; made here for a QoraFile without one)."""
    guard = getattr(qfile, "guard", None)
    if guard is None:
        mm = getattr(qfile, "_mm", None)
        if mm is None:
            raise QoraError(f"{qfile.path}: the file is closed")
        guard = qfile.guard = FileGuard(mm, qfile.path, size=getattr(qfile, "file_size", None))
    return guard


def resolve_precision(requested: str | None, qfile) -> str:
    """`requested`, else QORA_PRECISION, else by model size for a GGUF file (default_precision: what
    users bring, run in its stored types) and "q8" for a .qora file."""
    if requested or os.environ.get("QORA_PRECISION", "").strip() or getattr(qfile, "kind", None) == "gguf":
        return default_precision(qfile.config, requested)
    return "q8"


def on_own_thread(fn, *args):
    """fn(*args) on a short-lived thread; its result, or its exception, here. libgomp keeps a pool of
    worker threads for each thread that ever opened a parallel region, and once it manages more threads
    than there are CPUs its workers stop spinning between regions (its throttled spin): a server whose
    main thread built the engine (the repack's parallel regions) and whose scheduler thread then
    decoded ran at half speed (dev box, 2 threads: 60 vs 120 tok/s). A thread that ends takes its pool
    with it, so the build leaves none behind. Ctrl-C during the build takes effect once it is done."""
    box = {}

    def run():
        try:
            box["result"] = fn(*args)
        except BaseException as e:  # handed to the caller below
            box["error"] = e

    thread = threading.Thread(target=run, name="qora-build", daemon=True)
    thread.start()
    interrupted = None
    while thread.is_alive():
        try:
            thread.join()
        except KeyboardInterrupt as e:
            interrupted = e
    if interrupted is not None:
        raise interrupted
    if "error" in box:
        raise box.pop("error")
    return box.pop("result")


class CpuEngine:
    """The Engine (qora.engine.base) on the CPU: forward(tokens, start_pos) -> logits over a KV cache
    kept inside the engine.

    precision: "q8" (activations rounded to each weight type's 8-bit partner, integer products) or "f32"
    (float activations); None: QORA_PRECISION, else for a GGUF file `default_precision(cfg)` (f32 up to
    1B weights) and "q8" for a .qora file."""

    def __init__(
        self,
        qfile,
        n_threads: int | None = None,
        max_seq_len: int | None = None,
        isa: str | None = None,
        precision: str | None = None,
        kv_type: str | None = None,
    ):
        core = _core()
        self._lock = threading.Lock()
        self._model = self._guard = None
        self.config = cfg = qfile.config
        isa_idx, self.isa_reason = resolve_isa(isa)
        self.kernel, self.kernel_reason = resolve_kernel()
        self.n_threads = int(n_threads) if n_threads else default_threads()
        if not 1 <= self.n_threads <= limits.MAX_THREADS:
            raise QoraError(f"threads must be in 1..{limits.MAX_THREADS}, got {self.n_threads}")
        self.kv_dtype = kv_cache_dtype(qfile, kv_type)
        self.max_seq_len = default_context(cfg, max_seq_len, self.kv_dtype)  # the pre-flight counts this cache
        inv_freq, rope_scale = rope_parameters(cfg)
        # the weights are read from the mapping while the engine is built (Q4 repacking) and by
        # every forward (embeddings, norms, matrices not repacked): a fault there is caught
        self._guard = file_guard(qfile)
        self._guard.check()
        tensors = {}
        for name, info in qfile.tensor_info.items():
            tensors[name] = (info["dtype"], tuple(info["shape"]), qfile.tensor(name))
        try:
            # QORA_REPACK=0 keeps Q4 matrices in file order (half the memory, slower products)
            repack = os.environ.get("QORA_REPACK", "1").strip() not in ("0", "false", "no")
            self.precision = resolve_precision(precision, qfile)
            self._model = on_own_thread(
                core.CpuModel,
                cfg,
                tensors,
                inv_freq,
                rope_scale,
                self.max_seq_len,
                self.n_threads,
                isa_idx,
                repack,
                self.kv_dtype,
                self.precision == "f32",
            )
        except (ValueError, KeyError) as e:
            raise QoraError(f"{qfile.path}: cannot build the engine: {e}") from e
        except MemoryError as e:
            raise QoraError(f"not enough memory for a {self.max_seq_len}-token context: {e}") from e
        try:
            self._guard.check()  # the file changed while it was being read
        except ModelFileChangedError:
            self.close()
            raise
        self.isa = self._model.isa_name
        # AMX tiles serve prefill on the AVX-512 path where the CPU has them (process-wide switch)
        self.amx = core.set_amx(amx_request()) if self.isa == "avx512" else "off"
        # the decode walk is a property of the machine, so process-wide as well
        self.kernel = core.set_decode_walk(self.kernel)
        self.vocab_size = cfg["vocab_size"]
        self.device = self.device_name = "cpu"
        self.notes: list[str] = []
        self._slot_context = 0

    def forward(self, tokens, start_pos: int, all_logits: bool = False) -> np.ndarray:
        """Run tokens at positions start_pos.. ; (n, vocab) logits if all_logits else (1, vocab) for the last."""
        if self._model is None:
            raise QoraError("the model is closed")
        ids = check_tokens(tokens, start_pos, self.max_seq_len, self.vocab_size)
        n = ids.shape[0]
        guard = self._guard
        if guard is None:
            raise QoraError("the model is closed")
        guard.check()
        outs = []
        for i in range(0, n, _PREFILL_CHUNK):
            chunk = ids[i : i + _PREFILL_CHUNK]
            last = i + _PREFILL_CHUNK >= n
            # the lock keeps close() (another thread, e.g. a server shutting down) from freeing the
            # native state while C runs on it
            with self._lock:
                if self._model is None:
                    raise QoraError("the model is closed")
                out = self._model.forward(chunk, start_pos + i, all_logits)
            if guard.poisoned:  # a read faulted: these logits came from zero pages
                raise guard.error()
            if all_logits or last:
                outs.append(out)
        guard.check()  # rewritten in place while this ran: the logits may mix old and new weights
        return outs[0] if len(outs) == 1 else np.concatenate(outs, axis=0)

    def open_slots(self, n_slots: int, context: int | None = None, rows: int | None = None) -> int:
        """KV caches for n_slots sequences of batched steps, each of `context` positions (at most, and by
        default, max_seq_len), passes of `rows` token rows (default: n_slots decoders plus a prefill chunk)."""
        n_slots, ctx = slot_request(n_slots, context, self.max_seq_len)
        rows = int(rows) if rows else n_slots + _PREFILL_CHUNK
        with self._lock:
            if self._model is None:
                raise QoraError("the model is closed")
            try:
                self._model.open_batch(ctx, rows, n_slots)
            except MemoryError as e:
                raise QoraError(f"not enough memory for {n_slots} sequences of {ctx} tokens") from e
        self._slot_context = ctx
        return n_slots

    def forward_batch(self, seqs) -> list[np.ndarray]:
        """One step over (slot, tokens, start_pos) entries in one pass (the weights are read once for all
        rows); each entry's last-token logits (vocab,). Entries of one slot must come in position order."""
        model = self._model
        if model is None:
            raise QoraError("the model is closed")
        entries = batch_entries(seqs, model.batch_slots, self._slot_context, self.vocab_size)
        tokens = np.concatenate([ids for _, ids, _ in entries])
        slots = np.concatenate([np.full(ids.size, slot, np.int32) for slot, ids, _ in entries])
        pos = np.concatenate([np.arange(start, start + ids.size, dtype=np.int32) for _, ids, start in entries])
        want = np.cumsum([ids.size for _, ids, _ in entries], dtype=np.int64).astype(np.int32) - 1
        guard = self._guard
        if guard is None:
            raise QoraError("the model is closed")
        guard.check()
        with self._lock:
            if self._model is None:
                raise QoraError("the model is closed")
            out = self._model.forward_batch(tokens, slots, pos, want)
        if guard.poisoned:
            raise guard.error()
        return list(out)

    def copy_slot(self, src: int, dst: int, n: int) -> None:
        with self._lock:
            if self._model is None:
                raise QoraError("the model is closed")
            try:
                self._model.copy_slot(int(src), int(dst), int(n))
            except ValueError as e:
                raise QoraError(f"cannot copy {n} positions from slot {src} to slot {dst}") from e

    def reset(self):
        """Nothing to clear: positions past start_pos are overwritten before they are read."""

    def close(self):
        with self._lock:
            # unhooked before it is freed: a Ctrl-C landing between the two must not leave a freed
            # model in place (its calls would raise a bare RuntimeError instead of QoraError)
            model, self._model = self._model, None
            self._guard = None  # the mapping goes when its last user lets go (QoraFile.close)
            if model is not None:
                model.close()
