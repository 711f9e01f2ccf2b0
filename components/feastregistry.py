"""Feast's file registry, written atomically: feature_store.yaml names
``components.feastregistry.AtomicFileRegistryStore`` as ``registry.registry_store_type``.

Feast rewrites the registry file in place on every materialization; a process reading it
at that moment (the feature server refreshing its cache, the endpoint) saw an empty
registry ("Feature service triage does not exist"). Here a new file is written beside it
and renamed over it, so a reader sees the old registry or the new one. (Its own module:
importing it imports Feast, which only Feast itself needs to do.)
"""
from __future__ import annotations

import os
import uuid

from feast.infra.registry.file import FileRegistryStore
from feast.utils import _utc_now


class AtomicFileRegistryStore(FileRegistryStore):
    def _write_registry(self, registry_proto) -> None:
        registry_proto.version_id = str(uuid.uuid4())
        registry_proto.last_updated.FromDatetime(_utc_now())
        self._filepath.parent.mkdir(parents=True, exist_ok=True)
        partial = self._filepath.with_name(f".{self._filepath.name}.{os.getpid()}.tmp")
        with open(partial, "wb", buffering=0) as f:
            f.write(registry_proto.SerializeToString())
            os.fsync(f.fileno())
        os.replace(partial, self._filepath)
