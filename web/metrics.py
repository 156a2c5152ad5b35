"""Prometheus metrics for one app, in its own CollectorRegistry (two apps never share counters).

Two sources: what the web layer sees per request (HTTP status counts, time to first token,
inter-token latency, end-to-end latency, queue time, finish reasons), observed as requests end;
and the engine's own state (running/waiting requests, KV-cache usage, prefix-cache hits, token
counters), read at scrape time by a collector, so nothing is polled. Names follow vLLM's with
our prefix, so dashboards carry over by a rename.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

P = "aio_engine:"
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                   20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4,
               0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)


class EngineCollector:
    """Engine gauges and counters, read from the engine when Prometheus scrapes."""

    def __init__(self, engine, model_name: str) -> None:
        self.engine = engine
        self.labels = {"model_name": model_name}

    def _family(self, cls, name: str, doc: str, value: float):
        family = cls(P + name, doc, labels=list(self.labels))
        family.add_metric(list(self.labels.values()), value)
        return family

    def collect(self):
        n = self.engine.counters()
        g, c = GaugeMetricFamily, CounterMetricFamily
        yield self._family(g, "num_requests_running", "Sequences in the running batch.", n.running)
        yield self._family(g, "num_requests_waiting", "Sequences waiting to be scheduled.", n.waiting)
        yield self._family(g, "kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0..1).", n.kv_cache_usage)
        queries, hits = n.prefix_queries, n.prefix_hits
        yield self._family(c, "prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", queries)
        yield self._family(c, "prefix_cache_hits", "Prompt tokens found in the prefix cache.", hits)
        yield self._family(g, "prefix_cache_hit_rate", "prefix_cache_hits / prefix_cache_queries since start.",
                           hits / queries if queries else 0.0)
        yield self._family(c, "prompt_tokens", "Prompt tokens computed (prefill, prefix-cache hits excluded).",
                           n.prompt_tokens)
        yield self._family(c, "generation_tokens", "Tokens generated.", n.generated_tokens)
        yield self._family(c, "engine_steps", "Engine steps run.", n.steps)
        yield self._family(c, "num_preemptions", "Sequences preempted for lack of KV blocks.", n.preemptions)
        yield self._family(g, "engine_dead", "1 once the engine loop has failed.", float(self.engine.errored))


class ServerMetrics:
    def __init__(self, engine, model_name: str) -> None:
        self.registry = CollectorRegistry()
        r, labels = self.registry, ["model_name"]
        self.model_name = model_name
        self.http_requests = Counter(P + "http_requests", "HTTP requests by route and status.",
                                     ["method", "route", "status"], registry=r)
        self.request_success = Counter(P + "request_success", "Finished generation requests by finish reason.",
                                       ["model_name", "finished_reason"], registry=r)
        self.ttft = Histogram(P + "time_to_first_token_seconds", "Arrival to first token.", labels,
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram(P + "inter_token_latency_seconds", "Time between streamed tokens.", labels,
                             buckets=ITL_BUCKETS, registry=r)
        self._itl = self.itl.labels(model_name)  # observed per token: the labels lookup once
        self.e2e = Histogram(P + "e2e_request_latency_seconds", "Arrival to last token.", labels,
                             buckets=LATENCY_BUCKETS, registry=r)
        self.queue = Histogram(P + "request_queue_time_seconds", "Arrival to first scheduled.", labels,
                               buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_len = Histogram(P + "request_prompt_tokens", "Prompt tokens per request.", labels,
                                    buckets=TOKEN_BUCKETS, registry=r)
        self.output_len = Histogram(P + "request_generation_tokens", "Generated tokens per request.", labels,
                                    buckets=TOKEN_BUCKETS, registry=r)
        r.register(EngineCollector(engine, model_name))

    def observe_http(self, method: str, route: str, status: int) -> None:
        self.http_requests.labels(method, route, str(status)).inc()

    def observe_gap(self, seconds: float, tokens: int) -> None:
        """`tokens` arrived `seconds` after the request's previous ones: one inter-token latency
        per token. Observed as outputs arrive, not all at the request's end, where a long output's
        thousand observations (~5 ms) stalled every stream at once."""
        observe, value = self._itl.observe, seconds / tokens
        for _ in range(tokens):
            observe(value)

    def observe_finished(self, output, num_output_tokens: int) -> None:
        """One finished engine request."""
        m, name = output.metrics, self.model_name
        for c in output.outputs:
            self.request_success.labels(name, c.finish_reason or "unknown").inc()
        self.prompt_len.labels(name).observe(len(output.prompt_token_ids))
        self.output_len.labels(name).observe(num_output_tokens)
        if m is None:
            return
        if m.first_scheduled_time is not None:
            self.queue.labels(name).observe(max(0.0, m.first_scheduled_time - m.arrival_time))
        # With FINAL_ONLY outputs an engine may stamp the first token only at the end: skip those.
        if m.first_token_time is not None and (m.finished_time is None or m.first_token_time < m.finished_time
                                               or num_output_tokens <= 1):
            self.ttft.labels(name).observe(max(0.0, m.first_token_time - m.arrival_time))
        if m.finished_time is not None:
            self.e2e.labels(name).observe(max(0.0, m.finished_time - m.arrival_time))

    def render(self) -> bytes:
        return generate_latest(self.registry)
