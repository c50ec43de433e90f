"""llama.cpp on the same model: build it from its published source package, convert a
transformers Llama directory with llama.cpp's own GGUF converter, quantize, llama-bench.

The source is the sdist of ``llama-cpp-python`` (it vendors llama.cpp with its converter
and gguf-py); nothing else is fetched. Everything lives under ``--work`` (default
``$LOWBIT_CACHE/llamacpp``, kept between runs): the unpacked source, a CMake build of
``llama-bench`` and ``llama-quantize`` (Release, native ISA, OpenMP; ``--isa avx2`` builds
another with AVX-512 off, to measure the AVX2 class on a newer CPU), a venv layered over
lowbit's (``sentencepiece`` for the converter), and the GGUF files of each model.

The converter needs a tokenizer and llama-bench never reads text (it feeds random
token ids), so a model directory without one gets a small SentencePiece model trained on
CPython's pydoc text; the converter pads the vocabulary to the config's ``vocab_size``.

Used by ``bench/llm.py``; on its own:

    python bench/llamacpp.py MODEL_DIR [--types q8_0,q4_0,q4_k_m] [--threads 2] [--isa avx2]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shlex
import subprocess
import sys
import tarfile
from pathlib import Path

PACKAGE = "llama-cpp-python==0.3.36"  # vendors llama.cpp 0c1e57098
TYPES = ["q8_0", "q4_0", "q4_k_m"]
# Build flags per instruction set: "native" takes the build machine's; "avx2" switches
# AVX-512 (and AVX-VNNI) off, as on AMD Zen 2/3 and Intel client cores.
ISA_FLAGS = {"native": ["-DGGML_NATIVE=ON"],
             "avx2": ["-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON",
                      "-DGGML_BMI2=ON", "-DGGML_AVX512=OFF", "-DGGML_AVX_VNNI=OFF"]}


def default_work() -> Path:
    return Path(os.environ.get("LOWBIT_CACHE", Path.home() / ".cache" / "lowbit")) / "llamacpp"


def run(cmd: list, **kw) -> subprocess.CompletedProcess:
    print("+", " ".join(str(c) for c in cmd), file=sys.stderr, flush=True)
    return subprocess.run([str(c) for c in cmd], check=True, **kw)


def source(work: Path) -> Path:
    """The vendored llama.cpp tree of the sdist, downloaded and unpacked once."""
    found = glob.glob(str(work / "llama_cpp_python-*" / "vendor" / "llama.cpp"))
    if found:
        return Path(found[0])
    work.mkdir(parents=True, exist_ok=True)
    run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:", "-d", work, PACKAGE])
    (archive,) = glob.glob(str(work / "llama_cpp_python-*.tar.gz"))
    with tarfile.open(archive) as tar:
        tar.extractall(work, filter="data")
    return Path(glob.glob(str(work / "llama_cpp_python-*" / "vendor" / "llama.cpp"))[0])


def amx_workaround() -> list[str]:
    """CMake flags that let llama.cpp's AMX path run when built by GCC 12.

    GCC 12's ``_tile_loadconfig`` is an asm statement whose memory operand covers only the
    first 8 bytes of the 64-byte tile configuration, so dead-store elimination drops the
    stores of the rows and column widths that ggml's AMX kernels set on the stack, and the
    first tile instruction faults (llama.cpp's Q4_0 / Q8_0 prefill crashed on AMX Xeons).
    Turning off both dead-store passes for the C++ sources keeps those stores; GCC 13 and
    later model the whole operand, and other compilers get no flags. The compiler asked is
    the one CMake takes ($CXX, else c++)."""
    compiler = shlex.split(os.environ.get("CXX", "c++"))
    try:
        version = subprocess.run([*compiler, "-dumpfullversion"], capture_output=True, text=True, check=True).stdout
        banner = subprocess.run([*compiler, "--version"], capture_output=True, text=True, check=True).stdout
        major = int(version.strip().split(".")[0])
    except (OSError, subprocess.CalledProcessError, ValueError):
        return []
    if "clang" in banner.lower() or major >= 13:
        return []
    return ["-DCMAKE_CXX_FLAGS=-fno-tree-dse -fno-dse"]


def build(work: Path, isa: str = "native") -> Path:
    """llama-bench and llama-quantize for ``isa`` (ISA_FLAGS), built once; returns the bin
    directory."""
    src = source(work)
    out = work / ("build" if isa == "native" else f"build-{isa}")
    binaries = out / "bin"
    flags = ["-DCMAKE_BUILD_TYPE=Release", *ISA_FLAGS[isa], "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
             "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_CURL=OFF",
             *amx_workaround()]
    # A build made with other flags (say, before the AMX workaround) is made again.
    stamp = out / "lowbit-flags.json"
    if ((binaries / "llama-bench").exists() and (binaries / "llama-quantize").exists() and stamp.exists()
            and json.loads(stamp.read_text()) == flags):
        return binaries
    run(["cmake", "-S", src, "-B", out, "-G", "Ninja", *flags])
    run(["cmake", "--build", out, "--target", "llama-bench", "llama-quantize", "-j", str(os.cpu_count() or 2)])
    stamp.write_text(json.dumps(flags))
    return binaries


def converter_python(work: Path) -> Path:
    """A venv over lowbit's own (torch, numpy, transformers) with sentencepiece added."""
    venv = work / "venv"
    python = venv / "bin" / "python"
    if not (venv / ".deps").exists():
        run([sys.executable, "-m", "venv", "--without-pip", venv])
        purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                 check=True, capture_output=True, text=True).stdout.strip()
        import sysconfig
        Path(purelib, "lowbit-venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
        run([sys.executable, "-m", "pip", "--python", python, "install", "--quiet", "sentencepiece", "protobuf"])
        (venv / ".deps").touch()
    return python


def ensure_tokenizer(model_dir: Path, python: Path) -> None:
    """A SentencePiece tokenizer.model in ``model_dir`` when it has no tokenizer at all."""
    if any((model_dir / f).exists() for f in ("tokenizer.model", "tokenizer.json")):
        return
    script = (
        "import io, pydoc_data.topics as t, sentencepiece as spm\n"
        "text = '\\n'.join(t.topics.values()).splitlines()\n"
        f"spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_prefix={str(model_dir / 'tokenizer')!r},"
        " vocab_size=2000, model_type='bpe', byte_fallback=True, minloglevel=2)\n")
    run([python, "-c", script])
    (model_dir / "tokenizer.vocab").unlink(missing_ok=True)


def convert(model_dir: Path, work: Path) -> Path:
    """The model as a bf16 GGUF, by llama.cpp's converter (once per model directory)."""
    src = source(work)
    gguf_dir = work / "models" / model_dir.resolve().name
    gguf_dir.mkdir(parents=True, exist_ok=True)
    out = gguf_dir / "bf16.gguf"
    if not out.exists():
        python = converter_python(work)
        ensure_tokenizer(model_dir, python)
        env = dict(os.environ, PYTHONPATH=str(src / "gguf-py"))
        run([python, src / "convert_hf_to_gguf.py", model_dir, "--outtype", "bf16", "--outfile", out], env=env)
    return out


def quantize(bf16: Path, kind: str, binaries: Path) -> Path:
    out = bf16.with_name(f"{kind}.gguf")
    if not out.exists():
        run([binaries / "llama-quantize", bf16, out, kind.upper()], stdout=subprocess.DEVNULL)
    return out


def bench(model_dir: Path, types: list[str], threads: int, prompts: list[int], decode: int, work: Path,
          repetitions: int = 5, isa: str = "native") -> list[dict]:
    """llama-bench rows: {"type", "test" ("pp32", "tg64", ...), "tokens_per_s", "stddev"}.

    llama-bench's own protocol: each test repeated ``repetitions`` times, mean and stddev
    reported; decode ("tg") runs after an empty context, as lowbit's decode after its
    prompt differs by the prompt's 32 cache entries, which cost nothing measurable."""
    binaries = build(work, isa)
    bf16 = convert(model_dir, work)
    rows = []
    for kind in types:
        path = bf16 if kind == "bf16" else quantize(bf16, kind, binaries)
        result = run([binaries / "llama-bench", "-m", path, "-t", threads, "-p", ",".join(map(str, prompts)),
                      "-n", decode, "-r", repetitions, "-o", "json"], capture_output=True, text=True)
        for entry in json.loads(result.stdout):
            test = f"pp{entry['n_prompt']}" if entry["n_gen"] == 0 else f"tg{entry['n_gen']}"
            rows.append({"type": kind, "test": test, "tokens_per_s": entry["avg_ts"], "stddev": entry["stddev_ts"],
                         "backend": entry.get("backends", ""), "commit": entry.get("build_commit", "")})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="a transformers Llama directory")
    parser.add_argument("--types", default=",".join(["bf16"] + TYPES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=default_work())
    parser.add_argument("--isa", choices=sorted(ISA_FLAGS), default="native")
    args = parser.parse_args()
    for row in bench(args.model, args.types.split(","), args.threads, [32, 512], 64, args.work, isa=args.isa):
        print(f"{row['type']:8} {row['test']:6} {row['tokens_per_s']:8.1f} ± {row['stddev']:.1f} tok/s")


if __name__ == "__main__":
    main()
