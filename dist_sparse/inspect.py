"""``dist-sparse inspect RUN_OR_CHECKPOINT``: per-layer masks and method state of a checkpoint.

Reads the per-rank sparsity files a checkpoint holds and puts the ranks' parts of every weight
together: under ZeRO-1/2 data-parallel ranks hold copies (read once per tensor-parallel shard),
under ZeRO-3 each rank holds a slice. Works on any machine; no process group needed.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dist_sparse.masks.checksum import unpack_mask
from dist_sparse.train import run_dir as rd
from dist_sparse.train.loop import SPARSITY_FILE_PREFIX


def resolve_checkpoint(path: str | Path) -> Path:
    """A run directory, its checkpoints/ directory, or one checkpoint tag directory."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path} does not exist")
    for ckpt_dir in (path / "checkpoints", path):
        tag = rd.latest_tag(ckpt_dir)
        if tag is not None:
            return ckpt_dir / tag
    if any(path.glob("*model_states.pt")):
        return path
    raise ValueError(f"{path} is neither a run directory, a checkpoints directory with 'latest', "
                     "nor a checkpoint directory")


def collect(tag_dir: Path) -> dict:
    files = sorted(tag_dir.glob(f"{SPARSITY_FILE_PREFIX}*.pt"))
    if not files:
        return {}
    states = [torch.load(f, weights_only=False) for f in files]
    first = states[0]
    layers: dict[str, dict] = {}
    for st in states:
        lay = st["layout"]
        partitioned = lay["zero_stage"] == 3
        if not partitioned and lay["dp_rank"] != 0:
            continue  # a data-parallel copy of masks already counted
        for name, (packed, shape) in st["masks"].items():
            info = lay["targets"][name]
            entry = layers.setdefault(name, {"full_shape": tuple(info["full_shape"]), "active": 0,
                                             "shard_shape": tuple(info["shard_shape"])})
            entry["active"] += int(unpack_mask(packed, tuple(shape)).sum())
    return {"config": first["config"], "step": first["step"], "max_steps": first["max_steps"],
            "history": first["history"], "layout": {k: v for k, v in first["layout"].items() if k != "targets"},
            "ranks": len(states), "layers": layers}


def logical_masks(tag_dir: Path) -> dict[str, torch.Tensor]:
    """The whole mask of every sparse weight, put together from the ranks' files."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(tag_dir.glob(f"{SPARSITY_FILE_PREFIX}*.pt")):
        st = torch.load(f, weights_only=False)
        lay = st["layout"]
        for name, (packed, shape) in st["masks"].items():
            info = lay["targets"][name]
            full = out.setdefault(name, torch.zeros(info["full_shape"], dtype=torch.bool))
            mask = unpack_mask(packed, tuple(shape))
            rows, cols = info["shard_shape"]
            shard = torch.zeros(rows * cols, dtype=torch.bool)
            if info["slice"] is not None:  # ZeRO-3: a flat slice of the shard
                shard[info["slice"][0]:info["slice"][1]] = mask
            else:
                shard[:] = mask.flatten()
            shard = shard.view(rows, cols)
            dim, off = info["shard_dim"], info["shard_offset"]
            target = full if dim is None else full.narrow(dim, off, (rows, cols)[dim])
            target |= shard
    return out


def format_report(tag_dir: Path, info: dict) -> str:
    if not info:
        return f"{tag_dir}: dense checkpoint (no sparsity masks)"
    cfg = info["config"]
    lay = info["layout"]
    lines = [f"checkpoint {tag_dir}",
             f"method {cfg['method']}  target sparsity {cfg['sparsity']}  pattern {cfg['pattern']}"
             + (f" (block {cfg['block_size']})" if cfg["pattern"] == "block" else "")
             + (f" ({cfg['n']}:{cfg['m']})" if cfg["pattern"] == "nm" else "")
             + f"  distribution {cfg['distribution']}",
             f"step {info['step']} of {info['max_steps']}  updates {len(info['history']) - 1}  "
             f"ZeRO-{lay['zero_stage']}  DP {lay['dp_size']} x TP {lay['tp_size']}  ({info['ranks']} rank files)"]
    if len(info["history"]) > 1:
        last = info["history"][-1]
        lines.append(f"last update at step {last['step']}: {last['changed']} weights changed, "
                     f"sync {last['sync_bytes']} B, apply {last['apply_bytes']} B")
    width = max(len(n) for n in info["layers"])
    lines.append(f"{'parameter':<{width}}  {'shape':>12}  {'active':>10}  {'density':>8}")
    total = active = 0
    for name in sorted(info["layers"]):
        e = info["layers"][name]
        numel = e["full_shape"][0] * e["full_shape"][1]
        total += numel
        active += e["active"]
        shape = "x".join(map(str, e["full_shape"]))
        lines.append(f"{name:<{width}}  {shape:>12}  {e['active']:>10}  {e['active'] / numel:>8.4f}")
    lines.append(f"{'all sparse weights':<{width}}  {total:>12}  {active:>10}  {active / total:>8.4f}")
    return "\n".join(lines)


def run_inspect(args) -> int:
    tag_dir = resolve_checkpoint(args.path)
    print(format_report(tag_dir, collect(tag_dir)))
    return 0
