#!/usr/bin/env bash
# deploy/create-topics.sh: create every onair topic on an Apache Kafka cluster. Idempotent.
#
# For: the one-shot `topics` service in docker-compose.yml (run inside the apache/kafka
#   image, which has bash and /opt/kafka/bin), or by hand against any cluster whose
#   Kafka tools are on KAFKA_BIN.
# Not for: changing the partition count of an existing topic (that breaks the
#   co-partitioning of the room-keyed inputs: it fails instead).
#
# Topics (names as in pipelines/kafka.toml; the same set and settings as
# `onair run` creates with `kafka.topics.create`, src/kafka.rs pipeline_topics):
#   room-keyed inputs, co-partitioned: video, audio, comments, actions
#   user-keyed input:                  short-video-actions
#   outputs:                           room-stats, transcripts, room-features,
#                                      training-samples, highlight-scores, highlights,
#                                      gift-predictions, dead-letters
#   compacted outputs:                 room-embeddings, user-sequences
#   internal:                          user-actions (the user stage's input),
#                                      onair-users-changelog (compacted state)
# video, audio, dead-letters (which carries the original payload) and the changelog
# get max.message.bytes=67108864, as onair itself would create them.
#
# Environment (all optional):
#   BOOTSTRAP_SERVERS   default kafka:9092
#   PARTITIONS          default 4
#   REPLICATION_FACTOR  default 1
#   BIG_MESSAGE_BYTES   default 67108864 (video, audio, dead-letters, the changelog)
#   MEDIA_RETENTION_MS  retention.ms for video and audio; unset = the broker's default.
#                       Kafka judges retention by the records' timestamps (event time):
#                       records stamped far in the past are deleted early.
#   KAFKA_BIN           default /opt/kafka/bin
#   WAIT_SECONDS        how long to wait for the cluster to answer, default 120
# Exits non-zero if the cluster never answers, a topic cannot be created, or an
# existing topic has a different partition count than PARTITIONS.
set -euo pipefail

bootstrap="${BOOTSTRAP_SERVERS:-kafka:9092}"
partitions="${PARTITIONS:-4}"
replication="${REPLICATION_FACTOR:-1}"
big="${BIG_MESSAGE_BYTES:-67108864}"
media_retention="${MEDIA_RETENTION_MS:-}"
bin="${KAFKA_BIN:-/opt/kafka/bin}"
wait_seconds="${WAIT_SECONDS:-120}"

log() { printf 'create-topics: %s\n' "$*" >&2; }

topics=(video audio comments actions short-video-actions room-stats transcripts
  room-features training-samples highlight-scores highlights user-actions room-embeddings
  gift-predictions user-sequences onair-users-changelog dead-letters)

# Per-topic configs, one `key=value` a line.
topic_configs() {
  case "$1" in
    video | audio)
      echo "max.message.bytes=$big"
      if [[ -n "$media_retention" ]]; then echo "retention.ms=$media_retention"; fi
      ;;
    dead-letters)
      echo "max.message.bytes=$big"
      ;;
    room-embeddings | user-sequences)
      echo "cleanup.policy=compact"
      ;;
    onair-users-changelog)
      echo "cleanup.policy=compact"
      echo "max.message.bytes=$big"
      ;;
    *) ;; # broker defaults
  esac
}

# Wait for the cluster (depends_on already waits for the healthcheck; this covers
# running the script by hand).
deadline=$((SECONDS + wait_seconds))
until "$bin/kafka-topics.sh" --bootstrap-server "$bootstrap" --list >/dev/null 2>&1; do
  if ((SECONDS >= deadline)); then
    log "error: no answer from $bootstrap within ${wait_seconds}s"
    exit 1
  fi
  log "waiting for $bootstrap"
  sleep 2
done

for t in "${topics[@]}"; do
  mapfile -t kv < <(topic_configs "$t")
  args=()
  for c in "${kv[@]}"; do args+=(--config "$c"); done
  "$bin/kafka-topics.sh" --bootstrap-server "$bootstrap" --create --if-not-exists \
    --topic "$t" --partitions "$partitions" --replication-factor "$replication" \
    "${args[@]}" >/dev/null
  # --if-not-exists leaves an existing topic's configs alone: set them again, so a topic
  # that onair or an older run created gets the same limits.
  if ((${#kv[@]} > 0)); then
    "$bin/kafka-configs.sh" --bootstrap-server "$bootstrap" --alter \
      --entity-type topics --entity-name "$t" \
      --add-config "$(IFS=,; echo "${kv[*]}")" >/dev/null
  fi
done

# Check the partition counts (the room-keyed inputs must be co-partitioned).
described="$("$bin/kafka-topics.sh" --bootstrap-server "$bootstrap" --describe \
  --exclude-internal)"
failed=0
for t in "${topics[@]}"; do
  count="$(awk -v t="$t" '
    { for (i = 1; i < NF; i++) if ($i == "Topic:" && $(i + 1) == t) found = 1 }
    found { for (i = 1; i < NF; i++) if ($i == "PartitionCount:") { print $(i + 1); exit } }
  ' <<<"$described")"
  if [[ -z "$count" ]]; then
    log "error: topic $t missing after creation"
    failed=1
  elif [[ "$count" != "$partitions" ]]; then
    log "error: topic $t has $count partitions, expected $partitions (recreate it; altering breaks key placement)"
    failed=1
  else
    log "ok: $t ($count partitions)"
  fi
done
exit "$failed"
