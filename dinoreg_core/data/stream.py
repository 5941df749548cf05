"""Streamed phantom subjects for pretraining: new anatomy all the time, from a rolling pool.

Generating one phantom subject (tissue map only, 3 mm, 128x104x112) takes about 4 s on one core, far longer than
one training sample may take, so subjects are reused a little, on a fixed schedule:

* the stream's subjects are numbered k = 0, 1, 2, ... with phantom seeds ``subject_seed(stream_seed, k + 1)``;
* global sample indices are cut into blocks of ``pool_size`` samples; block e may use the ``pool_size`` subjects
  ``e*r .. e*r + pool_size - 1`` with ``r = max(1, pool_size // new_every)`` new subjects per block, and takes
  them in a random order drawn from (seed, e): **within a block no subject appears twice**, each subject is used
  in ``pool_size / r`` consecutive blocks (about ``new_every`` samples) and then never again.

Which subject sample i shows is therefore a pure function of (seed, i) (:meth:`SubjectSchedule.subject`); the
:class:`SubjectPool` only decides *when* a tissue map is computed: it generates the subjects the current and the
next block need in background threads and forgets those no later block needs. A resumed run sees exactly the
subjects an uninterrupted one would.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import DinoregError


def _mix(*values: int) -> int:
    """A well-mixed 63-bit seed from integers."""
    return int(np.random.SeedSequence([int(v) for v in values]).generate_state(2, np.uint64)[0] >> np.uint64(1))


@dataclass
class SubjectSchedule:
    """Which stream subject each global sample index uses (module docstring)."""

    seed: int
    pool_size: int = 32
    new_every: int = 16

    def __post_init__(self):
        if int(self.pool_size) < 1 or int(self.new_every) < 1:
            raise DinoregError(f"stream.pool_size={self.pool_size} and stream.new_every={self.new_every} must be "
                               f"at least 1.")
        self._cache: tuple[int, torch.Tensor] | None = None

    @property
    def per_block(self) -> int:
        """New subjects per block of ``pool_size`` samples."""
        return max(1, int(self.pool_size) // int(self.new_every))

    def window(self, block: int) -> range:
        """The subjects block ``block`` may use."""
        start = int(block) * self.per_block
        return range(start, start + int(self.pool_size))

    def subject(self, i: int) -> int:
        """The stream subject of global sample ``i``."""
        P = int(self.pool_size)
        e = int(i) // P
        if self._cache is None or self._cache[0] != e:
            g = torch.Generator().manual_seed(_mix(self.seed, e, 3))
            self._cache = (e, torch.randperm(P, generator=g))
        return self.window(e).start + int(self._cache[1][int(i) % P])


def stream_subject_seed(stream_seed: int, k: int) -> int:
    """Phantom seed of stream subject ``k`` (0-based): the phantom's own ``subject_seed`` of case k+1."""
    from .phantom import subject_seed

    return subject_seed(int(stream_seed), int(k) + 1)


def generate_tissue(seed: int, phantom_cfg) -> torch.Tensor:
    """(D,H,W) uint8 tissue map of the phantom subject with seed ``seed`` (CT pose; no images rendered)."""
    from .phantom import generate_subject

    return torch.from_numpy(generate_subject(seed, phantom_cfg, with_mr=False, images=False)["tissue"])


def generate_shapes(seed: int, shape=(64, 64, 64), n_shapes: int = 24, n_classes: int = 32) -> torch.Tensor:
    """(D,H,W) uint8 label ensemble (anatomix-like, no anatomy): a body ellipsoid (id 1) holding ``n_shapes``
    random ellipsoids with random ids 2..n_classes-1 painted in order, on background 0. Milliseconds per map, so
    it also serves as the fast source of tests."""
    g = torch.Generator().manual_seed(int(seed) % 2 ** 63)
    D, H, W = (int(v) for v in shape)
    z, y, x = torch.meshgrid(torch.arange(D), torch.arange(H), torch.arange(W), indexing="ij")
    pts = torch.stack([z, y, x], -1).float()                               # (D,H,W,3)
    size = torch.tensor([D, H, W], dtype=torch.float32)
    lab = torch.zeros(D, H, W, dtype=torch.uint8)
    lab[(((pts - size / 2) / (0.47 * size)) ** 2).sum(-1) < 1] = 1
    for _ in range(int(n_shapes)):
        c = size * (0.15 + 0.7 * torch.rand(3, generator=g))
        r = size * (0.04 + 0.16 * torch.rand(3, generator=g))
        q, _ = torch.linalg.qr(torch.randn(3, 3, generator=g))                # random rotation
        d = (pts - c) @ q
        k = int(torch.randint(2, max(3, int(n_classes)), (), generator=g))
        lab[((d / r) ** 2).sum(-1) < 1] = k
    return lab


def make_subject(source: str, seed: int, phantom_cfg) -> torch.Tensor:
    """Tissue map of one stream subject: ``"phantom"`` (:func:`generate_tissue`) or ``"shapes"``
    (:func:`generate_shapes` on the phantom config's grid)."""
    if source == "phantom":
        return generate_tissue(seed, phantom_cfg)
    if source == "shapes":
        return generate_shapes(seed, tuple(phantom_cfg.shape))
    raise DinoregError(f"stream.source='{source}' is not known; use 'phantom' or 'shapes'.")


class SubjectPool:
    """Tissue maps of stream subjects, generated ahead in background threads (see the module docstring).

    ``get(i)`` returns (k, tissue) for global sample ``i``; it blocks only when the map is not ready yet.
    """

    def __init__(self, schedule: SubjectSchedule, phantom_cfg, *, threads: int = 1, prefetch_blocks: int = 1,
                 source: str = "phantom"):
        self.schedule = schedule
        self.source = source
        self.phantom_cfg = phantom_cfg
        self.threads = max(1, int(threads))
        self.prefetch_blocks = max(0, int(prefetch_blocks))
        self._maps: OrderedDict[int, Future] = OrderedDict()
        self._pool: ThreadPoolExecutor | None = None
        self._pid = None
        self._lock = threading.Lock()

    def _executor(self) -> ThreadPoolExecutor:
        import os

        if self._pool is None or self._pid != os.getpid():             # a forked DataLoader worker: own threads
            self._pool, self._pid, self._maps = ThreadPoolExecutor(self.threads), os.getpid(), OrderedDict()
        return self._pool

    def _want(self, block: int) -> None:
        ex = self._executor()
        s = self.schedule
        lo = s.window(block).start
        hi = s.window(block + self.prefetch_blocks).stop
        with self._lock:
            for k in [k for k in self._maps if k < lo]:                    # no later block uses these
                del self._maps[k]
            for k in range(lo, hi):
                if k not in self._maps:
                    seed = stream_subject_seed(s.seed, k)
                    self._maps[k] = ex.submit(make_subject, self.source, seed, self.phantom_cfg)

    def get(self, i: int) -> tuple[int, torch.Tensor]:
        k = self.schedule.subject(i)
        self._want(int(i) // int(self.schedule.pool_size))
        return k, self._maps[k].result()

    def __getstate__(self):                                                 # picklable for DataLoader workers
        d = self.__dict__.copy()
        d.update(_pool=None, _pid=None, _maps=OrderedDict(), _lock=None)
        return d

    def __setstate__(self, d):
        self.__dict__.update(d)
        self._lock = threading.Lock()
