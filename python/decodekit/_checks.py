"""Argument validation shared by every wrapper: one definition of each rule and constant.

* float32 limits (:data:`FLT_MAX`, :data:`T_TINY`), seed/offset bits (:func:`to_int64_bits`);
* tensor checks (:func:`check_logits`, :func:`check_probs`, :func:`check_device`, ...);
* per-row parameters (:func:`row_param`): a number or a ``[B]`` tensor, split into what the
  kernel takes (a tensor or None, and a scalar);
* device support, asked of the torch dispatcher (:func:`has_kernel`): a wrapper accepts a
  device when ``torch.ops.decodekit.<op>`` has a kernel registered for it, so a CUDA kernel
  that lands in ``csrc/`` is usable from Python without editing this package.

Checks that read tensor *data* run only with ``validate=True`` and go through
:func:`host_bool`, which turns the "not possible here" errors of vmap, torch.compile and fake
tensors into decodekit's own message ("pass validate=False"). With ``validate=False`` nothing
here reads a value on the host, so numbers that are symbolic under
``torch.compile(dynamic=True)`` pass through untouched.
"""

from __future__ import annotations

import math
import numbers
import operator
from typing import Optional, Union

import torch

Number = Union[int, float]
RowParam = Union[Number, torch.Tensor]

#: float32's largest finite value; float32 parameters must be at most this in magnitude.
FLT_MAX = 3.4028234663852886e38
#: float32's smallest normal number. A positive temperature below it acts as it (the
#: ``T -> 0+`` limit: uniform over the tied maxima), never as ``T = 0`` (greedy) by rounding.
T_TINY = 1.1754943508222875e-38
INT64_MIN, UINT64_END = -(2**63), 2**64
#: The smallest repetition_penalty the penalties op takes.
REPETITION_PENALTY_MIN = 1e-30


def is_float32_number(x) -> bool:
    """A real number (not bool) that is finite in float32: NaN, +-inf and |x| > FLT_MAX are not."""
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        return False
    try:
        return abs(float(x)) <= FLT_MAX
    except OverflowError:  # (an int beyond float64's range)
        return False


def check_float32_number(value, name: str, op: str) -> float:
    """``value`` as a float when :func:`is_float32_number`, else a ValueError naming ``name``."""
    if not is_float32_number(value):
        raise ValueError(
            f"{op}: {name} must be a finite number of float32 range (|x| <= {FLT_MAX:.7g}), got {value!r:.60}"
        )
    return float(value)


LOGIT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

WHY_LOGITS = "have a NaN, no finite logit, or +inf logits with temperature > 0"
WHY_PROBS = "have a NaN, a negative or infinite entry, or no positive entry"

_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA", "meta": "Meta"}
_VALIDATE_HINT = (
    "validate=True checks values on the host, which is not possible here (vmap, torch.compile or fake "
    "tensors); pass validate=False (invalid rows then come back as -1 or NaN, and return_valid=True marks them)"
)


# ------------------------------------------------------------------ devices ----
_HAS_KERNEL: dict = {}


@torch.compiler.assume_constant_result  # a host-side lookup; torch.compile calls it while tracing
def has_kernel(op: str, device_type: str) -> bool:
    """Whether ``torch.ops.decodekit.<op>`` has a kernel for ``device_type`` ("cpu", "cuda",
    "meta"), as registered with the dispatcher (asked once per pair)."""
    found = _HAS_KERNEL.get((op, device_type))
    if found is None:
        key = _DISPATCH_KEYS.get(device_type)
        found = key is not None and bool(torch._C._dispatch_has_kernel_for_dispatch_key(f"decodekit::{op}", key))
        _HAS_KERNEL[(op, device_type)] = found
    return found


def kernel_devices(op: str) -> str:
    """``"CPU"`` or ``"CPU and CUDA"``: the devices with a kernel for ``op``, for messages."""
    names = [key for dev, key in _DISPATCH_KEYS.items() if dev != "meta" and has_kernel(op, dev)]
    return " and ".join(names) or "none"


