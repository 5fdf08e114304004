"""RadStream's shared runtime: Kafka loop, schemas, security, storage, metrics and the CLI."""
