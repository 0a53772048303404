"""Vulkan engine: the Engine protocol (qora.engine.base) on a GPU.

Design: the C backend (qora/_core/qora_vk.c) reports facts and error codes; this module holds the
policy. It picks the device (discrete > integrated > others; a CPU-type "software" device such as
Mesa's lavapipe only when asked for), sizes the context to the device's memory, estimates what the
model needs and lets the allocation of every buffer be the probe, and falls back to the CPU engine
when anything fails: at load (qora.engine.select: a warning, or only a --verbose note when the
machine simply has no Vulkan stack), and during a run by replaying the tokens so far on the CPU so
generation goes on from the same position without losing what was produced.

Environment:
    QORA_VK_DEVICE=N       use Vulkan device N (see `qora.engine.vulkan.devices()`)
    QORA_VK_ALLOW_CPU=1    let device="auto" use a CPU-type Vulkan device (lavapipe)
    QORA_VK_LOADER=PATH    the Vulkan loader library to open instead of the system's
    QORA_VK_FAIL=alloc     test hook: device allocations fail (out of memory at load)
    QORA_VK_FAIL=run:N     test hook: the device is "lost" after N successful forward calls
    QORA_VK_BATCH, QORA_VK_MV_THREADS, QORA_VK_MV_ROWS, QORA_VK_GU_ROWS, QORA_VK_ATT_SPLITS,
    QORA_VK_ATT_SHORT      tuning knobs (prefill tokens per submission; decode mat-vec workgroup
                           size, rows per workgroup (all products / gate|up only); decode attention
                           chunks of the context per KV head at most, and the fewest positions per
                           chunk: contexts up to it run in one pass with no merge)
    QORA_VK_ATT_KERNEL=1|2 decode attention kernel: 1 attn_decode.comp, 2 attn_decode2.comp (clusters
                           of lanes per cached position, short chunks; needs subgroup shuffles, else 1)
    QORA_VK_ATT_THREADS    attn_decode2's threads per workgroup (a power of two, 32..256; default 128)
    QORA_VK_DOT=0|1        decode Q4/Q8 dots without / with the packed integer dot product
                           (default: with it where the driver says it is accelerated)
    QORA_VK_PROFILE=1      time every decode dispatch on the GPU (VulkanEngine.profile())
    QORA_VK_PIPELINE_STATS=1  print the driver's statistics of each pipeline as it is built (registers,
                           local memory, ...) and the device's cooperative-matrix shapes, on stderr
                           (where the driver has VK_KHR_pipeline_executable_properties)
    QORA_VK_COOP_MIN_TILES=N  the tensor-core prefill takes products of at least N 128 x 128 output tiles
                           (default 96, set when the kernel was slow; with QORA_VK_COOPMAT=1)
    QORA_VK_COOP_SHADER, QORA_VK_COOP_SUBGROUPS=1|2  measurement knobs for the tensor-core prefill: a
                           variant of its Q4 kernel (tools/gen_shaders.py --probes), its pipelines
                           requiring full subgroups (1) of 32 lanes (2); bench/coopmat_probe.sh
    QORA_VK_SLOT_DECODE=N  batched steps of up to N decode rows (one token per sequence) run as N
                           single-sequence decode steps, each over its slot's cache (default 16; 0: every
                           step through the batched path, whose products are made for many rows)
"""

from __future__ import annotations

import logging
import os
import threading

import numpy as np

from qora import dtypes
from qora.engine.base import (
    KV_ELEMENT_BYTES,
    batch_entries,
    check_tokens,
    default_context,
    kv_cache_dtype,
    rope_parameters,
    slot_request,
)
from qora.engine.cpu import CpuEngine, file_guard, resolve_precision
from qora.errors import QoraError
from qora.system import default_threads

log = logging.getLogger(__name__)

