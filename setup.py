"""Build the compiled core: two Cython extensions, the header-only C engine (_cpu) and the Vulkan backend (_vulkan).

OpenMP is used where the compiler has it (gcc/clang -fopenmp, MSVC /openmp,
Apple clang + libomp); without it the build still succeeds, single-threaded,
with a warning. No -march=native: per-ISA code uses target attributes and is
chosen at run time, so one binary runs on any x86-64.

Importing this file does nothing but describe the build: shader regeneration and Cython run
inside `build_ext`, which compiles the extensions in parallel (`-j N` to choose, `-j 1` for one
at a time). Every header an extension reads is in its `depends`, so editing one rebuilds it.
"""

import glob
import os
import shutil
import subprocess
import sys
import tempfile
import warnings

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

# Paths are relative to this folder, where setuptools (and pip) run setup.py; relative `depends`
# also go into the sdist by themselves.
VULKAN_HEADERS = os.path.join("third_party", "vulkan-headers")  # Khronos, vendored: see its README.md


def _headers(*patterns):
    return sorted(p for pat in patterns for p in glob.glob(pat, recursive=True))


# qora's own headers and the Cython includes: any extension may reach any of them through forward.h
# or weights.pxi, so each one rebuilds both.
QORA_HEADERS = _headers("include/qora/*.h", "qora/_core/*.pxi")


def _try_compile(compiler_cmd, flags):
    """True if `compiler_cmd flags` builds a tiny OpenMP program."""
    src = "#include <omp.h>\nint main(void){int n=0;\n#pragma omp parallel reduction(+:n)\nn+=1;\nreturn n>0?0:1;}\n"
    with tempfile.TemporaryDirectory() as d:
        c = os.path.join(d, "t.c")
        with open(c, "w") as f:
            f.write(src)
        try:
            r = subprocess.run([*compiler_cmd, c, "-o", os.path.join(d, "t"), *flags], capture_output=True)
        except OSError:
            return False
        return r.returncode == 0


def _openmp_flags(cc):
    """(compile flags, link flags) that turn OpenMP on for this compiler, or None."""
    if os.environ.get("QORA_NO_OPENMP"):
        return None
    if _try_compile(cc, ["-fopenmp"]):
        return ["-fopenmp"], ["-fopenmp"]
    if sys.platform == "darwin":
        prefix = os.environ.get("LIBOMP_PREFIX") or (
            subprocess.run(["brew", "--prefix", "libomp"], capture_output=True, text=True).stdout.strip()
            if shutil.which("brew")
            else ""
        )
        if prefix and _try_compile(cc, ["-Xpreprocessor", "-fopenmp", f"-I{prefix}/include", f"-L{prefix}/lib", "-lomp"]):
            return ["-Xpreprocessor", "-fopenmp", f"-I{prefix}/include"], [f"-L{prefix}/lib", "-lomp"]
    return None


def _regenerate_shaders():
    """SPIR-V is committed (qora/_core/shaders_spv.h); where glslc exists and a shader source no longer
    matches the hashes recorded in that header, regenerate it, so an edited shader is never built stale."""
    tool = os.path.join("tools", "gen_shaders.py")
    if shutil.which("glslc") and os.path.exists(tool):
        subprocess.run([sys.executable, tool, "--if-stale"], check=True)


class BuildExt(build_ext):
    def finalize_options(self):
        # Both extensions at once unless -j says otherwise (distutils: True means one worker per CPU).
        if self.parallel is None:
            self.parallel = True
        super().finalize_options()

    def run(self):
        _regenerate_shaders()
        # Cython here rather than at import: .pyx -> .c only when a build runs (and only where stale), and
        # before the parallel compile, one extension after the other.
        from Cython.Build import cythonize

        for ext in self.extensions:  # in place: build_ext has already annotated these Extension objects
            (cythonized,) = cythonize([ext], compiler_directives={"language_level": "3"}, force=self.force)
            ext.sources = cythonized.sources
        super().run()

    def build_extensions(self):
        ctype = self.compiler.compiler_type
        sanitize = os.environ.get("QORA_SANITIZE")  # e.g. "address,undefined" for a debug build
        if ctype == "msvc":
            compile_args, link_args = ["/O2", "/openmp"], []
        else:
            cc = self.compiler.compiler_so[:1] if hasattr(self.compiler, "compiler_so") else ["cc"]
            # no fp contraction: every fused multiply-add is an explicit fma (include/qora/common.h), and
            # the dequantized values must be gguf-py's unfused products and sums bit for bit
            compile_args = ["-O3", "-fno-strict-aliasing", "-Wno-unused-function", "-ffp-contract=off"]
            link_args = []
            if sanitize:
                compile_args += [f"-fsanitize={sanitize}", "-fno-omit-frame-pointer", "-O1", "-g"]
                link_args += [f"-fsanitize={sanitize}"]
            omp = _openmp_flags(cc)
            if omp:
                compile_args += omp[0]
                link_args += omp[1]
            else:
                warnings.warn("qora: compiler has no OpenMP; building a single-threaded engine", stacklevel=1)
        for ext in self.extensions:
            ext.extra_compile_args += compile_args
            ext.extra_link_args += link_args
        super().build_extensions()


extensions = [
    Extension(
        "qora._core._cpu",
        ["qora/_core/_cpu.pyx"],
        include_dirs=["include"],
        depends=QORA_HEADERS,
    ),
    # The Vulkan backend: C against the vendored Khronos headers (third_party/vulkan-headers), the loader
    # opened at run time, so every wheel carries it and it imports where no Vulkan stack exists.
    Extension(
        "qora._core._vulkan",
        ["qora/_core/_vulkan.pyx", "qora/_core/qora_vk.c"],
        include_dirs=["include", VULKAN_HEADERS, os.path.join("qora", "_core")],
        libraries=["dl"] if sys.platform.startswith("linux") else [],
        depends=QORA_HEADERS
        + ["qora/_core/shaders_spv.h"]
        + _headers(os.path.join(VULKAN_HEADERS, "**", "*.h")),
    ),
]

setup(ext_modules=extensions, cmdclass={"build_ext": BuildExt})
