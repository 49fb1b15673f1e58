"""The attention dropout mask in plain torch (no Triton needed): the specification that the Triton
kernels (kernels/attention.py), the CUDA kernels (csrc/attention) and the torch reference backend
reproduce bit for bit.

The state is a TENSOR, rng_state = int64 [seed, offset] (seed in [0, 2^62)), on the device of the
attention inputs. Every kernel reads it from device memory when it runs, and these functions read it
with tensor ops only (no .item(), no host sync): a CUDA graph captured once and replayed after the
state was redrawn in place draws a fresh mask on every replay, as torch's own fused kernels do.

For element (b, h, i, j) of the (B, H, Lq, Lk) probability matrix:
    c    = offset + ((b*H + h)*Lq + i)*Lk + j                          (64-bit counter)
    r    = philox4x32-10(key=(seed mod 2^32, seed >> 32), counter=(c mod 2^32, c >> 32, 0, 0))[0]
    u    = (r >> 8) * 2^-24                                          (float32 in [0, 1), exact)
    keep = u >= dropout_p
Triton's tl.randint(seed, c) (int64 seed and counter) is exactly this Philox; the Triton and CUDA
kernels spell it out as a device function, so the three backends drop the same elements for the
same state. The mask is never stored: the backward recomputes it from the same state tensor.

Here the 32-bit arithmetic runs in int64 tensors: a product of two values below 2^32 wraps modulo
2^64 in two's complement, so its low and high 32-bit halves are exact after masking.
"""
from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF
_ROUND_A = 0xD2511F53
_ROUND_B = 0xCD9E8D57
_KEY_A = 0x9E3779B9
_KEY_B = 0xBB67AE85


def philox_word0(seed, counter: torch.Tensor) -> torch.Tensor:
    """Word 0 of philox4x32-10 for each int64 counter (as int64 values in [0, 2^32)).

    seed: a 0-d int64 tensor (broadcast; no host read) or a Python int."""
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    c0 = counter & _M32
    c1 = (counter >> 32) & _M32
    c2 = torch.zeros_like(counter)
    c3 = torch.zeros_like(counter)
    for _ in range(10):
        p_b = _ROUND_B * c2  # wraps mod 2^64
        p_a = _ROUND_A * c0
        c0, c1, c2, c3 = (((p_b >> 32) & _M32) ^ c1 ^ k0, p_b & _M32,
                          ((p_a >> 32) & _M32) ^ c3 ^ k1, p_a & _M32)
        k0 = (k0 + _KEY_A) & _M32
        k1 = (k1 + _KEY_B) & _M32
    return c0


def _seed_offset(rng_state, device):
    """(seed, offset) as 0-d int64 tensors on `device`, sliced from the state tensor (no host read).
    A (seed, offset) pair of Python ints is accepted too (tools and tests)."""
    if not isinstance(rng_state, torch.Tensor):
        rng_state = torch.tensor([int(x) for x in rng_state], dtype=torch.int64)
    if rng_state.dtype != torch.int64 or tuple(rng_state.shape) != (2,):
        raise ValueError(f"rng_state: expected an int64 tensor of shape (2,) = [seed, offset], "
                         f"got {rng_state.dtype} of shape {tuple(rng_state.shape)}")
    state = rng_state.to(device)
    return state[0], state[1]


_CHUNK = 1 << 22  # counters per step: the int64 temporaries cost ~50 bytes each


def dropout_uniform(rng_state, B: int, H: int, Lq: int, Lk: int, device,
                    q_start: int = 0, q_stop: int | None = None) -> torch.Tensor:
    """u of the spec for query rows [q_start, q_stop): (B, H, rows, Lk) float32."""
    q_stop = Lq if q_stop is None else q_stop
    seed, offset = _seed_offset(rng_state, device)
    out = torch.empty((B, H, q_stop - q_start, Lk), dtype=torch.float32, device=device)
    step = max(1, _CHUNK // max(1, B * H * Lk))
    b = torch.arange(B, device=device, dtype=torch.int64).view(B, 1, 1, 1)
    h = torch.arange(H, device=device, dtype=torch.int64).view(1, H, 1, 1)
    j = torch.arange(Lk, device=device, dtype=torch.int64).view(1, 1, 1, Lk)
    for r0 in range(q_start, q_stop, step):
        r1 = min(q_stop, r0 + step)
        i = torch.arange(r0, r1, device=device, dtype=torch.int64).view(1, 1, -1, 1)
        c = offset + ((b * H + h) * Lq + i) * Lk + j
        out[:, :, r0 - q_start:r1 - q_start] = (philox_word0(seed, c) >> 8).to(torch.float32) * (2.0 ** -24)
    return out


def dropout_keep_mask(rng_state, B: int, H: int, Lq: int, Lk: int, device, dropout_p: float,
                      q_start: int = 0, q_stop: int | None = None) -> torch.Tensor:
    """keep mask of the spec (u >= dropout_p, compared in float32): (B, H, rows, Lk) bool.
    dropout_p stays a Python scalar, compared in u's float32 all the same: a tensor made from it
    would be a host-to-device copy -- a sync on CUDA, and an error while a CUDA graph is captured."""
    u = dropout_uniform(rng_state, B, H, Lq, Lk, device, q_start, q_stop)
    return u >= float(dropout_p)


def check_rng_state(rng_state, dropout_p: float, device) -> None:
    """Launchers' check of the state their kernels read: with dropout, a contiguous int64 [seed, offset]
    tensor of shape (2,) on the inputs' device (ValueError naming it otherwise)."""
    if not dropout_p > 0.0:
        return
    if (not isinstance(rng_state, torch.Tensor) or rng_state.dtype != torch.int64
            or tuple(rng_state.shape) != (2,) or rng_state.device != device or rng_state.stride(0) != 1):
        got = (f"{rng_state.dtype} {tuple(rng_state.shape)} on {rng_state.device}, strides {rng_state.stride()}"
               if isinstance(rng_state, torch.Tensor) else type(rng_state).__name__)
        raise ValueError(f"rng_state: expected a contiguous int64 tensor [seed, offset] of shape (2,) on "
                         f"{device} (dropout_p = {dropout_p}), got {got}")
