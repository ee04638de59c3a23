"""engine/log.py: rank 0 prints our info lines, DeepSpeed's warnings (its info with --log_level debug);
the other ranks print only their own problems, so a warning every rank meets is printed once."""

import logging

from ds_longformer.engine import setup_logging


def test_two_ranks_print_each_warning_once(two_ranks):
    """Two ranks (torchrun) that each log a Python warning, a logging warning, a DeepSpeed config value
    replaced by a typed flag (every rank resolves the config), and one warning of their own."""
    _, done = two_ranks
    err = done.stderr
    for shared in ("UserWarning: a Python warning that every rank meets", "a warning that every rank meets",
                   "DeepSpeed config gradient_clipping=2.0 replaced by --grad_clip 1.0"):
        assert err.count(shared) == 1, (shared, err[-3000:])
    assert err.count("a warning of rank 0 alone") == 1 and err.count("[rank 1] WARNING") == 1
    assert "a warning of rank 1 alone" in err
    assert err.count("INFO ds_longformer.engine.metrics: no MFU on CPU without --peak_tflops") == 1  # rank 0's
    assert err.count("Setting accelerator to CPU") + done.stdout.count("Setting accelerator to CPU") <= 1


def test_levels_on_rank_zero(capsys):
    ours = logging.getLogger("ds_longformer.engine.test")
    deepspeed = logging.getLogger("DeepSpeed")
    info = logging.LogRecord("DeepSpeed", logging.INFO, __file__, 1, "chatter", None, None)
    try:
        setup_logging("info", rank=0)
        ours.info("an info line")
        ours.debug("a debug line")
        assert not deepspeed.filter(info)  # DeepSpeed's own info stays hidden
        setup_logging("warning", rank=0)
        ours.info("hidden at --log_level warning")
        err = capsys.readouterr().err
        assert "INFO ds_longformer.engine.test: an info line" in err
        assert "debug line" not in err and "hidden" not in err
        setup_logging("debug", rank=0)
        assert deepspeed.filter(info) and deepspeed.getEffectiveLevel() == logging.DEBUG
    finally:
        setup_logging("info", rank=0)
        from deepspeed.utils.logging import set_log_level_from_string

        set_log_level_from_string("warning")
