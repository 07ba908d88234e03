"""Export round trips from real multi-process checkpoints: tensor parallel, structured, sparse.

* DP1 x TP2 and DP2 x TP2, ZeRO 1/2/3, at step 0 of a model whose whole weights are known: the
  consolidation must give them back bit for bit (a wrong merge order cannot hide behind a
  self-consistent verification).
* DP2 x TP2 ZeRO-2 EarlyBERT run (shared with test_structured.py): a pre-shrink (search,
  coefficients) and a post-shrink (small model) checkpoint, exported dense and compact.
* DP1 x TP2 ZeRO-3 RigL run: exact zeros where the masks (put together by `inspect` from its own
  shard records) say so.

Each launch is reused for many assertions. The existing DP-only ZeRO 1/2/3 round trips are in
test_pretrain.py / test_sparse_pretrain.py (export_checks.py).
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dslaunch import ROOT, launch, run_script

pytestmark = pytest.mark.distributed

PRETRAIN = ROOT / "launchers" / "pretrain.py"
# Largest |logit difference| between two exports of one checkpoint (both fp32, both within
# TOLERANCE of the trained model; measured ~5e-7 on these models).
FP32_TOL = 1e-5
TEXT = ["The people of the United States have spoken in this election.",
        "We will lay and collect taxes, and [MASK] the common defence."]
PRETRAINING_ONLY = {"bert.pooler.dense.weight", "bert.pooler.dense.bias", "cls.seq_relationship.weight",
                    "cls.seq_relationship.bias"}


def ds_config(tmp_path: Path, base: str, name: str, **sections) -> Path:
    cfg = json.loads((ROOT / "ds_configs" / base).read_text())
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    path = tmp_path / name
    path.write_text(json.dumps(cfg))
    return path


def pretrain(cfg: Path, data: Path, run: Path, model: str, *extra, nproc: int):
    return launch([PRETRAIN, "--deepspeed_config", cfg, "--data", data, "--model", model, "--output", run,
                   "--no-progress", *extra], nproc=nproc)


def cli_export(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dist_sparse.cli", "export", *map(str, args)],
                          capture_output=True, text=True)


def load(folder: Path, fmt: str):
    """Both models and the tokenizer of an export, loaded as a user would; keys checked exactly."""
    from transformers import AutoModelForMaskedLM, AutoModelForPreTraining, AutoTokenizer, BertForPreTraining

    remote = {"trust_remote_code": True} if fmt == "compact" else {}
    cls = AutoModelForPreTraining if fmt == "compact" else BertForPreTraining
    pre, info = cls.from_pretrained(folder, output_loading_info=True, **remote)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    mlm, info = AutoModelForMaskedLM.from_pretrained(folder, output_loading_info=True, **remote)
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    # stock BertForMaskedLM has no place for the pooler / NSP head of a pre-training folder;
    # our masked-LM class declares them ignorable
    assert set(info["unexpected_keys"]) == (PRETRAINING_ONLY if fmt == "dense" else set())
    assert type(pre).__name__ == ("DistSparseBertForPreTraining" if fmt == "compact" else "BertForPreTraining")
    return pre.eval(), mlm.eval(), AutoTokenizer.from_pretrained(folder)


def logits(folder: Path, fmt: str, data: Path) -> torch.Tensor:
    from transformers import AutoTokenizer

    pre, mlm, tok = load(folder, fmt)
    ref_tok = AutoTokenizer.from_pretrained(data / "tokenizer")
    for text in TEXT:
        assert tok(text)["input_ids"] == ref_tok(text)["input_ids"]
    batch = tok(TEXT, padding=True, return_tensors="pt")
    with torch.no_grad():
        a, b = pre(**batch).prediction_logits, mlm(**batch).logits
    assert torch.equal(a, b)  # one folder, one function, whichever class loads it
    return a[batch["attention_mask"].bool()]


def safetensors_bytes(folder: Path) -> int:
    return (folder / "model.safetensors").stat().st_size


@pytest.mark.parametrize("dp", [1, 2])
def test_tp2_zero_stages_consolidate_bit_exactly(dp, tmp_path):
    from dist_sparse.export.checkpoint import consolidate
    from dist_sparse.train.checkpoint import locate, read_info
    from dist_sparse.model import DistSparseBertConfig

    out = tmp_path / "layout"
    run_script("export_tp_layout.py", out, 2, 1, 2, 3, nproc=2 * dp)
    truth = torch.load(out / "truth.pt")
    for stage in (1, 2, 3):
        info = read_info(locate(out / f"zero{stage}"))
        assert (info.zero_stage, info.dp_size, info.tp_size) == (stage, dp, 2)
        how: dict = {}
        weights = consolidate(info, DistSparseBertConfig.from_dict(info.model_config), provenance=how)
        assert set(weights) == set(truth) - {"cls.predictions.decoder.weight", "cls.predictions.decoder.bias"}
        for name, value in weights.items():
            assert torch.equal(value, truth[name]), f"ZeRO-{stage}: {name}"
        # the split weights were merged by DeepSpeed's recorded layout, the coefficients by ours
        assert how["bert.encoder.layer.1.attention.self.query.weight"] == "deepspeed"
        assert how["bert.encoder.layer.1.output.dense.weight"] == "deepspeed"
        assert {v for k, v in how.items() if k.endswith("slimming_coef")} == {"coefficient"}
        assert "shape" not in how.values()


def test_structured_dp2_tp2_pre_and_post_shrink(earlybert_tp2_run, data_dir, tmp_path):
    """The DP2 x TP2 ZeRO-2 EarlyBERT run shared with test_structured.py (conftest.py):
    global_step4 mid-search, global_step24 (latest) shrunk."""
    from dist_sparse.export.hf import export

    run = earlybert_tp2_run
    ckpt = run / "checkpoints"
    search = json.loads((ckpt / "global_step4" / "structure.json").read_text())["structured"]
    shrunk = json.loads((ckpt / "global_step24" / "structure.json").read_text())
    assert search["phase"] == "search" and shrunk["structured"]["phase"] == "shrunk"
    ticket = shrunk["structured"]["ticket"]

    # pre-shrink: coefficients folded, stock BERT, same function (the CLI, with --tag)
    pre_dense = tmp_path / "pre-dense"
    proc = cli_export(run, pre_dense, "--tag", "global_step4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "verified: plain transformers reproduces" in proc.stdout
    pre_logits = logits(pre_dense, "dense", data_dir)
    pre_compact = tmp_path / "pre-compact"
    export(run, pre_compact, fmt="compact", tag="global_step4")
    assert (pre_logits - logits(pre_compact, "compact", data_dir)).abs().max() < FP32_TOL
    report = json.loads((pre_dense / "sparsity.json").read_text())
    assert report["structured"]["phase"] == "search"
    assert [e["heads"] for e in report["layers"].values()] == [4, 4, 4, 4]

    # post-shrink (latest): dense is padded back, compact is physically smaller, same outputs
    dense, compact = tmp_path / "dense", tmp_path / "compact"
    proc = cli_export(run, dense)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = cli_export(run, compact, "--format", "compact")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (logits(dense, "dense", data_dir) - logits(compact, "compact", data_dir)).abs().max() < FP32_TOL
    assert safetensors_bytes(compact) < 0.75 * safetensors_bytes(dense)
    config = json.loads((compact / "config.json").read_text())
    assert config["layer_num_heads"] == [len(h) for h in ticket["heads"]] == [2, 2, 2, 2]
    assert config["layer_intermediate_sizes"] == [len(n) for n in ticket["neurons"]]
    assert config["auto_map"]["AutoModelForMaskedLM"] == "modeling_dist_sparse_bert.DistSparseBertForMaskedLM"
    from transformers import pipeline
    fill = pipeline("fill-mask", model=str(compact), trust_remote_code=True)
    assert len(fill("The people of the [MASK] States.")) == 5
    for folder in (dense, compact):
        report = json.loads((folder / "sparsity.json").read_text())
        assert [e["kept_heads"] for e in report["layers"].values()] == ticket["heads"]
        assert [e["kept_ffn_neurons"] for e in report["layers"].values()] == ticket["neurons"]
        assert report["checkpoint"] == {"tag": "global_step24", "step": 24, "zero_stage": 2, "dp_size": 2,
                                        "tp_size": 2}
    card = (dense / "README.md").read_text()
    assert "| layer.0 | 2 of 4 (" in card and "608 of 1024" in card
    # removed heads are zero rows / columns at their original indices in the stock model
    from transformers import BertForPreTraining
    model = BertForPreTraining.from_pretrained(dense)
    for i, heads in enumerate(ticket["heads"]):
        q = model.bert.encoder.layer[i].attention.self.query.weight.view(4, 64, 256)
        out = model.bert.encoder.layer[i].attention.output.dense.weight.view(256, 4, 64)
        for h in range(4):
            assert bool(torch.all(q[h] == 0)) == (h not in heads), (i, h)
            assert bool(torch.all(out[:, h] == 0)) == (h not in heads), (i, h)
        w = model.bert.encoder.layer[i].intermediate.dense.weight
        assert sorted(torch.nonzero(w.abs().sum(1)).flatten().tolist()) == ticket["neurons"][i]

    # refusals leave nothing behind: an existing folder, a missing shard, a failed verification
    proc = cli_export(run, dense)
    assert proc.returncode == 2 and "--overwrite" in proc.stderr
    broken = tmp_path / "broken"
    shutil.copytree(run / "checkpoints" / "global_step24", broken / "global_step24")
    (broken / "global_step24" / "zero_pp_rank_1_mp_rank_01_optim_states.pt").unlink()
    proc = cli_export(broken / "global_step24", tmp_path / "never", "--tokenizer", data_dir / "tokenizer")
    assert proc.returncode == 2
    assert "is incomplete: 1 of the 6 shard files of a ZeRO-2 DP 2 x TP 2 checkpoint are missing " \
           "(zero_pp_rank_1_mp_rank_01_optim_states.pt)" in proc.stderr
    with pytest.raises(ValueError, match="differs from the trained one"):
        export(run, tmp_path / "never", tolerance=-1.0)  # every export fails this one, after writing
    with pytest.raises(ValueError, match="differs from the trained one"):
        export(run, dense, overwrite=True, tolerance=-1.0)
    assert not (tmp_path / "never").exists()
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name] == []
    assert json.loads((dense / "sparsity.json").read_text())["checkpoint"]["tag"] == "global_step24"  # untouched
    # --overwrite replaces a previous export in place
    proc = cli_export(run, dense, "--tag", "global_step4", "--overwrite")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((dense / "sparsity.json").read_text())["checkpoint"]["tag"] == "global_step4"


def test_rigl_dp1_tp2_zero3_exact_zeros(data_dir, tmp_path):
    from transformers import pipeline

    from dist_sparse.export.hf import export
    from dist_sparse.inspect import resolve_checkpoint
    from dist_sparse.train.checkpoint import logical_masks

    cfg = ds_config(tmp_path, "cpu_tp2_zero2.json", "rigl.json",
                    zero_optimization={"stage": 3, "stage3_param_persistence_threshold": 0,
                                       "stage3_prefetch_bucket_size": 0},
                    sparsity={"method": "rigl", "sparsity": 0.8, "update_interval": 2, "end_fraction": 1.0})
    # accumulation 2 (micro batch 4): RigL's dense-gradient step reads the reduced gradient once
    c = json.loads(cfg.read_text())
    c["train_micro_batch_size_per_gpu"], c["gradient_accumulation_steps"] = 4, 2
    cfg.write_text(json.dumps(c))
    run = tmp_path / "run"
    pretrain(cfg, data_dir, run, "bert-tiny", "--max-steps", 6, "--save-interval", 6, nproc=2)
    dense, compact = tmp_path / "dense", tmp_path / "compact"
    export(run, dense)
    export(run, compact, fmt="compact")
    assert (logits(dense, "dense", data_dir) - logits(compact, "compact", data_dir)).abs().max() < FP32_TOL

    masks = logical_masks(resolve_checkpoint(run))
    assert len(masks) == 12
    report = json.loads((dense / "sparsity.json").read_text())
    assert report["method"] == "rigl" and report["checkpoint"]["tp_size"] == 2
    for fmt, folder in (("dense", dense), ("compact", compact)):
        params = dict(load(folder, fmt)[0].named_parameters())
        for name, mask in masks.items():
            weight = params[name].detach()
            assert torch.all(weight[~mask] == 0), (fmt, name)   # pruned weights are exact zeros
            # RigL regrows at zero: a weight grown at the last update may still be 0
            assert int(mask.sum()) * 0.95 <= int((weight != 0).sum()) <= int(mask.sum()), (fmt, name)
            assert report["weights"][name]["active"] == int(mask.sum())
            if fmt == "dense":
                assert report["exported_nonzero"][name]["nonzero"] == int((weight != 0).sum())
    fill = pipeline("fill-mask", model=str(dense), tokenizer=str(dense))
    assert len(fill("The people of the [MASK] States.")) == 5
