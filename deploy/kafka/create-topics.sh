#!/bin/sh
# Creates the project's topics on an Apache Kafka cluster, once; existing topics are left as they are.
# BOOTSTRAP: host:port of a listener reachable from here; REPLICATION: replicas per partition (3 on a real
# cluster, 1 on the single compose broker). Run by the compose service `topics` with the apache/kafka image.
set -eu
BOOTSTRAP="${BOOTSTRAP:-kafka:29092}"
REPLICATION="${REPLICATION:-1}"
MIN_ISR="${MIN_ISR:-1}"
TOPICS=/opt/kafka/bin/kafka-topics.sh

create() {  # name partitions config...
  name="$1"; partitions="$2"; shift 2
  set -- --config "min.insync.replicas=${MIN_ISR}" "$@"
  "$TOPICS" --bootstrap-server "$BOOTSTRAP" --create --if-not-exists --topic "$name" \
    --partitions "$partitions" --replication-factor "$REPLICATION" "$@"
}

# Sessions are keys: partitions bound how many fusion and inference workers share the work.
create clisonix.signals.raw.v1 12 --config retention.ms=604800000 --config max.message.bytes=4194304
create clisonix.signals.fused.v1 12 --config retention.ms=259200000 --config max.message.bytes=4194304
create clisonix.inference.results.v1 12 --config retention.ms=2592000000
# Tide's command log is the state: kept for ever and never compacted (a compare-and-set, a delete or a retried
# command id is decided against the whole history before it; a compacted log replays to other answers).
create clisonix.tide.log.v1 6 --config retention.ms=-1 --config retention.bytes=-1
create clisonix.liam.metrics.v1 6 --config retention.ms=604800000
# LIAM pattern reports keyed by stream: compacted, so the newest report of every stream stays however old,
# and deleted after 30 days so streams that are gone do not stay for ever (anomalies keep their own reports
# until a newer one of the same stream is compacted over them).
create clisonix.liam.patterns.v1 6 --config cleanup.policy=compact,delete --config retention.ms=2592000000
create clisonix.deadletter.v1 3 --config retention.ms=1209600000
"$TOPICS" --bootstrap-server "$BOOTSTRAP" --list
