"""Dynamic sparse training, in parts with one job each (the stateful part is ``dist_sparse.sparsifier``):

- ``targets``: which weights are sparse and how each is laid out over the ranks;
- ``layout``: where masks live and where decisions are made (ZeRO-1/2 whole shards, ZeRO-3 slices);
- ``patterns``: unstructured / block / N:M: checks, counts, selection;
- ``methods``: static / GMP / SET / RigL as score rules, one module each;
- ``update``: the one mask-update routine the methods share;
- ``select``: top-k over pieces spread across ranks, by exchanging counts only;
- ``fake``: all of it in one process, on plain tensors, for unit tests.
"""
