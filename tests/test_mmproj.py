"""Gemma 3's vision tower as llama.cpp's mmproj GGUF, proved by llama.cpp's own multimodal library.

A tiny random ``Gemma3ForConditionalGeneration`` (tests/test_convert.py's ``gemma3-mm``: a two-layer SigLIP
encoder over 4x4 patches, pooled 2x2 into 4 image tokens) → the text GGUF (``convert``) and the mmproj GGUF
(:func:`slmpkg.mmproj.from_hf`). llama-cpp-python's ``mtmd`` bindings load both, preprocess a random RGB
image of the encoder's size (mean/std normalization; the bilinear resize to the same size changes nothing)
and encode it; the image embeddings match transformers' ``get_image_features`` on the same pixels, to
about 2e-4 of the embeddings' range (the checks allow 1e-3, as for the language models' logits): llama.cpp
convolves the patches in fp16 and reads GELU from an fp16 table (measured: a reference rounding pixels,
kernel and GELU likewise comes within 4e-5).
"""

from __future__ import annotations

import ctypes
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

from slmpkg import mmproj
from slmpkg.errors import FormatError
from slmpkg.formats import gguf as gguf_format
from slmpkg.formats import safetensors as st_format
from slmpkg.pipeline import convert

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
llama_cpp = pytest.importorskip("llama_cpp")
mtmd = pytest.importorskip("llama_cpp.mtmd_cpp")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

from test_convert import _hf_model  # noqa: E402

FAMILY = "gemma3-mm"


def _build(root: Path, dtype) -> tuple[Path, Path, Path]:
    """(HF directory, text GGUF, mmproj GGUF) of the tiny model saved in ``dtype``."""
    src = _hf_model(root / "hf", FAMILY, dtype=dtype)
    text, vision = root / "text.gguf", root / "mmproj.gguf"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the text conversion says the tower is left out
        convert(src, text, quant="F32", progress=False)
    gguf_format.write(vision, mmproj.from_hf(st_format.read(src), name="tiny"))
    return src, text, vision


@pytest.fixture(scope="module", params=["f32", "bf16"])
def model(request, tmp_path_factory) -> tuple[str, Path, Path, Path]:
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[request.param]
    return (request.param, *_build(tmp_path_factory.mktemp(f"mm-{request.param}"), dtype))


def _llama_cpp_image_embeddings(text: Path, vision: Path, images: list[np.ndarray]) -> list[np.ndarray]:
    """llama.cpp's embeddings of each RGB uint8 image: mtmd loads the mmproj beside the text model, tokenizes
    a prompt with the media marker, and encodes the image chunk."""
    llm = llama_cpp.Llama(model_path=str(text), n_ctx=128, verbose=False, n_threads=2)
    params = mtmd.mtmd_context_params_default()
    params.use_gpu, params.n_threads, params.print_timings, params.warmup = False, 2, False, False
    ctx = mtmd.mtmd_init_from_file(str(vision).encode(), llm.model, params)
    assert ctx, "llama.cpp refused the mmproj GGUF"
    n_embd = llama_cpp.llama_model_n_embd(llm.model)
    marker = mtmd.mtmd_default_marker()
    out = []
    try:
        for image in images:
            ny, nx, _ = image.shape
            pixels = (ctypes.c_uint8 * image.size).from_buffer_copy(np.ascontiguousarray(image).tobytes())
            bitmap = mtmd.mtmd_bitmap_init(nx, ny, pixels)
            chunks = mtmd.mtmd_input_chunks_init()
            prompt = mtmd.mtmd_input_text(text=marker, text_len=len(marker), add_special=False, parse_special=True)
            assert mtmd.mtmd_tokenize(ctx, chunks, ctypes.byref(prompt), (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap), 1) == 0
            parts = [mtmd.mtmd_input_chunks_get(chunks, i) for i in range(mtmd.mtmd_input_chunks_size(chunks))]
            (chunk,) = [c for c in parts if mtmd.mtmd_input_chunk_get_type(c) == mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE]
            assert mtmd.mtmd_encode_chunk(ctx, chunk) == 0
            n_tokens = mtmd.mtmd_input_chunk_get_n_tokens(chunk)
            embd = np.ctypeslib.as_array(mtmd.mtmd_get_output_embd(ctx), shape=(n_tokens * n_embd,))
            out.append(embd.reshape(n_tokens, n_embd).copy())
            mtmd.mtmd_input_chunks_free(chunks)
            mtmd.mtmd_bitmap_free(bitmap)
    finally:
        mtmd.mtmd_free(ctx)
        llm.close()
    return out


