"""The machine code of compiled kernels, read by operation rather than by instruction name, for
every kind of CPU the tests run on. LLVM picks among equivalent instructions by CPU (with
AVX512-FP16 `vcvtph2psx` for `vcvtph2ps`; with GFNI one `vgf2p8affineqb` for a byte shift and
its mask; with VNNI `vpdpwssd` for `vpmaddwd` and the add after it), so a test counts operations
and compiles the kernel's LLVM IR for each CPU kind, wherever it runs."""

from __future__ import annotations

import functools

import llvmlite.binding as llvm
import numba

# The CPU kinds of the development and CI machines as LLVM names them, and this one
CPU_KINDS = ("host", "znver3", "znver4", "sapphirerapids")
AVX512_CPU_KINDS = ("znver4", "sapphirerapids")  # those with the avx512 kernel path

# Each operation a test counts -> the x86 instructions LLVM emits for it on some CPU kind
OPERATIONS: dict[str, tuple[str, ...]] = {
    "widen float16": ("vcvtph2ps", "vcvtph2psx"),
    # a shift of packed bytes: a 16-bit shift (and a mask after it), or one GFNI affine op
    "shift bytes": ("vpsrlw", "vgf2p8affineqb"),
    "multiply-add bytes": ("vpmaddubsw",),
    "multiply-add words": ("vpmaddwd", "vpdpwssd"),
    "byte sign": ("vpsignb",),
    "byte absolute": ("vpabsb",),
    "byte dot": ("vpdpbusd",),
    "shift dwords left": ("vpslld",),
    # keeping the top halves of dwords: an and with a constant, or a blend with zero
    "mask dwords": ("vpand", "vpandd", "vpandq", "vandps", "vpblendw"),
    "float multiply-add": ("vfmadd132ps", "vfmadd213ps", "vfmadd231ps"),
    "broadcast float": ("vbroadcastss",),
    "horizontal sum": ("vhaddps", "vextractf128", "vextractf32x4"),
    "prefetch": ("prefetcht0",),
}


def fresh_llvm_ir(fn, args: tuple) -> str:
    """The LLVM IR of `fn` compiled by Numba for the types of `args` (a fresh compile:
    functions loaded from Numba's cache keep no IR)."""
    sig = tuple(numba.typeof(a) for a in args)
    fresh = numba.njit(fn)
    fresh.compile(sig)
    return fresh.inspect_llvm(sig)


@functools.cache
def _target_machine(cpu: str) -> llvm.TargetMachine:
    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()
    if cpu == "host":
        cpu, features = llvm.get_host_cpu_name(), llvm.get_host_cpu_features().flatten()
    else:
        features = ""  # the CPU kind's own
    target = llvm.Target.from_triple(llvm.get_process_triple())
    return target.create_target_machine(cpu=cpu, features=features, opt=3)


def machine_code(llvm_ir: str, cpu: str) -> list[list[str]]:
    """The instructions of `llvm_ir` compiled for `cpu` (one of CPU_KINDS), each as its
    mnemonic and operands: [["vpmaddubsw", "%ymm1,", "%ymm2,", "%ymm3"], ...]."""
    module = llvm.parse_assembly(llvm_ir)
    asm = _target_machine(cpu).emit_assembly(module)
    lines = (line.split() for line in asm.splitlines())
    return [words for words in lines if words and not words[0].startswith((".", "#"))]


def count(code: list[list[str]], operation: str, register: str = "") -> int:
    """How many instructions of `code` do `operation` (a key of OPERATIONS), on `register`
    operands ("%ymm": 256-bit ones) where given."""
    names = OPERATIONS[operation]
    return sum(
        words[0] in names and any(register in operand for operand in words[1:]) for words in code
    )
