"""Attack test (issue 14, low): a consumer-group grant is no longer a bare name prefix. The
alert stage's grant ``radstream.alert`` (PREFIXED) also matched the pager's group
``radstream.alert-consumer``: the alert principal could join it, take its partitions and move
its offsets (alerts skipped for the worklist). Now refused by the broker; each principal still
joins its own group and its dotted sub-groups."""

from __future__ import annotations

import pytest
from aiokafka.errors import GroupAuthorizationFailedError

from tests.helpers import Env
from tests.integration.test_acls import consume, denied, seed

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("collect_refused_clients")]


async def test_a_group_grant_does_not_reach_a_group_that_merely_starts_the_same(
    env: Env,
) -> None:
    await seed(env, "findings")
    await seed(env, "alerts")
    # the alert stage reads findings; in the alert-consumer's group it is refused
    await denied(
        consume(env, "alert", "findings", group="alert-consumer"), GroupAuthorizationFailedError
    )
    await denied(
        consume(env, "alert", "findings", group="alert-replica"), GroupAuthorizationFailedError
    )
    # what each needs still works: its own group, and a dotted sub-group of it
    assert await consume(env, "alert", "findings", group="alert") == 1
    assert await consume(env, "alert", "findings", group="alert.canary") == 1
    assert await consume(env, "alert-consumer", "alerts", group="alert-consumer") == 1