def _transformers_image_embeddings(src: Path, images: list[np.ndarray]) -> list[np.ndarray]:
    """Gemma 3's image features on the pixels its processor would give (rescale 1/255, mean/std 0.5)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForImageTextToText.from_pretrained(src, dtype=torch.float32)
    out = []
    for image in images:
        pixels = ((image.astype(np.float32) / 255 - 0.5) / 0.5).transpose(2, 0, 1)[None]
        with torch.no_grad():
            features = model.get_image_features(pixel_values=torch.from_numpy(np.ascontiguousarray(pixels)))
        out.append(features.pooler_output[0].numpy())
    return out


def test_llama_cpp_encodes_images_as_transformers_does(model):
    _, src, text, vision = model
    config = json.loads((src / "config.json").read_text())
    size = config["vision_config"]["image_size"]
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8) for _ in range(2)]
    ours, refs = _llama_cpp_image_embeddings(text, vision, images), _transformers_image_embeddings(src, images)
    for got, ref in zip(ours, refs):
        assert got.shape == ref.shape == (config["mm_tokens_per_image"], config["text_config"]["hidden_size"])
        assert np.abs(got - ref).max() <= 1e-3 * (ref.max() - ref.min())
    # two different images give different embeddings: the comparison above is not of constants
    assert np.abs(refs[0] - refs[1]).max() > 0.1 * (refs[0].max() - refs[0].min())


def test_mmproj_holds_the_tower_as_llama_cpp_names_it(model):
    dtype, src, _, vision = model
    ckpt = gguf_format.read(vision)
    md = {k: v.value for k, v in ckpt.metadata.items()}
    config = json.loads((src / "config.json").read_text())
    v = config["vision_config"]
    assert md["general.architecture"] == "clip" and md["clip.projector_type"] == "gemma3"
    assert md["clip.has_vision_encoder"] is True and md["clip.use_gelu"] is True
    assert (md["clip.vision.image_size"], md["clip.vision.patch_size"]) == (v["image_size"], v["patch_size"])
    assert md["clip.vision.block_count"] == v["num_hidden_layers"] and md["clip.vision.embedding_length"] == v["hidden_size"]
    assert md["clip.vision.projection_dim"] == config["text_config"]["hidden_size"]
    assert md["clip.vision.projector.scale_factor"] == 2  # 4x4 patches pooled into 2x2 tokens
    assert list(md["clip.vision.image_mean"]) == list(md["clip.vision.image_std"]) == [0.5, 0.5, 0.5]

    source = {mmproj._hf_name(t.name): t for t in st_format.read(src).tensors}
    tensors = {t.name: t for t in ckpt.tensors}
    assert len(tensors) == 7 + 16 * v["num_hidden_layers"] and not any("head" in n for n in tensors)
    for gguf_name, hf_name in mmproj.TOWERS[0].tensors + tuple(
            (g.format(i=i), h.format(i=i)) for i in range(v["num_hidden_layers"]) for g, h in mmproj.TOWERS[0].layer_tensors):
        got, want = tensors[gguf_name], source[hf_name].float32()
        if gguf_name == "mm.soft_emb_norm.weight":
            want = want + np.float32(1)  # Gemma's RMS norm multiplies by 1 + w, llama.cpp by the stored weight
        expected_type = "F32" if gguf_name in mmproj.TOWERS[0].as_f32 or len(got.shape) == 1 else dtype.upper()
        assert got.qtype.name == expected_type, gguf_name
        assert np.array_equal(got.float32(), want), gguf_name


def test_every_hf_layout_gives_the_same_mmproj(tmp_path):
    """The Hub's checkpoints (``vision_tower.vision_model.*``), transformers 5's original-format save
    (``vision_tower.*``) and its own (``model.vision_tower.*``, ``model.multi_modal_projector.*``)."""
    src = _hf_model(tmp_path / "saved", FAMILY)
    weights = safetensors_numpy.load_file(str(src / "model.safetensors"))
    layouts = {
        "hub": {(n.replace("vision_tower.", "vision_tower.vision_model.", 1) if n.startswith("vision_tower.") else n): w
                for n, w in weights.items()},
        "own": {("model." + n if n.startswith(("vision_tower.", "multi_modal_projector.")) else n): w
                for n, w in weights.items()},
    }
    written = [tmp_path / "saved.gguf"]
    gguf_format.write(written[0], mmproj.from_hf(st_format.read(src), name="tiny"))
    for layout, renamed in layouts.items():
        directory = tmp_path / layout
        shutil.copytree(src, directory)
        safetensors_numpy.save_file(renamed, str(directory / "model.safetensors"))
        written.append(tmp_path / f"{layout}.gguf")
        gguf_format.write(written[-1], mmproj.from_hf(st_format.read(directory), name="tiny"))
    assert len({p.read_bytes() for p in written}) == 1


def _edited(src: Path, dst: Path, **vision_changes) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config["vision_config"].update(vision_changes)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_refusals_name_the_problem(tmp_path):
    src = _hf_model(tmp_path / "hf", FAMILY)
    with pytest.raises(FormatError, match="hidden_act='gelu'.*gelu_pytorch_tanh"):
        mmproj.from_hf(st_format.read(_edited(src, tmp_path / "act", hidden_act="gelu")))
    with pytest.raises(FormatError, match=r"v\.position_embd\.weight has shape \[16, 32\], config.json implies \[64, 32\]"):
        mmproj.from_hf(st_format.read(_edited(src, tmp_path / "size", image_size=112)))
    weights = safetensors_numpy.load_file(str(src / "model.safetensors"))
    del weights["vision_tower.post_layernorm.bias"]
    shutil.copytree(src, tmp_path / "missing")
    safetensors_numpy.save_file(weights, str(tmp_path / "missing" / "model.safetensors"))
    with pytest.raises(FormatError, match="lacks the vision tensors v.post_ln.bias"):
        mmproj.from_hf(st_format.read(tmp_path / "missing"))
    text_only = _hf_model(tmp_path / "text", "gemma3")
    with pytest.raises(FormatError, match="Gemma3ForCausalLM has no vision tower"):
        mmproj.from_hf(st_format.read(text_only))


def test_convert_writes_the_mmproj_beside_the_text_model(model, tmp_path):
    """`slmpkg convert --mmproj FILE`: the same two files as the API, and no "left out" warning."""
    from click.testing import CliRunner

    from slmpkg.cli import main

    _, src, text, vision = model
    out, proj = tmp_path / "text.gguf", tmp_path / "mmproj.gguf"
    done = CliRunner().invoke(main, ["convert", str(src), "-o", str(out), "--quant", "F32", "--mmproj", str(proj),
                                     "--json"])
    assert done.exit_code == 0, done.output
    assert "left out" not in done.output and json.loads(done.output)["files"] == [str(out), str(proj)]
    assert out.read_bytes() == text.read_bytes()
    gguf_format.write(tmp_path / "api.gguf", mmproj.from_hf(st_format.read(src), name=src.name))
    assert proj.read_bytes() == (tmp_path / "api.gguf").read_bytes()
    plain = CliRunner().invoke(main, ["convert", str(src), "-o", str(tmp_path / "t.gguf"), "--quant", "F32", "-q"])
    assert "--mmproj" in plain.output  # the warning says how to keep the tower
