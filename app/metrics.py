"""Prometheus metrics of one app instance (its own registry: no process-global state)."""
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("halo_requests_total", "HTTP requests", ["route", "status"], registry=r)
        self.latency = Histogram("halo_request_seconds", "HTTP request latency", ["route", "status"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("halo_queue_depth", "images waiting for a batch", registry=r)
        # What predicts a batching server's latency, and so what its autoscaler reads (deploy/k8s).
        self.in_flight = Gauge("halo_images_in_flight", "images accepted and not yet answered (decoding, queued "
                               "or in a forward pass), every protocol together", registry=r)
        self.queue_wait = Histogram("halo_queue_wait_seconds", "time an image waited for its batch",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("halo_batch_size", "images per forward pass", buckets=BATCH_BUCKETS, registry=r)
        self.inference = Histogram("halo_inference_seconds", "forward pass time per batch",
                                   buckets=LATENCY_BUCKETS, registry=r)
        self.images = Counter("halo_images_total", "images classified (rate() gives images per second)",
                              registry=r)
        self.dropped = Counter("halo_images_dropped_total", "images dropped before compute", ["reason"], registry=r)