def check_device(op: str, kernel: str, name: str, t: torch.Tensor) -> None:
    """Raise ValueError when tensor ``t`` (argument ``name``) is on a device without a kernel
    for ``torch.ops.decodekit.<kernel>`` (meta tensors need a Meta kernel)."""
    dev = t.device.type
    if not has_kernel(kernel, dev):
        raise ValueError(f"{op}: {name} is on {t.device}, but this op has kernels for: {kernel_devices(kernel)}")


def same_device(op: str, ref_name: str, ref: torch.Tensor, **tensors) -> None:
    """Every tensor in ``tensors`` (None skipped) is on ``ref``'s device."""
    for name, t in tensors.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{op}: {name} is on {t.device} but {ref_name} is on {ref.device}")


# ------------------------------------------------------------------ values ----
def is_symbolic(x) -> bool:
    """True for torch.SymInt / SymFloat / SymBool (numbers only known at run time)."""
    return isinstance(x, (torch.SymInt, torch.SymFloat, torch.SymBool))


def host_bool(t, op: str) -> bool:
    """``bool(t)`` for a validation check. Under vmap, torch.compile or fake tensors the value
    is not known on the host: the error then says how to skip the check."""
    if torch.compiler.is_compiling():
        raise RuntimeError(f"{op}: {_VALIDATE_HINT}")
    try:
        return bool(t)
    except RuntimeError as exc:  # vmap's data-dependent control flow, fake tensors' data-dependent output
        raise RuntimeError(f"{op}: {_VALIDATE_HINT}") from exc


def needs_host(value, op: str, validate: bool) -> bool:
    """Whether host checks may run on ``value``: False for symbolic numbers with
    ``validate=False``; decodekit's own error for symbolic numbers with ``validate=True``."""
    if not is_symbolic(value):
        return True
    if validate:
        raise RuntimeError(f"{op}: {_VALIDATE_HINT}")
    return False


def check_bool(value, name: str, op: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{op}: {name} must be True or False, got {value!r}")
    return value


def check_int(value, name: str, op: str, lo: Optional[int] = None) -> int:
    """A Python int (not bool), at least ``lo``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{op}: {name} must be an int, got {type(value).__name__}")
    value = operator.index(value)
    if lo is not None and value < lo:
        raise ValueError(f"{op}: {name} must be an int >= {lo}, got {value}")
    return value


def check_number(value, name: str, op: str, lo: float, hi: float, allowed: str) -> float:
    """A real number (not bool) in ``[lo, hi]`` (NaN rejected), as a float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{op}: {name} must be a number, got {type(value).__name__}")
    try:
        f = float(value)
    except OverflowError:
        raise ValueError(f"{op}: {name} must be {allowed}, got an int of {int(value).bit_length()} bits") from None
    if not lo <= f <= hi:  # also False for NaN
        raise ValueError(f"{op}: {name} must be {allowed}, got {value!r:.60}")
    return f


def to_int64_bits(v: int, name: str, op: str) -> int:
    """Maps an int in [-2^63, 2^64) to the int64 with the same low 64 bits."""
    if type(v) is int and INT64_MIN <= v < 2**63:  # (the common case, without the ABC check)
        return v
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{op}: {name} must be an int, got {type(v).__name__}")
    v = operator.index(v)
    if not INT64_MIN <= v < UINT64_END:
        raise ValueError(f"{op}: {name} must be in [-2^63, 2^64), got {v}")
    return v - UINT64_END if v >= 2**63 else v


def check_vocab_size(vocab_size, V: int, op: str) -> int:
    if vocab_size is None:
        return V
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, numbers.Integral):
        raise TypeError(f"{op}: vocab_size must be an int or None, got {type(vocab_size).__name__}")
    vocab_size = operator.index(vocab_size)
    if not 1 <= vocab_size <= V:
        raise ValueError(f"{op}: vocab_size must be in [1, V={V}], got {vocab_size}")
    return vocab_size


def raise_invalid_rows(op: str, valid: torch.Tensor, why: str = WHY_LOGITS, hint: bool = True) -> None:
    rows = torch.nonzero(~valid).flatten().tolist()
    shown = rows[:16]
    more = "" if len(rows) <= 16 else f" (and {len(rows) - 16} more)"
    tail = (
        "; pass return_valid=True to get -1 for those rows and a validity mask instead"
        if hint
        else "; pass validate=False to get those rows back unchanged (NaN for probabilities)"
    )
    raise ValueError(f"{op}: rows {shown}{more} {why}{tail}")


