"""Fuzz the chat template sandbox and the tokenizer (render, encode, stream-decode).

    python tests/fuzz/fuzz_template.py CORPUS_DIR [-max_total_time=SECONDS]
"""

import harness

if __name__ == "__main__":
    harness.main("template")
