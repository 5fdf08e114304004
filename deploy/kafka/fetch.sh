#!/usr/bin/env bash
# Fetch Apache Kafka (broker + tools + log4j2 binding) from Maven Central into an ignored cache.
# Idempotent: does nothing when the cache is already complete.
#   KAFKA_CACHE  target folder (default: <repo>/.cache/kafka)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
cache="${KAFKA_CACHE:-$repo/.cache/kafka}"
stamp="$cache/lib/.complete-$(sha256sum "$here/pom.xml" | cut -c1-16)"
if [[ -f "$stamp" ]]; then
  exit 0
fi
command -v java >/dev/null || { echo "fetch.sh: java not found (Kafka needs Java 17+)" >&2; exit 1; }
command -v mvn >/dev/null || { echo "fetch.sh: mvn not found" >&2; exit 1; }
rm -rf "$cache/lib.tmp"
mkdir -p "$cache"
echo "fetching Apache Kafka from Maven Central into $cache/lib ..." >&2
mvn -q -B -f "$here/pom.xml" dependency:copy-dependencies \
  -DincludeScope=runtime -DoutputDirectory="$cache/lib.tmp"
ls "$cache/lib.tmp"/kafka_2.13-*.jar "$cache/lib.tmp"/kafka-tools-*.jar >/dev/null
rm -rf "$cache/lib"
mv "$cache/lib.tmp" "$cache/lib"
touch "$stamp"
echo "Apache Kafka ready in $cache/lib" >&2