def has_data(t: torch.Tensor) -> bool:
    """A tensor whose values can be read (not meta, not empty)."""
    return t.numel() > 0 and t.device.type != "meta"


# ----------------------------------------------------------------- tensors ----
def check_logits(logits, op: str, kernel: Optional[str] = None) -> torch.Tensor:
    """``[B, V]`` float32/float16/bfloat16 logits on a device with a kernel for ``kernel``
    (default ``op``); detached, unit column stride."""
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{op}: logits must be a torch.Tensor [B, V], got {type(logits).__name__}")
    if logits.dim() != 2:
        raise ValueError(f"{op}: logits must be 2-D [B, V], got shape {tuple(logits.shape)}")
    if logits.dtype not in LOGIT_DTYPES:
        raise TypeError(f"{op}: logits must be float32, float16 or bfloat16, got {logits.dtype}")
    if logits.size(1) < 1:
        raise ValueError(f"{op}: logits must have at least one column (V >= 1), got shape {tuple(logits.shape)}")
    if logits.size(1) >= 2**31:
        raise ValueError(f"{op}: V must be < 2^31, got {logits.size(1)}")
    check_device(op, kernel or op, "logits", logits)
    if logits.requires_grad:
        logits = logits.detach()  # the ops are not differentiable; outputs carry no graph
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    return logits


def check_probs(probs, op: str, kernel: Optional[str] = None) -> torch.Tensor:
    """``[B, V]`` float32 probabilities; as :func:`check_logits`."""
    if not isinstance(probs, torch.Tensor):
        raise TypeError(f"{op}: probs must be a torch.Tensor [B, V], got {type(probs).__name__}")
    if probs.dim() != 2:
        raise ValueError(f"{op}: probs must be 2-D [B, V], got shape {tuple(probs.shape)}")
    if probs.dtype != torch.float32:
        raise TypeError(f"{op}: probs must be float32, got {probs.dtype}")
    if probs.size(1) < 1 or probs.size(1) >= 2**31:
        raise ValueError(f"{op}: probs must have 1 <= V < 2^31 columns, got shape {tuple(probs.shape)}")
    check_device(op, kernel or op, "probs", probs)
    if probs.requires_grad:
        probs = probs.detach()  # the ops are not differentiable; outputs carry no graph
    if probs.stride(1) != 1:
        probs = probs.contiguous()
    return probs


def check_float32(op: str, kernel: str, **tensors) -> None:
    """float32 tensors on a device with a kernel for ``kernel``."""
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != torch.float32:
            raise TypeError(f"{op}: {name} must be float32, got {t.dtype}")
        check_device(op, kernel, name, t)


def index_tensor(x, name: str, op: str, device: torch.device, length: Optional[int]) -> torch.Tensor:
    """An int, a sequence of ints or an integer tensor -> contiguous 1-D int64 on ``device``."""
    if isinstance(x, torch.Tensor):
        if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
            raise TypeError(f"{op}: {name} must be an integer tensor (int32 or int64), got {x.dtype}")
        if x.dim() != 1:
            raise ValueError(f"{op}: {name} must be 1-D, got shape {tuple(x.shape)}")
        if x.device != device:
            raise ValueError(f"{op}: {name} is on {x.device} but the caches are on {device}")
        t = x if x.dtype == torch.int64 and x.is_contiguous() else x.to(torch.int64).contiguous()
    elif isinstance(x, numbers.Integral) and not isinstance(x, bool):
        if length is None:
            raise TypeError(f"{op}: {name} must be a 1-D integer tensor or a list of ints, got an int")
        if not INT64_MIN <= operator.index(x) < 2**63:
            raise ValueError(f"{op}: {name} must fit in int64, got {x}")
        t = torch.full((length,), operator.index(x), dtype=torch.int64, device=device)
    elif isinstance(x, (list, tuple)):
        if not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in x):
            raise TypeError(f"{op}: {name} must hold ints, got {list(x)[:8]!r}")
        if not all(INT64_MIN <= operator.index(v) < 2**63 for v in x):
            raise ValueError(f"{op}: {name} must hold values that fit in int64, got {list(x)[:8]!r}")
        t = torch.tensor([operator.index(v) for v in x], dtype=torch.int64, device=device)
    else:
        raise TypeError(f"{op}: {name} must be an integer tensor or a list of ints, got {type(x).__name__}")
    if length is not None and t.size(0) != length:
        raise ValueError(f"{op}: {name} must have length B={length}, got {t.size(0)}")
    return t


