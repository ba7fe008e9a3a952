"""The sink API: subclass :class:`Sink`, declare its ``Config`` dataclass, implement
``init(config, host)`` and ``write(host, batch)``."""

from .config import NoConfig
from .packed import PackedEvents


class Accepted:
    """Every event of the batch is durable: the host may commit past it."""

    def __eq__(self, other):
        return isinstance(other, Accepted)

    def __repr__(self):
        return "Accepted()"


ACCEPTED = Accepted()


class RetryLater:
    """Not everything is durable: the host retries the whole batch later."""

    def __init__(self, reason):
        self.reason = str(reason)

    def __eq__(self, other):
        return isinstance(other, RetryLater) and other.reason == self.reason

    def __repr__(self):
        return "RetryLater(%r)" % self.reason


class Rejected:
    """These events can never be written (dead-lettered); all others are durable.
    ``rejections``: (event_id, reason) pairs."""

    def __init__(self, rejections):
        self.rejections = [(int(i), str(r)) for i, r in rejections]

    def __eq__(self, other):
        return isinstance(other, Rejected) and other.rejections == self.rejections

    def __repr__(self):
        return "Rejected(%r)" % self.rejections


class SourceRange:
    def __init__(self, topic, partition, first_offset, last_offset):
        self.topic = topic
        self.partition = partition
        self.first_offset = first_offset
        self.last_offset = last_offset


class Batch:
    """A packed batch: ``id`` (stable for a replay), ``sources`` and ``events`` (a
    :class:`PackedEvents`: ``len(batch.events)``, ``for e in batch.events``, ``batch.events[i]``)."""

    def __init__(self, id, events, sources=()):
        self.id = id
        self.events = events if isinstance(events, PackedEvents) else PackedEvents(events)
        self.sources = list(sources)


class Sink:
    """Base class of a Python sink plugin.

    ``Config``: the dataclass the ``[plugins.config]`` table is parsed into before ``init``
    (:mod:`fanout_sdk.config`; a bad key is refused naming it). :class:`NoConfig` (the default)
    takes no settings; ``dict`` takes the table untyped.

    ``init(config, host)`` gets the parsed config; raise ``ValueError`` (or any exception) for
    a configuration the plugin cannot run with. ``write(host, batch)`` returns
    :data:`ACCEPTED`, :class:`RetryLater` or :class:`Rejected`; an exception escaping it is
    answered as ``RetryLater``. It must be idempotent by event id. ``host`` is the host's
    capabilities: :class:`fanout_sdk.host.WasmHost` in the component, a
    :class:`fanout_sdk.host.MockHost` when a test calls ``write``.
    """

    Config = NoConfig

    def init(self, config, host):
        pass

    def write(self, host, batch):
        raise NotImplementedError
