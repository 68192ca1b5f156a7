"""llamafiles: an executable (Cosmopolitan APE) with a zip archive appended whose stored member
`*.gguf` holds the weights. The GGUF is read in place by the GGUF reader, through a window on
the member's bytes; nothing in the executable is run."""

from __future__ import annotations

from pathlib import Path

from ..errors import FormatError
from . import register_sniffer
from ._zip import Member, stored_members, zip_names
from .gguf import GGUFModel

__all__ = ["LlamafileModel", "open_llamafile"]


class LlamafileModel(GGUFModel):
    """The GGUF weights inside a llamafile (offsets relative to the member's first byte)."""

    format = "llamafile"

    def __init__(self, path: Path, member: Member) -> None:
        self.member = member
        super().__init__(path, offset=member.offset, length=member.size)


def _weights_member(path: Path, names: list[str]) -> str | None:
    """The GGUF member holding the language model: vision projectors (`*mmproj*`) are not it."""
    ggufs = [n for n in names if n.lower().endswith(".gguf") and not n.endswith("/")]
    if not ggufs:
        return None
    weights = [n for n in ggufs if "mmproj" not in n.lower()]
    if len(weights) != 1:
        raise FormatError(path, f"holds {len(ggufs)} GGUF members ({', '.join(ggufs[:4])}) and none "
                                "stands out as the model's weights")
    return weights[0]


def open_llamafile(path: str | Path) -> LlamafileModel | None:
    """The GGUF inside a llamafile (or any zip with one GGUF member); None if `path` is none."""
    path = Path(path)
    names = zip_names(path)
    if names is None:
        return None
    name = _weights_member(path, names)
    if name is None:
        return None
    member = stored_members(path, lambda n: n == name)[name]
    return LlamafileModel(path, member)


@register_sniffer("llamafile", 11)
def _sniff(path: Path) -> LlamafileModel | None:
    return open_llamafile(path)
