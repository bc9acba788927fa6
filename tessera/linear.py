"""Every Linear layer of the model, with its float32 matmuls on CPU done by oneDNN instead of PyTorch's default BLAS.

Why: `F.linear` on CPU goes to MKL's sgemm. Measured on the development machine (AMD EPYC, AVX-512), oneDNN's
matmul — the kernel PyTorch itself uses for bf16 and for `torch.compile`d CPU code — is the faster one for the
model's products: a 2048² matmul ran at 205–211 against 147–168 GFLOP/s, and a decode step's matrix-vector
products read the weights at 19 against 11 GB/s. The weight gradient (gradᵀ·x, summed over the tokens) is the
exception: there MKL was faster, so it stays with MKL. Results agree up to float32 rounding (the order of the
additions differs).

The weights stay ordinary float32 parameters in PyTorch's (out, in) layout, so checkpoints, the Hugging Face
interop, optimizers and `state_dict` see nothing new. What changes is only which kernel multiplies:
- float32 on CPU with gradients, eager or compiled: oneDNN, forward and input gradient (`_OneDNNLinear`);
- batch-1 decoding (no gradients, one row): a matrix-vector product, which only streams the weight from memory;
  cut into blocks of rows and multiplied as one batch of small products, the weight streams about 1.6× as fast
  as through oneDNN (see `matrix_vector`);
- batched decoding (no gradients, 2–64 rows): oneDNN with the weight reordered once into its blocked layout,
  which multiplies a few rows about 1.5× as fast as the plain layout (see `Linear.packed_weight`);
- float32 prefill (no gradients, more rows): the same blocked copy. It made no difference on the AVX-512 machine
  but multiplied a prefill's products 2–16% faster than the plain layout on an AVX2-only one
  (see MAX_PACKED_BF16_ROWS);
- a bfloat16 model's batched decoding (no gradients, 2–64 rows): the same blocked layout. `F.linear` already
  sends bf16 to oneDNN, but in the plain layout it read the benchmark LLM's bf16 weights at 13 GB/s, the blocked
  one at 18. Not at one row, although it is faster there too (a decode step 155 against 113 tokens/s): the copy
  would cost bf16 the memory it is chosen to save. The blocked copies are made only while memory has room for
  them (PACKING_MEMORY_RESERVE);
- anything else — other bf16 products (or autocast, whose bf16 matmuls PyTorch already sends to oneDNN), other
  devices, `torch.compile` without gradients (inductor picks its own CPU kernels), an empty batch, small
  products — plain `F.linear`.

`TESSERA_LINEAR_BACKEND=aten` sends every product back to `F.linear` (for a CPU where MKL turns out faster, or to
compare).
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from tessera.errors import ConfigError
from tessera.memory import available_memory

BACKENDS = ("onednn", "aten")


def _onednn_linear_op():
    """PyTorch's oneDNN linear (the op inductor emits for CPU linears), or None in a build without it."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):
        return None


# read once, at import. An unknown value is refused where layers are made (and by the CLI before any work), not
# here: raised at import, it was a traceback from `import tessera`, before the CLI could name the problem
_BACKEND = os.environ.get("TESSERA_LINEAR_BACKEND", "onednn")


def check_backend() -> None:
    if _BACKEND not in BACKENDS:
        raise ConfigError(f"TESSERA_LINEAR_BACKEND={_BACKEND!r}: expected one of {', '.join(BACKENDS)} "
                          f"(or the variable unset: onednn)")


_OP = _onednn_linear_op() if _BACKEND == "onednn" else None


def _bf16_packing_supported() -> bool:
    """Whether oneDNN can reorder bf16 weights on this CPU (it needs AVX-512 BW/VL/DQ or AVX-NE-CONVERT; elsewhere
    the reorder raises, while F.linear still multiplies bf16)."""
    try:
        return _OP is not None and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


BF16_PACKING = _bf16_packing_supported()


