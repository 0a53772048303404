"""Sane limits for everything that comes from a model file, a config or a caller.

One table so the .qora reader, the converters (safetensors, GGUF, config.json), the engine and the
chat template agree. Every bound is far above any real model (SmolLM3-3B: 36 layers, dim 2048,
vocab 128256, context 65536; Llama 3.1 405B: 126 layers, dim 16384) and low enough that every
size derived from them (rows * cols * 4, layers * tensors, positions * heads) stays exact in
int64 on the C side and is checked against the file size before anything is allocated.
"""

from __future__ import annotations

# Model shape (normalized config keys).
CONFIG_INT_LIMITS = {
    "n_layers": 4096,
    "dim": 1 << 17,
    "n_heads": 4096,
    "n_kv_heads": 4096,
    "head_dim": 4096,
    "hidden_dim": 1 << 20,
    "vocab_size": 1 << 24,
    "max_seq_len": 1 << 26,
}
MAX_TENSOR_DIM = 1 << 32  # one tensor dimension (C stores rows/cols as int32 after the config check)

# Headers and metadata. A tokenizer.json is a few MiB (Llama 3: 9 MiB); a JSON header this large
# already costs a few hundred MiB of Python objects, so nothing larger is parsed.
MAX_HEADER_BYTES = 64 << 20  # .qora JSON header
MAX_SAFETENSORS_HEADER_BYTES = 100 << 20  # the safetensors library's own limit
MAX_JSON_FILE_BYTES = 64 << 20  # config.json, tokenizer.json, tokenizer_config.json, ...
MAX_JSON_DEPTH = 64  # nesting of any JSON document we parse (real ones are under 10 deep)

# GGUF: counts in the header are checked against these and against the bytes left in the file
# before the gguf package walks them.
GGUF_MAX_TENSORS = 1 << 16
GGUF_MAX_KV = 1 << 16
GGUF_MAX_ARRAY = 1 << 24  # elements of one metadata array (a vocabulary is ~128K-256K strings)
GGUF_MAX_STRING = 1 << 26  # bytes of one metadata string (chat templates are ~10 KiB)
GGUF_MAX_DIMS = 4  # GGML_MAX_DIMS

# --- Model files from strangers: totals over a whole file (issue 16, files and numbers) ---
# A GGUF's metadata is decoded into Python objects (tens of bytes per array element), so the sum
# over all arrays is bounded, not only each array: the largest real vocabularies (256K tokens,
# their merges and token types) hold about 1M elements and a few tens of MiB.
GGUF_MAX_METADATA_ELEMENTS = 1 << 22  # array elements over all metadata entries
GGUF_MAX_METADATA_BYTES = 256 << 20  # bytes from the start of the file to the end of the metadata

# Callers: threads, tokens, context.
MAX_THREADS = 1024
MAX_TOKENS = 1 << 26  # max_tokens / think_budget: never more than the largest context
MAX_CONTEXT_RAM_FRACTION = 0.9  # a requested KV cache may use at most this share of available RAM

# Chat templates run in a sandbox; these bound what one render may do.
TEMPLATE_MAX_OUTPUT = 4 << 20  # characters of one rendered prompt (far beyond any context)
TEMPLATE_MAX_LOOP_STEPS = 1 << 20  # loop iterations in one render
TEMPLATE_MAX_SECONDS = 5.0  # wall time of one render
TEMPLATE_MAX_POWER = 4096  # largest exponent for `**` on integers
# Characters of a chat template's source (real ones: 10-20K); compiling costs ~8 µs a character, so
# 100K `{% if %}` blocks (2 MB) took 40 s. Compiling also runs under TEMPLATE_MAX_SECONDS.
TEMPLATE_MAX_SOURCE = 1 << 20
# ── Chat templates and tokenizers (issue 16: qora/tokenizer.py) ──
# Characters one render may create in all (every operator, call and filter result counts): real
# templates make a few times their output; bounds the memory and time of quadratic string building.
TEMPLATE_MAX_PRODUCED = 32 << 20
TEMPLATE_MAX_CALL_DEPTH = 64  # nested macro/function calls (recursive macros for JSON schemas: < 20)
TEMPLATE_MAX_WIDTH = 1 << 16  # a width, indent, precision or tab size a template may ask for
TEMPLATE_MAX_SLOW_FILTER = 1 << 18  # characters wordwrap, title, urlize... may be given (Python code per word)
# A tokenizer.json's normalizer, pre-tokenizer and decoder may each grow text by at most these
# factors (an upper bound read from their settings before the file is loaded: NFKC 18, BERT's 36,
# byte-level 4-5); a Replace mapping one character to many, nested, multiplied text a billionfold.
TOKENIZER_MAX_EXPANSION = 64
TOKENIZER_MAX_PRETOKENIZER_EXPANSION = 8
# One encode: at most this many characters in (a rendered prompt's limit), and at most this many
# characters after the worst-case growth (tokenizers keeps ~100 bytes per character while it works).
TOKENIZER_MAX_INPUT = TEMPLATE_MAX_OUTPUT
TOKENIZER_MAX_WORK = 32 << 20

