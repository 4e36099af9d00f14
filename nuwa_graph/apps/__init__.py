"""The applications built on the engine: the `nuwa-graph` command line (cli*.py), `run` and its
comparison (runner.py, demo.py), `sweep`, `eval` (evaluate.py with tasks, scoring, eval_output,
shards, prompts), the data loaders (data.py) and pictures (viz.py).

The engine (types, sites, signals, node API, registry, pipeline loading and validation,
executor, adapters, draw) imports nothing from here; nuwa_graph/world (the shapes world) and
nuwa_graph/embedded (the embedded model and its trainer) are applications too.
"""
