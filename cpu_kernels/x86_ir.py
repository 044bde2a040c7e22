"""LLVM IR for the x86 SIMD instructions the tile kernels are made of, for the codegen of Numba
`@intrinsic`s: plain Numba code never produces integer dot products such as `vpmaddubsw` (see
shared/notes/cpu-kernels.md), so the kernels call LLVM's x86 intrinsics directly. Numba's
on-disk cache checks only a kernel's own file: after editing this one, clear it
(cpu_kernels/__pycache__/*.nbi, *.nbc)."""

from llvmlite import ir
from numba.core import cgutils

# vector types of the AVX2 kernels
I8X32 = ir.VectorType(ir.IntType(8), 32)
I16X16 = ir.VectorType(ir.IntType(16), 16)
I32X8 = ir.VectorType(ir.IntType(32), 8)
F32X8 = ir.VectorType(ir.FloatType(), 8)
ONES_I16X16 = ir.Constant(I16X16, [1] * 16)
BYTE_PTR = ir.IntType(8).as_pointer()


def vector_ptr(builder, context, arr_type, arr, offset, lanes: int):
    """LLVM IR: a <lanes x i8>* to element `offset` of a Numba byte array (for vector loads)."""
    data = context.make_array(arr_type)(context, builder, arr).data
    ptr = builder.gep(data, [offset])
    return builder.bitcast(ptr, ir.VectorType(ir.IntType(8), lanes).as_pointer())


def element_ptr(builder, context, arr_type, arr, offset):
    """LLVM IR: a pointer to element `offset` of a Numba array."""
    return builder.gep(context.make_array(arr_type)(context, builder, arr).data, [offset])


def lane_mask(indices) -> ir.Constant:
    """A shufflevector mask: the source lanes of each result lane."""
    indices = list(indices)
    return ir.Constant(ir.VectorType(ir.IntType(32), len(indices)), indices)


class Avx2Ir:
    """The AVX2 instructions the tile kernels are made of, as LLVM IR calls."""

    def __init__(self, builder: ir.IRBuilder):
        self.builder = builder

        def function(name, ret, *args):
            return cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, args), name)

        self._maddubs = function("llvm.x86.avx2.pmadd.ub.sw", I16X16, I8X32, I8X32)
        self._maddwd = function("llvm.x86.avx2.pmadd.wd", I32X8, I16X16, I16X16)
        self._psign = function("llvm.x86.avx2.psign.b", I8X32, I8X32, I8X32)
        self._pshufb = function("llvm.x86.avx2.pshuf.b", I8X32, I8X32, I8X32)
        self._fma = function("llvm.fma.v8f32", F32X8, F32X8, F32X8, F32X8)
        i32 = ir.IntType(32)
        self._prefetch = function("llvm.prefetch.p0i8", ir.VoidType(), BYTE_PTR, i32, i32, i32)

    def prefetch(self, ptr, byte_offset):
        """Ask for the cache line `byte_offset` bytes past `ptr` (any pointer) into every cache
        level, for reading (prefetcht0)."""
        b = self.builder
        line = b.gep(b.bitcast(ptr, BYTE_PTR), [byte_offset])
        read, keep_in_all_caches, data = (ir.IntType(32)(v) for v in (0, 3, 1))
        b.call(self._prefetch, [line, read, keep_in_all_caches, data])

    def int_dot(self, unsigned, signed, pair_weights=ONES_I16X16):
        """i32x8: lane i = sum over bytes 4i..4i+3 of unsigned * signed, each adjacent pair's
        int16 sum times pair_weights (vpmaddubsw + vpmaddwd). The pair sums (two products)
        saturate at +-32767."""
        pairs = self.builder.call(self._maddubs, [unsigned, signed])
        return self.builder.call(self._maddwd, [pairs, pair_weights])

    def sign(self, values, signs):
        """values negated where signs < 0 and zeroed where signs == 0 (vpsignb)."""
        return self.builder.call(self._psign, [values, signs])

    def widen_byte(self, table, index: int):
        """i16x16 of byte `index` of each 128-bit half of `table` (i8x32), zero-extended: one
        vpshufb with a constant mask (bit 7 set in a mask byte zeroes the result byte)."""
        mask = ir.Constant(I8X32, [index, -128] * 16)
        return self.builder.bitcast(self.builder.call(self._pshufb, [table, mask]), I16X16)

    def fma(self, a, b, c):
        return self.builder.call(self._fma, [a, b, c])

    def splat(self, scalar, vector_type=F32X8):
        lane0 = self.builder.insert_element(
            ir.Constant(vector_type, None), scalar, ir.IntType(32)(0)
        )
        return self.builder.shuffle_vector(lane0, lane0, lane_mask([0] * vector_type.count))

    def horizontal_sum(self, vector):
        """The float sum of a vector's lanes, by halving (3 shuffles and adds for 8 lanes)."""
        b = self.builder
        while vector.type.count > 1:
            half = vector.type.count // 2
            low = b.shuffle_vector(vector, vector, lane_mask(range(half)))
            high = b.shuffle_vector(vector, vector, lane_mask(range(half, 2 * half)))
            vector = b.fadd(low, high)
        return b.extract_element(vector, ir.IntType(32)(0))


