"""Kernel backends.

Every backend module offers the same four functions, taking validated,
C-contiguous, centred arrays ``X`` (N, D) and ``Y`` (M, D) of one dtype
(float32 or float64) and ``scale = 1 / (2 h^2)``:

``log_normalizer(X, Y, scale, exclude_self, block_size, num_threads, progress)``
    -> (M,) array of the input dtype.
``log_posterior(X, Y, scale, exclude_self, block_size, num_threads, progress)``
    -> (M, N) array of the input dtype.
``topk(X, Y, scale, k, exclude_self, block_size, num_threads, progress)``
    -> (indices int64 (M, k), log_prob (M, k), log_norm (M,)); rows sorted by
    decreasing log_prob, ties by increasing index.
``targets(X, scale, exclude_self, block_size, num_threads, progress)``
    -> float64 (W (N,), S1 (N, D), S2 (N,)) with W_i = sum_n q(i|n),
    S1_i = sum_n q(i|n) x_n and S2_i = sum_n q(i|n) ||x_n||^2 in the centred
    coordinates of ``X``.

``exclude_self`` is only ever True when ``Y is X``. ``block_size=0`` means the
backend's default; ``progress`` is ``None`` or a callable ``(done, total)``.
"""
