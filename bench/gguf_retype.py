"""Write a copy of a GGUF file with its matrices stored in another type (F32, F16, Q8_0, Q4_0, ...),
metadata and tensor order kept, through gguf-py: e.g. the demo's Q4_1 GGUF as F16, the base that
llama-quantize turns into Q8_0 / Q4_K_M / Q6_K for the perplexity comparison in bench/NOTES.md.

    python bench/gguf_retype.py SmolLM2-135M-Instruct.Q4_1.gguf /tmp/smollm2.f16.gguf --type F16

1-D tensors (norms) stay as they are; every 2-D tensor is dequantized and encoded as --type
(gguf-py's reference quantizers). Trusted input only: this is a tool, not the loader.
"""

from __future__ import annotations

import argparse

import numpy as np


def main() -> None:
    import gguf
    from gguf.quants import dequantize, quantize

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--type", default="F16", help="ggml type name of the matrices (F32, F16, Q8_0, ...)")
    a = ap.parse_args()
    T = gguf.GGMLQuantizationType
    want = T[a.type]
    r = gguf.GGUFReader(a.src)
    arch = r.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(a.dst, arch)
    for key, field in r.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type"):
            continue
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            w.add_key_value(key, field.contents(), vtype, sub_type=field.types[-1])
        else:
            w.add_key_value(key, field.contents(), vtype)
    for t in r.tensors:
        shape = tuple(int(s) for s in reversed(t.shape))  # rows first
        if len(shape) == 1:
            w.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
            continue
        x = dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float32)
        data = quantize(x, want)
        w.add_tensor(t.name, data, raw_shape=data.shape, raw_dtype=want)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(f"wrote {a.dst} ({a.type})")


if __name__ == "__main__":
    main()