# vector types of the AVX-512 kernels
I8X64 = ir.VectorType(ir.IntType(8), 64)
I16X32 = ir.VectorType(ir.IntType(16), 32)
I32X16 = ir.VectorType(ir.IntType(32), 16)
F32X16 = ir.VectorType(ir.FloatType(), 16)


class Avx512Ir(Avx2Ir):
    """The AVX-512 (F, BW, VNNI) instructions of the tile kernels, as LLVM IR calls, besides
    the AVX2 ones."""

    def __init__(self, builder: ir.IRBuilder):
        super().__init__(builder)

        def function(name, ret, *args):
            return cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, args), name)

        self._dpbusd = function("llvm.x86.avx512.vpdpbusd.512", I32X16, I32X16, I8X64, I8X64)
        self._dpwssd = function("llvm.x86.avx512.vpdpwssd.512", I32X16, I32X16, I16X32, I16X32)
        self._maddubs512 = function("llvm.x86.avx512.pmaddubs.w.512", I16X32, I8X64, I8X64)
        self._pshufb512 = function("llvm.x86.avx512.pshuf.b.512", I8X64, I8X64, I8X64)
        self._abs = function("llvm.abs.v64i8", I8X64, I8X64, ir.IntType(1))
        self._fma16 = function("llvm.fma.v16f32", F32X16, F32X16, F32X16, F32X16)

    def byte_dot(self, unsigned, signed, acc=None):
        """i32x16: lane i = acc[i] + the sum over bytes 4i..4i+3 of unsigned * signed (one
        vpdpbusd; no saturation: four products of at most 255 * 128 each)."""
        acc = ir.Constant(I32X16, None) if acc is None else acc
        return self.builder.call(self._dpbusd, [acc, unsigned, signed])

    def scaled_byte_dot(self, acc, unsigned, signed, pair_weights):
        """i32x16: lane i = acc[i] + the sum over bytes 4i..4i+3 of unsigned * signed, each
        adjacent pair's int16 sum times pair_weights (vpmaddubsw + vpdpwssd). The pair sums
        (two products) saturate at +-32767."""
        pairs = self.builder.call(self._maddubs512, [unsigned, signed])
        return self.builder.call(self._dpwssd, [acc, pairs, pair_weights])

    def widen_bytes(self, table, low: int, high: int):
        """i16x32 of byte `low` of each 128-bit quarter of `table` (i8x64) in words 0-15 and
        byte `high` in words 16-31, zero-extended: one vpshufb with a constant mask."""
        mask = ir.Constant(I8X64, [low, -128] * 16 + [high, -128] * 16)
        return self.builder.bitcast(self.builder.call(self._pshufb512, [table, mask]), I16X32)

    def abs(self, values):
        """|values| of i8x64, as unsigned bytes (|-128| = 128)."""
        return self.builder.call(self._abs, [values, ir.IntType(1)(0)])

    def negate_where_negative(self, values, signs):
        """values negated where signs < 0 (a vpsubb under the sign bits as a mask: AVX-512 has
        no vpsignb)."""
        b = self.builder
        negative = b.icmp_signed("<", signs, ir.Constant(signs.type, None))
        return b.select(negative, b.sub(ir.Constant(values.type, None), values), values)

    def fma(self, a, b, c):
        if a.type == F32X16:
            return self.builder.call(self._fma16, [a, b, c])
        return super().fma(a, b, c)
