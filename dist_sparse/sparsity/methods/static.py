"""Static sparsity: a random or magnitude mask drawn once at the target density, never changed."""

from dist_sparse.sparsity.methods.base import Method


class Static(Method):
    name = "static"
    changes_masks = False

    def is_update_step(self, step: int) -> bool:
        return False
