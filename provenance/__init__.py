"""weightmark: per-licensee watermarks for model weights, a signed registry, and leak tracing.

Layers, each importing only the ones below it:

    weightmark.cli            typer commands, one library call each, errors -> exit codes
    weightmark (provenance/)  scheme, formats, registry, stamp, scan
    weightmark.kernels        numba kernels: keyed hash, embed, extract, score

Example::

    from weightmark import Lab
    lab = Lab.init("/tmp/lab", passphrase=None)           # or Lab("/path/to/home")
    lab.register_model("path/to/model", name="minilm")
    lid = lab.add_licensee("Acme Research Ltd", "GB").id
    lab.stamp("minilm", lid, "acme-copy")
    report = lab.scan("leaked-copy")
    print([(c.name, c.jurisdiction, c.log10_family_wise_p) for c in report.accused])
"""

from weightmark.errors import (
    FormatError,
    InputFileError,
    KeyProblem,
    NotFound,
    PolicyDenied,
    RegistryError,
    UsageError,
    WeightmarkError,
)
from weightmark.lab import Lab
from weightmark.scheme import SchemeParams


def _version() -> str:
    # importlib.metadata costs tens of milliseconds of every command's start-up: read it on demand.
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("weightmark")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree without metadata
        return "0+unknown"


def __getattr__(name: str) -> object:
    if name == "__version__":
        return _version()
    # The scan types pull in the numba kernels: import them only when asked for.
    if name in ("ScanReport", "Candidate"):
        from weightmark import scan

        return getattr(scan, name)
    raise AttributeError(f"module 'weightmark' has no attribute {name!r}")


__all__ = [
    "__version__",
    "Lab",
    "ScanReport",
    "Candidate",
    "SchemeParams",
    "WeightmarkError",
    "UsageError",
    "InputFileError",
    "FormatError",
    "KeyProblem",
    "RegistryError",
    "NotFound",
    "PolicyDenied",
]
