"""Example outside package of nuwa-graph nodes (see docs/authoring.md)."""
