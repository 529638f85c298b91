"""Build provenance: an in-toto statement with a SLSA provenance v1 predicate, DSSE-signed with the release
key, kept beside the artifact's files (``provenance.sigstore.json``) so it travels with every push and pull.

The statement's subjects are the artifact's model files (every file but the signature and the
provenance itself). Its predicate records what went in: the recipe, the artifact's format,
quantization and options, the targets it serves, every source file with its sha256
(``resolvedDependencies``), the importance matrix if any, and the versions of slmpkg and the libraries
that shape the bytes; ``runDetails`` names the builder (the CI run when there is one) and the times.
A quality report, when the build measured one, rides along as a byproduct.

Example:
    >>> statement = make_statement(["out/model.gguf"], build_type_params, dependencies)   # doctest: +SKIP
    >>> attest("out", statement, KeySigner("release.pem"))                                # doctest: +SKIP
    >>> verify_provenance("out", KeyVerifier("release.pub.pem")).source_uri              # doctest: +SKIP
    'hf://org/tiny@4f1c...'
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import platform
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

from . import __version__
from ._io import atomic_writes
from .errors import SignatureError

__all__ = [
    "PROVENANCE_FILE", "SLSA_PREDICATE", "BUILD_TYPE", "Provenance", "ProvenanceError",
    "make_statement", "attest", "verify_provenance", "artifact_files", "builder_id",
]

PathLike = Union[str, "os.PathLike[str]"]

PROVENANCE_FILE = "provenance.sigstore.json"
SLSA_PREDICATE = "https://slsa.dev/provenance/v1"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
BUILD_TYPE = "https://slmpkg.dev/build/v1"
_NOT_SUBJECTS = ("model.sig", PROVENANCE_FILE)


class ProvenanceError(SignatureError):
    """Provenance missing, malformed, not signed by the key, or not describing the files beside it."""


def artifact_files(directory: PathLike) -> list[tuple[str, Path]]:
    """The files a provenance statement covers: every regular file under ``directory`` (POSIX names,
    sorted) except the signature and the provenance itself."""
    root = Path(directory)
    out = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel not in _NOT_SUBJECTS and not any(part.startswith(".") for part in p.relative_to(root).parts):
            out.append((rel, p))
    return out


def builder_id() -> tuple[str, Optional[str]]:
    """Who ran the build: ``SLMPKG_BUILDER_ID``, else the GitHub Actions workflow or the GitLab job
    running it, else a local build; and the CI run's URL when there is one (the invocation id)."""
    env = os.environ
    if env.get("SLMPKG_BUILDER_ID"):
        return env["SLMPKG_BUILDER_ID"], env.get("SLMPKG_INVOCATION_ID")
    if env.get("GITHUB_ACTIONS") == "true" and env.get("GITHUB_WORKFLOW_REF"):
        server = env.get("GITHUB_SERVER_URL", "https://github.com")
        run = (f"{server}/{env.get('GITHUB_REPOSITORY')}/actions/runs/{env.get('GITHUB_RUN_ID')}"
               f"/attempts/{env.get('GITHUB_RUN_ATTEMPT', '1')}")
        return f"{server}/{env['GITHUB_WORKFLOW_REF']}", run
    if env.get("GITLAB_CI") == "true" and env.get("CI_PROJECT_URL"):
        return f"{env['CI_PROJECT_URL']}/-/blob/{env.get('CI_COMMIT_SHA', '')}/.gitlab-ci.yml", env.get("CI_JOB_URL")
    return "https://slmpkg.dev/builders/local", None


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _library_versions() -> dict[str, str]:
    """Versions of what decides an artifact's bytes."""
    from importlib import metadata

    versions = {"slmpkg": __version__, "python": platform.python_version()}
    for dist in ("numpy", "gguf", "safetensors", "onnx"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return versions


def make_statement(
    files: Iterable[tuple[str, str]],
    external_parameters: Mapping[str, Any],
    dependencies: Sequence[Mapping[str, Any]],
    *,
    started: Optional[str] = None,
    byproducts: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """An in-toto statement v1 with a SLSA provenance v1 predicate.

    ``files`` are ``(name, sha256)`` of the artifact; ``dependencies`` SLSA resource descriptors
    (``{"uri", "name", "digest": {"sha256": ...}}``) of everything read.
    """
    builder, invocation = builder_id()
    return {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": name, "digest": {"sha256": digest}} for name, digest in sorted(files)],
        "predicateType": SLSA_PREDICATE,
        "predicate": {
            "buildDefinition": {
                "buildType": BUILD_TYPE,
                "externalParameters": dict(external_parameters),
                "internalParameters": {"versions": _library_versions()},
                "resolvedDependencies": [dict(d) for d in dependencies],
            },
            "runDetails": {
                "builder": {"id": builder, "version": {"slmpkg": __version__}},
                "metadata": {"invocationId": invocation or f"urn:uuid:{uuid.uuid4()}",
                             "startedOn": started or _now(), "finishedOn": _now()},
                "byproducts": [dict(b) for b in byproducts],
            },
        },
    }


def attest(directory: PathLike, statement: Mapping[str, Any], signer: Any) -> Path:
    """Sign ``statement`` (DSSE, in a Sigstore bundle) and write it to ``directory/provenance.sigstore.json``."""
    payload = json.dumps(statement, indent=2, sort_keys=False).encode("utf-8")
    bundle = signer.sign(payload)
    out = Path(directory) / PROVENANCE_FILE
    with atomic_writes([out]) as (f,):
        f.write(json.dumps(bundle, separators=(",", ":")).encode("utf-8"))
    return out


@dataclass(frozen=True)
class Provenance:
    """A verified provenance statement."""

    path: Path
    statement: dict[str, Any]

    @property
    def predicate(self) -> dict[str, Any]:
        return self.statement["predicate"]

    @property
    def subjects(self) -> dict[str, str]:
        return {s["name"]: s["digest"]["sha256"] for s in self.statement["subject"]}

    @property
    def external_parameters(self) -> dict[str, Any]:
        return self.predicate["buildDefinition"]["externalParameters"]

    @property
    def dependencies(self) -> list[dict[str, Any]]:
        return self.predicate["buildDefinition"].get("resolvedDependencies", [])

    @property
    def source_uri(self) -> Optional[str]:
        return self.external_parameters.get("source")

    @property
    def builder(self) -> str:
        return self.predicate["runDetails"]["builder"]["id"]

    def summary(self) -> dict[str, Any]:
        ext = self.external_parameters
        return {
            "provenance": str(self.path),
            "builder": self.builder,
            "build_type": self.predicate["buildDefinition"].get("buildType"),
            "source": self.source_uri,
            "source_digest": ext.get("sourceDigest"),
            "artifact": ext.get("artifact"),
            "targets": ext.get("targets"),
            "slmpkg": self.predicate["runDetails"]["builder"].get("version", {}).get("slmpkg"),
            "finished": self.predicate["runDetails"].get("metadata", {}).get("finishedOn"),
            "subjects": self.subjects,
        }


def verify_provenance(directory: PathLike, verifier: Any, path: Optional[PathLike] = None) -> Provenance:
    """Check ``directory``'s provenance: signed by ``verifier``'s key, a SLSA v1 statement, and its
    subjects exactly the files in the directory with their digests. Raises :class:`ProvenanceError`
    naming the file and what failed."""
    from ._io import sha256_file

    root = Path(directory)
    prov_path = Path(path) if path is not None else (root if root.is_dir() else root.parent) / PROVENANCE_FILE
    try:
        bundle = json.loads(prov_path.read_bytes())
    except FileNotFoundError:
        raise ProvenanceError(f"{prov_path}: no provenance (artifacts built by `slmpkg build` carry one)") from None
    except (OSError, ValueError) as e:
        raise ProvenanceError(f"{prov_path}: malformed provenance ({e})") from None
    if not isinstance(bundle, dict):
        raise ProvenanceError(f"{prov_path}: malformed provenance (not a JSON object)")
    try:
        payload = verifier.verify(bundle, str(prov_path))
    except ProvenanceError:
        raise
    except SignatureError as e:
        raise ProvenanceError(str(e)) from None
    try:
        statement = json.loads(payload)
        if statement.get("_type") != STATEMENT_TYPE or statement.get("predicateType") != SLSA_PREDICATE:
            raise ValueError(f"not a SLSA provenance v1 statement (predicateType {statement.get('predicateType')!r})")
        subjects = {s["name"]: s["digest"]["sha256"] for s in statement["subject"]}
        statement["predicate"]["buildDefinition"]["externalParameters"]
        statement["predicate"]["runDetails"]["builder"]["id"]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ProvenanceError(f"{prov_path}: malformed provenance statement ({e})") from None
    if root.is_dir():
        present = {name: p for name, p in artifact_files(root)}
    else:
        present = {root.name: root}
    problems = []
    for name, digest in sorted(subjects.items()):
        p = present.get(name)
        if p is None:
            problems.append(f"{name}: missing")
        elif sha256_file(p) != digest:
            problems.append(f"{name}: digest mismatch (provenance says sha256:{digest[:16]})")
    problems += [f"{name}: not in the provenance" for name in sorted(set(present) - set(subjects))]
    if problems:
        raise ProvenanceError(f"{root}: does not match its provenance {prov_path}: " + "; ".join(problems[:5]))
    return Provenance(prov_path, statement)


def decode_unverified(path: PathLike) -> dict[str, Any]:
    """The statement in a provenance bundle without checking its signature (for display and tests)."""
    bundle = json.loads(Path(path).read_bytes())
    return json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