# ------------------------------------------------------ per-row parameters ----
_WIDE_UNSIGNED = tuple(getattr(torch, n) for n in ("uint16", "uint32", "uint64") if hasattr(torch, n))


def _tensor_param(value, name, op, ref, *, integer, dtype, lo, hi, validate, allowed, tiny_positive):
    B = ref.size(0)
    if value.dim() != 1 or value.size(0) != B:
        raise ValueError(
            f"{op}: {name} must be a scalar or a 1-D tensor of length B={B}, got shape {tuple(value.shape)}"
        )
    if value.device != ref.device and ref.device.type != "meta":
        raise ValueError(f"{op}: {name} is on {value.device} but logits are on {ref.device}")
    non_int = value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool
    if integer and non_int:
        raise TypeError(f"{op}: {name} must be an integer tensor, got {value.dtype}")
    if integer and value.dtype in _WIDE_UNSIGNED and (lo is not None or hi is not None):
        # (torch has no comparisons for them; the range check needs one)
        raise TypeError(f"{op}: {name} must be an int or a signed integer tensor (int64), got a {value.dtype} tensor")
    if not integer and not (value.dtype.is_floating_point or value.dtype in (torch.int32, torch.int64)):
        raise TypeError(f"{op}: {name} must be a floating-point tensor, got {value.dtype}")
    t = value.to(dtype).contiguous()
    if tiny_positive is not None and value.dtype != dtype:
        t = torch.where((value > 0) & (t < tiny_positive), torch.full_like(t, tiny_positive), t)
    if validate and B > 0 and t.device.type != "meta":
        check = value if integer else value.double()
        bad = torch.zeros_like(check, dtype=torch.bool) if integer else torch.isnan(check) | torch.isinf(check)
        if lo is not None:
            bad |= check < lo
        if hi is not None:
            bad |= check > hi
        if not integer and dtype == torch.float32:
            bad |= check.abs() > FLT_MAX
        if host_bool(bad.any(), op):
            rows = torch.nonzero(bad).flatten().tolist()[:8]
            vals = [check[r].item() for r in rows]
            f32 = f" and at most float32's largest value {FLT_MAX!r}" if dtype == torch.float32 and not integer else ""
            raise ValueError(f"{op}: {name} must be {allowed}{f32}; rows {rows} have {vals}")
    return t, 0


