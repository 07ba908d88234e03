"""Datasets shared by the multi-process tests (prepared once per session from the default corpus)."""

import pytest


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    from dist_sparse.data.prepare import prepare_data

    out = tmp_path_factory.mktemp("data") / "sotu"
    prepare_data(out, default_corpus=True, max_documents=24, vocab_size=1000, seq_len=64)
    return out


@pytest.fixture(scope="session")
def nsp_data_dir(tmp_path_factory):
    from dist_sparse.data.prepare import prepare_data

    out = tmp_path_factory.mktemp("data") / "sotu_nsp"
    prepare_data(out, default_corpus=True, max_documents=24, vocab_size=1000, seq_len=64, nsp=True)
    return out