def backend() -> str:
    """Which kernel multiplies float32 on CPU: "onednn", or "aten" (PyTorch's `F.linear`)."""
    check_backend()
    return "onednn" if _OP is not None else "aten"


def _matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weightᵀ + bias. oneDNN reads strided (transposed) operands directly, without a copy."""
    if torch.compiler.is_compiling():
        return _compiled_matmul(x, weight, bias)
    return _OP(x, weight, bias, "none", [], "")


# Compiled, the product is a custom operator: inductor treats it as an opaque kernel and fuses the element-wise work
# around it, where with F.linear it would pick MKL's sgemm (and it cannot lower oneDNN's op itself outside frozen
# inference graphs). Eager code calls oneDNN directly: a custom operator's Python dispatch cost 100–200 µs a call.
# On the AVX2-only development CPU, the benchmark's training step (interleaved in one process, two rounds, medians
# of 5): compiled with these 4.62 and 5.02 s, compiled with MKL's 5.26 and 5.61 s, eager 4.77 and 5.57 s
@torch.library.custom_op("tessera::onednn_matmul", mutates_args=())
def _compiled_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return _OP(x, weight, bias, "none", [], "")


@_compiled_matmul.register_fake
def _(x, weight, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


class _OneDNNLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _matmul(x, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = _matmul(grad_out, weight.t(), None)  # grad · W
        grad_2d = grad_out.reshape(-1, grad_out.shape[-1])
        if ctx.needs_input_grad[1]:
            # gradᵀ · x sums over the tokens: here oneDNN ran at 0.5–1.2× MKL's speed by shape and run, so MKL
            grad_weight = grad_2d.t().mm(x.reshape(-1, x.shape[-1]))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_2d.sum(0)
        return grad_x, grad_weight, grad_bias


# oneDNN spends about 15 µs per call finding its kernel, so small products stay with PyTorch's default: measured,
# a 128×128 matrix-vector product took 3 µs in MKL and 18 in oneDNN. From 512×512 weights, or about 24M multiply-adds,
# oneDNN was the faster one: 1.05–1.10× on the quickstart's fp32 shapes (960 rows × 128→256…512), 1.3× for 200 rows
# × 384→384, and 2.0× for a ViT prefill's 257 rows × 384→384 (756 against 385 µs); at 9–19M it was 0.94–1.03×
MIN_WEIGHT_ELEMENTS = 1 << 18
MIN_MULTIPLY_ADDS = 24 << 20
ROUTED_DTYPES = (torch.float32, torch.bfloat16)


def _rows(x: torch.Tensor) -> int:
    """How many vectors x holds: the product's M."""
    return x.numel() // x.shape[-1] if x.numel() else 0


def _rerouted(x: torch.Tensor, weight: torch.Tensor, rows: int) -> bool:
    """Whether this product of `rows` rows may leave `F.linear` for tessera's kernels (see the module docstring):
    float32 or bfloat16, CPU, eager, big enough."""
    if _OP is None:  # "aten", or an unknown backend reaching linear() without a Linear (which refuses it)
        check_backend()
        return False
    if not x.is_cpu or x.dtype not in ROUTED_DTYPES or weight.dtype is not x.dtype:
        return False
    if x.dtype is torch.bfloat16 and not BF16_PACKING:
        return False
    if rows == 0 or (weight.numel() < MIN_WEIGHT_ELEMENTS and rows * weight.numel() < MIN_MULTIPLY_ADDS):
        return False
    return not torch.is_autocast_enabled("cpu")


# Batch-1 decoding multiplies one vector by every weight: the time is the time to read the weights from memory.
# Measured on the benchmark LLM's shapes (weights 1–16 MB, 2 threads), oneDNN read them at 15–20 GB/s and MKL's
# matrix-vector product at 9, where the memory delivers about 30 (a plain `sum` over 108 MB). Cutting the weight
# into blocks of 64 rows and handing them to `torch.bmm` as a batch of small products, which it shares out between
# the threads, read them at 24–33 GB/s.
MATRIX_VECTOR_BLOCKS = (64, 32, 16, 8)  # rows per block, the first that divides the output size


