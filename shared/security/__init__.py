"""Security at the boundaries: envelope encryption, keyring, keyed hashes, Kafka client auth."""
