"""What a run prints: peftlab's own lines, its progress bars and results. Third-party notices a user cannot act on
are hidden unless `--debug` is given:
- transformers' load report, which lists the new classification head as MISSING on every run (it is new by design),
  and its weight-loading progress bar;
- datasets' tokenization progress bars (a second or two each);
- bitsandbytes' notice that the optional `kernels` package for faster 4-bit CPU inference is missing;
- FutureWarnings from the libraries' own internal calls.
Errors and peftlab's warnings still show.
"""

from __future__ import annotations

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
