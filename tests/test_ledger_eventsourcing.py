"""The eventsourcing wheel's own persistence, application and projection test cases, run
against the LMDB module, the way the library runs them against its SQLite and PostgreSQL ones."""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any, ClassVar
from uuid import uuid4

from eventsourcing.persistence import InfrastructureFactory, StoredEvent, Tracking
from eventsourcing.tests import application as es_app
from eventsourcing.tests import persistence as es
from eventsourcing.tests import projection as es_proj
from eventsourcing.utils import Environment

from imageledger.storage import ledger as mod

PERSISTENCE_MODULE = "imageledger.storage.ledger"


class _WithLedger:
    """A fresh ledger directory and factory for every test."""

    factory: mod.LMDBFactory
    tmpdir: str

    def setUp(self) -> None:
        self.tmpdir = tempfile.mkdtemp(prefix="imageledger-es-")
        self.factory = mod.LMDBFactory(
            {"PERSISTENCE_MODULE": PERSISTENCE_MODULE, "LMDB_PATH": self.tmpdir}
        )
        super().setUp()  # type: ignore[misc]

    def tearDown(self) -> None:
        super().tearDown()  # type: ignore[misc]
        self.factory.close()
        shutil.rmtree(self.tmpdir, ignore_errors=True)


class TestAggregateRecorder(_WithLedger, es.AggregateRecorderTestCase):
    def create_recorder(self) -> mod.LMDBAggregateRecorder:
        return mod.LMDBAggregateRecorder(self.factory.ledger, purpose="snapshots")


class TestAggregateRecorderWithStringIds(TestAggregateRecorder):
    def new_originator_id(self) -> str:
        return f"image:{uuid4()}"


class TestApplicationRecorder(_WithLedger, es.ApplicationRecorderTestCase[Any]):
    def create_recorder(self) -> mod.LMDBApplicationRecorder:
        return mod.LMDBApplicationRecorder(self.factory.ledger)

    def test_insert_subscribe(self) -> None:
        self.optional_test_insert_subscribe()


class TestApplicationRecorderWithStringIds(TestApplicationRecorder):
    def new_originator_id(self) -> str:
        return f"docker.io/library/alpine:{uuid4()}"


class TestTrackingRecorder(_WithLedger, es.TrackingRecorderTestCase):
    def create_recorder(self) -> mod.LMDBTrackingRecorder:
        return mod.LMDBTrackingRecorder(self.factory.ledger)


class TestProcessRecorder(_WithLedger, es.ProcessRecorderTestCase):
    def create_recorder(self) -> mod.LMDBProcessRecorder:
        return mod.LMDBProcessRecorder(self.factory.ledger)


class TestNonInterleavingNotificationIDs(_WithLedger, es.NonInterleavingNotificationIDsBaseCase):
    def create_recorder(self) -> mod.LMDBApplicationRecorder:
        return mod.LMDBApplicationRecorder(self.factory.ledger)


class _TrackingSubclass(mod.LMDBTrackingRecorder):
    pass


class TestFactory(es.InfrastructureFactoryTestCase[mod.LMDBFactory]):
    def setUp(self) -> None:
        self.tmpdir = tempfile.mkdtemp(prefix="imageledger-es-")
        self.env = Environment(
            "TestCase", {"PERSISTENCE_MODULE": PERSISTENCE_MODULE, "LMDB_PATH": self.tmpdir}
        )
        super().setUp()

    def tearDown(self) -> None:
        super().tearDown()
        shutil.rmtree(self.tmpdir, ignore_errors=True)

    def expected_factory_class(self) -> type[mod.LMDBFactory]:
        return mod.LMDBFactory

    def expected_aggregate_recorder_class(self) -> type[mod.LMDBAggregateRecorder]:
        return mod.LMDBAggregateRecorder

    def expected_application_recorder_class(self) -> type[mod.LMDBApplicationRecorder]:
        return mod.LMDBApplicationRecorder

    def expected_tracking_recorder_class(self) -> type[mod.LMDBTrackingRecorder]:
        return mod.LMDBTrackingRecorder

    def tracking_recorder_subclass(self) -> type[mod.LMDBTrackingRecorder]:
        return _TrackingSubclass

    def expected_process_recorder_class(self) -> type[mod.LMDBProcessRecorder]:
        return mod.LMDBProcessRecorder


