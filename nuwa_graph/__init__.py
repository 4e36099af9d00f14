"""nuwa-graph: visual-token pruning for VLMs as validated, drawable graphs of typed nodes."""

from . import signal_kinds  # noqa: F401  (registers the signal kinds defined outside signals.py)
from .errors import PipelineError, Problem, RunError
from .executor import Executor, RunState, tokens_per_layer
from .pipeline import Pipeline, load, load_text
from .resources import mount_checkout_nodes

mount_checkout_nodes()  # from a checkout, nuwa_graph.nodes is the top-level nodes/ folder

__version__ = "0.1.0"
__all__ = ["Executor", "Pipeline", "PipelineError", "Problem", "RunError", "RunState", "__version__", "load",
           "load_text", "tokens_per_layer"]
