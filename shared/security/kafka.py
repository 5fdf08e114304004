"""aiokafka connection arguments for a principal: TLS (host name checked) plus SCRAM-SHA-512."""

from __future__ import annotations

from typing import Any

from aiokafka.helpers import create_ssl_context

from shared.config import KafkaSettings
from shared.security.keyfile import read_secret_file


def client_kwargs(kafka: KafkaSettings) -> dict[str, Any]:
    """Arguments shared by every aiokafka producer, consumer and admin client."""
    kwargs: dict[str, Any] = {
        "bootstrap_servers": kafka.bootstrap_servers,
        "security_protocol": kafka.security_protocol,
    }
    if kafka.security_protocol in ("SSL", "SASL_SSL"):
        cafile = str(kafka.ca_file) if kafka.ca_file else None
        kwargs["ssl_context"] = create_ssl_context(cafile=cafile)
    if kafka.security_protocol.startswith("SASL"):
        kwargs["sasl_mechanism"] = kafka.sasl_mechanism
        kwargs["sasl_plain_username"] = kafka.username
        password = kafka.password.get_secret_value()
        if kafka.password_file is not None:
            # re-read at every client start: a rotated password is used by the next client;
            # refused when others may read the file (shared/security/keyfile.py)
            password = read_secret_file(kafka.password_file)
        kwargs["sasl_plain_password"] = password
    return kwargs
