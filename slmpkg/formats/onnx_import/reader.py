"""Reading an ONNX decoder as a canonical, GGUF-named checkpoint (:func:`read`)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Union

import numpy as np

from ...checkpoint import Checkpoint, LazyTensor
from ...errors import FormatError
from ...quant import QuantType
from .config import _Facts, _embedded_config, _genai_config, _hf_config, _json_file
from .graph import _Graph, _Linear, _embedding, _experts, _layer_of, _linears, _parse, _parts
from .stored import _concat_rows, _inside, _plain, _row_bytes, _rows, _with_rows


PathLike = Union[str, "os.PathLike[str]"]


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                    "chat_template.jinja", "generation_config.json")


# norm weights by a component of their name (HF's, slmpkg's and the builder's all contain these)
_NORMS = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "q_norm": "attn_q_norm", "k_norm": "attn_k_norm", "final_norm_layernorm": "output_norm",
    # Gemma 2/3's norms after each branch (slmpkg's names; HF's, which the builder keeps, below)
    "post_attention_norm": "post_attention_norm", "post_feedforward_norm": "post_ffw_norm",
    "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm",
}


# ops whose weight input is the scale as applied (no Gemma offset left to add)
_APPLIED_NORM_OPS = {"SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization",
                     "LayerNormalization", "SkipLayerNormalization", "RMSNormalization"}


def _locate(path: Path) -> tuple[Path, Path]:
    """(model file, model directory) for a directory or a .onnx file."""
    if path.is_dir():
        genai = _genai_config(path / "genai_config.json")
        name = None
        if genai is not None:
            name = genai.get("model", {}).get("decoder", {}).get("filename")
        candidates = []
        if isinstance(name, str) and name:
            inside, refused = _inside(path, name, "model.decoder.filename")
            if inside is None:
                raise FormatError(f"{path / 'genai_config.json'}: {refused}")
            candidates.append(inside)
        candidates += [path / "model.onnx"] + sorted(path.glob("*.onnx"))
        # the Hugging Face layout keeps them in onnx/ (optimum, transformers.js: model.onnx or the merged decoder)
        candidates += [path / "onnx" / "model.onnx", path / "onnx" / "decoder_model_merged.onnx"]
        for c in candidates:
            if c.is_file():
                return c, c.parent
        raise FormatError(f"{path}: no .onnx model in this directory")
    if not path.is_file():
        raise FormatError(f"{path}: no such file or directory")
    return path, path.parent


def _beside(directory: Path) -> Path:
    """Where config.json and the tokenizer are: the model's directory, or its parent for the Hugging Face
    layout that keeps the .onnx files in ``onnx/`` (optimum, transformers.js)."""
    own = any((directory / name).is_file() for name in ("config.json", "genai_config.json"))
    if not own and directory.name == "onnx" and (directory.parent / "config.json").is_file():
        return directory.parent
    return directory


def _norms(g: _Graph) -> dict[str, tuple[LazyTensor, bool]]:
    """Norm weights (and LayerNorm biases) by GGUF name, with whether the graph applies them as stored
    (fused norm ops)."""
    out: dict[str, tuple[LazyTensor, bool]] = {}
    # Gemma 2/3 in HF's names: with a pre_feedforward_layernorm, post_attention_layernorm is the norm
    # after attention (llama.cpp's post_attention_norm), not the one before the MLP
    sandwich = any("pre_feedforward_layernorm" in name for name in g.inits)
    names = dict(_NORMS, post_attention_layernorm="post_attention_norm") if sandwich else _NORMS
    for name, init in g.inits.items():
        if init.qtype is None or len(init.shape) != 1:
            continue
        parts = _parts(name)
        stem = next((names[p] for p in reversed(parts) if p in names), None)
        layer = _layer_of(name)
        if stem is None and name in ("model.norm.weight", "norm.weight", "model.final_layernorm.weight",
                                     "model.final_layernorm.bias", "model.norm.bias"):
            stem = "output_norm"  # HF's final norms (Phi's final_layernorm), as optimum keeps them
        if stem is None:
            continue
        suffix = "bias" if parts[-1] == "bias" else "weight"
        if stem == "output_norm":
            target = f"output_norm.{suffix}"
        elif layer is None:
            raise FormatError(f"{g.file}: tensor {name}: a layer norm outside any layer")
        else:
            target = f"blk.{layer}.{stem}.{suffix}"
        if target in out:
            raise FormatError(f"{g.file}: tensors {out[target][0].name} and {name} both map to {target}")
        applied = any(c.op_type in _APPLIED_NORM_OPS for c in g.consumers.get(name, []))
        out[target] = (_plain(name, init), applied)
    return out


def read(path: PathLike) -> Checkpoint:
    """Read an ONNX decoder (a model directory or a ``.onnx`` file) as a canonical, GGUF-named checkpoint.

    Supports every family slmpkg's writer exports (Llama/Mistral, Mixtral, Qwen2, Qwen3, Phi-3, Phi-2,
    StarCoder2, OpenELM, Gemma 1/2/3, Granite) and the Llama/Qwen/Phi/Gemma graphs of onnxruntime-genai's
    builder and optimum; ``MatMulNBits`` weights become GGUF blocks (see :mod:`slmpkg.formats.onnx_nbits`).
    Raises :class:`FormatError` (one line naming the file) for a file that is not ONNX, external data
    that is outside the directory, missing or short, and a graph whose weights cannot be mapped.

    Example:
        >>> ckpt = read("out/tiny-onnx")                                  # doctest: +SKIP
        >>> ckpt.get("llama.block_count"), len(ckpt.tensors)              # doctest: +SKIP
        (2, 21)
    """
    from ... import architectures as arch_mod

    model_file, directory = _locate(Path(path))
    g = _Graph(_parse(model_file), model_file, directory)
    facts = _Facts(g)
    beside = _beside(directory)
    config = _json_file(beside / "config.json") or _embedded_config(g)
    genai = _genai_config(beside / "genai_config.json")

    embd, embd_init = _embedding(g)
    tensors: dict[str, LazyTensor] = {}
    origin: dict[str, str] = {}
    linears = _linears(g)
    tied = False
    for lin in linears:
        if lin.target == "output" and embd_init is not None:
            init = g.inits.get(lin.node.input[1]) if lin.node.op_type == "MatMulNBits" else g.source(lin.node.input[1])[0]
            if init is embd_init:  # the builder's tied embedding: one initializer read both ways
                tied = True
                if embd is None:  # gathered from lm_head's blocks: they are the embedding
                    embd = lin.weight
    if embd is None:
        raise FormatError(f"{g.file}: the quantized embedding's blocks belong to no lm_head MatMulNBits")
    head = next((lin for lin in linears if lin.target == "output"), None)
    if not tied and head is not None and _same_values(embd, head.weight):
        tied = True  # a writer that copies the tied matrix into lm_head (slmpkg's own): one copy is enough

    def put(name: str, t: LazyTensor, src: str) -> None:
        if name in tensors and origin[name] == src:
            return  # the same weight met again (another If branch of a merged decoder)
        if name in tensors:
            raise FormatError(f"{g.file}: {origin[name]} and {src} both map to {name}")
        tensors[name], origin[name] = t.renamed(name), src

    put("token_embd.weight", embd, embd.name)
    fused: list[_Linear] = []
    for lin in linears:
        if lin.fused:
            fused.append(lin)
            continue
        if lin.target == "output" and tied:
            continue
        stem = "output" if lin.target == "output" else f"blk.{lin.layer}.{lin.target}"
        put(f"{stem}.weight", lin.weight, lin.weight.name)
        if lin.bias is not None:
            put(f"{stem}.bias", lin.bias, lin.bias.name)
    norms = _norms(g)
    for name, (t, _) in norms.items():
        put(name, t, t.name)
    for layer, node in facts.moe.items():
        for name, t in _experts(g, node, layer).items():
            put(name, t, t.name)

    layers = sorted({lin.layer for lin in linears if lin.layer is not None} | set(facts.moe))
    n_layer = len(layers)
    if layers != list(range(n_layer)):
        raise FormatError(f"{g.file}: layers {layers} are not numbered 0..{n_layer - 1}")
    shapes = {name: t.shape for name, t in tensors.items()}
    for lin in fused:  # a fused gate_up gives the feed-forward width; a fused qkv needs the head counts
        if lin.fused == "gate_up":
            shapes.setdefault("blk.0.ffn_gate.weight", (lin.weight.shape[0] // 2,))
    sidecar = {}
    for name in _TOKENIZER_FILES:
        p = beside / name
        if p.is_file():
            sidecar[name] = p.read_bytes()
    cfg = _hf_config(g, facts, config, genai, shapes, n_layer, tied)
    if cfg["num_hidden_layers"] != n_layer:
        raise FormatError(f"{g.file}: the graph has {n_layer} layers but its configuration says {cfg['num_hidden_layers']}")
    sidecar["config.json"] = json.dumps(cfg).encode()
    name = beside.name if model_file.name == "model.onnx" or beside != directory else model_file.stem
    metadata, extra = arch_mod.hf_metadata(cfg, sidecar, name)
    family, dims = arch_mod.hf_dims(cfg)
    q_size, kv_size = dims.n_head * dims.head_dim, dims.n_head_kv * dims.head_dim

    kept = {r.gguf for r in family.layer_tensors}
    # the projections llama.cpp's graph reads fused (Phi-3: both; OpenELM: q/k/v), each with its parts
    fusions = {"attn_qkv": ("attn_q", "attn_k", "attn_v"), "ffn_up": ("ffn_gate", "ffn_up")}
    fused_in_gguf = {whole for whole, parts in fusions.items() if whole in kept and parts[0] not in kept}
    for lin in fused:
        stem = f"blk.{lin.layer}"
        whole = "attn_qkv" if lin.fused == "qkv" else "ffn_up"
        if whole in fused_in_gguf:  # kept as it is (Phi-3's gate rows, then up)
            put(f"{stem}.{whole}.weight", lin.weight, lin.weight.name)
            if lin.bias is not None:
                put(f"{stem}.{whole}.bias", lin.bias, lin.bias.name)
            continue
        if lin.fused == "qkv":
            sizes = (("attn_q", q_size), ("attn_k", kv_size), ("attn_v", kv_size))
        else:
            half = lin.weight.shape[0] // 2
            sizes = (("ffn_gate", half), ("ffn_up", half))
        if sum(s for _, s in sizes) != lin.weight.shape[0]:
            raise FormatError(
                f"{g.where(lin.node)}: fused weight {lin.weight.name} has {lin.weight.shape[0]} outputs, "
                f"the head counts need {sum(s for _, s in sizes)}"
            )
        start = 0
        for part, size in sizes:
            for suffix, src in (("weight", lin.weight), ("bias", lin.bias)):
                if src is not None:
                    put(f"{stem}.{part}.{suffix}", _rows(src, start, start + size), src.name)
            start += size

    for i in range(n_layer):  # separate projections of a graph where llama.cpp's are fused (Phi-3)
        for whole in fused_in_gguf:
            parts = fusions[whole]
            for suffix in ("weight", "bias"):
                names = [f"blk.{i}.{p}.{suffix}" for p in parts]
                if all(n in tensors for n in names):
                    pieces = [tensors.pop(n) for n in names]
                    target = f"blk.{i}.{whole}.{suffix}"
                    tensors[target], origin[target] = _concat_rows(target, pieces), "+".join(t.name for t in pieces)

    # rotary layout: llama.cpp's llama graph wants q/k rows pair-adjacent; the graph's GQA says which it has
    wants_pairs = any(isinstance(r.transform, arch_mod.PermuteHeads) for r in family.layer_tensors)
    has_pairs = bool(facts.interleaved)
    for i in range(n_layer):
        for part, heads in (("attn_q", dims.n_head), ("attn_k", dims.n_head_kv)):
            for suffix in ("weight", "bias"):
                name = f"blk.{i}.{part}.{suffix}"
                if name not in tensors or wants_pairs == has_pairs:
                    continue
                move = arch_mod.permute_qk if wants_pairs else arch_mod.unpermute_qk
                tensors[name] = _with_rows(tensors[name], lambda rows, n=heads, f=move: f(rows, n))

    # norms the graph computes as HF does (optimum) get llama.cpp's convention (Gemma: 1 + w)
    shifts = {r.gguf: r.transform for r in family.layer_tensors + family.global_tensors
              if isinstance(r.transform, arch_mod.Shift)}
    for name, (t, applied) in norms.items():
        stem = name.split(".")[-2]
        if not applied and stem in shifts and name.endswith(".weight"):
            tensors[name] = shifts[stem].forward(tensors[name], dims)
        elif len(t.shape) == 1 and tensors[name].qtype is not QuantType.F32:
            tensors[name] = tensors[name].converted(QuantType.F32)  # llama.cpp keeps norms in F32

    if family.output == "tied" and "output.weight" in tensors:
        del tensors["output.weight"]  # llama.cpp's graph reads token_embd (the builder wrote a copy)
    _check_complete(g, tensors, origin, n_layer, family, dims)
    ordered = [tensors["token_embd.weight"]] + [t for t in extra]
    for i in range(n_layer):
        ordered += [t for name, t in tensors.items() if name.startswith(f"blk.{i}.")]
    ordered += [tensors[n] for n in ("output_norm.weight", "output_norm.bias", "output.weight", "output.bias") if n in tensors]
    return Checkpoint(metadata, ordered, sidecar={})


def _same_values(a: LazyTensor, b: LazyTensor, rows: int = 4096) -> bool:
    """Whether two float tensors hold the same bytes. Their first rows decide for almost every untied
    pair (a cheap ranged read); only a tied-looking pair is compared whole, ``b`` computed once and
    ``a`` read in row ranges beside it, so this holds one tensor and a slab."""
    if a.shape != b.shape or a.qtype is not b.qtype or a.qtype not in (QuantType.F32, QuantType.F16, QuantType.BF16):
        return False
    row = _row_bytes(a)
    probe = min(4, a.shape[0]) * row
    same = np.array_equal(a.byte_range(0, probe), b.byte_range(0, probe))
    for t in (a, b):  # a tensor computed whole keeps its bytes for the next read; there is none now
        getattr(t.read, "release", lambda: None)()
    if not same:
        return False
    whole = np.asarray(b.raw()).reshape(-1).view(np.uint8)
    for start in range(0, a.nbytes, rows * row):
        stop = min(start + rows * row, a.nbytes)
        if not np.array_equal(a.byte_range(start, stop - start), whole[start:stop]):
            return False
    return True


def _check_complete(
    g: _Graph, tensors: Mapping[str, LazyTensor], origin: Mapping[str, str], n_layer: int, family: Any, dims: Any,
) -> None:
    """Every tensor llama.cpp's graph needs is there, with the shape the configuration implies."""
    from ... import architectures as arch_mod

    optional = {"attn_q_norm", "attn_k_norm"} if family.gguf_arch != "qwen3" else set()
    wanted = [(f"{r.gguf}.weight", r) for r in family.global_tensors if r.gguf != "output"]
    for i in range(n_layer):
        wanted += [(f"blk.{i}.{r.gguf}.weight", r) for r in family.layer_tensors if r.gguf not in optional]
    for name, rule in wanted:
        t = tensors.get(name)
        if t is None:
            raise FormatError(f"{g.file}: found no weight for {name} (the graph's names and scopes do not lead to it)")
        want = arch_mod.expected_shape(rule, dims)
        if want is not None and tuple(t.shape) != want:
            raise FormatError(f"{g.file}: tensor {origin[name]} for {name} has shape {list(t.shape)}, "
                              f"the configuration implies {list(want)}")
