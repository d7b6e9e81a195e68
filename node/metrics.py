"""Prometheus metrics of one node, on a registry of its own (several nodes may share a process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["Metrics"]


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.uploads_total = Counter(
            "crdtmerge_uploads_total", "Uploads by outcome", ["kind", "result"], registry=r
        )
        self.upload_bytes_total = Counter(
            "crdtmerge_upload_bytes_total", "Bytes received in uploads", registry=r
        )
        self.download_bytes_total = Counter(
            "crdtmerge_download_bytes_total", "Object bytes served", registry=r
        )
        self.state_writes_total = Counter(
            "crdtmerge_state_writes_total", "Fsynced state transactions", registry=r
        )
        self.merges_total = Counter(
            "crdtmerge_merges_total", "Merges computed by outcome", ["result"], registry=r
        )
        self.merges_running = Gauge(
            "crdtmerge_merges_running", "Merges being computed now", registry=r
        )
        self.merge_seconds = Histogram(
            "crdtmerge_merge_seconds",
            "Time to compute a merged model",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800),
            registry=r,
        )
        self.objects = Gauge("crdtmerge_objects", "Objects in the store", registry=r)
        self.live_contributions = Gauge(
            "crdtmerge_live_contributions", "Live contributions per merge", ["merge"], registry=r
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
