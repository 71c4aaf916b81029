"""Every service's operating metrics, published to LIAM each interval: the platform watched by its own analytics.

Each interval the reporter reads the service's metrics registry (the ServiceMetrics every service has) and the
process CPU clock, turns the counters into rates over the interval, and publishes one MetricRecord as stream
"service/<name>" to settings.topic_liam_metrics. The names are fixed, so a service's stream keeps its shape:
  latency_mean_seconds      mean of clisonix_stage_latency_seconds over the interval (all stages; absent when
                            nothing was timed)
  records_in_per_second, records_out_per_second, records_rejected_per_second, deadlettered_per_second
  power_watts               clisonix_energy_joules_total per second (its source is the record's energy_source
                            label: an estimate is never presented as a measurement)
  co2_grams_per_hour        clisonix_co2_grams_total, per hour
  consumer_lag_records      clisonix_consumer_lag_records, summed over topics
  cpu_cores                 process CPU seconds per second
Publishing never stops the service: a failure is logged and the next interval tries again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable

from prometheus_client import CollectorRegistry

from clisonix.liam.v1 import liam_pb2
from services.common.kafka import EventProducer, ensure_topics, kafka_producer
from services.common.metrics import PREFIX
from services.common.settings import ServiceSettings

log = logging.getLogger(__name__)

COUNTERS = {
    "records_in_per_second": f"{PREFIX}_records_in_total",
    "records_out_per_second": f"{PREFIX}_records_out_total",
    "records_rejected_per_second": f"{PREFIX}_records_rejected_total",
    "deadlettered_per_second": f"{PREFIX}_deadlettered_total",
    "power_watts": f"{PREFIX}_energy_joules_total",
    "co2_grams_per_hour": f"{PREFIX}_co2_grams_total",
}
LATENCY = f"{PREFIX}_stage_latency_seconds"
LAG = f"{PREFIX}_consumer_lag_records"


def read_totals(registry: CollectorRegistry) -> dict[str, float]:
    """Sample name -> value summed over labels, for the samples the operating metrics are made of."""
    wanted = {*COUNTERS.values(), f"{LATENCY}_sum", f"{LATENCY}_count", LAG}
    totals: dict[str, float] = {}
    for family in registry.collect():
        for sample in family.samples:
            if sample.name in wanted:
                totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals


def operating_metrics(
    before: dict[str, float], after: dict[str, float], seconds: float, cpu: float
) -> dict[str, float]:
    """The interval's figures from two read_totals() readings `seconds` apart and the CPU seconds used."""
    figures: dict[str, float] = {}
    for name, sample in COUNTERS.items():
        delta = max(after.get(sample, 0.0) - before.get(sample, 0.0), 0.0)
        figures[name] = delta / seconds * (3600.0 if name.endswith("_per_hour") else 1.0)
    timed = after.get(f"{LATENCY}_count", 0.0) - before.get(f"{LATENCY}_count", 0.0)
    if timed > 0:
        figures["latency_mean_seconds"] = (after[f"{LATENCY}_sum"] - before.get(f"{LATENCY}_sum", 0.0)) / timed
    figures["consumer_lag_records"] = after.get(LAG, 0.0)
    figures["cpu_cores"] = cpu / seconds
    return figures


class OperatingReporter:
    """Publishes the service's operating metrics every settings.operating_metrics_interval_seconds."""

    def __init__(
        self,
        settings: ServiceSettings,
        registry: CollectorRegistry,
        energy_source: str,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.energy_source = energy_source
        self.clock = clock
        self.stream = f"service/{settings.service_name}"
        self.published = 0

    async def run(self, stop: asyncio.Event) -> None:
        """Publishes until `stop` is set; the producer opens at the first report (a short-lived service never
        opens one)."""
        interval = self.settings.operating_metrics_interval_seconds
        if interval <= 0:
            return
        async with contextlib.AsyncExitStack() as stack:
            producer: EventProducer | None = None
            before, at, cpu_at = read_totals(self.registry), self.clock(), time.process_time()
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), interval)
                if stop.is_set():
                    return
                after, now, cpu_now = read_totals(self.registry), self.clock(), time.process_time()
                figures = operating_metrics(before, after, max(now - at, 1e-9), cpu_now - cpu_at)
                before, at, cpu_at = after, now, cpu_now
                try:
                    if producer is None:
                        if self.settings.create_topics:
                            await ensure_topics(self.settings, [self.settings.topic_liam_metrics])
                        producer = await stack.enter_async_context(kafka_producer(self.settings))
                    await self._publish(producer, figures)
                except Exception as exc:  # a report lost is not worth a service
                    log.warning("operating metrics not published", extra={"fields": {"error": type(exc).__name__}})

    async def _publish(self, producer: EventProducer, figures: dict[str, float]) -> None:
        record = liam_pb2.MetricRecord(
            stream=self.stream, record_id=uuid.uuid4().hex, labels={"energy_source": self.energy_source}
        )
        record.time.GetCurrentTime()
        for name, value in figures.items():
            record.metrics[name].number_value = value
        delivery = await producer.send(self.settings.topic_liam_metrics, self.stream, record, event_id=record.record_id)
        await delivery
        self.published += 1
