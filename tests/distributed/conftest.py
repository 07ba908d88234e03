"""Datasets and runs shared by the multi-process tests, made once per test session.

``make test`` runs two files at a time (pytest-xdist): a session fixture would be built once per
worker. ``once`` builds it in the folder the workers share, under a file lock: the first worker
builds, the other waits for it and reuses the result (the EarlyBERT run takes a minute on 4 ranks).
"""

import os
import shutil
from pathlib import Path

import pytest


def once(tmp_path_factory, name: str, build) -> Path:
    """``build(folder)`` once per test session, for every xdist worker; returns the folder."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's folder, above each worker's own
    out = root / f"shared-{name}"
    with FileLock(f"{out}.lock"):
        if not (out / ".complete").exists():
            shutil.rmtree(out, ignore_errors=True)  # a build that failed half-way
            out.mkdir(parents=True)
            build(out)
            (out / ".complete").touch()
    return out


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    from dist_sparse.data.prepare import prepare_data

    return once(tmp_path_factory, "data", lambda out: prepare_data(
        out / "sotu", default_corpus=True, max_documents=24, vocab_size=1000, seq_len=64)) / "sotu"


@pytest.fixture(scope="session")
def nsp_data_dir(tmp_path_factory):
    from dist_sparse.data.prepare import prepare_data

    out = tmp_path_factory.mktemp("data") / "sotu_nsp"
    prepare_data(out, default_corpus=True, max_documents=24, vocab_size=1000, seq_len=64, nsp=True)
    return out


# One EarlyBERT run shared by test_structured.py (search, ticket, shrink, training on),
# test_components.py (masks through the shrink) and test_export_roundtrip.py (exports before and
# after the shrink): DP2 x TP2, ZeRO-2, bert-mini,
# a checkpoint every 4 steps, gradient accumulation 2. The ticket falls at step 9 or 12 (checks at 3, 6, 9, 12; a window of
# two distances, the first at the second check; forced at 12), so global_step4 is mid-search and
# global_step12 onwards shrunk. The tests read these settings back from the run's run.json.
# The run is sparse too (SET 50%, updates at 7, 14 and 21), so the masks must follow the shrink:
# global_step8 holds the masks of step 7, which the shrink at 9 or 12 cuts to global_step12's.
EARLYBERT_TP2 = {"check_interval": 3, "window": 2, "epsilon": 0.1, "max_search_steps": 12}
EARLYBERT_TP2_SPARSITY = {"method": "set", "sparsity": 0.5, "update_interval": 7, "end_fraction": 1.0}
EARLYBERT_TP2_STEPS = 24


@pytest.fixture(scope="session")
def earlybert_tp2_run(data_dir, tmp_path_factory):
    return once(tmp_path_factory, "earlybert_tp2", lambda tmp: run_earlybert_tp2(tmp, data_dir)) / "run"


def run_earlybert_tp2(tmp, data_dir) -> None:
    import json

    from dslaunch import ROOT, launch

    cfg = json.loads((ROOT / "ds_configs" / "cpu_tp2_zero2_earlybert.json").read_text())
    cfg["structured_pruning"].update(EARLYBERT_TP2)
    cfg["sparsity"] = EARLYBERT_TP2_SPARSITY
    # the shipped recipe accumulates: micro batch 4 x 2 accumulation steps (the config's global batch)
    cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"] = 4, 2
    path = tmp / "config.json"
    path.write_text(json.dumps(cfg))
    run = tmp / "run"
    launch([ROOT / "launchers" / "pretrain.py", "--deepspeed_config", path, "--data", data_dir, "--model",
            "bert-mini", "--output", run, "--no-progress", "--max-steps", EARLYBERT_TP2_STEPS, "--save-interval", 4,
            "--overfit-batch"], nproc=4, timeout=900)
