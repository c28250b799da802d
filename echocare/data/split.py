"""Leak-free train/validation splits and federated partitions.

The unit that is never cut is a *group* (:mod:`echocare.data.dedup`): samples sharing an
explicit ``Sample.group`` (a clip, a patient) or identical / near-identical pixels. BUSI, for
one, holds many re-saved or re-annotated copies of one acquisition; a split that put one copy
in training and another in validation would measure memory, not generalisation.

Both functions are deterministic in ``seed`` and skip unreadable samples (recorded as problems).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from echocare.data.base import Problem, SiteData
from echocare.data.dedup import DEFAULT_MAX_HAMMING, Grouping, group_samples

#: ``Sample.meta`` keys that name an acquisition device, in order of preference (by-device partition).
DEVICE_META_KEYS = ("profile", "device", "probe")


@dataclass
class _Group:
    indices: list[int]  # into data.samples
    label: str | None  # majority label
    key: str  # first member's key (stable sort key)


def _groups(data: SiteData, max_hamming: int) -> tuple[list[_Group], list[Problem]]:
    grouping: Grouping = group_samples(data.samples, max_hamming)
    position = {id(s): i for i, s in enumerate(data.samples)}
    out = []
    for members in grouping.groups().values():
        idx = [position[id(grouping.samples[m])] for m in members]
        labels = Counter(data.samples[i].label for i in idx)
        top = max(labels.values())
        label = sorted((lab for lab, c in labels.items() if c == top), key=lambda x: (x is None, x or ""))[0]
        out.append(_Group(idx, label, data.samples[idx[0]].key))
    out.sort(key=lambda g: g.key)
    return out, grouping.problems


def _merge_problems(*lists: list[Problem]) -> list[Problem]:
    seen, out = set(), []
    for p in (p for lst in lists for p in lst):
        if (p.path, p.reason) not in seen:
            seen.add((p.path, p.reason))
            out.append(p)
    return out


def _make(data: SiteData, indices: list[int], problems: list[Problem]) -> SiteData:
    return SiteData(data.spec, list(data.classes), [data.samples[i] for i in sorted(indices)], list(problems), data.task_hint)


def _strata(groups: list[_Group]) -> dict[str | None, list[_Group]]:
    out: dict[str | None, list[_Group]] = {}
    for g in groups:
        out.setdefault(g.label, []).append(g)
    return dict(sorted(out.items(), key=lambda kv: (kv[0] is None, kv[0] or "")))


def split_train_val(
    data: SiteData, val_fraction: float = 0.2, seed: int = 0, max_hamming: int = DEFAULT_MAX_HAMMING
) -> tuple[SiteData, SiteData]:
    """Split into (train, val), stratified by label, never cutting a group.

    Per label, groups are visited in a seeded random order and a group goes to validation when
    that brings the label's validation count closer to ``val_fraction`` of it. A label with two
    or more groups always has at least one in each split. Unlabeled data is one stratum.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    groups, problems = _groups(data, max_hamming)
    problems = _merge_problems(data.problems, problems)
    rng = np.random.default_rng(seed)
    train: list[int] = []
    val: list[int] = []
    for stratum in _strata(groups).values():
        order = [stratum[i] for i in rng.permutation(len(stratum))]
        total = sum(len(g.indices) for g in order)
        target = val_fraction * total
        chosen, n_val = [], 0
        for g in order:
            if abs(n_val + len(g.indices) - target) < abs(n_val - target):
                chosen.append(g)
                n_val += len(g.indices)
        if val_fraction > 0 and not chosen and len(order) >= 2:
            chosen = [min(order, key=lambda g: len(g.indices))]
        if len(chosen) == len(order) and len(order) >= 2:  # keep training data in every class
            chosen.remove(max(chosen, key=lambda g: len(g.indices)))
        chosen_ids = {id(g) for g in chosen}
        for g in order:
            (val if id(g) in chosen_ids else train).extend(g.indices)
    return _make(data, train, problems), _make(data, val, problems)


def device_of(meta: dict) -> str | None:
    """The acquisition device a sample came from (phantom profile, device, probe), if known."""
    for k in DEVICE_META_KEYS:
        if meta.get(k):
            return str(meta[k])
    return None


