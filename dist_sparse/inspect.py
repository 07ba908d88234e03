"""``dist-sparse inspect RUN_OR_CHECKPOINT``: per-layer masks and method state of a checkpoint.

Formats what the offline checkpoint reader (:mod:`dist_sparse.train.checkpoint`, shared with
export) finds: the masks put together from the ranks' sparsity files, structure.json, and a
DynaBERT run's dynabert.json (the sub-networks it trained, as ``export --width/--depth`` cuts them).
Works on any machine; no process group needed.
"""

from __future__ import annotations

import json
from pathlib import Path

# The offline reader, which does not import DeepSpeed (that would print its accelerator warning
# before any error inspect reports).
from dist_sparse.train.checkpoint import DamagedFile, locate, read_structure, sparsity_summary


def resolve_checkpoint(path: str | Path, tag: str | None = None) -> Path:
    """A run directory, its checkpoints/ directory, or one checkpoint tag directory (``tag``: another
    checkpoint than the one ``latest`` names). The same rules and messages as export's."""
    return locate(path, tag)


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
    structure = read_structure(tag_dir)
    if structure is None or structure.structured is None:
        return None
    st = structure.structured
    config = DistSparseBertConfig.from_dict(structure.model_config)
    full = DistSparseBertConfig.from_dict({**structure.model_config, "layer_num_heads": None,
                                           "layer_intermediate_sizes": None})
    seq = _seq_len(tag_dir)
    lines = [f"structured pruning ({st.method}): phase {st.phase}"]
    if st.searching:
        lines.append(f"searching; last distances between keep-sets {[round(d, 4) for d in st.distances]}")
    else:
        lines.append(f"ticket drawn at step {st.ticket_step}" + (" (forced by max_search_steps)" if st.forced else ""))
    lines.append(f"{'layer':>5}  {'heads':>9}  {'FFN width':>11}")
    for i in range(config.num_hidden_layers):
        lines.append(f"{i:>5}  {config.heads_of(i):>4} / {full.heads_of(i):<3}  "
                     f"{config.intermediate_of(i):>5} / {full.intermediate_of(i):<5}")
    before = dense_flops_per_token(full, seq, training=True)
    after = dense_flops_per_token(config, seq, training=True)
    lines.append(f"training FLOPs per token at seq {seq}: {before / 1e6:.2f} M unpruned, {after / 1e6:.2f} M now "
                 f"(x{after / before:.3f})")
    return "\n".join(lines)


def format_dynabert(tag_dir: Path) -> str | None:
    """The sub-networks a DynaBERT run trained, the full model first: width, depth, kept layers,
    heads and FFN neurons per kept layer, parameters and training FLOPs per token at the run's
    sequence length (None for a checkpoint of another run)."""
    from dist_sparse.export.subnetwork import Subnetwork, parameter_count, read_record, trained
    from dist_sparse.model.config import DistSparseBertConfig
    from dist_sparse.model.presets import dense_flops_per_token

    structure = read_structure(tag_dir)
    record = read_record(tag_dir)
    config = None if structure is None else DistSparseBertConfig.from_dict(structure.model_config)
    rewired = config is not None and config.unit_order_tp is not None
    if record is None:
        return (f"model rewired by DynaBERT (unit_order_tp {config.unit_order_tp}), but this run did not train with a "
                "\"dynabert\" section: no sub-networks of its own") if rewired else None
    if not rewired:
        return f"{tag_dir / 'dynabert.json'} names sub-networks, but the model config has no unit_order_tp: damaged?"
    seq = _seq_len(tag_dir)
    full_flops = dense_flops_per_token(config, seq, training=True)
    rows = []
    for w, d in trained(record):
        sub = Subnetwork(config, w, d)
        heads, neurons = sub.counts
        cfg = sub.config()
        flops = dense_flops_per_token(cfg, seq, training=True)
        rows.append((sub.name + (" (full)" if (w, d) == (1.0, 1.0) else ""), f"{w:g}", f"{d:g}",
                     ",".join(map(str, sub.layers)), f"{heads} / {config.num_attention_heads}",
                     f"{neurons} / {config.intermediate_size}", f"{parameter_count(cfg):,}",
                     f"{flops / 1e6:.2f} M (x{flops / full_flops:.3f})"))
    header = ("sub-network", "width", "depth", "layers", "heads", "FFN neurons", "parameters",
              f"train FLOPs/token (seq {seq})")
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    left = {0, 3}  # names and layer lists read left to right, numbers right-aligned
    c = record["config"]
    lines = [f"DynaBERT phase {record.get('phase')}: sub-networks of width_mult {c['width_mult']} x depth_mult "
             f"{c['depth_mult']}, units ordered for TP degree {config.unit_order_tp}"]
    lines += ["  ".join(v.ljust(n) if i in left else v.rjust(n) for i, (v, n) in enumerate(zip(r, widths))).rstrip()
              for r in (header, *rows)]
    lines.append("heads and FFN neurons per kept layer; export one with dist-sparse export RUN OUT --width W --depth D")
    return "\n".join(lines)


def run_inspect(args) -> int:
    tag_dir = resolve_checkpoint(args.path, getattr(args, "tag", None))
    try:
        structure = format_structure(tag_dir)
        info = sparsity_summary(tag_dir)
    except DamagedFile as err:
        raise ValueError(f"{err}; inspect another checkpoint with --tag") from None
    dynabert = format_dynabert(tag_dir)
    if structure is None or info:
        print(format_report(tag_dir, info))
    if structure is not None:
        print(structure if not info else "\n" + structure)
    if dynabert is not None:
        print("\n" + dynabert)
    return 0
