"""Data spec strings: ``KIND:PATH?option=value&...`` -> :class:`SiteData`.

Kinds::

    busi:PATH        BUSI layout: {benign,malignant,normal}/NAME.png + NAME_mask*.png
    hc18:PATH        HC18 training set + pixel size / head circumference CSV
    pocus:PATH       POCUS lung clips and stills listed in manifest.tsv
    folder:PATH      one sub-folder per class (optional NAME_mask*.png masks)
    csv:FILE         manifest with columns path,label[,mask][,group][,patient] (paths relative to the CSV)
    dicom:PATH       a DICOM file or a folder of them (sub-folders = classes), one sample per frame
    phantom:N        N synthetic B-mode images generated in memory (deterministic)

Options (query string): ``limit`` (at most N samples, stratified by label, deterministic; for
``pocus`` it counts files), ``seed`` (for ``limit``, and the phantom images), ``frames`` (per clip
or multi-frame file; pocus default 8, dicom default all), ``profiles`` (phantom device profiles,
comma-separated, or ``all``). Examples::

    busi:/data/Dataset_BUSI_with_GT?limit=90&seed=0
    phantom:120?profiles=linear-a,convex-b,linear-c&seed=0
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qsl

from echocare.data.base import SiteData

_COMMON = {"limit": int, "seed": int}

#: kind -> {option: parser}
KIND_OPTIONS: dict[str, dict[str, Callable[[str], Any]]] = {
    "busi": dict(_COMMON),
    "hc18": dict(_COMMON),
    "pocus": {**_COMMON, "frames": int},
    "folder": dict(_COMMON),
    "csv": dict(_COMMON),
    "dicom": {**_COMMON, "frames": int},
    "phantom": {**_COMMON, "profiles": lambda v: [p.strip() for p in v.split(",") if p.strip()]},
}


def parse_spec(spec: str) -> tuple[str, str, dict]:
    """``"busi:/x?limit=90&seed=0"`` -> ``("busi", "/x", {"limit": 90, "seed": 0})``.

    Raises ValueError naming an unknown kind or option (and listing the valid ones), a malformed
    query or a value of the wrong type.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"empty data spec; expected KIND:PATH with KIND one of {', '.join(KIND_OPTIONS)}")
    kind, sep, rest = spec.strip().partition(":")
    kind = kind.strip().lower()
    if not sep:
        raise ValueError(f"data spec {spec!r} has no kind; expected KIND:PATH with KIND one of {', '.join(KIND_OPTIONS)}")
    if kind not in KIND_OPTIONS:
        raise ValueError(f"unknown data kind {kind!r} in {spec!r}; valid kinds: {', '.join(KIND_OPTIONS)}")
    path, _, query = rest.partition("?")
    if not path.strip():
        raise ValueError(f"data spec {spec!r} has no path after '{kind}:'")
    valid = KIND_OPTIONS[kind]
    options: dict[str, Any] = {}
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True) if query else []
    except ValueError:
        raise ValueError(f"malformed options {query!r} in {spec!r}; expected name=value&name=value") from None
    for name, value in pairs:
        if name not in valid:
            raise ValueError(f"unknown option {name!r} for {kind}: in {spec!r}; valid options: {', '.join(sorted(valid)) or 'none'}")
        if name in options:
            raise ValueError(f"option {name!r} given twice in {spec!r}")
        try:
            options[name] = valid[name](value)
        except ValueError:
            raise ValueError(f"option {name}={value!r} in {spec!r} is not a valid {getattr(valid[name], '__name__', 'value')}") from None
    for name in ("limit", "frames"):
        if name in options and options[name] < 0:
            raise ValueError(f"option {name}={options[name]} in {spec!r} must be >= 0")
    return kind, path.strip(), options


def open_data(spec: str) -> SiteData:
    """Open a data spec (see the module docstring). Samples load lazily.

    Raises ValueError for a bad spec, FileNotFoundError naming a missing path.
    """
    from echocare.data.readers import ReadOptions, read_busi, read_csv_manifest, read_folder, read_hc18, read_pocus

    kind, path, options = parse_spec(spec)
    if kind == "phantom":
        from echocare.phantom import read_phantom

        try:
            n = int(path)
        except ValueError:
            raise ValueError(f"phantom: expected a number of images after 'phantom:', got {path!r}") from None
        return read_phantom(n, spec, profiles=options.get("profiles"), seed=options.get("seed", 0), limit=options.get("limit"))
    opts = ReadOptions(limit=options.get("limit"), seed=options.get("seed", 0), frames=options.get("frames"))
    location = Path(path).expanduser()
    if kind == "dicom":
        from echocare.data.dicom import read_dicom

        return read_dicom(location, spec, opts)
    readers = {"busi": read_busi, "hc18": read_hc18, "pocus": read_pocus, "folder": read_folder, "csv": read_csv_manifest}
    return readers[kind](location, spec, opts)
