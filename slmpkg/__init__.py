"""slmpkg: the packaging toolchain for small language models.

Convert and quantize checkpoints among safetensors, GGUF and ONNX, sign the results and publish them
to a registry keyed by hardware target.

Example:
    >>> import numpy as np
    >>> from slmpkg import quant
    >>> blocks = quant.quantize(np.ones((2, 64), np.float32), "Q8_0")
    >>> blocks.shape
    (2, 68)
"""

__version__ = "0.1.0"
