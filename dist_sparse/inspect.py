"""``dist-sparse inspect RUN_OR_CHECKPOINT``: per-layer masks and method state of a checkpoint.

Reads the per-rank sparsity files a checkpoint holds and puts the ranks' parts of every weight
together: under ZeRO-1/2 data-parallel ranks hold copies (read once per tensor-parallel shard),
under ZeRO-3 each rank holds a slice. Works on any machine; no process group needed.
"""

from __future__ import annotations

import json
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
    for latest in (path / "checkpoints" / "latest", path / "latest"):
        if latest.is_file():
            tag = latest.read_text().strip()
            if not tag:
                raise ValueError(f"{latest} is empty; pass a checkpoint tag directory instead")
            raise ValueError(f"{latest} names the checkpoint {tag!r}, which is not in {latest.parent} "
                             "(deleted or moved?); pass a checkpoint tag directory instead")
    if (path / "run.json").is_file() or (path / "checkpoints").is_dir():
        raise ValueError(f"{path} has no checkpoint yet: the run has not saved one (see --save-interval); "
                         "inspect it after its first save")
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
    from dist_sparse.train.loop import read_structure

    structure = read_structure(tag_dir)
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
    tag_dir = resolve_checkpoint(args.path)
    structure = format_structure(tag_dir)
    info = collect(tag_dir)
    if structure is None or info:
        print(format_report(tag_dir, info))
    if structure is not None:
        print(structure if not info else "\n" + structure)
    return 0