def _number_param(value, name, op, *, integer, dtype, lo, hi, allowed, tiny_positive):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{op}: {name} must be a number or a [B] tensor, got {type(value).__name__}")
    if integer:
        if isinstance(value, numbers.Integral):
            value = operator.index(value)
        elif isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise TypeError(f"{op}: {name} must be an int, got {value!r}")
    else:
        try:
            value = float(value)
        except OverflowError:
            raise ValueError(f"{op}: {name} must be {allowed}, got an int of {value.bit_length()} bits") from None
        if math.isnan(value) or math.isinf(value):
            raise ValueError(f"{op}: {name} must be {allowed}, got {value}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ValueError(f"{op}: {name} must be {allowed}, got {value}")
    if not integer and dtype == torch.float32 and abs(value) > FLT_MAX:
        raise ValueError(
            f"{op}: {name} must be {allowed} and at most float32's largest value {FLT_MAX!r}, got {value!r}"
        )
    if tiny_positive is not None and 0.0 < value < tiny_positive:
        value = tiny_positive
    return None, value


def row_param(
    value,
    name: str,
    op: str,
    ref: torch.Tensor,
    *,
    integer: bool,
    dtype: torch.dtype,
    lo: Optional[float],
    hi: Optional[float],
    validate: bool,
    allowed: str,
    tiny_positive: Optional[float] = None,
):
    """Splits a per-row parameter into ``(tensor or None, scalar)`` for the kernel.

    ``value`` is a number or a ``[B]`` tensor (``B = ref.size(0)``; a 0-d tensor is a number).
    Values of a float32 parameter must be finite in float32 (``|x| <= FLT_MAX``); with
    ``tiny_positive``, positive values below it become it. A symbolic number
    (``torch.compile(dynamic=True)``) is passed through unchecked with ``validate=False``.

    Under ``torch.compile`` numbers may be symbolic: with ``validate=False`` they are passed to
    the kernel unchecked (no ``math.isnan`` or comparison on the host), and with
    ``validate=True`` decodekit's own "pass validate=False" error is raised.
    """
    if torch.compiler.is_compiling():
        if validate:
            raise RuntimeError(f"{op}: {_VALIDATE_HINT}")
        if not isinstance(value, torch.Tensor):
            return None, value
    if isinstance(value, torch.Tensor):
        if integer and (value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool):
            raise TypeError(f"{op}: {name} must be an int or an integer tensor, got a {value.dtype} tensor")
        if value.dim() == 0:
            concrete = value.device.type == "cpu" or (validate and value.device.type != "meta")
            if concrete and not torch.compiler.is_compiling():
                return _number_param(
                    value.item(),
                    name,
                    op,
                    integer=integer,
                    dtype=dtype,
                    lo=lo,
                    hi=hi,
                    allowed=allowed,
                    tiny_positive=tiny_positive,
                )
            value = value.reshape(1).expand(ref.size(0))
        return _tensor_param(
            value,
            name,
            op,
            ref,
            integer=integer,
            dtype=dtype,
            lo=lo,
            hi=hi,
            validate=validate,
            allowed=allowed,
            tiny_positive=tiny_positive,
        )
    if is_symbolic(value):
        if validate:
            raise RuntimeError(f"{op}: {_VALIDATE_HINT}")
        return None, value
    return _number_param(
        value, name, op, integer=integer, dtype=dtype, lo=lo, hi=hi, allowed=allowed, tiny_positive=tiny_positive
    )


def clamp_top_k(k_v):
    """An int top_k clamped to +-2^62 (any k past V disables; the kernel takes int64)."""
    return max(min(k_v, 2**62), -(2**62)) if isinstance(k_v, int) else k_v


# -------------------------------------------------------------------- RNG ----
_WHY_RNG = "when any row samples (temperature > 0 with top_k != 1 and top_p > 0)"


def seed_and_offset(
    seed, offset, generator, ref: torch.Tensor, op: str, needs_rng: bool, validate: bool, why: str = _WHY_RNG
):
    """``(seed tensor or None, seed int, offset tensor or None, offset int)`` for the kernel;
    ``why`` ends the error for a missing seed (when the op needs one).

    A negative int offset is an error with ``validate=True``; with ``validate=False`` it is
    passed on (the sampling wrappers then mark those rows invalid, see :func:`negative_offset`).
    """
    B = ref.size(0)
    compiling = torch.compiler.is_compiling()
    if compiling and validate:
        raise RuntimeError(f"{op}: {_VALIDATE_HINT}")
    if seed is not None and generator is not None:
        raise ValueError(f"{op}: pass either seed (with offset) or generator, not both")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"{op}: generator must be a torch.Generator, got {type(generator).__name__}")
        drawn = int(
            torch.randint(-(2**63), 2**63 - 1, (), generator=generator, device=generator.device, dtype=torch.int64)
        )
        if isinstance(offset, (torch.Tensor, bool)) or not isinstance(offset, numbers.Integral) or offset < 0:
            raise ValueError(f"{op}: with a generator, offset must be an int >= 0, got {offset!r}")
        base = operator.index(offset)
        # Each row gets its own counter so rows drawn from one generator are independent.
        offs = torch.arange(B, dtype=torch.int64, device=ref.device) + to_int64_bits(base, "offset", op)
        return None, drawn, offs, 0
    if seed is None:
        if needs_rng:
            raise ValueError(f"{op}: a seed (int or [B] int64 tensor) or a torch.Generator is required {why}")
        seed = 0
    if isinstance(seed, torch.Tensor):
        s_t, s_v = row_param(
            seed, "seed", op, ref, integer=True, dtype=torch.int64, lo=None, hi=None, validate=False, allowed="an int64"
        )
        if s_t is None:
            s_v = to_int64_bits(int(s_v), "seed", op)
    elif is_symbolic(seed):
        needs_host(seed, op, validate)
        s_t, s_v = None, seed
    else:
        s_t, s_v = None, to_int64_bits(seed, "seed", op)
    if isinstance(offset, torch.Tensor):
        o_t, o_v = row_param(
            offset, "offset", op, ref, integer=True, dtype=torch.int64, lo=0, hi=None, validate=validate, allowed=">= 0"
        )
        if o_t is None:
            o_v = to_int64_bits(int(o_v), "offset", op)
    elif compiling or is_symbolic(offset):
        # A possibly symbolic int: a [B] tensor, so that a negative value marks the rows invalid
        # with tensor ops only.
        needs_host(offset, op, validate)
        o_t, o_v = torch.full((B,), offset, dtype=torch.int64, device=ref.device), 0
    else:
        if (
            isinstance(offset, bool)
            or not isinstance(offset, numbers.Integral)
            or (validate and offset < 0)
            or offset >= UINT64_END
        ):
            raise ValueError(f"{op}: offset must be an int in [0, 2^64) or a [B] int64 tensor, got {offset!r}")
        o_t, o_v = None, to_int64_bits(offset, "offset", op)
    return s_t, s_v, o_t, o_v


