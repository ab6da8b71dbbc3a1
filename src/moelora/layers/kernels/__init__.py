"""Compiled CPU kernels for the layer's small per-token work: routing and the gate products (``gates.c``),
the dropout keep-mask (``dropout.c``), the optimizers' per-expert ``r x r`` products (``batched.c``) and
their AdamW update of many small tensors, alone or fused with the preconditioners (``adamw.c``).

On a CPU the layer's routing (top-k, softmax, scatter, statistics) and gate products (the gated
projections, the backward gate power, the per-expert sums, the router's softmax Jacobian) are about twenty
PyTorch kernels on ``(T, E)`` and ``(T, E*r)`` tensors per forward and backward pass, each paying a fixed
cost of tens of microseconds; ``gates.c`` does each half in one pass over the tokens. ``dropout.c`` draws
the keep-mask from its seed and applies it in the same pass (``moelora.layers.dropout`` defines the mask
and holds its PyTorch reference, bit for bit).

The C files are compiled on first use with the system C compiler (``$CC``, else ``cc``) into a per-user
cache (``$XDG_CACHE_HOME/moelora`` or ``~/.cache/moelora``; the file name holds a hash of the sources,
the compiler command and, for ``-march=native``, the CPU's model and feature flags), written
atomically, and loaded with ``ctypes``. Where there is no compiler or
the build fails, the layer computes the same arithmetic with PyTorch ops (``moelora.layers.dense``),
after one warning. ``MOELORA_CPU_KERNELS=0`` turns the kernels off. They serve float32 CPU tensors only,
outside ``torch.compile`` (which fuses the PyTorch ops itself); everything else takes the PyTorch ops.

The kernels and the PyTorch ops agree to float32 rounding (``tests/test_kernels.py``), with one
difference: among exactly tied logits the kernel keeps the lower expert indices, where ``torch.topk``'s
choice is its own (on a CPU the higher ones). Ties matter only for a router initialised to zeros,
whose first step then routes every token to one fixed set of ``top_k`` experts on either path.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch

_SOURCES = [Path(__file__).with_name(name) for name in ("gates.c", "dropout.c", "batched.c", "adamw.c")]
_FLAGS = ["-O3", "-std=c11", "-fno-math-errno", "-fno-trapping-math", "-fopenmp-simd", "-shared", "-fPIC"]
MAX_EXPERTS = 1024  # gates.c's per-expert arrays on the stack
MAX_SMALL_RANK = 16  # batched.c's r x r scratch

_I64, _U64, _U32, _F64, _PTR = ctypes.c_int64, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_double, ctypes.c_void_p
_SIGNATURES = {  # every function returns void, except those in _RETURNS_STATUS
    "moelora_route_f32": [_I64, _I64, _I64, _I64, _PTR, _I64, _PTR, _I64, _PTR, _PTR, _I64, _PTR],
    "moelora_record_routing_f32": [_I64, _F64, _PTR, _PTR, _PTR, _PTR, _PTR],
    "moelora_gate_backward_f32": [_I64, _I64, _I64, _F64, _PTR, _PTR, _I64, _PTR, _PTR, _I64, _PTR, _PTR, _I64],
    "moelora_decode_f32": [_I64, _I64, _I64, _I64, _I64, _I64, _F64, _PTR, _I64, _PTR, _PTR, _PTR, _I64],
    "moelora_keep_mask": [_I64, _U64, _U32, _PTR],
    "moelora_dropout_f32": [_I64, _I64, _PTR, _I64, _PTR, _I64, _U64, _U32],
    "moelora_gather_rows_f32": [_I64, _I64, _PTR, _PTR, _I64, _PTR, _U64, _U32],
    "moelora_scatter_add_rows_f32": [_I64, _I64, _PTR, _PTR, _PTR, _I64, _U64, _U32],
    "moelora_gram_rows_f32": [_I64, _I64, _I64, _PTR, _PTR],
    "moelora_gram_cols_f32": [_I64, _I64, _I64, _PTR, _PTR],
    "moelora_left_mul_f32": [_I64, _I64, _I64, _PTR, _PTR, _PTR],
    "moelora_right_mul_f32": [_I64, _I64, _I64, _PTR, _PTR, _PTR],
    "moelora_grams_f32": [_I64, _PTR, _PTR, _PTR, _I64, _PTR, _PTR],
    "moelora_damped_inverse_f32": [_I64, _I64, _PTR, _PTR, _PTR],
    "moelora_adamw_f32": [_I64, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _F64, _F64, _F64, _F64, _F64],
    "moelora_precondition_adamw_f32": [_I64, _PTR, _PTR, _PTR, _I64, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR,
                                       _F64, _F64, _F64, _F64, _F64],
}
_RETURNS_STATUS = {"moelora_route_f32"}  # 0, or -1 where its scratch memory could not be allocated

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_loaded = False


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "moelora"


def _cpu_identity() -> str | None:
    """The CPU's model and feature flags (Linux), so that a ``-march=native`` build is used only on the CPU
    it was built for (a cache in a home directory may be shared by different machines); None elsewhere."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return None
    wanted = [line for line in lines if line.split(":")[0].strip() in ("model name", "flags", "Features")]
    return "\n".join(dict.fromkeys(wanted)) + platform.machine() if wanted else None