def matrix_vector(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """x @ weightᵀ + bias for a single row x, as a batch of (block, in) · (in, 1) products; None when no block
    size divides the output size or the weight is not contiguous (the caller then multiplies as usual)."""
    out_features, in_features = weight.shape
    # compiled, the cache would be traced through anyway (and dynamo warns about it)
    block = _row_block.__wrapped__(out_features) if torch.compiler.is_compiling() else _row_block(out_features)
    if block is None or not weight.is_contiguous():
        return None
    count = out_features // block
    blocks = weight.view(count, block, in_features)
    # every block multiplies the same column. Laid out as an (in, 1) column-major matrix (strides 1, in) it takes
    # bmm's batched BLAS path without a copy; the same column with row-major strides took another path, 4× slower.
    # One as_strided view of the row, not reshape-transpose-expand: a decode step makes 33 of these columns
    column = x.as_strided((count, in_features, 1), (0, x.stride(-1), in_features))
    y = torch.bmm(blocks, column) if bias is None else torch.baddbmm(bias.view(-1, block, 1), blocks, column)
    return y.view(x.shape[:-1] + (out_features,))


@functools.cache
def _row_block(out_features: int) -> int | None:
    """Rows per block for `matrix_vector`: the first of MATRIX_VECTOR_BLOCKS that divides the output size."""
    return next((b for b in MATRIX_VECTOR_BLOCKS if out_features % b == 0), None)


# Batched decoding: a handful of rows through every weight. Measured on the benchmark LLM's weights (108 MB), the
# blocked layout took 5.0–5.6 ms against 7.4–8.2 ms for 4–8 rows, and 8.0 against 11.3 for 16; for 1 row it
# made no difference. Prefills (hundreds of rows) gained nothing from it on the AVX-512 machine, but on an
# AVX2-only one (Zen 3) the benchmark's prefill products ran 2–16% faster blocked than plain, shape by shape and
# interleaved, from 257 to 2312 rows; the whole prefill 0–8% faster over three rounds of interleaved pairs, on a
# noisy machine. So float32 takes it for any row count from 2, bf16 up to 64 (bf16 prefills were not measured)
MAX_PACKED_BF16_ROWS = 64
PACKING_HINT = 8  # the row count oneDNN tunes the blocked layout for
# The blocked copy doubles a layer's weight memory. A big model (a 7B in bf16 is 14 GB) must not be pushed out of
# memory by it, so a copy is made only while the memory still available afterwards stays above this share of the
# memory (room for the KV cache and activations; see tessera/memory.py); past that, layers use their plain weights
PACKING_MEMORY_RESERVE = 0.25
PACKING_RETRY_SECONDS = 60.0  # after a refusal, measure again no sooner than this (a measurement reads /proc, /sys)

# Fused optimizers (AdamW(fused=True), tessera's trainer's) write the weights without moving their version counter,
# so a packed copy cannot tell that the step changed them; every optimizer step counts here and retires the copies
_optimizer_steps = 0


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


register_optimizer_step_post_hook(_count_optimizer_step)


def room_for_a_packed_copy(weight: torch.Tensor) -> bool:
    """Whether a blocked copy of `weight` leaves at least PACKING_MEMORY_RESERVE of the memory available (the
    machine's, bounded by the process's cgroup limits: tessera/memory.py)."""
    memory = available_memory()
    if memory is None:
        return True
    available, total = memory
    return available - weight.numel() * weight.element_size() >= PACKING_MEMORY_RESERVE * total


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           packed: Callable[[], torch.Tensor | None] | None = None) -> torch.Tensor:
    """F.linear, through oneDNN or row blocks where they are faster (see the module docstring). packed: gives the
    weight in oneDNN's blocked layout for decoding, or None when memory has no room for it (`Linear` passes its
    cached copy)."""
    rows = _rows(x)
    if not _rerouted(x, weight, rows):
        return F.linear(x, weight, bias)
    grad = torch.is_grad_enabled()
    if rows == 1 and not grad and x.dtype is torch.float32 and (y := matrix_vector(x, weight, bias)) is not None:
        # batch-1 decoding, eager or compiled, checked first: a decode step makes 33 of these calls, and with the
        # routing below skipped and `matrix_vector`'s column one view, the step took 2–4% less. Compiled, inductor
        # would take MKL's matrix-vector product, which reads the weights at half the speed of row blocks (the
        # compiled batch-1 decode step of the benchmark LLM took 20.8 against 12.1 ms eager); row blocks are a bmm
        return y
    needs_grad = grad and any(t is not None and t.requires_grad for t in (x, weight, bias))
    if torch.compiler.is_compiling():
        # with gradients, oneDNN's product as an operator inductor keeps (see `_compiled_matmul`); without, inductor
        # picks its own kernels (the blocked weight copies are opaque oneDNN tensors a graph cannot hold)
        if needs_grad and x.dtype is torch.float32:
            return _OneDNNLinear.apply(x, weight, bias)
        return F.linear(x, weight, bias)
    blocked_rows = rows >= 2 and (x.dtype is torch.float32 or rows <= MAX_PACKED_BF16_ROWS)
    if packed is not None and not grad and blocked_rows and (blocked := packed()) is not None:
        return _matmul(x, blocked, bias)  # batched decoding (float32 or bf16) or a float32 prefill
    if x.dtype is torch.bfloat16:  # everything else in bf16: F.linear already multiplies it in oneDNN
        return F.linear(x, weight, bias)
    if needs_grad:
        return _OneDNNLinear.apply(x, weight, bias)
    # gradients on but none needed (a frozen model evaluated outside no_grad): without gradients it was tried above
    if rows == 1 and grad and (y := matrix_vector(x, weight, bias)) is not None:
        return y
    return _matmul(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear (same parameters, same state_dict), multiplying through `linear`."""

    _packed: tuple[tuple[int, int, int], torch.Tensor | None, float] | None = None  # (key, copy, retry after)

    def __init__(self, *args, **kwargs):
        check_backend()
        super().__init__(*args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, packed=self.packed_weight)

    def packed_weight(self) -> torch.Tensor | None:
        """The weight in oneDNN's blocked layout, made on first use and kept until the weight changes (a load or
        an in-place write bumps its version; any optimizer step, fused ones included, retires every copy), the
        layer moves (`.to`) or `train()`/`eval()` is called. Writes through `.data` go unseen: call `eval()` after
        them. It is a second copy: decoding holds the LLM's linear weights twice. None when memory has no room for
        it (see PACKING_MEMORY_RESERVE); memory is measured again after PACKING_RETRY_SECONDS (a server's first
        batch may meet a passing shortage). None for weights made under torch.inference_mode: they have no
        version counter, so a copy could not tell an in-place load from none."""
        if self.weight.is_inference():
            return None
        key = (self.weight.data_ptr(), self.weight._version, _optimizer_steps)
        cached = self._packed
        if cached is not None and cached[0] == key and (cached[1] is not None or time.monotonic() < cached[2]):
            return cached[1]
        self._packed = None  # the stale copy goes before memory is measured for a new one
        copy = (torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), PACKING_HINT)
                if room_for_a_packed_copy(self.weight) else None)
        self._packed = (key, copy, time.monotonic() + PACKING_RETRY_SECONDS)
        return copy

    def __getstate__(self) -> dict:
        # the packed copy is an opaque oneDNN tensor that can be neither copied nor pickled; it is rebuilt on use
        return {**super().__getstate__(), "_packed": None}

    def _apply(self, fn, recurse=True):
        self._packed = None  # `.to(dtype or device)` makes new weights: the copy of the old ones would only take memory
        return super()._apply(fn, recurse)

    def train(self, mode: bool = True) -> Linear:
        # training changes the weight every step, so the copy would only take memory; and eval() is where to
        # start afresh after writing weights through `.data`, which bypasses the version counter
        self._packed = None
        return super().train(mode)
