"""The local stack: a real Kafka broker started as a process, its principals, topics and ACLs."""
