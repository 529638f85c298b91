"""``slmpkg build``: one recipe → every target's artifact, measured, signed with provenance, published.

A build plans a small graph from the recipe (:mod:`slmpkg.recipe`):

- each **distinct artifact** (format, quantization, options) is made once and shared by every target
  that wants it (Q4_K_M GGUF for AVX2, AVX-512, Metal and Jetson);
- a **float GGUF** of the source (in the source's own float type, so nothing is rounded) feeds every
  GGUF preset when two or more are made in one run; with one, the preset is converted in one pass
  from the source. Both give the same bytes (tested), so the choice is only about speed;
- an ONNX artifact whose quantization is a GGUF preset carries that GGUF's blocks onto MatMulNBits
  (``onnx-Q4_0`` reuses ``gguf-Q4_0``);
- every artifact is **evaluated** against the source (:mod:`slmpkg.evaluation`), checked against the
  recipe's quality gate, then **signed**: a SLSA provenance statement (:mod:`slmpkg.provenance`) and an
  OpenSSF model-signing ``model.sig`` in its directory;
- only when every gate of the run passed is anything **published**: one push per target (blobs are
  shared), then the tags, once the version's index holds every target of the recipe.

Each step is what one ``slmpkg`` command does by hand (:attr:`Step.argv`); ``--plan`` prints them.
Steps are incremental: a step whose inputs (source digests, options, upstream steps, slmpkg version)
are unchanged and whose outputs are still in place is skipped, so a second build does nothing.
``only`` runs one job (an artifact id or a target name) with what it needs: parallel CI jobs pushing
to one registry merge into one signed index (the registry's compare-and-swap).

Layout of the build directory::

    artifacts/<artifact-id>/   the published directories (model files, provenance.sigstore.json, model.sig)
    work/                      intermediates (float GGUF, GGUFs only an ONNX artifact needs)
    reports/                   quality.json / .md / .html and plots
    source/                    Hub sources, downloaded (resumable)
    .state/                    what each step was made from

Example:
    >>> from slmpkg.build import Builder
    >>> from slmpkg.recipe import load_recipe
    >>> result = Builder(load_recipe("slmpkg.toml"), "slmpkg-build").run()    # doctest: +SKIP
    >>> [(s.id, s.status) for s in result.steps][:2]                           # doctest: +SKIP
    [('float', 'built'), ('gguf-Q4_K_M', 'built')]
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import os
import shlex
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

from . import __version__
from .errors import SlmpkgError, UsageError
from .recipe import ArtifactSpec, Recipe, RecipeError

__all__ = ["Builder", "BuildResult", "CheckResult", "GateError", "Plan", "Step", "StepResult", "plan"]

PathLike = Union[str, "os.PathLike[str]"]


class GateError(SlmpkgError):
    """An artifact missed the recipe's quality gate; nothing was published."""


# ---- the plan -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Node:
    """Something a build makes: the float GGUF, or an artifact (published or an intermediate)."""

    id: str
    spec: Optional[ArtifactSpec]  # None for the float GGUF
    deps: tuple[str, ...] = ()
    published: bool = True
    targets: tuple[str, ...] = ()

    @property
    def is_gguf(self) -> bool:
        return self.spec is None or self.spec.format == "gguf"


@dataclass(frozen=True)
class Plan:
    """The graph of a recipe: nodes in build order, and one job per published artifact."""

    recipe: Recipe
    source_kind: str  # "hf", "gguf" or "onnx"
    nodes: dict[str, Node]

    @property
    def jobs(self) -> list[Node]:
        return [n for n in self.nodes.values() if n.published]

    def job(self, name: str) -> Node:
        """A job by artifact id or by a target it serves."""
        for n in self.jobs:
            if n.id == name or name in n.targets:
                return n
        known = ", ".join(n.id for n in self.jobs)
        raise UsageError(f"{name!r}: no such job (jobs: {known}; a target name picks its job)")

    def closure(self, ids: Sequence[str]) -> list[str]:
        """``ids`` and what they need, in build order."""
        need: set[str] = set()
        stack = list(ids)
        while stack:
            i = stack.pop()
            if i not in need:
                need.add(i)
                stack.extend(self.nodes[i].deps)
        return [i for i in self.nodes if i in need]


def _source_kind(source: str) -> str:
    if source.startswith("hf://"):
        return "hf"
    p = Path(source)
    if p.is_file():
        with open(p, "rb") as f:
            if f.read(4) == b"GGUF":
                return "gguf"
    from .pipeline import _is_onnx

    if _is_onnx(p):
        return "onnx"
    return "hf"


