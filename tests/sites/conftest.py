from tests.cluster.conftest import cluster  # noqa: F401  (the multi-node fixture)
