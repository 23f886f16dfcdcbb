"""An in-process Flower grid: runs the real ServerApp logic against the real ClientApp code,
without processes. For fast unit tests only; end-to-end tests use real SuperLink/SuperNodes.

Every message is deflated to bytes and inflated again on the way in both directions, as the
SuperLink would, so no object is shared by reference between "server" and "silos".
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

RUN_ID = 4242
SERVER_NODE = 0


def _wire_copy(message: Message) -> Message:
    """A deep copy that goes through Flower's own serialisation."""
    from flwr.common.serde import message_from_proto, message_to_proto

    return message_from_proto(message_to_proto(message))


class InProcessGrid(Grid):
    """A Grid whose nodes are ClientApps called in this process.

    ``tap`` sees every (request, reply) pair: tests use it to record or tamper with traffic.
    ``drop`` is asked before each delivery and may make a node silent for that message.
    """

    def __init__(
        self,
        apps: dict[int, tuple[ClientApp, dict]],
        tap: Callable[[Message, Message | None], Message | None] | None = None,
        drop: Callable[[int, Message], bool] | None = None,
    ) -> None:
        self.apps = apps
        self.contexts = {
            node: Context(
                run_id=RUN_ID,
                node_id=node,
                node_config=dict(node_config),
                state=RecordDict(),
                run_config={},
            )
            for node, (_, node_config) in apps.items()
        }
        self.tap = tap
        self.drop = drop
        self.sent: list[Message] = []
        self.received: list[Message] = []
        self._inbox: dict[str, Message] = {}
        TaskIdentity.run_id = RUN_ID
        TaskIdentity.node_id = SERVER_NODE
        TaskIdentity.task_id = 1

    # Grid API -------------------------------------------------------------------------------
    def set_run(self, run) -> None:
        """Not used in process."""

    @property
    def run(self):
        """Not used in process."""
        return None

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        """Build an instruction message."""
        return Message(
            content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id
        )

    def get_node_ids(self) -> Iterable[int]:
        """Node ids of the in-process silos."""
        return list(self.apps)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Deliver each message to its node now; keep the reply for pull_messages."""
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            self.sent.append(message)
            ids.append(message.metadata.message_id)
            node = message.metadata.dst_node_id
            if node not in self.apps or (self.drop and self.drop(node, message)):
                continue
            delivered = _wire_copy(message)
            delivered.metadata.__dict__["_message_id"] = message.metadata.message_id
            app, _ = self.apps[node]
            TaskIdentity.node_id = node
            try:
                reply = app(delivered, self.contexts[node])
            finally:
                TaskIdentity.node_id = SERVER_NODE
            reply.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            reply.metadata.__dict__["_src_node_id"] = node
            reply = _wire_copy(reply) if not reply.has_error() else reply
            reply.metadata.__dict__["_src_node_id"] = node
            reply.metadata.__dict__["_reply_to_message_id"] = message.metadata.message_id
            if self.tap:
                tapped = self.tap(message, reply)
                if tapped is None:
                    continue
                reply = tapped
            self.received.append(reply)
            self._inbox[message.metadata.message_id] = reply
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Replies to the given message ids that arrived."""
        return [self._inbox.pop(i) for i in list(message_ids) if i in self._inbox]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push, then pull every reply (silent nodes simply have none)."""
        ids = list(self.push_messages(messages))
        return list(self.pull_messages(ids))
