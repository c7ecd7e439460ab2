"""Small tars written by hand for the data tests: a shard of given members, or a copy of one
with some members' bytes changed (an image that does not decode, a caption taken out)."""
from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import Callable, Iterable


def write_tar(path: str | Path, members: Iterable[tuple[str, bytes]]) -> str:
    """A tar of ``(name, payload)`` members in this order (a name may repeat, as on the web)."""
    with tarfile.open(path, "w") as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return str(path)


def rewrite_tar(src: str | Path, out: str | Path, rewrite: Callable[[str, bytes], bytes]) -> str:
    """A copy of tar ``src`` whose members hold ``rewrite(name, payload)``."""
    with tarfile.open(src) as tin, tarfile.open(out, "w") as tout:
        for member in tin:
            payload = rewrite(member.name, tin.extractfile(member).read())
            member.size = len(payload)
            tout.addfile(member, io.BytesIO(payload))
    return str(out)


def png_bytes(rgb: tuple[int, int, int], size: int = 8) -> bytes:
    """A one-colour PNG: the smallest image a decoder reads."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), rgb).save(buf, format="PNG")
    return buf.getvalue()
