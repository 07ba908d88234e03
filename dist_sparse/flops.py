"""Sparse-aware FLOP counting of a training step (pure functions).

A matrix multiply with a weight of ``n`` entries costs ``2 n`` FLOPs per token in the forward
pass; with density ``d`` only ``2 d n`` of them are needed. The backward pass costs two more such
products (gradients with respect to activations and to weights), so a step is 3x forward — except
on RigL's update steps, where the gradient of *every* weight (dense) is needed to score regrowth:
the weight-gradient product is then dense. Everything that is not a sparse weight (attention
scores, embeddings, the MLM head) is counted dense, as in ``dense_flops_per_token``.
"""

from __future__ import annotations

from typing import Iterable


def saved_forward_flops(sparse_weights: Iterable[tuple[int, float]]) -> float:
    """Forward FLOPs per token that pruned weights do not cost: sum of 2 n (1 - d)."""
    return sum(2.0 * numel * (1.0 - density) for numel, density in sparse_weights)


def training_flops_per_token(dense_forward: float, sparse_weights: Iterable[tuple[int, float]],
                             dense_gradient: bool = False) -> float:
    """FLOPs per token of one training step (forward + backward) counting only active weights.

    ``dense_forward``: forward FLOPs per token of the dense model. ``sparse_weights``: (numel,
    density) of every sparse weight. ``dense_gradient``: the step also computes the dense weight
    gradient (RigL's mask-update steps).
    """
    saved = saved_forward_flops(sparse_weights)
    forward = dense_forward - saved
    activation_grad = forward
    weight_grad = forward + saved if dense_gradient else forward
    return forward + activation_grad + weight_grad
