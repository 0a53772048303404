"""Build the compiled core: one Cython extension holding the header-only C engine.

OpenMP is used where the compiler has it (gcc/clang -fopenmp, MSVC /openmp,
Apple clang + libomp); without it the build still succeeds, single-threaded,
with a warning. No -march=native: per-ISA code uses target attributes and is
chosen at run time, so one binary runs on any x86-64.
"""

import os
import shutil
import subprocess
import sys
import tempfile
import warnings

from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


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


class BuildExt(build_ext):
    def build_extensions(self):
        ctype = self.compiler.compiler_type
        sanitize = os.environ.get("QORA_SANITIZE")  # e.g. "address,undefined" for a debug build
        for ext in self.extensions:
            if ctype == "msvc":
                ext.extra_compile_args += ["/O2", "/openmp"]
                continue
            cc = self.compiler.compiler_so[:1] if hasattr(self.compiler, "compiler_so") else ["cc"]
            ext.extra_compile_args += ["-O3", "-fno-strict-aliasing", "-Wno-unused-function"]
            if sanitize:
                ext.extra_compile_args += [f"-fsanitize={sanitize}", "-fno-omit-frame-pointer", "-O1", "-g"]
                ext.extra_link_args += [f"-fsanitize={sanitize}"]
            omp = None
            if os.environ.get("QORA_NO_OPENMP"):
                omp = None
            elif _try_compile(cc, ["-fopenmp"]):
                omp = (["-fopenmp"], ["-fopenmp"])
            elif sys.platform == "darwin":
                prefix = os.environ.get("LIBOMP_PREFIX") or (
                    subprocess.run(["brew", "--prefix", "libomp"], capture_output=True, text=True).stdout.strip()
                    if shutil.which("brew")
                    else ""
                )
                if prefix and _try_compile(
                    cc, ["-Xpreprocessor", "-fopenmp", f"-I{prefix}/include", f"-L{prefix}/lib", "-lomp"]
                ):
                    omp = (["-Xpreprocessor", "-fopenmp", f"-I{prefix}/include"], [f"-L{prefix}/lib", "-lomp"])
            if omp:
                ext.extra_compile_args += omp[0]
                ext.extra_link_args += omp[1]
            else:
                warnings.warn("qora: compiler has no OpenMP; building a single-threaded engine", stacklevel=1)
        super().build_extensions()


here = os.path.dirname(os.path.abspath(__file__))
extensions = [
    Extension(
        "qora._core._cpu",
        ["qora/_core/_cpu.pyx"],
        include_dirs=[os.path.join(here, "include")],
        depends=[os.path.join("include", "qora", h) for h in os.listdir(os.path.join(here, "include", "qora"))]
        + ["qora/_core/weights.pxi"],
    ),
    # The Vulkan backend: C against vendored Khronos headers (include/vulkan, Apache-2.0), the loader
    # opened at run time, so every wheel carries it and it imports where no Vulkan stack exists.
    Extension(
        "qora._core._vulkan",
        ["qora/_core/_vulkan.pyx", "qora/_core/qora_vk.c"],
        include_dirs=[os.path.join(here, "include"), os.path.join(here, "qora", "_core")],
        libraries=["dl"] if sys.platform.startswith("linux") else [],
        depends=["include/qora/vk_backend.h", "include/vulkan/vulkan_core.h", "qora/_core/shaders_spv.h",
                 "qora/_core/weights.pxi"],
    ),
]

# SPIR-V is committed (qora/_core/shaders_spv.h); regenerate it only where glslc exists and a shader changed.
if shutil.which("glslc") and os.path.exists(os.path.join(here, "tools", "gen_shaders.py")):
    subprocess.run([sys.executable, os.path.join(here, "tools", "gen_shaders.py"), "--if-stale"], check=True)

setup(
    ext_modules=cythonize(extensions, compiler_directives={"language_level": "3"}),
    cmdclass={"build_ext": BuildExt},
)
