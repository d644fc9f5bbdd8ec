"""``[bench]`` -> the list of cells to time.

A cell is one combination of plugins, one agent count and one workload.  The
baseline (no plugin) is always in the matrix, because every figure of the
report is a ratio to it; the reference rows (ProcessPoolExecutor,
multiprocessing with pipes, the raw fork floor) are cells too, for the star workload.
"""

from __future__ import annotations

import itertools

from attrs import define

from ..errors import ConfigError

#: reference rows: key -> what the report calls them
REFERENCES = {
    "processpool": "concurrent.futures.ProcessPoolExecutor",
    "mp-pipes": "multiprocessing.Process + Pipe",
    "floor": "fork floor (os.fork + one pipe message)",
}

#: the distributions of this repository (plugins/) that the matrix measures: the only ones
#: the keyword combinations take by default.  cfn-limits and cfn-llm are shipped too, but
#: they limit and account, not speed up: like a third-party plugin, they join when named
BUNDLED_DISTRIBUTIONS = ("cfn-batch", "cfn-parallel", "cfn-pool", "cfn-redis", "cfn-shard")

#: words allowed in [bench] combinations besides explicit ones
KEYWORDS = ("default", "all", "each", "combined", "baseline")


@define(frozen=True)
class Cell:
    """One cell of the matrix.

    :ivar plugins: the enabled plugins (empty: the baseline); for a reference row, empty.
    :ivar reference: ``""`` for a cfn cell, else a key of :data:`REFERENCES`.
    """

    plugins: tuple[str, ...]
    agents: int
    workload: str
    reference: str = ""

    @property
    def combination(self) -> str:
        """``pool+batch``, ``baseline`` or ``ref-processpool``: the row's name in ids and tables."""
        if self.reference:
            return f"ref-{self.reference}"
        return "+".join(self.plugins) or "baseline"

    @property
    def label(self) -> str:
        return REFERENCES[self.reference] if self.reference else self.combination

    @property
    def id(self) -> str:
        """The test id: ``pool+batch-500``, ``baseline-100-mesh``."""
        suffix = "" if self.workload == "star" else f"-{self.workload}"
        return f"{self.combination}-{self.agents}{suffix}"

    @property
    def kind(self) -> str:
        return "reference" if self.reference else "cfn"

    def to_dict(self) -> dict:
        return {
            "id": self.id,
            "kind": self.kind,
            "combination": self.combination,
            "label": self.label,
            "plugins": list(self.plugins),
            "agents": self.agents,
            "workload": self.workload,
            "reference": self.reference,
        }


def matrix_plugins(bench, installed: list[str], default: list[str] | None = None) -> list[str]:
    """The plugins the keyword combinations are built from: ``[bench] plugins``, else ``default``
    (:func:`optimization_plugins`: the bundled ones), else every installed one."""
    names = list(bench.plugins) or sorted(installed if default is None else default)
    for name in names:
        if name not in installed:
            raise unknown(name, installed, "[bench] plugins")
    return names


def unknown(name: str, installed: list[str], where: str) -> ConfigError:
    from ..errors import did_you_mean

    listing = ", ".join(sorted(installed)) or "none (pip install -r requirements.txt installs the bundled ones)"
    return ConfigError(
        f"{where}: unknown plugin {name!r}{did_you_mean(name, installed)}; only installed plugins can be benchmarked, "
        f"installed: {listing}"
    )


def combinations(bench, installed: list[str], default: list[str] | None = None) -> list[tuple[str, ...]]:
    """Expand ``[bench] combinations`` into plugin tuples, baseline first, without duplicates."""
    names = matrix_plugins(bench, installed, default)
    out: list[tuple[str, ...]] = [()]
    for item in bench.combinations:
        word = item.strip()
        if word == "default":
            out += [(n,) for n in names] + [tuple(names)]
        elif word == "all":
            out += [c for k in range(1, len(names) + 1) for c in itertools.combinations(names, k)]
        elif word == "each":
            out += [(n,) for n in names]
        elif word == "combined":
            out.append(tuple(names))
        elif word in ("baseline", "", "none"):
            continue
        else:
            combo = tuple(p.strip() for p in word.split("+") if p.strip())
            for name in combo:
                if name in KEYWORDS:
                    raise ConfigError(f"[bench] combinations: {word!r}: {name!r} is a keyword, not a plugin")
                if name not in installed:
                    raise unknown(name, installed, f"[bench] combinations {word!r}")
            if len(set(combo)) != len(combo):
                raise ConfigError(f"[bench] combinations: {word!r} names a plugin twice")
            out.append(combo)
    seen, unique = set(), []
    for combo in out:
        key = frozenset(combo)
        if key not in seen:
            seen.add(key)
            unique.append(combo)
    return unique


def expand(bench, installed: list[str], default: list[str] | None = None) -> list[Cell]:
    """Every cell of the matrix, smallest N first (early cells give early feedback)."""
    combos = combinations(bench, installed, default)
    cells = []
    for n in sorted(set(bench.agents)):
        for workload in dict.fromkeys(bench.workloads):
            cells += [Cell(plugins=c, agents=n, workload=workload) for c in combos]
            if bench.references and workload == "star":
                cells += [Cell(plugins=(), agents=n, workload=workload, reference=r) for r in REFERENCES]
    if not cells:
        raise ConfigError("[bench] agents and workloads must not be empty")
    return cells


def installed_plugins() -> list[str]:
    from ..plugins import installed

    return sorted(installed())


def bundled_plugins() -> list[str]:
    """Installed plugins that come from this repository's distributions (:data:`BUNDLED_DISTRIBUTIONS`)."""
    from ..plugins import installed

    out = []
    for name, ep in installed().items():
        dist = getattr(ep, "dist", None)
        dist_name = (dist.metadata["Name"] or "") if dist is not None else ""
        if dist_name.lower().replace("_", "-") in BUNDLED_DISTRIBUTIONS:
            out.append(name)
    return sorted(out)


def optimization_plugins() -> list[str]:
    """The bundled plugins that do not replace the transport (``cfn_bus``): the default matrix.

    A third-party plugin is never in it: the report is the project's measure of
    its own optimizations, and a plugin someone happened to install (which may
    fall back on every call) must not show up under its name in every
    ``cfn bench``; it joins when named (``combinations = ["default", "mine"]``
    or ``[bench] plugins``).  A transport such as cfn-redis exists to span
    machines, not to speed up one; it joins the matrix only when named too, so
    "all combined" means the optimizations.
    """
    from ..errors import PluginError
    from ..plugins import load_plugin

    out = []
    for name in bundled_plugins():
        try:
            plugin = load_plugin(name)
        except PluginError:
            continue  # a broken plugin is reported when it is named
        if not callable(getattr(plugin, "cfn_bus", None)):
            out.append(name)
    return out
