"""The compact format's generated configuration/modeling files (dist_sparse.export.remote_code).

A folder written by ``save_compact`` from a model with per-layer sizes must load through the Auto
classes with ``trust_remote_code=True`` in a process that never imports dist_sparse, and give
the same logits as our model.
"""

import json
import subprocess
import sys

import pytest
import torch

from dist_sparse.export.remote_code import (AUTO_MAP, CONFIG_MODULE, MODELING_MODULE, _check_standalone,
                                            modeling_source, save_compact)
from dist_sparse.model import DistSparseBertConfig, DistSparseBertForPreTraining

LOAD = r"""
import json, sys, torch
from transformers import AutoConfig, AutoModelForMaskedLM, AutoModelForPreTraining
folder, ids = sys.argv[1], torch.tensor(json.loads(sys.argv[2]))
cfg = AutoConfig.from_pretrained(folder, trust_remote_code=True)
pre, pre_info = AutoModelForPreTraining.from_pretrained(folder, trust_remote_code=True, output_loading_info=True)
mlm, mlm_info = AutoModelForMaskedLM.from_pretrained(folder, trust_remote_code=True, output_loading_info=True)
with torch.no_grad():
    a = pre.eval()(input_ids=ids).prediction_logits
    b = mlm.eval()(input_ids=ids).logits
print(json.dumps({"heads": cfg.layer_num_heads, "ffn": cfg.layer_intermediate_sizes,
                  "classes": [type(cfg).__module__, type(pre).__name__, type(mlm).__name__],
                  "info": [sorted(map(str, i[k])) for i in (pre_info, mlm_info) for k in ("missing_keys", "unexpected_keys")],
                  "pre": a.tolist(), "mlm": b.tolist(),
                  "dist_sparse": sorted(m for m in sys.modules if m.split(".")[0] == "dist_sparse")}))
"""


def test_compact_folder_loads_standalone_with_the_same_function(tmp_path):
    cfg = DistSparseBertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=24, max_position_embeddings=16,
                               layer_num_heads=[1, 3], layer_intermediate_sizes=[8, 24])
    torch.manual_seed(0)
    model = DistSparseBertForPreTraining(cfg).eval()
    save_compact(model, tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["auto_map"] == AUTO_MAP and written["model_type"] == "dist_sparse_bert"
    assert {f"{CONFIG_MODULE}.py", f"{MODELING_MODULE}.py", "model.safetensors"} <= {p.name for p in tmp_path.iterdir()}

    ids = [[2, 7, 9, 11, 3, 5], [2, 30, 31, 4, 3, 0]]
    # a fresh interpreter with the working directory elsewhere: only the folder's code is there to find
    proc = subprocess.run([sys.executable, "-c", LOAD, str(tmp_path), json.dumps(ids)], capture_output=True,
                          text=True, cwd=tmp_path, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin",
                                                        "HF_MODULES_CACHE": str(tmp_path / "hf_modules")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["dist_sparse"] == []
    assert got["heads"] == [1, 3] and got["ffn"] == [8, 24]
    assert got["classes"][1:] == ["DistSparseBertForPreTraining", "DistSparseBertForMaskedLM"]
    assert got["classes"][0].endswith(CONFIG_MODULE)  # the folder's config class, not ours
    assert got["info"] == [[], [], [], []]  # no missing / unexpected keys for either model
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(ids)).prediction_logits
    assert torch.equal(torch.tensor(got["pre"]), ref)  # the same code on the same weights: bit for bit
    assert torch.equal(torch.tensor(got["mlm"]), ref)


def test_generated_code_is_checked_for_dist_sparse_imports():
    text = modeling_source()
    assert f"from .{CONFIG_MODULE} import DistSparseBertConfig" in text
    assert "class DistSparseBertForMaskedLM(" in text
    _check_standalone(text, "m.py", {CONFIG_MODULE})  # passes
    for bad in ("import dist_sparse.model\n", "from dist_sparse.structure import Ticket\n", "from .config import X\n",
                "def f():\n    from dist_sparse import x\n"):
        with pytest.raises(RuntimeError, match="cannot write standalone modeling code"):
            _check_standalone(text + bad, "m.py", {CONFIG_MODULE})
