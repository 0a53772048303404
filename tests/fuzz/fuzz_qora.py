"""Fuzz the .qora reader and loader (qora.load + one short generation).

    python tests/fuzz/fuzz_qora.py CORPUS_DIR [-max_total_time=SECONDS]
"""

import harness

if __name__ == "__main__":
    harness.main("qora")
