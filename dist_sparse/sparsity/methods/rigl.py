"""RigL (Evci et al. 2020): drop by magnitude, regrow where the dense gradient is largest.

On update steps the gradient hooks let the dense gradient through ZeRO's reduction (so it is
averaged over data-parallel ranks and identical on all of them); the sparsifier reads |gradient|
of the pruned weights as the regrowth score and masks the gradient before the optimizer step.
Regrown weights start at zero, as in the paper. Everything else is SET's."""

from dist_sparse.sparsity.methods.set import Set


class RigL(Set):
    name = "rigl"
    dense_grad = True

    def grow_scores(self, decision):
        return decision.dense_gradients()
