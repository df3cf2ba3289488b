import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none is available")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny tensors (the pure-torch search tests): a second thread only adds
    spin-waits, 100x when the machine is busy."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_data_bin(tmp_path_factory):
    from helpers import preprocess, write_synthetic_corpus

    root = tmp_path_factory.mktemp("tiny")
    return preprocess(write_synthetic_corpus(root / "raw"), root / "data-bin")


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_data_bin, tmp_path_factory):
    """A tiny transformer trained by stock fairseq-train (label-smoothed MLE)."""
    from helpers import train_mle

    return train_mle(tiny_data_bin, tmp_path_factory.mktemp("mle"))


@pytest.fixture(scope="session")
def tiny_data_bin_unbuilt(tmp_path_factory):
    """A data-bin folder with dictionaries only: enough for option parsing and task setup."""
    folder = tmp_path_factory.mktemp("dicts")
    symbols = "".join(f"{c} 1\n" for c in "abcdefghijABCDEFGHIJ")
    for lang in ("src", "tgt"):
        (folder / f"dict.{lang}.txt").write_text(symbols)
    return folder