def plan(recipe: Recipe) -> Plan:
    """The build graph of ``recipe`` (no files are read but the source's first bytes)."""
    kind = _source_kind(recipe.source)
    nodes: dict[str, Node] = {}
    artifacts = recipe.artifacts()
    gguf_needed = any(a.format == "gguf" or a.carries_gguf for a in artifacts)
    if gguf_needed and kind != "gguf":
        nodes["float"] = Node("float", None, published=False)
    float_deps = ("float",) if "float" in nodes else ()
    published = {a: a for a in artifacts}
    # GGUFs first: an ONNX artifact may carry one of them
    for a in artifacts:
        if a.format == "gguf":
            nodes[a.id] = Node(a.id, a, float_deps, True, a.targets)
    for a in artifacts:
        if a.format == "gguf":
            continue
        deps: tuple[str, ...] = ()
        if a.carries_gguf:
            gguf_opts = tuple((k, v) for k, v in a.options if k not in ("accuracy_level", "exact_mins", "dtype"))
            g = ArtifactSpec("gguf", a.quant, gguf_opts)
            if g not in published and g.id not in nodes:
                nodes[g.id] = Node(g.id, g, float_deps, published=False)
            deps = (g.id,)
        nodes[a.id] = Node(a.id, a, deps, True, a.targets)
    return Plan(recipe, kind, nodes)


# ---- steps --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One command of a build: ``argv`` is what a person would type, ``run`` does it through the API."""

    id: str
    argv: tuple[str, ...]
    run: Callable[[], Any] = field(repr=False, compare=False)

    @property
    def command(self) -> str:
        return shlex.join(self.argv)


@dataclass(frozen=True)
class StepResult:
    id: str
    status: str  # "built", "up to date", "skipped", "failed"
    seconds: float = 0.0
    detail: str = ""


@dataclass
class BuildResult:
    recipe: str
    out_dir: Path
    steps: list[StepResult] = field(default_factory=list)
    artifacts: dict[str, Path] = field(default_factory=dict)  # artifact id -> directory
    reports: dict[str, Any] = field(default_factory=dict)  # artifact id -> QualityReport summary
    gate: Optional[dict[str, Any]] = None
    published: list[dict[str, Any]] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    report_files: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def changed(self) -> bool:
        return any(s.status == "built" for s in self.steps)

    def to_dict(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe, "out_dir": str(self.out_dir), "seconds": round(self.seconds, 3),
            "changed": self.changed,
            "steps": [dataclasses.asdict(s) for s in self.steps],
            "artifacts": {k: str(v) for k, v in self.artifacts.items()},
            "quality": self.reports, "gate": self.gate, "published": self.published, "tags": self.tags,
            "reports": self.report_files,
        }


@dataclass
class CheckResult:
    """``slmpkg build --check``: each target's rebuilt model files against what was published."""

    against: str
    targets: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def reproducible(self) -> bool:
        return all(t["match"] for t in self.targets.values())

    def to_dict(self) -> dict[str, Any]:
        return {"against": self.against, "reproducible": self.reproducible, "targets": self.targets}


def _shown(p: Path) -> str:
    """A path as a command shows it: relative to the current directory when it is below it."""
    with contextlib.suppress(ValueError):
        return str(Path(os.path.abspath(p)).relative_to(Path.cwd()))
    return str(p)


def _digest_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _float_type(source: Path, kind: str) -> Optional[str]:
    """The float GGUF's type: the one float type every 2-D source tensor has (nothing is rounded), else F32."""
    if kind != "hf":
        return None
    from .formats import safetensors as st_format
    from .quant import QuantType

    types = {t.qtype for t in st_format.read(source).tensors if len(t.shape) >= 2}
    floats = types & {QuantType.F32, QuantType.F16, QuantType.BF16}
    return floats.pop().name if len(floats) == 1 and types == floats else "F32"


# ---- the builder --------------------------------------------------------------------------------


