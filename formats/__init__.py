"""File formats: one module per format, each a lazy reader and a streaming writer over
:class:`slmpkg.checkpoint.Checkpoint`. A format module knows files, not registries, and imports no
other format module."""
