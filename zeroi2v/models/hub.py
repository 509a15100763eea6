"""Files from the Hugging Face Hub: image weights by timm name, zeroi2v models by hub id.

Every file comes through ``huggingface_hub``'s own cache (``HF_HOME`` / ``HF_HUB_CACHE``;
``HF_HUB_OFFLINE=1`` reads it without network) and then goes through the same checks as a local
file, so the Hub adds a way to *find* a file and nothing else:

* **Image weights** (``create_video_model(name, pretrained=True)``, ``model.pretrained: true``):
  the file named by timm's ``pretrained_cfg`` of the tagged name (``hf_hub_id``, and
  ``hf_hub_filename`` where set). timm's own download would unpickle a ``.bin`` file whenever a
  repository has no safetensors copy, so this module resolves the file itself: the safetensors
  copy first (read after :func:`zeroi2v.safe_io.safetensors_header` checked it), a pickle only
  through the restricted reader of :mod:`zeroi2v.safe_io`, then timm's key conversion
  (:func:`zeroi2v.interop.load_image_state_dict`). Where the weights came from (repository,
  file, commit, SHA-256) is recorded in the model's config (``pretrained_source``).
* **Models** (``zeroi2v.load_model("hf-hub:ORG/NAME[@REV]")``): ``config.json``,
  ``model.safetensors`` and, when the save wrote one, ``run_config.yaml``, all of one commit,
  then :func:`zeroi2v.models.artefact.read_artefact` on the cached folder as on any folder.
* **Files** (``hf-hub:ORG/NAME[@REV]:path/in/repo``): one file, e.g. an official checkpoint for
  ``zeroi2v import-official``.

A file that cannot be had (not cached while offline, no such repository, revision or file, no
access) is a :class:`HubError`: one line naming the repository and file and how to get it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .timm_args import check_model_name

HUB_PREFIX = "hf-hub:"
#: What a model repository holds (the names of :mod:`zeroi2v.models.artefact`; ``README.md`` is
#: the model card).
MODEL_REPO_FILES = ("config.json", "model.safetensors", "run_config.yaml", "README.md")
MAX_CONFIG_BYTES = 16 << 20
_REVISION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/\-]*")


class HubError(FileNotFoundError):
    """A file of the Hugging Face Hub that cannot be had: not in the cache while offline (or
    with no network), no such repository, revision or file, or no access. ``kind`` says which
    (``"not_cached"``, ``"no_file"``, ``"no_repo"``, ``"no_revision"``, ``"no_access"``,
    ``"http"``)."""

    def __init__(self, message: str, kind: str = "http"):
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class HubRef:
    """``hf-hub:REPO[@REVISION][:FILE]``."""

    repo_id: str
    revision: Optional[str] = None
    filename: Optional[str] = None

    def __str__(self) -> str:
        rev = f"@{self.revision}" if self.revision else ""
        return f"{HUB_PREFIX}{self.repo_id}{rev}" + (f":{self.filename}" if self.filename else "")


def is_hub_id(x) -> bool:
    """Whether ``x`` is a string starting with ``hf-hub:`` (anything else is a local path)."""
    return isinstance(x, str) and x.startswith(HUB_PREFIX)


def parse_hub_id(text: str, *, file: bool = False) -> HubRef:
    """``hf-hub:ORG/NAME[@REV]`` (``file=False``) or ``hf-hub:ORG/NAME[@REV]:PATH`` (``file=True``),
    checked; a malformed id is a ``ValueError`` saying what the form is."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    form = f"{HUB_PREFIX}ORG/NAME[@REVISION]" + (":PATH/IN/REPO" if file else "")
    if not is_hub_id(text):
        raise ValueError(f"{text!r} is not a hub id ({form})")
    rest = text[len(HUB_PREFIX):]
    filename = None
    if file:
        rest, sep, filename = rest.partition(":")
        if not sep or not filename:
            raise ValueError(f"{text!r} names no file: {form}")
        parts = filename.split("/")
        if filename.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise ValueError(f"{text!r}: {filename!r} is not a file path inside the repository")
    elif ":" in rest:
        raise ValueError(f"{text!r}: a model is a whole repository ({form}); files are not "
                         "named after it")
    repo, sep, revision = rest.partition("@")
    if sep and (not _REVISION.fullmatch(revision) or ".." in revision):
        raise ValueError(f"{text!r}: {revision!r} is not a revision (a branch, tag or commit)")
    try:
        validate_repo_id(repo)
    except HFValidationError:
        raise ValueError(f"{text!r}: {repo!r} is not a Hugging Face repository id "
                         f"({form})") from None
    return HubRef(repo, revision or None, filename)


def cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def hub_file(repo_id: str, filename: str, revision: Optional[str] = None, *,
             whole_repo: bool = False) -> Path:
    """The local path of ``filename`` of the model repository ``repo_id`` at ``revision``
    (default ``main``), from the cache or downloaded into it; a :class:`HubError` when it
    cannot be had (``whole_repo``: its fix downloads the repository, not just the file)."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.utils import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    rev = f" --revision {revision}" if revision else ""
    at = f" at revision {revision}" if revision else ""
    what = f"{repo_id}/{filename}{at}"
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision))
    except LocalEntryNotFoundError:
        why = ("HF_HUB_OFFLINE=1 forbids downloading it" if constants.is_offline_mode()
               else "the Hub cannot be reached")
        raise HubError(
            f"{what} is not in the Hugging Face cache ({cache_dir()}) and {why}: run once with "
            f"network access, or fetch it with `hf download {repo_id}"
            f"{'' if whole_repo else ' ' + filename}{rev}` (or "
            "point HF_HOME / HF_HUB_CACHE at a cache that has it)", "not_cached") from None
    except GatedRepoError:
        raise HubError(f"{what}: the repository is gated: accept its terms on the Hub and log "
                       "in (`hf auth login`, or HF_TOKEN)", "no_access") from None
    except RepositoryNotFoundError:
        raise HubError(f"{what}: no repository {repo_id!r} on the Hub (or it is private: log in "
                       "with `hf auth login`, or set HF_TOKEN): check the id", "no_repo") from None
    except RevisionNotFoundError:
        raise HubError(f"{what}: {repo_id!r} has no revision {revision!r}: name a branch, tag "
                       "or commit of it", "no_revision") from None
    except EntryNotFoundError:
        raise HubError(f"{what}: {repo_id!r} has no file {filename!r}{at}", "no_file") from None
    except HfHubHTTPError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise HubError(f"{what}: the Hub answered {first}", "http") from None


def commit_of(path: Path, filename: str) -> Optional[str]:
    """The commit a cached file belongs to (``.../snapshots/<commit>/<filename>``)."""
    snapshot = Path(path)
    for _ in filename.split("/"):
        snapshot = snapshot.parent
    name = snapshot.name
    return name if snapshot.parent.name == "snapshots" and re.fullmatch(r"[0-9a-f]{40}", name) \
        else None


def sha256_of(path: Path) -> tuple[str, int]:
    """``(hex SHA-256, size)`` of a file."""
    # cycle: artefact -> video_vit -> this module (pretrained=True)
    from .artefact import file_digest

    d = file_digest(path)
    return d["sha256"], d["size"]


# ----------------------------------------------------------------------------- image weights


def check_pretrained(value, source: str = "pretrained"):
    """A value of ``model.pretrained``: ``True``/``False``/``None``, a local path, or
    ``hf-hub:ORG/NAME[@REV]:FILE`` (checked here; files are looked for when the run starts)."""
    if value is None or isinstance(value, bool):
        return value
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{source}: true (timm's weights for the tagged model name, from the "
                         "Hugging Face Hub), false, a local file or hf-hub:ORG/NAME:FILE, got "
                         f"{value!r}")
    if is_hub_id(value):
        try:
            parse_hub_id(value, file=True)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None
    return value


def _tags(arch: str) -> list[str]:
    import timm

    return [n.split(".", 1)[1] for n in timm.list_pretrained(f"{arch}.*") if "." in n]


def _candidates(filename: str) -> list[str]:
    """The file timm's config names and, before it, its safetensors copies (what timm's own
    loader tries first too), so a pickle is read only when a repository has nothing else."""
    if filename.endswith(".safetensors"):
        return [filename]
    safe = {"pytorch_model.bin": ["model.safetensors"],
            "open_clip_pytorch_model.bin": ["open_clip_model.safetensors"]}.get(filename)
    if safe is None and filename.endswith((".bin", ".pth", ".pt")):
        safe = [filename.rsplit(".", 1)[0] + ".safetensors"]
    return [*(safe or []), filename]


def timm_weights_file(name: str) -> tuple[Path, dict]:
    """``(local file, pretrained_source record)`` of the image weights timm publishes for the
    tagged name ``name`` (``vit_base_patch16_clip_224.openai``), from the Hub's cache or
    downloaded into it. The tag is required: timm's default tag for a name is not always the
    weights one expects (``vit_base_patch16_clip_quickgelu_224`` defaults to MetaCLIP, under
    another licence, not OpenAI's)."""
    import timm
    from timm.models import get_pretrained_cfg

    check_model_name(name, "pretrained weights")
    arch, _, tag = name.partition(".")
    if not timm.is_model(arch):
        raise ValueError(f"pretrained weights: unknown timm model {arch!r}")
    tags = _tags(arch)
    if not tags:
        raise ValueError(f"pretrained weights: timm publishes no weights for {arch}: pass a "
                         "local file (pretrained_file= / model.pretrained: PATH)")
    shown = ", ".join(tags[:12]) + (f" (and {len(tags) - 12} more)" if len(tags) > 12 else "")
    if not tag:
        raise ValueError(
            f"pretrained weights: {arch!r} has no tag naming its weights: use {arch}.<tag> with "
            f"a tag of {shown} (e.g. {arch}.{tags[0]}); timm's default is not assumed")
    if tag not in tags:
        raise ValueError(f"pretrained weights: timm has no {arch} weights tagged {tag!r}; "
                         f"tags: {shown}")
    cfg = get_pretrained_cfg(name)
    hub_id = getattr(cfg, "hf_hub_id", None)
    if not hub_id:
        where = getattr(cfg, "url", None) or "outside the Hub"
        raise ValueError(f"pretrained weights: timm's {name} weights are not on the Hugging Face "
                         f"Hub ({where}): download them and pass the file (pretrained_file= / "
                         "model.pretrained: PATH)")
    repo_id, _, revision = hub_id.partition("@")
    filename = getattr(cfg, "hf_hub_filename", None) or "pytorch_model.bin"
    if not filename.endswith((".safetensors", ".bin", ".pth", ".pt")):
        raise ValueError(f"pretrained weights: timm reads {name}'s {filename} with code of its "
                         "own; zeroi2v reads safetensors and weights-only pickles: pick another "
                         f"tag ({shown})")
    errors = []
    for fname in _candidates(filename):
        try:
            path = hub_file(repo_id, fname, revision or None)
        except HubError as e:
            if e.kind not in ("no_file", "not_cached"):
                raise
            errors.append(e)
            continue
        sha, size = sha256_of(path)
        rev = commit_of(path, fname) or revision or "main"
        return path, {"timm_name": name, "repo_id": repo_id, "filename": fname,
                      "revision": rev, "sha256": sha, "size": size}
    # name the preferred (safetensors) file when it is only missing from the cache
    raise next((e for e in errors if e.kind == "not_cached"), errors[-1])


def resolve_pretrained(source, model_name: str) -> tuple[Path, dict]:
    """``(local file, pretrained_source record)`` for a ``pretrained`` value: ``True``
    (:func:`timm_weights_file` of ``model_name``), ``"hf-hub:ORG/NAME[@REV]:FILE"``
    (:func:`file_from_hub`) or a local path (recorded by its name, SHA-256 and size)."""
    import os

    if source is True:
        return timm_weights_file(model_name)
    if is_hub_id(source):
        return file_from_hub(source)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"pretrained image-model file not found: {path}")
        sha, size = sha256_of(path)
        return path, {"file": path.name, "sha256": sha, "size": size}
    raise ValueError(f"pretrained weights: True (timm's weights for the tagged model name, from "
                     f"the Hub), hf-hub:ORG/NAME:FILE or a local file, got {source!r}")


