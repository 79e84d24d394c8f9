"""``--metrics``: the ctl counters for Prometheus, served over HTTP by twisted.web.

A custom collector reads the :class:`~virtproxy.daemon.Runtime` at scrape
time (labels: ``channel``), so channels added or removed at run time appear
and disappear without registration bookkeeping, and nothing is kept twice.
It has its own registry: the process-wide default one would also export
Python's GC and process collectors under names we do not document.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from twisted.internet.endpoints import serverFromString
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

#: Channel counter -> (metric name, help).  Counters only ever grow.
COUNTERS = {
    "sessions": ("virtproxy_sessions", "Sessions established"),
    "frames_in": ("virtproxy_frames_received", "Frames received"),
    "frames_out": ("virtproxy_frames_sent", "Frames sent"),
    "bytes_in": ("virtproxy_channel_received_bytes", "Bytes read from the channel"),
    "bytes_out": ("virtproxy_channel_sent_bytes", "Bytes written to the channel"),
    "crc_errors": ("virtproxy_crc_errors", "Damaged frames (header or CRC check failed)"),
    "resyncs": ("virtproxy_resyncs", "Times the decoder resynchronised"),
    "lost_frames": ("virtproxy_lost_frames", "Frames missing by sequence number"),
    "discarded_bytes": ("virtproxy_discarded_bytes", "Bytes skipped while resynchronising"),
    "protocol_errors": ("virtproxy_protocol_errors", "Frames that broke the protocol"),
    "keepalive_timeouts": ("virtproxy_keepalive_timeouts", "Sessions ended by silence"),
    "limit_hits": ("virtproxy_limit_hits", "Peer opens refused by a limit"),
    "retransmits": ("virtproxy_link_retransmits", "Link chunks sent again (--link)"),
    "link_timeouts": ("virtproxy_link_timeouts", "Link retransmission timer expiries"),
    "duplicates": ("virtproxy_link_duplicates", "Link chunks received twice and dropped"),
    "bulk_bytes_out": ("virtproxy_bulk_sent_bytes", "Stream bytes sent spliced, in BULK frames"),
    "bulk_bytes_in": (
        "virtproxy_bulk_received_bytes",
        "Stream bytes received in BULK frames",
    ),
}


class RuntimeCollector:
    """Yields one sample per channel per counter, read live from the Runtime."""

    def __init__(self, runtime: Any) -> None:
        self.runtime = runtime

    def collect(self) -> Iterator[Metric]:
        rows = self.runtime.channel_rows()
        up = GaugeMetricFamily("virtproxy_session_up", "1 if the session is up", labels=["channel"])
        streams = GaugeMetricFamily("virtproxy_streams", "Live streams", labels=["channel"])
        uptime = GaugeMetricFamily(
            "virtproxy_session_uptime_seconds",
            "Seconds since the session came up",
            labels=["channel"],
        )
        counters = {
            key: CounterMetricFamily(name, text, labels=["channel"])
            for key, (name, text) in COUNTERS.items()
        }
        for row in rows:
            label = [row["channel"]]
            up.add_metric(label, 1.0 if row["state"] == "up" else 0.0)
            streams.add_metric(label, row["streams"])
            uptime.add_metric(label, row["uptime"])
            for key, family in counters.items():
                family.add_metric(label, row[key])
        forwards = GaugeMetricFamily(
            "virtproxy_forward_streams",
            "Live streams per forward",
            labels=["channel", "kind", "name"],
        )
        for row in self.runtime.forward_rows():
            forwards.add_metric([row["channel"], row["kind"], row["name"]], row["streams"])
        yield up
        yield streams
        yield uptime
        yield from counters.values()
        yield forwards


class MetricsResource(Resource):
    """``GET /metrics`` (any path, in fact): the text exposition format, synchronously.

    prometheus_client's own Twisted resource runs a WSGI app in a thread
    pool; reading our counters is cheap and must happen on the reactor
    thread anyway.
    """

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self.registry = registry

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))
        return generate_latest(self.registry)


def make_registry(runtime: Any) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RuntimeCollector(runtime))
    return registry


def metrics_service(runtime: Any, description: str) -> Any:
    """A ListenService serving the metrics of ``runtime`` on a server endpoint."""
    from virtproxy.service import ListenService

    site = Site(MetricsResource(make_registry(runtime)))
    site.noisy = False
    site.log = lambda request: None  # type: ignore[method-assign]  # no access log per scrape
    return ListenService(
        serverFromString(runtime.reactor, description),
        site,  # type: ignore[arg-type]
        "metrics",
    )
