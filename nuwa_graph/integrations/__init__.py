"""Bridges to other tools' plug-in systems (imported only by those tools)."""
