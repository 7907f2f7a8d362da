from cargohold.coordinator.records import Snapshot
from cargohold.gc.mark import mark
from cargohold.coordinator.records import BlobRecord, ManifestRecord

NOW = 10_000.0
OCI = "application/vnd.oci.image.manifest.v1+json"
INDEX = "application/vnd.oci.image.index.v1+json"


def d(name: str) -> str:
    return "sha256:" + name.encode().hex().ljust(64, "0")[:64]


def manifest(blobs=(), children=(), subject=None, created=0.0, media_type=OCI):
    return ManifestRecord(media_type, 100, tuple(blobs), tuple(children), subject, None, created)


def snapshot(manifests, tags, blob_ages):
    s = Snapshot(revision=7)
    for i, (key, record) in enumerate(manifests.items()):
        s.manifests[key] = (record, 100 + i)
    s.tags.update(tags)
    for i, (digest, age) in enumerate(blob_ages.items()):
        s.blobs[digest] = (BlobRecord(10, NOW - age), 200 + i)
    return s


def test_tagged_children_referrers_and_their_blobs_are_live():
    m_amd, m_arm, idx, sbom, orphan_m = d("amd"), d("arm"), d("idx"), d("sbom"), d("orphanm")
    manifests = {
        ("r", m_amd): manifest(blobs=[d("cfg1"), d("l1")]),
        ("r", m_arm): manifest(blobs=[d("cfg2"), d("l2")]),
        ("r", idx): manifest(children=[m_amd, m_arm], media_type=INDEX),
        ("r", sbom): manifest(blobs=[d("sbomcfg")], subject=idx),
        ("r", orphan_m): manifest(blobs=[d("lonely")], created=0.0),
    }
    blobs = {x: 7200 for x in [m_amd, m_arm, idx, sbom, orphan_m, d("cfg1"), d("l1"), d("cfg2"), d("l2"),
                                d("sbomcfg"), d("lonely"), d("unreferenced"), d("young")]}
    blobs[d("young")] = 60
    result = mark(snapshot(manifests, {("r", "latest"): idx}, blobs), NOW, grace=3600, untagged_after=3600)
    assert {dig for _, dig in result.live_manifests} == {m_amd, m_arm, idx, sbom}
    assert [dig for _, dig, _ in result.dead_manifests] == [orphan_m]
    candidates = {dig for dig, _, _ in result.candidates}
    assert candidates == {orphan_m, d("lonely"), d("unreferenced")}       # young is within grace


def test_without_untagged_after_every_manifest_is_a_root():
    m = d("untagged")
    result = mark(snapshot({("r", m): manifest(blobs=[d("b")])}, {}, {m: 9999, d("b"): 9999, d("x"): 9999}),
                  NOW, grace=60, untagged_after=None)
    assert result.dead_manifests == [] and {c for c, _, _ in result.candidates} == {d("x")}


def test_same_digest_live_in_one_repo_keeps_the_blob():
    m = d("shared")
    manifests = {("a", m): manifest(blobs=[d("layer")], created=0.0), ("b", m): manifest(blobs=[d("layer")])}
    result = mark(snapshot(manifests, {("b", "t"): m}, {m: 9999, d("layer"): 9999}), NOW, 60, untagged_after=60)
    assert result.dead_manifests == [("a", m, 100)]
    assert result.candidates == []


def test_touch_refreshes_the_hold():
    s = snapshot({}, {}, {d("b"): 9999})
    record, rev = s.blobs[d("b")]
    s.blobs[d("b")] = (BlobRecord(record.size, record.created, touched=NOW - 5), rev)
    assert mark(s, NOW, grace=60, untagged_after=None).candidates == []


def test_etcd_failures_are_found_inside_task_group_errors():
    from cargohold.coordinator.etcd import EtcdUnavailable
    from cargohold.gc.collector import _describe_error, _etcd_failure

    outage = EtcdUnavailable("no answer")
    assert _etcd_failure(outage) is outage
    assert _etcd_failure(ExceptionGroup("tg", [ExceptionGroup("inner", [outage])])) is outage
    assert _etcd_failure(ExceptionGroup("tg", [outage, ValueError("bug")])) is None
    assert _etcd_failure(ValueError("bug")) is None
    assert _describe_error(ExceptionGroup("tg", [ValueError("bad record")])) == "ValueError: bad record"
