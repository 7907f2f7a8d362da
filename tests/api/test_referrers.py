"""Referrers API (distribution-spec v1.1 "Listing Referrers", "Pushing a manifest with a
subject field").

* "A registry must accept a manifest that includes a subject field referencing another
  manifest that does not yet exist in the repository."
* A registry supporting the referrers API returns ``OCI-Subject: <subject digest>`` on the
  PUT of a manifest with ``subject``.
* ``GET /v2/<name>/referrers/<digest>``: 200, ``Content-Type:
  application/vnd.oci.image.index.v1+json``, ``manifests`` = descriptors of every manifest
  in <name> whose subject is <digest>; ``artifactType`` = the manifest's artifactType, else
  its config mediaType; "MUST include all annotations"; no referrers -> empty list;
  "MUST NOT return 404"; invalid digest -> 400.
* ``?artifactType=`` filter: "The response MUST include OCI-Filters-Applied: artifactType".
"""

from __future__ import annotations

import json

import pytest

from tests.support.oci import (
    OCI_INDEX, OCI_MANIFEST, Image, build_artifact, build_image, build_index,
    build_referrer_without_artifact_type, canonical_json, describe, digest, push_blob,
    push_image, push_manifest,
)

pytestmark = pytest.mark.anyio

SBOM = "application/vnd.example.sbom.v1+json"
SIG = "application/vnd.example.signature.v1"
CFG = "application/vnd.example.config.v1+json"


async def push_referrer(client, repo: str, ref: Image, subject_digest: str, tag: str | None = None):
    for data in ref.blobs.values():
        await push_blob(client, repo, data)
    for child in ref.children:
        await push_image(client, repo, None, child)
    r = await push_manifest(client, repo, tag or ref.digest, ref.manifest, ref.media_type)
    assert r.status_code == 201, describe(r)
    # the registry processed the subject
    assert r.headers.get("OCI-Subject") == subject_digest, describe(r)
    return r


def expected_descriptor(ref: Image) -> dict:
    doc = ref.json
    d = {"mediaType": ref.media_type, "digest": ref.digest, "size": ref.size}
    if doc.get("artifactType"):
        d["artifactType"] = doc["artifactType"]
    elif ref.media_type == OCI_MANIFEST:
        d["artifactType"] = doc["config"]["mediaType"]
    if doc.get("annotations"):
        d["annotations"] = doc["annotations"]
    return d


def strip(desc: dict) -> dict:
    keys = ("mediaType", "digest", "size", "artifactType", "annotations")
    return {k: desc[k] for k in keys if k in desc}


async def get_referrers(client, repo: str, subject: str, **params):
    r = await client.get(f"/v2/{repo}/referrers/{subject}", params=params)
    assert r.status_code == 200, describe(r)
    assert r.headers.get("Content-Type", "").split(";")[0] == OCI_INDEX, describe(r)
    doc = r.json()
    assert doc.get("schemaVersion") == 2, describe(r)
    assert doc.get("mediaType") == OCI_INDEX, describe(r)
    assert isinstance(doc.get("manifests"), list), describe(r)
    return r, {m["digest"]: m for m in doc["manifests"]}


@pytest.fixture
async def subject_with_referrers(client, repo):
    subject = build_image(f"subject-{repo}")
    await push_image(client, repo, "app", subject)
    sbom = build_artifact("sbom", artifact_type=SBOM, subject=subject,
                          annotations={"org.opencontainers.image.created": "2024-01-01T00:00:00Z",
                                       "org.example.sbom.format": "json"})
    sig = build_artifact("sig", artifact_type=SIG, subject=subject,
                         annotations={"org.example.signature.fingerprint": "abcd"})
    legacy = build_referrer_without_artifact_type("legacy", subject, config_media_type=CFG,
                                                  annotations={"org.example.k": "v"})
    for ref in (sbom, sig, legacy):
        await push_referrer(client, repo, ref, subject.digest)
    return subject, {"sbom": sbom, "sig": sig, "legacy": legacy}


async def test_referrers_lists_every_referrer(client, repo, subject_with_referrers):
    subject, refs = subject_with_referrers
    r, got = await get_referrers(client, repo, subject.digest)
    assert set(got) == {x.digest for x in refs.values()}, describe(r)
    for ref in refs.values():
        assert strip(got[ref.digest]) == expected_descriptor(ref), (ref.json, got[ref.digest])
    # no filter requested -> no filter applied
    assert r.headers.get("OCI-Filters-Applied") is None, describe(r)


async def test_artifact_type_falls_back_to_config_media_type(client, repo, subject_with_referrers):
    subject, refs = subject_with_referrers
    _, got = await get_referrers(client, repo, subject.digest)
    assert got[refs["legacy"].digest].get("artifactType") == CFG


async def test_filter_by_artifact_type(client, repo, subject_with_referrers):
    subject, refs = subject_with_referrers
    r, got = await get_referrers(client, repo, subject.digest, artifactType=SBOM)
    assert r.headers.get("OCI-Filters-Applied") == "artifactType", describe(r)
    assert list(got) == [refs["sbom"].digest], describe(r)
    r, got = await get_referrers(client, repo, subject.digest, artifactType=CFG)
    assert r.headers.get("OCI-Filters-Applied") == "artifactType", describe(r)
    assert list(got) == [refs["legacy"].digest], describe(r)
    r, got = await get_referrers(client, repo, subject.digest, artifactType="application/nothing")
    assert r.headers.get("OCI-Filters-Applied") == "artifactType", describe(r)
    assert got == {}, describe(r)


