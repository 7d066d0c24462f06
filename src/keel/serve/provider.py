"""Where the service gets its model: a registry alias (production) or an artifact folder (tests, ``--model``).

A provider answers two questions: which version is current (:meth:`ModelProvider.resolve`, cheap, polled for hot
swaps) and "load that version" (:meth:`ModelProvider.load`, slow, verifies integrity). The service loads a new
version fully, then swaps one reference, so requests never see a half-loaded model.

Example::

    provider = PathProvider("runs/model")              # or RegistryProvider(spec, "champion")
    label, model = provider.current()                  # ('path:model@3f2a9c1b0e7d', DecisionModel(...))
    provider.resolve() == label                        # True until the folder is replaced
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from keel.artifact import MANIFEST, DecisionModel
from keel.errors import IntegrityError, ServingError


@runtime_checkable
class ModelProvider(Protocol):
    """What the service needs from a model source. Version labels are opaque strings compared for equality."""

    alias: str

    def resolve(self) -> str | None:
        """The version label the source points at now (None: nothing to serve). Cheap: polled every few seconds."""
        ...

    def load(self, version_label: str) -> DecisionModel:
        """Load and verify that version; raise a :class:`~keel.errors.KeelError` when it cannot."""
        ...

    def current(self) -> tuple[str, DecisionModel]:
        """Resolve, then load: the version label and its model."""
        ...

    def describe(self, version_label: str) -> dict[str, Any]:
        """What ``GET /v1/model`` shows beside the artifact's own metadata (source, registry info)."""
        ...


class PathProvider:
    """A DecisionModel folder. The version label changes when the folder's manifest changes (a re-save).

    ``threads`` is the LightGBM thread count for predictions (1 is fastest for single rows).
    """

    def __init__(self, path: str | Path, *, threads: int = 1, alias: str = "path") -> None:
        self.path = Path(path)
        self.threads = threads
        self.alias = alias

    def __repr__(self) -> str:
        return f"PathProvider({str(self.path)!r})"

    def resolve(self) -> str | None:
        manifest = self.path / MANIFEST
        try:
            digest = hashlib.sha256(manifest.read_bytes()).hexdigest()[:12]
        except OSError:
            return None
        return f"path:{self.path.name}@{digest}"

    def load(self, version_label: str) -> DecisionModel:
        return DecisionModel.load(self.path, threads=self.threads)

    def current(self) -> tuple[str, DecisionModel]:
        label = self.resolve()
        if label is None:
            raise IntegrityError(f"No model artifact at {self.path} (no {MANIFEST}).",
                                 hint="Pass the folder `keel train` wrote, or serve from the registry.")
        model = self.load(label)
        # The folder may have been replaced between resolve and load: label what was actually loaded.
        return self.resolve() or label, model

    def describe(self, version_label: str) -> dict[str, Any]:
        return {"source": str(self.path)}


class RegistryProvider:
    """A registry alias (``serving.alias``, default ``champion``); versions are labelled ``v<number>``."""

    def __init__(self, spec: Any, alias: str | None = None, *, threads: int = 1, registry: Any = None) -> None:
        self.spec = spec
        self.alias = alias or spec.serving.alias
        self.threads = threads
        self._registry = registry
        self._info: dict[str, Any] = {}

    def __repr__(self) -> str:
        return f"RegistryProvider(alias={self.alias!r})"

    @property
    def registry(self) -> Any:
        if self._registry is None:
            try:
                from keel.registry import Registry
            except ImportError as exc:  # pragma: no cover - the registry ships with keel
                raise ServingError("The model registry is not available in this installation.",
                                   hint="Serve an artifact folder with `keel serve --model PATH`.") from exc
            self._registry = Registry(self.spec)
        return self._registry

    def resolve(self) -> str | None:
        version = self.registry.resolve(self.alias)
        return None if version is None else f"v{int(version)}"

    def load(self, version_label: str) -> DecisionModel:
        number = int(version_label.removeprefix("v"))
        model, info = self.registry.load(number, threads=self.threads)
        self._info[version_label] = info
        return model  # type: ignore[no-any-return]

    def current(self) -> tuple[str, DecisionModel]:
        label = self.resolve()
        if label is None:
            raise ServingError(
                f"No model version has the alias {self.alias!r} in the registry.",
                hint="Train and promote one (`keel train`, `keel models promote VERSION`), or pass --model PATH.",
            )
        return label, self.load(label)

    def describe(self, version_label: str) -> dict[str, Any]:
        info = self._info.get(version_label)
        if info is None:
            return {"source": "registry"}
        return {
            "source": getattr(info, "source", "registry"),
            "registered_version": getattr(info, "version", None),
            "run_id": getattr(info, "run_id", None),
            "data_source": getattr(info, "data_source", None),
            "data_fingerprint": getattr(info, "data_fingerprint", None),
            "headline_metric": getattr(info, "headline_metric", None),
            "headline_value": getattr(info, "headline_value", None),
        }


__all__ = ["ModelProvider", "PathProvider", "RegistryProvider"]
