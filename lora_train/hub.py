"""Push runs to the Hugging Face Hub: adapter-only weights, tokenizer, model card, metrics and plot.

The token comes from the usual places (``HF_TOKEN``, ``hf auth login``'s token file); it is handed
to ``huggingface_hub`` and never printed, logged or written anywhere by this module.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from concurrent.futures import Future
from pathlib import Path
from typing import Callable, Optional

from lora_train.config import RecipeError

logger = logging.getLogger(__name__)

PUSHED_SUFFIXES = (".safetensors", ".json", ".md", ".yaml", ".txt", ".model", ".png", ".jinja")
"""Top-level files of a run that are pushed; subdirectories (checkpoints/, best/, tracker logs) never are."""


def cache_problem(
    repo_id: str, revision: Optional[str] = None, repo_type: str = "model", filename: Optional[str] = None
) -> Optional[str]:
    """What the Hub cache lacks for ``repo_id`` at ``revision`` (and ``filename``): the repo, the revision or the
    file, and where it looked; None when it is all there (or ``repo_id`` is not a Hub id)."""
    from huggingface_hub import constants

    if not re.match(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$", repo_id) or Path(repo_id).exists():
        return None
    cache = Path(constants.HF_HUB_CACHE)
    prefix = f"{repo_type}s--"
    folder = cache / f"{prefix}{repo_id.replace('/', '--')}"
    if not folder.is_dir():
        cached = (
            sorted(p.name[len(prefix) :].replace("--", "/", 1) for p in cache.glob(f"{prefix}*") if p.is_dir())
            if cache.is_dir()
            else []
        )
        held = f"it holds the {repo_type}s {', '.join(cached)}" if cached else f"it holds no {repo_type}s"
        return f"the {repo_type} repo '{repo_id}' is not in the Hub cache {cache} ({held})"
    revision = revision or "main"
    refs = {p.name: p.read_text().strip() for p in (folder / "refs").glob("*") if p.is_file()}
    snapshots = sorted(p.name for p in (folder / "snapshots").glob("*") if p.is_dir())
    commit = refs.get(revision, revision)
    if commit not in snapshots:
        held = [f"{name} ({commit[:12]})" for name, commit in sorted(refs.items())] + [
            s[:12] for s in snapshots if s not in refs.values()
        ]
        return (
            f"revision '{revision}' of '{repo_id}' is not in the Hub cache {folder} (cached revisions:"
            f" {', '.join(held) or 'none'}); use one of those (model.revision) or download that revision"
        )
    if filename is not None and not (folder / "snapshots" / commit / filename).exists():
        snapshot = folder / "snapshots" / commit
        return f"'{repo_id}' at revision '{revision}' has no file {filename} in the Hub cache {snapshot}"
    return None


def lookup_error(
    what: str,
    repo_id: str,
    err: BaseException,
    revision: Optional[str] = None,
    repo_type: str = "model",
    filename: Optional[str] = None,
) -> str:
    """Why ``repo_id`` could not be loaded: offline, what the cache lacks (repo, revision or file) in place of the
    Hub libraries' "couldn't connect"; online, their error and what the cache holds."""
    problem = cache_problem(repo_id, revision, repo_type, filename)
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    if problem and offline:
        return f"{what} cannot be loaded: {problem}. HF_HUB_OFFLINE=1 is set, so only the Hub cache is read"
    reason = f"{type(err).__name__}: {str(err).strip().rstrip('.')}"
    return f"{what} cannot be loaded: {reason}. {problem + '. ' if problem else ''}{offline_hint()}"


def offline_hint() -> str:
    """What to check when a model, dataset or run cannot be fetched from the Hub (the one hint every loader gives)."""
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return (
            "HF_HUB_OFFLINE=1 is set, so only local directories and the Hub cache (HF_HUB_CACHE) are used:"
            " point it at a local directory, or set HF_HUB_CACHE to a cache that holds it."
        )
    return "Check the id and revision, your network, and `hf auth login` for gated or private repos."


class HubError(RuntimeError):
    """The push cannot happen (offline, no token, no access); the message says what to do."""