class Builder:
    """Runs a recipe's plan in ``out_dir``.

    ``key``: the private key that signs artifacts, provenance and the registry index (default: the
    recipe's ``publish.key``); without one, artifacts are built and measured but neither signed nor
    published. ``registry``/``endpoint_url`` override the recipe's. ``log`` receives one line per step.
    """

    def __init__(
        self,
        recipe: Recipe,
        out_dir: PathLike,
        *,
        key: Optional[PathLike] = None,
        registry: Optional[str] = None,
        endpoint_url: Optional[str] = None,
        threads: Optional[int] = None,
        log: Optional[Callable[[str], None]] = None,
    ):
        self.recipe = recipe
        self.plan = plan(recipe)
        self.out = Path(os.path.abspath(out_dir))
        self.key = Path(key) if key is not None else recipe.publish.key
        self.registry = registry or recipe.publish.registry
        self.endpoint_url = endpoint_url or recipe.publish.endpoint_url
        self.threads = threads
        self.log = log or (lambda line: None)
        self.state_dir = self.out / ".state"
        self._source: Any = None
        self._float_type: Optional[str] = None
        self._keys: dict[str, str] = {}

    # -- paths ----------------------------------------------------------------------------------

    @property
    def model_stem(self) -> str:
        return self.recipe.name.rsplit("/", 1)[-1]

    def artifact_dir(self, node: Node) -> Path:
        return (self.out / "artifacts" if node.published else self.out / "work") / node.id

    def output(self, node: Node) -> Path:
        """Where a node's result lives: the float/GGUF file, or the ONNX/safetensors directory."""
        if node.spec is None:
            return self.out / "work" / "float.gguf"
        if node.spec.format == "gguf":
            return self.artifact_dir(node) / f"{self.model_stem}-{node.spec.quant}.gguf"
        return self.artifact_dir(node)

    # -- the source -----------------------------------------------------------------------------

    def source(self):
        if self._source is None:
            from .sources import DigestCache, resolve_source

            self.log(f"source: {self.recipe.source}")
            self._source = resolve_source(self.recipe.source, download_dir=self.out / "source",
                                          cache=DigestCache(self.state_dir / "digests.json"))
        return self._source

    # -- steps ----------------------------------------------------------------------------------

    def _quant_options(self, spec: ArtifactSpec):
        from .presets import QuantOptions

        return QuantOptions(spec.quant, pure=spec.option("pure", False),
                            leave_output_tensor=spec.option("leave_output_tensor", False),
                            output_tensor_type=spec.option("output_tensor_type"),
                            token_embedding_type=spec.option("token_embedding_type"),
                            tensor_type_overrides=spec.option("tensor_types", ()))

    def steps_for(self, node: Node, via_float: bool, source: Optional[Path] = None) -> Step:
        """The command that makes ``node``. ``via_float``: GGUFs are quantized from the float GGUF
        rather than converted from the source in one pass. ``source``: the local source (None while
        planning a Hub source that is not downloaded yet)."""
        from .pipeline import convert, quantize_file

        src = source if source is not None else Path("<source>")
        src_arg = _shown(src)
        out = self.output(node)
        threads = self.threads
        if node.spec is None:  # the float GGUF
            ftype = self._float_type or (_float_type(src, self.plan.source_kind) if source is not None else None)
            argv = ["slmpkg", "convert", src_arg, "-o", _shown(out)] + (["--quant", ftype] if ftype else []) + ["-q"]
            return Step(node.id, tuple(argv), lambda: convert(src, out, quant=ftype, threads=threads, progress=False))
        spec = node.spec
        if spec.format == "gguf":
            imatrix = spec.option("imatrix")
            options = self._quant_options(spec)
            extra = [] if imatrix is None else ["--imatrix", _shown(imatrix)]
            if spec.option("pure"):
                extra.append("--pure")
            if spec.option("leave_output_tensor"):
                extra.append("--leave-output-tensor")
            if spec.option("output_tensor_type"):
                extra += ["--output-tensor-type", spec.option("output_tensor_type")]
            if spec.option("token_embedding_type"):
                extra += ["--token-embedding-type", spec.option("token_embedding_type")]
            for tt in spec.option("tensor_types", ()):
                extra += ["--tensor-type", tt]
            if via_float or self.plan.source_kind == "gguf":
                base = src if self.plan.source_kind == "gguf" else self.output(self.plan.nodes["float"])
                argv = ["slmpkg", "quantize", _shown(base), "-o", _shown(out), "--quant", spec.quant, *extra, "-q"]
                run = lambda: quantize_file(base, out, options, imatrix=imatrix, threads=threads, progress=False)  # noqa: E731
            else:
                argv = ["slmpkg", "convert", src_arg, "-o", _shown(out), "--quant", spec.quant, *extra, "-q"]
                run = lambda: convert(src, out, quant=options, imatrix=imatrix, threads=threads, progress=False)  # noqa: E731
            return Step(node.id, tuple(argv), lambda: (out.parent.mkdir(parents=True, exist_ok=True), run()))
        if spec.format == "onnx":
            from .formats.onnx import LinearWeights

            extra: list[str] = []
            linear = None
            knobs = {k: spec.option(k) for k in ("block_size", "accuracy_level", "asymmetric", "exact_mins")}
            if any(v is not None for v in knobs.values()):
                linear = LinearWeights(block_size=knobs["block_size"] or 32, accuracy_level=knobs["accuracy_level"] or 0,
                                       symmetric=not knobs["asymmetric"], separate_min=bool(knobs["exact_mins"]))
                if knobs["block_size"] is not None:
                    extra += ["--block-size", str(knobs["block_size"])]
                if knobs["accuracy_level"] is not None:
                    extra += ["--accuracy-level", str(knobs["accuracy_level"])]
                if knobs["asymmetric"]:
                    extra.append("--asymmetric")
                if knobs["exact_mins"]:
                    extra.append("--exact-mins")
            dtype = spec.option("dtype")
            if dtype is not None:
                extra += ["--dtype", dtype]
            if spec.carries_gguf:
                base = self.output(self.plan.nodes[node.deps[0]])
                argv = ["slmpkg", "convert", _shown(base), "-o", _shown(out), "--to", "onnx", *extra, "-q"]
                run = lambda: convert(base, out, to="onnx", dtype=dtype, linear_weights=linear, threads=threads,  # noqa: E731
                                      progress=False)
            else:
                argv = ["slmpkg", "convert", src_arg, "-o", _shown(out), "--to", "onnx", "--quant", spec.quant, *extra, "-q"]
                run = lambda: convert(src, out, to="onnx", quant=spec.quant, dtype=dtype, linear_weights=linear,  # noqa: E731
                                      threads=threads, progress=False)
            return Step(node.id, tuple(argv), run)
        dtype = spec.quant.lower()
        argv = ["slmpkg", "convert", src_arg, "-o", _shown(out), "--to", "safetensors", "--dtype", dtype, "-q"]
        return Step(node.id, tuple(argv),
                    lambda: convert(src, out, to="safetensors", dtype=dtype, threads=threads, progress=False))

    def _uses_float(self, ids: Sequence[str]) -> bool:
        """Whether the float GGUF pays off for building ``ids``: two or more GGUFs from one HF/ONNX source."""
        if "float" not in self.plan.nodes:
            return False
        ggufs = [i for i in ids if i != "float" and self.plan.nodes[i].is_gguf]
        return len(ggufs) >= 2

    def commands(self, only: Optional[str] = None) -> list[Step]:
        """The conversion commands a build (or one job) runs from scratch, in order."""
        ids = self._selected(only)
        via_float = self._uses_float(ids)
        src = Path(self.recipe.source) if not self.recipe.source_is_hub else None
        return [self.steps_for(self.plan.nodes[i], via_float, src) for i in ids if i != "float" or via_float]

    def _selected(self, only: Optional[str]) -> list[str]:
        if only is None:
            return list(self.plan.nodes)
        return self.plan.closure([self.plan.job(only).id])

    # -- incremental state ----------------------------------------------------------------------

    def _state_file(self, what: str) -> Path:
        return self.state_dir / f"{what}.json"

    def _load_state(self, what: str) -> Optional[dict[str, Any]]:
        try:
            return json.loads(self._state_file(what).read_text())
        except (OSError, ValueError):
            return None

    def _save_state(self, what: str, state: dict[str, Any]) -> None:
        from ._io import atomic_writes

        self.state_dir.mkdir(parents=True, exist_ok=True)
        with atomic_writes([self._state_file(what)]) as (f,):
            f.write(json.dumps(state, indent=1, sort_keys=True).encode())

    @staticmethod
    def _files_of(path: Path, signatures: bool = False) -> dict[str, list[int]]:
        """Identity of a result's files: ``{relative name: [size, mtime_ns]}``; the signature and the
        provenance count only for the sign step (``signatures``)."""
        from .provenance import PROVENANCE_FILE
        from .signing import DEFAULT_SIGNATURE_NAME

        if path.is_file():
            st = path.stat()
            return {path.name: [st.st_size, st.st_mtime_ns]}
        out = {}
        if path.is_dir():
            for p in sorted(path.rglob("*")):
                rel = p.relative_to(path).as_posix()
                if p.is_file() and (signatures or rel not in (DEFAULT_SIGNATURE_NAME, PROVENANCE_FILE)):
                    st = p.stat()
                    out[rel] = [st.st_size, st.st_mtime_ns]
        return out

    def _up_to_date(self, what: str, key: str, path: Path, signatures: bool = False) -> bool:
        state = self._load_state(what)
        return (bool(state) and state.get("key") == key and path.exists()
                and state.get("files") == self._files_of(path, signatures))

    def node_key(self, node_id: str) -> str:
        """What a node's bytes depend on: the source, its options and inputs, slmpkg's version."""
        if node_id not in self._keys:
            self._keys[node_id] = self._node_key(node_id)
        return self._keys[node_id]

    def _node_key(self, node_id: str) -> str:
        node = self.plan.nodes[node_id]
        extra = {}
        if node.spec is not None and node.spec.option("imatrix") is not None:
            from ._io import sha256_file

            extra["imatrix"] = sha256_file(node.spec.option("imatrix"))
        spec = node.spec.to_dict() if node.spec is not None else {"float": self._float_type}
        spec.pop("targets", None)
        return _digest_json({
            "node": node_id, "spec": spec, "source": self.source().digest, "extra": extra,
            # a GGUF made from the float or in one pass is the same file, so the float is not an input
            "deps": [self.node_key(d) for d in node.deps if d != "float"],
            "slmpkg": __version__,
        })

    # -- running --------------------------------------------------------------------------------

    def run(self, only: Optional[str] = None, *, publish: bool = True, evaluate: bool = True,
            sign: bool = True) -> BuildResult:
        """Build (and measure, sign, publish) the whole recipe or one job. Raises :class:`GateError`
        when an artifact misses the gate (then nothing is published)."""
        start = time.monotonic()
        started = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        result = BuildResult(str(self.recipe.path or "recipe"), self.out)
        publishing = publish and self._publish_configured()
        signer = self._signer() if sign and self.key is not None else None
        if publishing and signer is None:
            raise RecipeError(f"{self.recipe.path}: publish needs a signing key (publish.key or --key)")
        ids = self._selected(only)
        source = self.source()
        self._float_type = _float_type(source.path, self.plan.source_kind)

        # 1. artifacts, skipping what is up to date
        stale = {i for i in ids if not self._up_to_date(i, self.node_key(i), self.output(self.plan.nodes[i]))}
        via_float = self._uses_float([i for i in stale if i != "float"])
        for i in ids:
            node = self.plan.nodes[i]
            if i == "float" and not via_float:
                continue  # at most one GGUF to make in this run: converted from the source in one pass
            if i not in stale:
                result.steps.append(StepResult(i, "up to date"))
                self.log(f"{i}: up to date")
                continue
            step = self.steps_for(node, via_float, source.path)
            self._clear(node)
            self.log(f"{i}: {step.command}")
            t = time.monotonic()
            step.run()
            made_from = [c for d in node.deps if (d != "float" or via_float)
                         for c in (self._load_state(d) or {}).get("commands", [])]
            self._save_state(i, {"key": self.node_key(i), "files": self._files_of(self.output(node)),
                                 "commands": made_from + [step.command]})
            result.steps.append(StepResult(i, "built", time.monotonic() - t))
        # with --only, what the job needs is built but measured, signed and published by its own job
        jobs = [self.plan.job(only)] if only else [self.plan.nodes[i] for i in ids if self.plan.nodes[i].published]
        for node in jobs:
            result.artifacts[node.id] = self.artifact_dir(node)

        # 2. quality, and the gate
        reports = self._evaluate(jobs, result) if evaluate else {}
        if evaluate:
            result.gate = self._gate(jobs, reports)
            result.report_files = self._write_reports(reports, result.gate)
            if not result.gate["passed"]:
                failed = [r for r in result.gate["results"] if not r["passed"]]
                raise GateError(f"{self.recipe.path}: quality gate failed for {len(failed)} target(s), nothing "
                                f"published: " + "; ".join(f"{r['target']} ({r['artifact']}): {r['detail']}" for r in failed[:3]))

        # 3. provenance and signatures
        if signer is not None:
            for node in jobs:
                self._sign(node, signer, reports.get(node.id), started, result)

        # 4. publish
        if publishing:
            self._publish(jobs, signer, result)
        result.seconds = time.monotonic() - start
        return result

    def _clear(self, node: Node) -> None:
        """Remove a node's previous result (and its signatures) before it is made again."""
        target = self.artifact_dir(node) if node.spec is not None else self.output(node)
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        for what in (node.id, f"eval-{node.id}", f"sign-{node.id}"):
            with contextlib.suppress(FileNotFoundError):
                self._state_file(what).unlink()

    # -- quality --------------------------------------------------------------------------------

    def _eval_key(self, node: Node) -> str:
        q = self.recipe.quality
        text = q.text.read_bytes() if q.text is not None else b""
        return _digest_json({"artifact": self.node_key(node.id), "source": self.source().digest,
                             "text": hashlib.sha256(text).hexdigest(), "context": q.context, "chunks": q.chunks,
                             "runtime": self._runtime_wanted()})

    def _runtime_wanted(self) -> Optional[bool]:
        q = self.recipe.quality
        gated = q.gated or any("max_kld" in s or "min_top1" in s for s in self.recipe.targets.values())
        return True if gated else q.runtime

    def _evaluate(self, jobs: list[Node], result: BuildResult) -> dict[str, Any]:
        from .evaluation import QualityReport, evaluate_many

        reports: dict[str, QualityReport] = {}
        todo = []
        for node in jobs:
            key = self._eval_key(node)
            state = self._load_state(f"eval-{node.id}")
            if state and state.get("key") == key:
                reports[node.id] = QualityReport.from_dict(state["report"])
                result.steps.append(StepResult(f"eval {node.id}", "up to date"))
            else:
                todo.append(node)
        if todo:
            q = self.recipe.quality
            text = q.text.read_text("utf-8") if q.text is not None else None
            t = time.monotonic()
            self.log(f"eval: {', '.join(n.id for n in todo)} against {self.recipe.source}")
            made = evaluate_many([self.artifact_dir(n) for n in todo], self.source().path, text=text,
                                 context=q.context, max_chunks=q.chunks, runtime=self._runtime_wanted(),
                                 labels=[n.id for n in todo])
            per = (time.monotonic() - t) / len(todo)
            for node, report in zip(todo, made):
                report.targets = list(node.targets)
                reports[node.id] = report
                self._save_state(f"eval-{node.id}", {"key": self._eval_key(node), "report": report.to_dict()})
                result.steps.append(StepResult(f"eval {node.id}", "built", per))
        for node in jobs:
            reports[node.id].targets = list(node.targets)
            result.reports[node.id] = reports[node.id].summary()
        return reports

    def _gate(self, jobs: list[Node], reports: dict[str, Any]) -> dict[str, Any]:
        rows = []
        for node in jobs:
            report = reports[node.id]
            for t in node.targets:
                max_kld, min_top1 = self.recipe.gate(t)
                if max_kld is None and min_top1 is None:
                    continue
                rt = report.runtime
                problems = []
                if rt is None:
                    problems.append(f"no runtime statistics ({report.runtime_skipped})")
                else:
                    if max_kld is not None and not rt.mean_kld <= max_kld:
                        problems.append(f"mean KLD {rt.mean_kld:.4g} > max_kld {max_kld:g}")
                    if min_top1 is not None and not rt.same_top1 >= min_top1:
                        problems.append(f"same top-1 {rt.same_top1:.3f} < min_top1 {min_top1:g}")
                detail = "; ".join(problems) if problems else (
                    f"mean KLD {rt.mean_kld:.4g}, same top-1 {rt.same_top1:.3f}")
                rows.append({"target": t, "artifact": node.id, "passed": not problems, "detail": detail,
                             "max_kld": max_kld, "min_top1": min_top1})
        return {"passed": all(r["passed"] for r in rows), "results": rows}

    def _write_reports(self, reports: dict[str, Any], gate: dict[str, Any]) -> dict[str, str]:
        from .evaluation import write_report

        title = f"{self.recipe.name}:{self.recipe.version} quality"
        paths = write_report(list(reports.values()), self.out / "reports", title=title, gate=gate)
        return {k: str(v) for k, v in paths.items()}

    # -- signing --------------------------------------------------------------------------------

    def _signer(self):
        from .signing import KeySigner

        return KeySigner(self.key)

    def _sign(self, node: Node, signer: Any, report: Any, started: str, result: BuildResult) -> None:
        from . import provenance, signing
        from .evaluation import report_digest
        from ._io import sha256_file

        directory = self.artifact_dir(node)
        parameters = self._external_parameters(node)
        key = _digest_json({"artifact": self.node_key(node.id), "signer": signer.key_hint, "parameters": parameters,
                            "quality": report_digest(report) if report is not None else None})
        if self._up_to_date(f"sign-{node.id}", key, directory, signatures=True):
            result.steps.append(StepResult(f"sign {node.id}", "up to date"))
            return
        t = time.monotonic()
        files = [(name, sha256_file(p)) for name, p in provenance.artifact_files(directory)]
        src = self.source()
        base = self._source_uri_base()
        deps = [{"uri": base if src.path.is_file() else f"{base}/{f.name}", "name": f.name,
                 "digest": {"sha256": f.sha256}} for f in src.files]
        imatrix = node.spec.option("imatrix") if node.spec else None
        if imatrix is not None:
            deps.append({"uri": Path(imatrix).as_uri(), "name": Path(imatrix).name,
                         "digest": {"sha256": sha256_file(imatrix)}})
        byproducts = []
        if report is not None:
            byproducts.append({"name": "quality.json", "digest": {"sha256": report_digest(report)},
                               "annotations": report.summary()})
        statement = provenance.make_statement(
            files, {**parameters, "sourceDigest": src.digest,
                    "commands": (self._load_state(node.id) or {}).get("commands", [])},
            deps, started=started, byproducts=byproducts,
        )
        for stale in (directory / provenance.PROVENANCE_FILE, directory / signing.DEFAULT_SIGNATURE_NAME):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
        provenance.attest(directory, statement, signer)
        signing.sign(directory, signer)
        self._save_state(f"sign-{node.id}", {"key": key, "files": self._files_of(directory, signatures=True)})
        result.steps.append(StepResult(f"sign {node.id}", "built", time.monotonic() - t))
        self.log(f"sign {node.id}: provenance.sigstore.json, model.sig")

    def _external_parameters(self, node: Node) -> dict[str, Any]:
        """What of the recipe shaped this artifact (another target's settings do not: changing them
        leaves this artifact's provenance, signature and published manifest alone)."""
        gates = {t: dict(zip(("max_kld", "min_top1"), self.recipe.gate(t))) for t in node.targets}
        q = self.recipe.quality
        return {"recipe": self.recipe.path.name if self.recipe.path else None, "name": self.recipe.name,
                "version": self.recipe.version, "source": self._source_uri_base(), "artifact": node.spec.to_dict(),
                "targets": list(node.targets),
                "quality": {"gates": gates, "context": q.context, "chunks": q.chunks,
                            "text": q.text.name if q.text else None}}

    def _source_uri_base(self) -> str:
        """How provenance names the source: its Hub commit, or the path the recipe gives."""
        if self.recipe.source_is_hub:
            return self.source().uri
        return str(self.recipe.document.get("source", self.recipe.source))

    # -- publishing -----------------------------------------------------------------------------

    def _publish_configured(self) -> bool:
        return self.registry is not None or bool(self.recipe.document.get("publish"))

    def store(self):
        from .registry import open_store

        options = {"endpoint_url": self.endpoint_url} if self.endpoint_url and str(self.registry or "").startswith("s3://") else {}
        return open_store(self.registry, **options)

    def _publish(self, jobs: list[Node], signer: Any, result: BuildResult) -> None:
        from .registry import ls, push, tag
        from .registry.errors import ConflictError, NotFoundError

        store = self.store()
        verifier = signer.verifier()
        ref = f"{self.recipe.name}:{self.recipe.version}"
        expires = dt.timedelta(days=self.recipe.publish.expires_days or 365)
        try:
            index = ls(store, ref, verifier=verifier)
        except NotFoundError:
            index = {"targets": {}, "manifests": {}}
        for node in jobs:
            sign_state = self._load_state(f"sign-{node.id}") or {}
            for target in node.targets:
                what = f"publish-{target}"
                state = self._load_state(what)
                published = (index.get("targets") or {}).get(target, {}).get("digest")
                if state and state.get("sign") == sign_state.get("key") and state.get("registry") == store.url \
                        and state.get("manifest") == published:
                    result.steps.append(StepResult(f"push {target}", "up to date"))
                    continue
                if published and self._same_model_files(node, index["manifests"].get(target, {})):
                    # made again from scratch (a rerun CI job): the same model, signed again at another
                    # time; what is published stays, with its own provenance and signature
                    result.steps.append(StepResult(f"push {target}", "up to date",
                                                   detail="published earlier with the same model files"))
                    self.log(f"push {target}: {ref} already holds these model files")
                    continue
                t = time.monotonic()
                quant, bpw = self._manifest_quant(node)
                try:
                    pushed = push(store, ref, self.artifact_dir(node), target, signer, verifier=verifier,
                                  format=node.spec.format, quant=quant, bits_per_weight=bpw,
                                  source_digest=f"sha256:{self.source().digest}",
                                  options={"artifact": node.id, **node.spec.to_dict()["options"]},
                                  expires_in=expires)
                except ConflictError as e:
                    if "other content" not in str(e):
                        raise
                    raise ConflictError(f"{ref} is already published for {target} with other model files than "
                                        f"{node.id} has now; raise the version in {self.recipe.path}") from None
                self._save_state(what, {"sign": sign_state.get("key"), "registry": store.url,
                                        "manifest": pushed.manifest_digest})
                result.published.append({"target": target, "artifact": node.id, "manifest": pushed.manifest_digest,
                                         "index_version": pushed.index_version,
                                         "uploaded_bytes": pushed.uploaded_bytes})
                result.steps.append(StepResult(f"push {target}", "built", time.monotonic() - t))
                self.log(f"push {target}: {ref} ← {node.id} (index v{pushed.index_version})")
        # Tags move once the version is complete: whichever job completes it (matrix jobs finish in
        # any order) sees every target in the index it reads after its own push.
        if self.recipe.publish.tags:
            index = ls(store, ref, verifier=verifier)
            missing = sorted(set(self.recipe.targets) - set(index.get("targets") or {}))
            if missing:
                self.log(f"tags wait: {ref} still lacks {', '.join(missing)}")
            else:
                for t in self.recipe.publish.tags:
                    tag(store, f"{self.recipe.name}:{t}", self.recipe.version, signer, verifier=verifier,
                        expires_in=expires)
                    result.tags.append(t)

    def _same_model_files(self, node: Node, manifest: dict[str, Any]) -> bool:
        """Whether a published manifest holds exactly this artifact's model files (signatures aside)."""
        from . import provenance
        from ._io import sha256_file

        skip = ("model.sig", provenance.PROVENANCE_FILE)
        theirs = {f["path"]: f["digest"].removeprefix("sha256:") for f in manifest.get("files", []) if f["path"] not in skip}
        local = provenance.artifact_files(self.artifact_dir(node))
        return bool(theirs) and len(theirs) == len(local) and all(theirs.get(n) == sha256_file(p) for n, p in local)

    def _manifest_quant(self, node: Node) -> tuple[Optional[str], Optional[float]]:
        if node.spec.format != "gguf":
            return node.spec.quant, None
        from .inspection import inspect_file

        summary = inspect_file(self.output(node))
        return node.spec.quant, round(summary.bits_per_weight, 3)

    # -- reproducibility ------------------------------------------------------------------------

    def check(self, *, pub: Optional[PathLike] = None) -> CheckResult:
        """Rebuild every artifact from scratch in a temporary directory and compare its model files'
        digests with the published manifests (or, with nothing to publish to, with this build
        directory's artifacts)."""
        from . import provenance
        from ._io import sha256_file

        published: dict[str, dict[str, str]] = {}
        if self._publish_configured():
            from .registry import ls
            from .signing import KeySigner, KeyVerifier

            if pub is not None:
                verifier = KeyVerifier(pub)
            elif self.key is not None:
                verifier = KeySigner(self.key).verifier()
            else:
                raise UsageError("--check against a registry needs --pub or a signing key to verify its index")
            store = self.store()
            index = ls(store, f"{self.recipe.name}:{self.recipe.version}", verifier=verifier)
            for target, m in index.get("manifests", {}).items():
                published[target] = {f["path"]: f["digest"].removeprefix("sha256:") for f in m["files"]}
            against = f"{store.url} {self.recipe.name}:{self.recipe.version}"
        else:
            for node in self.plan.jobs:
                files = {n: sha256_file(p) for n, p in provenance.artifact_files(self.artifact_dir(node))}
                for target in node.targets:
                    published[target] = files
            against = str(self.out / "artifacts")
        with tempfile.TemporaryDirectory(prefix=".check-", dir=self.out.parent if self.out.parent.exists() else None) as tmp:
            fresh = Builder(self.recipe, tmp, key=None, registry=None, threads=self.threads, log=self.log)
            fresh._source = self.source()
            fresh.run(publish=False, evaluate=False, sign=False)
            result = CheckResult(against)
            for node in fresh.plan.jobs:
                rebuilt = {n: sha256_file(p) for n, p in provenance.artifact_files(fresh.artifact_dir(node))}
                for target in node.targets:
                    theirs = {n: d for n, d in published.get(target, {}).items()
                              if n not in ("model.sig", provenance.PROVENANCE_FILE)}
                    differ = sorted(n for n in set(rebuilt) | set(theirs) if rebuilt.get(n) != theirs.get(n))
                    result.targets[target] = {"artifact": node.id, "match": bool(theirs) and not differ,
                                              "published": bool(theirs), "differ": differ}
        return result