# Best first; CPU-type devices are used only when asked for.
_TYPE_RANK = {"discrete": 3, "integrated": 2, "virtual": 1, "other": 0, "cpu": -1}
# Use at most this share of what the driver says is free: drivers, display and other apps need room.
_VRAM_FRACTION = 0.9
KV_NAMES = ("f32", "f16", "q8")  # the KV cache types by their qora_dtype value (the backend's kv_type)
# The smallest context worth shrinking to when the default one does not fit in VRAM.
_MIN_AUTO_CONTEXT = 512
# Batched steps of up to this many decode rows run as single-sequence decode steps (QORA_VK_SLOT_DECODE):
# on an H100 (serve_load, 8 clients) the batched path's step of 8 decode rows took ~66 ms, a decode step
# 2.3-3.8 ms (bench/NOTES.md), so up to ~16 rows one by one is faster until the batched path has
# narrow products.
SLOT_DECODE_ROWS = 16


class GpuUnavailable(QoraError):
    """No GPU can run the model; `quiet` when the machine simply has no Vulkan GPU (no loader,
    no driver, no device): then the CPU fallback is mentioned only under --verbose."""

    def __init__(self, message: str, quiet: bool = False):
        super().__init__(message)
        self.quiet = quiet


def _core():
    try:
        from qora._core import _vulkan
    except ImportError:  # a build without the Vulkan extension
        return None
    return _vulkan


def _env_int(name: str, default: int | None = None) -> int | None:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise QoraError(f"{name}={raw!r} is not an integer") from None


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def devices() -> list[dict]:
    """The Vulkan devices of this machine ([] when there is no Vulkan stack)."""
    core = _core()
    if core is None:
        return []
    try:
        return core.list_devices(os.environ.get("QORA_VK_LOADER") or None)
    except core.VulkanError:
        return []


def choose_device(found: list[dict], required: bool = False) -> dict:
    """The device to run on: QORA_VK_DEVICE if set, else the best usable one. A CPU-type device
    only with QORA_VK_ALLOW_CPU=1, or when it is the only one and the GPU is required."""
    want = _env_int("QORA_VK_DEVICE")
    if want is not None:
        match = [d for d in found if d["index"] == want]
        if not match:
            raise GpuUnavailable(f"QORA_VK_DEVICE={want}: there are {len(found)} Vulkan devices")
        if not match[0]["usable"]:
            raise GpuUnavailable(f"QORA_VK_DEVICE={want} ({match[0]['name']}): {match[0]['why_not']}")
        return match[0]
    usable = [d for d in found if d["usable"]]
    if not usable:
        if not found:
            raise GpuUnavailable("no Vulkan device", quiet=True)
        why = "; ".join(f"{d['name']}: {d['why_not']}" for d in found)
        # a real GPU that cannot run qora is worth a line; a software device alone is not
        raise GpuUnavailable(f"no usable Vulkan device ({why})", quiet=all(d["type"] == "cpu" for d in found))
    gpus = [d for d in usable if d["type"] != "cpu"]
    if not gpus and not (required or _env_flag("QORA_VK_ALLOW_CPU")):
        names = ", ".join(d["name"] for d in usable)
        raise GpuUnavailable(
            f"no GPU, only a software Vulkan device ({names}; QORA_VK_ALLOW_CPU=1 uses it)", quiet=True
        )
    pool = gpus or usable
    return max(pool, key=lambda d: (_TYPE_RANK.get(d["type"], 0), d["vram_bytes"], -d["index"]))


# One context (instance, device, compiled pipelines) per device, shared by the engines on it, so a
# second model skips pipeline compilation. Its lock serializes GPU work: the command pool and queue
# are not thread-safe.
_CONTEXTS: dict[tuple, tuple] = {}
_CONTEXTS_LOCK = threading.Lock()


def _context(core, loader, index: int):
    with _CONTEXTS_LOCK:
        key = (loader, index)
        if key not in _CONTEXTS:
            _CONTEXTS[key] = (core.Context(loader, index), threading.Lock())
        return _CONTEXTS[key]


