"""``dist-sparse inspect RUN_OR_CHECKPOINT``: per-layer masks and method state of a checkpoint.

Reads the per-rank sparsity files a checkpoint holds and puts the ranks' parts of every weight
together: under ZeRO-1/2 data-parallel ranks hold copies (read once per tensor-parallel shard),
under ZeRO-3 each rank holds a slice. Works on any machine; no process group needed.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# Not dist_sparse.train.loop (where these names come from): importing it imports DeepSpeed, which
# prints its accelerator warning before any error inspect reports.
from dist_sparse.export.checkpoint import SPARSITY_FILE_PREFIX, STRUCTURE_FILE, locate
from dist_sparse.masks.checksum import unpack_mask
from dist_sparse.train.run_dir import damaged


def resolve_checkpoint(path: str | Path, tag: str | None = None) -> Path:
    """A run directory, its checkpoints/ directory, or one checkpoint tag directory (``tag``: another
    checkpoint than the one ``latest`` names). The same rules and messages as export's."""
    return locate(path, tag)


def _load(path: Path) -> dict:
    """A per-rank sparsity file, or a one-line error naming it (a truncated copy, a full disk)."""
    why = damaged(path)
    if why is not None:
        raise ValueError(f"{path} is damaged (not a complete torch file: {why}; truncated?); inspect another "
                         "checkpoint with --tag")
    return torch.load(path, weights_only=False)


def collect(tag_dir: Path) -> dict:
    files = sorted(tag_dir.glob(f"{SPARSITY_FILE_PREFIX}*.pt"))
    if not files:
        return {}
    states = [_load(f) for f in files]
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
        st = _load(f)
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


def _seq_len(tag_dir: Path) -> int:
    run_json = tag_dir.parent.parent / "run.json"
    if run_json.exists():
        return int(json.loads(run_json.read_text())["data_meta"]["seq_len"])
    return 128


def format_structure(tag_dir: Path) -> str | None:
    """Kept heads and FFN widths per layer and the training FLOPs before/after the shrink, for a
    checkpoint of a structured-pruning run (None for other checkpoints)."""
    from dist_sparse.model.config import DistSparseBertConfig
    from dist_sparse.model.presets import dense_flops_per_token
    path = tag_dir / STRUCTURE_FILE
    structure = json.loads(path.read_text()) if path.exists() else None
    if structure is None or structure.get("structured") is None:
        return None
    st = structure["structured"]
    config = DistSparseBertConfig.from_dict(structure["model_config"])
    full = DistSparseBertConfig.from_dict({**structure["model_config"], "layer_num_heads": None,
                                           "layer_intermediate_sizes": None})
    seq = _seq_len(tag_dir)
    lines = [f"structured pruning ({st.get('config', {}).get('method', 'earlybert')}): phase {st['phase']}"]
    det = st["detector"]
    if st["phase"] == "search":
        lines.append(f"searching; last distances between keep-sets {[round(d, 4) for d in det['distances']]}")
    else:
        lines.append(f"ticket drawn at step {st['ticket_step']}" + (" (forced by max_search_steps)" if st["forced"] else ""))
    lines.append(f"{'layer':>5}  {'heads':>9}  {'FFN width':>11}")
    for i in range(config.num_hidden_layers):
        lines.append(f"{i:>5}  {config.heads_of(i):>4} / {full.heads_of(i):<3}  "
                     f"{config.intermediate_of(i):>5} / {full.intermediate_of(i):<5}")
    before = dense_flops_per_token(full, seq, training=True)
    after = dense_flops_per_token(config, seq, training=True)
    lines.append(f"training FLOPs per token at seq {seq}: {before / 1e6:.2f} M unpruned, {after / 1e6:.2f} M now "
                 f"(x{after / before:.3f})")
    return "\n".join(lines)


def run_inspect(args) -> int:
    tag_dir = resolve_checkpoint(args.path, getattr(args, "tag", None))
    structure = format_structure(tag_dir)
    info = collect(tag_dir)
    if structure is None or info:
        print(format_report(tag_dir, info))
    if structure is not None:
        print(structure if not info else "\n" + structure)
    return 0