def source_file(source: dict) -> Optional[Path]:
    """The cached file a ``pretrained_source`` record from the Hub names (its commit, from the
    cache or downloaded), checked against the recorded SHA-256; ``None`` for a local file."""
    if not source.get("repo_id"):
        return None
    path = hub_file(source["repo_id"], source["filename"], source.get("revision"))
    if source.get("sha256") and sha256_of(path)[0] != source["sha256"]:
        raise ValueError(f"{path} ({source['repo_id']}/{source['filename']}) differs from the "
                         "file the model was built from (SHA-256): the cache copy is damaged, "
                         f"delete it and download again (`hf download {source['repo_id']} "
                         f"{source['filename']} --revision {source.get('revision')}`)")
    return path


# ----------------------------------------------------------------------------- models, files


def model_folder(hub_id: str) -> Path:
    """The cached snapshot folder of the zeroi2v model ``hf-hub:ORG/NAME[@REV]``: its
    ``config.json`` first (a repository that is not a zeroi2v model is refused before the
    weights are downloaded), then ``model.safetensors`` and ``run_config.yaml`` (when
    ``config.json`` records that the save wrote one) of the same commit. Nothing is checked
    beyond that here: the folder goes through :func:`~zeroi2v.models.artefact.read_artefact`
    like any other."""
    import json

    ref = parse_hub_id(hub_id)
    config = hub_file(ref.repo_id, "config.json", ref.revision, whole_repo=True)
    if config.stat().st_size > MAX_CONFIG_BYTES:  # a model config is a few kB; read it whole
        raise ValueError(f"{hub_id}: its config.json has {config.stat().st_size:,} bytes, not a "
                         "zeroi2v model config")
    try:
        doc = json.loads(config.read_text())
        fmt, info = doc.get("format"), doc.get("artefact")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError, RecursionError):
        fmt = info = None
    if fmt != "zeroi2v":
        raise ValueError(f"{hub_id} is not a zeroi2v model (its config.json is not a zeroi2v "
                         "model config): a timm image model is loaded with "
                         "create_video_model(name, pretrained=True)")
    commit = commit_of(config, "config.json") or ref.revision  # one save: config and weights
    hub_file(ref.repo_id, "model.safetensors", commit, whole_repo=True)
    # run_config.yaml only where config.json says the save wrote one: asking the Hub for a file
    # that may not exist costs the client's retries (~25 s) whenever the network is down
    if isinstance(info, dict) and info.get("run_config") is True:
        hub_file(ref.repo_id, "run_config.yaml", commit, whole_repo=True)
    return config.parent


def file_from_hub(spec: str) -> tuple[Path, dict]:
    """``(local file, {"repo_id", "filename", "revision": the commit, "sha256", "size"})`` for
    ``hf-hub:ORG/NAME[@REV]:PATH`` (a ``pretrained_source`` record)."""
    ref = parse_hub_id(spec, file=True)
    path = hub_file(ref.repo_id, ref.filename, ref.revision)
    sha, size = sha256_of(path)
    return path, {"repo_id": ref.repo_id, "filename": ref.filename,
                  "revision": commit_of(path, ref.filename) or ref.revision or "main",
                  "sha256": sha, "size": size}


def pinned_id(record: dict) -> str:
    """``hf-hub:REPO@COMMIT:FILE`` of a record of :func:`file_from_hub`."""
    return str(HubRef(record["repo_id"], record.get("revision"), record["filename"]))