# ── Server and CLI input (qora serve, the prompt readers; qora/server.py, qora/cli.py, qora/chat.py) ──
# A request body is read at most this far (qora serve --max-body-bytes): 1 MiB is ~250K tokens of
# English, beyond any context, and what is parsed from it stays a small multiple of it.
SERVER_MAX_BODY_BYTES = 1 << 20
SERVER_MAX_MESSAGES = 4096  # messages of one chat request
SERVER_MAX_CONTENT_PARTS = 1024  # text parts of one message's content
SERVER_MAX_STOP_CHARS = 1024  # characters of one stop string (up to 4 of them, OpenAI's limit)
SERVER_MAX_NUMBER_CHARS = 64  # characters of one JSON number literal (a 64-bit seed is 20)
SERVER_MAX_QUEUED = 256  # requests waiting for the engine; more are answered 429 (qora serve --max-queued)
# Sequences decoded together (qora serve --parallel, CpuEngine.open_slots): each holds a whole
# context's KV cache; past 256 a step's rows outgrow what one pass's scratch is sized for.
MAX_BATCH_SLOTS = 256
SERVER_MAX_CONNECTIONS = 512  # open connections and tasks (uvicorn's limit_concurrency); more get 503
# Structured output (qora/structured.py): a JSON schema or grammar is refused beyond these. 256 KiB
# of schema is far past any real one (OpenAI caps a schema at 100 properties, 5 levels); the parser
# limits are llguidance's own knobs (its defaults are 500K symbols, 200K fuel, 250K lexer states,
# each lexer state 1-2 kB): a quarter of them keeps one hostile grammar's per-token work and memory
# small while every schema of tests/structured_schemas.py compiles.
GRAMMAR_MAX_CHARS = 256 << 10
GRAMMAR_MAX_SIZE = 200_000
GRAMMAR_STEP_FUEL = 200_000
GRAMMAR_MAX_LEXER_STATES = 50_000
LOGIT_BIAS_MAX_ENTRIES = 300  # OpenAI's limit for one request's logit_bias
# CLI: a prompt file / stdin / --prompt is read up to this many bytes (a 64K-token context is ~256 KiB
# of text); REPL input the same per message.
CLI_MAX_PROMPT_BYTES = 16 << 20
# Prompts are checked against the context before the whole text is tokenized: longer than
# PROMPT_CHAR_FACTOR x context x the tokenizer's longest token (in characters) cannot fit; beyond
# PROMPT_COUNT_FROM characters, tokens are counted PROMPT_COUNT_CHUNK characters at a time and
# counting stops once PROMPT_TOKEN_FACTOR x context is passed (chunk edges can shift a count by a
# token or two, so the refusal keeps that margin; the exact check follows in the generation loop).
PROMPT_CHAR_FACTOR = 2
PROMPT_COUNT_FROM = 1 << 16
PROMPT_COUNT_CHUNK = 1 << 16
PROMPT_TOKEN_FACTOR = 2

# --- Files changed under their memory map (issue 16 #11; include/qora/mapguard.h, qora/engine/cpu.py) ---
# Model and conversion-source files watched for truncation at once (a fixed table, so the SIGBUS
# handler allocates nothing); one more is refused with a clear error. Must equal QORA_GUARD_SLOTS.
MAX_MAPPED_FILES = 256
