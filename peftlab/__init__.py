"""peftlab: parameter-efficient fine-tuning strategies, recipes and benchmarks for any backbone."""

from peftlab.console import quiet_import_time_notices

quiet_import_time_notices()  # before the imports below pull in peft (and so bitsandbytes)

from peftlab.errors import PeftlabError  # noqa: E402
from peftlab.heads import find_head  # noqa: E402
from peftlab.params import ParameterCount, count_parameters  # noqa: E402
from peftlab.strategies import apply_strategy, list_strategies, register_strategy  # noqa: E402
from peftlab.loading import LoadedRun, load  # noqa: E402  (after the strategies it loads runs with)

__all__ = ["LoadedRun", "PeftlabError", "ParameterCount", "apply_strategy", "count_parameters", "find_head",
           "list_strategies", "load", "register_strategy"]
__version__ = "0.1.0"
