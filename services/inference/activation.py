"""The active model version per task, from Tide: followed by the inference service, written by an operator.

`ActiveModelSelector` holds the model version that serves the worker's task: Tide's `models/active/<task>` record
when that model version is in the local repository, is made for the task and loads; otherwise the configured
default (with a warning). `ActiveModelFollower` feeds it from a TideCache over `models/active/`; the Kafka worker
reads `selector.served` between fetches (never within one), and ModelInfer reads `selector.choice` for requests
that name no version (services.inference.selection.request_version).

`activate()` is `clisonix model activate`: it checks the model version in the local repository and puts the record.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from services.common.errors import ClisonixError, FailedPrecondition, NotFound
from services.inference.repository import ModelArtifact, read_artifact
from services.inference.selection import (
    FROM_DEFAULT,
    FROM_TIDE,
    JSON,
    ActiveRecord,
    ModelChoice,
    is_path_segment,
    parse_active_record,
)

if TYPE_CHECKING:
    from services.inference.metrics import InferenceMetrics
    from services.inference.serving import ModelServer, ServedModel
    from services.tide.client import TideCache, TideClient, WriteResult
    from services.tide.state import Change, Version

log = logging.getLogger(__name__)

ACTIVE_PREFIX = "models/active/"
# How often the follower looks at the cached record even without a change (a cache reload reports none).
RECHECK_S = 1.0
START_TIMEOUT_S = 5.0


class ActiveModelSelector:
    """The model version serving one task.

    models: the model server (a model version Tide names that is not served yet is loaded from its repository).
    task: the task name (the record's key is models/active/<task>).
    default: what serves the task without a usable record (None: nothing, e.g. no worker and its model not served).
    metrics: where active_model_info goes (None: nowhere).
    """

    def __init__(
        self,
        models: ModelServer,
        task: str,
        default: ServedModel | None,
        metrics: InferenceMetrics | None = None,
    ) -> None:
        self.models = models
        self.task = task
        self.default = default
        self.metrics = metrics
        self.served: ServedModel | None = None
        self.choice: ModelChoice | None = None
        self._use(default, FROM_DEFAULT)

    def _use(self, served: ServedModel | None, source: str) -> None:
        previous = self.choice
        self.served = served
        self.choice = (
            None
            if served is None
            else ModelChoice(served.artifact.metadata.name, served.artifact.metadata.version, source)
        )
        if self.choice == previous:
            return
        if self.metrics is not None:
            gauge = self.metrics.active_model_info
            if previous is not None:
                gauge.remove(self.task, previous.model, previous.version, previous.source)
            if self.choice is not None:
                gauge.labels(self.task, self.choice.model, self.choice.version, self.choice.source).set(1)
        if previous is not None and self.choice is not None:
            log.info(
                "active model changed",
                extra={
                    "fields": {
                        "task": self.task,
                        "model": self.choice.model,
                        "version": self.choice.version,
                        "source": self.choice.source,
                    }
                },
            )

    async def apply(self, value: bytes | None, content_type: str = JSON) -> ModelChoice | None:
        """Serves the task with what the record (`value`; None: there is none) names, or with the default when
        the record is unreadable or its model version cannot be served (logged as a warning). Returns the choice."""
        if value is None:
            self._use(self.default, FROM_DEFAULT)
            return self.choice
        try:
            record = parse_active_record(value, content_type)
            served = await self._load(record)
        except Exception as exc:  # whatever a record or an artifact does wrong, the default serves on
            fallback = self.default.artifact.metadata if self.default is not None else None
            log.warning(
                "active model not usable; serving the default",
                extra={
                    "fields": {
                        "task": self.task,
                        "error": str(exc),
                        "default_model": fallback.name if fallback else None,
                        "default_version": fallback.version if fallback else None,
                    }
                },
            )
            self._use(self.default, FROM_DEFAULT)
            return self.choice
        self._use(served, FROM_TIDE)
        return self.choice

    async def _load(self, record: ActiveRecord) -> ServedModel:
        version = record.version or newest_version(self.models.repository_root, record.model)
        served = await self.models.load_version(record.model, version)
        check_task(served.artifact, self.task)
        return served


def newest_version(root: Path, model: str) -> str:
    """The highest version folder of a model in the repository at `root`; NotFound when it has none."""
    folder = root / model
    versions = [int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit()] if folder.is_dir() else []
    if not is_path_segment(model) or not versions:
        raise NotFound(f"no model {model!r} in the repository", reason="model")
    return str(max(versions))


def check_task(artifact: ModelArtifact, task: str) -> None:
    """FailedPrecondition when the artifact was made for another task than `task`."""
    if artifact.metadata.task != task:
        raise FailedPrecondition(
            f"model {artifact.metadata.name!r} version {artifact.metadata.version!r} is for task "
            f"{artifact.metadata.task!r}, not {task!r}",
            reason="task",
        )


class ActiveModelFollower:
    """Keeps a selector on Tide's `models/active/<task>` record, through a TideCache over `models/active/`.

    `await start()` loads the record once (bounded; when Tide cannot be reached the default serves and the
    follower keeps trying), then `run(stop)` (a runtime task) applies every change, and re-reads the cached
    record every `recheck_s` so that nothing a cache reload brought is missed.
    """

    def __init__(self, client: TideClient, selector: ActiveModelSelector, *, recheck_s: float = RECHECK_S) -> None:
        from services.tide.client import active_model_key

        self.client = client
        self.selector = selector
        self.key = active_model_key(selector.task)
        self.recheck_s = recheck_s
        self.cache: TideCache = self._new_cache()
        self.started = False
        self._warned = False
        self._changed_event = asyncio.Event()
        self._applied: Version | None = None

    def _new_cache(self) -> TideCache:
        from services.tide.client import TideCache

        return TideCache(self.client, ACTIVE_PREFIX, on_change=self._changed, retry_delay_s=self.recheck_s)

    def _changed(self, change: Change) -> None:
        if change.key == self.key:
            self._changed_event.set()

    async def start(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Loads the cache and applies the record; on failure logs a warning (the follower retries in run)."""
        try:
            async with asyncio.timeout(timeout_s):
                await self.cache.start()
        except (ClisonixError, TimeoutError) as exc:
            # Warned once; the retries (every recheck_s) only at debug level.
            log.log(
                logging.DEBUG if self._warned else logging.WARNING,
                "tide not reachable; serving the default model until it is",
                extra={"fields": {"task": self.selector.task, "error": str(exc) or type(exc).__name__}},
            )
            self._warned = True
            await self.cache.close()
            self.cache = self._new_cache()  # a fresh one for the next try
            return
        self.started = True
        if self._warned:
            log.info("tide reached; following the active model", extra={"fields": {"task": self.selector.task}})
        await self.sync()

    async def sync(self) -> None:
        """Applies the cached record when it differs from the one applied last."""
        entry = self.cache.get(self.key)
        version = entry.version if entry is not None else None
        if version == self._applied:
            return
        self._applied = version
        if entry is None:
            await self.selector.apply(None)
        else:
            await self.selector.apply(entry.value, entry.content_type)

    async def run(self, stop: asyncio.Event) -> None:
        """Follows the record until `stop` is set."""
        stopped = asyncio.create_task(stop.wait())
        try:
            while not stop.is_set():
                if not self.started:
                    await self.start()
                changed = asyncio.create_task(self._changed_event.wait())
                await asyncio.wait({changed, stopped}, timeout=self.recheck_s, return_when=asyncio.FIRST_COMPLETED)
                changed.cancel()
                self._changed_event.clear()
                if self.started and not stop.is_set():
                    await self.sync()
        finally:
            stopped.cancel()

    async def close(self) -> None:
        await self.cache.close()
        await self.client.close()


# -- clisonix model activate ----------------------------------------------------------------------------------


def check_local(repository: Path, task: str, model: str, version: str) -> ModelArtifact:
    """The artifact of `model` `version` in the local repository, made for `task`; NotFound when the repository
    has no such model version, FailedPrecondition when it is damaged or for another task."""
    if not is_path_segment(model) or not version.isdigit() or int(version) < 1:
        raise NotFound(f"no model {model!r} version {version!r} in {repository}", reason="version")
    folder = Path(repository) / model / version
    if not folder.is_dir():
        raise NotFound(f"no model {model!r} version {version!r} in {repository}", reason="version")
    artifact = read_artifact(folder)
    check_task(artifact, task)
    return artifact


async def activate(
    targets: list[str], token: str | None, repository: Path, task: str, model: str, version: str
) -> WriteResult:
    """Checks the model version in the local repository, then puts models/active/<task> (a plain put)."""
    from services.tide.client import TideClient, set_active_model

    check_local(repository, task, model, version)
    async with TideClient(targets, token=token) as client:
        return await set_active_model(client, task, model, version)


def activate_command(task: str, model: str, version: str, tide: str | None, repository: str | None) -> int:
    """`clisonix model activate`: prints the Tide version the record was written at; 2 on a refusal."""
    import sys

    from services.tide.client import targets_from_env

    targets, token = targets_from_env()
    if tide:
        targets = [t.strip() for t in tide.split(",") if t.strip()]
    try:
        result = asyncio.run(activate(targets, token, Path(repository or "models"), task, model, version))
    except ClisonixError as exc:
        print(f"clisonix model activate: {exc}", file=sys.stderr)
        return 2
    print(
        f"models/active/{task} = {model} version {version} "
        f"(tide version {result.version.partition}:{result.version.offset})"
    )
    return 0
