"""A thin async wrapper around the ``skopeo`` command line, for black-box tests.

skopeo runs in a worker thread (``anyio.to_thread.run_sync``) so the test's event loop
stays free.  Every call uses an empty temporary auth file, no credentials, plain HTTP
(``--*tls-verify=false``) and ``--insecure-policy`` (no /etc/containers/policy.json
needed).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from functools import partial
from pathlib import Path

import anyio

SKOPEO = shutil.which("skopeo") or "/usr/bin/skopeo"


class SkopeoError(RuntimeError):
    def __init__(self, args: list[str], returncode: int, stdout: str, stderr: str) -> None:
        super().__init__(
            f"skopeo {' '.join(args)} failed with exit code {returncode}:\n{stderr.strip()}"
        )
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr


def docker_ref(host_port: str, repo: str, tag_or_digest: str | None = None) -> str:
    """``docker://HOST:PORT/repo:tag`` (or ``@sha256:...`` for a digest)."""
    ref = f"docker://{host_port}/{repo}"
    if tag_or_digest:
        sep = "@" if ":" in tag_or_digest else ":"
        ref += sep + tag_or_digest
    return ref


def oci_ref(path: Path | str, ref: str | None = None) -> str:
    return f"oci:{path}" + (f":{ref}" if ref else "")


def _run(args: list[str], timeout: float) -> str:
    with tempfile.TemporaryDirectory(prefix="skopeo-") as tmp:
        authfile = Path(tmp) / "auth.json"
        authfile.write_text("{}")
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": tmp,
            "TMPDIR": tmp,
            "XDG_RUNTIME_DIR": tmp,
            "XDG_CONFIG_HOME": tmp,
            "REGISTRY_AUTH_FILE": str(authfile),
        }
        full = [a.replace("@AUTHFILE@", str(authfile)) for a in args]
        proc = subprocess.run([SKOPEO, "--insecure-policy", *full], capture_output=True,
                              text=True, env=env, timeout=timeout, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise SkopeoError(full, proc.returncode, proc.stdout, proc.stderr)
    return proc.stdout


async def skopeo(*args: str, timeout: float = 120) -> str:
    """Run ``skopeo --insecure-policy ARGS...``; return stdout, raise SkopeoError on failure.

    The literal ``@AUTHFILE@`` in an argument becomes the temporary auth file's path.
    """
    return await anyio.to_thread.run_sync(partial(_run, list(args), timeout))


async def copy(src: str, dst: str, *extra: str, timeout: float = 120) -> str:
    return await skopeo(
        "copy", "--src-tls-verify=false", "--dest-tls-verify=false",
        "--src-no-creds", "--dest-no-creds", "--authfile", "@AUTHFILE@",
        *extra, src, dst, timeout=timeout,
    )


async def inspect(ref: str, *extra: str, raw: bool = False, config: bool = False):
    """``skopeo inspect``: parsed JSON, or the exact bytes with ``raw=True``."""
    args = ["inspect", "--tls-verify=false", "--no-creds", "--authfile", "@AUTHFILE@"]
    if raw:
        args.append("--raw")
    if config:
        args.append("--config")
    out = await skopeo(*args, *extra, ref)
    return out.encode() if raw else json.loads(out)


async def list_tags(ref: str) -> list[str]:
    out = await skopeo("list-tags", "--tls-verify=false", "--no-creds",
                       "--authfile", "@AUTHFILE@", ref)
    return json.loads(out)["Tags"]
