"""The node library: one module per family. Every module here is imported by the registry,
so adding a module with `@register`ed classes is all it takes to add node types."""
