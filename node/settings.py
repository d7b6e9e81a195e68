"""Node configuration: command-line flags over environment variables over defaults.

Every field can be set with an environment variable ``CRDTMERGE_<FIELD>`` (upper case), e.g.
``CRDTMERGE_TOKEN``, ``CRDTMERGE_CLUSTER_SECRET``, ``CRDTMERGE_MAX_BODY_BYTES``;
``CRDTMERGE_PEERS`` is a comma-separated list of URLs. :meth:`Settings.validated` rejects
impossible values at startup, so a bad deployment fails before it serves a request.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from crdtmerge.errors import InvalidInput

__all__ = ["Settings"]

GiB = 1 << 30
MiB = 1 << 20


@dataclass(frozen=True)
class Settings:
    """Everything a node needs to start.

    Attributes:
        data_dir: holds ``node.sqlite3`` (state, epochs, peers) and ``objects/`` (the store).
        host, port: where uvicorn listens.
        peers: peer base URLs (replication; used by the gossip driver).
        advertise_url: the URL peers should use for this node (default: from host and port).
        token: Bearer token for write endpoints; None = writes are open (a warning is logged).
        read_token: Bearer token for read endpoints; None = reads are open.
        admin_token: Bearer token for admin endpoints (trusted signing keys); None = the write
            token is also the admin token. Scopes nest: admin ⊇ write ⊇ read.
        cluster_secret: shared secret for node-to-node replication routes.
        replica_id: stable id of this replica; generated and persisted on first start if None.
        max_body_bytes: largest accepted upload (contribution or object), else 413.
        max_header_bytes: largest accepted safetensors JSON header, else 400.
        max_tensors: most tensors in one object, else 400.
        min_free_bytes: free disk space the store must keep; an upload (by its announced
            size) or a fetch (by its manifest) that would go below it is refused with 507.
        rate_limit_per_s, rate_limit_burst: token bucket per client (its token, else its
            address) on the public API, else 429; 0 turns it off.
        max_uploads_per_client: concurrent uploads per client, else 429.
        max_transfers_per_peer: concurrent chunk/manifest requests served per peer, else 429.
        merge_debounce_s: the digest must be stable this long before a merge starts.
        merge_enabled: run the background merge worker.
        gossip_interval_s: anti-entropy period (for the replication driver).
        fetch_batch_bytes: chunk bytes asked for in one request when fetching an object.
        fetch_commit_bytes: verified bytes of a fetch made durable together (one data flush
            and bitmap fsync); a crash refetches at most this much.
        peer_exchange: learn peers of peers (hello messages); configured URLs always win.
        log_level, log_json: logging configuration.
    """

    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 8470
    peers: tuple[str, ...] = ()
    advertise_url: str | None = None
    token: str | None = None
    read_token: str | None = None
    admin_token: str | None = None
    cluster_secret: str | None = None
    replica_id: str | None = None
    max_body_bytes: int = 64 * GiB
    max_header_bytes: int = 100 * MiB
    max_tensors: int = 100_000
    min_free_bytes: int = 256 * MiB
    rate_limit_per_s: float = 200.0
    rate_limit_burst: int = 400
    max_uploads_per_client: int = 4
    max_transfers_per_peer: int = 16
    merge_debounce_s: float = 0.5
    merge_enabled: bool = True
    gossip_interval_s: float = 1.0
    fetch_batch_bytes: int = 32 * MiB
    fetch_commit_bytes: int = 256 * MiB
    peer_exchange: bool = True
    log_level: str = "INFO"
    log_json: bool = True
    extra: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Build settings from ``CRDTMERGE_*`` variables; keyword ``overrides`` that are not
        None win (this is how command-line flags are applied).

        Raises:
            InvalidInput: a variable that does not parse, or an invalid combination.
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name == "extra":
                continue
            raw = env.get(f"CRDTMERGE_{f.name.upper()}")
            if raw is None or raw == "":
                continue
            values[f.name] = _parse(f.name, f.type, raw)
        for k, v in overrides.items():
            if v is not None:
                values[k] = v
        if "data_dir" not in values:
            raise InvalidInput("no data directory: pass --data-dir or set CRDTMERGE_DATA_DIR")
        values["data_dir"] = Path(values["data_dir"])
        if "peers" in values:
            values["peers"] = tuple(values["peers"])
        return cls(**values).validated()

    def validated(self) -> Settings:
        for name in (
            "max_body_bytes",
            "max_header_bytes",
            "max_tensors",
            "max_uploads_per_client",
            "max_transfers_per_peer",
            "fetch_batch_bytes",
            "fetch_commit_bytes",
        ):
            if getattr(self, name) <= 0:
                raise InvalidInput(f"{name} must be positive, got {getattr(self, name)}")
        if self.min_free_bytes < 0 or self.rate_limit_per_s < 0 or self.rate_limit_burst < 0:
            raise InvalidInput("min_free_bytes, rate_limit_per_s and rate_limit_burst must be >= 0")
        if not 0 <= self.port < 65536:
            raise InvalidInput(f"port must be in 0..65535, got {self.port}")
        if self.merge_debounce_s < 0 or self.gossip_interval_s <= 0:
            raise InvalidInput("merge_debounce_s must be >= 0 and gossip_interval_s > 0")
        for peer in self.peers:
            if not peer.startswith(("http://", "https://")):
                raise InvalidInput(f"peer {peer!r} is not an http(s) URL")
        if self.token is not None and len(self.token) < 8:
            raise InvalidInput("the write token must be at least 8 characters")
        if self.admin_token is not None and len(self.admin_token) < 8:
            raise InvalidInput("the admin token must be at least 8 characters")
        return self

    def with_(self, **changes: Any) -> Settings:
        return replace(self, **changes).validated()

    @property
    def db_path(self) -> Path:
        return self.data_dir / "node.sqlite3"

    @property
    def store_dir(self) -> Path:
        return self.data_dir / "objects"


def _parse(name: str, typ: Any, raw: str) -> Any:
    typ = str(typ)
    try:
        if name == "peers":
            return tuple(p.strip() for p in raw.split(",") if p.strip())
        if typ.startswith("bool"):
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if typ.startswith("int"):
            return int(raw)
        if typ.startswith("float"):
            return float(raw)
        return raw
    except ValueError as exc:
        raise InvalidInput(f"CRDTMERGE_{name.upper()}={raw!r} is not a valid {typ}") from exc
