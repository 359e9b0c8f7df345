import pytest
import torch

from fasterdiff.tools.bench.harness import batch_sizes
from fasterdiff.tools.tiny import tiny_pipeline


@pytest.fixture(scope="session")
def pipe():
    """A tiny random SD-format pipeline, fp32 CPU (shared: tests must not modify it)."""
    return tiny_pipeline()


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# Forward calls of a module, as the list of their batch sizes: the benchmarks' probe.
count_calls = batch_sizes


@pytest.fixture(scope="session")
def weights(tmp_path_factory):
    """A tiny SD-format pipeline saved to a folder, as FASTERDIFF_WEIGHTS would point to."""
    folder = tmp_path_factory.mktemp("weights")
    tiny_pipeline().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def server(weights):
    """cog's real HTTP server on predict.py, set up on the tiny weights, with a warm-up."""
    from cog_server import running

    with running(weights, {"FASTERDIFF_WARMUP": "1"}) as srv:
        yield srv
