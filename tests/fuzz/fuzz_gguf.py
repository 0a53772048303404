"""Fuzz the GGUF importer (qora.convert.convert on a .gguf file).

    python tests/fuzz/fuzz_gguf.py CORPUS_DIR [-max_total_time=SECONDS]
"""

import harness

if __name__ == "__main__":
    harness.main("gguf")