class _WithLedgerInOsEnviron:
    """The application cases construct `Application()` with no env: configure os.environ."""

    keys = ("PERSISTENCE_MODULE", "LMDB_PATH")
    expected_factory_topic = "imageledger.storage.ledger:LMDBFactory"

    def setUp(self) -> None:
        self.tmpdir = tempfile.mkdtemp(prefix="imageledger-es-")
        os.environ["PERSISTENCE_MODULE"] = PERSISTENCE_MODULE
        os.environ["LMDB_PATH"] = self.tmpdir
        super().setUp()  # type: ignore[misc]

    def tearDown(self) -> None:
        super().tearDown()  # type: ignore[misc]
        for key in self.keys:
            os.environ.pop(key, None)
        shutil.rmtree(self.tmpdir, ignore_errors=True)


class TestApplication(_WithLedgerInOsEnviron, es_app.ApplicationTestCase):
    pass


class TestExampleApplication(_WithLedgerInOsEnviron, es_app.ExampleApplicationTestCase):
    pass


class LMDBEventCounters(mod.LMDBTrackingRecorder, es_proj.EventCountersView):
    """The event-counters view of the library's projection cases, as an LMDB view: the
    counters and the tracking record commit in one transaction."""

    def create_table(self) -> None:
        super().create_table()
        self._db("counters")

    def get_created_event_counter(self) -> int:
        return self._get(b"created")

    def get_subsequent_event_counter(self) -> int:
        return self._get(b"subsequent")

    def incr_created_event_counter(self, tracking: Tracking) -> None:
        self._incr(b"created", tracking)

    def incr_subsequent_event_counter(self, tracking: Tracking) -> None:
        self._incr(b"subsequent", tracking)

    def _get(self, name: bytes) -> int:
        db = self._db("counters")
        with self.env.read() as txn:
            value = txn.get(name, db=db)
        return 0 if value is None else int(value)

    def _incr(self, name: bytes, tracking: Tracking) -> None:
        db = self._db("counters")
        record_tracking = self._tracking_writer(tracking)

        def incr(txn: Any) -> None:
            record_tracking(txn)
            txn.put(name, str(int(txn.get(name, db=db) or 0) + 1).encode(), db=db)

        self.env.write(incr)


class TestEventCountersView(es_proj.EventCountersViewTestCase):
    def setUp(self) -> None:
        self.tmpdir = tempfile.mkdtemp(prefix="imageledger-es-")
        self.factory = InfrastructureFactory.construct(
            Environment(
                "eventcounters",
                {"PERSISTENCE_MODULE": PERSISTENCE_MODULE, "LMDB_PATH": self.tmpdir},
            )
        )

    def tearDown(self) -> None:
        self.factory.close()
        shutil.rmtree(self.tmpdir, ignore_errors=True)

    def construct_event_counters_view(self) -> es_proj.EventCountersView:
        view = self.factory.tracking_recorder(LMDBEventCounters)
        assert isinstance(view, LMDBEventCounters)
        return view


class _ProjectionEnv:
    env: ClassVar[dict[str, str]]

    def setUp(self) -> None:
        self.tmpdir = tempfile.mkdtemp(prefix="imageledger-es-")
        # The application and the view share one ledger (one LMDB environment).
        type(self).env = {
            "PERSISTENCE_MODULE": PERSISTENCE_MODULE,
            "LMDB_PATH": self.tmpdir,
        }
        super().setUp()  # type: ignore[misc]

    def tearDown(self) -> None:
        super().tearDown()  # type: ignore[misc]
        shutil.rmtree(self.tmpdir, ignore_errors=True)


class TestAggregateEventCountersProjection(
    _ProjectionEnv, es_proj.AggregateEventCountersProjectionTestCase
):
    view_class = LMDBEventCounters


class TestEventSourcedProjection(_ProjectionEnv, es_proj.EventSourcedProjectionTestCase):
    pass


def test_string_and_uuid_ids_with_the_same_text_are_different_sequences(ledger_path: Any) -> None:
    factory = mod.LMDBFactory({"LMDB_PATH": str(ledger_path)})
    try:
        recorder = factory.application_recorder()
        uid = uuid4()
        recorder.insert_events([StoredEvent(uid, 1, "t", b"u")])
        recorder.insert_events([StoredEvent(str(uid), 1, "t", b"s")])
        assert [e.state for e in recorder.select_events(uid)] == [b"u"]
        assert [e.state for e in recorder.select_events(str(uid))] == [b"s"]
        assert isinstance(recorder.select_events(uid)[0].originator_id, type(uid))
        assert recorder.select_events(str(uid))[0].originator_id == str(uid)
    finally:
        factory.close()