def _build(command: list[str], identity: str) -> Path:
    """The compiled library's path, building it first when the cache does not hold it."""
    sources = b"\0".join(source.read_bytes() for source in _SOURCES)
    digest = hashlib.sha256(sources + "\0".join([*command, identity]).encode()).hexdigest()[:16]
    target = _cache_dir() / f"kernels-{digest}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    handle, scratch = tempfile.mkstemp(dir=target.parent, prefix=".kernels-", suffix=".so")
    os.close(handle)
    try:
        subprocess.run([*command, "-o", scratch, *map(str, _SOURCES), "-lm"], check=True, capture_output=True,
                       timeout=120)
        os.replace(scratch, target)  # atomic: concurrent builders (e.g. the ranks of one job) all end with one file
    finally:
        if os.path.exists(scratch):
            os.unlink(scratch)
    return target


def _compile(compiler: str) -> Path:
    """Built for this CPU (``-march=native``) where it can be identified and the compiler takes the flag,
    else for the architecture's baseline."""
    identity = _cpu_identity()
    if identity is not None:
        try:
            return _build([compiler, "-march=native", *_FLAGS], identity)
        except subprocess.SubprocessError:
            pass
    return _build([compiler, *_FLAGS], platform.machine())


def _load() -> ctypes.CDLL | None:
    """The loaded library, or None where it cannot be built; built and loaded on the first call."""
    global _library, _loaded
    if _loaded:  # every kernel call asks: no lock once the one load is done
        return _library
    with _lock:
        if not _loaded:
            _library = _build_and_open()
            _loaded = True  # after _library: a thread that sees it set sees the library
        return _library


def wanted() -> bool:
    """Whether the kernels are to be built: not turned off (``MOELORA_CPU_KERNELS=0``)."""
    return os.environ.get("MOELORA_CPU_KERNELS", "1") != "0"