def pushed_files(directory: Path) -> list[str]:
    """Names of the files of ``directory`` that a push uploads (adapter or model, tokenizer, card, metrics, plot)."""
    return sorted(
        p.name
        for p in directory.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix in PUSHED_SUFFIXES
    )


class HubPusher:
    """Pushes to one Hub repo: creates it up front (checking access), then uploads directories.

    Background uploads (checkpoints) run one after the other on ``huggingface_hub``'s worker thread;
    a blocking upload waits for them first, so the Hub never ends with an older commit on top.
    """

    def __init__(self, repo_id: str, private: bool = True):
        from huggingface_hub import HfApi, constants, get_token

        if constants.HF_HUB_OFFLINE:
            raise HubError(f"cannot push to '{repo_id}': HF_HUB_OFFLINE=1 is set. Unset it for a run that pushes.")
        if get_token() is None:
            raise HubError(
                f"cannot push to '{repo_id}': no Hugging Face token found. Run `hf auth login` or set HF_TOKEN"
                " to a token with write access."
            )
        self.repo_id = repo_id
        self.api = HfApi()
        self.pending: list[Future] = []
        try:
            self.url = str(self.api.create_repo(repo_id, private=private, exist_ok=True))
        except Exception as err:  # noqa: BLE001 - HTTP, network and validation errors all end the same way
            raise HubError(f"cannot create or access Hub repo '{repo_id}': {type(err).__name__}: {err}") from None

    def push_directory(self, directory: Path, message: str) -> str:
        """Upload the run files of ``directory`` (see :func:`pushed_files`) as one commit; return its URL."""
        self.wait()
        files = pushed_files(directory)
        info = self.api.upload_folder(
            repo_id=self.repo_id, folder_path=directory, allow_patterns=files, commit_message=message
        )
        logger.info("pushed %d files to %s (%s)", len(files), self.url, info.commit_url)
        return info.commit_url

    def push_in_background(self, write: Callable[[Path], None], message: str) -> None:
        """``write`` a snapshot into a temporary directory now, and upload it without blocking training."""
        tmp = Path(tempfile.mkdtemp(prefix="lora_train-push-"))
        try:
            write(tmp)
            future = self.api.upload_folder(
                repo_id=self.repo_id,
                folder_path=tmp,
                allow_patterns=pushed_files(tmp),
                commit_message=message,
                run_as_future=True,
            )
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        future.add_done_callback(lambda _: shutil.rmtree(tmp, ignore_errors=True))
        self.pending.append(future)

    def wait(self) -> None:
        """Finish the background uploads; a failed one is reported, not raised (the final push still runs)."""
        for future in self.pending:
            try:
                future.result()
            except Exception as err:  # noqa: BLE001
                logger.warning("a checkpoint push to %s failed: %s: %s", self.repo_id, type(err).__name__, err)
        self.pending.clear()


def push_run(directory: Path, repo_id: str, private: bool = True) -> str:
    """Push an existing run directory: refresh its card for ``repo_id``, then upload it; return the commit URL."""
    # These import torch, which scripts/push_to_hub.py --help (importing this module) need not load
    from lora_train.card import run_card
    from lora_train.checkpoint import atomic_write_text

    if not (directory / "recipe.yaml").is_file():
        raise HubError(f"'{directory}' is not a lora_train run directory (no recipe.yaml); give a training output_dir")
    weights = [n for n in pushed_files(directory) if n.endswith(".safetensors")]
    if not weights:
        raise HubError(f"'{directory}' holds no weights (*.safetensors): the run did not finish; resume it first")
    try:  # the card first: a corrupt run is refused before any request to the Hub
        card = run_card(directory, repo_id)
    except ValueError as err:  # RecipeError is one too
        raise HubError(f"cannot build the model card of '{directory}': {err}") from None
    pusher = HubPusher(repo_id, private)
    atomic_write_text(directory / "README.md", card)
    return pusher.push_directory(directory, f"lora_train run {directory.name}")


def pusher_for(recipe) -> "HubPusher | None":
    """The recipe's pusher (repo created and access checked now, before training), or None without push_to_hub."""
    o = recipe.output
    if not o.push_to_hub:
        return None
    try:
        return HubPusher(o.hub_model_id, o.hub_private)
    except HubError as err:
        raise RecipeError([str(err)], "output.push_to_hub") from None