def partition(
    data: SiteData, n_sites: int | None, scheme: str = "iid", seed: int = 0, max_hamming: int = DEFAULT_MAX_HAMMING
) -> list[SiteData]:
    """Partition one dataset into simulated hospital sites; groups never span two sites.

    Schemes:

    - ``iid``: every label spread evenly (each group goes to the site with the fewest samples of
      its label);
    - ``dirichlet:ALPHA``: label skew; per label, site shares are drawn from Dirichlet(ALPHA)
      (small ALPHA = strong skew) and groups fill the site furthest below its share;
    - ``by-device``: one site per acquisition device (``meta["profile"]`` for phantoms, else
      ``device`` or ``probe``); ``n_sites`` must be None or the number of devices.

    Every site gets at least one group. Raises ValueError for an unknown scheme, too few groups,
    or missing device information.
    """
    groups, problems = _groups(data, max_hamming)
    problems = _merge_problems(data.problems, problems)
    rng = np.random.default_rng(seed)
    name, _, arg = scheme.partition(":")
    if name == "by-device":
        assign = _by_device(data, groups, n_sites)
        n_sites = max(assign) + 1 if assign else 0
    else:
        if n_sites is None or n_sites < 1:
            raise ValueError(f"partition: n_sites must be a positive number for scheme {scheme!r}, got {n_sites}")
        if len(groups) < n_sites:
            raise ValueError(f"partition: {len(groups)} groups of samples cannot fill {n_sites} sites")
        if name == "iid" and not arg:
            assign = _fill(groups, n_sites, rng, shares=None)
        elif name == "dirichlet":
            try:
                alpha = float(arg)
            except ValueError:
                alpha = -1.0
            if not alpha > 0:
                raise ValueError(f"partition: dirichlet needs a positive concentration, e.g. 'dirichlet:0.5', got {scheme!r}")
            assign = _fill(groups, n_sites, rng, shares=alpha)
        else:
            raise ValueError(f"partition: unknown scheme {scheme!r}; valid: iid, dirichlet:ALPHA, by-device")
        _no_empty_site(groups, assign, n_sites)
    sites: list[list[int]] = [[] for _ in range(n_sites)]
    for g, s in zip(groups, assign):
        sites[s].extend(g.indices)
    return [_make(data, idx, problems) for idx in sites]


def _fill(groups: list[_Group], n_sites: int, rng: np.random.Generator, shares: float | None) -> list[int]:
    """Per label, give each group (random order) to the site furthest below its target count."""
    assign = [0] * len(groups)
    position = {id(g): i for i, g in enumerate(groups)}
    totals = np.zeros(n_sites)
    for stratum in _strata(groups).values():
        order = [stratum[i] for i in rng.permutation(len(stratum))]
        n = sum(len(g.indices) for g in order)
        p = np.full(n_sites, 1.0 / n_sites) if shares is None else rng.dirichlet(np.full(n_sites, shares))
        target, have = p * n, np.zeros(n_sites)
        for g in order:
            deficit = target - have
            # furthest below target; ties: the site with fewer samples overall, then the lower index
            s = int(np.lexsort((np.arange(n_sites), totals, -deficit))[0])
            assign[position[id(g)]] = s
            have[s] += len(g.indices)
            totals[s] += len(g.indices)
    return assign


def _no_empty_site(groups: list[_Group], assign: list[int], n_sites: int) -> None:
    """Move single groups from the site with the most groups to any empty site (in place)."""
    for empty in range(n_sites):
        if empty in assign:
            continue
        counts = Counter(assign)
        donor = max(counts, key=lambda s: (counts[s], -s))
        smallest = min((i for i, s in enumerate(assign) if s == donor), key=lambda i: len(groups[i].indices))
        assign[smallest] = empty


def _by_device(data: SiteData, groups: list[_Group], n_sites: int | None) -> list[int]:
    devices_of_group = []
    for g in groups:
        # copies without device information join the device of the rest of their group
        found = Counter(d for d in (device_of(data.samples[i].meta) for i in g.indices) if d is not None)
        if not found:
            key = data.samples[g.indices[0]].key
            raise ValueError(
                f"partition by-device: sample {key!r} has no device information "
                f"(none of meta {', '.join(DEVICE_META_KEYS)}); use iid or dirichlet:ALPHA"
            )
        devices_of_group.append(found.most_common(1)[0][0])
    devices = sorted(set(devices_of_group))
    if n_sites is not None and n_sites != len(devices):
        raise ValueError(f"partition by-device: the data has {len(devices)} devices ({', '.join(devices)}), not {n_sites} sites")
    index = {d: i for i, d in enumerate(devices)}
    return [index[d] for d in devices_of_group]
