"""The `nuwa-graph` command line: validate, list node types, draw and run pipelines.

Every user error (a bad file, a bad --set, an unknown node type, Graphviz missing) ends
with a message and a non-zero exit code, never a traceback: exit 1 for an error, 2 for a
usage error (a bad option), 130 when interrupted (Ctrl-C). `--debug` shows the traceback of
an unexpected error. Output paths are checked before any work (see safe_io.py).

The app and its shared helpers are in cli_common.py; importing the command modules below
registers their commands in the order `--help` lists them. `python -m nuwa_graph.apps.cli`
runs it like the `nuwa-graph` script.
"""

from __future__ import annotations

import typer

# the order of these imports is the order of the commands in --help
# isort: off
from . import cli_inspect  # noqa: F401 - validate, nodes, draw
from . import cli_run  # noqa: F401 - run, sweep
from . import cli_eval  # noqa: F401 - eval, merge
# isort: on
from .cli_common import app


# --- train ----------------------------------------------------------------------------------
@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def train(ctx: typer.Context) -> None:
    """Train the embedded LLaVA on the shapes world; every option is passed on to the trainer
    (list them with `python scripts/train_embedded.py --help`; recipe in docs/embedded.md).

    Example: nuwa-graph train --out runs/embedded --seed 0   (then --resume runs/embedded)
    """
    from ..embedded.train import main as train_main

    train_main(list(ctx.args))


if __name__ == "__main__":  # pragma: no cover
    app()
