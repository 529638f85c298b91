"""ONNX → the canonical checkpoint: read a decoder graph's weights back into GGUF names and metadata.

Three layouts of the same decoder are understood, told apart by what the graph holds, not by who wrote it:

* **slmpkg's and onnxruntime-genai's builder graphs**: linears are ``MatMul`` nodes whose weight is an
  initializer named after the node (``model.layers.0.attn.q_proj.MatMul.weight``, [in, out]); the builder
  may fuse q/k/v into one ``qkv_proj`` (split here by the head counts) and, for tied embeddings, feed the
  embedding ``Gather`` through a ``Transpose`` of ``lm_head``'s weight. Norms are
  ``(Skip)SimplifiedLayerNormalization`` weights, stored as applied (Gemma's ``1 + w`` already added, which
  is also llama.cpp's convention). Rotary runs in ``GroupQueryAttention``: ``rotary_interleaved=1`` means
  the q/k rows are already in llama.cpp's pair-adjacent order.
* **optimum (torch.onnx) exports**: linear weights are anonymous initializers (``onnx::MatMul_123``,
  W transposed), identified through the consuming node's scope (``/model/layers.0/self_attn/q_proj/MatMul``);
  norms keep their Hugging Face names and values (Gemma's ``w`` without the 1); rotary is plain HF math.
  Nodes inside subgraphs count too (the merged decoder runs everything in ``If`` branches), and the
  Hugging Face layout with the .onnx files in ``onnx/`` and config.json/tokenizer one level up is read.
* ``MatMulNBits`` linears (any of the above, quantized) become ggml blocks through
  :mod:`slmpkg.formats.onnx_nbits`: symmetric → Q4_0, zero points → Q4_1, 8 bits → Q8_0 (exact up to the
  fp16 rounding of scales and minimums; larger blocks repeat their scale). What 32-value ggml blocks
  cannot hold (16-value blocks, slmpkg's separate min term) becomes F32 with exactly the values
  onnxruntime computes with, never rounded a second time.

Families: every one slmpkg's writer exports (Llama/Mistral, Mixtral, Qwen2, Qwen3, Phi-3, Phi-2, StarCoder2,
OpenELM, Gemma 1/2/3, Granite; others give a FormatError naming the family). An ``lm_head`` equal to the embedding (the
builder's shared initializer, or slmpkg's copy) is tied: one matrix in GGUF, ``tie_word_embeddings``
in config.json. Mixtral's ``com.microsoft.MoE`` fused SwiGLU experts (gate and up rows interleaved)
come apart into ``ffn_gate_exps``/``ffn_up_exps``; Phi-3's fused ``qkv_proj`` and ``gate_up_proj`` stay
fused, as llama.cpp's phi3 graph reads them (separate projections, as the builder writes gate and up,
are fused). The builder's Mistral, Phi-3, Phi-2 (LayerNorms with biases, fc1/fc2), Gemma 2 (HF's
sandwich-norm names) and Granite graphs (multipliers on the skip input, logits × 1/scale) are read too.
LayerNorm biases come back beside their weights; OpenELM's per-layer head counts come from each
``GroupQueryAttention``.

Metadata comes from ``config.json`` when it is beside the model (optimum writes it) or stored in the
model's ``metadata_props`` under ``slmpkg.config.json`` (:data:`CONFIG_PROPERTY`), else from
``genai_config.json`` and the graph itself: head counts, rotary layout, per-layer sliding windows, the
attention scale (Gemma's query_pre_attn_scalar, Granite's multiplier) and soft-cap from
``GroupQueryAttention``; epsilon from the norm nodes; the rope base and a linear factor from
``cos_cache``/``sin_cache`` (Gemma 3's sliding layers' base from their own pair; Phi-3 LongRoPE's
short/long factors and attention factor from the two pairs its ``If`` chooses between, with Phi-3's
base 10000, which those caches cannot separate from the factors); Granite's embedding/residual/logit
multipliers and Gemma 2's final soft-cap from the constants of their ``Mul``/``Div``/``Tanh`` nodes;
the expert count and top-k from ``MoE``; the family from genai_config.json's ``type``, and for its
generic ``decoder`` from the graph (experts: Mixtral; LayerNorms: StarCoder2; per-head norms: OpenELM,
whose config.json gets sizing rules that give the graph's per-layer sizes). The tokenizer files beside the
model give the ``tokenizer.*`` keys. Tensors stay lazy: each one reads its byte range
of the external data file when a writer asks for it (a transposed weight is transposed then, one tensor
in memory at a time). External data is checked before anything is returned: a location outside the
model directory (``../x``, an absolute path, a symlink out), a missing file or one shorter than the
tensors it should hold is a :class:`~slmpkg.errors.FormatError` naming the file and the tensor.

Example:
    >>> from slmpkg.formats import onnx_import
    >>> ckpt = onnx_import.read("out/tiny-onnx")                # doctest: +SKIP
    >>> ckpt.architecture, ckpt.tensors[0].name                # doctest: +SKIP
    ('llama', 'token_embd.weight')
"""

from __future__ import annotations

from .config import CONFIG_PROPERTY, SUPPORTED_CLASSES
from .reader import read

__all__ = ["CONFIG_PROPERTY", "SUPPORTED_CLASSES", "read"]