def compiler() -> str | None:
    """The C compiler the kernels are built with: ``$CC``, else ``cc`` or ``gcc`` on the path."""
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def _build_and_open() -> ctypes.CDLL | None:
    if not wanted():
        return None
    compiler_path = compiler()
    if compiler_path is None:
        warnings.warn("moelora: no C compiler found ($CC, cc or gcc); the layer's routing, gate products and "
                      "dropout and the optimizers' small products and AdamW update run as PyTorch ops on the CPU "
                      "(same results, slower)", stacklevel=4)
        return None
    try:
        library = ctypes.CDLL(str(_compile(compiler_path)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:  # RuntimeError: no home directory
        detail = (getattr(error, "stderr", b"") or b"").decode(errors="replace")[-500:]
        warnings.warn(f"moelora: building the CPU kernels failed ({error}; {detail}); the layer's routing, gate "
                      "products and dropout and the optimizers' small products and AdamW update run as PyTorch ops "
                      "(same results, slower)", stacklevel=4)
        return None
    for name, argtypes in _SIGNATURES.items():
        function = getattr(library, name)
        function.argtypes = argtypes
        function.restype = ctypes.c_int if name in _RETURNS_STATUS else None
    return library


def available() -> bool:
    """Whether the kernels are built and loaded (building them on the first call)."""
    return _load() is not None


def _rows(tensor: torch.Tensor) -> bool:
    """A 2-d CPU float32 tensor whose rows are contiguous (any row stride)."""
    return (tensor.device.type == "cpu" and tensor.dtype == torch.float32 and tensor.dim() == 2
            and tensor.stride(1) == 1)


def applies(logits: torch.Tensor, h: torch.Tensor) -> bool:
    """Whether the kernels serve a layer whose router logits and expert projections are these tensors."""
    return (_rows(logits) and _rows(h) and logits.shape[1] <= MAX_EXPERTS and not torch.compiler.is_compiling()
            and _load() is not None)


def route(logits: torch.Tensor, h: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(gates, z, stats)`` of ``moelora.layers.dense.route_and_gate``, for ``logits`` (T, E) and ``h``
    (T, E*r) that ``applies`` accepts: ``gates`` (T, E) and ``z = h * gates`` repeated over each expert's
    ``r`` columns (T, E*r) are new contiguous tensors, ``stats`` is ``routing_statistics``' (2E + 1,)."""
    library = _load()
    assert library is not None
    tokens, num_experts = logits.shape
    rank = h.shape[1] // num_experts
    gates = logits.new_empty(tokens, num_experts)
    z = h.new_empty(tokens, num_experts * rank)
    stats = logits.new_empty(2 * num_experts + 1)
    _check(library.moelora_route_f32(tokens, num_experts, rank, top_k, logits.data_ptr(), logits.stride(0),
                                     h.data_ptr(), h.stride(0), gates.data_ptr(), z.data_ptr(), z.stride(0),
                                     stats.data_ptr()), num_experts)
    return gates, z, stats


def record_routing(stats: torch.Tensor, sq_sum: torch.Tensor | None, count: torch.Tensor | None,
                   load: torch.Tensor | None, entropy: torch.Tensor | None, tokens: int) -> bool:
    """A layer's record of ``stats`` (2E + 1,) from ``routing_statistics``: ``sq_sum += stats[:E]`` and
    ``count += tokens`` (when ``sq_sum`` and ``count`` are given), ``load[...] = stats[E:2E]`` and
    ``entropy[...] = stats[2E]`` (when ``load`` and ``entropy`` are given), in one call, with the
    written tensors' version counters advanced as in-place torch ops would. Returns False, doing
    nothing, where the kernels do not serve these tensors (float32 CPU, contiguous, no subclasses)."""
    accumulate = [t for t in (sq_sum, count) if t is not None]
    overwrite = [t for t in (load, entropy) if t is not None]
    if len(accumulate) == 1 or len(overwrite) == 1:
        raise ValueError("record_routing: give sq_sum with count and load with entropy, or neither of a pair")
    written = accumulate + overwrite
    if not written:
        return True  # nothing to record
    if not _plain(stats, *written):
        return False
    library = _load()
    if library is None:
        return False
    num_experts = (stats.numel() - 1) // 2

    def pointer(tensor: torch.Tensor | None) -> int | None:
        return None if tensor is None else tensor.data_ptr()

    library.moelora_record_routing_f32(num_experts, float(tokens), stats.data_ptr(), pointer(sq_sum), pointer(count),
                                       pointer(load), pointer(entropy))
    torch.autograd.graph.increment_version(written)
    return True


def _check(status: int, num_experts: int) -> None:
    """Raises where the routing kernel could not allocate its scratch tiles (``3 * E * 16`` floats)."""
    if status != 0:
        raise MemoryError(f"moelora: the routing kernel could not allocate its scratch memory for {num_experts} experts")


def gate_in_place(z: torch.Tensor, num_experts: int, top_k: int) -> None:
    """The inference path's routing (``moelora.layers.inference``): for ``z = [logits | h]`` (T, E + E*r)
    of the fused GEMM, ``h`` multiplied in place by the renormalised top-k softmax gates of ``logits``
    (0 for the experts a token does not keep), for a ``z`` that ``applies`` accepts (as ``z[:, :E]`` and
    ``z[:, E:]``). No gates or statistics are kept."""
    library = _load()
    assert library is not None
    tokens, columns = z.shape
    rank = (columns - num_experts) // num_experts
    row, h = z.stride(0), z.data_ptr() + num_experts * z.element_size()
    _check(library.moelora_route_f32(tokens, num_experts, rank, top_k, z.data_ptr(), row, h, row, None, h, row, None),
           num_experts)


# The decode kernel serves up to this many tokens (it reads the weights once per token) and experts (its
# top-k compares every pair of a token's logits).
DECODE_MAX_TOKENS, DECODE_MAX_EXPERTS = 8, 128


def decode_applies(x: torch.Tensor, out: torch.Tensor, w_cat: torch.Tensor, b_cat_t: torch.Tensor,
                   num_experts: int) -> bool:
    """Whether ``decode`` serves these tensors: few float32 CPU tokens with contiguous rows, contiguous fused
    weights, outside ``torch.compile``."""
    return (x.shape[0] <= DECODE_MAX_TOKENS and num_experts <= DECODE_MAX_EXPERTS and _rows(x) and _rows(out)
            and _plain(w_cat, b_cat_t) and _load() is not None)


def decode(x: torch.Tensor, out: torch.Tensor, w_cat: torch.Tensor, b_cat_t: torch.Tensor, num_experts: int,
           top_k: int, scaling: float) -> None:
    """``out += s * sum_i g_i(x) B_i A_i x`` in place for ``x`` (T, d_in) and ``out`` (T, d_out), from the
    inference path's fused weights ``W_cat = [router; A]`` (E + E*r, d_in) and ``B_cat^T`` (E*r, d_out),
    reading only each token's kept experts (``moelora.layers.inference``), for tensors that
    ``decode_applies`` accepts."""
    library = _load()
    assert library is not None
    tokens, d_in = x.shape
    rank = (w_cat.shape[0] - num_experts) // num_experts
    library.moelora_decode_f32(tokens, num_experts, rank, top_k, d_in, out.shape[1], float(scaling), x.data_ptr(),
                               x.stride(0), w_cat.data_ptr(), b_cat_t.data_ptr(), out.data_ptr(), out.stride(0))


def gate_backward(scaled_dz: torch.Tensor, h: torch.Tensor, gates: torch.Tensor, power: float,
                  grad_h: torch.Tensor, grad_logits: torch.Tensor) -> torch.Tensor:
    """Writes ``grad_h`` (T, E*r) and ``grad_logits`` (T, E) and returns ``h * G^p`` (T, E*r), as
    ``moelora.layers.dense.gate_products`` computes them, for tensors that ``applies`` accepts."""
    library = _load()
    assert library is not None
    tokens, num_experts = gates.shape
    rank = h.shape[1] // num_experts
    scaled_dz = scaled_dz.contiguous()
    gates = gates.contiguous()
    hgp = h.new_empty(tokens, num_experts * rank)
    library.moelora_gate_backward_f32(tokens, num_experts, rank, float(power), scaled_dz.data_ptr(), h.data_ptr(),
                                      h.stride(0), gates.data_ptr(), grad_h.data_ptr(), grad_h.stride(0),
                                      hgp.data_ptr(), grad_logits.data_ptr(), grad_logits.stride(0))
    return hgp


def keep_mask(count: int, seed: int, threshold: int, device: torch.device | str = "cpu") -> torch.Tensor | None:
    """The ``(count,)`` bool keep-mask of ``seed`` (``moelora.layers.dropout.hashed_lanes``), or None where
    the kernels do not serve (not a CPU, or not built)."""
    if torch.device(device).type != "cpu" or torch.compiler.is_compiling():
        return None
    library = _load()
    if library is None:
        return None
    keep = torch.empty(count, dtype=torch.uint8)
    library.moelora_keep_mask(count, seed, threshold, keep.data_ptr())
    return keep.view(torch.bool)


def dropout(x: torch.Tensor, seed: int, threshold: int, out: torch.Tensor | None = None) -> torch.Tensor | None:
    """``x * m`` for a 2-d float32 CPU ``x`` with contiguous rows and the keep-mask ``m`` of ``seed`` over
    ``x``'s shape (``out`` may be ``x``), or None where the kernels do not serve."""
    if not _rows(x) or torch.compiler.is_compiling():
        return None
    library = _load()
    if library is None:
        return None
    if out is None:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
    elif not _rows(out) or out.shape != x.shape:
        raise ValueError("dropout: out must be a float32 CPU tensor of x's shape with contiguous rows")
    rows, cols = x.shape
    library.moelora_dropout_f32(rows, cols, x.data_ptr(), x.stride(0), out.data_ptr(), out.stride(0), seed, threshold)
    return out


NO_MASK = 1 << 16  # the row kernels' threshold that keeps every element


def _row_index(rows: torch.Tensor) -> bool:
    return rows.device.type == "cpu" and rows.dtype == torch.int64 and rows.dim() == 1 and rows.is_contiguous()


def gather_rows(x: torch.Tensor, rows: torch.Tensor, seed: int = 0, threshold: int = NO_MASK) -> torch.Tensor | None:
    """``(x * m)[rows]`` (n, d) for a 2-d float32 CPU ``x`` with contiguous rows, ``rows`` (n,) int64 row
    indices and ``m`` the keep-mask of ``seed`` over ``x``'s shape (``threshold = NO_MASK``: no mask), or
    None where the kernels do not serve. The rows' mask elements are those of the full ``x``."""
    if not _rows(x) or not _row_index(rows) or torch.compiler.is_compiling():
        return None
    library = _load()
    if library is None:
        return None
    out = torch.empty(rows.shape[0], x.shape[1], dtype=x.dtype)
    library.moelora_gather_rows_f32(rows.shape[0], x.shape[1], rows.data_ptr(), x.data_ptr(), x.stride(0),
                                    out.data_ptr(), seed, threshold)
    return out


def scatter_add_rows(out: torch.Tensor, rows: torch.Tensor, src: torch.Tensor, seed: int = 0,
                     threshold: int = NO_MASK) -> bool:
    """``out[rows] += src * m[rows]`` in place for float32 CPU tensors (``out`` (T, d) with contiguous rows,
    ``src`` (n, d) contiguous, ``rows`` (n,) distinct int64 indices, ``m`` the keep-mask of ``seed`` over
    ``out``'s shape; ``threshold = NO_MASK``: no mask); False (nothing written) where the kernels do not
    serve. Advances ``out``'s version counter as an in-place op would."""
    if (not _rows(out) or not _plain(src) or not _row_index(rows) or src.dim() != 2
            or src.shape != (rows.shape[0], out.shape[1])):
        return False
    library = _load()
    if library is None:
        return False
    library.moelora_scatter_add_rows_f32(rows.shape[0], out.shape[1], rows.data_ptr(), src.data_ptr(),
                                         out.data_ptr(), out.stride(0), seed, threshold)
    torch.autograd.graph.increment_version(out)
    return True


def _plain(*tensors: torch.Tensor) -> bool:
    """Contiguous float32 CPU tensors (not tensor subclasses such as DTensor), outside ``torch.compile``."""
    return all(type(t) in (torch.Tensor, torch.nn.Parameter) and t.device.type == "cpu" and t.dtype == torch.float32
               and t.is_contiguous() for t in tensors) and not torch.compiler.is_compiling()


def batched_applies(*tensors: torch.Tensor) -> bool:
    """Whether ``gram_rows`` / ``gram_cols`` / ``left_mul`` / ``right_mul`` serve these 3-d tensors."""
    return _plain(*tensors) and all(t.dim() == 3 for t in tensors) and _load() is not None


def gram_rows(a: torch.Tensor) -> torch.Tensor:
    """``a @ a.mT`` for ``a`` (E, r, d): (E, r, r)."""
    experts, rank, width = a.shape
    out = a.new_empty(experts, rank, rank)
    _load().moelora_gram_rows_f32(experts, rank, width, a.data_ptr(), out.data_ptr())  # type: ignore[union-attr]
    return out


def gram_cols(b: torch.Tensor) -> torch.Tensor:
    """``b.mT @ b`` for ``b`` (E, d, r) with ``r <= 16``: (E, r, r)."""
    experts, width, rank = b.shape
    if rank > MAX_SMALL_RANK:
        raise ValueError(f"gram_cols takes r <= {MAX_SMALL_RANK}, got {rank}")
    out = b.new_empty(experts, rank, rank)
    _load().moelora_gram_cols_f32(experts, width, rank, b.data_ptr(), out.data_ptr())  # type: ignore[union-attr]
    return out


def left_mul(p: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``p @ g`` for ``p`` (E, r, r) and ``g`` (E, r, d)."""
    experts, rank, width = g.shape
    out = g.new_empty(experts, rank, width)
    _load().moelora_left_mul_f32(experts, rank, width, p.data_ptr(), g.data_ptr(), out.data_ptr())  # type: ignore[union-attr]
    return out


def right_mul(g: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``g @ p`` for ``g`` (E, d, r) and ``p`` (E, r, r)."""
    experts, width, rank = g.shape
    out = g.new_empty(experts, width, rank)
    _load().moelora_right_mul_f32(experts, width, rank, g.data_ptr(), p.data_ptr(), out.data_ptr())  # type: ignore[union-attr]
    return out


def _int64s(values: list[int]) -> ctypes.Array:
    return (ctypes.c_int64 * len(values))(*values)


def grams(partners: list[torch.Tensor], of_a: list[bool], rank: int) -> torch.Tensor:
    """The Gram matrices of many layers' partner factors in one call, stacked into ``(N, r, r)`` with
    ``N = sum E_i``: ``B^T B`` per expert where ``of_a[i]`` (``partners[i]`` is a B, ``(E_i, d_i, r)``), else
    ``A A^T`` (``partners[i]`` is an A, ``(E_i, r, d_i)``); for tensors that ``batched_applies`` accepts,
    ``r <= MAX_SMALL_RANK``."""
    if rank > MAX_SMALL_RANK:
        raise ValueError(f"grams takes r <= {MAX_SMALL_RANK}, got {rank}")
    experts = [p.shape[0] for p in partners]
    widths = [p.shape[1] if a else p.shape[2] for p, a in zip(partners, of_a)]
    out = partners[0].new_empty(sum(experts), rank, rank)
    _load().moelora_grams_f32(  # type: ignore[union-attr]
        len(partners), _int64s([0 if a else 1 for a in of_a]), _int64s(experts), _int64s(widths), rank,
        _pointers(partners), out.data_ptr())
    return out


def damped_inverse(systems: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inverses, status)`` of symmetric positive definite ``(N, r, r)`` systems, ``r <= MAX_SMALL_RANK``,
    through their Cholesky factors (the lower triangle is read): ``status`` ``(N,)`` int8 is 0, 1 where the
    factorisation failed (not positive definite, or NaN) or 2 where the inverse is not finite, and those
    inverses are zero. For a tensor that ``batched_applies`` accepts. A subnormal pivot is kept (its inverse
    then overflows: status 2) where LAPACK may flush it to zero (not positive definite): a failure either
    way."""
    count, rank, _ = systems.shape
    if rank > MAX_SMALL_RANK:
        raise ValueError(f"damped_inverse takes r <= {MAX_SMALL_RANK}, got {rank}")
    out = torch.empty_like(systems)
    status = torch.empty(count, dtype=torch.int8)
    _load().moelora_damped_inverse_f32(  # type: ignore[union-attr]
        count, rank, systems.data_ptr(), out.data_ptr(), status.data_ptr())
    return out, status


# The compiled AdamW loop serves lists of tensors this small on average (elements); beyond, torch's fused
# kernel, whose one parallel region per tensor then pays for itself.
ADAMW_MAX_MEAN_NUMEL = 1 << 18


def adamw_applies(params: list[torch.Tensor], *others: list[torch.Tensor]) -> bool:
    """Whether ``adamw`` serves these lists: contiguous float32 CPU tensors (no subclasses), small on
    average (``ADAMW_MAX_MEAN_NUMEL``), outside ``torch.compile``, with the kernels built."""
    if not params or sum(p.numel() for p in params) > ADAMW_MAX_MEAN_NUMEL * len(params):
        return False
    return all(_plain(*tensors) for tensors in (params, *others)) and _load() is not None


def _pointers(tensors: list[torch.Tensor]) -> ctypes.Array:
    return (ctypes.c_void_p * len(tensors))(*[t.data_ptr() for t in tensors])


def adamw(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
          exp_avg_sqs: list[torch.Tensor], step_sizes: list[float], bias_correction2_sqrts: list[float], lr: float,
          weight_decay: float, beta1: float, beta2: float, eps: float) -> None:
    """One AdamW update of every ``params[i]`` in place (with its moments), as torch's fused kernel computes
    it, for lists that ``adamw_applies`` accepts; ``step_sizes[i] = lr / (1 - beta1^t)`` and
    ``bias_correction2_sqrts[i] = sqrt(1 - beta2^t)`` for each tensor's step count ``t``. The parameters'
    version counters are advanced, as an in-place torch op would, so that what is derived from them
    (the inference path's fused weights) sees the change."""
    count = len(params)
    numel = (ctypes.c_int64 * count)(*[p.numel() for p in params])
    _load().moelora_adamw_f32(  # type: ignore[union-attr]
        count, numel, _pointers(params), _pointers(grads), _pointers(exp_avgs), _pointers(exp_avg_sqs),
        (ctypes.c_double * count)(*step_sizes), (ctypes.c_double * count)(*bias_correction2_sqrts), float(lr),
        float(weight_decay), float(beta1), float(beta2), float(eps))
    torch.autograd.graph.increment_version(params)


def precondition_adamw_applies(params: list[torch.Tensor], of_a: list[bool], inverses: list[torch.Tensor],
                               grads: list[torch.Tensor], *moments: list[torch.Tensor]) -> bool:
    """Whether ``precondition_adamw`` serves these lists: stacked factors of one rank ``r <= MAX_SMALL_RANK``
    (an A ``(E, r, d_in)`` where ``of_a[i]``, else a B ``(E, d_out, r)``) with their ``(E, r, r)``
    preconditioners and gradients and moments shaped like them, all contiguous float32 CPU tensors (no
    subclasses), small on average (``ADAMW_MAX_MEAN_NUMEL``), outside ``torch.compile``, with the kernels
    built."""
    if not params or not inverses or sum(p.numel() for p in params) > ADAMW_MAX_MEAN_NUMEL * len(params):
        return False
    rank = inverses[0].shape[-1]
    if rank > MAX_SMALL_RANK or not all(
        p.dim() == 3 and p.shape[1 if a else 2] == rank and tuple(inverse.shape) == (p.shape[0], rank, rank)
        and g.shape == p.shape for p, a, inverse, g in zip(params, of_a, inverses, grads, strict=True)
    ):
        return False
    return all(_plain(*tensors) for tensors in (params, inverses, grads, *moments)) and _load() is not None


def precondition_adamw(params: list[torch.Tensor], of_a: list[bool], inverses: list[torch.Tensor],
                       scales: list[float], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                       exp_avg_sqs: list[torch.Tensor], step_sizes: list[float], bias_correction2_sqrts: list[float],
                       lr: float, weight_decay: float, beta1: float, beta2: float, eps: float) -> None:
    """``adamw`` of stacked expert factors on their preconditioned gradients, which are never stored:
    ``u = scales[i] * (P @ grad)`` per expert where ``of_a[i]`` (``params[i]`` an A, ``(E, r, d_in)``), else
    ``u = scales[i] * (grad @ P)`` (a B, ``(E, d_out, r)``), with ``P`` the ``(E, r, r)`` ``inverses[i]`` of
    one rank ``r`` for all; the same floats as ``left_mul`` / ``right_mul``, the scale, then ``adamw``. For
    lists that ``precondition_adamw_applies`` accepts; version counters advanced as ``adamw`` does."""
    count = len(params)
    rank = inverses[0].shape[-1]
    _load().moelora_precondition_adamw_f32(  # type: ignore[union-attr]
        count, _int64s([0 if a else 1 for a in of_a]), _int64s([p.shape[0] for p in params]),
        _int64s([p.shape[2] if a else p.shape[1] for p, a in zip(params, of_a)]), rank, _pointers(inverses),
        (ctypes.c_double * count)(*scales), _pointers(params), _pointers(grads), _pointers(exp_avgs),
        _pointers(exp_avg_sqs), (ctypes.c_double * count)(*step_sizes),
        (ctypes.c_double * count)(*bias_correction2_sqrts), float(lr), float(weight_decay), float(beta1),
        float(beta2), float(eps))
    torch.autograd.graph.increment_version(params)
