"""File formats: one module per format, each a lazy reader and a streaming writer over
:class:`slmpkg.checkpoint.Checkpoint`. A format module knows files, not registries, and imports no
other format's module; ONNX is one format in five modules (``onnx`` writes decoders, ``onnx_encoder``
encoders, both through ``onnx_graph``; ``onnx_import`` reads, ``onnx_nbits`` maps weights to and from
``MatMulNBits``)."""
