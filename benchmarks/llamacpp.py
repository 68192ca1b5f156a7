"""Find or build llama.cpp's tools from the llama-cpp-python source package (which vendors
llama.cpp): `llama-quantize` (the independent K-quant peer), and `llama-perplexity` and
`llama-completion` (the plain text-completion CLI of this llama.cpp version; `llama-cli`
there needs the server build), the runtime licensees load GGUF copies in. Benchmarks and peers only: never
`make test`.

The build is cached per sdist version in ~/.cache/weightmark/llama.cpp/<version>/ (or
$WEIGHTMARK_LLAMACPP_DIR): the sdist is fetched with pip, unpacked, configured with cmake
(Release, CPU only, no curl, static) and only those targets are built, with 2 jobs. A later
call finds the binaries and returns at once.

    python benchmarks/llamacpp.py            # build (minutes the first time), print the path
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Sequence
from pathlib import Path

SDIST = "llama-cpp-python"
SDIST_VERSION = "0.3.36"
JOBS = 2
CMAKE_OPTIONS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DGGML_CUDA=OFF",
    "-DGGML_METAL=OFF",
    "-DGGML_VULKAN=OFF",
)


def cache_dir(version: str = SDIST_VERSION) -> Path:
    """Where the sdist, its sources and the build live: $WEIGHTMARK_LLAMACPP_DIR or the default."""
    override = os.environ.get("WEIGHTMARK_LLAMACPP_DIR")
    if override:
        return Path(override).expanduser()
    return Path.home() / ".cache" / "weightmark" / "llama.cpp" / version


TOOLS = ("llama-quantize", "llama-perplexity", "llama-completion")
ALIASES = {"llama-cli": "llama-completion"}


def binary_path(version: str = SDIST_VERSION, tool: str = "llama-quantize") -> Path:
    return cache_dir(version) / "build" / "bin" / tool


def _say(message: str) -> None:
    print(f"[llama.cpp] {message}", file=sys.stderr, flush=True)


def _run(argv: Sequence[str], log: Path) -> None:
    """Run a build step with its output appended to `log`; on failure show the log's tail."""
    _say("$ " + " ".join(argv))
    with open(log, "ab") as fh:
        proc = subprocess.run(list(argv), stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-30:]
        raise RuntimeError(f"{argv[0]} exited {proc.returncode}; last lines of {log}:\n" + "\n".join(tail))


def _sdist(root: Path, version: str) -> Path:
    """The sdist tarball in `root`, downloaded with pip (source only, no dependencies) if absent."""
    name = f"llama_cpp_python-{version}.tar.gz"
    tarball = root / name
    if tarball.is_file():
        _say(f"using {tarball}")
        return tarball
    _say(f"downloading {SDIST}=={version} (source distribution) into {root}")
    _run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
         f"{SDIST}=={version}", "-d", str(root)],
        root / "download.log",
    )  # fmt: skip
    if not tarball.is_file():
        raise RuntimeError(f"pip did not leave {name} in {root}")
    return tarball


def _unpack(tarball: Path, root: Path, version: str) -> Path:
    """The vendored llama.cpp source folder, unpacking the sdist first when needed."""
    top = root / f"llama_cpp_python-{version}"
    source = top / "vendor" / "llama.cpp"
    if (source / "CMakeLists.txt").is_file():
        return source
    _say(f"unpacking {tarball.name}")
    with tarfile.open(tarball) as tar:
        tar.extractall(root, filter="data")  # refuses absolute paths, links out of root, devices
    if not (source / "CMakeLists.txt").is_file():
        raise RuntimeError(f"{tarball} holds no vendor/llama.cpp/CMakeLists.txt")
    return source


def llama_quantize(version: str = SDIST_VERSION, jobs: int = JOBS) -> Path:
    """Path of a working llama-quantize built from llama-cpp-python==version (built if needed)."""
    return llama_tool("llama-quantize", version, jobs)


def llama_tool(tool: str, version: str = SDIST_VERSION, jobs: int = JOBS) -> Path:
    """Path of one of TOOLS built from llama-cpp-python==version (all of them built if needed)."""
    tool = ALIASES.get(tool, tool)
    if tool not in TOOLS:
        raise ValueError(f"{tool} is not one of {TOOLS}")
    binary = binary_path(version, tool)
    if binary.is_file() and os.access(binary, os.X_OK):
        return binary
    root = cache_dir(version)
    root.mkdir(parents=True, exist_ok=True)
    if shutil.which("cmake") is None:
        raise RuntimeError("cmake is not installed; it is needed to build llama-quantize")
    source = _unpack(_sdist(root, version), root, version)
    build = root / "build"
    log = root / "build.log"
    start = time.perf_counter()
    _say(f"building {', '.join(TOOLS)} in {build} ({jobs} jobs; log: {log}); this takes minutes")
    _run(["cmake", "-S", str(source), "-B", str(build), *CMAKE_OPTIONS], log)
    _run(["cmake", "--build", str(build), "--target", *TOOLS, "-j", str(jobs)], log)
    if not binary.is_file():
        raise RuntimeError(f"the build finished but {binary} is missing; see {log}")
    _say(f"built {binary} in {time.perf_counter() - start:.0f} s")
    return binary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", default=SDIST_VERSION, help=f"{SDIST} sdist version")
    parser.add_argument("--jobs", type=int, default=JOBS, help="parallel compile jobs")
    args = parser.parse_args(argv)
    for tool in TOOLS:
        print(llama_tool(tool, args.version, args.jobs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
