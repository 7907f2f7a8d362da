"""Group commit: concurrent guarded writes share etcd transactions.

Replication and garbage collection make many small, independent, guarded writes at once: a
copy published, a condemned copy released, a tombstone cleared. Each is cheap for etcd to
apply but costs a raft round (and an fsync) when sent alone. `GroupCommit.submit` queues a
write; whichever caller finds no transaction in flight takes everything queued (within
etcd's per-transaction op limit) and sends it as one transaction whose guard is every
write's guard. When that combined guard fails, some write's own guard failed, so each write
of the batch is sent alone and gets its own answer: a batch never decides for a write what
its own guard would not have.

Two writes share a transaction only if neither changes a key the other's guard reads or
changes (etcd also refuses a transaction that names a key twice). Then a combined success
means the same as the writes applied one after another, in any order: no guard is judged on
a state another write of the batch would have changed. (Two nodes' copies of one blob, each
withdrawn while the other still stands, must never both go in one transaction.)
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import anyio

from cargohold.coordinator.etcd import Compare, Delete, EtcdClient, EtcdError, EtcdUnavailable, Put, TxnResult

DEFAULT_MAX_OPS = 128          # etcd's default --max-txn-ops


@dataclass(eq=False)
class _Write:
    compare: list[Compare]
    ops: list
    done: anyio.Event = field(default_factory=anyio.Event)
    result: TxnResult | None = None
    error: BaseException | None = None

    def finish(self, result: TxnResult | None = None, error: BaseException | None = None) -> None:
        self.result, self.error = result, error
        self.done.set()

    def touches(self) -> list[tuple[str, bool]]:
        """(key, whole prefix?) of every key this write changes."""
        return [(op.key, isinstance(op, Delete) and op.prefix) for op in self.ops if isinstance(op, (Put, Delete))]

    def reads(self) -> list[tuple[str, bool]]:
        """(key, whole prefix?) of every key its guard looks at."""
        return [(c.key, c.prefix) for c in self.compare]


def _overlap(a: tuple[str, bool], b: tuple[str, bool]) -> bool:
    (key_a, prefix_a), (key_b, prefix_b) = a, b
    return key_a == key_b or (prefix_a and key_b.startswith(key_a)) or (prefix_b and key_a.startswith(key_b))


class GroupCommit:
    def __init__(self, client: EtcdClient, *, max_ops: int = DEFAULT_MAX_OPS):
        self.client = client
        self.max_ops = max(max_ops, 1)
        self._queue: deque[_Write] = deque()
        self._committing = False
        self._round_done = anyio.Event()
        self.transactions = 0          # sent to etcd (combined, alone and fallback)
        self.writes = 0                # submitted

    async def submit(self, compare: list[Compare], ops: list) -> TxnResult:
        """Apply `ops` if every `compare` holds, possibly in one transaction with other writes;
        the result is this write's own (its responses, the revision it was applied at).

        The write must be safe to send twice: when the caller that was sending a batch is
        cancelled, that batch's other writes are sent again (the first attempt may have
        been applied)."""
        write = _Write(list(compare), list(ops))
        self._queue.append(write)
        self.writes += 1
        try:
            while not write.done.is_set():
                if self._committing:
                    await self._round_done.wait()
                    continue
                await self._commit_round()
        except BaseException:
            if write in self._queue:   # cancelled before it was sent: withdraw it
                self._queue.remove(write)
            raise
        if write.error is not None:
            raise write.error
        assert write.result is not None
        return write.result

    async def _commit_round(self) -> None:
        self._committing = True
        batch = self._take_batch()
        try:
            await self._commit(batch)
        except BaseException:
            # Cancelled (or failed) while sending: writes still unanswered go back to the
            # front of the queue for the next round (every write here is safe to repeat).
            self._queue.extendleft(reversed([w for w in batch if not w.done.is_set()]))
            raise
        finally:
            self._committing = False
            done, self._round_done = self._round_done, anyio.Event()
            done.set()

    def _take_batch(self) -> list[_Write]:
        batch: list[_Write] = []
        touched: list[tuple[str, bool]] = []
        guarded: list[tuple[str, bool]] = []
        compares = ops = 0
        skipped: list[_Write] = []
        while self._queue and len(skipped) < self.max_ops:   # bounded scan past conflicting writes
            write = self._queue.popleft()
            keys = write.touches()
            fits = compares + len(write.compare) <= self.max_ops and ops + len(write.ops) <= self.max_ops
            if batch and not fits:
                self._queue.appendleft(write)
                break
            reads = write.reads()
            if any(_overlap(k, t) for k in keys for t in touched + guarded) or \
                    any(_overlap(r, t) for r in reads for t in touched):
                skipped.append(write)      # depends on a write in this batch: next round
                continue
            batch.append(write)
            touched += keys
            guarded += reads
            compares += len(write.compare)
            ops += len(write.ops)
        self._queue.extendleft(reversed(skipped))
        return batch

    async def _commit(self, batch: list[_Write]) -> None:
        if len(batch) == 1:
            await self._alone(batch[0])
            return
        try:
            self.transactions += 1
            result = await self.client.txn([c for w in batch for c in w.compare], [op for w in batch for op in w.ops])
        except EtcdUnavailable as exc:
            for write in batch:
                write.finish(error=exc)
            return
        except EtcdError:              # e.g. a request over etcd's size limit: each alone still fits
            result = None
        if result is not None and result.succeeded:
            position = 0
            for write in batch:
                responses = result.responses[position:position + len(write.ops)]
                position += len(write.ops)
                write.finish(TxnResult(True, result.revision, responses))
            return
        async with anyio.create_task_group() as tg:
            for write in batch:
                tg.start_soon(self._alone, write)

    async def _alone(self, write: _Write) -> None:
        try:
            self.transactions += 1
            write.finish(await self.client.txn(write.compare, write.ops))
        except EtcdError as exc:
            write.finish(error=exc)
