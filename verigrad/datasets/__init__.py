"""Package data: small datasets shipped with verigrad (read them with :mod:`verigrad.data`).

- ``mnist_sample.npz``: 100 real MNIST test images (10 per class, labels interleaved
  0, 1, ..., 9, 0, ...), ``x`` float32 (100, 1, 28, 28) in [0, 1], ``y`` int64 (100,).
  Written by ``tools/train_examples.py --sample-only`` from the test split on which
  ``examples/models`` report their accuracy; none of these images was used in training.
"""
