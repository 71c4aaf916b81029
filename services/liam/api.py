"""LiamService servicer: proto in, domain call, proto out (errors map to status codes in the interceptor)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable

import grpc
import numpy as np
from aiokafka.errors import KafkaError

from clisonix.liam.v1 import liam_pb2, liam_pb2_grpc
from services.common.errors import ClisonixError, InvalidArgument, NotFound, ResourceExhausted, Unavailable
from services.common.kafka import EventProducer
from services.liam.binary import BinaryAlgebra, HammingIndex
from services.liam.codec import invalid, record_metrics, report_to_proto, vectors_from_proto, vectors_to_proto
from services.liam.errors import InvalidMetrics
from services.liam.monitor import MonitorBook
from services.liam.settings import LiamSettings

SERVICE_NAME = liam_pb2.DESCRIPTOR.services_by_name["LiamService"].full_name


class LiamServicer(liam_pb2_grpc.LiamServiceServicer):
    """IngestMetrics writes to the metrics topic; Analyze reads the monitors this member's worker keeps;
    Encode and Search work on bit-packed hypervectors (named search stores kept in memory, bounded)."""

    def __init__(self, settings: LiamSettings, producer: EventProducer, book: MonitorBook) -> None:
        self.settings = settings
        self.producer = producer
        self.book = book
        self.algebra = BinaryAlgebra(settings.hypervector_bits, settings.hypervector_seed)
        self.stores: dict[str, HammingIndex] = {}

    async def IngestMetrics(
        self, request_iterator: AsyncIterator[liam_pb2.MetricRecord], context: grpc.aio.ServicerContext
    ) -> liam_pb2.IngestMetricsResponse:
        deliveries = []
        rejected = []
        index = 0
        async for record in request_iterator:
            try:
                record_metrics(record)
            except ClisonixError as exc:
                rejected.append(
                    liam_pb2.RejectedRecord(index=index, record_id=record.record_id, reason=exc.reason, detail=str(exc))
                )
            else:
                if not record.record_id:
                    record.record_id = uuid.uuid4().hex
                deliveries.append(
                    await self.producer.send(
                        self.settings.topic_liam_metrics, record.stream, record, event_id=record.record_id
                    )
                )
            index += 1
        try:
            await asyncio.gather(*deliveries)
        except KafkaError as exc:
            # Some records may have been written: each has its record id, so a retry is counted once per id.
            raise Unavailable(
                f"Kafka did not take the records: {type(exc).__name__}", reason="kafka_unavailable"
            ) from exc
        return liam_pb2.IngestMetricsResponse(accepted=len(deliveries), rejected=rejected)

    async def Analyze(
        self, request: liam_pb2.AnalyzeRequest, context: grpc.aio.ServicerContext
    ) -> liam_pb2.PatternReport:
        monitor = self.book.streams.get(request.stream)
        if monitor is None or monitor.records == 0:
            raise NotFound(f"no records of stream {request.stream!r} on this member", reason="unknown_stream")
        return report_to_proto(request.stream, monitor.report(), liam_pb2.REPORT_KIND_PATTERNS)

    async def Encode(
        self, request: liam_pb2.EncodeRequest, context: grpc.aio.ServicerContext
    ) -> liam_pb2.BinaryVectors:
        if not request.dimensions or not request.values or len(request.values) % request.dimensions:
            raise InvalidArgument(
                f"{len(request.values)} values do not make vectors of {request.dimensions} dimensions",
                reason="bad_vectors",
            )
        matrix = np.asarray(request.values, dtype=np.float64).reshape(-1, request.dimensions)
        try:
            encoded = self.algebra.encode(matrix)
        except InvalidMetrics as exc:
            raise invalid(exc) from exc
        return vectors_to_proto(encoded, self.algebra.bits)

    async def Search(
        self, request: liam_pb2.SearchRequest, context: grpc.aio.ServicerContext
    ) -> liam_pb2.SearchResponse:
        if request.k < 1:
            raise InvalidArgument("k must be at least 1", reason="bad_k")
        queries = vectors_from_proto(request.queries, "queries")
        if request.HasField("vectors"):
            index = self._index(vectors_from_proto(request.vectors, "vectors"), request.vectors.bits)
            if request.store:
                self._keep(request.store, index, len(request.vectors.data))
        else:
            found = self.stores.get(request.store)
            if found is None:
                raise NotFound(f"no search store {request.store!r}; send vectors with it first", reason="no_store")
            index = found
        if queries.shape[1] != index.algebra.words or request.queries.bits != index.algebra.bits:
            raise InvalidArgument(
                f"queries have {request.queries.bits} bits, the stored vectors {index.algebra.bits}",
                reason="bad_vectors",
            )
        try:
            indices, distances = await asyncio.to_thread(index.search, queries, request.k)
        except InvalidMetrics as exc:
            raise invalid(exc) from exc
        bits = index.algebra.bits
        return liam_pb2.SearchResponse(
            results=[
                liam_pb2.SearchResult(
                    hits=[
                        liam_pb2.SearchHit(index=int(i), distance=int(d), similarity=1.0 - int(d) / bits)
                        for i, d in zip(row_indices, row_distances, strict=True)
                    ]
                )
                for row_indices, row_distances in zip(indices, distances, strict=True)
            ],
            route=index.route(queries.shape[0]),
        )

    def _index(self, vectors: np.ndarray, bits: int) -> HammingIndex:
        algebra = self.algebra if bits == self.algebra.bits else BinaryAlgebra(bits, self.settings.hypervector_seed)
        try:
            return HammingIndex(algebra, vectors)
        except InvalidMetrics as exc:
            raise invalid(exc) from exc

    def _keep(self, name: str, index: HammingIndex, size: int) -> None:
        if size > self.settings.max_store_bytes:
            raise ResourceExhausted(
                f"a store of {size} bytes is over {self.settings.max_store_bytes}", reason="store_too_large"
            )
        if name not in self.stores and len(self.stores) >= self.settings.max_search_stores:
            raise ResourceExhausted(f"already {len(self.stores)} search stores", reason="too_many_stores")
        self.stores[name] = index


def register(servicer: LiamServicer) -> Callable[[grpc.aio.Server], None]:
    def add(server: grpc.aio.Server) -> None:
        liam_pb2_grpc.add_LiamServiceServicer_to_server(servicer, server)

    return add
