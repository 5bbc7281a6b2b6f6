"""The rules' own random streams: never torch's global RNG.

A rule that draws random numbers after :func:`localopt.wrap` (``brsf``'s per-batch magnitudes,
``wm``'s mirror noise, the direct rules' lazily drawn feedback, target propagation's feedback
noise and block replays) draws them from a *stream* kept on each hooked module, the buffer
``localopt_rng = [seed, draws]`` (int64):

* ``seed`` is fixed at wrap time from ``wrap(seed=s)`` (with ``seed=None``: from one draw of
  torch's global RNG -- the only global draw a rule ever makes), mixed with the site's index;
* the ``k``-th draw of a site uses a fresh generator seeded with ``mix(seed, k)`` on the device
  it draws on (a device generator: no host round trip), and the buffer's ``draws`` is advanced.

So the global RNG -- data order, augmentation, dropout -- sees the same calls as in an
unwrapped model, and the stream is part of ``model.state_dict()``: a checkpoint resumes the
rule's randomness bit-exactly.  Being a buffer, it is also what ``DistributedDataParallel``'s
start-up broadcast syncs, so every rank draws the same feedback and noise.

The host keeps a copy of ``[seed, draws]`` so a draw costs no device read; it re-reads the
buffer only when the buffer was replaced or written from outside (``load_state_dict``,
``.to()``, a broadcast), detected by tensor identity and version counter.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import Tensor

__all__ = ["BUFFER", "draw_seed", "mix", "stream_state", "next_seed", "generator",
           "counter_uniform", "private_global_rng", "preserved_streams"]

#: the stream's buffer, registered as ``localopt_rng`` on each hooked module
BUFFER = "rng"
_MASK = (1 << 64) - 1


def draw_seed() -> int:
    """One draw of torch's global (CPU) RNG: the seed of ``wrap(seed=None)``."""
    return int(torch.randint(0, 2**62, (1,), device="cpu").item())  # also under a meta device context


def mix(*values: int) -> int:
    """A 63-bit hash of integers (splitmix64 steps): decorrelated seeds from (seed, index)."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & _MASK)) * 0xBF58476D1CE4E5B9 & _MASK
        h = (h ^ (h >> 31)) * 0x94D049BB133111EB & _MASK
        h ^= h >> 29
    return h >> 1


def stream_state(seed: int, index: int, device=None) -> Tensor:
    """Initial ``[seed, draws]`` of the stream of site ``index`` of a wrap seeded ``seed``."""
    return torch.tensor([mix(seed, index), 0], dtype=torch.int64, device=device)


def next_seed(site, salt: int = 0) -> int:
    """Advance ``site``'s stream by one draw and return that draw's seed.  ``salt`` (e.g. the
    data-parallel rank, for noise on a rank's own data shard) varies the seed without changing
    the stream's state."""
    buf = site.buffer(BUFFER)
    cache = site.rng_cache
    if cache is None or cache[0] is not buf or cache[1] != buf._version:
        seed, draws = (int(v) for v in buf.tolist())  # a host read only after outside changes
        count = buf[1]
    else:
        _, _, seed, draws, count = cache
    with torch.no_grad():
        count.fill_(draws + 1)  # the buffer is always current: state_dict(), .to() need no hook
    site.rng_cache = (buf, buf._version, seed, draws + 1, count)
    return mix(seed, draws, salt) if salt else mix(seed, draws)


def generator(site, device: torch.device | str = "cpu", salt: int = 0) -> torch.Generator:
    """A generator on ``device`` for the next draw of ``site``'s stream (see :func:`next_seed`)."""
    return torch.Generator(device=device).manual_seed(next_seed(site, salt))


def _i64(c: int) -> int:
    """A 64-bit constant as the signed int64 torch stores."""
    return c - (1 << 64) if c >= 1 << 63 else c


_GOLDEN, _DRAW = _i64(0x9E3779B97F4A7C15), _i64(0xD1B54A32D192ED03)
_M1, _M2 = _i64(0xBF58476D1CE4E5B9), _i64(0x94D049BB133111EB)


def _shr(x: Tensor, k: int) -> Tensor:
    """Logical right shift of int64 (torch's ``>>`` is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def _counter_bits(state: Tensor, n: int) -> Tensor:
    i = torch.arange(n, device=state.device, dtype=torch.int64)
    z = state[0] * _GOLDEN + state[1] * _DRAW + i * _GOLDEN
    z = (z ^ _shr(z, 30)) * _M1
    z = (z ^ _shr(z, 27)) * _M2
    z = z ^ _shr(z, 31)
    return (_shr(z, 40).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


@torch.library.custom_op("localopt::counter_uniform", mutates_args=("state",))
def _counter_uniform(state: Tensor, n: int) -> Tensor:
    if state.device.type == "cpu":   # reading the state costs nothing here: torch's generator
        seed, draws = state.tolist()
        u = torch.rand(n, generator=torch.Generator().manual_seed(mix(seed, draws)))
    else:                            # no host read on an accelerator: a counter-based hash
        u = _counter_bits(state, n)
    state[1:].add_(1)
    return u


@_counter_uniform.register_fake
def _(state: Tensor, n: int) -> Tensor:
    return state.new_empty((n,), dtype=torch.float32)


def counter_uniform(site, shape: tuple[int, ...], device: torch.device) -> Tensor:
    """Uniform numbers in ``(0, 1)`` (float32, ``shape``) for the next
    draw of ``site``'s stream, with the stream advanced in place (``draws += 1``) -- one
    operator (``torch.ops.localopt.counter_uniform``) that ``torch.compile`` keeps in its graph
    (no break, and never recomputed from the advanced state in the backward), and that never
    reads the buffer on the host.

    Draw ``k`` of a stream with seed ``s``: on the CPU, ``torch.rand`` from a generator seeded
    ``mix(s, k)`` (as :func:`generator`); on an accelerator, without reading the state on the
    host, a counter-based draw (as Philox, Salmon et al. 2011): element ``i`` is
    ``splitmix64(s * phi + k * c + i * phi)`` (Steele, Lea & Flood 2014's finaliser, wrapping
    int64 arithmetic), its top 24 bits mapped to ``(j + 0.5) / 2**24``.  Deterministic per
    device type, eager and compiled alike."""
    buf = site.buffer(BUFFER)
    n = 1
    for d in shape:
        n *= d
    return _counter_uniform(buf, n).to(device).view(shape)


@contextlib.contextmanager
def private_global_rng(device: torch.device, seed: int | None = None) -> Iterator[None]:
    """Run code that draws from torch's *global* RNG (``nn.Dropout`` in a replayed block)
    without touching the global stream: its state on the CPU and on ``device`` is saved,
    re-seeded with ``seed`` (``None``: left as it is), and restored afterwards."""
    devices = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        if seed is not None:
            torch.random.default_generator.manual_seed(seed)
            for d in devices:
                torch.cuda.default_generators[d].manual_seed(seed)
        yield


@contextlib.contextmanager
def preserved_streams(sites) -> Iterator[None]:
    """Leave the streams of ``sites`` as they were (for code that inspects a rule without
    training it, e.g. :mod:`localopt.diagnostics`): what runs inside sees the draws the next
    training step will see."""
    saved = [(s.buffer(BUFFER), s.buffer(BUFFER).clone()) for s in sites if s.has_buffer(BUFFER)]
    try:
        yield
    finally:
        with torch.no_grad():
            for buf, copy in saved:
                buf.copy_(copy)