async def test_unknown_subject_gives_empty_index(client, repo):
    await push_image(client, repo, "x", build_image("unknown-subject"))
    r, got = await get_referrers(client, repo, digest(b"no such manifest"))
    assert got == {}, describe(r)


async def test_subject_need_not_exist(client, repo):
    await push_image(client, repo, "x", build_image("dangling-base"))
    ghost = {"mediaType": OCI_MANIFEST, "digest": digest(b"ghost manifest"), "size": 14}
    ref = build_artifact("dangling", artifact_type=SIG, subject=ghost)
    await push_referrer(client, repo, ref, ghost["digest"])
    r, got = await get_referrers(client, repo, ghost["digest"])
    assert list(got) == [ref.digest], describe(r)
    # and the referrer itself is pullable
    g = await client.get(f"/v2/{repo}/manifests/{ref.digest}", headers={"Accept": OCI_MANIFEST})
    assert g.status_code == 200 and g.content == ref.manifest, describe(g)


async def test_referrer_pushed_by_tag(client, repo):
    subject = build_image("by-tag-subject")
    await push_image(client, repo, "app", subject)
    ref = build_artifact("by-tag", artifact_type=SBOM, subject=subject)
    await push_referrer(client, repo, ref, subject.digest, tag="sbom")
    r, got = await get_referrers(client, repo, subject.digest)
    assert list(got) == [ref.digest], describe(r)


async def test_index_referrer(client, repo):
    subject = build_image("index-subject")
    await push_image(client, repo, "app", subject)
    child = build_image("index-referrer-child", layers=1)
    doc = {
        "schemaVersion": 2, "mediaType": OCI_INDEX, "artifactType": SBOM,
        "manifests": [child.descriptor()], "subject": subject.descriptor(),
        "annotations": {"org.example.kind": "index"},
    }
    ref = Image(canonical_json(doc), OCI_INDEX, {}, [child])
    await push_referrer(client, repo, ref, subject.digest)
    r, got = await get_referrers(client, repo, subject.digest)
    assert list(got) == [ref.digest], describe(r)
    assert strip(got[ref.digest]) == {
        "mediaType": OCI_INDEX, "digest": ref.digest, "size": ref.size,
        "artifactType": SBOM, "annotations": {"org.example.kind": "index"},
    }


async def test_referrers_are_scoped_to_the_repository(client, repo):
    subject = build_image("scoped-subject")
    await push_image(client, repo, "app", subject)
    other = repo + "-other"
    await push_image(client, other, "app", subject)
    ref = build_artifact("scoped", artifact_type=SIG, subject=subject)
    await push_referrer(client, repo, ref, subject.digest)
    _, got = await get_referrers(client, other, subject.digest)
    assert got == {}
    _, got = await get_referrers(client, repo, subject.digest)
    assert list(got) == [ref.digest]


async def test_deleted_referrer_disappears(client, repo):
    subject = build_image("delete-subject")
    await push_image(client, repo, "app", subject)
    keep = build_artifact("keep", artifact_type=SIG, subject=subject)
    gone = build_artifact("gone", artifact_type=SIG, subject=subject)
    for ref in (keep, gone):
        await push_referrer(client, repo, ref, subject.digest)
    r = await client.delete(f"/v2/{repo}/manifests/{gone.digest}")
    assert r.status_code == 202, describe(r)
    r, got = await get_referrers(client, repo, subject.digest)
    assert list(got) == [keep.digest], describe(r)


async def test_manifest_without_subject_has_no_oci_subject_header(client, repo):
    image = build_image("no-subject")
    for data in image.blobs.values():
        await push_blob(client, repo, data)
    r = await push_manifest(client, repo, "v1", image.manifest, image.media_type)
    assert r.status_code == 201, describe(r)
    assert r.headers.get("OCI-Subject") is None, describe(r)


@pytest.mark.parametrize("bad", ["sha256:1234", "not-a-digest", "sha256:" + "Z" * 64])
async def test_referrers_with_invalid_digest_is_400(client, repo, bad):
    await push_image(client, repo, "x", build_image("bad-referrers-digest"))
    r = await client.get(f"/v2/{repo}/referrers/{bad}")
    assert r.status_code == 400, describe(r)


async def test_referrers_of_index_subject(client, repo):
    index = build_index("index-as-subject")
    await push_image(client, repo, "multi", index)
    ref = build_artifact("of-index", artifact_type=SBOM, subject=index)
    await push_referrer(client, repo, ref, index.digest)
    _, got = await get_referrers(client, repo, index.digest)
    assert list(got) == [ref.digest]
    # ... and not of the index's children
    _, got = await get_referrers(client, repo, index.children[0].digest)
    assert got == {}
    assert json.loads(ref.manifest)["subject"]["mediaType"] == OCI_INDEX
