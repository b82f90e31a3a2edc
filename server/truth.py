"""Keeps the ground truth away from defense code, structurally.

Clients attach a `truth` ConfigRecord (`is-malicious`) to every reply. `TruthStrippingGrid` wraps the
ServerApp's Grid: it removes that record from each reply and hands it to the run recorder BEFORE the
replies are returned to the strategy, so no defense can read it, by accident or otherwise.

It also does its own push-then-poll in `send_and_receive`, for two reasons: flwr 1.41's deployment
grid sleeps 3 s between polls (every round would be rounded up to a multiple of 3 s), and the server
can do useful work (`while_waiting`, e.g. evaluating the initial model) while the clients train.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from flwr.app import Message
from flwr.serverapp import Grid

TRUTH_KEY = "truth"
POLL_INTERVAL_S = 0.1

TruthSink = Callable[[int, str, dict], None]  # (node id, message type, truth record as a dict)
# (messages sent, all replies of the round) -> replies; sees the truth (server/omniscient.py, simulation only)
ReplyRewriter = Callable[[list[Message], list[Message]], list[Message]]


class TruthStrippingGrid(Grid):
    """A Grid that delegates everything to `inner` and diverts `truth` records to `sink`."""

    def __init__(self, inner: Grid, sink: TruthSink, rewrite_replies: ReplyRewriter | None = None) -> None:
        self._inner = inner
        self._sink = sink
        self._rewrite_replies = rewrite_replies

    def _strip(self, replies: Iterable[Message]) -> list[Message]:
        replies = list(replies)
        for reply in replies:
            if reply.has_error() or TRUTH_KEY not in reply.content:
                continue
            truth = reply.content.pop(TRUTH_KEY)
            self._sink(reply.metadata.src_node_id, reply.metadata.message_type, dict(truth))
        return replies

    # --- Grid API -------------------------------------------------------------------------------
    def set_run(self, run):
        return self._inner.set_run(run)

    @property
    def run(self):
        return self._inner.run

    def create_message(self, *args, **kwargs):
        return self._inner.create_message(*args, **kwargs)

    def get_node_ids(self):
        return self._inner.get_node_ids()

    def get_nodes(self):
        return self._inner.get_nodes()

    def push_messages(self, messages):
        return self._inner.push_messages(messages)

    def pull_messages(self, message_ids):
        return self._strip(self._inner.pull_messages(message_ids))

    def send_and_receive(self, messages, *, timeout=None, while_waiting: Callable[[], None] | None = None):
        """Push, run `while_waiting` (if any), then poll until every reply is in or `timeout` passes."""
        messages = list(messages)
        pending = set(self._inner.push_messages(messages))
        if while_waiting is not None:
            while_waiting()
        deadline = None if timeout is None else time.time() + timeout
        replies: list[Message] = []
        while pending and (deadline is None or time.time() < deadline):
            arrived = list(self._inner.pull_messages(pending))
            replies.extend(arrived)
            pending -= {m.metadata.reply_to_message_id for m in arrived}
            if pending:
                time.sleep(POLL_INTERVAL_S)
        if self._rewrite_replies is not None:  # before stripping: the simulation-only omniscient wrapper
            replies = self._rewrite_replies(messages, replies)
        return self._strip(replies)
