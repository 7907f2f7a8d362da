"""Drop what makes two builds of the same inputs differ from a docker-format image in a `dir:`
layout: buildah writes its working container's random id into the config's "container"."""
import hashlib
import json
import pathlib
import sys

layout = pathlib.Path(sys.argv[1])
manifest = json.loads((layout / "manifest.json").read_text())
old = manifest["config"]["digest"].split(":", 1)[1]
config = json.loads((layout / old).read_bytes())
config.pop("container", None)
raw = json.dumps(config, separators=(",", ":"), sort_keys=True).encode()
new = hashlib.sha256(raw).hexdigest()
(layout / old).unlink()
(layout / new).write_bytes(raw)
manifest["config"].update(digest=f"sha256:{new}", size=len(raw))
(layout / "manifest.json").write_text(json.dumps(manifest))
