"""peftlab: parameter-efficient fine-tuning strategies, recipes and benchmarks for any backbone."""

from peftlab.errors import PeftlabError
from peftlab.heads import find_head
from peftlab.params import ParameterCount, count_parameters
from peftlab.strategies import apply_strategy, list_strategies, register_strategy
from peftlab.loading import LoadedRun, load  # noqa: E402  (after the strategies it loads runs with)

__all__ = ["LoadedRun", "PeftlabError", "ParameterCount", "apply_strategy", "count_parameters", "find_head",
           "list_strategies", "load", "register_strategy"]
__version__ = "0.1.0"
