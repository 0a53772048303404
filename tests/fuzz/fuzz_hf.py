"""Fuzz the Hugging Face folder importer (config.json + model.safetensors, see corpus_tools.hf_entry).

    python tests/fuzz/fuzz_hf.py CORPUS_DIR [-max_total_time=SECONDS]
"""

import harness

if __name__ == "__main__":
    harness.main("hf")
