"""File formats: one module per format, each a lazy reader and a streaming writer over
:class:`slmpkg.checkpoint.Checkpoint`. A format module knows files, not registries, and imports no
other format's module; ONNX is one format in four modules (``onnx`` writes decoders, ``onnx_encoder``
encoders, ``onnx_import`` reads, ``onnx_nbits`` maps weights to and from ``MatMulNBits``)."""
