"""What a run prints: peftlab's own lines, its progress bars and results. Third-party notices a user cannot act on
are hidden unless `--debug` is given:
- transformers' load report, which lists the new classification head as MISSING on every run (it is new by design),
  and its weight-loading progress bar;
- datasets' tokenization progress bars (a second or two each);
- bitsandbytes' notice that the optional `kernels` package for faster 4-bit CPU inference is missing;
- FutureWarnings from the libraries' own internal calls;
- while `peftlab export` traces and quantizes (`quiet_onnx_export`): torch.onnx's "torchvision is not installed"
  and axis-renaming notices, torch.export's deprecations, and onnxruntime's "consider pre-processing" (its
  pre-processing fails on these graphs).
Errors and peftlab's warnings still show.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings

# bitsandbytes logs its `kernels` notice when it is imported (peft imports it), which in a recipe is before the
# command line is parsed; so this one logger is quietened when peftlab is imported, unless --debug is on the line.
IMPORT_TIME_LOGGERS = ("bitsandbytes.backends.cpu.ops",)


def quiet_import_time_notices() -> None:
    """Called by `import peftlab`: hide the third-party notices logged at import time (see IMPORT_TIME_LOGGERS)."""
    if "--debug" not in sys.argv:
        for name in IMPORT_TIME_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)


def quiet_third_party(debug: bool = False) -> None:
    """Hide the notices above for the rest of the process; `debug=True` leaves everything as the libraries set it."""
    if debug:
        return
    import datasets
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    # DDP compares each gradient's strides with its bucket's strictly. With channels-last activations
    # (peftlab.backbones.layout), a depthwise convolution's weight gradient has its parameter's bytes under other
    # strides for the size-1 dimension, so the reducer copies it instead of viewing it in place, and warns each run.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")


@contextlib.contextmanager
def quiet_onnx_export(debug: bool = False):
    """Within the block, hide the exporter's and quantizer's notices above (`debug=True` shows them). onnxruntime's
    quantizer logs through the root logger, so the levels are put back when the block ends."""
    if debug:
        yield
        return
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "")]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)
