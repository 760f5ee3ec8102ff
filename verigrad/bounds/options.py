"""Options of the bound engines, each default declared once (here). A light module: the spec
schema and the engine registry read these defaults without importing auto_LiRPA."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CrownOptions:
    """Options of the CROWN / alpha-CROWN engine (all defaults live here).

    alpha_iterations, alpha_lr, alpha_lr_decay: Adam steps on the relaxation parameters α
    (ReLU lower slopes, our relu'·g plane weights, sigmoid/tanh tangent points), learning rate
    and its per-step exponential decay.
    max_batch: samples of one class bounded by one auto_LiRPA call. auto_LiRPA bounds the
    intermediate neurons that are unstable for ANY sample of the call, so on conv nets larger
    chunks cost more than the single samples together (small MNIST CNN on 2 CPU cores:
    0.55 s per input one at a time, 1.7 s per input in chunks of 4); 1 is the fastest on CPU.

    output_chunk: the most specification rows one backward pass carries. The gradient graph has
    d = prod(input_shape) outputs; CROWN's final pass carries lower and upper A matrices of
    shape (rows, B, n) to EVERY node of the graph (auto_LiRPA 0.3 keeps all of them until the
    pass ends), so its memory is ≈ 2 · rows · B · Σ n · dtype bytes (Σ n: the sizes of all
    nodes; 3×32×32 CNN, d = 3072 rows, float64: 1.7 GB over the process's baseline). Bounding
    the d coordinates in chunks (a selection matrix C = I[r0:r1] per pass) divides that by the
    number of chunks. The intermediate bounds do not depend on C: the first chunk computes them
    and the others take them as fixed intermediate bounds, so each further chunk costs one final
    backward pass (and a forward pass). Each coordinate's bound is the same computation in any
    chunk (measured bit-identical; at most float round-off). The specifications on the g input of
    relu'(z)·g nodes (one row per unstable neuron, k rows) are split to the same row limit, and so
    are the conv ReLU pre-activations auto_LiRPA bounds itself (its batched CROWN, crown_batch_size;
    Linear pre-activations get an identity specification it never splits).
    alpha-CROWN initialises and optimises α per chunk with the same fixed intermediate bounds; α
    is per row already and keep-best is per coordinate, so only auto_LiRPA's early stop (no row of
    the call improved for more than 10 checked steps, checks at step 0 and in the second half) can
    differ — it cannot stop before the last step below 23 iterations — and a chunk that stops
    early has bounds at most as tight as unchunked, never unsound.
    None = auto: the most rows that fit in the memory budget; all d in one pass when they fit
    (exactly the unchunked path of before).
    memory_mb: the budget auto sizes chunks for, in MiB; None = a quarter of the memory available
    when the call starts, at most 512 MiB (free device memory on CUDA, MemAvailable from
    /proc/meminfo on CPU; 512 MiB where neither can be read). The estimate
    per row is 2 · B · Σ n · dtype bytes times a safety factor: 2 for CROWN (measured 1.1× the
    estimate), 6 for alpha-CROWN (measured 4.5×: its autograd graph keeps every pass's tensors).
    """

    alpha_iterations: int = 20
    alpha_lr: float = 0.1
    alpha_lr_decay: float = 0.98
    max_batch: int = 1
    output_chunk: int | None = None
    memory_mb: float | None = None

    def __post_init__(self) -> None:
        if self.alpha_iterations < 1:
            raise ValueError(f"alpha_iterations must be >= 1, got {self.alpha_iterations}")
        if not self.alpha_lr > 0:
            raise ValueError(f"alpha_lr must be > 0, got {self.alpha_lr}")
        if not 0 < self.alpha_lr_decay <= 1:
            raise ValueError(f"alpha_lr_decay must lie in (0, 1], got {self.alpha_lr_decay}")
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")
        chunk, mb = self.output_chunk, self.memory_mb
        if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
            raise ValueError(f"output_chunk must be None (auto) or an int >= 1, got {chunk!r}")
        if mb is not None and (isinstance(mb, bool) or not isinstance(mb, (int, float))
                               or not math.isfinite(mb) or not mb > 0):
            raise ValueError(f"memory_mb must be None (auto) or a finite number > 0, got {mb!r}")


def available_memory_bytes(device: torch.device | str) -> float | None:
    """Free memory on ``device`` now: torch.cuda.mem_get_info on CUDA, MemAvailable from
    /proc/meminfo on CPU; None where it cannot be read."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            free, _ = torch.cuda.mem_get_info(device)
            return float(free)
        except Exception:  # noqa: BLE001 - no driver / not initialised: fall back
            return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024.0  # kB
    except OSError:
        return None
    return None