def _drop_context(ctx):
    """Forget a context whose device failed, so later engines get a fresh one. It is destroyed when
    the last model made on it lets go of it (each model holds a reference)."""
    with _CONTEXTS_LOCK:
        for key, (c, _) in list(_CONTEXTS.items()):
            if c is ctx:
                del _CONTEXTS[key]


def _fmt_bytes(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def _fail_hook() -> tuple[bool, int]:
    """(fail allocations, forward calls before a simulated device loss or -1) from QORA_VK_FAIL."""
    raw = os.environ.get("QORA_VK_FAIL", "").strip().lower()
    if not raw:
        return False, -1
    if raw == "alloc":
        return True, -1
    if raw.startswith("run:") and raw[4:].isdigit():
        return False, int(raw[4:])
    raise QoraError(f"QORA_VK_FAIL={raw!r}: expected 'alloc' or 'run:N'")


# Candidates a sampling step reads back at least: the default top-k (20), one more, and room for the
# recent tokens' penalties (a 64-token window) to push some below the rest (sample_topk.comp).
SAMPLE_NEED = 128


class DeviceLogits:
    """One decode step's logits row, left on the GPU (VulkanEngine.forward_lazy): `candidates` (the
    logits at or above a threshold, at least SAMPLE_NEED; layout in include/qora/vk_backend.h) is what
    the Sampler reads; np.asarray() copies the whole row back, valid until the engine's next step."""

    def __init__(self, engine, candidates: np.ndarray, step: int):
        self.candidates = candidates
        self.vocab_size = engine.vocab_size
        self._engine, self._step, self._row = engine, step, None

    def __array__(self, dtype=None, copy=None):
        if self._row is None:
            self._row = self._engine._read_logits(self._step)
        return self._row if dtype is None else self._row.astype(dtype)

    @property
    def shape(self):
        return (self.vocab_size,)


class VulkanEngine:
    """The Engine (qora.engine.base) on a Vulkan GPU: forward(tokens, start_pos) -> logits, with the KV
    cache on the device. Batched steps (open_slots, forward_batch, copy_slot) keep each sequence slot's
    cache on the device too, apart from the one `forward` uses (as the CPU engine does)."""

    def __init__(
        self,
        qfile,
        n_threads: int | None = None,
        max_seq_len: int | None = None,
        required: bool = False,
        kv_type: str | None = None,
        cpu_precision: str | None = None,
    ):
        self._cpu_precision = cpu_precision  # the arithmetic asked for: the GPU's, and the CPU's on a fallback
        core = _core()
        if core is None:
            raise GpuUnavailable("this build of qora has no Vulkan backend", quiet=True)
        for name, info in qfile.tensor_info.items():  # types with CPU kernels only: the CPU engine runs them
            if info["dtype"] not in dtypes.VULKAN:
                raise GpuUnavailable(f"tensor {name} is {info['dtype']}, which the Vulkan backend cannot run yet")
        # the CPU engine's arithmetic for the same file and request: "q8" rounds Q4_0 / Q8_0 products'
        # activations to Q8 (integer block sums, as the CPU does); "f32" keeps every product's activations
        # float. The other block types take float activations in either (their CPU "q8" partner, Q8_K
        # for the K types, is not mirrored on the GPU).
        self.precision = resolve_precision(cpu_precision, qfile)
        self.config = cfg = qfile.config
        self._qfile = qfile
        self._cpu = None
        self._model = self._ctx = None
        self._lock = None
        self._closed = False
        # The weights are read from the file's mapping only while they are uploaded: a change of the
        # file afterwards leaves the device copy intact (forward goes on), and a CPU fallback, which
        # would read the mapping again, refuses it (CpuEngine checks the same guard).
        self._guard = file_guard(qfile)
        self._guard.check()
        self.n_threads = int(n_threads) if n_threads else default_threads()
        self.vocab_size = cfg["vocab_size"]
        fail_alloc, fail_after = _fail_hook()
        info = self._open_device(core, required)
        inv_freq, rope_scale = rope_parameters(cfg)
        tensors = {name: (i["dtype"], tuple(i["shape"]), qfile.tensor(name)) for name, i in qfile.tensor_info.items()}
        opts = self._options(qfile, fail_after, kv_type, self.precision)
        seq, need = self._fit_context(core, info, tensors, inv_freq, rope_scale, max_seq_len, opts)
        self._upload(core, info, tensors, inv_freq, rope_scale, seq, opts, fail_alloc)
        self.max_seq_len = seq
        self.device = "vulkan"
        self.device_name = info["name"]
        self.device_info = info
        self.isa = "vulkan"
        # which kernel family runs the prefill products: tensor cores where the device lists them
        self.matmul = "coopmat" if info.get("coopmat") and opts["coopmat"] else "fp32"
        self.notes.append(
            "vulkan: prefill products on "
            + (
                "tensor cores (KHR cooperative matrices, f16 x f16 -> f32)"
                if self.matmul == "coopmat"
                else "the fp32 shader path" + ("" if info.get("coopmat") else " (no f16 cooperative matrices here)")
            )
        )
        log.debug(self.notes[-1])
        self.vram_bytes = need
        self.kv_dtype = KV_NAMES[opts["kv_type"]]
        self._batch, self._logit_rows = self._model.batch, self._model.logit_rows
        self._step = 0  # decode steps of forward_lazy: a DeviceLogits reads its row only before the next
        self._tokens = np.zeros(seq, dtype=np.int32)  # what the KV cache holds, to replay on a fallback
        self._n_tokens = 0
        # the slots of batched steps: their context, rows per pass, and what each slot's cache holds
        # (tokens and how many), to replay on a fallback
        self._slot_context = self._pass_rows = self._ents = 0
        self._slot_tokens = np.zeros((0, 0), dtype=np.int32)
        self._slot_len = np.zeros(0, dtype=np.int64)

    def _open_device(self, core, required: bool) -> dict:
        """The chosen device's facts; its shared context (and lock) on self."""
        loader = os.environ.get("QORA_VK_LOADER") or None
        try:
            found = core.list_devices(loader)
        except core.VulkanError as e:
            raise GpuUnavailable(str(e), quiet=e.kind in ("loader", "no_device")) from None
        info = choose_device(found, required)
        try:
            self._ctx, self._lock = _context(core, loader, info["index"])
        except core.VulkanError as e:
            raise GpuUnavailable(f"{info['name']}: {e}") from None
        return info

    @staticmethod
    def _options(qfile, fail_after: int, kv_type: str | None = None, precision: str = "q8") -> dict:
        """Kernel choices for the C backend (environment overrides for tuning and tests)."""
        return {
            "batch": _env_int("QORA_VK_BATCH", 0),
            "mv_threads": _env_int("QORA_VK_MV_THREADS", 0),
            "mv_rows": _env_int("QORA_VK_MV_ROWS", 0),
            "att_splits": _env_int("QORA_VK_ATT_SPLITS", 0),
            "att_short": _env_int("QORA_VK_ATT_SHORT", -1),
            "att_kernel": _env_int("QORA_VK_ATT_KERNEL", 0),  # 0: the backend's default
            "att_threads": _env_int("QORA_VK_ATT_THREADS", 0),
            "gu_rows": _env_int("QORA_VK_GU_ROWS", 0),
            "int_dot": _env_int("QORA_VK_DOT", -1),  # -1: where the driver says it is accelerated
            # tensor-core prefill: 1 for the products big enough to pay, 2 all (tests), 0 none
            "coopmat": _env_int("QORA_VK_COOPMAT", 1),
            "coop_min_tiles": _env_int("QORA_VK_COOP_MIN_TILES", 0),  # 0: the backend's default
            "profile": 1 if _env_flag("QORA_VK_PROFILE") else 0,
            "chunk_rows": _env_int("QORA_VK_CHUNK_ROWS", 0),  # tests: the embedding / LM head in pieces
            # the CPU engine's choice, so both compute the same (qora_dtype values)
            "kv_type": KV_NAMES.index(kv_cache_dtype(qfile, kv_type)),
            "f32_act": 1 if precision == "f32" else 0,
            "fail_after": fail_after,
        }

    def _fit_context(self, core, info, tensors, inv_freq, rope_scale, max_seq_len, opts) -> tuple[int, int]:
        """(context, device bytes) of the KV cache on the device: the default context shrinks to fit;
        an explicit one must fit."""
        cfg = self.config
        kv_name = KV_NAMES[opts["kv_type"]]
        seq = default_context(cfg, max_seq_len, kv_name)
        budget = _VRAM_FRACTION * info["vram_budget"]
        try:
            need = core.estimate(self._ctx, cfg, tensors, inv_freq, rope_scale, seq, opts)
            while need > budget and max_seq_len is None and seq > _MIN_AUTO_CONTEXT:
                seq = max(_MIN_AUTO_CONTEXT, seq // 2)
                need = core.estimate(self._ctx, cfg, tensors, inv_freq, rope_scale, seq, opts)
        except core.VulkanError as e:
            self._release()
            raise GpuUnavailable(f"{info['name']}: {e}") from None
        except ValueError as e:
            self._release()
            raise QoraError(f"{self._qfile.path}: cannot build the engine: {e}") from e
        # pre-flight facts for --verbose: the KV cache's share, by its element type
        kv = int(2 * cfg["n_layers"] * seq * cfg["n_kv_heads"] * cfg["head_dim"] * KV_ELEMENT_BYTES[kv_name])
        self.notes = [
            f"vulkan: {info['name']} ({info['type']}, Vulkan {info['api_version']}): the model needs "
            f"{_fmt_bytes(need)} of {_fmt_bytes(info['vram_budget'])} device memory ({seq}-token context, "
            f"{_fmt_bytes(kv)} of it the {kv_name} KV cache)"
        ]
        log.debug(self.notes[0])
        if need > budget:
            fits = self._context_that_fits(core, cfg, tensors, inv_freq, rope_scale, opts, budget)
            self._release()
            raise GpuUnavailable(
                f"{info['name']}: the model needs {_fmt_bytes(need)} of device memory with a {seq}-token context "
                f"({_fmt_bytes(kv)} of KV cache), {_fmt_bytes(info['vram_budget'])} available"
                + (f"; a {fits}-token context fits" if fits else "")
            )
        return seq, need

    def _context_that_fits(self, core, cfg, tensors, inv_freq, rope_scale, opts, budget) -> int:
        """The longest context whose estimate fits the budget (the estimate grows linearly with it), 0 if none."""
        try:
            one = core.estimate(self._ctx, cfg, tensors, inv_freq, rope_scale, 1, opts)
            per = core.estimate(self._ctx, cfg, tensors, inv_freq, rope_scale, 2, opts) - one
        except (core.VulkanError, ValueError):
            return 0
        if one > budget or per <= 0:
            return 0
        return int(min(cfg["max_seq_len"], 1 + (budget - one) // per))

    def _upload(self, core, info, tensors, inv_freq, rope_scale, seq, opts, fail_alloc: bool) -> None:
        """Allocate every buffer and upload the weights: the real probe (a model that does not fit
        fails here), guarded against the file shrinking under the upload."""
        try:
            with self._lock:
                self._ctx.set_fail_alloc(fail_alloc)
                try:
                    self._model = core.Model(self._ctx, self.config, tensors, inv_freq, rope_scale, seq, opts)
                finally:
                    self._ctx.set_fail_alloc(False)
        except core.VulkanError as e:
            self._release()
            raise GpuUnavailable(f"{info['name']}: {e}") from None
        if self._guard.poisoned:  # the file shrank during the upload: the device holds zero pages
            self._release()
            raise self._guard.error()

    def _release(self, lost: bool = False):
        if self._model is not None:
            try:
                self._model.close()
            except Exception:  # a lost device may refuse even to be destroyed cleanly
                pass
        if lost and self._ctx is not None:
            _drop_context(self._ctx)
        self._model = self._ctx = None

    def _fall_back(self, error, start_pos: int):
        """Continue on the CPU engine: rebuild its KV cache from the tokens the GPU had seen."""
        log.warning("the GPU failed (%s); continuing on the CPU from position %d", error, start_pos)
        self._release(lost=True)
        if start_pos > self._n_tokens:
            raise QoraError(f"cannot continue on the CPU: positions {self._n_tokens}..{start_pos - 1} were never run")
        cpu = CpuEngine(
            self._qfile,
            n_threads=self.n_threads,
            max_seq_len=self.max_seq_len,
            kv_type=self.kv_dtype,
            precision=self._cpu_precision,
        )
        if start_pos:
            cpu.forward(self._tokens[:start_pos], 0)
        n_slots = self._slot_len.size
        if n_slots:
            cpu.open_slots(n_slots, self._slot_context)
            for slot in np.flatnonzero(self._slot_len):
                cpu.forward_batch([(int(slot), self._slot_tokens[slot, : self._slot_len[slot]], 0)])
        self._cpu = cpu
        self.device, self.isa = "cpu", cpu.isa
        self.device_name = "cpu"

    def forward(self, tokens, start_pos: int, all_logits: bool = False) -> np.ndarray:
        """Run tokens at positions start_pos.. ; (n, vocab) logits if all_logits else (1, vocab) for the last."""
        if self._closed:
            raise QoraError("the model is closed")
        if self._cpu is not None:
            return self._cpu.forward(tokens, start_pos, all_logits)
        ids = check_tokens(tokens, start_pos, self.max_seq_len, self.vocab_size)
        n = ids.shape[0]
        core = _core()
        step = self._logit_rows if all_logits else self._batch
        outs = []
        try:
            for i in range(0, n, step):  # one submission per chunk; Ctrl-C is honoured between chunks
                chunk = ids[i : i + step]
                last = i + step >= n
                # the context's lock: GPU work is serialized, and close() (another thread, e.g. a
                # server shutting down) cannot free the model while it runs
                with self._lock:
                    if self._model is None:
                        raise QoraError("the model is closed")
                    out = self._model.forward(chunk, start_pos + i, all_logits)
                    self._step += 1
                self._tokens[start_pos + i : start_pos + i + len(chunk)] = chunk
                self._n_tokens = start_pos + i + len(chunk)
                if all_logits or last:
                    outs.append(out)
        except core.VulkanError as e:
            if e.kind == "args":  # our own mistake, not the device's
                raise QoraError(str(e)) from None
            self._fall_back(e, start_pos)
            return self._cpu.forward(tokens, start_pos, all_logits)
        return outs[0] if len(outs) == 1 else np.concatenate(outs, axis=0)

    def forward_lazy(self, token: int, pos: int):
        """forward([token], pos) for a generation step: a DeviceLogits whose row stays on the GPU (the
        sampling candidates come back, the whole row only when asked for); on the CPU after a fallback,
        the plain logits row."""
        if self._closed:
            raise QoraError("the model is closed")
        if self._cpu is not None:
            return self._cpu.forward(np.array([token], dtype=np.int32), pos)[-1]
        ids = check_tokens([token], pos, self.max_seq_len, self.vocab_size)
        core = _core()
        try:
            with self._lock:
                if self._model is None:
                    raise QoraError("the model is closed")
                out = self._model.forward_topk(int(ids[0]), pos, SAMPLE_NEED)
                self._step += 1
        except core.VulkanError as e:
            if e.kind == "args":
                raise QoraError(str(e)) from None
            self._fall_back(e, pos)
            return self._cpu.forward(ids, pos)[-1]
        self._tokens[pos] = ids[0]
        self._n_tokens = pos + 1
        return DeviceLogits(self, out, self._step)

    def _read_logits(self, step: int) -> np.ndarray:
        with self._lock:
            if self._model is None or step != self._step:
                raise QoraError("these logits were overwritten by a later step (read them before the next one)")
            return self._model.read_logits()[0]

    def profile(self):
        """GPU time per decode kernel under QORA_VK_PROFILE=1: ({name: (ms, calls) per step}, ms per step)."""
        return self._model.profile() if self._model is not None else ({}, 0.0)

    def prefill_profile(self):
        """GPU time per prefill kernel under QORA_VK_PROFILE=1: ({name: (ms, calls) per prefill submission},
        ms per submission)."""
        return self._model.prefill_profile() if self._model is not None else ({}, 0.0)

    def slot_memory(self) -> int | None:
        """Device bytes left for the slots' KV caches (qora.api.batch.plan_slots); None on the CPU."""
        if self._cpu is not None:
            return None
        return max(0, int(_VRAM_FRACTION * self.device_info["vram_budget"]) - int(self.vram_bytes))

    def open_slots(self, n_slots: int, context: int | None = None, rows: int | None = None) -> int:
        """KV caches on the device for n_slots sequences of batched steps, each of `context` positions (at
        most, and by default, max_seq_len), passes of at most `rows` token rows (default: the prefill
        submission's); they must fit the device memory the model left (the pre-flight says what fits)."""
        if self._closed:
            raise QoraError("the model is closed")
        if self._cpu is not None:
            return self._cpu.open_slots(n_slots, context, rows)
        n_slots, ctx = slot_request(n_slots, context, self.max_seq_len)
        pass_rows = min(int(rows), self._batch) if rows else self._batch
        if pass_rows < 1:
            raise QoraError(f"rows must be >= 1, got {rows}")
        ents = min(n_slots, self._batch)
        core = _core()
        with self._lock:
            if self._model is None:
                raise QoraError("the model is closed")
            self._slot_preflight(core, n_slots, ctx, ents)
            # steps of a few decode rows as single-sequence decode steps (0: the batched path, for A/B)
            self._model.set_slot_decode(max(0, _env_int("QORA_VK_SLOT_DECODE", SLOT_DECODE_ROWS)))
            try:
                self._model.open_batch(n_slots, ctx, ents)
            except core.VulkanError as e:
                self._slot_len = np.zeros(0, dtype=np.int64)
                raise QoraError(f"{self.device_name}: cannot open {n_slots} sequences of {ctx} tokens: {e}") from None
        self._slot_context, self._pass_rows, self._ents = ctx, pass_rows, ents
        self._slot_tokens = np.zeros((n_slots, ctx), dtype=np.int32)
        self._slot_len = np.zeros(n_slots, dtype=np.int64)
        return n_slots

    def _slot_preflight(self, core, n_slots: int, ctx: int, ents: int) -> None:
        """The slots' device memory against what the model left of the budget: a clear error saying
        what fits instead of an allocation failure."""
        try:
            need = self._model.batch_bytes(n_slots, ctx, ents)
            one = self._model.batch_bytes(n_slots, 1, ents)
            per = self._model.batch_bytes(n_slots, 2, ents) - one
        except core.VulkanError as e:
            raise QoraError(f"{self.device_name}: {e}") from None
        free = self.slot_memory()
        log.debug("vulkan: %d sequences of %d tokens take %s of device memory", n_slots, ctx, _fmt_bytes(need))
        if need <= free:
            return
        fits = int(min(ctx, 1 + (free - one) // per)) if free >= one and per > 0 else 0
        raise QoraError(
            f"{self.device_name}: {n_slots} sequences of {ctx} tokens need {_fmt_bytes(need)} of device memory for "
            f"their KV caches, {_fmt_bytes(free)} is left after the model"
            + (f"; {n_slots} sequences of {fits} tokens fit" if fits else "; lower the number of sequences")
        )

    def _passes(self, entries):
        """The entries cut into passes of at most _pass_rows rows and _ents entries; each piece is
        (slot, ids, start, last piece of its entry)."""
        passes, cur, rows = [], [], 0
        for slot, ids, start in entries:
            off = 0
            while off < ids.size:
                if rows == self._pass_rows or len(cur) == self._ents:
                    passes.append(cur)
                    cur, rows = [], 0
                take = min(self._pass_rows - rows, ids.size - off)
                cur.append((slot, ids[off : off + take], start + off, off + take == ids.size))
                rows += take
                off += take
        passes.append(cur)
        return passes

    def forward_batch(self, seqs) -> list[np.ndarray]:
        """One step over (slot, tokens, start_pos) entries, in as few passes as the rows allow (the weights
        read once per pass for all rows); each entry's last-token logits (vocab,). Entries of one slot must
        come in position order."""
        if self._closed:
            raise QoraError("the model is closed")
        if self._cpu is not None:
            return self._cpu.forward_batch(seqs)
        entries = batch_entries(seqs, self._slot_len.size, self._slot_context, self.vocab_size)
        core = _core()
        out = []
        try:
            for pieces in self._passes(entries):
                tokens = np.concatenate([ids for _, ids, _, _ in pieces]).astype(np.int32)
                table = np.array([(slot, start, ids.size) for slot, ids, start, _ in pieces], dtype=np.int32)
                with self._lock:
                    if self._model is None:
                        raise QoraError("the model is closed")
                    logits = self._model.forward_batch(tokens, table)
                    self._step += 1
                for (slot, ids, start, last), row in zip(pieces, logits, strict=True):
                    self._slot_tokens[slot, start : start + ids.size] = ids
                    self._slot_len[slot] = start + ids.size
                    if last:
                        out.append(row)
        except core.VulkanError as e:
            if e.kind == "args":
                raise QoraError(str(e)) from None
            self._fall_back(e, self._n_tokens)
            return self._cpu.forward_batch(seqs)
        return out

    def copy_slot(self, src: int, dst: int, n: int) -> None:
        """Positions 0..n-1 of slot src's cache copied to slot dst (a GPU buffer copy)."""
        if self._closed:
            raise QoraError("the model is closed")
        if self._cpu is not None:
            return self._cpu.copy_slot(src, dst, n)
        src, dst, n = int(src), int(dst), int(n)
        n_slots = self._slot_len.size
        if not (0 <= src < n_slots and 0 <= dst < n_slots and 0 <= n <= self._slot_context):
            raise QoraError(f"cannot copy {n} positions from slot {src} to slot {dst}")
        core = _core()
        try:
            with self._lock:
                if self._model is None:
                    raise QoraError("the model is closed")
                self._model.copy_slot(src, dst, n)
        except core.VulkanError as e:
            if e.kind == "args":
                raise QoraError(f"cannot copy {n} positions from slot {src} to slot {dst}") from None
            self._fall_back(e, self._n_tokens)
            return self._cpu.copy_slot(src, dst, n)
        if src != dst:
            self._slot_tokens[dst, :n] = self._slot_tokens[src, :n]
            self._slot_len[dst] = n

    def reset(self):
        """Nothing to clear on the device: positions past start_pos are overwritten before they are read."""
        self._n_tokens = 0
        if self._cpu is not None:
            self._cpu.reset()

    def close(self):
        self._closed = True
        self._guard = None  # its buffer export would keep the file mapped
        if self._lock is not None:
            with self._lock:
                self._release()
        else:
            self._release()
        if self._cpu is not None:
            self._cpu.close()
