"""Shared pytest setup: keep torch to the CI's 2 cores; fixtures shared by the test modules (the library is
imported from the editable install, `pip install -e .`)."""
import os

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def one_thread():
    """Run a test on one torch thread (tiny networks gain nothing from threads, and a second thread
    on a busy 2-core machine can cost 100x), restoring the previous setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def fake_dataset(monkeypatch):
    """``data.load_dataset`` returns a generated :func:`tiny_data.tiny_record` (the stage scripts'
    ``main()`` then run on it); the record is the fixture's value."""
    import data
    from tiny_data import tiny_record

    record = tiny_record()
    monkeypatch.setattr(data, "load_dataset", lambda *args, **kwargs: record)
    return record


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory):
    """Root of two trained original ConvNetW32 on the 16-per-class ``Tiny3`` miniature (2 epochs),
    in the originals.py layout (``{root}/Tiny3/original/ConvNetW32/index_{i}``)."""
    from pretrained import originals
    from tiny_data import tiny_record

    root = tmp_path_factory.mktemp("pretrained")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg = originals.OriginalConfig(dataset="Tiny3", model="ConvNetW32", epochs=2, batch_size=16, lr_decay_step=(5,))
    originals.train_originals(cfg, tiny_record(per_class=16), str(root), 2, device=torch.device("cpu"), save_every=0)
    torch.set_num_threads(before)
    return str(root)


@pytest.fixture(scope="session")
def buffer_root(tmp_path_factory):
    """Root (``buffer_path``) of a tiny expert buffer shared by the MTT and feature-label tests:
    2 experts x 4 epochs of ConvNetW32 on ``tiny_record()``, in buffer.py's layout. Built once per
    session on one torch thread; the tests only read it."""
    from tiny_data import make_tiny_buffer

    root = tmp_path_factory.mktemp("buffers")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return make_tiny_buffer(root)
    finally:
        torch.set_num_threads(before)


def check_stage_command(stage: str, argv: list) -> None:
    """Parse and resolve a stage command line (``distill``, ``evaluate``, ``buffer`` or
    ``train_original`` and its arguments) as the script would, without loading data or running it:
    flags known, values in range, presets found (relative to the working directory). Raises what
    the script's own parsing raises (``SystemExit`` for an unknown flag, ``utils.UserError``)."""
    from cli import buffer_flags, distill_flags, evaluate_flags, original_flags

    if stage == "distill":
        distill_flags.resolve(distill_flags.parse_args(argv))
    elif stage == "evaluate":
        evaluate_flags.check_args(evaluate_flags.build_parser("").parse_args(argv))
    elif stage == "buffer":
        buffer_flags.resolve(buffer_flags.build_parser().parse_args(argv))
    elif stage == "train_original":
        original_flags.resolve(original_flags.build_parser().parse_args(argv))
    else:
        raise ValueError(f"unknown stage {stage!r}")
