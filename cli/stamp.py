"""`weightmark stamp`: write a licensee's watermarked copy of a registered model."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Annotated

import typer

from weightmark.cli.common import (
    BarProgress,
    HomeOption,
    JsonOption,
    info,
    open_lab,
    print_json,
    safe,
)
from weightmark.cluster import SCHEDULER_ENV, open_cluster
from weightmark.errors import InputFileError
from weightmark.scheme import DEFAULT_ALPHA, DEFAULT_COLLUSION


def stamp(
    model_name: Annotated[str, typer.Argument(metavar="MODEL_NAME", help="Registered model to copy.")],
    licensee: Annotated[str, typer.Option("--licensee", help="Licensee id (from `licensee add`).")],
    out: Annotated[Path, typer.Option("--out", help="Where to write the copy (file or folder, like the base).")],
    alpha: Annotated[float, typer.Option("--alpha", help="Watermark strength relative to each row's RMS.")] = DEFAULT_ALPHA,
    fmt: Annotated[str, typer.Option("--format", help="Output: same (the base's format); a GGUF file gguf:Q4_K_M, gguf:Q8_0, gguf:Q4_0, gguf:Q4_1, gguf:Q5_0, gguf:Q6_K; or a quantized safetensors folder gptq:4bit-g128, awq:4bit-g128, ct:w4a16, ct:w8a16, bnb:nf4 (scales frozen from the unstamped base).")] = "same",
    collusion: Annotated[int, typer.Option("--collusion", min=1, max=1024, help="Colluding licensees the code must withstand: a Tardos code (tardos-v2) sized for that many among 10^6 licensees; 1 = the uniform ss-v1 code (strongest for a single leaker, no collusion resistance). A model's copies share the first copy's code.")] = DEFAULT_COLLUSION,
    force: Annotated[bool, typer.Option("--force", help="Replace a copy this lab issued earlier to --out (its files must match that signed entry's manifest); never anything else, the lab home, or a registered base.")] = False,
    override_reason: Annotated[str | None, typer.Option("--override-reason", help="Issue despite the jurisdiction policy; recorded in the signed entry.")] = None,
    workers: Annotated[int | None, typer.Option("--workers", help="Stamp one shard per task on a local Dask cluster of this many worker processes (needs the cluster extra).")] = None,
    scheduler: Annotated[str | None, typer.Option("--scheduler", help=f"Stamp one shard per task on the Dask cluster of this scheduler address (default: ${SCHEDULER_ENV}, unless --workers is given).")] = None,
    home: HomeOption = None,
    json_out: JsonOption = False,
) -> None:
    """Write a licensee's copy of MODEL_NAME, in the base's own format and dtypes, and record it.

    The jurisdiction policy (weightmark policy show) is checked first: a refused issue exits
    with code 5 and writes nothing, unless --override-reason is given.

    Example: weightmark stamp minilm --licensee lic-1a2b3c4d --out ./acme-copy
    Example: weightmark stamp smollm2 --licensee lic-1a2b3c4d --out acme.gguf --format gguf:Q4_K_M
    """
    with open_lab(home) as lab, open_cluster(workers, scheduler) or nullcontext() as cluster:
        try:
            copy = lab.stamp(model_name, licensee, out, alpha=alpha, overwrite=force, progress=BarProgress(),
                             override_reason=override_reason, fmt=fmt, collusion=collusion, cluster=cluster)
        except OSError as exc:
            if exc.filename is None:  # a failed write says no file name: it was the output's
                raise InputFileError(out, (exc.strerror or str(exc)).lower()) from None
            raise
        lic = lab.registry.licensee(licensee)
    if json_out:
        print_json(copy.to_json())
        return
    info(f"Stamped {model_name} for {lic.name} ({lic.jurisdiction}): entry {copy.entry_idx}, "
              f"codeword {copy.codeword_index}, {copy.scheme}")
    typer.echo(safe(copy.out_path))
