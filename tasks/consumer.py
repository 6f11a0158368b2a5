"""The worker's consumer: Celery's own, except that a broker that goes away while the worker holds countdown
messages, or runs tasks, no longer stops the worker.

Celery 5.7, on losing the broker, first collects the broken connection (which detaches its transport) and then
closes it. Closing kombu's Redis channel puts back the messages it holds (countdown wake-ups), through that
detached transport, and fails with AttributeError. Celery takes that for an unrecoverable error and stops the
worker instead of reconnecting: a Redis restart left rpq without a poll worker. Here the close of the dead
connection is allowed to fail; the held messages could not go back through it anyway. They stay in Redis's
unacked set (if Redis kept its data) and come back after the visibility timeout, where the wake-ups they carry
have long been rebuilt by the reconciler and find nothing to do.
"""

from __future__ import annotations

import logging

from celery.worker.consumer import Consumer as CeleryConsumer

log = logging.getLogger("rpq.worker")


class Consumer(CeleryConsumer):  # type: ignore[misc]
    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        # The same detached transport fails a second way: a task that began before the broker went away and ends
        # after the worker reconnected acks through its old channel, whose connection is gone, and kombu raises
        # AttributeError there too. Counted among the connection errors, that ack is logged as failed (the message
        # comes back after the visibility timeout, and its task is idempotent) and a loss in the consumer's loop is
        # a reconnect, where it stopped the worker ("Unrecoverable error").
        known: tuple[type[BaseException], ...] = tuple(getattr(self, "connection_errors", ()))
        self.connection_errors: tuple[type[BaseException], ...] = (*known, AttributeError)

    def on_connection_error_after_connected(self, exc: Exception) -> None:
        connection = self.connection
        if connection is not None:
            close = connection.close

            def close_dead_connection() -> None:
                try:
                    close()
                except AttributeError as error:  # kombu's restore on a detached transport (see above)
                    log.warning("the broker connection was lost with messages held; they return to their queue "
                                "after the visibility timeout, and the reconciler rebuilds their wake-ups sooner "
                                "(%s)", error)

            connection.close = close_dead_connection
        super().on_connection_error_after_connected(exc)