def negative_offset(o_t: Optional[torch.Tensor], o_v) -> Union[bool, torch.Tensor]:
    """Rows whose offset is negative (only possible with ``validate=False``): a bool ``[B]``
    tensor, or a Python bool for a scalar offset. No host read of tensor data."""
    if o_t is not None:
        return o_t < 0
    return o_v < 0


# ------------------------------------------------------- sampling arguments ----
def filter_args(op: str, x: torch.Tensor, top_k, top_p, min_p, validate: bool):
    common = dict(op=op, ref=x, validate=validate)
    k_t, k_v = row_param(
        top_k, "top_k", integer=True, dtype=torch.int64, lo=None, hi=None, allowed="an int (<= 0 disables)", **common
    )
    p_t, p_v = row_param(
        top_p, "top_p", integer=False, dtype=torch.float64, lo=0.0, hi=1.0, allowed="in [0, 1]", **common
    )
    m_t, m_v = row_param(
        min_p, "min_p", integer=False, dtype=torch.float32, lo=0.0, hi=1.0, allowed="in [0, 1]", **common
    )
    return k_t, clamp_top_k(k_v), p_t, p_v, m_t, m_v


def logprob_args(op: str, top_logprobs, logprobs_mode, vocab_size: int):
    if isinstance(top_logprobs, bool) or not isinstance(top_logprobs, numbers.Integral):
        raise TypeError(f"{op}: top_logprobs must be an int, got {type(top_logprobs).__name__}")
    top_logprobs = operator.index(top_logprobs)
    if not 0 <= top_logprobs <= vocab_size:
        raise ValueError(f"{op}: top_logprobs must be in [0, vocab_size={vocab_size}], got {top_logprobs}")
    if logprobs_mode not in ("processed", "raw"):
        raise ValueError(f"{op}: logprobs_mode must be 'processed' or 'raw', got {logprobs_mode!r}")
    return top_logprobs, logprobs_mode == "raw"


def all_greedy(op, t_tensor, t_val, k_tensor, k_val, p_tensor, p_val) -> bool:
    """True when no row samples (T == 0, top_k == 1 or top_p == 0 in every row)."""
    greedy = None
    for tensor, val, test in (
        (t_tensor, t_val, lambda x: x == 0),
        (k_tensor, k_val, lambda x: x == 1),
        (p_tensor, p_val, lambda x: x == 0),
    ):
        g = test(tensor) if tensor is not None else torch.tensor(bool(test(val)))
        greedy = g if greedy is None else (greedy | g)
    return host_bool(greedy.all(), op)


def parse_device(device, name: str) -> torch.device:
    """``torch.device(device)``, or ValueError naming ``name`` for a value torch cannot read."""
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"{name}: device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}") from None
